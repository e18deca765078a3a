"""ActiveDEMAND source streams: every contact each poll, and changed conversations with
their new messages (the PROPOSED feeds).

The client lives in :mod:`bridge.connectors.ad_client` and is re-exported here, so
``bridge.connectors.activedemand`` is the one module the composition root imports.

A record the client cannot read (bad text, no usable id, a shape that does not fit) goes
into its page's ``rejected`` list as served, under its usual key when its id could be
read: it is dead-lettered with the page, and the stream goes on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec
import structlog

from bridge.clock import Clock
from bridge.config import ActiveDemandSource
from bridge.connectors.ad_client import APP_KEY_HEADER, AdClient, AuthMode, BadRecord, Entry
from bridge.connectors.ad_files import DEFAULT_MAX_ATTACHMENT_BYTES, DEFAULT_MAX_RECORDING_BYTES
from bridge.connectors.ad_models import (
    ContactData,
    ConversationData,
    MessageData,
    WireConversation,
    contact_key,
    conversation_data,
    conversation_key,
    is_settled,
    message_data,
    message_key,
)
from bridge.errors import Rejected
from bridge.models import NewOp, Page, Rejection, SourceEvent, unreadable
from bridge.streams import (
    Mapper,
    format_utc,
    make_event,
    parse_cursor,
    signpost_at,
    unmapped,
)

__all__ = [
    "APP_KEY_HEADER",
    "DEFAULT_INDEX_LAG",
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "DEFAULT_MAX_RECORDING_BYTES",
    "DEFAULT_OVERLAP",
    "AdClient",
    "AdContactsStream",
    "AdConversationsStream",
    "AuthMode",
    "Entry",
]

log = structlog.get_logger("bridge.connectors.activedemand")

DEFAULT_OVERLAP = 120.0
DEFAULT_INDEX_LAG = 5.0
"""Seconds the signpost stays behind the poll start, in case the feed's filter lags writes."""
DEFAULT_SETTLE_AFTER = 86_400.0
DEFAULT_TRACKED = 10_000

_EPOCH = datetime.min.replace(tzinfo=UTC)
_MAX_REASON = 500

KnownKeys = Callable[[Sequence[str]], Awaitable[set[str]]]
"""Which of these source keys the bridge already has (delivered or queued): the store's."""


# --------------------------------------------------------------------------- contacts stream


class AdContactsStream:
    """Every contact of the account, read whole on each poll (no change filter exists).

    Each API page becomes one :class:`Page`, so memory stays one page deep whatever the
    account's size; every contact is emitted and the pipeline drops those whose content
    hash was already delivered. The last, empty page carries the scan's finish time as
    the cursor: informational only, since the next scan starts from the top anyway.
    ``own_fields`` (custom fields the bridge itself writes) are left out of the hash, so
    a write-back does not read as a change to send again.
    """

    def __init__(
        self,
        client: AdClient,
        *,
        source: str,
        clock: Clock,
        mapper: Mapper = unmapped,
        poll_interval: float = 900.0,
        own_fields: frozenset[str] = frozenset(),
    ) -> None:
        self.source = source
        self.name = f"{source}.contacts"
        self.poll_interval = poll_interval
        self._client = client
        self._clock = clock
        self._mapper = mapper
        self._own_fields = own_fields

    @classmethod
    def from_config(
        cls,
        source: ActiveDemandSource,
        client: AdClient,
        *,
        clock: Clock,
        mapper: Mapper = unmapped,
        own_fields: frozenset[str] = frozenset(),
    ) -> AdContactsStream:
        return cls(
            client,
            source=source.name,
            clock=clock,
            mapper=mapper,
            poll_interval=float(source.poll_interval),
            own_fields=own_fields,
        )

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        return self._mapper(event)

    async def pages(self, cursor: str | None) -> AsyncGenerator[Page, None]:
        started = self._clock.monotonic()
        count = 0
        async for batch in self._client.contact_pages():
            count += len(batch.items)
            yield Page(
                events=[self._event(c) for c in batch.items],
                cursor=None,
                rejected=[_rejection(self.name, b, self.source, contact_key) for b in batch.bad],
            )
        log.info(
            "ad_contacts_scanned",
            contacts=count,
            seconds=round(self._clock.monotonic() - started, 3),
        )
        yield Page(events=[], cursor=format_utc(self._clock.time()))

    def _event(self, contact: ContactData) -> SourceEvent:
        hashed = None
        if self._own_fields & contact.custom.keys():
            custom = {k: v for k, v in contact.custom.items() if k not in self._own_fields}
            hashed = msgspec.structs.replace(contact, custom=custom)
        return make_event(
            self.name, contact_key(self.source, contact.id), "contact", contact, hashed=hashed
        )


