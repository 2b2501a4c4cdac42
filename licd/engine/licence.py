"""What a licence grants: its key, public id, product, seats, lease rules and validity.

A plain frozen value built by the config loader (and later the admin interface). It
holds no state about who uses it: the seat accounting lives in `engine.seats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from licd_client.messages import Features


@dataclass(frozen=True)
class Licence:
    """One licence. Times are float seconds since the Unix epoch; None means unbounded."""

    key: str = field(repr=False)  # what clients present: never logged
    id: str  # public name, used in tokens, listings and logs
    product: str
    seats: int
    lease_ttl: float = 90.0  # default (and longest) lease, seconds
    grace: float = 15.0  # seconds after a lease's expiry before its seat is reused
    not_before: float | None = None
    expires: float | None = None
    features: Features = field(default_factory=dict)
    max_ttl: float | None = None  # the longest lease (or block) a client may ask for
    delegable: bool = False  # may a site router take a block of it (`delegate`)?

    @property
    def longest_ttl(self) -> float:
        return self.lease_ttl if self.max_ttl is None else max(self.max_ttl, self.lease_ttl)

    def validity_error(self, now: float) -> str | None:
        """'licence_expired' / 'licence_not_yet_valid' when `now` is outside validity."""
        if self.not_before is not None and now < self.not_before:
            return "licence_not_yet_valid"
        if self.expires is not None and now >= self.expires:
            return "licence_expired"
        return None
