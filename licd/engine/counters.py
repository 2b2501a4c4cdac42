"""Metered counters: units consumed under a licence, per period, de-duplicated.

Each (licence, counter) has `used` units in the current period; a new period (daily or
monthly, UTC) starts from zero. A `dedup` id seen again for the same counter within the
counter's window counts once (it is remembered on the monotonic clock, in memory: a
restart forgets the last few seconds of ids). A consume that would pass the limit
consumes nothing. Pure: the caller persists `state()` after each change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from licd.clock import Instant
from licd.engine.licence import Counter
from licd_client.errors import QuotaExhausted


@dataclass
class CounterState:
    licence_id: str
    name: str
    used: int
    period_start: float


@dataclass(frozen=True)
class Consumed:
    counter: str
    used: int
    limit: int
    counted: bool
    state: CounterState  # what to persist (unchanged when not counted)
    dedup_key: tuple[str, str, str] | None = None  # remembered for the window

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


class CounterBook:
    def __init__(self) -> None:
        self._state: dict[tuple[str, str], CounterState] = {}
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()  # -> expiry

    def restore(self, states: list[CounterState]) -> None:
        for s in states:
            self._state[(s.licence_id, s.name)] = s

    def state(self, licence_id: str, counter: Counter, at: Instant) -> CounterState:
        """The counter's state now: a later period starts from zero. A wall clock stepped
        back across a boundary (or a reset edited to a longer period) starts nothing: the
        units used stay used, so no clock change can hand out a period's units twice."""
        key = (licence_id, counter.name)
        start = counter.period_start(at.wall)
        s = self._state.get(key)
        if s is None or start > s.period_start:
            s = self._state[key] = CounterState(licence_id, counter.name, 0, start)
        return s

    def consume(
        self, licence_id: str, counter: Counter, units: int, dedup: str | None, at: Instant
    ) -> Consumed:
        s = self.state(licence_id, counter, at)
        self._forget_old(at.mono)
        seen_key = (licence_id, counter.name, dedup) if dedup is not None else None
        if seen_key is not None and self._seen.get(seen_key, -1.0) > at.mono:
            return Consumed(counter.name, s.used, counter.limit, False, s)
        if s.used + units > counter.limit:
            raise QuotaExhausted(
                f"counter {counter.name!r} is used up for this period",
                detail={"used": s.used, "limit": counter.limit, "asked": units},
            )
        s.used += units
        if seen_key is not None:
            self._seen.pop(seen_key, None)  # re-inserted last: the order stays by time
            self._seen[seen_key] = at.mono + counter.dedup_window
        return Consumed(counter.name, s.used, counter.limit, True, s, seen_key)

    def undo(self, consumed: Consumed, units: int) -> None:
        """The consume's commit failed: give its units back, and forget its dedup id so
        that the client's retry counts."""
        if consumed.counted:
            consumed.state.used = max(0, consumed.state.used - units)
            if consumed.dedup_key is not None:
                self._seen.pop(consumed.dedup_key, None)

    def _forget_old(self, mono: float) -> None:
        seen = self._seen
        while seen:
            key, expiry = next(iter(seen.items()))
            if expiry > mono:
                break
            del seen[key]
