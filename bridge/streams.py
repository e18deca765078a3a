"""What every source stream shares: the mapper seam, its cursors' format, and its events."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from bridge.clock import Clock
from bridge.errors import Fatal
from bridge.models import NewOp, SourceEvent, content_hash

Mapper = Callable[[SourceEvent], Sequence[NewOp]]
"""Maps one event to its ops: a flow, passed to a stream as ``mapper``."""

_ENCODER = msgspec.json.Encoder(order="deterministic")


def unmapped(event: SourceEvent) -> Sequence[NewOp]:
    """The default mapper: no ops, for a stream read before (or without) its flow."""
    return []


def format_utc(value: datetime | float) -> str:
    """A timestamp (an epoch float, or a datetime; naive means UTC) as ``2026-01-05T10:12:37Z``.

    The form the source APIs write and their filters take, and the form cursors are stored in.
    """
    if isinstance(value, int | float):
        when = datetime.fromtimestamp(value, UTC)
    else:
        when = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def signpost_at(clock: Clock, index_lag: float) -> datetime:
    """The latest cursor a poll starting now may store: whole seconds, ``index_lag`` behind,
    in case the source's change filter lags its writes."""
    return datetime.fromtimestamp(math.floor(clock.time() - index_lag), UTC)


def parse_time(value: object) -> datetime | None:
    """An aware UTC datetime from an ISO-8601 string or epoch seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_cursor(cursor: str, *, stream: str) -> datetime:
    """A stored cursor back as an aware UTC datetime; anything else is an operator problem."""
    try:
        parsed = datetime.fromisoformat(cursor)
    except ValueError:
        raise Fatal(f"{stream}: stored cursor {cursor!r} is not an ISO timestamp") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def make_event(
    stream: str,
    key: str,
    kind: str,
    data: msgspec.Struct,
    *,
    hashed: msgspec.Struct | None = None,
) -> SourceEvent:
    """An event carrying ``data``; its content hash covers ``hashed`` when given.

    ``hashed`` is ``data`` without what must not count as a change (fields the bridge
    writes back itself, values that move on every read).
    """
    raw = _ENCODER.encode(data)
    digest = content_hash(raw if hashed is None else _ENCODER.encode(hashed))
    return SourceEvent(stream=stream, key=key, kind=kind, data=raw, content_hash=digest)
