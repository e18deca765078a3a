"""The Action Network client and people stream, against the simulator on real loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.testing import capture_logs

from bridge.clock import SystemClock
from bridge.config import ActionNetworkSource, Duration
from bridge.connectors.actionnetwork import (
    MAX_PER_PAGE,
    RECENT_PEOPLE,
    AnClient,
    AnPeopleStream,
)
from bridge.connectors.an_models import (
    ACTIVITY_TYPES,
    Action,
    ActivityData,
    HalPage,
    Person,
    PersonData,
    Record,
    Tag,
    an_id,
    decode_page,
)
from bridge.errors import AuthError, Fatal, Retryable
from bridge.models import UNREADABLE_KIND, NewOp, Page, Rejection, SourceEvent
from bridge.pipeline import Pipeline
from bridge.ratelimit import TokenBucket
from bridge.secrets import Secret
from bridge.sim.actionnetwork import API, build_app, person_json, record_json
from bridge.sim.actionnetwork_state import KINDS, AnSim
from bridge.sim.an_data import ANCHOR, DAY, GeneratedGroup, seed_group
from bridge.sim.common import FaultRule, JournalEntry, RawJson, serve
from bridge.store import Store
from bridge.streams import Mapper, format_utc, unmapped
from tests.fakes import FakeTarget, settings

KEY = "an-test-key-7c1e52f3a4c2e9d556a1f2e9"
SOURCE = "an-main"
PEOPLE = 60
PEOPLE_PATH = f"{API}/people"
OVERLAP = timedelta(seconds=121)  # the stream's default overlap plus the strict-gt second


class JumpClock:
    """Virtual time shared by the client and the simulator: ``sleep`` jumps ahead at once.

    The connector makes one request at a time, so jumping is exact for it, and the
    simulator's rate meter sees the same virtual instants as the client's bucket.
    """

    def __init__(self) -> None:
        self.now = 1_000.0
        self._wall_offset = ANCHOR + DAY + 0.25 - self.now
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


Tamper = Callable[[web.Request, dict[str, Any]], None]


@dataclass
class AnServer:
    sim: AnSim
    clock: JumpClock
    pop: GeneratedGroup
    base_url: str
    session: aiohttp.ClientSession
    tampers: list[Tamper] = field(default_factory=list)
    # One bucket per key, as the daemon has: every client of the key shares it.
    bucket: TokenBucket | None = None

    def client(
        self,
        *,
        key: str = KEY,
        per_page: int = MAX_PER_PAGE,
        read_tries: int = 5,
    ) -> AnClient:
        if self.bucket is None:
            self.bucket = TokenBucket(
                "actionnetwork", SOURCE, capacity=4, window=1.0, clock=self.clock
            )
        return AnClient(
            self.session,
            base_url=self.base_url,
            api_key=key,
            bucket=self.bucket,
            clock=self.clock,
            per_page=per_page,
            read_tries=read_tries,
        )

    def stream(self, client: AnClient | None = None, **kwargs: Any) -> AnPeopleStream:
        kwargs.setdefault("index_lag", 0.0)
        return AnPeopleStream(client or self.client(), source=SOURCE, clock=self.clock, **kwargs)

    def since(self, seq: int) -> list[JournalEntry]:
        return self.sim.journal.select(since=seq)

    def touch(self, i: int, **changes: Any) -> str:
        """Change generated person ``i`` now (a custom field by default); returns their uuid."""
        person_id = self.pop.person_id(i)
        self.sim.touch_person(person_id, changes or None, key=KEY)
        return person_id

    def modified(self, person_id: str) -> str:
        return format_utc(datetime.fromtimestamp(self.sim.person(person_id).modified, UTC))

    def action(self, kind: str, n: int = 0) -> tuple[str, str]:
        """(uuid, title) of the group's ``n``-th action of a kind (``petitions``...)."""
        found, _ = self.sim.list_actions(KEY, kind)
        return found[n].id, found[n].title


def _tampering(tampers: list[Tamper]) -> Any:
    """Middleware that lets a test rewrite successful /people pages, to play a buggy server."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if not tampers or request.path != PEOPLE_PATH or not isinstance(response, web.Response):
            return response
        if response.status != 200 or response.text is None:
            return response
        body = json.loads(response.text)
        for tamper in tampers:
            tamper(request, body)
        return web.json_response(body, content_type="application/hal+json")

    return middleware


@pytest.fixture
def clock() -> JumpClock:
    return JumpClock()


@pytest.fixture
async def an(clock: JumpClock, http_session: aiohttp.ClientSession) -> AsyncIterator[AnServer]:
    sim = AnSim(seed=1, clock=clock.monotonic, wall=clock.time)
    pop = seed_group(sim, KEY, people=PEOPLE, activities_per_person=3, seed=7)
    tampers: list[Tamper] = []
    app = build_app(sim)
    app.middlewares.append(_tampering(tampers))
    async with serve(app) as base:
        yield AnServer(sim, clock, pop, base + API, http_session, tampers)


async def drain(stream: AnPeopleStream, cursor: str | None = None) -> list[Page]:
    return [page async for page in stream.pages(cursor)]


def events_of(pages: Sequence[Page], kind: str | None = None) -> list[SourceEvent]:
    return [e for p in pages for e in p.events if kind is None or e.kind == kind]


def people_of(pages: Sequence[Page]) -> dict[str, PersonData]:
    found = [msgspec.json.decode(e.data, type=PersonData) for e in events_of(pages, "person")]
    return {p.id: p for p in found}


def activities_of(pages: Sequence[Page]) -> list[ActivityData]:
    return [msgspec.json.decode(e.data, type=ActivityData) for e in events_of(pages, "activity")]


def rejected_of(pages: Sequence[Page]) -> list[Rejection]:
    return [r for p in pages for r in p.rejected]


def an_hour_ago(an: AnServer) -> str:
    return format_utc(datetime.fromtimestamp(an.clock.time() - 3_600, UTC))


def served_person(an: AnServer, person_id: str, **changes: Any) -> dict[str, Any]:
    """A person's JSON as the simulator shows it, with ``changes``, to serve in its place."""
    doc = person_json(an.base_url, an.sim.person(person_id, KEY))
    doc.update(changes)
    return doc


