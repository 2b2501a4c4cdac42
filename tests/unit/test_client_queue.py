"""Tests of queued checkouts (docs/protocol.md, "Queueing"): the connection's queue
updates, and the client's `checkout(queue=True)`, asyncio and blocking.

The fake daemon sends updates when a test says (its queue changes, `queue_tick()`); the
client's clock is a ManualClock, so the wait between updates is stepped, not slept.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import pytest

from licd_client import errors, messages, sync
from licd_client.client import INTERRUPT_GRACE, AsyncClient
from licd_client.clock import ManualClock
from licd_client.connection import Connection
from licd_client.lease import AsyncLease, LeaseState
from tests.fakelicd import LICENCE, FakeLicd, FakeQueued, ThreadedFakeLicd
from tests.unit.test_connection import Peer, open_conn, raw_server

KEY = LICENCE.key
Place = tuple[int, int, float | None]  # what on_queued is called with


@pytest.fixture
async def full(fake: FakeLicd) -> AsyncIterator[AsyncLease]:
    """Every seat held, by another client (on the real clock)."""
    async with AsyncClient(fake.address, fake.key_hex) as other:
        yield await other.checkout(KEY, seats=LICENCE.total)


class Places:
    """An `on_queued` (async, as callbacks may be) that keeps what it is told, in order."""

    def __init__(self) -> None:
        self.seen: list[Place] = []
        self._new: asyncio.Queue[Place] = asyncio.Queue()

    async def __call__(self, position: int, waiting: int, wait: float | None) -> None:
        self.seen.append((position, waiting, wait))
        self._new.put_nowait((position, waiting, wait))

    async def next(self) -> Place:
        return await asyncio.wait_for(self._new.get(), 5)


def queued_checkouts(fake: FakeLicd) -> list[messages.Checkout]:
    return [r for r in fake.requests if isinstance(r, messages.Checkout) and r.queue]


def waiting(key: str, request: str) -> FakeQueued:
    """A checkout of another client, waiting with no connection (it is never served)."""
    holder = messages.Holder(host="h", hostid="other", user="u", pid=1)
    return FakeQueued(
        messages.Checkout(0, key=key, holder=holder, request=request, nonce=bytes(16), queue=True)
    )


def checkout(*, queue: bool) -> messages.Checkout:
    holder = messages.Holder(host="h", hostid="i", user="u", pid=1)
    return messages.Checkout(
        0, key=KEY, holder=holder, request="r" * 32, nonce=bytes(16), queue=queue
    )


def queue_update(rid: int, **fields: Any) -> dict[str, Any]:
    fields.setdefault("update_in", 10.0)
    return messages.QueueUpdate(rid, **fields).to_wire()


def lease_reply(rid: int) -> dict[str, Any]:
    return messages.LeaseReply(
        rid, handle="h", token=b"t", chain=[], expires=0.0, ttl=30.0, renew_in=10.0, seats=1
    ).to_wire()


def state(lease: AsyncLease) -> LeaseState:
    """The lease's state, read afresh (it changes behind mypy's back)."""
    return lease.state


# ------------------------------------------------------------------ the connection


async def test_queue_updates_reach_the_requester_before_its_reply() -> None:
    seen: list[messages.QueueUpdate] = []

    async def handler(peer: Peer) -> None:
        await peer.hello()
        req = await peer.recv()
        assert req["queue"] is True
        for position in (2, 1):
            peer.send(queue_update(req["id"], position=position, waiting=2, wait=30.0))
        peer.send(lease_reply(req["id"]))
        await peer.reader.read()

    async def on_update(update: messages.QueueUpdate) -> None:
        seen.append(update)

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        try:
            reply = await conn.request(checkout(queue=True), on_update=on_update)
            assert isinstance(reply, messages.LeaseReply)
            assert [(u.position, u.waiting, u.wait) for u in seen] == [(2, 2, 30.0), (1, 2, 30.0)]
            assert not conn.closed
        finally:
            await conn.close()


@pytest.mark.parametrize(
    ("queue", "update", "broken"),
    [
        (False, {"position": 1}, "did not queue"),  # no queue sent: no update may come
        (True, {"id": 99}, "out of order"),  # an update answers its own request
    ],
)
async def test_a_queue_update_that_answers_nothing_breaks_the_connection(
    queue: bool, update: dict[str, Any], broken: str
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        req = await peer.recv()
        peer.send({**queue_update(req["id"], position=1, waiting=1), **update})
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        with pytest.raises(errors.ConnectionLost, match=broken):
            await conn.request(checkout(queue=queue))
        assert conn.closed


async def test_a_malformed_queue_update_is_a_protocol_violation() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        req = await peer.recv()
        peer.send(queue_update(req["id"], position=0, waiting=1))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        try:
            with pytest.raises(errors.ProtocolViolation, match="position"):
                await conn.request(checkout(queue=True))
        finally:
            await conn.close()


async def test_a_queued_request_outlives_the_io_timeout_while_updates_come() -> None:
    """The io_timeout bounds the first frame; after an update, the wait is update_in plus
    io_timeout, on the connection's clock, and then the connection is taken as dead."""
    clock = ManualClock()
    gaps: list[float] = []

    async def handler(peer: Peer) -> None:
        await peer.hello()
        req = await peer.recv()
        peer.send(queue_update(req["id"], position=1, waiting=1, update_in=30.0))
        await peer.reader.read()

    async def on_update(update: messages.QueueUpdate) -> None:
        gaps.append(update.update_in)

    async with raw_server(handler) as addr:
        conn = await Connection.open([addr], io_timeout=5.0, client_name="t/1", clock=clock)
        task = asyncio.create_task(conn.request(checkout(queue=True), on_update=on_update))
        assert await clock.wait_for_sleeper() == 1000.0 + 30.0 + 5.0
        clock.advance(34.0)  # far past the io_timeout: nothing is due yet
        assert clock.sleepers == [1035.0] and not conn.closed and gaps == [30.0]
        await clock.step()
        with pytest.raises(errors.ConnectionLost, match="no reply or queue update"):
            await asyncio.wait_for(task, 5)
        assert conn.closed
        await conn.close()


