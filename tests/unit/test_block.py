"""A site router's block rules (licd/engine/block.py), pure, every time given: the
wall-clock mark, a block's remaining life, its renewal schedule and what the engine
serves it until, which block replies are refused, the licence a block is served as,
the end of a revoked block, and the keeper's plan. (The timeline the plan reads is
tests/unit/test_timeline.py's; the router that acts on them is tests/unit/test_router.py's;
against a vendor licd, tests/integration's.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from licd.clock import Instant, WallMark
from licd.config.settings import RelayedLicence
from licd.engine.block import (
    Act,
    block_licence,
    on_wall,
    plan,
    refusal,
    remaining_life,
    renewal_at,
    revoke,
    served_until,
)
from licd_client.messages import Features
from licd_client.timeline import Timeline
from tests.unit.test_timeline import steps

ROUTER_KEY = b"R" * 32
BLOCK = RelayedLicence(
    key="VEND-0001",
    id="site-dicom",
    mode="block",
    block_seats=3,
    block_ttl=3600.0,
    renew_every=600.0,
    lease_ttl=90.0,
    grace=15.0,
)


@dataclass(frozen=True)
class Claims:
    """What a verified block token says (as licd_client.tokens.Statement does)."""

    seats: int | None = 3
    delegate: bytes | None = ROUTER_KEY
    product: str | None = "dicom"
    features: Features = field(default_factory=lambda: {"tier": "pro"})


# ------------------------------------------------------------------- the wall mark


def test_the_wall_mark_never_goes_back_and_moves_on_with_monotonic_time() -> None:
    mark = WallMark(wall=5000.0, mono=100.0)
    assert mark.now(Instant(wall=5010.0, mono=110.0)) == 5010.0
    # The wall clock set back a day: the mark moves on with the monotonic clock.
    assert mark.now(Instant(wall=5020.0 - 86400, mono=120.0)) == 5020.0
    # Set forward: the wall clock is later than anything known, so it is the mark.
    assert mark.now(Instant(wall=9000.0, mono=130.0)) == 9000.0


def test_a_stored_mark_read_back_after_a_restart_wins_over_a_clock_set_back() -> None:
    at = Instant(wall=1000.0, mono=7.0)  # a new boot: monotonic time starts afresh
    mark = WallMark(at.wall, at.mono)
    mark.seen(87400.0, at)
    assert mark.now(at) == 87400.0
    assert mark.now(Instant(wall=1060.0, mono=67.0)) == 87460.0
    mark.seen(50.0, at)  # an older checkpoint changes nothing
    assert mark.now(at) == 87400.0


def test_remaining_life_is_judged_from_the_effective_wall_time() -> None:
    assert remaining_life(10_000.0, 7_400.0) == 2600.0
    assert remaining_life(10_000.0, 10_500.0) == 0.0  # lapsed: never negative


def test_a_monotonic_time_on_the_wall_clock() -> None:
    at = Instant(wall=1_790_000_000.0, mono=1000.0)
    assert on_wall(1600.0, at) == 1_790_000_600.0
    assert on_wall(400.0, at) == 1_789_999_400.0


# ---------------------------------------------------------------- renewal schedule


def test_renewal_is_due_after_renew_every_when_half_the_life_left_is_longer() -> None:
    assert renewal_at(1000.0, 600.0, 1000.0 + 3600) == 1600.0


def test_renewal_is_brought_forward_to_half_the_blocks_remaining_life() -> None:
    # A block granted 1000 s when the router renews every 600 s: due after 500 s.
    assert renewal_at(1000.0, 600.0, 1000.0 + 1000) == 1500.0
    # Decided later in the block's life (after a restart): half of what is left.
    assert renewal_at(2000.0, 86400.0, 2000.0 + 300) == 2150.0


def test_renewal_of_a_lapsed_block_or_an_overdue_one_is_due_at_once() -> None:
    assert renewal_at(1000.0, 600.0, 900.0) == 1000.0
    assert renewal_at(1000.0, 0.0, 5000.0) == 1000.0


# --------------------------------------------------------- what the engine serves


def test_the_engine_serves_a_block_until_its_monotonic_deadline_on_the_wall_clock() -> None:
    expires = 1_790_003_600.0  # granted by upstream
    # Wall clock right: the deadline falls on the granted expiry.
    assert served_until(expires, 4600.0, Instant(1_790_000_000.0, 1000.0)) == expires
    # Set back a day: the block lapses a day earlier on this clock, on time in reality.
    behind = Instant(1_790_000_000.0 - 86400, 1000.0)
    assert served_until(expires, 4600.0, behind) == expires - 86400
    # Never past what upstream granted, whatever the monotonic clock says.
    assert served_until(expires, 9000.0, Instant(1_790_000_000.0, 1000.0)) == expires
    # Past the deadline: already over.
    assert served_until(expires, 900.0, Instant(1_790_000_000.0, 1000.0)) < 1_790_000_000.0


def test_a_block_as_asked_delegating_to_the_router_is_accepted() -> None:
    assert refusal(BLOCK, Claims(seats=3), 3, ROUTER_KEY) is None
    assert refusal(BLOCK, Claims(seats=2), 2, ROUTER_KEY) is None  # fewer: upstream's call


@pytest.mark.parametrize(
    ("claims", "seats", "why"),
    [
        (Claims(delegate=None), 3, "the block does not delegate to this router's key"),
        (Claims(delegate=b"V" * 32), 3, "the block does not delegate to this router's key"),
        (Claims(seats=5), 5, "a block of 5 seats, more than the 3 asked"),
        (Claims(seats=3), 2, "the block token's seats differ from the reply's"),
        (Claims(seats=None), 3, "the block token's seats differ from the reply's"),
    ],
)
def test_a_block_not_as_asked_is_refused_saying_why(claims: Claims, seats: int, why: str) -> None:
    assert refusal(BLOCK, claims, seats, ROUTER_KEY) == why


def test_a_block_is_served_with_its_own_terms_and_the_configured_sub_lease_ones() -> None:
    licence = block_licence(BLOCK, Claims(), seats=3, expires=1_790_003_600.0, revoked=False)
    assert (licence.key, licence.id, licence.product) == (BLOCK.key, BLOCK.id, "dicom")
    assert (licence.seats, licence.expires, licence.features) == (
        3,
        1_790_003_600.0,
        {"tier": "pro"},
    )
    assert (licence.lease_ttl, licence.grace) == (BLOCK.lease_ttl, BLOCK.grace)
    # A token without a product: the licence's own id stands for it.
    assert (
        block_licence(BLOCK, Claims(product=None), seats=3, expires=1.0, revoked=False).product
        == BLOCK.id
    )


def test_a_revoked_block_is_served_with_no_seats() -> None:
    assert block_licence(BLOCK, Claims(), seats=3, expires=1.0, revoked=True).seats == 0
    assert block_licence(BLOCK, Claims(), seats=-2, expires=1.0, revoked=False).seats == 0


def test_a_revoked_block_ends_with_its_last_sub_lease() -> None:
    at = Instant(wall=1_790_000_000.0, mono=1000.0)
    end = revoke(1_790_003_600.0, 4600.0, at, [at.wall + 60, at.wall + 90, at.wall + 30])
    assert (end.expires, end.deadline) == (at.wall + 90, 1090.0)


def test_a_revoked_block_without_sub_leases_ends_now() -> None:
    at = Instant(wall=1_790_000_000.0, mono=1000.0)
    assert revoke(1_790_003_600.0, 4600.0, at, []) == revoke(1_790_003_600.0, 4600.0, at, [0.0])
    end = revoke(1_790_003_600.0, 4600.0, at, [])
    assert (end.expires, end.deadline) == (at.wall, 1000.0)


def test_revoking_never_lengthens_a_block() -> None:
    at = Instant(wall=1_790_000_000.0, mono=1000.0)
    # A sub-lease out past the block's end (it cannot be, but the end stays the block's).
    end = revoke(at.wall + 50, 1050.0, at, [at.wall + 90])
    assert (end.expires, end.deadline) == (at.wall + 50, 1050.0)
    # The wall clock set back a day since a sub-lease was granted: on this clock it
    # looks a day longer, but the block still ends by its own monotonic deadline.
    behind = Instant(wall=at.wall - 86400, mono=1000.0)
    assert revoke(at.wall + 3600, 4600.0, behind, [at.wall + 90]).deadline == 4600.0
    # A sub-lease granted on that clock: the block ends with it, 90 s on.
    assert revoke(at.wall + 3600, 4600.0, behind, [behind.wall + 90]).deadline == 1090.0


# ------------------------------------------------------------- the keeper's plan


def test_the_keeper_takes_a_block_when_none_is_held_and_renews_one_that_is() -> None:
    timeline = Timeline(lambda: steps(2.0))
    assert plan(timeline, 1000.0, held=False, revoked=False) == (0.0, Act.TAKE)
    timeline.failed(1000.0)
    assert plan(timeline, 1000.0, held=False, revoked=False) == (2.0, Act.TAKE)
    timeline.renewed(deadline=4600.0, renew_at=1600.0)
    assert plan(timeline, 1000.0, held=True, revoked=False) == (600.0, Act.RENEW)


def test_the_keeper_never_renews_a_revoked_block_and_drops_it_at_its_deadline() -> None:
    timeline = Timeline(lambda: steps(2.0))
    timeline.renewed(deadline=1090.0, renew_at=1050.0)  # a renewal was due sooner
    assert plan(timeline, 1000.0, held=True, revoked=True) == (90.0, Act.DROP)
    assert plan(timeline, 1090.0, held=True, revoked=True) == (0.0, Act.DROP)
    assert plan(timeline, 2000.0, held=True, revoked=True) == (0.0, Act.DROP)
