"""GHL's per-location budget is kept under a burst: zero 429s, never over it in any window."""

from __future__ import annotations

import asyncio

from bridge.clock import SystemClock
from bridge.connectors.ghl.client import GhlClient
from bridge.ratelimit import TokenBucket
from bridge.rest import make_session
from bridge.sim.common import serve
from bridge.sim.ghl import GhlSim, build_app
from tests.conftest import StaticTokens

# GHL allows 100 per 10 s; the same limiter at 100 per 0.5 s makes the test take ~5 s
# instead of ~90 s. bench/ measures the real window.
BURST = 100
WINDOW = 0.5
CALLS = 1_000


async def test_burst_of_1000_calls_makes_zero_429s() -> None:
    """1,000 concurrent calls to one location get no 429 and stay within 100 per window."""
    sim = GhlSim(seed=5, burst_limit=BURST, burst_window=WINDOW)
    location = "ve9EPM428h8vShlRW1KT"
    sim.add_location(location)
    token = sim.add_private_token(location)
    clock = SystemClock()
    bucket = TokenBucket("ghl", location, capacity=BURST, window=WINDOW, clock=clock)
    async with serve(build_app(sim)) as base_url, make_session(limit=200) as session:
        client = GhlClient(
            session,
            base_url=base_url,
            location_id=location,
            bucket=bucket,
            auth=StaticTokens(token),
            clock=clock,
        )
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(client.find_duplicate_contact(email=f"p{i}@example.org") for i in range(CALLS))
        )
        elapsed = asyncio.get_running_loop().time() - started
    assert results == [None] * CALLS
    stats = sim.stats()
    assert stats["rateLimited"] == 0
    assert 0 < max(stats["maxInWindow"].values()) <= BURST
    # Close to the budget, not far below it: 10 windows' worth of calls in about 9 windows.
    assert elapsed < (CALLS / BURST) * WINDOW * 1.3
