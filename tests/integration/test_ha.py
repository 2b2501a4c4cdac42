"""High availability (docs/ha.md): real `licd serve` nodes sharing one real PostgreSQL
database, killed and paused with real signals. `make test-ha` runs this file alone.

Every node of a test has its own state directory holding the same site key (clients
pin one key), a reserved loopback port, and `[store] backend = "postgres"` on a schema
of its own in the session's throwaway server. What each scenario checks afterwards, as
an auditor would: seats in the database never exceed the licence's, no acknowledged
lease is missing, and a retried request key never holds two leases.

Timing is not asserted (a loaded machine may be slow to fail over): the failover time
is measured and printed; `benchmarks/` is where such numbers are judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from licd.store.keyfile import key_path, load_or_create_key
from licd_client.backoff import is_retryable
from licd_client.client import AsyncClient
from licd_client.errors import ClientError, LicdError
from licd_client.lease import AsyncLease
from tests.faultproxy import FaultProxy
from tests.integration.procs import (
    DaemonProcess,
    Daemons,
    TomlValue,
    child_env,
    render_config,
    run_licd,
    toml_value,
)
from tests.pgcluster import PgServer, postgres_or_skip
from tests.support import RawPeer, holder, reserved_port

TTL, DELAY = 3.0, 1.0  # [store] leader_ttl and lock_delay of every node here
KEY = "HA-0000-0001"
SEATS = 120
LICENCE: dict[str, TomlValue] = {
    "key": KEY,
    "id": "cad",
    "product": "cad",
    "seats": SEATS,
    "lease_ttl": 60,
    "grace": 10,
}
#: A licence whose dead holders' seats come back soon: lease_ttl + grace = 15 s.
SHORT_KEY = "HA-0000-0002"
SHORT: dict[str, TomlValue] = {
    "key": SHORT_KEY,
    "id": "short",
    "product": "cad",
    "seats": 2,
    "lease_ttl": 10,
    "grace": 5,
}
SERVING = r"event=listening addr="
READY = r"event=(standby_listening|listening)"


class Cluster:
    """Nodes of one test: configs written, processes started on demand."""

    def __init__(self, directory: Path, daemons: Daemons, dsn: str, names: str) -> None:
        self.directory = directory
        self.daemons = daemons
        self.dsn = dsn
        self.ports = {name: reserved_port() for name in names}
        seed = directory / "key"
        seed.mkdir(mode=0o700)
        load_or_create_key(key_path(seed))
        self.public = bytes(load_or_create_key(key_path(seed)).verify_key)
        self.configs: dict[str, Path] = {}
        for name in names:
            state = directory / f"node-{name}" / "state"
            state.mkdir(mode=0o700, parents=True)
            shutil.copy2(key_path(seed), key_path(state))
            self.configure(name)
        self.procs: dict[str, DaemonProcess] = {}

    def configure(self, name: str, *, dsn: str = "", advertise: str = "") -> None:
        """Write node `name`'s config: the cluster's dsn unless given another (through
        a fault proxy), advertising its own address unless given another."""
        node = self.directory / f"node-{name}"
        server: dict[str, TomlValue] = {
            "listen": [f"127.0.0.1:{self.ports[name]}"],
            "state_dir": str(node / "state"),
            "site": "plant",
            "log_level": "info",
            "shutdown_timeout": 2,
        }
        store: dict[str, TomlValue] = {
            "backend": "postgres",
            "dsn": dsn or self.dsn,
            "node": name,
            "leader_ttl": TTL,
            "lock_delay": DELAY,
        }
        if advertise:
            store["advertise"] = advertise
        text = render_config(server, [LICENCE, SHORT]) + "\n[store]\n"
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in store.items())
        path = node / "licd.toml"
        path.write_text(text, encoding="utf-8")
        self.configs[name] = path

    def addr(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[name])

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self, name: str, env: dict[str, str] | None = None) -> DaemonProcess:
        proc = self.daemons.process(self.configs[name])
        proc.port = self.ports[name]
        if env is not None:
            proc.env = {**child_env(), **env}
        self.procs[name] = proc
        await asyncio.to_thread(proc.start, 30.0, READY)
        return proc

    async def serving(self, name: str, within: float = 60.0) -> float:
        """Wait until node `name` serves (it leads and listens): when it did."""
        await asyncio.to_thread(self.procs[name].wait_for, SERVING, within)
        return time.monotonic()

    @contextlib.asynccontextmanager
    async def peer(self, name: str) -> AsyncIterator[RawPeer]:
        """A raw protocol connection to node `name`, past hello; closed on exit."""
        peer = await RawPeer.connect(self.addr(name))
        try:
            await peer.hello()
            yield peer
        finally:
            await peer.close()

    async def available(self, name: str, key: str) -> dict[str, Any]:
        async with self.peer(name) as peer:
            reply = await peer.call("available", key=key)
            assert reply["ok"] is True, reply
            return reply

    def client(self, *names: str) -> AsyncClient:
        return AsyncClient([self.addr(n) for n in names], self.public, retry_for=60.0)

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def audit(self) -> None:
        """What must hold whatever happened: the seats the database counts are the
        seats its leases hold, within the licence, and the leader's engine counts the
        same; one lease per request key."""
        guards = {
            row["licence_id"]: (row["in_use"], row["ceiling"])
            for row in await self.rows("SELECT licence_id, in_use, ceiling FROM seat_guard")
        }
        counted = dict(
            await self.rows("SELECT licence_id, count(*) FROM lease GROUP BY licence_id")
        )
        for licence_id, (in_use, ceiling) in guards.items():
            assert in_use == counted.get(licence_id, 0) <= ceiling, licence_id
        assert guards["cad"][1] == SEATS
        dup = await self.rows(
            "SELECT request FROM lease GROUP BY licence_id, hostid, request HAVING count(*) > 1"
        )
        assert dup == []
        (leader,) = await self.rows("SELECT node FROM leader")
        proc = self.procs.get(leader["node"])
        if proc is not None and proc.running():  # the engine of the node serving
            for licence_id, key in (("cad", KEY), ("short", SHORT_KEY)):
                engine = (await self.available(leader["node"], key))["in_use"]
                assert engine == guards[licence_id][0], licence_id


@pytest.fixture
async def cluster(pg_server: PgServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    import asyncpg

    schema = f"ha{os.getpid()}_{tmp_path.name[-20:].replace('-', '_')}".lower()
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    with Daemons(tmp_path) as daemons:
        yield Cluster(tmp_path, daemons, f"{pg_server.dsn}?search_path={schema}", "abc")


@pytest.fixture
async def replicated(
    tmp_path: Path,
) -> AsyncIterator[tuple[Cluster, PgServer, PgServer]]:
    """A cluster on a PostgreSQL primary with a synchronous standby of its own; the
    nodes' dsn names both servers and asks for the one that takes writes."""
    postgres_or_skip()
    with PgServer() as primary:
        standby = await asyncio.to_thread(PgServer.standby_of, primary)
        try:
            await asyncio.to_thread(primary.make_synchronous, "standby1")
            dsn = (
                f"postgresql://licd@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/licd"
                "?target_session_attrs=read-write"
            )
            with Daemons(tmp_path) as daemons:
                yield Cluster(tmp_path, daemons, dsn, "ab"), primary, standby
        finally:
            standby.cleanup()


