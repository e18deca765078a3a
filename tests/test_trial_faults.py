"""Trials under fire: real ``bridge`` processes against simulators that fail, stall and expire.

Each trial serves the Action Network and GHL simulators from this module's event loop,
runs the daemon as a child process with JSON logs on its stdout, and then judges the run
from the simulators' state and journals, the state file and the logged events. The fault
pattern and the data come from one seed, printed by each test; set ``TRIAL_SEED`` to
replay it (the daemon's own jitter and the scheduler still vary between runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.clock import SystemClock
from bridge.config import GhlLocation, OAuthAuth
from bridge.connectors.ghl.auth import OAuthTokens
from bridge.rest import make_session
from bridge.secrets import Secret
from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.actionnetwork_state import AnSim
from bridge.sim.an_data import build_sim as build_an_sim
from bridge.sim.common import FaultRule, Faults, JournalEntry, serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim
from bridge.store import Store

CLIENT_ID = "trial-app"
CLIENT_SECRET = "trial-app-secret-5c4b3a"
SINCE = "2000-01-01"
MAX_ATTEMPTS = 10
KINDS = ("signatures", "submissions", "attendances", "donations", "outreaches")

# Budgets far above the live ones (GHL 100 per 10 s, AN 4/s) so a few hundred people sync
# within the test's time; the simulators enforce exactly what the config says.
GHL_BURST = 100
GHL_WINDOW = 1.0
AN_RATE = 100

# aiohttp's total timeout from bridge.rest.make_session. The config's per-location
# `timeout` never reaches the session, so a slow answer must outlast this one; aiohttp
# rounds deadlines of more than 5 s up to a whole second, hence the extra second.
CLIENT_TIMEOUT = 30.0
SLOW = CLIENT_TIMEOUT + 1.5

HEAD = """\
[state]
path = "{state}"

[logging]
level = "info"
format = "json"

