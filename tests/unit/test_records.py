"""The database's rows on their own: each record's exact columns for a known value, its
round trip through real SQLite (in memory, every migration applied), the rows an older
schema left behind, and what a row licd did not write does.

The column values are the on-disk format: a change here is a change of format, which
needs a migration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from licd.engine import Licence, SeatLease
from licd.engine.counters import CounterState
from licd.engine.events import Event, Kind, holder_event
from licd.engine.lease import LeasePhase
from licd.engine.licence import Addon, Counter
from licd.store.records import (
    DELETE_BLOCK,
    DELETE_FORWARDED,
    DELETE_LEASE,
    DELETE_LICENCE,
    INSERT_AUDIT,
    INSERT_LEASE,
    SELECT_AUDIT,
    SELECT_BLOCKS,
    SELECT_COUNTERS,
    SELECT_FORWARDED,
    SELECT_LEASES,
    SELECT_LICENCES,
    SELECT_WALL_MARK,
    TOUCH_LEASE,
    UPSERT_BLOCK,
    UPSERT_COUNTER,
    UPSERT_FORWARDED,
    UPSERT_LICENCE,
    UPSERT_WALL_MARK,
    AuditEntry,
    Block,
    Forwarded,
    audit_row,
    counter_row,
    lease_row,
    licence_row,
    row_audit,
    row_counter,
    row_lease,
    row_licence,
)
from licd.store.sqlite import _migrate
from licd_client.messages import Holder
from tests.support import DICOM

NOW = 1_790_000_000.0
#: Lease fields the engine keeps at run time only: never written, defaults when read.
RUNTIME = {"reclaim_at", "state", "scheduled", "renewals", "renewed_at", "asked", "ending"}
RUNTIME |= {"idle_since", "idle_total", "idle_warned", "linger_until", "lingered"}


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    """An in-memory database with the schema of every migration, as the store has it."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    _migrate(conn)
    yield conn
    conn.close()


def lease(**kw: Any) -> SeatLease:
    values: dict[str, Any] = {
        "secret": "s3cret",
        "handle": "h-1",
        "licence_id": "dicom-hq",
        "holder": Holder("ws-1", "id-ws-1", "alice", 4242, app="viewer", instance="2"),
        "request": "req-1",
        "seats": 2,
        "ttl": 90.0,
        "created": NOW,
        "expires": NOW + 90,
        "last_heartbeat": NOW + 30,
        "delegate": b"\x01\x02",
        "ip": "192.0.2.7",
        "overdraft": True,
        "device": False,
        "unit": "h:id-ws-1",
    }
    values.update(kw)
    return SeatLease(**values)


def fields_of(value: SeatLease) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


# ---------------------------------------------------------------------------- leases


def test_a_lease_row_has_every_persisted_field_in_column_order() -> None:
    assert lease_row(lease()) == (
        "s3cret",
        "h-1",
        "dicom-hq",
        "req-1",
        "ws-1",
        "id-ws-1",
        "alice",
        4242,
        "viewer",
        "2",
        2,
        90.0,
        NOW,
        NOW + 90,
        NOW + 30,
        b"\x01\x02",
        "192.0.2.7",
        1,  # overdraft and device as integers
        0,
        "h:id-ws-1",
    )


@pytest.mark.parametrize(
    "original",
    [
        lease(),
        lease(
            holder=Holder("ws-2", "id-ws-2", "bob", 7),  # no app nor instance
            delegate=None,
            ip=None,
            overdraft=False,
            device=True,
            unit="",
        ),
    ],
    ids=["every field", "optional fields empty"],
)
def test_a_lease_survives_the_database(db: sqlite3.Connection, original: SeatLease) -> None:
    db.execute(INSERT_LEASE, lease_row(original))
    [row] = db.execute(SELECT_LEASES).fetchall()
    back = row_lease(row)
    assert fields_of(back) == fields_of(original)
    assert type(back.overdraft) is bool and type(back.device) is bool


def test_run_time_bookkeeping_is_not_stored() -> None:
    live = lease(reclaim_at=5.0, state=LeasePhase.RELEASING, scheduled=9.0, renewals=2.0)
    back = row_lease(lease_row(live))
    fresh = lease()
    assert {n: getattr(back, n) for n in RUNTIME} == {n: getattr(fresh, n) for n in RUNTIME}
    assert back.state is LeasePhase.LIVE
    persisted = fields_of(back).keys() - RUNTIME
    assert len(persisted) == len(lease_row(live)) - 5  # the holder fills six columns


