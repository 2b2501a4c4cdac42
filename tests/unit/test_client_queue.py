"""Tests of queued checkouts (docs/protocol.md, "Queueing"): the connection's queue
updates.

The wait between updates is measured on a ManualClock: stepped, not slept.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from licd_client import errors, messages
from licd_client.clock import ManualClock
from licd_client.connection import Connection
from tests.fakelicd import LICENCE
from tests.unit.test_connection import Peer, open_conn, raw_server

KEY = LICENCE.key


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