[pipeline]
max_attempts = {max_attempts}
retry_base = "200ms"
retry_cap = "2s"
idle_poll = "200ms"
"""

PRIVATE = '{{ kind = "private_token", token = "{token}" }}'
OAUTH = '{{ kind = "oauth", client_id = "{client_id}", client_secret = "{client_secret}" }}'

LOCATION = """
[[ghl.locations]]
name = "{name}"
location_id = "{location_id}"
base_url = "{ghl_url}"
auth = {auth}
limits = {{ burst = {burst}, window = "{window}s" }}
"""

SOURCE = """
[[sources.action_network]]
name = "{name}"
location = "{location}"
api_key = "{an_key}"
base_url = "{an_url}/api/v2"
streams = ["people", "activities"]
rate = {rate}
poll_interval = "1s"
overlap = "1s"
"""

# Each write-back changes the person in Action Network, so the next poll reads every
# person again: six requests each, which the fault trial cannot afford between runs.
NO_WRITE_BACK = 'write_back = { contact_id = "", conversation_id = "" }\n'


def trial_seed(name: str) -> int:
    """The seed of one trial: ``TRIAL_SEED`` if set, else a fresh one, printed either way."""
    raw = os.environ.get("TRIAL_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 31)
    print(f"{name}: seed {seed} (replay with TRIAL_SEED={seed})")
    return seed


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Pair:
    """One Action Network group (a source) synced into a GHL location of its own."""

    source: str
    an_key: str
    location: str
    location_id: str


@dataclass
class World:
    """Both simulators, serving, and a config file pointing a daemon at them."""

    directory: Path
    an: AnSim
    ghl: GhlSim
    ghl_url: str
    pairs: list[Pair]
    config_path: Path

    @property
    def state_path(self) -> Path:
        return self.directory / "state.db"


@contextlib.asynccontextmanager
async def trial_world(
    directory: Path,
    *,
    seed: int,
    groups: int,
    people: int,
    ghl: GhlSim,
    oauth: bool = False,
    write_back: bool = True,
) -> AsyncIterator[World]:
    """Serve seeded groups and ``ghl`` on loopback and write the daemon's config.

    Each group goes to a location of its own: generated phone numbers repeat across
    groups, and one location would rightly merge such people into one contact.
    """
    an, keys = build_an_sim(people=people, activities_per_person=2, seed=seed, groups=groups)
    an.set_rate_limit(AN_RATE, 1.0)
    pairs = [
        Pair(f"an{n}", key, f"loc{n}", f"trialLocation{n:07d}") for n, key in enumerate(keys, 1)
    ]
    if oauth:
        ghl.add_oauth_app(CLIENT_ID, CLIENT_SECRET)
    async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
        text = HEAD.format(state=directory / "state.db", max_attempts=MAX_ATTEMPTS)
        for pair in pairs:
            ghl.add_location(pair.location_id)
            if oauth:
                auth = OAUTH.format(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
            else:
                auth = PRIVATE.format(token=ghl.add_private_token(pair.location_id))
            text += LOCATION.format(
                name=pair.location,
                location_id=pair.location_id,
                ghl_url=ghl_url,
                auth=auth,
                burst=GHL_BURST,
                window=f"{GHL_WINDOW:g}",
            )
        for pair in pairs:
            text += SOURCE.format(
                name=pair.source,
                location=pair.location,
                an_key=pair.an_key,
                an_url=an_url,
                rate=AN_RATE,
            )
            text += "" if write_back else NO_WRITE_BACK
        config_path = directory / "bridge.toml"
        config_path.write_text(text, encoding="utf-8")
        yield World(directory, an, ghl, ghl_url, pairs, config_path)


# --------------------------------------------------------------------------- running the daemon


@dataclass
class Run:
    """One daemon process: how it ended and the JSON events it logged."""

    status: int
    events: list[dict[str, Any]]
    killed: bool
    log: Path


@dataclass
class Runs:
    """Every process of a trial, so the logs can be judged across restarts."""

    world: World
    done: list[Run] = field(default_factory=list)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for run in self.done for e in run.events]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def bridge(
        self, *args: str, on_event: Callable[[dict[str, Any]], bool] | None = None
    ) -> Run:
        """Run ``bridge ARGS``; SIGKILL it as soon as ``on_event`` returns True for a log event."""
        log = self.world.directory / f"run-{len(self.done) + 1}.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "--config",
            str(self.world.config_path),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=1 << 22,
        )
        assert proc.stdout is not None
        events: list[dict[str, Any]] = []
        killed = False
        with log.open("w", encoding="utf-8") as out:
            # Read as the daemon writes (it flushes every line): the kill must land right
            # after the line that asks for it.
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                out.write(line)
                event = _event(line)
                if event is None:
                    continue
                events.append(event)
                if on_event is not None and not killed and on_event(event):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
        status = await proc.wait()
        run = Run(status, events, killed, log)
        self.done.append(run)
        print(f"bridge {' '.join(args)}: exit {status}{' (killed)' if killed else ''}, log {log}")
        return run


def _event(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None  # the run summary and dead-letter lines are plain text
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class AfterStart:
    """An ``on_event`` hook that adds fault rules once the daemon's start-up probes are done."""

    def __init__(self, faults: Faults, *rules: FaultRule) -> None:
        self._faults = faults
        self._rules = rules
        self.done = False

    def __call__(self, event: dict[str, Any]) -> bool:
        if event.get("event") == "service_ready" and not self.done:
            self.done = True
            for rule in self._rules:
                self._faults.add(rule)
        return False


