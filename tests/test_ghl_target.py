"""The GHL target through the real pipeline and simulator: ids, ordering, reconciliation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from bridge.clock import SystemClock
from bridge.connectors.ghl import models
from bridge.connectors.ghl.client import GhlClient
from bridge.connectors.ghl.models import ContactUpsert
from bridge.connectors.ghl.ops import (
    AddNote,
    AddTask,
    AssignContact,
    ChangeTags,
    EnsureConversation,
    GhlOp,
    InboundMessage,
    SyncTags,
    UpdateConversation,
    UpdateMessageStatus,
    UploadAttachment,
    UpsertContact,
    new_op,
)
from bridge.connectors.ghl.target import GhlTarget
from bridge.models import IdMapUpdate, NewOp, OpResult, Page, SourceEvent, content_hash, marker
from bridge.pipeline import Pipeline
from bridge.sim.common import FaultRule, serve
from bridge.store import Store
from tests.conftest import GhlServer
from tests.fakes import outbox_op, settings

TARGET = "ghl:main"


class ScriptedStream:
    """One page per call of ``pages``: each event carries the ops it maps to."""

    name = "test.people"
    poll_interval = 0.05

    def __init__(self, events: Sequence[tuple[str, Sequence[tuple[GhlOp, str | None]]]]) -> None:
        self.events = list(events)

    async def pages(self, cursor: str | None) -> AsyncIterator[Page]:
        batch = [
            SourceEvent(
                stream=self.name,
                key=key,
                kind="person",
                data=msgspec.json.encode(
                    [[msgspec.json.encode(op).decode(), sk] for op, sk in ops]
                ),
                content_hash=content_hash(msgspec.json.encode([key, len(ops), repr(ops)])),
            )
            for key, ops in self.events
        ]
        yield Page(events=batch, cursor=str(len(batch)))

    def transform(self, event: SourceEvent) -> list[NewOp]:
        from bridge.connectors.ghl.ops import decode_op

        rows = msgspec.json.decode(event.data, type=list[tuple[str, str | None]])
        return [new_op(TARGET, decode_op(raw.encode()), source_key=sk) for raw, sk in rows]


def person_ops(n: int, *, messages: int = 2) -> tuple[str, list[tuple[GhlOp, str | None]]]:
    person = f"an:person:{n}"
    ops: list[tuple[GhlOp, str | None]] = [
        (
            UpsertContact(
                person=person, fields=ContactUpsert(first_name=f"P{n}", email=f"p{n}@example.org")
            ),
            None,
        ),
        (EnsureConversation(person=person), None),
    ]
    ops += [
        (
            InboundMessage(
                person=person, message=f"Signed petition {i}", date="2026-03-01T10:00:00Z"
            ),
            f"an:sub:{n}:{i}",
        )
        for i in range(messages)
    ]
    return person, ops


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


async def run(store: Store, client: GhlClient, stream: ScriptedStream) -> Pipeline:
    target = GhlTarget(client, store, clock=SystemClock())
    pipeline = Pipeline(
        store, [stream], {TARGET: target}, settings(max_attempts=6), SystemClock(), random.Random(3)
    )
    await asyncio.wait_for(pipeline.run(once=True), 60)
    return pipeline


async def test_people_become_contacts_conversations_and_inbound_messages(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Each person is one contact with one conversation; each activity one inbound message."""
    pipeline = await run(store, ghl_client, ScriptedStream([person_ops(n) for n in range(5)]))
    assert pipeline.summary.ops_sent == 20
    sim = ghl_server.sim
    assert len(sim.contacts(ghl_server.location_id)) == 5
    assert len(sim.conversations(ghl_server.location_id)) == 5
    messages = sim.messages(location_id=ghl_server.location_id)
    assert len(messages) == 10
    assert {m["direction"] for m in messages} == {"inbound"}
    assert sim.messages_by_alt_id() == {f"an:sub:{n}:{i}": 1 for n in range(5) for i in range(2)}
    assert sim.sent_outbound == []  # never the send endpoint, which would text the person
    row = await store.id_map("an:person:3")
    assert row is not None
    assert row.contact_id is not None
    assert row.conversation_id is not None
    sub = await store.id_map("an:sub:3:1")
    assert sub is not None
    assert sub.message_id is not None


