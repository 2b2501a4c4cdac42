"""The site router's upstream link: its one connection to the upstream licd.

A router (a licd with `[upstream]`, docs/router.md) sends every relayed request, and
every block's checkout and renewal, over one `licd_client` connection, kept open by a
keeper task: dialled at start, watched (a keepalive hello every 30 s), dialled again
with jittered backoff whenever it ends, so status says how upstream is without waiting
for a request; the link is up exactly while a connection is open. Every token upstream
returns is verified against `[upstream] trust` before it is used, and a token that does
not verify is logged and never turned into a local answer. `classify` is the one place
that sorts upstream's answers into decisions about the request (passed on as they are)
and faults of upstream or the link (the local client gets `upstream_unavailable`, the
log a line per kind of fault per `FaultLog`). What is relayed, and how, is
licd/core/router.py's: `UpstreamLink` is the `UpstreamPort` the composition root gives
its `Router`.

The rules (classification, which faults to log, redial waits, the link's state) are
pure code below, time passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from ssl import SSLContext
from typing import Any, TypeVar, overload

from licd import __version__
from licd.clock import Clock, Instant
from licd.config.settings import UpstreamConfig
from licd.engine.block import on_wall
from licd_client.backoff import Backoff
from licd_client.connection import Connection, parse_address
from licd_client.errors import (
    ClientError,
    ConnectionLost,
    Denied,
    LeaseUnknown,
    LicdError,
    LicenceExpired,
    LicenceNotYetValid,
    ProtocolViolation,
    QuotaExhausted,
    RateLimited,
    SeatsExhausted,
    TokenInvalid,
    UnknownLicence,
    UpstreamUnavailable,
)
from licd_client.messages import (
    Hello,
    HelloReply,
    LeaseReply,
    Reply,
    Request,
)
from licd_client.tokens import Statement, verify_lease

log = logging.getLogger(__name__)

#: Seconds after which a kind of upstream fault already logged is logged again.
FAULT_LOG_QUIET = 300.0
#: The link keeper's waits between attempts to reach upstream: full jitter, from up to
#: 1 s after the first failure, doubling, to up to 30 s while upstream stays away.
REDIAL = Backoff(base=1.0, cap=30.0)
#: Seconds a connection to upstream must have stayed open for the keeper to dial again
#: at once when it ends (else it waits the next step of REDIAL).
STEADY = 10.0
#: Seconds between keepalive hellos on the open connection to upstream.
KEEPALIVE = 30.0
#: Seconds each connect, hello and request to upstream may take.
IO_TIMEOUT = 5.0
#: The version the link settles on, its keepalives too: protocol 1, whose tokens are
#: each signed on their own. A forwarded lease's token goes on to a local client, which
#: may speak only protocol 1 and could not verify a batched one (docs/protocol.md,
#: "Batched signatures"); a block's token is never batched anyway.
LINK_PROTOCOL = 1

R = TypeVar("R", bound=Reply)


# ------------------------------------------------------ the rules, pure, clock passed in

#: Upstream's refusals that are decisions about the request relayed: the local client
#: gets them as they are (code, message, retry_after, detail). Any other error upstream
#: answers is a fault of upstream or of the link (docs/router.md, "Upstream errors").
DECISIONS: frozenset[type[LicdError]] = frozenset(
    {
        UnknownLicence,
        LicenceExpired,
        LicenceNotYetValid,
        SeatsExhausted,
        LeaseUnknown,
        Denied,
        QuotaExhausted,
        RateLimited,
    }
)


class UpstreamFault(UpstreamUnavailable):
    """Upstream or the link failed a request. On the wire it is `upstream_unavailable`
    with the router's own sentence; `cause` (what went wrong, upstream's text included)
    is for the log and `licd status` only, and `kind` names the fault for `FaultLog`."""

    def __init__(self, message: str, *, cause: str, kind: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.kind = kind


def classify(exc: BaseException) -> LicdError:
    """What the local client gets for `exc`, raised by a request to upstream: a decision
    (DECISIONS) as it is, anything else (an error code of upstream's own failing, a
    code this licd does not know, a broken or refused link, an answer out of protocol)
    as an UpstreamFault that never carries upstream's text."""
    if isinstance(exc, LicdError):
        if type(exc) in DECISIONS:
            return exc
        code = exc.code  # one of the registry's: an unknown code arrives as `internal`
        return UpstreamFault(
            f"the upstream licence server failed the request ({code})",
            cause=f"{code}: {exc.message}",
            kind=code,
        )
    cause = str(exc) or type(exc).__name__
    if isinstance(exc, ProtocolViolation):
        return UpstreamFault(
            "the upstream licence server answered out of protocol",
            cause=cause,
            kind="out_of_protocol",
        )
    return UpstreamFault(UpstreamUnavailable.default_message, cause=cause, kind="unreachable")