async def until_renewed(lease: AsyncLease, within: float = 60.0) -> list[str]:
    """Renew `lease`, retrying what is retryable (a node down, a standby), until it
    works: the error codes seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + within
    while True:
        try:
            await lease.renew_once()
            return seen
        except (LicdError, ClientError) as exc:
            seen.append(getattr(exc, "code", type(exc).__name__))
            if not is_retryable(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def stopped(proc: DaemonProcess) -> Iterator[None]:
    """The process paused (SIGSTOP) inside the block, resumed after it."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def test_one_node_leads_and_a_standby_redirects_clients_to_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start("a")
    await cluster.serving("a")
    # b runs as systemd would run it: it says it is ready (a standby), and its loop
    # pings the watchdog while it waits to lead.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30.0)
    try:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
        await cluster.start("b", env=env)
        seen: list[bytes] = []
        while b"WATCHDOG=1" not in seen or not any(m.startswith(b"READY=1") for m in seen):
            seen.append(await asyncio.to_thread(notify.recv, 65536))
        ready = [m for m in seen if m.startswith(b"READY=1")]
        assert ready == [
            b"READY=1\nSTATUS=standby of a cluster, node b at " + cluster.address("b").encode()
        ]
    finally:
        notify.close()
    peer = await RawPeer.connect(cluster.addr("b"))
    try:
        hello = await peer.hello()  # a standby answers hello with the site's key
        assert hello["key"] == cluster.public
        refused = await peer.checkout(KEY)
        assert refused["error"] == "unavailable"
        assert refused["detail"] == {"reason": "standby", "leader": cluster.address("a")}
        assert refused["retry_after"] >= 1.0
    finally:
        await peer.close()
    # `licd cluster status` reads the same from the database, on any node.
    status = await asyncio.to_thread(
        run_licd, "cluster", "status", "--json", "--config", str(cluster.configs["b"])
    )
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert (view["node"], view["role"], view["epoch"]) == ("b", "standby", 1)
    assert view["leader"]["node"] == "a"
    assert view["leader"]["address"] == cluster.address("a")
    text = await asyncio.to_thread(
        run_licd, "cluster", "status", "--config", str(cluster.configs["a"])
    )
    assert f"leader    a at {cluster.address('a')}, epoch 1" in text.stdout
    assert "node      a (leader)" in text.stdout
    stopped = await asyncio.to_thread(
        run_licd, "cluster", "status", "--json", "--config", str(cluster.configs["c"])
    )
    assert json.loads(stopped.stdout)["role"] == "not running"  # node c was never started
    # A client given the standby first follows the redirect and gets its seat there.
    client = cluster.client("b", "a")
    try:
        lease = await client.checkout(KEY)
        assert lease.valid
        await lease.release()
    finally:
        await client.aclose()
    await cluster.audit()


