"""Unit tests of licd_client.backoff: bounded, jittered delays, the retry classifier and
the wait a daemon asks for."""

from __future__ import annotations

import itertools
import random

import pytest

from licd_client import errors
from licd_client.backoff import Backoff, asked_delay, is_retryable, retry_delay


def take(backoff: Backoff, n: int, seed: int = 1) -> list[float]:
    return list(itertools.islice(backoff.delays(random.Random(seed)), n))


def test_delays_are_within_the_growing_ceiling_and_the_cap() -> None:
    backoff = Backoff(base=0.5, factor=2.0, cap=8.0)
    delays = take(backoff, 200)
    for n, delay in enumerate(delays):
        assert 0.0 <= delay <= min(8.0, 0.5 * 2.0**n)
    # Past the cap every delay is bounded by the cap, and the ceiling never overflows.
    assert max(delays) <= 8.0
    assert all(d == d for d in take(backoff, 5000))  # no NaN from an inf ceiling


def test_delays_are_jittered_not_constant() -> None:
    delays = take(Backoff(base=1.0, factor=2.0, cap=4.0), 50)[5:]  # all at the cap
    assert len(set(delays)) == len(delays)
    assert min(delays) < 2.0 < max(delays)


def test_seeded_rng_makes_delays_reproducible() -> None:
    backoff = Backoff()
    assert take(backoff, 20, seed=7) == take(backoff, 20, seed=7)
    assert take(backoff, 20, seed=7) != take(backoff, 20, seed=8)


def test_full_jitter_mean_is_half_the_cap() -> None:
    delays = take(Backoff(base=2.0, factor=1.0, cap=2.0), 4000)
    assert 0.9 < sum(delays) / len(delays) < 1.1


@pytest.mark.parametrize(
    ("base", "factor", "cap"), [(0.0, 2.0, 1.0), (1.0, 0.5, 2.0), (2.0, 2.0, 1.0)]
)
def test_bad_parameters_are_rejected(base: float, factor: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, factor=factor, cap=cap)


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (errors.ConnectionLost("gone"), True),
        (ConnectionRefusedError(), True),
        (OSError("network unreachable"), True),
        (TimeoutError(), True),
        (errors.SeatsExhausted(), True),
        (errors.RateLimited(), True),
        (errors.Unavailable(), True),
        (errors.ShuttingDown(), True),
        (errors.TooManyConnections(), True),
        (errors.UpstreamUnavailable(), True),
        (errors.LeaseUnknown(), False),
        (errors.LicenceExpired(), False),
        (errors.UnknownLicence(), False),
        (errors.Denied(), False),
        (errors.BadRequest(), False),
        (errors.Internal(), False),
        (errors.TokenInvalid("bad"), False),
        (errors.ProtocolViolation("bad"), False),
        (ValueError("bug"), False),
    ],
)
def test_is_retryable_classifies(exc: Exception, retryable: bool) -> None:
    assert is_retryable(exc) is retryable


def test_every_wire_error_is_classified_by_its_flag() -> None:
    for cls in errors.REGISTRY.values():
        assert is_retryable(cls()) is cls.retryable


def test_the_delay_asked_for_is_retry_after_of_a_daemon_error_only() -> None:
    assert asked_delay(errors.RateLimited(retry_after=3.0)) == 3.0
    assert asked_delay(errors.RateLimited(retry_after=-1.0)) == 0.0
    assert asked_delay(errors.Unavailable()) == 0.0
    assert asked_delay(errors.ConnectionLost("x")) == 0.0


def test_retry_after_lengthens_the_delay() -> None:
    assert retry_delay(errors.RateLimited(retry_after=3.0), 0.2) == 3.0
    assert retry_delay(errors.RateLimited(retry_after=0.1), 0.2) == 0.2
    assert retry_delay(errors.ConnectionLost("x"), 0.2) == 0.2
