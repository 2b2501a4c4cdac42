"""Each licence policy on the engine with a fake clock, edges included, and combined."""

from __future__ import annotations

from dataclasses import replace

import pytest

from licd.clock import ManualClock
from licd.engine import Licence, SeatLease
from licd.engine.licence import Addon, Counter
from licd_client.errors import (
    BadRequest,
    Denied,
    LicenceExpired,
    QuotaExhausted,
    SeatsExhausted,
)
from licd_client.messages import Holder
from tests.support import new_engine

BASE = Licence(key="K", id="lic", product="p", seats=2, lease_ttl=60.0, grace=10.0)
GROUPS = {"cad": ("user:alice", "user:bob", "host:ws-7", "ip:10.1.0.0/16")}


def who(host: str, user: str = "carol", hostid: str | None = None) -> Holder:
    return Holder(host=host, hostid=hostid or f"id-{host}", user=user, pid=1)


class World:
    """An engine and a clock, with shorthand for confirmed checkouts."""

    def __init__(self, licence: Licence) -> None:
        self.clock = ManualClock()
        self.licence = licence
        self.engine = new_engine([licence], groups=GROUPS)
        self._n = 0

    def take(self, h: Holder, *, seats: int = 1, ip: str | None = None) -> SeatLease:
        self._n += 1
        grant = self.engine.checkout(
            self.licence.key,
            h,
            request=f"r{self._n}",
            at=self.clock.now(),
            seats=seats,
            ip=ip,
        )
        self.engine.confirm(grant.lease)
        return grant.lease

    def give_back(self, lease: SeatLease) -> bool:
        released = self.engine.begin_release(lease.secret)
        if released is None:
            return False
        self.engine.released(released)
        return True

    @property
    def in_use(self) -> int:
        return self.engine.in_use(self.licence.id)


# ----------------------------------------------------------------- 1. counting unit


def test_count_by_host_shares_a_seat_until_the_last_lease_goes() -> None:
    w = World(replace(BASE, count_by="host"))
    a1, a2 = w.take(who("a")), w.take(who("a"))
    assert w.in_use == 1  # two processes on machine a: one seat
    w.take(who("b"))
    assert w.in_use == 2
    w.take(who("a"))  # a third process on a still fits
    with pytest.raises(SeatsExhausted):
        w.take(who("c"))
    assert w.give_back(a1) and w.in_use == 2  # a still holds its seat
    assert w.give_back(a2) and w.in_use == 2
    third = [x for x in w.engine.leases if x.holder.host == "a"]
    assert w.give_back(third[0])
    assert w.in_use == 1  # the last lease on a: its seat is free
    w.take(who("c"))


def test_count_by_host_unit_holds_its_largest_lease() -> None:
    w = World(replace(BASE, seats=3, count_by="host"))
    small = w.take(who("a"), seats=1)
    big = w.take(who("a"), seats=2)
    assert w.in_use == 2
    assert w.give_back(big) and w.in_use == 1
    assert w.give_back(small) and w.in_use == 0


@pytest.mark.parametrize(
    ("count_by", "same", "other"),
    [
        ("user", (who("a", "alice"), who("b", "alice")), who("a", "bob")),
        ("host_user", (who("a", "alice"), who("a", "alice")), who("a", "bob")),
    ],
)
def test_count_by_user_and_host_user(
    count_by: str, same: tuple[Holder, Holder], other: Holder
) -> None:
    w = World(replace(BASE, count_by=count_by))
    w.take(same[0])
    w.take(same[1])
    assert w.in_use == 1
    w.take(other)
    assert w.in_use == 2


# ------------------------------------------------------------------ 2. device leases


def test_device_lease_stays_with_the_device_for_its_period() -> None:
    w = World(replace(BASE, seats=1, device_period=30 * 86400.0))
    first = w.take(who("scanner-1"))
    assert first.expires == w.clock.wall + 30 * 86400
    assert not w.give_back(first)  # checkin does not free a device's seat
    assert w.in_use == 1
    w.clock.advance(86400)
    again = w.take(who("scanner-1"))  # the same device, within its period
    assert again is first
    with pytest.raises(SeatsExhausted):
        w.take(who("scanner-2"))


