"""The store's typed API on both backends, SQLite and a real PostgreSQL server: every
record kind round-trips, a failed write fails only its caller, and (PostgreSQL) the
leadership row, the fencing of writes and the seat guard in the schema.

PostgreSQL tests start one throwaway server for the session (tests/pgcluster.py) and
give each test a schema of its own; they skip, naming what to install, without it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from licd.core.events import Event, Kind
from licd.engine import SeatLease
from licd.engine.counters import CounterState
from licd.store.base import Store, StoreError
from licd.store.records import Block, Forwarded, StoredEntitlement, lease_row
from licd.store.sqlite import DB_FILE, SqliteStore
from tests.pgcluster import PgServer
from tests.support import DICOM, holder, stored_lease, writing

if TYPE_CHECKING:  # imported by the tests that need it: asyncpg is an optional extra
    from licd.store.postgres import PostgresStore

NOW = 1_790_000_000.0
NODE = "node-a"

Opener = Callable[[], Awaitable[Store]]


def lease(n: int, **kw: object) -> SeatLease:
    return stored_lease(n, at=NOW, **kw)


_schemas = itertools.count(1)


async def pg_schema(server: PgServer) -> str:
    """A fresh schema of the session's server: the dsn that uses it."""
    import asyncpg

    name = f"t{next(_schemas)}"
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return f"{server.dsn}?search_path={name}"


async def open_postgres(dsn: str, node: str = NODE, idle_timeout: float = 6.0) -> PostgresStore:
    """A PostgresStore leading (so its writes are fenced at its epoch)."""
    from licd.store.postgres import PostgresStore

    store = await PostgresStore.open(dsn, idle_timeout=idle_timeout)
    epoch = await store.claim(node, "127.0.0.1:27500", 60.0)
    assert epoch is not None, "the previous store of this test did not let go"
    store.fence(epoch, node)
    return store


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the test's database (again, after a close): the same one each time."""
    if request.param == "sqlite":
        return lambda: SqliteStore.open(tmp_path / DB_FILE)
    dsn = await pg_schema(request.getfixturevalue("pg_server"))
    return lambda: open_postgres(dsn)


@contextlib.asynccontextmanager
async def running(opener: Opener) -> AsyncIterator[Store]:
    async with writing(await opener()) as s:
        yield s


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[Store]:
    async with running(opener) as s:
        yield s


# ------------------------------------------------------------------ both backends


async def test_the_schema_is_the_newest(store: Store) -> None:
    from licd.store import postgres, sqlite

    mod = postgres if type(store).__name__ == "PostgresStore" else sqlite
    assert await store.schema_version() == mod.migrations()[-1][0]


async def test_a_lease_round_trips_with_every_field_and_its_renewal(opener: Opener) -> None:
    original = lease(
        1,
        delegate=b"k" * 32,
        holder=holder("ws-1", user="bob", pid=42),
        ip="10.0.0.7",
        overdraft=True,
        device=True,
    )
    async with running(opener) as s:
        await s.insert_lease(original)
        await s.insert_lease(lease(2))
        await s.delete_leases([lease(2)])
        original.expires, original.last_heartbeat = NOW + 500, NOW + 410
        s.touch_lease(original)  # lazy: written at close at the latest
    async with running(opener) as s:
        (loaded,) = await s.load_leases()
    assert lease_row(loaded) == lease_row(original)  # every persisted field


async def test_licences_and_entitlements(store: Store) -> None:
    event = Event(Kind.LICENCE_ADDED, NOW, licence=DICOM.id)
    await store.put_licence(DICOM, event)
    other = dataclasses.replace(DICOM, id="cad", key="CAD-1", seats=7, overdraft=2)
    await store.put_licence(other, event)
    await store.put_licence(dataclasses.replace(other, seats=8), event)
    assert [x.seats for x in await store.load_licences()] == [8, DICOM.seats]
    stored = StoredEntitlement("cad", 3, b"statement", NOW)
    await store.put_entitlements([(stored, other)], [event])
    # A lower sequence never replaces a higher one.
    await store.put_entitlements([(dataclasses.replace(stored, sequence=2), other)], [])
    await store.delete_licence("cad", event)
    assert [x.id for x in await store.load_licences()] == [DICOM.id]
    assert await store.load_entitlements() == [dataclasses.replace(stored, removed=True)]


