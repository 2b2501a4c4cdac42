"""The fair queue in the engine, on a fake clock: order by priority class then arrival,
a blocked head stops the round, reserved seats go to their group's members, a detached
waiter is passed over and then leaves, a hand-over counts the released seat for the
waiter only, and a failed commit puts the waiter back in its place."""

from __future__ import annotations

from dataclasses import replace

import pytest

from licd.clock import ManualClock
from licd.engine import Engine, Licence
from licd.engine.queue import Waiter
from licd_client.errors import LicdError, SeatsExhausted, UnknownLicence
from licd_client.messages import Holder
from tests.support import new_engine

ONE = Licence(key="K", id="lic", product="p", seats=1, lease_ttl=60.0, grace=10.0)
GROUPS = {"cad": ("user:carol",), "vip": ("user:vera",)}


def who(name: str) -> Holder:
    return Holder(host=f"ws-{name}", hostid=f"id-{name}", user=name, pid=1)


class World:
    def __init__(self, licence: Licence = ONE) -> None:
        self.clock = ManualClock(wall=1_790_000_000.0)
        self.engine: Engine = new_engine([licence], groups=GROUPS)
        self.n = 0

    def take(self, name: str, seats: int = 1) -> str:
        self.n += 1
        grant = self.engine.checkout(
            "K", who(name), request=f"r{self.n:021d}", at=self.clock.now(), seats=seats
        )
        self.engine.confirm(grant.lease)
        return grant.lease.secret

    def wait(self, name: str, seats: int = 1) -> Waiter:
        """A checkout with `queue` as the service makes it: tried, then queued."""
        self.n += 1
        request = f"q{self.n:021d}"
        try:
            self.engine.checkout("K", who(name), request=request, at=self.clock.now(), seats=seats)
        except SeatsExhausted as exc:
            rule = (exc.detail or {})["rule"]
            return self.engine.enqueue(
                "K", who(name), request=request, at=self.clock.now(), blocked_by=rule, seats=seats
            )
        raise AssertionError(f"{name} was granted a seat instead of queueing")

    def release(self, secret: str) -> list[str]:
        """Check a lease in as the service does, serving the queue in the same step;
        returns who was served."""
        lease = self.engine.begin_release(secret)
        assert lease is not None
        served, failed = self.engine.hand_over([lease], self.clock.now())
        assert not failed
        self.engine.released(lease)
        for _, grant in served:
            self.engine.confirm(grant.lease)
        return [w.holder.user for w, _ in served]

    def order(self) -> list[str]:
        queue = self.engine.queues.get("lic")
        return [w.holder.user for w in queue] if queue is not None else []


def test_first_come_first_served_and_positions() -> None:
    world = World()
    a = world.take("alice")
    b, c = world.wait("bob"), world.wait("carl")
    assert world.engine.position(b)[:2] == (1, 2)
    assert world.engine.position(c)[:2] == (2, 2)
    assert world.release(a) == ["bob"]
    assert world.order() == ["carl"] and world.engine.position(c)[:2] == (1, 1)


def test_a_higher_priority_class_goes_first_then_arrival() -> None:
    world = World(replace(ONE, queue_priority={"vip": 10, "cad": 5}))
    a = world.take("alice")
    world.wait("bob")
    world.wait("carol")  # cad: 5
    world.wait("vera")  # vip: 10
    world.wait("dan")
    assert world.order() == ["vera", "carol", "bob", "dan"]
    assert world.release(a) == ["vera"]


def test_a_newcomer_waits_behind_the_queue_even_when_a_seat_is_free() -> None:
    world = World(replace(ONE, seats=2))
    world.take("alice")
    world.wait("bob", seats=2)  # one seat free: not enough for bob
    with pytest.raises(SeatsExhausted) as err:
        world.engine.checkout("K", who("carl"), request="n" * 22, at=world.clock.now())
    assert (err.value.detail or {})["rule"] == "queue"
    assert world.engine.in_use("lic") == 1


def test_a_blocked_head_stops_the_round_nobody_jumps_it() -> None:
    world = World(replace(ONE, seats=3))
    a, _ = world.take("alice"), world.take("ann")
    world.take("amy")
    world.wait("bob", seats=2)
    world.wait("carl")
    assert world.release(a) == []  # one seat free: bob needs two, carl waits behind him
    assert world.order() == ["bob", "carl"] and world.engine.in_use("lic") == 2


def test_reserved_seats_go_to_their_members_before_the_queue() -> None:
    world = World(replace(ONE, seats=2, reserve={"cad": 1}))
    world.take("alice")
    bob = world.wait("bob")  # the free seat is cad's
    assert bob.blocked_by == "reservation"
    # carol (cad) takes the reserved seat at once, queue or not.
    world.take("carol")
    assert world.engine.in_use("lic") == 2 and world.order() == ["bob"]


