"""The site router's rules (licd/core/relay.py), without sockets: the wall-clock mark, a
block's remaining life, its renewal schedule and what the engine serves it until, and
the keys blocks are asked for with. Time is passed in. (The upstream link's rules are
tests/unit/test_upstream.py's.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from licd.clock import Instant
from licd.core.relay import WallMark, remaining_life, renewal_at, request_key, served_until
from licd.store.sqlite import Store

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


async def test_the_stored_mark_only_ever_grows(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "licd.db")
    writer = asyncio.create_task(store.run())
    try:
        assert await store.load_wall_mark() is None
        await store.put_wall_mark(87400.0)
        await store.put_wall_mark(1000.0)  # a clock set back: the mark stays
        assert await store.load_wall_mark() == 87400.0
        await store.put_wall_mark(87460.5)
        assert await store.load_wall_mark() == 87460.5
    finally:
        await store.close()
        await writer


def test_remaining_life_is_judged_from_the_effective_wall_time() -> None:
    assert remaining_life(10_000.0, 7_400.0) == 2600.0
    assert remaining_life(10_000.0, 10_500.0) == 0.0  # lapsed: never negative


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


def test_block_request_keys_carry_128_random_bits() -> None:
    keys = {request_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(k) >= 22 and len(k.removeprefix("block-")) == 32 for k in keys)
