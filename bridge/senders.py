"""Per-target lanes of sender tasks, so one target's slow calls hold only its own senders.

A lane is a target's bounded partition queues (crc32(entity) % partitions, which keeps an
entity on one sender), each drained by a sender task that runs one delivery at a time.
A target waiting out a 429 pause fills its own lane and nobody else's.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from bridge.models import Op

# A delivery may hand back the entity's next op, due now, for ``finished`` to queue.
Deliver = Callable[[Op], Coroutine[Any, Any, Op | None]]
Finished = Callable[[Op, "asyncio.Task[Op | None]"], None]


def partition_of(entity: str, partitions: int) -> int:
    """Stable partition for an entity (crc32, not hash(), so it is the same every run)."""
    return zlib.crc32(entity.encode()) % partitions


class Lane:
    """One target's bounded partition queues."""

    def __init__(self, partitions: int, size: int) -> None:
        self.queues: list[asyncio.Queue[Op]] = [asyncio.Queue(size) for _ in range(partitions)]

    def queue_for(self, entity: str) -> asyncio.Queue[Op]:
        return self.queues[partition_of(entity, len(self.queues))]

    def room(self) -> int:
        return sum(q.maxsize - q.qsize() for q in self.queues)

    def drain(self) -> list[Op]:
        """Take back every op not yet started (they are still pending in SQLite)."""
        taken = []
        for queue in self.queues:
            while not queue.empty():
                taken.append(queue.get_nowait())
        return taken


class Senders:
    """Every target's lane, started with its first op, and the deliveries under way.

    ``deliver`` performs one op; ``finished`` hears of each delivery's end (with its
    task, which may hold an exception); ``on_task_done`` watches the sender tasks.
    """

    def __init__(
        self,
        *,
        partitions: int,
        size: int,
        deliver: Deliver,
        finished: Finished,
        on_task_done: Callable[[asyncio.Task[None]], None],
    ) -> None:
        self._partitions = partitions
        self._size = size
        self._deliver = deliver
        self._finished = finished
        self._on_task_done = on_task_done
        self._lanes: dict[str, Lane] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.deliveries: set[asyncio.Task[Op | None]] = set()
        self.stopped = False  # no sender takes up an op queued from now on

    @property
    def lane_capacity(self) -> int:
        return self._partitions * self._size

    def has_lane(self, target: str) -> bool:
        return target in self._lanes

    def lane(self, target: str) -> Lane:
        """The target's lane, started on its first op: idle targets cost no tasks."""
        lane = self._lanes.get(target)
        if lane is None:
            lane = self._lanes[target] = Lane(self._partitions, self._size)
            for i, queue in enumerate(lane.queues):
                task = asyncio.create_task(self._send_loop(queue), name=f"sender:{target}:{i}")
                task.add_done_callback(self._on_task_done)
                self._tasks.append(task)
        return lane

    def saturated(self) -> set[str]:
        """Targets whose every queue is full: none of their ops could be queued now."""
        return {t for t, lane in self._lanes.items() if lane.room() == 0}

    def wants_ops(self, blocked: set[str], targets: Iterable[str]) -> bool:
        """Whether a target outside ``blocked`` has no lane yet or a lane at least half empty.

        Lanes fuller than that have work enough; refilling them in bigger batches, less
        often, spares the outbox a query per finished delivery.
        """
        if any(t not in self._lanes and t not in blocked for t in targets):
            return True
        half = self.lane_capacity // 2
        return any(lane.room() >= half for t, lane in self._lanes.items() if t not in blocked)

    def room_outside(self, blocked: set[str]) -> int:
        """Free queue slots in the lanes of targets not in ``blocked``."""
        return sum(lane.room() for t, lane in self._lanes.items() if t not in blocked)

    def drain(self, target: str) -> list[Op]:
        lane = self._lanes.get(target)
        return lane.drain() if lane is not None else []

    async def stop(self, grace: float) -> tuple[list[Op], int]:
        """Stop the senders, give deliveries under way ``grace`` seconds, cancel the rest.

        Returns the ops taken back from the queues and how many deliveries were cancelled.
        """
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        taken = [op for lane in self._lanes.values() for op in lane.drain()]
        if not self.deliveries:
            return taken, 0
        _, late = await asyncio.wait(self.deliveries, timeout=grace)
        for delivery in late:
            delivery.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
        return taken, len(late)

    async def _send_loop(self, queue: asyncio.Queue[Op]) -> None:
        while True:
            op = await queue.get()
            task = asyncio.create_task(self._deliver(op), name=f"deliver:{op.id}")
            self.deliveries.add(task)
            try:
                # Shielded: stopping the sender loop must not cancel an op mid-call;
                # shutdown gives deliveries their grace period separately.
                await asyncio.shield(task)
            finally:
                if task.done():
                    self._finish(op, task)
                else:
                    task.add_done_callback(functools.partial(self._finish, op))

    def _finish(self, op: Op, task: asyncio.Task[Op | None]) -> None:
        self.deliveries.discard(task)
        self._finished(op, task)
