"""The store: persists what the engine decided, in SQLite through aiosqlite.

Theory of operation: one writer task (`run`) owns every transaction. Callers enqueue
mutations and await them; the writer takes everything queued so far, commits it in one
`BEGIN IMMEDIATE ... COMMIT` (one fsync for the whole batch: group commit), then
resolves each caller's future. A caller replies only after its future resolves, so an
acknowledged checkout or checkin is on disk. Heartbeats only `touch` a lease: its new
expiry rides along with the next batch (or a timer), never delaying the reply; a restart
covers the gap (see `Engine.restore`). If a batch fails, each mutation is retried alone,
so one bad row fails only its own caller. The store never decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from licd_client.messages import Holder

from .engine import Lease

log = logging.getLogger(__name__)

DB_FILE = "licd.db"
MAX_BATCH = 1024
TOUCH_INTERVAL = 1.0  # seconds a heartbeat's new expiry may wait before it is written

_INSERT_LEASE = """
INSERT INTO lease (secret, handle, licence_id, request, host, hostid, user, pid, app,
                   instance, seats, ttl, created, expires, last_heartbeat, delegate)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_DELETE_LEASE = "DELETE FROM lease WHERE secret = ?"
_TOUCH_LEASE = "UPDATE lease SET expires = ?, last_heartbeat = ? WHERE secret = ?"
_SELECT_LEASES = """
SELECT secret, handle, licence_id, request, host, hostid, user, pid, app, instance,
       seats, ttl, created, expires, last_heartbeat, delegate
FROM lease
"""


class StoreError(Exception):
    """The database failed; whatever the caller asked for was not committed."""


@dataclass
class _Op:
    """One caller's mutation: statements with their rows, and the caller's future."""

    statements: list[tuple[str, list[tuple[Any, ...]]]]
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _lease_row(lease: Lease) -> tuple[Any, ...]:
    h = lease.holder
    return (
        lease.secret,
        lease.handle,
        lease.licence_id,
        lease.request,
        h.host,
        h.hostid,
        h.user,
        h.pid,
        h.app,
        h.instance,
        lease.seats,
        lease.ttl,
        lease.created,
        lease.expires,
        lease.last_heartbeat,
        lease.delegate,
    )


def _row_lease(row: Sequence[Any]) -> Lease:
    (secret, handle, licence_id, request, host, hostid, user, pid, app, instance) = row[:10]
    seats, ttl, created, expires, last_heartbeat, delegate = row[10:]
    return Lease(
        secret=secret,
        handle=handle,
        licence_id=licence_id,
        request=request,
        holder=Holder(host=host, hostid=hostid, user=user, pid=pid, app=app, instance=instance),
        seats=seats,
        ttl=ttl,
        created=created,
        expires=expires,
        last_heartbeat=last_heartbeat,
        delegate=delegate,
    )


def migrations() -> list[tuple[int, str]]:
    """The numbered `.sql` files in licd/migrations, in order."""
    out = []
    for entry in resources.files("licd.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(out)


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._touched: dict[str, tuple[float, float]] = {}
        self._closed = False
        self._running = False
        self._stopped = asyncio.Event()
        self.transactions = 0  # committed batches, for metrics and tests

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating if needed) the database at `path` and apply migrations."""
        try:
            # Lease secrets live here: the file (and the -wal and -shm files SQLite
            # derives from it) readable by the daemon's user only.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the database: {exc.strerror}") from None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the database: {exc}") from None
        try:
            # WAL: readers never block the writer, and a commit is one append + fsync.
            await db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is fsynced before it returns, so acknowledged means durable.
            await db.execute("PRAGMA synchronous = FULL")
            # Another process (an offline admin tool) may hold a lock for a moment.
            await db.execute("PRAGMA busy_timeout = 5000")
            await cls._migrate(db)
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"{path}: cannot prepare the database: {exc}") from None
        return cls(db, path)

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
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
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            log.info("event=migrated schema_version=%d", number)

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------- reads

    async def load_leases(self) -> list[Lease]:
        async with self._db.execute(_SELECT_LEASES) as cur:
            rows = await cur.fetchall()
        return [_row_lease(row) for row in rows]

    # ------------------------------------------------------------------ writes

    async def insert_lease(self, lease: Lease) -> None:
        """Persist a new lease; returns once it is committed."""
        await self._submit([(_INSERT_LEASE, [_lease_row(lease)])])

    async def delete_leases(self, leases: Sequence[Lease]) -> None:
        """Delete leases (checkin, reclaim); returns once committed."""
        await self._submit([(_DELETE_LEASE, [(lease.secret,) for lease in leases])])

    def touch_lease(self, lease: Lease) -> None:
        """Record a renewal lazily: written with the next batch, within TOUCH_INTERVAL."""
        self._touched[lease.secret] = (lease.expires, lease.last_heartbeat)

    async def barrier(self) -> None:
        """Wait until everything submitted before this call has been committed."""
        await self._submit([])

    async def _submit(self, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        if self._closed:
            raise StoreError("the store is closed")
        op = _Op(statements)
        self._queue.put_nowait(op)
        await op.done

    # ------------------------------------------------------------------ writer

    async def run(self) -> None:
        """The writer: commit queued mutations in batches until `close()`."""
        self._running = True
        try:
            while True:
                try:
                    timeout = TOUCH_INTERVAL if self._touched else None
                    first = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    await self._commit([])
                    continue
                batch: list[_Op] = []
                stop = first is None
                if first is not None:
                    batch.append(first)
                while not self._queue.empty() and len(batch) < MAX_BATCH:
                    op = self._queue.get_nowait()
                    if op is None:
                        stop = True
                    else:
                        batch.append(op)
                if batch or self._touched:
                    await self._commit(batch)
                if stop and self._queue.empty():
                    return
        finally:
            self._stopped.set()

    async def _commit(self, batch: list[_Op]) -> None:
        touched, self._touched = self._touched, {}
        try:
            await self._transaction([s for op in batch for s in op.statements], touched)
        except sqlite3.Error as exc:
            if len(batch) > 1:
                # Find the culprit: each mutation alone, so the others still commit.
                log.warning("event=batch_failed size=%d error=%r", len(batch), str(exc))
                self._touched = {**touched, **self._touched}
                for op in batch:
                    await self._commit([op])
                return
            log.error("event=commit_failed error=%r", str(exc))
            # Keep the renewals for the next attempt; they are not anyone's reply.
            self._touched = {**touched, **self._touched}
            for op in batch:
                if not op.done.done():
                    op.done.set_exception(StoreError(str(exc)))
            return
        for op in batch:
            if not op.done.done():
                op.done.set_result(None)

    async def _transaction(
        self,
        statements: list[tuple[str, list[tuple[Any, ...]]]],
        touched: dict[str, tuple[float, float]],
    ) -> None:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in _merged(statements):
                await db.executemany(sql, rows)
            if touched:
                await db.executemany(
                    _TOUCH_LEASE, [(exp, hb, secret) for secret, (exp, hb) in touched.items()]
                )
            await db.execute("COMMIT")
            self.transactions += 1
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Commit what is queued (renewals included), stop the writer, close the file."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            if self._running:
                await self._stopped.wait()
            await self._db.close()


def _merged(
    statements: list[tuple[str, list[tuple[Any, ...]]]],
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Consecutive runs of the same statement merged into one executemany."""
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    for sql, rows in statements:
        if out and out[-1][0] == sql:
            out[-1][1].extend(rows)
        else:
            out.append((sql, list(rows)))
    return out


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (they contain no semicolons in strings)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
