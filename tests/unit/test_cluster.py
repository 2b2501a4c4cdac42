"""Leadership rules (licd/core/cluster.py) on a scripted store and an injected monotonic
clock: when a node claims, how long a leader may answer, when it gives up, and what a
standby answers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from nacl.signing import SigningKey

from licd.core.cluster import Leadership, LeadershipLost, StandbyAnswers
from licd.core.keys import Signer
from licd.store.base import StoreError
from licd.store.postgres import LeaderRow

TTL, DELAY = 0.03, 0.02  # small: campaign's waits are ttl/3


class Mono:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedStore:
    """The store's leadership calls, answered from a script."""

    rows: list[LeaderRow]
    claims: list[int | None] = field(default_factory=list)
    renewals: list[bool | Exception] = field(default_factory=list)
    claimed: list[tuple[str, str, float]] = field(default_factory=list)
    fenced: tuple[int, str] | None = None
    mono: Mono | None = None
    lost: str | None = None

    def fence(self, epoch: int, node: str) -> None:
        self.fenced = (epoch, node)

    async def leader(self) -> LeaderRow:
        return self.rows.pop(0) if len(self.rows) > 1 else self.rows[0]

    async def claim(self, node: str, address: str, hold_for: float) -> int | None:
        self.claimed.append((node, address, hold_for))
        return self.claims.pop(0)

    async def renew(self, epoch: int, node: str) -> bool:
        if self.mono is not None:
            self.mono.now += 0.001
        outcome = self.renewals.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def node(store: ScriptedStore, mono: Mono) -> Leadership:
    return Leadership(
        store, node="b", address="10.0.0.2:27500", ttl=TTL, lock_delay=DELAY, monotonic=mono
    )


HELD = LeaderRow(4, "a", "10.0.0.1:27500", 0.0)  # renewed just now by node a


async def test_a_standby_waits_while_the_leader_renews_and_claims_once_it_is_overdue() -> None:
    mono = Mono()
    overdue = LeaderRow(4, "a", "10.0.0.1:27500", TTL + DELAY + 0.001)
    store = ScriptedStore([HELD, HELD, overdue], claims=[5])
    me = node(store, mono)
    assert await me.campaign() == 5
    assert store.claimed == [("b", "10.0.0.2:27500", TTL + DELAY)]  # one claim...
    assert store.rows == [overdue]  # ...made only once the row was seen overdue
    assert store.fenced == (5, "b")
    assert (me.epoch, me.leading, me.deadline) == (5, True, 100.0 + TTL)


async def test_a_released_row_is_claimed_at_once_and_a_lost_race_goes_on_waiting() -> None:
    released = LeaderRow(4, "", "", 0.0)
    store = ScriptedStore([released, released], claims=[None, 6])  # another node won first
    assert await node(store, Mono()).campaign() == 6
    assert len(store.claimed) == 2


async def test_a_standby_refuses_every_op_naming_the_leader() -> None:
    me = node(ScriptedStore([HELD]), Mono())
    me.leader_address = HELD.address
    refusal = me.refusal()
    assert refusal is not None and refusal.code == "unavailable"
    assert refusal.detail == {"reason": "standby", "leader": "10.0.0.1:27500"}
    assert refusal.retry_after == 1.0  # at least a second
    me.leader_address = ""  # not known yet: no redirect
    refusal = me.refusal()
    assert refusal is not None and refusal.detail == {"reason": "standby"}


async def test_a_leader_answers_until_its_deadline_and_not_after() -> None:
    mono = Mono()
    store = ScriptedStore([LeaderRow(0, "", "", 0.0)], claims=[1])
    me = node(store, mono)
    await me.campaign()
    assert me.refusal() is None
    mono.now += TTL - 0.001
    assert me.refusal() is None
    mono.now += 0.001  # the deadline: a standby may take over `lock_delay` later
    refusal = me.refusal()
    assert refusal is not None and refusal.code == "unavailable"
    assert "leader" not in (refusal.detail or {})  # never redirects to itself


async def test_a_renewal_moves_the_deadline_from_when_it_was_sent() -> None:
    mono = Mono()
    store = ScriptedStore([LeaderRow(0, "", "", 0.0)], claims=[1], mono=mono)
    store.renewals = [True, False]
    me = node(store, mono)
    await me.campaign()
    seen: list[tuple[float, float]] = []  # (sent at, deadline) as each renewal starts
    renew = store.renew

    async def watched(epoch: int, name: str) -> bool:
        seen.append((mono.now, me.deadline))
        return await renew(epoch, name)

    store.renew = watched  # type: ignore[method-assign,assignment]
    with pytest.raises(LeadershipLost, match="another node"):
        await me.hold()  # the second renewal is refused: another node holds the row
    (first_sent, _), (_, after_first) = seen
    assert after_first == pytest.approx(first_sent + TTL)  # not from when it was answered
    assert me.refusal() is not None  # it stopped answering at once


async def test_a_leader_that_cannot_renew_by_its_deadline_gives_up() -> None:
    mono = Mono()
    store = ScriptedStore([LeaderRow(0, "", "", 0.0)], claims=[1])
    me = node(store, mono)
    await me.campaign()
    mono.now += TTL / 2
    store.renewals = [StoreError("connection lost")]  # before the deadline: tried again
    store.mono = mono

    async def late_renew(epoch: int, name: str) -> bool:
        mono.now += TTL  # the database is cut off: the next try ends past the deadline
        raise StoreError("connection lost")

    first = store.renew
    calls = 0

    async def renew(epoch: int, name: str) -> bool:
        nonlocal calls
        calls += 1
        return await (first if calls == 1 else late_renew)(epoch, name)

    store.renew = renew  # type: ignore[method-assign,assignment]
    with pytest.raises(LeadershipLost, match="no renewal by the deadline"):
        await me.hold()
    assert calls == 2 and not me.leading


async def test_a_leader_whose_write_outcome_is_unknown_steps_down() -> None:
    """The store lost its connection during a write: the engine may differ from the
    database, so the node stops (a restart loads the state again)."""
    mono = Mono()
    store = ScriptedStore([LeaderRow(0, "", "", 0.0)], claims=[1], mono=mono)
    store.renewals = [True, True]
    me = node(store, mono)
    await me.campaign()
    renew = store.renew

    async def renew_then_break(epoch: int, name: str) -> bool:
        store.lost = "the database connection broke during a write"
        return await renew(epoch, name)

    store.renew = renew_then_break  # type: ignore[method-assign,assignment]
    with pytest.raises(LeadershipLost, match="broke during a write"):
        await me.hold()
    assert store.renewals == [True]  # it stopped before renewing again


def test_a_standby_answers_hello_and_refuses_the_rest() -> None:
    key = SigningKey.generate()
    me = node(ScriptedStore([HELD]), Mono())
    me.leader_address = HELD.address
    answers = StandbyAnswers(Signer(key, "plant-3"), me, lambda: 1_790_000_000.0)
    reply, close = answers.answer({"op": "hello", "id": 1, "protocol": 1, "client": "t"})
    assert not close and reply["ok"] is True
    assert (reply["key"], reply["site"]) == (bytes(key.verify_key), "plant-3")
    reply, close = answers.answer({"op": "checkout", "id": 2, "key": "K"})
    assert not close
    assert (reply["error"], reply["detail"]["leader"]) == ("unavailable", "10.0.0.1:27500")
    reply, close = answers.answer({"op": "hello", "id": 3, "protocol": "one"})
    assert close and reply["error"] == "bad_request"
