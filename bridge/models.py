"""Structs passed between pipeline stages: source events, outbox ops and their results."""

from __future__ import annotations

import hashlib

import msgspec


class SourceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One record read from a source, before it is mapped to target ops.

    ``key`` is the bridge's stable name for the record (``an-main:person:<uuid>``); it is
    the id-map key and, for messages, the ``altId`` written to GHL. ``data`` is the
    record's JSON exactly as the stream normalised it, so a dead letter can be replayed.
    """

    stream: str
    key: str
    kind: str
    data: bytes
    content_hash: str


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """A source event that could not be read or mapped, bound for the dead-letter table."""

    event: SourceEvent
    reason: str


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """One page of a stream: its events and the cursor to store once they are durable.

    ``rejected`` holds the page's records that could not be read at all (a wrong type, a
    missing id): they are dead-lettered in the same transaction as the page's ops and
    cursor, so one bad record neither stalls its stream nor is lost.
    """

    events: list[SourceEvent]
    cursor: str | None
    rejected: list[Rejection] = msgspec.field(default_factory=list)


UNREADABLE_KIND = "unreadable"
"""The kind of an event that holds a source record as served, because it did not decode."""


def unreadable(stream: str, raw: bytes, reason: str, *, key: str | None = None) -> Rejection:
    """A source record that does not decode as its stream's type, as a dead letter.

    ``raw`` is the record's JSON as served, kept so the operator sees what came. Bytes that
    are not valid JSON (bad UTF-8, a lone surrogate escape) are kept as a JSON string with
    the bad bytes replaced, so the dead letter itself always reads back. ``key`` is the
    record's usual key when its id could be read; otherwise the key is made from the
    record's bytes, so the same bad record served again is one dead letter, not many.
    """
    try:
        msgspec.json.decode(raw)
        data = raw
    except (msgspec.DecodeError, UnicodeDecodeError):
        data = msgspec.json.encode(raw.decode("utf-8", "replace"))
    digest = hashlib.sha256(raw).hexdigest()
    return Rejection(
        event=SourceEvent(
            stream=stream,
            key=key or f"{stream}:unidentified:{digest[:16]}",
            kind=UNREADABLE_KIND,
            data=data,
            content_hash=digest,
        ),
        reason=reason,
    )


class _EventEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    key: str
    kind: str
    content_hash: str
    data: msgspec.Raw


def encode_event(event: SourceEvent) -> bytes:
    """A dead-letter payload for an event: readable JSON that can be replayed."""
    return msgspec.json.encode(
        _EventEnvelope(
            stream=event.stream,
            key=event.key,
            kind=event.kind,
            content_hash=event.content_hash,
            data=msgspec.Raw(event.data),
        )
    )


def decode_event(payload: bytes) -> SourceEvent:
    envelope = msgspec.json.decode(payload, type=_EventEnvelope)
    return SourceEvent(
        stream=envelope.stream,
        key=envelope.key,
        kind=envelope.kind,
        content_hash=envelope.content_hash,
        data=bytes(envelope.data),
    )


class NewOp(msgspec.Struct, frozen=True, kw_only=True):
    """A target operation to write into the outbox.

    ``entity`` is the ordering key: ops of one entity run one at a time, in outbox
    order. ``target`` names the connector instance that performs it (``ghl:main``).
    ``content_hash`` is recorded in the id map when the op completes; only the last op
    of an event carries it, so a record counts as delivered when all its ops are done.
    """

    target: str
    entity: str
    kind: str
    source_key: str
    payload: bytes
    content_hash: str | None = None


class Op(msgspec.Struct, frozen=True, kw_only=True):
    """An outbox row handed to a sender."""

    id: int
    stream: str
    target: str
    entity: str
    kind: str
    source_key: str
    payload: bytes
    content_hash: str | None
    attempts: int
    in_doubt: bool


class IdMapUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """Target ids learned by an op; ``None`` leaves the stored value unchanged."""

    source_key: str
    contact_id: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    # The source tags now on the contact (a tag sync's result).
    tags: tuple[str, ...] | None = None
    # Where an uploaded attachment lives in the target.
    url: str | None = None


class OpResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a sender learned from a successful (or reconciled) op."""

    updates: tuple[IdMapUpdate, ...] = ()
    # Small facts a target keeps between ops, (key, value), stored with the op's completion:
    # e.g. the newest GHL reply already mirrored into a person.
    marks: tuple[tuple[str, str], ...] = ()


class IdMapRow(msgspec.Struct, frozen=True, kw_only=True):
    """What the bridge knows about one source record in the target."""

    source_key: str
    contact_id: str | None
    conversation_id: str | None
    message_id: str | None
    content_hash: str | None
    updated_at: float
    tags: tuple[str, ...] | None = None
    url: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead-letter row: an op or event that was rejected, with why and how often."""

    id: int
    stream: str
    target: str | None
    entity: str | None
    kind: str
    source_key: str
    content_hash: str | None
    payload: bytes
    error: str
    attempts: int
    first_seen: float
    last_seen: float


class CursorRow(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's stored cursor and when it last moved."""

    stream: str
    value: str
    updated_at: float


class BudgetRow(msgspec.Struct, frozen=True, kw_only=True):
    """A rate-limit bucket as last reported by the running daemon."""

    api: str
    tenant: str
    capacity: int
    window: float
    available: int
    used_today: int
    daily_cap: int | None
    paused_until: float | None
    updated_at: float


class TokenRow(msgspec.Struct, frozen=True, kw_only=True):
    """An OAuth token pair for one GHL location."""

    location: str
    access_token: str
    refresh_token: str
    expires_at: float
    scope: str
    updated_at: float


EVENT_KIND = "event"
"""Dead-letter ``kind`` for a source event that failed to map (as opposed to an op)."""


def marker(source_key: str) -> str:
    """The line the bridge writes into a note, task or history entry so it can find its own
    record again when an op's outcome is unknown."""
    return f"[bridge:{source_key}]"


def content_hash(data: bytes) -> str:
    """A short stable digest of a record's content, to skip unchanged records."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