def test_touch_and_delete_a_lease(db: sqlite3.Connection) -> None:
    db.execute(INSERT_LEASE, lease_row(lease()))
    db.execute(INSERT_LEASE, lease_row(lease(secret="other", handle="h-2")))
    db.execute(TOUCH_LEASE, (NOW + 180, NOW + 90, "s3cret"))
    touched = {x.secret: x for x in map(row_lease, db.execute(SELECT_LEASES))}["s3cret"]
    assert (touched.expires, touched.last_heartbeat) == (NOW + 180, NOW + 90)
    db.execute(DELETE_LEASE, ("s3cret",))
    assert [row_lease(r).secret for r in db.execute(SELECT_LEASES)] == ["other"]


def test_a_lease_written_before_policies_reads_with_their_defaults(
    db: sqlite3.Connection,
) -> None:
    """A lease row from before migration 004 (no overdraft, device, unit columns) gets
    the columns' defaults: an ordinary lease, its unit left for the engine to derive."""
    db.execute(
        "INSERT INTO lease (secret, handle, licence_id, request, host, hostid, user, pid,"
        " seats, ttl, created, expires, last_heartbeat)"
        " VALUES ('old', 'h-old', 'dicom-hq', 'r', 'ws', 'id-ws', 'eve', 1, 1, 90, 0, 90, 0)"
    )
    [back] = map(row_lease, db.execute(SELECT_LEASES))
    assert (back.overdraft, back.device, back.unit) == (False, False, "")
    assert (back.delegate, back.ip, back.holder.app, back.holder.instance) == (None,) * 4


# -------------------------------------------------------------------------- licences

EVERY_POLICY = Licence(
    key="KEY-1",
    id="cad",
    product="cad",
    seats=4,
    lease_ttl=60.0,
    grace=5.0,
    not_before=NOW - 10,
    expires=NOW + 86400,
    features={"tier": "pro", "max_size": 10, "ocr": True, "ratio": 0.5},
    max_ttl=600.0,
    delegable=True,
    count_by="host_user",
    leases_per_unit=3,
    device_period=3600.0,
    overdraft=1,
    allow=("group:cad", "ip:192.0.2.0/24"),
    deny=("user:mallory",),
    reserve={"cad": 2},
    max={"user": 2, "group:cad": 3},
    counter=(Counter("scans", 100, "daily", 5.0), Counter("pages", 10)),
    addon=(Addon(seats=2, features={"render": "on"}, starts=NOW, ends=NOW + 3600), Addon()),
    borrow_after=300.0,
    borrow_max=1,
    borrow_allow=("group:cad",),
    queue_max=5,
    queue_priority={"cad": 10},
    idle_timeout=900.0,
    idle_reclaim="always",
    idle_threshold=0.75,
    linger=120.0,
)


def test_a_licence_row_keeps_the_basic_terms_in_columns_and_the_rest_as_json() -> None:
    row = licence_row(EVERY_POLICY, NOW + 1)
    assert row[:8] == ("cad", "KEY-1", "cad", 4, 60.0, 5.0, NOW - 10, NOW + 86400)
    assert row[8] == '{"max_size": 10, "ocr": true, "ratio": 0.5, "tier": "pro"}'  # sorted
    assert row[9] == NOW + 1  # when it was written
    assert json.loads(row[10]) == {
        "max_ttl": 600.0,
        "delegable": True,
        "count_by": "host_user",
        "leases_per_unit": 3,
        "device_period": 3600.0,
        "overdraft": 1,
        "allow": ["group:cad", "ip:192.0.2.0/24"],
        "deny": ["user:mallory"],
        "reserve": {"cad": 2},
        "max": {"user": 2, "group:cad": 3},
        "counter": [
            {"name": "scans", "limit": 100, "reset": "daily", "dedup_window": 5.0},
            {"name": "pages", "limit": 10, "reset": "never", "dedup_window": 3.0},
        ],
        "addon": [
            {"seats": 2, "features": {"render": "on"}, "starts": NOW, "ends": NOW + 3600},
            {"seats": 0, "features": {}, "starts": None, "ends": None},
        ],
        "borrow_after": 300.0,
        "borrow_max": 1,
        "borrow_allow": ["group:cad"],
        "queue_max": 5,
        "queue_priority": {"cad": 10},
        "idle_timeout": 900.0,
        "idle_reclaim": "always",
        "idle_threshold": 0.75,
        "linger": 120.0,
    }
    assert list(json.loads(row[10])) == sorted(json.loads(row[10]))  # one spelling a value


