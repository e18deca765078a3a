"""Action Network source: a paced HAL client and the people stream with tags and activities.

Activity strategy, measured in the simulator's journal (``tests/test_actionnetwork.py``,
seeded group of 60 people with 3 activities each and A = 10 actions, two of each kind; N
people each took one new action; requests of one whole poll):

=============================  ====  ====  ====  ====
changed people N                  1     5    20    50
=============================  ====  ====  ====  ====
per-person sub-collections       10    38   133   314
per-action collections           19    23    38    69
=============================  ====  ====  ====  ====

Both read the people window (W = its pages plus the empty last one), ``/tags`` once and each
changed person's taggings. Per person then costs 5 filtered sub-collections (one page each:
they report ``total_pages``) plus one title lookup per action not yet cached: W + 1 + 6N +
min(N, A). Per action costs the 5 action lists plus one filtered record walk per action:
W + 1 + N + 5 + A. Chosen: per-person. It reads each changed person's own records, so no
activity depends on its action appearing in the five top-level lists (whether event-campaign
events and hidden or retired actions do is not documented), and its cost follows the people
who changed, while per-action pays 5 + A on every poll with a change, A being every action the
group ever made (hundreds in a live group). The price is a ceiling of about 2,400 changed
people an hour per key (4/s over ~6 requests each); a bigger burst lags, then catches up.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import msgspec
import structlog

from bridge import json_items, rest
from bridge.clock import Clock
from bridge.config import ActionNetworkSource
from bridge.connectors.an_models import (
    ACTIVITY_TYPES,
    Action,
    ActivityData,
    ActivityType,
    HalPage,
    Items,
    Person,
    Record,
    Tag,
    Tagging,
    activity_data,
    an_id,
    decode_page,
    href_id,
    person_data,
    person_key,
    read_items,
    utc,
)
from bridge.errors import Fatal, Rejected, Retryable
from bridge.models import NewOp, Page, Rejection, SourceEvent, unreadable
from bridge.ratelimit import TokenBucket
from bridge.streams import (
    Mapper,
    format_utc,
    make_event,
    parse_cursor,
    signpost_at,
    unmapped,
)

__all__ = [
    "DEFAULT_INDEX_LAG",
    "MAX_PER_PAGE",
    "RECENT_PEOPLE",
    "AnClient",
    "AnPeopleStream",
]

log = structlog.get_logger("bridge.connectors.actionnetwork")

T = TypeVar("T")

MAX_PER_PAGE = 25  # the documented maximum (API_FACTS §4)
DEFAULT_INDEX_LAG = 5.0
"""Seconds the signpost stays behind the poll start: filters can lag writes (API_FACTS §5)."""

_READ_TRIES = 5
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_ACCEPT = "application/hal+json, application/json;q=0.9"
_ACTION_CACHE_SIZE = 256
RECENT_PEOPLE = 1_000
"""People a poll remembers to skip a repeat without reading it again (about 40 pages)."""
# People changed within the overlap that the next poll may skip: only a burst reaches it.
_TAIL_CAP = 50_000
# gt is strict and dates have one-second resolution: one more second keeps the records
# stamped in the cursor's own second, which may have been written after the last read.
_SECOND = timedelta(seconds=1)


# --------------------------------------------------------------------------- client


class AnClient:
    """One Action Network key: paced GETs that retry transient failures, and HAL paging.

    Every request spends a token from ``bucket`` (4/s per key); a 429 also pauses the
    bucket inside :func:`bridge.rest.request`. Reads are retried ``read_tries`` times in
    all on :class:`Retryable`; the key travels in a header and is never part of a message.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        bucket: TokenBucket | None,
        clock: Clock,
        per_page: int = MAX_PER_PAGE,
        read_tries: int = _READ_TRIES,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be within 1..{MAX_PER_PAGE}, got {per_page}")
        if read_tries < 1:
            raise ValueError(f"read_tries must be at least 1, got {read_tries}")
        self.per_page = per_page
        self._session = session
        self._base = base_url.rstrip("/")
        self._base_path = urlsplit(self._base).path
        self._headers = {"OSDI-API-Token": api_key, "Accept": _ACCEPT}
        self._bucket = bucket
        self._clock = clock
        self._read_tries = read_tries
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography

    @classmethod
    def from_config(
        cls,
        session: aiohttp.ClientSession,
        source: ActionNetworkSource,
        *,
        bucket: TokenBucket | None,
        clock: Clock,
    ) -> AnClient:
        return cls(
            session,
            base_url=source.base_url,
            api_key=source.api_key.reveal(),
            bucket=bucket,
            clock=clock,
        )

    async def probe(self) -> None:
        """Prove the key opens a group, or raise :class:`AuthError`.

        The entry point answers 200 even to a bad key, so the probe reads one person.
        """
        hal = await self._raw_page("/people", page=1, per_page=1)
        _embedded(hal, f"GET {self._base_path}/people")

    async def page(
        self,
        tp: type[T],
        path: str,
        *,
        page: int,
        per_page: int | None = None,
        filter: str | None = None,
    ) -> HalPage[T]:
        """One page of a collection, its items decoded as ``tp`` (one bad item fails it)."""
        # HalPage[tp] is a runtime generic alias; mypy cannot see a variable as a type.
        page_type: Any = cast(Any, HalPage)[tp]
        query = self._query(page, per_page, filter)
        return cast(HalPage[T], await self._get(page_type, path, query))

    async def items(
        self, tp: type[T], path: str, *, filter: str | None = None
    ) -> AsyncIterator[Items[T]]:
        """Every non-empty page of a collection, in order, until an empty page.

        Each item is decoded on its own, so one that does not fit is handed back as
        served, with why, and the rest of its page still reads. ``next`` is present even
        on the last page, so only an empty page (or, where the collection reports it,
        ``total_pages``) ends the walk. A page that is not the one asked for, or that
        repeats the previous page's items, raises :class:`Fatal`: following it would loop
        or skip records.
        """
        where = f"GET {self._base_path}{path}"
        previous: list[bytes] | None = None
        number = 1
        while True:
            hal = await self._raw_page(path, page=number, filter=filter)
            if hal.page is not None and hal.page != number:
                raise Fatal(
                    f"{where}: asked for page {number} but the server returned page "
                    f"{hal.page}; paging would loop or skip records"
                )
            served = [bytes(item) for item in _embedded(hal, where)]
            if not served:
                return
            if served == previous:
                raise Fatal(f"{where}: page {number} repeats page {number - 1}; paging would loop")
            yield read_items(tp, served, where=f"{where} page {number}")
            if hal.total_pages is not None and number >= hal.total_pages:
                return
            previous = served
            number += 1

    async def pages(
        self, tp: type[T], path: str, *, filter: str | None = None
    ) -> AsyncIterator[list[T]]:
        """Like :meth:`items`, for readers with no dead letters: an item that does not
        decode raises :class:`Retryable`, as a whole page that does not would."""
        async for batch in self.items(tp, path, filter=filter):
            if batch.unread:
                raise Retryable(batch.unread[0].reason)
            yield [item for item, _ in batch.read]

    async def tag_names(self) -> dict[str, str]:
        """Every tag of the group: uuid -> name."""
        names: dict[str, str] = {}
        async for tags in self.pages(Tag, "/tags"):
            for tag in tags:
                tag_id = an_id(tag.identifiers)
                if tag_id is not None and tag.name is not None:
                    names[tag_id] = tag.name
        return names

    async def person_tag_ids(self, person_id: str) -> list[str]:
        """The uuids of the tags a person carries (taggings cannot be filtered)."""
        found: list[str] = []
        async for taggings in self.items(Tagging, f"/people/{_q(person_id)}/taggings"):
            if taggings.unread:
                # A tag set read with a hole in it would remove that tag in GHL.
                raise Rejected(taggings.unread[0].reason)
            for tagging, _ in taggings.read:
                ref = href_id(tagging.links, "osdi:tag")
                if ref is not None:
                    found.append(ref[1])
        return found

    async def action(self, collection: str, action_id: str) -> Action:
        """``GET /{collection}/{id}`` for a petition, form, event, page or campaign."""
        return await self._get(Action, f"/{_q(collection)}/{_q(action_id)}", [])

    async def update_person(self, person_id: str, custom_fields: Mapping[str, str]) -> None:
        """``PUT /people/{id}`` with only these custom fields: AN merges them key by key.

        Not retried here: the pipeline retries writes with its own backoff and limits.
        """
        path = f"/people/{_q(person_id)}"
        await rest.request(
            self._session,
            "PUT",
            self._base + path,
            bucket=self._bucket,
            write=True,
            clock=self._clock,
            headers=self._headers,
            json={"custom_fields": dict(custom_fields)},
        )

    async def person(self, person_id: str) -> Person:
        """``GET /people/{id}``."""
        return await self._get(Person, f"/people/{_q(person_id)}", [])

    async def create_tag(self, name: str) -> None:
        """``POST /tags``: the helpers only apply tags that already exist (API_FACTS §7.2)."""
        await rest.request(
            self._session,
            "POST",
            self._base + "/tags",
            bucket=self._bucket,
            write=True,
            clock=self._clock,
            headers=self._headers,
            json={"name": name},
        )

    async def change_tags(self, email: str, add: Sequence[str], remove: Sequence[str]) -> None:
        """Add and remove tags by name with the person signup helper (``POST /people``).

        Tags cannot be changed with PUT (API_FACTS §8.2); the helper matches the person by
        e-mail and changes nothing else when only the address is sent (§8.1).
        """
        body: dict[str, object] = {"person": {"email_addresses": [{"address": email}]}}
        if add:
            body["add_tags"] = list(add)
        if remove:
            body["remove_tags"] = list(remove)
        await rest.request(
            self._session,
            "POST",
            self._base + "/people",
            bucket=self._bucket,
            write=True,
            clock=self._clock,
            headers=self._headers,
            json=body,
        )

    def _query(
        self, page: int, per_page: int | None, filter: str | None
    ) -> list[tuple[str, str | int]]:
        size = self.per_page if per_page is None else per_page
        if not 1 <= size <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be within 1..{MAX_PER_PAGE}, got {size}")
        query: list[tuple[str, str | int]] = [("page", page), ("per_page", size)]
        if filter is not None:
            query.append(("filter", filter))
        return query

    async def _raw_page(
        self, path: str, *, page: int, per_page: int | None = None, filter: str | None = None
    ) -> HalPage[msgspec.Raw]:
        """One page with its items as served: only a page whose envelope is bad fails."""
        response = await self._read(self._url(path, self._query(page, per_page, filter)))
        try:
            return decode_page(response.body)
        except (msgspec.DecodeError, json_items.Unsplittable) as exc:
            # As rest.decode_body: not the record's fault, so the read is retried.
            where = f"GET {self._base_path}{path}"
            reason = f"{where}: HTTP {response.status} with an unexpected body ({exc})"
            raise Retryable(reason) from None

    async def _get(self, tp: type[T], path: str, query: list[tuple[str, str | int]]) -> T:
        response = await self._read(self._url(path, query))
        return rest.decode_body(tp, response, write=False, where=f"GET {self._base_path}{path}")

    def _url(self, path: str, query: list[tuple[str, str | int]]) -> str:
        # Quoted by hand so the filter goes out as %20/%27, as API_FACTS §5 spells it.
        return self._base + path + (f"?{urlencode(query, quote_via=quote)}" if query else "")

    async def _read(self, url: str) -> rest.Response:
        attempt = 0
        while True:
            try:
                return await rest.request(
                    self._session,
                    "GET",
                    url,
                    bucket=self._bucket,
                    write=False,
                    clock=self._clock,
                    headers=self._headers,
                )
            except Retryable as exc:
                attempt += 1
                if attempt >= self._read_tries:
                    raise
                delay = rest.backoff_delay(
                    attempt - 1,
                    base=_BACKOFF_BASE,
                    cap=_BACKOFF_CAP,
                    retry_after=exc.retry_after,
                    rng=self._rng,
                )
                log.warning(
                    "an_read_retry",
                    path=urlsplit(url).path,
                    status=exc.status,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    error=str(exc),
                )
                await self._clock.sleep(delay)


