"""A site router's block rules, pure: what a block of seats from upstream must be, what
the engine serves from it, and when its keeper acts (docs/router.md, "Block mode").

- a block reply is accepted only if its verified token delegates to this router's key,
  grants no more seats than were asked, and says the same seats as the reply (`refusal`);
- the engine serves it as a licence with the block's seats, expiry, product and
  features, and 0 seats once upstream revoked it (`block_licence`); a revoked block
  ends when the last sub-lease already granted runs out (`revoke`);
- time: a block lasts for elapsed monotonic time; after a restart, what it has left is
  judged on the daemon's clock, whose wall time is never set back (licd.core.clock_guard),
  so a wall clock set back lengthens nothing; the engine sees its monotonic deadline on
  the wall clock (`served_until`);
- its keeper renews it every `renew_every`, or when half its remaining life is gone if
  sooner (`renewal_at`), retries with backoff through outages, stops serving it at its
  deadline, and drops a revoked one once its sub-leases ran out (`plan`, on the
  `Timeline` of licd_client.timeline, which a client's lease runs on too).

Every time is passed in (an `Instant`, or monotonic seconds); the backoff's delays come
from a factory the caller gives. Nothing here reads a clock, sleeps, or does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from licd.clock import Instant
from licd.engine.licence import Licence
from licd_client.messages import Features
from licd_client.timeline import Timeline

#: Seconds a block's keeper waits at least before trying again after a failed attempt.
MIN_RETRY = 1.0


# ----------------------------------------------------------------------------- time


def on_wall(mono: float, at: Instant) -> float:
    """Monotonic time `mono` as the wall clock at `at` shows it."""
    return at.wall + (mono - at.mono)


def remaining_life(expires: float, effective_now: float) -> float:
    """Seconds left of something expiring at wall time `expires`, after a restart: judged
    from the daemon's wall time (never set back), `effective_now`."""
    return max(0.0, expires - effective_now)


def renewal_at(mono: float, due_in: float, deadline: float) -> float:
    """The monotonic time of a block's next renewal, decided at `mono`: in `due_in`
    seconds (its `renew_every`), brought forward to when half the block's remaining
    life is gone if that is sooner (a block granted shorter than asked is renewed in
    time too)."""
    return mono + max(0.0, min(due_in, (deadline - mono) / 2))


def served_until(expires: float, deadline: float, at: Instant) -> float:
    """The wall time until which the engine serves a block, seen at `at`: its monotonic
    deadline on the wall clock, never past the expiry upstream granted (the sub-leases'
    tokens must not outlive the block's)."""
    return min(expires, on_wall(deadline, at))


# ----------------------------------------------------------------- what is served


class Relayed(Protocol):
    """A block-mode licence as configured (licd.config's `RelayedLicence`)."""

    @property
    def key(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def block_seats(self) -> int | None: ...
    @property
    def lease_ttl(self) -> float: ...
    @property
    def grace(self) -> float: ...


class Claims(Protocol):
    """What a block's verified token says (licd_client.tokens' `Statement`)."""

    @property
    def delegate(self) -> bytes | None: ...
    @property
    def seats(self) -> int | None: ...
    @property
    def product(self) -> str | None: ...
    @property
    def features(self) -> Features: ...


def refusal(relayed: Relayed, claims: Claims, seats: int, key: bytes) -> str | None:
    """Why a block reply of `seats`, whose token (verified) says `claims`, is refused by
    the router whose key is `key`; None to accept it."""
    if claims.delegate != key:
        return "the block does not delegate to this router's key"
    if seats > (relayed.block_seats or 0):
        return f"a block of {seats} seats, more than the {relayed.block_seats} asked"
    if claims.seats != seats:
        return "the block token's seats differ from the reply's"
    return None


def block_licence(
    relayed: Relayed, claims: Claims, *, seats: int, expires: float, revoked: bool
) -> Licence:
    """The licence the engine serves a block as: the block's seats (none once revoked:
    issuing stopped), expiry, product and features, the configured sub-lease terms."""
    product = claims.product
    return Licence(
        key=relayed.key,
        id=relayed.id,
        product=relayed.id if product is None else product,
        seats=0 if revoked else max(seats, 0),
        lease_ttl=relayed.lease_ttl,
        grace=relayed.grace,
        expires=expires,
        features=claims.features,
    )


@dataclass(frozen=True)
class Revoked:
    """A block upstream no longer counts, as it now ends."""

    expires: float  # wall time: no later than the last sub-lease's expiry
    deadline: float  # monotonic time it lapses at


def revoke(expires: float, deadline: float, at: Instant, sub_leases: Iterable[float]) -> Revoked:
    """A block expiring at `expires` (wall) and `deadline` (monotonic), revoked at `at`
    with sub-leases out until the wall times `sub_leases`: those run out at the expiries
    they already have (no renewal passes them), and the block's end becomes that
    horizon, or `at` without any. After it, a new block may be taken."""
    horizon = max([at.wall, *sub_leases])
    return Revoked(
        expires=min(expires, horizon),
        deadline=min(deadline, at.mono + remaining_life(horizon, at.wall)),
    )


# ------------------------------------------------------------------- when to act


class Act(enum.Enum):
    """What a block's keeper does once it has waited."""

    TAKE = "take"  # no block: take one upstream
    RENEW = "renew"  # renew the block held
    DROP = "drop"  # a revoked block's sub-leases ran out: forget it, then take a new one


def plan(timeline: Timeline, mono: float, *, held: bool, revoked: bool) -> tuple[float, Act]:
    """A block keeper's next step at `mono`: seconds to wait, then what to do. A revoked
    block is never renewed: its keeper waits for its deadline, then drops it. Whatever
    it waits for, the keeper refreshes what the engine serves when it wakes."""
    if held and revoked:
        return max(0.0, timeline.deadline - mono), Act.DROP
    return timeline.wake(mono), Act.RENEW if held else Act.TAKE
