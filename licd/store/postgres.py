"""The PostgreSQL backend of the store: one database shared by a cluster of licd nodes, of
which one, the leader, serves at a time (docs/ha.md).

Three connections (asyncpg): the writer's (the group-commit writer's transactions), the
reads', and the leadership's, so that a claim or a renewal never waits behind a batch.

Leadership is one row, `leader` (epoch, node, address, renewed_at), timed on the
database's clock, the only clock the nodes share: `claim` takes it over only when the
holder let it go or has not renewed for `hold_for` seconds, bumping the epoch in the
same UPDATE; `renew` keeps it at this node's epoch. Fencing: every write transaction
first locks that row FOR SHARE at this node's epoch (`fence`), so a node that lost the
leadership (paused, cut off, deposed) can never commit again, and a takeover's UPDATE
waits until a commit in progress is over, so the new leader loads everything the old
one committed. Nothing is written before `fence` is set.

The schema (migrations_postgres/) keeps a guard the leader's engine cannot bypass: the
seats in use per licence are counted by the database in the same transaction as the
lease rows and checked against the licence's ceiling, and a (licence, machine, request
key) holds one live lease at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from licd.store.base import Statements, Store, StoreError, batched
from licd.store.writer import LAZY_INTERVAL

log = logging.getLogger(__name__)

#: What the database or the network can raise.
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

CONNECT_TIMEOUT = 10.0  # seconds to reach the database at start
RELEASE_TIMEOUT = 2.0  # seconds a stopping leader waits to let the leadership go
MIGRATION_LOCK = 0x6C696364  # an advisory lock: one node migrates at a time ("licd")


class Fenced(StoreError):
    """This node no longer holds the leadership: nothing was committed."""


@dataclass(frozen=True)
class LeaderRow:
    """Who leads, as the database says."""

    epoch: int
    node: str  # "" when nobody leads
    address: str  # where clients reach the leader ("host:port"), "" when nobody leads
    age: float  # seconds since its last renewal, on the database's clock


def migrations() -> list[tuple[int, str]]:
    """The numbered `.sql` files in licd/store/migrations_postgres, in order."""
    out = []
    for entry in resources.files("licd.store.migrations_postgres").iterdir():
        name = entry.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(out)


_PLACEHOLDER = re.compile(r"\?")


@functools.cache
def numbered(sql: str) -> str:
    """records.py's `?` placeholders as PostgreSQL's `$1, $2...` (no statement there
    has a `?` inside a string)."""
    count = 0

    def number(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


FENCE = "SELECT epoch FROM leader WHERE id = 1 AND epoch = $1 AND node = $2 FOR SHARE"
CLAIM = """
UPDATE leader SET epoch = epoch + 1, node = $1, address = $2, renewed_at = clock_timestamp()
WHERE id = 1 AND (node = '' OR renewed_at + make_interval(secs => $3) < clock_timestamp())
RETURNING epoch
"""
RENEW = """
UPDATE leader SET renewed_at = clock_timestamp()
WHERE id = 1 AND epoch = $1 AND node = $2 RETURNING epoch
"""
RECORD_KEY = "INSERT INTO cluster_key (id, public) VALUES (1, $1) ON CONFLICT (id) DO NOTHING"
RELEASE = "UPDATE leader SET node = '', address = '' WHERE id = 1 AND epoch = $1 AND node = $2"
SELECT_LEADER = """
SELECT epoch, node, address, extract(epoch FROM clock_timestamp() - renewed_at)
FROM leader WHERE id = 1
"""


def read_dsn(dsn: str | None, dsn_file: Path | None) -> str:
    """The connection string: `dsn`, or the first line of `dsn_file` (which may hold a
    password: keep it private to the daemon's user)."""
    if dsn_file is None:
        return dsn or ""
    try:
        text = dsn_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{dsn_file}: cannot read the database address: {exc}") from None
    lines = text.strip().splitlines()
    if not lines:
        raise StoreError(f"{dsn_file}: empty: write the database address in it")
    return lines[0].strip()


async def _connect(dsn: str, idle_timeout: float) -> Any:
    """One connection of the store's (see `PostgresStore.open` for `idle_timeout`)."""
    settings = {"idle_in_transaction_session_timeout": str(max(1, round(idle_timeout * 1000)))}
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, server_settings=settings)


