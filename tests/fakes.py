"""A test-only source stream and target that exercise the pipeline without any API."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

import msgspec

from bridge.config import Duration, PipelineConfig
from bridge.errors import Fatal, InDoubt, Rejected, Retryable
from bridge.models import IdMapUpdate, NewOp, Op, OpResult, Page, SourceEvent, content_hash


class Record(msgspec.Struct, frozen=True):
    """A fake source record: which entity it belongs to and how many ops it makes."""

    key: str
    entity: str
    ops: int = 1
    bad: bool = False
    text: str = ""


class FakeStream:
    """Serves records in fixed-size pages; the cursor is the index of the next record."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        name: str = "fake.records",
        page_size: int = 10,
        target: str = "fake:main",
        poll_interval: float = 0.05,
    ) -> None:
        self.name = name
        self.records = list(records)
        self.page_size = page_size
        self.target = target
        self.poll_interval = poll_interval
        self.pages_served = 0
        self.polls = 0
        # Raised by every poll while set, as a revoked source key would.
        self.fatal: Fatal | None = None

    async def pages(self, cursor: str | None) -> AsyncIterator[Page]:
        self.polls += 1
        if self.fatal is not None:
            raise self.fatal
        start = int(cursor) if cursor else 0
        while start < len(self.records):
            chunk = self.records[start : start + self.page_size]
            start += len(chunk)
            self.pages_served += 1
            await asyncio.sleep(0)
            yield Page(events=[self._event(r) for r in chunk], cursor=str(start))

    def _event(self, record: Record) -> SourceEvent:
        data = msgspec.json.encode(record)
        return SourceEvent(
            stream=self.name,
            key=record.key,
            kind="record",
            data=data,
            content_hash=content_hash(data),
        )

    def transform(self, event: SourceEvent) -> list[NewOp]:
        record = msgspec.json.decode(event.data, type=Record)
        if record.bad:
            raise Rejected(f"record {record.key} is malformed: missing email")
        return [
            NewOp(
                target=self.target,
                entity=record.entity,
                kind=f"step{i}",
                source_key=record.key if i == record.ops - 1 else f"{record.key}#{i}",
                payload=msgspec.json.encode({"key": record.key, "step": i, "text": record.text}),
            )
            for i in range(record.ops)
        ]


class FakeTarget:
    """Records every call; failures are scripted per source key.

    ``applied`` counts how many times each op's write really took effect, which is what
    a duplicate check in the real target would count.
    """

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.sent: list[Op] = []
        self.reconciled: list[Op] = []
        self.applied: dict[tuple[str, str], int] = defaultdict(int)
        self.retryable: dict[str, int] = {}
        self.rate_limited: dict[str, int] = {}
        self.in_doubt_after_write: dict[str, int] = {}
        self.reject: set[str] = set()
        self.fatal: set[str] = set()
        self.concurrent = 0
        self.max_concurrent = 0
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()

    def order_of(self, entity: str) -> list[tuple[str, str]]:
        return [(op.source_key, op.kind) for op in self.sent if op.entity == entity]

    async def send(self, op: Op) -> OpResult:
        self.sent.append(op)
        self.started.set()
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            key = op.source_key
            if key in self.fatal:
                raise Fatal(f"credentials revoked for {op.target}")
            if self.rate_limited.get(key, 0) > 0:
                self.rate_limited[key] -= 1
                raise Retryable("HTTP 429 from fake target", retry_after=0.001, status=429)
            if self.retryable.get(key, 0) > 0:
                self.retryable[key] -= 1
                raise Retryable("HTTP 503 from fake target", retry_after=None)
            if key in self.reject:
                raise Rejected("HTTP 422 from fake target", details=("email must be an email",))
            self.applied[(key, op.kind)] += 1
            if self.in_doubt_after_write.get(key, 0) > 0:
                self.in_doubt_after_write[key] -= 1
                raise InDoubt("timeout after the request was sent")
            return OpResult(updates=(IdMapUpdate(source_key=key, contact_id=f"c-{op.entity}"),))
        finally:
            self.concurrent -= 1

    async def reconcile(self, op: Op) -> OpResult | None:
        self.reconciled.append(op)
        if self.applied[(op.source_key, op.kind)]:
            return OpResult(
                updates=(IdMapUpdate(source_key=op.source_key, contact_id=f"c-{op.entity}"),)
            )
        return None


def settings(**overrides: float) -> PipelineConfig:
    """Fast retries and a short idle poll, so tests take milliseconds."""
    fast = PipelineConfig(
        senders=4,
        queue_size=8,
        max_attempts=5,
        retry_base=Duration(0.01),
        retry_cap=Duration(0.05),
        idle_poll=Duration(0.02),
        drain_grace=Duration(2.0),
    )
    durations = {
        k: Duration(v) for k, v in overrides.items() if isinstance(getattr(fast, k), float)
    }
    counts = {k: int(v) for k, v in overrides.items() if k not in durations}
    return msgspec.structs.replace(fast, **durations, **counts)


def outbox_op(new: NewOp, *, op_id: int = 1, in_doubt: bool = False) -> Op:
    """The outbox row a sender would get for ``new``: for driving a target directly."""
    return Op(
        id=op_id,
        stream="s",
        target=new.target,
        entity=new.entity,
        kind=new.kind,
        source_key=new.source_key,
        payload=new.payload,
        content_hash=new.content_hash,
        attempts=0,
        in_doubt=in_doubt,
    )
