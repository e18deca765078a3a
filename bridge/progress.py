"""Progress of `bridge once` and `bridge backfill`: a live frame on a TTY, log events off one.

The caller owns the numbers and hands in a function that snapshots them; this module only
samples that function on a timer, turns the samples into a send rate and an ETA, and shows
them. Run :func:`show_progress` as a task and cancel it when the run ends: it then draws one
last frame (or logs one last ``progress`` event) and re-raises the cancellation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final, TextIO

import msgspec
import structlog
from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = [
    "LOG_INTERVAL",
    "RATE_WINDOW",
    "TTY_INTERVAL",
    "ProgressSnapshot",
    "RateMeter",
    "eta_seconds",
    "render_line",
    "show_progress",
]

log = structlog.get_logger("bridge.progress")

TTY_INTERVAL: Final = 0.25
"""Seconds between frames on a terminal: fast enough to look live, slow enough to be cheap."""

LOG_INTERVAL: Final = 10.0
"""Seconds between ``progress`` events off a terminal, so journald gets a pulse, not a flood."""

RATE_WINDOW: Final = 10.0
"""Seconds of history behind the send rate: long enough to smooth out one slow batch."""

_SEP: Final = " · "
_NO_ESTIMATE: Final = "—"


class ProgressSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The run's counters at one instant, as the caller counts them."""

    records_read: int
    """Source records read so far in this run."""
    ops_sent: int
    """Ops completed (sent, unchanged or reconciled) so far in this run."""
    ops_open: int
    """Ops still pending in the outbox: the work left."""
    dead_lettered: int
    budget_per_second: float
    """Requests per second the GHL budgets allow in total (burst/window summed over
    locations); 0 when unknown."""
    streams_done: int
    """Streams that have caught up."""
    streams_total: int


class RateMeter:
    """Ops per second over about the last ``window`` seconds, from cumulative counts."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        if window <= 0:
            raise ValueError(f"rate window must be positive, not {window}")
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, total: int) -> None:
        """Record that ``total`` ops had completed at time ``at`` (seconds, monotonic)."""
        self._samples.append((at, total))
        cutoff = at - self._window
        # Keep the newest sample at or before the cutoff as the anchor: with sparse samples
        # (one per 10 s off a TTY) dropping everything older would leave nothing to compare.
        while len(self._samples) >= 2 and self._samples[1][0] <= cutoff:
            self._samples.popleft()

    def rate(self) -> float:
        """Ops per second across the window; 0.0 until two samples span some time."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        # A counter that went down (a caller recounting) is no evidence of negative speed.
        return max(0.0, (n1 - n0) / (t1 - t0))


