"""Crash trials: real ``bridge backfill`` processes killed with SIGKILL, then every record counted.

Each trial seeds 2,000 people (Action Network) or contacts (ActiveDEMAND) in simulators
served by this module's event loop, starts ``bridge backfill`` as a process, kills it with
SIGKILL after a random 0.2-3 s and starts it again, ``BRIDGE_TRIAL_KILLS`` times (20 by
default), then lets one last backfill run to the end. The checks read the simulators' own
state, not the bridge's: one GHL contact per source person, one conversation per contact,
one message per source activity or message (counted by ``altId``) in the right thread,
every write-back made, and nothing left open in the outbox.

The kill moments come from ``random.Random(seed)``; the seed is printed, and setting
``BRIDGE_TRIAL_SEED`` to it replays the same delays (the processes' own timing still
varies, so a replay comes close rather than exact). Each run's output is kept in the
test's ``logs`` directory, which a failure names, with the ops each kill left in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.connectors.an_models import ACTIVITY_TYPES
from bridge.models import marker
from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.activedemand import build_app as build_ad_app
from bridge.sim.activedemand_state import PHONE, AdSim
from bridge.sim.ad_data import SeededAccount, seed_account
from bridge.sim.an_data import build_sim as build_an_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim, normalize_phone
from bridge.store import Store

PEOPLE = 2_000
ACTIVITIES_PER_PERSON = 3
DEFAULT_KILLS = 20
KILL_AFTER = (0.2, 3.0)  # seconds after the start, drawn uniformly
FINAL_RUN_LIMIT = 600.0  # seconds; the last backfill is never killed, only given up on
LOCATION_ID = "trialLocation0000001"
AN_SOURCE = "an-trial"
AD_SOURCE = "ad-trial"
SINCE = "2000-01-01"
# Far above what two cores can send, in the simulators and in the config alike. Action
# Network's real budget is 4 requests/s, which would make one pass over 2,000 people (six
# reads each) take almost an hour. Pace does not weaken the trial: the invariants are
# about what a kill at any point leaves behind, and every point still exists at any
# pace, only reached sooner. That the bridge keeps the real budgets is checked at the
# real limits elsewhere (test_an_e2e, test_actionnetwork, test_activedemand,
# test_ghl_budget).
UNLIMITED = 1_000_000
# Three times the seed's default (one per ten contacts): with the default, the sync was
# done after about 12 kills and the rest killed a bridge with nothing left to do.
AD_CONVERSATIONS = 600
SAMPLE = 10  # keys shown per kind of problem
# With this many kills, about half of which land while ops are in flight, some kill must
# have interrupted an op, or the trial tested less than it claims; with fewer (a quick
# local run) that is left to chance.
MEANINGFUL_KILLS = 10

CONFIG = """\
[state]
path = "{state}"

[logging]
level = "warning"
format = "json"

[pipeline]
# Eight times the default partitions: measured here, 64 roughly halves the bridge's CPU
# per op against 8 (fewer dispatcher rounds per op), and more ops in flight at once
# gives each kill more to leave in doubt.
senders = 64
retry_base = "200ms"
retry_cap = "2s"
idle_poll = "100ms"

[[ghl.locations]]
name = "trial"
location_id = "{location_id}"
base_url = "{ghl_url}"
auth = {{ kind = "private_token", token = "{token}" }}
limits = {{ burst = {unlimited}, window = "10s", daily = {unlimited} }}
"""

AN_SOURCE_CONFIG = """
[[sources.action_network]]
name = "{source}"
location = "trial"
api_key = "{key}"
base_url = "{url}/api/v2"
# No taggings scan: a backfill does not run it, and leaving it out also leaves out the
# per-person tag sync, an idempotent op that would cost 2,000 calls the checks never read.
streams = ["people", "activities"]
rate = {unlimited}
"""

AD_SOURCE_CONFIG = """
[[sources.activedemand]]
name = "{source}"
location = "trial"
api_key = "{key}"
application_key = "{app_key}"
base_url = "{url}/v1"
streams = ["contacts", "conversations"]
rate = {unlimited}

