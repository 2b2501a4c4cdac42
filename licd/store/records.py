"""The database's rows: SQL statements and conversions between rows and domain objects.

Leases, licences and audit entries each have their statements here and a pair of
functions to and from a row. Nothing here runs SQL or decides anything; the store
(base.py and its backends) does the running, the engine the deciding.

Each statement is written once for both backends: SQLite and PostgreSQL alike take `?`
placeholders (the PostgreSQL store numbers them `$1, $2...` once), the column `"user"`
quoted (a reserved word in PostgreSQL), upserts as `ON CONFLICT ... DO UPDATE`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from licd.engine import Licence, SeatLease
from licd.engine.counters import CounterState
from licd.engine.events import Event, Kind
from licd.engine.licence import Addon, Counter
from licd_client.messages import Holder

Row = tuple[Any, ...]

# ---------------------------------------------------------------------------- leases

INSERT_LEASE = """
INSERT INTO lease (secret, handle, licence_id, request, host, hostid, "user", pid, app,
                   instance, seats, ttl, created, expires, last_heartbeat, delegate, ip,
                   overdraft, device, unit)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
DELETE_LEASE = "DELETE FROM lease WHERE secret = ?"
TOUCH_LEASE = "UPDATE lease SET expires = ?, last_heartbeat = ? WHERE secret = ?"
SELECT_LEASES = """
SELECT secret, handle, licence_id, request, host, hostid, "user", pid, app, instance,
       seats, ttl, created, expires, last_heartbeat, delegate, ip, overdraft, device, unit
FROM lease
"""


def lease_row(lease: SeatLease) -> tuple[Any, ...]:
    h = lease.holder
    return (
        lease.secret,
        lease.handle,
        lease.licence_id,
        lease.request,
        h.host,
        h.hostid,
        h.user,
        h.pid,
        h.app,
        h.instance,
        lease.seats,
        lease.ttl,
        lease.created,
        lease.expires,
        lease.last_heartbeat,
        lease.delegate,
        lease.ip,
        int(lease.overdraft),
        int(lease.device),
        lease.unit,
    )


def row_lease(row: Sequence[Any]) -> SeatLease:
    (secret, handle, licence_id, request, host, hostid, user, pid, app, instance) = row[:10]
    seats, ttl, created, expires, last_heartbeat, delegate, ip = row[10:17]
    overdraft, device, unit = row[17:]
    return SeatLease(
        secret=secret,
        handle=handle,
        licence_id=licence_id,
        request=request,
        holder=Holder(host=host, hostid=hostid, user=user, pid=pid, app=app, instance=instance),
        seats=seats,
        ttl=ttl,
        created=created,
        expires=expires,
        last_heartbeat=last_heartbeat,
        delegate=delegate,
        ip=ip,
        overdraft=bool(overdraft),
        device=bool(device),
        unit=unit,
    )


# -------------------------------------------------------------------------- licences

UPSERT_LICENCE = """
INSERT INTO licence (id, key, product, seats, lease_ttl, grace, not_before, expires,
                     features, updated, policy)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    key = excluded.key, product = excluded.product, seats = excluded.seats,
    lease_ttl = excluded.lease_ttl, grace = excluded.grace,
    not_before = excluded.not_before, expires = excluded.expires,
    features = excluded.features, updated = excluded.updated, policy = excluded.policy
"""
DELETE_LICENCE = "DELETE FROM licence WHERE id = ?"
SELECT_LICENCES = """
SELECT id, key, product, seats, lease_ttl, grace, not_before, expires, features, policy
FROM licence ORDER BY id
"""


def licence_row(licence: Licence, now: float) -> Row:
    return (
        licence.id,
        licence.key,
        licence.product,
        licence.seats,
        licence.lease_ttl,
        licence.grace,
        licence.not_before,
        licence.expires,
        json.dumps(licence.features, sort_keys=True),
        now,
        json.dumps(_policy(licence), sort_keys=True),
    )


_BASIC = ("key", "id", "product", "seats", "lease_ttl", "grace", "not_before", "expires")


def _policy(licence: Licence) -> dict[str, Any]:
    """The licence's terms beyond the basic columns, as JSON-able values."""
    out = {
        f.name: getattr(licence, f.name)
        for f in dataclasses.fields(licence)
        if f.name not in _BASIC and f.name != "features"
    }
    out["allow"], out["deny"] = list(licence.allow), list(licence.deny)
    out["borrow_allow"] = list(licence.borrow_allow)
    out["queue_priority"] = dict(licence.queue_priority)
    out["reserve"], out["max"] = dict(licence.reserve), dict(licence.max)
    out["counter"] = [dataclasses.asdict(c) for c in licence.counter]
    out["addon"] = [dataclasses.asdict(a) for a in licence.addon]
    return out


