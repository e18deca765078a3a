"""The reverse stream: a GHL location's messages read back, to mirror replies into the sources.

No webhook reaches an on-premises daemon, so the location is polled. Two ways to read it:

- **export** (default): ``GET /conversations/messages/export`` sorted by ``updatedAt``
  ascending from the first start, one scan for every non-email type and one for e-mail
  (the export leaves e-mail out unless asked by channel). A message whose status changes
  moves to the end of that order, so status changes are seen too. The export's cursor is
  opaque and null after the last page, so each scan stores the cursor that fetched its
  last page and re-reads that page next time; events already delivered with the same
  content are dropped by the pipeline's hash check.
- **search**, for tokens that may not export: conversations by last message date, newest
  first, down to the last position less an overlap (search lags writes), then each such
  conversation's messages down to the same point. It sees new messages, not later status
  changes of old ones, and message lists carry no e-mail bodies (API_FACTS §2.2).

With ``mode = "auto"`` a token that may not export (401 scope, 403, 404) switches the
stream to search, and export is tried again a day later.

Loop prevention happens here, before any event exists: a message carrying an ``altId``
the bridge writes (``<source>:...``) or whose id is in the id map is the bridge's own and
is never mirrored back. Messages of contacts no source record maps to are skipped too:
no source has anything to learn from them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Literal, Protocol

import msgspec
import structlog

from bridge.clock import Clock
from bridge.config import ReverseSettings
from bridge.connectors.ghl import models
from bridge.connectors.ghl.client import GhlClient
from bridge.errors import Fatal, MissingScope, Rejected
from bridge.models import NewOp, Page, SourceEvent
from bridge.streams import Mapper, make_event, parse_time, unmapped

log = structlog.get_logger("bridge.connectors.ghl.reverse")

EXPORT_RETRY = 86_400.0
"""Seconds a stream stays on search after the export was refused, before trying it again."""

_SCANS: tuple[tuple[str, models.ExportChannel | None], ...] = (("all", None), ("email", "Email"))


class ReplyData(msgspec.Struct, frozen=True, kw_only=True):
    """A GHL message as the reverse flow reads it, with the source records of its contact."""

    id: str
    location: str  # the location's name in the config
    location_id: str
    conversation_id: str
    contact_id: str
    direction: str
    status: str | None = None
    type: str | None = None
    body: str | None = None
    date: str  # dateAdded
    updated: str | None = None  # dateUpdated
    user_id: str | None = None
    source: str | None = None
    links: list[str] = []  # source keys mapped to the contact (people, contacts)


class ReverseCursor(msgspec.Struct, frozen=True, kw_only=True):
    """Where the stream is: stored as JSON like any other stream's cursor."""

    mode: Literal["export", "search"] = "export"
    since: int  # epoch ms; the export's fixed startDate, and search's first position
    scans: dict[str, str] = {}  # export scan -> cursor that fetched its last page
    watermark: int = 0  # search: newest dateAdded seen (epoch ms)
    export_retry_at: float = 0.0  # search after a refused export: when to try export again


class Lookup(Protocol):
    """What the stream asks the store."""

    async def known_message_ids(self, message_ids: Sequence[str]) -> set[str]: ...

    async def contact_links(self, contact_ids: Sequence[str]) -> dict[str, list[str]]: ...


def message_key(location: str, message_id: str) -> str:
    """The source key of a GHL message read back from ``location``."""
    return f"{location}:ghl:message:{message_id}"


def epoch_ms(value: str | None) -> int:
    """An ISO time from GHL as epoch ms (0 when absent or unreadable)."""
    parsed = parse_time(value)
    return 0 if parsed is None else int(parsed.timestamp() * 1000)


