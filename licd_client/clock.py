"""The client's lease clock: how long a lease has left, measured so sleep cannot stretch it.

`lease_clock()` reads CLOCK_BOOTTIME (which keeps counting while the machine is
suspended) where the OS has it, else the monotonic clock. A `Clock` pairs `now()` with
an awaitable `sleep()`; `ManualClock` is the stepped clock for tests. Never wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Protocol

#: Longest single asyncio sleep of `SystemClock.sleep()`: the event loop's timers run on
#: CLOCK_MONOTONIC, which stops during suspend, so a long sleep is cut into slices that
#: re-read the lease clock; after a resume a due renewal is sent within this many seconds.
MAX_SLICE = 1.0


def lease_clock() -> float:
    """Seconds on CLOCK_BOOTTIME if available, else on the monotonic clock."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        try:
            return time.clock_gettime(boottime)
        except OSError:
            pass
    return time.monotonic()


class Clock(Protocol):
    """What the client needs of a clock: a reading and a way to wait on it."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real lease clock."""

    def now(self) -> float:
        return lease_clock()

    async def sleep(self, seconds: float) -> None:
        deadline = lease_clock() + seconds
        # Slices, not an Event: the point is to re-read CLOCK_BOOTTIME after a suspend.
        while (left := deadline - lease_clock()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(left, MAX_SLICE))
        await asyncio.sleep(0)


class ManualClock:
    """A clock that moves only when told to: `advance()`, or `step()` to the next sleeper.

    For tests (trio's MockClock is the model): code under test sleeps on it, the test
    moves time forward and the sleepers whose deadline passed wake up.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: dict[int, tuple[float, asyncio.Future[None]]] = {}
        self._changed: asyncio.Event | None = None

    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> list[float]:
        """Deadlines of the tasks sleeping now, earliest first."""
        return sorted(deadline for deadline, _ in self._sleepers.values())

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = next(self._seq)
        self._sleepers[key] = (self._now + seconds, fut)
        self._event().set()
        try:
            await fut
        finally:
            self._sleepers.pop(key, None)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds
        for key, (deadline, fut) in list(self._sleepers.items()):
            if deadline <= self._now:
                del self._sleepers[key]
                if not fut.done():
                    fut.set_result(None)

    async def wait_for_sleeper(self, within: float = 5.0) -> float:
        """Wait (real time, at most `within` s) until some task sleeps; its deadline."""
        async with asyncio.timeout(within):
            while not self._sleepers:
                event = self._event()
                event.clear()
                await event.wait()
        return self.sleepers[0]

    async def step(self, within: float = 5.0) -> float:
        """Wait for a sleeper, jump to its deadline, let the woken tasks run; the new time."""
        deadline = await self.wait_for_sleeper(within)
        self.advance(max(0.0, deadline - self._now))
        await asyncio.sleep(0)
        return self._now
