"""Checkout retries against a real daemon: a retry joins its first attempt, never takes
a second seat, and goes back only to the holder that asked, asking the same."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from licd.clock import ManualClock
from tests.support import DICOM, RawPeer, address, holder, make_config, running


async def test_a_retry_sent_while_the_first_attempt_commits_gets_the_same_lease(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        service = daemon.service
        request = os.urandom(16).hex()
        # Both in one turn of the loop: the first attempt's commit has not even begun.
        first, commit = service.begin_checkout(
            DICOM.key, holder(), request=request, at=clock.now(), ip="127.0.0.1"
        )
        retry, joined = service.begin_checkout(
            DICOM.key, holder(), request=request, at=clock.now(), ip="127.0.0.1"
        )
        assert commit is not None and joined is commit
        assert retry.lease is first.lease and not retry.fresh
        await commit
        service.checkout_landed(retry)
        assert daemon.engine.in_use(DICOM.id) == 1
        stored = await daemon.service.store.load_leases()
        assert [x.handle for x in stored] == [first.lease.handle]


async def test_retries_over_the_wire(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        a, b = await RawPeer.connect(address(daemon)), await RawPeer.connect(address(daemon))
        await a.hello()
        await b.hello()
        request = os.urandom(16).hex()
        # Sent together on two connections: one lease, one seat.
        replies = await asyncio.gather(
            a.checkout(request=request, seats=2), b.checkout(request=request, seats=2)
        )
        assert all(r["ok"] for r in replies), replies
        assert replies[0]["lease"] == replies[1]["lease"]
        assert daemon.engine.in_use(DICOM.id) == 2
        # The same key asking for something else is a client bug, not a new lease.
        changed = await a.checkout(request=request, seats=1)
        assert changed["error"] == "bad_request" and "other seats or ttl" in changed["message"]
        assert await a.closed()
        # Another machine presenting the victim's hostid and key learns nothing.
        thief = replace(holder(), host="elsewhere")
        stolen = await b.checkout(h=thief, request=request, seats=2)
        assert stolen["error"] == "denied" and "lease" not in stolen
        # A key too short to be unguessable is refused before anything is decided.
        c = await RawPeer.connect(address(daemon))
        await c.hello()
        short = await c.checkout(request="0123456789abcdef")
        assert short["error"] == "bad_request" and "at least 22" in short["message"]
        assert daemon.engine.in_use(DICOM.id) == 2
        for peer in (b, c):
            await peer.close()


async def test_a_heartbeat_loop_is_rate_limited_as_configured(tmp_path: Path) -> None:
    clock = ManualClock()
    for per_second, refused in ((1.0, True), (1_000.0, False)):
        state = tmp_path / str(per_second)
        config = make_config(state, renewals_per_second=per_second)
        async with running(config, clock) as daemon:
            peer = await RawPeer.connect(address(daemon))
            await peer.hello()
            lease = (await peer.checkout())["lease"]
            errors = []
            for _ in range(100):
                clock.advance(0.01)
                beat = await peer.call("heartbeat", lease=lease, nonce=os.urandom(16))
                errors.append(beat.get("error"))
            assert ("rate_limited" in errors) is refused, errors
            assert errors[:10] == [None] * 10  # the burst, whatever the rate
            await peer.close()
