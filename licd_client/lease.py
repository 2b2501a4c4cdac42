"""One held lease: its renewal task, its state and callbacks, its release.

`AsyncLease` heartbeats at the daemon's `renew_in`, rides out outages with jittered
backoff until its local deadline (on the lease clock; the schedule is a
`timeline.Timeline`), and reports `on_renewed`, `on_expiring`, `on_idle_warning` and
`on_lost`. Once the app has marked it in use (`touch()`), each heartbeat says how long
ago that was (`idle_for`, docs/protocol.md "Idle leases"); never before. It talks
to the daemon only through its owner, the client that made it, and needs of it only
what `LeaseOwner` lists (`AsyncClient` is one): it never opens connections itself and
never trusts a token the owner did not verify.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import inspect
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, TypeAlias

from . import messages, tokens
from .backoff import asked_delay, is_retryable
from .clock import Clock
from .errors import LeaseUnknown, LicdError, ProtocolViolation, TokenInvalid
from .timeline import Timeline

log = logging.getLogger("licd_client")

Mode: TypeAlias = Literal["lease", "strict"]
ExpiringCallback: TypeAlias = Callable[[float], object]
RenewedCallback: TypeAlias = Callable[["AsyncLease"], object]
LostCallback: TypeAlias = Callable[[Exception], object]
IdleWarningCallback: TypeAlias = Callable[[float], object]


class LeaseState(enum.Enum):
    """Where a lease is in its life."""

    ACTIVE = "active"  # renewed on schedule
    DEGRADED = "degraded"  # renewals failing; still valid until its local deadline
    LOST = "lost"  # the daemon dropped it, or its deadline passed: check out again
    RELEASED = "released"  # checked in by this process


class LeaseOwner(Protocol):
    """What a lease needs of the client that made it (`AsyncClient` implements it)."""

    @property
    def clock(self) -> Clock:
        """The lease clock the lease's deadline and renewals are measured on."""
        ...

    async def request(self, req: messages.Request) -> messages.Reply:
        """One attempt at one request (a heartbeat, a consume) to the daemon."""
        ...

    def verify(self, reply: messages.LeaseReply, nonce: bytes) -> tokens.Statement:
        """A lease reply's token checked against the trust anchors, or TokenInvalid."""
        ...

    def retry_delays(self) -> Iterator[float]:
        """Jittered waits between retries of a failing renewal."""
        ...

    async def checkin(self, lease_id: str, *, retry: bool = False) -> None:
        """Check a lease in, retrying transient failures for a while if `retry`;
        never raises (a lease not checked in lapses on its own)."""
        ...

    def checkin_at_exit(self, lease_id: str) -> None:
        """Check a lease in over a blocking socket: the interpreter is exiting."""
        ...

    def forget(self, lease: AsyncLease) -> None:
        """`lease` is no longer held (lost, or being released)."""
        ...


def as_lease_reply(reply: messages.Reply) -> messages.LeaseReply:
    if not isinstance(reply, messages.LeaseReply):
        raise ProtocolViolation("expected a lease reply")
    return reply


async def run_callback(name: str, callback: Callable[..., object] | None, *args: Any) -> None:
    """Run an app callback (sync or async); its failure is logged, never propagated."""
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("licd_client: the %s callback failed", name)


# --------------------------------------------------------------------------- lease


