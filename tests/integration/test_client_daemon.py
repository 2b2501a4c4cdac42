"""The client library against a real daemon in this process: fake clocks on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

import licd_client
from licd.clock import ManualClock
from licd_client import AsyncClient, LeaseState
from licd_client.errors import ConnectionLost, LeaseUnknown, SeatsExhausted
from tests.support import DICOM, address, make_config, reserved_port, running


def client_for(
    port: int, key: bytes, clock: licd_client.ManualClock | None = None, *, io_timeout: float = 2.0
) -> AsyncClient:
    return AsyncClient(f"127.0.0.1:{port}", key, clock=clock, io_timeout=io_timeout, retry_for=0.0)


async def test_seed_000_with_the_client_library(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        _, port = address(daemon)
        key = daemon.signer.public
        clients = [client_for(port, key) for _ in range(4)]
        a, b, c = [await cl.checkout(DICOM.key) for cl in clients[:3]]
        assert a.features == DICOM.features
        with pytest.raises(SeatsExhausted, match="maximum allowed concurrent licences reached"):
            await clients[3].checkout(DICOM.key)
        await a.release()
        assert a.state is LeaseState.RELEASED
        d = await clients[3].checkout(DICOM.key)
        assert d.valid and (await clients[3].available(DICOM.key)).available == 0
        for cl in clients:
            await cl.aclose()
        assert daemon.engine.in_use(DICOM.id) == 0  # closing the clients checked in b, c, d
        assert {b.state, c.state, d.state} == {LeaseState.RELEASED}


async def test_renewal_reaches_the_daemon(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        _, port = address(daemon)
        cclock = licd_client.ManualClock()
        client = client_for(port, daemon.signer.public, cclock)
        lease = await client.checkout(DICOM.key)
        first_deadline = lease.deadline
        (held,) = daemon.engine.leases
        clock.advance(30)
        cclock.advance(30)
        await lease.renew_once()
        assert held.expires == clock.wall + DICOM.lease_ttl
        assert lease.deadline == pytest.approx(first_deadline + 30)
        assert lease.handle == held.handle
        await client.aclose()


async def test_lease_survives_a_daemon_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    port = reserved_port()  # the restarted daemon must be where the client knows it
    config = make_config(tmp_path, listen=(("127.0.0.1", port),))
    cclock = licd_client.ManualClock()
    async with running(config, clock) as daemon:
        key = daemon.signer.public
        client = client_for(port, key, cclock)
        lease = await client.checkout(DICOM.key)
    # The daemon is down: in lease mode the lease is still valid on the local clock.
    assert lease.valid
    async with running(config, clock) as daemon:
        await lease.renew_once()  # reconnects; the daemon knows the lease
        assert lease.state is LeaseState.ACTIVE
        assert daemon.engine.in_use(DICOM.id) == 1
        await client.aclose()


async def test_reclaimed_lease_is_reported_lost(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        _, port = address(daemon)
        lost: list[Exception] = []
        client = client_for(port, daemon.signer.public)
        lease = await client.checkout(DICOM.key, on_lost=lost.append)
        clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
        assert len(await daemon.service.reap_once(clock.now())) == 1
        with pytest.raises(LeaseUnknown):
            await lease.renew_once()
        assert lease.state is LeaseState.LOST
        assert len(lost) == 1 and isinstance(lost[0], LeaseUnknown)
        await client.aclose()


async def test_strict_validation_needs_the_daemon(tmp_path: Path) -> None:
    port = reserved_port()  # while no daemon listens there, connecting is refused
    config = make_config(tmp_path, listen=(("127.0.0.1", port),))
    async with running(config) as daemon:
        # The real clock: after the daemon stops, the final checkin gives up after 0.3 s.
        client = client_for(port, daemon.signer.public, io_timeout=0.3)
        strict = await client.checkout(DICOM.key, mode="strict")
        loose = await client.checkout(DICOM.key, mode="lease")
        await strict.validate()
        await loose.validate()
    with pytest.raises(ConnectionLost):
        await strict.validate()
    await loose.validate()  # the local lease clock still says valid
    await client.aclose()
