"""The daemon as systemd and an operator see it: a real ``bridge run`` process.

sd_notify messages are read from a datagram socket the test binds (as systemd would),
``/healthz``, ``/readyz`` and ``/metrics`` are read over loopback HTTP, and SIGHUP is sent
with a good and then a bad config while the daemon syncs against the simulators.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from bridge.demo import SOURCE, World, sim_world
from bridge.models import BudgetRow
from bridge.sim.common import FaultRule
from bridge.store import Store

PEOPLE = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd would listen; a short path (sun_path is ~107 bytes)."""
    directory = tempfile.mkdtemp(dir="/tmp", prefix="sdn")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


async def next_message(sock: socket.socket, within: float = 30.0) -> dict[str, str]:
    """The next notify datagram as a dict (``READY=1\\nSTATUS=x`` -> {READY: 1, STATUS: x})."""
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), within)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def drain(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram already waiting, without blocking."""
    found = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data = sock.recv(4096)
            found.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    return found


async def wait_for(sock: socket.socket, key: str, within: float = 30.0) -> list[dict[str, str]]:
    """Every message up to and including the first that carries ``key``."""
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + within
    while True:
        message = await next_message(sock, max(0.1, deadline - time.monotonic()))
        seen.append(message)
        if key in message:
            return seen


def json_config(world: World, *extra: str) -> str:
    text = world.config_path.read_text(encoding="utf-8")
    text = text.replace('format = "console"', 'format = "json"').replace(
        'level = "warning"', 'level = "info"'
    )
    return text + "\n".join(extra) + "\n"


@contextlib.asynccontextmanager
async def daemon(
    world: World, env: dict[str, str], *, python: tuple[str, ...] = (), stderr: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``bridge run`` as a child (``python``: interpreter options; ``stderr``: a file for it)."""
    with contextlib.ExitStack() as files:
        err = files.enter_context(stderr.open("wb")) if stderr is not None else None
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *python,
            "-m",
            "bridge",
            "--config",
            str(world.config_path),
            "run",
            env=os.environ | env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err if err is not None else asyncio.subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def eventually(check: Any, within: float = 30.0) -> Any:
    """Poll ``check`` (async, returns a truthy value when done) until it is done."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


def log_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [msgspec.json.decode(line) for line in lines if line.startswith("{")]


async def synced_person(world: World, email: str) -> dict[str, Any] | None:
    """Add a person in Action Network; their GHL contact once the daemon has synced it."""
    world.an.add_person(world.an_key, given_name="New", email_addresses=[{"address": email}])

    async def contact() -> dict[str, Any] | None:
        found = [c for c in world.ghl.contacts() if c.get("email") == email]
        return found[0] if found else None

    found: dict[str, Any] | None = await eventually(contact)
    return found


def with_log_file(world: World, log_file: Path, *extra: str) -> str:
    """The world's config as JSON info logs into ``log_file``, with ``extra`` lines."""
    return json_config(world, *extra).replace("[logging]", f'[logging]\nfile = "{log_file}"')


async def logged(path: Path, event: str) -> list[dict[str, Any]]:
    """Every ``event`` in the log so far, waiting up to 30 s for the first one."""

    async def found() -> list[dict[str, Any]]:
        return [e for e in log_events(path) if e["event"] == event]

    events: list[dict[str, Any]] = await eventually(found)
    return events


def samples(text: str) -> dict[str, list[Any]]:
    """Prometheus families by name, each with its samples, as prometheus-client parses them."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_notify_sequence_health_and_metrics_of_a_real_daemon(tmp_path: Path) -> None:
    """READY after the start-up checks, STATUS and WATCHDOG while syncing, STOPPING and
    EXTEND_TIMEOUT_USEC on SIGTERM; /readyz, /healthz and /metrics answer meanwhile."""
    port = free_port()
    async with sim_world(tmp_path, people=PEOPLE, activedemand=False) as world:
        world.config_path.write_text(
            json_config(world, "[http]", f'listen = "127.0.0.1:{port}"'), encoding="utf-8"
        )
        with notify_socket() as (sock, path):
            env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
            async with daemon(world, env) as proc:
                (ready, *_) = await wait_for(sock, "READY")
                assert ready["READY"] == "1"
                assert "stream" in ready["STATUS"]
                # The first run starts at now: these are the people it will sync.
                for i in range(PEOPLE):
                    world.an.add_person(
                        world.an_key,
                        given_name=f"New{i}",
                        email_addresses=[{"address": f"new{i}@example.org"}],
                    )
                status, body = await get(f"http://127.0.0.1:{port}/readyz")
                assert (status, msgspec.json.decode(body)["status"]) == (200, "ready")
                messages = await wait_for(sock, "WATCHDOG", within=5)
                assert messages[-1]["WATCHDOG"] == "1"
                assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200

                async def synced() -> dict[str, list[Any]] | None:
                    families = samples((await get(f"http://127.0.0.1:{port}/metrics"))[1])
                    sent = sum(s.value for s in families["bridge_ops_sent"])
                    return families if sent >= PEOPLE else None

                families = await eventually(synced)
                assert families, "the daemon did not sync the people"
                for name in (
                    "bridge_records_read",
                    "bridge_ops_sent",
                    "bridge_ops_retried",
                    "bridge_dead_lettered",
                    "bridge_op_latency_seconds",
                    "bridge_outbox_open_ops",
                    "bridge_cursor_lag_seconds",
                    "bridge_poll_interval_seconds",
                    "bridge_bucket_tokens",
                    "bridge_bucket_used_today",
                    "bridge_rate_limited",
                    "bridge_location_up",
                    "bridge_token_expires_at_seconds",
                    "bridge_token_refreshes",
                    "bridge_ready",
                ):
                    assert name in families, name
                read = {s.labels["stream"]: s.value for s in families["bridge_records_read"]}
                assert read[f"{SOURCE}.people"] >= PEOPLE
                up = {s.labels["location"]: s.value for s in families["bridge_location_up"]}
                assert up == {"demo": 1.0}
                ghl = [s for s in families["bridge_bucket_tokens"] if s.labels["api"] == "ghl"]
                assert ghl
                assert all(0 <= s.value <= 100 for s in ghl)
                latency = [
                    s for s in families["bridge_op_latency_seconds"] if s.name.endswith("_count")
                ]
                assert sum(s.value for s in latency) >= PEOPLE
                # STATUS= is sent when the line changes; the sync changed it (ops pending).
                received = [ready, *messages, *drain(sock)]
                statuses = [m["STATUS"] for m in received if "STATUS" in m]
                assert statuses
                status_line = statuses[-1]
                assert "behind" in status_line
                assert "ops pending" in status_line

                proc.send_signal(signal.SIGTERM)
                stopping = await wait_for(sock, "STOPPING", within=10)
                assert "EXTEND_TIMEOUT_USEC" in stopping[-1] or "EXTEND_TIMEOUT_USEC" in (
                    await next_message(sock, 5)
                )
                assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_sighup_reloads_mapping_and_intervals_and_rejects_a_bad_config(
    tmp_path: Path,
) -> None:
    """A good config is applied (new mapping on the next record, new poll interval, log file
    reopened); a bad one is rejected with its key path and the old one keeps syncing."""
    log_file = tmp_path / "bridge.log"
    async with sim_world(tmp_path, people=PEOPLE, activedemand=False) as world:
        base = json_config(world, "").replace("[logging]", f'[logging]\nfile = "{log_file}"')
        world.config_path.write_text(base, encoding="utf-8")
        with notify_socket() as (sock, path):
            async with daemon(world, {"NOTIFY_SOCKET": path}) as proc:
                await wait_for(sock, "READY")

                before = await synced_person(world, "before@example.org")
                assert before
                assert before.get("source") == "Action Network"

                # logrotate moves the file away, then the reload opens a new one.
                log_file.rename(tmp_path / "bridge.log.1")
                reloaded = base.replace(
                    'poll_interval = "1s"\noverlap', 'poll_interval = "2s"\noverlap'
                )
                reloaded += (
                    "[mapping.action_network.contact]\n"
                    'firstName = { from = "given_name" }\n'
                    'email = { from = "email", transforms = ["trim", "lower"] }\n'
                    'source = { from = "origin_system", transforms = ["default"],'
                    ' default = "Reloaded" }\n'
                )
                reloaded = reloaded.replace('idle_poll = "200ms"', 'idle_poll = "300ms"')
                world.config_path.write_text(reloaded, encoding="utf-8")
                proc.send_signal(signal.SIGHUP)

                async def reload_logged() -> list[dict[str, Any]]:
                    return [e for e in log_events(log_file) if e["event"] == "config_reloaded"]

                (event,) = await eventually(reload_logged)
                assert event["intervals_changed"] == [f"{SOURCE}.people"]
                restart = [e for e in log_events(log_file) if e["event"] == "reload_needs_restart"]
                assert restart
                assert restart[0]["changed"] == ["$.pipeline.idle_poll"]
                after = await synced_person(world, "after@example.org")
                assert after
                assert after.get("source") == "Reloaded"

                world.config_path.write_text(
                    reloaded.replace('poll_interval = "2s"', 'poll_interval = "soon"'),
                    encoding="utf-8",
                )
                proc.send_signal(signal.SIGHUP)

                async def rejected() -> list[dict[str, Any]]:
                    return [e for e in log_events(log_file) if e["event"] == "reload_rejected"]

                (bad,) = await eventually(rejected)
                assert "$.sources.action_network[0].poll_interval" in bad["reason"]
                still = await synced_person(world, "still@example.org")
                assert still
                assert still.get("source") == "Reloaded"
                assert proc.returncode is None
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
    rotated = [e["event"] for e in log_events(tmp_path / "bridge.log.1")]
    assert "reload_requested" in rotated
    assert "config_reloaded" not in rotated


async def test_sigterm_during_the_start_up_checks_is_an_orderly_exit(tmp_path: Path) -> None:
    """SIGTERM while the token and scope probes run ends them: exit 0, no READY=1, no
    pipeline started, and the state file left as a clean stop leaves it."""
    log_file = tmp_path / "bridge.log"
    async with sim_world(tmp_path, people=PEOPLE, activedemand=False) as world:
        world.config_path.write_text(with_log_file(world, log_file), encoding="utf-8")
        # Every GHL request takes 2 s: the six start-up probes, one after another, 12 s.
        world.ghl.faults.add(FaultRule(route="*", delay=2.0))
        with notify_socket() as (sock, path):
            async with daemon(world, {"NOTIFY_SOCKET": path}) as proc:
                await logged(log_file, "app_ready")
                await asyncio.sleep(0.5)  # into the first probe
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
                assert time.monotonic() - started < 5  # not after the remaining probes
            assert not [m for m in drain(sock) if "READY" in m]
    events = [e["event"] for e in log_events(log_file)]
    assert "stop_requested" in events
    assert "start_abandoned" in events
    assert "service_ready" not in events
    assert not [e for e in log_events(log_file) if e.get("level") in ("error", "critical")]
    async with Store.open(tmp_path / "state.db") as store:
        assert await store.budgets()  # the last report of a clean stop
        assert (await store.outbox_counts())["in_flight"] == 0


FORBIDDEN_AT_RUN_TIME = (
    "bridge.demo",
    "bridge.sim",
    "bridge.progress",
    "bridge.preview",
    "bridge.checks",
    "bridge.connectors.ghl.login",
    "aiohttp.web",
    "rich.live",
    "hypothesis",
)


async def test_sigterm_right_after_ready_drains_and_run_imports_only_what_it_needs(
    tmp_path: Path,
) -> None:
    """SIGTERM the moment READY=1 arrives is a drain and exit 0; and the whole run, start to
    exit, never imports the demo, the simulators, rich's live display, aiohttp.web (no
    ``[http] listen``) or hypothesis (python -X importtime lists every import)."""
    imports = tmp_path / "importtime.txt"
    async with sim_world(tmp_path, people=PEOPLE, activedemand=False) as world:
        world.config_path.write_text(json_config(world), encoding="utf-8")
        with notify_socket() as (sock, path):
            env = {"NOTIFY_SOCKET": path}
            async with daemon(world, env, python=("-X", "importtime"), stderr=imports) as proc:
                await wait_for(sock, "READY")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
                assert await wait_for(sock, "STOPPING", within=5)
    # "import time: <self> | <cumulative> | <indent><module>"
    lines = imports.read_text(encoding="utf-8").splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "bridge.app" in modules
    assert "aiohttp.client" in modules
    assert not {m for m in modules if m.startswith(FORBIDDEN_AT_RUN_TIME)}


async def test_a_restart_holds_back_what_the_killed_process_may_have_spent(
    tmp_path: Path,
) -> None:
    """Budgets reported a moment ago (as a killed daemon leaves them) hold the first GHL
    request, a start-up probe, until one window after the last moment it could have
    sent one; READY=1 comes after that."""
    log_file = tmp_path / "bridge.log"
    async with sim_world(tmp_path, people=PEOPLE, activedemand=False) as world:
        text = with_log_file(world, log_file).replace(
            'reverse = { poll_interval = "1s" }',
            'reverse = { poll_interval = "1s" }\nlimits = { burst = 100, window = "2s" }',
        )
        world.config_path.write_text(text, encoding="utf-8")
        reported = time.time()
        async with Store.open(tmp_path / "state.db") as store:
            row = BudgetRow(
                api="ghl",
                tenant="demo",
                capacity=100,
                window=2.0,
                available=0,
                used_today=500,
                daily_cap=200_000,
                paused_until=None,
                updated_at=reported,
            )
            await store.save_budgets([row])
        with notify_socket() as (sock, path):
            async with daemon(world, {"NOTIFY_SOCKET": path}) as proc:
                await wait_for(sock, "READY")
                ready_at = time.time()
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
        (held,) = [e for e in log_events(log_file) if e["event"] == "budget_held_from_last_run"]
        assert (held["api"], held["tenant"]) == ("ghl", "demo")
        first = min(e.started or e.ts for e in world.ghl.journal.entries)
    # The previous process may have sent until the report + 3 s (it writes every second),
    # or until this one started, whichever came first; those count for one 2 s window.
    assert first >= reported + 2.0
    assert ready_at >= first
