"""Pipeline semantics with a test-only source and target over a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from bridge.clock import SystemClock
from bridge.errors import AuthError, Fatal
from bridge.models import EVENT_KIND, NewOp, Op, OpResult
from bridge.pipeline import Pipeline
from bridge.senders import partition_of
from bridge.shutdown import install_stop_signals
from bridge.store import Store
from tests.fakes import FakeStream, FakeTarget, Record, settings


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state.db") as opened:
        yield opened


def records(entities: int, per_entity: int, *, ops: int = 1) -> list[Record]:
    # Interleave entities so one page holds several records of the same entity.
    return [
        Record(key=f"r{e}-{n}", entity=f"e{e}", ops=ops)
        for n in range(per_entity)
        for e in range(entities)
    ]


async def run_once(
    store: Store, stream: FakeStream, target: FakeTarget, **overrides: float
) -> Pipeline:
    pipeline = Pipeline(
        store,
        [stream],
        {"fake:main": target},
        settings(**overrides),
        SystemClock(),
        random.Random(1),
    )
    await asyncio.wait_for(pipeline.run(once=True), 30)
    return pipeline


async def test_per_entity_order_under_concurrency(store: Store) -> None:
    """Each entity's ops run one at a time in source order while entities run concurrently."""
    stream = FakeStream(records(20, 5, ops=2), page_size=7)
    target = FakeTarget(delay=0.002)
    pipeline = await run_once(store, stream, target)
    assert pipeline.summary.ops_sent == 200
    for e in range(20):
        expected = [
            (f"r{e}-{n}#0" if s == 0 else f"r{e}-{n}", f"step{s}")
            for n in range(5)
            for s in range(2)
        ]
        assert target.order_of(f"e{e}") == expected
    assert target.max_concurrent > 1
    assert await store.open_ops() == 0


async def test_back_pressure_keeps_outbox_under_high_water(store: Store) -> None:
    """Producers pause so the outbox never holds more open ops than the high-water mark."""
    stream = FakeStream(records(50, 8, ops=2), page_size=5)
    target = FakeTarget(delay=0.001)
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await store.open_ops())
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    pipeline = await run_once(store, stream, target, outbox_high_water=20)
    done.set()
    await sampler
    assert pipeline.summary.ops_sent == 800
    assert 0 < peak <= 20


async def test_retry_then_success(store: Store) -> None:
    """A retryable failure is retried with backoff and the op then succeeds exactly once."""
    stream = FakeStream([Record(key="a", entity="e1"), Record(key="b", entity="e2")])
    target = FakeTarget()
    target.retryable["a"] = 2
    pipeline = await run_once(store, stream, target)
    assert pipeline.summary.ops_retried == 2
    assert target.applied[("a", "step0")] == 1
    assert [op.attempts for op in target.sent if op.source_key == "a"] == [0, 1, 2]
    row = await store.id_map("a")
    assert row is not None
    assert row.contact_id == "c-e1"


async def test_retries_are_bounded_then_dead_lettered(store: Store) -> None:
    """An op that keeps failing is dead-lettered after max_attempts with the last error."""
    stream = FakeStream([Record(key="a", entity="e1")])
    target = FakeTarget()
    target.retryable["a"] = 100
    pipeline = await run_once(store, stream, target, max_attempts=3)
    assert len([op for op in target.sent if op.source_key == "a"]) == 3
    (dl,) = await store.dead_letters()
    assert dl.error.startswith("gave up after 3 attempts: HTTP 503")
    assert pipeline.summary.dead_lettered == 1


async def test_rate_limits_never_use_up_an_ops_attempts(store: Store) -> None:
    """A 429 is the budget, not the record: an op flooded with them still goes through."""
    stream = FakeStream([Record(key="a", entity="e1")])
    target = FakeTarget()
    target.rate_limited["a"] = 6
    target.retryable["a"] = 1
    pipeline = await run_once(store, stream, target, max_attempts=3)
    assert target.applied[("a", "step0")] == 1
    assert pipeline.summary.dead_lettered == 0
    # Only the 503 counted.
    assert [op.attempts for op in target.sent if op.source_key == "a"][-1] == 1


