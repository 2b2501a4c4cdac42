"""What a licence grants: its key, public id, product, seats, lease rules and validity,
and the policies a vendor sells it under (counting unit, device leases, overdraft,
access lists, reservations, caps, metered counters, scheduled add-ons).

Plain frozen values built by the config loader (and the admin interface). They hold no
state about who uses them: the seat accounting lives in `engine.engine`. Two rules about
licences as such live here, once: one key, one licence (`key_clash`), and what an edit
changes (`licence_changes`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from licd_client.messages import Features

COUNT_BY = ("lease", "host", "user", "host_user")
RESETS = ("never", "daily", "monthly")
IDLE_RECLAIM = ("when_needed", "always")
#: Checkouts that may wait in one licence's queue by default (`queue_max`).
QUEUE_MAX = 64
#: Leases that may share one unit's seat (`count_by` other than "lease") by default: a
#: machine running a few instances of an app, not one piling up leases without end.
LEASES_PER_UNIT = 16


@dataclass(frozen=True)
class Counter:
    """A metered counter: `limit` units per period, de-duplicated within a window."""

    name: str
    limit: int
    reset: str = "never"  # never | daily | monthly (UTC)
    dedup_window: float = 3.0

    def period_start(self, now: float) -> float:
        """The start of the period `now` falls in (0 for `never`)."""
        if self.reset == "never":
            return 0.0
        t = datetime.fromtimestamp(now, UTC)
        day = 1 if self.reset == "monthly" else t.day
        return datetime(t.year, t.month, day, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Addon:
    """Extra seats or features for a date range (a temporary option)."""

    seats: int = 0
    features: Features = field(default_factory=dict)
    starts: float | None = None
    ends: float | None = None

    def active(self, now: float) -> bool:
        return (self.starts is None or self.starts <= now) and (
            self.ends is None or now < self.ends
        )


@dataclass(frozen=True)
class Licence:
    """One licence. Times are float seconds since the Unix epoch; None means unbounded."""

    key: str = field(repr=False)  # what clients present: never logged
    id: str  # public name, used in tokens, listings and logs
    product: str
    seats: int
    lease_ttl: float = 90.0  # default lease, seconds
    grace: float = 15.0  # seconds after a lease's expiry before its seat is reused
    not_before: float | None = None
    expires: float | None = None
    features: Features = field(default_factory=dict)
    max_ttl: float | None = None  # the longest lease (or block) a client may ask for
    delegable: bool = False  # may a site router take a block of it (`delegate`)?
    count_by: str = "lease"  # lease | host | user | host_user: what shares a seat
    leases_per_unit: int = LEASES_PER_UNIT  # at most this many leases share a unit's seat
    device_period: float | None = None  # device leases: a seat stays this long
    overdraft: int = 0  # seats that may be granted beyond the limit, each one flagged
    allow: tuple[str, ...] = ()  # rules (user:, host:, hostid:, ip:, group:); empty: all
    deny: tuple[str, ...] = ()
    reserve: Mapping[str, int] = field(default_factory=dict)  # group -> seats kept for it
    max: Mapping[str, int] = field(default_factory=dict)  # user | host | group:NAME -> cap
    counter: tuple[Counter, ...] = ()
    addon: tuple[Addon, ...] = ()
    # Borrowing (offline use): a lease longer than `borrow_after` is a borrow; at most
    # `borrow_max` at once (None: no cap), by holders `borrow_allow` matches (empty: all).
    borrow_after: float | None = None
    borrow_max: int | None = None
    borrow_allow: tuple[str, ...] = ()
    # The queue: at most `queue_max` checkouts wait for a seat (0: none may), served by
    # priority class (group -> class, higher first; 0 for holders in none), then in order.
    queue_max: int = QUEUE_MAX
    queue_priority: Mapping[str, int] = field(default_factory=dict)
    # Idle leases (their heartbeats' `idle_for`): one idle for `idle_timeout` is reclaimed,
    # after a warning, always or (`when_needed`) only while a checkout waits or at least
    # `idle_threshold` of the seats are in use.
    idle_timeout: float | None = None
    idle_reclaim: str = "when_needed"
    idle_threshold: float = 1.0
    # A seat checked in stays its holder's (host and user) this long: `linger`.
    linger: float | None = None

    def borrows(self, ttl: float) -> bool:
        """Whether a lease of `ttl` seconds is a borrow."""
        return self.borrow_after is not None and ttl > self.borrow_after

    def lease_ttl_for(self, asked: float | None) -> float:
        """The ttl a lease gets when a checkout asks for `asked` (None: the default)."""
        if self.device_period is not None:
            return self.device_period
        return self.lease_ttl if asked is None else min(asked, self.longest_ttl)

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

    def seats_at(self, now: float) -> int:
        """The seats in force at `now`: the licence's plus its active add-ons'."""
        if not self.addon:
            return self.seats
        return self.seats + sum(a.seats for a in self.addon if a.active(now))

    def features_at(self, now: float) -> Features:
        """The features in force at `now`: add-ons' override the licence's."""
        out = dict(self.features)
        for a in self.addon:
            if a.active(now):
                out.update(a.features)
        return out

    def groups_named(self) -> set[str]:
        """The [groups] its rules (`group:NAME`), reservations and caps refer to."""
        named = set(self.reserve) | set(self.queue_priority)
        for rule in (*self.allow, *self.deny, *self.max):
            kind, _, value = rule.partition(":")
            if kind == "group":
                named.add(value)
        return named

    def counter_named(self, name: str) -> Counter | None:
        return next((c for c in self.counter if c.name == name), None)


@dataclass(frozen=True)
class KeyClash:
    """Two licences with one key: `licence` would take the key `holder` keeps."""

    licence: Licence
    holder: Licence


def key_clash(in_force: Mapping[str, Licence], incoming: Collection[Licence]) -> KeyClash | None:
    """One key, one licence. `in_force` maps each key to its licence; `incoming` joins them,
    each replacing the licence of its id (the incoming have distinct keys: one config
    file's, checked as it is read). The first incoming licence whose key another licence
    keeps, one in force that no incoming licence replaces; None when they can coexist."""
    replaced = {x.id for x in incoming}
    for licence in incoming:
        holder = in_force.get(licence.key)
        if holder is not None and holder.id not in replaced:  # its own id: replaced too
            return KeyClash(licence, holder)
    return None


def licence_changes(old: Licence, new: Licence) -> dict[str, tuple[Any, Any]]:
    """What an edit changes: each field whose value differs, by name, as (before, after).
    Every field of `Licence` is compared, the key too (which its caller must not show)."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in fields(Licence):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            out[f.name] = (before, after)
    return out