[[sources.activedemand.routing]]
# Every seeded call transcript matches: a tag, an assignment and an alert per call.
name = "canvass-yes"
keywords = ["canvass"]
add_tags = ["canvass volunteer"]
assign_to = "user-field-organiser"
alert = "Call mentions {{matched}}: book them a shift"
"""

# The seed gives three messages with files; GHL refuses two of them (API_FACTS: the file
# type, the upload limit), so exactly these two dead letters are expected.
AD_REFUSED = {"invoice.exe": "does not accept", "rally.mp4": "over the upload limit"}


def kill_count() -> int:
    return int(os.environ.get("BRIDGE_TRIAL_KILLS", DEFAULT_KILLS))


def trial_seed() -> int:
    given = os.environ.get("BRIDGE_TRIAL_SEED")
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


@dataclass
class Trial:
    """One crash trial's GHL, config, state file and run logs."""

    ghl: GhlSim
    config: Path
    state: Path
    logs: Path
    seed: int
    outcomes: list[int] = field(default_factory=list)
    final_status: int | None = None
    final_output: str = ""

    def in_doubt(self) -> list[int]:
        """Ops each run found in flight at its start: what the kill before it interrupted."""
        wanted = "ops_in_doubt_at_start"
        return [
            sum(int(e.get("count", 0)) for e in events(log) if e["event"] == wanted)
            for log in sorted(self.logs.glob("run-*.log"))
        ]

    def untested(self) -> list[str]:
        """A problem when enough kills were made and none of them caught an op in flight."""
        if len(self.outcomes) < MEANINGFUL_KILLS or any(self.in_doubt()):
            return []
        return ["no kill interrupted an op in flight: the trial tested less than it says"]

    def report(self, problems: list[str]) -> str:
        """What failed, the seed to replay it, and what the runs did and logged."""
        warnings = [
            f"{log.name}: {json.dumps(e)}"
            for log in sorted(self.logs.glob("run-*.log"))
            for e in events(log)
            if e.get("level") != "info" and e["event"] != "ops_in_doubt_at_start"
        ]
        lines = [
            f"crash trial failed (BRIDGE_TRIAL_SEED={self.seed} replays the kill delays;"
            f" run logs in {self.logs}):",
            *(f"  - {p}" for p in problems),
            f"exit statuses of the killed runs: {self.outcomes}",
            f"ops in doubt at each start (final last): {self.in_doubt()}",
            f"last warnings and errors of all runs ({len(warnings)}):",
            *warnings[-20:],
            f"final run (exit {self.final_status}):",
            self.final_output[-2000:],
        ]
        return "\n".join(lines)


def events(log: Path) -> list[dict[str, Any]]:
    """The JSON log events in a run's output; a line cut short by the kill is skipped."""
    found = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                found.append(event)
    return found


def make_trial(tmp_path: Path, ghl_url: str, ghl: GhlSim, token: str, source: str) -> Trial:
    """Write the config for one source and return the trial around it."""
    state, logs = tmp_path / "state.db", tmp_path / "logs"
    logs.mkdir()
    text = CONFIG.format(
        state=state, location_id=LOCATION_ID, ghl_url=ghl_url, token=token, unlimited=UNLIMITED
    )
    config = tmp_path / "bridge.toml"
    config.write_text(text + source, encoding="utf-8")
    return Trial(ghl=ghl, config=config, state=state, logs=logs, seed=trial_seed())


def ghl_sim() -> tuple[GhlSim, str]:
    # Budgets as high as the bridge's config: a rate-limit header could only slow it.
    ghl = GhlSim(seed=11, burst_limit=UNLIMITED, daily_limit=UNLIMITED)
    ghl.add_location(LOCATION_ID)
    return ghl, ghl.add_private_token(LOCATION_ID)


async def run_bridge(trial: Trial, log: Path, args: tuple[str, ...], *, limit: float) -> int:
    """Run ``bridge ARGS`` until it exits or ``limit`` seconds pass, then SIGKILL it.

    Returns its exit status (``-9`` when killed). Output goes to ``log``, not a pipe: an
    unread pipe that fills would stall the bridge.
    """
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "--config",
            str(trial.config),
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        return await asyncio.wait_for(proc.wait(), limit)
    except TimeoutError:
        sigkill(proc)
        return await proc.wait()
    finally:
        # Also when the test itself fails or times out: no bridge outlives its simulators.
        sigkill(proc)