def served_signature(an: AnServer, record_id: str, person_id: str) -> dict[str, Any]:
    record = an.sim.get_record(KEY, "signatures", record_id, person_id=person_id)
    return record_json(an.base_url, record)


# --------------------------------------------------------------------------- auth


async def test_probe_reads_one_person_with_the_key_header(an: AnServer) -> None:
    """The probe is GET /people?per_page=1 and passes with a good key."""
    seq = an.sim.journal.last_seq
    await an.client().probe()
    (entry,) = an.since(seq)
    assert (entry.method, entry.path, entry.status) == ("GET", PEOPLE_PATH, 200)
    assert entry.query == {"page": "1", "per_page": "1"}


async def test_bad_key_is_an_auth_error_that_never_shows_the_key(an: AnServer) -> None:
    """A bad key is an AuthError (the entry point says 200); no error text or log shows the key."""
    bad = "an-bad-key-0f9e8d7c6b5a4f3e2d1c"
    headers = {"OSDI-API-Token": bad}
    async with an.session.get(an.base_url, headers=headers) as resp:
        assert resp.status == 200  # why the entry point cannot be the probe
    async with an.session.get(an.base_url + "/people", headers=headers) as resp:
        assert bad in await resp.text()  # the server does echo it
    client = an.client(key=bad)
    with capture_logs() as logs:
        with pytest.raises(AuthError) as probed:
            await client.probe()
        with pytest.raises(AuthError) as polled:
            await drain(an.stream(client))
    for exc in (probed.value, polled.value):
        assert bad not in str(exc)
        assert bad not in repr(exc.args)
        assert "/api/v2/people" in str(exc)
    assert bad not in repr(logs)
    assert an.sim.journal.status_counts() == {200: 1, 403: 3}  # AuthError is never retried


async def test_401_is_an_auth_error_too(an: AnServer) -> None:
    """A 401 (the OSDI spelling of a bad key) is an AuthError, not retried."""
    an.sim.faults.fail_next(PEOPLE_PATH, 1, status=401)
    with pytest.raises(AuthError) as info:
        await an.client().probe()
    assert KEY not in str(info.value)
    assert an.sim.journal.count() == 1


# --------------------------------------------------------------------------- HAL paging


async def test_paging_stops_on_the_empty_page_or_at_total_pages(an: AnServer) -> None:
    """/people (no totals) is read until an empty page; /tags stops at its total_pages."""
    client = an.client()
    seq = an.sim.journal.last_seq
    sizes = [len(batch) async for batch in client.pages(Person, "/people")]
    assert sizes == [25, 25, 10]
    assert [e.query["page"] for e in an.since(seq)] == ["1", "2", "3", "4"]
    seq = an.sim.journal.last_seq
    tags = [t async for batch in client.pages(Tag, "/tags") for t in batch]
    assert len(tags) == 6
    assert len(an.since(seq)) == 1


async def test_a_page_other_than_the_one_asked_for_fails_loudly(an: AnServer) -> None:
    """A server that answers page 2 with page 1's number raises Fatal naming the path."""

    def stuck(request: web.Request, body: dict[str, Any]) -> None:
        if request.query.get("page") == "2":
            body["page"] = 1

    an.tampers.append(stuck)
    with pytest.raises(Fatal) as info:
        async for _ in an.client().pages(Person, "/people"):
            pass
    message = str(info.value)
    assert "GET /api/v2/people" in message
    assert "asked for page 2" in message
    assert KEY not in message


async def test_a_repeated_page_fails_loudly(an: AnServer) -> None:
    """A page whose items repeat the previous page's (the old "same page again" bug) is Fatal."""
    first: list[Any] = []

    def repeat(request: web.Request, body: dict[str, Any]) -> None:
        if request.query.get("page") == "1":
            first[:] = body["_embedded"]["osdi:people"]
        elif request.query.get("page") == "2":
            body["_embedded"]["osdi:people"] = first

    an.tampers.append(repeat)
    with pytest.raises(Fatal, match=r"GET /api/v2/people: page 2 repeats page 1"):
        async for _ in an.client().pages(Person, "/people"):
            pass


