"""The SQLite state file: creation, migrations, atomic writes and the dispatch query."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bridge.models import IdMapUpdate, NewOp, OpResult, Rejection, SourceEvent, TokenRow
from bridge.store import MIGRATIONS, Store, heads_query


def op(entity: str, key: str, kind: str = "upsert", digest: str | None = None) -> NewOp:
    return NewOp(
        target="ghl:main",
        entity=entity,
        kind=kind,
        source_key=key,
        payload=b"{}",
        content_hash=digest,
    )


async def test_file_is_private_wal_and_migrated(tmp_path: Path) -> None:
    """A new state file is 0600, in WAL mode, at the latest schema version; reopening is a no-op."""
    path = tmp_path / "sub" / "state.db"
    async with Store.open(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    async with Store.open(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)


async def test_existing_loose_file_is_tightened(tmp_path: Path) -> None:
    """A state file created by hand with a loose mode is made owner-only on open."""
    path = tmp_path / "state.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    async with Store.open(path):
        pass
    assert path.stat().st_mode & 0o777 == 0o600


async def test_page_commit_is_atomic(tmp_path: Path) -> None:
    """If any part of a page fails to write, neither its ops nor its cursor move."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", "c1", [op("e", "k1")], now=1.0)
        broken = NewOp(
            target="ghl:main",
            entity="e",
            kind="upsert",
            source_key="k2",
            payload=None,  # type: ignore[arg-type]
        )
        with pytest.raises(sqlite3.IntegrityError):
            await store.commit_page("s", "c2", [op("e", "k3"), broken], now=2.0)
        assert await store.get_cursor("s") == "c1"
        assert await store.open_ops() == 1


async def test_due_ops_respect_entity_order(tmp_path: Path) -> None:
    """Only the oldest open op of each entity is due; a retry scheduled later holds its entity."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op("a", "a1"), op("a", "a2"), op("b", "b1")], now=1.0)
        due = await store.due_ops(now=1.0, limit=10)
        assert [o.source_key for o in due] == ["a1", "b1"]
        first = due[0]
        await store.mark_in_flight(first.id, now=1.0)
        await store.retry_later(first, next_at=50.0, error="503", in_doubt=False, now=1.0)
        assert [o.source_key for o in await store.due_ops(now=2.0, limit=10)] == ["b1"]
        assert await store.next_due_at() == 1.0
        (retried,) = [o for o in await store.due_ops(now=60.0, limit=10) if o.entity == "a"]
        assert retried.source_key == "a1"
        assert retried.attempts == 1
        assert [o.source_key for o in await store.due_ops(now=60.0, limit=10, exclude={"a"})] == [
            "b1"
        ]


async def test_complete_records_ids_and_hash_together(tmp_path: Path) -> None:
    """Completing an op merges the ids it learned and the content hash in one step."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op("p", "an:p1", digest="h1")], now=1.0)
        (due,) = await store.due_ops(now=1.0, limit=1)
        await store.complete(
            due, OpResult(updates=(IdMapUpdate(source_key="an:p1", contact_id="C1"),)), now=2.0
        )
        await store.commit_page("s", None, [op("p", "an:p1", kind="conv")], now=3.0)
        (conv,) = await store.due_ops(now=3.0, limit=1)
        await store.complete(
            conv,
            OpResult(updates=(IdMapUpdate(source_key="an:p1", conversation_id="V1"),)),
            now=4.0,
        )
        row = await store.id_map("an:p1")
        assert row is not None
        assert (row.contact_id, row.conversation_id, row.content_hash) == ("C1", "V1", "h1")
        assert await store.known_hashes(["an:p1", "an:p2"]) == {"an:p1": {"h1"}}
        assert (await store.outbox_counts())["done"] == 2
        assert await store.prune_done(before=10.0) == 2


async def test_pending_hash_counts_as_known(tmp_path: Path) -> None:
    """A record whose ops are still queued is known, so a re-poll does not queue it twice."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op("p", "k", digest="h2")], now=1.0)
        assert await store.known_hashes(["k"]) == {"k": {"h2"}}


async def test_dead_letters_accumulate_per_record(tmp_path: Path) -> None:
    """A record that keeps failing updates one dead-letter row: attempts add up, last seen moves."""
    event = SourceEvent(stream="s", key="k", kind="person", data=b"{}", content_hash="h")
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [], [Rejection(event=event, reason="bad 1")], now=1.0)
        await store.commit_page("s", None, [], [Rejection(event=event, reason="bad 2")], now=5.0)
        (dl,) = await store.dead_letters()
        assert (dl.attempts, dl.first_seen, dl.last_seen, dl.error) == (2, 1.0, 5.0, "bad 2")
        assert await store.dead_letter_count(since=4.0) == 1
        assert await store.dead_letter_reasons() == {"bad 2": 1}


async def test_in_flight_ops_become_in_doubt(tmp_path: Path) -> None:
    """Ops found in flight at start are pending again and flagged in doubt."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op("a", "a1")], now=1.0)
        (due,) = await store.due_ops(now=1.0, limit=1)
        await store.mark_in_flight(due.id, now=1.0)
        assert await store.recover_in_flight() == 1
        (again,) = await store.due_ops(now=1.0, limit=1)
        assert again.in_doubt
        assert (await store.outbox_counts())["in_doubt"] == 1