class FaultLog:
    """Which upstream faults to log: each kind the first time, then again only once
    `quiet` seconds (monotonic) have passed, saying how many went unlogged meanwhile. A
    flood of failing requests makes a line per kind per `quiet`, not one per request."""

    def __init__(self, quiet: float = FAULT_LOG_QUIET) -> None:
        self.quiet = quiet
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (logged at, unlogged since)

    def admit(self, kind: str, mono: float) -> int | None:
        """None to stay silent, else how many faults of `kind` were not logged since its
        last line. Kinds are few (wire codes and a handful of link failures)."""
        last = self._kinds.get(kind)
        if last is not None and mono - last[0] < self.quiet:
            self._kinds[kind] = (last[0], last[1] + 1)
            return None
        self._kinds[kind] = (mono, 0)
        return 0 if last is None else last[1]


# ------------------------------------------------------------------- the upstream link


class LinkPhase(StrEnum):
    CONNECTING = "connecting"  # since the router started: not connected yet, nothing failed
    CONNECTED = "connected"  # a connection is open and upstream answered its hello
    DOWN = "down"  # upstream cannot be reached (the keeper dials it again and again)


@dataclass
class LinkState:
    """What `licd status` says of the upstream link. `since` is the wall time the link
    last went up or down, the router's start before either, so it is always a time.
    `last_error` keeps the time it happened; `recovered_at` is when the link came back
    up after that error took it down (None while it is down, and for an error upstream
    answered while the link stayed up). `next_attempt` is the keeper's next dial
    (monotonic), while it waits for one."""

    since: float
    phase: LinkPhase = LinkPhase.CONNECTING
    last_error: str | None = None
    error_at: float | None = None
    recovered_at: float | None = None
    next_attempt: float | None = None

    @property
    def connected(self) -> bool:
        return self.phase is LinkPhase.CONNECTED

    def up(self, wall: float) -> bool:
        """Upstream answered at `wall`; True if the link was not up before (news to log)."""
        if self.connected:
            return False
        self.phase, self.since = LinkPhase.CONNECTED, wall
        if self.last_error is not None:
            self.recovered_at = wall
        return True

    def down(self, wall: float, error: str) -> bool:
        """Upstream could not be reached at `wall`; True if the link was up until then.
        From `connecting`, `since` stays the start: it has not been up since."""
        self.fault(wall, error)
        was_up = self.connected
        if was_up:
            self.since = wall
        self.phase = LinkPhase.DOWN
        return was_up

    def fault(self, wall: float, error: str) -> None:
        """A fault at `wall` that leaves the link as it is (an error upstream answered)."""
        self.last_error, self.error_at, self.recovered_at = error, wall, None

    def to_json(self, at: Instant) -> dict[str, Any]:
        return {
            "state": self.phase.value,
            "connected": self.connected,
            "since": self.since,
            "last_error": self.last_error,
            "last_error_at": self.error_at,
            "recovered_at": self.recovered_at,
            "next_attempt": None if self.next_attempt is None else on_wall(self.next_attempt, at),
        }


