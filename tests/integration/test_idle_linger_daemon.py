"""Idle reclaim and linger through a real daemon: a heartbeat's `idle_for` brings the
warning `idle_reclaim_in`, then the reaper's round reclaims the lease for the client
queued behind it; a checked-in seat lingers for its holder, is listed as lingering, and
goes to the queue when its time is over."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from licd.cli.admin_client import AdminClient
from licd.clock import ManualClock
from licd.daemon import Daemon
from tests.integration.test_queue import ONE, Queued, connected
from tests.support import holder, make_config, running


async def admin(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(AdminClient(daemon.admin.path).call, op, **args)


async def test_an_idle_lease_is_warned_then_reclaimed_for_the_waiting_client(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    config = make_config(tmp_path, replace(ONE, idle_timeout=600.0))
    async with running(config, clock) as daemon:
        a = await connected(daemon)
        held = await a.checkout(ONE.key, holder("a"))
        lease = held["lease"]
        beat = await a.call("heartbeat", lease=lease, nonce=os.urandom(16), idle_for=100.0)
        assert beat["ok"] is True and "idle_reclaim_in" not in beat  # not idle long enough
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        clock.advance(5.0)
        beat = await a.call("heartbeat", lease=lease, nonce=os.urandom(16), idle_for=605.0)
        assert beat["idle_reclaim_in"] == 30.0  # warned: one lease ttl
        clock.advance(29.0)
        assert await daemon.service.reap_once(clock.now()) == []
        clock.advance(1.0)
        [reclaimed] = await daemon.service.reap_once(clock.now())
        assert reclaimed.holder.hostid == "id-a"
        got = await b.final()  # handed over in the reclaim's commit
        assert got["ok"] is True and got["lease"]
        gone = await a.call("heartbeat", lease=lease, nonce=os.urandom(16), idle_for=640.0)
        assert gone["error"] == "lease_unknown"
        assert gone["detail"] == {"reclaimed": True, "idle": True}
        await daemon.store.barrier()
        entries = (await admin(daemon, "audit", after=0))["entries"]
        [reclaim] = [e for e in entries if e["event"] == "reclaim"]
        assert (
            reclaim["reason"] == "idle" and reclaim["detail"]["idle"] == 5.0
        )  # idle 5 s between its heartbeats
        await a.close()
        await b.peer.close()


async def test_a_checked_in_seat_lingers_for_its_holder_then_goes_to_the_queue(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    config = make_config(tmp_path, replace(ONE, linger=120.0))
    async with running(config, clock) as daemon:
        a = await connected(daemon)
        first = await a.checkout(ONE.key, holder("a"))
        assert (await a.call("checkin", lease=first["lease"]))["released"] is True
        [kept] = (await admin(daemon, "leases"))["leases"]
        assert (kept["hostid"], kept["state"]) == ("id-a", "lingering")
        other = await connected(daemon)
        assert (await other.checkout(ONE.key, holder("c")))["error"] == "seats_exhausted"
        again = await a.checkout(ONE.key, holder("a"))  # the same host and user: back
        assert again["ok"] is True and again["handle"] != first["handle"]
        assert (await a.call("checkin", lease=again["lease"]))["released"] is True
        b = await Queued.send(daemon, holder("b"))
        assert await b.update() == (1, 1)
        clock.advance(119.0)
        await daemon.service.reap_once(clock.now())
        assert (await admin(daemon, "leases"))["leases"][0]["state"] == "lingering"
        clock.advance(1.0)
        await daemon.service.reap_once(clock.now())
        got = await b.final()
        assert got["ok"] is True and got["lease"]
        await daemon.store.barrier()
        entries = (await admin(daemon, "audit", after=0))["entries"]
        events = [(e["event"], e["hostid"]) for e in entries if e["hostid"]]
        assert ("linger_ended", "id-a") in events
        [ended] = [e for e in entries if e["event"] == "linger_ended"]
        assert ended["detail"]["in_use"] == 0
        lingered = [e for e in entries if e["event"] == "checkout" and e["hostid"] == "id-a"]
        assert [e["detail"].get("lingered") for e in lingered] == [None, True]
        for peer in (a, other, b.peer):
            await peer.close()
