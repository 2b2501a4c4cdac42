"""Makes every engine decision durable and tells the world: engine, store, events.

A checkout is granted in the engine, committed by the store with its audit entry, then
confirmed (or aborted if the commit failed); a checkin, reclaim or revoke is marked in
the engine, deleted in the store with its audit entries, then released (or restored).
Licence edits are checked by the engine, committed, then applied. What must follow a
commit runs in its `Deferred`'s callback (licence edits: in a shielded task), so a
caller that goes away mid-commit never leaves the engine and the database disagreeing.
The wire's hot ops (`begin_*`) decide at once and return the commit to wait for
(dispatch answers from its callback, without a task); a failed commit's StoreError is
the caller's to tell (`licd.core.errors`). After each commit, the event is published
(metrics, alerts, logs). No wire formats and no signatures here: `dispatch` and
`admin` do those.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, cast

from licd.clock import Clock, Instant
from licd.config.licences import licence_to_mapping
from licd.core.audit_upkeep import DenialLog
from licd.core.errors import store_failure_as_unavailable
from licd.core.events import Event, EventBus, Kind, holder_event
from licd.deferred import Deferred
from licd.engine import Availability, Engine, Grant, LeasePhase, Licence, SeatLease
from licd.engine.counters import Consumed
from licd.engine.events import with_app
from licd.engine.lease_filter import LeaseFilter
from licd.engine.licence import licence_changes
from licd.engine.queue import Waiter
from licd.engine.verdicts import QUEUEABLE
from licd.store.base import Store, StoreError
from licd_client.entitlements import UsageReport, read_usage_report
from licd_client.errors import (
    BadRequest,
    LeaseUnknown,
    LicdError,
    SeatsExhausted,
    TokenInvalid,
    Unavailable,
    UnknownLicence,
)
from licd_client.messages import Holder
from licd_client.safetext import kv_line

log = logging.getLogger(__name__)

T = TypeVar("T")


def lease_event(kind: Kind, lease: SeatLease, time: float, **extra: Any) -> Event:
    return holder_event(
        kind,
        time,
        licence=lease.licence_id,
        handle=lease.handle,
        holder=lease.holder,
        ip=lease.ip,
        seats=lease.seats,
        **extra,
    )


class QueueListener(Protocol):
    """Who waits for a queued checkout's outcome (the connection it came on): told once
    it is served (its grant committed) or refused for good, and whenever its place in the
    queue may have changed."""

    def served(self, grant: Grant) -> None: ...

    def refused(self, error: LicdError) -> None: ...

    def moved(self) -> None: ...


def cast_listener(listener: object) -> QueueListener:
    """A waiter's listener (the engine keeps it untyped: it knows no connections)."""
    return cast(QueueListener, listener)


#: Longest time between two queue updates (docs/protocol.md, "Queueing").
MAX_UPDATE_IN = 30.0


def update_in(licence: Licence) -> float:
    """Seconds within which a queued checkout of `licence` hears again (one heartbeat
    interval, at most MAX_UPDATE_IN); a detached one keeps its place as long."""
    return min(MAX_UPDATE_IN, licence.lease_ttl / 3)


