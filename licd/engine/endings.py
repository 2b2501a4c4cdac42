"""Why the engine took a lease away (an admin's revoke, a reclaim after expiry + grace),
kept for a while so that its holder's next heartbeat or consume hears it: a
`lease_unknown` saying "revoked by the administrator: REASON" instead of nothing.

Memory is bounded twice: an entry is dropped once its holder can no longer be trying
(a revoked lease's own reclaim deadline, when its token has long expired; one lease
length after a reclaim), and at most `MAX_ENDINGS` are kept, those due to go soonest
dropped first. Memory only: a restart forgets them (the holder then hears a plain
`lease_unknown`). Pure: no I/O, no clock; times are the engine's monotonic seconds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from licd_client.errors import LeaseUnknown
from licd_client.safetext import one_line

REVOKED = "revoked"
RECLAIMED = "reclaimed"
IDLE = "idle"  # reclaimed for idleness (the licence's idle_timeout)
#: Endings kept at most: a mass revoke or reclaim cannot grow memory without end.
MAX_ENDINGS = 10_000
#: An admin's reason is passed on to the holder cut to this many characters (the audit
#: log keeps it whole).
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Ending:
    """How a lease ended: `kind` REVOKED (with the admin's `reason`, maybe ""),
    RECLAIMED or IDLE."""

    kind: str
    reason: str = ""

    def error(self) -> LeaseUnknown:
        """What a heartbeat or consume on the lease is answered."""
        if self.kind == REVOKED:
            text = "revoked by the administrator"
            if self.reason:  # the message stays one line; `detail.reason` is the data
                text += ": " + one_line(self.reason)
            return LeaseUnknown(text, detail={"revoked": True, "reason": self.reason})
        if self.kind == IDLE:
            return LeaseUnknown(
                "the lease was reclaimed: it was idle past the licence's idle_timeout",
                detail={"reclaimed": True, "idle": True},
            )
        return LeaseUnknown(
            "the lease was reclaimed: it was not renewed before its expiry and grace period",
            detail={"reclaimed": True},
        )


def revoked(reason: str) -> Ending:
    """An admin's revoke, its reason cut to MAX_REASON characters."""
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 1] + "…"
    return Ending(REVOKED, reason)


RECLAIM = Ending(RECLAIMED)
IDLE_RECLAIM = Ending(IDLE)


class Endings:
    """Endings by lease secret, each until a monotonic time."""

    def __init__(self, cap: int = MAX_ENDINGS) -> None:
        self._by_secret: dict[str, tuple[float, Ending]] = {}
        self._order: list[tuple[float, str]] = []  # (until, secret): a heap
        self._cap = cap

    def __len__(self) -> int:
        return len(self._by_secret)

    def remember(self, secret: str, ending: Ending, until: float) -> None:
        """Keep `ending` for the lease with `secret` (once: a lease is released once)."""
        self._by_secret[secret] = (until, ending)
        heapq.heappush(self._order, (until, secret))
        while len(self._by_secret) > self._cap:
            self._drop_first()

    def find(self, secret: str, now: float) -> Ending | None:
        """The ending of the lease with `secret`, if it is still kept at `now`."""
        found = self._by_secret.get(secret)
        return found[1] if found is not None and found[0] > now else None

    def forget_until(self, now: float) -> None:
        """Drop every ending kept only until `now` or earlier."""
        while self._order and self._order[0][0] <= now:
            self._drop_first()

    def _drop_first(self) -> None:
        _, secret = heapq.heappop(self._order)
        self._by_secret.pop(secret, None)
