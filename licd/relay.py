"""The site router: licd relaying to an upstream licd (PROTOCOL.md section 5).

Theory of operation. The upstream link is an ordinary `licd_client.AsyncClient`; every
token upstream returns is verified against `[upstream] trust` before it is used, and a
token that does not verify is logged and never turned into a local answer.
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

from licd_client import AsyncClient, identity
from licd_client.backoff import Backoff
from licd_client.errors import (
    ClientError,
    LeaseUnknown,
    LicdError,
    ProtocolViolation,
    TokenInvalid,
    Unavailable,
    UpstreamUnavailable,
)
from licd_client.messages import Checkin, Checkout, Heartbeat, Holder, LeaseReply, Reply
from licd_client.tokens import Statement, verify_chain, verify_lease

from . import __version__
from .clock import Clock
from .config import RelayedLicence, UpstreamConfig
from .engine import Engine, Licence
from .events import Event, Kind, holder_event
from .keys import Signer
from .records import Block, Forwarded
from .store import Store, StoreError

log = logging.getLogger(__name__)

#: Seconds a block's renewal is retried before giving up until the next round, and the
#: shortest wait between renewal rounds.
MIN_RENEW_WAIT = 1.0


@dataclass
class LinkState:
    connected: bool = False
    since: float | None = None  # wall time of the last change of `connected`
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"connected": self.connected, "since": self.since, "last_error": self.last_error}


class UpstreamLink:
    """Requests to the upstream licd, each one attempt, with the link's state kept."""

    def __init__(
        self, config: UpstreamConfig, clock: Clock, site: str, ssl: SSLContext | None
    ) -> None:
        self.config = config
        self.clock = clock
        self.client = AsyncClient(
            list(config.servers),
            list(config.trust),
            client_name=f"licd-router/{__version__} ({site})",
            ssl=ssl,
            retry_for=0.0,
        )
        self.state = LinkState()

    def _mark(self, connected: bool, error: str | None = None) -> None:
        if connected != self.state.connected:
            self.state.since = self.clock.now().wall
            log.info("event=upstream_%s", "connected" if connected else "disconnected")
        self.state.connected = connected
        if error is not None:
            self.state.last_error = error

    async def request(self, req: Any) -> Reply:
        """One attempt. Upstream's own refusals (LicdError) pass through; a link that
        cannot be used becomes UpstreamUnavailable."""
        try:
            reply = await self.client.request(req)
        except LicdError as exc:
            self._mark(True)
            raise exc from None
        except (ClientError, OSError, TimeoutError) as exc:
            cause = str(exc) or type(exc).__name__
            self._mark(False, cause)
            log.warning("event=upstream_failed error=%r", cause)
            if isinstance(exc, ProtocolViolation):
                raise UpstreamUnavailable(
                    f"the upstream licence server answered out of protocol: {cause}"
                ) from None
            raise UpstreamUnavailable() from None
        self._mark(True)
        return reply

    def verify(self, reply: LeaseReply, nonce: bytes) -> Statement:
        """Upstream's token checked against the trust anchors, or UpstreamUnavailable."""
        try:
            return verify_lease(
                self.config.trust, reply.chain, reply.token, nonce=nonce, handle=reply.handle
            )
        except TokenInvalid as exc:
            self.state.last_error = f"upstream token refused: {exc}"
            log.error("event=upstream_token_refused error=%r", str(exc))
            raise UpstreamUnavailable(
                "the upstream licence server's answer did not verify"
            ) from None

    async def close(self) -> None:
        await self.client.aclose()


def _lease_reply(reply: Reply) -> LeaseReply:
    if not isinstance(reply, LeaseReply):
        raise UpstreamUnavailable("the upstream licence server answered out of protocol")
    return reply


