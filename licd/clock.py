"""The daemon's clocks, injected everywhere time matters.

`Instant` pairs the wall clock (for tokens and persistence) with the monotonic clock
(for deadlines, which must not move when the wall clock is set). Production code uses
`SystemClock`; tests use `ManualClock` and move time by hand instead of sleeping (the
same idea, and name, as `licd_client.ManualClock`, the client's stepped lease clock; a
module that uses both names the client's by its package).
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