def test_device_lease_expiry_stops_at_the_licence_expiry() -> None:
    w = World(replace(BASE, device_period=30 * 86400.0, expires=ManualClock().wall + 86400))
    lease = w.take(who("d"))
    assert lease.expires == w.licence.expires


def test_device_returning_after_its_period_gets_a_new_seat() -> None:
    w = World(replace(BASE, seats=1, device_period=86400.0))
    first = w.take(who("scanner-1"))
    w.clock.advance(86400 + BASE.grace + 1)
    assert w.engine.due(w.clock.now()) == [first]
    w.engine.released(first)
    second = w.take(who("scanner-1"))
    assert second is not first and w.in_use == 1


def test_device_lease_can_still_be_revoked() -> None:
    w = World(replace(BASE, seats=1, device_period=86400.0))
    lease = w.take(who("d"))
    revoked = w.engine.begin_revoke(lease.handle)
    assert revoked is lease
    w.engine.released(lease)
    assert w.in_use == 0


# ----------------------------------------------------------------------- 4. overdraft


def test_overdraft_exactly_at_n_and_refused_at_n_plus_one() -> None:
    w = World(replace(BASE, seats=2, overdraft=2))
    normal = [w.take(who(f"h{i}")) for i in range(2)]
    assert not any(x.overdraft for x in normal)
    over = [w.take(who(f"o{i}")) for i in range(2)]  # seats + N
    assert all(x.overdraft for x in over)
    with pytest.raises(SeatsExhausted) as err:
        w.take(who("one-too-many"))  # seats + N + 1
    assert err.value.detail == {"in_use": 4, "total": 2, "rule": "overdraft"}


# ---------------------------------------------- 5. access lists, reservations, caps


def test_deny_wins_and_names_its_rule() -> None:
    w = World(replace(BASE, deny=("user:guest",), allow=("host:lab-*",)))
    with pytest.raises(Denied, match="'user:guest'"):
        w.take(who("lab-1", "guest"))
    with pytest.raises(Denied, match="allow list"):
        w.take(who("office-1"))
    w.take(who("LAB-2"))  # host patterns ignore case


def test_allow_by_group_ip_and_hostid() -> None:
    w = World(replace(BASE, seats=5, allow=("group:cad", "hostid:id-special")))
    w.take(who("anything", "alice"))
    w.take(who("ws-7"))
    w.take(who("x"), ip="10.1.200.3")
    w.take(who("special"))
    with pytest.raises(Denied):
        w.take(who("x"), ip="10.2.0.1")


def test_reservation_when_the_pool_is_otherwise_full() -> None:
    w = World(replace(BASE, seats=4, reserve={"cad": 2}))
    w.take(who("a"))
    w.take(who("b"))
    with pytest.raises(SeatsExhausted) as err:
        w.take(who("c"))  # two seats are left, but they are cad's
    assert err.value.detail == {"in_use": 2, "total": 2, "rule": "reservation"}
    w.take(who("x", "alice"))
    w.take(who("y", "bob"))
    assert w.in_use == 4


def test_reserved_seats_used_by_members_free_the_pool() -> None:
    w = World(replace(BASE, seats=3, reserve={"cad": 1}))
    w.take(who("x", "alice"))  # cad's reservation is used
    w.take(who("a"))
    w.take(who("b"))  # so outsiders may take the rest
    assert w.in_use == 3


def seats(w: World) -> tuple[int, int, int, int]:
    """`available`'s answer now: total, in_use, reserved, available."""
    a = w.engine.available(w.licence.key, w.clock.now())
    return a.total, a.in_use, a.reserved, a.available


def fill_as_outsiders(w: World) -> int:
    """Check out one seat after another as people outside every group until refused;
    returns how many were granted."""
    granted = 0
    while True:
        try:
            w.take(who(f"outsider-{granted}"))
        except SeatsExhausted:
            return granted
        granted += 1


def test_available_leaves_out_seats_reserved_for_others() -> None:
    w = World(replace(BASE, seats=6, reserve={"cad": 3}))
    assert seats(w) == (6, 0, 3, 3)
    w.take(who("x", "alice"))  # the reservation, partly used by a member
    w.take(who("a"))
    assert seats(w) == (6, 2, 2, 2)
    assert fill_as_outsiders(w) == 2  # exactly what `available` said
    assert seats(w) == (6, 4, 2, 0)


