"""Idle reclaim and linger in the engine, on a fake clock (docs/policies.md): an idle lease
is reclaimed after `idle_timeout` only when needed (someone waits, or use reaches the
threshold) unless `always`, never without a warning a lease ttl before, and never on a
heartbeat's silence about idleness; a checked-in seat lingers for its holder alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from licd.clock import ManualClock
from licd.engine import Engine, LeasePhase, Licence, SeatLease
from licd_client.errors import LeaseUnknown, SeatsExhausted
from licd_client.messages import Holder
from tests.support import new_engine

IDLE = Licence(
    key="K", id="lic", product="p", seats=2, lease_ttl=60.0, grace=10.0, idle_timeout=600.0
)


def who(name: str) -> Holder:
    return Holder(host=f"ws-{name}", hostid=f"id-{name}", user=name, pid=1)


class World:
    def __init__(self, licence: Licence) -> None:
        self.clock = ManualClock(wall=1_790_000_000.0)
        self.engine: Engine = new_engine([licence])
        self.n = 0

    def take(self, name: str) -> SeatLease:
        self.n += 1
        grant = self.engine.checkout("K", who(name), request=f"r{self.n:021d}", at=self.clock.now())
        self.engine.confirm(grant.lease)
        return grant.lease

    def beat(self, lease: SeatLease, idle_for: float | None) -> float | None:
        """A heartbeat 20 s after the last; returns its idle_reclaim_in."""
        self.clock.advance(20.0)
        return self.engine.heartbeat(lease.secret, self.clock.now(), idle_for).idle_reclaim_in

    def reclaimed(self) -> list[str]:
        due = self.engine.idle_due(self.clock.now())
        for lease in due:
            self.engine.released(lease)
        return [x.holder.user for x in due]


def test_idle_is_reclaimed_when_use_reaches_the_threshold_after_a_warning() -> None:
    world = World(IDLE)  # when_needed, threshold 1.0: both seats in use
    alice = world.take("alice")
    assert world.beat(alice, 700.0) is None  # idle, but a seat is free: nobody needs it
    world.take("bob")  # now every seat is in use
    assert world.reclaimed() == []  # not without a warning first
    assert world.beat(alice, 720.0) == 60.0  # warned: one lease ttl
    world.clock.advance(59.0)
    assert world.reclaimed() == []
    world.clock.advance(1.0)
    assert world.reclaimed() == ["alice"]
    with pytest.raises(LeaseUnknown) as err:
        world.engine.heartbeat(alice.secret, world.clock.now(), 800.0)
    assert err.value.detail == {"reclaimed": True, "idle": True}


def test_activity_after_the_warning_keeps_the_lease() -> None:
    world = World(replace(IDLE, idle_reclaim="always"))
    alice = world.take("alice")
    assert world.beat(alice, 650.0) == 60.0
    assert world.beat(alice, 3.0) is None  # the user came back
    # Idle again later: a fresh warning, with a whole lease ttl again.
    world.clock.advance(100.0)
    assert world.beat(alice, 700.0) == 60.0
    assert world.beat(alice, 1.0) is None
    world.clock.advance(100.0)
    assert world.reclaimed() == []
    assert world.engine.lease_by_secret(alice.secret) is not None


def test_someone_waiting_makes_the_idle_lease_needed() -> None:
    world = World(replace(IDLE, seats=1))
    alice = world.take("alice")
    assert world.beat(alice, 700.0) == 60.0  # threshold 1.0: the only seat is in use
    world = World(replace(IDLE, seats=2, idle_threshold=1.0))
    alice = world.take("alice")
    assert world.beat(alice, 700.0) is None
    world.engine.enqueue(
        "K", who("bob"), request="w" * 22, at=world.clock.now(), blocked_by="seats"
    )
    assert world.beat(alice, 720.0) == 60.0


def test_a_heartbeat_without_idle_for_is_never_idle() -> None:
    world = World(replace(IDLE, idle_reclaim="always"))
    alice = world.take("alice")
    for _ in range(50):
        assert world.beat(alice, None) is None
    assert world.reclaimed() == []


def test_idle_seconds_are_totalled_as_reported() -> None:
    world = World(IDLE)
    alice = world.take("alice")
    world.beat(alice, 5.0)  # 20 s since the last heartbeat, 5 of them idle
    world.beat(alice, 25.0)  # idle all 20 s
    world.beat(alice, 0.0)
    assert alice.idle_total == 25.0


LINGER = Licence(key="K", id="lic", product="p", seats=1, lease_ttl=60.0, linger=300.0)


def checkin(world: World, lease: SeatLease) -> None:
    released = world.engine.begin_release(lease.secret, checkin=world.clock.now())
    assert released is lease
    world.engine.released(lease)


def test_a_checked_in_seat_lingers_for_its_holder_and_no_one_else() -> None:
    world = World(LINGER)
    alice = world.take("alice")
    checkin(world, alice)
    assert alice.state is LeasePhase.LINGERING
    assert world.engine.in_use("lic") == 1
    with pytest.raises(LeaseUnknown):  # its secret is void
        world.engine.heartbeat(alice.secret, world.clock.now())
    with pytest.raises(SeatsExhausted):
        world.take("bob")
    again = world.take("alice")  # the holder has it back, as a new lease
    assert again.lingered and world.engine.in_use("lic") == 1
    assert world.engine.lingering == []


def test_a_lingering_seat_is_freed_when_its_time_is_over() -> None:
    world = World(LINGER)
    checkin(world, world.take("alice"))
    world.clock.advance(299.0)
    assert world.engine.linger_due(world.clock.now()) == []
    world.clock.advance(1.0)
    [ended] = world.engine.linger_due(world.clock.now())
    assert ended.holder.user == "alice" and world.engine.in_use("lic") == 0
    world.take("bob")


def test_a_revoke_or_reclaim_does_not_linger() -> None:
    world = World(LINGER)
    alice = world.take("alice")
    lease = world.engine.begin_revoke(alice.handle, "bye")
    assert lease is alice
    world.engine.released(alice)
    assert world.engine.in_use("lic") == 0 and world.engine.lingering == []


def test_removing_the_licence_ends_its_lingering_seats() -> None:
    world = World(LINGER)
    checkin(world, world.take("alice"))
    world.engine.remove_licence("lic")
    assert world.engine.lingering == []


def test_why_counts_a_lingering_seat_as_its_holders_and_no_one_elses() -> None:
    world = World(LINGER)
    checkin(world, world.take("alice"))
    at = world.clock.now()
    mine = world.engine.explain("K", who("alice"), at)
    assert all(v.passed for v in mine)  # she would get her seat back
    theirs = world.engine.explain("K", who("bob"), at)
    assert [v.rule for v in theirs if not v.passed] == ["seats"]
    assert world.engine.in_use("lic") == 1 and len(world.engine.lingering) == 1  # unchanged
    world.take("alice")  # and a real checkout agrees
