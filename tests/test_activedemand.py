"""The ActiveDEMAND client and streams, against the simulator on real loopback."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.testing import capture_logs

from bridge.config import ActiveDemandSource, Duration
from bridge.connectors.activedemand import (
    AdClient,
    AdContactsStream,
    AdConversationsStream,
    AuthMode,
)
from bridge.connectors.ad_feeds import BadRecord, FeedConfig, FeedPage, Feeds, read_one, read_page
from bridge.connectors.ad_models import ContactData, ConversationData, MessageData
from bridge.connectors.ad_target import (
    AddHistory,
    AdOp,
    AdTarget,
    FetchRecording,
    SubmitForm,
    new_ad_op,
    recording_file,
)
from bridge.errors import AuthError, Fatal, InDoubt, Rejected, Retryable
from bridge.models import NewOp, Op, Page, SourceEvent
from bridge.pipeline import Pipeline
from bridge.ratelimit import TokenBucket
from bridge.secrets import Secret
from bridge.sim.activedemand import API, build_app
from bridge.sim.activedemand_state import EMAIL, PHONE, AdSim, default_recording
from bridge.sim.ad_data import CALL_SCRIPT, SeededAccount, seed_account, tiny_png
from bridge.sim.an_data import ANCHOR, DAY
from bridge.sim.common import serve
from bridge.store import Store
from bridge.streams import Mapper, format_utc
from tests.fakes import FakeTarget, outbox_op, settings

KEY = "ad-test-key-4f1e9a7c2b8d6e0f13579bdf"
APP = "ad-partner-app-key-2468ace0"
SOURCE = "ad-main"
CONTACTS = 120
BIG = 300_000
LONG_AGO = "2020-01-01T00:00:00Z"
CONTACTS_PATH = f"{API}/contacts.json"
CONVERSATIONS_PATH = f"{API}/conversations.json"

Tamper = Callable[[web.Request, web.Response], web.Response | None]


class JumpClock:
    """Virtual time shared by the client and the simulator: ``sleep`` jumps ahead at once."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self._wall_offset = ANCHOR + DAY - self.now
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


@dataclass
class AdServer:
    sim: AdSim
    clock: JumpClock
    seeded: SeededAccount
    root: str
    session: aiohttp.ClientSession
    tampers: dict[str, Tamper] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    bucket: TokenBucket | None = None

    @property
    def base_url(self) -> str:
        return self.root + API

    def client(
        self,
        *,
        key: str = KEY,
        app: str | None = APP,
        auth_mode: AuthMode = "header",
        feeds: Feeds | None = None,
        per_page: int | None = None,
        read_tries: int = 5,
    ) -> AdClient:
        if self.bucket is None:
            # The bridge's default AD budget: 2 requests a second per account.
            self.bucket = TokenBucket(
                "activedemand", SOURCE, capacity=2, window=1.0, clock=self.clock
            )
        if per_page is not None:
            contacts = FeedConfig(path="/contacts.json", per_page=per_page)
            feeds = msgspec.structs.replace(feeds or Feeds(), contacts=contacts)
        return AdClient(
            self.session,
            base_url=self.base_url,
            api_key=key,
            application_key=app,
            bucket=self.bucket,
            clock=self.clock,
            feeds=feeds,
            auth_mode=auth_mode,
            read_tries=read_tries,
        )

    def conversations(self, client: AdClient | None = None, **kwargs: Any) -> AdConversationsStream:
        return AdConversationsStream(
            client or self.client(), source=SOURCE, clock=self.clock, **kwargs
        )

    def since(self, seq: int, route: str | None = None) -> list[Any]:
        return self.sim.journal.select(since=seq, route=route)