async def catch_up(runs: Runs, run: Run, *, tries: int = 3) -> int:
    """Replay dead letters and run once until none are left, as an operator would.

    Only the GHL target's rule "repeated server errors while other calls succeed: bad
    input", and the ops of a person waiting on such a contact, may dead-letter here;
    everything else the simulators inject is transient and must be retried instead.
    Returns the number of replays it took.
    """
    for replays in range(tries + 1):
        letters = await dead_letters(runs.world)
        if not letters:
            assert run.status == 0
            return replays
        assert replays < tries, f"still dead letters after {tries} replays: {letters}"
        for reason in letters:
            assert "treating it as bad input" in reason or "has not succeeded" in reason, reason
        print(f"replaying {len(letters)} dead letter(s): {letters}")
        assert (await runs.bridge("dlq", "replay", "--all")).status == 0
        run = await runs.bridge("once", "--no-progress")
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- judging


async def dead_letters(world: World) -> list[str]:
    async with Store.open(world.state_path) as store:
        return [dl.error for dl in await store.dead_letters(limit=1000)]


def outbox_attempts(world: World) -> tuple[int, int]:
    """(open ops, most attempts of any op) read straight from the state file."""
    uri = f"file:{world.state_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        (open_ops,) = conn.execute("SELECT count(*) FROM outbox WHERE state != 'done'").fetchone()
        (most,) = conn.execute("SELECT coalesce(max(attempts), 0) FROM outbox").fetchone()
    return int(open_ops), int(most)


def assert_synced_exactly_once(world: World) -> None:
    """Per group: one contact per person, one conversation each, one message per activity."""
    an, ghl = world.an, world.ghl
    alt_ids = ghl.messages_by_alt_id()
    assert {a: n for a, n in alt_ids.items() if n != 1} == {}
    for pair in world.pairs:
        counts = an.counts(pair.an_key)
        people = [
            p
            for offset in range(0, counts["people"], 25)
            for p in an.list_people(pair.an_key, offset=offset, limit=25)
        ]
        assert len(people) == counts["people"]
        # Some people have a phone number only: matched by it, counted by the total.
        emails = [p.emails[0]["address"].lower() for p in people if p.emails]
        contacts = ghl.contacts(pair.location_id)
        by_email = Counter(str(c["email"]) for c in contacts if c.get("email"))
        assert {e: n for e, n in by_email.items() if n != 1} == {}
        assert sorted(by_email) == sorted(emails)
        assert len(contacts) == len(people)
        by_contact = Counter(c["contactId"] for c in ghl.conversations(pair.location_id))
        assert len(by_contact) == len(people)
        assert set(by_contact.values()) == {1}
        mine = [a for a in alt_ids if a.startswith(f"{pair.source}:")]
        assert len(mine) == sum(counts[k] for k in KINDS)
    assert len(alt_ids) == sum(len(ghl.messages(location_id=p.location_id)) for p in world.pairs)
    assert ghl.stats()["sentOutbound"] == 0


def assert_nothing_left(world: World) -> None:
    open_ops, most = outbox_attempts(world)
    assert open_ops == 0
    assert most <= MAX_ATTEMPTS


def assert_budgets_kept(world: World) -> None:
    """No window held more than the configured budget, and every 429 was an injected one."""
    ghl, an = world.ghl, world.an
    assert len(ghl.limiter.max_in_window()) == len(world.pairs)
    assert all(n <= GHL_BURST for n in ghl.limiter.max_in_window().values())
    assert all(n <= GHL_BURST for n in ghl.limiter.max_attempted_in_window().values())
    assert ghl.rate_limited == 0
    for pair in world.pairs:
        # The meter counts every request the key sent, faulted ones included.
        assert 0 < an.max_rate_seen(pair.an_key) <= AN_RATE
        assert an.rate_limited(pair.an_key) == 0
    assert all(n <= AN_RATE for n in an.limiter.max_in_window().values())
    for journal in (ghl.journal, an.journal):
        not_injected = [e for e in journal.entries if e.status == 429 and e.fault is None]
        assert not_injected == []


def overlapping(entries: Iterable[JournalEntry]) -> list[tuple[int, int]]:
    """Pairs of requests (by journal seq) that were in the simulator at the same time."""
    spans = sorted((e.started or e.ts, e.ts, e.seq) for e in entries)
    return [
        (earlier[2], later[2])
        for i, earlier in enumerate(spans)
        for later in spans[i + 1 :]
        if later[0] < earlier[1]
    ]


