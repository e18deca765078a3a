"""Time from ``exec`` to READY=1 of ``bridge run`` with a state file of 1,000,000 id_map rows.

The state file is made by ``Store.open`` (so the schema is the daemon's own) and filled
with sqlite3 directly: a person row (contact and conversation ids) for every three
activity rows (a message id each). The daemon runs as a child with ``$NOTIFY_SOCKET``
set to a datagram socket this script listens on, against a GHL and an Action Network
simulator served here; the time is taken from just before the spawn to the READY=1
datagram. Then the parts: the interpreter alone, ``import bridge.cli``, opening the
store, and the token and scope check, each timed on its own, and the daemon's own log
(``app_ready``, ``service_ready``) read against the spawn time.

Each timed start begins with no budget report in the state file, as after a stop more than
a GHL window ago; one more start right after a clean stop shows the other case, where the
daemon holds back only what the previous process spent in its last window (after a kill it
would hold the whole window: see "Budgets across a restart" in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    An,
    Ghl,
    bridge_command,
    load_logged,
    location_id,
    run_async,
    table,
    verdict,
    workdir,
    write_config,
)

from bridge.app import open_app
from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.an_data import build_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim
from bridge.store import Store

TARGET = 1.0  # seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="id_map rows")
    parser.add_argument("--runs", type=int, default=5, help="starts to time")
    parser.add_argument("--keep", type=Path, help="keep config, state and log in this directory")
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 3 starts")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.runs = 100_000, 3
    return args


async def main(args: argparse.Namespace) -> int:
    an, (key,) = build_sim(people=100, seed=2)
    ghl = GhlSim(seed=2)
    lid = location_id(0)
    token = ghl.add_private_token(lid)
    async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
        with workdir(args.keep, "bench-startup-") as tmp:
            config = write_config(
                tmp, [Ghl("main", lid, ghl_url, token)], [An("an", "main", key, an_url)]
            )
            made = time.perf_counter()
            state = tmp / "state.db"
            await fill_state(state, args.rows)
            made = time.perf_counter() - made
            size = state.stat().st_size
            starts = []
            for _ in range(args.runs):
                forget_budgets(state)
                starts.append(await time_start(config))
            restart = await time_start(config)  # the last start's budget report is fresh
            parts = await time_parts(config, args.runs)
    ready = [s["ready"] for s in starts]
    rows: list[list[object]] = [
        ["exec -> READY=1 (median)", statistics.median(ready), f"< {TARGET:g}",
         verdict(statistics.median(ready) < TARGET)],
        ["exec -> READY=1 (min / max)", f"{min(ready):.3f} / {max(ready):.3f}", "", ""],
        ["exec -> READY=1 right after a clean stop (holds only what it spent)",
         restart["ready"], "", ""],
        ["  exec -> app_ready in the log (imports, config, store open)",
         statistics.median(s["app_ready"] for s in starts), "", ""],
        ["  app_ready -> READY=1 (prune, token + scope check)",
         statistics.median(s["ready"] - s["app_ready"] for s in starts), "", ""],
        ["parts, each timed alone (median):", "", "", ""],
        ["  python -c pass (interpreter start)", parts["python"], "", ""],
        ["  python -c 'import bridge.cli' (minus the above)", parts["imports"], "", ""],
        ["    -X importtime: bridge.cli, cumulative", parts["importtime"], "", ""],
        ["    of which bridge.demo + bridge.sim.* (the daemon needs neither)",
         parts["demo_sim"], "", ""],
        ["    of which bridge.app (aiohttp, structlog, msgspec, connectors)",
         parts["app"], "", ""],
        ["  Store.open of the state file (in process)", parts["store"], "", ""],
        ["  token + scope check, 1 location (in process)", parts["check"], "", ""],
        [f"state file: {args.rows:,} id_map rows", f"{size / 1e6:.0f} MB",
         f"made in {made:.0f} s", ""],
    ]  # fmt: skip
    print(table(f"Start-up to READY=1 ({args.runs} starts), seconds", ["", "s", "", ""], rows))
    return 0 if statistics.median(ready) < TARGET else 1


async def fill_state(path: Path, rows: int) -> None:
    """Migrate a new state file with the daemon's Store, then bulk-insert id_map rows."""
    async with Store.open(path):
        pass
    kinds = ("signature", "attendance", "donation")
    now = time.time()

    def row(n: int) -> tuple[object, ...]:
        person = f"{n // 4:08x}-0000-4000-8000-{n // 4:012x}"
        if n % 4 == 0:
            ids = (f"c{n:019d}", f"v{n:019d}", None)
            return (f"an:person:{person}", *ids, f"{n:032x}", now)
        key = f"an:{kinds[n % 4 - 1]}:{n:08x}-0000-4000-8000-{n:012x}"
        return (key, None, None, f"m{n:019d}", f"{n:032x}", now)

    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO id_map (source_key, contact_id, conversation_id, message_id,"
            " content_hash, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (row(n) for n in range(rows)),
        )
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def forget_budgets(path: Path) -> None:
    """Drop the budget report of the last start, so the next one does not wait it out."""
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM budgets")


