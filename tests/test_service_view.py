"""Liveness, readiness, the STATUS line, the health listener and the reload rules, in process."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bridge.app import open_app, poll_intervals
from bridge.clock import SystemClock
from bridge.config import Config, Duration, load_config
from bridge.demo import sim_world
from bridge.errors import AuthError, ConfigError
from bridge.models import BudgetRow, NewOp, Op
from bridge.observability.http import serve
from bridge.observability.logs import configure_output, get_logger
from bridge.observability.metrics import Metrics, Snapshot
from bridge.observability.service import ServiceView
from bridge.pipeline import Pipeline
from bridge.ratelimit import BucketState, Limiters
from bridge.reload import merge_reloadable
from bridge.store import Store
from tests.fakes import FakeStream, FakeTarget, Record, settings


class SteppedClock(SystemClock):
    """The real clock, with monotonic time that a test can move forward."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.ahead


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


def parts(
    store: Store, clock: SteppedClock, target: FakeTarget, *, stall: float = 60.0
) -> tuple[Pipeline, Limiters, ServiceView]:
    stream = FakeStream([Record(key="r1", entity="e1")], poll_interval=0.05, target="ghl:main")
    limiters = Limiters(clock)
    limiters.add("ghl", "main", capacity=10, window=1.0)
    pipeline = Pipeline(
        store,
        [stream],
        {"ghl:main": target},
        settings(),
        clock,
        random.Random(1),
        locations={"ghl:main": "main"},
    )
    view = ServiceView(
        pipeline,
        limiters,
        [stream],
        locations={"ghl:main": "main"},
        clock=clock,
        stall_timeout=stall,
    )
    return pipeline, limiters, view


async def test_busy_without_progress_past_the_stall_timeout_is_not_alive(store: Store) -> None:
    """An op hanging past stall_timeout withholds the watchdog (logged once); idle is alive."""
    clock = SteppedClock()
    target = FakeTarget()
    target.hold = asyncio.Event()
    pipeline, _, view = parts(store, clock, target)
    assert view.alive()  # idle before the run
    run = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(target.started.wait(), 5)
    assert pipeline.busy
    assert view.alive()  # busy, but only just
    clock.ahead = 61.0
    with capture_logs() as logs:
        assert not view.alive()
        assert not view.alive()
    assert [e["event"] for e in logs] == ["pipeline_stalled"]
    target.hold.set()
    await asyncio.sleep(0.1)
    assert view.alive()  # the op finished: progress
    pipeline.request_stop()
    await asyncio.wait_for(run, 5)


async def test_a_paused_budget_is_waiting_by_design(store: Store) -> None:
    """A stall while a budget is paused after a 429 (or spent for the day) is not stuck."""
    clock = SteppedClock()
    target = FakeTarget()
    target.hold = asyncio.Event()
    pipeline, limiters, view = parts(store, clock, target)
    run = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(target.started.wait(), 5)
    limiters.get("ghl", "main").throttle(clock.monotonic() + 3600)
    clock.ahead = 600.0
    assert view.alive()
    assert view.rate_limited() == ["main"]
    assert "1 location rate-limited" in view.status_line()
    target.hold.set()
    pipeline.request_stop()
    await asyncio.wait_for(run, 5)


async def test_status_line_names_what_an_operator_needs(store: Store) -> None:
    """The STATUS line counts streams, those behind, ops pending and locations down."""
    clock = SteppedClock()
    pipeline, _, view = parts(store, clock, FakeTarget())
    assert view.status_line().startswith("starting, 1 stream, 0 behind, 0 ops pending")
    view.ready = True
    pipeline.caught_up_at["fake.records"] -= 3600  # not caught up for an hour
    await pipeline.health.target_failed(
        await _op(store), AuthError("the private integration token was rejected")
    )
    line = view.status_line()
    assert line.startswith("1 stream, 1 behind, ")
    assert "1 location down (main)" in line
    assert not view.serving()


async def _op(store: Store) -> Op:
    await store.commit_page(
        "fake.records",
        "1",
        [NewOp(target="ghl:main", entity="e1", kind="k", source_key="r1", payload=b"{}")],
        [],
        now=0.0,
    )
    (op,) = await store.due_ops(now=1.0, limit=1)
    return op


