"""The PostgreSQL store for `--backend postgres`: a primary with a synchronous standby.

`PgCluster` starts a throwaway primary and a streaming standby with tests/pgcluster.py's
`PgServer` (importable wherever `benchmarks` is: both packages sit at the repository's
root), makes the standby synchronous, and checks that a commit is durable on both
before it is acknowledged (fsync on both servers, `synchronous_commit = on`, the standby
`sync` in pg_stat_replication); it refuses to run otherwise. Each daemon gets a fresh
database (`database()`) and a `[store]` table naming it (`store_table()`), so each
scenario starts on an empty store as it does on SQLite.

Over a measurement window, `window()` samples what the servers cost: the CPU of every
process of the primary and of the standby (/proc, like the daemon's), and, where perf
works, their fsync + fdatasync calls (`SyncCounter`): the primary's are its WAL flushes,
about one per commit. `pg_floor` is the database's floor for the churn: commits/s of one
connection, one at a time, of a one-row INSERT alone and of the store's transaction
shape (BEGIN, the fencing SELECT ... FOR SHARE, one INSERT, COMMIT), on the same
servers. Every wait has a deadline (PgServer's own, and the floor's bounded loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .daemon import cpu_seconds, sleep_until
from .profile import SyncCounter

if TYPE_CHECKING:
    from tests.pgcluster import PgServer

STANDBY = "standby1"
NODE = "bench"
FLOOR_COMMITS = 200_000  # the floor's loops stop at this many commits, or after `seconds`
CONNECT_TIMEOUT = 30.0
FLOOR_GRACE = 60.0  # seconds the floor may take beyond its two loops before it gives up


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a postmaster's: backends, WAL writer,
    WAL sender or receiver, checkpointer...)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _cpu(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = cpu_seconds(pid)
    return out


class PgCluster:
    """A primary and its synchronous standby, started by `start()`, removed by
    `cleanup()`; one fresh database per daemon."""

    def __init__(self) -> None:
        self.primary: PgServer | None = None
        self.standby: PgServer | None = None
        self.settings: dict[str, str] = {}
        self._databases = 0

    def start(self) -> dict[str, str]:
        """Start both servers and check that commits are synchronous and durable on
        both; the settings that say so (for the report)."""
        from tests.pgcluster import PgServer

        try:
            self.primary = primary = PgServer()
            primary.start()
            self.standby = standby = PgServer.standby_of(primary, STANDBY)
            primary.make_synchronous(STANDBY)
            settings = {
                "server_version": primary.psql("SHOW server_version"),
                "fsync": primary.psql("SHOW fsync"),
                "synchronous_commit": primary.psql("SHOW synchronous_commit"),
                "synchronous_standby_names": primary.psql("SHOW synchronous_standby_names"),
                "wal_sync_method": primary.psql("SHOW wal_sync_method"),
                "shared_buffers": primary.psql("SHOW shared_buffers"),
                "standby_state": primary.psql(
                    "SELECT sync_state FROM pg_stat_replication"
                    f" WHERE application_name = '{STANDBY}'"
                ),
                "standby_fsync": standby.psql("SHOW fsync", database="postgres"),
                "standby_in_recovery": standby.psql(
                    "SELECT pg_is_in_recovery()", database="postgres"
                ),
            }
        except BaseException:
            self.cleanup()
            raise
        wanted = {
            "fsync": "on",
            "synchronous_commit": "on",
            "synchronous_standby_names": STANDBY,
            "standby_state": "sync",
            "standby_fsync": "on",
            "standby_in_recovery": "t",
        }
        wrong = {k: settings[k] for k, v in wanted.items() if settings[k] != v}
        if wrong:
            self.cleanup()
            raise RuntimeError(f"PostgreSQL commits would not be durable on both servers: {wrong}")
        self.settings = settings
        return settings

    def describe(self) -> str:
        s = self.settings
        return (
            f"store: PostgreSQL {s.get('server_version', '?')}, a primary and a synchronous "
            f"streaming standby on this machine (fsync on both, synchronous_commit = "
            f"{s.get('synchronous_commit', '?')}, wal_sync_method = {s.get('wal_sync_method')})"
        )

    def _primary(self) -> PgServer:
        if self.primary is None:
            raise RuntimeError("the PostgreSQL cluster is not started")
        return self.primary

    def database(self, name: str) -> str:
        """A new, empty database (replicated to the standby, as every write is); its dsn."""
        primary = self._primary()
        self._databases += 1
        db = f"bench_{self._databases:02d}_{''.join(c for c in name if c.isalnum())}"
        primary.psql(f"CREATE DATABASE {db}", database="postgres")
        return f"postgresql://licd@127.0.0.1:{primary.port}/{db}"

    def store_table(self, name: str) -> dict[str, str]:
        """The `[store]` table of a daemon on a fresh database of its own."""
        return {"backend": "postgres", "dsn": self.database(name), "node": NODE}

    def processes(self) -> tuple[list[int], list[int]]:
        """Every process of the primary and of the standby (postmaster and children)."""
        out: list[list[int]] = []
        for server in (self.primary, self.standby):
            pids: list[int] = []
            if server is not None:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    first = (server.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
                    pids = [int(first), *_children(int(first))]
            out.append(pids)
        return out[0], out[1]

    def window(self) -> Callable[[float], dict[str, Any]]:
        """For `drive(during=...)`: called as the measurement window opens, samples the
        servers' CPU (and fsyncs, where perf works) until the window's `end`."""

        def during(end: float) -> dict[str, Any]:
            primary, standby = self.processes()
            t0 = time.monotonic()
            counters = [SyncCounter(pids, max(0.1, end - t0)) for pids in (primary, standby)]
            for counter in counters:
                counter.start()
            cpu0 = [_cpu(primary), _cpu(standby)]
            sleep_until(end)
            cpu1 = [_cpu(primary), _cpu(standby)]
            elapsed = max(time.monotonic() - t0, 1e-9)
            percent = [
                100.0 * sum(v - before.get(pid, 0.0) for pid, v in after.items()) / elapsed
                for before, after in zip(cpu0, cpu1, strict=True)
            ]
            syncs = [counter.finish() for counter in counters]
            return {
                "db": {
                    "primary_cpu_percent": percent[0],
                    "standby_cpu_percent": percent[1],
                    "primary_syncs_per_s": None if syncs[0] is None else syncs[0] / elapsed,
                    "standby_syncs_per_s": None if syncs[1] is None else syncs[1] / elapsed,
                    "primary_processes": len(primary),
                    "standby_processes": len(standby),
                }
            }

        return during

    def floor(self, seconds: float) -> dict[str, float]:
        """The database's floor on a database of its own (see `pg_floor`)."""
        return asyncio.run(pg_floor(self.database("floor"), seconds))

    def cleanup(self) -> None:
        for server in (self.standby, self.primary):
            if server is not None:
                server.cleanup()
        self.primary = self.standby = None


