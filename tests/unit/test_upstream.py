"""The site router's upstream link (licd/shells/upstream.py), without sockets: how upstream's
answers are classified, how often a fault is logged, the link's state and what status
shows of it, and when the link's keeper dials again. Time is passed in."""

from __future__ import annotations

import itertools
import random

import pytest

from licd.cli.format import link_fields, when
from licd.clock import Instant
from licd.shells.upstream import (
    DECISIONS,
    REDIAL,
    STEADY,
    FaultLog,
    LinkState,
    Redial,
    UpstreamFault,
    classify,
)
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