async def test_a_killed_leader_is_replaced_and_holders_keep_their_leases(
    cluster: Cluster,
) -> None:
    """Scenario 1: SIGKILL under load (100 holders): a standby takes over, and every
    holder renews the same lease there (no new checkout, no lease_unknown)."""
    a = await cluster.start("a")
    await cluster.serving("a")
    await cluster.start("b")
    clients = [cluster.client("a", "b") for _ in range(100)]
    try:
        leases = await asyncio.gather(*(c.checkout(KEY) for c in clients))
        handles = {lease.handle for lease in leases}
        killed = time.monotonic()
        a.kill()
        took = await cluster.serving("b") - killed
        print(f"failover: node b served {took:.2f} s after node a was killed")
        seen = await asyncio.gather(*(until_renewed(lease) for lease in leases))
        unknown = sum("lease_unknown" in codes for codes in seen)
        assert unknown == 0, f"{unknown} holders lost their lease"
        assert {lease.handle for lease in leases} == handles
        (row,) = await cluster.rows("SELECT epoch, node FROM leader")
        assert (row["epoch"], row["node"]) == (2, "b")
        await cluster.audit()
        available = await clients[0].available(KEY)
        assert available.in_use == 100
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def test_a_paused_leader_is_fenced_answers_nothing_more_and_steps_down(
    cluster: Cluster,
) -> None:
    """Scenario 2: a leader paused (SIGSTOP) past its deadline is replaced; resumed, it
    answers what was waiting with `unavailable` (no token), commits nothing, and exits
    with status 75 (its service manager restarts it as a standby)."""
    a = await cluster.start("a")
    await cluster.serving("a")
    await cluster.start("b")
    held = await RawPeer.connect(cluster.addr("a"))
    fresh = await RawPeer.connect(cluster.addr("a"))
    try:
        await held.hello()
        await fresh.hello()
        granted = await held.checkout(KEY)
        assert granted["ok"] is True
        with stopped(a):
            await cluster.serving("b")
            # Sent while it sleeps: read by it only once it wakes up.
            await held.send(
                {"op": "heartbeat", "id": 10, "lease": granted["lease"], "nonce": b"n" * 16}
            )
            await fresh.send(
                {
                    "op": "checkout",
                    "id": 11,
                    "key": KEY,
                    "holder": holder("late").to_wire(),
                    "request": "late-request",
                    "nonce": b"m" * 16,
                }
            )
        renewal, checkout = await held.recv(30.0), await fresh.recv(30.0)
        assert renewal is not None and renewal["error"] == "unavailable", renewal
        assert checkout is not None and checkout["error"] == "unavailable", checkout
        code = await asyncio.to_thread(a.proc.wait, 30.0) if a.proc is not None else None
        assert code == 75, a.stderr()
        assert "event=leadership_lost" in a.stderr()
        late = await cluster.rows("SELECT 1 FROM lease WHERE request = 'late-request'")
        assert late == []  # nothing committed by the deposed leader
        await cluster.audit()
    finally:
        await held.close()
        await fresh.close()


