"""The site router's rules (licd/relay.py), without sockets: how upstream's answers are
classified, how often a fault is logged, the wall-clock mark, a block's remaining life,
its renewal schedule and what the engine serves it until, the link's state and what
status shows of it, and when the link's keeper dials again. Time is passed in."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import pytest

from licd.cli_format import link_fields, when
from licd.clock import Instant
from licd.relay import (
    DECISIONS,
    REDIAL,
    STEADY,
    FaultLog,
    LinkState,
    Redial,
    UpstreamFault,
    WallMark,
    classify,
    remaining_life,
    renewal_at,
    request_key,
    served_until,
)
from licd.store import Store
from licd_client import errors
from licd_client.errors import (
    ConnectionLost,
    LicdError,
    ProtocolViolation,
    RateLimited,
    SeatsExhausted,
    UpstreamUnavailable,
)

#: The codes that are decisions about the client's request (docs/router.md).
DECISION_CODES = {
    "unknown_licence",
    "licence_expired",
    "licence_not_yet_valid",
    "seats_exhausted",
    "lease_unknown",
    "denied",
    "quota_exhausted",
    "rate_limited",
}
SECRET = "upstream says \x1b[31mthis\n and nothing of it reaches the client"


# ------------------------------------------------------------------ classification


def test_the_decisions_are_exactly_the_documented_codes() -> None:
    assert {cls.code for cls in DECISIONS} == DECISION_CODES
    assert set(errors.REGISTRY) > DECISION_CODES


@pytest.mark.parametrize("code", sorted(DECISION_CODES))
def test_a_decision_passes_through_as_it_is(code: str) -> None:
    exc = errors.from_wire(code, SECRET, retry_after=7.5, detail={"in_use": 3})
    assert classify(exc) is exc


def test_rate_limited_keeps_its_retry_after_and_seats_exhausted_its_detail() -> None:
    limited = classify(RateLimited("slow down", retry_after=12.0))
    assert (limited.code, limited.retry_after) == ("rate_limited", 12.0)
    exhausted = classify(SeatsExhausted(detail={"in_use": 3, "total": 3}))
    assert exhausted.detail == {"in_use": 3, "total": 3}


@pytest.mark.parametrize("code", sorted(set(errors.REGISTRY) - DECISION_CODES))
def test_any_other_code_is_a_fault_and_upstream_unavailable(code: str) -> None:
    out = classify(errors.from_wire(code, SECRET, retry_after=5.0, detail={"x": SECRET}))
    assert isinstance(out, UpstreamFault)
    assert out.code == "upstream_unavailable" and out.retryable
    assert out.message == f"the upstream licence server failed the request ({code})"
    assert (out.retry_after, out.detail) == (None, None)  # nothing of upstream's goes on
    assert out.kind == code and out.cause == f"{code}: {SECRET}"


def test_an_unknown_code_is_a_fault_of_its_own_kind() -> None:
    out = classify(errors.from_wire("invented_later", SECRET))
    assert isinstance(out, UpstreamFault) and out.kind == "internal"
    assert SECRET not in out.message


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (ConnectionLost("refused"), "unreachable", UpstreamUnavailable.default_message),
        (OSError(113, "no route"), "unreachable", UpstreamUnavailable.default_message),
        (TimeoutError(), "unreachable", UpstreamUnavailable.default_message),
        (
            ProtocolViolation(f"checkout reply: {SECRET}"),
            "out_of_protocol",
            "the upstream licence server answered out of protocol",
        ),
    ],
)
def test_a_link_failure_is_a_fault(exc: Exception, kind: str, message: str) -> None:
    out = classify(exc)
    assert isinstance(out, UpstreamFault)
    assert (out.kind, out.message, out.code) == (kind, message, "upstream_unavailable")
    assert out.cause == (str(exc) or "TimeoutError")


def test_a_fault_is_never_a_code_that_closes_the_connection() -> None:
    for code in errors.REGISTRY:
        out: LicdError = classify(errors.from_wire(code, "x"))
        assert out.code not in {"bad_request", "frame_too_large", "hello_required"}


# ------------------------------------------------------------------------ fault log


def test_each_kind_of_fault_is_logged_once_per_quiet_period_with_the_count_unlogged() -> None:
    faults = FaultLog(quiet=300.0)
    assert faults.admit("bad_request", 1000.0) == 0
    assert [faults.admit("bad_request", 1000.0 + i) for i in range(1, 6)] == [None] * 5
    assert faults.admit("unreachable", 1001.0) == 0  # another kind: logged at once
    assert faults.admit("bad_request", 1299.9) is None
    assert faults.admit("bad_request", 1300.0) == 6  # 5 + the one just above
    assert faults.admit("bad_request", 1300.1) is None


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


# ------------------------------------------------------------------ the link's state

START = Instant(wall=1_790_000_000.0, mono=1000.0)


def test_a_new_link_is_connecting_since_the_start_then_connected_at_the_first_answer() -> None:
    state = LinkState(since=START.wall)
    assert state.to_json(START) == {
        "state": "connecting",
        "connected": False,
        "since": START.wall,
        "last_error": None,
        "last_error_at": None,
        "recovered_at": None,
        "next_attempt": None,
    }
    assert state.up(START.wall + 0.2) is True  # news: logged
    assert state.up(START.wall + 5) is False  # already up: `since` stays
    shown = state.to_json(START)
    assert (shown["state"], shown["connected"], shown["since"]) == (
        "connected",
        True,
        START.wall + 0.2,
    )
    assert shown["recovered_at"] is None  # nothing to recover from


def test_a_link_down_from_the_start_has_not_been_up_since_the_start() -> None:
    state = LinkState(since=START.wall)
    assert state.down(START.wall + 1, "refused") is False  # it never was up: no news
    state.next_attempt = START.mono + 3  # the keeper waits to dial again
    shown = state.to_json(START.after(1))
    assert (shown["state"], shown["since"]) == ("down", START.wall)
    assert (shown["last_error"], shown["last_error_at"]) == ("refused", START.wall + 1)
    assert shown["next_attempt"] == START.wall + 3


def test_down_and_up_again_keeps_the_error_with_its_time_and_when_it_recovered() -> None:
    state = LinkState(since=START.wall)
    state.up(START.wall)
    assert state.down(START.wall + 60, "cannot reach") is True
    assert state.down(START.wall + 70, "cannot reach still") is False  # one outage
    shown = state.to_json(START)
    assert (shown["state"], shown["since"], shown["recovered_at"]) == (
        "down",
        START.wall + 60,
        None,
    )
    assert (shown["last_error"], shown["last_error_at"]) == ("cannot reach still", START.wall + 70)
    assert state.up(START.wall + 90) is True
    shown = state.to_json(START)
    assert (shown["state"], shown["since"]) == ("connected", START.wall + 90)
    assert (shown["last_error_at"], shown["recovered_at"]) == (START.wall + 70, START.wall + 90)


def test_an_error_upstream_answers_leaves_the_link_up_and_is_not_recovered_from() -> None:
    state = LinkState(since=START.wall)
    state.down(START.wall + 1, "refused")
    state.up(START.wall + 2)
    state.fault(START.wall + 30, "internal: upstream's own trouble")
    shown = state.to_json(START)
    assert (shown["state"], shown["since"]) == ("connected", START.wall + 2)
    assert (shown["last_error_at"], shown["recovered_at"]) == (START.wall + 30, None)


def test_status_shows_the_link_with_times_never_since_dash() -> None:
    state = LinkState(since=START.wall)
    assert link_fields(state.to_json(START)) == [
        ("link", f"connecting since {when(START.wall)} (not yet connected)"),
        ("last error", "-"),
    ]
    state.down(START.wall + 1, "cannot reach the licence daemon")
    state.next_attempt = START.mono + 5
    assert link_fields(state.to_json(START)) == [
        ("link", f"NOT connected since {when(START.wall)}, next attempt {when(START.wall + 5)}"),
        ("last error", f"{when(START.wall + 1)}  cannot reach the licence daemon"),
    ]
    state.next_attempt = None  # dialling now
    assert link_fields(state.to_json(START))[0] == (
        "link",
        f"NOT connected since {when(START.wall)}",
    )
    state.up(START.wall + 65)
    assert link_fields(state.to_json(START)) == [
        ("link", f"connected since {when(START.wall + 65)}"),
        (
            "last error",
            f"{when(START.wall + 1)}  cannot reach the licence daemon"
            f" (recovered at {when(START.wall + 65)})",
        ),
    ]


# ------------------------------------------------------------- the keeper's redials


class Highest(random.Random):
    """Draws the top of every range: each backoff step at its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_redial_waits_a_growing_capped_backoff_step_after_each_failed_attempt() -> None:
    redial = Redial(REDIAL, Highest())
    assert [redial.failed() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    jittered = Redial(REDIAL, random.Random(3))
    waits = [jittered.failed() for _ in range(8)]
    assert waits == list(itertools.islice(REDIAL.delays(random.Random(3)), 8))
    assert all(0 <= w <= min(30.0, 2.0**n) for n, w in enumerate(waits))


def test_redial_at_once_after_a_steady_connection_and_the_backoff_starts_over() -> None:
    redial = Redial(REDIAL, Highest())
    assert [redial.failed() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert redial.lost(STEADY) == 0.0  # upstream restarted, or closed an idle connection
    assert redial.failed() == 1.0


def test_redial_after_a_connection_that_ended_at_once_is_the_next_step_never_a_loop() -> None:
    redial = Redial(REDIAL, Highest())
    assert redial.failed() == 1.0
    assert [redial.lost(STEADY - 0.5) for _ in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
