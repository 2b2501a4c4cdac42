"""The daemon's wall clock, never set back: what a vendor's terms are judged by.

The daemon keeps a wall-clock mark (`licd.clock.WallMark`): the latest wall time it
knows has passed, moved on by monotonic time between readings, checkpointed to the
database every CHECKPOINT_EVERY seconds and at shutdown. `ClockGuard.now()` is the
daemon's clock: an instant whose wall time is never earlier than the mark. Every
licence's validity, an entitlement's expiry, a router block's remaining life, the times
in tokens and in the audit log are judged on it, so a wall clock set back (while the
daemon runs, or while it is down) lengthens nothing.

When the system's wall clock is behind the mark by more than `[server] clock_skew`,
the clock was set back: the guard records a `clock_rollback` event (audit log, log line,
alert, metric) and the engine holds new grants of the licences whose terms are a
vendor's (entitled ones, router blocks) until the clock is right again, when it records
`clock_restored`. Leases already held go on, and so do the site's own licences.

Ordinary clock changes are not rollbacks: NTP slews and small steps stay well within
the skew, a daylight-saving change does not move the clock (it counts UTC seconds), and
a normal restart finds the clock past the mark. File dates are never looked at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from licd.clock import Clock, Instant, WallMark
from licd.core.events import Event, Kind
from licd.core.service import LicenceService
from licd.store.base import Store, StoreError

log = logging.getLogger(__name__)

#: Seconds between two checkpoints of the mark (and looks at the clock): the most a
#: restart with the clock set back can give back.
CHECKPOINT_EVERY = 60.0


class ClockGuard:
    """A clock (`now()`) over `clock` whose wall time never goes back, with the mark it
    keeps in `store`; `skew`: how far behind the mark the system clock may be before it
    counts as set back."""

    def __init__(self, clock: Clock, store: Store, *, skew: float) -> None:
        self.clock = clock
        self.store = store
        self.skew = skew
        at = clock.now()
        self.mark = WallMark(at.wall, at.mono)  # raised to the stored one by load()
        #: Seconds the system clock was found behind the mark, while over the skew.
        self.behind: float | None = None
        self._service: LicenceService | None = None

    def now(self) -> Instant:
        """The daemon's instant: the system's monotonic time, and its wall time or the
        mark moved on since, whichever is later."""
        at = self.clock.now()
        wall = self.mark.now(at)
        return at if wall == at.wall else Instant(wall, at.mono)

    async def load(self) -> None:
        """At start: the mark the database kept (before anything judges time)."""
        stored = await self.store.load_wall_mark()
        if stored is not None:
            self.mark.seen(stored, self.clock.now())

    def attach(self, service: LicenceService) -> None:
        """The service whose engine holds vendor grants while the clock is set back,
        and whose audit log records it."""
        self._service = service
        self._hold(self.behind)

    def lag(self) -> float:
        """Seconds the system's wall clock is behind the daemon's now (0 when not)."""
        at = self.clock.now()
        return max(0.0, self.mark.now(at) - at.wall)

    async def check(self) -> None:
        """Look at the system clock: a rollback found, or one ended, is recorded."""
        lag = self.lag()
        if lag > self.skew and self.behind is None:
            self.behind = lag
            self._hold(lag)
            log.error(
                "event=clock_rollback behind=%.0f skew=%g: new grants of vendor licences "
                "are held until the clock is right",
                lag,
                self.skew,
            )
            await self._record(Kind.CLOCK_ROLLBACK, lag)
        elif lag <= self.skew and self.behind is not None:
            self.behind = None
            self._hold(None)
            log.warning("event=clock_restored behind=%.0f", lag)
            await self._record(Kind.CLOCK_RESTORED, lag)

    def _hold(self, lag: float | None) -> None:
        if self._service is None:
            return
        self._service.engine.clock_held = None if lag is None else held_message(lag)

    async def _record(self, kind: Kind, lag: float) -> None:
        if self._service is None:
            return
        at = self.now()
        detail = {"behind": round(lag, 3), "skew": self.skew, "system_wall": self.clock.now().wall}
        await self._service.record(Event(kind, at.wall, detail=detail))

    async def checkpoint(self) -> None:
        """Take in the system clock, and record the mark; a failure is logged (the next
        one may succeed)."""
        at = self.clock.now()
        self.mark.seen(at.wall, at)
        try:
            await self.store.put_wall_mark(self.mark.now(at))
        except StoreError as exc:
            log.warning("event=wall_mark_not_recorded error=%r", str(exc))

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Forever, every CHECKPOINT_EVERY: look at the clock and checkpoint the mark (the
        daemon looks once itself at start, before it listens)."""
        while True:
            await sleep(CHECKPOINT_EVERY)
            await self.check()
            await self.checkpoint()


def held_message(lag: float) -> str:
    """Why a vendor licence's new grants are held: the wall clock is behind."""
    return (
        f"the server's clock is {lag:.0f} s behind the latest time it has seen (was it set "
        "back?): new seats of vendor licences are held until it is right; leases held go on"
    )
