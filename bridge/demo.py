"""``bridge demo``: the daemon against the built-in simulators, with no credentials.

Starts a seeded Action Network group, a seeded ActiveDEMAND account and a GHL location on
loopback, writes a config for them into a temporary directory, and runs the real daemon:
a backfill of each source that brings its history into GHL, then a live poll after one
organiser edit, which should cost exactly one GHL call. It ends with what landed and what
it cost. The same world serves the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from bridge.app import open_app
from bridge.config import load_config
from bridge.pipeline import RunSummary
from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.actionnetwork_state import AnSim
from bridge.sim.activedemand import build_app as build_ad_app
from bridge.sim.activedemand_state import AdSim
from bridge.sim.ad_data import SeededAccount, seed_account
from bridge.sim.an_data import build_sim as build_an_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim

SOURCE = "an-demo"
AD_SOURCE = "ad-demo"
LOCATION_ID = "demoLocation00000001"
SUMMARY_TITLE = "Action Network summary"
HISTORY = datetime(2000, 1, 1, tzinfo=UTC)

CONFIG = """\
# Written by `bridge demo` for its simulators; the secrets are the simulators' own.
[state]
path = "{state}"

[logging]
level = "{log_level}"
format = "console"

[pipeline]
retry_base = "200ms"
retry_cap = "5s"
idle_poll = "200ms"

[[ghl.locations]]
name = "demo"
location_id = "{location_id}"
base_url = "{ghl_url}"
auth = {{ kind = "private_token", token = "{ghl_token}" }}
reverse = {{ poll_interval = "1s" }}
"""

AN_CONFIG = """
[[sources.action_network]]
name = "{source}"
location = "demo"
api_key = "{an_key}"
base_url = "{an_url}/api/v2"
poll_interval = "1s"
overlap = "{overlap}"
# One note per person with activity, kept up to date in place.
summary = {{ enabled = true, title = "{summary_title}" }}

[sources.action_network.mirror]
# A reply written in GHL shows on the person in Action Network.
add_tags = ["replied-in-ghl"]

[sources.action_network.mirror.fields]
ghl_last_reply = "{{body}}"
ghl_last_reply_at = "{{date}}"
ghl_reply_status = "{{status}}"
ghl_conversation = "{{conversation_url}}"

[[sources.action_network.rules]]
# Someone tagged "event host" gets a call from the team: a task, a starred conversation.
name = "host-callback"
when_tag = "event host"
task = {{ title = "Call {{given_name}} {{family_name}} about hosting", due_in = "2d" }}
starred = true
add_tags = ["host prospect"]

[[sources.action_network.rules]]
# A petition comment is worth reading: mark the conversation unread and note it.
name = "petition-comment"
when_activity = "signature"
note = 'Commented on "{{action_title}}": {{comments}}'
unread = true

"""


AD_CONFIG = """
[[sources.activedemand]]
name = "{ad_source}"
location = "demo"
api_key = "{ad_key}"
application_key = "{ad_app_key}"
base_url = "{ad_url}/v1"
streams = ["contacts", "conversations"]
poll_interval = "1s"
conversations_interval = "1s"

