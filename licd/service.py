"""Makes every engine decision durable: the choreography of engine and store.

A checkout is granted in the engine, committed by the store, then confirmed (or aborted
if the commit failed); a checkin or reclaim is marked in the engine, deleted in the
store, then released (or restored). Persistence runs in shielded tasks, so a caller that
goes away mid-commit never leaves the engine and the database disagreeing. No wire
formats and no signatures here: `dispatch` does those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from licd_client.errors import Unavailable
from licd_client.messages import Holder

from .clock import Clock, Instant
from .engine import Availability, Engine, Grant, Lease, LeaseState
from .store import Store, StoreError

log = logging.getLogger(__name__)


class LicenceService:
    def __init__(self, engine: Engine, store: Store, clock: Clock) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self._inflight: dict[str, asyncio.Task[None]] = {}  # lease secret -> its commit

    def now(self) -> Instant:
        return self.clock.now()

    async def checkout(
        self,
        key: str,
        holder: Holder,
        *,
        request: str,
        at: Instant,
        seats: int = 1,
        ttl: float | None = None,
        delegate: bytes | None = None,
    ) -> Grant:
        grant = self.engine.checkout(
            key, holder, request=request, at=at, seats=seats, ttl=ttl, delegate=delegate
        )
        lease = grant.lease
        if grant.fresh:
            task = asyncio.create_task(self._commit_checkout(lease))
            self._inflight[lease.secret] = task
            await asyncio.shield(task)
            log.info(
                "event=checkout licence=%s lease=%s seats=%d host=%s user=%s",
                lease.licence_id,
                lease.handle,
                lease.seats,
                holder.host,
                holder.user,
            )
        else:
            # An idempotent retry. If the first attempt is still committing, its outcome
            # is this one's too.
            pending = self._inflight.get(lease.secret)
            if pending is not None:
                await asyncio.shield(pending)
            if lease.state is not LeaseState.LIVE:
                raise Unavailable()
            self.store.touch_lease(lease)
        return grant

    async def _commit_checkout(self, lease: Lease) -> None:
        try:
            await self.store.insert_lease(lease)
        except StoreError as exc:
            self.engine.abort(lease)
            log.error(
                "event=checkout_not_committed licence=%s error=%r", lease.licence_id, str(exc)
            )
            raise Unavailable() from None
        finally:
            self._inflight.pop(lease.secret, None)
        self.engine.confirm(lease)

    def heartbeat(self, secret: str, at: Instant) -> Grant:
        grant = self.engine.heartbeat(secret, at)
        self.store.touch_lease(grant.lease)
        return grant

    async def checkin(self, secret: str) -> bool:
        """Release the lease with `secret`; False when there was none."""
        lease = self.engine.begin_release(secret)
        if lease is None:
            return False
        await self._release([lease], "checkin")
        return True

    def available(self, key: str) -> Availability:
        return self.engine.available(key)

    async def reap_once(self, at: Instant) -> list[Lease]:
        """Reclaim every lease past `expires + grace`; returns them once committed."""
        due = self.engine.due(at)
        if due:
            await self._release(due, "reclaim")
        return due

    async def _release(self, leases: Sequence[Lease], why: str) -> None:
        await asyncio.shield(asyncio.create_task(self._commit_release(leases, why)))

    async def _commit_release(self, leases: Sequence[Lease], why: str) -> None:
        try:
            await self.store.delete_leases(leases)
        except StoreError as exc:
            for lease in leases:
                self.engine.cancel_release(lease)
            log.error("event=%s_not_committed count=%d error=%r", why, len(leases), str(exc))
            raise Unavailable() from None
        for lease in leases:
            self.engine.released(lease)
            log.info("event=%s licence=%s lease=%s", why, lease.licence_id, lease.handle)

    async def run_reaper(self, interval: float) -> None:
        """Reclaim lapsed leases every `interval` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            # On failure (logged) the leases stay counted and are retried next round.
            with contextlib.suppress(Unavailable):
                await self.reap_once(self.clock.now())