# --------------------------------------------------------------------------- conversations stream


class _Tracked(msgspec.Struct, frozen=True):
    """What was last read of one conversation: its version and its message watermark."""

    version: str
    watermark: str | None


class _Window:
    """One poll's bookkeeping: versions seen, the newest change, and any paging shift."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.newest: datetime | None = None
        self.shifted = False

    def first_sight(self, entry: Entry[WireConversation]) -> bool:
        """Whether to handle this record: not if it is a repeat of one already handled."""
        before = self.seen.get(entry.id)
        if before is not None:
            # Offset paging over a list that reorders on change: the record moved to a
            # later page, and one that was not yet read may have moved onto a read page.
            self.shifted = True
            if before == entry.version:
                return False
        self.seen[entry.id] = entry.version
        if entry.updated is not None and (self.newest is None or entry.updated > self.newest):
            self.newest = entry.updated
        return True


class AdConversationsStream:
    """PROPOSED feed: conversations changed since the cursor, each with its new messages.

    A poll lists conversations with ``updated_since = cursor - overlap`` (the filter is
    inclusive, so a change in the cursor's own second is not lost), and stores as cursor
    ``min(newest updated_at seen, signpost)``: server time, so clock skew cannot skip
    records, never past the poll start. Without an updated field in the feed config the
    cursor is the signpost and changes are told by content hash. If offset paging
    shifted during the walk (a conversation seen twice), the cursor stays put, so the
    next poll re-reads the window instead of losing the record that slid past.

    Messages: each conversation's events come right after its own, sorted by created.
    What was read of each conversation is kept **in memory**, in a bounded LRU: its
    version (skip the messages request when unchanged, as the overlap re-lists recent
    conversations every poll) and a watermark, the id of the last message up to which
    every message is settled (final status, and a recorded call has its transcription,
    or older than ``settle_after``). The next read asks ``since_id = watermark``, so
    messages whose status may still change are re-read (their new status changes their
    hash) while settled history is not. Why memory, not the cursor or event data: a
    cursor holding a watermark per conversation grows with every conversation ever
    active, and reading them back from event data would need the store inside the
    stream. Losing the map (restart, eviction) costs one whole-conversation read, never
    a duplicate, because the pipeline drops (key, hash) pairs already delivered. The map
    is updated only after the page that read those messages has been committed.

    A conversation first read (no watermark) is read whole, so GHL gets its history.
    With no stored cursor a live stream starts at its first signpost: history is a
    backfill's job. ``backfill_since`` makes a backfill stream, named
    ``<source>.conversations.backfill``, which starts there under a cursor of its own.

    Contacts: a conversation can name a contact made after the last contacts scan (a new
    person texting in). With ``known`` given, the contacts of a page that the bridge has
    never seen are fetched (by id, or by walking the list when the account has no
    single-contact resource) and emitted before their conversations, so their messages
    never wait for the next full scan. A call's transcription is read with its message
    once the feed says it exists, so flows see the text.
    """

    def __init__(
        self,
        client: AdClient,
        *,
        source: str,
        clock: Clock,
        mapper: Mapper = unmapped,
        poll_interval: float = 60.0,
        overlap: float = DEFAULT_OVERLAP,
        index_lag: float = DEFAULT_INDEX_LAG,
        settle_after: float = DEFAULT_SETTLE_AFTER,
        tracked: int = DEFAULT_TRACKED,
        backfill_since: datetime | None = None,
        known: KnownKeys | None = None,
    ) -> None:
        if overlap < 0 or index_lag < 0 or settle_after < 0:
            raise ValueError("overlap, index_lag and settle_after must not be negative")
        if tracked < 1:
            raise ValueError(f"tracked must be at least 1, got {tracked}")
        self.source = source
        suffix = ".backfill" if backfill_since is not None else ""
        self.name = f"{source}.conversations{suffix}"
        self.poll_interval = poll_interval
        self._client = client
        self._clock = clock
        self._mapper = mapper
        self._overlap = timedelta(seconds=overlap)
        self._index_lag = index_lag
        self._settle_after = settle_after
        self._capacity = tracked
        self._first_since = backfill_since
        self._known = known
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()

    @classmethod
    def from_config(
        cls,
        source: ActiveDemandSource,
        client: AdClient,
        *,
        clock: Clock,
        mapper: Mapper = unmapped,
        poll_interval: float | None = None,
        known: KnownKeys | None = None,
        backfill_since: datetime | None = None,
    ) -> AdConversationsStream:
        interval = float(source.conversations_interval) if poll_interval is None else poll_interval
        return cls(
            client,
            source=source.name,
            clock=clock,
            mapper=mapper,
            poll_interval=interval,
            known=known,
            backfill_since=backfill_since,
        )

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        return self._mapper(event)

    def signpost(self) -> datetime:
        """The latest cursor a poll starting now may store."""
        return signpost_at(self._clock, self._index_lag)

    async def pages(self, cursor: str | None) -> AsyncGenerator[Page, None]:
        signpost = self.signpost()
        if cursor is not None:
            start = parse_cursor(cursor, stream=self.name)
        else:
            start = self._first_since or signpost
        window = _Window()
        log.info("ad_poll_started", stream=self.name, since=format_utc(start - self._overlap))
        async for batch in self._client.conversation_pages(updated_since=start - self._overlap):
            fresh = [entry for entry in batch.items if window.first_sight(entry)]
            conversations = [conversation_data(self.source, e.id, e.value) for e in fresh]
            events = await self._new_contacts(conversations)
            rejected = [_rejection(self.name, b, self.source, conversation_key) for b in batch.bad]
            learned: list[tuple[str, _Tracked]] = []
            for entry, conversation in zip(fresh, conversations, strict=True):
                events.append(
                    self._event(
                        conversation_key(self.source, entry.id), "conversation", conversation
                    )
                )
                known = self._tracked.get(entry.id)
                if known is not None and known.version == entry.version:
                    continue
                messages, bad, watermark = await self._messages(
                    conversation, known.watermark if known is not None else None
                )
                events += messages
                rejected += bad
                learned.append((entry.id, _Tracked(entry.version, watermark)))
            yield Page(events=events, cursor=None, rejected=rejected)
            # Reached only once the consumer has committed the page: a watermark stored
            # before its messages were durable could skip them after a failed commit.
            for conversation_id, state in learned:
                self._remember(conversation_id, state)
        new_cursor = self._next_cursor(start, signpost, window)
        log.info(
            "ad_window_read",
            stream=self.name,
            conversations=len(window.seen),
            cursor=format_utc(new_cursor),
        )
        yield Page(events=[], cursor=format_utc(new_cursor))

    async def _messages(
        self, conversation: ConversationData, since_id: str | None
    ) -> tuple[list[SourceEvent], list[Rejection], str | None]:
        """The conversation's messages after ``since_id`` as events, the ones that cannot
        be read as rejections, and the new watermark.

        The watermark stops before the first API page holding a bad message, so that
        message is read again (and delivered, if the source has mended it) the next
        time the conversation changes.
        """
        read: list[tuple[str, MessageData]] = []
        rejected: list[Rejection] = []
        settled_upto: int | None = None
        async for batch in self._client.message_pages(conversation.id, since_id=since_id):
            if batch.bad and settled_upto is None:
                settled_upto = len(read)
            rejected += (_rejection(self.name, b, self.source, message_key) for b in batch.bad)
            for e in batch.items:
                data = message_data(self.source, e.id, e.value, conversation)
                if data.call is not None and data.call.transcription:
                    data = msgspec.structs.replace(data, transcript=await self._transcript(e.id))
                read.append((e.id, data))
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        watermark = since_id
        for message_id, data in read[:settled_upto]:  # the feed's order, as since_id is
            if not is_settled(data, now=now, settle_after=self._settle_after):
                break
            watermark = message_id
        # Source order for GHL; the sort is stable, so equal times keep the feed's order.
        ordered = sorted((data for _, data in read), key=lambda m: m.created or _EPOCH)
        return [self._message_event(m) for m in ordered], rejected, watermark

    async def _new_contacts(self, conversations: Sequence[ConversationData]) -> list[SourceEvent]:
        """Contact events for contacts of these conversations the bridge has never seen."""
        if self._known is None:
            return []
        keys = {
            c.contact_key: c.contact_id for c in conversations if c.contact_id and c.contact_key
        }
        if not keys:
            return []
        known = await self._known(sorted(keys))
        missing = {cid for key, cid in keys.items() if key not in known}
        if not missing:
            return []
        found = await self._client.find_contacts(missing)
        lost = sorted(missing - found.keys())
        if lost:
            # Their conversations' ops are dead-lettered with "no GHL contact".
            log.warning("ad_contacts_not_found", stream=self.name, contact_ids=lost)
        log.info("ad_new_contacts_read", stream=self.name, contacts=len(found))
        return [
            make_event(self.name, contact_key(self.source, cid), "contact", found[cid])
            for cid in sorted(found)
        ]

    async def _transcript(self, message_id: str) -> str | None:
        """A call's transcription as "speaker: text" lines (the plain download if none)."""
        try:
            sentences = await self._client.transcription(message_id)
        except Rejected:
            return None  # listed as existing, yet not there (yet): read again next time
        lines = [f"{s.speaker}: {s.text}" if s.speaker else s.text for s in sentences if s.text]
        if lines:
            return "\n".join(lines)
        text = (await self._client.transcription_text(message_id)).strip()
        return text or None

    def _message_event(self, message: MessageData) -> SourceEvent:
        # Attachment URLs may be signed and change on every read; left in the hash they
        # would make every poll look like an edit.
        hashed = msgspec.structs.replace(
            message,
            attachments=[msgspec.structs.replace(a, url="") for a in message.attachments],
        )
        return self._event(message_key(self.source, message.id), "message", message, hashed)

    def _event(
        self, key: str, kind: str, data: msgspec.Struct, hashed: msgspec.Struct | None = None
    ) -> SourceEvent:
        return make_event(self.name, key, kind, data, hashed=hashed)

    def _remember(self, conversation_id: str, state: _Tracked) -> None:
        self._tracked[conversation_id] = state
        self._tracked.move_to_end(conversation_id)
        while len(self._tracked) > self._capacity:
            self._tracked.popitem(last=False)

    def _next_cursor(self, start: datetime, signpost: datetime, window: _Window) -> datetime:
        if window.shifted:
            log.warning("ad_conversations_shifted", stream=self.name, cursor=format_utc(start))
            return start
        if self._client.feeds.conversations.updated_field is None:
            return max(start, signpost)
        newest = window.newest if window.newest is not None else start
        return min(max(newest, start), signpost)


def _rejection(
    stream: str, bad: BadRecord, source: str, key: Callable[[str, str], str]
) -> Rejection:
    """A record the client could not read, as a dead letter of ``stream``: under its usual
    key (``key(source, id)``) when its id was readable, else under one made from its bytes."""
    reason = bad.reason
    if len(reason) > _MAX_REASON:
        reason = f"{reason[:_MAX_REASON]}… ({len(reason) - _MAX_REASON} more characters)"
    record_key = key(source, bad.id) if bad.id is not None else None
    return unreadable(stream, bad.raw, reason, key=record_key)
