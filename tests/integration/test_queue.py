"""The fair queue through a real daemon (docs/protocol.md, "Queueing"): queued checkouts
wait on their connections, hear their positions, and get a freed seat in order, in the
commit that frees it; `licd queue` lists them; one whose client vanishes leaves."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from licd.cli.admin_client import AdminClient
from licd.clock import ManualClock
from licd.daemon import Daemon
from licd.store.sqlite import DB_FILE
from licd_client.messages import Holder
from tests.support import DICOM, RawPeer, address, holder, make_config, running

ONE = replace(DICOM, seats=1, lease_ttl=30.0)  # queue updates within 10 s


async def connected(daemon: Daemon) -> RawPeer:
    peer = await RawPeer.connect(address(daemon))
    await peer.hello()
    return peer


async def admin(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(AdminClient(daemon.admin.path).call, op, **args)


async def queued_positions(daemon: Daemon) -> list[tuple[str, int, bool]]:
    listing = (await admin(daemon, "queue"))["queue"]
    return [(x["hostid"], x["position"], x["connected"]) for x in listing]


async def detached(daemon: Daemon, hostid: str) -> None:
    """Until the daemon has seen the connection of `hostid`'s queued checkout end: it
    publishes nothing a test could wait on, so the engine is polled every 10 ms, within
    a deadline."""

    def seen() -> bool:
        return any(
            w.holder.hostid == hostid and not w.attached
            for queue in daemon.service.engine.queues.values()
            for w in queue
        )

    async with asyncio.timeout(10.0):
        while not seen():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class Queued:
    """A checkout sent with `queue: true` on a connection of its own."""

    def __init__(self, peer: RawPeer, rid: int, request: str, h: Holder) -> None:
        self.peer, self.rid, self.request, self.holder = peer, rid, request, h

    @classmethod
    async def send(cls, daemon: Daemon, h: Holder, request: str | None = None) -> Queued:
        peer = await connected(daemon)
        request = request or os.urandom(16).hex()
        await peer.send(
            {
                "op": "checkout",
                "id": 7,
                "key": ONE.key,
                "holder": h.to_wire(),
                "request": request,
                "nonce": os.urandom(16),
                "queue": True,
            }
        )
        return cls(peer, 7, request, h)

    async def frame(self) -> dict[str, Any]:
        reply = await self.peer.recv(within=10.0)
        assert reply is not None, "the daemon closed a queued checkout's connection"
        assert reply["id"] == self.rid
        return reply

    async def final(self) -> dict[str, Any]:
        """The checkout's final reply, past any updates."""
        while (reply := await self.frame()).get("queued"):
            pass
        return reply

    async def update(self) -> tuple[int, int]:
        reply = await self.frame()
        assert reply["ok"] is True and reply["queued"] is True, reply
        assert reply["update_in"] == 10.0
        return reply["position"], reply["waiting"]

    async def until_position(self, position: int, waiting: int) -> None:
        while await self.update() != (position, waiting):
            pass


async def test_a_freed_seat_goes_to_the_queue_in_order_in_the_releasing_commit(
    tmp_path: Path,
) -> None:
    async with running(make_config(tmp_path, ONE)) as daemon:
        a = await connected(daemon)
        held = await a.checkout(ONE.key, holder("a"))
        assert held["ok"] is True
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        c = await Queued.send(daemon, holder("c"))
        assert await c.update() == (2, 2)
        assert await queued_positions(daemon) == [("id-b", 1, True), ("id-c", 2, True)]
        # A newcomer that does not queue is refused: the queue comes first.
        d = await connected(daemon)
        refused = await d.checkout(ONE.key, replace(holder("d"), app="viewer"))
        assert refused["error"] == "seats_exhausted"

        before = daemon.store.transactions
        released = await a.call("checkin", lease=held["lease"])
        assert released["released"] is True
        # B's lease was committed with A's release, in one transaction.
        granted = await b.frame()
        assert granted["ok"] is True and "queued" not in granted, granted
        assert granted["lease"] and granted["seats"] == 1
        assert daemon.store.transactions == before + 1
        lease_b = daemon.service.engine.lease_by_secret(granted["lease"])
        assert lease_b is not None and lease_b.holder.hostid == "id-b"
        await c.until_position(1, 1)
        assert await queued_positions(daemon) == [("id-c", 1, True)]

        # C only after B.
        assert (await b.peer.call("checkin", lease=granted["lease"]))["released"] is True
        last = await c.frame()
        assert last["ok"] is True and last["lease"], last
        assert await queued_positions(daemon) == []
        await daemon.store.barrier()  # queue events are written lazily
        entries = (await admin(daemon, "audit", after=0))["entries"]
        kinds = [
            (e["event"], e["hostid"]) for e in entries if e["hostid"] and e["event"] != "denied"
        ]
        assert kinds == [
            ("checkout", "id-a"),
            ("queued", "id-b"),
            ("queued", "id-c"),
            ("checkin", "id-a"),
            ("checkout", "id-b"),
            ("checkin", "id-b"),
            ("checkout", "id-c"),
        ]
        served = [e for e in entries if e["event"] == "checkout" and e["hostid"] != "id-a"]
        assert all(e["detail"]["queued"] >= 0 for e in served)
        # In use once each commit landed: the released seat is not counted with its heir.
        assert [e["detail"]["in_use"] for e in served] == [1, 1]
        [denied] = [e for e in entries if e["event"] == "denied"]
        assert (denied["hostid"], denied["detail"]["app"]) == ("id-d", "viewer")
        for peer in (a, b.peer, c.peer, d):
            await peer.close()