def _embedded(hal: HalPage[T], where: str) -> list[T]:
    """The page's items: whichever single key ``_embedded`` holds (curies vary by endpoint)."""
    if hal.embedded is None:
        return []
    if len(hal.embedded) != 1:
        raise Fatal(
            f"{where}: expected one collection under _embedded, found {sorted(hal.embedded)}"
        )
    (items,) = hal.embedded.values()
    return items


def _q(segment: str) -> str:
    """An id as one path segment, so a stray slash cannot reach another endpoint."""
    return quote(segment, safe="")


# --------------------------------------------------------------------------- caches


class _TagNames:
    """Tag uuid -> name, read from ``/tags`` once per poll and once more on an unknown uuid."""

    def __init__(self, client: AnClient) -> None:
        self._client = client
        self._names: dict[str, str] | None = None
        self._reloaded = False

    def reset(self) -> None:
        self._names = None
        self._reloaded = False

    async def names(self, tag_ids: Sequence[str]) -> list[str]:
        fresh = self._names is None
        if self._names is None:
            self._names = await self._client.tag_names()
        if not (fresh or self._reloaded) and any(t not in self._names for t in tag_ids):
            # A tag created since the list was read; one reload per poll bounds the cost.
            self._reloaded = True
            self._names = await self._client.tag_names()
        found = set()
        for tag_id in tag_ids:
            name = self._names.get(tag_id)
            if name is None:
                log.warning("an_tag_unknown", tag_id=tag_id)
            else:
                found.add(name)
        return sorted(found)


