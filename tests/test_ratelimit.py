"""Tests for the rolling-window token buckets, run on the virtual clock."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.app import BUDGET_SAVE_SILENCE
from bridge.clock import Clock, FakeClock, SystemClock
from bridge.ratelimit import BucketState, Limiters, TokenBucket

MIDNIGHT = 1_767_312_000.0  # 2026-01-02T00:00:00Z


def make_bucket(clock: FakeClock, *, capacity: int = 5, window: float = 10.0) -> TokenBucket:
    return TokenBucket("ghl", "loc1", capacity=capacity, window=window, clock=clock)


def start_acquirers(
    bucket: TokenBucket, clock: FakeClock, n: int, grants: list[float]
) -> list[asyncio.Task[None]]:
    async def one() -> None:
        await bucket.acquire()
        grants.append(clock.monotonic())

    return [asyncio.create_task(one()) for _ in range(n)]


async def drain(clock: FakeClock, tasks: list[asyncio.Task[None]]) -> None:
    """Advance the clock deadline by deadline until every task has finished."""
    await clock.run_until_idle()
    while not all(task.done() for task in tasks):
        deadline = clock.next_deadline()
        assert deadline is not None, "tasks are stuck with nobody sleeping"
        await clock.advance(deadline - clock.monotonic())
    for task in tasks:
        task.result()


def assert_rolling_budget(grants: list[float], capacity: int, window: float) -> None:
    """No `capacity + 1` grants fit in one window (same comparison the bucket uses)."""
    ordered = sorted(grants)
    for i in range(len(ordered) - capacity):
        assert ordered[i] + window <= ordered[i + capacity], (i, ordered[i], ordered[i + capacity])


async def test_fake_clock_wakes_sleepers_in_deadline_order_at_their_deadline() -> None:
    """FakeClock wakes each sleeper at its own deadline, earliest first, during one advance."""
    clock = FakeClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("c", 3.0), ("a", 1.0), ("b", 2.0)]]
    await clock.advance(2.5)
    assert woke == [("a", 1.0), ("b", 2.0)]
    assert clock.monotonic() == 2.5
    await clock.advance(0.5)
    assert woke[-1] == ("c", 3.0)
    await asyncio.gather(*tasks)


async def test_fake_clock_wall_time_moves_with_monotonic_time() -> None:
    """FakeClock.time() advances in step with monotonic() from the configured wall origin."""
    clock = FakeClock(start=5.0, wall=MIDNIGHT)
    await clock.advance(90.0)
    assert (clock.monotonic(), clock.time()) == (95.0, MIDNIGHT + 90.0)


async def test_fake_clock_skips_a_cancelled_sleeper() -> None:
    """A sleeper cancelled before its deadline is dropped without disturbing the others."""
    clock = FakeClock(start=0.0)
    cancelled = asyncio.create_task(clock.sleep(1.0))
    kept = asyncio.create_task(clock.sleep(2.0))
    await clock.run_until_idle()
    cancelled.cancel()
    await clock.advance(2.0)
    assert cancelled.cancelled()
    assert kept.done()
    assert clock.next_deadline() is None


async def test_system_clock_reads_real_time() -> None:
    """SystemClock is a Clock whose monotonic time moves forward and whose wall time is now."""
    clock: Clock = SystemClock()
    before = clock.monotonic()
    await clock.sleep(0.001)
    assert clock.monotonic() > before
    assert abs(clock.time() - time.time()) < 5


async def test_burst_up_to_capacity_is_immediate() -> None:
    """A fresh bucket grants its whole capacity without the clock moving."""
    clock = FakeClock()
    bucket = make_bucket(clock, capacity=5)
    for _ in range(5):
        await bucket.acquire()
    assert clock.monotonic() == 1000.0
    assert bucket.state().available == 0


async def test_next_grant_waits_until_the_oldest_is_one_window_old() -> None:
    """Grant capacity+1 waits exactly until grant 1 is one window old, capacity+2 until grant 2."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=3, window=10.0)
    grants: list[float] = []
    for _ in range(3):
        tasks = start_acquirers(bucket, clock, 1, grants)
        await clock.advance(1.0)
    late = start_acquirers(bucket, clock, 2, grants)
    await clock.advance(10.0 - clock.monotonic() - 0.001)
    assert not any(task.done() for task in late)
    await drain(clock, tasks + late)
    assert grants == [0.0, 1.0, 2.0, 10.0, 11.0]


