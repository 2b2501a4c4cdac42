"""The site router: licd relaying to an upstream licd (docs/protocol.md section 5).

Theory of operation. `Router` is the one object the dispatcher hands a relayed request
to (`handles`, then `answer`); it reaches upstream through an `UpstreamPort`, which the
composition root gives it (licd/shells/upstream.py's `UpstreamLink`: the one connection,
its keeper and state, the sorting of upstream's answers into decisions and faults, and
the check of every token upstream returns against `[upstream] trust`). The rules of a
block (what is accepted, what the engine serves, when its keeper acts) are the engine's,
pure (licd/engine/block.py); this module does what they decide and keeps its record.
- forward mode: each local checkout, heartbeat and checkin is sent upstream with the
  local holder, request key and nonce, and upstream's token and chain go back unchanged.
  The router keeps a record of who holds what (table `forwarded`) for its listings and
  to know which lease secrets to relay. No upstream, no new seat.
- metered units (`consume`) are the vendor's to count, in both modes: a forwarded
  lease's are relayed under it, a block sub-lease's under the block's lease upstream.
  Each block renewal carries the site's use of the block since the last one (peak seats
  per slot, checkouts refused), signed by the router's key (licd/core/usage.py).
- block mode: the router checks out `block_seats` upstream with its own key as
  `delegate`, and the engine serves local checkouts from a licence whose seats, features
  and expiry are the block's, signing sub-leases with `chain = upstream chain + [block
  token]`. The block is renewed every `renew_every` (retried with backoff through
  outages) and kept in table `block`, so a restarted router resumes it. If upstream
  answers `lease_unknown`, the router stops issuing and lets sub-leases run out.
- time: a block (and a forwarded lease) lasts for elapsed monotonic time: the ttl
  upstream granted, or after a restart its expiry less the daemon's wall time, which is
  never set back (the router is given the daemon's clock, licd.core.clock_guard). A wall
  clock set back lengthens nothing; the engine's licence expiry is the monotonic
  deadline seen on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

from licd.clock import Clock, Instant
from licd.config.settings import RelayedLicence, UpstreamConfig
from licd.core.events import Event, Kind, holder_event
from licd.core.keys import Signer
from licd.core.usage import licence_usage
from licd.engine import Engine, LeasePhase, Licence
from licd.engine.block import (
    MIN_RETRY,
    Act,
    block_licence,
    on_wall,
    plan,
    refusal,
    remaining_life,
    renewal_at,
    revoke,
    served_until,
)
from licd.store.base import Store, StoreError
from licd.store.records import Block, Forwarded
from licd_client import identity
from licd_client.backoff import Backoff
from licd_client.entitlements import MAX_REPORT_PEAKS
from licd_client.errors import (
    LeaseUnknown,
    LicdError,
    ProtocolViolation,
    TokenInvalid,
    UpstreamUnavailable,
)
from licd_client.messages import (
    Available,
    AvailableReply,
    Checkin,
    CheckinReply,
    Checkout,
    Consume,
    ConsumeReply,
    Heartbeat,
    Holder,
    LeaseReply,
    Reply,
    Request,
)
from licd_client.timeline import Timeline
from licd_client.tokens import Statement, verify_chain

log = logging.getLogger(__name__)

#: A block keeper's waits between failed attempts: full jitter, from up to 1 s after the
#: first failure, doubling, to up to 5 minutes (never less than `MIN_RETRY`).
RETRY = Backoff(base=1.0, cap=300.0)
#: Seconds between two sweeps of stale forwarded records.
SWEEP_EVERY = 60.0

R = TypeVar("R", bound=Reply)


def request_key() -> str:
    """A fresh idempotency key for a block checkout: 128 random bits."""
    return f"block-{secrets.token_hex(16)}"


# ------------------------------------------------------------------ the way upstream


class LinkStatus(Protocol):
    """What `licd status` says of the link to upstream."""

    @property
    def connected(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...
    def to_json(self, at: Instant) -> dict[str, Any]: ...


class UpstreamPort(Protocol):
    """The router's way upstream (licd/shells/upstream.py's `UpstreamLink`). `request`
    makes one attempt: upstream's decisions are raised as they are, every other failure
    as UpstreamUnavailable; `failed` makes that error of a fault found in an answer;
    `verify` checks upstream's token against `[upstream] trust`. `run` keeps the link
    up until cancelled; `close` ends it for good."""

    @property
    def state(self) -> LinkStatus: ...
    @overload
    async def request(self, req: Request) -> Reply: ...
    @overload
    async def request(self, req: Request, expect: type[R]) -> R: ...
    def failed(self, exc: BaseException) -> LicdError: ...
    def verify(self, reply: LeaseReply, nonce: bytes) -> Statement: ...
    async def run(self) -> None: ...
    async def close(self) -> None: ...


# ---------------------------------------------------------------------- the routing


@dataclass
class BlockState:
    """A block-mode licence's runtime view: the block, its timeline, and status."""

    relayed: RelayedLicence
    timeline: Timeline
    # One idempotency key per block taken: a retry after a lost reply gets the same
    # block back from upstream instead of a second one.
    request: str = field(default_factory=request_key)
    block: Block | None = None
    licence: Licence | None = None  # the block's terms, as the engine serves them
    last_error: str | None = None
    chain: list[bytes] = field(default_factory=list)
    overdue_told: bool = False  # RENEWAL_FAILED published for the present outage

    @property
    def deadline(self) -> float:
        """The monotonic time the block lapses at."""
        return self.timeline.deadline

    def valid(self, at: Instant) -> bool:
        return self.block is not None and not self.block.revoked and self.deadline > at.mono