# ---------------------------------------------------------------------- the client


async def test_a_queued_checkout_reports_its_place_and_returns_the_lease(
    fake: FakeLicd, client: AsyncClient, full: AsyncLease
) -> None:
    fake.queue_wait = 40.0
    fake.queue.append(waiting(KEY, "a" * 32))  # ahead of it, never served: no connection
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    assert await places.next() == (2, 2, 40.0)
    fake.queue_wait = None
    fake.queue.pop(0)
    fake.queue_tick()
    assert await places.next() == (1, 1, None)
    await full.release()  # its seats go to the head of the queue
    lease = await asyncio.wait_for(task, 5)
    assert places.seen == [(2, 2, 40.0), (1, 1, None)]
    assert state(lease) is LeaseState.ACTIVE and lease.valid
    (req,) = queued_checkouts(fake)
    assert lease.statement is not None and lease.statement.nonce == req.nonce  # verified
    assert list(fake.leases) == [lease.lease_id] and fake.queue == []
    await lease.release()


async def test_a_queued_checkout_takes_a_connection_of_its_own(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    """A lease's heartbeats go on while another checkout of the same client waits in the
    queue: they would be answered after its final reply on one connection."""
    renewed = asyncio.Event()
    held = await client.checkout(KEY, seats=LICENCE.total, on_renewed=lambda _: renewed.set())
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    await places.next()
    assert await clock.step() == 1010.0  # the renewal is due (its connection's watch: 1015)
    await asyncio.wait_for(renewed.wait(), 5)
    assert not task.done()
    assert fake.ops().count("hello") == 2
    await held.release()
    lease = await asyncio.wait_for(task, 5)
    await lease.release()


async def test_a_broken_queued_connection_is_reopened_with_the_same_request(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, full: AsyncLease
) -> None:
    """However long it waited, a checkout whose connection broke goes back at once, with
    the same request key, and takes its place back."""
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    await places.next()
    for _ in range(10):  # 100 s in the queue, ten times the retry budget
        clock.advance(10.0)
        fake.queue_tick()
        await places.next()
    await fake.restart()  # every connection drops; the queue is kept
    await clock.step()  # the backoff before the retry
    assert await places.next() == (1, 1, None)
    first, *_, again = queued_checkouts(fake)
    assert again.request == first.request and again.nonce != first.nonce
    assert len(fake.queue) == 1 and fake.queue[0].connected
    fake.leases.clear()
    fake.queue_tick()
    lease = await asyncio.wait_for(task, 5)
    assert lease.statement is not None and lease.statement.nonce == again.nonce
    await lease.release()


async def test_a_silent_queued_connection_is_taken_as_dead_and_reopened(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, full: AsyncLease
) -> None:
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    await places.next()
    start = clock.now()
    assert await clock.step() == start + fake.queue_update_in + client.io_timeout
    await clock.step()  # the backoff before the retry
    assert await places.next() == (1, 1, None)
    (first, again) = queued_checkouts(fake)
    assert again.request == first.request
    assert fake.ops().count("hello") == 3  # the other client's, then two of its own
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_a_queued_checkout_leaves_the_queue(
    fake: FakeLicd, client: AsyncClient, full: AsyncLease
) -> None:
    """Cancelled, it closes its connection at once: its half-close tells the daemon, which
    closes too (no 2 s wait for a reply, on a clock nobody steps here). An update that
    crosses the cancellation reaches no callback."""
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    await places.next()
    task.cancel()
    fake.queue_tick()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    (entry,) = fake.queue
    assert not entry.connected  # never served, and gone once its place lapses
    await full.release()
    assert fake.leases == {} and client.leases == []
    assert places.seen == [(1, 1, None)]


async def test_a_queued_checkout_cancelled_as_its_seat_comes_checks_the_lease_in(
    fake: FakeLicd, client: AsyncClient, full: AsyncLease, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant = fake._checkout
    tasks: list[asyncio.Task[AsyncLease]] = []

    def cancel_then_grant(req: messages.Checkout) -> messages.LeaseReply:
        reply = grant(req)  # SeatsExhausted until a seat is free
        tasks[0].cancel()  # the lease is on its way: Ctrl-C now
        return reply

    places = Places()
    tasks.append(asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places)))
    await places.next()
    monkeypatch.setattr(fake, "_checkout", cancel_then_grant)
    await full.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(tasks[0], 5)
    assert fake.ops()[-1] == "checkin"
    assert fake.leases == {} and fake.queue == [] and client.leases == []


