"""End to end: `bridge backfill` and `bridge once` against the ActiveDEMAND and GHL sims.

One seeded account (texts, three messages with files, recorded and transcribed calls, a
missed call) is backfilled once for the module by a real `bridge` process; each test
then checks what landed, or changes something in ActiveDEMAND and counts what the next
`bridge once` did, in both simulators.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bridge.demo import AD_SOURCE, World, ghl_writes, sim_world
from bridge.sim.activedemand_state import default_recording
from tests.test_an_e2e import bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONTACTS = 10
TRANSCRIPT = (("agent", "Thanks for calling back."), ("contact", "Happy to canvass on Sunday."))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    directory: Path = tmp_path_factory.mktemp("ad-e2e")
    async with sim_world(directory, people=CONTACTS, action_network=False) as made:
        # Exit 1: the run dead-lettered records (the two refused files), as it reports.
        assert await bridge(made, "backfill", AD_SOURCE, "--since", "2000-01-01") == 1
        yield made


def key(world: World) -> str:
    return world.ad_seeded.key


def ad_messages(world: World) -> dict[int, Any]:
    return dict(world.ad._account(key(world)).messages)


def ghl_message(world: World, message_id: int) -> dict[str, Any]:
    alt = f"{AD_SOURCE}:message:{message_id}"
    (found,) = [m for m in world.ghl.messages() if m.get("altId") == alt]
    return found


def ad_writes(world: World, since: int) -> int:
    return sum(1 for e in world.ad.journal.select(since=since) if e.method == "POST")


async def test_every_message_lands_exactly_once_with_its_metadata(world: World) -> None:
    messages = ad_messages(world)
    alt_ids = world.ghl.messages_by_alt_id()
    ours = {k: n for k, n in alt_ids.items() if k.startswith(f"{AD_SOURCE}:message:")}
    assert len(ours) == len(messages)
    assert set(ours.values()) == {1}
    for message in messages.values():
        landed = ghl_message(world, message.id)
        assert landed["direction"] == message.direction
        if message.type == "call":
            assert landed["messageType"] == "TYPE_CALL"
        elif message.channel == "email":
            assert landed["messageType"] == "TYPE_EMAIL"
        if message.body and message.type != "call" and message.channel != "email":
            assert message.body in (landed.get("body") or "")


async def test_each_contact_has_one_contact_and_one_conversation(world: World) -> None:
    ghl = world.ghl
    assert len(ghl.contacts()) == CONTACTS
    assert len(ghl.conversations()) == CONTACTS


async def test_a_refused_file_is_dead_lettered_and_its_text_still_goes(world: World) -> None:
    seeded = world.ad_seeded
    image = ghl_message(world, seeded.image_message_id)
    assert len(image["attachments"]) == 1  # the PNG, uploaded and referenced
    assert len(world.ghl.uploads) == 1 + len(seeded.call_message_ids)  # + recordings
    for refused in (seeded.disallowed_message_id, seeded.oversized_message_id):
        landed = ghl_message(world, refused)
        assert landed["attachments"] == []
        assert landed["body"]
    proc = await asyncio.create_subprocess_exec(
        "python", "-m", "bridge", "--config", str(world.config_path), "dlq", "list",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    listing = out.decode()
    assert "invoice.exe" in listing
    assert "does not accept" in listing
    assert "rally.mp4" in listing
    assert "over the upload limit" in listing


async def test_calls_bring_recording_transcript_note_history_and_routing(world: World) -> None:
    seeded = world.ad_seeded
    notes = [n for n in world.ghl.all_notes() if "Call transcript" in (n.get("body") or "")]
    assert len(notes) == len(seeded.call_message_ids)
    for note in notes:
        assert "contact: Yes, I'll be there around ten." in note["body"]
        assert "Recording: http" in note["body"]
    missed = ghl_message(world, seeded.missed_call_message_id)
    assert missed["body"] == "Missed call"
    # Transcripts and routing alerts went back into ActiveDEMAND as history entries.
    written = world.ad.histories(key(world), source="api")
    transcripts = [h for h in written if "Call transcript" in h.text]
    alerts = [h for h in written if h.text.startswith("Call mentions canvass")]
    assert len(transcripts) == len(seeded.call_message_ids)
    assert len(alerts) == len(seeded.call_message_ids)
    # The routing rule tagged and assigned the caller.
    caller = world.ad.message(key(world), seeded.call_message_ids[0]).contact_id
    email = world.ad.contact(key(world), caller).values["emails.email_address"].lower()
    (contact,) = [c for c in world.ghl.contacts() if c["email"] == email]
    assert "canvass volunteer" in contact["tags"]
    assert contact["assignedTo"] == "user-field-organiser"
    # Recordings are kept under the state directory.
    kept = list((world.config_path.parent / "recordings" / AD_SOURCE).glob("*.wav"))
    assert len(kept) == len(seeded.call_message_ids)


async def test_delivery_statuses_are_mirrored(world: World) -> None:
    outbound = [m for m in ad_messages(world).values() if m.direction == "outbound"]
    assert {m.status for m in outbound} >= {"delivered"}
    for message in outbound:
        wanted = {"failed": "failed", "undelivered": "failed", "read": "read"}
        assert ghl_message(world, message.id)["status"] == wanted.get(message.status, "delivered")


async def test_a_second_run_writes_nothing(world: World) -> None:
    mark, ad_mark = world.ghl.journal.last_seq, world.ad.journal.last_seq
    assert await bridge(world, "once") == 0
    assert ghl_writes(world, mark) == 0
    assert ad_writes(world, ad_mark) == 0


async def test_new_messages_status_and_conversation_status_arrive_once(world: World) -> None:
    ad, k = world.ad, key(world)
    conv_id = world.ad_seeded.conversation_ids[0]
    reply = ad.add_message(k, conv_id, body="See you Saturday!", direction="outbound")
    bounced = ad.add_message(k, conv_id, body="Reminder: Saturday 10am", direction="outbound")
    question = ad.add_message(k, conv_id, body="Is parking free?")
    mark = world.ghl.journal.last_seq
    assert await bridge(world, "once") == 0
    assert ghl_message(world, question.id)["body"] == "Is parking free?"
    assert ghl_message(world, question.id)["direction"] == "inbound"
    assert ghl_message(world, reply.id)["direction"] == "outbound"
    first_writes = ghl_writes(world, mark)
    assert first_writes == 5  # three records and the two replies' "pending" status

    # Delivered, and the conversation closed: a status PUT and a conversation PUT.
    ad.set_status(k, reply.id, "delivered")
    ad.set_status(k, bounced.id, "failed", error="Carrier rejected the message")
    ad.set_conversation_status(k, conv_id, "closed")
    mark = world.ghl.journal.last_seq
    assert await bridge(world, "once") == 0
    assert ghl_message(world, reply.id)["status"] == "delivered"
    assert ghl_message(world, bounced.id)["status"] == "failed"
    routes = [
        (e.method, e.route)
        for e in world.ghl.journal.select(since=mark)
        if e.method != "GET" and 200 <= e.status < 300  # not the start-up scope probes
    ]
    assert sorted(routes) == sorted(
        [
            ("PUT", "/conversations/messages/{messageId}/status"),
            ("PUT", "/conversations/messages/{messageId}/status"),
            ("PUT", "/conversations/{conversationId}"),
        ]
    )
    # And nothing more on the run after.
    mark = world.ghl.journal.last_seq
    assert await bridge(world, "once") == 0
    assert ghl_writes(world, mark) == 0


async def test_a_new_texter_arrives_before_the_next_contact_scan(world: World) -> None:
    ad, k = world.ad, key(world)
    contact = ad.add_contact(
        k,
        {"first_name": "Nia", "last_name": "Okafor", "emails.email_address": "nia@example.org"},
    )
    conv = ad.add_conversation(k, contact.id, channel="sms")
    text = ad.add_message(k, conv.id, body="Hi, I saw your flyer")
    call = ad.add_call(
        k, conv.id, duration=61, recording=default_recording(0.1), transcript=TRANSCRIPT
    )
    # Only the conversations stream runs: the contact comes with its conversation.
    config = world.config_path.read_text()
    only = config.replace('streams = ["contacts", "conversations"]', 'streams = ["conversations"]')
    world.config_path.write_text(only)
    try:
        assert await bridge(world, "once") == 0
    finally:
        world.config_path.write_text(config)
    (made,) = [c for c in world.ghl.contacts() if c["email"] == "nia@example.org"]
    assert ghl_message(world, text.id)["contactId"] == made["id"]
    assert ghl_message(world, call.id)["body"] == "Inbound call, 1m 01s"
    assert "canvass volunteer" in made["tags"]