async def time_start(config: Path) -> dict[str, float]:
    """Start ``bridge run`` until READY=1, then stop it; times since the spawn, seconds."""
    sock_dir = tempfile.mkdtemp(prefix="bs", dir="/tmp")  # sun_path holds 108 bytes
    address = os.path.join(sock_dir, "notify")
    log = config.parent / "bridge.log"
    log.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        env = {**os.environ, "NOTIFY_SOCKET": address}
        spawned_wall, spawned = time.time(), time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *bridge_command(config, "run"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                message = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
                if b"READY=1" in message.split(b"\n"):
                    ready = time.perf_counter() - spawned
                    break
            # The stop signals are handled from the start, so SIGTERM could go now; the
            # log lines are read first only for their times.
            times = {"ready": ready, **await logged_times(log, spawned_wall)}
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
    os.unlink(address)
    os.rmdir(sock_dir)
    return times


async def logged_times(log: Path, spawned: float) -> dict[str, float]:
    """When the daemon logged ``app_ready`` and ``service_ready``, seconds after ``spawned``."""
    times: dict[str, float] = {}
    for _ in range(500):
        for event in _events(log):
            if event["event"] in ("app_ready", "service_ready") and event["event"] not in times:
                times[event["event"]] = datetime.fromisoformat(event["ts"]).timestamp() - spawned
        if "service_ready" in times:
            return times
        await asyncio.sleep(0.01)
    raise TimeoutError("the daemon did not log service_ready")


async def time_parts(config_path: Path, runs: int) -> dict[str, float]:
    """The interpreter, the imports, the store open and the token check, each alone."""
    python = [_wall([sys.executable, "-c", "pass"]) for _ in range(runs)]
    imports = [_wall([sys.executable, "-c", "import bridge.cli"]) for _ in range(runs)]
    config = load_logged(config_path)
    store, check = [], []
    for _ in range(runs):
        started = time.perf_counter()
        async with Store.open(config.state.path) as opened:
            await opened.schema_version()
            store.append(time.perf_counter() - started)
        async with open_app(config) as app:
            started = time.perf_counter()
            await app.verify_locations()
            check.append(time.perf_counter() - started)
    return {
        **min((_importtime() for _ in range(runs)), key=lambda t: t["importtime"]),
        "python": statistics.median(python),
        "imports": statistics.median(imports) - statistics.median(python),
        "store": statistics.median(store),
        "check": statistics.median(check),
    }


def _events(log: Path) -> list[dict[str, Any]]:
    """The JSON log's events so far (a small file: the daemon has only just started)."""
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def _importtime() -> dict[str, float]:
    """``-X importtime`` of ``bridge.cli``: its cumulative seconds, and two parts of it."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import bridge.cli"],
        check=True,
        capture_output=True,
        text=True,
    )
    found = {"importtime": 0.0, "demo_sim": 0.0, "app": 0.0}
    for line in run.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <2 spaces per level><module>"
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue  # the header
        depth, module = len(name) - len(name.lstrip()), name.strip()
        seconds = int(cumulative) / 1e6
        if module == "bridge.cli":
            found["importtime"] = seconds
        elif depth == 3 and (module == "bridge.demo" or module.startswith("bridge.sim.")):
            found["demo_sim"] += seconds
        elif depth == 3 and module == "bridge.app":
            found["app"] = seconds
    return found


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    run_async(main(parse_args()))
