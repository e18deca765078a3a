"""The dispatcher: due ops from the outbox into their targets' lanes, one at a time per entity.

It asks the store for the head op of each entity, leaving out in SQL the targets that
are down or whose lane is full, so one target's backlog never hides another's due ops.
A down target whose pause is over gets one op through, as a probe.

It refills in batches: while every lane that could take ops is still more than half
full, a finished delivery does not send it back to the outbox, whose query costs about
as much for one op as for hundreds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

from bridge.clock import Clock
from bridge.health import Health
from bridge.models import Op
from bridge.senders import Senders
from bridge.store import Store

_BATCH = 500
"""The most ops one dispatcher query asks for."""


class Dispatcher:
    """Feeds the senders; ``wake`` asks it to look at the outbox again now.

    ``targets`` are the configured targets (a target's first ops start its lane).
    """

    def __init__(
        self,
        store: Store,
        senders: Senders,
        health: Health,
        clock: Clock,
        *,
        targets: Collection[str],
        idle_poll: float,
    ) -> None:
        self._store = store
        self._senders = senders
        self._health = health
        self._clock = clock
        self._targets = targets
        self._idle_poll = idle_poll
        self._busy: dict[str, str] = {}  # entity -> target of its op queued or being sent
        self.wake = asyncio.Event()

    def release(self, entity: str) -> None:
        """The entity's op is done with (or back in the outbox): its next op may go."""
        self._busy.pop(entity, None)

    def follow(self, done: Op, following: Op | None) -> bool:
        """``done``'s delivery ended: queue ``following``, its entity's next op, at once.

        ``following`` is one the store found heading the entity and due as it recorded
        ``done``; it joins the back of its lane (the entity's partition, so a sender
        takes it up after the ops already waiting there) without another outbox query.
        It is left to the outbox when its target is unknown or down, its queue full, or
        the senders stopping. Returns whether it was queued; if not, the entity is free
        for the next query.
        """
        self._busy.pop(done.entity, None)
        if (
            following is None
            or self._senders.stopped
            or following.target not in self._targets
            or self._health.is_down(following.target)
        ):
            return False
        queue = self._senders.lane(following.target).queue_for(following.entity)
        if queue.full():
            return False
        self._busy[following.entity] = following.target
        queue.put_nowait(following)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            now = self._clock.time()
            blocked = self._health.down_targets() | self._senders.saturated()
            wanted = self._senders.wants_ops(blocked, self._targets)
            more = await self._fill(now, blocked) if wanted else False
            await self._probe(now)
            if not more:
                # Lanes still well stocked are refilled once they drain: their
                # deliveries set ``wake``, so no due time needs looking up meanwhile.
                await self._idle_wait(now, look_ahead=wanted)

    async def _fill(self, now: float, blocked: set[str]) -> bool:
        """Queue due ops into their targets' lanes; True when more may be due right away.

        A target with a full partition is left out of the next query, so its backlog
        cannot fill every batch and hide the due ops of the other targets; each round
        leaves out one more target, so this ends.
        """
        while True:
            limit = max(1, min(self._room_outside(blocked), _BATCH))
            ops = await self._store.due_ops(
                now=now,
                limit=limit,
                exclude=[e for e, t in self._busy.items() if t not in blocked],
                exclude_targets=blocked,
            )
            full: set[str] = set()
            for op in ops:
                if op.target in full:
                    continue
                queue = self._senders.lane(op.target).queue_for(op.entity)
                if queue.full():
                    full.add(op.target)  # stays pending; its lane wakes us when it moves
                    continue
                self._busy[op.entity] = op.target
                queue.put_nowait(op)
            if not full:
                return len(ops) == limit
            blocked = blocked | full

    def _room_outside(self, blocked: set[str]) -> int:
        room = self._senders.room_outside(blocked)
        if any(not self._senders.has_lane(t) for t in self._targets):
            room += self._senders.lane_capacity  # a target's first ops start its lane
        return room

    async def _probe(self, now: float) -> None:
        """Let one due op of each down target whose pause is over through, as a probe."""
        for target in self._health.probes_due(now):
            ops = await self._store.due_ops(
                now=now,
                limit=1,
                exclude=[e for e, t in self._busy.items() if t == target],
                target=target,
            )
            if not ops:
                continue  # nothing of it is due; its next due op is the probe
            queue = self._senders.lane(target).queue_for(ops[0].entity)
            if not queue.full():
                self._health.start_probe(ops[0])
                self._busy[ops[0].entity] = target
                queue.put_nowait(ops[0])

    async def _idle_wait(self, now: float, *, look_ahead: bool = True) -> None:
        """Sleep until an op or a probe comes due, a delivery ends, or ``idle_poll`` passes.

        Only ops due later are looked at (and only with ``look_ahead``): those due now
        that could not be queued wait for their entity or their lane, whose delivery sets
        ``wake`` when it ends.
        """
        timeout = self._idle_poll
        due = (
            await self._store.next_due_at(after=now, exclude_targets=self._health.held(now))
            if look_ahead
            else None
        )
        probe = self._health.next_probe_after(now)
        for at in (due, probe):
            if at is not None:
                timeout = max(0.0, min(timeout, at - self._clock.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
