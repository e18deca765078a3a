"""Time as a seam: the real clock for the daemon and a virtual one for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]

# 2026-01-01T00:00:00Z: a fixed, readable wall-clock origin so tests are reproducible.
_DEFAULT_WALL = 1_767_225_600.0


class Clock(Protocol):
    """What the bridge needs from time: two readings and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences mean anything."""
        ...

    def time(self) -> float:
        """Unix wall-clock seconds (UTC), for calendar questions such as "which day is it"."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait at least ``seconds`` of this clock's monotonic time."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A virtual clock: time stands still until a test calls :meth:`advance`.

    ``advance`` steps through the pending deadlines in order, so every sleeper wakes
    seeing ``monotonic()`` equal to its own deadline, and whatever it does next (sleep
    again, stamp a grant) happens at that instant rather than at the end of the jump.
    "Idle" means no asyncio callback is ready to run; work in threads (the store's) or on
    sockets is not waited for.
    """

    def __init__(self, *, start: float = 1000.0, wall: float = _DEFAULT_WALL) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + seconds
        if deadline <= self._now:
            # Still a suspension point, as asyncio.sleep(0) is, so loops cannot starve others.
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), future))
        await future  # a cancelled sleeper leaves a done future that advance() skips

    def next_deadline(self) -> float | None:
        """The earliest deadline anyone is sleeping towards, or None if nobody sleeps."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers one deadline at a time (ties in FIFO order)."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        target = self._now + seconds
        # Let freshly started tasks reach their sleep() so they are woken at the right time.
        await self.run_until_idle()
        while (deadline := self.next_deadline()) is not None and deadline <= target:
            _, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            future.set_result(None)
            await self.run_until_idle()
        self._now = max(self._now, target)

    async def run_until_idle(self) -> None:
        """Yield to the event loop until no callback is ready to run."""
        loop = asyncio.get_running_loop()
        # asyncio has no public "is idle" query; the default loop keeps its ready queue in
        # `_ready`. Loops without it (uvloop) get a generous fixed number of yields instead.
        ready = getattr(loop, "_ready", None)
        for _ in range(10_000 if ready is not None else 100):
            await asyncio.sleep(0)
            if ready is not None and not ready:
                return
        if ready is not None:
            raise RuntimeError("event loop never went idle: a task is busy-looping")
