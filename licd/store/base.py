"""The store: the typed persistence API the service uses, whatever the database.

`Store` turns each write (`insert_lease`, `put_licence`, `touch_lease`...) into SQL
statements with their rows (records.py) and hands them to the group-commit writer
(writer.py): it commits many callers' statements in one transaction and settles each
caller's `Deferred` once they are committed, so an acknowledged checkout or checkin is
durable. A heartbeat only `touch`es its lease, a lazy write (a restart covers the gap:
`Engine.restore`). Reads see only committed data.

A backend says how a batch of statements becomes one transaction and how a read runs:
`SqliteStore` (sqlite.py, the default: one file beside the daemon) and `PostgresStore`
(postgres.py, for a cluster of daemons sharing one database, docs/ha.md); the daemon
opens the one its config names. The store never decides anything.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from licd.deferred import Deferred
from licd.engine import Licence, SeatLease
from licd.engine.counters import CounterState
from licd.engine.events import Event
from licd.store.records import (
    DELETE_BLOCK,
    DELETE_FORWARDED,
    DELETE_LEASE,
    DELETE_LICENCE,
    DELETE_OLD_AUDIT,
    INSERT_AUDIT,
    INSERT_LEASE,
    REMOVE_ENTITLEMENT,
    SELECT_AUDIT,
    SELECT_BLOCKS,
    SELECT_COUNTERS,
    SELECT_ENTITLEMENTS,
    SELECT_FORWARDED,
    SELECT_LEASES,
    SELECT_LICENCES,
    SELECT_WALL_MARK,
    SET_AUDIT_CUTOFF,
    TOUCH_LEASE,
    UPSERT_BLOCK,
    UPSERT_COUNTER,
    UPSERT_ENTITLEMENT,
    UPSERT_FORWARDED,
    UPSERT_LICENCE,
    UPSERT_WALL_MARK,
    AuditEntry,
    Block,
    Forwarded,
    StoredEntitlement,
    audit_row,
    counter_row,
    lease_row,
    licence_row,
    row_audit,
    row_counter,
    row_lease,
    row_licence,
)
from licd.store.writer import LAZY_INTERVAL, GroupCommitWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

#: One mutation: an SQL statement and the rows to execute it with.
Statement = tuple[str, list[tuple[Any, ...]]]
Statements = list[Statement]


class StoreError(Exception):
    """The database failed; whatever the caller asked for was not committed."""


class Store(abc.ABC):
    """The typed persistence API; a backend supplies `_transaction`, `_read`,
    `schema_version` and `_release`."""

    #: How the database is named in errors and logs (a file's path, a server's address).
    where: str

    def __init__(self, where: str, lazy_interval: float = LAZY_INTERVAL) -> None:
        self.where = where
        self._writer: GroupCommitWriter[Statement] = GroupCommitWriter(
            self._transaction, failure=_store_error, lazy_interval=lazy_interval
        )
        self._closed = False  # no more writes
        self._released = False  # the connections are closed (or closing)

    @property
    def transactions(self) -> int:
        """Committed transactions, for metrics and tests."""
        return self._writer.transactions

    async def run(self) -> None:
        """The writer: commits what is submitted, in batches, until `close()`."""
        await self._writer.run()

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The newest migration applied."""

    @abc.abstractmethod
    async def _transaction(self, statements: Statements) -> None:
        """One batch of mutations, all or nothing (the writer's `transaction`)."""

    @abc.abstractmethod
    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one query, from committed data only."""

    @abc.abstractmethod
    async def _release(self, committed: bool) -> None:
        """Close the connections; `committed` False: the writer was abandoned with a
        transaction maybe still in progress (close without waiting for it)."""

    # ------------------------------------------------------------------- reads

    async def load_leases(self) -> list[SeatLease]:
        rows = await self._read(SELECT_LEASES)
        return [self._decoded(row_lease, row, "lease", row[1]) for row in rows]

    async def load_licences(self) -> list[Licence]:
        rows = await self._read(SELECT_LICENCES)
        return [self._decoded(row_licence, row, "licence", row[0]) for row in rows]

    def _decoded(
        self, decode: Callable[[Sequence[Any]], T], row: Sequence[Any], what: str, name: Any
    ) -> T:
        """One stored row as its object, or StoreError naming it (by licence id or lease
        handle, never a secret): a row licd did not write (a hand edit, a damaged file)
        stops the start instead of a traceback."""
        try:
            return decode(row)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(
                f"{self.where}: the {what} {name!r} cannot be read ({exc}): the database "
                "was changed outside licd; restore it from the backup"
            ) from None

    async def audit(
        self,
        *,
        after: int = 0,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Committed audit entries with id > `after`, in order, at most `limit`."""
        lo = -math.inf if since is None else since
        hi = math.inf if until is None else until
        rows = await self._read(SELECT_AUDIT, (after, lo, hi, limit))
        return [row_audit(row) for row in rows]

    # ------------------------------------------------------------------ writes

    # The hot writes return their commit as a `Deferred` (awaitable): the service hangs
    # what must follow the commit on it as a callback, which runs as soon as the commit
    # is done, even if the caller was cancelled meanwhile, at no cost of a task.

    def insert_lease(self, lease: SeatLease, event: Event | None = None) -> Deferred[None]:
        """Persist a new lease (and its audit entry): done once committed."""
        return self._enqueue([(INSERT_LEASE, [lease_row(lease)]), *_audit(event)])

    def delete_leases(
        self,
        leases: Sequence[SeatLease],
        events: Sequence[Event] = (),
        inserts: Sequence[tuple[SeatLease, Event]] = (),
    ) -> Deferred[None]:
        """Delete leases (checkin, reclaim, revoke) with their audit entries, and insert
        the leases their seats were handed over to (the queue's, with theirs), in one
        transaction: done once committed. The deletions go first."""
        return self._enqueue(
            [
                (DELETE_LEASE, [(lease.secret,) for lease in leases]),
                (INSERT_AUDIT, [audit_row(e) for e in events]),
                (INSERT_LEASE, [lease_row(lease) for lease, _ in inserts]),
                (INSERT_AUDIT, [audit_row(e) for _, e in inserts]),
            ]
        )

    async def put_licence(self, licence: Licence, event: Event) -> None:
        """Create or replace the licence with `licence.id`; returns once committed."""
        await self._submit([(UPSERT_LICENCE, [licence_row(licence, event.time)]), *_audit(event)])

    async def delete_licence(self, licence_id: str, event: Event) -> None:
        """Delete a licence; an entitlement for it is marked removed (its sequence
        stays: an older one cannot be imported again)."""
        await self._submit(
            [
                (DELETE_LICENCE, [(licence_id,)]),
                (REMOVE_ENTITLEMENT, [(licence_id,)]),
                *_audit(event),
            ]
        )

    # Vendor entitlements (core/entitlements.py): rare writes, each awaited.

    async def load_entitlements(self) -> list[StoredEntitlement]:
        rows = await self._read(SELECT_ENTITLEMENTS)
        return [
            self._decoded(StoredEntitlement.from_row, row, "entitlement", row[0]) for row in rows
        ]

    async def put_entitlements(
        self, items: Sequence[tuple[StoredEntitlement, Licence]], events: Sequence[Event]
    ) -> None:
        """Import entitlements with the licences served under them and their audit
        entries, in one transaction; returns once committed."""
        await self._submit(
            [
                (UPSERT_ENTITLEMENT, [stored.row() for stored, _ in items]),
                (UPSERT_LICENCE, [licence_row(lic, stored.imported) for stored, lic in items]),
                (INSERT_AUDIT, [audit_row(e) for e in events]),
            ]
        )

    async def append(self, event: Event) -> None:
        """An audit entry on its own (a reload, say); returns once committed."""
        await self._submit(_audit(event))

    async def retire_audit(self, *, upto: int, cutoff: float) -> None:
        """Delete the audit entries with id <= `upto` older than `cutoff` (wall time),
        after raising the cut-off that permits it, in one transaction; returns once
        committed. The caller has exported them first (audit_upkeep.retire)."""
        await self._submit([(SET_AUDIT_CUTOFF, [(cutoff,)]), (DELETE_OLD_AUDIT, [(upto, cutoff)])])

    # Metered counters: written with the consume, before its reply.

    async def load_counters(self) -> list[CounterState]:
        return [row_counter(row) for row in await self._read(SELECT_COUNTERS)]

    def put_counter(self, state: CounterState) -> Deferred[None]:
        return self._enqueue([(UPSERT_COUNTER, [counter_row(state)])])

    # Site router state (core/router.py): small, rare writes, each awaited.

    async def load_blocks(self) -> list[Block]:
        return [Block.from_row(row) for row in await self._read(SELECT_BLOCKS)]

    async def put_block(self, block: Block) -> None:
        await self._submit([(UPSERT_BLOCK, [block.row()])])

    async def delete_block(self, licence_id: str) -> None:
        await self._submit([(DELETE_BLOCK, [(licence_id,)])])

    async def load_forwarded(self) -> list[Forwarded]:
        return [Forwarded.from_row(row) for row in await self._read(SELECT_FORWARDED)]

    async def put_forwarded(self, item: Forwarded, event: Event | None = None) -> None:
        await self._submit([(UPSERT_FORWARDED, [item.row()]), *_audit(event)])

    async def delete_forwarded(self, secrets: Sequence[str], events: Sequence[Event] = ()) -> None:
        await self._submit(
            [
                (DELETE_FORWARDED, [(s,) for s in secrets]),
                (INSERT_AUDIT, [audit_row(e) for e in events]),
            ]
        )

    def touch_lease(self, lease: SeatLease) -> None:
        """Record a renewal lazily: written within LAZY_INTERVAL, together with the
        other renewals of that interval."""
        row = (lease.expires, lease.last_heartbeat, lease.secret)
        self._writer.renew(lease.secret, (TOUCH_LEASE, [row]))

    def append_later(self, event: Event) -> None:
        """An audit entry nobody waits for (a denial): written with the next batch, within
        LAZY_INTERVAL."""
        self._writer.later((INSERT_AUDIT, [audit_row(event)]))

    async def barrier(self) -> None:
        """Wait until everything submitted before this call has been committed."""
        await self._submit([])

    async def _submit(self, statements: Statements) -> None:
        await self._enqueue(statements)

    def _enqueue(self, statements: Statements) -> Deferred[None]:
        if self._closed:
            raise StoreError("the store is closed")
        return self._writer.submit(statements)

    # ------------------------------------------------------------- transactions

    async def close(self, *, within: float | None = None) -> None:
        """Commit what is queued (renewals included), stop the writer, close the
        database.

        With `within`: a writer still busy after that many seconds (a stalled disk, a
        lock held elsewhere) is abandoned, its waiting callers failed, and the database
        closed once the transaction in progress has ended (committed whole or not at
        all). Closing again does nothing more."""
        self._closed = True
        committed = await self._writer.close(within=within)
        if not committed:
            log.warning("event=store_abandoned within=%.1f", within)
        if self._released:
            return
        self._released = True
        await self._release(committed)

    # A site router's wall-clock high-water mark (core/router.py, migration 007).

    async def load_wall_mark(self) -> float | None:
        """The latest wall time the router recorded, or None before the first."""
        rows = await self._read(SELECT_WALL_MARK)
        return float(rows[0][0]) if rows else None

    async def put_wall_mark(self, wall: float) -> None:
        """Record `wall` as passed; a lower value than the one kept changes nothing."""
        await self._submit([(UPSERT_WALL_MARK, [(wall,)])])