def _tampering(tampers: dict[str, Tamper], refusals: dict[str, int]) -> Any:
    """Outermost middleware: sees the request as sent (key included) and may swap the reply,
    or refuse a path outright (for streamed bodies, which cannot be swapped afterwards)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in refusals:
            return web.json_response({"error": "Refused"}, status=refusals[request.path])
        response = await handler(request)
        tamper = tampers.get(request.path)
        if tamper is None or not isinstance(response, web.Response):
            return response
        return tamper(request, response) or response

    return middleware


@pytest.fixture
def clock() -> JumpClock:
    return JumpClock()


@pytest.fixture
async def ad(clock: JumpClock, http_session: aiohttp.ClientSession) -> AsyncIterator[AdServer]:
    sim = AdSim(seed=1, clock=clock.monotonic, wall=clock.time)
    seeded = seed_account(sim, KEY, contacts=CONTACTS, seed=7, oversized_bytes=BIG)
    sim.add_application(APP, accounts=[KEY])
    tampers: dict[str, Tamper] = {}
    refusals: dict[str, int] = {}
    app = build_app(sim)
    app.middlewares.insert(0, _tampering(tampers, refusals))
    async with serve(app) as root:
        yield AdServer(sim, clock, seeded, root, http_session, tampers, refusals)


async def drain(stream: AdContactsStream | AdConversationsStream, cursor: str | None) -> list[Page]:
    return [page async for page in stream.pages(cursor)]


def events_of(pages: Sequence[Page], kind: str | None = None) -> list[SourceEvent]:
    return [e for p in pages for e in p.events if kind is None or e.kind == kind]


def messages_of(pages: Sequence[Page]) -> list[MessageData]:
    return [msgspec.json.decode(e.data, type=MessageData) for e in events_of(pages, "message")]


def hashes(pages: Sequence[Page]) -> dict[str, str]:
    return {e.key: e.content_hash for e in events_of(pages)}


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def one_op(event: SourceEvent) -> list[NewOp]:
    return [
        NewOp(
            target="fake:main",
            entity=event.key,
            kind="upsert",
            source_key=event.key,
            payload=event.data,
        )
    ]


# --------------------------------------------------------------------------- auth


async def test_header_mode_sends_the_key_and_partner_key_as_headers(ad: AdServer) -> None:
    """By default the key is the x-api-key header and the partner key rides on every call."""
    ad.sim.require_application_key = True  # v1 routes then refuse a call without it
    client = ad.client()
    seq = ad.sim.journal.last_seq
    await client.probe()
    pages = [c.items async for c in client.conversation_pages()]
    entries = ad.since(seq)
    assert [e.status for e in entries] == [200, 200]
    assert all("api-key" not in e.query for e in entries)
    assert sum(len(p) for p in pages) == len(ad.seeded.conversation_ids)
    with pytest.raises(AuthError) as info:
        await ad.client(app=None).probe()
    assert "HTTP 401" in str(info.value)
    assert ad.sim.journal.count(route="/v1/contacts/fields.json") == 2  # AuthError is not retried


async def test_query_mode_sends_api_key_on_gets_and_as_a_form_field_on_posts(ad: AdServer) -> None:
    """auth_mode "query" puts api-key in the query of GETs and in the body of POSTs."""
    client = ad.client(auth_mode="query")
    seq = ad.sim.journal.last_seq
    await client.probe()
    contact_id = await client.create_contact({"first_name": "Rosa", EMAIL: "rosa@example.org"})
    probe, post = ad.since(seq)
    assert probe.query == {"api-key": "[redacted]"}  # the sim hides what it was sent
    assert (post.method, post.status, post.query) == ("POST", 200, {})
    assert ad.sim.contact(KEY, int(contact_id)).values["first_name"] == "Rosa"


async def test_partner_feeds_need_the_application_key(ad: AdServer) -> None:
    """Without X-Application-Api-Key the proposed feeds answer 401: an AuthError naming the path."""
    with pytest.raises(AuthError, match=r"GET /v1/conversations\.json: HTTP 401") as info:
        async for _ in ad.client(app=None).conversation_pages():
            pass
    assert KEY not in str(info.value)


@pytest.mark.parametrize("mode", ["header", "query"])
async def test_a_bad_key_is_an_auth_error_that_never_shows_the_key(
    ad: AdServer, mode: AuthMode
) -> None:
    """A refused key is AuthError at once, in both modes, with no key in text or logs."""
    bad = "ad-bad-key-0f9e8d7c6b5a4f3e2d1c"
    with capture_logs() as logs, pytest.raises(AuthError) as info:
        await ad.client(key=bad, auth_mode=mode).probe()
    assert str(info.value) == (
        "GET /v1/contacts/fields.json: HTTP 401: the API key or application key was refused"
    )
    assert bad not in repr(logs)
    assert ad.sim.journal.count() == 1


async def test_errors_and_retry_logs_in_query_mode_never_show_the_key(ad: AdServer) -> None:
    """With the key in the query, 5xx errors and an error body echoing the URL stay key-free."""
    client = ad.client(auth_mode="query", read_tries=3)
    ad.sim.faults.fail_next(CONTACTS_PATH, 3, status=500)
    with capture_logs() as logs, pytest.raises(Retryable) as failed:
        async for _ in client.contact_pages():
            pass
    assert str(failed.value).startswith("GET /v1/contacts.json: ")

    def echo(request: web.Request, response: web.Response) -> web.Response:
        return web.json_response({"error": f"cannot parse {request.url}"}, status=400)

    ad.tampers[f"{API}/forms.json"] = echo
    with pytest.raises(Rejected) as echoed:
        await client.forms()
    assert "api-key=[REDACTED]" in str(echoed.value)
    retries = [e for e in logs if e["event"] == "ad_read_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    for text in (str(failed.value), str(echoed.value), repr(echoed.value.details), repr(logs)):
        assert KEY not in text


# --------------------------------------------------------------------------- paging


async def test_paging_stops_on_an_empty_or_a_short_page(ad: AdServer) -> None:
    """120 contacts: by 40s the walk ends on an empty fourth page; by 50s on the short third."""
    seq = ad.sim.journal.last_seq
    sizes = [len(page.items) async for page in ad.client(per_page=40).contact_pages()]
    assert sizes == [40, 40, 40]
    assert [(e.query["page"], e.query["per_page"]) for e in ad.since(seq)] == [
        ("1", "40"),
        ("2", "40"),
        ("3", "40"),
        ("4", "40"),
    ]
    seq = ad.sim.journal.last_seq
    sizes = [len(page.items) async for page in ad.client(per_page=50).contact_pages()]
    assert sizes == [50, 50, 20]
    assert len(ad.since(seq)) == 3


@pytest.mark.parametrize("per_page", [50, 20])
async def test_a_server_ignoring_paging_is_fatal_not_a_loop(ad: AdServer, per_page: int) -> None:
    """A repeated page is Fatal; a page longer than asked is adopted as the size first."""
    ad.sim.ignore_paging = True  # every page is the first 50 contacts
    with capture_logs() as logs, pytest.raises(Fatal, match=r"page 2 repeats page 1"):
        async for _ in ad.client(per_page=per_page).contact_pages():
            pass
    assert ad.sim.journal.count() == 2
    adopted = [e for e in logs if e["event"] == "ad_page_size_adopted"]
    assert len(adopted) == (1 if per_page == 20 else 0)


async def test_feed_config_reads_an_envelope_and_names_a_wrong_id_field(ad: AdServer) -> None:
    """records = "data" reads a wrapped list; a wrong id_field stops with the setting to fix."""

    def wrap(request: web.Request, response: web.Response) -> web.Response:
        assert response.text is not None
        return web.json_response({"data": json.loads(response.text)})

    ad.tampers[CONVERSATIONS_PATH] = wrap
    default = Feeds()
    wrapped = msgspec.structs.replace(
        default, conversations=msgspec.structs.replace(default.conversations, records="data")
    )
    found = [c async for page in ad.client(feeds=wrapped).conversation_pages() for c in page.items]
    assert len(found) == len(ad.seeded.conversation_ids)
    with pytest.raises(Fatal, match=r"records are not a list; set feeds\.conversations\.records"):
        async for _ in ad.client().conversation_pages():
            pass
    wrong = msgspec.structs.replace(
        wrapped,
        conversations=msgspec.structs.replace(wrapped.conversations, id_field="conversation_id"),
    )
    with pytest.raises(Fatal, match=r"has 'conversation_id'; check feeds\.conversations\.id_field"):
        async for _ in ad.client(feeds=wrong).conversation_pages():
            pass


def test_feeds_decode_from_config_with_checked_paths() -> None:
    """Feeds decode from TOML-shaped data, reject unknown keys and bad templates by $.path."""
    feeds = msgspec.convert(
        {"messages": {"path": "/threads/{conversation_id}/items.json", "since_param": "after"}},
        Feeds,
    )
    assert feeds.messages.since_param == "after"
    assert feeds.conversations == Feeds().conversations
    assert feeds.contact_path == "/contacts/{contact_id}.json"
    assert msgspec.convert({"contact_path": ""}, Feeds).contact_path == ""  # TOML's "none"
    assert Feeds(contact_path=None).contact_path is None
    bad = [
        ({"messages": {"path": "/messages.json"}}, r"must contain \{conversation_id\}"),
        ({"recording_path": "/calls/{id}"}, r"may use only \{message_id\}"),
        ({"contacts": {"path": "/contacts.json", "since_param": "since"}}, "no change filter"),
        ({"histories": {"path": "histories.json"}}, r"must start with '/'.* - at `\$\.histories`"),
        ({"conversations": {"path": "/c.json", "per_pge": 5}}, "unknown field `per_pge`"),
        ({"contact_path": "/contacts/{id}.json"}, r"may use only \{contact_id\}"),
        ({"contact_path": "/contacts.json"}, r"must contain \{contact_id\}"),
        ({"contact_path": "contacts/{contact_id}.json"}, r"contact_path must start with '/'"),
    ]
    for raw, message in bad:
        with pytest.raises(msgspec.ValidationError, match=message):
            msgspec.convert(raw, Feeds)


# --------------------------------------------------------------------------- bad records

FEED = FeedConfig(path="/things.json")
WHERE = "GET /v1/things.json"


def read(body: bytes, feed: FeedConfig = FEED, *, identified: bool = False) -> FeedPage:
    return read_page(body, feed, label="things", where=WHERE, identified=identified)


@pytest.mark.parametrize(
    ("bad", "key", "why"),
    [
        (b'{"id": 2, "name": "x\\ud800"}', "2", "$.name holds a lone surrogate escape"),
        (b'{"id": "2", "name": "caf\xe9"}', "2", "$.name holds invalid UTF-8"),
        (b'{"id": 2, "n": NaN}', "2", "not valid JSON"),
        (b'{"id": null, "name": "x"}', None, "'id' is null, not an id"),
        (b'{"id": {"n": 1}}', None, "'id' is an object, not an id"),
        (b'{"name": "no id"}', None, "has no 'id' field"),
        (b"[1, 2]", None, "a things record is a list, not an object"),
        (b"null", None, "a things record is null, not an object"),
    ],
    ids=[
        "lone surrogate",
        "invalid utf-8",
        "NaN",
        "null id",
        "object id",
        "no id field",
        "a list",
        "null",
    ],
)
def test_one_bad_record_is_set_apart_from_the_good_ones(
    bad: bytes, key: str | None, why: str
) -> None:
    """One bad record among good ones is a BadRecord holding its bytes as served, its id
    when readable, and a one-line reason naming what is wrong; the rest read as usual."""
    page = read(b'[{"id": 1, "name": "\\ud83d\\ude00"}, ' + bad + b', {"id": 3}]')
    assert [r.id for r in page.records] == ["1", "3"]
    assert page.records[0].record["name"] == "\N{GRINNING FACE}"  # a valid pair is fine
    (got,) = page.bad
    assert (got.id, got.raw) == (key, bad)
    assert got.reason.startswith(f"{WHERE}: ")
    assert why in got.reason
    assert "\n" not in got.reason
    assert len(page.ids) == 3  # it still counts for the page rule


def test_a_record_nested_too_deeply_costs_only_itself() -> None:
    """A record nested deeper than msgspec or the standard library reads fails its whole
    page, which is split with the record cut to NaN 200 levels down: a BadRecord under its
    id. Read alone (a single-record answer) it is kept as served, "nested too deeply"."""
    deep = b'{"id": 2, "n": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    page = read(b'[{"id": 1}, ' + deep + b', {"id": 3}]')
    assert [r.id for r in page.records] == ["1", "3"]
    (got,) = page.bad
    assert got.id == "2"
    assert got.raw == b'{"id": 2, "n": ' + b"[" * 197 + b"NaN" + b"]" * 197 + b"}"
    assert got.reason.startswith(f"{WHERE}: things record 2: not valid JSON")
    alone = read_one(deep, FEED, label="things", where=WHERE)
    assert isinstance(alone, BadRecord)
    assert (alone.id, alone.raw) == ("2", deep)
    assert alone.reason == f"{WHERE}: things record 2: nested too deeply to read"


def test_a_page_without_any_id_field_is_fatal_unless_the_feed_has_shown_ids() -> None:
    """No record carrying the id field is a config mismatch (Fatal) until the feed has
    served identified records; then it is a page of bad records. A record whose id is
    present but unusable is never taken for a config mismatch."""
    body = b'[{"name": "a"}, {"name": "b"}]'
    with pytest.raises(Fatal, match=r"no record of 2 has 'id'; check feeds\.things\.id_field"):
        read(body)
    with pytest.raises(Fatal, match="no record of 1 has 'id'"):
        read(b"[7]")
    assert len(read(body, identified=True).bad) == 2
    assert [b.reason for b in read(b'[{"id": null}]').bad] == [
        f"{WHERE}: a things record's 'id' is null, not an id"
    ]
    assert read(b"[]") == FeedPage(records=[], bad=[])


def test_only_valid_json_can_show_a_config_mismatch() -> None:
    """A wrong envelope in valid JSON is Fatal; a body that cannot be split into records
    (cut short, a proxy's HTML page, a missing comma) is Retryable, nothing dead-lettered;
    a lone surrogate inside an envelope costs its record only."""
    wrapped = FeedConfig(path="/things.json", records="data.items")
    with pytest.raises(Fatal, match=r"no 'data\.items' in the response"):
        read(b'{"data": []}', wrapped)
    with pytest.raises(Fatal, match="records are not a list"):
        read(b'{"data": {"items": {"id": 1}}}', wrapped)
    for garbled in (
        b'[{"id": 1}, {"id": 2, "name": "cut',
        b"<html><body>Bad gateway</body></html>",
        b'[{"id": 1} {"id": 2, "name": "\\ud800"}]',
        b'{"data": {"items": "\\ud800"}}',
    ):
        with pytest.raises(Retryable, match="cannot be split into records"):
            read(garbled, wrapped if garbled.startswith(b"{") else FEED)
    page = read(
        b'{"meta": {"id": 9}, "data": {"items": [{"id": 1}, {"id": 2, "x": "\\udc00"}]}}',
        wrapped,
    )
    assert ([r.id for r in page.records], [b.id for b in page.bad]) == (["1"], ["2"])


def _page_one(edit: Callable[[list[bytes]], list[bytes]], page: str = "1") -> Tamper:
    """A tamper that serves one page of contacts with its records edited as bytes."""

    def tamper(request: web.Request, response: web.Response) -> web.Response | None:
        if request.query.get("page") != page:
            return None
        assert response.text is not None
        records = [json.dumps(r).encode() for r in json.loads(response.text)]
        body = b"[" + b", ".join(edit(records)) + b"]"
        return web.Response(body=body, content_type="application/json")

    return tamper


def _swap(index: int, old: bytes, new: bytes) -> Callable[[list[bytes]], list[bytes]]:
    def edit(records: list[bytes]) -> list[bytes]:
        assert old in records[index]
        records[index] = records[index].replace(old, new, 1)
        return records

    return edit


@pytest.mark.parametrize(
    ("old", "new", "keyed"),
    [
        (b'"id": ', b'"name": "\\ud800", "id": ', True),
        (b'"id": ', b'"name": "caf\xe9", "id": ', True),
        (b'"id": ', b'"id": null, "was": ', False),
    ],
    ids=["lone surrogate", "invalid utf-8", "null id"],
)
async def test_a_bad_contact_is_a_rejection_of_its_page_and_the_scan_goes_on(
    ad: AdServer, old: bytes, new: bytes, keyed: bool
) -> None:
    """A full page with one bad contact yields the other 39 and one rejection under the
    contact's key (or, without a readable id, one made from its bytes), and the walk
    still reads every later page."""
    ad.tampers[CONTACTS_PATH] = _page_one(_swap(3, old, new))
    stream = AdContactsStream(ad.client(per_page=40), source=SOURCE, clock=ad.clock)
    pages = await drain(stream, None)
    assert [len(p.events) for p in pages] == [39, 40, 40, 0]
    assert [len(p.rejected) for p in pages] == [1, 0, 0, 0]
    (rejected,) = pages[0].rejected
    bad_id = ad.seeded.contact_ids[3]
    if keyed:
        assert rejected.event.key == f"{SOURCE}:contact:{bad_id}"
        assert "$.name holds" in rejected.reason
    else:
        assert rejected.event.key.startswith(f"{SOURCE}.contacts:unidentified:")
        assert "'id' is null" in rejected.reason
    assert rejected.event.kind == "unreadable"
    assert f"{SOURCE}:contact:{bad_id}" not in {e.key for e in events_of(pages)}


async def test_a_page_of_contacts_without_ids_after_good_pages_is_bad_records(
    ad: AdServer,
) -> None:
    """Once the feed has served ids, a later page none of whose records has one is read as
    that many bad records, not as a wrong id_field: the scan ends normally."""

    def drop_ids(records: list[bytes]) -> list[bytes]:
        return [r.replace(b'"id": ', b'"was": ', 1) for r in records]

    ad.tampers[CONTACTS_PATH] = _page_one(drop_ids, page="3")
    stream = AdContactsStream(ad.client(per_page=50), source=SOURCE, clock=ad.clock)
    pages = await drain(stream, None)
    assert [(len(p.events), len(p.rejected)) for p in pages] == [(50, 0), (50, 0), (0, 20), (0, 0)]
    assert {r.reason for r in pages[2].rejected} == {
        f"GET {CONTACTS_PATH}: a contacts record has no 'id' field"
    }
    assert len({r.event.key for r in pages[2].rejected}) == 20


async def test_bad_contacts_are_dead_lettered_with_the_page(ad: AdServer, tmp_path: Path) -> None:
    """Through the real pipeline: the bad contact is one dead letter with its reason, every
    other contact reaches the target, and the scan's cursor is stored."""
    ad.tampers[CONTACTS_PATH] = _page_one(_swap(0, b'"id": ', b'"name": "\\udfff", "id": '))
    stream = AdContactsStream(ad.client(), source=SOURCE, clock=ad.clock, mapper=one_op)
    async with Store.open(tmp_path / "state.db") as store:
        target = FakeTarget()
        await Pipeline(store, [stream], {"fake:main": target}, settings(), ad.clock).run(once=True)
        bad_key = f"{SOURCE}:contact:{ad.seeded.contact_ids[0]}"
        assert len(target.sent) == CONTACTS - 1
        assert bad_key not in {op.source_key for op in target.sent}
        (letter,) = await store.dead_letters()
        assert (letter.source_key, letter.kind) == (bad_key, "event")
        assert letter.error == (
            f"GET {CONTACTS_PATH}: contacts record {ad.seeded.contact_ids[0]}: "
            "$.name holds a lone surrogate escape (\\udfff)"
        )
        assert await store.get_cursor(stream.name) == format_utc(ad.clock.time())


async def test_one_unreadable_contact_is_none_and_logged(ad: AdServer) -> None:
    """contact() of a contact with unreadable text is None (the scan dead-letters it),
    logged with the reason; one without the id field stops, as a wrong setting would."""
    target = ad.seeded.contact_ids[2]
    path = f"{API}/contacts/{target}.json"

    def garble(request: web.Request, response: web.Response) -> web.Response:
        assert isinstance(response.body, bytes)
        return web.Response(body=response.body.replace(b'"id"', b'"x": "\xff", "id"', 1))

    ad.tampers[path] = garble
    client = ad.client()
    with capture_logs() as logs:
        assert await client.contact(str(target)) is None
    (logged,) = [e for e in logs if e["event"] == "ad_contact_unreadable"]
    assert logged["reason"].endswith(f"contacts record {target}: $.x holds invalid UTF-8")

    def drop_id(request: web.Request, response: web.Response) -> web.Response:
        assert isinstance(response.body, bytes)
        return web.Response(body=response.body.replace(b'"id"', b'"was"', 1))

    ad.tampers[path] = drop_id
    with pytest.raises(Fatal, match=r"has no 'id' field; check feeds\.contact_path"):
        await client.contact(str(target))


# --------------------------------------------------------------------------- contacts stream


async def test_contacts_scan_yields_a_page_per_api_page_with_stable_hashes(ad: AdServer) -> None:
    """A scan is one page per API page plus a cursor page; only an edited contact rehashes."""
    stream = AdContactsStream(ad.client(per_page=50), source=SOURCE, clock=ad.clock)
    assert stream.name == f"{SOURCE}.contacts"
    first = await drain(stream, None)
    assert [len(p.events) for p in first] == [50, 50, 20, 0]
    assert [p.cursor for p in first[:-1]] == [None, None, None]
    assert first[-1].cursor == format_utc(ad.clock.time())
    target = ad.seeded.contact_ids[7]
    ad.sim.update_contact(KEY, target, {PHONE: "(503) 555-0199"})
    second = await drain(stream, first[-1].cursor)
    before, after = hashes(first), hashes(second)
    changed = [k for k in after if after[k] != before[k]]
    assert changed == [f"{SOURCE}:contact:{target}"]
    event = next(e for e in events_of(second) if e.key == changed[0])
    data = msgspec.json.decode(event.data, type=ContactData)
    assert (data.id, data.phone) == (str(target), "(503) 555-0199")
    assert data.email == ad.sim.contact(KEY, target).values.get(EMAIL)
    assert all(k.startswith("custom_") for k in data.custom)


async def test_only_changed_contacts_reach_the_target_once_delivered(
    ad: AdServer, tmp_path: Path
) -> None:
    """Through the real pipeline: every contact once, then only the edited one."""
    stream = AdContactsStream(ad.client(), source=SOURCE, clock=ad.clock, mapper=one_op)
    async with Store.open(tmp_path / "state.db") as store:
        target = FakeTarget()
        await Pipeline(store, [stream], {"fake:main": target}, settings(), ad.clock).run(once=True)
        assert len(target.sent) == CONTACTS
        ad.sim.update_contact(KEY, ad.seeded.contact_ids[3])
        again = FakeTarget()
        await Pipeline(store, [stream], {"fake:main": again}, settings(), ad.clock).run(once=True)
        assert [op.source_key for op in again.sent] == [
            f"{SOURCE}:contact:{ad.seeded.contact_ids[3]}"
        ]


async def test_own_fields_stay_out_of_the_contact_hash(ad: AdServer) -> None:
    """A custom field the bridge writes back does not change the contact's hash."""
    own = ad.sim.add_custom_field(KEY, "GHL Contact Id")
    client = ad.client()
    stream = AdContactsStream(client, source=SOURCE, clock=ad.clock, own_fields=frozenset({own}))
    first = hashes(await drain(stream, None))
    ad.sim.update_contact(KEY, ad.seeded.contact_ids[0], {own: "ghl-123"})
    assert hashes(await drain(stream, None)) == first


CONTACT_PATH = f"{API}/contacts/{{id}}.json"


async def test_one_contact_reads_like_a_list_element_or_none_on_404(ad: AdServer) -> None:
    """contact() normalises like contact_pages(), is None on a 404, passes other refusals
    on, and is Fatal without a contact_path."""
    client = ad.client(per_page=40)
    listed = [c async for page in client.contact_pages() for c in page.items][:3]
    for one in listed:
        assert await client.contact(one.id) == one
    seq = ad.sim.journal.last_seq
    assert await client.contact("1") is None
    # The id is sent as one quoted segment: the server sees the slashes unresolved and no
    # route, instead of a path that climbs to another resource.
    assert await client.contact(f"{listed[0].id}/../1") is None
    assert [(e.path, e.status) for e in ad.since(seq)] == [
        (f"{API}/contacts/1.json", 404),
        (f"{API}/contacts/{listed[0].id}/../1.json", 404),
    ]
    target = str(ad.seeded.contact_ids[5])
    ad.sim.faults.fail_next(CONTACT_PATH, 1, status=422)
    with pytest.raises(Rejected, match="HTTP 422"):
        await client.contact(target)
    no_path = msgspec.structs.replace(Feeds(), contact_path=None)
    with pytest.raises(Fatal, match=r"feeds\.contact_path is unset"):
        await ad.client(feeds=no_path).contact(target)


async def test_find_contacts_by_id_or_by_a_walk_that_stops_early(ad: AdServer) -> None:
    """With contact_path, one request per id; without it, contacts.json is walked only until
    every id is seen (the whole walk when one is missing); missing ids are absent."""
    ids = [str(i) for i in ad.seeded.contact_ids]  # 120 contacts: 40 a page at per_page=40
    early, late = ids[:2], [ids[1], ids[45]]
    client = ad.client(per_page=40)
    everyone = {c.id: c async for page in client.contact_pages() for c in page.items}
    seq = ad.sim.journal.last_seq
    found = await client.find_contacts([*early, "1"])
    assert found == {i: everyone[i] for i in early}
    assert [e.route for e in ad.since(seq)] == [CONTACT_PATH] * 3
    assert await client.find_contacts([]) == {}
    assert len(ad.since(seq)) == 3
    no_path = msgspec.structs.replace(Feeds(), contact_path=None)
    walker = ad.client(per_page=40, feeds=no_path)
    for wanted, pages in ((early, 1), (late, 2), ([ids[0], "1"], 4)):
        seq = ad.sim.journal.last_seq
        walked = await walker.find_contacts(wanted)
        assert walked == {i: everyone[i] for i in wanted if i in everyone}
        assert [e.route for e in ad.since(seq)] == [CONTACTS_PATH] * pages, wanted


# --------------------------------------------------------------------------- conversations stream


async def test_conversations_come_with_their_messages_in_created_order(ad: AdServer) -> None:
    """A first read emits each conversation then all its messages, calls and media included."""
    pages = await drain(ad.conversations(), LONG_AGO)
    events = events_of(pages)
    conversations = [e for e in events if e.kind == "conversation"]
    assert len(conversations) == len(ad.seeded.conversation_ids)
    messages = messages_of(pages)
    assert len(messages) == ad.sim.counts(KEY)["messages"]
    for conv_id in ad.seeded.conversation_ids:
        mine = [m for m in messages if m.conversation_id == str(conv_id)]
        assert [m.created for m in mine] == sorted(m.created for m in mine if m.created)
        at = next(i for i, e in enumerate(events) if e.key == f"{SOURCE}:conversation:{conv_id}")
        assert events[at + 1 : at + 1 + len(mine)] == [
            e
            for e in events
            if e.kind == "message" and e.key in {f"{SOURCE}:message:{m.id}" for m in mine}
        ]
    conv = msgspec.json.decode(conversations[0].data, type=ConversationData)
    assert conv.contact_key == f"{SOURCE}:contact:{conv.contact_id}"
    by_id = {m.id: m for m in messages}
    image = by_id[str(ad.seeded.image_message_id)]
    (attachment,) = image.attachments
    assert (image.type, attachment.content_type, attachment.file_name) == (
        "media",
        "image/png",
        "flyer.png",
    )
    call = by_id[str(ad.seeded.call_message_ids[0])]
    assert call.type == "call"
    assert call.call is not None
    assert (call.call.recording, call.call.transcription) == (True, True)
    missed = by_id[str(ad.seeded.missed_call_message_id)].call
    assert missed is not None
    assert (missed.recording, missed.transcription) == (False, False)
    assert image.contact_key == f"{SOURCE}:contact:{image.contact_id}"
    assert pages[-1].cursor is not None
    assert all(p.cursor is None for p in pages[:-1])


async def test_new_messages_and_status_changes_are_picked_up(ad: AdServer) -> None:
    """A new message is read after the watermark; its status change rehashes the same key."""
    stream = ad.conversations()
    first = await drain(stream, LONG_AGO)
    cursor = first[-1].cursor
    conv_id = ad.seeded.conversation_ids[0]
    last_id = ad.sim.conversation(KEY, conv_id).message_ids[-1]
    ad.clock.advance(60)
    sent = ad.sim.add_message(KEY, conv_id, body="See you at 6", direction="outbound")
    key = f"{SOURCE}:message:{sent.id}"
    seq = ad.sim.journal.last_seq
    second = await drain(stream, cursor)
    reads = [e for e in ad.since(seq) if e.path.endswith("/messages.json")]
    assert [(e.path, e.query.get("since_id")) for e in reads] == [
        (f"{API}/conversations/{conv_id}/messages.json", str(last_id))
    ]
    (new,) = messages_of(second)
    assert (new.id, new.status, new.direction, new.body) == (
        str(sent.id),
        "sent",
        "outbound",
        "See you at 6",
    )
    ad.clock.advance(60)
    ad.sim.set_status(KEY, sent.id, "delivered")
    seq = ad.sim.journal.last_seq
    third = await drain(stream, second[-1].cursor)
    reads = [e for e in ad.since(seq) if e.path.endswith("/messages.json")]
    assert [e.query.get("since_id") for e in reads] == [str(last_id)]  # "sent" was still open
    (delivered,) = messages_of(third)
    assert delivered.status == "delivered"
    assert hashes(third)[key] != hashes(second)[key]
    ad.clock.advance(30)
    seq = ad.sim.journal.last_seq
    quiet = await drain(stream, third[-1].cursor)
    assert messages_of(quiet) == []  # re-listed by the overlap, but unchanged: not re-read
    assert [e.path for e in ad.since(seq)] == [CONVERSATIONS_PATH]
    ad.sim.add_message(KEY, conv_id, body="On my way")
    seq = ad.sim.journal.last_seq
    await drain(stream, quiet[-1].cursor)
    reads = [e for e in ad.since(seq) if e.path.endswith("/messages.json")]
    assert [e.query.get("since_id") for e in reads] == [str(sent.id)]  # now settled


async def test_a_malformed_message_is_rejected_in_its_page(ad: AdServer) -> None:
    """One message that does not fit its Struct is a rejection of its page, under its own
    key, naming the field; the rest arrive, and the watermark does not pass it."""
    conv_id = ad.seeded.conversation_ids[0]
    path = f"{API}/conversations/{conv_id}/messages.json"
    bad_id = ad.sim.conversation(KEY, conv_id).message_ids[0]

    def garble(request: web.Request, response: web.Response) -> web.Response:
        assert response.text is not None
        body = json.loads(response.text)
        if body:
            body[0]["created_at"] = "last tuesday"
        return web.json_response(body)

    ad.tampers[path] = garble
    stream = ad.conversations()
    pages = await drain(stream, LONG_AGO)
    ids = {m.id for m in messages_of(pages) if m.conversation_id == str(conv_id)}
    expected = {str(i) for i in ad.sim.conversation(KEY, conv_id).message_ids}
    assert ids == expected - {str(bad_id)}
    (rejected,) = [r for p in pages for r in p.rejected]
    assert rejected.event.key == f"{SOURCE}:message:{bad_id}"
    assert rejected.event.kind == "unreadable"
    assert msgspec.json.decode(rejected.event.data)["created_at"] == "last tuesday"
    assert rejected.reason.startswith(f"GET {path}: messages record {bad_id}: ")
    assert "$.created_at" in rejected.reason
    ad.sim.add_message(KEY, conv_id, body="Still there?")
    seq = ad.sim.journal.last_seq
    again = await drain(stream, pages[-1].cursor)
    reads = [e for e in ad.since(seq) if e.path == path]
    assert [e.query.get("since_id") for e in reads] == [None]  # read whole again
    assert [r.event.key for p in again for r in p.rejected] == [rejected.event.key]


async def test_a_malformed_conversation_is_rejected_and_the_others_go_on(ad: AdServer) -> None:
    """A conversation whose updated field is no timestamp, or whose shape does not fit, is
    a rejection under its key; its messages wait for it, every other conversation flows."""
    first, second = ad.seeded.conversation_ids[:2]

    def garble(request: web.Request, response: web.Response) -> web.Response:
        assert response.text is not None
        body = json.loads(response.text)
        for record in body:
            if record["id"] == first:
                record["updated_at"] = "last tuesday"
            if record["id"] == second:
                record["channel"] = ["sms"]
        return web.json_response(body)

    ad.tampers[CONVERSATIONS_PATH] = garble
    pages = await drain(ad.conversations(), LONG_AGO)
    rejected = {r.event.key: r.reason for p in pages for r in p.rejected}
    assert rejected == {
        f"{SOURCE}:conversation:{first}": f"GET {CONVERSATIONS_PATH}: conversations record"
        f" {first}: 'updated_at' is a string that is not a timestamp",
        f"{SOURCE}:conversation:{second}": f"GET {CONVERSATIONS_PATH}: conversations record"
        f" {second}: Expected `str | null`, got `array` - at `$.channel`",
    }
    conversations = {e.key for e in events_of(pages, "conversation")}
    assert len(conversations) == len(ad.seeded.conversation_ids) - 2
    assert not conversations & rejected.keys()
    assert {m.conversation_id for m in messages_of(pages)}.isdisjoint({str(first), str(second)})


async def test_a_transcription_becoming_ready_rehashes_the_call(ad: AdServer) -> None:
    """A recorded call without a transcription stays open until it has one."""
    stream = ad.conversations()
    first = await drain(stream, LONG_AGO)
    phone = next(
        c for c in ad.seeded.conversation_ids if ad.sim.conversation(KEY, c).channel == "phone"
    )
    ad.clock.advance(60)
    call = ad.sim.add_call(
        KEY, phone, duration=61, recording=default_recording(0.1), status="received"
    )
    second = await drain(stream, first[-1].cursor)
    (pending,) = messages_of(second)
    assert pending.call is not None
    assert (pending.call.recording, pending.call.transcription) == (True, False)
    ad.clock.advance(60)
    ad.sim.set_transcription(KEY, call.id, [("contact", "Hello?")])
    third = await drain(stream, second[-1].cursor)
    (ready,) = messages_of(third)
    assert ready.call is not None
    assert ready.call.transcription
    key = f"{SOURCE}:message:{call.id}"
    assert hashes(third)[key] != hashes(second)[key]


async def test_window_is_cursor_minus_overlap_and_the_cursor_stops_at_the_signpost(
    ad: AdServer,
) -> None:
    """updated_since is cursor - overlap; the cursor is the newest change, at most the signpost."""
    stream = ad.conversations(overlap=120)
    seq = ad.sim.journal.last_seq
    pages = await drain(stream, "2025-12-30T12:00:00Z")
    assert ad.since(seq, CONVERSATIONS_PATH)[0].query["updated_since"] == "2025-12-30T11:58:00Z"
    newest = max(c.updated for c in ad.sim.list_conversations(KEY, limit=1_000))
    assert pages[-1].cursor == format_utc(float(newest))
    ad.clock.advance(3)
    conv_id = ad.seeded.conversation_ids[1]
    ad.sim.add_message(KEY, conv_id, body="now")
    pages = await drain(stream, pages[-1].cursor)
    assert pages[-1].cursor == format_utc(stream.signpost())


async def test_a_paging_shift_keeps_the_cursor_where_it_was(ad: AdServer) -> None:
    """A conversation seen twice in one walk means one may have slid past: the cursor stays."""
    first_page: list[Any] = []

    def shift(request: web.Request, response: web.Response) -> web.Response | None:
        assert response.text is not None
        body = json.loads(response.text)
        if request.query.get("page") == "1":
            first_page[:] = body
            return None
        return web.json_response([first_page[-1], *body])

    ad.tampers[CONVERSATIONS_PATH] = shift
    default = Feeds()
    small = msgspec.structs.replace(
        default, conversations=msgspec.structs.replace(default.conversations, per_page=5)
    )
    stream = ad.conversations(ad.client(feeds=small))
    with capture_logs() as logs:
        pages = await drain(stream, LONG_AGO)
    assert pages[-1].cursor == LONG_AGO
    assert any(e["event"] == "ad_conversations_shifted" for e in logs)
    keys = [e.key for e in events_of(pages, "conversation")]
    assert len(keys) == len(set(keys)) == len(ad.seeded.conversation_ids)


async def test_transform_hands_events_to_the_mapper_and_from_config_wires_names(
    ad: AdServer,
) -> None:
    """Streams built from an [[sources.activedemand]] entry use its name and interval."""
    source = ActiveDemandSource(
        name=SOURCE,
        location="main",
        api_key=Secret(KEY),
        application_key=Secret(APP),
        base_url=ad.base_url,
        poll_interval=Duration(300.0),
    )
    client = AdClient.from_config(ad.session, source, bucket=None, clock=ad.clock)
    await client.probe()
    mapper: Mapper = one_op
    contacts = AdContactsStream.from_config(source, client, clock=ad.clock, mapper=mapper)
    conversations = AdConversationsStream.from_config(
        source, client, clock=ad.clock, poll_interval=30
    )
    assert (contacts.name, contacts.poll_interval) == (f"{SOURCE}.contacts", 300.0)
    assert (conversations.name, conversations.poll_interval) == (f"{SOURCE}.conversations", 30)
    event = SourceEvent(stream="s", key="k", kind="contact", data=b"{}", content_hash="h")
    assert contacts.transform(event) == one_op(event)
    assert conversations.transform(event) == []
    assert [c async for page in client.conversation_pages() for c in page.items]


# --------------------------------------------------------------------------- calls and files


async def test_recording_downloads_whole_or_not_at_all(ad: AdServer, tmp_path: Path) -> None:
    """A recording is streamed to its path; over the cap it is Rejected and nothing is left."""
    call_id = str(ad.seeded.call_message_ids[0])
    expected, _ = ad.sim.recording(KEY, int(call_id))
    dest = tmp_path / "call.wav"
    assert await ad.client().download_recording(call_id, dest) == len(expected)
    assert dest.read_bytes() == expected
    capped = tmp_path / "capped.wav"
    with pytest.raises(
        Rejected, match=r"GET /v1/messages/\d+/recording: body is \d+ bytes, over the cap"
    ):
        await ad.client().download_recording(call_id, capped, max_bytes=len(expected) - 1)
    assert files_in(tmp_path) == ["call.wav"]
    with pytest.raises(Rejected, match="HTTP 404"):
        await ad.client().download_recording(str(ad.seeded.missed_call_message_id), capped)


async def test_attachments_stream_without_the_key_and_respect_the_cap(
    ad: AdServer, tmp_path: Path
) -> None:
    """Attachment URLs get no key; a chunked body over the cap fails mid-stream and is removed."""
    by_id = {m.id: m for m in messages_of(await drain(ad.conversations(), LONG_AGO))}
    client = ad.client(auth_mode="query")
    image = by_id[str(ad.seeded.image_message_id)].attachments[0]
    seq = ad.sim.journal.last_seq
    assert await client.download_attachment(image.url, tmp_path / "flyer.png") == len(tiny_png())
    (entry,) = ad.since(seq)
    assert entry.query == {}
    assert (tmp_path / "flyer.png").read_bytes() == tiny_png()
    async with client.attachment(image.url) as chunks:
        assert b"".join([c async for c in chunks]) == tiny_png()
    video = by_id[str(ad.seeded.oversized_message_id)].attachments[0]
    with pytest.raises(Rejected, match=f"body is {BIG} bytes"):
        await client.download_attachment(video.url, tmp_path / "rally.mp4", max_bytes=BIG - 1)
    chunked = ad.sim.add_attachment("long.mp4", "video/mp4", size=BIG, send_length=False)
    url = f"{ad.root}/files/{chunked.token}/long.mp4"
    with pytest.raises(Rejected, match="body exceeds the cap of 100000 bytes"):
        await client.download_attachment(url, tmp_path / "long.mp4", max_bytes=100_000)
    assert files_in(tmp_path) == ["flyer.png"]
    with pytest.raises(Rejected, match="not http"):
        await client.download_attachment("file:///etc/passwd", tmp_path / "x")


async def test_an_expired_file_link_is_rejected_not_fatal(ad: AdServer, tmp_path: Path) -> None:
    """A 403 from the file host is that record's problem (Rejected), not an AuthError."""
    by_id = {m.id: m for m in messages_of(await drain(ad.conversations(), LONG_AGO))}
    url = by_id[str(ad.seeded.image_message_id)].attachments[0].url
    ad.refusals[urlsplit(url).path] = 403
    with pytest.raises(Rejected, match="HTTP 403: the file link was refused or expired"):
        await ad.client().download_attachment(url, tmp_path / "flyer.png")
    assert files_in(tmp_path) == []


async def test_transcription_json_text_and_message_status(ad: AdServer) -> None:
    """A call's transcription reads as sentences and as text; status.json reads as a Struct."""
    client = ad.client()
    call_id = str(ad.seeded.call_message_ids[0])
    sentences = await client.transcription(call_id)
    assert [(s.speaker, s.text) for s in sentences] == list(CALL_SCRIPT)
    text = await client.transcription_text(call_id)
    assert text.splitlines()[0] == f"{CALL_SCRIPT[0][0]}: {CALL_SCRIPT[0][1]}"
    with pytest.raises(Rejected, match="HTTP 404"):
        await client.transcription(str(ad.seeded.missed_call_message_id))
    status = await client.message_status(call_id)
    assert status.status == ad.sim.message(KEY, int(call_id)).status


# --------------------------------------------------------------------------- writes


async def test_forms_are_listed_fields_cached_and_unknown_keys_dropped(ad: AdServer) -> None:
    """Form fields are read once; a submission keeps only the form's keys and is not retried."""
    client = ad.client()
    forms = await client.forms()
    assert [f.name for f in forms] == ["Newsletter Sign-up", "Volunteer Interest", "Bridge Sync"]
    newsletter = str(forms[0].id)
    with capture_logs() as logs:
        await client.submit_form(
            newsletter, {EMAIL: "ana@example.org", "first_name": "Ana", PHONE: "1"}
        )
        await client.submit_form(newsletter, {EMAIL: "ben@example.org"})
    assert ad.sim.journal.count(route="/v1/forms/fields.json") == 1
    (submitted, _) = ad.sim.submissions(KEY)
    assert submitted.values == {EMAIL: "ana@example.org", "first_name": "Ana"}
    assert [e["fields"] for e in logs if e["event"] == "ad_form_fields_dropped"] == [[PHONE]]
    ad.sim.faults.fail_next(f"{API}/forms/*", 1, status=502, method="POST")
    with pytest.raises(InDoubt):
        await client.submit_form(newsletter, {EMAIL: "cy@example.org"})
    assert ad.sim.journal.count(method="POST") == 3


async def test_contact_create_and_history_are_single_attempts(ad: AdServer) -> None:
    """create_contact and add_history return ids; a 503 write is Retryable and sent once."""
    client = ad.client()
    contact_id = await client.create_contact(
        {"first_name": "Dee", EMAIL: "dee@example.org", "last_name": ""}
    )
    history_id = await client.add_history(contact_id, "note", "Called back")
    found = [h async for page in client.history_pages(contact_id=contact_id) for h in page]
    assert [(h.id, h.value.text) for h in found] == [(history_id, "Called back")]
    ad.sim.faults.fail_next(CONTACTS_PATH, 1, status=503, method="POST")
    with pytest.raises(Retryable):
        await client.create_contact({EMAIL: "eve@example.org"})
    assert ad.sim.journal.count(method="POST", route=CONTACTS_PATH) == 2
    with pytest.raises(Rejected, match="HTTP 422"):
        await client.create_contact({"first_name": "No channel"})


# --------------------------------------------------------------------------- budget


async def test_the_bucket_rate_is_never_exceeded_and_429s_are_waited_out(ad: AdServer) -> None:
    """The sim never sees over 2 requests a second; a stricter server's 429s are retried."""
    first = await drain(ad.conversations(), LONG_AGO)
    assert ad.sim.journal.count() > 10
    assert ad.sim.max_rate_seen(KEY) <= 2
    assert ad.sim.rate_limited(KEY) == 0
    ad.sim.set_rate_limit(1, 1.0)
    with capture_logs() as logs:
        again = await drain(ad.conversations(), LONG_AGO)
    assert ad.sim.rate_limited(KEY) > 0
    assert ad.sim.max_rate_seen(KEY) <= 2
    assert hashes(again) == hashes(first)
    retries = [e for e in logs if e["event"] == "ad_read_retry"]
    assert retries
    assert {e["status"] for e in retries} == {429}
    assert all(e["retry_in"] >= 1.0 for e in retries)  # the sim's Retry-After: 1 is a floor


# --------------------------------------------------------------------------- the target

PERSON = f"{SOURCE}:contact:1"
HISTORY = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


def as_ad_op(op: AdOp, source_key: str) -> Op:
    return outbox_op(new_ad_op("ad:main", op, source_key=source_key))


def ad_target(ad: AdServer, store: Store, **kwargs: float) -> AdTarget:
    return AdTarget(
        ad.client(),
        store,
        max_recording_bytes=int(kwargs.get("max_bytes", 10_000_000)),
        retention=kwargs.get("retention", 86_400.0),
    )


async def test_history_entry_is_made_once_and_found_again_when_in_doubt(
    ad: AdServer, store: Store
) -> None:
    contact_id = str(ad.seeded.contact_ids[0])
    entry = AddHistory(person=PERSON, contact_id=contact_id, kind="note", text="Call transcript")
    op = as_ad_op(entry, "ad-main:message:9:transcript:ad")
    sending = ad_target(ad, store)
    assert await sending.reconcile(op) is None  # not there yet: send it
    result = await sending.send(op)
    await store.complete(op, result, now=0.0)
    written = ad.sim.histories(KEY, source="api")
    assert len(written) == 1
    assert written[0].text.endswith("[bridge:ad-main:message:9:transcript:ad]")
    assert await sending.send(op) == msgspec.structs.replace(result, updates=())
    assert len(ad.sim.histories(KEY, source="api")) == 1
    # A crash after the POST: a fresh state finds the entry by its marker.
    found = await sending.reconcile(op)
    assert found is not None
    assert found.updates[0].message_id == str(written[0].id)


async def test_form_submission_reads_the_contact_at_send_time(ad: AdServer, store: Store) -> None:
    contact_id = ad.seeded.contact_ids[0]
    contact = ad.sim.contact(KEY, contact_id)
    form_id = ad.seeded.form_ids[0]  # Newsletter Sign-up: first, last name and e-mail
    submit = SubmitForm(
        person=PERSON,
        contact_id=str(contact_id),
        form_id=str(form_id),
        fields={
            "emails.email_address": "{email}",
            "first_name": "{first_name}",
            "last_name": "{kind}: {text}",
        },
        record={"kind": "alert", "text": "wants a callback"},
    )
    await ad_target(ad, store).send(as_ad_op(submit, "k:alert"))
    (made,) = ad.sim.submissions(KEY, form_id)
    assert made.values["emails.email_address"] == contact.email
    assert made.values["first_name"] == contact.values["first_name"]
    assert made.values["last_name"] == "alert: wants a callback"


async def test_recording_is_fetched_once_and_pruned_after_its_retention(
    ad: AdServer, store: Store
) -> None:
    call_id = str(ad.seeded.call_message_ids[0])
    file = recording_file(SOURCE, call_id)
    fetch = FetchRecording(person=PERSON, message_id=call_id, file=file)
    sending = ad_target(ad, store)
    seq = ad.sim.journal.last_seq
    await sending.send(as_ad_op(fetch, "k:recording:fetch"))
    kept = store.path.parent / file
    assert kept.stat().st_size > 0
    await sending.send(as_ad_op(fetch, "k:recording:fetch"))
    assert len(ad.since(seq, route="/v1/messages/{id}/recording")) == 1  # kept, not fetched again
    # Past its retention, the next sweep removes it (and a later fetch would bring it back).
    old = kept.stat().st_mtime - 2 * 86_400
    os.utime(kept, (old, old))
    sweeping = ad_target(ad, store)
    other = str(ad.seeded.call_message_ids[-1])
    again = FetchRecording(person=PERSON, message_id=other, file=recording_file(SOURCE, other))
    await sweeping.send(as_ad_op(again, "k2:recording:fetch"))
    assert not kept.exists()
    assert (store.path.parent / again.file).exists()


async def test_oversized_recording_is_rejected_and_nothing_is_kept(
    ad: AdServer, store: Store
) -> None:
    call_id = str(ad.seeded.call_message_ids[0])
    fetch = FetchRecording(person=PERSON, message_id=call_id, file=recording_file(SOURCE, call_id))
    with pytest.raises(Rejected, match="cap"):
        await ad_target(ad, store, max_bytes=100).send(as_ad_op(fetch, "k:recording:fetch"))
    assert list((store.path.parent / "recordings" / SOURCE).iterdir()) == []


async def test_stream_reads_transcripts_and_contacts_it_has_never_seen(ad: AdServer) -> None:
    asked: list[Sequence[str]] = []

    async def nobody_known(keys: Sequence[str]) -> set[str]:
        asked.append(keys)
        return set()

    stream = ad.conversations(known=nobody_known, backfill_since=HISTORY)
    pages = await drain(stream, None)
    first = pages[0].events
    contacts = [e for e in first if e.kind == "contact"]
    assert contacts
    assert first[: len(contacts)] == contacts  # before any conversation of theirs
    assert asked
    calls = [
        msgspec.json.decode(e.data, type=MessageData)
        for e in events_of(pages, "message")
        if b'"type":"call"' in e.data
    ]
    transcribed = [m for m in calls if m.call is not None and m.call.transcription]
    assert transcribed
    assert all(m.transcript and "agent: Hi, this is Sam" in m.transcript for m in transcribed)
    assert all(m.transcript is None for m in calls if m.call and not m.call.transcription)


async def test_stream_reads_no_contact_the_bridge_already_has(ad: AdServer) -> None:
    async def everyone_known(keys: Sequence[str]) -> set[str]:
        return set(keys)

    stream = ad.conversations(known=everyone_known, backfill_since=HISTORY)
    seq = ad.sim.journal.last_seq
    pages = await drain(stream, None)
    assert not events_of(pages, "contact")
    assert not ad.since(seq, route="/v1/contacts/{id}.json")