class _Actions:
    """A small LRU of actions, so each activity's title costs a request once per action."""

    def __init__(self, client: AnClient, size: int = _ACTION_CACHE_SIZE) -> None:
        self._client = client
        self._size = size
        self._cache: OrderedDict[tuple[str, str], Action | None] = OrderedDict()

    async def get(self, collection: str, action_id: str) -> Action | None:
        key = (collection, action_id)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            action: Action | None = await self._client.action(collection, action_id)
        except Rejected as exc:
            # A deleted or hidden action leaves its records behind; they still count.
            log.warning("an_action_unresolved", collection=collection, error=str(exc))
            action = None
        self._cache[key] = action
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return action


class _Seen:
    """The people one poll has read, kept only as far as they can still matter.

    Two things need them: a person served twice in a window (offset paging over an
    unsorted collection that changes while it is read) is read once, and the people
    whose change lies just inside the overlap are ``settled`` for the next poll. A
    backfill window holds millions, so neither keeps everyone. The tail holds only the
    people the settled set can take: changed after ``forget_up_to``'s time, which follows
    the newest change read, so they are those of the last ``overlap`` seconds (and at
    most ``_TAIL_CAP``). The recent ones (an LRU of ``recent``) catch a repeat from a
    shifted page. A repeat older than both is read again, and the pipeline drops its
    events, whose content hashes it already holds (``Pipeline._transform``): a few
    requests more, nothing sent twice. One left out of the settled set is read again on
    the next poll: requests again, never a loss.
    """

    def __init__(self, *, recent: int, tail: bool) -> None:
        self._recent: OrderedDict[str, datetime | None] = OrderedDict()
        self._size = recent
        self._tail: dict[str, datetime] | None = {} if tail else None
        self._floor: datetime | None = None

    def repeat(self, person_id: str, modified: datetime | None) -> bool:
        """Whether this person was read in this poll with this change already; else note it."""
        tail = self._tail
        if person_id in self._recent or (tail is not None and person_id in tail):
            before = self._recent.get(person_id, tail.get(person_id) if tail else None)
            if not _newer(modified, before):
                return True
        self._recent[person_id] = modified
        self._recent.move_to_end(person_id)
        if len(self._recent) > self._size:
            self._recent.popitem(last=False)
        if (
            tail is not None
            and modified is not None
            and (self._floor is None or modified > self._floor)
            and (person_id in tail or len(tail) < _TAIL_CAP)
        ):
            tail[person_id] = modified
        return False

    def forget_up_to(self, floor: datetime) -> None:
        """No one changed at or before ``floor`` can be settled any more: drop them."""
        if self._tail is None or (self._floor is not None and floor <= self._floor):
            return
        self._floor = floor
        self._tail = {p: m for p, m in self._tail.items() if m > floor}

    def settled(self, *, after: datetime, until: datetime) -> dict[str, datetime]:
        """The people read whose change lies in (after, until]."""
        return {p: m for p, m in (self._tail or {}).items() if after < m <= until}


