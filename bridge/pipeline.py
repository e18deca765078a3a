"""Producers, a dispatcher and per-target partitioned senders around the durable outbox.

::

    stream.pages() -> transform -> store.commit_page (ops + cursor, one transaction)
                                          |
    dispatcher: store.due_ops (head op of each entity; saturated and down targets left out)
                -> the target's lane -> partition queue (crc32(entity) % senders)
                                          |
    sender: store.start (in flight; or done at once if the payload was last applied)
            -> [reconcile if in doubt] -> target.send -> store.finish
            -> the entity's next op, if due, straight back into its lane

Each target (a GHL location, a source's write-backs) has senders of its own
(:mod:`bridge.senders`), so one that waits out a 429 pause holds only its own, and the
dispatcher (:mod:`bridge.dispatch`) leaves full and down targets out of its outbox query.
A target that raises ``Fatal`` is taken out of service alone (:mod:`bridge.health`); the
run stops only when every GHL location is.

Shutdown has two phases: stop intake (producers and dispatcher), then give ops already
being sent ``drain_grace`` seconds to finish before cancelling them. Nothing pending is
lost: queued ops are still ``pending`` in SQLite, and an op cancelled mid-call stays
``in_flight`` and is reconciled at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol

import msgspec
import structlog

from bridge.clock import Clock
from bridge.config import PipelineConfig
from bridge.dispatch import Dispatcher
from bridge.errors import Fatal, InDoubt, Rejected, Retryable
from bridge.health import Health
from bridge.models import (
    EVENT_KIND,
    UNREADABLE_KIND,
    DeadLetter,
    NewOp,
    Op,
    OpResult,
    Page,
    Rejection,
    SourceEvent,
    decode_event,
)
from bridge.observability.metrics import Metrics
from bridge.rest import backoff_delay
from bridge.senders import Senders
from bridge.store import Store

log = structlog.get_logger("bridge.pipeline")


class Stream(Protocol):
    """A source stream: pages of events from a cursor, and how to map one event to ops."""

    name: str
    poll_interval: float

    def pages(self, cursor: str | None) -> AsyncIterator[Page]:
        """Read from ``cursor`` until caught up; each page's cursor is stored with its ops."""
        ...

    def transform(self, event: SourceEvent) -> Sequence[NewOp]:
        """Map one event to ordered ops; raise ``Rejected`` for a bad record."""
        ...


class Target(Protocol):
    """Something that performs ops: a connector instance for one tenant."""

    async def send(self, op: Op) -> OpResult:
        """Perform the op; raise from the error tree on failure."""
        ...

    async def reconcile(self, op: Op) -> OpResult | None:
        """Find out whether an in-doubt op already took effect; None means it did not."""
        ...


class RunSummary(msgspec.Struct, kw_only=True):
    """What one run did, for ``bridge once`` and the demo."""

    events_read: int = 0
    events_unchanged: int = 0
    ops_written: int = 0
    ops_sent: int = 0
    ops_unchanged: int = 0
    ops_retried: int = 0
    ops_reconciled: int = 0
    dead_lettered: int = 0
    in_doubt_at_start: int = 0


MAX_REASON = 500
"""Characters kept of a dead letter's reason: a 1 MB bad value makes no 1 MB row or log line."""


def bounded(reason: str) -> str:
    """``reason``, cut to ``MAX_REASON`` characters with a note of how much was left out."""
    if len(reason) <= MAX_REASON:
        return reason
    return f"{reason[:MAX_REASON]}… ({len(reason) - MAX_REASON} more characters)"


def _hash_last(ops: Sequence[NewOp], event: SourceEvent) -> list[NewOp]:
    """The ops of one event, one of them carrying the event's content hash.

    The hash goes on the last op filed under the event's own key (ops may also carry keys
    of their own, such as a rule's firing), and the record counts as delivered, and is
    skipped while unchanged, once that op is done. Every op of the event is already
    durable in the same transaction, so nothing is lost if a later one is still pending.
    """
    out = list(ops)
    mine = [i for i, op in enumerate(out) if op.source_key == event.key]
    at = mine[-1] if mine else len(out) - 1
    if out and out[at].content_hash is None:
        out[at] = msgspec.structs.replace(out[at], content_hash=event.content_hash)
    return out


