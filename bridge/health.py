"""Which targets and streams are down, and when each gets its next chance.

A target whose call raises ``Fatal`` (revoked token, missing scope) is taken out of
service alone: its ops stay pending, the other targets carry on, and after ``recheck``
seconds one op is let through as a probe. A stream that raises ``Fatal`` is polled again
after the same pause. What is down is kept in the store too, so ``bridge status`` can
say why and since when, and the next start knows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import structlog

from bridge.clock import Clock
from bridge.models import Op
from bridge.redact import redact
from bridge.store import Store

log = structlog.get_logger("bridge.health")


def describe(error: BaseException) -> str:
    """``"AuthError: <reason>"``: what status shows and logs carry (secrets scrubbed)."""
    return f"{type(error).__name__}: {redact(str(error))}"


@dataclass
class _Down:
    error: str
    probe_at: float  # wall time
    # False for a row left by an earlier run: it has not failed in this one yet.
    confirmed: bool


class Health:
    """The down targets and streams of one run, mirrored into the store's health table.

    ``locations`` maps GHL target names to their location, for the logs.
    """

    def __init__(
        self, store: Store, clock: Clock, *, recheck: float, locations: Mapping[str, str]
    ) -> None:
        self._store = store
        self._clock = clock
        self.recheck = recheck
        self._locations = dict(locations)
        self._targets: dict[str, _Down] = {}
        self._streams: dict[str, _Down] = {}
        self._probing: dict[str, int] = {}

    async def load(self, *, targets: Collection[str], streams: Collection[str]) -> None:
        """Take over what an earlier run left marked down; each gets a chance right away.

        A restart is when an operator has usually just fixed something, and one probe
        per target is cheap. Targets already marked in this run keep their schedule;
        rows of targets and streams no longer configured are left for status to show.
        """
        now = self._clock.time()
        for row in await self._store.health():
            if row.kind == "target" and row.name in targets:
                self._targets.setdefault(row.name, _Down(row.error, now, confirmed=False))
            elif row.kind == "stream" and row.name in streams:
                self._streams.setdefault(row.name, _Down(row.error, now, confirmed=False))

    # -- targets --------------------------------------------------------------------------------

    def is_down(self, target: str) -> bool:
        return target in self._targets

    def down_targets(self) -> set[str]:
        return set(self._targets)

    def failed_targets(self) -> set[str]:
        """Down targets that failed in this run (not just left marked by an earlier one)."""
        return {t for t, down in self._targets.items() if down.confirmed}

    def held(self, now: float) -> set[str]:
        """Down targets none of whose ops may go now: not due for a probe, or probing."""
        return {t for t, down in self._targets.items() if down.probe_at > now or t in self._probing}

    def probes_due(self, now: float) -> list[str]:
        return [
            t
            for t, down in self._targets.items()
            if down.probe_at <= now and t not in self._probing
        ]

    def next_probe_after(self, now: float) -> float | None:
        later = [d.probe_at for t, d in self._targets.items() if d.probe_at > now]
        return min(later, default=None)

    def start_probe(self, op: Op) -> None:
        self._probing[op.target] = op.id
        log.info("target_probe", target=op.target, op_id=op.id, **self._where(op.target))

    def is_probe(self, op: Op) -> bool:
        return self._probing.get(op.target) == op.id

    def end_probe(self, op: Op) -> None:
        """The probe's delivery is over, however it went (its outcome was recorded)."""
        if self.is_probe(op):
            del self._probing[op.target]

    async def mark_target_down(self, target: str, error: BaseException) -> None:
        """Take ``target`` out of service until ``recheck`` has passed."""
        now = self._clock.time()
        text = describe(error)
        previous = self._targets.get(target)
        self._targets[target] = _Down(text, now + self.recheck, confirmed=True)
        await self._store.mark_down("target", target, text, now=now)
        where = self._where(target)
        if previous is not None and previous.confirmed:
            log.warning("target_still_down", target=target, error=text, **where)
        else:
            log.error("target_down", target=target, error=text, retry_in=self.recheck, **where)

    async def target_failed(self, op: Op, error: BaseException) -> None:
        """An op of ``op.target`` raised Fatal: the target goes (or stays) down.

        Ops that were already under way when their target went down fail the same way
        and change nothing; only a probe moves the next chance on.
        """
        down = self._targets.get(op.target)
        if down is None or not down.confirmed or self.is_probe(op):
            await self.mark_target_down(op.target, error)

    async def mark_target_up(self, target: str) -> None:
        """``target`` works (again); forget that it was down."""
        was_down = self._targets.pop(target, None) is not None
        if await self._store.mark_up("target", target) or was_down:
            log.info("target_up", target=target, **self._where(target))

    async def target_answered(self, op: Op) -> None:
        """The op was not refused for good: if it was a probe, its target is back."""
        if self.is_probe(op):
            await self.mark_target_up(op.target)

    def _where(self, target: str) -> dict[str, str]:
        location = self._locations.get(target)
        return {} if location is None else {"location": location}

    # -- streams --------------------------------------------------------------------------------

    async def stream_failed(self, stream: str, error: BaseException) -> None:
        """A stream raised Fatal: record it; the producer waits ``recheck`` and tries again."""
        now = self._clock.time()
        text = describe(error)
        previous = self._streams.get(stream)
        self._streams[stream] = _Down(text, now + self.recheck, confirmed=True)
        await self._store.mark_down("stream", stream, text, now=now)
        if previous is not None and previous.confirmed:
            log.warning("stream_still_down", stream=stream, error=text)
        else:
            log.error("stream_down", stream=stream, error=text, retry_in=self.recheck)

    async def stream_ok(self, stream: str) -> None:
        """A poll of ``stream`` went through; if it was down, it is back."""
        if self._streams.pop(stream, None) is not None:
            await self._store.mark_up("stream", stream)
            log.info("stream_up", stream=stream)

    # -- the end of a `once` run ---------------------------------------------------------------

    def report(self) -> str | None:
        """What is still down, for the error that ends a ``once`` run; None if nothing is."""
        parts = []
        # Rows an earlier run left that nothing in this one tried say nothing new.
        for target, down in sorted(self._targets.items()):
            if not down.confirmed:
                continue
            location = self._locations.get(target)
            what = f"GHL location {location!r}" if location is not None else f"target {target!r}"
            parts.append(f"{what}: {down.error}")
        parts += [
            f"stream {s!r}: {d.error}" for s, d in sorted(self._streams.items()) if d.confirmed
        ]
        if not parts:
            return None
        return "finished everything else, but these are down (see `bridge status`): " + "; ".join(
            parts
        )