async def test_a_vanished_waiter_keeps_its_place_a_heartbeat_interval_then_leaves(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path, ONE), clock) as daemon:
        service = daemon.service

        async def tick(seconds: float) -> None:
            """Let `seconds` pass, then run the reaper's round on the queues."""
            clock.advance(seconds)
            service.tick_queues(clock.now())

        a = await connected(daemon)
        held = await a.checkout(ONE.key, holder("a"))
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        c = await Queued.send(daemon, holder("c"))
        assert await c.update() == (2, 2)
        await b.peer.close()
        await detached(daemon, "id-b")
        assert await queued_positions(daemon) == [("id-b", 1, False), ("id-c", 2, True)]
        await tick(9.5)  # within the interval (lease_ttl / 3 = 10 s): kept
        assert await queued_positions(daemon) == [("id-b", 1, False), ("id-c", 2, True)]
        # Back with the same request: its place again.
        again = await Queued.send(daemon, holder("b"), b.request)
        assert await again.update() == (1, 2)
        await again.peer.close()
        await detached(daemon, "id-b")
        # A seat freed now skips the disconnected B: C gets it.
        await a.call("checkin", lease=held["lease"])
        got = await c.final()
        assert got["ok"] is True and got["lease"]
        assert await queued_positions(daemon) == [("id-b", 1, False)]
        await tick(9.5)
        assert await queued_positions(daemon) == [("id-b", 1, False)]
        await tick(0.6)  # one heartbeat interval after it left: gone
        assert await queued_positions(daemon) == []
        await daemon.store.barrier()  # queue events are written lazily
        entries = (await admin(daemon, "audit", after=0))["entries"]
        left = [e for e in entries if e["event"] == "queue_left"]
        assert [(e["hostid"], e["detail"]["why"]) for e in left] == [("id-b", "gone")]
        await a.close()
        await c.peer.close()


async def test_a_full_queue_refuses_at_once_and_the_rule_says_so(tmp_path: Path) -> None:
    config = make_config(tmp_path, replace(ONE, queue_max=1))
    async with running(config) as daemon:
        a = await connected(daemon)
        assert (await a.checkout(ONE.key, holder("a")))["ok"] is True
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        c = await Queued.send(daemon, holder("c"))
        full = await c.frame()
        assert full["ok"] is False and full["error"] == "seats_exhausted"
        assert full["detail"]["rule"] == "queue" and full["detail"]["waiting"] == 1
        for peer in (a, b.peer, c.peer):
            await peer.close()


async def test_stopping_answers_every_waiter(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, ONE)) as daemon:
        a = await connected(daemon)
        assert (await a.checkout(ONE.key, holder("a")))["ok"] is True
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        stopping = asyncio.ensure_future(daemon.server.stop())
        answer = await b.frame()
        assert answer["ok"] is False and answer["error"] == "shutting_down"
        await stopping
        await a.close()
        await b.peer.close()


async def test_a_hand_over_that_fails_to_commit_keeps_both_the_lease_and_the_place(
    tmp_path: Path,
) -> None:
    async with running(make_config(tmp_path, ONE)) as daemon:
        a = await connected(daemon)
        held = await a.checkout(ONE.key, holder("a"))
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        with sqlite3.connect(tmp_path / DB_FILE) as db:  # the disk refuses the next write
            db.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON lease BEGIN SELECT RAISE(ABORT, 'disk'); END"
            )
        refused = await a.call("checkin", lease=held["lease"])
        assert refused["error"] == "unavailable"  # neither the release nor the grant
        assert await queued_positions(daemon) == [("id-b", 1, True)]
        assert daemon.engine.in_use(ONE.id) == 1
        beat = await a.call("heartbeat", lease=held["lease"], nonce=os.urandom(16))
        assert beat["ok"] is True  # A's lease is live again
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute("DROP TRIGGER boom")
        assert (await a.call("checkin", lease=held["lease"]))["released"] is True
        got = await b.final()
        assert got["ok"] is True and got["lease"]
        assert daemon.engine.in_use(ONE.id) == 1
        await a.close()
        await b.peer.close()