def sigkill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have ended just now
            proc.send_signal(signal.SIGKILL)


async def crash_then_finish(trial: Trial, *args: str) -> None:
    """Start ``bridge ARGS``, SIGKILL it at a random moment, repeat; then one run to the end."""
    rng = random.Random(trial.seed)
    kills = kill_count()
    print(f"crash trial: BRIDGE_TRIAL_SEED={trial.seed}, {kills} kills, logs in {trial.logs}")
    for n in range(kills):
        log = trial.logs / f"run-{n:02d}.log"
        trial.outcomes.append(await run_bridge(trial, log, args, limit=rng.uniform(*KILL_AFTER)))
    final_log = trial.logs / "run-final.log"  # sorts after run-NN.log
    started = time.monotonic()
    status = await run_bridge(trial, final_log, args, limit=FINAL_RUN_LIMIT)
    trial.final_status = None if status == -signal.SIGKILL else status
    trial.final_output = final_log.read_text(encoding="utf-8", errors="replace")
    print(f"killed runs' exit statuses: {trial.outcomes}")
    print(f"ops in doubt at each start (runs in order, final last): {trial.in_doubt()}")
    print(f"final run: exit {status} after {time.monotonic() - started:.1f} s")
    print(trial.final_output)


def exactly_once(what: str, counts: Mapping[str, int], expected: Collection[str]) -> list[str]:
    """Problems with how often each key landed (``counts``) against the keys expected once."""
    wanted = set(expected)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    missing = sorted(wanted - counts.keys())
    unexpected = sorted(counts.keys() - wanted)
    problems: list[str] = []
    if duplicated:
        shown = dict(sorted(duplicated.items())[:SAMPLE])
        problems.append(f"{what}: {len(duplicated)} duplicated (key: count), e.g. {shown}")
    if missing:
        problems.append(f"{what}: {len(missing)} of {len(wanted)} missing, e.g. {missing[:SAMPLE]}")
    if unexpected:
        problems.append(f"{what}: {len(unexpected)} unexpected, e.g. {unexpected[:SAMPLE]}")
    return problems


def mismatches(what: str, pairs: Iterable[tuple[str, object, object]]) -> list[str]:
    """One problem naming the keys whose value (second) differs from the wanted one (third)."""
    wrong = [(k, got, want) for k, got, want in pairs if got != want]
    if not wrong:
        return []
    shown = [f"{k}: {got!r} (want {want!r})" for k, got, want in wrong[:SAMPLE]]
    return [f"{what}: {len(wrong)} wrong, e.g. {shown}"]


class Contacts:
    """The GHL contacts and conversations, looked up the way GHL matches a person."""

    def __init__(self, ghl: GhlSim) -> None:
        self.all = ghl.contacts(LOCATION_ID)
        self.by_email = {str(c["email"]): str(c["id"]) for c in self.all if c.get("email")}
        self.by_phone = {
            str(c["phone"]): str(c["id"]) for c in self.all if c.get("phone") and not c["email"]
        }
        self.conversations = ghl.conversations(LOCATION_ID)
        self.conversation_of = {str(c["contactId"]): str(c["id"]) for c in self.conversations}

    def of(self, email: str | None, phone: str | None) -> str | None:
        """The contact id for a person's e-mail or, without one, their phone."""
        if email:
            return self.by_email.get(email.lower())
        return self.by_phone.get(normalize_phone(phone)) if phone else None

    def check(self, people: Iterable[tuple[str | None, str | None]]) -> list[str]:
        """One contact per person (by e-mail, else phone) and one conversation per contact."""
        listed = list(people)
        emails = Counter(str(c["email"]) for c in self.all if c.get("email"))
        phones = Counter(str(c["phone"]) for c in self.all if not c.get("email"))
        wanted_phones = {normalize_phone(p) for e, p in listed if not e and p}
        threads = Counter(str(c["contactId"]) for c in self.conversations)
        return [
            *exactly_once("contacts by e-mail", emails, {e.lower() for e, _ in listed if e}),
            *exactly_once("contacts by phone (people without e-mail)", phones, wanted_phones),
            *exactly_once("conversations by contact", threads, {str(c["id"]) for c in self.all}),
        ]