# --------------------------------------------------------------------------- 1. faults


def fault_mix() -> list[FaultRule]:
    """About one request in five fails, in each of the ways a network and a server can."""
    share = 0.031  # seven rules: 1 - (1 - 0.031) ** 7 ~ 20 %
    return [
        FaultRule(status=429, share=share, retry_after=0.2),
        FaultRule(status=500, share=share),
        FaultRule(status=502, share=share),
        FaultRule(status=503, share=share),
        FaultRule(reset=True, share=share),
        # The handler ran: the write landed, and the client is left in doubt.
        FaultRule(reset=True, after=True, share=share),
        FaultRule(status=502, after=True, share=share),
    ]


async def test_sync_under_twenty_percent_faults_arrives_exactly_once(tmp_path: Path) -> None:
    """A sync through 429s, 5xx, resets and timeouts delivers each record once, in budget."""
    seed = trial_seed("faults")
    ghl = GhlSim(seed=seed, burst_limit=GHL_BURST, burst_window=GHL_WINDOW)
    async with trial_world(
        tmp_path, seed=seed, groups=8, people=25, ghl=ghl, write_back=False
    ) as world:
        an = world.an
        # A slow read stalls one stream past the client's timeout (the handler runs late).
        slow_read = FaultRule(
            route="/api/v2/people/*/*", method="GET", delay=SLOW, share=0.02, times=1
        )
        an.faults.set([slow_read, *fault_mix()], seed=seed)
        # GHL documents no Retry-After (API_FACTS §5): one bare 429 pauses the bucket for
        # the bridge's default, a whole burst window.
        bare_429 = FaultRule(status=429, share=0.01, times=1)
        ghl.faults.set([bare_429, *fault_mix()], seed=seed + 1)
        # Several groups in one process, each stream from the beginning of history, so the
        # streams read in parallel: one stream's retries would not fit in the time.
        async with Store.open(world.state_path) as store:
            for pair in world.pairs:
                await store.set_cursor(f"{pair.source}.people", f"{SINCE}T00:00:00Z")

        # Only once the start-up probes are done: a probe that hangs for the client's whole
        # timeout would only delay the start.
        slow_ghl = AfterStart(
            ghl.faults,
            # The write lands; its answer comes after the client gave up: in doubt.
            FaultRule(method="POST", delay=SLOW, after=True, times=1),
            # A reconcile's lookup that hangs: a read, retried.
            FaultRule(
                route="/conversations/{conversationId}/messages", method="GET", delay=SLOW, times=1
            ),
        )
        runs = Runs(world)
        run = await runs.bridge("once", "--no-progress", on_event=slow_ghl)
        # The runs after a replay stay under the same fire.
        replays = await catch_up(runs, run)

        print(
            f"replays {replays}; faults fired: GHL {dict(ghl.faults.fired)},"
            f" AN {dict(an.faults.fired)}"
        )
        for fired in (ghl.faults.fired, an.faults.fired):
            kinds = {"status:429", "status:500", "status:502", "status:503", "reset", "delay"}
            assert kinds <= set(fired)
        assert_synced_exactly_once(world)
        assert_nothing_left(world)
        assert_budgets_kept(world)

        # Retries were logged with their reason, and bounded per op: only 429s, which are
        # the location's budget and not the record's fault, go uncounted.
        retries = runs.named("op_retry_scheduled")
        assert retries
        assert all(e.get("error") for e in retries)
        counted: Counter[int] = Counter()
        for e in retries:
            assert e["attempt"] <= MAX_ATTEMPTS
            if "HTTP 429" not in e["error"]:
                counted[e["op_id"]] += 1
        assert max(counted.values()) < MAX_ATTEMPTS
        # Every kind of trouble reached the daemon and was handled as what it is.
        every = retries + runs.named("an_read_retry")
        errors = " | ".join(e["error"] for e in every)
        for phrase in ("HTTP 429", "HTTP 500", "HTTP 502", "HTTP 503", "lost the connection"):
            assert phrase in errors
        assert "timed out" in errors
        # A Retry-After (0.2 s on the injected 429s) is a floor for the wait.
        assert all(e["retry_in"] >= 0.2 for e in every if "HTTP 429" in e["error"])
        reconciled = Counter(e["found"] for e in runs.named("op_reconciled"))
        assert reconciled[True] > 0  # a write that landed before its answer was lost
        assert reconciled[False] > 0  # one that never reached the handler
        assert runs.named("task_failed") == []