def eta_seconds(open_ops: int, observed: float, budget: float) -> float | None:
    """Seconds to finish ``open_ops`` at the observed rate, capped by the budget; None if unknown.

    A burst early in a run can outpace what the rate limits will sustain, so the estimate
    never uses a rate above ``budget`` when the budget is known (``budget > 0``).
    """
    if open_ops <= 0:
        return 0.0
    rate = min(observed, budget) if budget > 0 else observed
    if rate <= 0:
        return None
    return open_ops / rate


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return _NO_ESTIMATE
    # Rounded up, so the display never says 0s while work is left.
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86_400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86_400}d {whole % 86_400 // 3600:02d}h"


def _parts(snap: ProgressSnapshot, rate: float, eta: float | None) -> list[tuple[str, str]]:
    # (text, rich style) pairs: the plain line and the rich frame are built from the same
    # pieces, so the two displays cannot drift apart.
    dead = "dead letter" if snap.dead_lettered == 1 else "dead letters"
    return [
        (f"streams {snap.streams_done}/{snap.streams_total}", ""),
        (f"{snap.records_read:,} read", ""),
        (f"{snap.ops_sent:,} sent", ""),
        (f"{snap.ops_open:,} open", ""),
        (f"{snap.dead_lettered:,} {dead}", "bold red" if snap.dead_lettered > 0 else ""),
        (f"{rate:,.1f} ops/s", ""),
        (f"ETA {_format_eta(eta)}", ""),
    ]


# The first five parts are the counts; the rest (rate, ETA) go on the rich frame's second
# line, which keeps each line inside an 80-column terminal.
_COUNT_PARTS: Final = 5


def render_line(snap: ProgressSnapshot, rate: float, eta: float | None) -> str:
    """One plain line, e.g. ``streams 2/3 · 1,204 read · … · 9.8 ops/s · ETA 23s``."""
    return _SEP.join(text for text, _ in _parts(snap, rate, eta))


def _render_rich(snap: ProgressSnapshot, rate: float, eta: float | None) -> Text:
    parts = _parts(snap, rate, eta)
    frame = Text()
    for line in (parts[:_COUNT_PARTS], parts[_COUNT_PARTS:]):
        if frame:
            frame.append("\n")
        for i, (text, style) in enumerate(line):
            if i:
                frame.append(_SEP, style="dim")
            frame.append(text, style=style)
    return frame


class _Sampler:
    """Takes a snapshot and the rate and ETA that go with it, feeding the rate meter."""

    def __init__(
        self, snapshot: Callable[[], ProgressSnapshot], clock: Callable[[], float]
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._meter = RateMeter()

    def __call__(self) -> tuple[ProgressSnapshot, float, float | None]:
        snap = self._snapshot()
        self._meter.add(self._clock(), snap.ops_sent)
        rate = self._meter.rate()
        return snap, rate, eta_seconds(snap.ops_open, rate, snap.budget_per_second)


async def show_progress(
    snapshot: Callable[[], ProgressSnapshot],
    *,
    out: TextIO,
    tty: bool,
    clock: Callable[[], float] = time.monotonic,
    interval: float | None = None,
) -> None:
    """Show progress until cancelled, then show a final frame or line and re-raise.

    On a TTY the display is a two-line rich frame on ``out``, redrawn every ``interval``
    seconds (default 0.25). Otherwise ``out`` is unused: a ``progress`` log event goes out
    every ``interval`` seconds (default 10) and one with ``final=True`` on cancel.
    """
    if interval is None:
        interval = TTY_INTERVAL if tty else LOG_INTERVAL
    if interval <= 0:
        raise ValueError(f"progress interval must be positive, not {interval}")
    sample = _Sampler(snapshot, clock)
    if tty:
        await _show_live(sample, out, interval)
    else:
        await _log_progress(sample, interval)


async def _show_live(sample: _Sampler, out: TextIO, interval: float) -> None:
    console = Console(file=out, force_terminal=True)
    # auto_refresh=False: frames are drawn from this task, not rich's refresh thread, so
    # the display never reads the counters from another thread. No stdout/stderr
    # redirection: swapping the process's sys.stdout is not this module's business.
    live = Live(
        _render_rich(*sample()),
        console=console,
        auto_refresh=False,
        transient=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    live.start(refresh=True)
    try:
        while True:
            await asyncio.sleep(interval)
            live.update(_render_rich(*sample()), refresh=True)
    except asyncio.CancelledError:
        live.update(_render_rich(*sample()), refresh=True)
        raise
    finally:
        # Also on a failing snapshot: the cursor comes back and the last frame stays.
        live.stop()


def _log_event(
    snap: ProgressSnapshot, rate: float, eta: float | None, *, final: bool = False
) -> None:
    log.info(
        "progress",
        records_read=snap.records_read,
        ops_sent=snap.ops_sent,
        ops_open=snap.ops_open,
        dead_lettered=snap.dead_lettered,
        streams_done=snap.streams_done,
        streams_total=snap.streams_total,
        rate=round(rate, 2),
        eta_seconds=None if eta is None else round(eta, 1),
        final=final,
    )


async def _log_progress(sample: _Sampler, interval: float) -> None:
    # The first sample only starts the rate meter: a line at t=0 would say nothing new,
    # and a run shorter than one interval should leave just its final line.
    sample()
    try:
        while True:
            await asyncio.sleep(interval)
            _log_event(*sample())
    except asyncio.CancelledError:
        _log_event(*sample(), final=True)
        raise
