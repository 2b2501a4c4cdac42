"""A lease: seats of one licence held by one holder until it lapses or is released.

The persistent fields are what the store writes; `reclaim_at` and `state` are runtime
bookkeeping owned by the engine. The lease secret is what the holder presents to renew
or release; the handle is its public name and reveals nothing of the secret.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from licd.engine.endings import Ending
from licd_client.messages import Holder


class LeasePhase(enum.Enum):
    PENDING = "pending"  # granted in memory, its commit not yet confirmed
    LIVE = "live"  # committed; counted; renewable
    RELEASING = "releasing"  # checkin or reclaim under way; still counted until committed
    LINGERING = "lingering"  # checked in, its seat kept for its holder a while (`linger`)


@dataclass(slots=True, eq=False)
class SeatLease:
    secret: str
    handle: str
    licence_id: str
    holder: Holder
    request: str
    seats: int
    ttl: float  # the lease length granted on each renewal, seconds
    created: float  # wall
    expires: float  # wall: what the holder was told
    last_heartbeat: float  # wall
    delegate: bytes | None = None
    ip: str | None = None  # the address it was checked out from
    overdraft: bool = False  # granted beyond the licence's seats, within its overdraft
    device: bool = False  # a device lease: kept for its period, checkin does not free it
    unit: str = ""  # what shares its seat (engine.seats), fixed when it is granted
    reclaim_at: float = 0.0  # monotonic: the seat may be reused after this
    state: LeasePhase = LeasePhase.LIVE
    # Runtime bookkeeping of the engine's, never persisted:
    scheduled: float | None = None  # monotonic: its entry in the reclaim heap, if any
    renewals: float = 0.0  # renewals it may still make at once (a token bucket) ...
    renewed_at: float = 0.0  # ... as of this monotonic time
    asked: tuple[int, float | None] | None = None  # its checkout's seats and ttl
    ending: Ending | None = None  # why it is releasing, when it was taken away (revoke, reclaim)
    # Idleness, as its heartbeats' `idle_for` report it (monotonic times):
    idle_since: float | None = None  # idle from then on (None: in use, or never said)
    idle_total: float = 0.0  # seconds idle so far, as reported
    idle_warned: float | None = None  # the holder was told it would be reclaimed
    linger_until: float | None = None  # monotonic: checked in, its seat kept until then
    lingered: bool = False  # granted on the seat its holder's lingering lease kept

    @property
    def request_key(self) -> tuple[str, str, str]:
        return (self.licence_id, self.holder.hostid, self.request)
