"""The reverse direction: reading a GHL location back, and what its messages become.

The stream runs against the GHL simulator; the flow and the Action Network mirror target
are checked with plain values and a recording client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bridge.clock import SystemClock
from bridge.config import (
    ActionNetworkSource,
    ActiveDemandSource,
    AdHistorySettings,
    AnMirror,
    GhlLocation,
    PrivateTokenAuth,
    ReverseSettings,
    SummarySettings,
)
from bridge.connectors.an_models import EmailAddress, Person
from bridge.connectors.an_target import (
    AnWriteBackTarget,
    MirrorFields,
    MirrorTags,
    mirror_fields_op,
    mirror_tags_op,
)
from bridge.connectors.ghl import models
from bridge.connectors.ghl.client import GhlClient
from bridge.connectors.ghl.ops import UpdateSummary
from bridge.connectors.ghl.reverse import GhlMessagesStream, ReplyData, ReverseCursor
from bridge.errors import MissingScope, Rejected
from bridge.flows.reverse import ReverseFlow
from bridge.models import Page, SourceEvent
from bridge.ratelimit import ShareOf, TokenBucket
from bridge.secrets import Secret
from bridge.store import Store
from bridge.streams import make_event
from tests.conftest import GhlServer, InstantClock
from tests.fakes import outbox_op

PERSON = "an-main:person:p1"
AD_CONTACT = "ad-main:contact:42"


class Lookup:
    """The store's answers, as plain dicts."""

    def __init__(self, links: Mapping[str, list[str]], known: set[str] | None = None) -> None:
        self.links = dict(links)
        self.known = known or set()

    async def known_message_ids(self, message_ids: Sequence[str]) -> set[str]:
        return self.known & set(message_ids)

    async def contact_links(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:
        return {c: self.links[c] for c in contact_ids if c in self.links}


async def contact_with_conversation(client: GhlClient, email: str) -> tuple[str, str]:
    made = await client.upsert_contact(models.ContactUpsert(email=email))
    conversation = await client.create_conversation(made.contact.id)
    return made.contact.id, conversation.id


async def inbound(client: GhlClient, contact: str, conversation: str, alt_id: str) -> str:
    message = models.InboundMessage(
        type="SMS", conversation_id=conversation, contact_id=contact, alt_id=alt_id, message="hi"
    )
    return (await client.add_inbound_message(message)).message_id


def stream(client: GhlClient, lookup: Lookup, **settings: Any) -> GhlMessagesStream:
    return GhlMessagesStream(
        client,
        lookup,
        location="main",
        settings=ReverseSettings(**{"lookback": 3600.0, "page_size": 10, **settings}),
        own_prefixes=["an-main", "ad-main"],
        clock=SystemClock(),
    )


async def poll(s: GhlMessagesStream, cursor: str | None) -> tuple[list[SourceEvent], str | None]:
    events: list[SourceEvent] = []
    pages: list[Page] = [page async for page in s.pages(cursor)]
    for page in pages:
        events += page.events
        cursor = page.cursor or cursor
    return events, cursor


def replies(events: Sequence[SourceEvent]) -> list[ReplyData]:
    return [msgspec.json.decode(e.data, type=ReplyData) for e in events]


async def test_only_other_peoples_messages_to_linked_contacts_become_events(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    contact, conversation = await contact_with_conversation(ghl_client, "a@example.org")
    stranger, strangers = await contact_with_conversation(ghl_client, "b@example.org")
    await inbound(ghl_client, contact, conversation, "an-main:activity:1")  # ours, by altId
    mapped = await inbound(ghl_client, contact, conversation, "other-system:9")
    reply = ghl_server.sim.add_reply(conversation, "See you Sunday", user_id="u1")
    ghl_server.sim.add_reply(strangers, "Not linked to any source")
    lookup = Lookup({contact: [PERSON]}, known={mapped})  # ours, by the id map
    events, cursor = await poll(stream(ghl_client, lookup), None)
    (only,) = replies(events)
    assert (only.id, only.body, only.direction, only.links) == (
        reply["id"],
        "See you Sunday",
        "outbound",
        [PERSON],
    )
    assert events[0].key == f"main:ghl:message:{reply['id']}"
    assert cursor is not None
    assert msgspec.json.decode(cursor, type=ReverseCursor).mode == "export"
    del stranger


async def test_a_status_change_is_a_new_event_and_an_unchanged_message_is_not(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    contact, conversation = await contact_with_conversation(ghl_client, "a@example.org")
    reply = ghl_server.sim.add_reply(conversation, "Hello")
    s = stream(ghl_client, Lookup({contact: [PERSON]}))
    first, cursor = await poll(s, None)
    again, cursor = await poll(s, cursor)
    # The last page is read again (the export has no cursor past its end), same content.
    assert [e.content_hash for e in again] == [e.content_hash for e in first]
    await asyncio.sleep(0.002)
    ghl_server.sim.set_message_status(reply["id"], "read")
    changed, _ = await poll(s, cursor)
    assert [r.status for r in replies(changed)] == ["read"]
    assert changed[-1].content_hash != first[0].content_hash


async def test_export_pages_move_the_cursor_and_nothing_is_read_twice(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    contact, conversation = await contact_with_conversation(ghl_client, "a@example.org")
    for n in range(25):
        ghl_server.sim.add_reply(conversation, f"reply {n}")
    s = stream(ghl_client, Lookup({contact: [PERSON]}), email=False)
    pages = [page async for page in s.pages(None)]
    assert [len(p.events) for p in pages] == [10, 10, 5]
    bodies = [r.body for p in pages for r in replies(p.events)]
    assert bodies == [f"reply {n}" for n in range(25)]
    ghl_server.sim.add_reply(conversation, "reply 25")
    later, _ = await poll(s, pages[-1].cursor)
    # Only the last page again (5) plus the new one: not the whole history.
    assert [r.body for r in replies(later)] == [f"reply {n}" for n in range(20, 26)]


async def test_the_first_poll_starts_now_without_a_lookback(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    contact, conversation = await contact_with_conversation(ghl_client, "a@example.org")
    ghl_server.sim.add_reply(conversation, "before the bridge")
    await asyncio.sleep(0.01)
    s = stream(ghl_client, Lookup({contact: [PERSON]}), lookback=0.0)
    events, cursor = await poll(s, None)
    assert events == []
    ghl_server.sim.add_reply(conversation, "after")
    events, _ = await poll(s, cursor)
    assert [r.body for r in replies(events)] == ["after"]


async def test_without_export_the_stream_falls_back_to_search(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    contact, conversation = await contact_with_conversation(ghl_client, "a@example.org")
    ghl_server.sim.export_denied = True
    ghl_server.sim.add_reply(conversation, "via search")
    s = stream(ghl_client, Lookup({contact: [PERSON]}), overlap=0.0)
    events, cursor = await poll(s, None)
    assert [r.body for r in replies(events)] == ["via search"]
    assert cursor is not None
    state = msgspec.json.decode(cursor, type=ReverseCursor)
    assert state.mode == "search"
    assert state.export_retry_at > 0
    # Next poll: search again (no export call), and only what is new.
    calls = ghl_server.sim.journal.count(route="/conversations/messages/export")
    ghl_server.sim.add_reply(conversation, "second")
    events, _ = await poll(s, cursor)
    assert [r.body for r in replies(events)] == ["second"]
    assert ghl_server.sim.journal.count(route="/conversations/messages/export") == calls


async def test_export_only_mode_reports_the_missing_scope(
    ghl_server: GhlServer, ghl_client: GhlClient
) -> None:
    ghl_server.sim.export_denied = True
    with pytest.raises(MissingScope):
        await poll(stream(ghl_client, Lookup({}), mode="export"), None)


# ----------------------------------------------------------------- the flow


LOCATION = GhlLocation(
    name="main",
    location_id="loc1",
    auth=PrivateTokenAuth(token=Secret("t")),
    app_url="https://app.example.com/",
)


def an_source(**mirror: Any) -> ActionNetworkSource:
    return ActionNetworkSource(
        name="an-main", location="main", api_key=Secret("k"), mirror=AnMirror(**mirror)
    )


def ad_source(**history: Any) -> ActiveDemandSource:
    return ActiveDemandSource(
        name="ad-main",
        location="main",
        api_key=Secret("k"),
        history=AdHistorySettings(**history),
    )


def reply_event(**fields: Any) -> SourceEvent:
    data = ReplyData(
        **{
            "id": "m1",
            "location": "main",
            "location_id": "loc1",
            "conversation_id": "conv1",
            "contact_id": "c1",
            "direction": "outbound",
            "status": "delivered",
            "type": "TYPE_SMS",
            "body": "Thanks!",
            "date": "2026-11-21T10:00:00.000Z",
            "links": [PERSON, AD_CONTACT],
            **fields,
        }
    )
    return make_event("main.messages", "main:ghl:message:m1", "ghl_message", data)


def reverse(an: ActionNetworkSource, ad: ActiveDemandSource) -> ReverseFlow:
    return ReverseFlow(
        LOCATION,
        ghl_target="ghl:main",
        action_network={an.name: (an, "an:an-main")},
        activedemand={ad.name: (ad, "ad:ad-main")},
    )


def test_a_reply_fills_fields_and_tags_and_writes_history_with_its_status() -> None:
    flow = reverse(
        an_source(
            fields={"last": "{body} ({status})", "link": "{conversation_url}"}, add_tags=["r"]
        ),
        ad_source(),
    )
    ops = flow(reply_event())
    assert [(op.target, op.kind, op.entity) for op in ops] == [
        ("an:an-main", "an.mirror_fields", PERSON),
        ("an:an-main", "an.mirror_tags", PERSON),
        ("ad:ad-main", "ad.add_history", AD_CONTACT),
        ("ad:ad-main", "ad.add_history", AD_CONTACT),
    ]
    fields = msgspec.json.decode(ops[0].payload, type=MirrorFields)
    assert fields.person_id == "p1"
    assert fields.fields == {
        "last": "Thanks! (delivered)",
        "link": "https://app.example.com/v2/location/loc1/conversations/conversations/conv1",
    }
    assert [op.source_key for op in ops[2:]] == [
        "main:ghl:message:m1:ad-main:reply",
        "main:ghl:message:m1:ad-main:status:delivered",
    ]


def test_inbound_messages_and_unwanted_statuses_are_not_mirrored_by_default() -> None:
    flow = reverse(an_source(fields={"f": "{body}"}), ad_source())
    assert list(flow(reply_event(direction="inbound"))) == []
    ops = flow(reply_event(status="pending"))
    assert [op.kind for op in ops] == ["an.mirror_fields", "ad.add_history"]


def test_with_summaries_every_direction_updates_the_last_conversation_activity() -> None:
    source = ActionNetworkSource(
        name="an-main",
        location="main",
        api_key=Secret("k"),
        summary=SummarySettings(enabled=True, title="AN summary"),
    )
    flow = reverse(source, ad_source(via="none"))
    assert flow.active  # a summary is reason enough to read GHL back
    (op,) = flow(reply_event(direction="inbound", body="Can I help?"))
    summary = msgspec.json.decode(op.payload, type=UpdateSummary)
    assert (op.target, op.kind, op.entity) == ("ghl:main", "ghl.update_summary", PERSON)
    (item,) = summary.items
    assert (item.kind, item.title, item.at) == (
        "ghl_message",
        "inbound: Can I help?",
        "2026-11-21T10:00:00Z",
    )


def test_sources_that_mirror_nothing_have_no_reverse_stream() -> None:
    assert not reverse(an_source(), ad_source(via="none")).active
    assert reverse(an_source(add_tags=["x"]), ad_source(via="none")).active
    assert reverse(an_source(), ad_source()).active  # ActiveDEMAND mirrors by default


def test_an_unreadable_event_is_rejected() -> None:
    flow = reverse(an_source(fields={"f": "{body}"}), ad_source())
    bad = SourceEvent(
        stream="main.messages", key="k", kind="ghl_message", data=b"{}", content_hash="h"
    )
    with pytest.raises(Rejected, match="unreadable GHL message"):
        flow(bad)


# ----------------------------------------------------------------- Action Network mirror target


class RecordingClient:
    def __init__(self, email: str | None = "a@example.org") -> None:
        self.email = email
        self.puts: list[tuple[str, dict[str, str]]] = []
        self.tags: list[tuple[str, list[str], list[str]]] = []
        self.created: list[str] = []
        self.scans = 0

    async def update_person(self, person_id: str, custom_fields: Mapping[str, str]) -> None:
        self.puts.append((person_id, dict(custom_fields)))

    async def person(self, person_id: str) -> Person:
        return Person(email_addresses=[EmailAddress(address=self.email)] if self.email else [])

    async def change_tags(self, email: str, add: Sequence[str], remove: Sequence[str]) -> None:
        self.tags.append((email, list(add), list(remove)))

    async def tag_names(self) -> dict[str, str]:
        self.scans += 1
        return {"t1": "waiting"} | {f"n{i}": name for i, name in enumerate(self.created)}

    async def create_tag(self, name: str) -> None:
        self.created.append(name)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


async def send_fields(target: AnWriteBackTarget, store: Store, at: str, mid: str) -> None:
    write = MirrorFields(person=PERSON, person_id="p1", message_id=mid, at=at, fields={"f": mid})
    op = outbox_op(mirror_fields_op("an:an-main", write))
    await store.complete(op, await target.send(op), now=1.0)


async def test_the_newest_message_wins_whatever_order_the_ops_come_in(store: Store) -> None:
    client = RecordingClient()
    target = AnWriteBackTarget(client, store)  # type: ignore[arg-type]  # a recording fake
    await send_fields(target, store, "2026-11-21T10:00:00.000Z", "older")
    await send_fields(target, store, "2026-11-21T11:00:00.000Z", "newer")
    await send_fields(target, store, "2026-11-21T10:00:00.000Z", "older")  # a late status
    await send_fields(target, store, "2026-11-21T11:00:00.000Z", "newer")  # its own status
    assert [fields["f"] for _, fields in client.puts] == ["older", "newer", "newer"]


async def test_tags_go_through_the_signup_helper_by_email(store: Store) -> None:
    client = RecordingClient()
    target = AnWriteBackTarget(client, store)  # type: ignore[arg-type]
    tags = MirrorTags(person=PERSON, person_id="p1", add=["replied"], remove=["waiting"])
    await target.send(outbox_op(mirror_tags_op("an:an-main", tags)))
    assert client.tags == [("a@example.org", ["replied"], ["waiting"])]
    # The helper skips names that are not tags yet: the missing one was created, once.
    assert client.created == ["replied"]
    await target.send(outbox_op(mirror_tags_op("an:an-main", tags)))
    assert (client.created, client.scans) == (["replied"], 1)
    no_email = AnWriteBackTarget(RecordingClient(email=None), store)  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="no e-mail"):
        await no_email.send(outbox_op(mirror_tags_op("an:an-main", tags)))


# ----------------------------------------------------------------- budget share


async def test_a_share_caps_its_requests_and_spends_the_parents_budget() -> None:
    clock = InstantClock()
    parent = TokenBucket("ghl", "main", capacity=10, window=10.0, clock=clock)
    share = ShareOf(parent, fraction=0.2, clock=clock)
    assert share.state().capacity == 2
    await share.acquire()
    await share.acquire()
    assert parent.state().available == 8
    assert share.state().available == 0
    share.pause_until(clock.monotonic() + 5)  # a 429 seen by the reader pauses the location
    assert parent.state().paused_until is not None
