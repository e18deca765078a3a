"""End to end: `bridge backfill` and `bridge once` against the Action Network and GHL sims.

One seeded group is synced once for the module (at Action Network's real 4 requests/s);
each test then changes something and checks what the next `bridge once` did, by counting
objects and calls in the simulators. The bridge runs as a real process; this module's
event loop serves the simulators meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bridge.demo import SOURCE, World, ghl_writes, sim_world, summary_notes
from bridge.sim.actionnetwork_state import Person

pytestmark = pytest.mark.asyncio(loop_scope="module")

PEOPLE = 8


async def bridge(world: World, *args: str) -> int:
    """Run ``bridge --config <world> ARGS`` as a process; its output is shown on failure."""
    return (await bridge_output(world, *args))[0]


async def bridge_output(world: World, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "--config",
        str(world.config_path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    print(output.decode())
    assert proc.returncode is not None
    return proc.returncode, output.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    directory: Path = tmp_path_factory.mktemp("e2e")
    # A short overlap: the sim indexes at once, and every run re-reads the people changed
    # within it (all of them, right after the write-backs).
    async with sim_world(directory, people=PEOPLE, overlap="1s", activedemand=False) as made:
        status = await bridge(made, "backfill", SOURCE, "--since", "2000-01-01")
        assert status == 0
        # Past the overlap and Action Network's rolling second.
        await asyncio.sleep(2.5)
        yield made


def people(world: World) -> list[Person]:
    return world.an.list_people(world.an_key, limit=25)


def contact_of(world: World, person: Person) -> dict[str, Any]:
    email = person.emails[0]["address"].lower()
    (found,) = [c for c in world.ghl.contacts() if c["email"] == email]
    return found


def tag_names(world: World, person: Person) -> set[str]:
    taggings, _ = world.an.list_taggings(world.an_key, person_id=person.id, limit=25)
    return {world.an.get_tag(world.an_key, t.tag_id).name for t in taggings}


async def test_backfill_syncs_the_whole_group(world: World) -> None:
    counts = world.an.counts(world.an_key)
    activities = sum(
        counts[k] for k in ("submissions", "signatures", "attendances", "donations", "outreaches")
    )
    stats = world.ghl.stats()
    assert stats["contacts"] == PEOPLE
    assert stats["conversations"] == PEOPLE
    assert stats["messages"] == activities
    assert stats["duplicateAltIds"] == {}
    assert stats["sentOutbound"] == 0  # the send endpoint would text or e-mail the person


async def test_activities_arrive_once_each_in_order(world: World) -> None:
    for conversation in world.ghl.conversations():
        messages = world.ghl.messages(conversation["id"])
        assert all(m["direction"] == "inbound" for m in messages)
        dates = [m["dateAdded"] for m in messages]
        assert dates == sorted(dates)
        assert len({m["altId"] for m in messages}) == len(messages)


async def test_each_person_with_activity_has_one_summary_note(world: World) -> None:
    """One summary note per contact with activity, and `bridge summarize` prints its text."""
    active = {c["contactId"] for c in world.ghl.conversations() if world.ghl.messages(c["id"])}
    notes = summary_notes(world)
    assert active
    assert sorted(n["contactId"] for n in notes) == sorted(active)
    # The backfill queued a summary op per activity; each note was written once, not edited.
    assert world.ghl.journal.count(method="PUT", route="/contacts/{contactId}/notes/{id}") == 0
    person = people(world)[0]
    contact = contact_of(world, person)
    (note,) = [n for n in notes if n["contactId"] == contact["id"]]
    status, output = await bridge_output(world, "summarize", "--contact", contact["email"])
    assert status == 0
    assert output == note["body"] + "\n"


async def test_write_back_lands_in_action_network(world: World) -> None:
    by_email = {str(c["email"]): c for c in world.ghl.contacts()}
    conversations = {c["contactId"]: c["id"] for c in world.ghl.conversations()}
    for person in people(world):
        contact = by_email[person.emails[0]["address"].lower()]
        assert person.custom_fields["ghl_contact_id"] == contact["id"]
        assert person.custom_fields["ghl_conversation_id"] == conversations[contact["id"]]


async def test_second_run_writes_nothing_and_does_not_loop(world: World) -> None:
    mark, an_mark = world.ghl.journal.last_seq, world.an.journal.last_seq
    assert await bridge(world, "once") == 0
    assert ghl_writes(world, mark) == 0
    # The write-backs bumped every person's modified_date; reading them again must not
    # write back again.
    assert world.an.journal.select(since=an_mark, method="PUT") == []
    await asyncio.sleep(1.0)


async def test_changed_person_costs_one_ghl_call(world: World) -> None:
    person = people(world)[1]
    world.an.touch_person(person.id, {"given_name": "Zelda"}, key=world.an_key)
    mark = world.ghl.journal.last_seq
    assert await bridge(world, "once") == 0
    writes = [
        e for e in world.ghl.journal.select(since=mark) if e.method != "GET" and e.status < 300
    ]
    # By the mapped contact's id: an upsert would match on an e-mail that may have changed.
    assert [(e.method, e.route) for e in writes] == [("PUT", "/contacts/{contactId}")]
    assert contact_of(world, person)["firstName"] == "Zelda"
    await asyncio.sleep(1.0)


async def test_tags_follow_action_network(world: World) -> None:
    person = people(world)[2]
    tags = {t.name: t.id for t in world.an.list_tags(world.an_key)[0]}
    world.ghl.tag_contact(contact_of(world, person)["id"], ["added in ghl"])  # must stay
    tagging = world.an.add_tagging(world.an_key, tags["donor"], person.id)
    assert await bridge(world, "once") == 0
    assert {"donor", "added in ghl"} <= set(contact_of(world, person)["tags"])
    await asyncio.sleep(1.0)
    world.an.remove_tagging(world.an_key, tags["donor"], tagging.id)
    assert await bridge(world, "once") == 0
    after = set(contact_of(world, person)["tags"])
    assert "donor" not in after
    assert "added in ghl" in after
    await asyncio.sleep(1.0)


async def test_rules_make_tasks_and_notes_once(world: World) -> None:
    tasks = len(world.ghl.all_tasks())
    notes = len(world.ghl.all_notes()) - len(summary_notes(world))
    hosts = [p for p in people(world) if "event host" in tag_names(world, p)]
    assert tasks == len(hosts)
    signatures_with_comments = world.an.counts(world.an_key)["signatures"]
    assert 0 < notes <= signatures_with_comments
    # A host who changes again does not get a second task.
    world.an.touch_person(hosts[0].id, {"family_name": "Again"}, key=world.an_key)
    assert await bridge(world, "once") == 0
    assert len(world.ghl.all_tasks()) == tasks
    await asyncio.sleep(1.0)


async def test_new_activity_becomes_one_inbound_message(world: World) -> None:
    person = people(world)[3]
    before = world.ghl.stats()["messages"]
    summaries = {n["id"]: n["body"] for n in summary_notes(world)}
    mark = world.ghl.journal.last_seq
    petitions, _ = world.an.list_actions(world.an_key, "petitions")
    world.an.add_activity(world.an_key, petitions[0].id, person.id, comments="Count me in")
    assert await bridge(world, "once") == 0
    assert world.ghl.stats()["messages"] == before + 1
    last = world.ghl.messages()[-1]
    assert "Count me in" in last["body"]
    # The person's summary note changes in place, once; no other summary note changes.
    (note,) = [n for n in summary_notes(world) if n["contactId"] == contact_of(world, person)["id"]]
    puts = world.ghl.journal.select(
        since=mark, method="PUT", route="/contacts/{contactId}/notes/{id}"
    )
    assert [e.path.rsplit("/", 1)[-1] for e in puts] == [note["id"]]
    after = {n["id"]: n["body"] for n in summary_notes(world)}
    assert after.keys() == summaries.keys()
    assert {i for i in after if after[i] != summaries[i]} == {note["id"]}
    await asyncio.sleep(1.0)


async def test_action_network_rate_is_never_exceeded(world: World) -> None:
    assert world.an.max_rate_seen(world.an_key) <= 4
    assert world.an.rate_limited(world.an_key) == 0


async def test_map_preview_shows_real_records_without_sending(world: World) -> None:
    ghl_mark, an_mark = world.ghl.journal.last_seq, world.an.journal.last_seq
    status, output = await bridge_output(
        world, "map", "preview", "--source", SOURCE, "--limit", "2"
    )
    assert status == 0
    assert output.count("ghl.upsert_contact") == 2
    assert '"email":' in output
    assert world.ghl.journal.select(since=ghl_mark) == []
    assert all(e.method == "GET" for e in world.an.journal.select(since=an_mark))
    await asyncio.sleep(1.0)


async def test_backfill_of_an_unknown_source_is_a_config_error(world: World) -> None:
    status, output = await bridge_output(world, "backfill", "nope", "--since", "2024-01-01")
    assert status == 78
    assert "no source named 'nope'" in output


async def test_backfill_with_a_bad_date_prints_usage(world: World) -> None:
    status, output = await bridge_output(world, "backfill", SOURCE, "--since", "last week")
    assert status == 2
    assert "usage:" in output
    assert "expected a date YYYY-MM-DD" in output