[[sources.activedemand.routing]]
# A call where someone commits to the canvass: tag them and tell the AD team.
name = "canvass-yes"
keywords = ["canvass"]
add_tags = ["canvass volunteer"]
assign_to = "user-field-organiser"
alert = "Call mentions {{matched}}: book them a shift"
"""


@dataclass
class World:
    """Both simulators, serving, and a config file that points the bridge at them."""

    an: AnSim
    an_key: str
    ad: AdSim
    ad_seeded: SeededAccount
    ghl: GhlSim
    config_path: Path


@contextlib.asynccontextmanager
async def sim_world(
    directory: Path,
    *,
    people: int = 12,
    seed: int = 7,
    log_level: str = "warning",
    overlap: str = "120s",
    action_network: bool = True,
    activedemand: bool = True,
) -> AsyncIterator[World]:
    """Serve the seeded simulators and write a config for them (ActiveDEMAND optional)."""
    an, keys = build_an_sim(people=people, seed=seed)
    ad = AdSim(seed=seed)
    ad_seeded = seed_account(ad, f"sim-ad-demo-{seed}", contacts=people, seed=seed)
    # The conversation feeds are partner-gated: they need the application key too.
    ad_app_key = ad.add_application(accounts=[ad_seeded.key])
    ghl = GhlSim(seed=seed)
    ghl.add_location(LOCATION_ID)
    token = ghl.add_private_token(LOCATION_ID)
    async with (
        serve(build_an_app(an)) as an_url,
        serve(build_ad_app(ad)) as ad_url,
        serve(build_ghl_app(ghl)) as ghl_url,
    ):
        path = directory / "bridge.toml"
        text = CONFIG.format(
            state=directory / "state.db",
            log_level=log_level,
            location_id=LOCATION_ID,
            ghl_url=ghl_url,
            ghl_token=token,
        )
        if action_network:
            text += AN_CONFIG.format(
                source=SOURCE,
                an_key=keys[0],
                an_url=an_url,
                overlap=overlap,
                summary_title=SUMMARY_TITLE,
            )
        if activedemand:
            text += AD_CONFIG.format(
                ad_source=AD_SOURCE, ad_key=ad_seeded.key, ad_app_key=ad_app_key, ad_url=ad_url
            )
        path.write_text(text, encoding="utf-8")
        yield World(an=an, an_key=keys[0], ad=ad, ad_seeded=ad_seeded, ghl=ghl, config_path=path)


async def run_bridge(
    world: World, *, backfill_since: datetime | None = None, source: str = SOURCE
) -> RunSummary:
    """One ``bridge once`` (or ``bridge backfill``) against the world, in this process."""
    config = load_config(world.config_path)
    backfill = (source, backfill_since) if backfill_since is not None else None
    async with open_app(config, backfill=backfill) as app:
        return await app.run(once=True)


def summary_notes(world: World) -> list[dict[str, Any]]:
    """The Action Network summary notes in GHL (one per person with activity)."""
    return [
        n for n in world.ghl.all_notes() if (n.get("body") or "").startswith(SUMMARY_TITLE + "\n")
    ]


def ghl_writes(world: World, since: int = 0) -> int:
    """GHL calls that changed something, after journal entry ``since``.

    The start-up scope probes are writes the server refuses on purpose (422), so
    counting successful writes counts exactly what records cost.
    """
    return sum(
        1
        for e in world.ghl.journal.select(since=since)
        if e.method != "GET" and 200 <= e.status < 300
    )


async def demo(out: TextIO, *, people: int = 12, verbose: bool = False) -> int:
    """Run the demo, printing what flows and a summary; returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="bridge-demo-") as tmp:
        level = "info" if verbose else "warning"
        async with sim_world(Path(tmp), people=people, log_level=level) as world:
            return await _demo(world, out, people=people)


async def _demo(world: World, out: TextIO, *, people: int) -> int:
    an, ghl = world.an, world.ghl
    counts = an.counts(world.an_key)
    activities = sum(
        counts[k] for k in ("submissions", "signatures", "attendances", "donations", "outreaches")
    )
    out.write(
        f"Action Network sim: {counts['people']} people, {activities} activities,"
        f" {counts['taggings']} taggings, {counts['tags']} tags\n"
        f"GHL sim: location {LOCATION_ID}, empty\n\n"
        f"1. backfill: bridge backfill {SOURCE} --since {HISTORY.date()}\n"
    )
    first = await run_bridge(world, backfill_since=HISTORY)
    ghl_calls, an_calls = len(ghl.journal), len(an.journal)
    stats = ghl.stats()
    write_backs = an.journal.count(method="PUT")
    records = counts["people"] + activities
    summaries = len(summary_notes(world))
    out.write(
        f"   contacts {stats['contacts']}, conversations {stats['conversations']},"
        f" inbound messages {stats['messages']}, tasks {len(ghl.all_tasks())},"
        f" rule notes {len(ghl.all_notes()) - summaries}, summary notes {summaries},"
        f" write-backs to Action Network {write_backs}\n"
        f"   GHL calls {ghl_calls} ({ghl_calls / max(records, 1):.2f} per record),"
        f" Action Network calls {an_calls}, dead letters {first.dead_lettered}\n"
        f"   busiest second at Action Network: {an.max_rate_seen(world.an_key)} requests"
        " (limit 4)\n\n"
    )
    ad_first = await _demo_activedemand(world, out)
    mark = ghl.journal.last_seq
    # Action Network counts a rolling second; let the first run's last second pass.
    await asyncio.sleep(1.0)
    person = an.list_people(world.an_key, limit=1)[0]
    an.touch_person(person.id, {"family_name": "Renamed"}, key=world.an_key)
    out.write("3. an organiser renames one person; bridge once\n")
    second = await run_bridge(world)
    writes = ghl_writes(world, mark)
    # The summary note does not change: a name is not part of it.
    out.write(
        f"   GHL writes {writes} (expected 1: the contact update; the summary note is unchanged),"
        f" unchanged records skipped {second.events_unchanged},"
        f" dead letters {second.dead_lettered}\n"
    )
    replied = await _demo_reply(world, out)
    ok = (
        first.dead_lettered == 0
        and second.dead_lettered == 0
        and writes == 1
        and ad_first
        and replied
    )
    out.write("\ndemo OK\n" if ok else "\ndemo FAILED: see above\n")
    return 0 if ok else 1