@pytest.mark.parametrize("original", [EVERY_POLICY, DICOM], ids=["every policy", "plain"])
def test_a_licence_survives_the_database(db: sqlite3.Connection, original: Licence) -> None:
    db.execute(UPSERT_LICENCE, licence_row(original, NOW))
    [row] = db.execute(SELECT_LICENCES).fetchall()
    assert row_licence(row) == original


def test_a_licence_upsert_replaces_its_id_and_the_listing_is_by_id(
    db: sqlite3.Connection,
) -> None:
    db.execute(UPSERT_LICENCE, licence_row(DICOM, NOW))
    db.execute(UPSERT_LICENCE, licence_row(EVERY_POLICY, NOW))
    edited = dataclasses.replace(EVERY_POLICY, key="KEY-2", seats=9, counter=(), allow=())
    db.execute(UPSERT_LICENCE, licence_row(edited, NOW + 5))
    assert [row_licence(r) for r in db.execute(SELECT_LICENCES)] == [edited, DICOM]
    assert db.execute("SELECT updated FROM licence WHERE id = 'cad'").fetchone() == (NOW + 5,)
    db.execute(DELETE_LICENCE, ("cad",))
    assert [row_licence(r) for r in db.execute(SELECT_LICENCES)] == [DICOM]


def test_a_licence_written_before_policies_reads_with_their_defaults(
    db: sqlite3.Connection,
) -> None:
    """A licence row from before migration 004 has the column's default policy `{}`, and
    one written before a later policy field lacks that field: the defaults apply."""
    db.execute(
        "INSERT INTO licence (id, key, product, seats, lease_ttl, grace, features, updated)"
        " VALUES ('dicom-hq', 'XXXX-YYYY-ZZZZ', 'dicom', 3, 90, 15,"
        ' \'{"tier": "pro", "modules": "core,ocr"}\', 0)'
    )
    [row] = db.execute(SELECT_LICENCES).fetchall()
    assert row_licence(row) == DICOM
    older = (*row[:9], json.dumps({"overdraft": 2}))
    assert row_licence(older) == dataclasses.replace(DICOM, overdraft=2)


@pytest.mark.parametrize(
    ("features", "policy", "problem"),
    [
        ("{not json", "{}", "Expecting property name"),
        ('["a"]', "{}", "features must map names to str, int, bool or float"),
        ('{"a": null}', "{}", "features must map names to str, int, bool or float"),
        ('{"a": [1]}', "{}", "features must map names to str, int, bool or float"),
        ('{"a": {"b": 1}}', "{}", "features must map names to str, int, bool or float"),
        ("{}", "{not json", "Expecting property name"),
        ("{}", "null", "'NoneType' object has no attribute 'get'"),
        ("{}", "[]", "'list' object has no attribute 'get'"),
        ("{}", '{"colour": "red"}', "unexpected keyword argument 'colour'"),
        ("{}", '{"counter": [{"name": "x"}]}', "missing 1 required positional argument"),
        ("{}", '{"counter": [1]}', "argument after ** must be a mapping"),
        ("{}", '{"addon": [{"when": 1}]}', "unexpected keyword argument 'when'"),
    ],
)
def test_a_licence_row_licd_did_not_write_fails_with_an_error_the_store_names(
    features: str, policy: str, problem: str
) -> None:
    """The store turns ValueError, TypeError, KeyError and AttributeError from a row into
    a clear error naming the licence (test_store): each bad row raises one of them."""
    row = ("x", "K", "p", 1, 90.0, 15.0, None, None, features, policy)
    with pytest.raises((ValueError, TypeError, KeyError, AttributeError), match=re.escape(problem)):
        row_licence(row)


# ----------------------------------------------------------------------------- audit

CHECKOUT = Event(
    kind=Kind.CHECKOUT,
    time=NOW,
    licence="dicom-hq",
    handle="h-1",
    host="ws-1",
    hostid="id-ws-1",
    user="alice",
    ip="192.0.2.7",
    seats=2,
    reason=None,
    admin_uid=None,
    detail={"overdraft": True, "app": "viewer"},
)