class AsyncLease:
    """A held lease. Made by `AsyncClient.checkout()`; release with `release()`."""

    def __init__(
        self,
        client: LeaseOwner,
        *,
        key: str,
        lease_id: str,
        mode: Mode,
        on_expiring: ExpiringCallback | None,
        on_renewed: RenewedCallback | None,
        on_lost: LostCallback | None,
        on_idle_warning: IdleWarningCallback | None,
    ) -> None:
        self.client = client
        self.key = key
        self.mode: Mode = mode
        self.state = LeaseState.ACTIVE
        self.lost_reason: Exception | None = None
        self.handle = ""
        self.seats = 0
        self.features: messages.Features = {}
        self.expires = 0.0  # the daemon's wall-clock expiry: informative only
        self.token = b""
        self.chain: list[bytes] = []
        self.statement: tokens.Statement | None = None
        self._id = lease_id
        self._on_expiring = on_expiring
        self._on_renewed = on_renewed
        self._on_lost = on_lost
        self._on_idle_warning = on_idle_warning
        self._touched: float | None = None  # when the app last marked it in use (lease clock)
        self._lifetime = 0.0
        # Its deadline and next heartbeat, on the lease clock. A retry waits the jittered
        # delay, or the daemon's retry_after if longer: no least delay of its own.
        self._timeline = Timeline(client.retry_delays)
        self._expiring_fired = False
        self._released = False
        self._heartbeat_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never shows the lease id: it is a secret
        return f"<AsyncLease {self.handle} key={self.key[:4]}... {self.state.value}>"

    @property
    def lease_id(self) -> str:
        """The lease id: a secret that lets its bearer renew or release the lease."""
        return self._id

    @property
    def deadline(self) -> float:
        """When the lease lapses without renewal, on the client's lease clock."""
        return self._timeline.deadline

    @property
    def renew_at(self) -> float:
        """When the next heartbeat (or retry of a failed one) is due, on the client's
        lease clock."""
        return self._timeline.renew_at or 0.0

    def remaining(self) -> float:
        """Seconds of validity left, measured on the lease clock (0 when lapsed)."""
        return max(0.0, self._timeline.deadline - self.client.clock.now())

    @property
    def overdraft(self) -> bool:
        """True when the daemon granted this lease beyond the licence's seats, within its
        overdraft (the verified token's `ovr`, as of the last checkout or renewal)."""
        return self.statement is not None and self.statement.overdraft

    @property
    def valid(self) -> bool:
        """Held and within its local deadline (a local check, in either mode)."""
        return self.state in (LeaseState.ACTIVE, LeaseState.DEGRADED) and self.remaining() > 0

    def touch(self) -> None:
        """Mark the lease in use now (a user's keystroke, a job running). From the first
        call on, each heartbeat tells the daemon how long ago the last one was, and a
        licence with an idle timeout may reclaim a lease left idle (`on_idle_warning`
        comes first); a lease never touched says nothing about idleness."""
        self._touched = self.client.clock.now()

    def _idle_for(self) -> float | None:
        """Seconds since the last `touch()`, None before the first."""
        if self._touched is None:
            return None
        return max(0.0, self.client.clock.now() - self._touched)

    def _accept(self, reply: messages.LeaseReply, leaf: tokens.Statement, received: float) -> None:
        """Take in a verified checkout or heartbeat reply received at `received`."""
        self.handle = reply.handle
        signed_features = leaf.payload.get("features")
        self.features = dict(signed_features) if isinstance(signed_features, dict) else {}
        self.seats = leaf.seats if leaf.seats is not None else reply.seats
        self.expires = reply.expires
        self.token = reply.token
        self.chain = list(reply.chain)
        self.statement = leaf
        # Measured from receipt on our own clock; the token's iat..exp only bounds it.
        self._lifetime = max(0.0, min(reply.ttl, leaf.exp - leaf.iat))
        renew_in = reply.renew_in if 0 < reply.renew_in < self._lifetime else self._lifetime / 3
        self._timeline.renewed(received + self._lifetime, received + renew_in)

    def _start(self) -> None:
        """Held from now on: renewed by a task of its own, checked in at exit if need be."""
        HELD_LEASES.add(self)
        self._task = asyncio.create_task(self._run(), name=f"licd-renew-{self.handle}")

    # ------------------------------------------------------------------ renewal

    async def renew_once(self) -> None:
        """Heartbeat now. On success the lease is ACTIVE again; on a transient failure it is
        DEGRADED and the error is raised; on a fatal one it is LOST and the error raised."""
        if self.state in (LeaseState.LOST, LeaseState.RELEASED):
            raise self._gone()
        async with self._heartbeat_lock:
            nonce = secrets.token_bytes(messages.NONCE_LEN)
            try:
                req = messages.Heartbeat(0, lease=self._id, nonce=nonce, idle_for=self._idle_for())
                reply = as_lease_reply(await self.client.request(req))
                received = self.client.clock.now()
                if reply.handle != self.handle:
                    raise TokenInvalid("the heartbeat reply names another lease")
                leaf = self.client.verify(reply, nonce)
            except Exception as exc:
                if is_retryable(exc):
                    if self.state is LeaseState.ACTIVE:
                        self.state = LeaseState.DEGRADED
                else:
                    await self._lose(exc)
                raise
            if self.state not in (LeaseState.ACTIVE, LeaseState.DEGRADED):
                return  # released while the heartbeat was in flight
            self._accept(reply, leaf, received)
            self.state = LeaseState.ACTIVE
            self._expiring_fired = False
        await run_callback("on_renewed", self._on_renewed, self)
        if reply.idle_reclaim_in is not None:
            await run_callback("on_idle_warning", self._on_idle_warning, reply.idle_reclaim_in)

    def _expiring_in(self, now: float) -> float | None:
        """Seconds from `now` until on_expiring is due (0.0: it is), None if it is not
        to fire: it fires once per outage, when renewals failed in the last third."""
        if self.state is not LeaseState.DEGRADED or self._expiring_fired:
            return None
        return max(0.0, self._timeline.deadline - self._lifetime / 3 - now)

    async def _maybe_expiring(self) -> None:
        """Fire on_expiring if it is due."""
        if self._expiring_in(self.client.clock.now()) == 0.0:
            self._expiring_fired = True
            await run_callback("on_expiring", self._on_expiring, self.remaining())

    def _wait(self, now: float) -> float:
        """Seconds from `now` until the renewal task acts: the timeline's renewal, retry
        or deadline, or on_expiring if sooner; 0.0 once the deadline passed."""
        if now >= self._timeline.deadline:
            return 0.0
        wait = self._timeline.wake(now)
        expiring = self._expiring_in(now)
        if expiring:  # (0.0, due already: it fires when the task next acts)
            wait = min(wait, expiring)
        return wait

    async def _run(self) -> None:
        """Heartbeat when the timeline says, until the lease is lost or released: a
        retry is also made when on_expiring fires, and none once the deadline passed."""
        clock, timeline = self.client.clock, self._timeline
        try:
            while self.state in (LeaseState.ACTIVE, LeaseState.DEGRADED):
                await clock.sleep(self._wait(clock.now()))
                if self.state not in (LeaseState.ACTIVE, LeaseState.DEGRADED):
                    return
                if clock.now() >= timeline.deadline:
                    lapsed = LeaseUnknown("the lease lapsed: no renewal before its deadline")
                    await self._lose(lapsed)
                    return
                await self._maybe_expiring()
                try:
                    await self.renew_once()
                except Exception as exc:
                    if self.state is not LeaseState.DEGRADED:
                        return  # lost (on_lost has fired) or released
                    log.info("licd_client: renewal of %s failed: %s", self.handle, exc)
                    await self._maybe_expiring()
                    timeline.failed(clock.now(), at_least=asked_delay(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: do not let the lease die silently
            log.exception("licd_client: the renewal task of %s failed", self.handle)
            await self._lose(exc)

    async def _lose(self, reason: Exception) -> None:
        if self.state in (LeaseState.LOST, LeaseState.RELEASED):
            return
        self.state = LeaseState.LOST
        self.lost_reason = reason
        self.client.forget(self)
        HELD_LEASES.discard(self)
        if isinstance(reason, TokenInvalid):  # never use it; give the seat back
            await self.client.checkin(self._id)
        log.warning("licd_client: lease %s lost: %s", self.handle, reason)
        await run_callback("on_lost", self._on_lost, reason)

    def _gone(self) -> LeaseUnknown:
        if self.state is LeaseState.RELEASED:
            return LeaseUnknown("the lease was released")
        why = self.lost_reason
        detail = why.detail if isinstance(why, LicdError) else None  # e.g. revoked, reason
        return LeaseUnknown(f"the lease was lost: {why}", detail=detail)

    async def validate(self) -> None:
        """Raise unless the lease is good. Strict mode asks the daemon (a heartbeat) and
        fails without a connection; lease mode trusts the local lease clock."""
        if self.state in (LeaseState.LOST, LeaseState.RELEASED):
            raise self._gone()
        if self.mode == "strict":
            await self.renew_once()
        elif self.remaining() <= 0:
            await self._lose(LeaseUnknown("the lease lapsed: no renewal before its deadline"))
            raise self._gone()

    async def consume(
        self, counter: str, units: int = 1, *, dedup: str | None = None
    ) -> messages.ConsumeReply:
        """Use `units` of a metered counter under this lease. The same `dedup` id within
        the counter's window counts once (`counted` is False then). Raises
        QuotaExhausted (nothing consumed), LeaseUnknown, ConnectionLost."""
        if self.state in (LeaseState.LOST, LeaseState.RELEASED):
            raise self._gone()
        request = messages.Consume(0, lease=self._id, counter=counter, units=units, dedup=dedup)
        reply = await self.client.request(request)
        if not isinstance(reply, messages.ConsumeReply):
            raise ProtocolViolation("expected a consume reply")
        return reply

    # ------------------------------------------------------------------ release

    async def release(self) -> None:
        """Check the lease in and stop renewing it. Idempotent; never raises for a daemon
        that cannot be reached (the lease then lapses on its own)."""
        if self._released:
            return
        self._released = True
        was_lost = self.state is LeaseState.LOST
        self.state = LeaseState.RELEASED
        self.client.forget(self)
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        # Lost (the daemon dropped it, or it lapsed): one quiet try is enough.
        await self.client.checkin(self._id, retry=not was_lost)
        # Not reached when cancelled: the exit hook then still checks the lease in.
        HELD_LEASES.discard(self)

    async def aclose(self) -> None:
        await self.release()

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


# ----------------------------------------------------------------- interpreter exit

#: Leases still held, for the exit hook. When the interpreter exits with leases held
#: (an asyncio app that never released them), their event loop is gone, so they are
#: checked in over a plain blocking socket.
HELD_LEASES: set[AsyncLease] = set()


def _checkin_held_at_exit() -> None:
    for lease in list(HELD_LEASES):
        HELD_LEASES.discard(lease)
        lease.client.checkin_at_exit(lease.lease_id)


atexit.register(_checkin_held_at_exit)