class GhlMessagesStream:
    """``<location>.messages``: the location's messages that are not the bridge's own."""

    def __init__(
        self,
        client: GhlClient,
        lookup: Lookup,
        *,
        location: str,
        settings: ReverseSettings,
        own_prefixes: Sequence[str],
        clock: Clock,
        mapper: Mapper = unmapped,
    ) -> None:
        self.name = f"{location}.messages"
        self.poll_interval = float(settings.poll_interval)
        self._client = client
        self._lookup = lookup
        self._location = location
        self._settings = settings
        self._own = tuple(f"{p}:" for p in own_prefixes)
        self._clock = clock
        self._mapper = mapper

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        return self._mapper(event)

    async def pages(self, cursor: str | None) -> AsyncGenerator[Page, None]:
        state = self._start(cursor)
        if state.mode == "export" or (
            self._settings.mode == "auto" and self._clock.time() >= state.export_retry_at
        ):
            try:
                async for page, _ in self._export(state):
                    yield page
                return
            except (MissingScope, Rejected) as exc:
                refused = isinstance(exc, MissingScope) or exc.status in (403, 404)
                if self._settings.mode != "auto" or not refused:
                    raise
                log.warning(
                    "export_not_permitted",
                    stream=self.name,
                    error=str(exc),
                    hint='grant the token message export, or set reverse.mode = "search"',
                )
                state = msgspec.structs.replace(
                    state,
                    mode="search",
                    export_retry_at=self._clock.time() + EXPORT_RETRY,
                    watermark=state.watermark or state.since,
                )
        async for page in self._search(state):
            yield page

    def _start(self, cursor: str | None) -> ReverseCursor:
        if cursor is None:
            since = int((self._clock.time() - float(self._settings.lookback)) * 1000)
            mode: Literal["export", "search"] = (
                "search" if self._settings.mode == "search" else "export"
            )
            return ReverseCursor(mode=mode, since=since, watermark=since)
        try:
            state = msgspec.json.decode(cursor, type=ReverseCursor)
        except msgspec.DecodeError:
            raise Fatal(f"{self.name}: stored cursor {cursor!r} is not a reverse cursor") from None
        if self._settings.mode == "search":
            return msgspec.structs.replace(state, mode="search")
        if self._settings.mode == "export":
            return msgspec.structs.replace(state, mode="export")
        return state

    # ----------------------------------------------------------------- export

    async def _export(
        self, state: ReverseCursor
    ) -> AsyncGenerator[tuple[Page, ReverseCursor], None]:
        state = msgspec.structs.replace(state, mode="export")
        since = datetime.fromtimestamp(state.since / 1000, UTC)
        read = False
        for scan, channel in _SCANS:
            if channel == "Email" and not self._settings.email:
                continue
            params = models.MessageExport(
                limit=self._settings.page_size,
                sort_by="updatedAt",
                sort_order="asc",
                channel=channel,
                start_date=since,
            )
            resume = state.scans.get(scan)
            async for page in self._client.iter_export_pages(params, cursor=resume):
                # After the last page, keep the cursor that fetched it: the export has no
                # cursor past its end, and re-reading one page is cheap.
                resume = page.next_cursor or resume
                scans = dict(state.scans)
                if resume is None:
                    scans.pop(scan, None)
                else:
                    scans[scan] = resume
                state = msgspec.structs.replace(state, scans=scans)
                read = True
                yield Page(events=await self._events(page.messages), cursor=_encode(state)), state
        if not read:
            # The pager yields no empty page: store the state even when nothing came, so
            # the first poll's starting point is kept.
            yield Page(events=[], cursor=_encode(state)), state

    # ----------------------------------------------------------------- search

    async def _search(self, state: ReverseCursor) -> AsyncGenerator[Page, None]:
        floor = max(state.since, state.watermark) - int(float(self._settings.overlap) * 1000)
        changed: list[models.ConversationSummary] = []
        search = models.ConversationSearch(sort_by="last_message_date", sort="desc", limit=100)
        async for page in self._client.iter_conversation_pages(search):
            newer = [c for c in page.conversations if (c.last_message_date or 0) > floor]
            changed += newer
            if len(newer) < len(page.conversations):
                break
        messages: list[models.Message] = []
        for conversation in changed:
            async for listed in self._client.iter_message_pages(conversation.id, limit=100):
                newer_messages = [m for m in listed.messages if epoch_ms(m.date_added) > floor]
                messages += newer_messages
                if len(newer_messages) < len(listed.messages):
                    break
        messages.sort(key=lambda m: (epoch_ms(m.date_added), m.id))
        newest = max([state.watermark, *(epoch_ms(m.date_added) for m in messages)])
        events = await self._events(messages)
        log.info(
            "ghl_search_polled",
            stream=self.name,
            conversations=len(changed),
            messages=len(messages),
        )
        yield Page(
            events=events,
            cursor=_encode(msgspec.structs.replace(state, mode="search", watermark=newest)),
        )

    # ----------------------------------------------------------------- events

    async def _events(self, messages: Sequence[models.Message]) -> list[SourceEvent]:
        theirs = [m for m in messages if not (m.alt_id or "").startswith(self._own)]
        known = await self._lookup.known_message_ids([m.id for m in theirs])
        theirs = [m for m in theirs if m.id not in known]
        links = await self._lookup.contact_links(sorted({m.contact_id for m in theirs}))
        events = [self._event(m, links[m.contact_id]) for m in theirs if links.get(m.contact_id)]
        if messages:
            log.debug(
                "ghl_messages_read",
                stream=self.name,
                read=len(messages),
                own=len(messages) - len(theirs),
                unlinked=len(theirs) - len(events),
            )
        return events

    def _event(self, message: models.Message, links: list[str]) -> SourceEvent:
        data = ReplyData(
            id=message.id,
            location=self._location,
            location_id=message.location_id,
            conversation_id=message.conversation_id,
            contact_id=message.contact_id,
            direction=message.direction or "outbound",
            status=message.status,
            type=message.message_type,
            body=message.body,
            date=message.date_added,
            updated=message.date_updated,
            user_id=message.user_id,
            source=message.source,
            links=links,
        )
        # Only what a source is told counts as a change: not the update time, not links.
        hashed = msgspec.structs.replace(data, updated=None, links=[])
        key = message_key(self._location, message.id)
        return make_event(self.name, key, "ghl_message", data, hashed=hashed)


def _encode(state: ReverseCursor) -> str:
    return msgspec.json.encode(state).decode()