async def test_rejection_goes_to_dead_letters_without_stalling_others(store: Store) -> None:
    """A rejected op and an unmappable event are dead-lettered with reasons; the rest flow."""
    recs = records(10, 3)
    recs.insert(4, Record(key="broken", entity="e99", bad=True))
    stream = FakeStream(recs, page_size=4)
    target = FakeTarget()
    target.reject.add("r3-1")
    pipeline = await run_once(store, stream, target)
    assert pipeline.summary.ops_sent == 29
    letters = {dl.source_key: dl for dl in await store.dead_letters()}
    assert set(letters) == {"broken", "r3-1"}
    assert letters["broken"].kind == EVENT_KIND
    assert "missing email" in letters["broken"].error
    assert letters["r3-1"].error == "HTTP 422 from fake target; email must be an email"
    # The later op of the same entity still ran: a dead letter does not block its entity.
    assert ("r3-2", "step0") in target.order_of("e3")
    assert await store.open_ops() == 0


async def test_dlq_replay_redelivers_ops_and_events(store: Store) -> None:
    """Replaying a dead-lettered op or event puts it back and it is delivered once."""
    stream = FakeStream([Record(key="a", entity="e1"), Record(key="bad", entity="e2", bad=True)])
    target = FakeTarget()
    target.reject.add("a")
    await run_once(store, stream, target)
    assert len(await store.dead_letters()) == 2

    target.reject.clear()
    fixed = FakeStream([Record(key="bad", entity="e2")])  # the mapping was fixed
    pipeline = Pipeline(store, [fixed], {"fake:main": target}, settings(), SystemClock())
    for dl in await store.dead_letters():
        if dl.kind == EVENT_KIND:
            # Replay maps the stored payload again; the fixed record has the same key.
            fixed_payload = dl.payload.replace(b'"bad":true', b'"bad":false')
            dl = msgspec.structs.replace(dl, payload=fixed_payload)
        assert await pipeline.replay(dl) == 1
    fixed.records = []  # nothing new from the source; only the replayed ops flow
    await asyncio.wait_for(pipeline.run(once=True), 30)
    assert await store.dead_letters() == []
    assert target.applied[("a", "step0")] == 1
    assert target.applied[("bad", "step0")] == 1


async def test_in_flight_op_is_reconciled_not_resent(store: Store) -> None:
    """An op a crash left in flight is reconciled first and re-sent only if it did not land."""
    stream = FakeStream([Record(key="landed", entity="e1"), Record(key="lost", entity="e2")])
    await store.commit_page(
        stream.name,
        "2",
        [
            *stream.transform(stream._event(stream.records[0])),
            *stream.transform(stream._event(stream.records[1])),
        ],
        now=1.0,
    )
    for op in await store.due_ops(now=2.0, limit=10):
        await store.mark_in_flight(op.id, now=2.0)  # the crash happened after this
    target = FakeTarget()
    target.applied[("landed", "step0")] = 1  # its write reached the target before the crash
    pipeline = await run_once(store, FakeStream([], name=stream.name), target)
    assert pipeline.summary.in_doubt_at_start == 2
    assert sorted(op.source_key for op in target.reconciled) == ["landed", "lost"]
    assert [op.source_key for op in target.sent] == ["lost"]
    assert target.applied[("landed", "step0")] == 1
    assert target.applied[("lost", "step0")] == 1


async def test_in_doubt_failure_is_reconciled_before_retry(store: Store) -> None:
    """A write whose outcome is unknown is looked up, not blindly sent again."""
    stream = FakeStream([Record(key="a", entity="e1")])
    target = FakeTarget()
    target.in_doubt_after_write["a"] = 1
    await run_once(store, stream, target)
    assert [op.source_key for op in target.reconciled] == ["a"]
    assert target.applied[("a", "step0")] == 1


async def test_unchanged_records_make_no_ops(store: Store) -> None:
    """A second poll of the same records writes nothing; a changed record makes its ops."""
    recs = records(5, 2)
    await run_once(store, FakeStream(recs), FakeTarget())
    await store.set_cursor("fake.records", None)  # re-read everything, as an overlap would
    recs[3] = msgspec.structs.replace(recs[3], text="changed")
    target = FakeTarget()
    pipeline = await run_once(store, FakeStream(recs), target)
    assert pipeline.summary.events_unchanged == 9
    assert [op.source_key for op in target.sent] == [recs[3].key]


async def test_fatal_error_stops_and_keeps_the_op(store: Store) -> None:
    """A fatal error stops the run loudly and the op stays pending for after the fix."""
    stream = FakeStream([Record(key="a", entity="e1")])
    target = FakeTarget()
    target.fatal.add("a")
    with pytest.raises(Fatal, match="credentials revoked"):
        await run_once(store, stream, target)
    assert (await store.outbox_counts())["pending"] == 1


