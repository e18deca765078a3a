"""End to end: one daemon, three GHL locations, two of them in trouble, one unaffected.

Each location has its own GHL simulator and its own Action Network group (same seed, so
the same people). One location's token is revoked before the start, one answers every
request with 429. The healthy location is first synced alone, then with the two bad
neighbours, by ``bridge run`` as a real process; both runs are timed to the moment its
last record lands in GHL. Every location's budget (20 requests/s, the simulators allow
more) bounds its throughput, as GHL's budgets do in production, so the two timings
compare isolation rather than CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
import pytest_asyncio

from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.actionnetwork_state import AnSim
from bridge.sim.an_data import build_sim as build_an_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim

pytestmark = pytest.mark.asyncio(loop_scope="module")

PEOPLE = 12
SEED = 5
BUDGET = 20  # requests per second per location, the bridge's side
SYNC_LIMIT = 20.0  # seconds a phase may take before the test gives up

CONFIG_HEAD = """\
[state]
path = "{state}"

[logging]
level = "info"
format = "json"

[pipeline]
retry_base = "200ms"
retry_cap = "2s"
idle_poll = "100ms"
drain_grace = "1s"
target_recheck = "5m"
"""

LOCATION = """
[[ghl.locations]]
name = "{name}"
location_id = "{location_id}"
base_url = "{ghl_url}"
auth = {{ kind = "private_token", token = "{token}" }}
limits = {{ burst = {budget}, window = "1s" }}

[[sources.action_network]]
name = "an-{name}"
location = "{name}"
api_key = "{an_key}"
base_url = "{an_url}/api/v2"
streams = ["people", "activities"]
poll_interval = "1s"
# The whole seeded history lies in the window, so a live run reads it without a backfill.
overlap = "5000d"
rate = 100.0
"""


@dataclass
class Location:
    """One GHL location's simulators, served, with what the config needs to reach them."""

    name: str
    ghl: GhlSim
    ghl_url: str
    location_id: str
    token: str
    an: AnSim
    an_url: str
    an_key: str

    def config(self) -> str:
        return LOCATION.format(
            name=self.name,
            location_id=self.location_id,
            ghl_url=self.ghl_url,
            token=self.token,
            budget=BUDGET,
            an_key=self.an_key,
            an_url=self.an_url,
        )

    def activities(self) -> int:
        counts = self.an.counts(self.an_key)
        kinds = ("submissions", "signatures", "attendances", "donations", "outreaches")
        return sum(counts[k] for k in kinds)

    def synced(self) -> bool:
        stats = self.ghl.stats()
        return bool(stats["contacts"] == PEOPLE and stats["messages"] == self.activities())


@contextlib.asynccontextmanager
async def location(name: str) -> AsyncIterator[Location]:
    """A GHL simulator and an Action Network group for one location, both serving."""
    an, keys = build_an_sim(people=PEOPLE, seed=SEED)
    an.set_rate_limit(200)
    ghl = GhlSim(seed=SEED)
    location_id = f"{name.replace('-', '')}Location0000001"[:20]
    ghl.add_location(location_id)
    # Above the bridge's budget, over the same window, so its headers never tighten it.
    ghl.set_rate_limit(100, 1.0, None)
    token = ghl.add_private_token(location_id)
    async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
        yield Location(name, ghl, ghl_url, location_id, token, an, an_url, keys[0])


@dataclass
class Phase:
    """One `bridge run` until the healthy location was synced: how long, and what it left."""

    seconds: float
    exit_status: int
    log: list[dict[str, Any]]
    log_text: str
    status_json: dict[str, Any]
    status_text: str


