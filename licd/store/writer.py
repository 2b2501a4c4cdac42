"""The group-commit writer: one task that owns every transaction, whatever the database.

Callers `submit` their mutations (one caller's changes, all or nothing) and get a
`Deferred` that settles once those are committed. The writer takes everything queued
so far (up to MAX_BATCH callers), hands it to the database's `transaction` as one list
(one transaction, one flush to disk for the whole batch: group commit), then settles
each caller's `Deferred`, so what follows a commit (a reply) runs only once it is
durable. Whatever is queued while a batch commits goes in the next one.

Two kinds of mutation nobody waits for ride along with the batches (lazy writes):
`later` (a denial's audit entry) goes with the next batch, or by a timer within
`lazy_interval` when the writer is idle; `renew` (a lease's new expiry, keyed: a newer
one for the same key replaces it) waits until `lazy_interval` has passed since the
oldest one pending, so a busy site's many small commits do not each rewrite the same
few rows, then goes at most MAX_RENEWALS per batch, so no batch holds the loop long.
Closing writes all of them.

If a batch fails, the lazy writes are tried alone first (and dropped if they fail by
themselves), then each caller's mutations alone, so that one bad mutation fails only
its own caller, with the error `failure` makes of it. The writer knows no SQL and
decides nothing: the mutations are opaque to it, the database's `transaction` applies
them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from licd.deferred import Deferred

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # callers per transaction
MAX_RENEWALS = 256  # renewals per transaction: a site's second of them in chunks of ~1 ms
LAZY_INTERVAL = 1.0  # seconds a renewal or a denial's audit entry may wait to be written

M = TypeVar("M")  # one mutation, as the database's transaction applies it

#: Applies mutations in one transaction, all or nothing; raises if it did not commit.
Transaction = Callable[[list[M]], Awaitable[None]]


class _Op(Generic[M]):
    """One caller's mutations and their outcome."""

    __slots__ = ("mutations", "done")

    def __init__(self, mutations: list[M], done: Deferred[None]) -> None:
        self.mutations = mutations
        self.done = done