async def test_embedded_must_hold_exactly_one_collection(an: AnServer) -> None:
    """Two keys under _embedded cannot be read safely, so paging stops with Fatal."""

    def two(request: web.Request, body: dict[str, Any]) -> None:
        body["_embedded"]["osdi:tags"] = []

    an.tampers.append(two)
    with pytest.raises(Fatal, match="expected one collection under _embedded"):
        await an.client().probe()


async def test_per_page_is_never_above_25(an: AnServer) -> None:
    """The client refuses page sizes above 25 and never sends one during a poll."""
    with pytest.raises(ValueError, match="per_page"):
        an.client(per_page=26)
    with pytest.raises(ValueError, match="per_page"):
        await an.client().page(Person, "/people", page=1, per_page=30)
    for i in range(3):
        an.touch(i)
    an.clock.advance(5)
    seq = an.sim.journal.last_seq
    await drain(an.stream(), an_hour_ago(an))
    sent = an.since(seq)
    assert len(sent) > 10
    assert all(1 <= int(e.query["per_page"]) <= 25 for e in sent if "page" in e.query)


# --------------------------------------------------------------------------- the people window


async def test_window_is_strict_gt_from_cursor_minus_overlap_minus_a_second(an: AnServer) -> None:
    """The filter is gt (cursor - overlap - 1 s), quoted, at one-second resolution."""
    seq = an.sim.journal.last_seq
    await drain(an.stream(overlap=120), "2026-01-01T12:00:00Z")
    first = an.since(seq)[0]
    assert first.path == PEOPLE_PATH
    assert first.query["filter"] == "modified_date gt '2026-01-01T11:57:59Z'"


async def test_a_person_modified_in_the_cursors_second_is_not_lost(an: AnServer) -> None:
    """Even with no overlap, someone stamped in the same second as the cursor is read."""
    person_id = an.touch(4)
    pages = await drain(an.stream(overlap=0), an.modified(person_id))
    assert person_id in people_of(pages)


async def test_unsorted_window_is_read_whole_before_the_cursor_moves(an: AnServer) -> None:
    """Every page but the last has no cursor; the last carries the newest modified_date."""
    touched = []
    for i in range(12):
        touched.append(an.touch(i * 5))
        an.clock.advance(1.5)
    an.clock.advance(10)
    stream = an.stream(client=an.client(per_page=5), activities=False)
    pages = await drain(stream, an_hour_ago(an))
    assert [p.cursor for p in pages[:-1]] == [None] * (len(pages) - 1)
    assert pages[-1].events == []
    people = [msgspec.json.decode(e.data, type=PersonData).id for e in events_of(pages)]
    assert sorted(people) == sorted(touched)
    order = [touched.index(p) for p in people]
    assert order != sorted(order)  # the API does not sort, so no early stop is possible
    assert pages[-1].cursor == an.modified(touched[-1])


async def test_a_window_cut_short_yields_no_cursor(an: AnServer) -> None:
    """If the window fails half-way, the pages already read carry no cursor."""
    for i in range(8):
        an.touch(i)
    an.clock.advance(10)
    stream = an.stream(client=an.client(per_page=5, read_tries=2), activities=False)
    pages = stream.pages(an_hour_ago(an))
    first = await anext(pages)
    assert first.cursor is None
    assert first.events
    an.sim.faults.add(FaultRule(route=PEOPLE_PATH, status=503))
    with pytest.raises(Retryable):
        await anext(pages)


async def test_cursor_never_passes_the_signpost(an: AnServer) -> None:
    """A person changed right at the poll start is read, but the cursor stops at the signpost."""
    person_id = an.touch(9)
    stream = an.stream(index_lag=5.0)
    signpost = stream.signpost()
    pages = await drain(stream, an_hour_ago(an))
    assert person_id in people_of(pages)
    assert pages[-1].cursor == format_utc(signpost)
    assert format_utc(signpost) < an.modified(person_id)


async def test_index_lag_is_caught_by_the_overlap(an: AnServer) -> None:
    """A change the filter index has not caught up with is read on the next poll."""
    an.sim.index_lag = 30.0
    late = an.touch(2)  # written now, invisible to filters for 30 s
    an.sim.index_lag = 0.0
    an.clock.advance(2)
    seen = an.touch(3)
    an.clock.advance(1)
    with_overlap, without = an.stream(overlap=120), an.stream(overlap=0)
    first = await drain(with_overlap, an_hour_ago(an))
    assert set(people_of(first)) == {seen}
    cursor = first[-1].cursor
    assert cursor == an.modified(seen)
    assert cursor is not None
    assert cursor > an.modified(late)
    an.clock.advance(60)
    assert late in people_of(await drain(with_overlap, cursor))
    assert late not in people_of(await drain(without, cursor))  # why the overlap exists


