"""When something held for a while lapses, is renewed, and is retried, sans I/O.

One `Timeline` is the schedule of a client's lease (`lease.AsyncLease`) and of a site
router's block of seats (licd's block keeper): both are held until a deadline, renewed
ahead of it, and retried with backoff through outages. Every time is passed in (seconds
on a monotonic clock), and the backoff's delays come from a factory the caller gives
(`backoff.Backoff.delays`, say): it imports only types, reads no clock, never sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


class Timeline:
    """The deadline (monotonic; 0.0 while nothing is held) and `renew_at` (the next
    renewal or retry; None: at once) of something held for a while. A success sets both
    (`renewed`) and starts the backoff over; each failure moves `renew_at` to the next
    backoff delay later, never sooner than `min_retry` nor than what the caller asks
    (`failed`); `wake` says how long to wait before acting: until the renewal, or the
    deadline if sooner (to stop using what lapsed). `delays` makes a fresh series of
    backoff delays (it is called once per outage, so an injected random source is read
    only when a failure happens)."""

    def __init__(self, delays: Callable[[], Iterator[float]], *, min_retry: float = 0.0) -> None:
        self.deadline = 0.0
        self.renew_at: float | None = None
        self.min_retry = min_retry
        self._new_delays = delays
        self._delays: Iterator[float] | None = None

    def renewed(self, deadline: float, renew_at: float) -> None:
        """A renewal (or the first grant) succeeded: held until `deadline`, renewed next
        at `renew_at`, and the next failure is the first of a new outage."""
        self.deadline, self.renew_at = deadline, renew_at
        self._delays = None

    def failed(self, mono: float, at_least: float = 0.0) -> float:
        """An attempt failed at `mono`: the next is the next backoff delay later, at least
        `min_retry` and `at_least` (e.g. a `retry_after`) later. Returns it."""
        if self._delays is None:
            self._delays = self._new_delays()
        self.renew_at = mono + max(self.min_retry, at_least, next(self._delays))
        return self.renew_at

    def released(self) -> None:
        """Nothing held any more: the next attempt is at once, as the first."""
        self.deadline, self.renew_at = 0.0, None
        self._delays = None

    def wake(self, mono: float) -> float:
        """Seconds from `mono` until the holder must act (0.0: now): the renewal or retry
        time, or the deadline if that is sooner and not yet past."""
        due = mono if self.renew_at is None else self.renew_at
        if self.deadline > mono:
            due = min(due, self.deadline)
        return max(0.0, due - mono)