# --------------------------------------------------------------------------- 2. OAuth


TOKEN_TTL = 2
KILLS = 3
PROGRESS_BEFORE_KILL = 20
"""Ops a run must send before a refresh may end it, so every run moves the sync on."""


class KillAfterRefresh:
    """Says when to SIGKILL a run: at the first refresh once it has done some work."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, event: dict[str, Any]) -> bool:
        name = event.get("event")
        self.sent += name == "op_sent"
        return name == "oauth_token_refreshed" and self.sent >= PROGRESS_BEFORE_KILL


async def test_oauth_rotation_survives_expiry_and_sigkill(tmp_path: Path) -> None:
    """2 s tokens and SIGKILL right after refreshes lose no rotation; refreshes never overlap."""
    seed = trial_seed("oauth")
    # The token says an hour and lasts 2 s: every refresh is learnt from a 401, by every
    # sender at once, which is what single-flight must fold into one exchange.
    ghl = GhlSim(
        seed=seed,
        burst_limit=GHL_BURST,
        burst_window=GHL_WINDOW,
        access_token_ttl=TOKEN_TTL,
        token_expires_in=3600,
    )
    async with trial_world(tmp_path, seed=seed, groups=1, people=120, ghl=ghl, oauth=True) as world:
        (pair,) = world.pairs
        source, location, location_id = pair.source, pair.location, pair.location_id
        runs = Runs(world)
        code = ghl.issue_auth_code(location_id, client_id=CLIENT_ID)
        login = await runs.bridge("auth", "login", "--location", location, "--code", code)
        assert login.status == 0
        # A slow token endpoint, so two exchanges in flight at once would overlap visibly.
        ghl.faults.set([FaultRule(route="/oauth/token", delay=0.2)], seed=seed)

        backfill = ("backfill", source, "--since", SINCE, "--no-progress")
        for _ in range(KILLS):
            run = await runs.bridge(*backfill, on_event=KillAfterRefresh())
            assert run.killed, "the sync ended before every kill was made"
            # A new process starts with full buckets and cannot know what the killed one
            # spent, so, as systemd's RestartSec would, wait out the budget windows first.
            await asyncio.sleep(max(GHL_WINDOW, 1.0) + 0.1)
        final = await runs.bridge(*backfill)
        assert final.status == 0

        assert_synced_exactly_once(world)
        assert_nothing_left(world)
        assert_budgets_kept(world)
        assert await dead_letters(world) == []

        # Tokens did expire under the daemon, and each rotation the simulator made was
        # committed and logged by the daemon: none was lost to a kill.
        assert [e for e in ghl.journal.entries if e.status == 401]
        logged = runs.named("oauth_token_refreshed")
        print(f"refreshes: {len(logged)} logged, {ghl.refreshes[location_id]} at the simulator")
        assert ghl.refreshes[location_id] == len(logged) > KILLS
        token_calls = ghl.journal.select(route="/oauth/token")
        assert [e.status for e in token_calls] == [200] * len(token_calls)
        assert {e.tenant for e in token_calls} == {location_id}
        # Each refresh spans the endpoint's delay (the login's exchange came before it), so
        # any two at once would overlap.
        assert all(
            e.fault == "delay" and e.started is not None and e.ts - e.started >= 0.2
            for e in token_calls[1:]
        )
        assert overlapping(token_calls) == []
        text = "\n".join(run.log.read_text(encoding="utf-8") for run in runs.done)
        assert "invalid_grant" not in text
        assert "AuthError" not in text
        assert runs.named("target_down") == []

        # The location is healthy, and the stored refresh token is the live one: a fresh
        # client can still rotate it (the simulator refuses a replayed one).
        async with Store.open(world.state_path) as store:
            assert await store.health() == []
            row = await store.load_token(location)
            assert row is not None
            oauth = OAuthAuth(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET))
            config = GhlLocation(
                name=location, location_id=location_id, base_url=world.ghl_url, auth=oauth
            )
            async with make_session() as session:
                tokens = OAuthTokens(
                    config, oauth, store=store, session=session, clock=SystemClock()
                )
                await tokens.refresh(row.access_token)
        assert ghl.refreshes[location_id] == len(logged) + 1


# --------------------------------------------------------------------------- 3. bugs found


# Each reproduction below is one person with two activities and a few faults placed on
# purpose, so it fails the same way every time; strict, so a fix turns it into an error
# until the marker goes.


@contextlib.asynccontextmanager
async def one_person(tmp_path: Path, *rules: FaultRule, name: str) -> AsyncIterator[Runs]:
    """Backfill one person with two activities while ``rules`` meet the ops (not the probes)."""
    seed = trial_seed(name)
    ghl = GhlSim(seed=seed, burst_limit=GHL_BURST, burst_window=GHL_WINDOW)
    async with trial_world(
        tmp_path, seed=seed, groups=1, people=1, ghl=ghl, write_back=False
    ) as world:
        runs = Runs(world)
        hook = AfterStart(ghl.faults, *rules)
        await runs.bridge(
            "backfill", world.pairs[0].source, "--since", SINCE, "--no-progress", on_event=hook
        )
        assert ghl.faults.rules == []  # every fault met the op it was placed for
        yield runs


async def test_in_doubt_message_of_a_dead_lettered_conversation_lands_once(
    tmp_path: Path,
) -> None:
    """A message sent in doubt after its conversation op was dead-lettered is not duplicated."""
    async with one_person(
        tmp_path,
        # The conversation op is refused as bad input and dead-lettered...
        FaultRule(route="/conversations/", method="POST", status=422, times=1),
        # ...then the first message creates the conversation itself, and its answer is lost.
        FaultRule(
            route="/conversations/messages/inbound", method="POST", reset=True, after=True, times=1
        ),
        name="conversation-dead-lettered",
    ) as runs:
        assert sorted(runs.world.ghl.messages_by_alt_id().values()) == [1, 1]


async def test_one_server_error_after_two_resets_is_retried(tmp_path: Path) -> None:
    """A message whose sends met two resets and then one 500 is retried, not dead-lettered."""
    async with one_person(
        tmp_path,
        FaultRule(route="/conversations/messages/inbound", method="POST", reset=True, times=2),
        FaultRule(route="/conversations/messages/inbound", method="POST", status=500, times=1),
        name="one-server-error",
    ) as runs:
        assert await dead_letters(runs.world) == []
        assert sorted(runs.world.ghl.messages_by_alt_id().values()) == [1, 1]


async def test_replay_all_brings_a_person_back_in_order(tmp_path: Path) -> None:
    """After a person's upsert was dead-lettered, one replay and one run deliver everything."""
    async with one_person(
        tmp_path,
        FaultRule(route="/contacts/upsert", method="POST", status=422, times=1),
        name="replay-order",
    ) as runs:
        assert len(await dead_letters(runs.world)) > 1  # the upsert and what waited on it
        assert (await runs.bridge("dlq", "replay", "--all")).status == 0
        await runs.bridge("once", "--no-progress")
        assert await dead_letters(runs.world) == []
        assert_synced_exactly_once(runs.world)