async def test_the_audit_log_reads_by_id_time_and_limit_and_retires_old_entries(
    store: Store,
) -> None:
    for i in range(5):
        await store.append(Event(Kind.RELOAD, NOW + i, reason=f"r{i}", detail={"n": i}))
    entries = await store.audit()
    assert [e.event.reason for e in entries] == [f"r{i}" for i in range(5)]
    assert entries[0].event.detail == {"n": 0}
    assert [e.event.reason for e in await store.audit(after=entries[1].id, limit=2)] == [
        "r2",
        "r3",
    ]
    assert [e.event.reason for e in await store.audit(since=NOW + 3)] == ["r3", "r4"]
    await store.retire_audit(upto=entries[-1].id, cutoff=NOW + 2)
    assert [e.event.reason for e in await store.audit()] == ["r2", "r3", "r4"]


async def test_router_state_counters_and_the_wall_mark(store: Store) -> None:
    block = Block("cad", "s", "h", "r", 5, NOW + 60, b"tok", [b"a", b"b"], NOW)
    await store.put_block(block)
    await store.put_block(dataclasses.replace(block, seats=6, revoked=True))
    assert await store.load_blocks() == [dataclasses.replace(block, seats=6, revoked=True)]
    await store.delete_block("cad")
    assert await store.load_blocks() == []
    item = Forwarded("s1", "h1", "cad", holder("ws"), "10.0.0.1", 1, NOW, NOW + 90)
    await store.put_forwarded(item)
    await store.put_forwarded(dataclasses.replace(item, expires=NOW + 200))
    assert await store.load_forwarded() == [dataclasses.replace(item, expires=NOW + 200)]
    await store.delete_forwarded(["s1"])
    assert await store.load_forwarded() == []
    await store.put_counter(CounterState("cad", "runs", 3, NOW))
    await store.put_counter(CounterState("cad", "runs", 4, NOW))
    assert await store.load_counters() == [CounterState("cad", "runs", 4, NOW)]
    assert await store.load_wall_mark() is None
    await store.put_wall_mark(NOW + 10)
    await store.put_wall_mark(NOW)  # lower: kept as it was
    assert await store.load_wall_mark() == NOW + 10


