"""The SQLite backend of the store (the default): how a batch of the store's writes
becomes one SQLite transaction, and how reads run.

Reads go through aiosqlite on a read-only connection of their own, which sees only
committed data (WAL).

Where a transaction runs: its statements go into SQLite's page cache on the event loop,
and its COMMIT (the fsync) too while the disk has been quick: waking a thread costs
more than that short wait. A disk that has been slow (the last COMMIT, or any that
stalled in the last STALL_HOLDOFF seconds) gets the COMMIT on the store's thread, and a
huge batch or a write lock held by another connection (an operator's shell) the whole
transaction, so the loop keeps serving meanwhile: it never waits for a lock, and for
the first slow flush of a spell only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from licd.store.base import Statements, Store, StoreError, batched
from licd.store.writer import LAZY_INTERVAL

log = logging.getLogger(__name__)

DB_FILE = "licd.db"
INLINE_MAX_ROWS = 1024  # a batch of at most this many rows may COMMIT on the loop...
INLINE_MAX_SECONDS = 0.002  # ...if the last COMMIT took no longer than this...
STALL_SECONDS = 0.010  # ...and none took longer than this (it froze the loop as long)...
STALL_HOLDOFF = 10.0  # ...in the last this many seconds: a disk's slow flushes come in spells
BUSY_TIMEOUT_MS = 5000  # how long the store's thread waits for another's write lock
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the write-ahead log keeps after a big write


T = TypeVar("T")


def _null(value: None) -> None:
    return value


# A NULL parameter binds as NULL either way; registered, sqlite3 finds None's adapter at
# once instead of probing `__adapt__` and `__conform__` for every NULL it binds (about
# 0.25 us each, and a lease or audit row has several: a third of a churn cycle's binding).
sqlite3.register_adapter(type(None), _null)


def migrations() -> list[tuple[int, str]]:
    """The numbered `.sql` files in licd/store/migrations, in order."""
    out = []
    for entry in resources.files("licd.store.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(out)


class SqliteStore(Store):
    """The store in one SQLite file (see the module)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        thread: ThreadPoolExecutor,
        path: Path,
        lazy_interval: float = LAZY_INTERVAL,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(str(path), lazy_interval)
        self._conn = conn  # the writing connection, used only on `thread`
        self._thread = thread
        #: Monotonic seconds for the stall rule (how long a COMMIT took, how long since
        #: one stalled); injected so that tests, not the disk, say how quick it is.
        self._timer = timer
        self.path = path
        self._reader: aiosqlite.Connection | None = None
        # The writing connection is used by one party at a time: a transaction (on the
        # loop, then its COMMIT on the thread) or a pragma.
        self._conn_lock = asyncio.Lock()
        self._last_commit = 0.0  # seconds the last COMMIT took
        self._stalled_at = -math.inf  # monotonic time of the last COMMIT over STALL_SECONDS

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        lazy_interval: float = LAZY_INTERVAL,
        timer: Callable[[], float] = time.monotonic,
    ) -> SqliteStore:
        """Open (creating if needed) the database at `path` and apply migrations."""
        _make_private(path)
        # The writing connection's COMMITs (and its opening) run on a thread of their
        # own, in one hop each; reads use aiosqlite on a connection of their own.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="licd-store")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(thread, _open_connection, path)
        except sqlite3.Error as exc:
            thread.shutdown(wait=False)
            raise StoreError(f"{path}: cannot open the database: {exc}") from None
        return cls(conn, thread, path, lazy_interval, timer)

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def pragma(self, name: str) -> Any:
        """A pragma's value on the writing connection (`synchronous`, `journal_mode`)."""

        def read() -> Any:
            row = self._conn.execute(f"PRAGMA {name}").fetchone()
            return row[0] if row else None

        async with self._conn_lock:
            return await self._on_thread(read)

    async def schema_version(self) -> int:
        return int(await self.pragma("user_version"))

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Reads go through their own connection: WAL lets them see only committed
        data, never the writer's transaction in progress."""
        if self._reader is None:
            self._reader = await aiosqlite.connect(
                self.path.resolve().as_uri() + "?mode=ro", uri=True
            )
        try:
            async with self._reader.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    # ------------------------------------------------------------- transactions

    async def _transaction(self, statements: Statements) -> None:
        """One batch of mutations, all or nothing (the writer's `transaction`). The
        statements go into SQLite's page cache on the loop, unless the batch is huge or
        another connection holds the database's write lock: then the whole transaction
        runs on the store's thread, where waiting (up to BUSY_TIMEOUT_MS for the lock)
        stalls no client. The COMMIT (the fsync) runs on the loop while the disk has
        been quick (`commit_inline`), else on the thread, so the loop serves heartbeats
        while the disk flushes."""
        conn = self._conn
        merged = batched(statements)
        rows = sum(len(r) for _, r in merged)
        async with self._conn_lock:
            if rows > INLINE_MAX_ROWS or not _begin_at_once(conn):
                took = await self._on_thread(_whole_transaction, conn, merged, self._timer)
            else:
                _execute_all(conn, merged)
                if commit_inline(self._last_commit, self._timer() - self._stalled_at):
                    took = _timed_commit(conn, self._timer)
                else:
                    took = await self._on_thread(_timed_commit, conn, self._timer)
        self._last_commit = took
        if took > STALL_SECONDS:
            now = self._timer()
            if now - self._stalled_at >= STALL_HOLDOFF:
                log.warning(
                    "event=slow_commit seconds=%.3f holdoff=%g "
                    "(commits go to the writer thread meanwhile)",
                    took,
                    STALL_HOLDOFF,
                )
            self._stalled_at = now

    async def _release(self, committed: bool) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        if committed:
            await self._on_thread(self._conn.close)
        else:
            self._thread.submit(self._conn.close)  # after what the thread is stuck in
        self._thread.shutdown(wait=False)


