"""The daemon's clocks, injected everywhere time matters.

`Instant` pairs the wall clock (for tokens and persistence) with the monotonic clock
(for deadlines, which must not move when the wall clock is set). Production code uses
`SystemClock`; tests use `ManualClock` and move time by hand instead of sleeping (the
same idea, and name, as `licd_client.ManualClock`, the client's stepped lease clock; a
module that uses both names the client's by its package). `WallMark` is the latest
wall time known to have passed, which the daemon's clock never goes behind
(licd.core.clock_guard).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Instant:
    wall: float  # seconds since the Unix epoch, UTC
    mono: float  # monotonic seconds; only differences mean anything

    def after(self, seconds: float) -> Instant:
        return Instant(self.wall + seconds, self.mono + seconds)


class Clock(Protocol):
    def now(self) -> Instant: ...


@dataclass
class WallMark:
    """The latest wall time known to have passed: never earlier than a wall reading, and
    moving on with monotonic time between readings, so a wall clock set back turns it
    back neither while running nor (it is checkpointed) across a restart."""

    wall: float
    mono: float  # the monotonic time at which `wall` was known

    def now(self, at: Instant) -> float:
        """The effective wall time at `at`: max(wall now, the mark moved on since)."""
        return max(at.wall, self.wall + (at.mono - self.mono))

    def seen(self, wall: float, at: Instant) -> None:
        """Take in `wall` (a checkpoint read back) as passed by `at`."""
        self.wall = max(self.now(at), wall)
        self.mono = at.mono


class SystemClock:
    def now(self) -> Instant:
        return Instant(time.time(), time.monotonic())


class ManualClock:
    """A clock that moves only when told to: `advance()` both, `set_wall()` a jump.
    The daemon's stepped clock; `licd_client.ManualClock` is the client's."""

    def __init__(self, wall: float = 1_790_000_000.0, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def now(self) -> Instant:
        return Instant(self.wall, self.mono)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def set_wall(self, wall: float) -> None:
        """Jump the wall clock (an admin or NTP setting it) without moving monotonic time."""
        self.wall = wall
