"""The dispatcher's batched refills, with a test-only target over a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from bridge.clock import SystemClock
from bridge.models import NewOp, Op, OpResult
from bridge.pipeline import Pipeline
from bridge.store import Store
from tests.fakes import FakeTarget, settings


class CountingStore(Store):
    """The real store, counting the dispatcher's outbox queries."""

    due_calls = 0

    async def due_ops(
        self,
        *,
        now: float,
        limit: int,
        exclude: Iterable[str] = (),
        exclude_targets: Iterable[str] = (),
        target: str | None = None,
    ) -> list[Op]:
        self.due_calls += 1
        return await super().due_ops(
            now=now, limit=limit, exclude=exclude, exclude_targets=exclude_targets, target=target
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    async with CountingStore.open(tmp_path / "state.db") as opened:
        assert isinstance(opened, CountingStore)
        yield opened


def single_ops(count: int) -> list[NewOp]:
    return [
        NewOp(target="fake:main", entity=f"e{i}", kind="k", source_key=f"k{i}", payload=b"{}")
        for i in range(count)
    ]


async def test_lanes_are_refilled_in_batches(store: CountingStore) -> None:
    """A backlog is queued a half lane at a time, not one outbox query per finished op."""
    await store.commit_page("fake.records", None, single_ops(400), now=0.0)
    target = FakeTarget(delay=0.001)
    pipeline = Pipeline(
        store, [], {"fake:main": target}, settings(senders=2, queue_size=20), SystemClock()
    )
    await asyncio.wait_for(pipeline.run(once=True), 30)
    assert pipeline.summary.ops_sent == 400
    assert await store.open_ops() == 0
    # 400 ops through a lane of 40 slots, refilled once 20 are free: about 20 queries.
    assert store.due_calls < 60


async def test_an_entity_next_op_follows_its_predecessor_without_a_query(
    store: CountingStore,
) -> None:
    """An entity's next op, due already, is taken up as its previous one is recorded."""
    ops = [
        NewOp(target="fake:main", entity="e", kind="k", source_key=f"k{i}", payload=b"%d" % i)
        for i in range(30)
    ]
    await store.commit_page("fake.records", None, ops, now=0.0)
    target = FakeTarget()
    pipeline = Pipeline(store, [], {"fake:main": target}, settings(idle_poll=5.0), SystemClock())
    # The idle poll is far longer than the run may take: no op waits for it.
    await asyncio.wait_for(pipeline.run(once=True), 4)
    assert [op.source_key for op in target.sent] == [f"k{i}" for i in range(30)]
    assert store.due_calls < 5


async def test_only_a_due_next_op_is_handed_on(store: CountingStore) -> None:
    """``finish`` hands on the entity's next op only once it is due, and none after the last."""
    first, second = (
        NewOp(target="fake:main", entity="e", kind="k", source_key=f"k{i}", payload=b"%d" % i)
        for i in range(2)
    )
    await store.commit_page("fake.records", None, [first], now=0.0)
    await store.commit_page("fake.records", None, [second], now=50.0)
    (head,) = await store.due_ops(now=1.0, limit=5)
    assert await store.start(head, now=1.0)
    assert await store.finish(head, OpResult(), now=2.0) is None
    assert await store.due_ops(now=2.0, limit=5) == []
    (later,) = await store.due_ops(now=50.0, limit=5)
    assert later.source_key == "k1"
    assert await store.start(later, now=50.0)
    assert await store.finish(later, OpResult(), now=51.0) is None
    assert await store.open_ops() == 0


async def test_finish_hands_on_the_next_op_whole(store: CountingStore) -> None:
    """The op ``finish`` hands on is the entity's next one, with its payload and attempts."""
    ops = [
        NewOp(target="fake:main", entity="e", kind="k", source_key=f"k{i}", payload=b"%d" % i)
        for i in range(2)
    ]
    await store.commit_page("fake.records", None, ops, now=0.0)
    (head,) = await store.due_ops(now=1.0, limit=5)
    assert await store.start(head, now=1.0)
    following = await store.finish(head, OpResult(), now=2.0)
    assert following is not None
    assert (following.source_key, following.payload, following.attempts) == ("k1", b"1", 0)
    assert await store.due_ops(now=2.0, limit=5) == [following]