async def bridge(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, output.decode()


def write_config(directory: Path, locations: list[Location]) -> Path:
    directory.mkdir()
    config = directory / "bridge.toml"
    text = CONFIG_HEAD.format(state=directory / "state.db")
    config.write_text(text + "".join(loc.config() for loc in locations))
    return config


def open_log(path: Path) -> BinaryIO:
    return path.open("wb")


async def run_phase(directory: Path, healthy: Location, others: list[Location]) -> Phase:
    """Start `bridge run`, time it until ``healthy`` has every record, stop it, read status."""
    config = write_config(directory, [healthy, *others])
    log_path = directory / "bridge.log"
    # A file, not a pipe: nobody reads a pipe while the run goes, and a full one would
    # block the bridge's logging and so the very throughput being measured.
    with open_log(log_path) as log_file:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "--config",
            str(config),
            "run",
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(SYNC_LIMIT):
                # The simulators live in this loop: polling them costs no request.
                while not healthy.synced():
                    assert proc.returncode is None, "the bridge stopped before the sync ended"
                    await asyncio.sleep(0.02)
            seconds = time.monotonic() - started
            await asyncio.sleep(0.5)  # the flooded location's ops keep waiting meanwhile
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            exit_status = await asyncio.wait_for(proc.wait(), 15)
    log_text = read_text(log_path)
    status, status_json = await bridge(config, "status", "--json")
    assert status == 0, status_json
    status, status_text = await bridge(config, "status")
    assert status == 0, status_text
    print(f"--- bridge status ({directory.name}) ---\n{status_text}")
    return Phase(
        seconds=seconds,
        exit_status=exit_status,
        log=[json.loads(line) for line in log_text.splitlines() if line.startswith("{")],
        log_text=log_text,
        status_json=json.loads(status_json),
        status_text=status_text,
    )


def read_text(path: Path) -> str:
    text = path.read_text()
    print(f"--- {path} ---\n{text}")  # shown when a test fails
    return text


@dataclass
class Isolation:
    """Both phases, and the locations of the second one."""

    alone: Phase
    together: Phase
    healthy: Location
    revoked: Location
    flooded: Location

    def group(self, name: str) -> dict[str, Any]:
        groups: list[dict[str, Any]] = self.together.status_json["locations"]
        (found,) = [g for g in groups if g["location"] == name]
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def isolation(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Isolation]:
    directory = tmp_path_factory.mktemp("locations")
    async with location("solo") as solo:
        alone = await run_phase(directory / "alone", solo, [])
    async with (
        location("loc-a") as healthy,
        location("loc-b") as revoked,
        location("loc-c") as flooded,
        aiohttp.ClientSession() as session,
    ):
        # Through the simulators' control routes, as an operator's script would.
        async with session.post(
            f"{revoked.ghl_url}/_sim/ghl/revoke", json={"locationId": revoked.location_id}
        ) as resp:
            assert resp.status == 200
        rule = {"route": "*", "status": 429, "share": 1.0}
        async with session.post(f"{flooded.ghl_url}/_sim/faults", json={"rules": [rule]}) as resp:
            assert resp.status == 200
        together = await run_phase(directory / "together", healthy, [revoked, flooded])
        yield Isolation(alone, together, healthy, revoked, flooded)


async def test_healthy_location_throughput_is_unaffected(isolation: Isolation) -> None:
    """The healthy location syncs as fast beside a revoked and a flooded one as alone."""
    alone, together = isolation.alone.seconds, isolation.together.seconds
    records = PEOPLE + isolation.healthy.activities()
    print(
        f"\nhealthy location, {PEOPLE} people and {records - PEOPLE} activities:"
        f" alone {alone:.2f} s ({records / alone:.1f} records/s),"
        f" beside a revoked and a flooded location {together:.2f} s"
        f" ({records / together:.1f} records/s), ratio {together / alone:.2f}"
    )
    assert together <= 1.5 * alone + 1.0
    assert isolation.alone.exit_status == 0
    assert isolation.together.exit_status == 0  # SIGTERM: a clean stop, nothing fatal


async def test_healthy_location_got_every_record_once(isolation: Isolation) -> None:
    """Every person and activity of the healthy location arrived exactly once."""
    ghl = isolation.healthy.ghl
    stats = ghl.stats()
    emails = [c["email"] for c in ghl.contacts()]
    assert len(emails) == len(set(emails)) == PEOPLE
    assert stats["conversations"] == PEOPLE
    assert stats["messages"] == isolation.healthy.activities()
    assert stats["duplicateAltIds"] == {}
    assert stats["rateLimited"] == 0
    group = isolation.group("loc-a")
    assert group["health"]["state"] == "ok"
    assert group["dead_letters"]["total"] == 0


async def test_revoked_location_reports_auth_error(isolation: Isolation) -> None:
    """The revoked location is down with AuthError in `bridge status` and in the logs."""
    group = isolation.group("loc-b")
    assert group["health"]["state"] == "down"
    assert group["health"]["error"].startswith("AuthError: GHL location 'loc-b'")
    assert "location loc-b: DOWN since" in isolation.together.status_text
    assert "AuthError: GHL location 'loc-b'" in isolation.together.status_text
    (down,) = [e for e in isolation.together.log if e["event"] == "target_down"]
    assert (down["level"], down["target"], down["location"]) == ("error", "ghl:loc-b", "loc-b")
    assert down["error"].startswith("AuthError:")
    # Its people were read and wait in the outbox; nothing was sent with the dead token.
    (ghl_b,) = [t for t in group["targets"] if t["target"] == "ghl:loc-b"]
    assert ghl_b["outbox"]["pending"] > 0
    assert ghl_b["outbox"]["done"] == 0
    assert isolation.revoked.ghl.stats()["contacts"] == 0


async def test_flooded_location_keeps_its_ops(isolation: Isolation) -> None:
    """The flooded location's ops are all still in the outbox: none dead-lettered or lost."""
    group = isolation.group("loc-c")
    assert group["health"]["state"] == "ok"  # rate limited is not down
    assert group["dead_letters"]["total"] == 0
    (ghl_c,) = [t for t in group["targets"] if t["target"] == "ghl:loc-c"]
    (ghl_a,) = [t for t in isolation.group("loc-a")["targets"] if t["target"] == "ghl:loc-a"]
    # Same seed, same people: every op the healthy location performed, this one still holds.
    waiting = (
        ghl_c["outbox"]["pending"] + ghl_c["outbox"]["in_doubt"] + ghl_c["outbox"]["in_flight"]
    )
    assert waiting == ghl_a["outbox"]["done"]
    assert ghl_c["outbox"]["done"] == 0
    # Refused, and waiting out the pause that the refusal put on its budget.
    assert isolation.flooded.ghl.journal.status_counts().get(429, 0) >= 1
    assert isolation.flooded.ghl.stats()["contacts"] == 0
    (budget,) = [b for b in group["budgets"] if b["api"] == "ghl"]
    assert budget["paused_until"] is not None


async def test_no_token_reaches_the_logs(isolation: Isolation) -> None:
    """Neither the logs nor status carry a GHL token or an Action Network key."""
    text = isolation.together.log_text + isolation.together.status_text
    for loc in (isolation.healthy, isolation.revoked, isolation.flooded):
        assert loc.token not in text
        assert loc.an_key not in text
