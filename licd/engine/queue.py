"""The fair queue: checkouts that asked to wait (`queue: true`) when no seat was free.

Each licence has one `WaitQueue`, ordered by priority class (higher first), then by
arrival. A `Waiter` is one queued checkout: what it asked for, who asked, and whether a
connection still listens for it. A waiter whose connection ended is *detached*: it keeps
its place until `leave_at` (one heartbeat interval) so that its client may take it back
by sending the same checkout again, but it is never served while detached.

Who gets a freed seat, and when, is the engine's to decide (`Engine.serve_queue`,
`Engine.hand_over`); this module only keeps the order and estimates waits. Pure: every
time is given.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from licd_client.messages import Holder

#: Hand-overs remembered per licence for the wait estimate.
SERVED_SAMPLES = 8


@dataclass(slots=True, eq=False)
class Waiter:
    """One queued checkout."""

    licence_id: str
    holder: Holder
    ip: str | None
    request: str
    seats: int
    ttl: float | None  # as asked (None: the licence's default)
    priority: int
    seq: int  # arrival order, within the daemon's life
    since_mono: float
    since_wall: float
    delegate: bytes | None = None
    leave_at: float | None = None  # monotonic: detached, and gone at this time
    blocked_by: str = "seats"  # the rule that kept it waiting when last asked
    #: Whoever listens for this waiter's outcome (the daemon's shell); opaque here.
    listener: object | None = None

    @property
    def request_key(self) -> tuple[str, str, str]:
        return (self.licence_id, self.holder.hostid, self.request)

    @property
    def attached(self) -> bool:
        return self.leave_at is None

    @property
    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class WaitQueue:
    """One licence's waiters in the order they are served."""

    __slots__ = ("_waiters", "_served")

    def __init__(self) -> None:
        self._waiters: list[Waiter] = []
        self._served: deque[float] = deque(maxlen=SERVED_SAMPLES)  # monotonic times

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._waiters))

    def add(self, waiter: Waiter) -> None:
        orders = [w.order for w in self._waiters]
        self._waiters.insert(bisect.bisect(orders, waiter.order), waiter)

    def remove(self, waiter: Waiter) -> None:
        self._waiters.remove(waiter)

    def position(self, waiter: Waiter) -> int:
        """1 for the next to be served."""
        return self._waiters.index(waiter) + 1

    def ahead(self, priority: int) -> list[Waiter]:
        """The attached waiters a newcomer of `priority` would wait behind."""
        return [w for w in self._waiters if w.attached and w.priority >= priority]

    def served(self, at: float) -> None:
        """A waiter got a seat at monotonic time `at` (for the estimate)."""
        self._served.append(at)

    def wait_estimate(self, position: int) -> float | None:
        """Seconds until the waiter at `position` is served, at the pace of the latest
        hand-overs; None until two have happened (nothing to judge the pace by)."""
        served = self._served
        if len(served) < 2:
            return None
        pace = (served[-1] - served[0]) / (len(served) - 1)
        return round(pace * position, 1)
