"""End to end: GHL replies and statuses mirrored back into Action Network and ActiveDEMAND.

Both sources are backfilled once for the module by a real `bridge` process, and a first
`bridge once` places the reverse stream's cursor. Each test then writes in the GHL
simulator what a GHL user would (a reply, a delivery report) and checks what the next
`bridge once` wrote into the sources, by counting objects and calls in the simulators.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bridge.demo import AD_SOURCE, SOURCE, World, ghl_writes, sim_world
from bridge.sim.actionnetwork_state import Person
from tests.test_an_e2e import bridge, bridge_output

pytestmark = pytest.mark.asyncio(loop_scope="module")

PEOPLE = 6


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    directory: Path = tmp_path_factory.mktemp("reverse-e2e")
    async with sim_world(directory, people=PEOPLE, overlap="1s") as made:
        assert await bridge(made, "backfill", SOURCE, "--since", "2000-01-01") == 0
        # Exit 1: the ActiveDEMAND seed has two refused files (see test_ad_e2e).
        assert await bridge(made, "backfill", AD_SOURCE, "--since", "2000-01-01") == 1
        await asyncio.sleep(1.5)  # past the people overlap
        # The reverse stream starts at its first poll: nothing before it is mirrored.
        assert await bridge(made, "once") == 0
        yield made


async def once(world: World) -> int:
    """``bridge once``, after Action Network's rolling second: each process starts with a
    full bucket, and the last one's requests still count at the server for a second."""
    await asyncio.sleep(1.1)
    return await bridge(world, "once")


def an_person(world: World, index: int) -> Person:
    return world.an.list_people(world.an_key, limit=25)[index]


def conversation_of_email(world: World, email: str) -> str:
    (contact,) = [c for c in world.ghl.contacts() if c.get("email") == email.lower()]
    (conversation,) = [c for c in world.ghl.conversations() if c["contactId"] == contact["id"]]
    return str(conversation["id"])


def tag_names(world: World, person: Person) -> set[str]:
    taggings, _ = world.an.list_taggings(world.an_key, person_id=person.id, limit=25)
    return {world.an.get_tag(world.an_key, t.tag_id).name for t in taggings}


def an_writes(world: World, since: int) -> list[Any]:
    return [e for e in world.an.journal.select(since=since) if e.method in ("PUT", "POST")]


def ad_entries(world: World) -> list[Any]:
    return world.ad.histories(world.ad_seeded.key, source="api")


async def test_a_reply_reaches_the_person_in_one_poll(world: World) -> None:
    person = an_person(world, 0)
    conversation = conversation_of_email(world, person.emails[0]["address"])
    reply = world.ghl.add_reply(conversation, "See you at the meeting!", user_id="user-organiser")
    an_mark = world.an.journal.last_seq
    assert await once(world) == 0
    person = world.an.get_person(world.an_key, person.id)
    assert person.custom_fields["ghl_last_reply"] == "See you at the meeting!"
    assert person.custom_fields["ghl_last_reply_at"] == reply["dateAdded"]
    assert person.custom_fields["ghl_reply_status"] == "delivered"
    assert person.custom_fields["ghl_conversation"].endswith(f"/conversations/{conversation}")
    assert "replied-in-ghl" in tag_names(world, person)
    writes = an_writes(world, an_mark)
    # One PUT of the fields and one signup helper POST for the tag: nobody else touched.
    # One PUT of the fields, the tag created (the helper skips unknown tag names) and one
    # signup helper POST that applies it: nobody else touched.
    assert [(e.method, e.route) for e in writes] == [
        ("PUT", "/api/v2/people/{id}"),
        ("POST", "/api/v2/tags"),
        ("POST", "/api/v2/people"),
    ]


async def test_the_bridges_own_messages_never_come_back_and_a_rerun_changes_nothing(
    world: World,
) -> None:
    await asyncio.sleep(1.5)  # the mirror's own PUT is inside the people overlap
    an_mark, ghl_mark, ad_mark = (
        world.an.journal.last_seq,
        world.ghl.journal.last_seq,
        world.ad.journal.last_seq,
    )
    entries = len(ad_entries(world))
    assert await once(world) == 0
    assert an_writes(world, an_mark) == []
    assert ghl_writes(world, ghl_mark) == 0  # the written-back person is not a change
    assert [e for e in world.ad.journal.select(since=ad_mark) if e.method == "POST"] == []
    assert len(ad_entries(world)) == entries


async def test_a_status_change_updates_the_field_and_an_older_reply_never_wins(
    world: World,
) -> None:
    person = an_person(world, 1)
    conversation = conversation_of_email(world, person.emails[0]["address"])
    first = world.ghl.add_reply(conversation, "First reply")
    await asyncio.sleep(0.01)
    world.ghl.add_reply(conversation, "Second reply")
    assert await once(world) == 0
    assert world.an.get_person(world.an_key, person.id).custom_fields["ghl_last_reply"] == (
        "Second reply"
    )
    # A late delivery report for the first reply must not bring it back as the last one.
    world.ghl.set_message_status(first["id"], "read")
    an_mark = world.an.journal.last_seq
    assert await once(world) == 0
    fields = world.an.get_person(world.an_key, person.id).custom_fields
    assert fields["ghl_last_reply"] == "Second reply"
    assert an_writes(world, an_mark) == []


async def test_a_reply_to_an_activedemand_contact_and_its_statuses_become_history(
    world: World,
) -> None:
    contact = world.ad.contacts(world.ad_seeded.key)[0]
    email = str(contact.values["emails.email_address"])
    conversation = conversation_of_email(world, email)
    before = len(ad_entries(world))
    reply = world.ghl.add_reply(conversation, "Thanks, we will call you back")
    assert await once(world) == 0
    made = ad_entries(world)[before:]
    assert [h.contact_id for h in made] == [contact.id, contact.id]
    assert "Thanks, we will call you back" in made[0].text
    assert f"GHL message {reply['id']} is now delivered" in made[1].text
    world.ghl.set_message_status(reply["id"], "read")
    assert await once(world) == 0
    (read,) = ad_entries(world)[before + 2 :]
    assert f"GHL message {reply['id']} is now read" in read.text
    assert await once(world) == 0
    assert len(ad_entries(world)) == before + 3


async def test_without_export_the_search_fallback_still_mirrors_new_replies(
    world: World,
) -> None:
    world.ghl.export_denied = True
    try:
        person = an_person(world, 2)
        conversation = conversation_of_email(world, person.emails[0]["address"])
        world.ghl.add_reply(conversation, "Replying while export is off")
        await asyncio.sleep(1.1)
        status, output = await bridge_output(world, "once")
        assert status == 0
        assert "export_not_permitted" in output
        fields = world.an.get_person(world.an_key, person.id).custom_fields
        assert fields["ghl_last_reply"] == "Replying while export is off"
    finally:
        world.ghl.export_denied = False