async def test_closing_the_client_ends_a_queued_checkout(
    fake: FakeLicd, clock: ManualClock, full: AsyncLease
) -> None:
    client = AsyncClient(fake.address, fake.key_hex, clock=clock)
    places = Places()
    task = asyncio.create_task(client.checkout(KEY, queue=True, on_queued=places))
    await places.next()
    await client.aclose()
    with pytest.raises(errors.ConnectionLost):
        await asyncio.wait_for(task, 5)
    (entry,) = fake.queue
    async with asyncio.timeout(5):  # the daemon sees the connection end
        while entry.connected:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_refusal_other_than_for_seats_is_answered_at_once(
    fake: FakeLicd, client: AsyncClient
) -> None:
    with pytest.raises(errors.UnknownLicence):
        await client.checkout("no-such-key", queue=True)
    lease = await client.checkout(KEY, queue=True)  # a seat is free: no wait
    assert fake.queue == [] and lease.valid
    await lease.release()


# --------------------------------------------------------------------- blocking API


@pytest.fixture
def server() -> Iterator[ThreadedFakeLicd]:
    srv = ThreadedFakeLicd()
    with srv.running():
        yield srv


def test_the_blocking_checkout_waits_in_the_queue(server: ThreadedFakeLicd) -> None:
    with sync.Client(server.fake.address, server.fake.key_hex) as client:
        held = client.checkout(KEY, seats=LICENCE.total)
        seen: list[Place] = []

        def on_queued(position: int, waiting: int, wait: float | None) -> None:
            seen.append((position, waiting, wait))
            held.release()  # from a callback: scheduled; its seats go to the queue's head

        lease = client.checkout(KEY, queue=True, on_queued=on_queued)
        assert seen == [(1, 1, None)]
        assert lease.valid and lease.seats == 1
        lease.release()


def test_ctrl_c_while_queued_leaves_the_queue_at_once(server: ThreadedFakeLicd) -> None:
    """A real SIGINT to the caller, blocked in a queued checkout: the connection is
    half-closed, the daemon closes it, and the interruption goes on well within the
    grace an interrupted checkout gives its reply."""
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    def on_queued(position: int, waiting: int, wait: float | None) -> None:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        with sync.Client(server.fake.address, server.fake.key_hex) as client:
            client.checkout(KEY, seats=LICENCE.total)
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                client.checkout(KEY, queue=True, on_queued=on_queued)
            assert time.monotonic() - start < INTERRUPT_GRACE
    finally:
        signal.signal(signal.SIGINT, old)
    assert interrupted.is_set()
    (entry,) = server.call(lambda: list(server.fake.queue))
    assert not entry.connected
    assert server.call(lambda: dict(server.fake.leases)) == {}  # the held one: at close()