def check_messages(ghl: GhlSim, thread_of: Mapping[str, str | None]) -> list[str]:
    """One GHL message per expected ``altId``, in the conversation of the right contact."""
    messages = ghl.messages(location_id=LOCATION_ID)
    unkeyed = [str(m["id"]) for m in messages if not m.get("altId")]
    problems = exactly_once("messages by altId", ghl.messages_by_alt_id(), thread_of.keys())
    if unkeyed:
        problems.append(f"{len(unkeyed)} messages without an altId, e.g. {unkeyed[:SAMPLE]}")
    pairs = [
        (str(m["altId"]), m["contactId"], thread_of[m["altId"]])
        for m in messages
        if m.get("altId") in thread_of
    ]
    return problems + mismatches("messages in the wrong contact's thread", pairs)


async def check_outbox(state: Path, *, dead: Mapping[str, str] | None = None) -> list[str]:
    """Nothing pending, in flight or in doubt; dead letters exactly ``dead`` (key -> reason)."""
    async with Store.open(state) as store:
        counts = await store.outbox_counts()
        letters = await store.dead_letters(limit=1000)
    problems = []
    open_ops = {s: n for s, n in counts.items() if s != "done" and n}
    if open_ops:
        problems.append(f"outbox not empty: {open_ops} (done: {counts['done']})")
    got = {dl.source_key: dl.error for dl in letters}
    wanted = dict(dead or {})
    if got.keys() != wanted.keys():
        problems.append(f"dead letters {sorted(got.items())}, expected keys {sorted(wanted)}")
    problems += [
        f"dead letter {key} says {got[key]!r}, expected it to mention {reason!r}"
        for key, reason in wanted.items()
        if key in got and reason not in got[key]
    ]
    return problems


# ---------------------------------------------------------------- Action Network


@pytest.mark.timeout(900)
async def test_action_network_backfill_survives_repeated_kills(tmp_path: Path) -> None:
    """Killed 20 times mid-backfill, 2,000 people still land exactly once each, with write-backs."""
    an, keys = build_an_sim(people=PEOPLE, activities_per_person=ACTIVITIES_PER_PERSON, seed=5)
    key = keys[0]
    an.set_rate_limit(UNLIMITED)
    ghl, token = ghl_sim()
    async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
        source = AN_SOURCE_CONFIG.format(source=AN_SOURCE, key=key, url=an_url, unlimited=UNLIMITED)
        trial = make_trial(tmp_path, ghl_url, ghl, token, source)
        await crash_then_finish(trial, "backfill", AN_SOURCE, "--since", SINCE)

    assert trial.final_status == 0, trial.report(["the final backfill did not exit 0"])
    population = an.population(key)
    assert population is not None
    people = [an.person(population.person_id(i), key) for i in range(population.count)]
    contacts = Contacts(ghl)
    problems = contacts.check((p.email, p.phone) for p in people)
    # Each activity's altId is the flow's source key: "<source>:<type>:<activity id>".
    thread_of: dict[str, str | None] = {}
    for person in people:
        contact = contacts.of(person.email, person.phone)
        for kind, (records, _, _) in ACTIVITY_TYPES.items():
            found, total = an.list_records(key, records, person_id=person.id, limit=100)
            assert total == len(found)
            thread_of |= {f"{AN_SOURCE}:{kind}:{a.id}": contact for a in found}
    assert len(thread_of) == PEOPLE * ACTIVITIES_PER_PERSON
    problems += check_messages(ghl, thread_of)
    # The write-back: the GHL ids in the person's Action Network custom fields.
    written = []
    for person in people:
        contact = contacts.of(person.email, person.phone)
        want = (contact, contacts.conversation_of.get(contact or ""))
        got = (
            person.custom_fields.get("ghl_contact_id"),
            person.custom_fields.get("ghl_conversation_id"),
        )
        written.append((person.id, got, want))
    problems += mismatches("Action Network write-backs (contact id, conversation id)", written)
    problems += await check_outbox(trial.state)
    print(
        f"checked {len(people)} people: {len(contacts.all)} contacts,"
        f" {len(contacts.conversations)} conversations, {len(thread_of)} messages, write-backs"
    )
    problems += trial.untested()
    assert not problems, trial.report(problems)


