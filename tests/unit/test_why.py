"""`licd why` on the engine (Engine.explain), rule by rule on a fake clock: for every kind
of refusal the rule it names as deciding is the one a real checkout then reports (in
`detail.rule`) with the same error; a grant shows every rule passed, an overdraft grant
flagged; nothing is granted by asking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from licd.clock import ManualClock
from licd.engine import Engine, Licence
from licd.engine.verdicts import RULES
from licd_client.errors import LicdError
from licd_client.messages import Holder
from tests.support import new_engine

BASE = Licence(key="K", id="lic", product="p", seats=2, lease_ttl=60.0, grace=10.0)
GROUPS = {"eng": ("user:erin",)}
CAROL = Holder(host="ws-1", hostid="id-ws-1", user="carol", pid=1)


class World:
    def __init__(self, licence: Licence) -> None:
        self.clock = ManualClock(wall=1_790_000_000.0)
        self.licence = licence
        self.engine: Engine = new_engine([licence], groups=GROUPS)
        self.n = 0

    def take(self, holder: Holder, seats: int = 1) -> None:
        self.n += 1
        at = self.clock.now()
        grant = self.engine.checkout(
            self.licence.key, holder, request=f"r{self.n}", at=at, seats=seats
        )
        self.engine.confirm(grant.lease)

    def checkout_error(self, holder: Holder, seats: int = 1) -> LicdError:
        self.n += 1
        with pytest.raises(LicdError) as err:
            self.take(holder, seats)
        return err.value


def holder(user: str, host: str = "ws-9") -> Holder:
    return Holder(host=host, hostid=f"id-{host}", user=user, pid=1)


def erin() -> Holder:
    return holder("erin", "ws-e")


Setup = Callable[[World], None]


def taken(*holders: Holder) -> Setup:
    """What happened before: these holders checked out one seat each."""

    def setup(world: World) -> None:
        for h in holders:
            world.take(h)

    return setup


def waiting(asker: Holder, seats: int) -> Setup:
    """Dave holds a seat and `asker` waits in the queue for `seats` of them."""

    def setup(world: World) -> None:
        world.take(holder("dave"))
        world.engine.enqueue(
            "K", asker, request="w" * 22, at=world.clock.now(), blocked_by="seats", seats=seats
        )

    return setup


NOTHING = taken()
CASES: list[tuple[str, Licence, Setup, Holder, str]] = [
    # (deciding rule, licence, what happened before, who asks, the error code)
    ("validity", replace(BASE, expires=1_789_000_000.0), NOTHING, CAROL, "licence_expired"),
    (
        "validity",
        replace(BASE, not_before=1_791_000_000.0),
        NOTHING,
        CAROL,
        "licence_not_yet_valid",
    ),
    ("deny", replace(BASE, deny=("user:carol",)), NOTHING, CAROL, "denied"),
    ("allow", replace(BASE, allow=("group:eng",)), NOTHING, CAROL, "denied"),
    (
        "unit",
        replace(BASE, count_by="host", leases_per_unit=1),
        taken(CAROL),
        CAROL,
        "denied",
    ),
    ("max", replace(BASE, max={"user": 1}), taken(CAROL), CAROL, "denied"),
    (
        "reservation",
        replace(BASE, reserve={"eng": 1}),
        taken(holder("dave")),
        CAROL,
        "seats_exhausted",
    ),
    (
        "seats",
        BASE,
        taken(holder("dave"), erin()),
        CAROL,
        "seats_exhausted",
    ),
    (
        "overdraft",
        replace(BASE, overdraft=1),
        taken(holder("dave"), erin(), holder("frank")),
        CAROL,
        "seats_exhausted",
    ),
    # A seat is free, but erin waits (for two) ahead of carol.
    ("queue", BASE, waiting(erin(), 2), CAROL, "seats_exhausted"),
]


@pytest.mark.parametrize(("rule", "licence", "before", "asker", "code"), CASES)
def test_why_names_the_rule_a_real_checkout_then_reports(
    rule: str, licence: Licence, before: Setup, asker: Holder, code: str
) -> None:
    world = World(licence)
    before(world)
    in_use = world.engine.in_use(licence.id)
    verdicts = world.engine.explain(licence.key, asker, world.clock.now())
    assert [v.rule for v in verdicts] == list(RULES)  # every rule, in the order of decision
    deciding = next(v for v in verdicts if not v.passed)
    assert deciding.rule == rule
    assert all(v.passed for v in verdicts[: verdicts.index(deciding)])
    assert world.engine.in_use(licence.id) == in_use  # asking granted nothing
    error = world.checkout_error(asker)
    assert (error.code, (error.detail or {}).get("rule")) == (code, rule)
    assert deciding.error is not None and deciding.error.code == code


def test_a_grant_passes_every_rule_and_an_overdraft_grant_is_flagged() -> None:
    world = World(replace(BASE, overdraft=1))
    verdicts = world.engine.explain("K", CAROL, world.clock.now())
    assert all(v.passed and not v.flagged for v in verdicts)
    world.take(holder("dave"))
    world.take(erin())
    flagged = [v.rule for v in world.engine.explain("K", CAROL, world.clock.now()) if v.flagged]
    assert flagged == ["overdraft"]
    world.take(CAROL)  # and a real checkout is granted, in overdraft
    assert world.engine.in_use("lic") == 3


def test_the_clock_hold_decides_for_a_vendors_licence_only() -> None:
    world = World(BASE)
    world.engine.clock_held = "the server's clock is 86400 s behind"
    assert all(v.passed for v in world.engine.explain("K", CAROL, world.clock.now()))
    world.engine.blocks = {"lic"}  # the licence's terms are now a vendor's (a block's)
    verdicts = world.engine.explain("K", CAROL, world.clock.now())
    assert [v.rule for v in verdicts if not v.passed] == ["clock"]
    error = world.checkout_error(CAROL)
    assert (error.code, (error.detail or {})) == (
        "unavailable",
        {"reason": "clock_rollback", "rule": "clock"},
    )


def test_why_names_the_borrow_rule_for_a_long_lease_only() -> None:
    world = World(replace(BASE, max_ttl=7 * 86400.0, borrow_after=86400.0, borrow_max=0))
    at = world.clock.now()
    assert all(v.passed for v in world.engine.explain("K", CAROL, at))  # the default ttl
    verdicts = world.engine.explain("K", CAROL, at, ttl=3 * 86400.0)
    assert [v.rule for v in verdicts if not v.passed] == ["borrow"]
    with pytest.raises(LicdError) as err:
        world.engine.checkout("K", CAROL, request="r", at=at, ttl=3 * 86400.0)
    assert (err.value.code, (err.value.detail or {}).get("rule")) == ("denied", "borrow")


def test_a_unit_asking_fewer_seats_than_it_holds_adds_none_and_jumps_no_queue() -> None:
    world = World(replace(BASE, count_by="host"))
    world.take(CAROL, seats=2)
    at = world.clock.now()
    world.engine.enqueue("K", erin(), request="w" * 22, at=at, blocked_by="seats")
    verdicts = {v.rule: v for v in world.engine.explain("K", CAROL, at)}
    assert all(v.passed for v in verdicts.values())
    assert verdicts["seats"].reason == "2 of 2 seat(s) in use, 0 more asked"
    assert verdicts["queue"].reason == "adds no seat"
    world.take(CAROL)  # granted on the seats its host holds, ahead of erin
    assert world.engine.in_use("lic") == 2
