"""Per-peer rate limits: token buckets keyed by source address, with bounded memory.

Pure: no sockets, no clock of its own (every call is given `now`, monotonic seconds).
`PeerBuckets` holds one bucket per peer; a bucket that has refilled to its burst is the
same as no bucket, so idle full buckets are dropped as spending passes by, and the table
never holds more than `max_peers` (the least recently used one goes first).
`CheckoutLimits` pairs two of them, one for denied checkouts and one for granted ones:
`dispatch` asks `refusal()` before the engine is consulted, and charges the outcome.
Every checkout passes here twice, so the arithmetic shuns the `min` and `max` builtins
(each call costs as much as a small function's).
"""

from __future__ import annotations

from collections import OrderedDict

#: Buckets kept at most per budget (~120 bytes each): far more than the peers that can
#: be connected at once (server.max_connections).
MAX_PEERS = 65536
#: Idle buckets looked at (and dropped if full) per call: keeps the sweep O(1).
SWEEP = 2


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class PeerBuckets:
    """A token bucket per peer: `burst` tokens at most, refilled at `rate` a second.
    A new peer starts full. Spending may go into debt (down to -burst) when several
    requests were admitted before their outcomes were charged."""

    def __init__(self, rate: float, burst: int, *, max_peers: int = MAX_PEERS) -> None:
        if rate <= 0 or burst < 1 or max_peers < 1:
            raise ValueError("rate must be > 0, burst and max_peers >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, bucket: _Bucket, now: float) -> float:
        level = bucket.tokens
        if now > bucket.stamp:  # a clock that stood still adds nothing
            level += (now - bucket.stamp) * self.rate
        return level if level < self.burst else self.burst

    def wait(self, peer: str, now: float) -> float:
        """Seconds until `peer` has a whole token: 0.0 when it has one now."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            return 0.0
        level = self._level(bucket, now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate

    def spend(self, peer: str, now: float) -> None:
        """Take one token from `peer`'s bucket (the only call that adds a bucket, so the
        one that sweeps)."""
        self._sweep(now)
        buckets = self._buckets
        bucket = buckets.get(peer)
        if bucket is None:
            if len(buckets) >= self.max_peers:
                buckets.popitem(last=False)  # the least recently used peer
            bucket = buckets[peer] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(peer)
        left = self._level(bucket, now) - 1.0
        bucket.tokens = left if left > -self.burst else -self.burst
        if now > bucket.stamp:
            bucket.stamp = now

    def _sweep(self, now: float) -> None:
        """Drop the least recently used buckets while they have refilled (a few a call)."""
        buckets = self._buckets
        for _ in range(SWEEP):
            if not buckets:
                return
            peer, bucket = next(iter(buckets.items()))
            if self._level(bucket, now) < self.burst:
                return
            del buckets[peer]


class CheckoutLimits:
    """The two checkout budgets of every peer: denied requests and granted ones."""

    def __init__(self, denied: PeerBuckets, granted: PeerBuckets) -> None:
        self.denied = denied
        self.granted = granted

    def refusal(self, peer: str, now: float) -> float | None:
        """None when `peer` may check out now, else the seconds to wait (`retry_after`):
        until both of its budgets have a token."""
        denied, granted = self.denied.wait(peer, now), self.granted.wait(peer, now)
        wait = denied if denied > granted else granted
        return wait if wait > 0.0 else None

    def charge(self, peer: str, now: float, *, granted: bool) -> None:
        """Count one checkout's outcome against its budget."""
        (self.granted if granted else self.denied).spend(peer, now)
