"""Summary notes: the digest, the ops the flow sends, the GHL target and `bridge summarize`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog

from bridge.cli import main
from bridge.clock import SystemClock
from bridge.config import load_config
from bridge.connectors.an_taggings import TagsData
from bridge.connectors.ghl.client import CONTACTS_VERSION, GhlClient
from bridge.connectors.ghl.models import ContactUpsert
from bridge.connectors.ghl.ops import UpdateSummary, decode_op, summary_op
from bridge.connectors.ghl.target import GhlTarget
from bridge.errors import EX_USAGE, ConfigError
from bridge.models import IdMapUpdate, NewOp, OpResult, marker
from bridge.pipeline import Pipeline
from bridge.redact import clear_secrets
from bridge.store import Store
from bridge.summary import SummaryItem, render, summary_text
from tests.conftest import GhlServer
from tests.fakes import outbox_op, settings
from tests.test_an_flows import KEY, activity, event, flow, person

TARGET = "ghl:main"
TITLE = "Action Network summary"


def item(kind: str, key: str, at: str | None = None, **extra: Any) -> SummaryItem:
    return msgspec.convert({"kind": kind, "key": key, "at": at, **extra}, SummaryItem)


# ----------------------------------------------------------------- the digest


ITEMS = [
    item("petition", "s1", "2026-03-01T10:00:00Z", title="Clean Water Now"),
    item("petition", "s2", "2026-01-05T09:00:00Z", title="Older petition"),
    item("form", "f1", "2026-02-01T00:00:00Z", title="Volunteer sign-up"),
    item("event", "e1", "2026-02-10T18:00:00Z", title="Town hall", status="accepted"),
    item("event", "e2", "2026-02-20T18:00:00Z", title="Picnic", status="declined"),
    item("donation", "d1", "2026-03-02T12:00:00Z", amount="25.00", currency="usd", title="Spring"),
    item("donation", "d2", "2025-12-24T12:00:00Z", amount="10", currency="USD"),
    item("outreach", "o1", "2026-01-15T08:00:00Z", title="Fund the library"),
    item("ghl_message", "m1", "2026-03-03T16:30:00Z", title="Thanks,\nsee you there"),
]

EXPECTED = """\
Action Network summary
Petitions signed: 2, latest 2026-03-01 "Clean Water Now"
Forms submitted: 1, latest 2026-02-01 "Volunteer sign-up"
Events attended: 1, latest 2026-02-10 "Town hall"
Donations: 2, total 35.00 USD, last 2026-03-02 25.00 USD "Spring"
Outreaches: 1, latest 2026-01-15 "Fund the library"
Tags: donor, volunteer
Last GHL conversation activity: 2026-03-03 "Thanks, see you there"