def test_an_audit_row_has_its_event_in_column_order() -> None:
    assert audit_row(CHECKOUT) == (
        NOW,
        "checkout",
        "dicom-hq",
        "h-1",
        "ws-1",
        "id-ws-1",
        "alice",
        "192.0.2.7",
        2,
        None,
        None,
        '{"app": "viewer", "overdraft": true}',  # sorted keys
    )


def test_a_checkout_event_names_the_holders_app_in_its_detail() -> None:
    # The audit log has no app column: a checkout's detail carries it (report --by app).
    held = lease()
    fields: dict[str, Any] = {
        "licence": held.licence_id,
        "handle": held.handle,
        "ip": held.ip,
        "seats": held.seats,
    }
    made = holder_event(
        Kind.CHECKOUT, NOW, holder=held.holder, detail={"overdraft": True}, **fields
    )
    assert made == CHECKOUT
    checkin = holder_event(Kind.CHECKIN, NOW, holder=held.holder, detail={"in_use": 1}, **fields)
    assert checkin.detail == {"in_use": 1}  # the checkout names it; the rest go by handle
    no_app = dataclasses.replace(held.holder, app=None)
    assert holder_event(Kind.CHECKOUT, NOW, holder=no_app, **fields).detail == {}


def test_an_audit_detail_stores_what_json_cannot_as_text() -> None:
    odd = Event(Kind.RELOAD, NOW, detail={"path": Path("/etc/licd"), "ids": ("a", "b")})
    assert audit_row(odd)[-1] == '{"ids": ["a", "b"], "path": "/etc/licd"}'
    assert audit_row(Event(Kind.RELOAD, NOW))[-1] == "{}"


def test_an_audit_entry_survives_the_database(db: sqlite3.Connection) -> None:
    revoke = Event(Kind.REVOKE, NOW + 1, licence="dicom-hq", reason="left", admin_uid=0)
    for event in (CHECKOUT, revoke, Event(Kind.RELOAD_FAILED, NOW + 2, reason="bad")):
        db.execute(INSERT_AUDIT, audit_row(event))
    rows = db.execute(SELECT_AUDIT, (0, -math.inf, math.inf, 10)).fetchall()
    assert [row_audit(r) for r in rows] == [
        AuditEntry(1, CHECKOUT),
        AuditEntry(2, revoke),
        AuditEntry(3, Event(Kind.RELOAD_FAILED, NOW + 2, reason="bad")),
    ]


def test_the_audit_read_goes_by_id_and_time_range_up_to_a_limit(
    db: sqlite3.Connection,
) -> None:
    for n in range(6):
        db.execute(INSERT_AUDIT, audit_row(Event(Kind.CHECKIN, NOW + n, handle=f"h{n}")))

    def ids(after: int, since: float, until: float, limit: int) -> list[int]:
        return [row_audit(r).id for r in db.execute(SELECT_AUDIT, (after, since, until, limit))]

    assert ids(0, -math.inf, math.inf, 100) == [1, 2, 3, 4, 5, 6]
    assert ids(2, -math.inf, math.inf, 100) == [3, 4, 5, 6]  # after an id
    assert ids(0, NOW + 1, NOW + 4, 100) == [2, 3, 4]  # since included, until not
    assert ids(1, -math.inf, math.inf, 2) == [2, 3]  # the first few, in order


def test_an_audit_entry_as_json_names_every_column() -> None:
    assert AuditEntry(7, CHECKOUT).to_json() == {
        "id": 7,
        "time": NOW,
        "event": "checkout",
        "licence": "dicom-hq",
        "handle": "h-1",
        "host": "ws-1",
        "hostid": "id-ws-1",
        "user": "alice",
        "ip": "192.0.2.7",
        "seats": 2,
        "reason": None,
        "admin_uid": None,
        "detail": {"overdraft": True, "app": "viewer"},
    }


def test_an_audit_row_of_an_unknown_kind_is_refused() -> None:
    row = (1, NOW, "teleport", None, None, None, None, None, None, None, None, None, "{}")
    with pytest.raises(ValueError, match="'teleport' is not a valid Kind"):
        row_audit(row)


# ---------------------------------------------------------------- site router: blocks

BLOCK = Block(
    licence_id="dicom-hq",
    secret="up-secret",
    handle="up-h",
    request="blk-1",
    seats=3,
    expires=NOW + 600,
    token=b"tok",
    chain=[b"leaf", b"root"],
    renewed=NOW,
)


