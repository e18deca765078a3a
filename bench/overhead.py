"""The bridge's own cost when no budget binds: source records per second and CPU per record.

A ``bridge backfill`` of one seeded Action Network group into one GHL location runs in
this process (``open_app``/``App.run``); the two simulators run in processes of their own
(``bench/simserver.py``) with no rate limits, and the config's budgets are lifted too.
Records are the people and activities read; the run ends when every op is done and its
state committed. CPU is this process's (the bridge's) alone; the simulators' is shown
beside it to tell whether they, not the bridge, were the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

from common import (
    LIFTED,
    An,
    Ghl,
    client_session,
    cpu_seconds,
    run_async,
    run_bridge,
    sim_get,
    sim_process,
    table,
    verdict,
    workdir,
    write_config,
)

TARGET_RATE = 1_000.0  # records per second


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=5_000)
    parser.add_argument("--activities", type=int, default=3, help="activities per person")
    parser.add_argument("--log-level", default="info", help="the bridge's log level (to a file)")
    parser.add_argument("--keep", type=Path, help="keep config, state and log in this directory")
    parser.add_argument("--quick", action="store_true", help="500 people")
    args = parser.parse_args()
    if args.quick:
        args.people = 500
    return args


async def main(args: argparse.Namespace) -> int:
    an_args = ["--an-people", str(args.people), "--an-activities", str(args.activities)]
    with (
        sim_process(*an_args) as (an_proc, an),
        sim_process("--ghl-locations", "1") as (ghl_proc, ghl),
        workdir(args.keep, "bench-overhead-") as tmp,
    ):
        (loc,) = ghl["ghl"]
        config = write_config(
            Path(tmp),
            [Ghl("main", loc["location_id"], ghl["ghl_url"], loc["token"], LIFTED, "1s")],
            [An("an", "main", an["an_keys"][0], an["an_url"], rate=LIFTED)],
            log_level=args.log_level,
        )
        sims = {"AN sim": an_proc.pid, "GHL sim": ghl_proc.pid}
        sim_cpu = {name: cpu_seconds(pid) for name, pid in sims.items()}
        started = time.perf_counter()
        run = await run_bridge(config, backfill="an")
        wall = time.perf_counter() - started
        sim_cpu = {name: cpu_seconds(pid) - sim_cpu[name] for name, pid in sims.items()}
        read_for = reading_time(tmp / "bridge.log")
        async with client_session() as session:
            stats = await sim_get(session, f"{ghl['ghl_url']}/_sim/stats")
            an_stats = await sim_get(session, f"{an['an_url']}/_sim/stats")
    records = run.summary.events_read
    expected = args.people * (1 + args.activities)
    rate = records / run.wall
    cpu_ms = 1000 * run.cpu / records
    rows: list[list[object]] = [
        ["source records (people + activities)", records, f"expected {expected:,}", ""],
        [
            "GHL contacts / messages written",
            f"{stats['contacts']:,} / {stats['messages']:,}",
            "",
            "",
        ],
        ["requests: AN / GHL", f"{an_stats['total']:,} / {stats['total']:,}", "", ""],
        ["App.run wall time, s", run.wall, f"{wall:.1f} with open", ""],
        [
            "  of which reading the source (service_ready -> stream_caught_up)",
            "-" if read_for is None else f"{read_for:.1f}",
            "the rest is delivery catching up",
            "",
        ],
        ["records per second", rate, f">= {TARGET_RATE:,.0f}", verdict(rate >= TARGET_RATE)],
        [
            "bridge CPU, s (this process)",
            run.cpu,
            f"{100 * run.cpu / run.wall:.0f} % of a core",
            "",
        ],
        ["bridge CPU per record, ms", cpu_ms, f"{1000 / cpu_ms:,.0f} records/CPU-s", ""],
        *[
            [f"{name} CPU, s", cpu, f"{100 * cpu / wall:.0f} % of a core", ""]
            for name, cpu in sim_cpu.items()
        ],
        [
            "ops sent / unchanged",
            f"{run.summary.ops_sent:,} / {run.summary.ops_unchanged:,}",
            "",
            "",
        ],
        ["dead letters", run.summary.dead_lettered, "0", verdict(not run.summary.dead_lettered)],
    ]
    print(
        table(
            f"Overhead: backfill of {args.people:,} people x {args.activities} activities,"
            " limits lifted, simulators in their own processes",
            ["figure", "value", "target / note", ""],
            rows,
        )
    )
    await asyncio.sleep(0)
    return 0 if rate >= TARGET_RATE and records == expected else 1


def reading_time(log: Path) -> float | None:
    """Seconds from ``service_ready`` to ``stream_caught_up`` in the JSON log (info level)."""
    at: dict[str, float] = {}
    with log.open(encoding="utf-8") as lines:
        for line in lines:
            if '"service_ready"' in line or '"stream_caught_up"' in line:
                event = json.loads(line)
                at[event["event"]] = datetime.fromisoformat(event["ts"]).timestamp()
    if len(at) < 2:
        return None
    return at["stream_caught_up"] - at["service_ready"]


if __name__ == "__main__":
    run_async(main(parse_args()))
