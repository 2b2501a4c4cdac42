"""Maps decoded request maps to service calls and results to reply maps.

Every failure is answered as the one error map (`licd.core.errors`) tells it to a
client, closing the connection when the map says so. It applies the per-peer checkout
limits (`ratelimit`): a peer whose budget of denied, or of granted, checkouts is spent
gets `rate_limited` with `retry_after` before the engine is consulted. On a site
router, a request the `Router` handles is handed to it (the only answer that costs a
task: upstream is awaited). It knows the protocol's messages, not sockets and not SQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from licd import __version__
from licd.clock import Instant
from licd.core.errors import Audience, error_reply
from licd.core.keys import BatchSigner, Signed, Signer
from licd.core.router import Router
from licd.core.service import MAX_UPDATE_IN, LicenceService, update_in
from licd.deferred import Deferred
from licd.engine import Grant, SeatLease
from licd.engine.queue import Waiter
from licd.engine.ratelimit import CheckoutLimits
from licd_client.errors import (
    BadRequest,
    HelloRequired,
    LicdError,
    RateLimited,
    ShuttingDown,
    Unavailable,
    UnsupportedProtocol,
    UpstreamUnavailable,
)
from licd_client.messages import (
    BATCHED,
    PROTOCOLS,
    REQUEST_TYPES,
    Available,
    AvailableReply,
    BatchProof,
    Checkin,
    CheckinReply,
    Checkout,
    Consume,
    ConsumeReply,
    Heartbeat,
    Hello,
    HelloReply,
    QueueUpdate,
    Request,
    lease_wire,
    parse_request,
    request_id,
)

if TYPE_CHECKING:
    from licd.core.cluster import Leadership

SERVER_NAME = f"licd/{__version__}"

#: A checkout's errors that are no verdict on it (this daemon or its upstream could not
#: decide): they spend neither of the peer's budgets.
NO_VERDICT = (RateLimited, ShuttingDown, Unavailable, UpstreamUnavailable)


#: A reply map and whether to close the connection after it.
Answer = tuple[dict[str, Any], bool]


class Handover(Deferred[Answer]):
    """A checkout's answer, which hands a fresh lease to its client. The server says
    whether it got there: `delivered()` once written, `undelivered()` when the client
    left first (docs/protocol.md, "checkout"); then, once settled, the lease is checked
    in at once, unless another checkout was given it meanwhile (a retry of the same
    request, a device's repeat), which `Dispatcher` tracks in `_unclaimed`."""

    __slots__ = ("_dispatcher", "lease")

    def __init__(self, dispatcher: Dispatcher, lease: SeatLease | None = None) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self.lease = lease  # None: nothing to give back (a checkout the router relayed)
        if lease is not None:
            dispatcher._unclaimed.add(lease.secret)

    def delivered(self) -> None:
        if self.lease is not None:
            self._dispatcher._unclaimed.discard(self.lease.secret)

    def undelivered(self) -> None:
        self.add_done_callback(self._give_back)

    def _give_back(self, _: Deferred[Answer]) -> None:
        lease, unclaimed = self.lease, self._dispatcher._unclaimed
        if lease is not None and lease.secret in unclaimed:
            unclaimed.discard(lease.secret)
            self._dispatcher.service.release_abandoned(lease)


class QueuedCheckout(Handover):
    """A checkout waiting in a licence's queue (docs/protocol.md, "Queueing"): the
    service's `QueueListener` for it, and the answer its connection owes. The connection
    `attach`es a writer for the queue updates, which go out while this answer is the one
    owed next; a connection that ends before the answer `detach`es the waiter (its
    place is kept a while), or gives the lease back if it was served meanwhile."""

    __slots__ = (
        "waiter",
        "_request",
        "_protocol",
        "_data",
        "_started",
        "_write",
        "_told",
        "_told_at",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        waiter: Waiter,
        request: Checkout,
        protocol: int,
        data: dict[str, Any],
        started: float,
    ) -> None:
        super().__init__(dispatcher)
        self.waiter = waiter
        self._request = request
        self._protocol = protocol  # its connection's
        self._data = data
        self._started = started
        self._write: Callable[[dict[str, Any]], bool] | None = None
        self._told: tuple[int, int] | None = None  # (position, waiting) last sent
        self._told_at = 0.0  # monotonic

    def attach(self, write: Callable[[dict[str, Any]], bool]) -> None:
        """Updates go to `write` from now on, the first at once. `write` says whether it
        sent the update (it may not yet, while answers before this one are owed)."""
        self._write = write
        self.moved()

    def moved(self) -> None:
        """Send an update if the place changed, or if half the promised interval passed."""
        write, service = self._write, self._dispatcher.service
        if write is None or self.done() or not service.engine.is_waiting(self.waiter):
            return
        position, waiting, wait = service.engine.position(self.waiter)
        licence = service.engine.licence_by_id(self.waiter.licence_id)
        every = MAX_UPDATE_IN if licence is None else update_in(licence)
        now = service.now().mono
        if self._told == (position, waiting) and now - self._told_at < every / 2:
            return
        update = QueueUpdate(
            self._request.id, position=position, waiting=waiting, update_in=every, wait=wait
        )
        if write(update.to_wire()):
            self._told, self._told_at = (position, waiting), now

    def served(self, grant: Grant) -> None:
        if self.done():
            return
        dispatcher = self._dispatcher
        self.lease = grant.lease
        if grant.fresh:
            dispatcher._unclaimed.add(grant.lease.secret)
        answer = dispatcher._lease_answer(
            self._protocol,
            self._request.id,
            grant,
            self._request.nonce,
            dispatcher.service.now().wall,
            with_secret=True,
        )
        # Not observed as a request's latency: the wait is the queue's (licd_queue_wait).
        if isinstance(answer, Deferred):
            answer.add_done_callback(lambda signed: self.settle(signed.result()))
        else:
            self.settle(answer)

    def refused(self, error: LicdError) -> None:
        if not self.done():
            self.settle(self._dispatcher._failed(self._data, self._started, error))

    def undelivered(self) -> None:
        if not self.done():
            self._dispatcher.service.detach(self.waiter)
        super().undelivered()


@dataclass
class Session:
    """What the daemon knows about one connection."""

    peer: str
    hello_done: bool = False
    client: str = ""
    protocol: int = 1  # the version its hello settled on


class Dispatcher:
    def __init__(
        self,
        service: LicenceService,
        signer: Signer,
        *,
        on_request: Callable[[str, float, str | None], None] | None = None,
        limits: CheckoutLimits | None = None,
    ) -> None:
        self.service = service
        self.signer = signer
        self.limits = limits  # per-peer checkout budgets; None: unlimited
        self.shutting_down = False
        self._tasks: set[asyncio.Task[Answer]] = set()  # relayed requests under way
        #: Secrets of fresh leases whose checkout answer has not reached its client and
        #: that no other checkout was given: the ones a `Handover` may give back.
        self._unclaimed: set[str] = set()
        self.router: Router | None = None  # a site router's relaying
        #: A cluster node's leadership: while it may not answer, every op but hello
        #: gets its refusal (`unavailable` naming the leader).
        self.cluster: Leadership | None = None
        #: Told of every request: (op, seconds taken, error code or None). Metrics.
        self.on_request = on_request
        self._batcher: BatchSigner | None = None  # made on the loop, at first use

    def handle(self, session: Session, data: dict[str, Any]) -> Answer | Deferred[Answer]:
        """Answer one decoded frame: (reply map, whether to close the connection) at once
        when no I/O is needed (hello, heartbeat, available, every error), else a `Deferred` of it.
        No request costs a task, except one the router relays (its upstream is awaited)."""
        started = time.perf_counter() if self.on_request is not None else 0.0
        try:
            if self.shutting_down:
                raise ShuttingDown()
            cluster = self.cluster
            if cluster is not None and data.get("op") != "hello":
                refusal = cluster.refusal()
                if refusal is not None:
                    raise refusal
            # Before hello, any op but hello is refused whatever its arguments.
            if not session.hello_done and _known_op(data) not in (None, "hello"):
                raise HelloRequired()
            request = parse_request(data)
            at = self.service.now()  # one reading for the checkout's admission and grant
            if isinstance(request, Checkout):
                self._admit(session, at.mono)
            router = self.router
            if router is not None and router.handles(request):
                return self._relayed(router, session, request, data, started)
            if not isinstance(request, Hello | Heartbeat | Available):
                return self._answer_durably(session, request, data, started, at)
            answer = self._answer_now(session, request, at)
        except Exception as exc:
            return self._failed(data, started, exc)
        self._observe(data, started, None)
        return answer

    def _admit(self, session: Session, now: float) -> None:
        """Raise RateLimited when the peer's denied or granted checkouts are spent
        (`now`: monotonic)."""
        limits = self.limits
        if limits is not None:
            wait = limits.refusal(session.peer, now)
            if wait is not None:
                raise RateLimited(
                    "too many checkouts from this address; retry later", retry_after=wait
                )

    def _charge(self, session: Session, error: Exception | None, now: float | None = None) -> None:
        """Count a checkout's outcome against the peer's budget: granted, or denied
        (the engine's, or upstream's, refusal). `now`: monotonic, if already read."""
        limits = self.limits
        verdict = error is None or (
            isinstance(error, LicdError) and not isinstance(error, NO_VERDICT)
        )
        if limits is not None and verdict:
            mono = self.service.now().mono if now is None else now
            limits.charge(session.peer, mono, granted=error is None)

    def _relayed(
        self,
        router: Router,
        session: Session,
        request: Request,
        data: dict[str, Any],
        started: float,
    ) -> Deferred[Answer]:
        """The router's answer to `request`, in a task: a checkout's counts against the
        peer's budgets as a local one's does."""
        out: Deferred[Answer] = Handover(self) if isinstance(request, Checkout) else Deferred()

        async def relayed() -> Answer:
            try:
                reply = await router.answer(request, session.peer)
            except Exception as exc:
                if isinstance(request, Checkout):
                    self._charge(session, exc)
                return self._failed(data, started, exc)
            if isinstance(request, Checkout):
                self._charge(session, None)
            self._observe(data, started, None)
            return reply.to_wire(), False

        def done(task: asyncio.Task[Answer]) -> None:
            if task.cancelled():  # the daemon is stopping
                out.settle(self._failed(data, started, ShuttingDown()))
            else:
                out.settle(task.result())

        task = asyncio.ensure_future(relayed())
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(done)
        return out

    def _answer_durably(
        self,
        session: Session,
        request: Request,
        data: dict[str, Any],
        started: float,
        at: Instant,
    ) -> Answer | Deferred[Answer]:
        """A checkout, checkin or consume at `at`: decided now, answered once its commit
        is done (settled by the commit's callback: no task)."""
        service = self.service
        if isinstance(request, Checkout):
            begin = service.begin_queued if request.queue else service.begin_checkout
            try:
                outcome = begin(
                    request.key,
                    request.holder,
                    request=request.request,
                    at=at,
                    seats=request.seats,
                    ttl=request.ttl,
                    delegate=request.delegate,
                    ip=session.peer,
                )
                if isinstance(outcome, Waiter):  # not a verdict yet: nothing charged
                    queued = QueuedCheckout(self, outcome, request, session.protocol, data, started)
                    outcome.listener = queued
                    return queued
                grant, commit = outcome
            except Exception as exc:
                self._charge(session, exc, at.mono)
                raise
            self._charge(session, None, at.mono)

            def checked_out() -> Answer | Deferred[Answer]:
                if commit is not None:
                    service.checkout_landed(grant)
                return self._lease_answer(
                    session.protocol, request.id, grant, request.nonce, at.wall, with_secret=True
                )

            if not grant.fresh:  # a retry, or a device's repeat: the lease is shared now
                self._unclaimed.discard(grant.lease.secret)
                return self._after(commit, checked_out, data, started)
            # A fresh lease always waits for its commit, so the handover reaches the server.
            return self._after(commit, checked_out, data, started, Handover(self, grant.lease))
        if isinstance(request, Checkin):
            rid = request.id
            commit = service.begin_checkin(request.lease, at)
            return self._after(
                commit,
                lambda: (CheckinReply(rid, released=commit is not None).to_wire(), False),
                data,
                started,
            )
        if isinstance(request, Consume):
            c, commit = service.begin_consume(
                request.lease, request.counter, request.units, request.dedup
            )
            rid = request.id
            return self._after(
                commit,
                lambda: (
                    ConsumeReply(
                        rid,
                        counter=c.counter,
                        used=c.used,
                        limit=c.limit,
                        remaining=c.remaining,
                        counted=c.counted,
                    ).to_wire(),
                    False,
                ),
                data,
                started,
            )
        raise BadRequest(f"op {request.op!r} is not served")

    def _after(
        self,
        commit: Deferred[None] | None,
        reply: Callable[[], Answer | Deferred[Answer]],
        data: dict[str, Any],
        started: float,
        out: Deferred[Answer] | None = None,
    ) -> Answer | Deferred[Answer]:
        """The answer `reply()` makes once `commit` is done (at once without a commit),
        settled into `out` if given; a failed commit's error is answered (`unavailable`).
        `reply()` may itself wait (a batched token: `_lease_answer`)."""
        if commit is None:
            answer = reply()
            self._observe(data, started, None)
            return answer
        settled: Deferred[Answer] = Deferred() if out is None else out

        def landed(done: Deferred[None]) -> None:
            failure = done.exception()
            if failure is not None:
                settled.settle(self._failed(data, started, failure))
                return
            try:
                answer = reply()
            except Exception as exc:
                settled.settle(self._failed(data, started, exc))
                return
            self._observe(data, started, None)
            if isinstance(answer, Deferred):
                answer.add_done_callback(lambda signed: settled.settle(signed.result()))
            else:
                settled.settle(answer)

        commit.add_done_callback(landed)
        return settled

    def _failed(self, data: dict[str, Any], started: float, exc: BaseException) -> Answer:
        frame, close = error_reply(request_id(data), exc, Audience.CLIENT, data.get("op"))
        self._observe(data, started, frame["error"])
        return frame, close

    def _observe(self, data: dict[str, Any], started: float, error: str | None) -> None:
        if self.on_request is not None:
            self.on_request(_known_op(data) or "invalid", time.perf_counter() - started, error)

    @staticmethod
    def error(exc: LicdError) -> Answer:
        """The answer to an error found before a request could be decoded."""
        return error_reply(None, exc, Audience.CLIENT)

    def _answer_now(
        self, session: Session, request: Request, at: Instant
    ) -> Answer | Deferred[Answer]:
        """The ops answered from memory at `at`: hello, heartbeat, available (a
        heartbeat's batched token waits for the end of the loop's turn)."""
        service = self.service
        if isinstance(request, Heartbeat):
            grant = service.heartbeat(request.lease, at, request.usage, request.idle_for)
            return self._lease_answer(session.protocol, request.id, grant, request.nonce, at.wall)
        if isinstance(request, Available):
            a = service.available(request.key)
            return AvailableReply(
                request.id,
                total=a.total,
                in_use=a.in_use,
                available=a.available,
                reserved=a.reserved,
            ).to_wire(), False
        if isinstance(request, Hello):
            return self._hello(session, request).to_wire(), False
        raise BadRequest(f"op {request.op!r} is not served")

    def _hello(self, session: Session, request: Hello) -> HelloReply:
        reply = hello_reply(request, self.signer, self.service.now().wall)
        session.hello_done = True
        session.client = request.client
        session.protocol = reply.protocol
        return reply

    def _lease_answer(
        self,
        protocol: int,
        rid: int,
        grant: Grant,
        nonce: bytes,
        now: float,
        *,
        with_secret: bool = False,
    ) -> Answer | Deferred[Answer]:
        """A lease reply: its token signed on its own, or (protocol 2, not a block's)
        with the other tokens of this turn of the loop, once they are (`BatchSigner`)."""
        body = self.signer.lease_body(grant, nonce, now)
        signed: Signed | Deferred[Signed]
        if protocol >= BATCHED and grant.lease.delegate is None:
            signed = self._batch_signer().sign(body)
        else:
            signed = self.signer.sign_body(body), None
        if not isinstance(signed, Deferred):
            return self._lease_reply(rid, grant, *signed, with_secret), False
        out: Deferred[Answer] = Deferred()

        def reply(done: Deferred[Signed]) -> None:
            token, proof = done.result()
            out.settle((self._lease_reply(rid, grant, token, proof, with_secret), False))

        signed.add_done_callback(reply)
        return out

    def _batch_signer(self) -> BatchSigner:
        if self._batcher is None:
            self._batcher = BatchSigner(self.signer, asyncio.get_running_loop().call_soon)
        return self._batcher

    def _lease_reply(
        self, rid: int, grant: Grant, token: bytes, proof: BatchProof | None, with_secret: bool
    ) -> dict[str, Any]:
        lease = grant.lease
        return lease_wire(
            rid,
            handle=lease.handle,
            token=token,
            batch=proof,
            chain=self.signer.chain_for(lease.licence_id),
            expires=lease.expires,
            ttl=grant.ttl,
            renew_in=grant.renew_in,
            seats=lease.seats,
            features=grant.features,
            overdraft=lease.overdraft or None,
            lease=lease.secret if with_secret else None,
            idle_reclaim_in=grant.idle_reclaim_in,
        )


def _known_op(data: dict[str, Any]) -> str | None:
    """The request's op when it names one of the protocol's, else None."""
    op = data.get("op")
    return op if isinstance(op, str) and op in REQUEST_TYPES else None


def hello_reply(request: Hello, signer: Signer, wall: float) -> HelloReply:
    """The answer to `hello` (any node's, a cluster's standbys' too), or
    UnsupportedProtocol."""
    if request.protocol not in PROTOCOLS:
        served = " or ".join(map(str, PROTOCOLS))
        raise UnsupportedProtocol(
            f"protocol {request.protocol} is not served; use {served}",
            detail={"supported": list(PROTOCOLS)},
        )
    return HelloReply(
        request.id,
        protocol=request.protocol,
        server=SERVER_NAME,
        site=signer.site,
        key=signer.public,
        chain=signer.chain,
        time=wall,
    )