async def test_settled_people_are_not_reread_every_poll(an: AnServer) -> None:
    """Once its change is older than the overlap, the window's last person costs no more calls."""
    person_id = an.touch(6)
    an.clock.advance(5)
    stream = an.stream(overlap=120)
    first = await drain(stream, an_hour_ago(an))
    cursor = first[-1].cursor
    assert cursor == an.modified(person_id)
    an.clock.advance(200)
    again = await drain(stream, cursor)
    assert person_id in people_of(again)  # still inside the overlap when last read
    an.clock.advance(60)
    seq = an.sim.journal.last_seq
    quiet = await drain(stream, again[-1].cursor)
    assert events_of(quiet) == []
    assert quiet[-1].cursor == cursor
    assert [e.path for e in an.since(seq)] == [PEOPLE_PATH, PEOPLE_PATH]


# --------------------------------------------------------------------------- tags and activities


async def test_tags_are_in_the_person_data_and_change_its_hash(an: AnServer) -> None:
    """Tag names ride sorted in the person's data: a new tag changes the hash, a bare bump not."""
    i = 1
    person_id = an.pop.person_id(i)
    name = an.sim.person(person_id, KEY).given_name
    an.touch(i, given_name=name)
    an.clock.advance(5)
    stream = an.stream(activities=False)
    (before,) = events_of(await drain(stream, an_hour_ago(an)))
    tags = msgspec.json.decode(before.data, type=PersonData).tags
    assert tags == ["member"]
    an.touch(i, given_name=name)  # modified_date bumps, nothing else changes
    an.clock.advance(5)
    (same,) = events_of(await drain(stream, an_hour_ago(an)))
    assert same.content_hash == before.content_hash
    donor = an.sim.add_tag(KEY, "donor")
    volunteer = an.sim.add_tag(KEY, "a volunteer")
    an.sim.add_tagging(KEY, donor, person_id)
    an.sim.add_tagging(KEY, volunteer, person_id)
    an.touch(i, given_name=name)
    an.clock.advance(5)
    (after,) = events_of(await drain(stream, an_hour_ago(an)))
    assert after.key == f"{SOURCE}:person:{person_id}"
    assert after.content_hash != before.content_hash
    assert msgspec.json.decode(after.data, type=PersonData).tags == [
        "a volunteer",
        "donor",
        "member",
    ]


async def test_a_tag_created_mid_poll_is_named_after_one_reload(an: AnServer) -> None:
    """A tag newer than the poll's /tags read makes the stream read /tags once more."""
    an.touch(13)
    an.touch(20)
    an.clock.advance(5)
    tagged: list[str] = []

    def tag_the_second(request: web.Request, body: dict[str, Any]) -> None:
        # Page 2 is asked for after page 1's person made the stream read /tags.
        if request.query.get("page") == "2":
            (person,) = body["_embedded"]["osdi:people"]
            tagged.append(person["identifiers"][0].removeprefix("action_network:"))
            an.sim.add_tagging(KEY, an.sim.add_tag(KEY, "late arrival"), tagged[0])

    an.tampers.append(tag_the_second)
    seq = an.sim.journal.last_seq
    stream = an.stream(client=an.client(per_page=1), activities=False)
    people = people_of(await drain(stream, an_hour_ago(an)))
    assert len(people) == 2
    assert [p for p, data in people.items() if "late arrival" in data.tags] == tagged
    walks = [e for e in an.since(seq) if e.route == f"{API}/tags" and e.query["page"] == "1"]
    assert len(walks) == 2


async def test_activities_of_changed_people_carry_their_action_titles(an: AnServer) -> None:
    """Each new activity of a changed person is an event with its type, fields and action title."""
    person_id = an.pop.person_id(10)
    fields: dict[str, dict[str, Any]] = {
        "petitions": {"comments": "Our street needs this."},
        "forms": {},
        "events": {"status": "tentative"},
        "fundraising_pages": {"amount": "25.50", "currency": "USD"},
        "advocacy_campaigns": {"subject": "Fund it", "message": "Please vote yes."},
    }
    titles = {}
    for kind, extra in fields.items():
        action_id, title = an.action(kind)
        titles[kind] = title
        an.sim.add_activity(KEY, action_id, person_id, **extra)
        an.clock.advance(1)
    an.clock.advance(5)
    pages = await drain(an.stream(), an_hour_ago(an))
    keys = [e.key for e in events_of(pages)]
    assert keys[0] == f"{SOURCE}:person:{person_id}"  # the contact before its activities
    found = {a.type: a for a in activities_of(pages)}  # older seeded ones are outside the window
    assert list(found) == ["signature", "submission", "attendance", "donation", "outreach"]
    for kind, activity in zip(fields, found.values(), strict=True):
        assert activity.action_title == titles[kind]
        assert activity.action_type == kind
        assert activity.person_key == keys[0]
        assert f"{SOURCE}:{activity.type}:{activity.id}" in keys
    assert found["signature"].comments == "Our street needs this."
    assert found["attendance"].status == "tentative"
    assert (found["donation"].amount, found["donation"].currency) == ("25.50", "USD")
    assert (found["outreach"].subject, found["outreach"].message) == ("Fund it", "Please vote yes.")
    assert all(a.created_date is not None for a in found.values())