class GroupCommitWriter(Generic[M]):
    """Commits submitted mutations in batches while `run()` runs; see the module."""

    def __init__(
        self,
        transaction: Transaction[M],
        *,
        failure: Callable[[Exception], Exception],
        lazy_interval: float = LAZY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transaction = transaction
        self._failure = failure  # what a caller whose mutations failed is told
        self._lazy_interval = lazy_interval
        #: Monotonic seconds for the renewals' interval: the clock the event loop's
        #: timers run on (injected so that tests can say when the interval is up).
        self._clock = clock
        self._ops: list[_Op[M]] = []  # queued for the next batch
        self._batch: list[_Op[M]] = []  # being committed
        self._wake: asyncio.Future[None] | None = None  # the idle writer waits on it
        self._lazy_timer: asyncio.TimerHandle | None = None  # wakes it for lazy writes
        self._renewals: dict[str, M] = {}  # by key, oldest first
        self._renewals_since = 0.0  # when the oldest pending renewal came
        self._later: list[M] = []
        self._task: asyncio.Task[None] | None = None  # while run() runs
        self._stopping = False
        self._stopped = asyncio.Event()
        self.transactions = 0  # committed transactions, for metrics and tests

    # ------------------------------------------------------------------ callers

    def submit(self, mutations: list[M]) -> Deferred[None]:
        """Queue one caller's mutations (all or nothing); settled once committed, or
        failed with `failure(error)`. An empty list settles once everything submitted
        before it is committed."""
        if self._stopping:
            raise RuntimeError("the writer is closed")
        done: Deferred[None] = Deferred()
        self._ops.append(_Op(mutations, done))
        self._wake_writer()
        return done

    def renew(self, key: str, mutation: M) -> None:
        """A lazy write replacing any pending one for `key`: committed once
        `lazy_interval` has passed since the oldest pending renewal (or at close)."""
        renewals = self._renewals
        if not renewals:
            self._renewals_since = self._clock()
        renewals[key] = mutation
        if self._lazy_timer is None:
            self._arm_lazy()

    def later(self, mutation: M) -> None:
        """A lazy write committed with the next batch, within `lazy_interval`."""
        self._later.append(mutation)
        if self._lazy_timer is None:
            self._arm_lazy()

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # ------------------------------------------------------------------ lazy writes

    def _lazy_pending(self) -> bool:
        return bool(self._renewals or self._later)

    def _renewals_due(self) -> bool:
        """Whether the renewals go with this batch: their interval is up (or the writer
        is closing). Before that they wait."""
        return bool(self._renewals) and (
            self._stopping or self._clock() - self._renewals_since >= self._lazy_interval
        )

    def _take_lazy(self) -> list[M]:
        """The lazy writes for this batch: the oldest MAX_RENEWALS renewals if they are
        due (the rest stay due: the idle writer's timer fires at once), then every
        `later` one."""
        taken: list[M] = []
        if self._renewals_due():
            renewals = self._renewals
            if len(renewals) <= MAX_RENEWALS:
                taken = list(renewals.values())
                self._renewals = {}
            else:
                oldest = list(itertools.islice(renewals, MAX_RENEWALS))
                taken = [renewals.pop(key) for key in oldest]
        taken += self._later
        self._later = []
        return taken

    def _arm_lazy(self) -> None:
        """While the writer is idle, wake it when the lazy writes are due: a `later`
        one within `lazy_interval`, the renewals when their own interval is up."""
        if self._wake is not None and self._lazy_timer is None:
            delay = self._lazy_interval  # a `later` one: within the interval from now
            if self._renewals:  # the renewals: when their own interval is up, if sooner
                due = self._renewals_since + delay - self._clock()
                delay = max(0.0, min(delay, due))
            self._lazy_timer = asyncio.get_running_loop().call_later(delay, self._lazy_wake)

    def _lazy_wake(self) -> None:
        self._renewals_since = -math.inf  # due now, whatever the clocks' rounding
        self._wake_writer()

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        """Commit queued mutations in batches until `close()`. Cancelled (an abandoned
        close), it fails the callers still waiting."""
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._ops:
                    if self._stopping:
                        while self._lazy_pending():  # each pass takes (or drops) some
                            await self._commit_batch([])
                        return
                    # Idle: wait for work, or for the lazy writes' deadline.
                    self._wake = wake = loop.create_future()
                    if self._lazy_pending():
                        self._arm_lazy()
                    try:
                        await wake
                    finally:
                        self._wake = None
                        if self._lazy_timer is not None:
                            self._lazy_timer.cancel()
                            self._lazy_timer = None
                batch = self._ops[:MAX_BATCH]
                del self._ops[:MAX_BATCH]
                if batch or self._later or self._renewals_due():
                    self._batch = batch
                    await self._commit_batch(batch)
                    self._batch = []
        except asyncio.CancelledError:
            self._fail_waiting()
            raise
        finally:
            self._task = None
            self._stopped.set()

    async def _commit_batch(self, batch: list[_Op[M]], *, lazy: bool = True) -> None:
        """Commit `batch` (after the lazy writes), or find what failed and fail only
        that: any error, not just the database's (a value it cannot store), fails the
        callers whose mutations caused it and never stops the writer."""
        taken = self._take_lazy() if lazy else []
        try:
            # Lazy writes first: the denials among them happened before this batch.
            await self._commit(taken + [m for op in batch for m in op.mutations])
        except Exception as exc:
            if taken:
                # The lazy writes alone (still first: the audit log stays in order), then
                # the batch alone; lazy writes that fail by themselves are dropped
                # (renewals are covered when the daemon restores its leases).
                try:
                    await self._commit(taken)
                except Exception as lazy_exc:
                    log.error("event=lazy_writes_dropped error=%r", str(lazy_exc))
                await self._commit_batch(batch, lazy=False)
                return
            if len(batch) > 1:
                # Find the culprit: each caller alone, so the others still commit.
                log.warning("event=batch_failed size=%d error=%r", len(batch), str(exc))
                for op in batch:
                    await self._commit_batch([op], lazy=False)
                return
            log.error("event=commit_failed error=%r", str(exc))
            for op in batch:
                op.done.fail(self._failure(exc))
            return
        for op in batch:
            op.done.settle(None)  # what follows the commit runs now (see Deferred)

    async def _commit(self, mutations: list[M]) -> None:
        await self._transaction(mutations)
        self.transactions += 1

    def _fail_waiting(self) -> None:
        """Fail the callers of the batch in progress (its transaction may still commit)
        and those queued (never written); a caller settled already keeps its outcome."""
        batch, self._batch, ops, self._ops = self._batch, [], self._ops, []
        in_progress = self._failure(
            RuntimeError("the store was closed during this write: it may or may not be committed")
        )
        for op in batch:
            op.done.fail(in_progress)
        queued = self._failure(RuntimeError("the store was closed before this was written"))
        for op in ops:
            op.done.fail(queued)

    # ------------------------------------------------------------------ closing

    async def close(self, *, within: float | None = None) -> bool:
        """Commit what is queued (lazy writes included) and stop `run()`. With `within`,
        give up after that many seconds: the writer is cancelled, the transaction in
        progress is left to the database (committed whole or not at all), every caller
        still waiting fails. True when everything queued was committed."""
        self._stopping = True
        self._wake_writer()
        if self._task is None:
            return not self._ops
        try:
            async with asyncio.timeout(within):
                await self._stopped.wait()
        except TimeoutError:
            task = self._task
            if task is not None:  # cancelled, it fails the callers still waiting
                task.cancel()
                await asyncio.wait({task})  # within a turn of the loop
            return False
        return True