def row_licence(row: Sequence[Any]) -> Licence:
    licence_id, key, product, seats, lease_ttl, grace, not_before, expires, features = row[:9]
    policy = json.loads(row[9])
    policy["allow"] = tuple(policy.get("allow", ()))
    policy["deny"] = tuple(policy.get("deny", ()))
    policy["borrow_allow"] = tuple(policy.get("borrow_allow", ()))
    policy["counter"] = tuple(Counter(**c) for c in policy.get("counter", ()))
    policy["addon"] = tuple(Addon(**a) for a in policy.get("addon", ()))
    return Licence(
        key=key,
        id=licence_id,
        product=product,
        seats=seats,
        lease_ttl=lease_ttl,
        grace=grace,
        not_before=not_before,
        expires=expires,
        features=_features(json.loads(features)),
        **policy,
    )


def _features(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | bool | float) for k, v in value.items()
    ):
        raise ValueError("features must map names to str, int, bool or float")
    return value


# ----------------------------------------------------------------------------- audit

INSERT_AUDIT = """
INSERT INTO audit (time, event, licence, handle, host, hostid, "user", ip, seats, reason,
                   admin_uid, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
SELECT_AUDIT = """
SELECT id, time, event, licence, handle, host, hostid, "user", ip, seats, reason, admin_uid,
       detail
FROM audit WHERE id > ? AND time >= ? AND time < ? ORDER BY id LIMIT ?
"""
# Retention (migration 006): the cut-off first, then the delete it permits.
SET_AUDIT_CUTOFF = "UPDATE audit_retention SET cutoff = ? WHERE id = 1"
DELETE_OLD_AUDIT = "DELETE FROM audit WHERE id <= ? AND time < ?"


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log: its sequence number and the event it records."""

    id: int
    event: Event

    def to_json(self) -> dict[str, Any]:
        e = self.event
        return {
            "id": self.id,
            "time": e.time,
            "event": e.kind.value,
            "licence": e.licence,
            "handle": e.handle,
            "host": e.host,
            "hostid": e.hostid,
            "user": e.user,
            "ip": e.ip,
            "seats": e.seats,
            "reason": e.reason,
            "admin_uid": e.admin_uid,
            "detail": e.detail,
        }


def audit_row(e: Event) -> Row:
    return (
        e.time,
        e.kind.value,
        e.licence,
        e.handle,
        e.host,
        e.hostid,
        e.user,
        e.ip,
        e.seats,
        e.reason,
        e.admin_uid,
        _DETAIL.encode(e.detail) if e.detail else "{}",
    )


#: One encoder for every audit entry's detail (json.dumps with options builds one a call).
_DETAIL = json.JSONEncoder(sort_keys=True, default=str)


def row_audit(row: Sequence[Any]) -> AuditEntry:
    (entry_id, time, kind, licence, handle, host, hostid, user, ip) = row[:9]
    seats, reason, admin_uid, detail = row[9:]
    event = Event(
        kind=Kind(kind),
        time=time,
        licence=licence,
        handle=handle,
        host=host,
        hostid=hostid,
        user=user,
        ip=ip,
        seats=seats,
        reason=reason,
        admin_uid=admin_uid,
        detail=json.loads(detail),
    )
    return AuditEntry(entry_id, event)


# ------------------------------------------------------------- site router (router.py)

UPSERT_BLOCK = """
INSERT INTO block (licence_id, secret, handle, request, seats, expires, token, chain,
                   renewed, revoked)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (licence_id) DO UPDATE SET
    secret = excluded.secret, handle = excluded.handle, request = excluded.request,
    seats = excluded.seats, expires = excluded.expires, token = excluded.token,
    chain = excluded.chain, renewed = excluded.renewed, revoked = excluded.revoked
"""
DELETE_BLOCK = "DELETE FROM block WHERE licence_id = ?"
SELECT_BLOCKS = """
SELECT licence_id, secret, handle, request, seats, expires, token, chain, renewed, revoked
FROM block
"""
UPSERT_FORWARDED = """
INSERT INTO forwarded (secret, handle, licence_id, host, hostid, "user", pid, ip, seats,
                       created, expires)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (secret) DO UPDATE SET
    handle = excluded.handle, licence_id = excluded.licence_id, host = excluded.host,
    hostid = excluded.hostid, "user" = excluded."user", pid = excluded.pid, ip = excluded.ip,
    seats = excluded.seats, created = excluded.created, expires = excluded.expires
"""
DELETE_FORWARDED = "DELETE FROM forwarded WHERE secret = ?"
SELECT_FORWARDED = """
SELECT secret, handle, licence_id, host, hostid, "user", pid, ip, seats, created, expires
FROM forwarded
"""