async def _per_action_poll(an: AnServer, cursor: str) -> None:
    """The alternative to per-person reads, for the measurement: walk every action instead."""
    client = an.client()
    window = f"modified_date gt '{format_utc(datetime.fromisoformat(cursor) - OVERLAP)}'"
    changed = [p async for batch in client.pages(Person, "/people", filter=window) for p in batch]
    await client.tag_names()
    for person in changed:
        await client.person_tag_ids(person.identifiers[0].removeprefix("action_network:"))
    for records, collection, _ in ACTIVITY_TYPES.values():
        async for actions in client.pages(Action, f"/{collection}"):
            for action in actions:
                action_id = action.identifiers[0].removeprefix("action_network:")
                path = f"/{collection}/{action_id}/{records}"
                async for _ in client.pages(Record, path, filter=window):
                    pass


@pytest.mark.parametrize(
    ("changed", "per_person", "per_action"),
    [(1, 10, 19), (5, 38, 23), (20, 133, 38), (50, 314, 69)],
)
async def test_activity_strategy_costs_match_the_module_docstring(
    an: AnServer, changed: int, per_person: int, per_action: int
) -> None:
    """Requests per poll for N changed people, per person (used) and per action (measured only)."""
    cursor = format_utc(datetime.fromtimestamp(an.clock.time(), UTC))
    an.clock.advance(5)
    actions = [a.id for kind in KINDS for a in an.sim.list_actions(KEY, kind)[0]]
    assert len(actions) == 10
    for i in range(changed):
        an.sim.add_activity(KEY, actions[i % len(actions)], an.pop.person_id(i))
    an.clock.advance(5)
    seq = an.sim.journal.last_seq
    pages = await drain(an.stream(), cursor)
    assert len(an.since(seq)) == per_person
    assert len(activities_of(pages)) == changed
    seq = an.sim.journal.last_seq
    await _per_action_poll(an, cursor)
    assert len(an.since(seq)) == per_action


# ------------------------------------------------------------------- records that do not decode


@pytest.mark.parametrize(
    ("value", "named"),
    [(7, "got `int`"), ("\ud800", "surrogate escape (\\ud800)"), (RawJson(b'"caf\xe9"'), "UTF-8")],
    ids=["wrong type", "lone surrogate", "invalid utf-8"],
)
async def test_an_item_that_does_not_decode_costs_only_itself(
    an: AnServer, value: Any, named: str
) -> None:
    """One bad person comes back as served with its uuid and why; its page's others decode."""
    bad = an.pop.person_id(3)
    an.sim.raw.set("people", bad, served_person(an, bad, given_name=value))
    batches = [batch async for batch in an.client().items(Person, "/people")]
    assert [len(b.read) + len(b.unread) for b in batches] == [25, 25, 10]
    (unread,) = [u for b in batches for u in b.unread]
    assert unread.id == bad
    assert named in unread.reason
    assert "given_name" in unread.reason
    assert unread.reason.startswith("GET /api/v2/people page ")
    assert unread.raw.startswith(b"{")
    assert bad.encode() in unread.raw
    read = {an_id(p.identifiers) for b in batches for p, _ in b.read}
    assert read == {an.pop.person_id(i) for i in range(PEOPLE)} - {bad}


def test_a_page_msgspec_refuses_is_split_by_the_standard_library() -> None:
    """A lone surrogate fails msgspec for the whole body: the standard library reads it and
    each item is written out again, each fault (and each good item) where it was."""
    body = (
        b'{"page": 2, "_links": {"next": {"href": "/people?page=3"}},'
        b' "_embedded": {"osdi:people": [{"given_name": "\\ud800", "a": [1, {"b": "]}"}]},'
        b' 7 , {"given_name": "caf\xe9"}, {"x": "\\"", "y": "\\\\"}]}, "total_pages": 4}'
    )
    # What msgspec does: a Raw value's escapes are checked (so the envelope fails), its
    # UTF-8 is not (so bad bytes alone never need the split).
    with pytest.raises(msgspec.DecodeError, match="hex escape"):
        msgspec.json.decode(body, type=HalPage[msgspec.Raw])
    (raw,) = msgspec.json.decode(b'[{"a": "caf\xe9"}]', type=list[msgspec.Raw])
    assert bytes(raw) == b'{"a": "caf\xe9"}'
    page = decode_page(body)
    assert (page.page, page.total_pages) == (2, 4)
    assert page.embedded is not None
    assert [bytes(item) for item in page.embedded["osdi:people"]] == [
        b'{"given_name": "\\ud800", "a": [1, {"b": "]}"}]}',
        b"7",
        b'{"given_name": "caf\xe9"}',
        b'{"x": "\\"", "y": "\\\\"}',
    ]
    with pytest.raises(msgspec.DecodeError):
        decode_page(b'{"page": "\\ud800", "_embedded": {"osdi:people": []}}')


async def test_a_page_whose_envelope_is_bad_is_still_retried(an: AnServer) -> None:
    """Only the items are split off: a page that is bad outside them stays Retryable."""

    def broken(request: web.Request, body: dict[str, Any]) -> None:
        body["page"] = "\ud800"

    an.tampers.append(broken)
    with pytest.raises(Retryable, match="unexpected body"):
        await anext(aiter(an.client(read_tries=1).items(Person, "/people")))