class LicenceService:
    def __init__(
        self, engine: Engine, store: Store, clock: Clock, events: EventBus | None = None
    ) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.events = events or EventBus()
        self._inflight: dict[str, Deferred[None]] = {}  # lease secret -> its commit
        #: Licence edits (admin add, update, remove; reload) one at a time, each from
        #: reading the licence to its commit: two at once would merge into the same old
        #: version, and the later commit would undo the earlier one.
        self.licence_edits = asyncio.Lock()

    def now(self) -> Instant:
        return self.clock.now()

    async def _durably(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` to its end even if the caller is cancelled meanwhile."""
        return await asyncio.shield(asyncio.ensure_future(work()))

    def _log(self, event: Event) -> None:
        """One `key=value` line (`kv_line`): absent fields left out, a value with a space,
        `=`, quote or control character in it (a client chooses host and user)
        repr-quoted, so it forges no key."""
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "%s",
            kv_line(
                event=event.kind.value,
                licence=event.licence,
                lease=event.handle,
                seats=event.seats,
                host=event.host,
                user=event.user,
                ip=event.ip,
                reason=event.reason or None,
                admin_uid=event.admin_uid,
            ),
        )

    def publish(self, event: Event) -> None:
        """Log a committed change and tell the subscribers: the one path for every event
        of the daemon's, its own and a router's relayed ones (`Router.publish`)."""
        self._log(event)
        self.events.publish(event)

    # ------------------------------------------------------------------- leases

    def begin_checkout(
        self,
        key: str,
        holder: Holder,
        *,
        request: str,
        at: Instant,
        seats: int = 1,
        ttl: float | None = None,
        delegate: bytes | None = None,
        ip: str | None = None,
        queueing: bool = False,
    ) -> tuple[Grant, Deferred[None] | None]:
        """Grant a lease, and the commit it waits for (None: nothing to wait for). The
        grant may be answered once that commit is done, and `checkout_landed` says so;
        a commit that failed means `unavailable`. Without a task: the wire's hot path.
        `queueing`: a refusal the queue waits out is not audited as a denial (the
        caller queues the checkout instead: `begin_queued`)."""
        try:
            grant = self.engine.checkout(
                key, holder, request=request, at=at, seats=seats, ttl=ttl, delegate=delegate, ip=ip
            )
        except LicdError as exc:
            if not (queueing and _queueable(exc)):
                self._deny(key, holder, ip, seats, exc, at)
            raise
        return self._granted(grant, at)

    def _granted(
        self, grant: Grant, at: Instant, waiter: Waiter | None = None
    ) -> tuple[Grant, Deferred[None] | None]:
        lease = grant.lease
        if grant.fresh:
            return grant, self._commit_checkout(lease, at, waiter)
        # An idempotent retry. If the first attempt is still committing, its outcome is
        # this one's too.
        pending = self._inflight.get(lease.secret)
        if pending is None:
            self.checkout_landed(grant)
        return grant, pending

    def begin_queued(
        self,
        key: str,
        holder: Holder,
        *,
        request: str,
        at: Instant,
        seats: int = 1,
        ttl: float | None = None,
        delegate: bytes | None = None,
        ip: str | None = None,
    ) -> tuple[Grant, Deferred[None] | None] | Waiter:
        """A checkout that waits in the licence's queue when a seat rule refuses it, or
        takes back the place of the same checkout sent earlier (whose connection, if it
        still listens, is told so); granted at once, as `begin_checkout`, when it may
        be. The caller sets the waiter's `listener`."""
        waiter = self.engine.waiter(key, holder, request)
        if waiter is not None:
            self.engine.check_rejoin(waiter, holder, ip, seats, ttl)
            earlier = waiter.listener
            waiter.listener, waiter.leave_at = None, None
            if earlier is not None:
                cast_listener(earlier).refused(
                    Unavailable(
                        "the same checkout was sent again on another connection",
                        detail={"reason": "requeued"},
                    )
                )
            return waiter
        try:
            return self.begin_checkout(
                key,
                holder,
                request=request,
                at=at,
                seats=seats,
                ttl=ttl,
                delegate=delegate,
                ip=ip,
                queueing=True,
            )
        except LicdError as exc:
            if not _queueable(exc):
                raise  # audited as a denial already
            try:
                waiter = self.engine.enqueue(
                    key,
                    holder,
                    request=request,
                    at=at,
                    blocked_by=str((exc.detail or {})["rule"]),
                    seats=seats,
                    ttl=ttl,
                    delegate=delegate,
                    ip=ip,
                )
            except LicdError as full:
                self._deny(key, holder, ip, seats, full, at)
                raise
        position, waiting, _ = self.engine.position(waiter)
        self._queue_event(Kind.QUEUED, waiter, at, position=position, waiting=waiting)
        return waiter

    def _queue_event(self, kind: Kind, waiter: Waiter, at: Instant, **detail: Any) -> None:
        """Audit (lazily), log and publish a queue event of `waiter`'s."""
        event = Event(
            kind=kind,
            time=at.wall,
            licence=waiter.licence_id,
            host=waiter.holder.host,
            hostid=waiter.holder.hostid,
            user=waiter.holder.user,
            ip=waiter.ip,
            seats=waiter.seats,
            detail=with_app(detail, waiter.holder),
        )
        self.publish(event)
        self.store.append_later(event)

    def detach(self, waiter: Waiter) -> None:
        """The queued checkout's connection ended: it keeps its place for `update_in`
        (served to nobody meanwhile), then leaves the queue (`tick`)."""
        if self.engine.is_waiting(waiter):
            licence = self.engine.licence_by_id(waiter.licence_id)
            grace = update_in(licence) if licence is not None else 0.0
            waiter.leave_at = self.clock.now().mono + grace
            waiter.listener = None

    def _left(self, waiter: Waiter, at: Instant, why: str) -> None:
        self._queue_event(
            Kind.QUEUE_LEFT, waiter, at, waited=round(at.wall - waiter.since_wall, 3), why=why
        )

    def serve_queues(self, licence_ids: Iterable[str] | None = None) -> None:
        """Give the free seats of these licences (all that have waiters: None) to their
        queues, each grant committed on its own, and tell every waiter of them."""
        at = self.clock.now()
        for licence_id in list(self.engine.queues if licence_ids is None else licence_ids):
            served, failed = self.engine.serve_queue(licence_id, at)
            for waiter, grant in served:
                try:
                    commit = self._granted(grant, at, waiter)[1]
                except StoreError:  # the store is closing: it waits on, as before
                    self.engine.abort(grant.lease)
                    self.engine.requeue(waiter)
                    continue
                self._commit_served(waiter, grant, commit)
            self._refuse(failed, at)
            self._moved(licence_id)

    def _commit_served(self, waiter: Waiter, grant: Grant, commit: Deferred[None] | None) -> None:
        """Tell `waiter` of its grant once committed; if the commit fails it waits again
        in its old place."""

        def landed(done: Deferred[None] | None) -> None:
            if done is not None and done.exception() is not None:
                self.engine.requeue(waiter)
                self._moved(waiter.licence_id)
                return
            listener = waiter.listener
            if listener is not None:
                cast_listener(listener).served(grant)
            elif grant.fresh:  # its client left meanwhile: nobody takes the lease
                self.release_abandoned(grant.lease)

        if commit is None:
            landed(None)
        else:
            commit.add_done_callback(landed)

    def _refuse(self, failed: Sequence[tuple[Waiter, LicdError]], at: Instant) -> None:
        """Tell waiters a rule now refuses for good (they have left the queue)."""
        for waiter, error in failed:
            self._left(waiter, at, error.code)
            if waiter.listener is not None:
                cast_listener(waiter.listener).refused(error)

    def _moved(self, licence_id: str) -> None:
        queue = self.engine.queues.get(licence_id)
        for waiter in queue or ():
            if waiter.listener is not None:
                cast_listener(waiter.listener).moved()

    def drop_queue(self, licence_id: str | None, error: LicdError) -> None:
        """Refuse every waiter (of one licence, or of all: None) with `error`."""
        dropped = []
        for lid in list(self.engine.queues if licence_id is None else [licence_id]):
            for waiter in self.engine.queues.get(lid, ()):
                self.engine.leave(waiter)
                dropped.append((waiter, error))
        self._refuse(dropped, self.clock.now())

    def tick_queues(self, at: Instant) -> None:
        """Once a reaper round: waiters detached too long leave, free seats are served,
        and every waiter hears (so a connection that stays silent is found dead)."""
        for waiter in self.engine.gone_waiters(at):
            self._left(waiter, at, "gone")
        self.serve_queues()

    def checkout_landed(self, grant: Grant) -> None:
        """After the checkout's commit: raises Unavailable unless its lease is live (a
        retry whose first attempt failed to commit)."""
        if grant.lease.state is not LeasePhase.LIVE:
            raise Unavailable()
        if not grant.fresh:
            self.store.touch_lease(grant.lease)

    def _deny(
        self, key: str, holder: Holder, ip: str | None, seats: int, exc: LicdError, at: Instant
    ) -> None:
        licence = self.engine.licence_for_key(key)
        event = Event(
            kind=Kind.DENIED,
            time=at.wall,
            licence=licence.id if licence is not None else None,
            host=holder.host,
            hostid=holder.hostid,
            user=holder.user,
            ip=ip,
            seats=seats,
            reason=exc.code,
            detail=with_app(dict(exc.detail or {}), holder),
        )
        # Every denial is told to metrics and alerts; the audit log (and the log) gets
        # the first of a group at once and the rest as one counted entry per interval.
        self.events.publish(event)
        entry = self.denial_log.note(event, at.mono)
        if entry is not None:
            self._log(entry)
            self.store.append_later(entry)

    @functools.cached_property
    def denial_log(self) -> DenialLog:
        """Which denials become audit entries (the daemon sets its own, configured)."""
        return DenialLog()

    def flush_denials(self, at: Instant, *, every: bool = False) -> int:
        """Write the counted entries of denial groups whose interval is over (of every
        group: `every`, at shutdown); returns how many."""
        entries = self.denial_log.due(at.mono, every=every)
        for entry in entries:
            log.info(
                "%s",
                kv_line(
                    event="denied_repeatedly",
                    licence=entry.licence,
                    ip=entry.ip,
                    reason=entry.reason,
                    count=entry.detail.get("count"),
                ),
            )
            self.store.append_later(entry)
        return len(entries)

    def _commit_checkout(
        self, lease: SeatLease, at: Instant, waiter: Waiter | None = None
    ) -> Deferred[None]:
        """Persist a granted lease; once committed it is confirmed (or, if the commit
        failed, aborted), in a callback that runs whatever happens to the caller."""
        event = self._checkout_event(lease, at, waiter)
        commit = self.store.insert_lease(lease, event)
        self._inflight[lease.secret] = commit

        def landed(done: Deferred[None]) -> None:
            self._inflight.pop(lease.secret, None)
            error = _failure(done)
            if error is not None:
                self.engine.abort(lease)
                log.error(
                    "event=checkout_not_committed licence=%s error=%r", lease.licence_id, error
                )
                return
            self.engine.confirm(lease)
            self.publish(event)

        commit.add_done_callback(landed)
        return commit

    def _checkout_event(
        self, lease: SeatLease, at: Instant, waiter: Waiter | None = None, releasing: int = 0
    ) -> Event:
        """A checkout's audit entry. `releasing`: seats of the licence still counted whose
        release commits with this checkout (a hand-over): not in use once it is."""
        detail: dict[str, Any] = {
            "in_use": self.engine.in_use(lease.licence_id) - releasing,
            "overdraft": lease.overdraft,
        }
        if waiter is not None:
            detail["queued"] = round(at.wall - waiter.since_wall, 3)
        if lease.lingered:
            detail["lingered"] = True
        # An overdraft grant is an exception the audit log calls out.
        reason = "overdraft" if lease.overdraft else None
        return lease_event(Kind.CHECKOUT, lease, at.wall, reason=reason, detail=detail)

    def heartbeat(
        self, secret: str, at: Instant, usage: bytes | None = None, idle_for: float | None = None
    ) -> Grant:
        """Renew the lease with `secret`. `usage`: a site router's signed report of its
        use of the block this lease is, verified (BadRequest, and nothing renewed, when
        it is not) and written to the audit log as a SITE_USAGE entry. `idle_for`: how
        long its app has been idle (engine.heartbeat)."""
        report = None if usage is None else self._usage_report(secret, usage)
        grant = self.engine.heartbeat(secret, at, idle_for)
        self.store.touch_lease(grant.lease)
        if report is not None:
            self._site_usage(grant.lease, report, at)
        return grant

    def _usage_report(self, secret: str, blob: bytes) -> UsageReport | None:
        lease = self.engine.lease_by_secret(secret)
        if lease is None:
            return None  # the heartbeat says why
        if lease.delegate is None:
            raise BadRequest("usage: only a site router's block lease reports usage")
        try:
            return read_usage_report(blob, lease.delegate)
        except TokenInvalid as exc:
            raise BadRequest(f"usage: {exc}") from None

    def _site_usage(self, lease: SeatLease, report: UsageReport, at: Instant) -> None:
        u = report.usage
        event = holder_event(
            Kind.SITE_USAGE,
            at.wall,
            licence=lease.licence_id,
            handle=lease.handle,
            holder=lease.holder,
            ip=lease.ip,
            seats=lease.seats,
            detail={
                "site": report.site,
                "made": report.made,
                "block": u.licence_id,
                "slot": u.slot,
                "peak": max((n for _, n in u.peaks), default=0),
                "peaks": [[t, n] for t, n in u.peaks],
                "denials": u.denials,
                "counters": dict(u.counters),
            },
        )
        self.publish(event)
        self.store.append_later(event)

    def begin_checkin(self, secret: str, at: Instant) -> Deferred[None] | None:
        """Release the lease with `secret` at `at`: the commit to wait for, or None when
        there was no lease to release."""
        lease = self.engine.begin_release(secret, checkin=at)
        if lease is None:
            return None
        return self._begin_release([lease], Kind.CHECKIN, at)

    def release_abandoned(self, lease: SeatLease) -> Deferred[None] | None:
        """Check in a fresh lease whose checkout reply never reached its client (it left
        first: closed the connection, exited, was killed), at once rather than after its
        ttl and grace: a checkin audited with reason `abandoned`. None when nothing is
        released: the commit failed, the lease is already going, or it is a device lease
        (a checkin does not free one). Whether another checkout shares the lease (a
        retry) is the caller's to know: such a lease is not abandoned."""
        if lease.state is not LeasePhase.LIVE or self.engine.begin_release(lease.secret) is None:
            return None
        try:
            return self._begin_release([lease], Kind.CHECKIN, reason="abandoned")
        except StoreError:  # the daemon is closing its store: the lease lapses as before
            self.engine.cancel_release(lease)
            return None

    def begin_consume(
        self, secret: str, counter: str, units: int, dedup: str | None
    ) -> tuple[Consumed, Deferred[None] | None]:
        """Count metered units now; the commit the answer waits for, if any."""
        consumed = self.engine.consume(secret, counter, units, dedup, self.clock.now())
        if not consumed.counted:
            return consumed, None
        commit = self.store.put_counter(consumed.state)

        def landed(done: Deferred[None]) -> None:
            if _failure(done) is not None:
                self.engine.counters.undo(consumed, units)

        commit.add_done_callback(landed)
        return consumed, commit

    def available(self, key: str) -> Availability:
        return self.engine.available(key, self.clock.now())

    async def reap_once(self, at: Instant) -> list[SeatLease]:
        """Reclaim every lease past `expires + grace`, and every idle one due (reason
        `idle`); end the lingering seats whose time is over. Returns the leases
        reclaimed, once committed."""
        ended = self.engine.linger_due(at)
        for lease in ended:
            in_use = self.engine.in_use(lease.licence_id)
            event = lease_event(Kind.LINGER_ENDED, lease, at.wall, detail={"in_use": in_use})
            self.publish(event)
            self.store.append_later(event)
        if ended:
            self.serve_queues({lease.licence_id for lease in ended})
        due = self.engine.due(at)
        idle = self.engine.idle_due(at)
        if idle:
            await self._release(idle, Kind.RECLAIM, reason="idle")
        if due:
            await self._release(due, Kind.RECLAIM)
        return due + idle

    async def revoke(
        self,
        *,
        handles: Iterable[str] = (),
        host: str | None = None,
        user: str | None = None,
        reason: str = "",
        admin_uid: int | None = None,
    ) -> list[SeatLease]:
        """An admin's revoke of leases by handle, or of all of a holder's leases. The
        holders' next heartbeat gets lease_unknown, saying "revoked by the administrator"
        and `reason`. Raises LeaseUnknown for an unknown handle (and revokes nothing then)."""
        chosen: dict[str, SeatLease] = {}
        for handle in handles:
            lease = self.engine.lease_by_handle(handle)
            if lease is None or lease.state is not LeasePhase.LIVE:
                raise LeaseUnknown(f"no live lease with handle {handle!r}")
            chosen[lease.handle] = lease
        # The host's leases and the user's, each chosen as `licd leases` lists them.
        holders = [LeaseFilter(host=host)] if host is not None else []
        holders += [LeaseFilter(user=user)] if user is not None else []
        for lease in self.engine.leases:
            if lease.state is LeasePhase.LIVE and any(x.matches(lease) for x in holders):
                chosen[lease.handle] = lease
        leases = [x for x in chosen.values() if self.engine.begin_revoke(x.handle, reason) is x]
        if leases:
            await self._release(leases, Kind.REVOKE, reason=reason, admin_uid=admin_uid)
        return leases

    async def _release(self, leases: Sequence[SeatLease], kind: Kind, **extra: Any) -> None:
        """Release `leases`, once committed. A caller that goes away does not cancel the
        commit (what must follow it runs in its callbacks either way)."""
        await self._begin_release(leases, kind, **extra)

    def _begin_release(
        self, leases: Sequence[SeatLease], kind: Kind, at: Instant | None = None, **extra: Any
    ) -> Deferred[None]:
        """Delete released leases; once committed their seats are freed (or, if the
        commit failed, the leases are live again), in a callback whatever happens to
        the caller. Returns the commit."""
        at = self.clock.now() if at is None else at
        now = at.wall
        events = []
        freed: dict[str, int] = {}  # per licence, as each release lands in turn
        for lease in leases:
            if lease.linger_until is None:
                gone = self.engine.seats.freed_by(lease)
                freed[lease.licence_id] = freed.get(lease.licence_id, 0) + gone
            in_use = self.engine.in_use(lease.licence_id) - freed.get(lease.licence_id, 0)
            detail: dict[str, Any] = {"in_use": in_use}
            if lease.idle_total:
                detail["idle"] = round(lease.idle_total, 1)
            if lease.linger_until is not None:
                licence = self.engine.licence_by_id(lease.licence_id)
                detail["linger"] = licence.linger if licence is not None else None
            events.append(lease_event(kind, lease, now, detail=detail, **extra))
        # The queues' waiters the freed seats go to: in this same commit.
        served, failed = self.engine.hand_over(leases, at)
        grants = [
            (w, g, self._checkout_event(g.lease, at, w, freed.get(g.lease.licence_id, 0)))
            for w, g in served
            if g.fresh
        ]
        try:
            commit = self.store.delete_leases(
                leases, events, [(g.lease, event) for _, g, event in grants]
            )
        except StoreError:
            for _, grant, _ in grants:
                self.engine.abort(grant.lease)
            for waiter, _ in served:
                self.engine.requeue(waiter)
            raise

        def landed(done: Deferred[None]) -> None:
            error = _failure(done)
            if error is not None:  # the waiters queue again (`_commit_served`)
                for _, grant, _ in grants:
                    self.engine.abort(grant.lease)
                for lease in leases:
                    self.engine.cancel_release(lease)
                log.error(
                    "event=%s_not_committed count=%d error=%r", kind.value, len(leases), error
                )
                return
            for lease, event in zip(leases, events, strict=True):
                self.engine.released(lease)
                self.publish(event)
            for _, grant, event in grants:
                self.engine.confirm(grant.lease)
                self.publish(event)

        commit.add_done_callback(landed)
        for waiter, grant in served:
            self._commit_served(waiter, grant, commit if grant.fresh else None)
        self._refuse(failed, at)
        for licence_id in {lease.licence_id for lease in leases}:
            self._moved(licence_id)
        return commit

    async def run_reaper(self, interval: float) -> None:
        """Reclaim lapsed leases every `interval` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            # On failure (logged) the leases stay counted and are retried next round.
            with contextlib.suppress(StoreError):
                await self.reap_once(self.clock.now())
                self.tick_queues(self.clock.now())

    # ----------------------------------------------------------------- licences

    async def put_licence(
        self,
        licence: Licence,
        *,
        admin_uid: int | None = None,
        source: str = "admin",
        stored: dict[str, Licence] | None = None,
    ) -> str:
        """Create or update a licence, live: 'added', 'updated' or 'unchanged'. `stored`
        (the database's licences, at start) is what counts as the old version instead of
        the engine's, which already holds the config file's."""
        old = self.engine.licence_by_id(licence.id) if stored is None else stored.get(licence.id)
        if old == licence and old.key == licence.key:
            return "unchanged"
        self.engine.check_licence(licence)
        kind = Kind.LICENCE_ADDED if old is None else Kind.LICENCE_UPDATED
        event = Event(
            kind=kind,
            time=self.clock.now().wall,
            licence=licence.id,
            seats=licence.seats,
            admin_uid=admin_uid,
            detail={"source": source, "changes": _changes(old, licence)},
        )

        await self.commit_edit(
            self.store.put_licence(licence, event),
            lambda: self.engine.put_licence(licence),
            [event],
            "the licence was not saved",
        )
        self.serve_queues([licence.id])  # more seats, say, or other rules for the waiters
        return "added" if old is None else "updated"

    async def remove_licence(
        self, licence_id: str, *, force: bool = False, admin_uid: int | None = None
    ) -> list[SeatLease]:
        """Remove a licence; with `force`, its live leases are revoked first (without
        it, a licence with leases is refused). Returns the leases revoked."""
        if self.engine.licence_by_id(licence_id) is None:
            raise UnknownLicence(f"no licence with id {licence_id!r}")
        leases = self.engine.leases_of(licence_id)
        if leases and not force:
            raise LicenceInUse(licence_id, sum(x.seats for x in leases))
        self.engine.suspend(licence_id)  # no checkout may slip in while we remove it
        self.engine.end_lingering(licence_id)
        try:
            revoked = await self.revoke(
                handles=[x.handle for x in leases if x.state is LeasePhase.LIVE],
                reason="licence removed",
                admin_uid=admin_uid,
            )
            if self.engine.in_use(licence_id):
                raise Unavailable("leases of the licence are still being committed; try again")
            event = Event(
                kind=Kind.LICENCE_REMOVED,
                time=self.clock.now().wall,
                licence=licence_id,
                admin_uid=admin_uid,
            )
            await self.commit_edit(
                self.store.delete_licence(licence_id, event),
                lambda: self.engine.remove_licence(licence_id),
                [event],
                "the licence was not removed",
            )
            self.drop_queue(licence_id, UnknownLicence("the licence was removed"))
        except BaseException:
            self.engine.resume(licence_id)
            raise
        return revoked

    async def commit_edit(
        self,
        write: Awaitable[None],
        apply: Callable[[], object],
        events: Sequence[Event],
        failure: str,
    ) -> None:
        """Commit a licence edit (or an entitlement import), then apply it to the engine
        and publish its events: all of it, even if the caller goes away meanwhile."""

        async def commit() -> None:
            with store_failure_as_unavailable(failure):
                await write
            apply()
            for event in events:
                self.publish(event)

        await self._durably(commit)

    async def record(self, event: Event) -> None:
        """A committed audit entry for something outside the seat rules (a reload)."""
        with contextlib.suppress(StoreError):
            await self.store.append(event)
        self.publish(event)


class LicenceInUse(BadRequest):
    """Removing a licence that still has leases needs force (admin interface only)."""

    def __init__(self, licence_id: str, seats: int) -> None:
        super().__init__(
            f"licence {licence_id!r} has {seats} seat(s) in use: revoke them or use --force",
            detail={"in_use": seats},
        )


def _changes(old: Licence | None, new: Licence) -> dict[str, Any]:
    """What an edit changed, for the audit log: [before, after] of each field, as config
    keys (`licence_to_mapping`); the key is named, never shown."""
    if old is None:
        return {}
    before, after = licence_to_mapping(old), licence_to_mapping(new)
    return {
        name: "changed" if name == "key" else [before[name], after[name]]
        for name in licence_changes(old, new)
    }


def _queueable(error: LicdError) -> bool:
    """Whether a checkout's refusal is one a queued checkout waits out (a seat rule's)."""
    return isinstance(error, SeatsExhausted) and (error.detail or {}).get("rule") in QUEUEABLE


def _failure(done: Deferred[None]) -> str | None:
    """Why a commit failed, or None if it succeeded."""
    error = done.exception()
    return None if error is None else str(error)