def _where(dsn: str) -> str:
    """The database's name for errors and logs: the address without a password."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)


class PostgresStore(Store):
    """The store in a PostgreSQL database shared by the cluster (see the module)."""

    def __init__(
        self,
        writer: Any,
        reader: Any,
        leadership: Any,
        dsn: str,
        idle_timeout: float,
        lazy_interval: float = LAZY_INTERVAL,
    ) -> None:
        super().__init__(_where(dsn), lazy_interval)
        self._dsn = dsn
        self._idle_timeout = idle_timeout
        self._conn = writer  # asyncpg connections
        self._reader = reader
        self._leadership = leadership
        self._read_lock = asyncio.Lock()  # one query at a time per connection
        self._leader_lock = asyncio.Lock()
        self._epoch: tuple[int, str] | None = None  # (epoch, node) writes are fenced at
        #: Why this store's writes can no longer be trusted to match the engine (the
        #: writing connection broke: a commit may or may not have happened), else None.
        #: A leader steps down on it (cluster.Leadership.hold) and reloads on restart.
        self.lost: str | None = None

    @classmethod
    async def open(
        cls, dsn: str, *, idle_timeout: float = 6.0, lazy_interval: float = LAZY_INTERVAL
    ) -> PostgresStore:
        """Connect (three connections) and apply the migrations, one node at a time.
        `idle_timeout` (the cluster's leader_ttl): the database ends a session of this
        store that stays that long inside a transaction without a word (a node frozen
        mid-write), so the locks it holds never keep a standby from taking over."""
        where = _where(dsn)
        conns: list[Any] = []
        try:
            for _ in range(3):
                conns.append(await _connect(dsn, idle_timeout))
            await _migrate(conns[0])
        except _DB_ERRORS as exc:
            for conn in conns:
                conn.terminate()
            raise StoreError(f"{where}: cannot open the database: {exc}") from None
        except BaseException:
            for conn in conns:
                conn.terminate()
            raise
        return cls(conns[0], conns[1], conns[2], dsn, idle_timeout, lazy_interval)

    async def schema_version(self) -> int:
        rows = await self._read("SELECT max(version) FROM licd_schema")
        return int(rows[0][0] or 0)

    # ------------------------------------------------------------- leadership

    async def cluster_key(self, public: bytes | None = None) -> bytes | None:
        """The public key the cluster's nodes sign with, recorded by the first node:
        `public` is recorded when none is yet (and the one kept returned)."""
        async with self._leader_lock:
            conn = await self._leader_conn()
            if public is not None:
                await self._on(conn.execute(RECORD_KEY, public))
            value = await self._on(conn.fetchval("SELECT public FROM cluster_key WHERE id = 1"))
        return None if value is None else bytes(value)

    def fence(self, epoch: int, node: str) -> None:
        """Write only while the leadership row is at (`epoch`, `node`)."""
        self._epoch = (epoch, node)

    async def leader(self) -> LeaderRow:
        async with self._leader_lock:
            row = await self._on((await self._leader_conn()).fetchrow(SELECT_LEADER))
        return LeaderRow(int(row[0]), row[1], row[2], float(row[3]))

    async def _leader_conn(self) -> Any:
        """The leadership's connection, made again if it broke (the database restarted
        or failed over: a multi-host dsn finds the new primary). Safe: the leadership
        calls are single statements, and the row says who leads."""
        if self._leadership.is_closed():
            self._leadership = await self._on(_connect(self._dsn, self._idle_timeout))
        return self._leadership

    async def claim(self, node: str, address: str, hold_for: float) -> int | None:
        """Take the leadership if nobody holds it or its holder has not renewed for
        `hold_for` seconds (database clock): the new epoch, else None."""
        async with self._leader_lock:
            conn = await self._leader_conn()
            epoch = await self._on(conn.fetchval(CLAIM, node, address, hold_for))
        return None if epoch is None else int(epoch)

    async def renew(self, epoch: int, node: str) -> bool:
        """Renew the leadership at `epoch`; False when another node holds it now."""
        async with self._leader_lock:
            conn = await self._leader_conn()
            return await self._on(conn.fetchval(RENEW, epoch, node)) is not None

    async def release(self, epoch: int, node: str) -> None:
        """Let the leadership go (after the last write): a standby may take over at once."""
        async with self._leader_lock:
            await self._on((await self._leader_conn()).execute(RELEASE, epoch, node))

    async def _on(self, query: Any) -> Any:
        """`query` awaited; what the database or the network did wrong as StoreError."""
        try:
            return await query
        except _DB_ERRORS as exc:
            raise StoreError(f"{self.where}: {str(exc) or type(exc).__name__}") from None

    # ------------------------------------------------------------- transactions

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Reads see committed data only; their connection is made again if it broke."""
        async with self._read_lock:
            if self._reader.is_closed():
                self._reader = await self._on(_connect(self._dsn, self._idle_timeout))
            rows = await self._on(self._reader.fetch(numbered(sql), *params))
        return [tuple(row) for row in rows]

    async def _transaction(self, statements: Statements) -> None:
        """One batch, all or nothing, at this node's epoch: the leadership row is locked
        FOR SHARE first (a takeover waits for this commit), and a node that lost it
        commits nothing (Fenced).

        A connection found broken before the COMMIT is made again and the batch tried
        once more: nothing of it was committed (a database restarted or failed over).
        One that breaks during the COMMIT leaves its outcome unknown: the store is then
        `lost` (the leader steps down and loads the state again on its restart)."""
        if self._epoch is None:
            raise Fenced(f"{self.where}: this node does not lead: nothing is written")
        merged = batched(statements)
        for attempt in (1, 2):
            if self.lost is not None:
                raise Fenced(f"{self.where}: {self.lost}: nothing is written")
            if self._conn.is_closed():
                self._conn = await self._on(_connect(self._dsn, self._idle_timeout))
            conn = self._conn
            transaction = conn.transaction()
            try:
                await transaction.start()
                await self._fenced(conn, merged)
            except BaseException as exc:
                if not conn.is_closed():
                    with contextlib.suppress(*_DB_ERRORS):
                        await transaction.rollback()
                if isinstance(exc, _DB_ERRORS) and conn.is_closed() and attempt == 1:
                    log.warning("event=store_reconnect error=%r", str(exc))
                    continue  # not committed: try again on a new connection
                if isinstance(exc, _DB_ERRORS):
                    raise StoreError(str(exc)) from None
                raise
            try:
                await transaction.commit()
            except _DB_ERRORS as exc:
                if conn.is_closed():
                    self.lost = f"the database connection broke during a write ({exc})"
                    log.error("event=store_connection_lost error=%r", str(exc))
                raise StoreError(str(exc)) from None
            return

    async def _fenced(self, conn: Any, statements: Statements) -> None:
        """In the transaction: the fence, then the statements."""
        assert self._epoch is not None
        epoch, node = self._epoch
        if await conn.fetchval(FENCE, epoch, node) is None:
            raise Fenced(
                f"{self.where}: this node no longer leads (epoch {epoch}): nothing was written"
            )
        for sql, rows in statements:
            await conn.executemany(numbered(sql), rows)

    async def _release(self, committed: bool) -> None:
        """Close the connections; a leader whose writes are all committed first lets
        the leadership go, so a standby takes over at once. A store that was abandoned
        or lost (the database may not answer at all) drops its connections at once."""
        conns = (self._conn, self._reader, self._leadership)
        if not committed or self.lost is not None:
            for conn in conns:
                conn.terminate()
            return
        if self._epoch is not None:
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):  # a commit may hang
                    await self.release(*self._epoch)
            except (StoreError, TimeoutError) as exc:
                log.warning("event=leadership_not_released error=%r", str(exc) or "timed out")
        await asyncio.gather(*(_close(conn) for conn in conns))