async def test_readers_without_dead_letters_still_retry_a_bad_item(an: AnServer) -> None:
    """pages() (tags, taggings) keeps the old rule: an item that does not decode is Retryable."""
    bad = an.pop.person_id(0)
    an.sim.raw.set("people", bad, served_person(an, bad, custom_fields=["a"]))
    with pytest.raises(Retryable, match=r"\$\.custom_fields"):
        async for _ in an.client().pages(Person, "/people"):
            pass


async def test_a_person_that_does_not_decode_is_a_dead_letter_and_the_rest_flow(
    an: AnServer,
) -> None:
    """The bad person is a rejection under its own key; the others are events; the cursor moves."""
    people = [an.touch(i) for i in range(3)]
    an.clock.advance(5)
    bad = people[1]
    an.sim.raw.set("people", bad, served_person(an, bad, created_date="2026-02-30T00:00:00Z"))
    pages = await drain(an.stream(activities=False), an_hour_ago(an))
    (rejection,) = rejected_of(pages)
    assert rejection.event.key == f"{SOURCE}:person:{bad}"
    assert rejection.event.kind == UNREADABLE_KIND
    assert "$.created_date" in rejection.reason
    assert set(people_of(pages)) == {people[0], people[2]}
    assert pages[-1].cursor == an.modified(people[0])


async def test_records_without_an_id_are_dead_letters_not_log_lines(an: AnServer) -> None:
    """A person or a signature with neither identifier nor self link is a keyless dead letter."""
    anonymous, signer = an.touch(0), an.touch(1)
    action_id, _ = an.action("petitions")
    record_id = an.sim.add_activity(KEY, action_id, signer, comments="a signature with no id")
    an.clock.advance(5)
    doc = served_person(an, anonymous)
    record = served_signature(an, record_id, signer)
    for served in (doc, record):
        del served["identifiers"], served["_links"]
    an.sim.raw.set("people", anonymous, doc)
    an.sim.raw.set("signatures", record_id, record)
    with capture_logs() as logs:
        pages = await drain(an.stream(), an_hour_ago(an))
    rejected = {r.reason.split(": ", 1)[1]: r for r in rejected_of(pages)}
    assert sorted(rejected) == [
        "a person with no id (no action_network: identifier, no self link), so it cannot be keyed",
        "a signature with no id (no action_network: identifier, no self link), so it cannot be"
        " keyed",
    ]
    assert all(r.event.key.startswith(f"{SOURCE}.people:unidentified:") for r in rejected_of(pages))
    assert any(b"a signature with no id" in r.event.data for r in rejected_of(pages))
    assert list(people_of(pages)) == [signer]
    assert not [e for e in logs if e["event"].endswith("_without_id")]


async def test_an_activity_that_does_not_decode_is_a_dead_letter_under_its_key(
    an: AnServer,
) -> None:
    """A bad signature is a rejection keyed as the signature; the person and its others flow."""
    person = an.pop.person_id(5)
    action_id, _ = an.action("petitions")
    good = an.sim.add_activity(KEY, action_id, person, comments="fine")
    bad = an.sim.add_activity(KEY, action_id, person, comments="to be broken")
    an.clock.advance(5)
    record = served_signature(an, bad, person)
    record["comments"] = {"x": 1}
    an.sim.raw.set("signatures", bad, record)
    pages = await drain(an.stream(), an_hour_ago(an))
    (rejection,) = rejected_of(pages)
    assert rejection.event.key == f"{SOURCE}:signature:{bad}"
    assert f"GET /api/v2/people/{person}/signatures page 1, item" in rejection.reason
    assert "$.comments" in rejection.reason
    assert [a.id for a in activities_of(pages)] == [good]
    assert list(people_of(pages)) == [person]


async def test_an_unreadable_person_still_brings_its_activities(an: AnServer) -> None:
    """A person that does not decode but whose id reads still has its signatures read."""
    person = an.pop.person_id(6)
    action_id, _ = an.action("petitions")
    signed = an.sim.add_activity(KEY, action_id, person, comments="still counts")
    an.clock.advance(5)
    an.sim.raw.set("people", person, served_person(an, person, family_name=["x"]))
    pages = await drain(an.stream(), an_hour_ago(an))
    assert [r.event.key for r in rejected_of(pages)] == [f"{SOURCE}:person:{person}"]
    assert [a.id for a in activities_of(pages)] == [signed]


async def test_a_person_gone_before_their_taggings_are_read_is_a_dead_letter(
    an: AnServer,
) -> None:
    """A 404 on a listed person's taggings (deleted mid-poll) dead-letters that person alone."""
    kept, gone = an.touch(0), an.touch(1)
    an.clock.advance(5)
    an.sim.faults.fail_next(f"{API}/people/{gone}/taggings", 1, status=404)
    pages = await drain(an.stream(), an_hour_ago(an))
    (rejection,) = rejected_of(pages)
    assert rejection.event.key == f"{SOURCE}:person:{gone}"
    assert rejection.reason.startswith(f"GET /api/v2/people/{gone}/taggings: HTTP 404")
    assert "the person was listed, then could not be read" in rejection.reason
    assert gone.encode() in rejection.event.data
    assert list(people_of(pages)) == [kept]
    assert pages[-1].cursor == an.modified(kept)
    an.sim.faults.fail_next(f"{API}/people/{gone}/taggings", 10, status=503)
    with pytest.raises(Retryable, match="HTTP 503"):
        await drain(an.stream(client=an.client(read_tries=2)), an_hour_ago(an))