async def _demo_reply(world: World, out: TextIO) -> bool:
    """A GHL user replies to one person; True when the reply reached Action Network."""
    an, ghl = world.an, world.ghl
    person = an.list_people(world.an_key, limit=1)[0]
    email = person.emails[0]["address"].lower()
    (contact,) = [c for c in ghl.contacts() if c.get("email") == email]
    (conversation,) = [c for c in ghl.conversations() if c["contactId"] == contact["id"]]
    ghl.add_reply(conversation["id"], "Thanks for signing! Can you host a house meeting?")
    out.write("4. a GHL user replies to that person in GHL; bridge once\n")
    await asyncio.sleep(1.0)
    mark, an_mark = ghl.journal.last_seq, an.journal.last_seq
    run = await run_bridge(world)
    fields = an.get_person(world.an_key, person.id).custom_fields
    an_writes = [e for e in an.journal.select(since=an_mark) if e.method in ("PUT", "POST")]
    out.write(
        f"   Action Network person now: ghl_last_reply={fields.get('ghl_last_reply')!r},"
        f" ghl_reply_status={fields.get('ghl_reply_status')!r}\n"
        f"   Action Network writes {len(an_writes)} (fields, the new tag, tagging),"
        f" GHL writes {ghl_writes(world, mark)} (the summary note's last activity),"
        f" dead letters {run.dead_lettered}\n"
    )
    return fields.get("ghl_last_reply", "").startswith("Thanks for signing")


async def _demo_activedemand(world: World, out: TextIO) -> bool:
    """Backfill the ActiveDEMAND account; True when exactly the two bad files failed."""
    ad, ghl, seeded = world.ad, world.ghl, world.ad_seeded
    counts = ad.counts(seeded.key)
    out.write(
        f"2. ActiveDEMAND sim: {counts['contacts']} contacts, {counts['conversations']}"
        f" conversations, {counts['messages']} messages (3 with files, calls with"
        f" recordings and transcripts)\n   bridge backfill {AD_SOURCE} --since {HISTORY.date()}\n"
    )
    mark, ad_mark = ghl.journal.last_seq, len(ad.journal)
    summary = await run_bridge(world, backfill_since=HISTORY, source=AD_SOURCE)
    messages = sum(1 for k in ghl.messages_by_alt_id() if k.startswith(f"{AD_SOURCE}:message:"))
    notes = sum(1 for n in ghl.all_notes() if "Call transcript" in (n.get("body") or ""))
    written = ad.histories(seeded.key, source="api")
    out.write(
        f"   messages {messages}, files uploaded {len(ghl.uploads)}, transcript notes {notes},"
        f" ActiveDEMAND history entries written {len(written)}\n"
        f"   GHL writes {ghl_writes(world, mark)}, ActiveDEMAND calls"
        f" {len(ad.journal) - ad_mark}, dead letters {summary.dead_lettered}"
        " (expected 2: an .exe GHL refuses and a video over the upload limit;"
        " their messages' text still went)\n\n"
    )
    return summary.dead_lettered == 2