async def test_replayed_ops_do_not_duplicate(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Ops queued again for delivered records (a replay) create nothing new in GHL."""
    await run(store, ghl_client, ScriptedStream([person_ops(1)]))
    person, ops = person_ops(1)
    again = ScriptedStream([(person, [*ops, (AddNote(person=person, body="hello"), "an:note:1")])])
    again.name = "test.again"  # a different stream, so the content hashes do not skip it
    await run(store, ghl_client, again)
    sim = ghl_server.sim
    assert len(sim.contacts(ghl_server.location_id)) == 1
    assert len(sim.conversations(ghl_server.location_id)) == 1
    assert sim.messages_by_alt_id() == {"an:sub:1:0": 1, "an:sub:1:1": 1}


@pytest.mark.parametrize(
    "route",
    [
        "/conversations/messages/inbound",
        "/conversations/",
        "/contacts/*/notes",
        "/contacts/*/tasks",
    ],
)
async def test_lost_response_is_reconciled_not_duplicated(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, route: str
) -> None:
    """A write that lands but whose reply is lost is found again, not written twice."""
    person, ops = person_ops(7, messages=1)
    ops += [
        (AddNote(person=person, body="Joined via petition"), "an:note:7"),
        (AddTask(person=person, title="Call back", due="2026-04-01T09:00:00Z"), "an:task:7"),
    ]
    ghl_server.sim.faults.reset_next(route, 1, method="POST", after=True)
    pipeline = await run(store, ghl_client, ScriptedStream([(person, ops)]))
    assert pipeline.summary.ops_reconciled == 1
    assert pipeline.summary.dead_lettered == 0
    sim = ghl_server.sim
    contact_id = sim.contacts(ghl_server.location_id)[0]["id"]
    assert len(sim.conversations(ghl_server.location_id)) == 1
    assert sim.messages_by_alt_id() == {"an:sub:7:0": 1}
    assert len(await ghl_client.list_notes(contact_id)) == 1
    tasks = await ghl_client.list_tasks(contact_id)
    assert len(tasks) == 1
    assert marker("an:task:7") in (tasks[0].body or "")


async def test_tags_and_conversation_status(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Tag changes add and remove without replacing, and conversation status is updated."""
    person, ops = person_ops(2, messages=0)
    ops += [
        (ChangeTags(person=person, add=["volunteer", "donor"]), None),
        (ChangeTags(person=person, remove=["donor"]), None),
        (UpdateConversation(person=person, unread_count=1, starred=True), None),
    ]
    await run(store, ghl_client, ScriptedStream([(person, ops)]))
    contact = ghl_server.sim.contacts(ghl_server.location_id)[0]
    assert contact["tags"] == ["volunteer"]
    (conversation,) = ghl_server.sim.conversations(ghl_server.location_id)
    assert conversation["starred"] is True
    assert conversation["unreadCount"] == 1


async def test_record_ghl_answers_with_500_is_dead_lettered_while_others_flow(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A record that keeps getting 500 while other calls succeed is dead-lettered early."""
    person, ops = person_ops(3, messages=0)
    ops.append((AddNote(person=person, body="x"), "an:note:3"))
    others = [person_ops(n, messages=1) for n in range(10, 14)]
    ghl_server.sim.faults.add(FaultRule(route="/contacts/*/notes", method="POST", status=500))
    pipeline = await run(store, ghl_client, ScriptedStream([(person, ops), *others]))
    (dl,) = await store.dead_letters()
    assert dl.kind == "ghl.add_note"
    assert "treating it as bad input" in dl.error
    assert dl.attempts < settings(max_attempts=6).max_attempts
    assert pipeline.summary.ops_sent == 2 + 4 * 3


async def test_outage_is_retried_not_blamed_on_records(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """When every call fails with 5xx, ops are retried until max_attempts, not rejected early."""
    ghl_server.sim.faults.add(FaultRule(route="*", status=502))
    await run(store, ghl_client, ScriptedStream([person_ops(4, messages=0)]))
    letters = {dl.kind: dl.error for dl in await store.dead_letters()}
    assert letters["ghl.upsert_contact"].startswith("gave up after 6 attempts")
    # Its conversation op cannot run without the contact and says so.
    assert letters["ghl.ensure_conversation"].startswith("no GHL contact for an:person:4")


async def test_message_for_a_person_without_contact_is_rejected(
    store: Store, ghl_client: GhlClient
) -> None:
    """A message whose person never became a contact is dead-lettered with the reason."""
    orphan = ("an:person:9", [(InboundMessage(person="an:person:9", message="hi"), "an:sub:9")])
    await run(store, ghl_client, ScriptedStream([orphan]))
    (dl,) = await store.dead_letters()
    assert dl.error.startswith("no GHL contact for an:person:9")


async def test_tag_sync_adds_new_and_removes_only_its_own(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A tag sync diffs against what it set before; tags added in GHL are left alone."""
    person, ops = person_ops(4, messages=0)
    await run(
        store,
        ghl_client,
        ScriptedStream([(person, [*ops, (SyncTags(person=person, tags=["a", "b"]), None)])]),
    )
    contact_id = ghl_server.sim.contacts(ghl_server.location_id)[0]["id"]
    ghl_server.sim.tag_contact(contact_id, ["from-ghl"])
    mark = ghl_server.sim.journal.last_seq
    stream = ScriptedStream([(person + "#2", [(SyncTags(person=person, tags=["b", "c"]), person)])])
    await run(store, ghl_client, stream)
    contact = ghl_server.sim.contacts(ghl_server.location_id)[0]
    assert sorted(contact["tags"]) == ["b", "c", "from-ghl"]
    calls = [(e.method, e.route) for e in ghl_server.sim.journal.select(since=mark)]
    assert calls == [
        ("POST", "/contacts/{contactId}/tags"),
        ("DELETE", "/contacts/{contactId}/tags"),
    ]
    row = await store.id_map(person)
    assert row is not None
    assert row.tags == ("b", "c")


async def test_rule_task_and_note_are_made_once_per_key(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A task or note keyed by a rule firing is made once, even if its text changes later."""
    person, ops = person_ops(5, messages=0)
    task = AddTask(person=person, title="Call back", due_in=3600.0)
    note = AddNote(person=person, body="Asked for a call")
    await run(
        store,
        ghl_client,
        ScriptedStream(
            [(person, [*ops, (task, f"{person}:rule:r:task"), (note, f"{person}:rule:r:note")])]
        ),
    )
    later = ScriptedStream(
        [
            (
                person + "#again",
                [
                    (
                        AddTask(person=person, title="Call back NOW", due_in=60.0),
                        f"{person}:rule:r:task",
                    ),
                    (AddNote(person=person, body="Edited rule text"), f"{person}:rule:r:note"),
                ],
            )
        ]
    )
    await run(store, ghl_client, later)
    assert [t["title"] for t in ghl_server.sim.all_tasks()] == ["Call back"]
    assert len(ghl_server.sim.all_notes()) == 1


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8ffff3f0005fe02fea7d6a4c50000000049454e44ae426082"
)


@pytest.fixture
async def files() -> AsyncIterator[str]:
    """A source file host: what a source's attachment URLs point at."""

    async def serve_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = PNG if name.endswith(".png") else b"MZ" + bytes(64)
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/files/{name}", serve_file)
    async with serve(app) as url:
        yield url


async def test_media_is_uploaded_and_a_refused_file_does_not_block_the_text(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer, files: str
) -> None:
    person, ops = person_ops(6, messages=0)
    image = UploadAttachment(person=person, url=f"{files}/files/flyer.png", file_name="flyer.png")
    program = UploadAttachment(
        person=person, url=f"{files}/files/invoice.exe", file_name="invoice.exe", size=66
    )
    message = InboundMessage(
        person=person, message="See attached", attachment_keys=["m1:att:0", "m1:att:1"]
    )
    stream = ScriptedStream(
        [(person, [*ops, (image, "m1:att:0"), (program, "m1:att:1"), (message, "m1")])]
    )
    pipeline = await run(store, ghl_client, stream)
    assert pipeline.summary.dead_lettered == 1
    (letter,) = await store.dead_letters(limit=5)
    assert letter.source_key == "m1:att:1"
    assert "type .exe, which GHL does not accept" in letter.error
    (delivered,) = ghl_server.sim.messages(location_id=ghl_server.location_id)
    assert delivered["body"] == "See attached"
    assert len(delivered["attachments"]) == 1
    uploads = ghl_server.sim.journal.count(method="POST", route="/conversations/messages/upload")
    assert uploads == 1  # the refused file cost no GHL call
    assert not list((store.path.parent / "media").iterdir())  # nothing left on disk


async def test_delivery_status_is_mirrored_to_the_message(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    person, ops = person_ops(7, messages=1)
    status = UpdateMessageStatus(person=person, message_key="an:sub:7:0", status="read")
    await run(store, ghl_client, ScriptedStream([(person, [*ops, (status, "an:sub:7:0:status")])]))
    (message,) = ghl_server.sim.messages(location_id=ghl_server.location_id)
    assert message["status"] == "read"


async def test_status_refused_right_after_a_send_is_retried_not_dead_lettered(
    store: Store,
    ghl_client: GhlClient,
    ghl_server: GhlServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GHL answers 403 "No conversation provider found" for ~10 s after a send
    # (API_FACTS §8); the op must wait and try again, never land in the dead letters.
    monkeypatch.setattr("bridge.rest._PROVIDER_RACE_DELAY", 0.3)
    ghl_server.sim.status_403_window = 0.5
    person, ops = person_ops(8, messages=0)
    await run(store, ghl_client, ScriptedStream([(person, ops)]))
    known = await store.id_map(person)
    assert known is not None
    assert known.contact_id is not None
    sent = await ghl_client.send_message(
        models.SendMessage(type="SMS", contact_id=known.contact_id, message="Thanks!")
    )
    key = "ad-main:message:sent-1"
    await store.complete(
        outbox_op(NewOp(target=TARGET, entity=key, kind="test", source_key=key, payload=b"{}")),
        OpResult(updates=(IdMapUpdate(source_key=key, message_id=sent.message_id),)),
        now=0.0,
    )
    status = UpdateMessageStatus(person=person, message_key=key, status="delivered")
    stream = ScriptedStream([("status-event", [(status, f"{key}:status")])])
    pipeline = await run(store, ghl_client, stream)
    assert pipeline.summary.ops_retried >= 1
    assert pipeline.summary.dead_lettered == 0
    (message,) = [m for m in ghl_server.sim.messages() if m["id"] == sent.message_id]
    assert message["status"] == "delivered"


async def test_assign_contact_sets_the_owner(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    person, ops = person_ops(9, messages=0)
    assign = AssignContact(person=person, user_id="user-organiser-1")
    await run(store, ghl_client, ScriptedStream([(person, [*ops, (assign, f"{person}:assign")])]))
    (contact,) = [c for c in ghl_server.sim.contacts() if c["email"] == "p9@example.org"]
    assert contact["assignedTo"] == "user-organiser-1"


async def test_a_changed_person_updates_its_contact_by_id_even_with_a_new_email(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Upsert matches on e-mail, so a mapped contact is updated by its id instead."""
    await run(store, ghl_client, ScriptedStream([person_ops(5, messages=0)]))
    person = "an:person:5"
    moved = UpsertContact(person=person, fields=ContactUpsert(email="new5@example.org"))
    again = ScriptedStream([(person, [(moved, None)])])
    again.name = "test.again"
    await run(store, ghl_client, again)
    (contact,) = ghl_server.sim.contacts(ghl_server.location_id)
    assert contact["email"] == "new5@example.org"
    assert contact["firstName"] == "P5"


async def test_a_contact_deleted_in_ghl_is_made_again(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """When the mapped contact is gone (404), the upsert makes a new one and maps it."""
    await run(store, ghl_client, ScriptedStream([person_ops(6, messages=0)]))
    sim = ghl_server.sim
    (old,) = sim.contacts(ghl_server.location_id)
    token = sim._tokens[ghl_server.token]
    sim.delete_contact(token, old["id"])
    person = "an:person:6"
    upsert = UpsertContact(person=person, fields=ContactUpsert(email="p6@example.org"))
    again = ScriptedStream([(person, [(upsert, None)])])
    again.name = "test.again"
    pipeline = await run(store, ghl_client, again)
    assert pipeline.summary.dead_lettered == 0
    (new,) = sim.contacts(ghl_server.location_id)
    assert new["id"] != old["id"]
    row = await store.id_map(person)
    assert row is not None
    assert row.contact_id == new["id"]


async def test_one_message_key_under_two_people_is_sent_once(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """Two ops of one message key, of two entities sent at once, make one GHL message."""
    first, first_ops = person_ops(1, messages=0)
    second, second_ops = person_ops(2, messages=0)
    shared = "an:sub:shared"
    first_ops.append((InboundMessage(person=first, message="one"), shared))
    second_ops.append((InboundMessage(person=second, message="one"), shared))
    await run(store, ghl_client, ScriptedStream([(first, first_ops), (second, second_ops)]))
    assert ghl_server.sim.messages_by_alt_id() == {shared: 1}


async def test_a_replayed_op_that_had_landed_is_reconciled_not_sent_twice(
    store: Store, ghl_client: GhlClient, ghl_server: GhlServer
) -> None:
    """A message taken for bad input after its write landed is found again on replay."""
    route = "/conversations/messages/inbound"
    ghl_server.sim.faults.add(FaultRule(route=route, method="POST", status=500, times=2))
    ghl_server.sim.faults.add(
        FaultRule(route=route, method="POST", status=502, after=True, times=1)
    )
    await run(store, ghl_client, ScriptedStream([person_ops(8, messages=1)]))
    (dl,) = await store.dead_letters()
    assert "treating it as bad input" in dl.error
    assert ghl_server.sim.messages_by_alt_id() == {"an:sub:8:0": 1}  # it landed all the same
    stream = ScriptedStream([])
    target = GhlTarget(ghl_client, store, clock=SystemClock())
    pipeline = Pipeline(store, [stream], {TARGET: target}, settings(), SystemClock())
    await pipeline.replay(dl)
    await asyncio.wait_for(pipeline.run(once=True), 60)
    assert pipeline.summary.ops_reconciled == 1
    assert await store.dead_letters() == []
    assert ghl_server.sim.messages_by_alt_id() == {"an:sub:8:0": 1}
