"""The asyncio client: configuration, the shared connection, `available` and `checkout`.

`AsyncClient` resolves servers and trust anchors (arguments or LICD_SERVER /
LICD_SERVER_KEY), keeps one shared connection (reopened on demand), retries transient
failures with jittered backoff, and verifies every lease token before handing out an
`AsyncLease` (see lease.py); a checkout cancelled after it was sent checks in the lease
its reply brings. A checkout that waits in the daemon's queue does so on a connection of
its own, taken back after a break with the same request key. It never blocks the event
loop and never reads the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeAlias, TypeVar

from . import identity, messages, tokens
from .backoff import Backoff, is_retryable, retry_delay
from .clock import Clock, SystemClock
from .connection import (
    DEFAULT_SERVERS,
    SERVER_ENV,
    Address,
    Connection,
    UpdateCallback,
    blocking_checkin,
    parse_address,
    parse_servers,
)
from .errors import (
    ConnectionLost,
    LicdError,
    ProtocolViolation,
    SeatsExhausted,
    TokenInvalid,
    Unavailable,
)
from .lease import (
    AsyncLease,
    ExpiringCallback,
    IdleWarningCallback,
    LeaseState,
    LostCallback,
    Mode,
    RenewedCallback,
    as_lease_reply,
    run_callback,
)

__all__ = ["AsyncClient", "AsyncLease", "LeaseState", "Mode"]

log = logging.getLogger("licd_client")

SERVER_KEY_ENV = "LICD_SERVER_KEY"
DEFAULT_CLIENT_NAME = "licd-client/0.1.0"
NO_KEY_MESSAGE = (
    "no server key: set LICD_SERVER_KEY (or pass the server key) to the daemon's public "
    "key, as printed by `licd key show`"
)

#: A checkout interrupted once its request is out (Ctrl-C, a cancelled task) waits this
#: long, on the client's clock, for the reply, so that a lease it brings is checked in
#: (each for as long again) instead of being held until it lapses.
INTERRUPT_GRACE = 2.0

T = TypeVar("T")
#: `on_queued(position, waiting, wait)`: a queued checkout's place (1: served next), the
#: checkouts in the licence's queue, and the daemon's estimate of the wait (None: none).
QueuedCallback: TypeAlias = Callable[[int, int, float | None], object]


# ------------------------------------------------------------------- configuration


def parse_server_keys(text: str) -> list[bytes]:
    """Comma-separated public keys (64 hex digits each); ValueError if one is malformed."""
    return [tokens.key_from_text(part) for part in text.split(",") if part.strip()]


def resolve_anchors(server_key: str | bytes | Sequence[str | bytes] | None) -> list[bytes]:
    """Trust anchors from an argument, else from LICD_SERVER_KEY; possibly none."""
    if server_key is None:
        return parse_server_keys(os.environ.get(SERVER_KEY_ENV, ""))
    items = [server_key] if isinstance(server_key, str | bytes) else list(server_key)
    anchors: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            if len(item) != tokens.KEY_LEN:
                raise ValueError(f"a server key is {tokens.KEY_LEN} bytes")
            anchors.append(item)
        else:
            anchors.extend(parse_server_keys(item))
    return anchors


def leader_of(exc: LicdError) -> Address | None:
    """The address an `unavailable` error names as the cluster's leader, if any (a
    malformed one is ignored: the list of servers is tried instead)."""
    leader = (exc.detail or {}).get("leader")
    if not isinstance(leader, str):
        return None
    try:
        return parse_address(leader)
    except ValueError:
        return None


def resolve_servers(servers: str | Sequence[str | Address] | None) -> list[Address]:
    """Addresses from an argument, else LICD_SERVER, else 127.0.0.1:27500."""
    if servers is None:
        text = os.environ.get(SERVER_ENV, "").strip()
        return parse_servers(text) if text else list(DEFAULT_SERVERS)
    if isinstance(servers, str):
        return parse_servers(servers)
    out = [parse_address(s) if isinstance(s, str) else (s[0], int(s[1])) for s in servers]
    if not out:
        raise ValueError("no server address given")
    return out


# -------------------------------------------------------------------------- client


class AsyncClient:
    """A client of one licd (or an ordered list of them). Use one per event loop."""

    def __init__(
        self,
        servers: str | Sequence[str | Address] | None = None,
        server_key: str | bytes | Sequence[str | bytes] | None = None,
        *,
        client_name: str = DEFAULT_CLIENT_NAME,
        ssl: _ssl.SSLContext | None = None,
        io_timeout: float = 5.0,
        retry_for: float = 10.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.servers = resolve_servers(servers)
        self.anchors = resolve_anchors(server_key)
        self.client_name = client_name
        self.ssl = ssl
        self.io_timeout = io_timeout
        self.retry_for = retry_for
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.rng = rng if rng is not None else random.Random()
        self.backoff = backoff if backoff is not None else Backoff()
        self._conn: Connection | None = None
        #: The address to try first when connecting next: the leader a standby named,
        #: or the server after one that answered `unavailable` (`_move`).
        self._prefer: Address | None = None
        self._connect_lock = asyncio.Lock()
        #: The connections of queued checkouts in flight, each its own (`_checkout_once`).
        self._queueing: set[Connection] = set()
        self._leases: set[AsyncLease] = set()
        self._closed = False

    @property
    def hello(self) -> messages.HelloReply | None:
        """The current connection's hello result (server, site, key, time), if connected."""
        return self._conn.hello if self._conn is not None else None

    @property
    def leases(self) -> list[AsyncLease]:
        """The leases this client holds now."""
        return list(self._leases)

    async def _connection(self) -> Connection:
        async with self._connect_lock:
            if self._conn is not None and not self._conn.closed and not self._closed:
                return self._conn
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            self._conn = await self._open()
            return self._conn

    async def _open(self) -> Connection:
        """A new connection: to the server to try first (`_prefer`), else down the list;
        ConnectionLost once the client is closed."""
        if self._closed:
            raise ConnectionLost("the client is closed")
        servers = self.servers
        if self._prefer is not None:
            servers = [self._prefer, *(a for a in self.servers if a != self._prefer)]
        return await Connection.open(
            servers,
            io_timeout=self.io_timeout,
            client_name=self.client_name,
            ssl=self.ssl,
            clock=self.clock,
        )

    async def request(
        self, req: messages.Request, *, reply_timeout: float | None = None
    ) -> messages.Reply:
        """One attempt at one request, on the shared connection (opened if need be).

        A server that answers `unavailable` naming another as `detail.leader` (a standby
        of a cluster) is left for that one, and the request is sent there at once, once;
        one that answers `unavailable` without a leader is left for the next server of
        the list (when there are several) at the next attempt. A lease keeps its secret
        wherever its heartbeats go."""
        conn = await self._connection()
        try:
            return await conn.request(req, reply_timeout=reply_timeout)
        except Unavailable as exc:
            if not await self._redirected(conn, exc):
                raise
        conn = await self._connection()
        return await conn.request(req, reply_timeout=reply_timeout)

    async def _redirected(self, conn: Connection, exc: Unavailable) -> bool:
        """After `conn`'s server answered `exc`: True when it named another as the
        leader, which the next connection goes to (send the request again now); else
        False, and with several servers the next connection tries the next one."""
        leader = leader_of(exc)
        if leader is not None and leader != conn.address:
            await self._move(conn, leader)
            return True
        if len(self.servers) > 1:
            await self._move(conn, self._after(conn.address))
        return False

    def _after(self, address: Address) -> Address:
        """The server after `address` in the list (the first, after the last)."""
        if address not in self.servers:
            return self.servers[0]
        return self.servers[(self.servers.index(address) + 1) % len(self.servers)]

    async def _move(self, conn: Connection, prefer: Address) -> None:
        """Leave `conn`; the next connection tries `prefer` first."""
        async with self._connect_lock:
            self._prefer = prefer
            if self._conn is conn:
                self._conn = None
        await conn.close()

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        retry_for: float,
        wait: float = 0.0,
        progress: Callable[[], float] | None = None,
    ) -> T:
        """Run `attempt` until it succeeds, a fatal error, or the time budget is spent.

        Transient errors are retried for `retry_for` seconds with jittered backoff;
        seats_exhausted only for `wait` seconds (0: not at all). `progress()` says when,
        on the lease clock, an attempt last got somewhere (a queued checkout's last queue
        update): a failure after that is the first of a new outage, with the whole budget
        and the backoff from its start, however long the attempt had been waiting.
        """
        start = self.clock.now()
        delays = self.retry_delays()
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if self._closed or not is_retryable(exc):
                    raise
                if progress is not None and progress() >= start:
                    start, delays = self.clock.now(), self.retry_delays()
                budget = wait if isinstance(exc, SeatsExhausted) else max(retry_for, wait)
                left = start + budget - self.clock.now()
                if left <= 0:
                    raise
                delay = min(retry_delay(exc, next(delays)), left)
                log.debug("licd_client: retrying in %.2fs after %r", delay, exc)
                await self.clock.sleep(delay)

    def retry_delays(self) -> Iterator[float]:
        """Jittered waits between the attempts of one retried operation."""
        return self.backoff.delays(self.rng)

    async def available(self, key: str) -> messages.AvailableReply:
        """How many seats of licence `key` are free."""

        async def attempt() -> messages.AvailableReply:
            reply = await self.request(messages.Available(0, key=key))
            if not isinstance(reply, messages.AvailableReply):
                raise ProtocolViolation("expected an available reply")
            return reply

        return await self.retrying(attempt, retry_for=self.retry_for)

    def verify(self, reply: messages.LeaseReply, nonce: bytes) -> tokens.Statement:
        """Verify a lease reply's token against the trust anchors, or raise TokenInvalid."""
        if not self.anchors:
            raise TokenInvalid(NO_KEY_MESSAGE)
        return tokens.verify_lease(
            self.anchors,
            reply.chain,
            reply.token,
            nonce=nonce,
            handle=reply.handle,
            batch=reply.batch,
        )

    async def checkout(
        self,
        key: str,
        *,
        seats: int = 1,
        ttl: float | None = None,
        app: str | None = None,
        instance: str | None = None,
        mode: Mode = "lease",
        wait: float = 0.0,
        queue: bool = False,
        on_queued: QueuedCallback | None = None,
        on_expiring: ExpiringCallback | None = None,
        on_renewed: RenewedCallback | None = None,
        on_lost: LostCallback | None = None,
        on_idle_warning: IdleWarningCallback | None = None,
    ) -> AsyncLease:
        """Take `seats` seats of licence `key`; the lease renews itself until released.

        A lost reply is retried with the same idempotency key, so it never takes a second
        seat. `wait` > 0 keeps retrying that long while seats are exhausted. Raises the
        daemon's error (e.g. SeatsExhausted), ConnectionLost, or TokenInvalid.

        `queue`: when no seat is free, wait in the daemon's queue for one (docs/protocol.md,
        "Queueing"), as long as it takes, on a connection of its own; `on_queued(position,
        waiting, wait)` is called with each queue update. A connection that breaks while
        queued is opened again and the checkout sent again, to take its place back. To
        leave the queue, cancel the checkout (`wait` then only retries a full queue).

        `on_idle_warning(seconds)`: a heartbeat's reply says the lease will be reclaimed
        as idle in that many seconds unless the app marks it in use (`AsyncLease.touch`).
        """
        if mode not in ("lease", "strict"):
            raise ValueError("mode must be 'lease' or 'strict'")
        if seats < 1:
            raise ValueError("seats must be at least 1")
        if not self.anchors:
            raise TokenInvalid(NO_KEY_MESSAGE)  # before a seat is taken, not after
        holder = identity.holder(app, instance)
        request_key = secrets.token_hex(16)  # 128 random bits, as the protocol asks
        heard = -math.inf  # when the daemon last said where the checkout is in its queue

        async def queued(update: messages.QueueUpdate) -> None:
            nonlocal heard
            heard = self.clock.now()
            await run_callback("on_queued", on_queued, update.position, update.waiting, update.wait)

        async def attempt() -> tuple[messages.LeaseReply, bytes, float]:
            nonce = secrets.token_bytes(messages.NONCE_LEN)
            req = messages.Checkout(
                0,
                key=key,
                holder=holder,
                request=request_key,
                nonce=nonce,
                seats=seats,
                ttl=ttl,
                queue=queue,
            )
            reply = as_lease_reply(await self._checkout_once(req, queued))
            return reply, nonce, self.clock.now()

        reply, nonce, received = await self.retrying(
            attempt, retry_for=self.retry_for, wait=wait, progress=lambda: heard
        )
        if reply.lease is None:
            raise ProtocolViolation("checkout reply without a lease id")
        try:
            leaf = self.verify(reply, nonce)
        except TokenInvalid:
            await self.checkin(reply.lease)
            raise
        lease = AsyncLease(
            self,
            key=key,
            lease_id=reply.lease,
            mode=mode,
            on_expiring=on_expiring,
            on_renewed=on_renewed,
            on_lost=on_lost,
            on_idle_warning=on_idle_warning,
        )
        lease._accept(reply, leaf, received)
        if self._closed:  # closed while the checkout was in flight: give the seat back
            await self.checkin(reply.lease)
            raise ConnectionLost("the client was closed during the checkout")
        self._leases.add(lease)
        lease._start()
        return lease

    async def _checkout_once(
        self, req: messages.Checkout, on_update: UpdateCallback
    ) -> messages.Reply:
        """One checkout attempt (`_checkout_on`).

        A queued checkout (`req.queue`) goes on a connection of its own, closed once it
        is answered: requests behind it on the shared one (other leases' heartbeats) would
        wait for its final reply, and closing it is how a client leaves the queue
        (docs/protocol.md, "Queueing")."""
        for hop in range(2):  # a standby's redirect is followed once (`request`)
            conn = await (self._open() if req.queue else self._connection())
            if req.queue:
                self._queueing.add(conn)
            try:
                return await self._checkout_on(conn, req, on_update)
            except Unavailable as exc:
                if hop or not await self._redirected(conn, exc):
                    raise
            finally:
                if req.queue:
                    self._queueing.discard(conn)
                    await conn.close()
        raise AssertionError("not reached")

    async def _checkout_on(
        self, conn: Connection, req: messages.Checkout, on_update: UpdateCallback
    ) -> messages.Reply:
        """`req` sent on `conn`, its queue updates passed to `on_update`. Cancelled after
        it is sent, it gives back the lease its reply brings (`_give_back`), hearing no
        more updates, before the cancellation goes on: an interrupted checkout holds no
        seat (docs/protocol.md, "checkout")."""
        interrupted = False

        async def update(queued: messages.QueueUpdate) -> None:
            if not interrupted:
                await on_update(queued)

        # Its own task, so that a cancellation does not drop the reply on the floor.
        sent = asyncio.ensure_future(conn.request(req, on_update=update))
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:
            interrupted = True
            await self._give_back(conn, sent, own=req.queue)
            raise

    async def _give_back(
        self, conn: Connection, sent: asyncio.Future[messages.Reply], *, own: bool
    ) -> None:
        """Wait up to INTERRUPT_GRACE for an interrupted checkout's reply and check in the
        lease it brings. No reply by then: close the connection, and the daemon, seeing
        its client gone, releases the lease itself. On a connection of its `own` (a queued
        checkout's) the client half-closes first: the daemon takes that as the client
        leaving, sends no reply it has not written yet and closes, so the wait is short."""
        if not sent.done():
            if own:
                conn.write_eof()
            log.info(
                "licd_client: checkout interrupted: waiting up to %gs for its reply to "
                "check the lease in",
                INTERRUPT_GRACE,
            )
            timer = asyncio.ensure_future(self.clock.sleep(INTERRUPT_GRACE))
            either: set[asyncio.Future[Any]] = {sent, timer}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            if not sent.done():
                await conn.close()  # fails the request: `sent` ends at once
                await asyncio.wait({sent})
        if sent.cancelled() or sent.exception() is not None:
            return  # no reply: the daemon releases a lease it granted (see above)
        reply = sent.result()
        if isinstance(reply, messages.LeaseReply) and reply.lease is not None:
            await self.checkin(reply.lease, reply_timeout=INTERRUPT_GRACE)

    # What a lease needs of its client (lease.LeaseOwner), besides the above.

    async def checkin(
        self, lease_id: str, *, retry: bool = False, reply_timeout: float | None = None
    ) -> None:
        """Check lease `lease_id` in; never raises (a lease not checked in lapses on its
        own). `retry`: transient failures are retried for `io_timeout` seconds (a lease
        released by the app); else one attempt (a lease the daemon may have dropped)."""

        def attempt() -> Awaitable[messages.Reply]:
            return self.request(messages.Checkin(0, lease=lease_id), reply_timeout=reply_timeout)

        try:
            await self.retrying(attempt, retry_for=self.io_timeout if retry else 0.0)
        except LicdError as exc:  # e.g. lease_unknown: nothing left to release
            log.log(logging.INFO if retry else logging.DEBUG, "licd_client: checkin: %s", exc)
        except Exception as exc:
            log.warning("licd_client: could not check a lease in: %s", exc)

    def checkin_at_exit(self, lease_id: str) -> None:
        """Check lease `lease_id` in over a plain blocking socket, for the exit hook:
        the event loop is gone (lease.py)."""
        timeout = min(self.io_timeout, 2.0)
        blocking_checkin(
            self.servers, lease_id, timeout=timeout, client_name=self.client_name, ssl=self.ssl
        )

    def forget(self, lease: AsyncLease) -> None:
        """`lease` is no longer held (lost, or being released): not in `leases` any more."""
        self._leases.discard(lease)

    async def aclose(self) -> None:
        """Check in every lease this client holds and close the connection."""
        for lease in list(self._leases):
            await lease.release()
        self._closed = True
        for queueing in list(self._queueing):  # their checkouts fail: ConnectionLost
            await queueing.close()
        async with self._connect_lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