@dataclass
class BlockState:
    """A block-mode licence's runtime view, for status."""

    relayed: RelayedLicence
    # One idempotency key per block taken: a retry after a lost reply gets the same
    # block back from upstream instead of a second one.
    request: str = field(default_factory=lambda: f"block-{secrets.token_hex(8)}")
    block: Block | None = None
    next_renewal: float | None = None
    last_error: str | None = None
    chain: list[bytes] = field(default_factory=list)


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
    ) -> None:
        self.link = UpstreamLink(config, clock, signer.site, ssl)
        self.engine = engine
        self.store = store
        self.signer = signer
        self.clock = clock
        self.publish = publish
        self.rng = rng or random.Random()
        self.forward_keys = {r.key: r for r in relayed if r.mode == "forward"}
        self.blocks = {r.id: BlockState(r) for r in relayed if r.mode == "block"}
        self.block_keys = {state.relayed.key: state for state in self.blocks.values()}
        self.modes = {r.id: r.mode for r in relayed}
        self.forwarded: dict[str, Forwarded] = {}  # by lease secret
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
        forwarded leases' records."""
        for item in await self.store.load_forwarded():
            self.forwarded[item.secret] = item
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
            self._install(state, block, leaf)
            log.info("event=block_resumed licence=%s seats=%d", block.licence_id, block.seats)

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
        reply = _lease_reply(await self.link.request(upstream_req))
        if reply.lease is None:
            raise UpstreamUnavailable("the upstream licence server sent no lease id")
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
        self.publish(event)
        return reply

    async def heartbeat(self, req: Heartbeat) -> LeaseReply:
        item = self.forwarded[req.lease]
        try:
            reply = _lease_reply(await self.link.request(Heartbeat(0, req.lease, req.nonce)))
        except LeaseUnknown:
            await self._forget(item, Kind.RECLAIM, "upstream no longer knows the lease")
            raise
        self.link.verify(reply, req.nonce)
        item.expires = reply.expires
        # Kept, so that a restarted router does not prune a lease its holder still renews.
        await self._persist(self.store.put_forwarded(item))
        return reply

    async def checkin(self, secret: str) -> bool:
        item = self.forwarded[secret]
        reply = await self.link.request(Checkin(0, secret))
        await self._forget(item, Kind.CHECKIN, None)
        return bool(getattr(reply, "released", True))

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
        self.publish(event)

    async def prune_forwarded(self, grace: float = 60.0) -> None:
        """Forget forwarded leases long past their expiry (their holders went away)."""
        now = self.clock.now().wall
        stale = [x for x in self.forwarded.values() if x.expires + grace < now]
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

    def _install(self, state: BlockState, block: Block, leaf: Statement) -> None:
        """Serve local checkouts from `block`: the engine's licence follows it."""
        relayed = state.relayed
        seats = 0 if block.revoked else block.seats
        product = leaf.payload.get("product")
        licence = Licence(
            key=relayed.key,
            id=relayed.id,
            product=product if isinstance(product, str) else relayed.id,
            seats=max(seats, 0),
            lease_ttl=relayed.lease_ttl,
            grace=relayed.grace,
            expires=block.expires,
            features=leaf.features,
        )
        self.engine.put_licence(licence)
        state.block = block
        state.chain = [*block.chain, block.token]
        self.signer.chains[relayed.id] = state.chain
        self.signer.chain_iat[relayed.id] = leaf.iat
        state.next_renewal = block.renewed + relayed.renew_every

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
        reply = _lease_reply(await self.link.request(req))
        if reply.lease is None:
            raise UpstreamUnavailable("the upstream licence server sent no lease id")
        try:
            leaf = self._verify_block(state, reply, nonce)
        except UpstreamUnavailable:
            await self._give_back(reply.lease)
            state.request = f"block-{secrets.token_hex(8)}"  # that one was given back
            raise
        block = await self._keep(state, reply.lease, request, reply, leaf)
        log.info("event=block_taken licence=%s seats=%d", relayed.id, block.seats)

    async def renew_block(self, state: BlockState) -> None:
        block = state.block
        assert block is not None
        nonce = secrets.token_bytes(16)
        try:
            reply = _lease_reply(await self.link.request(Heartbeat(0, block.secret, nonce)))
        except LeaseUnknown:
            # Upstream no longer counts these seats. Stop issuing, and let the sub-leases
            # run out at the expiries they already have (no renewal passes them): the
            # block's expiry becomes that horizon. After it, a new block may be taken.
            now = self.clock.now().wall
            live = [x.expires for x in self.engine.leases_of(block.licence_id)]
            block.revoked = True
            block.expires = min(block.expires, max([now, *live]))
            state.last_error = "upstream revoked the block: issuing stopped"
            log.error("event=block_revoked licence=%s", block.licence_id)
            leaf = verify_chain(self.link.config.trust, block.chain, block.token)
            self._install(state, block, leaf)  # stop issuing first, whatever the disk says
            await self.store.put_block(block)
            return
        leaf = self._verify_block(state, reply, nonce)
        renewed = await self._keep(state, block.secret, block.request, reply, leaf)
        log.info("event=block_renewed licence=%s expires=%.0f", block.licence_id, renewed.expires)

    async def _keep(
        self, state: BlockState, secret: str, request: str, reply: LeaseReply, leaf: Statement
    ) -> Block:
        """A verified block (taken or renewed): persisted, then served from."""
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
        self._install(state, block, leaf)
        return block

    async def run_block(self, state: BlockState) -> None:
        """Keep one block-mode licence supplied, forever: take the block if there is
        none, renew it every `renew_every`, retry with backoff through outages."""
        delays = Backoff(base=1.0, cap=300.0).delays(self.rng)
        while True:
            block = state.block
            now = self.clock.now().wall
            if block is not None and block.revoked:
                # Issuing stopped; once the last sub-lease has run out, start afresh.
                await asyncio.sleep(max(0.0, block.expires - now))
                await self.store.delete_block(block.licence_id)
                state.block = None
                state.request = f"block-{secrets.token_hex(8)}"
                continue
            due = 0.0 if block is None else max(0.0, (state.next_renewal or now) - now)
            if block is not None:
                # Never let a block lapse for want of trying: renew by half its life left.
                due = min(due, max(0.0, (block.expires - now) / 2))
            await asyncio.sleep(due)
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
                state.next_renewal = self.clock.now().wall + wait
                await asyncio.sleep(wait)

    async def run(self) -> None:
        """Every block-mode licence's keeper, and a sweep of stale forwarded records."""
        async with asyncio.TaskGroup() as tg:
            for state in self.blocks.values():
                tg.create_task(self.run_block(state), name=f"block-{state.relayed.id}")
            while True:
                await asyncio.sleep(60)
                await self.prune_forwarded()

    # --------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = self.clock.now().wall
        blocks = []
        for state in self.blocks.values():
            b = state.block
            blocks.append(
                {
                    "licence": state.relayed.id,
                    "seats": b.seats if b else None,
                    "expires": b.expires if b else None,
                    "last_renewal": b.renewed if b else None,
                    "next_renewal": state.next_renewal,
                    "revoked": b.revoked if b else False,
                    "valid": bool(b and not b.revoked and b.expires > now),
                    "last_error": state.last_error,
                }
            )
        return {
            "servers": list(self.link.config.servers),
            "link": self.link.state.to_json(),
            "modes": dict(self.modes),
            "blocks": blocks,
            "forwarded": len(self.forwarded),
        }

    def forwarded_listing(self) -> list[Forwarded]:
        return sorted(self.forwarded.values(), key=lambda x: x.handle)