async def test_tokens_round_trip(tmp_path: Path) -> None:
    """An OAuth token pair is stored and replaced whole."""
    async with Store.open(tmp_path / "state.db") as store:
        first = TokenRow(
            location="main",
            access_token="a1",
            refresh_token="r1",
            expires_at=10.0,
            scope="x",
            updated_at=1.0,
        )
        await store.save_token(first)
        await store.save_token(
            TokenRow(
                location="main",
                access_token="a2",
                refresh_token="r2",
                expires_at=20.0,
                scope="x",
                updated_at=2.0,
            )
        )
        token = await store.load_token("main")
        assert token is not None
        assert (token.access_token, token.refresh_token) == ("a2", "r2")
        assert await store.load_token("other") is None


def op_for(target: str, entity: str, key: str) -> NewOp:
    return NewOp(target=target, entity=entity, kind="upsert", source_key=key, payload=b"{}")


async def test_due_ops_leave_out_targets_in_sql(tmp_path: Path) -> None:
    """A backlog of a left-out target does not fill the limit; one target can be asked alone."""
    async with Store.open(tmp_path / "state.db") as store:
        backlog = [op_for("ghl:busy", f"b{i}", f"b{i}") for i in range(20)]
        await store.commit_page("s", None, backlog, now=1.0)
        await store.commit_page("t", None, [op_for("ghl:calm", "c1", "c1")], now=2.0)
        assert {o.target for o in await store.due_ops(now=5.0, limit=5)} == {"ghl:busy"}
        calm = await store.due_ops(now=5.0, limit=5, exclude_targets={"ghl:busy"})
        assert [o.source_key for o in calm] == ["c1"]
        only = await store.due_ops(now=5.0, limit=2, target="ghl:busy")
        assert [o.source_key for o in only] == ["b0", "b1"]


async def test_entity_order_holds_across_targets(tmp_path: Path) -> None:
    """An entity's op for another target waits behind its head, even when the head's target
    is left out."""
    async with Store.open(tmp_path / "state.db") as store:
        ops = [op_for("ghl:a", "p", "p-contact"), op_for("an:src", "p", "p-writeback")]
        await store.commit_page("s", None, ops, now=1.0)
        assert await store.due_ops(now=2.0, limit=5, exclude_targets={"ghl:a"}) == []
        (head,) = await store.due_ops(now=2.0, limit=5)
        assert head.source_key == "p-contact"


async def test_next_due_at_after_and_without_targets(tmp_path: Path) -> None:
    """The dispatcher's wake-up time skips ops due already and those of left-out targets."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op_for("ghl:a", "x", "x")], now=1.0)
        await store.commit_page("s", None, [op_for("ghl:b", "y", "y")], now=9.0)
        assert await store.next_due_at() == 1.0
        assert await store.next_due_at(after=1.0) == 9.0
        assert await store.next_due_at(exclude_targets={"ghl:b"}) == 1.0
        assert await store.next_due_at(after=1.0, exclude_targets={"ghl:b"}) is None


async def test_health_rows_keep_since(tmp_path: Path) -> None:
    """Marking a target down twice keeps when it went down and updates the reason; up clears."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.mark_down("target", "ghl:a", "AuthError: revoked", now=1.0)
        await store.mark_down("target", "ghl:a", "AuthError: still revoked", now=5.0)
        await store.mark_down("stream", "an.people", "AuthError: bad key", now=6.0)
        rows = {(r.kind, r.name): r for r in await store.health()}
        target = rows[("target", "ghl:a")]
        assert (target.since, target.checked_at, target.error) == (
            1.0,
            5.0,
            "AuthError: still revoked",
        )
        assert rows[("stream", "an.people")].since == 6.0
        assert await store.mark_up("target", "ghl:a")
        assert not await store.mark_up("target", "ghl:a")
        assert [r.name for r in await store.health()] == ["an.people"]


async def test_counts_by_target_and_stream(tmp_path: Path) -> None:
    """Open ops per (stream, target), outbox states per target and dead letters by origin."""
    event = SourceEvent(stream="s", key="k", kind="person", data=b"{}", content_hash="h")
    async with Store.open(tmp_path / "state.db") as store:
        ops = [op_for("ghl:a", "x", "x"), op_for("ghl:b", "y", "y"), op_for("ghl:b", "z", "z")]
        await store.commit_page(
            "s", None, ops, [Rejection(event=event, reason="no email")], now=1.0
        )
        assert await store.open_op_counts() == {("s", "ghl:a"): 1, ("s", "ghl:b"): 2}
        (first, *_) = await store.due_ops(now=1.0, limit=5, target="ghl:b")
        await store.dead_letter_op(first, "HTTP 422", now=2.0)
        by_target = await store.outbox_counts_by_target()
        assert by_target["ghl:b"]["pending"] == 1
        assert by_target["ghl:a"]["pending"] == 1
        groups = {(g.target, g.stream, g.error): g.count for g in await store.dead_letter_groups()}
        assert groups == {("ghl:b", "s", "HTTP 422"): 1, (None, "s", "no email"): 1}


