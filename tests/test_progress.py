"""The progress display: rate meter, ETA, the plain line, and both display modes."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
from structlog.testing import capture_logs

from bridge.progress import ProgressSnapshot, RateMeter, eta_seconds, render_line, show_progress


def snap(
    *,
    records_read: int = 0,
    ops_sent: int = 0,
    ops_open: int = 0,
    dead_lettered: int = 0,
    budget_per_second: float = 0.0,
    streams_done: int = 0,
    streams_total: int = 1,
) -> ProgressSnapshot:
    return ProgressSnapshot(
        records_read=records_read,
        ops_sent=ops_sent,
        ops_open=ops_open,
        dead_lettered=dead_lettered,
        budget_per_second=budget_per_second,
        streams_done=streams_done,
        streams_total=streams_total,
    )


class SteadyRun:
    """A run on a fake clock where every snapshot is one second and ten sent ops later."""

    def __init__(self, *, ops_open: int = 40, budget: float = 0.0) -> None:
        self.now = 0.0
        self.sent = 0
        self.ops_open = ops_open
        self.budget = budget
        self.samples = 0
        # Set at the third sample: the seed plus two periodic events.
        self.third_sample = asyncio.Event()

    def clock(self) -> float:
        return self.now

    def snapshot(self) -> ProgressSnapshot:
        self.now += 1.0
        self.sent += 10
        self.samples += 1
        if self.samples >= 3:
            self.third_sample.set()
        return snap(
            records_read=self.sent * 2,
            ops_sent=self.sent,
            ops_open=self.ops_open,
            budget_per_second=self.budget,
            streams_done=1,
            streams_total=2,
        )


def test_rate_meter_needs_two_samples() -> None:
    """With fewer than two samples there is no rate to report, so it reads 0."""
    meter = RateMeter()
    assert meter.rate() == 0.0
    meter.add(5.0, 100)
    assert meter.rate() == 0.0


def test_rate_meter_steady_rate() -> None:
    """A counter growing 10 per second on the fake clock reads 10 ops/s."""
    meter = RateMeter(window=10.0)
    for second in range(6):
        meter.add(1000.0 + second, 10 * second)
    assert meter.rate() == pytest.approx(10.0)


def test_rate_meter_forgets_samples_older_than_the_window() -> None:
    """A fast start stops counting once it is more than a window in the past."""
    meter = RateMeter(window=10.0)
    total = 0
    for second in range(21):
        meter.add(float(second), total)
        total += 100 if second < 10 else 1
    assert meter.rate() == pytest.approx(1.0)


def test_rate_meter_keeps_an_anchor_when_samples_are_sparse() -> None:
    """Samples further apart than the window still give a rate from the last two."""
    meter = RateMeter(window=10.0)
    meter.add(0.0, 0)
    meter.add(10.5, 105)
    meter.add(21.0, 210)
    assert meter.rate() == pytest.approx(10.0)


def test_rate_meter_never_goes_negative() -> None:
    """A counter that goes down reads as no progress, not a negative rate."""
    meter = RateMeter()
    meter.add(0.0, 50)
    meter.add(1.0, 40)
    assert meter.rate() == 0.0


def test_eta_budget_caps_an_optimistic_observed_rate() -> None:
    """An observed burst above the budget is estimated at the budget instead."""
    assert eta_seconds(100, observed=50.0, budget=10.0) == pytest.approx(10.0)


def test_eta_uses_observed_rate_below_budget_or_without_one() -> None:
    """A slower observed rate, or an unknown budget, leaves the observed rate in charge."""
    assert eta_seconds(100, observed=5.0, budget=10.0) == pytest.approx(20.0)
    assert eta_seconds(100, observed=50.0, budget=0.0) == pytest.approx(2.0)


def test_eta_unknown_at_zero_rate() -> None:
    """With work open and nothing moving there is nothing to estimate from."""
    assert eta_seconds(100, observed=0.0, budget=10.0) is None
    assert eta_seconds(100, observed=0.0, budget=0.0) is None


def test_eta_zero_when_nothing_is_open() -> None:
    """No open ops means done now, whatever the rate."""
    assert eta_seconds(0, observed=0.0, budget=0.0) == 0.0


def test_render_line_text() -> None:
    """The plain line shows every count with thousands separators, the rate and a rounded-up ETA."""
    line = render_line(
        snap(
            records_read=1204,
            ops_sent=980,
            ops_open=224,
            streams_done=2,
            streams_total=3,
        ),
        9.8,
        22.86,
    )
    assert line == (
        "streams 2/3 · 1,204 read · 980 sent · 224 open · 0 dead letters · 9.8 ops/s · ETA 23s"
    )


@pytest.mark.parametrize(
    ("eta", "shown"),
    [
        (None, "ETA —"),
        (0.0, "ETA 0s"),
        (0.2, "ETA 1s"),
        (125.0, "ETA 2m 05s"),
        (7380.0, "ETA 2h 03m"),
        (93_600.0, "ETA 1d 02h"),
    ],
)
def test_render_line_eta_formats(eta: float | None, shown: str) -> None:
    """The ETA reads as a dash when unknown and in the two largest units otherwise."""
    assert render_line(snap(), 0.0, eta).endswith(shown)


def test_render_line_singular_dead_letter() -> None:
    """One dead letter is not written as a plural."""
    assert " · 1 dead letter · " in render_line(snap(dead_lettered=1), 0.0, None)


async def test_show_progress_rejects_a_zero_interval() -> None:
    """A zero interval would spin the event loop, so it is refused up front."""
    with pytest.raises(ValueError, match="interval"):
        await show_progress(snap, out=io.StringIO(), tty=False, interval=0)


async def test_show_progress_logs_events_off_a_tty() -> None:
    """Off a TTY it logs `progress` events with counts, rate and ETA, then a final one on cancel."""
    run = SteadyRun(ops_open=40, budget=4.0)
    out = io.StringIO()
    with capture_logs() as logs:
        task = asyncio.create_task(
            show_progress(run.snapshot, out=out, tty=False, clock=run.clock, interval=0.001)
        )
        async with asyncio.timeout(1):
            await run.third_sample.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert task.cancelled()
    assert out.getvalue() == ""
    assert all(entry["event"] == "progress" for entry in logs)
    assert [entry["final"] for entry in logs] == [False] * (len(logs) - 1) + [True]
    first = logs[0]
    # The first sample only seeds the rate meter, so the first event is the second sample.
    assert {k: first[k] for k in first if k != "log_level"} == {
        "event": "progress",
        "records_read": 40,
        "ops_sent": 20,
        "ops_open": 40,
        "dead_lettered": 0,
        "streams_done": 1,
        "streams_total": 2,
        "rate": 10.0,
        "eta_seconds": 10.0,  # 40 open at the 4/s budget, not the observed 10/s
        "final": False,
    }
    assert logs[-1]["ops_sent"] == run.sent


async def test_show_progress_draws_frames_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a TTY it draws the counts, and on cancel a final frame with the latest ones."""
    # Rich picks colours from the environment; pin it so the red dead letters show.
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    current = snap(records_read=1204, ops_sent=980, ops_open=224, streams_done=2, streams_total=3)
    now = 0.0
    out = io.StringIO()

    # A long interval: the only frames are the first and the one drawn on cancel.
    task = asyncio.create_task(
        show_progress(lambda: current, out=out, tty=True, clock=lambda: now, interval=60)
    )
    await asyncio.sleep(0)
    first = out.getvalue()
    assert "streams 2/3" in first
    assert "1,204 read" in first
    assert "980 sent" in first
    assert "224 open" in first
    assert "0 dead letters" in first
    assert "ETA —" in first

    current = snap(
        records_read=2000,
        ops_sent=1100,
        ops_open=100,
        dead_lettered=1,
        streams_done=3,
        streams_total=3,
    )
    now = 10.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert task.cancelled()
    final = out.getvalue()[len(first) :]
    assert "streams 3/3" in final
    assert "2,000 read" in final
    assert "1,100 sent" in final
    assert "100 open" in final
    assert "12.0 ops/s" in final
    assert "ETA 9s" in final
    assert re.search(r"\x1b\[[0-9;]*31m1 dead letter\b", final)
    # Live.stop() gives the cursor back; without it the operator's shell has none.
    assert final.endswith("\x1b[?25h")
