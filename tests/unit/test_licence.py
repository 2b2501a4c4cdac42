"""The rules about licences as such: one key, one licence, and what an edit changes
(and how the audit log shows it)."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

from licd.core.service import _changes
from licd.engine.licence import Addon, Counter, KeyClash, Licence, key_clash, licence_changes
from tests.support import DICOM

OTHER = replace(DICOM, key="OTHER-KEY", id="other")


def by_key(*licences: Licence) -> dict[str, Licence]:
    return {x.key: x for x in licences}


def test_a_licence_may_keep_its_own_key_or_take_a_free_one() -> None:
    in_force = by_key(DICOM, OTHER)
    assert key_clash(in_force, [replace(DICOM, seats=9)]) is None
    assert key_clash(in_force, [replace(DICOM, key="FREE")]) is None
    assert key_clash(in_force, [replace(DICOM, id="new", key="FREE")]) is None
    assert key_clash({}, [DICOM, OTHER]) is None


def test_a_key_another_licence_keeps_is_a_clash_naming_both() -> None:
    taker = replace(OTHER, key=DICOM.key)
    assert key_clash(by_key(DICOM, OTHER), [taker]) == KeyClash(taker, DICOM)
    newcomer = replace(DICOM, id="renamed")
    assert key_clash(by_key(DICOM), [OTHER, newcomer]) == KeyClash(newcomer, DICOM)


def test_a_key_is_free_once_its_licence_is_given_another() -> None:
    # The incoming licences replace those of their ids: swapping two keys is allowed.
    swapped = [replace(DICOM, key=OTHER.key), replace(OTHER, key=DICOM.key)]
    assert key_clash(by_key(DICOM, OTHER), swapped) is None


def differs_in_every_field(licence: Licence) -> Licence:
    """A licence each of whose fields differs from `licence`'s."""
    other: dict[str, Any] = {
        "key": "K2",
        "id": "id2",
        "product": "p2",
        "seats": licence.seats + 1,
        "lease_ttl": licence.lease_ttl + 1,
        "grace": licence.grace + 1,
        "not_before": 1.0,
        "expires": 2.0,
        "features": {"new": "on"},
        "max_ttl": 3.0,
        "delegable": not licence.delegable,
        "count_by": "host",
        "leases_per_unit": licence.leases_per_unit + 1,
        "device_period": 4.0,
        "overdraft": licence.overdraft + 1,
        "allow": ("user:bob",),
        "deny": ("host:ws-9",),
        "reserve": {"cad": 1},
        "max": {"user": 1},
        "counter": (Counter("scans", 10),),
        "addon": (Addon(seats=2),),
        "borrow_after": 5.0,
        "borrow_max": 3,
        "borrow_allow": ("user:carol",),
        "queue_max": licence.queue_max + 1,
        "queue_priority": {"cad": 5},
        "idle_timeout": 600.0,
        "idle_reclaim": "always",
        "idle_threshold": 0.5,
        "linger": 60.0,
    }
    return replace(licence, **other)


def test_an_edit_of_any_field_is_a_change() -> None:
    new = differs_in_every_field(DICOM)
    changes = licence_changes(DICOM, new)
    # Every field of Licence, one added tomorrow too: `differs_in_every_field` then
    # fails to build a licence, or leaves the new field out of the changes.
    assert set(changes) == {f.name for f in fields(Licence)}
    assert changes["seats"] == (DICOM.seats, new.seats)
    assert changes["max"] == ({}, {"user": 1})
    assert licence_changes(DICOM, replace(DICOM)) == {}


def test_a_policy_only_edit_is_audited_with_its_changes() -> None:
    # The bug this guards: only seven fields were compared, so this was `changes: {}`.
    new = replace(DICOM, max={"user": 1}, reserve={"cad": 2}, overdraft=1, count_by="host")
    assert _changes(DICOM, new) == {
        "max": [{}, {"user": 1}],
        "reserve": [{}, {"cad": 2}],
        "overdraft": [0, 1],
        "count_by": ["lease", "host"],
    }


def test_the_audit_shows_every_change_as_config_keys_and_never_the_key() -> None:
    new = differs_in_every_field(DICOM)
    changes = _changes(DICOM, new)
    assert set(changes) == {f.name for f in fields(Licence)}
    assert changes["key"] == "changed"
    assert DICOM.key not in repr(changes) and new.key not in repr(changes)
    assert changes["counter"] == [
        [],
        [{"name": "scans", "limit": 10, "reset": "never", "dedup_window": 3.0}],
    ]
    assert changes["allow"] == [[], ["user:bob"]]
    json.dumps(changes)  # plain JSON values, as the audit log stores them
    assert _changes(None, DICOM) == {}  # an added licence: nothing changed
