"""The bridge's durable state in one SQLite file: cursors, outbox, id map, dead letters, tokens.

No SQL lives outside this module, so a second backend (PostgreSQL with leases, for
several nodes) is an addition behind the same methods, not a rewrite.

One sqlite3 connection serves the process, owned by one thread. Each store call runs
whole on that thread as one job (a write is one transaction), so a call costs one hop
between the event loop and the thread however many statements it runs, and jobs run one
after another in the order they were made: two transactions never interleave.

This is the design of aiosqlite (a thread owning the connection, a queue of jobs), but
aiosqlite's jobs are single statements: about 19 handoffs per op, which held the whole
pipeline to 132 records/s. Handing whole calls to ``anyio.to_thread.run_sync`` measured
313 records/s; this worker, which also hands results back to the loop in batches,
494 (``python bench/overhead.py --quick``, same idle machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from bridge.models import (
    EVENT_KIND,
    BudgetRow,
    CursorRow,
    DeadLetter,
    IdMapRow,
    IdMapUpdate,
    NewOp,
    Op,
    OpResult,
    Rejection,
    TokenRow,
    content_hash,
    encode_event,
)
from bridge.summary import SummaryItem, SummaryState

_json = msgspec.json

# Each entry upgrades the schema by one version; PRAGMA user_version records how far a
# file has come. Never edit a shipped entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE cursors (
        stream TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        target TEXT NOT NULL,
        entity TEXT NOT NULL,
        kind TEXT NOT NULL,
        source_key TEXT NOT NULL,
        content_hash TEXT,
        payload BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'in_flight', 'done')),
        in_doubt INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX outbox_open_entity ON outbox (entity, id) WHERE state != 'done';
    CREATE INDEX outbox_due ON outbox (next_at, id) WHERE state = 'pending';
    CREATE INDEX outbox_open_source ON outbox (source_key) WHERE state != 'done';
    CREATE INDEX outbox_done ON outbox (updated_at) WHERE state = 'done';
    CREATE TABLE id_map (
        source_key TEXT PRIMARY KEY,
        contact_id TEXT,
        conversation_id TEXT,
        message_id TEXT,
        content_hash TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE dead_letter (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        target TEXT,
        entity TEXT,
        kind TEXT NOT NULL,
        source_key TEXT NOT NULL,
        content_hash TEXT,
        payload BLOB NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        UNIQUE (source_key, kind)
    );
    CREATE TABLE oauth_tokens (
        location TEXT PRIMARY KEY,
        access_token TEXT NOT NULL,
        refresh_token TEXT NOT NULL,
        expires_at REAL NOT NULL,
        scope TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE budgets (
        api TEXT NOT NULL,
        tenant TEXT NOT NULL,
        capacity INTEGER NOT NULL,
        window REAL NOT NULL,
        available INTEGER NOT NULL,
        used_today INTEGER NOT NULL,
        daily_cap INTEGER,
        paused_until REAL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (api, tenant)
    );
    """,
    # The last payload each (target, source key, kind) delivered, so an op that would
    # send the same thing again completes without a call; and the source tags last
    # applied to a contact, so a tag sync knows what to remove.
    """
    CREATE TABLE applied (
        target TEXT NOT NULL,
        source_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload_hash TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (target, source_key, kind)
    );
    ALTER TABLE id_map ADD COLUMN tags TEXT;
    """,
    # Where an uploaded attachment now lives in GHL, for the message that references it.
    """
    ALTER TABLE id_map ADD COLUMN url TEXT;
    """,
    # The reverse stream asks "did the bridge write this GHL message?" and "which source
    # records is this GHL contact?" for every message it reads.
    """
    CREATE INDEX id_map_message ON id_map (message_id) WHERE message_id IS NOT NULL;
    CREATE INDEX id_map_contact ON id_map (contact_id) WHERE contact_id IS NOT NULL;
    CREATE TABLE marks (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # The ledger behind each person's summary note: one row per activity (upserted by its
    # key, a row replaced only by one at least as recent), and per person the inputs that
    # are not activities (title, e-mail, tags) with the note they live in and the digest
    # last written there, so an unchanged digest costs no call.
    """
    CREATE TABLE summary_items (
        contact_key TEXT NOT NULL,
        item_key TEXT NOT NULL,
        at TEXT,
        item BLOB NOT NULL,
        PRIMARY KEY (contact_key, item_key)
    );
    CREATE TABLE summaries (
        contact_key TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        email TEXT,
        tags TEXT,
        note_id TEXT,
        digest TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX summaries_email ON summaries (email) WHERE email IS NOT NULL;
    """,
    # What the daemon found down (a target that answered Fatal, a stream that could not
    # read), so `bridge status` can say why and since when; a row exists only while down.
    # Due ops per target, for the probe that lets one op of a down target through.
    """
    CREATE TABLE health (
        kind TEXT NOT NULL CHECK (kind IN ('target', 'stream')),
        name TEXT NOT NULL,
        error TEXT NOT NULL,
        since REAL NOT NULL,
        checked_at REAL NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE INDEX outbox_due_target ON outbox (target, next_at, id) WHERE state = 'pending';
    """,
    # The dispatcher looks for the head op of each entity among the due ops: with every
    # column it tests in these two indexes it does so on the indexes alone, never reading
    # a row (payload and all) it does not hand out. SQLite counts a partial index's own
    # condition as a column to read, hence ``state`` in both.
    """
    CREATE INDEX outbox_pending ON outbox (next_at, id, entity, target, state)
        WHERE state = 'pending';
    DROP INDEX outbox_due;
    CREATE INDEX outbox_open_head ON outbox (entity, id, state) WHERE state != 'done';
    DROP INDEX outbox_open_entity;
    """,
)

_OP_COLUMNS = (
    "id, stream, target, entity, kind, source_key, payload, content_hash, attempts, in_doubt"
)
_DL_COLUMNS = (
    "id, stream, target, entity, kind, source_key, content_hash, payload, error, attempts,"
    " first_seen, last_seen"
)
# SQLite's default limit on host parameters is 999 on old builds; stay well below it.
_CHUNK = 500
# Results the store's thread hands back to the event loop at most in one wake-up.
_POST_EVERY = 64
_BUDGETS_FINAL = "budgets.final"

_T = TypeVar("_T")
_Job = tuple["asyncio.Future[Any]", Callable[[], Any]]
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]

HealthKind = Literal["target", "stream"]


class HealthRow(msgspec.Struct, frozen=True, kw_only=True):
    """A target or stream found down: why (``error``), since when, last found so when."""

    kind: HealthKind
    name: str
    error: str
    since: float
    checked_at: float


class DeadLetterGroup(msgspec.Struct, frozen=True, kw_only=True):
    """How many dead letters share a target (None for unmappable events), stream and error."""

    target: str | None
    stream: str
    error: str
    count: int


def _op(row: Any) -> Op:
    return Op(
        id=row[0],
        stream=row[1],
        target=row[2],
        entity=row[3],
        kind=row[4],
        source_key=row[5],
        payload=bytes(row[6]),
        content_hash=row[7],
        attempts=row[8],
        in_doubt=bool(row[9]),
    )


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row[0],
        stream=row[1],
        target=row[2],
        entity=row[3],
        kind=row[4],
        source_key=row[5],
        content_hash=row[6],
        payload=bytes(row[7]),
        error=row[8],
        attempts=row[9],
        first_seen=row[10],
        last_seen=row[11],
    )


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _create_private(path: Path) -> None:
    """Create the state file readable by its owner only, before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    # An existing file may have been created with a looser mode by an older tool.
    os.chmod(path, 0o600)


class _Worker:
    """The thread that owns the SQLite connection; every job runs on it whole, in FIFO order.

    Results go back to the event loop in batches: a burst of store calls costs one
    wake-up of the loop, not one each.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="bridge-store", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, fn))
        return future

    def stop(self) -> None:
        """End the thread once the jobs queued before this call have run."""
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        done: list[_Outcome] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                self._post(done)
                done = []
                job = self._jobs.get()
            if job is None:
                self._post(done)
                return
            future, fn = job
            try:
                done.append((future, fn(), None))
            except BaseException as exc:  # handed to the caller, whatever it is
                done.append((future, None, exc))
            if len(done) >= _POST_EVERY:
                self._post(done)
                done = []

    @staticmethod
    def _post(done: list[_Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in done:
            by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
        for loop, outcomes in by_loop.items():
            # A loop already closed has nobody left waiting for these.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, outcomes)


def _settle(done: list[_Outcome]) -> None:
    for future, result, error in done:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Store:
    """Async access to the state file; use ``async with Store.open(path) as store``."""

    def __init__(self, worker: _Worker, db: sqlite3.Connection, path: Path) -> None:
        self._worker = worker
        self._db = db
        self.path = path

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str | Path) -> AsyncIterator[Store]:
        """Open (creating and migrating if needed) the state file at ``path``."""
        file = Path(path)
        _create_private(file)
        worker = _Worker()
        try:
            db = await worker.run(lambda: _connect(file))
            try:
                store = cls(worker, db, file)
                await store._migrate()
                yield store
            finally:
                await worker.run(db.close)
        finally:
            worker.stop()

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` on the store's thread (one hop), outside any write transaction."""
        db = self._db
        return await self._worker.run(lambda: fn(db))

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` as one write transaction on the store's thread (one hop)."""
        db = self._db
        return await self._worker.run(lambda: _transaction(db, fn))

    async def _rows(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return await self._read(lambda db: db.execute(sql, params).fetchall())

    async def _row(self, sql: str, params: Sequence[object] = ()) -> Any:
        return await self._read(lambda db: db.execute(sql, params).fetchone())

    async def _migrate(self) -> None:
        def step(db: sqlite3.Connection, number: int, script: str) -> None:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")

        def migrate(db: sqlite3.Connection) -> None:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                _transaction(db, functools.partial(step, number=number, script=script))

        await self._read(migrate)

    async def schema_version(self) -> int:
        row = await self._row("PRAGMA user_version")
        return int(row[0]) if row else 0

    # -- cursors ------------------------------------------------------------------------

    async def get_cursor(self, stream: str) -> str | None:
        row = await self._row("SELECT value FROM cursors WHERE stream = ?", (stream,))
        return str(row[0]) if row else None

    async def set_cursor(self, stream: str, value: str | None) -> None:
        """Set (or with ``None`` delete) a cursor outside the pipeline, for operators."""
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            if value is None:
                db.execute("DELETE FROM cursors WHERE stream = ?", (stream,))
            else:
                _put_cursor(db, stream, value, now)

        await self._write(write)

    async def cursors(self) -> list[CursorRow]:
        rows = await self._rows("SELECT stream, value, updated_at FROM cursors ORDER BY stream")
        return [CursorRow(stream=r[0], value=r[1], updated_at=r[2]) for r in rows]

    # -- intake: what the producers write --------------------------------------------------

    async def known_hashes(self, keys: Sequence[str]) -> dict[str, set[str]]:
        """Content hashes already delivered or waiting in the outbox, per source key.

        A record whose hash is here needs no new ops: it was delivered, or ops that will
        deliver it (or dead-letter them) are already durable.
        """

        def read(db: sqlite3.Connection) -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                query = (
                    f"SELECT source_key, content_hash FROM id_map WHERE source_key IN ({marks})"
                    " AND content_hash IS NOT NULL"
                    " UNION ALL SELECT source_key, content_hash FROM outbox"
                    f" WHERE state != 'done' AND source_key IN ({marks})"
                    " AND content_hash IS NOT NULL"
                )
                for key, digest in db.execute(query, (*chunk, *chunk)):
                    found.setdefault(key, set()).add(digest)
            return found

        return await self._read(read)

    async def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` whose record was delivered or has ops waiting in the outbox."""
        return set(await self.known_hashes(keys))

    async def commit_page(
        self,
        stream: str,
        cursor: str | None,
        ops: Sequence[NewOp],
        rejections: Sequence[Rejection] = (),
        *,
        now: float,
    ) -> int:
        """Write a page's ops, its rejected events and the cursor advance atomically.

        Returns the number of ops written.
        """
        dead = [
            _DeadRow(
                stream=stream,
                target=None,
                entity=None,
                kind=EVENT_KIND,
                source_key=rejection.event.key,
                content_hash=rejection.event.content_hash,
                payload=encode_event(rejection.event),
                error=rejection.reason,
                attempts=1,
            )
            for rejection in rejections
        ]

        def write(db: sqlite3.Connection) -> None:
            _insert_ops(db, stream, ops, now)
            for row in dead:
                _upsert_dead_letter(db, row, now)
            if cursor is not None:
                _put_cursor(db, stream, cursor, now)

        await self._write(write)
        return len(ops)

    # -- dispatch: what the senders read and write ------------------------------------------

    async def due_ops(
        self,
        *,
        now: float,
        limit: int,
        exclude: Iterable[str] = (),
        exclude_targets: Iterable[str] = (),
        target: str | None = None,
    ) -> list[Op]:
        """Pending ops whose time has come and that head their entity's queue.

        An op waits while an earlier op of its entity is open (pending, scheduled for a
        retry, or in flight), which keeps each entity's ops in outbox order, whatever
        target each one goes to. ``exclude`` names entities to leave out; the ops of
        ``exclude_targets`` are left out in SQL, so a big backlog of a saturated or down
        target cannot fill ``limit`` and hide the due ops of the others. ``target`` asks
        for one target's ops only.
        """
        excluded = set(exclude)
        skip = sorted(set(exclude_targets))
        where = ["o.state = 'pending'", "o.next_at <= ?"]
        params: list[object] = [now]
        if skip:
            where.append(f"o.target NOT IN ({','.join('?' * len(skip))})")
            params.extend(skip)
        if target is not None:
            where.append("o.target = ?")
            params.append(target)
        heads = heads_query(where)
        params.append(limit + len(excluded))

        def read(db: sqlite3.Connection) -> list[Op]:
            db.execute("BEGIN")  # one snapshot for both statements
            try:
                chosen = [i for i, entity in db.execute(heads, params) if entity not in excluded]
                del chosen[limit:]
                if not chosen:
                    return []
                marks = ",".join("?" * len(chosen))
                rows = db.execute(
                    f"SELECT {_OP_COLUMNS} FROM outbox WHERE id IN ({marks})", chosen
                ).fetchall()
            finally:
                db.execute("COMMIT")
            by_id = {row[0]: row for row in rows}
            return [_op(by_id[i]) for i in chosen if i in by_id]

        return await self._read(read)

    async def next_due_at(
        self, *, after: float | None = None, exclude_targets: Iterable[str] = ()
    ) -> float | None:
        """When the earliest pending op becomes due, or None when nothing is pending.

        ``after`` looks only at ops due later than that (the dispatcher already knows
        about those due now); the ops of ``exclude_targets`` are not looked at.
        """
        skip = sorted(set(exclude_targets))
        where = ["state = 'pending'"]
        params: list[object] = []
        if after is not None:
            where.append("next_at > ?")
            params.append(after)
        if skip:
            where.append(f"target NOT IN ({','.join('?' * len(skip))})")
            params.extend(skip)
        row = await self._row(
            f"SELECT MIN(next_at) FROM outbox WHERE {' AND '.join(where)}", params
        )
        return None if row is None or row[0] is None else float(row[0])

    async def mark_in_flight(self, op_id: int, *, now: float) -> None:
        """Record the intent to call the target before the call is made."""
        await self._write(lambda db: _mark_in_flight(db, op_id, now))

    async def start(self, op: Op, *, now: float) -> bool:
        """Take an op up for sending, in one transaction: True when it is now in flight.

        An op whose target, source key and kind last sent this very payload needs no call:
        it is completed at once, and the answer is False.
        """
        digest = content_hash(op.payload)

        def write(db: sqlite3.Connection) -> bool:
            if _applied_hash(db, op) == digest:
                _complete(db, op, OpResult(), digest, now)
                return False
            _mark_in_flight(db, op.id, now)
            return True

        return await self._write(write)

    async def complete(self, op: Op, result: OpResult, *, now: float) -> None:
        """Record what the op learned and mark it done, in one transaction."""
        digest = content_hash(op.payload)
        await self._write(lambda db: _complete(db, op, result, digest, now))

    async def finish(self, op: Op, result: OpResult, *, now: float) -> Op | None:
        """``complete``, and return the next op of the entity if it is pending and due.

        That op now heads its entity, so its sender may take it up without asking the
        outbox for due ops again.
        """
        digest = content_hash(op.payload)

        def write(db: sqlite3.Connection) -> Op | None:
            _complete(db, op, result, digest, now)
            row = db.execute(
                f"SELECT {_OP_COLUMNS}, state, next_at FROM outbox"
                " WHERE entity = ? AND state != 'done' ORDER BY id LIMIT 1",
                (op.entity,),
            ).fetchone()
            if row is None or row[-2] != "pending" or row[-1] > now:
                return None
            return _op(row)

        return await self._write(write)

    async def retry_later(
        self,
        op: Op,
        *,
        next_at: float,
        error: str,
        in_doubt: bool,
        now: float,
        counted: bool = True,
    ) -> None:
        """Put an op back as pending, due at ``next_at``, counting the failed attempt
        unless ``counted`` is false."""
        await self._write(
            lambda db: db.execute(
                "UPDATE outbox SET state = 'pending', attempts = attempts + ?, next_at = ?,"
                " last_error = ?, in_doubt = ?, updated_at = ? WHERE id = ?",
                (int(counted), next_at, error, int(in_doubt), now, op.id),
            )
        )

    async def release(self, op: Op) -> None:
        """Return an op to pending without counting an attempt (shutdown, fatal stop)."""
        await self._write(
            lambda db: db.execute(
                "UPDATE outbox SET state = 'pending', in_doubt = ? WHERE id = ?",
                (int(op.in_doubt), op.id),
            )
        )

    async def dead_letter_op(self, op: Op, error: str, *, now: float) -> None:
        """Move an op from the outbox to the dead-letter table, in one transaction."""
        row = _DeadRow(
            stream=op.stream,
            target=op.target,
            entity=op.entity,
            kind=op.kind,
            source_key=op.source_key,
            content_hash=op.content_hash,
            payload=op.payload,
            error=error,
            attempts=op.attempts + 1,
        )

        def write(db: sqlite3.Connection) -> None:
            _upsert_dead_letter(db, row, now)
            db.execute("DELETE FROM outbox WHERE id = ?", (op.id,))

        await self._write(write)

    async def recover_in_flight(self) -> int:
        """Mark ops a crash left in flight as in doubt, so they are reconciled, not re-sent."""
        return await self._write(
            lambda db: (
                db.execute(
                    "UPDATE outbox SET state = 'pending', in_doubt = 1 WHERE state = 'in_flight'"
                ).rowcount
            )
        )

    async def open_ops(self) -> int:
        """Ops not yet done (pending or in flight): the outbox depth."""
        row = await self._row("SELECT COUNT(*) FROM outbox WHERE state != 'done'")
        return int(row[0]) if row else 0

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by state, with in-doubt pending ops counted apart."""
        counts = {"pending": 0, "in_doubt": 0, "in_flight": 0, "done": 0}
        for state, count in await self._rows(
            "SELECT CASE WHEN state = 'pending' AND in_doubt THEN 'in_doubt' ELSE state END,"
            " COUNT(*) FROM outbox GROUP BY 1"
        ):
            counts[state] = count
        return counts

    async def open_op_counts(self) -> dict[tuple[str, str], int]:
        """Open ops (pending or in flight) per (stream, target)."""
        rows = await self._rows(
            "SELECT stream, target, COUNT(*) FROM outbox WHERE state != 'done'"
            " GROUP BY stream, target"
        )
        return {(str(s), str(t)): int(n) for s, t, n in rows}

    async def outbox_counts_by_target(self) -> dict[str, dict[str, int]]:
        """``outbox_counts`` for each target that has rows."""
        found: dict[str, dict[str, int]] = {}
        for target, state, count in await self._rows(
            "SELECT target,"
            " CASE WHEN state = 'pending' AND in_doubt THEN 'in_doubt' ELSE state END,"
            " COUNT(*) FROM outbox GROUP BY 1, 2"
        ):
            counts = found.setdefault(
                target, {"pending": 0, "in_doubt": 0, "in_flight": 0, "done": 0}
            )
            counts[state] = count
        return found

    async def prune_done(self, *, before: float) -> int:
        """Delete done ops older than ``before``; the id map keeps what they learned."""
        return await self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM outbox WHERE state = 'done' AND updated_at < ?", (before,)
                ).rowcount
            )
        )

    # -- id map -------------------------------------------------------------------------------

    async def id_map(self, source_key: str) -> IdMapRow | None:
        row = await self._row(
            "SELECT source_key, contact_id, conversation_id, message_id, content_hash,"
            " updated_at, tags, url FROM id_map WHERE source_key = ?",
            (source_key,),
        )
        if row is None:
            return None
        return IdMapRow(
            source_key=row[0],
            contact_id=row[1],
            conversation_id=row[2],
            message_id=row[3],
            content_hash=row[4],
            updated_at=row[5],
            tags=None if row[6] is None else tuple(_json.decode(row[6], type=list[str])),
            url=row[7],
        )

    async def made_before(self, source_key: str) -> bool:
        """Whether the target record of this key exists (its id is mapped): messages, notes,
        tasks and history entries are made once per source key, whatever their text says now."""
        row = await self._row("SELECT message_id FROM id_map WHERE source_key = ?", (source_key,))
        return row is not None and row[0] is not None

    async def mark(self, key: str) -> str | None:
        """A fact a target remembered with an op's result (``OpResult.marks``)."""
        row = await self._row("SELECT value FROM marks WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def known_message_ids(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these target message ids the bridge itself wrote (they are mapped)."""

        def read(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(message_ids):
                marks = ",".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in db.execute(
                        f"SELECT message_id FROM id_map WHERE message_id IN ({marks})", chunk
                    )
                )
            return found

        return await self._read(read)

    async def contact_links(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:
        """For each GHL contact id: the source records mapped to it (people, contacts).

        Rows of messages, notes and rules carry the contact id too; only records that own
        the contact (no message id of their own) are links.
        """

        def read(db: sqlite3.Connection) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            for chunk in _chunks(contact_ids):
                marks = ",".join("?" * len(chunk))
                for contact_id, key in db.execute(
                    f"SELECT contact_id, source_key FROM id_map WHERE contact_id IN ({marks})"
                    " AND message_id IS NULL ORDER BY source_key",
                    chunk,
                ):
                    found.setdefault(contact_id, []).append(key)
            return found

        return await self._read(read)

    async def contact_tags(self, keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """For each key that has a GHL contact: the source tags last applied to it."""

        def read(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
            found: dict[str, tuple[str, ...]] = {}
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                for key, tags in db.execute(
                    f"SELECT source_key, tags FROM id_map WHERE source_key IN ({marks})"
                    " AND contact_id IS NOT NULL",
                    chunk,
                ):
                    found[key] = () if tags is None else tuple(_json.decode(tags))
            return found

        return await self._read(read)

    async def tagged_keys(self, prefix: str) -> set[str]:
        """Keys starting with ``prefix`` whose contact carries source tags the bridge set."""
        rows = await self._rows(
            "SELECT source_key FROM id_map WHERE source_key >= ? AND source_key < ?"
            " AND tags IS NOT NULL AND tags != '[]'",
            (prefix, prefix + "\uffff"),
        )
        return {row[0] for row in rows}

    async def id_map_count(self) -> int:
        row = await self._row("SELECT COUNT(*) FROM id_map")
        return int(row[0]) if row else 0

    # -- summaries ------------------------------------------------------------------------------

    async def next_open_payload(self, op: Op) -> bytes | None:
        """The payload of the next open op after ``op`` of its entity, target and kind.

        A target whose op only refreshes state (a summary note) can leave the write to
        that later op, which will run: it is durable, and ops of an entity run in order.
        """
        row = await self._row(
            "SELECT payload FROM outbox WHERE entity = ? AND state != 'done' AND id > ?"
            " AND target = ? AND kind = ? ORDER BY id LIMIT 1",
            (op.entity, op.id, op.target, op.kind),
        )
        return None if row is None else bytes(row[0])

    async def record_summary(
        self,
        contact_key: str,
        *,
        title: str,
        items: Mapping[str, SummaryItem],
        tags: Sequence[str] | None,
        email: str | None,
        now: float,
    ) -> None:
        """Add items (by ledger key) to a person's summary; ``tags``/``email`` None keep theirs.

        Idempotent: an op sent again after an in-doubt outcome records the same rows.
        """
        tag_text = None if tags is None else _json.encode(sorted(tags)).decode()
        rows = [
            (contact_key, key, item.at, _json.encode(item)) for key, item in sorted(items.items())
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO summaries (contact_key, title, email, tags, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (contact_key) DO UPDATE SET"
                " title = excluded.title, email = COALESCE(excluded.email, email),"
                " tags = COALESCE(excluded.tags, tags), updated_at = excluded.updated_at",
                (contact_key, title, email, tag_text, now),
            )
            # A row is replaced only by one at least as recent: an older GHL message read
            # late must not hide the newest one in its single slot.
            db.executemany(
                "INSERT INTO summary_items (contact_key, item_key, at, item) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (contact_key, item_key) DO UPDATE SET at = excluded.at,"
                " item = excluded.item WHERE excluded.at IS NULL OR summary_items.at IS NULL"
                " OR excluded.at >= summary_items.at",
                rows,
            )

        await self._write(write)

    async def summary(self, contact_key: str) -> SummaryState | None:
        """A person's summary inputs and note, or None if no summary op ran for them."""

        def read(db: sqlite3.Connection) -> tuple[Any, list[Any]] | None:
            db.execute("BEGIN")  # one snapshot for both statements
            try:
                row = db.execute(
                    "SELECT title, email, tags, note_id, digest FROM summaries"
                    " WHERE contact_key = ?",
                    (contact_key,),
                ).fetchone()
                if row is None:
                    return None
                items = db.execute(
                    "SELECT item FROM summary_items WHERE contact_key = ? ORDER BY item_key",
                    (contact_key,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
            return row, items

        found = await self._read(read)
        if found is None:
            return None
        row, items = found
        return SummaryState(
            contact_key=contact_key,
            title=row[0],
            email=row[1],
            tags=() if row[2] is None else tuple(_json.decode(row[2], type=list[str])),
            items=tuple(_json.decode(r[0], type=SummaryItem) for r in items),
            note_id=row[3],
            digest=row[4],
        )

    async def summary_written(
        self, contact_key: str, *, note_id: str | None, digest: str | None, now: float
    ) -> None:
        """Remember the note that holds a person's summary and the digest it now holds.

        Both change together: a digest is only ever true of one note.
        """
        await self._write(
            lambda db: db.execute(
                "UPDATE summaries SET note_id = ?, digest = ?, updated_at = ?"
                " WHERE contact_key = ?",
                (note_id, digest, now, contact_key),
            )
        )

    async def summary_keys_by_email(self, email: str) -> list[str]:
        """The people with a summary whose e-mail is ``email`` (stored lower-cased)."""
        rows = await self._rows(
            "SELECT contact_key FROM summaries WHERE email = ? ORDER BY contact_key",
            (email.strip().lower(),),
        )
        return [str(row[0]) for row in rows]

    # -- dead letters ---------------------------------------------------------------------------

    async def dead_letters(
        self, *, limit: int = 100, since: float | None = None
    ) -> list[DeadLetter]:
        """Dead letters, newest first; ``since`` keeps those seen at or after that time."""
        rows = await self._rows(
            f"SELECT {_DL_COLUMNS} FROM dead_letter WHERE last_seen >= ?"
            " ORDER BY last_seen DESC, id DESC LIMIT ?",
            (since if since is not None else 0.0, limit),
        )
        return [_dead_letter(row) for row in rows]

    async def dead_letter(self, dl_id: int) -> DeadLetter | None:
        row = await self._row(f"SELECT {_DL_COLUMNS} FROM dead_letter WHERE id = ?", (dl_id,))
        return None if row is None else _dead_letter(row)

    async def dead_letter_count(self, *, since: float | None = None) -> int:
        row = await self._row(
            "SELECT COUNT(*) FROM dead_letter WHERE last_seen >= ?",
            (since if since is not None else 0.0,),
        )
        return int(row[0]) if row else 0

    async def dead_letter_reasons(self) -> dict[str, int]:
        """Dead letters grouped by the first line of their error, most frequent first."""
        rows = await self._rows(
            "SELECT error, COUNT(*) FROM dead_letter GROUP BY error ORDER BY 2 DESC"
        )
        return {str(error): int(count) for error, count in rows}

    async def dead_letter_groups(self) -> list[DeadLetterGroup]:
        """Dead letters counted by where they came from and their error, most frequent first."""
        rows = await self._rows(
            "SELECT target, stream, error, COUNT(*) FROM dead_letter"
            " GROUP BY target, stream, error ORDER BY 4 DESC, 3"
        )
        return [DeadLetterGroup(target=r[0], stream=r[1], error=r[2], count=r[3]) for r in rows]

    async def replay_dead_letter(
        self,
        dl: DeadLetter,
        ops: Sequence[NewOp],
        *,
        stream: str,
        now: float,
        in_doubt: bool = False,
    ) -> None:
        """Replace a dead letter by fresh outbox ops, in one transaction; ``in_doubt`` ops
        are reconciled before they are sent."""

        def write(db: sqlite3.Connection) -> None:
            _insert_ops(db, stream, ops, now, in_doubt=in_doubt)
            db.execute("DELETE FROM dead_letter WHERE id = ?", (dl.id,))

        await self._write(write)

    async def drop_dead_letter(self, dl_id: int) -> bool:
        return await self._write(
            lambda db: db.execute("DELETE FROM dead_letter WHERE id = ?", (dl_id,)).rowcount > 0
        )

    # -- OAuth tokens ----------------------------------------------------------------------------

    async def load_token(self, location: str) -> TokenRow | None:
        row = await self._row(
            "SELECT location, access_token, refresh_token, expires_at, scope, updated_at"
            " FROM oauth_tokens WHERE location = ?",
            (location,),
        )
        if row is None:
            return None
        return TokenRow(
            location=row[0],
            access_token=row[1],
            refresh_token=row[2],
            expires_at=row[3],
            scope=row[4],
            updated_at=row[5],
        )

    async def save_token(self, token: TokenRow) -> None:
        """Store a token pair; committed before the caller may use the new access token."""
        await self._write(
            lambda db: db.execute(
                "INSERT INTO oauth_tokens (location, access_token, refresh_token, expires_at,"
                " scope, updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (location) DO UPDATE"
                " SET access_token = excluded.access_token,"
                " refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,"
                " scope = excluded.scope, updated_at = excluded.updated_at",
                (
                    token.location,
                    token.access_token,
                    token.refresh_token,
                    token.expires_at,
                    token.scope,
                    token.updated_at,
                ),
            )
        )

    # -- health (written by the daemon, read by it at start and by `bridge status`) ----------

    async def mark_down(self, kind: HealthKind, name: str, error: str, *, now: float) -> None:
        """Record that a target or stream is down; a row already there keeps its ``since``."""
        await self._write(
            lambda db: db.execute(
                "INSERT INTO health (kind, name, error, since, checked_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, name) DO UPDATE SET error = excluded.error,"
                " checked_at = excluded.checked_at",
                (kind, name, error, now, now),
            )
        )

    async def mark_up(self, kind: HealthKind, name: str) -> bool:
        """Forget that a target or stream was down; True if it was."""
        return await self._write(
            lambda db: (
                db.execute("DELETE FROM health WHERE kind = ? AND name = ?", (kind, name)).rowcount
                > 0
            )
        )

    async def health(self) -> list[HealthRow]:
        """Everything currently marked down."""
        rows = await self._rows(
            "SELECT kind, name, error, since, checked_at FROM health ORDER BY kind, name"
        )
        return [
            HealthRow(kind=r[0], name=r[1], error=r[2], since=r[3], checked_at=r[4]) for r in rows
        ]

    # -- budgets (written by the daemon, read by `bridge status`) ---------------------------------

    async def save_budgets(self, rows: Sequence[BudgetRow], *, final: bool = False) -> None:
        """Write bucket states; ``final`` says no request follows them (a clean stop),
        which the next start may trust (:meth:`budgets_final`); any other write clears it."""
        values = [
            (
                r.api,
                r.tenant,
                r.capacity,
                r.window,
                r.available,
                r.used_today,
                r.daily_cap,
                r.paused_until,
                r.updated_at,
            )
            for r in rows
        ]

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO budgets (api, tenant, capacity, window, available, used_today,"
                " daily_cap, paused_until, updated_at) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (api, tenant) DO UPDATE SET capacity = excluded.capacity,"
                " window = excluded.window, available = excluded.available,"
                " used_today = excluded.used_today, daily_cap = excluded.daily_cap,"
                " paused_until = excluded.paused_until, updated_at = excluded.updated_at",
                values,
            )
            if final:
                db.execute(
                    "INSERT OR REPLACE INTO marks (key, value, updated_at) VALUES (?, '1', ?)",
                    (_BUDGETS_FINAL, time.time()),
                )
            else:
                db.execute("DELETE FROM marks WHERE key = ?", (_BUDGETS_FINAL,))

        await self._write(write)

    async def budgets_final(self) -> bool:
        """Whether the last budgets written were a clean stop's (see :meth:`save_budgets`)."""
        return await self.mark(_BUDGETS_FINAL) is not None

    async def budgets(self) -> list[BudgetRow]:
        rows = await self._rows(
            "SELECT api, tenant, capacity, window, available, used_today, daily_cap,"
            " paused_until, updated_at FROM budgets ORDER BY api, tenant"
        )
        return [
            BudgetRow(
                api=r[0],
                tenant=r[1],
                capacity=r[2],
                window=r[3],
                available=r[4],
                used_today=r[5],
                daily_cap=r[6],
                paused_until=r[7],
                updated_at=r[8],
            )
            for r in rows
        ]


# -- SQL run on the store's thread, inside the transaction of the call that uses it --------------


def heads_query(where: Sequence[str]) -> str:
    """The dispatcher's scan: id and entity of the due ops (``where``) that head their entity.

    It reads indexes only; ``due_ops`` then reads whole just the rows it hands out.
    """
    return (
        f"SELECT o.id, o.entity FROM outbox AS o WHERE {' AND '.join(where)}"
        " AND NOT EXISTS (SELECT 1 FROM outbox AS p WHERE p.entity = o.entity"
        " AND p.state != 'done' AND p.id < o.id)"
        " ORDER BY o.next_at, o.id LIMIT ?"
    )


def _transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``fn`` as one write transaction: it commits whole, or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        db.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk, say).
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the
    # last commits, and those are re-read from the source's cursor.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _put_cursor(db: sqlite3.Connection, stream: str, value: str, now: float) -> None:
    db.execute(
        "INSERT INTO cursors (stream, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (stream) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at",
        (stream, value, now),
    )


def _insert_ops(
    db: sqlite3.Connection,
    stream: str,
    ops: Sequence[NewOp],
    now: float,
    *,
    in_doubt: bool = False,
) -> None:
    db.executemany(
        "INSERT INTO outbox (stream, target, entity, kind, source_key, content_hash,"
        " payload, next_at, created_at, updated_at, in_doubt) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        [
            (
                stream,
                op.target,
                op.entity,
                op.kind,
                op.source_key,
                op.content_hash,
                op.payload,
                now,
                now,
                now,
                int(in_doubt),
            )
            for op in ops
        ],
    )


def _mark_in_flight(db: sqlite3.Connection, op_id: int, now: float) -> None:
    db.execute("UPDATE outbox SET state = 'in_flight', updated_at = ? WHERE id = ?", (now, op_id))


def _applied_hash(db: sqlite3.Connection, op: Op) -> str | None:
    row = db.execute(
        "SELECT payload_hash FROM applied WHERE target = ? AND source_key = ? AND kind = ?",
        (op.target, op.source_key, op.kind),
    ).fetchone()
    return None if row is None else str(row[0])


def _complete(db: sqlite3.Connection, op: Op, result: OpResult, digest: str, now: float) -> None:
    for update in result.updates:
        _merge_id_map(db, update, None, now)
    db.execute(
        "INSERT INTO applied (target, source_key, kind, payload_hash, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, source_key, kind) DO UPDATE SET"
        " payload_hash = excluded.payload_hash, updated_at = excluded.updated_at",
        (op.target, op.source_key, op.kind, digest, now),
    )
    if result.marks:
        db.executemany(
            "INSERT INTO marks (key, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " updated_at = excluded.updated_at",
            [(key, value, now) for key, value in result.marks],
        )
    if op.content_hash is not None:
        _merge_id_map(db, IdMapUpdate(source_key=op.source_key), op.content_hash, now)
    db.execute(
        "UPDATE outbox SET state = 'done', in_doubt = 0, last_error = NULL,"
        " updated_at = ? WHERE id = ?",
        (now, op.id),
    )


def _merge_id_map(
    db: sqlite3.Connection, update: IdMapUpdate, digest: str | None, now: float
) -> None:
    tags = None if update.tags is None else _json.encode(sorted(update.tags)).decode()
    db.execute(
        "INSERT INTO id_map (source_key, contact_id, conversation_id, message_id,"
        " content_hash, tags, url, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (source_key) DO UPDATE SET"
        " contact_id = COALESCE(excluded.contact_id, contact_id),"
        " conversation_id = COALESCE(excluded.conversation_id, conversation_id),"
        " message_id = COALESCE(excluded.message_id, message_id),"
        " content_hash = COALESCE(excluded.content_hash, content_hash),"
        " tags = COALESCE(excluded.tags, tags),"
        " url = COALESCE(excluded.url, url),"
        " updated_at = excluded.updated_at",
        (
            update.source_key,
            update.contact_id,
            update.conversation_id,
            update.message_id,
            digest,
            tags,
            update.url,
            now,
        ),
    )


class _DeadRow(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter about to be written (``_upsert_dead_letter``)."""

    stream: str
    target: str | None
    entity: str | None
    kind: str
    source_key: str
    content_hash: str | None
    payload: bytes
    error: str
    attempts: int


def _upsert_dead_letter(db: sqlite3.Connection, row: _DeadRow, now: float) -> None:
    # One row per (record, kind): a record that keeps failing updates its row (latest
    # payload and reason, attempts added up) instead of filling the table.
    db.execute(
        "INSERT INTO dead_letter (stream, target, entity, kind, source_key, content_hash,"
        " payload, error, attempts, first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (source_key, kind) DO UPDATE SET stream = excluded.stream,"
        " target = excluded.target, entity = excluded.entity,"
        " content_hash = excluded.content_hash, payload = excluded.payload,"
        " error = excluded.error, attempts = attempts + excluded.attempts,"
        " last_seen = excluded.last_seen",
        (
            row.stream,
            row.target,
            row.entity,
            row.kind,
            row.source_key,
            row.content_hash,
            row.payload,
            row.error,
            row.attempts,
            now,
            now,
        ),
    )