async def test_readyz_is_503_until_ready_and_while_every_location_is_down(store: Store) -> None:
    """/readyz: 503 while starting, 200 once ready, 503 when every location fails auth."""
    clock = SteppedClock()
    pipeline, _, view = parts(store, clock, FakeTarget())
    metrics = Metrics()
    metrics.watch(
        lambda: Snapshot(
            ready=view.ready,
            outbox={"ghl:main": 3},
            cursor_lag=view.cursor_lag(),
            poll_interval={"fake.records": 0.05},
            buckets=[],
            location_up={"main": True},
            token_expires_at={"main": 1.8e9},
            token_refreshes={"main": 2},
        )
    )
    async with (
        serve(view, metrics, host="127.0.0.1", port=0) as port,
        aiohttp.ClientSession() as session,
    ):
        base = f"http://127.0.0.1:{port}"

        async def status_of(path: str) -> tuple[int, object]:
            async with session.get(base + path) as resp:
                return resp.status, msgspec.json.decode(await resp.read())

        assert await status_of("/readyz") == (503, {"status": "starting"})
        assert (await status_of("/healthz"))[0] == 200
        view.ready = True
        assert await status_of("/readyz") == (200, {"status": "ready", "down": []})
        await pipeline.health.target_failed(await _op(store), AuthError("token revoked"))
        assert await status_of("/readyz") == (
            503,
            {"status": "every location down", "down": ["main"]},
        )
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
            assert resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["bridge_outbox_open_ops"].samples[0].value == 3
    assert families["bridge_token_expires_at_seconds"].samples[0].value == 1.8e9
    assert families["bridge_token_refreshes"].samples[0].value == 2


CONFIG = """\
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc1"
auth = {{ kind = "private_token", token = "pit-secret" }}

[[sources.action_network]]
name = "an"
location = "main"
api_key = "an-secret"
poll_interval = "{interval}"
rate = {rate}
{extra}
"""


def config_of(
    tmp_path: Path, name: str, *, interval: str = "60s", rate: int = 4, extra: str = ""
) -> Config:
    path = tmp_path / name
    path.write_text(CONFIG.format(interval=interval, rate=rate, extra=extra), encoding="utf-8")
    return load_config(path)


def test_reload_takes_mappings_intervals_and_logging_and_names_the_rest(tmp_path: Path) -> None:
    """merge_reloadable applies the reloadable parts and lists every other changed path."""
    old = config_of(tmp_path, "old.toml")
    mapping = '[mapping.action_network.contact]\nemail = { from = "email" }\n'
    new = config_of(tmp_path, "new.toml", interval="5m", rate=2, extra=mapping)
    merged, restart = merge_reloadable(old, new)
    assert merged.sources.action_network[0].poll_interval == Duration(300.0)
    assert merged.sources.action_network[0].rate == 4  # kept: buckets are built at start
    assert "action_network" in merged.mapping
    assert restart == ["$.sources.action_network[0].rate"]
    assert merge_reloadable(old, old) == (old, [])


def test_a_changed_secret_is_named_never_shown(tmp_path: Path) -> None:
    """A new token is a restart-only change, reported by path without its value."""
    old = config_of(tmp_path, "old.toml")
    text = (tmp_path / "old.toml").read_text().replace("pit-secret", "pit-rotated")
    (tmp_path / "new.toml").write_text(text)
    _, restart = merge_reloadable(old, load_config(tmp_path / "new.toml"))
    assert restart == ["$.ghl.locations[0].auth.token"]
    assert "pit-rotated" not in repr(restart)


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("0.0.0.0:9464", "not a loopback address"),
        ("10.0.0.5:9464", "not a loopback address"),
        ("127.0.0.1", 'expected "host:port"'),
        ("127.0.0.1:http", 'expected "host:port"'),
        ("127.0.0.1:70000", 'expected "host:port"'),
    ],
)
def test_the_listener_must_be_a_loopback_host_and_port(
    tmp_path: Path, listen: str, reason: str
) -> None:
    """[http] listen is checked at start, naming the key."""
    with pytest.raises(ConfigError, match=r"\$\.http\.listen") as caught:
        config_of(tmp_path, "c.toml", extra=f'[http]\nlisten = "{listen}"\n')
    assert reason in str(caught.value)


def test_loopback_listeners_are_accepted(tmp_path: Path) -> None:
    """127.0.0.1, [::1] and localhost are all fine."""
    for listen in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464"):
        config = config_of(tmp_path, "c.toml", extra=f'[http]\nlisten = "{listen}"\n')
        assert config.http.listen == listen


def test_log_file_is_reopened_at_its_path(tmp_path: Path) -> None:
    """configure_output appends to the file, 0600; called again it opens a fresh one."""
    path = tmp_path / "bridge.log"
    try:
        configure_output(level="info", fmt="json", file=str(path))
        get_logger("t").info("first")
        path.rename(tmp_path / "bridge.log.1")
        configure_output(level="info", fmt="json", file=str(path))
        get_logger("t").info("second")
    finally:
        configure_output(level="info", fmt="json")
    assert '"first"' in (tmp_path / "bridge.log.1").read_text()
    assert '"second"' in path.read_text()
    assert '"first"' not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600


