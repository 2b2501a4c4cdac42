"""The per-peer token buckets, on a fake clock: budgets, refill, retry_after, memory."""

from __future__ import annotations

import pytest

from licd.clock import ManualClock
from licd.engine.ratelimit import CheckoutLimits, PeerBuckets


def test_a_peer_spends_its_burst_then_waits_for_the_rate() -> None:
    clock = ManualClock()
    buckets = PeerBuckets(rate=2.0, burst=3)
    now = clock.now().mono
    for _ in range(3):
        assert buckets.wait("10.0.0.1", now) == 0.0
        buckets.spend("10.0.0.1", now)
    assert buckets.wait("10.0.0.1", now) == pytest.approx(0.5)  # one token at 2 a second
    clock.advance(0.25)
    assert buckets.wait("10.0.0.1", clock.now().mono) == pytest.approx(0.25)
    clock.advance(0.25)
    assert buckets.wait("10.0.0.1", clock.now().mono) == 0.0
    assert buckets.wait("10.0.0.2", now) == 0.0  # another peer has a budget of its own


def test_refill_stops_at_the_burst_and_a_clock_that_goes_back_adds_nothing() -> None:
    buckets = PeerBuckets(rate=1.0, burst=2)
    buckets.spend("p", 100.0)
    buckets.spend("p", 100.0)
    assert buckets.wait("p", 50.0) == pytest.approx(1.0)  # an earlier time refills nothing
    buckets.spend("p", 1000.0)  # long idle: back to the burst (2), not 900
    buckets.spend("p", 1000.0)
    assert buckets.wait("p", 1000.0) == pytest.approx(1.0)


def test_spending_past_empty_is_a_debt_bounded_by_the_burst() -> None:
    buckets = PeerBuckets(rate=1.0, burst=2)
    for _ in range(10):  # admitted together, charged after (a router's relayed checkouts)
        buckets.spend("p", 0.0)
    assert buckets.wait("p", 0.0) == pytest.approx(3.0)  # from -2 to 1


def test_full_idle_buckets_are_dropped_and_the_table_is_capped() -> None:
    buckets = PeerBuckets(rate=10.0, burst=5, max_peers=3)
    buckets.spend("a", 0.0)
    buckets.spend("b", 0.0)
    assert len(buckets) == 2
    buckets.spend("c", 1.0)  # a and b have refilled by now: forgotten, as if never seen
    assert len(buckets) == 1
    for peer in ("a", "b", "d"):
        buckets.spend(peer, 1.0)
    assert len(buckets) == 3
    assert buckets.wait("c", 1.0) == 0.0  # c went (least recent) to make room for d
    for _ in range(4):
        buckets.spend("d", 1.0)
    assert buckets.wait("d", 1.0) > 0


def test_bad_parameters_are_refused() -> None:
    for rate, burst in ((0.0, 1), (1.0, 0), (-1.0, 5)):
        with pytest.raises(ValueError):
            PeerBuckets(rate, burst)


def test_checkout_limits_refuse_when_either_budget_is_spent() -> None:
    limits = CheckoutLimits(PeerBuckets(rate=1.0, burst=2), PeerBuckets(rate=4.0, burst=1))
    assert limits.refusal("p", 0.0) is None
    limits.charge("p", 0.0, granted=False)
    assert limits.refusal("p", 0.0) is None  # one denial left
    limits.charge("p", 0.0, granted=False)
    assert limits.refusal("p", 0.0) == pytest.approx(1.0)  # denials spent
    assert limits.refusal("q", 0.0) is None
    limits.charge("q", 0.0, granted=True)
    assert limits.refusal("q", 0.0) == pytest.approx(0.25)  # grants spent
    assert limits.refusal("q", 0.25) is None
