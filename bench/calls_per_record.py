"""GHL calls spent per source record, counted in the GHL simulator's journal.

Real ``bridge backfill`` / ``bridge once`` runs (in this process, through ``open_app`` and
``App.run``) against an Action Network group and one GHL location served on loopback.
Each step changes K people in the source, runs the bridge once, and divides the GHL
calls of that run, less the start-up scope probes every run makes, by K. Budgets are
lifted so the steps run quickly: limits change when calls happen, not how many.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common import (
    LIFTED,
    An,
    Ghl,
    load_logged,
    location_id,
    run_async,
    run_bridge,
    table,
    verdict,
    write_config,
)

from bridge.app import open_app
from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.actionnetwork_state import AnSim
from bridge.sim.an_data import build_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim

SOURCE = "an"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=50, help="people seeded (backfill step)")
    parser.add_argument("--changes", type=int, default=25, help="people changed per live step")
    parser.add_argument("--quick", action="store_true", help="5 people, 5 changes")
    args = parser.parse_args()
    if args.quick:
        args.people, args.changes = 5, 5
    return args


async def main(args: argparse.Namespace) -> int:
    an, (key,) = build_sim(people=args.people, activities_per_person=1, seed=3)
    an.set_rate_limit(LIFTED)
    ghl = GhlSim(seed=3)
    ghl.set_rate_limit(LIFTED, 1.0, None)
    lid = location_id(0)
    token = ghl.add_private_token(lid)
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
            config = write_config(
                Path(tmp),
                [Ghl("main", lid, ghl_url, token, burst=LIFTED, window="1s")],
                [An(SOURCE, "main", key, an_url, rate=LIFTED, poll_interval="1s", overlap="1s")],
            )
            return await measure(args, config, an, key, ghl)


async def measure(args: argparse.Namespace, config: Path, an: AnSim, key: str, ghl: GhlSim) -> int:
    probes = await probe_calls(config, ghl)
    people = [p.id for p in an.list_people(key, limit=args.people)]
    petition = an.list_actions(key, "petitions")[0][0].id
    k = args.changes
    changed, activity, unmapped = people[:k], people[k : 2 * k], people[2 * k : 3 * k]
    if len(unmapped) < k:
        changed = activity = unmapped = people[:k]  # quick mode: few people, reuse them

    def rename() -> None:
        for pid in changed:
            an.touch_person(pid, {"family_name": "Renamed"}, key=key)

    def sign() -> None:
        for pid in activity:
            an.add_activity(key, petition, pid, comments="Count me in")

    def newcomers() -> None:
        for n in range(k):
            pid = an.add_person(
                key, given_name="New", family_name=f"Person{n}",
                email_addresses=[{"address": f"new.person{n}@example.org"}],
            )  # fmt: skip
            an.add_activity(key, petition, pid)

    def unmapped_field() -> None:
        for pid in unmapped:
            an.touch_person(pid, key=key)  # a custom field the mapping does not send

    steps: list[tuple[str, int, int, Callable[[], None] | None, str | None]] = [
        ("new person + 1 activity (backfill)", 3, args.people, None, SOURCE),
        ("unchanged person (re-read after write-back)", 0, args.people, None, None),
        ("changed person (family_name)", 1, k, rename, None),
        ("new activity (signature)", 1, k, sign, None),
        ("new person + 1 activity (live poll)", 3, k, newcomers, None),
        ("unchanged for GHL (unmapped custom field)", 0, k, unmapped_field, None),
    ]
    rows: list[list[object]] = []
    misses = 0
    for name, target, records, change, backfill in steps:
        if change is not None:
            change()
        mark = ghl.journal.last_seq
        run = await run_bridge(config, backfill=backfill)
        entries = ghl.journal.select(since=mark)
        spent = len(entries) - probes
        routes = Counter(f"{e.method} {e.route}" for e in entries[probes:])
        per = spent / records
        ok = per <= target
        misses += not ok
        rows.append(
            [
                name,
                records,
                run.summary.events_read,
                run.summary.events_unchanged,
                len(entries),
                spent,
                per,
                target,
                verdict(ok),
                ", ".join(f"{r} x{n}" for r, n in sorted(routes.items())) or "-",
            ]
        )
    print(
        table(
            f"GHL calls per record (start-up scope probes: {probes} per run, subtracted)",
            [
                "step",
                "records",
                "events read",
                "unchanged",
                "GHL calls",
                "for records",
                "per record",
                "target",
                "",
                "calls by route",
            ],
            rows,
        )
    )
    return 1 if misses else 0


async def probe_calls(config_path: Path, ghl: GhlSim) -> int:
    """GHL calls one run spends on its start-up scope checks, before any record."""
    async with open_app(load_logged(config_path)) as app:
        mark = ghl.journal.last_seq
        await app.check_locations_of(app.locations)
        return len(ghl.journal.select(since=mark))


if __name__ == "__main__":
    run_async(main(parse_args()))