class Router:
    """A site router's relayed licences: which requests are relayed and their answers
    (forward mode), and every block-mode licence's block, kept supplied."""

    def __init__(
        self,
        config: UpstreamConfig,
        relayed: tuple[RelayedLicence, ...],
        *,
        link: UpstreamPort,
        engine: Engine,
        store: Store,
        signer: Signer,
        clock: Clock,
        publish: Callable[[Event], None],
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        checkpoint: Callable[[], Awaitable[None]] | None = None,
        renewals_missed: int = 3,
    ) -> None:
        self.config = config
        self.link = link
        self.rng = rng or random.Random()  # the retries' jitter
        self.engine = engine
        self.store = store
        self.signer = signer
        self.clock = clock
        self.publish = publish  # the service's: logs the event, tells its subscribers
        #: The daemon clock's checkpoint (`ClockGuard.checkpoint`), once a block is taken:
        #: a restart with the clock set back then judges it from a time after it came.
        self.checkpoint = checkpoint or _nothing
        #: A block unrenewed for this many times its renew_every is reported once.
        self.renewals_missed = renewals_missed
        self.started = clock.now().wall
        self.sleep = sleep  # the keepers' waits: a test's own moves its clock instead
        self.forward_keys = {r.key: r for r in relayed if r.mode == "forward"}
        self.blocks = {
            r.id: BlockState(r, Timeline(self._retry_delays, min_retry=MIN_RETRY))
            for r in relayed
            if r.mode == "block"
        }
        self.block_keys = {state.relayed.key: state for state in self.blocks.values()}
        self.modes = {r.id: r.mode for r in relayed}
        self.forwarded: dict[str, Forwarded] = {}  # by lease secret
        self._lapses: dict[str, float] = {}  # forwarded lease secret -> monotonic expiry
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

    def _retry_delays(self) -> Iterator[float]:
        return RETRY.delays(self.rng)

    def is_relayed(self, licence_id: str) -> bool:
        return licence_id in self.modes

    # ------------------------------------------------------------------ requests

    def handles(self, request: Request) -> bool:
        """Whether `request` is the router's to answer (`answer`): a forward-mode
        licence's checkout or availability, a forwarded lease's heartbeat or checkin, and
        a block-mode licence's checkout or availability before its first block. Every
        other request (a block's sub-leases included) is the local service's."""
        if isinstance(request, Checkout | Available):
            if request.key in self.forward_keys:
                return True
            waiting = self.block_keys.get(request.key)
            return waiting is not None and waiting.block is None
        if isinstance(request, Heartbeat | Checkin):
            return request.lease in self.forwarded
        if isinstance(request, Consume):
            return request.lease in self.forwarded or self._block_of(request.lease) is not None
        return False

    def _block_of(self, secret: str) -> BlockState | None:
        """The block-mode licence a local sub-lease with `secret` is of, if it is one."""
        lease = self.engine.lease_by_secret(secret)
        return None if lease is None else self.blocks.get(lease.licence_id)

    async def answer(self, request: Request, peer: str) -> Reply:
        """The reply to a request the router `handles`, from `peer`'s address: relayed
        upstream, or UpstreamUnavailable for a block-mode licence without a block."""
        if isinstance(request, Checkout | Available):
            waiting = self.block_keys.get(request.key)
            if waiting is not None and waiting.block is None:
                # A block-mode licence before its first block: retry later, not "unknown".
                raise UpstreamUnavailable(
                    f"no block of seats from upstream yet ({waiting.last_error or 'taking one'})"
                )
        reply: Reply
        if isinstance(request, Checkout):
            reply = await self.checkout(request, peer)
        elif isinstance(request, Heartbeat):
            reply = await self.heartbeat(request)
        elif isinstance(request, Checkin):
            reply = CheckinReply(0, released=await self.checkin(request.lease))
        elif isinstance(request, Consume):
            reply = await self.consume(request)
        elif isinstance(request, Available):
            reply = await self.link.request(Available(0, key=request.key), AvailableReply)
        else:
            raise TypeError(f"op {request.op!r} is not relayed")
        return dataclasses.replace(reply, id=request.id)

    # ------------------------------------------------------------------ start-up

    async def load(self) -> None:
        """Resume what the database kept: blocks (installed in the engine) and the
        forwarded leases' records, each lasting what it has left by the daemon's clock."""
        at = self.clock.now()
        now = at.wall
        for item in await self.store.load_forwarded():
            self.forwarded[item.secret] = item
            self._lapses[item.secret] = at.mono + remaining_life(item.expires, now)
        for block in await self.store.load_blocks():
            state = self.blocks.get(block.licence_id)
            if state is None:
                continue
            try:
                leaf = verify_chain(self.config.trust, block.chain, block.token)
            except TokenInvalid as exc:
                log.error(
                    "event=stored_block_refused licence=%s error=%r", block.licence_id, str(exc)
                )
                continue
            due_in = remaining_life(block.renewed + state.relayed.renew_every, now)
            self._install(state, block, leaf, at, remaining_life(block.expires, now), due_in)
            log.info("event=block_resumed licence=%s seats=%d", block.licence_id, block.seats)

    async def close(self) -> None:
        """At shutdown: the link closed."""
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
            await self.store.put_forwarded(item, event)
        except StoreError:
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
        await self.store.put_forwarded(item)
        return reply

    async def checkin(self, secret: str) -> bool:
        item = self.forwarded[secret]
        reply = await self.link.request(Checkin(0, secret), CheckinReply)
        await self._forget(item, Kind.CHECKIN, None)
        return reply.released

    async def consume(self, req: Consume) -> ConsumeReply:
        """Metered units are the vendor's to count, online: relayed upstream under the
        forwarded lease, or under the block a local sub-lease is of. A sub-lease's
        `dedup` key is made its own upstream (hashed with the sub-lease's handle), so
        two holders' keys never count as one."""
        secret, dedup = req.lease, req.dedup
        if secret not in self.forwarded:
            state = self._block_of(secret)
            lease = self.engine.lease_by_secret(secret)
            if state is None or lease is None or lease.state is not LeasePhase.LIVE:
                raise LeaseUnknown()
            if state.block is None or state.block.revoked:
                raise UpstreamUnavailable("no block of seats from upstream to count units under")
            secret = state.block.secret
            if dedup is not None:
                dedup = hashlib.sha256(f"{lease.handle}\0{dedup}".encode()).hexdigest()[:32]
        request = Consume(0, secret, req.counter, req.units, dedup)
        return await self.link.request(request, ConsumeReply)

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
        await self.store.delete_forwarded([item.secret], [event])
        self.forwarded.pop(item.secret, None)
        self._lapses.pop(item.secret, None)
        self.publish(event)

    async def prune_forwarded(self, grace: float = 60.0) -> None:
        """Forget forwarded leases `grace` seconds past their expiry on the monotonic
        clock (their holders went away; a wall clock set forward forgets nobody early)."""
        mono = self.clock.now().mono
        stale = [x for x in self.forwarded.values() if self._lapses[x.secret] + grace < mono]
        for item in stale:
            with contextlib.suppress(StoreError):  # tried again next time
                await self._forget(item, Kind.RECLAIM, "lapsed")

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
        state.licence = block_licence(
            relayed, leaf, seats=block.seats, expires=block.expires, revoked=block.revoked
        )
        state.block = block
        deadline = at.mono + life
        state.timeline.renewed(deadline, renewal_at(at.mono, due_in, deadline))
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
        self.engine.blocks.add(licence.id)

    def _verify_block(self, state: BlockState, reply: LeaseReply, nonce: bytes) -> Statement:
        leaf = self.link.verify(reply, nonce)
        problem = refusal(state.relayed, leaf, reply.seats, self.signer.public)
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
        report = await self._usage_report(block, at)
        try:
            reply = await self.link.request(
                Heartbeat(0, block.secret, nonce, usage=report), LeaseReply
            )
        except LeaseUnknown:
            # Upstream no longer counts these seats: stop issuing, and end the block
            # when its sub-leases run out (`revoke`).
            at = self.clock.now()
            sub_leases = (x.expires for x in self.engine.leases_of(block.licence_id))
            end = revoke(block.expires, state.deadline, at, sub_leases)
            block.revoked = True
            block.expires = end.expires
            state.last_error = "upstream revoked the block: issuing stopped"
            log.error("event=block_revoked licence=%s", block.licence_id)
            assert state.licence is not None
            state.licence = dataclasses.replace(state.licence, seats=0)
            state.timeline.deadline = end.deadline
            self._serve(state, at)  # stop issuing first, whatever the disk says
            await self.store.put_block(block)
            return
        leaf = self._verify_block(state, reply, nonce)
        renewed = await self._keep(state, block.secret, block.request, reply, leaf, at)
        log.info("event=block_renewed licence=%s expires=%.0f", block.licence_id, renewed.expires)

    async def _usage_report(self, block: Block, at: Instant) -> bytes | None:
        """The site's use of the block since it was last renewed, signed, for upstream
        (None, and a log line, when the audit log cannot be read: the renewal matters
        more than the report)."""
        try:
            usage = await licence_usage(
                self.store,
                self.engine,
                block.licence_id,
                since=block.renewed,
                at=at,
                max_peaks=MAX_REPORT_PEAKS,
            )
        except StoreError as exc:
            log.warning("event=usage_report_failed licence=%s error=%r", block.licence_id, str(exc))
            return None
        return self.signer.usage_report(made=at.wall, usage=usage)

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
        state.last_error = None
        state.overdue_told = False
        return block

    async def run_block(self, state: BlockState) -> None:
        """Keep one block-mode licence supplied, forever, as `plan` says: take the block
        if there is none, renew it when due, retry with backoff through outages, wake at
        the block's deadline (if sooner) to stop serving it then, and drop a revoked
        block once its sub-leases ran out."""
        while True:
            at = self.clock.now()
            self._serve(state, at)
            block = state.block
            wait, act = plan(
                state.timeline,
                at.mono,
                held=block is not None,
                revoked=block is not None and block.revoked,
            )
            if wait > 0:
                await self.sleep(wait)
                continue
            if act is Act.DROP:
                assert block is not None
                await self.store.delete_block(block.licence_id)
                state.block = state.licence = None
                state.timeline.released()
                state.request = request_key()
                continue
            try:
                if act is Act.TAKE:
                    await self.take_block(state)
                else:
                    await self.renew_block(state)
            except (LicdError, StoreError) as exc:
                message = getattr(exc, "message", str(exc))
                state.last_error = message
                log.warning(
                    "event=block_attempt_failed licence=%s error=%r", state.relayed.id, message
                )
                state.timeline.failed(self.clock.now().mono)
                await self._report_overdue(state)

    async def _report_overdue(self, state: BlockState) -> None:
        """Once an outage: RENEWAL_FAILED (audit log, log line, the `renewal_failed`
        alert) when the block has gone unrenewed for `renewals_missed` times its
        `renew_every`, counted from its last renewal (or the router's start, if it
        never had one)."""
        every = state.relayed.renew_every
        since = state.block.renewed if state.block is not None else self.started
        now = self.clock.now().wall
        if state.overdue_told or now - since < self.renewals_missed * every:
            return
        state.overdue_told = True
        event = Event(
            Kind.RENEWAL_FAILED,
            now,
            licence=state.relayed.id,
            reason=state.last_error,
            detail={
                "last_renewal": since if state.block is not None else None,
                "renew_every": every,
                "missed": int((now - since) // every),
            },
        )
        with contextlib.suppress(StoreError):
            await self.store.append(event)
        self.publish(event)

    async def run(self) -> None:
        """The link's keeper, every block-mode licence's keeper, and a sweep of stale
        forwarded records every SWEEP_EVERY seconds."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="upstream-link")
            for state in self.blocks.values():
                tg.create_task(self.run_block(state), name=f"block-{state.relayed.id}")
            while True:
                await self.sleep(SWEEP_EVERY)
                await self.prune_forwarded()

    # --------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        at = self.clock.now()
        blocks = []
        for state in self.blocks.values():
            b, renew_at = state.block, state.timeline.renew_at
            blocks.append(
                {
                    "licence": state.relayed.id,
                    "seats": b.seats if b else None,
                    "expires": b.expires if b else None,
                    "last_renewal": b.renewed if b else None,
                    "next_renewal": None if renew_at is None else on_wall(renew_at, at),
                    "revoked": b.revoked if b else False,
                    "valid": state.valid(at),
                    "last_error": state.last_error,
                }
            )
        return {
            "servers": list(self.config.servers),
            "link": self.link.state.to_json(at),
            "modes": dict(self.modes),
            "blocks": blocks,
            "forwarded": len(self.forwarded),
        }

    def forwarded_listing(self) -> list[Forwarded]:
        return sorted(self.forwarded.values(), key=lambda x: x.handle)


async def _nothing() -> None:
    """No checkpoint to make (a router without a daemon clock to record)."""