def _audit(event: Event | None) -> Statements:
    return [] if event is None else [(INSERT_AUDIT, [audit_row(event)])]


#: Statements a batch runs first (in this order) and last: see `batched`.
_FIRST = (DELETE_LEASE, INSERT_LEASE, TOUCH_LEASE)
_LAST = INSERT_AUDIT


def batched(statements: Statements) -> Statements:
    """A batch's statements as a backend runs them: regrouped, then consecutive runs of
    the same statement merged into one `executemany` (empty ones dropped). Checkouts and
    checkins of a batch alternate a lease row and an audit row, which would not merge:
    so lease deletions, insertions and renewals go first, then the rest in their order,
    then the audit entries. Each `executemany` costs a call (SQLite) or a round trip per
    row (PostgreSQL), so a batch of 48 checkouts makes 2 calls instead of 96.

    Safe: a batch never both inserts and deletes or renews one lease (a lease can be
    released or renewed only once its insertion is committed: `Engine.begin_release`
    refuses a PENDING one, and its holder learns it only then), a renewal of a lease
    deleted in the batch changes nothing, and the audit log depends on no other table
    (its entries keep their order)."""
    first: dict[str, Statements] = {sql: [] for sql in _FIRST}
    rest: Statements = []
    last: Statements = []
    for statement in statements:
        sql = statement[0]
        first.get(sql, last if sql == _LAST else rest).append(statement)
    out: Statements = []
    ordered = (*first[DELETE_LEASE], *first[INSERT_LEASE], *first[TOUCH_LEASE], *rest, *last)
    for sql, rows in ordered:
        if not rows:
            continue
        if out and out[-1][0] == sql:
            out[-1][1].extend(rows)
        else:
            out.append((sql, list(rows)))
    return out


def _store_error(exc: Exception) -> StoreError:
    """What a caller whose write failed is told."""
    return exc if isinstance(exc, StoreError) else StoreError(str(exc))
