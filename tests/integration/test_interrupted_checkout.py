"""An interrupted checkout holds no seat: a real daemon in this process, its commits held.

The daemon's checkout commits are held (`Held`) so that it has granted a lease and owes
the reply for as long as a test needs; meanwhile the client goes away: a raw peer closes
or resets its connection (the daemon gives the lease back, unless a retry shares it),
the client library's checkout task is cancelled, `licd-client` gets SIGINT or SIGTERM
(the client waits for the reply and checks the lease in). docs/protocol.md, "checkout".
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import licd_client
from licd.clock import ManualClock
from licd.config.settings import Config
from licd.core.events import Event, Kind
from licd.daemon import Daemon
from licd.deferred import Deferred
from licd.engine import Grant, SeatLease
from licd_client import AsyncClient
from licd_client.client import INTERRUPT_GRACE
from tests.cli.test_client_cli import spawn
from tests.support import DICOM, RawPeer, address, holder, make_config, running

WITHIN = 10.0  # bound on every wait for the daemon or a child process


class Held:
    """Holds the daemon's checkout commits until `open()`; notes what it decides.

    `grants` are the checkouts the engine decided, `events` what the service published
    once committed; `until(condition)` waits (bounded) for one of them to make it true.
    """

    def __init__(self, daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grants: list[Grant] = []
        self.events: list[Event] = []
        self._open = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        service = daemon.service
        insert, begin = service.store.insert_lease, service.begin_checkout

        def insert_lease(lease: SeatLease, event: Event) -> Deferred[None]:
            held: Deferred[None] = Deferred()

            async def later() -> None:
                await self._open.wait()
                done = insert(lease, event)
                done.add_done_callback(lambda d: _copy(d, held))

            task = asyncio.ensure_future(later())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return held

        def begin_checkout(*args: Any, **kwargs: Any) -> tuple[Grant, Deferred[None] | None]:
            grant, commit = begin(*args, **kwargs)
            self.grants.append(grant)
            self._changed.set()
            return grant, commit

        def note(event: Event) -> None:
            self.events.append(event)
            self._changed.set()

        monkeypatch.setattr(service.store, "insert_lease", insert_lease)
        monkeypatch.setattr(service, "begin_checkout", begin_checkout)
        service.events.subscribe(note)

    def open(self) -> None:
        self._open.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WITHIN):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def checkin(self) -> Event:
        """The first checkin committed (bounded wait)."""
        await self.until(lambda: any(e.kind is Kind.CHECKIN for e in self.events))
        return next(e for e in self.events if e.kind is Kind.CHECKIN)


def _copy(done: Deferred[None], into: Deferred[None]) -> None:
    error = done.exception()
    if error is None:
        into.settle(None)
    else:
        into.fail(error)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, shutdown_timeout=1.0)


def checkout_frame(request: str) -> dict[str, Any]:
    return {
        "op": "checkout",
        "id": 1,
        "key": DICOM.key,
        "holder": holder().to_wire(),
        "request": request,
        "nonce": os.urandom(16),
    }


async def connected(daemon: Daemon) -> RawPeer:
    peer = await RawPeer.connect(address(daemon))
    await peer.hello()
    return peer


async def free_seats(daemon: Daemon) -> int:
    peer = await connected(daemon)
    reply = await peer.call("available", key=DICOM.key)
    await peer.close()
    assert reply["total"] == DICOM.seats
    free: int = reply["available"]
    return free


# ---------------------------------------------------------------- the daemon's side


@pytest.mark.parametrize("leaving", ["close", "reset"])
async def test_a_lease_whose_client_left_before_the_reply_is_checked_in_at_once(
    config: Config, monkeypatch: pytest.MonkeyPatch, leaving: str
) -> None:
    clock = ManualClock()  # never advanced: nothing here waits for a ttl
    async with running(config, clock) as daemon:
        held = Held(daemon, monkeypatch)
        peer = await connected(daemon)
        [conn] = daemon.server.connections
        await peer.send(checkout_frame(os.urandom(16).hex()))
        await held.until(lambda: bool(held.grants))
        assert daemon.engine.in_use(DICOM.id) == 1  # granted; its commit and reply wait
        if leaving == "reset":
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await peer.close()  # before reading the reply
        async with asyncio.timeout(WITHIN):
            await conn.wait_closed()
        held.open()
        checkin = await held.checkin()
        assert checkin.reason == "abandoned"
        assert checkin.handle == held.grants[0].lease.handle
        assert daemon.engine.in_use(DICOM.id) == 0
        assert await free_seats(daemon) == DICOM.seats
        assert await daemon.store.load_leases() == []
        [entry] = [x.event for x in await daemon.store.audit() if x.event.kind is Kind.CHECKIN]
        assert entry.reason == "abandoned"  # in the audit log, with the seat's release


async def test_a_retry_that_joined_the_checkout_keeps_the_lease(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(config) as daemon:
        held = Held(daemon, monkeypatch)
        first = await connected(daemon)
        [conn] = daemon.server.connections
        retry = await connected(daemon)
        request = os.urandom(16).hex()
        await first.send(checkout_frame(request))
        await held.until(lambda: len(held.grants) == 1)
        # The reply is slow: the client retries on another connection, then the first
        # connection dies. The retry shares the first attempt's lease and outcome.
        await retry.send(checkout_frame(request))
        await held.until(lambda: len(held.grants) == 2)
        assert held.grants[1].lease is held.grants[0].lease and not held.grants[1].fresh
        await first.close()
        async with asyncio.timeout(WITHIN):
            await conn.wait_closed()
        held.open()
        reply = await retry.recv()
        assert reply is not None and reply["ok"] is True, reply
        assert reply["handle"] == held.grants[0].lease.handle
        beat = await retry.call("heartbeat", lease=reply["lease"], nonce=os.urandom(16))
        assert beat["ok"] is True  # still the retry's
        assert daemon.engine.in_use(DICOM.id) == 1
        assert [e.kind for e in held.events] == [Kind.CHECKOUT]
        await retry.close()


async def test_a_lease_whose_reply_was_written_stays_when_its_client_leaves(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease whose reply was written is its client's: leaving afterwards frees nothing.
    async with running(config) as daemon:
        held = Held(daemon, monkeypatch)
        held.open()
        peer = await connected(daemon)
        reply = await peer.checkout()
        assert reply["ok"] is True
        [conn] = daemon.server.connections
        await peer.close()
        async with asyncio.timeout(WITHIN):
            await conn.wait_closed()
        assert daemon.engine.in_use(DICOM.id) == 1
        assert [e.kind for e in held.events] == [Kind.CHECKOUT]


# ------------------------------------------------------------ the client library


def client_for(daemon: Daemon, clock: licd_client.ManualClock) -> AsyncClient:
    host, port = address(daemon)
    return AsyncClient(f"{host}:{port}", daemon.signer.public, clock=clock, retry_for=0.0)


async def test_a_cancelled_checkout_checks_in_the_lease_its_reply_brings(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(config) as daemon:
        held = Held(daemon, monkeypatch)
        cclock = licd_client.ManualClock()
        client = client_for(daemon, cclock)
        task = asyncio.ensure_future(client.checkout(DICOM.key))
        await held.until(lambda: bool(held.grants))  # sent, granted, not yet answered
        task.cancel()
        await cclock.wait_for_sleeper()  # the client waits (on its clock) for the reply
        held.open()
        with pytest.raises(asyncio.CancelledError):
            await task
        checkin = await held.checkin()
        assert checkin.reason is None  # the client's own checkin, on the same connection
        assert checkin.handle == held.grants[0].lease.handle
        assert daemon.engine.in_use(DICOM.id) == 0
        assert client.leases == []
        await client.aclose()


async def test_a_cancelled_checkout_without_a_reply_in_time_leaves_it_to_the_daemon(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(config) as daemon:
        held = Held(daemon, monkeypatch)
        cclock = licd_client.ManualClock()
        client = client_for(daemon, cclock)
        task = asyncio.ensure_future(client.checkout(DICOM.key))
        await held.until(lambda: bool(held.grants))
        [conn] = daemon.server.connections
        task.cancel()
        deadline = await cclock.wait_for_sleeper()
        assert deadline == cclock.now() + INTERRUPT_GRACE
        cclock.advance(INTERRUPT_GRACE)  # no reply within the grace: the client leaves
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(WITHIN):
            await conn.wait_closed()
        held.open()
        checkin = await held.checkin()
        assert checkin.reason == "abandoned"
        assert daemon.engine.in_use(DICOM.id) == 0
        await client.aclose()


# ---------------------------------------------------------------- licd-client


@pytest.mark.parametrize(
    ("command", "sig"),
    [
        (["checkout", DICOM.key], signal.SIGINT),
        (["exec", "--key", DICOM.key, "--", sys.executable, "-c", "pass"], signal.SIGTERM),
    ],
)
async def test_licd_client_interrupted_mid_checkout_checks_the_lease_in(
    config: Config, monkeypatch: pytest.MonkeyPatch, command: list[str], sig: signal.Signals
) -> None:
    async with running(config) as daemon:
        held = Held(daemon, monkeypatch)
        host, port = address(daemon)
        monkeypatch.setenv("LICD_SERVER", f"{host}:{port}")
        monkeypatch.setenv("LICD_SERVER_KEY", daemon.signer.public.hex())
        proc = spawn("-v", *command)  # -v: it says when it waits for the reply
        try:
            await held.until(lambda: bool(held.grants))  # its checkout waits on the commit
            proc.send_signal(sig)
            assert proc.stderr is not None
            seen: list[str] = []
            while not any("checkout interrupted" in line for line in seen):
                line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), WITHIN)
                assert line, f"licd-client ended first: {seen}"
                seen.append(line)
            held.open()  # the reply goes out to a client still listening
            out, err = await asyncio.to_thread(proc.communicate, timeout=WITHIN)
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.to_thread(proc.communicate)
        assert proc.returncode == 128 + sig, err
        assert out == ""  # no lease was shown: the command never had it
        checkin = await held.checkin()
        assert checkin.reason is None  # checked in by licd-client itself
        assert daemon.engine.in_use(DICOM.id) == 0
