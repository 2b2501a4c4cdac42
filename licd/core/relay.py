"""The site router: licd relaying to an upstream licd (docs/protocol.md section 5).

Theory of operation. Every request goes upstream over the router's one upstream link
(`UpstreamLink`, licd/shells/upstream.py: its keeper, its state, how upstream's answers are
sorted into decisions and faults, and the check of every token upstream returns
against `[upstream] trust`); this module decides what is relayed and keeps its record.
- forward mode: each local checkout, heartbeat and checkin is sent upstream with the
  local holder, request key and nonce, and upstream's token and chain go back unchanged.
  The router keeps a record of who holds what (table `forwarded`) for its listings and
  to know which lease secrets to relay. No upstream, no new seat.
- block mode: the router checks out `block_seats` upstream with its own key as
  `delegate`, and the engine serves local checkouts from a licence whose seats, features
  and expiry are the block's, signing sub-leases with `chain = upstream chain + [block
  token]`. The block is renewed every `renew_every` (retried with backoff through
  outages) and kept in table `block`, so a restarted router resumes it. If upstream
  answers `lease_unknown`, the router stops issuing and lets sub-leases run out.
- time: a block (and a forwarded lease) lasts for elapsed monotonic time: the ttl
  upstream granted, or after a restart its expiry less the latest wall time known to
  have passed (`WallMark`, kept in table `wall_mark`). A wall clock set back lengthens
  nothing; the engine's licence expiry is the monotonic deadline seen on the wall clock.
The rules (renewal schedule, remaining life, what the engine serves a block until) are
pure code below, time passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

from licd.clock import Clock, Instant
from licd.config.settings import RelayedLicence, UpstreamConfig
from licd.core.events import Event, Kind, holder_event
from licd.core.keys import Signer
from licd.engine import Engine, Licence
from licd.shells.upstream import UpstreamLink, on_wall
from licd.store.records import Block, Forwarded
from licd.store.sqlite import Store, StoreError
from licd_client import identity
from licd_client.backoff import Backoff
from licd_client.errors import (
    LeaseUnknown,
    LicdError,
    ProtocolViolation,
    TokenInvalid,
    Unavailable,
    UpstreamUnavailable,
)
from licd_client.messages import (
    Checkin,
    CheckinReply,
    Checkout,
    Heartbeat,
    Holder,
    LeaseReply,
)
from licd_client.tokens import Statement, verify_chain

log = logging.getLogger(__name__)

#: Seconds a block's renewal is retried before giving up until the next round, and the
#: shortest wait between renewal rounds.
MIN_RENEW_WAIT = 1.0
#: Seconds between two checkpoints of the wall-clock mark (and sweeps of stale
#: forwarded records): what a restart with the clock set back may give a block back.
CHECKPOINT_EVERY = 60.0


def request_key() -> str:
    """A fresh idempotency key for a block checkout: 128 random bits."""
    return f"block-{secrets.token_hex(16)}"


# ------------------------------------------------------ the rules, pure, clock passed in


@dataclass
class WallMark:
    """The latest wall time known to have passed: never earlier than a wall reading, and
    moving on with monotonic time between readings, so a wall clock set back turns it
    back neither while running nor (it is checkpointed) across a restart."""

    wall: float
    mono: float  # the monotonic time at which `wall` was known

    def now(self, at: Instant) -> float:
        """The effective wall time at `at`: max(wall now, the mark moved on since)."""
        return max(at.wall, self.wall + (at.mono - self.mono))

    def seen(self, wall: float, at: Instant) -> None:
        """Take in `wall` (a checkpoint read back) as passed by `at`."""
        self.wall = max(self.now(at), wall)
        self.mono = at.mono


def remaining_life(expires: float, effective_now: float) -> float:
    """Seconds left of something expiring at wall time `expires`, after a restart: judged
    from the mark's effective wall time, never from a clock that was set back."""
    return max(0.0, expires - effective_now)


def renewal_at(mono: float, due_in: float, deadline: float) -> float:
    """The monotonic time of a block's next renewal, decided at `mono`: in `due_in`
    seconds (its `renew_every`), brought forward to when half the block's remaining
    life is gone if that is sooner (a block granted shorter than asked is renewed in
    time too)."""
    return mono + max(0.0, min(due_in, (deadline - mono) / 2))


