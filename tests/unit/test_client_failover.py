"""The client library among several servers (licd_client/client.py, `AsyncClient.request`):
a standby's `unavailable` naming the leader (`detail.leader`) sends the request there at
once; one naming none moves the client along its server list; a lease keeps its secret
wherever its heartbeats go. Fake daemons on real sockets (tests/fakelicd.py): the leader
serves, the standby answers hello and refuses everything else."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from licd_client import errors, messages
from licd_client.backoff import Backoff
from licd_client.client import AsyncClient, leader_of
from tests.fakelicd import LICENCE, FakeLicd

OPS = ("checkout", "heartbeat", "checkin", "available", "consume")


def standby_of(fake: FakeLicd, leader: str | None) -> None:
    """Make `fake` a standby: hello answered, every other op `unavailable`."""
    detail = None if leader is None else {"leader": leader}
    for op in OPS:
        fake.fail[op] = errors.Unavailable("a standby", detail=detail)


@pytest.fixture
async def leader() -> AsyncIterator[FakeLicd]:
    async with FakeLicd() as server:
        yield server


@pytest.fixture
async def standby(leader: FakeLicd) -> AsyncIterator[FakeLicd]:
    async with FakeLicd() as server:
        standby_of(server, leader.address)
        yield server


def client_of(*servers: FakeLicd, trust: FakeLicd) -> AsyncClient:
    """A client of `servers`, in that order, trusting `trust`'s key; a retry waits a
    millisecond (the wait is not what these tests are about)."""
    return AsyncClient(
        [s.address for s in servers],
        trust.key_hex,
        rng=random.Random(1),
        retry_for=30.0,
        backoff=Backoff(base=0.001, cap=0.001),
    )


def ops(fake: FakeLicd) -> list[str]:
    return fake.ops()


async def test_a_standby_sends_the_request_to_the_leader_it_names(
    leader: FakeLicd, standby: FakeLicd
) -> None:
    client = client_of(standby, trust=leader)
    lease = await client.checkout(LICENCE.key)
    assert ops(standby) == ["hello", "checkout"]
    assert ops(leader) == ["hello", "checkout"]
    assert lease.lease_id in leader.leases
    await lease.renew_once()  # the client stays with the leader
    assert ops(standby) == ["hello", "checkout"]
    await client.aclose()


async def test_a_lease_keeps_its_secret_when_the_leader_comes_back(
    leader: FakeLicd, standby: FakeLicd
) -> None:
    """The leader drops its connections (a restart, a failover back): the next heartbeat
    reaches it again, with the same lease secret, and no new checkout."""
    client = client_of(standby, leader, trust=leader)
    lease = await client.checkout(LICENCE.key)
    await leader.restart()
    await lease.renew_once()
    heartbeats = [r for r in leader.requests if isinstance(r, messages.Heartbeat)]
    assert [h.lease for h in heartbeats] == [lease.lease_id]
    assert [r.op for r in leader.requests].count("checkout") == 1
    await client.aclose()


async def test_without_a_leader_named_the_client_moves_along_its_list(
    leader: FakeLicd,
) -> None:
    async with FakeLicd() as lost:
        standby_of(lost, None)  # a standby that does not know the leader
        client = client_of(lost, leader, trust=leader)
        lease = await client.checkout(LICENCE.key)  # retried on the next server
        assert ops(lost) == ["hello", "checkout"]
        assert lease.lease_id in leader.leases
        await client.aclose()


async def test_one_server_that_is_unavailable_is_tried_again(leader: FakeLicd) -> None:
    """A single daemon's `unavailable` (its disk failed) is retried there, as before."""
    leader.fail["available"] = errors.Unavailable()
    client = client_of(leader, trust=leader)
    with pytest.raises(errors.Unavailable):
        await client.request(messages.Available(0, key=LICENCE.key))
    del leader.fail["available"]
    await client.request(messages.Available(0, key=LICENCE.key))
    assert ops(leader) == ["hello", "available", "available"]  # one connection
    await client.aclose()


def test_leader_of_reads_the_address_and_ignores_a_bad_one() -> None:
    def unavailable(leader: object) -> errors.Unavailable:
        return errors.Unavailable(detail={"leader": leader})

    assert leader_of(unavailable("10.0.0.7:27500")) == ("10.0.0.7", 27500)
    assert leader_of(unavailable("[::1]:27501")) == ("::1", 27501)
    assert leader_of(unavailable("licd-2")) == ("licd-2", 27500)  # the default port
    for bad in ("licd-2:99999", "", 27500, None):
        assert leader_of(unavailable(bad)) is None
    assert leader_of(errors.Unavailable()) is None