def test_a_member_behind_a_non_member_takes_a_freed_reserved_seat() -> None:
    world = World(replace(ONE, seats=2, reserve={"cad": 1}))
    world.take("alice")
    c = world.take("carol")
    world.wait("bob")
    world.wait("carol")  # a second lease for carol: her group's seat is in use
    assert world.release(c) == ["carol"]  # the reserved seat skips bob
    assert world.order() == ["bob"]


def test_a_detached_waiter_is_passed_over_then_leaves() -> None:
    world = World()
    a = world.take("alice")
    b = world.wait("bob")
    world.wait("carl")
    b.leave_at = world.clock.now().mono + 20.0
    assert world.release(a) == ["carl"]
    assert world.order() == ["bob"]
    world.clock.advance(19.0)
    assert world.engine.gone_waiters(world.clock.now()) == []
    world.clock.advance(1.0)
    assert world.engine.gone_waiters(world.clock.now()) == [b]
    assert world.order() == [] and "lic" not in world.engine.queues


def test_the_hand_over_counts_the_released_seat_for_the_waiter_only() -> None:
    world = World()
    a = world.take("alice")
    world.wait("bob")
    lease = world.engine.begin_release(a)
    assert lease is not None
    served, _ = world.engine.hand_over([lease], world.clock.now())
    assert [w.holder.user for w, _ in served] == ["bob"]
    # Until the commit both are counted: nobody else can take the seat meanwhile.
    assert world.engine.in_use("lic") == 2
    with pytest.raises(SeatsExhausted):
        world.engine.checkout("K", who("carl"), request="n" * 22, at=world.clock.now())
    world.engine.released(lease)
    assert world.engine.in_use("lic") == 1


def test_a_failed_commit_puts_the_waiter_back_in_its_place() -> None:
    world = World()
    a = world.take("alice")
    world.wait("bob")
    world.wait("carl")
    lease = world.engine.begin_release(a)
    assert lease is not None
    served, _ = world.engine.hand_over([lease], world.clock.now())
    [(bob, grant)] = served
    world.engine.abort(grant.lease)  # what the service does when the commit failed
    world.engine.requeue(bob)
    world.engine.cancel_release(lease)
    assert world.order() == ["bob", "carl"]
    assert world.engine.in_use("lic") == 1


def test_a_full_queue_refuses_and_no_queue_at_all() -> None:
    world = World(replace(ONE, queue_max=1))
    world.take("alice")
    world.wait("bob")
    with pytest.raises(SeatsExhausted) as err:
        world.wait("carl")
    assert (err.value.detail or {})["rule"] == "queue"
    assert (err.value.detail or {})["waiting"] == 1
    closed = World(replace(ONE, queue_max=0))
    closed.take("alice")
    with pytest.raises(SeatsExhausted, match="no queue"):
        closed.wait("bob")


def test_a_waiter_a_rule_now_refuses_leaves_with_that_error() -> None:
    world = World()
    a = world.take("alice")
    world.wait("bob")
    world.engine.put_licence(replace(ONE, deny=("user:bob",)))
    lease = world.engine.begin_release(a)
    assert lease is not None
    served, failed = world.engine.hand_over([lease], world.clock.now())
    assert served == []
    [(bob, error)] = failed
    assert bob.holder.user == "bob" and isinstance(error, LicdError) and error.code == "denied"
    assert world.order() == []


def test_the_waiters_of_a_removed_licence_are_refused() -> None:
    world = World()
    a = world.take("alice")
    world.wait("bob")
    lease = world.engine.begin_release(a)
    assert lease is not None
    world.engine.released(lease)
    world.engine.remove_licence("lic")
    served, failed = world.engine.serve_queue("lic", world.clock.now())
    assert served == [] and isinstance(failed[0][1], UnknownLicence)


def test_the_wait_estimate_follows_the_pace_of_hand_overs() -> None:
    world = World()
    first = world.take("alice")
    waiters = [world.wait(name) for name in ("bob", "carl", "dan", "eve")]
    assert world.engine.position(waiters[-1])[2] is None  # nothing served yet
    world.clock.advance(30.0)
    assert world.release(first) == ["bob"]
    bob_lease = world.engine.leases[0].secret
    world.clock.advance(60.0)
    assert world.release(bob_lease) == ["carl"]
    # Two hand-overs 60 s apart: dan (now first) about 60 s, eve about 120 s.
    assert world.engine.position(waiters[2])[2] == 60.0
    assert world.engine.position(waiters[3])[2] == 120.0