# --------------------------------------------------------------------------- memory of a window


def _script_people(an: AnServer, pages: dict[int, list[str]]) -> None:
    """Serve these people (as they are now) on these pages of /people, whatever is listed."""

    def script(request: web.Request, body: dict[str, Any]) -> None:
        number = int(request.query.get("page", "1"))
        shown = [person_json(an.base_url, an.sim.person(p, KEY)) for p in pages.get(number, [])]
        body["_embedded"] = {"osdi:people": shown}

    an.tampers.append(script)


def _taggings_reads(an: AnServer, seq: int, person_id: str) -> int:
    return sum(1 for e in an.since(seq) if e.path == f"{API}/people/{person_id}/taggings")


@pytest.mark.parametrize(("recent", "reads"), [(RECENT_PEOPLE, 1), (1, 2)])
async def test_a_repeat_is_sent_once_even_when_the_poll_has_forgotten_it(
    an: AnServer, tmp_path: Path, recent: int, reads: int
) -> None:
    """A person served again later in a backfill is read again once out of the recent people,
    and the pipeline, which knows its content hash, still sends it once."""
    first, second, third = (an.pop.person_id(i) for i in range(3))
    _script_people(an, {1: [first], 2: [second], 3: [third, first]})

    def one_op(event: SourceEvent) -> list[NewOp]:
        return [NewOp(target="t", entity=event.key, kind="k", source_key=event.key, payload=b"")]

    stream = an.stream(
        client=an.client(per_page=1),
        activities=False,
        backfill_since=datetime(2000, 1, 1, tzinfo=UTC),
        mapper=one_op,
        recent=recent,
    )
    target = FakeTarget()
    seq = an.sim.journal.last_seq
    async with Store.open(tmp_path / "state.db") as store:
        summary = await Pipeline(store, [stream], {"t": target}, settings(), an.clock).run(
            once=True
        )
    assert _taggings_reads(an, seq, first) == reads
    assert sorted(key for key, _ in target.applied) == sorted(
        f"{SOURCE}:person:{p}" for p in (first, second, third)
    )
    assert set(target.applied.values()) == {1}
    assert summary.events_unchanged == reads - 1


async def test_a_poll_keeps_only_the_people_near_its_newest_change(an: AnServer) -> None:
    """Past the overlap behind the newest change a person is forgotten (read again if
    repeated); one inside it is remembered, so it is read once and settles for the next poll."""
    old = an.touch(0)
    an.clock.advance(300)  # well past the 120 s overlap
    new = an.touch(1)
    an.clock.advance(200)  # older than the overlap by the poll: it can settle
    _script_people(an, {1: [old], 2: [new], 3: [old, new]})
    seq = an.sim.journal.last_seq
    stream = an.stream(client=an.client(per_page=1), activities=False, recent=1)
    pages = await drain(stream, an_hour_ago(an))
    assert (_taggings_reads(an, seq, old), _taggings_reads(an, seq, new)) == (2, 1)
    assert [e.key for e in events_of(pages)] == [f"{SOURCE}:person:{p}" for p in (old, new, old)]
    cursor = pages[-1].cursor
    assert cursor == an.modified(new)
    an.tampers.clear()
    an.clock.advance(60)
    seq = an.sim.journal.last_seq
    again = await drain(stream, cursor)
    assert events_of(again) == []
    assert [e.path for e in an.since(seq)] == [PEOPLE_PATH, PEOPLE_PATH]  # new, settled


# --------------------------------------------------------------------------- backfill and wiring


async def test_backfill_leaves_the_live_cursor_alone(an: AnServer, tmp_path: Path) -> None:
    """A backfill reads from its date into its own cursor, whatever is stored for either."""
    since = datetime(2025, 6, 1, tzinfo=UTC)
    expected = sum(1 for i in range(PEOPLE) if an.pop.modified_at(i) >= since.timestamp())
    newest = max(an.pop.modified_at(i) for i in range(PEOPLE))
    async with Store.open(tmp_path / "state.db") as store:
        live = "2026-01-01T00:00:00Z"
        await store.set_cursor(f"{SOURCE}.people", live)
        await store.set_cursor(f"{SOURCE}.people.backfill", "2030-01-01T00:00:00Z")
        backfill = an.stream(backfill_since=since, activities=False)
        assert backfill.name == f"{SOURCE}.people.backfill"
        pipeline = Pipeline(store, [backfill], {}, settings(), an.clock)
        summary = await pipeline.run(once=True)
        assert summary.events_read == expected > 0
        assert await store.get_cursor(f"{SOURCE}.people") == live
        stored = await store.get_cursor(f"{SOURCE}.people.backfill")
        assert stored == format_utc(datetime.fromtimestamp(newest, UTC))