async def test_one_failing_write_fails_only_its_caller_and_a_denial_stays_first(
    store: Store,
) -> None:
    await store.insert_lease(lease(1))
    store.append_later(Event(Kind.DENIED, NOW, reason="seats_exhausted"))
    results = await asyncio.gather(
        store.insert_lease(lease(2), Event(Kind.CHECKOUT, NOW + 1, handle="h2")),
        store.insert_lease(lease(1)),  # duplicate secret: a constraint violation
        store.insert_lease(lease(3)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError)
    assert sorted(x.secret for x in await store.load_leases()) == [
        "secret-1",
        "secret-2",
        "secret-3",
    ]
    assert [e.event.kind for e in await store.audit()] == [Kind.DENIED, Kind.CHECKOUT]


# --------------------------------------------------------------- PostgreSQL only


@pytest.fixture
async def dsn(pg_server: PgServer) -> str:
    return await pg_schema(pg_server)


async def test_nothing_is_written_before_the_store_is_fenced_at_an_epoch(dsn: str) -> None:
    from licd.store.postgres import Fenced, PostgresStore

    store = await PostgresStore.open(dsn)
    writer = asyncio.create_task(store.run())
    try:
        row = await store.leader()  # nobody has ever led
        assert (row.epoch, row.node, row.address) == (0, "", "")
        with pytest.raises(Fenced):
            await store.insert_lease(lease(1))
        assert await store.load_leases() == []
    finally:
        await store.close()
        await writer


async def test_a_deposed_leader_commits_nothing_and_cannot_renew(dsn: str) -> None:
    from licd.store.postgres import Fenced, PostgresStore

    a = await open_postgres(dsn, "node-a")
    b = await PostgresStore.open(dsn)
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        await a.insert_lease(lease(1))
        row = await b.leader()
        assert (row.node, row.address) == ("node-a", "127.0.0.1:27500")
        # Recently renewed: not taken over...
        assert await b.claim("node-b", "127.0.0.1:27501", 60.0) is None
        assert await a.renew(row.epoch, "node-a")
        # ...until it has not been renewed for as long as the claim waits.
        epoch = await b.claim("node-b", "127.0.0.1:27501", 0.0)
        assert epoch == row.epoch + 1
        b.fence(epoch, "node-b")
        with pytest.raises(Fenced):
            await a.insert_lease(lease(2))
        assert not await a.renew(row.epoch, "node-a")
        await b.insert_lease(lease(3))
        assert sorted(x.secret for x in await b.load_leases()) == ["secret-1", "secret-3"]
    finally:
        for s in (a, b):
            await s.close()
        await asyncio.gather(*tasks)
    # b closed cleanly: it let the leadership go, so a newcomer takes it at once.
    c = await open_postgres(dsn, "node-c")
    try:
        assert (await c.leader()).node == "node-c"
    finally:
        await c.close()


async def test_the_seat_guard_refuses_more_seats_than_the_licence_can_grant(dsn: str) -> None:
    licence = dataclasses.replace(DICOM, seats=2, overdraft=1)
    async with running(lambda: open_postgres(dsn)) as store:
        await store.put_licence(licence, Event(Kind.LICENCE_ADDED, NOW))
        # One unit holds as many seats as its largest lease: 2 leases, 1 seat.
        await store.insert_lease(lease(1, unit="alice"))
        await store.insert_lease(lease(2, unit="alice"))
        await store.insert_lease(lease(3))
        await store.insert_lease(lease(4))  # the overdraft seat
        with pytest.raises(StoreError, match="seats_within_licence"):
            await store.insert_lease(lease(5))
        await store.delete_leases([lease(3)])
        await store.insert_lease(lease(5))  # a seat came back
        # One live lease per (licence, machine, request key), whatever the secret.
        twin = lease(6, holder=holder("host-5"), request="r5", unit="alice")
        with pytest.raises(StoreError, match="lease_request"):
            await store.insert_lease(twin)
        assert len(await store.load_leases()) == 4


async def test_a_hand_over_deletes_then_inserts_in_one_transaction_within_the_guard(
    dsn: str,
) -> None:
    """The queue's hand-over (docs/policies.md, "Queueing"): on a full licence, the
    released lease's deletion and the waiter's insertion commit together; the guard,
    which checks row by row, sees the deletion first."""
    licence = dataclasses.replace(DICOM, seats=1)
    async with running(lambda: open_postgres(dsn)) as store:
        await store.put_licence(licence, Event(Kind.LICENCE_ADDED, NOW))
        await store.insert_lease(lease(1))
        with pytest.raises(StoreError, match="seats_within_licence"):
            await store.insert_lease(lease(2))
        checkout = Event(Kind.CHECKOUT, NOW, licence=licence.id, handle="h2")
        await store.delete_leases(
            [lease(1)], [Event(Kind.CHECKIN, NOW, licence=licence.id)], [(lease(2), checkout)]
        )
        assert [x.secret for x in await store.load_leases()] == ["secret-2"]
        # All or nothing: a hand-over whose insertion fails deletes nothing either.
        with pytest.raises(StoreError):
            await store.delete_leases([lease(2)], [], [(lease(3, seats=2), checkout)])
        assert [x.secret for x in await store.load_leases()] == ["secret-2"]
        kinds = [e.event.kind for e in await store.audit()]
        assert kinds[-2:] == [Kind.CHECKIN, Kind.CHECKOUT]


async def test_after_the_database_drops_its_connections_the_store_connects_again(
    dsn: str, pg_server: PgServer
) -> None:
    """A database restart (or failover) ends every connection: reads, the leadership
    calls and writes all connect again (a write found its connection gone before its
    COMMIT: nothing of it was committed, so it is simply tried again)."""
    async with writing(await open_postgres(dsn)) as store:
        await store.insert_lease(lease(1))
        pg_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        for attempt in range(2):  # the first call may find out about it the hard way
            try:
                assert (await store.leader()).node == NODE
                assert [x.secret for x in await store.load_leases()] == ["secret-1"]
                break
            except StoreError:
                assert attempt == 0
        await store.insert_lease(lease(2))
        assert store.lost is None
        assert sorted(x.secret for x in await store.load_leases()) == ["secret-1", "secret-2"]


async def test_a_connection_lost_during_its_commit_stops_the_stores_writes(
    dsn: str, pg_server: PgServer
) -> None:
    """Only a COMMIT cut off midway leaves its outcome unknown: the store says so
    (`lost`, for the leader to step down and load the state again) and writes nothing
    more."""
    schema = dsn.rpartition("search_path=")[2]
    async with writing(await open_postgres(dsn)) as store:
        # A deferred trigger makes this table's COMMITs slow, so one can be cut off.
        pg_server.psql(
            f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$; "
            f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {schema}.counter "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.slow()"
        )
        write = asyncio.ensure_future(store.put_counter(CounterState("cad", "runs", 1, NOW)))
        deadline = asyncio.get_running_loop().time() + 30
        while (
            pg_server.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE state = 'active' AND query ILIKE 'COMMIT%'"
            )
            != "t"
        ):
            assert asyncio.get_running_loop().time() < deadline, "no COMMIT seen"
            await asyncio.sleep(0.05)
        with pytest.raises(StoreError):
            await write
        assert store.lost is not None and "broke during a write" in store.lost
        with pytest.raises(StoreError, match="broke during a write"):
            await store.insert_lease(lease(3))  # and nothing more is tried
        assert await store.load_leases() == []