async def test_a_retried_checkout_after_a_failover_gets_the_same_lease(cluster: Cluster) -> None:
    """Scenario 7: a checkout committed whose reply never arrived, the leader killed,
    the same request retried at the new leader: the same handle, one seat."""
    a = await cluster.start("a")
    await cluster.serving("a")
    await cluster.start("b")
    first = await RawPeer.connect(cluster.addr("a"))
    await first.hello()
    request = os.urandom(16).hex()
    lost = await first.checkout(KEY, holder("ws-7"), request=request)  # "dropped" reply
    await first.close()
    a.kill()
    await cluster.serving("b")
    async with cluster.peer("b") as again:
        retried = await again.checkout(KEY, holder("ws-7"), request=request)
        assert retried["ok"] is True and retried["handle"] == lost["handle"]
        available = await again.call("available", key=KEY)
        assert available["in_use"] == 1
    await cluster.audit()


async def test_ten_failovers_in_a_row_lose_no_live_lease_and_free_a_dead_holders_seat(
    cluster: Cluster,
) -> None:
    """Scenario 8: the leader killed ten times in a row, each time restarted as a
    standby. A live holder keeps its lease throughout; a holder that died before the
    first failover gets its seat back once, after the last one (each new leader gives
    the leases it loads lease_ttl + grace, however many failovers there were)."""
    await cluster.start("a")
    await cluster.serving("a")
    await cluster.start("b")
    client = cluster.client("a", "b")
    try:
        live = await client.checkout(SHORT_KEY)
        dead = await RawPeer.connect(cluster.addr("a"))
        await dead.hello()
        assert (await dead.checkout(SHORT_KEY, holder("crashed")))["ok"] is True
        await dead.close()  # it never renews: a crashed client
        leader, other = "a", "b"
        for _ in range(10):
            cluster.procs[leader].kill()
            await cluster.serving(other)
            await cluster.start(leader)  # back, as a standby
            leader, other = other, leader
            await until_renewed(live)
        last = time.monotonic()
        in_use = (await cluster.available(leader, SHORT_KEY))["in_use"]
        assert in_use == 2  # the dead holder's seat is still counted...
        deadline = last + 60.0
        while (await cluster.available(leader, SHORT_KEY))["in_use"] != 1:
            assert time.monotonic() < deadline, "the dead holder's seat never came back"
            await asyncio.sleep(0.5)
        print(f"dead holder's seat back {time.monotonic() - last:.1f} s after the last failover")
        await until_renewed(live)  # ...and the live one never lost its lease
        (row,) = await cluster.rows("SELECT epoch FROM leader")
        assert row["epoch"] == 11
    finally:
        await client.aclose()
    await cluster.audit()