def test_available_once_a_group_uses_its_reservation_or_more() -> None:
    w = World(replace(BASE, seats=6, reserve={"cad": 2}))
    w.take(who("x", "alice"))
    w.take(who("y", "bob"))  # the reservation, fully used
    assert seats(w) == (6, 2, 0, 4)
    w.take(who("ws-7"))  # beyond it, a member takes a seat anyone could have had
    assert seats(w) == (6, 3, 0, 3)
    assert fill_as_outsiders(w) == 3


def test_available_and_reserved_never_go_negative() -> None:
    w = World(replace(BASE, seats=4, reserve={"cad": 2}))
    w.take(who("a"))
    w.take(who("b"))
    assert seats(w) == (4, 2, 2, 0)
    w.engine.put_licence(replace(w.licence, seats=3))  # lowered: 1 seat left, cad's
    assert seats(w) == (3, 2, 1, 0)
    w.engine.put_licence(replace(w.licence, seats=1))  # below the seats in use
    assert seats(w) == (1, 2, 0, 0)


def test_caps_per_user_host_and_group() -> None:
    w = World(replace(BASE, seats=10, max={"user": 1, "host": 2, "group:cad": 2}))
    w.take(who("a", "dave"))
    with pytest.raises(Denied, match="max 1 seat.*per user: dave holds 1"):
        w.take(who("b", "dave"))
    w.take(who("a", "erin"))
    with pytest.raises(Denied, match="per host"):
        w.take(who("a", "frank"))
    w.take(who("p", "alice"))
    w.take(who("q", "bob"))
    with pytest.raises(Denied, match="per group: group cad holds 2"):
        w.take(who("ws-7", "gina"))


# ------------------------------------------------------------- 6. metered counters


def test_counter_dedup_at_the_window_edge_and_quota() -> None:
    scans = Counter("scans", limit=3, dedup_window=3.0)
    w = World(replace(BASE, counter=(scans,)))
    lease = w.take(who("a"))
    at = w.clock.now

    def use(dedup: str | None, units: int = 1) -> tuple[int, bool]:
        c = w.engine.consume(lease.secret, "scans", units, dedup, at())
        return c.used, c.counted

    assert use("barcode-1") == (1, True)
    w.clock.advance(2.999)
    assert use("barcode-1") == (1, False)  # within the window: counted once
    w.clock.advance(0.001)
    assert use("barcode-1") == (2, True)  # at the window's edge: a new scan
    with pytest.raises(QuotaExhausted):
        use(None, units=2)  # would pass the limit: nothing consumed
    assert use(None) == (3, True)
    with pytest.raises(QuotaExhausted):
        use("barcode-2")
    with pytest.raises(BadRequest, match="no counter 'pages'"):
        w.engine.consume(lease.secret, "pages", 1, None, at())


def test_counter_resets_daily_in_utc() -> None:
    pages = Counter("pages", limit=2, reset="daily")
    w = World(replace(BASE, counter=(pages,)))
    w.clock.set_wall(1_790_035_200.0 - 10)  # ten seconds before a UTC midnight
    lease = w.take(who("a"))
    assert w.engine.consume(lease.secret, "pages", 2, None, w.clock.now()).used == 2
    with pytest.raises(QuotaExhausted):
        w.engine.consume(lease.secret, "pages", 1, None, w.clock.now())
    w.clock.advance(10)
    assert w.engine.consume(lease.secret, "pages", 1, None, w.clock.now()).used == 1


def test_monthly_period_start() -> None:
    monthly = Counter("m", limit=1, reset="monthly")
    assert monthly.period_start(1_790_035_200.0) == 1_788_220_800.0  # 2026-09-01T00:00Z


# --------------------------------------------------------------------- 7. add-ons


def test_addon_applies_and_withdraws_at_its_instants() -> None:
    t0 = ManualClock().wall
    addon = Addon(seats=2, features={"render": "on"}, starts=t0 + 100, ends=t0 + 200)
    w = World(replace(BASE, seats=1, addon=(addon,)))
    holder = w.take(who("a"))
    with pytest.raises(SeatsExhausted):
        w.take(who("b"))
    w.clock.advance(99.999)
    assert "render" not in w.engine.heartbeat(holder.secret, w.clock.now()).features
    w.clock.advance(0.001)  # the add-on starts: seats and features
    assert w.engine.heartbeat(holder.secret, w.clock.now()).features["render"] == "on"
    extra = [w.take(who("b")), w.take(who("c"))]
    w.clock.advance(100)  # the add-on ends: nobody is revoked, no new seat above 1
    assert w.in_use == 3 and all(x in w.engine.leases for x in extra)
    assert "render" not in w.engine.heartbeat(holder.secret, w.clock.now()).features
    with pytest.raises(SeatsExhausted):
        w.take(who("d"))


