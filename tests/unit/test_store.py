"""The SQLite store against real files: migrations, pragmas, where commits run,
renewals, failures. What both backends do alike: tests/integration/test_store_backends.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from licd.core.events import Event, Kind
from licd.engine import SeatLease
from licd.store.base import StoreError
from licd.store.records import INSERT_AUDIT, INSERT_LEASE, audit_row, lease_row
from licd.store.sqlite import (
    INLINE_MAX_ROWS,
    INLINE_MAX_SECONDS,
    STALL_HOLDOFF,
    STALL_SECONDS,
    SqliteStore,
    _statements,
    commit_inline,
    migrations,
)
from licd.store.writer import MAX_RENEWALS
from tests.support import DICOM, stored_lease, writing

NOW = 1_790_000_000.0


def lease(n: int, **kw: object) -> SeatLease:
    return stored_lease(n, at=NOW, **kw)


def running(path: Path, **options: Any) -> AbstractAsyncContextManager[SqliteStore]:
    """The store at `path` with its writer running; closed (lazy writes written) on exit."""
    return _opened(SqliteStore.open(path, **options))


@contextlib.asynccontextmanager
async def _opened(opening: Awaitable[SqliteStore]) -> AsyncIterator[SqliteStore]:
    async with writing(await opening) as s:
        yield s


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with running(tmp_path / "licd.db") as s:
        yield s


async def reopen(path: Path) -> list[SeatLease]:
    s = await SqliteStore.open(path)
    try:
        return await s.load_leases()
    finally:
        await s.close()


async def test_migrations_and_pragmas(store: SqliteStore) -> None:
    assert await store.schema_version() == migrations()[-1][0]
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "lease" in tables


def _schema_at(path: Path, version: int) -> None:
    """A database as an older licd left it: migrations up to `version` only."""
    with sqlite3.connect(path, isolation_level=None) as db:
        for number, sql in migrations():
            if number <= version:
                for statement in _statements(sql):
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")


async def test_lean_writes_migration_keeps_every_row_and_the_append_only_log(
    tmp_path: Path,
) -> None:
    path = tmp_path / "licd.db"
    _schema_at(path, 4)
    old = [lease(1, delegate=b"d" * 32), lease(2)]
    with sqlite3.connect(path) as db:
        db.executemany(INSERT_LEASE, [lease_row(x) for x in old])
        for n in range(3):
            db.execute(INSERT_AUDIT, audit_row(Event(Kind.CHECKOUT, NOW + n, handle=f"h{n}")))
        before = db.execute("SELECT * FROM audit ORDER BY id").fetchall()
    async with running(path) as s:
        assert await s.schema_version() == migrations()[-1][0]
        loaded = {x.secret: x for x in await s.load_leases()}
        assert set(loaded) == {"secret-1", "secret-2"}
        assert loaded["secret-1"].delegate == b"d" * 32
        assert loaded["secret-2"].holder == old[1].holder
        await s.append(Event(Kind.RELOAD, NOW + 10))
        after = [(e.id, e.event.kind) for e in await s.audit()]
        assert after == [(row[0], Kind.CHECKOUT) for row in before] + [(4, Kind.RELOAD)]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM audit ORDER BY id LIMIT 3").fetchall() == before
        for sql in ("UPDATE audit SET event = 'x'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(sql)
        # What each commit writes: the lease table has no index but its key, and the
        # audit log no sequence table to update.
        indexes = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('lease', 'audit')"
        ).fetchall()
        assert indexes == []
        (audit_sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'audit'").fetchone()
        assert "AUTOINCREMENT" not in audit_sql


async def test_retention_migration_permits_only_the_retention_delete(tmp_path: Path) -> None:
    """Migration 006 on a v5 database with rows: every row kept, UPDATE and any DELETE
    still refused, except the delete of entries older than the cut-off the retention
    job records in the same transaction."""
    path = tmp_path / "licd.db"
    _schema_at(path, 5)
    with sqlite3.connect(path) as db:
        for n in range(4):
            db.execute(INSERT_AUDIT, audit_row(Event(Kind.CHECKOUT, NOW + n, handle=f"h{n}")))
        before = db.execute("SELECT * FROM audit ORDER BY id").fetchall()
    async with running(path) as s:
        assert await s.schema_version() >= 6
        assert [(e.id, e.event.handle) for e in await s.audit()] == [
            (row[0], row[4]) for row in before
        ]
        with pytest.raises(StoreError, match="append-only"):  # nothing older than -inf
            await s._submit([("DELETE FROM audit WHERE id = 1", [()])])
        await s.retire_audit(upto=3, cutoff=NOW + 2)  # ids 1..3, but only times < NOW + 2
        assert [e.event.handle for e in await s.audit()] == ["h2", "h3"]
    with sqlite3.connect(path, isolation_level=None) as db:
        assert db.execute("SELECT cutoff FROM audit_retention").fetchall() == [(NOW + 2,)]
        refused = [
            "UPDATE audit SET event = 'x'",
            "DELETE FROM audit",
            f"DELETE FROM audit WHERE time >= {NOW + 2}",
            "DELETE FROM audit_retention",
            "INSERT INTO audit_retention (id, cutoff) VALUES (2, 1e308)",
        ]
        for sql in refused:
            with pytest.raises(sqlite3.DatabaseError, match="append-only|cut-off|constraint"):
                db.execute(sql)
        assert db.execute("SELECT count(*) FROM audit").fetchone() == (2,)
        # Without a cut-off row (a hand edit) nothing may be deleted: it fails closed.
        db.execute("DROP TRIGGER audit_retention_kept")
        db.execute("DELETE FROM audit_retention")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(f"DELETE FROM audit WHERE time < {NOW + 100}")


async def test_synchronous_full_on_the_store_connection(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "x.db")
    try:
        assert await s.pragma("synchronous") == 2  # FULL
        assert await s.pragma("journal_mode") == "wal"
    finally:
        await s.close()


async def test_the_write_ahead_log_shrinks_back_after_a_big_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("licd.store.sqlite.WAL_SIZE_LIMIT", 256 * 1024)
    path = tmp_path / "licd.db"
    wal = tmp_path / "licd.db-wal"
    async with running(path) as s:
        # Far past the 1,000-page automatic checkpoint in one transaction.
        await s.delete_leases([], [Event(Kind.RELOAD, NOW, detail={"x": "y" * 2000})] * 3000)
        big = wal.stat().st_size
        assert big > 4 * 1024 * 1024
        await s.insert_lease(lease(1))  # the next write reuses the checkpointed log
        assert wal.stat().st_size <= 256 * 1024 < big


async def test_renewals_wait_for_their_interval_then_go_together_and_on_close(
    tmp_path: Path,
) -> None:
    """A renewal does not ride along with every commit (a busy site's commits would
    each rewrite a few leases' pages): it waits for its interval, then all the
    renewals of that interval go in one batch; closing writes what is left."""
    path = tmp_path / "licd.db"
    a, b = lease(1), lease(2)
    async with running(path, lazy_interval=3600.0) as s:  # never due during this test
        await s.insert_lease(a)
        await s.insert_lease(b)
        a.expires, a.last_heartbeat = NOW + 500, NOW + 410
        s.touch_lease(a)
        await s.insert_lease(lease(3))  # a commit while the renewal is not yet due
        loaded = {x.secret: x for x in await s.load_leases()}
        assert loaded[a.secret].expires == NOW + 90
        b.expires = NOW + 900
        s.touch_lease(b)
    loaded = {x.secret: x for x in await reopen(path)}
    assert (loaded[a.secret].expires, loaded[a.secret].last_heartbeat) == (NOW + 500, NOW + 410)
    assert loaded[b.secret].expires == NOW + 900
    assert len(loaded) == 3


async def test_due_renewals_ride_along_with_the_next_batch(tmp_path: Path) -> None:
    """Once their interval is up, renewals go in the same transaction as the next
    batch: a writer that is never idle (so never arms its timer) still writes them."""
    async with running(tmp_path / "licd.db", lazy_interval=3600.0) as s:
        item = lease(1)
        await s.insert_lease(item)
        item.expires = NOW + 500
        s.touch_lease(item)
        s._writer._renewals_since -= 7200  # as if its interval were up
        statements: list[str] = []
        s._conn.set_trace_callback(lambda sql: statements.append(sql.split(" (")[0].strip()))
        await s.insert_lease(lease(2))
        s._conn.set_trace_callback(None)
        first = statements[: statements.index("COMMIT") + 1]
        words = [x.split()[0] for x in first]
        assert (words[0], words[-1], sorted(words[1:-1])) == (
            "BEGIN",
            "COMMIT",
            ["INSERT", "UPDATE"],
        )


async def test_a_denial_waiting_too_does_not_push_back_renewals_already_due(
    tmp_path: Path,
) -> None:
    """The idle writer wakes for the sooner deadline: the renewals' own, not a full
    interval from when a denial's entry came in during a commit."""
    async with running(tmp_path / "licd.db", lazy_interval=3600.0) as s:
        item = lease(1)
        await s.insert_lease(item)
        item.expires = NOW + 500
        s.touch_lease(item)
        entered, gate = threading.Event(), threading.Event()

        def hold_commit(sql: str) -> None:
            if sql == "COMMIT":
                entered.set()
                gate.wait(10)

        s._conn.set_trace_callback(hold_commit)
        s._last_commit = 1.0  # the next commit on the writer thread: the loop runs on
        committed = s.insert_lease(lease(2))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.wait, 10)
        s.append_later(Event(Kind.DENIED, NOW, reason="seats_exhausted"))  # mid-commit
        s._writer._renewals_since -= 7200  # and meanwhile the renewal's interval is up
        gate.set()
        await committed
        async with asyncio.timeout(5.0):  # the writer is idle now: look, do not poke it
            while (await s.load_leases())[0].expires != NOW + 500:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        s._conn.set_trace_callback(None)