async def _close(conn: Any) -> None:
    """Close `conn` politely, or drop it if the database does not answer in time."""
    try:
        await asyncio.wait_for(conn.close(), RELEASE_TIMEOUT)
    except _DB_ERRORS:
        conn.terminate()


async def _migrate(conn: Any) -> None:
    """Apply the migrations this database lacks, holding an advisory lock so that nodes
    starting together migrate once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS licd_schema (version integer NOT NULL)")
        version = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM licd_schema"))
        known = migrations()
        newest = known[-1][0] if known else 0
        if version > newest:
            raise StoreError(f"schema version {version} is newer than this licd knows ({newest})")
        for number, sql in known:
            if number > version:
                await conn.execute(sql)
                await conn.execute("INSERT INTO licd_schema (version) VALUES ($1)", number)
                log.info("event=migrated backend=postgres schema_version=%d", number)


REPLICATION = """
SELECT application_name, sync_state, extract(epoch FROM replay_lag)
FROM pg_stat_replication ORDER BY application_name
"""


async def cluster_view(dsn: str) -> tuple[LeaderRow, list[tuple[str, str, float | None]]]:
    """The leadership row and the database's standbys (name, sync state, replay lag in
    seconds), read on a connection of their own: for `licd cluster status`, which works
    whether or not a daemon runs here. The standbys are empty unless the database user
    may see them (a superuser or `pg_monitor`)."""
    where = _where(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    except _DB_ERRORS as exc:
        raise StoreError(f"{where}: cannot open the database: {exc}") from None
    try:
        try:
            row = await conn.fetchrow(SELECT_LEADER)
        except asyncpg.UndefinedTableError:
            raise StoreError(f"{where}: no licd has used this database yet") from None
        standbys = [
            (r[0], r[1], None if r[2] is None else float(r[2]))
            for r in await conn.fetch(REPLICATION)
        ]
    except _DB_ERRORS as exc:
        raise StoreError(f"{where}: {exc}") from None
    finally:
        await conn.close()
    return LeaderRow(int(row[0]), row[1], row[2], float(row[3])), standbys
