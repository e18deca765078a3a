"""Pipeline semantics with a test-only source and target over a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from bridge.clock import SystemClock
from bridge.errors import Fatal
from bridge.models import EVENT_KIND, NewOp, Op
from bridge.pipeline import Pipeline, partition_of
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