class _Dropped:
    """A connection the database has closed, though the store has not noticed yet:
    it finds out when it begins a transaction."""

    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def transaction(self) -> _Dropped:
        return self

    async def start(self) -> None:
        import asyncpg

        self.closed = True
        raise asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )

    def terminate(self) -> None:
        pass


async def test_a_write_that_finds_its_connection_gone_before_commit_is_tried_again(
    dsn: str,
) -> None:
    async with writing(await open_postgres(dsn)) as store:
        await store._conn.close()  # the writer's connection, as the database left it
        store._conn = _Dropped()
        await store.insert_lease(lease(1))
        assert store.lost is None
        assert [x.secret for x in await store.load_leases()] == ["secret-1"]


async def test_a_leader_frozen_inside_a_write_does_not_keep_a_standby_from_taking_over(
    dsn: str,
) -> None:
    """A node that stops mid-transaction holds the leadership row FOR SHARE: the
    database ends its session after `idle_timeout` (leader_ttl), and the takeover,
    waiting for that lock, goes through."""
    from licd.store.postgres import FENCE, PostgresStore

    frozen = await open_postgres(dsn, "node-a", idle_timeout=1.0)
    standby = await PostgresStore.open(dsn)
    try:
        conn = frozen._conn  # the writer's connection, as a write left it when frozen
        await conn.execute("BEGIN")
        assert await conn.fetchval(FENCE, 1, "node-a") == 1
        async with asyncio.timeout(30):  # bounded: without the session timeout, forever
            epoch = await standby.claim("node-b", "127.0.0.1:27501", 0.0)
        assert epoch == 2
    finally:
        await frozen.close()
        await standby.close()


async def test_the_seat_guard_counts_units_as_the_engine_does(
    dsn: str, pg_server: PgServer
) -> None:
    """A unit holds as many seats as its largest lease: after any mix of leases coming
    and going (several seats, shared units), the guard's count is a full recount's."""
    rng = random.Random(17)
    schema = dsn.rpartition("search_path=")[2]
    recount = (
        f"SELECT coalesce(sum(m), 0) FROM (SELECT max(seats) AS m FROM {schema}.lease "
        f"WHERE licence_id = 'dicom-hq' GROUP BY unit) u"
    )
    counted = f"SELECT in_use FROM {schema}.seat_guard WHERE licence_id = 'dicom-hq'"
    licence = dataclasses.replace(DICOM, seats=1000)
    async with running(lambda: open_postgres(dsn)) as store:
        await store.put_licence(licence, Event(Kind.LICENCE_ADDED, NOW))
        held: list[SeatLease] = []
        for n in range(120):
            if held and rng.random() < 0.4:
                await store.delete_leases([held.pop(rng.randrange(len(held)))])
            else:
                new = lease(n, seats=rng.randint(1, 4), unit=f"unit-{rng.randint(1, 6)}")
                await store.insert_lease(new)
                held.append(new)
            if n % 10 == 0:
                assert pg_server.psql(counted) == pg_server.psql(recount), n
        assert pg_server.psql(counted) == pg_server.psql(recount)