# ---------------------------------------------------------------- ActiveDEMAND


def ad_dead_letters(ad: AdSim, seeded: SeededAccount) -> dict[str, str]:
    """The refused files' upload keys and what their dead letters must say."""
    found = {}
    for message_id in (seeded.disallowed_message_id, seeded.oversized_message_id):
        (attached,) = ad.message(seeded.key, message_id).attachments
        found[f"{AD_SOURCE}:message:{message_id}:file:0"] = AD_REFUSED[attached.file_name]
    return found


@pytest.mark.timeout(900)
async def test_activedemand_backfill_survives_repeated_kills(tmp_path: Path) -> None:
    """Killed 20 times mid-backfill, 2,000 contacts and their messages land exactly once each."""
    ad = AdSim(seed=5, rate_limit=UNLIMITED)
    seeded = seed_account(
        ad, "sim-ad-trial", contacts=PEOPLE, conversations=AD_CONVERSATIONS, seed=5
    )
    app_key = ad.add_application(accounts=[seeded.key])
    ghl, token = ghl_sim()
    async with serve(build_ad_app(ad)) as ad_url, serve(build_ghl_app(ghl)) as ghl_url:
        source = AD_SOURCE_CONFIG.format(
            source=AD_SOURCE, key=seeded.key, app_key=app_key, url=ad_url, unlimited=UNLIMITED
        )
        trial = make_trial(tmp_path, ghl_url, ghl, token, source)
        await crash_then_finish(trial, "backfill", AD_SOURCE, "--since", SINCE)

    # Exit 1 when this run was the one to dead-letter the two refused files; a killed run
    # may have done so already, and then the final run has nothing to report.
    finished = trial.final_status == 0 or (
        trial.final_status == 1 and "dead-lettered in this run" in trial.final_output
    )
    assert finished, trial.report(["the final backfill did not finish"])
    key = seeded.key
    people = {c.id: (c.email, c.values.get(PHONE)) for c in ad.contacts(key)}
    contacts = Contacts(ghl)
    problems = contacts.check(people.values())
    thread_of: dict[str, str | None] = {}
    for conversation_id in seeded.conversation_ids:
        conversation = ad.conversation(key, conversation_id)
        contact = contacts.of(*people[conversation.contact_id])
        thread_of |= {f"{AD_SOURCE}:message:{m}": contact for m in conversation.message_ids}
    problems += check_messages(ghl, thread_of)
    # Once per transcribed call: the GHL note, and the transcript and the routing alert
    # written back into ActiveDEMAND; each carries the marker of its op's key.
    calls = [f"{AD_SOURCE}:message:{m}" for m in seeded.call_message_ids]
    notes = [str(n.get("body") or "") for n in ghl.all_notes()]
    histories = [h.text for h in ad.histories(key, source="api")]
    for what, texts, suffix in (
        ("call transcript notes in GHL", notes, ":transcript"),
        ("transcripts written to ActiveDEMAND", histories, ":transcript:ad"),
        ("routing alerts written to ActiveDEMAND", histories, ":rule:canvass-yes:alert"),
    ):
        counts = Counter(k + suffix for k in calls for t in texts if marker(k + suffix) in t)
        problems += exactly_once(what, counts, [k + suffix for k in calls])
    problems += await check_outbox(trial.state, dead=ad_dead_letters(ad, seeded))
    print(
        f"checked {len(people)} contacts: {len(contacts.all)} in GHL,"
        f" {len(contacts.conversations)} conversations, {len(thread_of)} messages,"
        f" {len(calls)} calls' notes, transcripts and alerts"
    )
    problems += trial.untested()
    assert not problems, trial.report(problems)