class Redial:
    """How long the link keeper waits before it dials upstream again. After a failed
    attempt: the next step of a jittered backoff (`REDIAL`). After an open connection
    ended: nothing if it had stayed open `STEADY` seconds (upstream restarted, or closed
    an idle connection), else the next step, so an upstream that hangs up after every
    hello is never dialled in a tight loop. The backoff starts over only after a steady
    connection. Pure: the randomness is injected, the caller measures time."""

    def __init__(self, backoff: Backoff = REDIAL, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.rng = rng or random.Random()
        self._delays: Iterator[float] | None = None

    def failed(self) -> float:
        """Seconds to wait after a failed attempt."""
        if self._delays is None:
            self._delays = self.backoff.delays(self.rng)
        return next(self._delays)

    def lost(self, lasted: float) -> float:
        """Seconds to wait after a connection that was open for `lasted` seconds ended."""
        if lasted >= STEADY:
            self._delays = None
            return 0.0
        return self.failed()


class UpstreamLink:
    """The router's connection to upstream and what status says of it. A request is one
    attempt (dialling first if no connection is open). `run`, the keeper, dials at start,
    watches the open connection (a keepalive hello every KEEPALIVE seconds) and dials
    again when it ends or an attempt fails, when `Redial` says: the link comes back by
    itself, not at the next request. The link is up exactly while a connection is open."""

    def __init__(
        self,
        config: UpstreamConfig,
        clock: Clock,
        site: str,
        ssl: SSLContext | None,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.clock = clock
        self.servers = [parse_address(server) for server in config.servers]
        self.name = f"licd-router/{__version__} ({site})"[:255]
        self.ssl = ssl
        self.state = LinkState(since=clock.now().wall)
        self.faults = FaultLog()
        self.redial = Redial(REDIAL, rng)
        self.sleep = sleep  # the keeper's waits
        self._conn: Connection | None = None
        self._opened = 0.0  # monotonic time `_conn` was opened
        self._lock = asyncio.Lock()
        self._closed = False

    def _open(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def _up(self) -> None:
        if self.state.up(self.clock.now().wall):
            log.info("event=upstream_connected")

    async def _connection(self) -> Connection:
        """The open connection, dialled (one attempt) if there is none. Raises what
        `failed` makes of a failure: the link is down."""
        async with self._lock:
            if self._open():
                assert self._conn is not None
                return self._conn
            await self._drop(self._conn)
            try:
                if self._closed:
                    raise ConnectionLost("the link is closed")
                conn = await Connection.open(
                    self.servers,
                    io_timeout=IO_TIMEOUT,
                    client_name=self.name,
                    ssl=self.ssl,
                    protocol=LINK_PROTOCOL,
                )
            except (LicdError, ClientError, OSError, TimeoutError) as exc:
                raise self.failed(exc) from None
            self._conn, self._opened = conn, self.clock.now().mono
            self._up()
            return conn

    async def _drop(self, conn: Connection | None) -> None:
        """Forget and close `conn` (closing twice is harmless)."""
        if conn is None:
            return
        if self._conn is conn:
            self._conn = None
        await conn.close()

    @overload
    async def request(self, req: Request) -> Reply: ...
    @overload
    async def request(self, req: Request, expect: type[R]) -> R: ...

    async def request(self, req: Request, expect: type[Reply] = Reply) -> Reply:
        """One attempt, answered with an `expect`. Upstream's decisions pass through;
        every other failure raises an UpstreamFault (see `classify`)."""
        conn = await self._connection()
        try:
            reply = await conn.request(req)
        except (LicdError, ClientError, OSError, TimeoutError) as exc:
            if conn.closed:
                await self._drop(conn)  # broken: the keeper sees it end and dials again
            raise self.failed(exc) from None
        if not isinstance(reply, expect):
            raise self.failed(ProtocolViolation(f"{req.op} answered with {type(reply).__name__}"))
        self._up()
        return reply

    def failed(self, exc: BaseException) -> LicdError:
        """The error for the local client when a request upstream raised `exc` (or its
        answer broke the protocol): the link's state and the log are told of a fault.
        Without an open connection the link is down; with one, upstream answered."""
        out = classify(exc)
        if not isinstance(out, UpstreamFault):
            if self._open():
                self._up()  # upstream decided: the link works
            return out
        at = self.clock.now()
        if self._open():
            self.state.fault(at.wall, out.cause)
        elif self.state.down(at.wall, out.cause):
            log.info("event=upstream_disconnected")
        unlogged = self.faults.admit(out.kind, at.mono)
        if unlogged is not None:
            log.warning(
                "event=upstream_failed kind=%s error=%r unlogged=%d", out.kind, out.cause, unlogged
            )
        return out

    async def run(self) -> None:
        """The keeper, forever: dial upstream, watch the connection while it is open,
        and after it ends or an attempt fails wait what `Redial` says and dial again."""
        wait = 0.0
        while True:
            if wait > 0:
                self.state.next_attempt = self.clock.now().mono + wait
                try:
                    await self.sleep(wait)
                finally:
                    self.state.next_attempt = None
            try:
                conn = await self._connection()
            except LicdError:
                wait = self.redial.failed()  # failed() marked the link down and logged
                continue
            opened = self._opened
            await self._watch(conn)
            await self._drop(conn)
            wait = self.redial.lost(self.clock.now().mono - opened)
            if wait > 0 and not self._open():  # no dial at once: down until the next one
                self.failed(ConnectionLost("the upstream licence server closed the connection"))

    async def _watch(self, conn: Connection) -> None:
        """Until `conn` ends, with a keepalive hello on it every KEEPALIVE seconds: a licd
        closes a connection silent for 120 s, and a link broken without a word (a cable
        pulled, a firewall dropping the flow) shows only when a request goes unanswered
        for IO_TIMEOUT seconds, which that hello does."""
        hello = Hello(0, protocol=LINK_PROTOCOL, client=self.name)
        while not conn.closed:
            ended = asyncio.ensure_future(conn.wait_closed())
            nap = asyncio.ensure_future(self.sleep(KEEPALIVE))
            try:
                await asyncio.wait((ended, nap), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (ended, nap):
                    task.cancel()
                await asyncio.wait((ended, nap))
            if not nap.cancelled():
                nap.result()  # whatever the sleep raised is the keeper's
            if conn.closed or self._conn is not conn:
                return
            with contextlib.suppress(LicdError):  # failed() told the state and the log
                await self.request(hello, HelloReply)

    def verify(self, reply: LeaseReply, nonce: bytes) -> Statement:
        """Upstream's token checked against the trust anchors, or UpstreamUnavailable."""
        try:
            return verify_lease(
                self.config.trust, reply.chain, reply.token, nonce=nonce, handle=reply.handle
            )
        except TokenInvalid as exc:
            at = self.clock.now()
            self.state.fault(at.wall, f"upstream token refused: {exc}")
            unlogged = self.faults.admit("token_refused", at.mono)
            if unlogged is not None:
                log.error("event=upstream_token_refused error=%r unlogged=%d", str(exc), unlogged)
            raise UpstreamUnavailable(
                "the upstream licence server's answer did not verify"
            ) from None

    async def close(self) -> None:
        """At shutdown, once the keeper has stopped: the connection closed for good."""
        self._closed = True
        await self._drop(self._conn)