async def test_sigterm_drains_and_loses_nothing(store: Store) -> None:
    """SIGTERM stops intake, lets in-flight ops finish, and a restart delivers the rest once."""
    stream = FakeStream(records(30, 4), page_size=10, poll_interval=0.01)
    target = FakeTarget(delay=0.02)
    pipeline = Pipeline(store, [stream], {"fake:main": target}, settings(), SystemClock())
    with install_stop_signals(pipeline):
        run = asyncio.create_task(pipeline.run())
        while pipeline.summary.ops_sent < 10:  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(run, 10)
    counts = await store.outbox_counts()
    assert counts["in_flight"] == 0  # every op that had started was allowed to finish
    assert pipeline.summary.ops_sent < 120

    again = await run_once(store, stream, target)
    assert again.summary.in_doubt_at_start == 0
    assert len(target.applied) == 120
    assert set(target.applied.values()) == {1}


async def test_ops_past_drain_grace_are_reconciled_next_start(store: Store) -> None:
    """An op still running when the grace period ends is cancelled and reconciled next run."""
    stream = FakeStream([Record(key="stuck", entity="e1")])
    target = FakeTarget()
    target.hold = asyncio.Event()
    pipeline = Pipeline(
        store, [stream], {"fake:main": target}, settings(drain_grace=0.05), SystemClock()
    )
    run = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(target.started.wait(), 5)
    pipeline.request_stop()
    await asyncio.wait_for(run, 5)
    assert (await store.outbox_counts())["in_flight"] == 1

    target.hold = None
    again = await run_once(store, FakeStream([], name=stream.name), target)
    assert again.summary.in_doubt_at_start == 1
    assert [op.source_key for op in target.reconciled] == ["stuck"]
    assert target.applied[("stuck", "step0")] == 1


def test_partition_is_stable() -> None:
    """An entity always maps to the same partition, in any process."""
    assert partition_of("an-main:person:1", 8) == partition_of("an-main:person:1", 8)
    assert {partition_of(f"e{i}", 8) for i in range(100)} == set(range(8))


def test_op_is_frozen() -> None:
    """Ops handed to senders cannot be changed by them."""
    op = Op(
        id=1,
        stream="s",
        target="t",
        entity="e",
        kind="k",
        source_key="k",
        payload=b"{}",
        content_hash=None,
        attempts=0,
        in_doubt=False,
    )
    with pytest.raises(AttributeError):
        op.attempts = 2  # type: ignore[misc]


async def test_op_identical_to_the_last_applied_is_not_sent_again(store: Store) -> None:
    """An op that would send what its record's last op of that kind sent completes unsent."""
    target = FakeTarget()
    same = NewOp(target="fake:main", entity="e", kind="k", source_key="s", payload=b'{"v":1}')
    changed = NewOp(target="fake:main", entity="e", kind="k", source_key="s", payload=b'{"v":2}')
    runs = []
    for ops in ([same], [same], [changed]):
        await store.commit_page("fake.records", None, ops, now=0.0)
        pipeline = Pipeline(store, [], {"fake:main": target}, settings(), SystemClock())
        await asyncio.wait_for(pipeline.run(once=True), 10)
        runs.append((pipeline.summary.ops_sent, pipeline.summary.ops_unchanged))
    assert runs == [(1, 0), (0, 1), (1, 0)]
    assert len(target.sent) == 2


# -- many targets: isolation -------------------------------------------------------------------