# --------------------------------------------------------------------------- people stream


class AnPeopleStream:
    """Changed people of one group, each with its tags and (optionally) its new activities.

    A poll reads the whole window ``modified_date gt '<cursor - overlap - 1 s>'`` (``/people``
    is unsorted, so no early stop), then stores ``min(max modified_date seen, signpost)``,
    where the signpost is the poll start minus ``index_lag``; the cursor never moves back.
    Each people page becomes one :class:`Page` (every person followed by their activities)
    and a last, empty :class:`Page` carries the new cursor, so the cursor moves only once
    the whole window is durable. With no stored cursor a live stream starts at its first
    signpost minus the overlap: history is a backfill's job.

    A record that cannot be sent rides in its page's ``rejected``, dead-lettered with the
    page, so it neither stalls the stream nor is lost: one that does not decode (kept as
    served, keyed by its uuid when that still reads), one without an id, and a person whose
    taggings or activities can no longer be read (deleted after the people list).

    ``backfill_since`` makes a backfill stream: named ``<source>.people.backfill``, it reads
    from that date whatever cursor it is handed, so the live cursor is never touched.
    """

    def __init__(
        self,
        client: AnClient,
        *,
        source: str,
        clock: Clock,
        mapper: Mapper = unmapped,
        poll_interval: float = 60.0,
        overlap: float = 120.0,
        index_lag: float = DEFAULT_INDEX_LAG,
        activities: bool = True,
        backfill_since: datetime | None = None,
        own_fields: frozenset[str] = frozenset(),
        own_tags: frozenset[str] = frozenset(),
        recent: int = RECENT_PEOPLE,
    ) -> None:
        if overlap < 0 or index_lag < 0:
            raise ValueError("overlap and index_lag must not be negative")
        self.source = source
        self.name = f"{source}.people" + (".backfill" if backfill_since is not None else "")
        self.poll_interval = poll_interval
        self._client = client
        self._clock = clock
        self._mapper = mapper
        self._overlap = timedelta(seconds=overlap)
        self._index_lag = index_lag
        self._activities = activities
        self._since = utc(backfill_since)
        # Custom fields the bridge itself writes (the GHL ids): left out of the content
        # hash, so the bridge's own write-back does not read as a change to send again.
        self._own_fields = own_fields
        # Tags the bridge adds from GHL replies: not the person's to forward, not a change.
        self._own_tags = own_tags
        self._tags = _TagNames(client)
        self._actions = _Actions(client)
        # People read when their last change was already older than the overlap: seen
        # again with the same modified_date they have nothing new (their activities were
        # read then), so the window's tail does not cost 6 requests each every poll.
        self._settled: dict[str, datetime] = {}
        self._recent = recent

    @classmethod
    def from_config(
        cls,
        source: ActionNetworkSource,
        client: AnClient,
        *,
        clock: Clock,
        mapper: Mapper = unmapped,
        backfill_since: datetime | None = None,
        own_fields: frozenset[str] = frozenset(),
        own_tags: frozenset[str] = frozenset(),
    ) -> AnPeopleStream:
        return cls(
            client,
            source=source.name,
            clock=clock,
            mapper=mapper,
            poll_interval=float(source.poll_interval),
            overlap=float(source.overlap),
            activities="activities" in source.streams,
            backfill_since=backfill_since,
            own_fields=own_fields,
            own_tags=own_tags,
        )

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        return self._mapper(event)

    def signpost(self) -> datetime:
        """The latest cursor a poll starting now may store."""
        return signpost_at(self._clock, self._index_lag)

    async def pages(self, cursor: str | None) -> AsyncGenerator[Page, None]:
        signpost = self.signpost()
        if self._since is not None:
            start = self._since
            lower = start - _SECOND
        else:
            start = parse_cursor(cursor, stream=self.name) if cursor is not None else signpost
            lower = start - self._overlap - _SECOND
        window = f"modified_date gt '{format_utc(lower)}'"
        self._tags.reset()
        # A backfill settles no one (its window always starts at its date): no tail kept.
        seen = _Seen(recent=self._recent, tail=self._since is None)
        newest: datetime | None = None
        people = 0
        log.info("an_poll_started", window=window, signpost=format_utc(signpost))
        async for batch in self._client.items(Person, "/people", filter=window):
            events: list[SourceEvent] = []
            rejected: list[Rejection] = []
            for bad in batch.unread:
                key = None if bad.id is None else self._person_key(bad.id)
                rejected.append(unreadable(self.name, bad.raw, bad.reason, key=key))
                if bad.id is not None and not seen.repeat(bad.id, None):
                    # Its activities still count: they reach the contact it already has,
                    # or wait as dead letters ("no GHL contact") to be replayed once fixed.
                    events += await self._orphan_activities(bad.id, window, rejected)
            for person, raw in batch.read:
                person_id = an_id(person.identifiers, person.links)
                if person_id is None:
                    reason = f"{batch.where}: a person with no id{_NO_ID}"
                    rejected.append(unreadable(self.name, raw, reason))
                    continue
                modified = utc(person.modified_date)
                if seen.repeat(person_id, modified):
                    continue  # offset paging shifted it onto a later page: same record
                if modified is not None:
                    newest = modified if newest is None else max(newest, modified)
                    if self._settled.get(person_id) == modified:
                        continue
                people += 1
                try:
                    events += await self._person_events(person, person_id, window, rejected)
                except Rejected as exc:
                    # Listed, then gone (a 404 on its taggings, say): deleted mid-poll.
                    error = " ".join(str(exc).split())  # one line, whatever the body held
                    reason = f"{error} (the person was listed, then could not be read)"
                    key = self._person_key(person_id)
                    rejected.append(unreadable(self.name, raw, reason, key=key))
            seen.forget_up_to(_next_cursor(newest, start, signpost) - self._overlap - _SECOND)
            yield Page(events=events, cursor=None, rejected=rejected)
        new_cursor = _next_cursor(newest, start, signpost)
        log.info("an_window_read", people=people, cursor=format_utc(new_cursor))
        yield Page(events=[], cursor=format_utc(new_cursor))
        # Reached only once the consumer has committed the cursor page.
        if self._since is None:
            next_lower = new_cursor - self._overlap - _SECOND
            self._settled = seen.settled(after=next_lower, until=signpost - self._overlap)

    async def _person_events(
        self, person: Person, person_id: str, window: str, rejected: list[Rejection]
    ) -> list[SourceEvent]:
        """The person, then their activities in the window in the order they happened.

        Records that do not decode go to ``rejected``, but only once the person has been
        read whole: a sub-read that fails (``Rejected``) leaves nothing of the person.
        """
        tags = await self._tags.names(await self._client.person_tag_ids(person_id))
        tags = [t for t in tags if t not in self._own_tags]
        key = self._person_key(person_id)
        data = person_data(person, person_id, tags)
        hashed = msgspec.structs.replace(
            data,
            custom_fields={
                k: v for k, v in data.custom_fields.items() if k not in self._own_fields
            },
        )
        events = [self._event(key, "person", data, hashed=hashed)]
        if self._activities:
            found, bad = await self._activities_of(person_id, window)
            events += self._activity_events(found)
            rejected += bad
        return events

    async def _orphan_activities(
        self, person_id: str, window: str, rejected: list[Rejection]
    ) -> list[SourceEvent]:
        """The activities of a person whose own record did not decode."""
        if not self._activities:
            return []
        try:
            found, bad = await self._activities_of(person_id, window)
        except Rejected as exc:
            log.warning("an_activities_unread", person_id=person_id, error=str(exc))
            return []
        rejected += bad
        return self._activity_events(found)

    def _activity_events(self, found: list[ActivityData]) -> list[SourceEvent]:
        # Source order, so a person's messages reach GHL in the order they happened.
        found.sort(key=lambda a: (a.created_date or _EPOCH, a.id))
        return [self._event(self._activity_key(a.type, a.id), "activity", a) for a in found]

    # ----------------------------------------------------------------- activities

    async def _activities_of(
        self, person_id: str, window: str
    ) -> tuple[list[ActivityData], list[Rejection]]:
        """A person's records in the window, and those of them that cannot be sent."""
        found: list[ActivityData] = []
        rejected: list[Rejection] = []
        for kind, (records, collection, rel) in ACTIVITY_TYPES.items():
            path = f"/people/{_q(person_id)}/{records}"
            async for batch in self._client.items(Record, path, filter=window):
                for bad in batch.unread:
                    key = None if bad.id is None else self._activity_key(kind, bad.id)
                    rejected.append(unreadable(self.name, bad.raw, bad.reason, key=key))
                for record, raw in batch.read:
                    record_id = an_id(record.identifiers, record.links)
                    if record_id is None:
                        reason = f"{batch.where}: a {kind} with no id{_NO_ID}"
                        rejected.append(unreadable(self.name, raw, reason))
                        continue
                    ref = href_id(record.links, rel)
                    action_id = ref[1] if ref is not None and ref[0] == collection else None
                    action = None
                    if action_id is not None:
                        action = await self._actions.get(collection, action_id)
                    data = activity_data(
                        kind,
                        record,
                        record_id=record_id,
                        person_id=person_id,
                        person_key=self._person_key(person_id),
                        action_id=action_id,
                        action=action,
                    )
                    found.append(data)
        return found, rejected

    def _activity_key(self, kind: ActivityType, record_id: str) -> str:
        return f"{self.source}:{kind}:{record_id}"

    def _person_key(self, person_id: str) -> str:
        return person_key(self.source, person_id)

    def _event(
        self, key: str, kind: str, data: msgspec.Struct, *, hashed: msgspec.Struct | None = None
    ) -> SourceEvent:
        return make_event(self.name, key, kind, data, hashed=hashed)


_EPOCH = datetime.min.replace(tzinfo=UTC)
_NO_ID = " (no action_network: identifier, no self link), so it cannot be keyed"


def _next_cursor(newest: datetime | None, start: datetime, signpost: datetime) -> datetime:
    """What a window's last page stores: its newest change, never before the start nor
    past the signpost."""
    return min(max(newest, start) if newest is not None else start, signpost)


def _newer(modified: datetime | None, before: datetime | None) -> bool:
    return modified is not None and (before is None or modified > before)