class Pipeline:
    """Runs the streams into the outbox and the outbox into the targets.

    ``locations`` maps the targets that are GHL locations to the location's name: they
    are named so in logs, and the run stops only once every one of them is down.
    Without it every target counts.
    """

    def __init__(
        self,
        store: Store,
        streams: Sequence[Stream],
        targets: Mapping[str, Target],
        settings: PipelineConfig,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        locations: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        on_drain: Callable[[int, float], None] | None = None,
    ) -> None:
        self._store = store
        self.metrics = metrics or Metrics()
        # Told (ops in flight, grace) when the drain starts: systemd hears STOPPING=1.
        self._on_drain = on_drain
        self._streams = list(streams)
        self._streams_by_name = {s.name: s for s in streams}
        self._targets = targets
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._essential = set(locations) if locations is not None else set(targets)
        self.health = Health(
            store, clock, recheck=float(settings.target_recheck), locations=locations or {}
        )
        self._senders = Senders(
            partitions=settings.senders,
            size=settings.queue_size,
            deliver=self._deliver,
            finished=self._finish,
            on_task_done=self._on_task_done,
        )
        self._dispatcher = Dispatcher(
            store,
            self._senders,
            self.health,
            clock,
            targets=list(targets),
            idle_poll=float(settings.idle_poll),
        )
        self._dispatching: asyncio.Task[None] | None = None
        self._open_by_stream: Counter[str] = Counter()
        self._open_by_target: Counter[str] = Counter()
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._intake_done = False
        self._once = False
        self._failure: BaseException | None = None
        self.summary = RunSummary()
        # For the watchdog, STATUS and metrics: when each stream was last caught up (wall
        # time; the run's start until then), which are mid-poll, and when anything last
        # moved (monotonic).
        started = clock.time()
        self.caught_up_at = {s.name: started for s in streams}
        self.polling: set[str] = set()
        self.caught_up: set[str] = set()  # streams caught up at least once in this run
        self.last_progress = clock.monotonic()
        # Set on reload: sleeping producers look at their (new) poll interval again.
        self._intervals_changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First phase of shutdown: stop polling and dispatching (safe from a signal handler)."""
        self._stop.set()

    @property
    def open_ops(self) -> int:
        return sum(self._open_by_target.values())

    def open_by_target(self) -> dict[str, int]:
        return {t: n for t, n in self._open_by_target.items() if n}

    @property
    def busy(self) -> bool:
        """Whether work is under way: an op being sent or a stream being read."""
        return bool(self._senders.deliveries or self.polling)

    def intervals_changed(self) -> None:
        """Poll intervals were reloaded: sleeping producers wait by the new ones."""
        # A fresh event for the next reload; the set one wakes everyone sleeping on it.
        woken, self._intervals_changed = self._intervals_changed, asyncio.Event()
        woken.set()

    def _progressed(self) -> None:
        self.last_progress = self._clock.monotonic()

    async def run(self, *, once: bool = False) -> RunSummary:
        """Run until stopped (or, with ``once``, until every stream is caught up and drained).

        With ``once``, ops of a target that is down wait for a later run, and the run
        raises ``Fatal`` naming what is down after finishing everything else.
        """
        self._once = once
        self.summary.in_doubt_at_start = await self._store.recover_in_flight()
        if self.summary.in_doubt_at_start:
            log.warning("ops_in_doubt_at_start", count=self.summary.in_doubt_at_start)
        # Counted afresh from the store: it already holds anything replayed before the run.
        self._open_by_stream.clear()
        self._open_by_target.clear()
        for (stream, target), count in (await self._store.open_op_counts()).items():
            self._open_by_stream[stream] += count
            self._open_by_target[target] += count
        await self.health.load(targets=self._targets, streams=self._streams_by_name)
        producers = [
            asyncio.create_task(self._produce(s, once=once), name=f"producer:{s.name}")
            for s in self._streams
        ]
        self._dispatching = asyncio.create_task(self._dispatcher.run(self._stop), name="dispatcher")
        for task in [*producers, self._dispatching]:
            task.add_done_callback(self._on_task_done)
        intake = asyncio.create_task(self._await_intake(producers), name="intake")
        try:
            await self._stop.wait()
        finally:
            intake.cancel()
            await self._shutdown(producers)
        if self._failure is not None:
            raise self._failure
        down = self.health.report() if once else None
        if down is not None:
            raise Fatal(down)
        return self.summary

    async def _await_intake(self, producers: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*producers, return_exceptions=True)
        self._intake_done = True
        self._check_drained()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A background task that dies takes the run down loudly: silence would stall a
        # stream for months. The first failure is the one reported.
        log.error("task_failed", task=task.get_name(), error=str(task.exception()))
        self._fail(task.exception())

    def _fail(self, error: BaseException | None) -> None:
        if self._failure is None:
            self._failure = error
        self._stop.set()

    def _check_drained(self) -> None:
        """With ``once``: stop when all work not held by a down target is done."""
        if not (self._once and self._intake_done) or self._senders.deliveries:
            return
        held = self.health.held(self._clock.time())
        if all(n == 0 for target, n in self._open_by_target.items() if target not in held):
            self._stop.set()

    async def _shutdown(self, producers: list[asyncio.Task[None]]) -> None:
        in_flight = len(self._senders.deliveries)
        log.info("shutdown_started", in_flight=in_flight, open_ops=self.open_ops)
        if self._on_drain is not None:
            self._on_drain(in_flight, float(self._settings.drain_grace))
        intake = [*producers, *([self._dispatching] if self._dispatching else [])]
        for task in intake:
            task.cancel()
        await asyncio.gather(*intake, return_exceptions=True)
        # Ops still queued were never started: they stay pending in SQLite.
        taken, cancelled = await self._senders.stop(float(self._settings.drain_grace))
        for op in taken:
            self._dispatcher.release(op.entity)
        if cancelled:
            log.warning("drain_grace_exceeded", cancelled=cancelled)
        log.info("shutdown_complete", open_ops=self.open_ops)

    # -- intake -----------------------------------------------------------------------------------

    async def _produce(self, stream: Stream, *, once: bool) -> None:
        attempt = 0
        with structlog.contextvars.bound_contextvars(stream=stream.name):
            while not self._stop.is_set():
                try:
                    self.polling.add(stream.name)
                    try:
                        await self._poll(stream)
                    finally:
                        self.polling.discard(stream.name)
                        self._progressed()
                    attempt = 0
                except Retryable as exc:
                    delay = backoff_delay(
                        attempt,
                        base=self._settings.retry_base,
                        cap=self._settings.retry_cap,
                        retry_after=exc.retry_after,
                        rng=self._rng,
                    )
                    attempt += 1
                    log.warning("poll_failed", error=str(exc), retry_in=round(delay, 3))
                    await self._sleep_unless_stopped(delay)
                    continue
                except Fatal as exc:
                    # This stream alone stops (a revoked key, say); the others go on. With
                    # `once` it counts as finished and the run ends non-zero naming it.
                    await self.health.stream_failed(stream.name, exc)
                    if once:
                        return
                    await self._sleep_unless_stopped(self.health.recheck)
                    continue
                await self.health.stream_ok(stream.name)
                self.caught_up_at[stream.name] = self._clock.time()
                self.caught_up.add(stream.name)
                if once:
                    log.info("stream_caught_up")
                    return
                await self._wait_for_next_poll(stream)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _wait_for_next_poll(self, stream: Stream) -> None:
        """Sleep out the poll interval, as it is now: a reload may shorten or lengthen it."""
        start = self._clock.monotonic()
        while not self._stop.is_set():
            left = start + stream.poll_interval - self._clock.monotonic()
            if left <= 0:
                return
            changed = asyncio.ensure_future(self._intervals_changed.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({changed, stop}, timeout=left, return_when="FIRST_COMPLETED")
            finally:
                changed.cancel()
                stop.cancel()

    async def _poll(self, stream: Stream) -> None:
        cursor = await self._store.get_cursor(stream.name)
        async for page in stream.pages(cursor):
            ops, rejections = await self._transform(stream, page.events)
            rejections = [*page.rejected, *rejections]
            await self._wait_for_room(stream.name, len(ops))
            now = self._clock.time()
            await self._store.commit_page(stream.name, page.cursor, ops, rejections, now=now)
            self._opened(stream.name, ops)
            self._progressed()
            self.metrics.records_read.labels(stream.name).inc(len(page.events))
            if rejections:
                self.metrics.dead_lettered.labels(stream.name).inc(len(rejections))
            self.summary.ops_written += len(ops)
            self.summary.dead_lettered += len(rejections)
            for rejection in rejections:
                log.warning(
                    "event_dead_lettered", source_key=rejection.event.key, reason=rejection.reason
                )
            log.info(
                "page_committed",
                events=len(page.events),
                ops=len(ops),
                rejected=len(rejections),
                cursor=page.cursor,
            )
            self._dispatcher.wake.set()

    async def _transform(
        self, stream: Stream, events: Sequence[SourceEvent]
    ) -> tuple[list[NewOp], list[Rejection]]:
        self.summary.events_read += len(events)
        known = await self._store.known_hashes([e.key for e in events])
        seen: set[tuple[str, str]] = set()
        ops: list[NewOp] = []
        rejections: list[Rejection] = []
        for event in events:
            mark = (event.key, event.content_hash)
            # The same record twice in a page (overlap windows) or already delivered or
            # queued with this content: nothing to do.
            if mark in seen or event.content_hash in known.get(event.key, ()):
                self.summary.events_unchanged += 1
                continue
            seen.add(mark)
            try:
                event_ops = list(stream.transform(event))
            except Rejected as exc:
                rejections.append(Rejection(event=event, reason=bounded(str(exc))))
                continue
            ops.extend(_hash_last(event_ops, event))
        return ops, rejections

    async def _wait_for_room(self, stream: str, count: int) -> None:
        """Back-pressure: keep the stream's open ops at or below the high-water mark.

        Counted per stream, so a location that is down or paused stalls only the streams
        that feed it. A page larger than the whole mark is let in once the stream has no
        open ops, otherwise it could never be written.
        """
        high = self._settings.outbox_high_water
        while self._open_by_stream[stream] + count > high and self._open_by_stream[stream] > 0:
            self._room.clear()
            await self._room.wait()

    def _opened(self, stream: str, ops: Sequence[NewOp]) -> None:
        for op in ops:
            self._open_by_stream[stream] += 1
            self._open_by_target[op.target] += 1

    # -- delivery -------------------------------------------------------------------------------

    def _finish(self, op: Op, task: asyncio.Task[Op | None]) -> None:
        following = None
        if not task.cancelled():
            if task.exception() is not None:
                # A failure of the bridge itself (say, the store): the run stops loudly.
                self._fail(task.exception())
            else:
                following = task.result()
        self.health.end_probe(op)
        if not self._dispatcher.follow(op, following):
            self._dispatcher.wake.set()
        self._check_drained()

    async def _deliver(self, op: Op) -> Op | None:
        """Deliver one op; returns its entity's next op when that one is due right away."""
        target = self._targets.get(op.target)
        with structlog.contextvars.bound_contextvars(
            stream=op.stream, entity=op.entity, op=op.kind, op_id=op.id
        ):
            if target is None:
                await self._dead_letter(op, f"no target named {op.target!r} is configured")
                return None
            if not await self._store.start(op, now=self._clock.time()):
                # The last op of this kind for this record sent exactly this (e.g. a
                # person whose tags changed re-queues an identical contact upsert), so
                # the store completed it instead of putting it in flight.
                self._completed(op)
                self.metrics.ops_sent.labels(op.stream, op.target).inc()
                self.summary.ops_unchanged += 1
                log.debug("op_unchanged")
                return None
            if self.health.is_down(op.target) and not self.health.is_probe(op):
                # Taken from its queue just before its target went down: it waits,
                # uncounted, for the probe to bring the target back.
                await self._store.release(op)
                return None
            try:
                following = await self._call(target, op)
            except Fatal as exc:
                await self._quarantine(op, exc)
                return None
            await self.health.target_answered(op)
            return following

    async def _call(self, target: Target, op: Op) -> Op | None:
        """Send (or reconcile) one op and record the outcome; only ``Fatal`` escapes.

        Returns the entity's next op when the store found it due as it recorded this one.
        """
        started = self._clock.monotonic()
        try:
            result = await target.reconcile(op) if op.in_doubt else None
            if op.in_doubt:
                self.summary.ops_reconciled += 1
                log.info("op_reconciled", found=result is not None)
            if result is None:
                result = await target.send(op)
        except Retryable as exc:
            # A 429 is the location's budget, not the record: however long a location is
            # flooded, its ops wait (at Retry-After pace) rather than become dead letters.
            await self._retry(
                op,
                str(exc),
                exc.retry_after,
                in_doubt=op.in_doubt,
                counted=exc.status != 429,
            )
        except InDoubt as exc:
            await self._retry(op, str(exc), None, in_doubt=True)
        except Rejected as exc:
            reason = "; ".join((str(exc), *exc.details)) if exc.details else str(exc)
            await self._dead_letter(op, reason)
        except Fatal:
            raise
        except Exception as exc:
            # A bug or an unexpected reply: the write may have happened, so reconcile
            # before trying again rather than dead-lettering a record that was fine.
            log.exception("op_failed_unexpectedly")
            await self._retry(op, f"unexpected error: {exc!r}", None, in_doubt=True)
        else:
            self.metrics.op_latency.labels(op.target).observe(self._clock.monotonic() - started)
            following = await self._store.finish(op, result, now=self._clock.time())
            self._completed(op)
            self.metrics.ops_sent.labels(op.stream, op.target).inc()
            self.summary.ops_sent += 1
            log.info("op_sent", attempts=op.attempts + 1)
            return following
        return None

    async def _quarantine(self, op: Op, error: Fatal) -> None:
        """Take the op's target out of service; the op goes back untouched, not counted.

        Its queued ops go back to SQLite too. When that leaves no GHL location up, the
        bridge can do nothing useful, so the run stops with this error.
        """
        await self._store.release(op)
        await self.health.target_failed(op, error)
        for queued in self._senders.drain(op.target):
            self._dispatcher.release(queued.entity)
        if self._essential and self._essential <= self.health.failed_targets():
            log.error("every_location_down", error=str(error))
            self._fail(error)
        self._check_drained()

    async def _retry(
        self,
        op: Op,
        error: str,
        retry_after: float | None,
        *,
        in_doubt: bool,
        counted: bool = True,
    ) -> None:
        if counted and op.attempts + 1 >= self._settings.max_attempts:
            await self._dead_letter(op, f"gave up after {op.attempts + 1} attempts: {error}")
            return
        delay = backoff_delay(
            op.attempts,
            base=self._settings.retry_base,
            cap=self._settings.retry_cap,
            retry_after=retry_after,
            rng=self._rng,
        )
        await self._store.retry_later(
            op,
            next_at=self._clock.time() + delay,
            error=error,
            in_doubt=in_doubt,
            now=self._clock.time(),
            counted=counted,
        )
        self.summary.ops_retried += 1
        self.metrics.ops_retried.labels(op.target).inc()
        self._progressed()
        log.warning(
            "op_retry_scheduled",
            attempt=op.attempts + 1,
            retry_in=round(delay, 3),
            error=error,
            in_doubt=in_doubt,
        )

    async def _dead_letter(self, op: Op, reason: str) -> None:
        reason = bounded(reason)
        await self._store.dead_letter_op(op, reason, now=self._clock.time())
        self._completed(op)
        self.metrics.dead_lettered.labels(op.stream).inc()
        self.summary.dead_lettered += 1
        log.warning("op_dead_lettered", reason=reason, source_key=op.source_key)

    def _completed(self, op: Op) -> None:
        self._progressed()
        self._open_by_stream[op.stream] -= 1
        self._open_by_target[op.target] -= 1
        self._room.set()  # producers waiting below the high-water mark look again

    # -- replay ---------------------------------------------------------------------------------

    async def replay(self, dl: DeadLetter) -> int:
        """Put a dead letter back into the outbox; an event is mapped again first.

        Returns the number of ops written. Mapping an event may reject it again, in which
        case it stays a dead letter with the new reason.
        """
        if dl.kind == EVENT_KIND:
            event = decode_event(dl.payload)
            if event.kind == UNREADABLE_KIND:
                # Nothing here can be mapped; the stream reads the record again once it
                # is fixed at the source (its modification date moves).
                raise Rejected(
                    f"dead letter {dl.id}: the record did not decode as served, so it cannot"
                    " be replayed; fix it at the source and the stream reads it again"
                )
            stream = self._streams_by_name.get(dl.stream)
            if stream is None:
                raise Rejected(f"dead letter {dl.id}: stream {dl.stream!r} is not configured")
            ops = _hash_last(stream.transform(event), event)
        else:
            assert dl.target is not None
            assert dl.entity is not None
            ops = [
                NewOp(
                    target=dl.target,
                    entity=dl.entity,
                    kind=dl.kind,
                    source_key=dl.source_key,
                    payload=dl.payload,
                    content_hash=dl.content_hash,
                )
            ]
        # An op may have landed before it became a dead letter (a 5xx after the write,
        # taken for bad input), so it is reconciled before it is sent again. An event's
        # ops are new: nothing of them was sent.
        await self._store.replay_dead_letter(
            dl, ops, stream=dl.stream, now=self._clock.time(), in_doubt=dl.kind != EVENT_KIND
        )
        self._opened(dl.stream, ops)
        self._dispatcher.wake.set()
        return len(ops)