# ---------------------------------------------------------------- combined policies


def test_count_by_host_with_a_reservation_and_an_overdraft() -> None:
    """The rule: the holder's limit is the seats in force less the unused reserved seats
    of groups it is not in; overdraft extends that limit, and a grant beyond the limit is
    flagged; a process on a machine that already holds a seat adds nothing and is always
    let in. In use never passes seats + overdraft."""
    w = World(replace(BASE, seats=3, count_by="host", reserve={"cad": 1}, overdraft=1))
    w.take(who("a"))
    w.take(who("b"))  # outsiders have 2 seats: 3 less cad's 1
    over = w.take(who("c"))  # ... and 1 of overdraft
    assert over.overdraft
    assert not w.take(who("c")).overdraft  # c's second process shares c's seat
    with pytest.raises(SeatsExhausted):
        w.take(who("d"))
    member = w.take(who("ws-7"))  # a member's limit is all 3 seats, plus the overdraft
    assert member.overdraft and w.in_use == 4 == w.licence.seats + w.licence.overdraft
    with pytest.raises(SeatsExhausted):
        w.take(who("e", "alice"))  # seats and overdraft used: full for members too
    assert not w.take(who("ws-7")).overdraft  # but ws-7's own seat is still shared


def test_checkout_outside_validity_is_not_counted() -> None:
    w = World(replace(BASE, expires=ManualClock().wall + 10))
    w.clock.advance(10)
    with pytest.raises(LicenceExpired):
        w.take(who("a"))
    assert w.in_use == 0


# --- borrowing: borrow_after, borrow_max, borrow_allow ---------------------------------

BORROWING = replace(
    BASE, seats=5, max_ttl=7 * 86400.0, borrow_after=86400.0, borrow_max=2, borrow_allow=()
)


def borrow(world: World, h: Holder, ttl: float = 3 * 86400.0) -> SeatLease:
    world._n += 1
    grant = world.engine.checkout(
        world.licence.key, h, request=f"b{world._n}", at=world.clock.now(), ttl=ttl
    )
    world.engine.confirm(grant.lease)
    return grant.lease


def test_a_lease_longer_than_borrow_after_is_a_borrow_and_borrow_max_caps_them() -> None:
    world = World(BORROWING)
    first = borrow(world, who("ws-1"))
    borrow(world, who("ws-2"))
    assert world.engine.borrowed(BORROWING) == 2
    with pytest.raises(Denied, match="at most 2 seat.s. may be borrowed at once, and 2 are") as err:
        borrow(world, who("ws-3"))
    assert (err.value.detail or {}).get("rule") == "borrow"
    world.take(who("ws-3"))  # a lease no longer than borrow_after is no borrow
    borrow(world, who("ws-4"), ttl=86400.0)  # exactly borrow_after: not a borrow either
    assert world.engine.borrowed(BORROWING) == 2
    assert world.give_back(first)  # returned early: the borrow's seat is free at once
    borrow(world, who("ws-3"))
    assert world.engine.borrowed(BORROWING) == 2


def test_borrow_allow_names_who_may_borrow() -> None:
    world = World(replace(BORROWING, borrow_allow=("group:cad",)))
    with pytest.raises(Denied, match="may not borrow: not in the licence's borrow_allow list"):
        borrow(world, who("ws-1", user="carol"))
    world.take(who("ws-1", user="carol"))  # an ordinary lease still is hers to take
    borrow(world, who("ws-2", user="alice"))  # alice is in the group cad
    assert world.engine.borrowed(world.licence) == 1


def test_a_borrow_can_last_no_longer_than_max_ttl() -> None:
    world = World(BORROWING)
    lease = borrow(world, who("ws-1"), ttl=30 * 86400.0)
    assert lease.ttl == 7 * 86400.0
