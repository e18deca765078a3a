"""Change-to-GHL latency under ``bridge run``: from a source change to its write in GHL.

``bridge run`` (a child process) polls one Action Network group every ``--poll`` seconds;
the simulators run in this process. Each sample makes one change in the source, either
a person renamed (``touch_person``; the write is the contact upsert) or a new signature
(the write is the inbound message), then waits for that write in the GHL simulator's
journal; latency = the journal entry's time - the change's time. Changes are spaced by a
random pause so they land at every phase of the poll cycle. No budget binds: the config
and the simulators allow far more than the run uses (``--an-rate 4`` shows Action
Network's real pace instead).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import time
from pathlib import Path

from common import (
    LIFTED,
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
from bridge.sim.actionnetwork_state import AnSim
from bridge.sim.an_data import build_sim
from bridge.sim.common import serve
from bridge.sim.ghl import build_app as build_ghl_app
from bridge.sim.ghl_state import GhlSim

# A rename is the person's upsert when the bridge has not seen them yet, and an update by
# the mapped contact's id once it has (upsert would not follow an e-mail change).
RENAME = (("POST", "/contacts/upsert"), ("PUT", "/contacts/{contactId}"))
INBOUND = ("POST", "/conversations/messages/inbound")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--poll", type=float, default=2.0, help="poll interval, seconds")
    parser.add_argument("--people", type=int, default=10, help="people the changes cycle over")
    parser.add_argument("--overlap", default="120s", help="the source's overlap (default's)")
    parser.add_argument("--an-rate", type=float, default=LIFTED, help="AN requests/s per key")
    parser.add_argument("--keep", type=Path, help="keep config, state and log in this directory")
    parser.add_argument("--quick", action="store_true", help="12 samples")
    args = parser.parse_args()
    if args.quick:
        args.samples = 12
    return args


async def main(args: argparse.Namespace) -> int:
    an, (key,) = build_sim(people=200, activities_per_person=1, seed=9)
    an.set_rate_limit(int(args.an_rate) if args.an_rate < LIFTED else LIFTED)
    ghl = GhlSim(seed=9)
    ghl.set_rate_limit(LIFTED, 1.0, None)
    lid = location_id(0)
    token = ghl.add_private_token(lid)
    async with serve(build_an_app(an)) as an_url, serve(build_ghl_app(ghl)) as ghl_url:
        with workdir(args.keep, "bench-latency-") as tmp:
            config = write_config(
                tmp,
                [Ghl("main", lid, ghl_url, token, burst=LIFTED, window="1s")],
                [
                    An(
                        "an",
                        "main",
                        key,
                        an_url,
                        rate=args.an_rate,
                        poll_interval=f"{args.poll:g}s",
                        overlap=args.overlap,
                    )
                ],
            )
            with (tmp / "bridge.out").open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    *bridge_command(config, "run"), stdout=out, stderr=asyncio.subprocess.STDOUT
                )
                try:
                    samples = await measure(args, an, key, ghl)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 30)
    return report(args, samples)


async def measure(
    args: argparse.Namespace, an: AnSim, key: str, ghl: GhlSim
) -> list[tuple[str, float]]:
    """Make ``--samples`` changes one at a time; each one's latency in seconds."""
    # The last start-up scope probe (an empty inbound message, refused): the daemon is up.
    await wait_for_write(ghl, 0, INBOUND, seconds=60, refused=True)
    await asyncio.sleep(args.poll)
    people = [p.id for p in an.list_people(key, limit=args.people)]
    petition = an.list_actions(key, "petitions")[0][0].id
    rng = random.Random(1)
    samples: list[tuple[str, float]] = []
    writes: tuple[tuple[str, str], ...]
    for n in range(args.samples):
        person = people[(n // 2) % len(people)]
        mark = ghl.journal.last_seq
        changed = time.time()
        if n % 2 == 0:  # a rename first, so the person's contact exists for the signature
            kind, writes = "rename", RENAME
            an.touch_person(person, {"family_name": f"Renamed{n}"}, key=key)
        else:
            kind, writes = "signature", (INBOUND,)
            an.add_activity(key, petition, person, comments=f"sample {n}")
        written = await wait_for_write(ghl, mark, *writes, seconds=10 * args.poll + 30)
        samples.append((kind, written - changed))
        print(f"  sample {n + 1:3d} {kind:9s} {written - changed:6.3f} s", flush=True)
        await asyncio.sleep(rng.uniform(0, args.poll))
    return samples


async def wait_for_write(
    ghl: GhlSim, since: int, *writes: tuple[str, str], seconds: float, refused: bool = False
) -> float:
    """The journal time of the first of ``writes`` after entry ``since`` (accepted, or refused)."""
    deadline = time.monotonic() + seconds
    # The simulator serves in this loop and has no "request seen" event: look every 10 ms.
    while time.monotonic() < deadline:
        for method, route in writes:
            for e in ghl.journal.select(since=since, method=method, route=route):
                if (200 <= e.status < 300) != refused:
                    return e.ts
        await asyncio.sleep(0.01)
    names = " or ".join(f"{method} {route}" for method, route in writes)
    raise TimeoutError(f"no {names} within {seconds:g} s")


def report(args: argparse.Namespace, samples: list[tuple[str, float]]) -> int:
    target = args.poll + 1.0
    an_pace = "not limited" if args.an_rate >= LIFTED else f"{args.an_rate:g} req/s"
    rows: list[list[object]] = []
    for name in ("rename", "signature", "all"):
        values = sorted(v for k, v in samples if name in (k, "all"))
        p50, p95 = _percentile(values, 50), _percentile(values, 95)
        rows.append(
            [
                name,
                len(values),
                f"{min(values):.3f}",
                f"{p50:.3f}",
                f"{p95:.3f}",
                f"{max(values):.3f}",
                f"{statistics.fmean(values):.3f}",
                f"<= {target:g}",
                verdict(p95 <= target),
            ]
        )
    print(
        table(
            f"Change -> GHL write latency, s (bridge run, poll every {args.poll:g} s,"
            f" overlap {args.overlap}, AN {an_pace})",
            ["change", "samples", "min", "p50", "p95", "max", "mean", "p95 target", ""],
            rows,
        )
    )
    every = sorted(v for _, v in samples)
    return 0 if _percentile(every, 95) <= target else 1


def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    rank = max(1, -(-len(values) * pct // 100))
    return values[int(rank) - 1]


if __name__ == "__main__":
    run_async(main(parse_args()))