async def test_transform_hands_events_to_the_mapper(an: AnServer) -> None:
    """transform() is the injected mapper's answer; the default mapper makes no ops yet."""
    event = SourceEvent(stream="s", key="k", kind="person", data=b"{}", content_hash="h")
    op = NewOp(target="ghl:main", entity="k", kind="upsert_contact", source_key="k", payload=b"")
    seen: list[SourceEvent] = []

    def mapper(e: SourceEvent) -> list[NewOp]:
        seen.append(e)
        return [op]

    mapped: Mapper = mapper
    assert an.stream(mapper=mapped).transform(event) == [op]
    assert seen == [event]
    assert an.stream().transform(event) == []
    assert unmapped(event) == []


async def test_from_config_wires_name_interval_overlap_and_activities(an: AnServer) -> None:
    """Streams and clients built from an [[sources.action_network]] entry follow its settings."""
    source = ActionNetworkSource(
        name=SOURCE,
        location="main",
        api_key=Secret(KEY),
        base_url=an.base_url,
        streams=["people"],
        poll_interval=Duration(30.0),
        overlap=Duration(0.0),
    )
    client = AnClient.from_config(an.session, source, bucket=None, clock=an.clock)
    await client.probe()
    stream = AnPeopleStream.from_config(source, client, clock=an.clock)
    assert (stream.name, stream.poll_interval) == (f"{SOURCE}.people", 30.0)
    person_id = an.touch(12)
    pages = await drain(stream, an.modified(person_id))
    assert [e.kind for e in events_of(pages)] == ["person"]  # activities are switched off


# --------------------------------------------------------------------------- budget and retries


async def test_four_per_second_is_kept_and_429s_are_retried(an: AnServer) -> None:
    """The sim never sees over 4 requests a second; a stricter server's 429s are waited out."""
    for i in range(8):
        an.touch(i * 3)
    an.clock.advance(5)
    seq = an.sim.journal.last_seq
    first = await drain(an.stream(), an_hour_ago(an))
    assert len(an.since(seq)) > 40
    assert an.sim.max_rate_seen(KEY) <= 4
    assert an.sim.rate_limited(KEY) == 0
    an.sim.set_rate_limit(2, 1.0)  # the server turns stricter than the documented 4/s
    with capture_logs() as logs:
        again = await drain(an.stream(), an_hour_ago(an))
    assert an.sim.rate_limited(KEY) > 0
    assert an.sim.max_rate_seen(KEY) <= 4
    assert [e.content_hash for e in events_of(again)] == [e.content_hash for e in events_of(first)]
    retries = [e for e in logs if e["event"] == "an_read_retry"]
    assert retries
    assert {e["status"] for e in retries} == {429}
    assert any(s >= 10.0 for s in an.clock.sleeps)  # a bare 429 waits at least 10 s


async def test_pacing_holds_on_the_real_clock(http_session: aiohttp.ClientSession) -> None:
    """With real time on both sides, eight back-to-back reads take over a second and stay at 4/s."""
    sim = AnSim(seed=2)
    seed_group(sim, KEY, people=30, activities_per_person=1, seed=3)
    clock = SystemClock()
    async with serve(build_app(sim)) as base:
        bucket = TokenBucket("actionnetwork", SOURCE, capacity=4, window=1.0, clock=clock)
        client = AnClient(
            http_session, base_url=base + API, api_key=KEY, bucket=bucket, clock=clock, per_page=5
        )
        started = time.monotonic()
        await client.probe()
        people = [p async for batch in client.pages(Person, "/people") for p in batch]
        elapsed = time.monotonic() - started
    assert len(people) == 30
    assert sim.journal.count() == 8
    assert elapsed >= 1.0
    assert sim.max_rate_seen(KEY) <= 4


async def test_5xx_and_dropped_connections_are_retried_a_bounded_number_of_times(
    an: AnServer,
) -> None:
    """Reads retry 5xx and resets with backoff, then give up with Retryable after read_tries."""
    an.sim.faults.fail_next(PEOPLE_PATH, 2, status=503)
    an.sim.faults.reset_next(PEOPLE_PATH, 1)
    await an.client().probe()
    assert [e.status for e in an.sim.journal.entries] == [0, 503, 503, 200]
    an.sim.faults.fail_next(PEOPLE_PATH, 10, status=500)
    seq = an.sim.journal.last_seq
    with capture_logs() as logs, pytest.raises(Retryable, match="HTTP 500"):
        await an.client(read_tries=3).probe()
    assert len(an.since(seq)) == 3
    assert [e["attempt"] for e in logs if e["event"] == "an_read_retry"] == [1, 2]
    assert KEY not in repr(logs)


async def test_a_garbage_cursor_is_fatal_and_dates_format_to_the_second(an: AnServer) -> None:
    """A stored cursor that is not a timestamp stops the stream; dates go out to the second."""
    with pytest.raises(Fatal, match=r"an-main\.people: stored cursor 'yesterday'"):
        await drain(an.stream(), "yesterday")
    assert format_utc(datetime(2026, 1, 5, 10, 12, 37, 900_000, tzinfo=UTC)) == (
        "2026-01-05T10:12:37Z"
    )