async def test_a_minute_of_random_traffic_never_overfills_a_window() -> None:
    """1,000 acquisitions arriving over 60 s never put more than capacity grants in any window."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=100, window=10.0)
    rng = random.Random(7)
    arrivals = sorted(rng.uniform(0.0, 60.0) for _ in range(1000))
    grants: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    for at in arrivals:
        await clock.advance(at - clock.monotonic())
        tasks += start_acquirers(bucket, clock, 1, grants)
    await drain(clock, tasks)
    assert len(grants) == 1000
    assert_rolling_budget(grants, 100, 10.0)
    # The budget is used in full: each grant comes as soon as FIFO order, its arrival and
    # the grant one capacity earlier allow, so no token is ever left idle.
    expected: list[float] = []
    for k, at in enumerate(arrivals):
        earliest = [at, expected[-1] if expected else at]
        if k >= 100:
            earliest.append(expected[k - 100] + 10.0)
        expected.append(max(earliest))
    assert grants == pytest.approx(expected, abs=1e-9)


async def test_waiters_are_served_first_come_first_served() -> None:
    """Fifty queued waiters are granted in the order they started waiting."""
    clock = FakeClock()
    bucket = make_bucket(clock, capacity=1, window=1.0)
    await bucket.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await bucket.acquire()
        order.append(i)

    tasks = []
    for i in range(50):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)
    await drain(clock, tasks)
    assert order == list(range(50))


async def test_a_cancelled_waiter_does_not_block_the_queue() -> None:
    """Cancelling the waiter at the head of the queue lets the next one take its turn."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=1, window=1.0)
    await bucket.acquire()
    head = asyncio.create_task(bucket.acquire())
    grants: list[float] = []
    tail = start_acquirers(bucket, clock, 1, grants)
    await clock.run_until_idle()
    head.cancel()
    await drain(clock, tail)
    assert head.cancelled()
    assert grants == [1.0]


async def test_tighten_ignores_looser_server_figures() -> None:
    """A larger remaining, shorter window or bigger limit from the server changes nothing."""
    clock = FakeClock()
    bucket = make_bucket(clock, capacity=10, window=10.0)
    for _ in range(4):
        await bucket.acquire()
    before = bucket.state()
    bucket.tighten(9, window=5.0, limit=20)
    bucket.tighten(6, window=10.0, limit=10)
    assert bucket.state() == before
    assert (before.capacity, before.window, before.available) == (10, 10.0, 6)


async def test_tighten_applies_stricter_server_figures() -> None:
    """A lower limit, longer window and lower remaining all take effect; phantoms expire later."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=10, window=10.0)
    for _ in range(4):
        await bucket.acquire()
    await clock.advance(1.0)
    bucket.tighten(2, window=20.0, limit=8)
    state = bucket.state()
    assert (state.capacity, state.window, state.available) == (8, 20.0, 2)
    grants: list[float] = []
    tasks = start_acquirers(bucket, clock, 5, grants)
    await drain(clock, tasks)
    # Two free now; the four real grants from t=0 return at 20, the two phantoms at 21.
    assert grants == [1.0, 1.0, 20.0, 20.0, 20.0]


async def test_tighten_daily_is_stricter_only_and_teaches_a_cap() -> None:
    """The daily remaining can only raise today's usage, and sets a cap on a bucket without one."""
    clock = FakeClock()
    capped = TokenBucket("ghl", "loc1", capacity=10, window=1.0, daily_cap=100, clock=clock)
    await capped.acquire()
    capped.tighten_daily(500)
    assert capped.state().used_today == 1
    capped.tighten_daily(40)
    assert capped.state().used_today == 60
    uncapped = make_bucket(clock)
    await uncapped.acquire()
    uncapped.tighten_daily(3)
    assert (uncapped.state().daily_cap, uncapped.state().used_today) == (4, 1)


