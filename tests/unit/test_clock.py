"""Unit tests of licd_client.clock: the lease clock and the stepped test clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from licd_client.clock import ManualClock, SystemClock, lease_clock


def test_lease_clock_uses_boottime_when_available() -> None:
    a = lease_clock()
    b = lease_clock()
    assert b >= a
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert abs(a - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0


async def test_system_clock_sleep_zero_returns() -> None:
    clock = SystemClock()
    before = clock.now()
    await asyncio.wait_for(clock.sleep(0), 1)
    assert clock.now() >= before


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock(start=100.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 10)), asyncio.create_task(sleeper("early", 3))]
    await asyncio.sleep(0)  # both tasks run up to their sleep
    assert clock.sleepers == [103.0, 110.0]
    assert await clock.step() == 103.0
    await tasks[1]
    assert woke == ["early"]
    clock.advance(7)
    await tasks[0]
    assert woke == ["early", "late"]
    assert clock.sleepers == []


async def test_manual_clock_cancelled_sleeper_is_forgotten() -> None:
    clock = ManualClock()
    task = asyncio.create_task(clock.sleep(5))
    await clock.wait_for_sleeper()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == []


def test_manual_clock_never_goes_back() -> None:
    with pytest.raises(ValueError):
        ManualClock().advance(-1)