LOCATIONS = {"ghl:a": "a", "ghl:b": "b"}


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` until it holds, failing the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling plain test state
            await asyncio.sleep(0.005)


def people(prefix: str, count: int) -> list[Record]:
    return [Record(key=f"{prefix}{i}", entity=f"{prefix}{i}") for i in range(count)]


def events_named(logs: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    return [str(e["event"]) for e in logs if str(e["event"]).startswith(prefix)]


async def test_a_stuck_target_holds_only_its_own_senders(store: Store) -> None:
    """A target whose calls hang (a 429 pause) fills only its own lane; another target's ops,
    queued behind its whole backlog, still flow."""
    backlog = [
        NewOp(target="fake:stuck", entity=f"s{i}", kind="k", source_key=f"s{i}", payload=b"{}")
        for i in range(100)
    ]
    await store.commit_page("stuck.records", None, backlog, now=0.0)
    stuck, free = FakeTarget(), FakeTarget()
    stuck.hold = asyncio.Event()  # never set: every call waits
    stream = FakeStream(people("f", 20), name="free.records", target="fake:free")
    pipeline = Pipeline(
        store,
        [stream],
        {"fake:stuck": stuck, "fake:free": free},
        settings(senders=2, queue_size=4, drain_grace=0.05),
        SystemClock(),
    )
    run = asyncio.create_task(pipeline.run())
    await wait_until(lambda: len(free.applied) == 20, 5)
    assert stuck.max_concurrent == 2  # its own two senders, no more
    pipeline.request_stop()
    await asyncio.wait_for(run, 5)
    counts = await store.outbox_counts()
    assert counts["pending"] + counts["in_flight"] == 100


async def test_fatal_target_is_quarantined_alone(store: Store) -> None:
    """A target that raises Fatal is marked down with its reason and its ops wait, uncounted;
    the other location finishes, and `once` then fails naming the down location."""
    a_stream = FakeStream(records(3, 2), name="a.records", target="ghl:a")
    b_stream = FakeStream(people("b", 10), name="b.records", target="ghl:b")
    a, b = FakeTarget(), FakeTarget()
    a.fatal = {r.key for r in a_stream.records}
    pipeline = Pipeline(
        store,
        [a_stream, b_stream],
        {"ghl:a": a, "ghl:b": b},
        settings(),
        SystemClock(),
        locations=LOCATIONS,
    )
    with (
        capture_logs() as logs,
        pytest.raises(Fatal, match="GHL location 'a': Fatal: credentials revoked for ghl:a"),
    ):
        await asyncio.wait_for(pipeline.run(once=True), 10)
    assert len(b.applied) == 10
    assert not a.applied
    assert await store.dead_letters() == []
    assert (await store.outbox_counts_by_target())["ghl:a"]["pending"] == 6
    heads = await store.due_ops(now=1e12, limit=10, target="ghl:a")
    assert [op.attempts for op in heads] == [0, 0, 0]
    (row,) = await store.health()
    assert (row.kind, row.name) == ("target", "ghl:a")
    assert row.error == "Fatal: credentials revoked for ghl:a"
    (down,) = [e for e in logs if e["event"] == "target_down"]
    assert (down["log_level"], down["target"], down["location"]) == ("error", "ghl:a", "a")


async def test_run_stops_only_when_every_location_is_down(store: Store) -> None:
    """A write-back target going down leaves the run going; losing every location stops it."""
    stream = FakeStream(people("p", 4), target="an:src")
    writeback, location = FakeTarget(), FakeTarget()
    writeback.fatal = {r.key for r in stream.records}
    others = FakeStream(people("q", 4), name="q.records", target="ghl:a")
    pipeline = Pipeline(
        store,
        [stream, others],
        {"an:src": writeback, "ghl:a": location},
        settings(),
        SystemClock(),
        locations={"ghl:a": "a"},
    )
    with pytest.raises(Fatal, match="target 'an:src': Fatal: credentials revoked"):
        await asyncio.wait_for(pipeline.run(once=True), 10)
    assert len(location.applied) == 4

    await store.mark_up("target", "an:src")
    writeback.fatal.clear()
    location.fatal = {"r"}
    last = FakeStream([Record(key="r", entity="r")], name="r.records", target="ghl:a")
    pipeline = Pipeline(
        store,
        [last],
        {"an:src": writeback, "ghl:a": location},
        settings(),
        SystemClock(),
        locations={"ghl:a": "a"},
    )
    with pytest.raises(Fatal, match=r"^credentials revoked for ghl:a$"):
        await asyncio.wait_for(pipeline.run(), 10)
    assert (await store.outbox_counts())["pending"] == 1


async def test_down_target_is_probed_after_recheck_and_comes_back(store: Store) -> None:
    """Nothing is sent to a down target until target_recheck has passed; then one probe goes,
    and when it works the target is up and its backlog flows."""
    stream = FakeStream(records(5, 2), target="ghl:a")
    a = FakeTarget()
    a.fatal = {r.key for r in stream.records}
    pipeline = Pipeline(
        store,
        [stream],
        {"ghl:a": a, "ghl:b": FakeTarget()},
        settings(target_recheck=0.5),
        SystemClock(),
        locations=LOCATIONS,
    )
    with capture_logs() as logs:
        run = asyncio.create_task(pipeline.run())
        await wait_until(lambda: "target_down" in events_named(logs, "target_"))
        await asyncio.sleep(0.05)  # calls already under way settle
        calls = len(a.sent)
        await asyncio.sleep(0.2)
        assert len(a.sent) == calls  # a down target gets no calls
        a.fatal.clear()
        await wait_until(lambda: len(a.applied) == 10)
        pipeline.request_stop()
        await asyncio.wait_for(run, 5)
    assert events_named(logs, "target_") == ["target_down", "target_probe", "target_up"]
    assert await store.health() == []
    assert await store.open_ops() == 0


async def test_failed_probe_keeps_the_target_down(store: Store) -> None:
    """A probe that fails again costs one call per recheck and moves the next chance on."""
    stream = FakeStream(records(3, 1), target="ghl:a")
    a = FakeTarget()
    a.fatal = {r.key for r in stream.records}
    pipeline = Pipeline(
        store,
        [stream],
        {"ghl:a": a, "ghl:b": FakeTarget()},
        settings(target_recheck=0.2),
        SystemClock(),
        locations=LOCATIONS,
    )
    with capture_logs() as logs:
        run = asyncio.create_task(pipeline.run())
        await wait_until(lambda: events_named(logs, "target_").count("target_still_down") == 2)
        pipeline.request_stop()
        await asyncio.wait_for(run, 5)
    probes = events_named(logs, "target_").count("target_probe")
    assert probes in (2, 3)  # a third may have started as the run stopped
    (row,) = await store.health()
    assert row.checked_at > row.since
    assert (await store.outbox_counts())["pending"] == 3


async def test_fatal_stream_is_marked_down_and_others_go_on(store: Store) -> None:
    """A stream that raises Fatal is marked down; other streams deliver, and `once` ends
    non-zero naming it."""
    bad = FakeStream(people("x", 2), name="bad.records")
    bad.fatal = AuthError("HTTP 401: key revoked")
    good = FakeStream(people("g", 3), name="good.records")
    target = FakeTarget()
    pipeline = Pipeline(store, [bad, good], {"fake:main": target}, settings(), SystemClock())
    with (
        capture_logs() as logs,
        pytest.raises(Fatal, match=r"stream 'bad\.records': AuthError: HTTP 401: key revoked"),
    ):
        await asyncio.wait_for(pipeline.run(once=True), 10)
    assert len(target.applied) == 3
    (row,) = await store.health()
    assert (row.kind, row.name) == ("stream", "bad.records")
    (down,) = [e for e in logs if e["event"] == "stream_down"]
    assert down["log_level"] == "error"


async def test_fatal_stream_is_polled_again_after_recheck(store: Store) -> None:
    """A down stream is polled again after target_recheck; once it reads, it is up."""
    bad = FakeStream(people("x", 2), name="bad.records", poll_interval=0.05)
    bad.fatal = AuthError("HTTP 401: key revoked")
    target = FakeTarget()
    pipeline = Pipeline(
        store, [bad], {"fake:main": target}, settings(target_recheck=0.2), SystemClock()
    )
    with capture_logs() as logs:
        run = asyncio.create_task(pipeline.run())
        await wait_until(lambda: bad.polls == 1)
        await asyncio.sleep(0.1)
        assert bad.polls == 1  # not before the recheck pause
        bad.fatal = None
        await wait_until(lambda: len(target.applied) == 2)
        pipeline.request_stop()
        await asyncio.wait_for(run, 5)
    assert events_named(logs, "stream_") == ["stream_down", "stream_up"]
    assert await store.health() == []


async def test_entity_order_holds_across_targets(store: Store) -> None:
    """One entity's ops to two targets, one of them slow, are performed in outbox order."""
    calls: list[str] = []

    class Logged(FakeTarget):
        async def send(self, op: Op) -> OpResult:
            calls.append(op.source_key)
            return await super().send(op)

    ops = [
        NewOp(
            target="ghl:a" if n % 2 == 0 else "an:src",
            entity="p",
            kind=f"k{n}",
            source_key=f"p{n}",
            payload=b"{}",
        )
        for n in range(8)
    ]
    await store.commit_page("s", None, ops, now=0.0)
    slow, fast = Logged(delay=0.01), Logged()
    pipeline = Pipeline(
        store, [], {"ghl:a": slow, "an:src": fast}, settings(), SystemClock(), locations={}
    )
    await asyncio.wait_for(pipeline.run(once=True), 10)
    assert calls == [f"p{n}" for n in range(8)]


async def test_target_left_down_by_an_earlier_run_is_probed_at_start(store: Store) -> None:
    """A target still marked down from the last run gets one probe first; when it works the
    row is cleared and the rest follows."""
    await store.mark_down("target", "ghl:a", "AuthError: revoked", now=0.0)
    stream = FakeStream(records(4, 2), target="ghl:a")
    a = FakeTarget()
    pipeline = Pipeline(
        store, [stream], {"ghl:a": a}, settings(), SystemClock(), locations={"ghl:a": "a"}
    )
    with capture_logs() as logs:
        await asyncio.wait_for(pipeline.run(once=True), 10)
    assert events_named(logs, "target_") == ["target_probe", "target_up"]
    (probe,) = [e for e in logs if e["event"] == "target_probe"]
    assert a.sent[0].id == probe["op_id"]
    assert len(a.applied) == 8
    assert await store.health() == []
