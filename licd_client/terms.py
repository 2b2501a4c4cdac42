"""What a vendor grants for one licence (docs/entitlements.md): the terms an
entitlement signs, as plain values, and what they allow at an instant.

Pure: no I/O, no clock, no signatures (those are `entitlements`'s), so the daemon's engine
judges a site's licence against its vendor's terms with these very values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .messages import Features

RESETS = ("never", "daily", "monthly")


@dataclass(frozen=True)
class CounterTerm:
    """A metered counter the vendor grants: `limit` units per period."""

    name: str
    limit: int
    reset: str = "never"


@dataclass(frozen=True)
class AddonTerm:
    """Extra seats or features for a date range; times are seconds since the epoch."""

    seats: int = 0
    features: Features = field(default_factory=dict)
    starts: float | None = None
    ends: float | None = None

    def active(self, at: float) -> bool:
        return (self.starts is None or self.starts <= at) and (self.ends is None or at < self.ends)


@dataclass(frozen=True)
class Binding:
    """A site binding: at least `need` of `components` (host-id components, see
    licd's `site_components`) must be the site's, so one replaced NIC does not void it."""

    components: tuple[str, ...]
    need: int

    def matched(self, have: Iterable[str]) -> int:
        return len(set(self.components) & set(have))

    def holds(self, have: Iterable[str]) -> bool:
        return self.matched(have) >= self.need


@dataclass(frozen=True)
class Terms:
    """What a vendor grants for one licence, whatever daemon it is issued for."""

    licence_id: str
    key_hash: bytes
    product: str
    seats: int
    expires: float
    sequence: int
    features: Features = field(default_factory=dict)
    counters: tuple[CounterTerm, ...] = ()
    addons: tuple[AddonTerm, ...] = ()
    not_before: float | None = None
    max_ttl: float | None = None
    binding: Binding | None = None

    def seats_at(self, at: float) -> int:
        """The seats granted at `at`: the licence's plus its active add-ons'."""
        return self.seats + sum(a.seats for a in self.addons if a.active(at))

    def features_at(self, at: float) -> Features:
        """The features granted at `at`: active add-ons' override the licence's."""
        out = dict(self.features)
        for a in self.addons:
            if a.active(at):
                out.update(a.features)
        return out
