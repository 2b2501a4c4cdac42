"""Licence policies through a real daemon: consume, overdraft marks, device checkins,
denial messages, and policies that survive a restart."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from licd.cli.admin_client import AdminClient
from licd.clock import ManualClock
from licd.daemon import Daemon
from licd.engine.licence import Counter
from licd_client import AsyncClient, tokens
from licd_client.errors import QuotaExhausted
from tests.support import DICOM, RawPeer, address, holder, make_config, running

METERED = replace(
    DICOM, seats=2, overdraft=1, counter=(Counter("scans", limit=5, dedup_window=3.0),)
)


async def connected(daemon: Daemon) -> RawPeer:
    peer = await RawPeer.connect(address(daemon))
    await peer.hello()
    return peer


async def admin(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(AdminClient(daemon.admin.path).call, op, **args)


async def test_consume_is_durable_and_deduplicated(tmp_path: Path) -> None:
    clock = ManualClock()
    config = make_config(tmp_path, METERED)
    async with running(config, clock) as daemon:
        peer = await connected(daemon)
        lease = (await peer.checkout())["lease"]
        first = await peer.call("consume", lease=lease, counter="scans", units=2, dedup="b-1")
        assert (first["used"], first["remaining"], first["counted"]) == (2, 3, True)
        again = await peer.call("consume", lease=lease, counter="scans", units=2, dedup="b-1")
        assert (again["used"], again["counted"]) == (2, False)
        too_many = await peer.call("consume", lease=lease, counter="scans", units=4)
        assert too_many["error"] == "quota_exhausted"
        unknown = await peer.call("consume", lease=lease, counter="pages", units=1)
        assert unknown["error"] == "bad_request" and "pages" in unknown["message"]
        await peer.close()
    async with running(config, clock) as daemon:  # the count survives a restart
        peer = await connected(daemon)
        lease = (await peer.checkout())["lease"]
        reply = await peer.call("consume", lease=lease, counter="scans", units=3)
        assert (reply["used"], reply["remaining"]) == (5, 0)
        await peer.close()


async def test_consume_through_the_client_library(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, METERED)) as daemon:
        host, port = address(daemon)
        client = AsyncClient(f"{host}:{port}", daemon.signer.public, retry_for=0)
        lease = await client.checkout(DICOM.key)
        assert (await lease.consume("scans", 5)).remaining == 0
        try:
            await lease.consume("scans")
        except QuotaExhausted as exc:
            assert exc.detail == {"used": 5, "limit": 5, "asked": 1}
        else:
            raise AssertionError("quota_exhausted expected")
        await client.aclose()


async def test_overdraft_grant_is_marked_everywhere(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, METERED)) as daemon:
        peer = await connected(daemon)
        normal = [await peer.checkout(h=holder(f"h{i}")) for i in range(2)]
        assert all("overdraft" not in r for r in normal)
        nonce = os.urandom(16)
        over = await peer.checkout(h=holder("over"), nonce=nonce)
        assert over["ok"] is True and over["overdraft"] is True
        leaf = tokens.verify_lease([daemon.signer.public], [], over["token"], nonce=nonce)
        assert leaf.payload["ovr"] is True
        hb = await peer.call("heartbeat", lease=over["lease"], nonce=os.urandom(16))
        assert hb["overdraft"] is True
        assert (await peer.checkout(h=holder("beyond")))["error"] == "seats_exhausted"
        entries = (await admin(daemon, "audit"))["entries"]
        flagged = [e for e in entries if e["event"] == "checkout" and e["reason"] == "overdraft"]
        assert [e["handle"] for e in flagged] == [over["handle"]]
        assert flagged[0]["detail"] == {"in_use": 3, "overdraft": True}
        await peer.close()


async def test_device_lease_checkin_keeps_the_seat(tmp_path: Path) -> None:
    device = replace(DICOM, seats=1, device_period=7 * 86400.0)
    async with running(make_config(tmp_path, device)) as daemon:
        peer = await connected(daemon)
        lease = await peer.checkout(h=holder("scanner"))
        assert lease["ttl"] == 7 * 86400.0
        assert (await peer.call("checkin", lease=lease["lease"]))["released"] is False
        back = await peer.checkout(h=holder("scanner"))
        assert back["handle"] == lease["handle"]
        assert (await peer.checkout(h=holder("other")))["error"] == "seats_exhausted"
        await peer.close()


async def test_denials_name_the_rule(tmp_path: Path) -> None:
    strict = replace(DICOM, deny=("user:guest",), allow=("ip:127.0.0.0/8",), max={"user": 1})
    async with running(make_config(tmp_path, strict)) as daemon:
        peer = await connected(daemon)
        guest = await peer.checkout(h=holder("a", user="guest"))
        assert guest["error"] == "denied" and "'user:guest'" in guest["message"]
        assert (await peer.checkout(h=holder("a", user="ann")))["ok"] is True
        second = await peer.checkout(h=holder("b", user="ann"))
        assert second["error"] == "denied" and "per user" in second["message"]
        await peer.close()


async def test_policies_added_by_an_admin_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    added = {
        "key": "CAD-KEY",
        "id": "cad",
        "product": "cad",
        "seats": 3,
        "count_by": "host",
        "overdraft": 1,
        "max": {"user": 2},
        "counter": [{"name": "pages", "limit": 100, "reset": "daily"}],
        "addon": [{"seats": 2, "starts": 1.0, "ends": 4e9, "features": {"x": True}}],
    }
    async with running(config) as daemon:
        await admin(daemon, "licence.add", licence=added)
    async with running(config) as daemon:
        cad = daemon.engine.licence_by_id("cad")
        assert cad is not None
        assert (cad.count_by, cad.overdraft, dict(cad.max)) == ("host", 1, {"user": 2})
        assert cad.counter[0].reset == "daily" and cad.addon[0].seats == 2
        assert cad.seats_at(daemon.service.now().wall) == 5