FENCE = "SELECT epoch FROM leader WHERE id = 1 AND epoch = $1 AND node = $2 FOR SHARE"
INSERT = "INSERT INTO t (secret, licence, host, expires, data) VALUES ($1, $2, $3, $4, $5)"


async def pg_floor(dsn: str, seconds: float) -> dict[str, float]:
    """One connection's commits/s, one after another, with every commit waiting for
    the primary's flush and the synchronous standby's: a one-row INSERT alone (one
    round trip), and the store's transaction shape around one row (BEGIN, the fencing
    SELECT ... FOR SHARE, an executemany INSERT, COMMIT: four round trips)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        async with asyncio.timeout(2 * seconds + FLOOR_GRACE):
            return await _floor_loops(conn, seconds)
    finally:
        conn.terminate()


async def _floor_loops(conn: Any, seconds: float) -> dict[str, float]:
    """The floor's two loops on `conn`, each bounded by `seconds` and FLOOR_COMMITS."""
    await conn.execute(
        "CREATE TABLE t (secret text PRIMARY KEY, licence text, host text,"
        " expires double precision, data bytea)"
    )
    await conn.execute(
        "CREATE TABLE leader (id integer PRIMARY KEY, epoch bigint, node text);"
        "INSERT INTO leader VALUES (1, 1, 'bench')"
    )
    data = os.urandom(120)

    def row(i: int) -> tuple[Any, ...]:
        return (f"s{i}-{os.urandom(8).hex()}", "bench", "host", 1.9e9, data)

    async def single(i: int) -> None:
        await conn.execute(INSERT, *row(i))

    async def fenced(i: int) -> None:
        async with conn.transaction():
            if await conn.fetchval(FENCE, 1, NODE) is None:
                raise RuntimeError("the floor's fence row is missing")
            await conn.executemany(INSERT, [row(i)])

    out: dict[str, float] = {}
    for label, one in (("single", single), ("fenced", fenced)):
        times: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        i = 0
        while i < FLOOR_COMMITS:
            t0 = time.perf_counter()
            await one(i)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            i += 1
            if t1 >= deadline:
                break
        elapsed = time.perf_counter() - start
        out[f"{label}_commits_per_s"] = i / elapsed
        out[f"{label}_commit_ms"] = statistics.median(times) * 1000.0
    return out
