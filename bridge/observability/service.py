"""What the daemon tells systemd and the health endpoints: ready, alive, and a status line.

*Alive* means the event loop turns and the pipeline is not stuck: work under way (an op
being sent, a stream being read) with nothing moving for ``stall_timeout`` is stuck,
unless a budget is paused or used up for the day, which is waiting by design. Idle
(nothing to do until the next poll) is alive. The watchdog is fed only while alive, so
systemd restarts a stuck daemon; ``/healthz`` answers the same question.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from bridge.clock import Clock
from bridge.pipeline import Pipeline, Stream
from bridge.ratelimit import BucketState, Limiters

log = structlog.get_logger("bridge.service")

BEHIND_SLACK = 30.0
"""A stream is behind once not caught up for two poll intervals plus this (a poll's own time)."""


class ServiceView:
    """Readiness, liveness and the STATUS line of one run, read from the live pipeline."""

    def __init__(
        self,
        pipeline: Pipeline,
        limiters: Limiters,
        streams: Sequence[Stream],
        *,
        locations: Mapping[str, str],
        clock: Clock,
        stall_timeout: float,
    ) -> None:
        self._pipeline = pipeline
        self._limiters = limiters
        self._streams = list(streams)
        self._locations = dict(locations)  # GHL target -> location name
        self._clock = clock
        self._stall_timeout = stall_timeout
        self.ready = False
        self._stalled_logged = False

    # -- liveness -------------------------------------------------------------------------------

    def waiting_by_design(self, buckets: Sequence[BucketState] | None = None) -> bool:
        """Whether some budget holds work back: paused after a 429, or spent for the day."""
        states = self._limiters.states() if buckets is None else buckets
        return any(
            b.paused_until is not None or (b.daily_cap is not None and b.used_today >= b.daily_cap)
            for b in states
        )

    def stalled_for(self) -> float:
        """Seconds the pipeline has been busy without moving; 0 when idle or moving."""
        if not self._pipeline.busy:
            return 0.0
        return max(0.0, self._clock.monotonic() - self._pipeline.last_progress)

    def alive(self) -> bool:
        stalled = self.stalled_for()
        if stalled <= self._stall_timeout or self.waiting_by_design():
            self._stalled_logged = False
            return True
        if not self._stalled_logged:
            # Logged once per stall: the watchdog is withheld from now on until it moves.
            log.error(
                "pipeline_stalled",
                seconds=round(stalled),
                polling=sorted(self._pipeline.polling),
                open_ops=self._pipeline.open_ops,
            )
            self._stalled_logged = True
        return False

    # -- readiness ------------------------------------------------------------------------------

    def locations_down(self) -> list[str]:
        down = self._pipeline.health.down_targets()
        return sorted(loc for target, loc in self._locations.items() if target in down)

    def serving(self) -> bool:
        """Ready, and at least one GHL location not failing auth."""
        if not self.ready:
            return False
        return not self._locations or len(self.locations_down()) < len(self._locations)

    # -- status ---------------------------------------------------------------------------------

    def cursor_lag(self) -> dict[str, float]:
        now = self._clock.time()
        return {name: max(0.0, now - at) for name, at in self._pipeline.caught_up_at.items()}

    def behind(self) -> list[str]:
        lag = self.cursor_lag()
        return sorted(
            s.name
            for s in self._streams
            if lag.get(s.name, 0.0) > 2 * s.poll_interval + BEHIND_SLACK
        )

    def rate_limited(self, buckets: Sequence[BucketState] | None = None) -> list[str]:
        """GHL locations whose budget is paused after a 429 right now."""
        states = self._limiters.states() if buckets is None else buckets
        return sorted({b.tenant.split("/")[0] for b in states if b.api == "ghl" and b.paused_until})

    def status_line(self) -> str:
        """One line for systemd's STATUS=, e.g. "3 streams, 0 behind, 12 ops pending"."""
        buckets = self._limiters.states()
        parts = [
            _count(len(self._streams), "stream"),
            f"{len(self.behind())} behind",
            f"{self._pipeline.open_ops} ops pending",
        ]
        limited = self.rate_limited(buckets)
        if limited:
            parts.append(f"{_count(len(limited), 'location')} rate-limited")
        down = self.locations_down()
        if down:
            parts.append(f"{_count(len(down), 'location')} down ({', '.join(down)})")
        dead = self._pipeline.summary.dead_lettered
        if dead:
            parts.append(f"{dead} dead-lettered since start")
        if not self.ready:
            parts.insert(0, "starting")
        return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
