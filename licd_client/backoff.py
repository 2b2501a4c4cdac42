"""Retry policy of the client: jittered exponential delays, and what is worth retrying.

`Backoff.delays()` is a pure generator of "full jitter" delays (uniform in 0..min(cap,
base * factor**n)) drawn from an injected `random.Random`; `is_retryable()` is the one
place that classifies an error as transient or fatal, `asked_delay()` the one that reads
the wait a daemon asks for. Nothing here sleeps or does I/O.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ConnectionLost, LicdError


@dataclass(frozen=True)
class Backoff:
    """Parameters of a full-jitter exponential backoff, in seconds."""

    base: float = 0.1
    factor: float = 2.0
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.factor >= 1 and self.cap >= self.base):
            raise ValueError("backoff needs base > 0, factor >= 1 and cap >= base")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """An endless series of delays: the n-th is uniform in 0..min(cap, base*factor**n)."""
        draw = rng if rng is not None else random.Random()
        ceiling = self.base
        while True:
            yield draw.uniform(0.0, ceiling)
            # Stop growing at the cap, so the ceiling never overflows to inf.
            ceiling = min(self.cap, ceiling * self.factor)


def is_retryable(exc: BaseException) -> bool:
    """True when `exc` is transient (the same request may succeed later), False if fatal.

    Transient: a lost or refused connection (ConnectionLost, OSError), a timeout, and the
    daemon's errors marked `retryable` (seats_exhausted, rate_limited, unavailable, ...).
    Everything else, including a bad token or a protocol violation, is fatal.
    """
    if isinstance(exc, LicdError):
        return exc.retryable
    return isinstance(exc, ConnectionLost | OSError | TimeoutError | EOFError)


def asked_delay(exc: BaseException) -> float:
    """The delay the daemon asked for with `exc`'s `retry_after`: the least to wait before
    retrying (0.0 when it asked for none)."""
    if isinstance(exc, LicdError) and exc.retry_after is not None:
        return max(0.0, exc.retry_after)
    return 0.0


def retry_delay(exc: BaseException, jittered: float) -> float:
    """The delay before retrying after `exc`: the jittered one, or longer if the daemon
    asked for it with `retry_after`."""
    return max(jittered, asked_delay(exc))
