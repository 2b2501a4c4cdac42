"""The engine: decides every checkout, heartbeat, checkin and reclaim. Pure code.

Theory of operation:
- A licence's seats in use are the seats of its leases in any state (pending, live,
  releasing). A seat is counted from the moment it is granted in memory, before its
  commit, and until its release is committed: so a failed commit can never leave more
  seats granted than the licence allows (docs/protocol.md section 7, never over-allocate).
- `checkout` grants and returns a PENDING lease; the caller persists it, then calls
  `confirm` (or `abort` if the commit failed, which frees the seat again).
- `begin_release` (checkin), `begin_revoke` and `due` (reclaim) mark leases RELEASING;
  the caller persists the deletion, then calls `released`. Until then the seat stays
  counted. A revoked or reclaimed lease's holder is told why for a while (`endings`).
- A lease's seat is reclaimed only after `expires + grace`, measured on the monotonic
  clock, so a wall clock set forward cannot free a seat whose token is still valid.
- On restore after a restart every reclaim deadline becomes now + ttl + grace on the
  monotonic clock, with the lease's own ttl: a wall clock set back while the daemon was
  down keeps no dead holder's seat longer, one set forward frees nothing early.
- A checkout's `request` key makes it idempotent: a retry (same licence, hostid and
  key) joins the first attempt, whatever state it is in, and is answered only to the
  same holder from the same address with the same seats and ttl.
- Memory is O(live leases) whatever clients send: the reclaim heap holds at most one
  entry per lease between compactions, a unit holds at most `leases_per_unit` leases,
  and a lease is renewed at most `RENEW_BURST` times at once (then at a steady rate).
No I/O, no awaits, no clock or entropy reads: every call takes the `Instant` it happens at,
and secrets and handles come from the `random_bytes` the composition root gives.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from licd.clock import Instant
from licd.engine.counters import Consumed, CounterBook
from licd.engine.endings import IDLE_RECLAIM, RECLAIM, REVOKED, Endings, revoked
from licd.engine.entitlement import narrowing_error
from licd.engine.lease import LeasePhase, SeatLease
from licd.engine.licence import Licence, key_clash
from licd.engine.policy import Who, first_match, matches
from licd.engine.queue import Waiter, WaitQueue
from licd.engine.seats import SeatBook, unit_key
from licd.engine.verdicts import Verdict, refusal
from licd_client.errors import (
    BadRequest,
    Denied,
    LeaseUnknown,
    LicdError,
    LicenceExpired,
    LicenceNotYetValid,
    RateLimited,
    SeatsExhausted,
    Unavailable,
    UnknownLicence,
)
from licd_client.messages import Features, Holder
from licd_client.terms import Terms


@dataclass(slots=True)
class _Asked:
    """A checkout as the rules see it: `unit` is the unit a new lease would join."""

    licence: Licence
    who: Who
    seats: int
    unit: str
    ttl: float  # the lease's ttl, as it would be granted
    at: Instant
    counted: tuple[int, int, int, int] | None = None  # Engine._seat_count's, once asked
    served: bool = False  # a waiter being served: the queue's order is the caller's


#: One checkout rule, an `Engine` method (see `Engine._SEAT_RULES`): its refusal, or None
#: when it passes (a verdict saying why instead, when asked to explain).
_Rule = Callable[["Engine", _Asked, bool], "Verdict | None"]

#: Renewals one lease may make back to back; after that they come back at the steady rate
#: below. A client renews every ttl/3 seconds (sooner after a lost reply), so this never
#: stops one that follows the protocol, only a heartbeat loop.
RENEW_BURST = 10
#: The steady rate: twice the protocol's (3 per ttl), and at least this many a second
#: (the config's `[server] renewals_per_second`).
RENEW_MIN_RATE = 1.0
#: Seconds a client is told to wait before retrying a grant held for a clock set back.
CLOCK_HELD_RETRY = 60.0


def renew_rate(ttl: float, floor: float = RENEW_MIN_RATE) -> float:
    """Renewals a second one lease may make, steadily, for a lease of `ttl` seconds."""
    return max(floor, 6.0 / ttl)


#: A source of random bytes (`os.urandom`, given by the composition root): the engine
#: reads no entropy itself, so a test may pass a deterministic one.
RandomBytes = Callable[[int], bytes]


def new_secret(random_bytes: RandomBytes) -> str:
    """A lease secret: 192 random bits, URL-safe text (as `secrets.token_urlsafe(24)`)."""
    return base64.urlsafe_b64encode(random_bytes(24)).rstrip(b"=").decode("ascii")


#: Each random byte to one lowercase base32 character (256 is a multiple of 32, so each
#: character is uniform).
_BASE32 = bytes(b"abcdefghijklmnopqrstuvwxyz234567"[i % 32] for i in range(256))


def new_handle(random_bytes: RandomBytes) -> str:
    """A lease's public name: 60 random bits in 12 lowercase base32 characters."""
    return random_bytes(12).translate(_BASE32).decode("ascii")


@dataclass(frozen=True, slots=True)
class Grant:
    """What a checkout or heartbeat decided: the lease and the lease length to report."""

    lease: SeatLease
    licence: Licence
    ttl: float  # seconds from now until `lease.expires`
    fresh: bool  # True: a new lease to persist; False: an existing one renewed
    features: Features  # the licence's features in force now (add-ons included)
    idle_reclaim_in: float | None = None  # an idle lease is reclaimed this soon, unless used

    @property
    def renew_in(self) -> float:
        return self.ttl / 3


@dataclass(frozen=True, slots=True)
class Availability:
    """A licence's seats at one instant: in_use + reserved + available = total, unless
    more seats are in use than in force (then reserved and available are 0)."""

    total: int  # seats in force, add-ons included
    in_use: int
    held_back: int = 0  # seats reserved for groups and not in use by their members

    @property
    def reserved(self) -> int:
        """Free seats only a reservation's group members may take."""
        return min(self.held_back, max(0, self.total - self.in_use))

    @property
    def available(self) -> int:
        """Free seats anyone may take (a group's members may take its reserved ones too)."""
        return max(0, self.total - self.in_use - self.held_back)


