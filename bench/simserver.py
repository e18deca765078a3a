"""Serve seeded simulators in a process of their own, so a benchmark measures the bridge alone.

Prints one JSON line once listening (``an_url``, ``an_keys``, ``ghl_url``, ``ghl``: the
locations with their tokens), then serves until SIGTERM. Drive it through the simulators'
``/_sim/`` control routes (journal, stats, touch, config).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from common import LIFTED, location_id

from bridge.sim.actionnetwork import build_app as build_an_app
from bridge.sim.an_data import build_sim
from bridge.sim.common import Journal, serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--an-people", type=int, default=0, help="people per group (0: no AN)")
    parser.add_argument("--an-activities", type=int, default=3, help="activities per person")
    parser.add_argument("--an-groups", type=int, default=1, help="groups (one key each)")
    parser.add_argument(
        "--an-rate", type=int, default=0, help="requests per key per second (0: no limit)"
    )
    parser.add_argument("--ghl-locations", type=int, default=0, help="locations (0: no GHL)")
    parser.add_argument("--ghl-burst", type=int, default=0, help="per location (0: no limit)")
    parser.add_argument("--ghl-window", type=float, default=10.0, help="seconds")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--journal", type=int, default=200_000, help="journal entries each sim retains"
    )
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    info: dict[str, Any] = {}
    async with asyncio.TaskGroup() as group:
        if args.an_people:
            an, keys = build_sim(
                people=args.an_people,
                activities_per_person=args.an_activities,
                groups=args.an_groups,
                seed=args.seed,
            )
            an.set_rate_limit(args.an_rate or LIFTED, 1.0)
            an.journal = Journal(args.journal)
            info["an_keys"] = keys
            info["an_url"] = await _serve(group, build_an_app(an), stop)
        if args.ghl_locations:
            ghl = GhlSim(seed=args.seed)
            ghl.journal = Journal(args.journal)
            if args.ghl_burst:
                ghl.set_rate_limit(args.ghl_burst, args.ghl_window, None)
            else:
                ghl.set_rate_limit(LIFTED, 1.0, None)
            info["ghl"] = []
            for n in range(args.ghl_locations):
                lid = location_id(n)
                ghl.add_location(lid)
                info["ghl"].append({"location_id": lid, "token": ghl.add_private_token(lid)})
            info["ghl_url"] = await _serve(group, build_ghl_app(ghl), stop)
        print(json.dumps(info), flush=True)


async def _serve(group: asyncio.TaskGroup, app: Any, stop: asyncio.Event) -> str:
    """Serve ``app`` in ``group`` until ``stop``; return its base URL once listening."""
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serving() -> None:
        async with serve(app) as base_url:
            url.set_result(base_url)
            await stop.wait()

    group.create_task(serving())
    return await url


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
