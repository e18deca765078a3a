"""``bridge map preview``: what real source records would send, without sending anything.

Reads the first people of a group (and, on request, their activities) through the same
stream and flow the daemon uses, and prints each record's ops with their payloads, or the
reason it would be dead-lettered. Nothing is written to GHL, to the source or to the state
file.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from bridge.app import an_flow, build_limiters
from bridge.clock import SystemClock
from bridge.config import Config
from bridge.connectors.actionnetwork import AnClient, AnPeopleStream
from bridge.errors import EX_USAGE, Rejected
from bridge.models import SourceEvent
from bridge.rest import make_session

_EPOCH = datetime(1970, 1, 2, tzinfo=UTC)


async def map_preview(
    config: Config, source_name: str, out: TextIO, *, limit: int, activities: bool
) -> int:
    """Print the ops of the first ``limit`` people of ``source_name``; returns the exit status."""
    sources = {s.name: s for s in config.sources.action_network}
    source = sources.get(source_name)
    if source is None:
        known = ", ".join(sources) or "none"
        print(
            f"bridge: no Action Network source named {source_name!r} (known: {known})",
            file=sys.stderr,
        )
        return EX_USAGE
    flow = an_flow(config, source)
    clock = SystemClock()
    async with make_session() as session:
        client = AnClient.from_config(
            session,
            source,
            bucket=build_limiters(config, clock).get("actionnetwork", source.name),
            clock=clock,
        )
        # A backfill-shaped stream reads from the start and never touches a cursor.
        stream = AnPeopleStream(
            client,
            source=source.name,
            clock=clock,
            mapper=flow,
            activities=activities,
            backfill_since=_EPOCH,
            own_fields=flow.own_fields,
        )
        people = 0
        async with contextlib.aclosing(stream.pages(None)) as pages:
            async for page in pages:
                for event in page.events:
                    if event.kind == "person":
                        if people == limit:
                            return 0
                        people += 1
                    out.write(_describe(event, flow))
    if people == 0:
        out.write("no people in this group\n")
    return 0


def _describe(event: SourceEvent, flow: Any) -> str:
    lines = [f"{event.kind} {event.key}"]
    try:
        ops = flow(event)
    except Rejected as exc:
        lines.append(f"  REJECTED (would be dead-lettered): {exc}")
        return "\n".join(lines) + "\n\n"
    for op in ops:
        payload = msgspec.json.decode(op.payload)
        payload.pop("op", None)
        body = msgspec.json.encode(payload).decode()
        lines.append(f"  {op.kind:<26} {op.source_key if op.source_key != op.entity else ''}")
        lines.append(f"    {body}")
    return "\n".join(lines) + "\n\n"