async def test_start_puts_in_flight_or_completes_an_unchanged_op(tmp_path: Path) -> None:
    """``start`` puts an op in flight, or completes it at once if its payload was last applied."""
    async with Store.open(tmp_path / "state.db") as store:
        await store.commit_page("s", None, [op("p", "k", digest="h1")], now=1.0)
        (first,) = await store.due_ops(now=1.0, limit=1)
        assert await store.start(first, now=2.0)
        assert (await store.outbox_counts())["in_flight"] == 1
        await store.complete(first, OpResult(), now=3.0)
        await store.commit_page("s", None, [op("p", "k", digest="h2")], now=4.0)
        (same,) = await store.due_ops(now=4.0, limit=1)
        assert not await store.start(same, now=5.0)
        counts = await store.outbox_counts()
        assert (counts["in_flight"], counts["done"]) == (0, 2)
        row = await store.id_map("k")
        assert row is not None
        assert row.content_hash == "h2"


async def test_due_ops_hand_out_whole_ops_in_due_order(tmp_path: Path) -> None:
    """Heads come whole (payload and all) in (due time, id) order, left-out entities skipped."""
    async with Store.open(tmp_path / "state.db") as store:
        ops = [
            NewOp(target="ghl:main", entity=e, kind="k", source_key=e, payload=e.encode() * 3)
            for e in ("a", "b", "c", "d")
        ]
        await store.commit_page("s", None, ops, now=1.0)
        (a, *_) = await store.due_ops(now=1.0, limit=1)
        await store.retry_later(a, next_at=1.5, error="503", in_doubt=True, now=1.0)
        due = await store.due_ops(now=2.0, limit=3, exclude={"c"})
        assert [(o.source_key, o.payload) for o in due] == [
            ("b", b"bbb"),
            ("d", b"ddd"),
            ("a", b"aaa"),
        ]
        assert due[2].in_doubt
        assert due[2].attempts == 1


def test_dispatch_query_reads_indexes_only(tmp_path: Path) -> None:
    """The head-of-entity scan and its per-row check run on covering indexes, not on rows."""
    path = tmp_path / "state.db"

    async def create() -> None:
        async with Store.open(path):
            pass

    asyncio.run(create())
    heads = heads_query(["o.state = 'pending'", "o.next_at <= ?", "o.target NOT IN (?)"])
    with sqlite3.connect(path) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {heads}", (1.0, "x", 5))]
    searches = [step for step in plan if step.startswith("SEARCH")]
    assert len(searches) == 2
    assert all("COVERING INDEX" in step for step in searches), plan


async def test_concurrent_calls_keep_their_transactions_apart(tmp_path: Path) -> None:
    """Many calls at once each commit whole; a failing one rolls back alone, the store goes on."""
    async with Store.open(tmp_path / "state.db") as store:
        broken = NewOp(
            target="ghl:main",
            entity="x",
            kind="upsert",
            source_key="bad",
            payload=None,  # type: ignore[arg-type]
        )
        calls = [
            store.commit_page(
                f"s{i}", f"c{i}", [op(f"e{i}", f"k{i}"), op(f"e{i}", f"k{i}b")], now=1.0
            )
            for i in range(40)
        ]
        calls.insert(20, store.commit_page("bad", "never", [op("y", "y1"), broken], now=1.0))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results].count(sqlite3.IntegrityError) == 1
        assert await store.open_ops() == 80
        assert await store.get_cursor("bad") is None
        assert len(await store.cursors()) == 40


async def test_a_cancelled_caller_leaves_the_store_usable(tmp_path: Path) -> None:
    """A caller cancelled while its call waits does not wedge the store or leak a transaction."""
    async with Store.open(tmp_path / "state.db") as store:
        calls = [
            asyncio.ensure_future(store.commit_page("s", str(i), [op("e", f"k{i}")], now=1.0))
            for i in range(20)
        ]
        calls[5].cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        # The cancelled page may or may not have landed; each page is whole either way.
        assert await store.open_ops() in (19, 20)
        await store.set_cursor("s", "after")
        assert await store.get_cursor("s") == "after"


async def test_schema_six_files_upgrade_in_place(tmp_path: Path) -> None:
    """A state file at schema 6 (before the dispatch indexes) keeps its ops and gains them."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for number, script in enumerate(MIGRATIONS[:6], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute(
            "INSERT INTO outbox (stream, target, entity, kind, source_key, payload, next_at,"
            " created_at, updated_at) VALUES ('s', 'ghl:main', 'e', 'k', 'k1', x'7b7d', 1, 1, 1)"
        )
    async with Store.open(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)
        (due,) = await store.due_ops(now=2.0, limit=5)
        assert (due.source_key, due.payload) == ("k1", b"{}")
    with sqlite3.connect(path) as conn:
        names = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert {"outbox_pending", "outbox_open_head"} <= names
    assert not {"outbox_due", "outbox_open_entity"} & names
