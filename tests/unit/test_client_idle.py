"""Tests of idle leases (docs/protocol.md, "Idle leases"): `touch()` and the heartbeat's
`idle_for`, `on_idle_warning`, and telling a lease reclaimed as idle from one lost
otherwise (`LeaseUnknown.cause`), asyncio and blocking.

Time is a ManualClock: renewals come when a test steps it, and `idle_for` is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from licd_client import errors, messages, sync
from licd_client.client import AsyncClient
from licd_client.clock import ManualClock
from tests.fakelicd import LICENCE, FakeLicd, ThreadedFakeLicd

KEY = LICENCE.key
IDLE = {"reclaimed": True, "idle": True}


def idle_for(fake: FakeLicd) -> list[float | None]:
    return [r.idle_for for r in fake.requests if isinstance(r, messages.Heartbeat)]


async def renewal(clock: ManualClock, renewed: asyncio.Event) -> None:
    """Step to the next renewal and wait until its reply was taken in."""
    renewed.clear()
    await clock.step()
    await asyncio.wait_for(renewed.wait(), 5)


async def test_a_heartbeat_says_how_long_ago_the_app_touched_the_lease(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    renewed = asyncio.Event()
    lease = await client.checkout(KEY, on_renewed=lambda _: renewed.set())
    await renewal(clock, renewed)  # at 1010: never touched, so nothing is said
    clock.advance(3.0)
    lease.touch()  # at 1013
    await renewal(clock, renewed)  # at 1020
    await renewal(clock, renewed)  # at 1030, not touched since
    clock.advance(9.5)
    lease.touch()  # at 1039.5
    await renewal(clock, renewed)  # at 1040
    assert idle_for(fake) == [None, 7.0, 17.0, 0.5]
    assert "idle_for" not in messages.Heartbeat(0, lease="l", nonce=bytes(16)).to_wire()
    await lease.release()


async def test_on_idle_warning_fires_with_each_warning(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    warnings: list[float] = []
    renewed = asyncio.Event()

    async def on_idle_warning(seconds: float) -> None:  # async callbacks are awaited
        warnings.append(seconds)

    lease = await client.checkout(
        KEY, on_idle_warning=on_idle_warning, on_renewed=lambda _: renewed.set()
    )
    await renewal(clock, renewed)
    fake.idle_reclaim_in = 25.0
    await renewal(clock, renewed)
    fake.idle_reclaim_in = 15.0
    await renewal(clock, renewed)
    fake.idle_reclaim_in = None  # touched in time: no more warnings
    await renewal(clock, renewed)
    assert warnings == [25.0, 15.0]
    await lease.release()


async def test_a_lease_reclaimed_as_idle_is_lost_and_says_so(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lost: list[Exception] = []
    event = asyncio.Event()

    def on_lost(reason: Exception) -> None:
        lost.append(reason)
        event.set()

    lease = await client.checkout(KEY, on_lost=on_lost)
    fake.fail["heartbeat"] = errors.LeaseUnknown("reclaimed: idle", detail=IDLE)
    await clock.step()
    await asyncio.wait_for(event.wait(), 5)
    (reason,) = lost
    assert isinstance(reason, errors.LeaseUnknown) and reason.cause == "idle"
    with pytest.raises(errors.LeaseUnknown) as later:
        await lease.validate()
    assert later.value.cause == "idle"  # and so says every later use of the lease
    await lease.release()


@pytest.mark.parametrize(
    ("detail", "cause"),
    [
        (IDLE, "idle"),
        ({"reclaimed": True}, "reclaimed"),
        ({"revoked": True, "reason": "seat needed"}, "revoked"),
        (None, None),  # a bare lease_unknown: the daemon forgot (restarted, or long ago)
        ({"idle": True}, None),  # idle, but not said to be reclaimed
        ({"reclaimed": 1, "idle": True}, None),  # only true is true
    ],
)
def test_lease_unknown_says_why_the_lease_is_gone(
    detail: dict[str, Any] | None, cause: str | None
) -> None:
    err = errors.from_wire("lease_unknown", "gone", detail=detail)
    assert isinstance(err, errors.LeaseUnknown) and err.cause == cause
    assert errors.LeaseUnknown("the lease lapsed").cause is None


# --------------------------------------------------------------------- blocking API


@pytest.fixture
def server() -> Iterator[ThreadedFakeLicd]:
    srv = ThreadedFakeLicd()
    with srv.running():
        yield srv


def test_the_blocking_lease_touches_and_warns(server: ThreadedFakeLicd) -> None:
    warnings: list[float] = []
    server.fake.idle_reclaim_in = 30.0
    with sync.Client(server.fake.address, server.fake.key_hex) as client:
        lease = client.checkout(KEY, mode="strict", on_idle_warning=warnings.append)
        lease.validate()  # strict: a heartbeat now, untouched
        lease.touch()
        lease.validate()
        lease.release()
    first, second = idle_for(server.fake)
    assert first is None and second is not None and 0.0 <= second < 5.0
    assert warnings == [30.0, 30.0]
