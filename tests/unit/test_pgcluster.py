"""tests/pgcluster.py: the throwaway PostgreSQL server the store and HA tests run on.

Skipped (with what to install) without the server binaries or asyncpg.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from tempfile import mkdtemp as tempfile_mkdtemp
from typing import Any

import pytest

from tests.pgcluster import PgServer, postgres_or_skip


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer(postgres_or_skip())
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


async def connect(dsn: str) -> Any:
    import asyncpg  # an optional extra: only once postgres_or_skip() found it

    return await asyncpg.connect(dsn, timeout=30)


async def test_answers_over_asyncpg(pg: PgServer) -> None:
    conn = await connect(pg.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "licd"
        assert await conn.fetchval("SELECT current_user") == "licd"
    finally:
        await conn.close()
    assert pg.psql("SELECT 1") == "1"


def _listeners(port: int) -> list[str]:
    """The addresses with a TCP socket listening on `port` (Linux, /proc/net)."""
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            host, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                # the address in host byte order, 32 bits at a time (little-endian here)
                raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, 2 * width, 8))
                found.append(str(ipaddress.ip_address(raw)))
    return found


def test_listens_only_on_loopback(pg: PgServer) -> None:
    assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.psql("SHOW unix_socket_directories") == ""
    assert pg.psql("SELECT inet_server_addr()") == "127.0.0.1"
    if Path("/proc/net/tcp").exists():
        assert _listeners(pg.port) == ["127.0.0.1"]
    assert not list(pg.datadir.glob(".s.PGSQL.*"))


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(10)
        return sock.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


async def test_kill_then_restart_keeps_committed_data(pg: PgServer) -> None:
    conn = await connect(pg.dsn)
    try:
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        await conn.execute("INSERT INTO kept VALUES (1, 'before the crash')")
    finally:
        await conn.close()
    port = pg.port

    pg.kill()
    assert not pg.running
    assert _refused(port)
    # the port stays held for the server meanwhile
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))

    pg.restart()
    assert pg.running and pg.port == port
    assert "automatic recovery in progress" in pg.logfile.read_text()  # a real crash
    conn = await connect(pg.dsn)
    try:
        assert await conn.fetchval("SELECT note FROM kept WHERE id = 1") == "before the crash"
    finally:
        await conn.close()


def test_failed_start_raises_with_the_log_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []

    def mkdtemp(prefix: str) -> str:
        made.append(tempfile_mkdtemp(prefix=prefix))
        return made[-1]

    monkeypatch.setattr("tests.pgcluster.tempfile.mkdtemp", mkdtemp)
    server = PgServer(postgres_or_skip(), settings={"shared_buffers": "'lots'"})
    with pytest.raises(RuntimeError, match="shared_buffers") as failure:
        server.start()
    assert "server log" in str(failure.value)  # the log's tail, naming the bad setting
    assert not server.running
    assert len(made) == 1 and not Path(made[0]).exists()


async def test_synchronous_standby_then_promotion() -> None:
    with PgServer(postgres_or_skip()) as primary:
        standby = PgServer.standby_of(primary)
        try:
            assert standby.port != primary.port
            assert standby.psql("SELECT pg_is_in_recovery()") == "t"
            primary.make_synchronous("standby1")
            assert primary.psql("SELECT application_name, sync_state FROM pg_stat_replication") == (
                "standby1|sync"
            )

            conn = await connect(primary.dsn)
            try:
                await conn.execute("CREATE TABLE replicated (id int)")
                # committed = applied on the standby: visible there as soon as this returns
                await conn.execute("SET synchronous_commit = remote_apply")
                async with asyncio.timeout(30):
                    await conn.execute("INSERT INTO replicated VALUES (7)")
            finally:
                await conn.close()
            assert standby.psql("SELECT id FROM replicated") == "7"
            with pytest.raises(RuntimeError, match="read-only transaction"):
                standby.psql("INSERT INTO replicated VALUES (8)")

            standby.promote()
            assert standby.psql("SELECT pg_is_in_recovery()") == "f"
            conn = await connect(standby.dsn)
            try:
                await conn.execute("INSERT INTO replicated VALUES (8)")  # no standby to wait for
                assert await conn.fetchval("SELECT sum(id) FROM replicated") == 15
            finally:
                await conn.close()
        finally:
            standby.cleanup()
        assert not standby.running