def test_a_block_row_packs_its_chain_and_its_revoked_flag() -> None:
    chain = msgpack.packb([b"leaf", b"root"], use_bin_type=True)
    expected = ("dicom-hq", "up-secret", "up-h", "blk-1", 3, NOW + 600, b"tok", chain, NOW, 0)
    assert BLOCK.row() == expected
    assert dataclasses.replace(BLOCK, revoked=True).row()[9] == 1


@pytest.mark.parametrize("revoked", [False, True])
def test_a_block_survives_the_database(db: sqlite3.Connection, revoked: bool) -> None:
    original = dataclasses.replace(BLOCK, revoked=revoked)
    db.execute(UPSERT_BLOCK, original.row())
    [back] = map(Block.from_row, db.execute(SELECT_BLOCKS))
    assert back == original
    assert type(back.revoked) is bool


def test_a_block_upsert_replaces_the_licences_block(db: sqlite3.Connection) -> None:
    db.execute(UPSERT_BLOCK, BLOCK.row())
    renewed = dataclasses.replace(BLOCK, expires=NOW + 1200, renewed=NOW + 600, chain=[])
    db.execute(UPSERT_BLOCK, renewed.row())
    assert list(map(Block.from_row, db.execute(SELECT_BLOCKS))) == [renewed]
    db.execute(DELETE_BLOCK, ("dicom-hq",))
    assert db.execute(SELECT_BLOCKS).fetchall() == []


# ------------------------------------------------------------- site router: forwarded

FORWARDED = Forwarded(
    secret="fwd-secret",
    handle="fwd-h",
    licence_id="dicom-hq",
    holder=Holder("ws-1", "id-ws-1", "alice", 4242),
    ip="192.0.2.7",
    seats=1,
    created=NOW,
    expires=NOW + 90,
)


def test_a_forwarded_row_has_its_holder_spelled_out() -> None:
    assert FORWARDED.row() == (
        "fwd-secret",
        "fwd-h",
        "dicom-hq",
        "ws-1",
        "id-ws-1",
        "alice",
        4242,
        "192.0.2.7",
        1,
        NOW,
        NOW + 90,
    )


@pytest.mark.parametrize("ip", ["192.0.2.7", None])
def test_a_forwarded_lease_survives_the_database(db: sqlite3.Connection, ip: str | None) -> None:
    original = dataclasses.replace(FORWARDED, ip=ip)
    db.execute(UPSERT_FORWARDED, original.row())
    assert list(map(Forwarded.from_row, db.execute(SELECT_FORWARDED))) == [original]
    db.execute(DELETE_FORWARDED, ("fwd-secret",))
    assert db.execute(SELECT_FORWARDED).fetchall() == []


def test_a_forwarded_lease_keeps_who_holds_it_not_their_app() -> None:
    """The router's listings show the machine, user and process: app and instance are
    not stored, and read back as absent."""
    with_app = dataclasses.replace(
        FORWARDED, holder=Holder("ws-1", "id-ws-1", "alice", 4242, app="viewer", instance="2")
    )
    assert Forwarded.from_row(with_app.row()) == FORWARDED


# -------------------------------------------------------------------- metered counters


def test_a_counter_survives_the_database_and_an_upsert_replaces_it(
    db: sqlite3.Connection,
) -> None:
    state = CounterState("dicom-hq", "scans", 7, NOW - 3600)
    assert counter_row(state) == ("dicom-hq", "scans", 7, NOW - 3600)
    db.execute(UPSERT_COUNTER, counter_row(state))
    db.execute(UPSERT_COUNTER, counter_row(CounterState("dicom-hq", "pages", 1, 0.0)))
    db.execute(UPSERT_COUNTER, counter_row(CounterState("dicom-hq", "scans", 8, NOW)))
    back = sorted(map(row_counter, db.execute(SELECT_COUNTERS)), key=lambda s: s.name)
    assert back == [
        CounterState("dicom-hq", "pages", 1, 0.0),
        CounterState("dicom-hq", "scans", 8, NOW),
    ]


# ------------------------------------------------------------- site router: wall mark


def test_the_wall_mark_only_grows(db: sqlite3.Connection) -> None:
    assert db.execute(SELECT_WALL_MARK).fetchall() == []  # none yet
    for wall in (NOW, NOW + 60, NOW - 3600):  # the last: a clock set back
        db.execute(UPSERT_WALL_MARK, (wall,))
    assert db.execute(SELECT_WALL_MARK).fetchall() == [(NOW + 60,)]