[bridge:an-main:person:p1:summary]"""


def test_digest_counts_latest_and_totals() -> None:
    """Each kind shows its count and latest; declined RSVPs do not count; tags are sorted."""
    assert render(TITLE, ITEMS, ["volunteer", "donor"], contact_key=KEY) == EXPECTED


def test_digest_does_not_depend_on_order() -> None:
    """The same items and tags in any order give the same bytes."""
    shuffled = list(ITEMS)
    random.Random(5).shuffle(shuffled)
    assert render(TITLE, shuffled, ["donor", "volunteer", "donor"], contact_key=KEY) == EXPECTED


def test_empty_digest_says_none() -> None:
    """A person with nothing recorded gets zero counts, no tags and no GHL activity."""
    assert render("Summary", [], [], contact_key="k") == (
        "Summary\nPetitions signed: 0\nForms submitted: 0\nEvents attended: 0\nDonations: 0\n"
        "Outreaches: 0\nTags: none\nLast GHL conversation activity: none\n\n[bridge:k:summary]"
    )


def test_donations_sum_exactly_per_currency() -> None:
    """Amounts add up as decimals per currency; an unreadable amount is counted, not summed."""
    donations = [
        item("donation", "a", "2026-01-01T00:00:00Z", amount="0.10", currency="USD"),
        item("donation", "b", "2026-01-02T00:00:00Z", amount="0.20", currency="USD"),
        item("donation", "c", "2026-01-03T00:00:00Z", amount="5", currency="EUR"),
        item("donation", "d", "2026-01-04T00:00:00Z", amount="lots"),
    ]
    line = render("T", donations, [], contact_key="k").splitlines()[4]
    assert line == "Donations: 4, total 5.00 EUR + 0.30 USD, last 2026-01-04"


def test_latest_ties_break_by_key_and_long_titles_are_cut() -> None:
    """Two items of the same second always pick the same latest; a long title is shortened."""
    long = "x" * 200
    items = [item("petition", "b", "2026-01-01T00:00:00Z", title=long), item("petition", "a")]
    line = render("T", items, [], contact_key="k").splitlines()[1]
    assert line == f'Petitions signed: 2, latest 2026-01-01 "{"x" * 79}…"'


def test_summary_op_normalises_times_tags_and_email() -> None:
    """Times become UTC text (so the ledger compares them), tags a sorted set, e-mail lower."""
    op = summary_op(
        TARGET,
        KEY,
        [item("form", "f", "2026-03-01T12:00:00+02:00")],
        title=TITLE,
        tags=["b", "a", "b"],
        email=" Ada@Example.org ",
    )
    payload = decode_op(op.payload)
    assert isinstance(payload, UpdateSummary)
    assert payload.items[0].at == "2026-03-01T10:00:00Z"
    assert (payload.tags, payload.email) == (["a", "b"], "ada@example.org")
    assert (op.entity, op.source_key, op.kind) == (KEY, f"{KEY}:summary", "ghl.update_summary")


# ----------------------------------------------------------------- the flow


def summary_flow(**settings_: Any) -> Any:
    return flow(summary={"enabled": True, "title": TITLE, **settings_})


def test_summaries_are_off_unless_enabled() -> None:
    """Without the setting no summary op is written (it costs GHL calls and shows in GHL)."""
    ops = [*flow()(event("person", KEY, person())), *flow()(event("activity", "a", activity()))]
    assert "ghl.update_summary" not in [op.kind for op in ops]


def test_person_event_sends_tags_and_email_after_its_contact_ops() -> None:
    """A person's summary op follows the contact upsert and carries their tags and e-mail."""
    ops = summary_flow()(event("person", KEY, person()))
    kinds = [op.kind for op in ops]
    assert kinds.index("ghl.update_summary") > kinds.index("ghl.upsert_contact")
    (op,) = [o for o in ops if o.kind == "ghl.update_summary"]
    assert op.entity == KEY
    assert msgspec.json.decode(op.payload) == {
        "op": "ghl.update_summary",
        "person": KEY,
        "title": TITLE,
        "items": [],
        "tags": ["donor", "volunteer"],
        "email": "ada@example.org",
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"kind": "petition", "title": "Clean Water Now"}),
        (
            {"type": "donation", "amount": "25.00", "currency": "USD"},
            {"kind": "donation", "title": "Clean Water Now", "amount": "25.00", "currency": "USD"},
        ),
        (
            {"type": "attendance", "status": "accepted"},
            {"kind": "event", "title": "Clean Water Now", "status": "accepted"},
        ),
        ({"type": "submission", "action_title": None}, {"kind": "form"}),
        ({"type": "outreach"}, {"kind": "outreach", "title": "Clean Water Now"}),
    ],
)
def test_activity_adds_one_item_keyed_by_the_activity(
    changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    """An activity's summary op comes after its message and holds the activity as an item."""
    key = "an-main:signature:s1"
    message, summary = summary_flow()(event("activity", key, activity(**changes)))
    assert message.kind == "ghl.inbound_message"
    assert (summary.kind, summary.entity) == ("ghl.update_summary", KEY)
    body = msgspec.json.decode(summary.payload)
    assert body["items"] == [{"key": key, "at": "2026-03-01T10:00:00Z", **expected}]
    assert (body["tags"], body["email"]) == (None, None)  # kept as the ledger has them


def test_tags_event_updates_the_summary_tags() -> None:
    """A tag change found by the taggings scan reaches the summary too."""
    data = TagsData(person_key=KEY, person_id="p1", tags=["host"])
    ops = summary_flow()(event("tags", "an-main:tags:p1", data))
    assert msgspec.json.decode(ops[-1].payload)["tags"] == ["host"]
    # The event's content hash still lands on the tag sync, filed under the event's key.
    assert ops[0].source_key == "an-main:tags:p1"


@pytest.mark.parametrize("title", ["Two\nlines", "   "])
def test_summary_title_must_be_one_line(title: str) -> None:
    """A title that is not one line of text stops the start with the key path."""
    with pytest.raises(ConfigError) as caught:
        summary_flow(title=title)
    assert caught.value.path == "$.sources.action_network[name=an-main].summary.title"


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ('{ enabled = "yes" }', "$.sources.action_network[0].summary.enabled"),
        ('{ enabled = true, titel = "x" }', "$.sources.action_network[0].summary"),
        ('{ title = "" }', "$.sources.action_network[0].summary.title"),
    ],
)
def test_summary_setting_mistakes_name_their_key(tmp_path: Path, setting: str, path: str) -> None:
    """A wrong type, a misspelt key or an empty title in the file is a config error."""
    config = tmp_path / "bridge.toml"
    config.write_text(CONFIG + f"summary = {setting}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config, env={})
    assert caught.value.path == path


# ----------------------------------------------------------------- the GHL target


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


@pytest.fixture
async def contact(store: Store, ghl_client: GhlClient) -> str:
    """A GHL contact for the person, known in the id map as their upsert would leave it."""
    upserted = await ghl_client.upsert_contact(ContactUpsert(email="ada@example.org"))
    op = outbox_op(NewOp(target=TARGET, entity=KEY, kind="t", source_key=KEY, payload=b"{}"))
    update = IdMapUpdate(source_key=KEY, contact_id=upserted.contact.id)
    await store.complete(op, OpResult(updates=(update,)), now=0.0)
    return upserted.contact.id


def petition(n: int) -> SummaryItem:
    return item("petition", f"an-main:signature:{n}", f"2026-03-0{n}T10:00:00Z", title=f"P{n}")


def new_summary(*items: SummaryItem, tags: list[str] | None = None) -> NewOp:
    return summary_op(TARGET, KEY, items, title=TITLE, tags=tags, email="ada@example.org")


def note_writes(server: GhlServer, since: int) -> list[tuple[str, str]]:
    return [
        (e.method, e.route)
        for e in server.sim.journal.select(since=since)
        if e.method != "GET" and e.route.startswith("/contacts/{contactId}/notes")
    ]


async def test_note_is_created_once_then_edited_in_place(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """The first activity creates the note; the next edits the same note, never a second."""
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    mark = ghl_server.sim.journal.last_seq
    await target.send(outbox_op(new_summary(petition(1), tags=["donor"])))
    await target.send(outbox_op(new_summary(petition(2))))
    assert note_writes(ghl_server, mark) == [
        ("POST", "/contacts/{contactId}/notes"),
        ("PUT", "/contacts/{contactId}/notes/{id}"),
    ]
    (note,) = await ghl_client.list_notes(contact)
    state = await store.summary(KEY)
    assert state is not None
    assert note.id == state.note_id
    assert note.body == summary_text(state)
    assert "Petitions signed: 2" in note.body
    assert "Tags: donor" in note.body  # kept from the first op: the second said None


async def test_unchanged_digest_costs_no_call(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """An op that changes nothing the note says (a repeat, a new e-mail) makes no GHL call."""
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    await target.send(outbox_op(new_summary(petition(1))))
    mark = ghl_server.sim.journal.last_seq
    await target.send(outbox_op(new_summary(petition(1))))
    again = summary_op(TARGET, KEY, [], title=TITLE, email="ada.l@example.org")
    await target.send(outbox_op(again))
    assert ghl_server.sim.journal.select(since=mark) == []


async def test_person_without_activity_gets_no_note(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """Tags alone are recorded for later, but make no note: notes are for people who acted."""
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    mark = ghl_server.sim.journal.last_seq
    await target.send(outbox_op(new_summary(tags=["donor"])))
    assert ghl_server.sim.journal.select(since=mark) == []
    state = await store.summary(KEY)
    assert state is not None
    assert (state.tags, state.note_id) == (("donor",), None)


async def test_note_deleted_in_ghl_is_made_again(
    store: Store,
    ghl_client: GhlClient,
    ghl_server: GhlServer,
    contact: str,
    http_session: aiohttp.ClientSession,
) -> None:
    """When the known note answers 404 (someone deleted it), a new one is created."""
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    await target.send(outbox_op(new_summary(petition(1))))
    (note,) = await ghl_client.list_notes(contact)
    headers = {"Authorization": f"Bearer {ghl_server.token}", "Version": CONTACTS_VERSION}
    url = f"{ghl_server.base_url}/contacts/{contact}/notes/{note.id}"
    async with http_session.delete(url, headers=headers) as response:
        assert response.status == 200
    await target.send(outbox_op(new_summary(petition(2))))
    (again,) = await ghl_client.list_notes(contact)
    assert again.id != note.id
    assert "Petitions signed: 2" in (again.body or "")
    state = await store.summary(KEY)
    assert state is not None
    assert state.note_id == again.id


async def drain(store: Store, client: GhlClient, ops: list[NewOp]) -> Pipeline:
    """Put ops in the outbox and run the real pipeline until they are done."""
    await store.commit_page("test.people", None, ops, now=0.0)
    target = GhlTarget(client, store, clock=SystemClock())
    pipeline = Pipeline(store, [], {TARGET: target}, settings(), SystemClock(), random.Random(1))
    await pipeline.run(once=True)
    return pipeline


async def test_backfill_of_many_activities_writes_the_note_once(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """Queued summary ops of one person leave the write to the last: one POST, no PUTs."""
    mark = ghl_server.sim.journal.last_seq
    ops = [new_summary(tags=["donor"]), *(new_summary(petition(n)) for n in range(1, 6))]
    pipeline = await drain(store, ghl_client, ops)
    assert pipeline.summary.ops_sent == 6
    assert note_writes(ghl_server, mark) == [("POST", "/contacts/{contactId}/notes")]
    (note,) = await ghl_client.list_notes(contact)
    assert "Petitions signed: 5, latest 2026-03-05" in (note.body or "")


async def test_identical_last_op_does_not_swallow_the_write(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """An op followed by an identical one writes itself: the pipeline skips the identical one."""
    ops = [new_summary(petition(1)), new_summary(tags=["donor"]), new_summary(tags=["donor"])]
    pipeline = await drain(store, ghl_client, ops)
    assert pipeline.summary.ops_unchanged == 1
    (note,) = await ghl_client.list_notes(contact)
    assert "Petitions signed: 1" in (note.body or "")
    assert "Tags: donor" in (note.body or "")


async def test_lost_create_reply_is_reconciled_not_duplicated(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, contact: str
) -> None:
    """A create whose reply is lost is found by its marker, and no second note is made."""
    ghl_server.sim.faults.reset_next("/contacts/*/notes", 1, method="POST", after=True)
    pipeline = await drain(store, ghl_client, [new_summary(petition(1))])
    assert pipeline.summary.ops_reconciled == 1
    assert pipeline.summary.dead_lettered == 0
    (note,) = await ghl_client.list_notes(contact)
    assert marker(f"{KEY}:summary") in (note.body or "")
    state = await store.summary(KEY)
    assert state is not None
    assert state.note_id == note.id
    puts = ghl_server.sim.journal.count(method="PUT", route="/contacts/{contactId}/notes/{id}")
    assert puts == 0  # the note found already said the right thing


async def test_newest_ghl_message_wins_its_slot(
    store: Store, ghl_client: GhlClient, contact: str
) -> None:
    """Only the newest GHL message shows; one read late does not replace it."""
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    newer = item("ghl_message", "m2", "2026-03-05T10:00:00Z", title="Newer")
    older = item("ghl_message", "m1", "2026-03-04T10:00:00Z", title="Older")
    for op in (new_summary(petition(1), newer), new_summary(older)):
        await target.send(outbox_op(op))
    state = await store.summary(KEY)
    assert state is not None
    assert [i.key for i in state.items if i.kind == "ghl_message"] == ["m2"]
    assert 'Last GHL conversation activity: 2026-03-05 "Newer"' in summary_text(state)


# ----------------------------------------------------------------- bridge summarize

CONFIG = """\
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc-1"
auth = { kind = "private_token", token = "pit-test-token" }

[[sources.action_network]]
name = "an-main"
location = "main"
api_key = "an-test-key-123"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bridge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    yield path
    # main() configures structlog onto captured stdout; later tests must not write there.
    structlog.reset_defaults()
    clear_secrets()


async def seed_summary(path: Path) -> str:
    async with Store.open(path) as store:
        await store.record_summary(
            KEY,
            title=TITLE,
            items={i.key: i for i in ITEMS},
            tags=["volunteer", "donor"],
            email="ada@example.org",
            now=1.0,
        )
        state = await store.summary(KEY)
    assert state is not None
    return summary_text(state)


def test_summarize_prints_the_note_text(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge summarize` prints exactly what the note holds, found by e-mail in any case."""
    text = asyncio.run(seed_summary(config_file.parent / "state.db"))
    assert text == EXPECTED
    argv = ["--config", str(config_file), "summarize", "--contact", "ADA@example.org"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == EXPECTED + "\n"
    assert "is behind this text" in captured.err  # seeded, never written to GHL
    assert main([*argv, "--source", "an-main"]) == 0


def test_summarize_unknown_contact_exits_1(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An e-mail nobody has (or no state file at all) is exit 1 with the reason."""
    argv = ["--config", str(config_file), "summarize", "--contact", "nobody@example.org"]
    assert main(argv) == 1
    assert "no state yet" in capsys.readouterr().err
    asyncio.run(seed_summary(config_file.parent / "state.db"))
    assert main(argv) == 1
    assert "no summary for nobody@example.org" in capsys.readouterr().err


def test_summarize_bad_arguments_are_usage_errors(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed e-mail or an unknown source is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(config_file), "summarize", "--contact", "not-an-email"])
    assert caught.value.code == EX_USAGE
    assert "expected an e-mail address" in capsys.readouterr().err
    argv = ["--config", str(config_file), "summarize", "--contact", "a@b.org", "--source", "x"]
    assert main(argv) == EX_USAGE
    assert "no Action Network source named 'x' (known: an-main)" in capsys.readouterr().err
