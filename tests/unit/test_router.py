"""The site router (licd/core/router.py) without sockets: which requests it takes from
the dispatcher and how it answers them, and a block's keeper doing what the engine's
block rules say, against a scripted upstream (an `UpstreamPort`) on a `ManualClock`
whose keeper sleeps move the clock. Also the keys blocks are asked for with, and the
wall-clock mark kept. (The rules themselves are tests/unit/test_block.py's; a router
against a vendor licd, tests/integration/test_router.py's.)"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar, overload

import pytest
from nacl.signing import SigningKey

from licd.clock import Instant, ManualClock
from licd.config.settings import RelayedLicence, UpstreamConfig
from licd.core.dispatch import Dispatcher, Session
from licd.core.events import Event
from licd.core.keys import Signer
from licd.core.router import RETRY, Router, request_key
from licd.core.service import LicenceService
from licd.engine.block import MIN_RETRY
from licd.engine.ratelimit import CheckoutLimits, PeerBuckets
from licd.store.base import Store
from licd_client.errors import Denied, LeaseUnknown, LicdError, UpstreamUnavailable
from licd_client.messages import (
    PROTOCOL_VERSION,
    Available,
    AvailableReply,
    Checkin,
    CheckinReply,
    Checkout,
    Heartbeat,
    Hello,
    LeaseReply,
    Reply,
    Request,
)
from licd_client.tokens import Statement
from tests.support import DICOM, holder, new_engine
from tests.unit.test_store import running

R = TypeVar("R", bound=Reply)

VENDOR_KEY = b"V" * 32
UPSTREAM = UpstreamConfig(servers=("127.0.0.1:27500",), trust=(VENDOR_KEY,))
BLOCK = RelayedLicence(
    key="VEND-BLOCK-0001",
    id="site-block",
    mode="block",
    block_seats=3,
    block_ttl=3600.0,
    renew_every=600.0,
    lease_ttl=90.0,
    grace=15.0,
)
FORWARD = RelayedLicence(key="VEND-FWD-0001", id="site-fwd", mode="forward")


class Status:
    """The link's status, as a scripted upstream has it: always up."""

    connected = True
    last_error: str | None = None

    def to_json(self, at: Instant) -> dict[str, Any]:
        return {"state": "connected"}


class ScriptedUpstream:
    """An `UpstreamPort` that answers each request with the next of `answers` (a reply,
    or an error to raise) and signs nothing: `verify` vouches for every reply, as a
    token delegating to `delegate` with the reply's seats."""

    def __init__(self, *answers: Reply | LicdError, delegate: bytes | None = None) -> None:
        self.state = Status()
        self.answers = list(answers)
        self.asked: list[Request] = []
        self.delegate = delegate
        self.closed = False

    @overload
    async def request(self, req: Request) -> Reply: ...
    @overload
    async def request(self, req: Request, expect: type[R]) -> R: ...

    async def request(self, req: Request, expect: type[Reply] = Reply) -> Reply:
        self.asked.append(req)
        answer = self.answers.pop(0)
        if isinstance(answer, LicdError):
            raise answer
        assert isinstance(answer, expect)
        return answer

    def failed(self, exc: BaseException) -> LicdError:
        return UpstreamUnavailable(str(exc))

    def verify(self, reply: LeaseReply, nonce: bytes) -> Statement:
        payload = {"seats": reply.seats, "product": "dicom", "features": dict(reply.features)}
        return Statement("lease", VENDOR_KEY, 0.0, reply.expires, self.delegate, payload)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed = True


