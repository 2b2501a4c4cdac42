"""The timeline of something held for a while (licd_client/timeline.py), pure, every
time given: when it acts, how failures back off (at least a minimum, or what the caller
asks), and how a success or a release starts the backoff over. (A client's lease runs on
it: tests/unit/test_client.py; a router's block keeper too: tests/unit/test_block.py.)"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from licd_client.timeline import Timeline


def steps(*delays: float) -> Iterator[float]:
    """A backoff series: the given delays, then the last one for ever."""
    return itertools.chain(delays, itertools.repeat(delays[-1]))


def test_nothing_held_acts_at_once() -> None:
    timeline = Timeline(lambda: steps(5.0))
    assert (timeline.deadline, timeline.renew_at) == (0.0, None)
    assert timeline.wake(1000.0) == 0.0


def test_a_held_thing_wakes_for_its_renewal_or_its_deadline_whichever_is_sooner() -> None:
    timeline = Timeline(lambda: steps(5.0))
    timeline.renewed(deadline=4600.0, renew_at=1600.0)
    assert timeline.wake(1000.0) == 600.0
    assert timeline.wake(1600.0) == 0.0
    timeline.renewed(deadline=1300.0, renew_at=1600.0)  # the deadline first: stop serving
    assert timeline.wake(1000.0) == 300.0
    # Past the deadline, only the renewal (or retry) is waited for.
    assert timeline.wake(1400.0) == 200.0


def test_failures_retry_a_backoff_step_later_never_sooner_than_the_minimum() -> None:
    made: list[int] = []

    def delays() -> Iterator[float]:
        made.append(1)
        return steps(0.2, 3.0, 7.0)

    timeline = Timeline(delays, min_retry=1.0)
    assert made == []  # no randomness drawn before a failure
    assert timeline.failed(1000.0) == 1001.0  # 0.2, raised to the minimum
    assert timeline.failed(1001.0) == 1004.0
    assert timeline.failed(1004.0) == 1011.0
    assert timeline.wake(1005.0) == 6.0
    assert timeline.failed(1011.0, at_least=60.0) == 1071.0  # e.g. upstream's retry_after
    assert made == [1]  # one series per outage


def test_a_success_ends_the_outage_and_the_next_failure_starts_the_backoff_over() -> None:
    timeline = Timeline(lambda: steps(2.0, 4.0, 8.0))
    timeline.failed(1000.0)
    timeline.failed(1002.0)
    timeline.renewed(deadline=5000.0, renew_at=2000.0)
    assert timeline.failed(2000.0) == 2002.0


def test_released_forgets_the_deadline_and_acts_at_once() -> None:
    timeline = Timeline(lambda: steps(2.0, 4.0))
    timeline.renewed(deadline=5000.0, renew_at=2000.0)
    timeline.failed(2000.0)
    timeline.released()
    assert (timeline.deadline, timeline.renew_at, timeline.wake(2001.0)) == (0.0, None, 0.0)
    assert timeline.failed(2001.0) == 2003.0  # a new outage: the first step again


def test_without_a_minimum_a_retry_waits_the_delay_drawn_or_what_is_asked_if_longer() -> None:
    timeline = Timeline(lambda: steps(0.2, 0.4))  # as a client's lease: min_retry 0
    assert timeline.failed(1000.0) == 1000.2
    assert timeline.failed(1000.2, at_least=0.1) == 1000.6  # asked for less: the delay
    assert timeline.failed(1000.6, at_least=8.0) == 1008.6