async def test_pause_delays_only_that_bucket() -> None:
    """A paused bucket grants nothing until the pause ends while its neighbour keeps granting."""
    clock = FakeClock(start=0.0)
    limiters = Limiters(clock)
    paused = limiters.add("ghl", "loc1", capacity=100, window=10.0)
    other = limiters.add("ghl", "loc2", capacity=100, window=10.0)
    paused.pause_until(5.0)
    paused.pause_until(2.0)  # an earlier pause never shortens the later one
    assert paused.state().paused_until == 5.0
    grants: list[float] = []
    waiting = start_acquirers(paused, clock, 1, grants)
    await clock.run_until_idle()
    await other.acquire()
    assert not waiting[0].done()
    await drain(clock, waiting)
    assert grants == [5.0]
    assert paused.state().paused_until is None


async def test_daily_cap_blocks_until_utc_midnight() -> None:
    """Once the daily cap is spent, the next grant waits for the next UTC midnight."""
    clock = FakeClock(start=0.0, wall=MIDNIGHT - 100.0)
    bucket = TokenBucket("ghl", "loc1", capacity=100, window=10.0, daily_cap=3, clock=clock)
    for _ in range(3):
        await bucket.acquire()
    grants: list[float] = []
    tasks = start_acquirers(bucket, clock, 1, grants)
    await clock.advance(99.0)
    assert not tasks[0].done()
    await drain(clock, tasks)
    assert clock.time() == MIDNIGHT
    assert bucket.state().used_today == 1


async def test_limiters_add_is_idempotent_and_rejects_a_conflicting_budget() -> None:
    """Adding the same key twice returns one bucket; a different budget for it is an error."""
    limiters = Limiters(FakeClock())
    first = limiters.add("an", "key1", capacity=4, window=1.0)
    assert limiters.add("an", "key1", capacity=4, window=1) is first
    assert limiters.get("an", "key1") is first
    with pytest.raises(ValueError, match="already exists"):
        limiters.add("an", "key1", capacity=5, window=1.0)
    with pytest.raises(KeyError):
        limiters.get("an", "key2")
    assert limiters.states() == [
        BucketState("an", "key1", 4, 1.0, 4, None, 0, None),
    ]


@pytest.mark.parametrize(
    ("capacity", "window", "daily_cap"), [(0, 1.0, None), (1, 0.0, None), (1, 1.0, 0)]
)
def test_bucket_rejects_a_nonsense_budget(
    capacity: int, window: float, daily_cap: int | None
) -> None:
    """A zero capacity, zero window or zero daily cap is refused at construction."""
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(
            "an", "k", capacity=capacity, window=window, daily_cap=daily_cap, clock=FakeClock()
        )


@settings(deadline=None, max_examples=150)
@given(
    capacity=st.integers(1, 6),
    window=st.sampled_from([0.25, 0.5, 1.0, 2.5, 10.0]),
    steps=st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 400).map(lambda cs: cs / 100)),
        max_size=25,
    ),
    tighten_at=st.one_of(st.none(), st.integers(0, 24)),
)
def test_random_traffic_never_overfills_a_window(
    capacity: int, window: float, steps: list[tuple[int, float]], tighten_at: int | None
) -> None:
    """For any interleaving of acquisitions, advances and tightenings no window holds > capacity."""

    async def scenario() -> None:
        clock = FakeClock(start=0.0)
        bucket = make_bucket(clock, capacity=capacity, window=window)
        grants: list[float] = []
        tasks: list[asyncio.Task[None]] = []
        for i, (n, dt) in enumerate(steps):
            tasks += start_acquirers(bucket, clock, n, grants)
            if i == tighten_at:
                bucket.tighten(capacity, window=window * 2)
            await clock.advance(dt)
        await drain(clock, tasks)
        assert len(grants) == sum(n for n, _ in steps)
        assert_rolling_budget(grants, capacity, window)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- across a restart


async def test_a_resumed_bucket_waits_a_window_past_the_last_possible_call() -> None:
    """Reported 5 s ago, silent at most 3 s: nothing for 3 + 10 - 5 = 8 s, then everything."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=5, window=10.0)
    held = bucket.resume(reported_at=clock.time() - 5.0, silence=3.0)
    assert held == pytest.approx(8.0)
    assert bucket.state().available == 0
    grants: list[float] = []
    tasks = start_acquirers(bucket, clock, 5, grants)
    await drain(clock, tasks)
    assert grants == [pytest.approx(8.0)] * 5


async def test_the_previous_process_sent_nothing_after_this_one_started() -> None:
    """Reported just now: the silence cannot reach past now, so one window from now."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=5, window=10.0)
    assert bucket.resume(reported_at=clock.time() - 1.0, silence=3.0) == pytest.approx(10.0)