def granted(handle: str, clock: ManualClock, ttl: float, *, lease: str | None = None) -> LeaseReply:
    """Upstream's lease reply: `ttl` seconds from now, 3 seats."""
    expires = clock.now().wall + ttl
    return LeaseReply(
        0, handle, b"token-" + handle.encode(), [], expires, ttl, ttl / 3, 3, {"tier": "pro"}, lease
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with running(tmp_path / "licd.db") as s:
        yield s


def router_of(
    store: Store, clock: ManualClock, upstream: ScriptedUpstream, *relayed: RelayedLicence
) -> Router:
    signer = Signer(SigningKey.generate(), "site-1")
    if upstream.delegate is None:
        upstream.delegate = signer.public
    events: list[Event] = []
    return Router(
        UPSTREAM,
        relayed,
        link=upstream,
        engine=new_engine([DICOM]),
        store=store,
        signer=signer,
        clock=clock,
        publish=events.append,
        rng=random.Random(7),
    )


def checkout(key: str, rid: int = 5) -> Checkout:
    return Checkout(rid, key=key, holder=holder(), request=request_key(), nonce=os.urandom(16))


# ------------------------------------------------------------------- the requests


async def test_the_router_takes_the_relayed_requests_and_nothing_else(store: Store) -> None:
    clock = ManualClock()
    upstream = ScriptedUpstream(granted("L-1", clock, 90.0, lease="secret-1"))
    router = router_of(store, clock, upstream, FORWARD, BLOCK)
    hello = Hello(1, protocol=PROTOCOL_VERSION, client="test")
    assert router.handles(checkout(FORWARD.key))
    assert router.handles(Available(1, key=FORWARD.key))
    assert router.handles(checkout(BLOCK.key))  # no block yet: the router says so
    assert router.handles(Available(1, key=BLOCK.key))
    for local in (checkout(DICOM.key), Available(1, key=DICOM.key), hello):
        assert not router.handles(local)
    for lease in (Heartbeat(1, "secret-1", os.urandom(16)), Checkin(1, "secret-1")):
        assert not router.handles(lease)  # not a lease the router forwarded (yet)
    reply = await router.answer(checkout(FORWARD.key, rid=9), "127.0.0.1")
    assert isinstance(reply, LeaseReply) and (reply.id, reply.lease) == (9, "secret-1")
    assert router.handles(Heartbeat(1, "secret-1", os.urandom(16)))
    assert router.handles(Checkin(1, "secret-1"))


async def test_a_forwarded_lease_is_relayed_until_checked_in(store: Store) -> None:
    clock = ManualClock()
    upstream = ScriptedUpstream(
        granted("L-1", clock, 90.0, lease="secret-1"),
        granted("L-1", clock, 90.0),
        CheckinReply(0, released=True),
        AvailableReply(0, total=5, in_use=1, available=4, reserved=0),
    )
    router = router_of(store, clock, upstream, FORWARD)
    await router.answer(checkout(FORWARD.key), "127.0.0.1")
    beat = await router.answer(Heartbeat(11, "secret-1", os.urandom(16)), "127.0.0.1")
    assert isinstance(beat, LeaseReply) and beat.id == 11
    assert await router.answer(Checkin(12, "secret-1"), "127.0.0.1") == CheckinReply(12, True)
    assert router.forwarded == {} and await store.load_forwarded() == []
    assert not router.handles(Heartbeat(1, "secret-1", os.urandom(16)))
    free = await router.answer(Available(13, key=FORWARD.key), "127.0.0.1")
    assert free == AvailableReply(13, total=5, in_use=1, available=4, reserved=0)
    assert [r.op for r in upstream.asked] == ["checkout", "heartbeat", "checkin", "available"]


async def test_a_block_licence_without_its_block_is_upstream_unavailable(store: Store) -> None:
    router = router_of(store, ManualClock(), ScriptedUpstream(), BLOCK)
    router.blocks[BLOCK.id].last_error = "the upstream licence server cannot be reached"
    for request in (checkout(BLOCK.key), Available(1, key=BLOCK.key)):
        with pytest.raises(UpstreamUnavailable) as refused:
            await router.answer(request, "127.0.0.1")
        assert refused.value.message == (
            "no block of seats from upstream yet (the upstream licence server cannot be reached)"
        )


async def test_the_dispatcher_hands_over_and_counts_a_relayed_checkout(store: Store) -> None:
    """What the router handles, the dispatcher hands it; a relayed checkout's outcome
    counts against the peer's budgets as a local one's: upstream's refusal spends the
    denied budget, a grant the granted one, and upstream being away neither."""
    clock = ManualClock()
    away = UpstreamUnavailable("the upstream licence server cannot be reached")
    lease = granted("L-1", clock, 90.0, lease="secret-1")
    upstream = ScriptedUpstream(away, Denied("not on this site"), lease)
    router = router_of(store, clock, upstream, FORWARD)
    once = CheckoutLimits(denied=PeerBuckets(0.001, 1), granted=PeerBuckets(0.001, 1))
    dispatcher = Dispatcher(LicenceService(router.engine, store, clock), router.signer, limits=once)
    dispatcher.router = router

    async def ask(peer: str) -> Any:
        answer = dispatcher.handle(Session(peer, hello_done=True), checkout(FORWARD.key).to_wire())
        reply, close = answer if isinstance(answer, tuple) else await answer
        assert close is False
        return reply.get("error")

    assert [await ask("10.0.0.1") for _ in range(3)] == [
        "upstream_unavailable",  # no verdict: nothing spent
        "denied",  # the peer's one denial
        "rate_limited",  # and upstream is not asked again
    ]
    assert [await ask("10.0.0.2") for _ in range(2)] == [None, "rate_limited"]
    assert [r.op for r in upstream.asked] == ["checkout"] * 3


# -------------------------------------------------------------------- the keeper


class Stop(Exception):
    """Ends a keeper run by a test."""


async def test_the_keeper_takes_renews_and_replaces_a_revoked_block(store: Store) -> None:
    """Upstream away: retried a backoff step later each time (1 s at least); taken,
    renewed every `renew_every`; revoked: issuing stops at once, the block is dropped
    when its sub-lease has run out, and a new one is taken with a new request key."""
    clock = ManualClock()
    down = UpstreamUnavailable("the upstream licence server cannot be reached")
    upstream = ScriptedUpstream(
        down,
        down,
        down,
        granted("B-1", clock, 3600.0, lease="block-1"),
        granted("B-1", clock, 3600.0),
        LeaseUnknown("the lease was revoked"),
        granted("B-2", clock, 3600.0, lease="block-2"),
    )
    router = router_of(store, clock, upstream, BLOCK)
    state, engine = router.blocks[BLOCK.id], router.engine
    naps: list[tuple[float, int | None, str | None]] = []  # (seconds, seats served, error)
    sub_lease: list[float] = []  # its expiry
    ends: list[float] = []  # a revoked block's end, as the keeper waits for it

    async def sleep(seconds: float) -> None:
        licence = engine.licence_by_id(BLOCK.id)
        naps.append((seconds, None if licence is None else licence.seats, state.last_error))
        if state.block is not None and state.block.revoked:
            ends.append(state.block.expires)
        if not upstream.answers:
            raise Stop
        clock.advance(seconds)
        if len(naps) == 5:  # a sub-lease out when upstream revokes the block
            grant = engine.checkout(BLOCK.key, holder(), request="r-1", at=clock.now())
            engine.confirm(grant.lease)
            sub_lease.append(grant.lease.expires)

    router.sleep = sleep
    with pytest.raises(Stop):
        await router.run_block(state)
    retries = [max(MIN_RETRY, d) for d in itertools.islice(RETRY.delays(random.Random(7)), 3)]
    assert retries[:2] == [MIN_RETRY, MIN_RETRY] and retries[2] > MIN_RETRY  # seed 7's
    revoked_block = "upstream revoked the block: issuing stopped"
    assert [(seats, error) for _, seats, error in naps] == [
        *((None, down.message) for _ in retries),
        (3, None),  # taken
        (3, None),  # renewed
        (0, revoked_block),  # revoked: no seats, and status says why
        (3, None),  # the new block
    ]
    assert [wait for wait, _, _ in naps] == pytest.approx(
        [*retries, BLOCK.renew_every, BLOCK.renew_every, BLOCK.lease_ttl, BLOCK.renew_every]
    )  # the renewals every `renew_every`; the revoked block, until its sub-lease ends
    assert ends == sub_lease
    *takes, renew, revoked, fresh = upstream.asked
    take = takes[0]
    assert len(takes) == 4 and all(isinstance(x, Checkout) for x in takes)
    assert isinstance(take, Checkout)
    # Retries: the same block if one was granted and its answer lost.
    assert {x.request for x in takes if isinstance(x, Checkout)} == {take.request}
    assert (take.delegate, take.seats, take.ttl) == (router.signer.public, 3, 3600.0)
    assert isinstance(renew, Heartbeat) and isinstance(revoked, Heartbeat)
    assert renew.lease == revoked.lease == "block-1"
    assert isinstance(fresh, Checkout) and fresh.request != take.request
    [kept] = await store.load_blocks()
    assert (kept.secret, kept.revoked) == ("block-2", False)
    assert router.signer.chains[BLOCK.id] == [b"token-B-2"]


async def test_a_block_whose_token_does_not_delegate_to_the_router_is_given_back(
    store: Store,
) -> None:
    clock = ManualClock()
    upstream = ScriptedUpstream(
        granted("B-1", clock, 3600.0, lease="block-1"),
        CheckinReply(0, released=True),
        delegate=b"X" * 32,
    )
    router = router_of(store, clock, upstream, BLOCK)
    state = router.blocks[BLOCK.id]
    asked_with = state.request
    with pytest.raises(UpstreamUnavailable):
        await router.take_block(state)
    assert state.last_error == "the block does not delegate to this router's key"
    assert [r.op for r in upstream.asked] == ["checkout", "checkin"]
    assert state.block is None and router.engine.licence_by_id(BLOCK.id) is None
    assert state.request != asked_with  # that block was given back: the next is new


async def test_status_shows_the_next_renewal_on_the_wall_clock(store: Store) -> None:
    clock = ManualClock()
    upstream = ScriptedUpstream(granted("B-1", clock, 1000.0, lease="block-1"))
    router = router_of(store, clock, upstream, BLOCK, FORWARD)
    await router.take_block(router.blocks[BLOCK.id])
    clock.set_wall(clock.now().wall - 86400)  # set back: the renewal stays 500 s away
    status = router.status()
    [block] = status["blocks"]
    assert block["next_renewal"] == clock.now().wall + 500.0  # half the block's life
    assert (block["seats"], block["valid"], block["revoked"]) == (3, True, False)
    assert status["servers"] == ["127.0.0.1:27500"]
    assert status["modes"] == {BLOCK.id: "block", FORWARD.id: "forward"}
    await router.close()
    assert upstream.closed


# ----------------------------------------------------------------- keys and mark


def test_block_request_keys_carry_128_random_bits() -> None:
    keys = {request_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(k) >= 22 and len(k.removeprefix("block-")) == 32 for k in keys)


async def test_the_stored_mark_only_ever_grows(store: Store) -> None:
    assert await store.load_wall_mark() is None
    await store.put_wall_mark(87400.0)
    await store.put_wall_mark(1000.0)  # a clock set back: the mark stays
    assert await store.load_wall_mark() == 87400.0
    await store.put_wall_mark(87460.5)
    assert await store.load_wall_mark() == 87460.5