@dataclass
class Block:
    """A block of seats held upstream by a site router."""

    licence_id: str
    secret: str
    handle: str
    request: str
    seats: int
    expires: float
    token: bytes
    chain: list[bytes]
    renewed: float
    revoked: bool = False

    def row(self) -> Row:
        chain = msgpack.packb(self.chain, use_bin_type=True)
        return (
            self.licence_id,
            self.secret,
            self.handle,
            self.request,
            self.seats,
            self.expires,
            self.token,
            chain,
            self.renewed,
            int(self.revoked),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Block:
        licence_id, secret, handle, request, seats, expires, token, chain, renewed = row[:9]
        return cls(
            licence_id,
            secret,
            handle,
            request,
            seats,
            expires,
            token,
            list(msgpack.unpackb(chain, raw=False)),
            renewed,
            bool(row[9]),
        )


@dataclass
class Forwarded:
    """A lease a router relayed upstream, as the router's listings show it."""

    secret: str
    handle: str
    licence_id: str
    holder: Holder
    ip: str | None
    seats: int
    created: float
    expires: float

    def row(self) -> Row:
        h = self.holder
        return (
            self.secret,
            self.handle,
            self.licence_id,
            h.host,
            h.hostid,
            h.user,
            h.pid,
            self.ip,
            self.seats,
            self.created,
            self.expires,
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Forwarded:
        secret, handle, licence_id, host, hostid, user, pid, ip, seats, created, expires = row
        return cls(
            secret,
            handle,
            licence_id,
            Holder(host=host, hostid=hostid, user=user, pid=pid),
            ip,
            seats,
            created,
            expires,
        )


# -------------------------------------------------------------------- metered counters

UPSERT_COUNTER = """
INSERT INTO counter (licence_id, name, used, period_start) VALUES (?, ?, ?, ?)
ON CONFLICT (licence_id, name) DO UPDATE SET
    used = excluded.used, period_start = excluded.period_start
"""
SELECT_COUNTERS = "SELECT licence_id, name, used, period_start FROM counter"


def counter_row(state: CounterState) -> Row:
    return (state.licence_id, state.name, state.used, state.period_start)


def row_counter(row: Sequence[Any]) -> CounterState:
    licence_id, name, used, period_start = row
    return CounterState(licence_id, name, used, period_start)


# ------------------------------------------- site router's wall-clock mark (migration 007)

UPSERT_WALL_MARK = """
INSERT INTO wall_mark (id, wall) VALUES (1, ?)
ON CONFLICT (id) DO UPDATE SET
    wall = CASE WHEN excluded.wall > wall_mark.wall THEN excluded.wall ELSE wall_mark.wall END
"""
SELECT_WALL_MARK = "SELECT wall FROM wall_mark WHERE id = 1"


# ----------------------------------------------------- entitlements (core/entitlements.py)

#: An entitlement's row; the sequence kept is never lowered (a replay changes nothing).
UPSERT_ENTITLEMENT = """
INSERT INTO entitlement (licence_id, sequence, statement, imported, removed)
VALUES (?, ?, ?, ?, 0)
ON CONFLICT (licence_id) DO UPDATE SET
    sequence = excluded.sequence, statement = excluded.statement,
    imported = excluded.imported, removed = 0
WHERE excluded.sequence >= entitlement.sequence
"""
REMOVE_ENTITLEMENT = "UPDATE entitlement SET removed = 1 WHERE licence_id = ?"
SELECT_ENTITLEMENTS = """
SELECT licence_id, sequence, statement, imported, removed FROM entitlement ORDER BY licence_id
"""


@dataclass(frozen=True)
class StoredEntitlement:
    """An imported entitlement as kept: its statement (verified again on every start)
    and whether its licence was removed since (its sequence still counts)."""

    licence_id: str
    sequence: int
    statement: bytes
    imported: float
    removed: bool = False

    def row(self) -> Row:
        return (self.licence_id, self.sequence, self.statement, self.imported)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredEntitlement:
        licence_id, sequence, statement, imported, removed = row
        return cls(str(licence_id), int(sequence), bytes(statement), float(imported), bool(removed))