async def test_a_resumed_bucket_never_looks_past_now() -> None:
    """A report from the future (the wall clock stepped back) holds one window from now."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=5, window=10.0)
    assert bucket.resume(reported_at=clock.time() + 60.0, silence=3.0) == pytest.approx(10.0)


async def test_an_old_report_leaves_the_bucket_full() -> None:
    """A report older than the silence plus one window holds nothing back."""
    clock = FakeClock(start=0.0)
    bucket = make_bucket(clock, capacity=5, window=10.0)
    assert bucket.resume(reported_at=clock.time() - 13.0, silence=3.0) == 0.0
    assert bucket.state().available == 5


async def test_a_resumed_bucket_keeps_the_pause_and_the_days_count() -> None:
    """A 429 pause still running carries over, and today's count while it is the same day."""
    clock = FakeClock(start=0.0, wall=MIDNIGHT + 3_600.0)
    bucket = TokenBucket("ghl", "loc1", capacity=5, window=10.0, daily_cap=100, clock=clock)
    bucket.resume(
        reported_at=clock.time() - 60.0, silence=3.0, used_today=40, paused_until=clock.time() + 30
    )
    state = bucket.state()
    assert (state.available, state.used_today) == (5, 40)
    assert state.paused_until == pytest.approx(30.0)
    yesterday = TokenBucket("ghl", "loc1", capacity=5, window=10.0, daily_cap=100, clock=clock)
    yesterday.resume(reported_at=MIDNIGHT - 1.0, silence=3.0, used_today=40)
    assert yesterday.state().used_today == 0


async def restart_scenario(
    *, kill_at: float, restart_after: float, phase: float, resume: bool
) -> list[float]:
    """A process spending greedily and reporting every second is killed at ``kill_at``; one
    started ``restart_after`` later spends greedily too. Every grant, both processes."""
    clock = FakeClock(start=0.0)
    capacity, window = 10, 10.0
    grants: list[float] = []
    reports: list[float] = []

    async def spend(bucket: TokenBucket) -> None:
        while True:
            await bucket.acquire()
            grants.append(clock.monotonic())

    async def report() -> None:
        await clock.sleep(phase)
        while True:
            reports.append(clock.time())
            await clock.sleep(1.0)  # BUDGET_SAVE_INTERVAL

    old = make_bucket(clock, capacity=capacity, window=window)
    # Spent in bursts: a sender picks up work some seconds in, when tokens are back.
    running = [asyncio.create_task(report()), asyncio.create_task(spend(old))]
    await clock.advance(kill_at)
    for task in running:  # SIGKILL: no last report
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    await clock.advance(restart_after)
    new = make_bucket(clock, capacity=capacity, window=window)
    if resume:
        new.resume(reported_at=reports[-1], silence=BUDGET_SAVE_SILENCE)
    spender = asyncio.create_task(spend(new))
    await clock.advance(3 * window)
    spender.cancel()
    await asyncio.gather(spender, return_exceptions=True)
    return grants


@pytest.mark.parametrize("kill_at", [0.5, 4.0, 9.99, 10.0, 10.5, 14.25, 19.9])
@pytest.mark.parametrize("restart_after", [0.1, 5.0])
async def test_a_restart_never_overfills_a_window_at_the_server(
    kill_at: float, restart_after: float
) -> None:
    """Killed at any moment and restarted (systemd: 5 s later), old and new requests
    together never put more than the budget in any window."""
    grants = await restart_scenario(
        kill_at=kill_at, restart_after=restart_after, phase=0.3, resume=True
    )
    assert_rolling_budget(grants, 10, 10.0)


async def test_without_resume_a_restart_overfills_a_window() -> None:
    """The scenario above is a real test: a fresh bucket after a kill goes over the budget."""
    grants = await restart_scenario(kill_at=10.5, restart_after=5.0, phase=0.3, resume=False)
    with pytest.raises(AssertionError):
        assert_rolling_budget(grants, 10, 10.0)