class Engine:
    def __init__(
        self,
        licences: Iterable[Licence],
        *,
        random_bytes: RandomBytes,
        groups: Mapping[str, tuple[str, ...]] | None = None,
        renew_min_rate: float = RENEW_MIN_RATE,
    ) -> None:
        self._licences: dict[str, Licence] = {}  # by key
        self._by_id: dict[str, Licence] = {}
        self._leases: dict[str, SeatLease] = {}  # by secret
        self._by_handle: dict[str, SeatLease] = {}
        self._by_request: dict[tuple[str, str, str], SeatLease] = {}
        self._devices: dict[tuple[str, str], SeatLease] = {}  # (licence id, hostid) -> lease
        self._removing: set[str] = set()  # licence ids being removed: no new grants
        #: Why new grants of vendor licences (entitled ones, router blocks) are held
        #: now: the wall clock was set back (licd.core.clock_guard); None normally.
        self.clock_held: str | None = None
        #: The ids of the licences that are a router's blocks from upstream.
        self.blocks: set[str] = set()
        #: Licence id -> the vendor's terms, for the licences a vendor entitled: an edit
        #: may only narrow them (`check_licence`).
        self.entitled: dict[str, Terms] = {}
        self.seats = SeatBook()
        self.counters = CounterBook()
        self.groups: Mapping[str, tuple[str, ...]] = dict(groups or {})
        self.endings = Endings()  # why leases taken away went, for their holders
        #: Reclaim deadlines: (monotonic time, tie-break, lease), at most one entry a
        #: lease (its `scheduled`) plus stale ones of leases gone, compacted when those
        #: outnumber the live.
        self._deadlines: list[tuple[float, int, SeatLease]] = []
        self._seq = 0
        #: The queues (licence id -> its waiters), and every waiter by request key.
        self.queues: dict[str, WaitQueue] = {}
        self._waiting: dict[tuple[str, str, str], Waiter] = {}
        self._waiter_seq = 0
        #: Seats checked in that stay their holder's a while (`linger`), by (licence id,
        #: hostid, user): LINGERING leases, counted in `seats`, whose secret is void.
        self._lingering: dict[tuple[str, str, str], SeatLease] = {}
        self._random_bytes = random_bytes
        self._renew_min_rate = renew_min_rate
        for licence in licences:
            self._licences[licence.key] = licence
            self._by_id[licence.id] = licence

    # ------------------------------------------------------------------ queries

    @property
    def licences(self) -> list[Licence]:
        return list(self._by_id.values())

    @property
    def leases(self) -> list[SeatLease]:
        return list(self._leases.values())

    def licence_by_id(self, licence_id: str) -> Licence | None:
        return self._by_id.get(licence_id)

    def lease_by_handle(self, handle: str) -> SeatLease | None:
        return self._by_handle.get(handle)

    def lease_by_secret(self, secret: str) -> SeatLease | None:
        return self._leases.get(secret)

    def in_use(self, licence_id: str) -> int:
        return self.seats.in_use(licence_id)

    def available(self, key: str, at: Instant) -> Availability:
        return self.usage(self._licence(key), at.wall)

    def usage(self, licence: Licence, now: float) -> Availability:
        """The licence's seats at wall time `now`: in force, in use, held back for groups."""
        return Availability(
            licence.seats_at(now), self.in_use(licence.id), self._held_back(licence)
        )

    def leases_of(self, licence_id: str) -> list[SeatLease]:
        return [x for x in self._leases.values() if x.licence_id == licence_id]

    # ----------------------------------------------------------------- licences

    def put_licence(self, licence: Licence) -> Licence | None:
        """Add a licence, or replace the one with the same id (its leases stay, and
        see the new seats, features and expiry at their next renewal; lowering seats
        revokes nobody). Returns the licence replaced, if any. Raises BadRequest when
        another licence already has this key."""
        self.check_licence(licence)
        old = self._by_id.get(licence.id)
        if old is not None:
            del self._licences[old.key]
        self._licences[licence.key] = licence
        self._by_id[licence.id] = licence
        return old

    def entitle(self, licence: Licence, terms: Terms) -> None:
        """Serve `licence` under a vendor's `terms`, which replace any it had: an edit
        may then only narrow them. Raises BadRequest (changing nothing) when another
        licence has its key."""
        before = self.entitled.pop(licence.id, None)
        try:
            self.put_licence(licence)
        except BadRequest:
            if before is not None:
                self.entitled[licence.id] = before
            raise
        self.entitled[licence.id] = terms

    def vendors(self, licence_id: str) -> bool:
        """Whether the licence's terms are a vendor's: an entitlement's, a router block's."""
        return licence_id in self.entitled or licence_id in self.blocks

    def check_licence(self, licence: Licence) -> None:
        """BadRequest when another licence already has this licence's key, or when the
        licence is entitled by a vendor and this edit goes beyond its terms."""
        clash = key_clash(self._licences, (licence,))
        if clash is not None:
            raise BadRequest(f"licence {clash.holder.id!r} already has this key")
        terms = self.entitled.get(licence.id)
        if terms is None:
            return
        current = self._by_id.get(licence.id)
        if current is not None and current.key != licence.key:
            raise BadRequest(
                f"licence {licence.id!r} is entitled by the vendor: its key is the vendor's"
            )
        error = narrowing_error(terms, licence)
        if error is not None:
            raise BadRequest(error)

    def suspend(self, licence_id: str) -> None:
        """A removal is under way: grant nothing more of this licence."""
        self._removing.add(licence_id)

    def resume(self, licence_id: str) -> None:
        """The removal did not happen: grant as before."""
        self._removing.discard(licence_id)

    def licence_for_key(self, key: str) -> Licence | None:
        return self._licences.get(key)

    def remove_licence(self, licence_id: str) -> Licence:
        """Forget a licence that has no lease left (revoke them first)."""
        licence = self._by_id.get(licence_id)
        if licence is None:
            raise UnknownLicence(f"no licence with id {licence_id!r}")
        self.end_lingering(licence_id)
        if self.in_use(licence_id):
            raise BadRequest(f"licence {licence_id!r} still has leases")
        del self._by_id[licence_id]
        del self._licences[licence.key]
        self.entitled.pop(licence_id, None)
        self.seats.forget(licence_id)
        self._removing.discard(licence_id)
        return licence

    # ---------------------------------------------------------------- decisions

    def checkout(
        self,
        key: str,
        holder: Holder,
        *,
        request: str,
        at: Instant,
        seats: int = 1,
        ttl: float | None = None,
        delegate: bytes | None = None,
        ip: str | None = None,
    ) -> Grant:
        """Grant `seats` of the licence with `key`, or renew the lease this `request`
        (or, for device leases, this device) already holds. A fresh grant is PENDING
        until `confirm`. The rules, in order: validity; deny, then allow; the holder's
        caps (`max`); the seats in force (add-ons included) less the seats reserved for
        groups the holder is not in; beyond that, `overdraft` seats, each flagged; and
        no checkout waiting in the licence's queue ahead of this one (`queue`)."""
        return self._checkout(
            self._licence(key), holder, request, at, seats, ttl, delegate, ip, served=False
        )

    def _checkout(
        self,
        licence: Licence,
        holder: Holder,
        request: str,
        at: Instant,
        seats: int,
        ttl: float | None,
        delegate: bytes | None,
        ip: str | None,
        *,
        served: bool,
    ) -> Grant:
        if licence.id in self._removing:
            raise UnknownLicence("the licence is being removed")
        who = Who(holder, ip)
        asked = _Asked(licence, who, seats, "", 0.0, at)  # its unit and ttl come below
        self._enforce(asked, self._VALIDITY_RULES)
        if delegate is not None and not licence.delegable:
            raise Denied("this licence may not be delegated to a site router")
        self._enforce(asked, self._ACCESS_RULES)
        lease_ttl = licence.lease_ttl_for(ttl)

        existing = self._by_request.get((licence.id, holder.hostid, request))
        if existing is not None and existing.state is not LeasePhase.RELEASING:
            self._check_retry(existing, who, seats, ttl)
            return self._renew(existing, licence, at)
        if licence.device_period is not None:
            device = self._devices.get((licence.id, holder.hostid))
            if device is not None and device.state is not LeasePhase.RELEASING:
                self._check_same_device(device, holder)
                return self._renew(device, licence, at)

        handle = self._unique(new_handle, self._by_handle)
        unit = unit_key(licence.count_by, holder, handle)
        # A seat that lingers for this holder is theirs again: it is counted for the
        # new lease instead (and the queue does not come first).
        kept = self._lingering.pop((licence.id, holder.hostid, holder.user), None)
        if kept is not None:
            self.seats.remove(kept)
        asked.unit, asked.ttl, asked.served = unit, lease_ttl, served or kept is not None
        try:
            self._enforce(asked, self._SEAT_RULES)
        except LicdError:
            if kept is not None:
                self.seats.add(kept)
                self._lingering[(licence.id, holder.hostid, holder.user)] = kept
            raise
        extra, in_use, _, limit = self._seat_count(asked)
        overdraft = bool(extra) and in_use + extra > limit

        lease = SeatLease(
            secret=self._unique(new_secret, self._leases),
            handle=handle,
            licence_id=licence.id,
            holder=holder,
            request=request,
            seats=seats,
            ttl=lease_ttl,
            created=at.wall,
            expires=at.wall,
            last_heartbeat=at.wall,
            delegate=delegate,
            ip=ip,
            overdraft=overdraft,
            device=licence.device_period is not None,
            unit=unit,
            state=LeasePhase.PENDING,
            renewals=RENEW_BURST,
            renewed_at=at.mono,
            asked=(seats, ttl),
            lingered=kept is not None,
        )
        grant = self._extend(lease, licence, at, fresh=True)
        self._add(lease)
        return grant

    @staticmethod
    def _check_retry(lease: SeatLease, who: Who, seats: int, ttl: float | None) -> None:
        """A retry of `lease`'s checkout: only its holder, from its address, may have it
        back (its secret is in the answer), and only for what it asked the first time."""
        if lease.holder != who.holder or lease.ip != who.ip:
            raise Denied("this request key belongs to another holder's checkout")
        asked = lease.asked
        if asked is None:  # restored after a restart: what it asked is not kept
            same = seats == lease.seats and (ttl is None or min(ttl, lease.ttl) == lease.ttl)
        else:
            same = (seats, ttl) == asked
        if not same:
            raise BadRequest(
                "checkout: this request key was used with other seats or ttl; "
                "a retry must repeat the first attempt exactly (a new checkout needs a new key)"
            )

    @staticmethod
    def _check_same_device(lease: SeatLease, holder: Holder) -> None:
        """A device lease goes back to its device after a restart of the app (a new
        process, a new request key), but only to the same machine and user: a hostid
        alone is no secret."""
        mine = lease.holder
        if (mine.host, mine.user) != (holder.host, holder.user):
            raise Denied("this device's lease is held by another host or user")

    # ------------------------------------------------------------- the rules
    # Each rule returns its refusal, or None when it lets the request through; asked to
    # `explain`, a passing rule returns a verdict saying why instead (verdicts.py). A
    # checkout asks them in the order of `_VALIDITY_RULES`, `_ACCESS_RULES`, then
    # `_SEAT_RULES` (below the rules), and so does `explain`.

    def _enforce(self, asked: _Asked, rules: tuple[_Rule, ...]) -> None:
        for rule in rules:
            verdict = rule(self, asked, False)
            if verdict is not None and verdict.error is not None:
                raise verdict.error

    def explain(
        self,
        key: str,
        holder: Holder,
        at: Instant,
        *,
        seats: int = 1,
        ttl: float | None = None,
        ip: str | None = None,
    ) -> list[Verdict]:
        """Every rule's verdict on a new checkout of `seats` seats of the licence with
        `key` by `holder` now, in the order a checkout asks them; nothing is granted.
        The first refusal is what a checkout would get (a retry of a lease already held
        is not considered: it renews that lease; a seat lingering for the holder is
        counted as the checkout would, as its own). UnknownLicence if there is none."""
        licence = self._licence(key)
        unit = unit_key(licence.count_by, holder, "")
        kept = self._lingering.get((licence.id, holder.hostid, holder.user))
        asked = _Asked(
            licence,
            Who(holder, ip),
            seats,
            unit,
            licence.lease_ttl_for(ttl),
            at,
            served=kept is not None,
        )
        rules = (*self._VALIDITY_RULES, *self._ACCESS_RULES, *self._SEAT_RULES)
        if kept is not None:
            self.seats.remove(kept)
        try:
            return [verdict for rule in rules if (verdict := rule(self, asked, True)) is not None]
        finally:
            if kept is not None:
                self.seats.add(kept)

    def _rule_validity(self, a: _Asked, explain: bool) -> Verdict | None:
        problem = a.licence.validity_error(a.at.wall)
        if problem == "licence_expired":
            return refusal("validity", "the licence has expired", LicenceExpired())
        if problem == "licence_not_yet_valid":
            return refusal("validity", "the licence is not valid yet", LicenceNotYetValid())
        return Verdict("validity", "the licence is in force") if explain else None

    def _rule_deny(self, a: _Asked, explain: bool) -> Verdict | None:
        deny = a.licence.deny
        rule = first_match(deny, a.who, self.groups) if deny else None
        if rule is not None:
            why = f"refused by the licence's deny rule {rule!r}"
            return refusal("deny", why, Denied(why))
        if not explain:
            return None
        return Verdict("deny", "no deny rule matches" if deny else "no deny rules")

    def _rule_allow(self, a: _Asked, explain: bool) -> Verdict | None:
        allow = a.licence.allow
        rule = first_match(allow, a.who, self.groups) if allow else None
        if allow and rule is None:
            why = f"not in the licence's allow list ({', '.join(allow)})"
            return refusal("allow", why, Denied(why))
        if not explain:
            return None
        return Verdict("allow", f"allowed by {rule!r}" if rule else "no allow list: all may")

    def _rule_clock(self, a: _Asked, explain: bool) -> Verdict | None:
        if self.clock_held is not None and self.vendors(a.licence.id):
            why = f"licence {a.licence.id!r}: {self.clock_held}"
            held = Unavailable(
                why, retry_after=CLOCK_HELD_RETRY, detail={"reason": "clock_rollback"}
            )
            return refusal("clock", why, held)
        return Verdict("clock", "no grant is held back by the clock") if explain else None

    def _rule_unit(self, a: _Asked, explain: bool) -> Verdict | None:
        """A unit (one host, user, ...) shares its seat among at most `leases_per_unit`
        leases: one machine cannot pile unbounded leases onto one seat."""
        licence = a.licence
        if licence.count_by == "lease":
            return Verdict("unit", "each lease counts on its own") if explain else None
        held = self.seats.leases_in(licence.id, a.unit)
        if held >= licence.leases_per_unit:
            why = (
                f"at most {licence.leases_per_unit} leases share one seat "
                f"(count_by = {licence.count_by}); check one in first"
            )
            return refusal("unit", why, Denied(why))
        if not explain:
            return None
        return Verdict("unit", f"{held} of {licence.leases_per_unit} leases share this seat")

    def _extra(self, a: _Asked) -> int:
        """The seats the request adds to what its unit holds already."""
        held = self.seats.held(a.licence.id, a.unit)
        return a.seats - held if a.seats > held else 0

    def _rule_max(self, a: _Asked, explain: bool) -> Verdict | None:
        if not a.licence.max and not explain:
            return None  # no caps to check
        licence, h, extra = a.licence, a.who.holder, self._extra(a)
        for name, cap in licence.max.items() if extra else ():
            if name == "user":
                held = self.seats.usage(licence.id, lambda x: x.holder.user == h.user)
                whose = h.user
            elif name == "host":
                held = self.seats.usage(licence.id, lambda x: x.holder.hostid == h.hostid)
                whose = h.host
            else:  # "group:NAME"
                group = name.partition(":")[2]
                if not matches(name, a.who, self.groups):
                    continue
                held, whose = self._group_usage(licence, group), f"group {group}"
                name = "group"
            if held + extra > cap:
                why = f"max {cap} seat(s) per {name}: {whose} holds {held}"
                return refusal("max", why, Denied(why))
        if not explain:
            return None
        if not extra:
            return Verdict("max", "the holder's unit holds these seats already")
        return Verdict("max", "within every cap" if licence.max else "no caps")

    def borrowed(self, licence: Licence) -> int:
        """Seats of `licence` held by borrows (leases longer than its borrow_after)."""
        return self.seats.usage(licence.id, lambda x: licence.borrows(x.ttl))

    def _rule_borrow(self, a: _Asked, explain: bool) -> Verdict | None:
        """A borrow (a lease longer than borrow_after) only by whom borrow_allow names,
        and no more than borrow_max seats borrowed at once."""
        licence = a.licence
        if not licence.borrows(a.ttl):
            if not explain:
                return None
            if licence.borrow_after is None:
                return Verdict("borrow", "the licence lends no seats for offline use")
            return Verdict(
                "borrow", f"not a borrow: {a.ttl:g} s is no longer than {licence.borrow_after:g} s"
            )
        rules = licence.borrow_allow
        rule = first_match(rules, a.who, self.groups) if rules else None
        if rules and rule is None:
            why = f"may not borrow: not in the licence's borrow_allow list ({', '.join(rules)})"
            return refusal("borrow", why, Denied(why))
        held = self.borrowed(licence)
        cap = licence.borrow_max
        if cap is not None and held + a.seats > cap:
            why = f"at most {cap} seat(s) may be borrowed at once, and {held} are"
            return refusal("borrow", why, Denied(why))
        if not explain:
            return None
        of = f" of {cap}" if cap is not None else ""
        return Verdict("borrow", f"a borrow of {a.ttl:g} s; {held}{of} seat(s) borrowed")

    def _seat_count(self, a: _Asked) -> tuple[int, int, int, int]:
        """(seats added, in use, seats in force, this holder's limit: those less the
        reserved seats of groups it is not in), counted once per checkout."""
        if a.counted is None:
            total = a.licence.seats_at(a.at.wall)
            limit = total - self._held_back(a.licence, a.who)
            a.counted = (self._extra(a), self.in_use(a.licence.id), total, limit)
        return a.counted

    def _rule_reservation(self, a: _Asked, explain: bool) -> Verdict | None:
        extra, in_use, total, limit = self._seat_count(a)
        spare = a.licence.overdraft
        if extra and limit + spare < in_use + extra <= total + spare:
            why = (
                f"{total - limit} of the {total} seats are reserved for groups the holder is not in"
            )
            return refusal(
                "reservation", why, SeatsExhausted(detail={"in_use": in_use, "total": limit})
            )
        if not explain:
            return None
        if total == limit:
            return Verdict("reservation", "no seats are held back for other groups")
        return Verdict("reservation", f"{total - limit} seat(s) held back for other groups")

    def _rule_seats(self, a: _Asked, explain: bool) -> Verdict | None:
        extra, in_use, total, limit = self._seat_count(a)
        if extra and in_use + extra > limit and not a.licence.overdraft:
            why = f"{in_use} of {limit} seat(s) in use"
            return refusal("seats", why, SeatsExhausted(detail={"in_use": in_use, "total": limit}))
        if not explain:
            return None
        return Verdict("seats", f"{in_use} of {limit} seat(s) in use, {extra} more asked")

    def _rule_overdraft(self, a: _Asked, explain: bool) -> Verdict | None:
        extra, in_use, total, limit = self._seat_count(a)
        spare = a.licence.overdraft
        if spare and extra and in_use + extra > limit + spare:
            why = f"every seat and all {spare} overdraft seat(s) are in use"
            return refusal(
                "overdraft", why, SeatsExhausted(detail={"in_use": in_use, "total": limit})
            )
        if not explain:
            return None
        if not spare:
            return Verdict("overdraft", "the licence has no overdraft")
        if extra and in_use + extra > limit:
            return Verdict("overdraft", "granted in overdraft: flagged", flagged=True)
        return Verdict("overdraft", "not needed")

    def _rule_queue(self, a: _Asked, explain: bool) -> Verdict | None:
        """A free seat goes to the checkouts already waiting for one first: a newcomer
        waits behind every queued checkout of its priority class or higher that waits
        for an unreserved seat, unless a seat reserved for its own group is free."""
        queue = self.queues.get(a.licence.id)
        if a.served or queue is None or not self._extra(a):
            if not explain:
                return None
            if queue is None:
                return Verdict("queue", "nobody waits in the queue")
            return Verdict("queue", "adds no seat" if not a.served else "its turn in the queue")
        ahead = queue.ahead(self.priority(a.licence, a.who))
        blocking = [w for w in ahead if w.blocked_by != "reservation"]
        if blocking and not self._own_reserve_free(a.licence, a.who):
            extra, in_use, _, limit = self._seat_count(a)
            why = f"{len(blocking)} checkout(s) wait in the queue ahead of this one"
            detail = {"in_use": in_use, "total": limit, "waiting": len(queue)}
            return refusal("queue", why, SeatsExhausted(detail=detail))
        if not explain:
            return None
        return Verdict("queue", f"{len(queue)} waiting; none ahead of this holder needs the seat")

    #: The rules in the order of decision (verdicts.RULES), built once: the licence in
    #: force; who may have it at all; then its seats.
    _VALIDITY_RULES: tuple[_Rule, ...] = (_rule_validity,)
    _ACCESS_RULES: tuple[_Rule, ...] = (_rule_deny, _rule_allow)
    _SEAT_RULES: tuple[_Rule, ...] = (
        _rule_clock,
        _rule_unit,
        _rule_max,
        _rule_borrow,
        _rule_reservation,
        _rule_seats,
        _rule_overdraft,
        _rule_queue,
    )

    def _own_reserve_free(self, licence: Licence, who: Who) -> bool:
        """Whether a seat reserved for one of `who`'s groups is unused."""
        return any(
            n > self._group_usage(licence, group)
            for group, n in licence.reserve.items()
            if matches(f"group:{group}", who, self.groups)
        )

    def priority(self, licence: Licence, who: Who) -> int:
        """The holder's priority class in the licence's queue: the highest of its groups'
        (`queue_priority`), 0 when none applies."""
        classes = [
            n
            for group, n in licence.queue_priority.items()
            if matches(f"group:{group}", who, self.groups)
        ]
        return max(classes, default=0)

    # ------------------------------------------------------------------ the queue

    def waiter(self, key: str, holder: Holder, request: str) -> Waiter | None:
        """The queued checkout with this request key, if one waits."""
        licence = self._licence(key)
        return self._waiting.get((licence.id, holder.hostid, request))

    @staticmethod
    def check_rejoin(
        waiter: Waiter, holder: Holder, ip: str | None, seats: int, ttl: float | None
    ) -> None:
        """The same checkout sent again for a waiter: as `_check_retry` for a lease."""
        if waiter.holder != holder or waiter.ip != ip:
            raise Denied("this request key belongs to another holder's checkout")
        if (waiter.seats, waiter.ttl) != (seats, ttl):
            raise BadRequest(
                "checkout: this request key was used with other seats or ttl; "
                "a retry must repeat the first attempt exactly (a new checkout needs a new key)"
            )

    def enqueue(
        self,
        key: str,
        holder: Holder,
        *,
        request: str,
        at: Instant,
        blocked_by: str,
        seats: int = 1,
        ttl: float | None = None,
        delegate: bytes | None = None,
        ip: str | None = None,
    ) -> Waiter:
        """Queue a checkout that `blocked_by` (a seat rule) refused. SeatsExhausted
        (rule `queue`) when the licence's queue is full."""
        licence = self._licence(key)
        queue = self.queues.get(licence.id)
        waiting = 0 if queue is None else len(queue)
        if waiting >= licence.queue_max:
            why = (
                f"the licence's queue is full ({licence.queue_max} waiting)"
                if licence.queue_max
                else "the licence has no queue (queue_max = 0)"
            )
            verdict = refusal(
                "queue",
                why,
                SeatsExhausted(why, detail={"in_use": self.in_use(licence.id), "waiting": waiting}),
            )
            assert verdict.error is not None
            raise verdict.error
        self._waiter_seq += 1
        waiter = Waiter(
            licence_id=licence.id,
            holder=holder,
            ip=ip,
            request=request,
            seats=seats,
            ttl=ttl,
            priority=self.priority(licence, Who(holder, ip)),
            seq=self._waiter_seq,
            since_mono=at.mono,
            since_wall=at.wall,
            delegate=delegate,
            blocked_by=blocked_by,
        )
        if queue is None:
            queue = self.queues[licence.id] = WaitQueue()
        queue.add(waiter)
        self._waiting[waiter.request_key] = waiter
        return waiter

    def position(self, waiter: Waiter) -> tuple[int, int, float | None]:
        """(position, waiting, estimated wait in seconds or None) of a queued checkout."""
        queue = self.queues[waiter.licence_id]
        position = queue.position(waiter)
        return position, len(queue), queue.wait_estimate(position)

    def is_waiting(self, waiter: Waiter) -> bool:
        return self._waiting.get(waiter.request_key) is waiter

    def leave(self, waiter: Waiter) -> None:
        """Take a waiter out of its queue (served, refused, gone)."""
        if self._waiting.get(waiter.request_key) is not waiter:
            return
        del self._waiting[waiter.request_key]
        queue = self.queues[waiter.licence_id]
        queue.remove(waiter)
        if not queue:
            del self.queues[waiter.licence_id]

    def gone_waiters(self, at: Instant) -> list[Waiter]:
        """The detached waiters whose time to come back is over, taken out."""
        gone = [
            w for w in self._waiting.values() if w.leave_at is not None and w.leave_at <= at.mono
        ]
        for waiter in gone:
            self.leave(waiter)
        return gone

    def serve_queue(
        self, licence_id: str, at: Instant
    ) -> tuple[list[tuple[Waiter, Grant]], list[tuple[Waiter, LicdError]]]:
        """Grant what the licence's free seats allow to its waiters, in order: (waiters
        served with their grants, waiters refused for good with why). An attached waiter
        that still finds no seat stops the round (nobody behind it jumps it), unless
        only seats reserved for others are free (a member behind it may take one); a
        detached one is passed over."""
        served: list[tuple[Waiter, Grant]] = []
        failed: list[tuple[Waiter, LicdError]] = []
        queue = self.queues.get(licence_id)
        licence = self._by_id.get(licence_id)
        if queue is None:
            return served, failed
        for waiter in queue:
            if not waiter.attached:
                continue
            if licence is None:
                self.leave(waiter)
                failed.append((waiter, UnknownLicence("the licence was removed")))
                continue
            try:
                grant = self._checkout(
                    licence,
                    waiter.holder,
                    waiter.request,
                    at,
                    waiter.seats,
                    waiter.ttl,
                    waiter.delegate,
                    waiter.ip,
                    served=True,
                )
            except SeatsExhausted as exc:
                waiter.blocked_by = str((exc.detail or {}).get("rule", "seats"))
                if waiter.blocked_by == "reservation":
                    continue
                break
            except LicdError as exc:
                self.leave(waiter)
                failed.append((waiter, exc))
                continue
            self.leave(waiter)
            queue.served(at.mono)
            served.append((waiter, grant))
        return served, failed

    def hand_over(
        self, releasing: Iterable[SeatLease], at: Instant
    ) -> tuple[list[tuple[Waiter, Grant]], list[tuple[Waiter, LicdError]]]:
        """Serve the queues of the licences `releasing` leases (marked RELEASING, not yet
        committed) free seats of, as if their release were committed: the grants go in
        the same commit as the release. Until that commit both are counted (nobody
        else can take the seats meanwhile); if it fails, `abort` the grants and
        `cancel_release` the leases, and the waiters queue again (`requeue`)."""
        served: list[tuple[Waiter, Grant]] = []
        failed: list[tuple[Waiter, LicdError]] = []
        by_licence: dict[str, list[SeatLease]] = {}
        for lease in releasing:
            if (
                lease.licence_id in self.queues
                and lease.state is LeasePhase.RELEASING
                and lease.linger_until is None  # its seat stays its holder's
            ):
                by_licence.setdefault(lease.licence_id, []).append(lease)
        for licence_id, leases in by_licence.items():
            for lease in leases:
                self.seats.remove(lease)
            try:
                s, f = self.serve_queue(licence_id, at)
            finally:
                for lease in leases:
                    self.seats.add(lease)
            served += s
            failed += f
        return served, failed

    def requeue(self, waiter: Waiter) -> None:
        """Put back a waiter whose grant did not commit, in its old place."""
        if waiter.request_key in self._waiting:
            return
        queue = self.queues.get(waiter.licence_id)
        if queue is None:
            queue = self.queues[waiter.licence_id] = WaitQueue()
        queue.add(waiter)
        self._waiting[waiter.request_key] = waiter

    def _group_usage(self, licence: Licence, group: str) -> int:
        rule = f"group:{group}"
        return self.seats.usage(
            licence.id, lambda x: matches(rule, Who(x.holder, x.ip), self.groups)
        )

    def _held_back(self, licence: Licence, who: Who | None = None) -> int:
        """Seats reserved for groups (but `who`'s own) and not in use by their members."""
        if not licence.reserve:
            return 0
        return sum(
            max(0, n - self._group_usage(licence, group))
            for group, n in licence.reserve.items()
            if who is None or not matches(f"group:{group}", who, self.groups)
        )

    def confirm(self, lease: SeatLease) -> None:
        """The lease's checkout is committed: it is live."""
        if lease.state is LeasePhase.PENDING:
            lease.state = LeasePhase.LIVE

    def abort(self, lease: SeatLease) -> None:
        """The lease's checkout failed to commit: forget it and free its seats."""
        if lease.state is LeasePhase.PENDING:
            self._remove(lease)

    def heartbeat(self, secret: str, at: Instant, idle_for: float | None = None) -> Grant:
        """Renew the lease with `secret`: new expiry, current seats and features.
        RateLimited when it renews faster than `renew_rate` allows beyond a burst.
        `idle_for`: seconds its app has been idle, as it says; the grant then says when
        the lease will be reclaimed for it (`idle_reclaim_in`), if it will."""
        lease, licence = self._live(secret, at)
        previous = lease.renewed_at
        self._spend_renewal(lease, at)
        if idle_for is not None:
            lease.idle_total += min(idle_for, max(0.0, at.mono - previous))
            lease.idle_since = at.mono - idle_for
        grant = self._renew(lease, licence, at)
        warning = self._idle_warning(lease, licence, at)
        return grant if warning is None else dataclasses.replace(grant, idle_reclaim_in=warning)

    # ------------------------------------------------------------ idle leases

    def _idle_needed(self, licence: Licence, at: Instant) -> bool:
        """Whether idle leases of `licence` are reclaimed now: always, or (when_needed)
        while an attached checkout waits or `idle_threshold` of its seats are in use."""
        if licence.idle_reclaim == "always":
            return True
        queue = self.queues.get(licence.id)
        if queue is not None and any(w.attached for w in queue):
            return True
        return self.in_use(licence.id) >= licence.idle_threshold * licence.seats_at(at.wall)

    def _idle_reclaimable(self, lease: SeatLease, licence: Licence, at: Instant) -> bool:
        timeout = licence.idle_timeout
        if timeout is None or lease.idle_since is None or lease.device:
            return False
        return at.mono - lease.idle_since >= timeout and self._idle_needed(licence, at)

    def _idle_warning(self, lease: SeatLease, licence: Licence, at: Instant) -> float | None:
        """Seconds until the lease is reclaimed for idleness, None if it is not to be.
        The first time, the holder is warned now and has one lease ttl from now; a lease
        in use again, or no longer needed, starts afresh."""
        if not self._idle_reclaimable(lease, licence, at):
            lease.idle_warned = None
            return None
        if lease.idle_warned is None:
            lease.idle_warned = at.mono
        return max(0.0, lease.idle_warned + lease.ttl - at.mono)

    def idle_due(self, at: Instant) -> list[SeatLease]:
        """Live leases to reclaim for idleness now (warned at least a lease ttl ago and
        still reclaimable), marked RELEASING; the caller deletes them and calls
        `released`."""
        if not any(x.idle_timeout is not None for x in self._by_id.values()):
            return []
        out: list[SeatLease] = []
        for lease in self._leases.values():
            licence = self._by_id.get(lease.licence_id)
            warned = lease.idle_warned
            if (
                licence is None
                or warned is None
                or lease.state is not LeasePhase.LIVE
                or at.mono < warned + lease.ttl
            ):
                continue
            if self._idle_reclaimable(lease, licence, at):
                lease.state = LeasePhase.RELEASING
                lease.ending = IDLE_RECLAIM
                out.append(lease)
        return out

    # ---------------------------------------------------------------- lingering

    @property
    def lingering(self) -> list[SeatLease]:
        """The seats checked in that stay their holders' a while (LINGERING leases)."""
        return list(self._lingering.values())

    def linger_due(self, at: Instant) -> list[SeatLease]:
        """Lingering seats whose time is over, freed now (nothing to commit: a lingering
        seat is in memory only)."""
        over = [x for x in self._lingering.values() if (x.linger_until or 0.0) <= at.mono]
        for lease in over:
            self._end_linger(lease)
        return over

    def end_lingering(self, licence_id: str) -> None:
        """Free every lingering seat of the licence (it is being removed)."""
        for kept in [x for x in self._lingering.values() if x.licence_id == licence_id]:
            self._end_linger(kept)

    def _end_linger(self, lease: SeatLease) -> None:
        key = (lease.licence_id, lease.holder.hostid, lease.holder.user)
        if self._lingering.get(key) is lease:
            del self._lingering[key]
            self.seats.remove(lease)

    def _spend_renewal(self, lease: SeatLease, at: Instant) -> None:
        rate = renew_rate(lease.ttl, self._renew_min_rate)
        tokens = min(RENEW_BURST, lease.renewals + (at.mono - lease.renewed_at) * rate)
        lease.renewed_at = at.mono
        if tokens < 1.0:
            lease.renewals = tokens
            raise RateLimited(
                "this lease is renewed too often; renew every renew_in seconds",
                retry_after=(1.0 - tokens) / rate,
            )
        lease.renewals = tokens - 1.0

    def _live(self, secret: str, at: Instant) -> tuple[SeatLease, Licence]:
        """The live lease with `secret` and its licence, valid at `at`. LeaseUnknown
        otherwise, saying why when the lease was revoked or reclaimed."""
        lease = self._leases.get(secret)
        if lease is None or lease.state is not LeasePhase.LIVE:
            ending = self.endings.find(secret, at.mono) if lease is None else lease.ending
            raise LeaseUnknown() if ending is None else ending.error()
        licence = self._by_id.get(lease.licence_id)
        if licence is None:
            raise LeaseUnknown("the lease's licence no longer exists")
        self._check_validity(licence, at)
        return lease, licence

    def begin_release(
        self, secret: str, *, revoke: bool = False, checkin: Instant | None = None
    ) -> SeatLease | None:
        """Mark the lease releasing (its seat stays counted until `released`). None when
        no such live lease exists, or when it is a device lease (its seat stays with the
        device for the period; only a revoke ends it early). A `checkin` (at that
        instant) of a licence with `linger` keeps the seat for its holder that long."""
        lease = self._leases.get(secret)
        if lease is None:
            return None
        if lease.state is LeasePhase.PENDING or (lease.device and not revoke):
            return None
        lease.state = LeasePhase.RELEASING
        licence = self._by_id.get(lease.licence_id)
        if checkin is not None and licence is not None and licence.linger is not None:
            lease.linger_until = checkin.mono + licence.linger
        return lease

    def begin_revoke(self, handle: str, reason: str = "") -> SeatLease | None:
        """An admin's revoke: like a checkin, by the lease's public handle. Its holder is
        told, with `reason`, until the lease's reclaim deadline would have passed."""
        lease = self._by_handle.get(handle)
        if lease is None or self.begin_release(lease.secret, revoke=True) is None:
            return None
        lease.ending = revoked(reason)
        return lease

    def released(self, lease: SeatLease) -> None:
        """The lease's deletion is committed: free its seats (and keep why it went, if
        it was taken away, for its holder), or keep them lingering for its holder."""
        if self._leases.get(lease.secret) is not lease:
            return
        if lease.linger_until is not None:
            self._remove(lease, keep_seats=True)
            key = (lease.licence_id, lease.holder.hostid, lease.holder.user)
            earlier = self._lingering.get(key)
            if earlier is not None:
                self._end_linger(earlier)
            lease.state = LeasePhase.LINGERING
            self._lingering[key] = lease
            return
        self._remove(lease)
        ending = lease.ending
        if ending is not None:
            until = lease.reclaim_at + (0.0 if ending.kind == REVOKED else lease.ttl)
            self.endings.remember(lease.secret, ending, until)

    def cancel_release(self, lease: SeatLease) -> None:
        """The deletion failed to commit: the lease is live again, and due for reclaim
        at its old deadline (so a failed reclaim is retried)."""
        if self._leases.get(lease.secret) is lease and lease.state is LeasePhase.RELEASING:
            lease.state = LeasePhase.LIVE
            lease.ending = None
            self._set_deadline(lease, lease.reclaim_at)

    def due(self, at: Instant) -> list[SeatLease]:
        """Live leases whose reclaim deadline (expires + grace) has passed, marked
        RELEASING; the caller deletes them and calls `released`. (Endings kept no
        longer than `at` are dropped on the way.)"""
        self.endings.forget_until(at.mono)
        out: list[SeatLease] = []
        later: list[SeatLease] = []  # renewed since their entry was made: due again later
        heap = self._deadlines
        while heap and heap[0][0] <= at.mono:
            deadline, _, lease = heapq.heappop(heap)
            if lease.scheduled != deadline or self._leases.get(lease.secret) is not lease:
                continue  # a stale entry: the lease is gone, or has an earlier one
            lease.scheduled = None
            if lease.reclaim_at > at.mono or lease.state is LeasePhase.PENDING:
                later.append(lease)
            elif lease.state is LeasePhase.LIVE:
                lease.state = LeasePhase.RELEASING
                lease.ending = RECLAIM
                out.append(lease)
            # RELEASING: released, or back with `cancel_release`, which schedules it
        for lease in later:  # a commit still under way is looked at again in a second
            when = lease.reclaim_at
            self._schedule(lease, when if when > at.mono else at.mono + 1.0)
        return out

    @property
    def scheduled(self) -> int:
        """Entries in the reclaim heap (at most twice the leases, plus a few)."""
        return len(self._deadlines)

    def restore(self, leases: Iterable[SeatLease], at: Instant) -> list[SeatLease]:
        """Load leases kept across a restart. Every reclaim deadline becomes now + the
        lease's ttl + grace on the monotonic clock: what the wall clock says of the time
        the daemon was down (it may have been set back a day) changes nothing. Returns
        the leases skipped because their licence no longer exists."""
        skipped: list[SeatLease] = []
        for lease in leases:
            licence = self._by_id.get(lease.licence_id)
            if licence is None:
                skipped.append(lease)
                continue
            lease.state = LeasePhase.LIVE
            lease.renewals, lease.renewed_at = RENEW_BURST, at.mono
            self._add(lease)
            self._set_deadline(lease, at.mono + lease.ttl + licence.grace)
        return skipped

    # ---------------------------------------------------------------- internals

    def _licence(self, key: str) -> Licence:
        licence = self._licences.get(key)
        if licence is None:
            raise UnknownLicence()
        return licence

    @staticmethod
    def _check_validity(licence: Licence, at: Instant) -> None:
        problem = licence.validity_error(at.wall)
        if problem == "licence_expired":
            raise LicenceExpired()
        if problem == "licence_not_yet_valid":
            raise LicenceNotYetValid()

    def consume(
        self, secret: str, counter: str, units: int, dedup: str | None, at: Instant
    ) -> Consumed:
        """Use `units` of a metered counter under the lease with `secret`."""
        _, licence = self._live(secret, at)
        spec = licence.counter_named(counter)
        if spec is None:
            names = ", ".join(c.name for c in licence.counter) or "none"
            raise BadRequest(f"consume: no counter {counter!r} on this licence (it has {names})")
        return self.counters.consume(licence.id, spec, units, dedup, at)

    def _renew(self, lease: SeatLease, licence: Licence, at: Instant) -> Grant:
        lease.last_heartbeat = at.wall
        return self._extend(lease, licence, at, fresh=False)

    def _extend(self, lease: SeatLease, licence: Licence, at: Instant, *, fresh: bool) -> Grant:
        expires = at.wall + lease.ttl
        if licence.expires is not None:
            expires = min(expires, licence.expires)
        ttl = expires - at.wall
        lease.expires = expires
        self._set_deadline(lease, at.mono + ttl + licence.grace)
        return Grant(lease, licence, ttl, fresh, licence.features_at(at.wall))

    def _set_deadline(self, lease: SeatLease, reclaim_at: float) -> None:
        """Move the lease's reclaim deadline. A later one (every renewal) keeps its heap
        entry, which finds the new deadline when it comes up; only an earlier one, or a
        lease with no entry (new, or back from a failed release), needs a new entry."""
        lease.reclaim_at = reclaim_at
        if lease.scheduled is None or reclaim_at < lease.scheduled:
            self._schedule(lease, reclaim_at)

    def _schedule(self, lease: SeatLease, when: float) -> None:
        heap = self._deadlines
        if len(heap) > 2 * len(self._leases) + 64:  # mostly stale: rebuild from the leases
            self._compact()
        lease.scheduled = when
        self._seq += 1
        heapq.heappush(heap, (when, self._seq, lease))

    def _compact(self) -> None:
        """Drop every stale entry: one entry per lease that has one."""
        self._deadlines = [
            (d, seq, lease)
            for d, seq, lease in self._deadlines
            if lease.scheduled == d and self._leases.get(lease.secret) is lease
        ]
        heapq.heapify(self._deadlines)

    def _add(self, lease: SeatLease) -> None:
        if not lease.unit:
            licence = self._by_id.get(lease.licence_id)
            count_by = licence.count_by if licence is not None else "lease"
            lease.unit = unit_key(count_by, lease.holder, lease.handle)
        self._leases[lease.secret] = lease
        self._by_handle[lease.handle] = lease
        self._by_request[lease.request_key] = lease
        if lease.device:
            self._devices[(lease.licence_id, lease.holder.hostid)] = lease
        self.seats.add(lease)

    def _remove(self, lease: SeatLease, *, keep_seats: bool = False) -> None:
        del self._leases[lease.secret]
        del self._by_handle[lease.handle]
        request = lease.request_key
        if self._by_request.get(request) is lease:
            del self._by_request[request]
        device = (lease.licence_id, lease.holder.hostid)
        if self._devices.get(device) is lease:
            del self._devices[device]
        if not keep_seats:
            self.seats.remove(lease)

    def _unique(self, factory: Callable[[RandomBytes], str], taken: dict[str, SeatLease]) -> str:
        while True:
            value = factory(self._random_bytes)
            if value not in taken:
                return value