def _statements(script: str) -> list[str]:
    """Split a migration script into whole statements (trigger bodies included)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise sqlite3.DatabaseError(f"incomplete statement in a migration: {pending[:60]!r}")
    return out


def _open_connection(path: Path) -> sqlite3.Connection:
    """The writing connection, prepared and migrated (runs on the store's thread)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # WAL: readers never block the writer, and a commit is one append + fsync.
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is fsynced before it returns, so acknowledged means durable.
        conn.execute("PRAGMA synchronous = FULL")
        # The log grows as big as the biggest transaction (a migration, a bulk revoke)
        # and is then reused from its start: past this size it is cut back once reused.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # Another process (an offline admin tool) may hold a lock for a moment: the
        # migrations (and later any transaction on this thread) wait for it...
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _migrate(conn)
        # ...but a transaction on the event loop never does: it moves to this thread.
        conn.execute("PRAGMA busy_timeout = 0")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    row = conn.execute("PRAGMA user_version").fetchone()
    version = int(row[0]) if row else 0
    known = migrations()
    newest = known[-1][0] if known else 0
    if version > newest:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this licd knows ({newest})"
        )
    for number, sql in known:
        if number <= version:
            continue
        with _migration_transaction(conn):
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        log.info("event=migrated schema_version=%d", number)


@contextlib.contextmanager
def _migration_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (on the store's thread)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def commit_inline(last_commit: float, since_stall: float) -> bool:
    """Whether to COMMIT on the event loop itself: while the disk is quick, waking the
    store's thread and being woken back costs the loop more (CPU, and the GIL changing
    hands each way) than waiting out a short fsync (docs/benchmarks.md). A disk that has
    been slow gets the thread, so the loop keeps serving meanwhile: slow just now
    (`last_commit`), or stalled (over STALL_SECONDS) in the last STALL_HOLDOFF seconds
    (`since_stall`), because one quick flush in a spell of slow ones says nothing of the
    next, and each one inline holds every heartbeat up."""
    return last_commit <= INLINE_MAX_SECONDS and since_stall >= STALL_HOLDOFF


def _begin_at_once(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE without waiting (the connection's busy timeout is 0): False when
    another connection holds the write lock."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
            return False
        raise
    return True


def _whole_transaction(
    conn: sqlite3.Connection, statements: Statements, timer: Callable[[], float]
) -> float:
    """BEGIN, the statements and COMMIT, waiting for the write lock if need be (on the
    store's thread); returns the seconds its COMMIT took."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        _execute_all(conn, statements)
        return _timed_commit(conn, timer)
    finally:
        conn.execute("PRAGMA busy_timeout = 0")


def _execute_all(conn: sqlite3.Connection, statements: Statements) -> None:
    """After BEGIN: the statements, all rolled back on any error."""
    try:
        for sql, rows in statements:
            conn.executemany(sql, rows)
    except BaseException:
        _rollback(conn)
        raise


def _timed_commit(conn: sqlite3.Connection, timer: Callable[[], float]) -> float:
    """COMMIT, or ROLLBACK if that fails (this is where SQLite writes the WAL and waits
    for the fsync); returns the seconds it took by `timer` (how quick the disk is)."""
    started = timer()
    try:
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return timer() - started


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _make_private(path: Path) -> None:
    """The database file, created if need be, readable by the daemon's user only: lease
    secrets live there (and in the -wal and -shm files SQLite derives from it)."""
    existed = path.exists()
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
    except OSError as exc:
        verb = "open" if existed else "create"
        raise StoreError(f"{path}: cannot {verb} the database: {exc.strerror}") from None