def served_until(expires: float, deadline: float, at: Instant) -> float:
    """The wall time until which the engine serves a block, seen at `at`: its monotonic
    deadline on the wall clock, never past the expiry upstream granted (the sub-leases'
    tokens must not outlive the block's)."""
    return min(expires, on_wall(deadline, at))


# ---------------------------------------------------------------------- the relaying


@dataclass
class BlockState:
    """A block-mode licence's runtime view: the block, its clocks, and status."""

    relayed: RelayedLicence
    # One idempotency key per block taken: a retry after a lost reply gets the same
    # block back from upstream instead of a second one.
    request: str = field(default_factory=request_key)
    block: Block | None = None
    licence: Licence | None = None  # the block's terms, as the engine serves them
    deadline: float = 0.0  # monotonic time the block lapses at
    renew_at: float | None = None  # monotonic time of the next renewal (or retry)
    last_error: str | None = None
    chain: list[bytes] = field(default_factory=list)

    def valid(self, at: Instant) -> bool:
        return self.block is not None and not self.block.revoked and self.deadline > at.mono


class Relay:
    """Forward-mode relaying and block-mode blocks for every relayed licence."""

    def __init__(
        self,
        config: UpstreamConfig,
        relayed: tuple[RelayedLicence, ...],
        *,
        engine: Engine,
        store: Store,
        signer: Signer,
        clock: Clock,
        publish: Callable[[Event], None],
        ssl: SSLContext | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rng = rng or random.Random()
        self.link = UpstreamLink(config, clock, signer.site, ssl, rng=self.rng, sleep=sleep)
        self.engine = engine
        self.store = store
        self.signer = signer
        self.clock = clock
        self.publish = publish  # the service's: logs the event, tells its subscribers
        self.sleep = sleep  # the keepers' waits: a test's own moves its clock instead
        self.forward_keys = {r.key: r for r in relayed if r.mode == "forward"}
        self.blocks = {r.id: BlockState(r) for r in relayed if r.mode == "block"}
        self.block_keys = {state.relayed.key: state for state in self.blocks.values()}
        self.modes = {r.id: r.mode for r in relayed}
        self.forwarded: dict[str, Forwarded] = {}  # by lease secret
        self._lapses: dict[str, float] = {}  # forwarded lease secret -> monotonic expiry
        at = clock.now()
        self.mark = WallMark(at.wall, at.mono)  # raised to the stored one by load()
        me = identity.holder()
        # Upstream lists the router's blocks as held by this machine, for this site.
        self.router_holder = Holder(
            host=socket.gethostname() or signer.site,
            hostid=me.hostid,
            user="licd",
            pid=me.pid,
            app="licd-router",
            instance=signer.site,
        )

    def is_relayed(self, licence_id: str) -> bool:
        return licence_id in self.modes

    # ------------------------------------------------------------------ start-up

    async def load(self) -> None:
        """Resume what the database kept: blocks (installed in the engine) and the
        forwarded leases' records, each lasting what it has left by the wall-clock mark."""
        at = self.clock.now()
        stored = await self.store.load_wall_mark()
        if stored is not None:
            self.mark.seen(stored, at)
        now = self.mark.now(at)
        for item in await self.store.load_forwarded():
            self.forwarded[item.secret] = item
            self._lapses[item.secret] = at.mono + remaining_life(item.expires, now)
        for block in await self.store.load_blocks():
            state = self.blocks.get(block.licence_id)
            if state is None:
                continue
            try:
                leaf = verify_chain(self.link.config.trust, block.chain, block.token)
            except TokenInvalid as exc:
                log.error(
                    "event=stored_block_refused licence=%s error=%r", block.licence_id, str(exc)
                )
                continue
            due_in = remaining_life(block.renewed + state.relayed.renew_every, now)
            self._install(state, block, leaf, at, remaining_life(block.expires, now), due_in)
            log.info("event=block_resumed licence=%s seats=%d", block.licence_id, block.seats)

    async def checkpoint(self) -> None:
        """Record the wall-clock mark; a failure is logged (the next one may succeed)."""
        try:
            await self.store.put_wall_mark(self.mark.now(self.clock.now()))
        except StoreError as exc:
            log.warning("event=wall_mark_not_recorded error=%r", str(exc))

    async def close(self) -> None:
        """At shutdown, before the store closes: the mark recorded, the link closed."""
        await self.checkpoint()
        await self.link.close()

    # -------------------------------------------------------------------- forward

    async def checkout(self, req: Checkout, ip: str | None) -> LeaseReply:
        relayed = self.forward_keys[req.key]
        upstream_req = Checkout(
            0,
            key=req.key,
            holder=req.holder,
            request=req.request,
            nonce=req.nonce,
            seats=req.seats,
            ttl=req.ttl,
        )
        at = self.clock.now()
        reply = await self.link.request(upstream_req, LeaseReply)
        if reply.lease is None:
            raise self.link.failed(ProtocolViolation("checkout reply without a lease id"))
        try:
            self.link.verify(reply, req.nonce)
        except UpstreamUnavailable:
            await self._give_back(reply.lease)
            raise
        now = self.clock.now().wall
        item = Forwarded(
            reply.lease, reply.handle, relayed.id, req.holder, ip, reply.seats, now, reply.expires
        )
        event = holder_event(
            Kind.CHECKOUT,
            now,
            licence=relayed.id,
            handle=reply.handle,
            holder=req.holder,
            ip=ip,
            seats=reply.seats,
            detail={"relayed": "forward"},
        )
        try:
            await self._persist(self.store.put_forwarded(item, event))
        except Unavailable:
            await self._give_back(item.secret)  # not recorded: not kept upstream either
            raise
        self.forwarded[item.secret] = item
        self._lapses[item.secret] = at.mono + max(0.0, reply.ttl)
        self.publish(event)
        return reply

    async def heartbeat(self, req: Heartbeat) -> LeaseReply:
        item = self.forwarded[req.lease]
        at = self.clock.now()
        try:
            reply = await self.link.request(Heartbeat(0, req.lease, req.nonce), LeaseReply)
        except LeaseUnknown:
            await self._forget(item, Kind.RECLAIM, "upstream no longer knows the lease")
            raise
        self.link.verify(reply, req.nonce)
        item.expires = reply.expires
        self._lapses[item.secret] = at.mono + max(0.0, reply.ttl)
        # Kept, so that a restarted router does not prune a lease its holder still renews.
        await self._persist(self.store.put_forwarded(item))
        return reply

    async def checkin(self, secret: str) -> bool:
        item = self.forwarded[secret]
        reply = await self.link.request(Checkin(0, secret), CheckinReply)
        await self._forget(item, Kind.CHECKIN, None)
        return reply.released

    async def _give_back(self, secret: str) -> None:
        """Check in a lease upstream granted but the router refused, so its seats do not
        stay taken for nothing. Best effort: a failure is only logged."""
        try:
            await self.link.request(Checkin(0, secret))
        except LicdError as exc:
            log.warning("event=refused_lease_not_returned error=%r", exc.message)

    async def _forget(self, item: Forwarded, kind: Kind, reason: str | None) -> None:
        event = holder_event(
            kind,
            self.clock.now().wall,
            licence=item.licence_id,
            handle=item.handle,
            holder=item.holder,
            ip=item.ip,
            seats=item.seats,
            reason=reason,
        )
        await self._persist(self.store.delete_forwarded([item.secret], [event]))
        self.forwarded.pop(item.secret, None)
        self._lapses.pop(item.secret, None)
        self.publish(event)

    async def prune_forwarded(self, grace: float = 60.0) -> None:
        """Forget forwarded leases `grace` seconds past their expiry on the monotonic
        clock (their holders went away; a wall clock set forward forgets nobody early)."""
        mono = self.clock.now().mono
        stale = [x for x in self.forwarded.values() if self._lapses[x.secret] + grace < mono]
        for item in stale:
            with contextlib.suppress(LicdError):
                await self._forget(item, Kind.RECLAIM, "lapsed")

    @staticmethod
    async def _persist(write: Any) -> None:
        try:
            await write
        except StoreError as exc:
            raise Unavailable(f"not recorded: {exc}") from None

    # ---------------------------------------------------------------------- block

    def _install(
        self,
        state: BlockState,
        block: Block,
        leaf: Statement,
        at: Instant,
        life: float,
        due_in: float,
    ) -> None:
        """Serve local checkouts from `block`, which has `life` seconds left at `at` and
        is due for renewal in `due_in` (or sooner: `renewal_at`)."""
        relayed = state.relayed
        product = leaf.payload.get("product")
        state.licence = Licence(
            key=relayed.key,
            id=relayed.id,
            product=product if isinstance(product, str) else relayed.id,
            seats=0 if block.revoked else max(block.seats, 0),
            lease_ttl=relayed.lease_ttl,
            grace=relayed.grace,
            expires=block.expires,
            features=leaf.features,
        )
        state.block = block
        state.deadline = at.mono + life
        state.renew_at = renewal_at(at.mono, due_in, state.deadline)
        state.chain = [*block.chain, block.token]
        self.signer.chains[relayed.id] = state.chain
        self.signer.chain_iat[relayed.id] = leaf.iat
        self._serve(state, at)

    def _serve(self, state: BlockState, at: Instant) -> None:
        """The engine's licence follows the block, lapsing at its monotonic deadline as
        the wall clock shows it at `at` (the keeper calls this again at every wake-up,
        and wakes at the deadline, so a wall clock set back meanwhile gains nothing)."""
        block, licence = state.block, state.licence
        if block is None or licence is None:
            return
        expires = served_until(block.expires, state.deadline, at)
        self.engine.put_licence(dataclasses.replace(licence, expires=expires))

    def _verify_block(self, state: BlockState, reply: LeaseReply, nonce: bytes) -> Statement:
        leaf = self.link.verify(reply, nonce)
        problem = None
        if leaf.delegate != self.signer.public:
            problem = "the block does not delegate to this router's key"
        elif reply.seats > (state.relayed.block_seats or 0):
            problem = (
                f"a block of {reply.seats} seats, more than the {state.relayed.block_seats} asked"
            )
        elif leaf.seats != reply.seats:
            problem = "the block token's seats differ from the reply's"
        if problem is not None:
            state.last_error = problem
            log.error("event=upstream_block_refused licence=%s error=%r", state.relayed.id, problem)
            raise UpstreamUnavailable(f"refused the upstream block: {problem}")
        return leaf

    async def take_block(self, state: BlockState) -> None:
        relayed = state.relayed
        request = state.block.request if state.block else state.request
        nonce = secrets.token_bytes(16)
        req = Checkout(
            0,
            key=relayed.key,
            holder=self.router_holder,
            request=request,
            nonce=nonce,
            seats=relayed.block_seats or 1,
            ttl=relayed.block_ttl,
            delegate=self.signer.public,
        )
        at = self.clock.now()
        reply = await self.link.request(req, LeaseReply)
        if reply.lease is None:
            raise self.link.failed(ProtocolViolation("checkout reply without a lease id"))
        try:
            leaf = self._verify_block(state, reply, nonce)
        except UpstreamUnavailable:
            await self._give_back(reply.lease)
            state.request = request_key()  # that one was given back
            raise
        block = await self._keep(state, reply.lease, request, reply, leaf, at)
        log.info("event=block_taken licence=%s seats=%d", relayed.id, block.seats)

    async def renew_block(self, state: BlockState) -> None:
        block = state.block
        assert block is not None
        nonce = secrets.token_bytes(16)
        at = self.clock.now()
        try:
            reply = await self.link.request(Heartbeat(0, block.secret, nonce), LeaseReply)
        except LeaseUnknown:
            # Upstream no longer counts these seats. Stop issuing, and let the sub-leases
            # run out at the expiries they already have (no renewal passes them): the
            # block's end becomes that horizon. After it, a new block may be taken.
            at = self.clock.now()
            horizon = max([at.wall, *(x.expires for x in self.engine.leases_of(block.licence_id))])
            block.revoked = True
            block.expires = min(block.expires, horizon)
            state.last_error = "upstream revoked the block: issuing stopped"
            log.error("event=block_revoked licence=%s", block.licence_id)
            assert state.licence is not None
            state.licence = dataclasses.replace(state.licence, seats=0)
            state.deadline = min(state.deadline, at.mono + remaining_life(horizon, at.wall))
            self._serve(state, at)  # stop issuing first, whatever the disk says
            await self.store.put_block(block)
            return
        leaf = self._verify_block(state, reply, nonce)
        renewed = await self._keep(state, block.secret, block.request, reply, leaf, at)
        log.info("event=block_renewed licence=%s expires=%.0f", block.licence_id, renewed.expires)

    async def _keep(
        self,
        state: BlockState,
        secret: str,
        request: str,
        reply: LeaseReply,
        leaf: Statement,
        asked: Instant,
    ) -> Block:
        """A verified block (taken or renewed), asked for at `asked`: persisted, then
        served from for the ttl upstream granted, counted from the asking."""
        block = Block(
            state.relayed.id,
            secret,
            reply.handle,
            request,
            reply.seats,
            reply.expires,
            reply.token,
            list(reply.chain),
            self.clock.now().wall,
        )
        await self.store.put_block(block)
        await self.checkpoint()
        at = self.clock.now()
        life = asked.mono + max(0.0, reply.ttl) - at.mono
        self._install(state, block, leaf, at, life, state.relayed.renew_every)
        return block

    async def run_block(self, state: BlockState) -> None:
        """Keep one block-mode licence supplied, forever: take the block if there is
        none, renew it when `renewal_at` says, retry with backoff through outages, and
        wake at the block's deadline (if sooner) to stop serving it then."""
        delays = Backoff(base=1.0, cap=300.0).delays(self.rng)
        while True:
            at = self.clock.now()
            self._serve(state, at)
            block = state.block
            if block is not None and block.revoked:
                # Issuing stopped; once the last sub-lease has run out, start afresh.
                if state.deadline > at.mono:
                    await self.sleep(state.deadline - at.mono)
                    continue
                await self.store.delete_block(block.licence_id)
                state.block = state.licence = state.renew_at = None
                state.request = request_key()
                continue
            wait = 0.0 if state.renew_at is None else state.renew_at - at.mono
            if block is not None and state.deadline > at.mono:
                wait = min(wait, state.deadline - at.mono)
            if wait > 0:
                await self.sleep(wait)
                continue
            try:
                if state.block is None:
                    await self.take_block(state)
                else:
                    await self.renew_block(state)
                state.last_error = None
                delays = Backoff(base=1.0, cap=300.0).delays(self.rng)
            except (LicdError, StoreError) as exc:
                message = getattr(exc, "message", str(exc))
                state.last_error = message
                log.warning(
                    "event=block_attempt_failed licence=%s error=%r", state.relayed.id, message
                )
                wait = max(MIN_RENEW_WAIT, next(delays))
                state.renew_at = self.clock.now().mono + wait

    async def run(self) -> None:
        """The link's keeper, every block-mode licence's keeper; a checkpoint of the
        wall-clock mark and a sweep of stale forwarded records every CHECKPOINT_EVERY
        seconds."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="upstream-link")
            for state in self.blocks.values():
                tg.create_task(self.run_block(state), name=f"block-{state.relayed.id}")
            while True:
                await self.sleep(CHECKPOINT_EVERY)
                await self.checkpoint()
                await self.prune_forwarded()

    # --------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        at = self.clock.now()
        blocks = []
        for state in self.blocks.values():
            b = state.block
            blocks.append(
                {
                    "licence": state.relayed.id,
                    "seats": b.seats if b else None,
                    "expires": b.expires if b else None,
                    "last_renewal": b.renewed if b else None,
                    "next_renewal": None if state.renew_at is None else on_wall(state.renew_at, at),
                    "revoked": b.revoked if b else False,
                    "valid": state.valid(at),
                    "last_error": state.last_error,
                }
            )
        return {
            "servers": list(self.link.config.servers),
            "link": self.link.state.to_json(at),
            "modes": dict(self.modes),
            "blocks": blocks,
            "forwarded": len(self.forwarded),
        }

    def forwarded_listing(self) -> list[Forwarded]:
        return sorted(self.forwarded.values(), key=lambda x: x.handle)
