"""Rolling-window request budgets keyed by (api, tenant) that server headers can only tighten."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator

import msgspec

from bridge.clock import Clock

__all__ = ["BucketState", "Limiters", "ShareOf", "TokenBucket"]

_DAY = 86_400.0


class BucketState(msgspec.Struct, frozen=True):
    """A snapshot of one bucket, for health output and metrics."""

    api: str
    tenant: str
    capacity: int
    window: float
    available: int
    paused_until: float | None
    used_today: int
    daily_cap: int | None
    # 429s seen on this bucket since the start (for metrics; a share counts on its parent).
    throttled: int = 0


class TokenBucket:
    """At most ``capacity`` requests in any rolling ``window``, and ``daily_cap`` per UTC day.

    A token is held while its request is in flight (:meth:`lease`) and comes back exactly
    one window after the request *finished*. The server counts a request when it arrives,
    which is somewhere between our grant and the reply, so stamping the finish (not the
    grant) keeps every rolling window at the server within ``capacity`` whatever the
    network latency; the cost is about latency/window of the budget. The bucket keeps the
    finish times (at most ``capacity``) rather than refilling at an average rate, so a full
    burst is allowed whenever the whole budget is unspent. :meth:`acquire` is a lease that
    finishes at once.
    """

    def __init__(
        self,
        api: str,
        tenant: str,
        *,
        capacity: int,
        window: float,
        daily_cap: int | None = None,
        clock: Clock,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not (window > 0 and math.isfinite(window)):
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        if daily_cap is not None and daily_cap < 1:
            raise ValueError(f"daily_cap must be at least 1 or None, got {daily_cap}")
        self.api = api
        self.tenant = tenant
        self._capacity = capacity
        self._window = float(window)
        self._daily_cap = daily_cap
        self._clock = clock
        self._grants: deque[float] = deque()
        self._in_flight = 0
        self._released = asyncio.Event()
        self._paused_until: float | None = None
        self._throttled = 0
        self._day = self._utc_day()
        self._used_today = 0
        # asyncio.Lock hands itself over in FIFO order and does not let a newcomer barge
        # past queued waiters, so holding it while waiting makes the bucket first-come,
        # first-served.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for a token (first come, first served) and spend it now."""
        async with self.lease():
            pass

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Hold a token for the body (one request); it returns one window after the body ends."""
        async with self._lock:
            while True:
                self._released.clear()
                wait = self._wait(self._clock.monotonic())
                if wait is None:
                    await self._released.wait()  # every token is held by a request in flight
                elif wait > 0:
                    await self._clock.sleep(wait)
                else:
                    break
            self._in_flight += 1
            self._used_today += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._grants.append(self._clock.monotonic())
            self._released.set()

    def tighten(
        self, remaining: int, window: float | None = None, limit: int | None = None
    ) -> None:
        """Apply what the server says about the rolling budget, only where it is stricter.

        ``remaining`` below the local availability is spent as phantom grants stamped now
        (they come back one window later); a smaller ``limit`` or a longer ``window`` is
        adopted; anything looser is ignored, since the server's view lags our in-flight calls.
        """
        if limit is not None and 0 < limit < self._capacity:
            self._capacity = limit
            # The newest grants are the ones that bind, so keeping them loses nothing.
            self._grants = deque(self._grants)
        if window is not None and math.isfinite(window) and window > self._window:
            self._window = float(window)
        now = self._clock.monotonic()
        self._prune(now)
        for _ in range(self._available() - max(0, remaining)):
            self._grants.append(now)

    def tighten_daily(self, remaining: int) -> None:
        """Apply the server's daily remaining count, only where it is stricter.

        A bucket with no daily cap learns one (used today + remaining), since the server
        has just told us there is one.
        """
        self._roll_day()
        remaining = max(0, remaining)
        if self._daily_cap is None:
            self._daily_cap = self._used_today + remaining
        elif self._daily_cap - self._used_today > remaining:
            self._used_today = self._daily_cap - remaining

    def pause_until(self, t: float) -> None:
        """Grant nothing before monotonic time ``t``; the latest pause wins, none shortens one."""
        if self._paused_until is None or t > self._paused_until:
            self._paused_until = t

    def throttle(self, t: float) -> None:
        """A 429: count it and grant nothing before monotonic time ``t``."""
        self._throttled += 1
        self.pause_until(t)

    def resume(
        self,
        *,
        reported_at: float,
        silence: float,
        used_today: int = 0,
        paused_until: float | None = None,
        spent: int | None = None,
    ) -> float:
        """Start where a previous process on this budget left off; returns seconds held.

        ``spent`` is what it had used of its last window when it reported, if that report
        came after its last request (a clean stop): then only that much is held back, as
        if spent at the report. Without it (a kill), see below.

        It last reported its bucket at wall time ``reported_at`` and reported at least
        every ``silence`` seconds while it ran, so it sent nothing after ``reported_at +
        silence`` (nor after now). Up to then it may have spent the whole budget, and the
        server counts those requests for one more window: until that window has passed,
        nothing is granted, then everything is. This is the only bound that holds after a
        kill: what it spent after its last report is unknown. Its 429 pause carries over,
        and its count for the day while it is the same UTC day. Call before any request.
        """
        wall = self._clock.time()
        now = self._clock.monotonic()
        last_call = min(reported_at + silence, wall) - wall + now
        held = max(0.0, last_call + self._window - now)
        if held > 0:
            self._prune(now)
            count = self._available() if spent is None else min(spent, self._available())
            if count == 0:
                held = 0.0
            self._grants = deque(sorted([*self._grants, *[last_call] * count]))
        if paused_until is not None and paused_until > wall:
            self.pause_until(paused_until - wall + now)
        self._roll_day()
        if math.floor(reported_at / _DAY) == self._day:
            self._used_today = max(self._used_today, used_today)
        return held

    def state(self) -> BucketState:
        now = self._clock.monotonic()
        self._prune(now)
        self._roll_day()
        paused = self._paused_until
        return BucketState(
            api=self.api,
            tenant=self.tenant,
            capacity=self._capacity,
            window=self._window,
            available=self._available(),
            paused_until=paused if paused is not None and paused > now else None,
            used_today=self._used_today,
            daily_cap=self._daily_cap,
            throttled=self._throttled,
        )

    def _wait(self, now: float) -> float | None:
        """Seconds until a grant could be allowed (<= 0 means now; None: until a release)."""
        waits = [0.0]
        if self._paused_until is not None:
            waits.append(self._paused_until - now)
        self._roll_day()
        if self._daily_cap is not None and self._used_today >= self._daily_cap:
            waits.append((self._day + 1) * _DAY - self._clock.time())
        self._prune(now)
        # Finish stamps that must expire before one more request fits.
        excess = self._in_flight + len(self._grants) - self._capacity + 1
        if excess > len(self._grants):
            return None
        if excess > 0:
            waits.append(self._grants[excess - 1] + self._window - now)
        return max(waits)

    def _available(self) -> int:
        return max(0, self._capacity - self._in_flight - len(self._grants))

    def _prune(self, now: float) -> None:
        while self._grants and self._grants[0] + self._window <= now:
            self._grants.popleft()

    def _utc_day(self) -> int:
        return math.floor(self._clock.time() / _DAY)

    def _roll_day(self) -> None:
        # Only a later day resets the count: a wall clock stepping back must not refund calls.
        day = self._utc_day()
        if day > self._day:
            self._day = day
            self._used_today = 0


class ShareOf(TokenBucket):
    """A part of another bucket's budget: at most ``fraction`` of its requests per window.

    Each request holds a token of both, its own first, so a used-up share waits without
    holding the parent's tokens and the rest of the budget stays free for others (the
    reverse stream's reads must not starve a location's writes). What the server says
    about the budget, headers and 429 pauses, describes the parent and is applied there.
    """

    def __init__(self, parent: TokenBucket, *, fraction: float, clock: Clock) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be within (0, 1], got {fraction}")
        whole = parent.state()
        super().__init__(
            parent.api,
            f"{parent.tenant}/share",
            capacity=max(1, math.floor(whole.capacity * fraction)),
            window=whole.window,
            clock=clock,
        )
        self._parent = parent

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        async with super().lease(), self._parent.lease():
            yield

    def tighten(
        self, remaining: int, window: float | None = None, limit: int | None = None
    ) -> None:
        self._parent.tighten(remaining, window, limit)

    def tighten_daily(self, remaining: int) -> None:
        self._parent.tighten_daily(remaining)

    def pause_until(self, t: float) -> None:
        self._parent.pause_until(t)

    def throttle(self, t: float) -> None:
        self._parent.throttle(t)


class Limiters:
    """Every bucket in the process, keyed by (api, tenant)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._configs: dict[tuple[str, str], tuple[int, float, int | None]] = {}

    def add(
        self,
        api: str,
        tenant: str,
        *,
        capacity: int,
        window: float,
        daily_cap: int | None = None,
    ) -> TokenBucket:
        """Create the bucket for (api, tenant), or return the existing one if configured alike."""
        key = (api, tenant)
        config = (capacity, float(window), daily_cap)
        if key in self._buckets:
            # Silently keeping the first of two different budgets would hide a config bug.
            if self._configs[key] != config:
                raise ValueError(
                    f"bucket {api}/{tenant} already exists with capacity, window, daily_cap "
                    f"{self._configs[key]}, not {config}"
                )
            return self._buckets[key]
        bucket = TokenBucket(
            api, tenant, capacity=capacity, window=window, daily_cap=daily_cap, clock=self._clock
        )
        self._buckets[key] = bucket
        self._configs[key] = config
        return bucket

    def get(self, api: str, tenant: str) -> TokenBucket:
        return self._buckets[(api, tenant)]

    def find(self, api: str, tenant: str) -> TokenBucket | None:
        """The bucket for (api, tenant), or None when there is none."""
        return self._buckets.get((api, tenant))

    def states(self) -> list[BucketState]:
        return [bucket.state() for bucket in self._buckets.values()]