async def test_many_renewals_are_written_in_chunks_the_loop_can_wait_out(
    tmp_path: Path,
) -> None:
    """A big site's second of renewals is not one long transaction on the event loop:
    at most MAX_RENEWALS per commit, one chunk after another while the daemon runs,
    and every one of them lands."""
    path = tmp_path / "licd.db"
    async with running(path, lazy_interval=3600.0) as s:
        items = [lease(n) for n in range(2 * MAX_RENEWALS + 88)]
        await asyncio.gather(*(s.insert_lease(x) for x in items))
        per_commit: list[int] = [0]

        def trace(sql: str) -> None:
            if sql.startswith("UPDATE lease"):
                per_commit[-1] += 1
            elif sql == "COMMIT":
                per_commit.append(0)

        s._conn.set_trace_callback(trace)
        for x in items:
            x.expires = NOW + 700
            s.touch_lease(x)
        s._writer._renewals_since -= 7200  # as if their interval were up
        await s.barrier()  # the first chunk goes with it, the others one after another
        async with asyncio.timeout(5.0):  # nothing else wakes the writer: look
            while sum(per_commit) < len(items):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        s._conn.set_trace_callback(None)
        assert [n for n in per_commit if n] == [MAX_RENEWALS, MAX_RENEWALS, 88]
        assert all(x.expires == NOW + 700 for x in await s.load_leases())
        # Closing writes whatever is left, in chunks too.
        for x in items:
            x.expires = NOW + 800
            s.touch_lease(x)
    assert all(x.expires == NOW + 800 for x in await reopen(path))


