"""How close ``bridge run`` keeps to the budgets with a backlog: 10 GHL locations, 10 AN keys.

One GHL simulator serves 10 locations, each enforcing GHL's 100 requests per rolling
10 s; one Action Network simulator serves 10 groups (one key each, 4 requests per
rolling second). Each group feeds its own location. People carry 20 activities each,
so one person read (about 7 AN requests) makes 22 GHL calls: GHL is the binding budget,
a backlog builds in the outbox, and both budgets should be in use at once. The bridge
runs as a child process; the simulators in this one.

Throughput is measured over a steady window (the first ``--warmup`` seconds left out:
start-up probes and the first full burst). The bridge sends each location's budget in
bursts (a token comes back one window after its call), so counting calls in a window
depends on where the window cuts a burst; the "gap" figure does not: for each call, the
time until the call ``capacity`` calls later (>= the window, or the simulator answers
429), and share = window / mean gap.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from common import (
    An,
    Ghl,
    bridge_command,
    location_id,
    run_async,
    table,
    verdict,
    workdir,
    write_config,
)

from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.an_data import build_sim
from bridge.sim.common import JournalEntry, serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim
from bridge.store import Store

GHL_BURST, GHL_WINDOW = 100, 10.0
AN_RATE = 4
GHL_TARGET, AN_TARGET = 0.97, 0.95
COLUMNS = ("requests", "req/s", "share (count)", "mean gap s", "min gap s", "share (gap)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--locations", type=int, default=10)
    parser.add_argument("--activities", type=int, default=20, help="activities per person")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of `bridge run`")
    parser.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="seconds left out at the start (the first"
        " page of 25 people takes ~40 s to read at 4 req/s; GHL is idle until it commits)",
    )
    parser.add_argument("--keep", type=Path, help="keep config, state and log in this directory")
    parser.add_argument("--quick", action="store_true", help="100 s run, 50 s warm-up")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 100.0, 50.0
    return args


async def main(args: argparse.Namespace) -> int:
    an, keys = build_sim(
        people=1_000, activities_per_person=args.activities, groups=args.locations, seed=5
    )
    ghl = GhlSim(seed=5, burst_limit=GHL_BURST, burst_window=GHL_WINDOW)
    tokens = [ghl.add_private_token(location_id(n)) for n in range(args.locations)]
    async with (
        serve(build_an_app(an)) as an_url,
        serve(build_ghl_app(ghl)) as ghl_url,
    ):
        with workdir(args.keep, "bench-budget-") as tmp:
            config = write_config(
                tmp,
                [Ghl(f"loc{n}", location_id(n), ghl_url, tokens[n]) for n in range(args.locations)],
                [
                    An(f"an{n}", f"loc{n}", keys[n], an_url, rate=AN_RATE, overlap="5000d")
                    for n in range(args.locations)
                ],
            )
            started = time.time()
            status, stopped = await run_for(config, args.duration)
            async with Store.open(tmp / "state.db") as store:
                outbox = await store.outbox_counts_by_target()
    window = (started + args.warmup, stopped)
    ghl_rows, ghl_share, ghl_gap_share = rates(
        ghl.journal.entries, window, GHL_BURST, GHL_WINDOW, "loc"
    )
    an_rows, an_share, an_gap_share = rates(
        an.journal.entries, window, AN_RATE, 1.0, "key", groups=[an.group_id(k) for k in keys]
    )
    ghl_429 = ghl.journal.status_counts().get(429, 0)
    an_429 = an.journal.status_counts().get(429, 0)
    seconds = window[1] - window[0]
    print(
        table(
            f"GHL: {args.locations} locations x {GHL_BURST} per {GHL_WINDOW:g} s,"
            f" steady window {seconds:.0f} s (after {args.warmup:g} s warm-up)",
            ["location", *COLUMNS],
            ghl_rows,
        )
    )
    print()
    print(
        table(
            f"Action Network: {args.locations} keys x {AN_RATE} per 1 s, same window",
            ["key", *COLUMNS],
            an_rows,
        )
    )
    print()
    total_allowed = args.locations * GHL_BURST / GHL_WINDOW
    summary = [
        ["GHL throughput, share of the budget (gap)", f"{100 * ghl_gap_share:.1f} %",
         f">= {100 * GHL_TARGET:.0f} %", verdict(ghl_gap_share >= GHL_TARGET)],
        ["GHL throughput, share of the budget (count)", f"{100 * ghl_share:.1f} %",
         f"of {total_allowed:g} req/s", ""],
        ["GHL 429s (whole run)", ghl_429, "0", verdict(ghl_429 == 0)],
        ["AN requests, share of 4 req/s per key (gap)", f"{100 * an_gap_share:.1f} %",
         f">= {100 * AN_TARGET:.0f} %", verdict(an_gap_share >= AN_TARGET)],
        ["AN requests, share of 4 req/s per key (count)", f"{100 * an_share:.1f} %", "", ""],
        ["AN 429s (whole run)", an_429, "0", verdict(an_429 == 0)],
        ["GHL ops still pending at the end (the backlog)",
         sum(c["pending"] for t, c in outbox.items() if t.startswith("ghl:")), "> 0", ""],
        ["bridge exit status after SIGTERM", status, "0", verdict(status == 0)],
    ]  # fmt: skip
    print(table("Budget use (bridge run, 10 locations with a backlog)", ["figure", "value",
          "target", ""], summary))  # fmt: skip
    ok = ghl_gap_share >= GHL_TARGET and an_gap_share >= AN_TARGET and ghl_429 == an_429 == 0
    return 0 if ok and status == 0 else 1


async def run_for(config: Path, seconds: float) -> tuple[int, float]:
    """``bridge run`` as a child for ``seconds``, then SIGTERM: its exit status, when stopped."""
    log = config.parent / "bridge.out"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *bridge_command(config, "run"), stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        try:
            await asyncio.wait_for(proc.wait(), seconds)
        except TimeoutError:
            proc.send_signal(signal.SIGTERM)
        stopped = time.time()
        return await asyncio.wait_for(proc.wait(), 30), stopped


def rates(
    entries: Sequence[JournalEntry],
    window: tuple[float, float],
    capacity: int,
    length: float,
    label: str,
    groups: Sequence[str] | None = None,
) -> tuple[list[list[object]], float, float]:
    """Per tenant: calls in ``window``, rate, share by count, and the gap figures.

    Returns the rows, the share by count over all tenants, and the mean share by gap.
    """
    by_tenant: dict[str, list[float]] = {}
    for e in entries:
        if e.tenant is not None and not e.path.startswith("/_sim/"):
            by_tenant.setdefault(e.tenant, []).append(e.ts)
    names = list(groups) if groups is not None else sorted(by_tenant)
    seconds = window[1] - window[0]
    rows: list[list[object]] = []
    counted = 0
    gap_shares: list[float] = []
    for n, tenant in enumerate(names):
        stamps = sorted(by_tenant.get(tenant, []))
        inside = [t for t in stamps if window[0] <= t < window[1]]
        counted += len(inside)
        # A call's token is spent again ``capacity`` calls later; both inside the window.
        gaps = [b - a for a, b in zip(inside, inside[capacity:], strict=False)]
        mean_gap = statistics.fmean(gaps) if gaps else float("inf")
        share_gap = length / mean_gap
        gap_shares.append(share_gap)
        rate = len(inside) / seconds
        rows.append(
            [
                f"{label}{n}",
                len(inside),
                f"{rate:.2f}",
                f"{100 * rate * length / capacity:.1f} %",
                f"{mean_gap:.3f}",
                f"{min(gaps):.3f}" if gaps else "-",
                f"{100 * share_gap:.1f} %",
            ]
        )
    allowed = len(names) * capacity / length * seconds
    return rows, counted / allowed, statistics.fmean(gap_shares) if gap_shares else 0.0


if __name__ == "__main__":
    run_async(main(parse_args()))