async def test_the_databases_failover_loses_no_acknowledged_lease(
    replicated: tuple[Cluster, PgServer, PgServer],
) -> None:
    """Scenario 5: the PostgreSQL primary killed, its synchronous standby promoted. The
    nodes connect again to the promoted database (their dsn names both servers): the
    leader carries on there, every acknowledged lease with it. (Had a COMMIT been cut
    off midway, its outcome unknown, the leader would step down instead, and the other
    node take over on the same database.)"""
    cluster, primary, standby = replicated
    await cluster.start("a")
    await cluster.serving("a")
    await cluster.start("b")
    clients = [cluster.client("a", "b") for _ in range(30)]
    try:
        leases = await asyncio.gather(*(c.checkout(KEY) for c in clients))
        await asyncio.to_thread(primary.kill)
        await asyncio.to_thread(standby.promote)
        seen = await asyncio.gather(*(until_renewed(lease) for lease in leases))
        assert not any("lease_unknown" in codes for codes in seen)
        # Writes go on, on the promoted database: a checkin, and a new checkout.
        await leases[0].release()
        fresh = await clients[0].checkout(KEY)
        assert fresh.valid
        (row,) = await cluster.rows("SELECT node FROM leader")
        print(f"node {row['node']} serves on the promoted database")
        assert (await cluster.available(row["node"], KEY))["in_use"] == 30
        handles = {x["handle"] for x in await cluster.rows("SELECT handle FROM lease")}
        assert handles == {lease.handle for lease in [*leases[1:], fresh]}
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    await cluster.audit()


async def test_without_its_synchronous_standby_the_cluster_fails_closed(
    replicated: tuple[Cluster, PgServer, PgServer],
) -> None:
    """Scenario 6: the synchronous standby down. Nothing commits, so no checkout is
    acknowledged; the leader's renewal cannot commit either, so it stops answering
    and exits. With the standby back, a node serves again, the acknowledged lease kept."""
    cluster, _, standby = replicated
    a = await cluster.start("a")
    await cluster.serving("a")
    async with cluster.peer("a") as peer:
        granted = await peer.checkout(KEY, holder("before"))
        assert granted["ok"] is True
        await asyncio.to_thread(standby.stop, "immediate")
        refused = await peer.checkout(KEY, holder("during"))  # waits, then is refused
        assert refused["ok"] is False and refused["error"] in ("unavailable", "shutting_down")
        code = await asyncio.to_thread(a.proc.wait, 60.0) if a.proc is not None else None
        assert code == 75, a.stderr()
    await asyncio.to_thread(standby.restart)
    await cluster.start("a")
    await cluster.serving("a")
    async with cluster.peer("a") as again:
        renewed = await again.call("heartbeat", lease=granted["lease"], nonce=b"k" * 16)
        assert renewed["ok"] is True and renewed["handle"] == granted["handle"]
    await cluster.audit()