async def test_group_commit_batches_concurrent_writers(store: SqliteStore) -> None:
    before = store.transactions
    await asyncio.gather(*(store.insert_lease(lease(n)) for n in range(300)))
    assert len(await store.load_leases()) == 300
    # All 300 were queued before the writer ran: far fewer transactions than rows.
    assert store.transactions - before <= 3


class DiskTimer:
    """The store's stall-rule timer, moved by the test: each COMMIT "takes" the next of
    `takes` (seconds; the last one repeats), whatever the real disk did."""

    def __init__(self, *takes: float) -> None:
        self.now = 1000.0
        self.takes = list(takes) or [INLINE_MAX_SECONDS / 2]
        self.committed_on: list[int] = []

    def __call__(self) -> float:
        return self.now

    def trace(self, sql: str) -> None:  # the store connection's trace callback
        if sql == "COMMIT":
            self.committed_on.append(threading.get_ident())
            took = self.takes[0] if len(self.takes) == 1 else self.takes.pop(0)
            self.now += took


@contextlib.asynccontextmanager
async def timed(path: Path, timer: DiskTimer) -> AsyncIterator[SqliteStore]:
    async with running(path, timer=timer) as s:
        s._conn.set_trace_callback(timer.trace)
        yield s


async def test_commit_on_the_loop_only_for_small_batches_on_a_quick_disk(tmp_path: Path) -> None:
    disk = DiskTimer()  # every COMMIT quick, however slow this machine's disk is
    async with timed(tmp_path / "licd.db", disk) as store:
        here = threading.get_ident()
        await store.insert_lease(lease(1))  # small: the loop waits out the fsync
        await store.delete_leases([lease(n) for n in range(100, 100 + INLINE_MAX_ROWS + 1)])
        disk.takes = [1.0, INLINE_MAX_SECONDS / 2]  # the disk takes a second, once
        await store.insert_lease(lease(2))  # small, on the loop: it was quick so far
        await store.insert_lease(lease(3))  # after that slow one: to the thread
        await store.insert_lease(lease(4))  # that one was quick, but a stall is recent
        disk.now += STALL_HOLDOFF  # the holdoff passes with the disk quick
        await store.insert_lease(lease(5))  # back on the loop
        assert [t == here for t in disk.committed_on] == [True, False, True, False, False, True]
        assert len(await store.load_leases()) == 5


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(store: SqliteStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # an operator's shell holds the write lock
        done = store.insert_lease(lease(1))
        # Were the loop waiting for the lock, this sleep would end only once the insert
        # had failed (busy timeout): the insert is still waiting, on the writer thread.
        await asyncio.sleep(0.2)
        assert not done.done()
        other.execute("COMMIT")
        await asyncio.wait_for(done, 5.0)
    finally:
        other.close()
    assert [x.secret for x in await store.load_leases()] == ["secret-1"]
    await store.insert_lease(lease(2))  # and the next one is back on the loop
    assert len(await store.load_leases()) == 2


async def test_renewals_on_an_idle_store_are_written_within_the_lazy_interval(
    tmp_path: Path,
) -> None:
    async with running(tmp_path / "licd.db", lazy_interval=0.05) as s:
        item = lease(1)
        await s.insert_lease(item)
        item.expires = NOW + 500
        s.touch_lease(item)  # nothing else comes to carry it
        async with asyncio.timeout(5.0):  # no event says a lazy write landed: look
            while (await s.load_leases())[0].expires != NOW + 500:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


def test_commit_inline_rule() -> None:
    calm = STALL_HOLDOFF  # seconds since the last stalled COMMIT
    assert commit_inline(INLINE_MAX_SECONDS, calm)
    assert not commit_inline(INLINE_MAX_SECONDS * 2, calm)
    assert not commit_inline(0.0, calm - 0.001)  # quick just now, but a stall lately


async def test_a_stalled_commit_keeps_commits_off_the_loop_for_the_holdoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One quick COMMIT in a spell of slow flushes says nothing of the next: after a
    stall, commits go to the writer thread (the loop serves meanwhile) until
    STALL_HOLDOFF has passed without one; the operator is told once per spell."""
    quick, stall = INLINE_MAX_SECONDS / 2, STALL_SECONDS * 2
    disk = DiskTimer(stall, quick, stall, quick)  # the disk stalls, and again soon after
    here = threading.get_ident()
    with caplog.at_level(logging.WARNING, logger="licd.store.sqlite"):
        async with timed(tmp_path / "licd.db", disk) as store:
            await store.insert_lease(lease(1))  # on the loop, which it holds up
            await store.insert_lease(lease(2))  # on the thread (the last was slow): quick
            await store.insert_lease(lease(3))  # the last was quick, yet still the thread
            assert [t == here for t in disk.committed_on] == [True, False, False]
            disk.now += STALL_HOLDOFF - 0.001  # not quite over (the stall of lease 3)
            await store.insert_lease(lease(4))  # still the thread
            disk.now += 0.001  # now it is, with the disk quick since
            await store.insert_lease(lease(5))  # back on the loop
            assert [t == here for t in disk.committed_on[3:]] == [False, True]
            assert len(await store.load_leases()) == 5
    warned = [r.getMessage() for r in caplog.records if "event=slow_commit" in r.getMessage()]
    assert len(warned) == 1, warned


async def test_failing_disk_fails_the_write(store: SqliteStore) -> None:
    with sqlite3.connect(store.path) as db:
        db.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON lease BEGIN SELECT RAISE(ABORT, 'disk'); END"
        )
    with pytest.raises(StoreError):
        await store.insert_lease(lease(1))
    assert await store.load_leases() == []


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "x.db")
    await s.close()
    with pytest.raises(StoreError):
        await s.insert_lease(lease(1))


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore.open(path)


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        await SqliteStore.open(path)


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("policy", "{not json", "Expecting property name"),
        ("policy", '{"colour": "red"}', "unexpected keyword argument 'colour'"),
        ("features", '["a", "b"]', "features must map names to str, int, bool or float"),
    ],
)
async def test_a_licence_row_licd_did_not_write_is_a_clear_store_error(
    tmp_path: Path, column: str, value: str, problem: str
) -> None:
    path = tmp_path / "licd.db"
    async with running(path) as s:
        await s.put_licence(DICOM, Event(Kind.LICENCE_ADDED, NOW, licence=DICOM.id))
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE licence SET {column} = ?", (value,))  # a hand edit
    async with running(path) as s:
        with pytest.raises(StoreError) as caught:
            await s.load_licences()
    message = str(caught.value)
    assert message.startswith(f"{path}: the licence 'dicom-hq' cannot be read (")
    assert problem in message and message.endswith("restore it from the backup")


async def test_a_close_that_cannot_wait_leaves_a_stuck_commit_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`close(within=...)` (the daemon's exit now) does not wait for a COMMIT stuck on
    the disk: the writer is abandoned, its callers told so, and the file is closed on the
    store's thread once that transaction has ended, committed whole."""
    path = tmp_path / "licd.db"
    s = await SqliteStore.open(path)
    writer = asyncio.create_task(s.run())
    entered, gate = threading.Event(), threading.Event()

    def hold_commit(sql: str) -> None:
        if sql == "COMMIT":
            entered.set()
            gate.wait(10)

    s._conn.set_trace_callback(hold_commit)
    s._last_commit = 1.0  # the next COMMIT on the store's thread: the loop runs on
    stuck = s.insert_lease(lease(1))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, entered.wait, 10)
    queued = s.insert_lease(lease(2))
    with caplog.at_level(logging.WARNING, logger="licd.store.sqlite"):
        await asyncio.wait_for(s.close(within=0.05), 5.0)
    assert writer.done() and "event=store_abandoned" in caplog.text
    with pytest.raises(StoreError, match="may or may not be committed"):
        await stuck
    with pytest.raises(StoreError, match="closed before this was written"):
        await queued
    with pytest.raises(StoreError, match="closed"):
        s.insert_lease(lease(3))
    gate.set()
    await loop.run_in_executor(None, s._thread.shutdown, True)  # COMMIT, then close
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        s._conn.execute("SELECT 1")
    assert [x.secret for x in await reopen(path)] == ["secret-1"]