def test_every_series_the_alert_rules_use_is_exported() -> None:
    """systemd/bridge-alerts.yml names only series the daemon really exports."""
    rules = Path(__file__).parent.parent / "systemd" / "bridge-alerts.yml"
    used = set(re.findall(r"\bbridge_[a-z_]+", rules.read_text(encoding="utf-8")))
    metrics = Metrics()
    bucket = BucketState("ghl", "main", 100, 10.0, 90, None, 5, 200_000, 1)
    metrics.watch(
        lambda: Snapshot(
            ready=True,
            outbox={"ghl:main": 1},
            cursor_lag={"an.people": 1.0},
            poll_interval={"an.people": 60.0},
            buckets=[bucket],
            location_up={"main": True},
            token_expires_at={"main": 1.8e9},
            token_refreshes={"main": 0},
        )
    )
    metrics.dead_lettered.labels("an.people").inc()
    exported = {
        sample.name
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    assert used
    assert used <= exported, used - exported


async def test_poll_intervals_agree_with_the_streams_built(tmp_path: Path) -> None:
    """What SIGHUP sets as each stream's interval is what open_app gave it at start."""
    async with sim_world(tmp_path) as world:
        config = load_config(world.config_path)
        async with open_app(config) as app:
            built = {s.name: s.poll_interval for s in app.streams}
    intervals = poll_intervals(config)
    assert len(built) == 5
    assert {name: intervals[name] for name in built} == built


async def test_restore_budgets_holds_what_the_last_process_may_still_have_counting(
    tmp_path: Path,
) -> None:
    """Buckets reported a second ago start empty, one reported long ago starts full, and a
    reverse stream's share or a bucket no longer configured is passed over."""
    path = tmp_path / "bridge.toml"
    path.write_text(
        """
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc1"
auth = { kind = "private_token", token = "pit-11111111-2222-4333-8444-555555555555" }

[[sources.action_network]]
name = "an"
location = "main"
api_key = "an-key-0123456789"
""",
        encoding="utf-8",
    )
    config = load_config(path)
    now = time.time()

    def row(api: str, tenant: str, at: float) -> BudgetRow:
        return BudgetRow(
            api=api,
            tenant=tenant,
            capacity=100,
            window=10.0,
            available=100,
            used_today=7,
            daily_cap=None,
            paused_until=None,
            updated_at=at,
        )

    async with Store.open(config.state.path) as opened:
        await opened.save_budgets(
            [
                row("ghl", "main", now - 1),
                row("ghl", "main/share", now - 1),
                row("ghl", "gone", now - 1),
                row("actionnetwork", "an", now - 60),
            ]
        )
    async with open_app(config) as app:
        with capture_logs() as logs:
            await app.restore_budgets()
        states = {(b.api, b.tenant): b for b in app.limiters.states()}
    assert (states[("ghl", "main")].available, states[("ghl", "main")].used_today) == (0, 7)
    assert states[("actionnetwork", "an")].available == 4
    (held,) = [e for e in logs if e["event"] == "budget_held_from_last_run"]
    assert (held["api"], held["tenant"]) == ("ghl", "main")
    assert 9.0 < held["seconds"] <= 10.0


async def test_after_a_clean_stop_only_what_was_spent_is_held(tmp_path: Path) -> None:
    """A clean stop's last report follows its last request: an idle bucket starts full,
    one that had spent 30 of 100 holds back just those 30 for the rest of the window."""
    path = tmp_path / "bridge.toml"
    path.write_text(
        """
[state]
path = "state.db"

[[ghl.locations]]
name = "main"
location_id = "loc1"
auth = { kind = "private_token", token = "pit-11111111-2222-4333-8444-555555555555" }

[[ghl.locations]]
name = "busy"
location_id = "loc2"
auth = { kind = "private_token", token = "pit-11111111-2222-4333-8444-555555555556" }
""",
        encoding="utf-8",
    )
    config = load_config(path)
    now = time.time()

    def row(tenant: str, available: int) -> BudgetRow:
        return BudgetRow(
            api="ghl",
            tenant=tenant,
            capacity=100,
            window=10.0,
            available=available,
            used_today=0,
            daily_cap=None,
            paused_until=None,
            updated_at=now - 1.0,
        )

    async with Store.open(config.state.path) as opened:
        await opened.save_budgets([row("main", 100), row("busy", 70)], final=True)
    async with open_app(config) as app:
        await app.restore_budgets()
        states = {b.tenant: b.available for b in app.limiters.states()}
    assert states == {"main": 100, "busy": 70}
    async with Store.open(config.state.path) as opened:
        # A running daemon's next report says nothing of what follows it.
        await opened.save_budgets([row("main", 100)])
        assert not await opened.budgets_final()