async def test_a_leader_cut_off_from_the_database_stops_answering_and_is_replaced(
    cluster: Cluster, pg_server: PgServer
) -> None:
    """Scenario 3: the leader loses the database but not its clients. It cannot renew,
    so it answers `unavailable` once its deadline passes (it never serves on a
    leadership it cannot prove) and stops; a standby takes over."""
    proxy = FaultProxy(("127.0.0.1", pg_server.port))
    await proxy.start()
    try:
        cluster.configure("a", dsn=cluster.dsn.replace(f":{pg_server.port}/", f":{proxy.port}/"))
        a = await cluster.start("a")
        await cluster.serving("a")
        await cluster.start("b")
        async with cluster.peer("a") as peer:
            granted = await peer.checkout(KEY, holder("ws-3"))
            assert granted["ok"] is True
            cut = time.monotonic()
            proxy.set("blackhole")
            # Renewals are answered from memory until the deadline, then refused (no
            # token) until the node has stopped.
            while True:
                await peer.send(
                    {"op": "heartbeat", "id": 9, "lease": granted["lease"], "nonce": b"h" * 16}
                )
                beat = await peer.recv(30.0)
                if beat is None or (not beat["ok"] and beat["error"] != "rate_limited"):
                    break
                await asyncio.sleep(0.5)
            print(
                f"the cut-off leader stopped renewing {time.monotonic() - cut:.2f} s after the cut"
            )
            assert beat is None or beat["error"] in ("unavailable", "shutting_down"), beat
        code = await asyncio.to_thread(a.proc.wait, 60.0) if a.proc is not None else None
        assert code == 75, a.stderr()
        await cluster.serving("b")
        async with cluster.peer("b") as again:
            beat = await again.call("heartbeat", lease=granted["lease"], nonce=b"i" * 16)
            assert beat["ok"] is True and beat["handle"] == granted["handle"]
    finally:
        await proxy.close()
    await cluster.audit()


async def test_a_leader_cut_off_from_its_clients_keeps_the_leadership(
    cluster: Cluster,
) -> None:
    """Scenario 4: clients cannot reach the leader, the database can. The leadership
    does not move; once the link heals, a client that knows only the standby reaches
    the leader through its redirect, with the same lease."""
    front = FaultProxy(cluster.addr("a"))
    await front.start()
    try:
        cluster.configure("a", advertise=front.address)  # clients reach a through front
        await cluster.start("a")
        await cluster.serving("a")
        await cluster.start("b")
        client = AsyncClient([cluster.addr("b")], cluster.public, retry_for=60.0, io_timeout=2.0)
        try:
            lease = await client.checkout(KEY)  # redirected from b to a, through front
            front.set("blackhole")
            cut = time.monotonic()
            with pytest.raises((LicdError, ClientError)) as failed:
                await asyncio.wait_for(lease.renew_once(), 3 * (TTL + DELAY))
            assert is_retryable(failed.value)
            # Meanwhile the leader goes on renewing: for longer than a standby would
            # wait to take over, the row stays a's, freshly renewed.
            while time.monotonic() < cut + 2 * (TTL + DELAY):
                (row,) = await cluster.rows(
                    "SELECT epoch, node, extract(epoch FROM clock_timestamp() - renewed_at)"
                    " AS age FROM leader"
                )
                assert (row["epoch"], row["node"]) == (1, "a")
                assert row["age"] < TTL + DELAY
                await asyncio.sleep(0.5)
            front.set("pass")
            assert "lease_unknown" not in await until_renewed(lease)
            (row,) = await cluster.rows("SELECT epoch, node FROM leader")
            assert (row["epoch"], row["node"]) == (1, "a")
        finally:
            await client.aclose()
    finally:
        await front.close()
    await cluster.audit()


async def test_every_node_signs_with_the_clusters_key(cluster: Cluster) -> None:
    """Clients pin one key: the first node's becomes the cluster's; a node with another
    key is refused at start, and one without a key is told to copy it (it does not make
    one of its own)."""
    await cluster.start("a")
    await cluster.serving("a")
    key = key_path(cluster.directory / "node-c" / "state")
    key.unlink()
    load_or_create_key(key)  # a key of its own
    other = await asyncio.to_thread(run_licd, "serve", "--config", str(cluster.configs["c"]))
    assert other.returncode == 1
    assert "is not the cluster's key" in other.stderr and "Traceback" not in other.stderr
    key.unlink()
    missing = await asyncio.to_thread(run_licd, "serve", "--config", str(cluster.configs["c"]))
    assert missing.returncode == 1
    assert "daemon.key is missing" in missing.stderr and "copy daemon.key" in missing.stderr
    assert not key.exists()
