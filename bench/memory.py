"""Memory of a large backfill: peak RSS of the bridge and its growth from first to last quarter.

``bridge backfill`` runs as a child process against an Action Network group of
``--people`` generated people (made lazily from their index by the simulator, so a
million cost the simulator nothing until read) and a GHL location with no limits; both
simulators run in another process (``bench/simserver.py``), and the config lifts every
budget, so the bridge itself is the bottleneck. VmRSS and VmHWM are read from
/proc/<pid>/status every ``--sample`` seconds. The run stops after ``--max-seconds``
(SIGTERM: the bridge drains and exits) if the backfill has not finished by then; the
table says how many records were delivered either way. Growth compares the median RSS
of the last quarter of the run with that of the first quarter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import time
from pathlib import Path

from common import (
    HISTORY,
    LIFTED,
    An,
    Ghl,
    bridge_command,
    client_session,
    proc_status,
    run_async,
    sim_get,
    sim_process,
    table,
    verdict,
    workdir,
    write_config,
)

PEAK_TARGET_MB = 150.0
GROWTH_TARGET = 0.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--activities", type=int, default=1, help="activities per person")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop the run after")
    parser.add_argument("--sample", type=float, default=0.5, help="RSS sampling interval, s")
    parser.add_argument("--keep", type=Path, help="keep config, state and log in this directory")
    parser.add_argument("--quick", action="store_true", help="50,000 people, at most 300 s")
    args = parser.parse_args()
    if args.quick:
        args.people, args.max_seconds = 50_000, 300.0
    return args


async def main(args: argparse.Namespace) -> int:
    an_args = ["--an-people", str(args.people), "--an-activities", str(args.activities)]
    with (
        sim_process(*an_args, "--ghl-locations", "1", "--journal", "1000") as (_, sims),
        workdir(args.keep, "bench-memory-") as tmp,
    ):
        (loc,) = sims["ghl"]
        config = write_config(
            tmp,
            [Ghl("main", loc["location_id"], sims["ghl_url"], loc["token"], LIFTED, "1s")],
            [An("an", "main", sims["an_keys"][0], sims["an_url"], rate=LIFTED)],
        )
        samples, finished, status = await run_sampled(args, config, sims["ghl_url"])
    return report(args, samples, finished, status)


async def run_sampled(
    args: argparse.Namespace, config: Path, ghl_url: str
) -> tuple[list[tuple[float, int, int, int]], bool, int]:
    """Run the backfill; samples of (seconds, VmRSS KiB, VmHWM KiB, records delivered)."""
    samples: list[tuple[float, int, int, int]] = []
    command = bridge_command(config, "backfill", "an", "--since", HISTORY, "--no-progress")
    with (config.parent / "bridge.out").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        started = time.monotonic()
        delivered, next_count = 0, 0.0
        async with client_session() as session:
            while proc.returncode is None:
                elapsed = time.monotonic() - started
                if elapsed > args.max_seconds:
                    break
                if elapsed >= next_count:  # the count costs the simulator a scan
                    stats = await sim_get(session, f"{ghl_url}/_sim/stats")
                    delivered = stats["contacts"] + stats["messages"]
                    next_count = elapsed + 5.0
                try:
                    status = proc_status(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                if "VmRSS" in status:
                    samples.append((elapsed, status["VmRSS"], status["VmHWM"], delivered))
                    if int(elapsed) % 60 == 0 and elapsed - int(elapsed) < args.sample:
                        print(
                            f"  {elapsed:5.0f} s  RSS {status['VmRSS'] / 1024:6.1f} MB"
                            f"  delivered {delivered:,}",
                            flush=True,
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), args.sample)
            finished = proc.returncode is not None
            if not finished:
                proc.send_signal(signal.SIGTERM)
            exit_status = await asyncio.wait_for(proc.wait(), 60)
            stats = await sim_get(session, f"{ghl_url}/_sim/stats")
    final = (time.monotonic() - started, 0, 0, stats["contacts"] + stats["messages"])
    return [*samples, final], finished, exit_status


def report(
    args: argparse.Namespace,
    samples: list[tuple[float, int, int, int]],
    finished: bool,
    status: int,
) -> int:
    *live, final = samples
    seconds, delivered = final[0], final[3]
    # Quarters of the delivering part of the run (start-up, before any record, left out).
    busy = [s for s in live if s[3] > 0] or live
    start, end = busy[0][0], busy[-1][0]
    quarter = (end - start) / 4
    first = [s[1] for s in busy if s[0] <= start + quarter]
    last = [s[1] for s in busy if s[0] >= end - quarter]
    q1, q4 = statistics.median(first) / 1024, statistics.median(last) / 1024
    peak = max(s[2] for s in live) / 1024
    growth = (q4 - q1) / q1
    expected = args.people * (1 + args.activities)
    how = "all of them" if finished else f"stopped after {args.max_seconds:g} s"
    rows: list[list[object]] = [
        ["people in the source", args.people, f"x {args.activities} activities", ""],
        ["records delivered (contacts + messages)", delivered, f"of {expected:,}: {how}", ""],
        ["run time, s", seconds, f"{delivered / seconds:.0f} records/s", ""],
        ["peak RSS (VmHWM), MB", peak, f"<= {PEAK_TARGET_MB:g}", verdict(peak <= PEAK_TARGET_MB)],
        ["median RSS, first quarter, MB", q1, "", ""],
        ["median RSS, last quarter, MB", q4, "", ""],
        ["growth first -> last quarter", f"{100 * growth:.1f} %", f"< {100 * GROWTH_TARGET:g} %",
         verdict(growth < GROWTH_TARGET)],
        ["bridge exit status", status, "0 (also after SIGTERM)", verdict(status == 0)],
    ]  # fmt: skip
    print(table("Memory of a backfill (bridge as a child, limits lifted)", ["figure", "value",
          "target / note", ""], rows))  # fmt: skip
    print()
    step = max(1, len(busy) // 10)
    curve = [[f"{s[0]:.0f}", s[3], f"{s[1] / 1024:.1f}"] for s in busy[::step]]
    print(table("RSS over the run", ["s", "delivered", "RSS MB"], curve))
    return 0 if peak <= PEAK_TARGET_MB and growth < GROWTH_TARGET and status == 0 else 1


if __name__ == "__main__":
    run_async(main(parse_args()))
