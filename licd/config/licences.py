"""The config file's licences: [[licence]] tables (local or relayed) and [groups].

Turns each [[licence]] table into an engine `Licence` (with its policies: counting
unit, device leases, overdraft, access lists, reservations, caps, counters, add-ons)
or a `RelayedLicence` (a site router's), and back into config keys for the admin
interface. Errors name the file and the key path, like the rest of `config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from licd.config.tomlreader import MISSING, Table
from licd.engine import Licence
from licd.engine.licence import (
    COUNT_BY,
    IDLE_RECLAIM,
    LEASES_PER_UNIT,
    QUEUE_MAX,
    RESETS,
    Addon,
    Counter,
)
from licd.engine.policy import check_rule
from licd_client.messages import Features

MAX_KEY_LEN = 255
MAX_LICENCE_SEATS = 1_000_000  # seats (and overdraft, reserves, caps) of one licence
MAX_LEASES_PER_UNIT = 10_000  # leases sharing one seat under count_by
MAX_QUEUE = 10_000  # checkouts waiting in one licence's queue
MAX_COUNTER_LIMIT = 2**62  # room for a consume's units on top, within SQLite's integers
MAX_PRODUCT_LEN = 255
#: Features travel in every checkout reply and, again, inside its token, so they are kept
#: well below the 16 KiB frame: a count (the wire's map limit) and a text budget.
MAX_FEATURES = 32
MAX_FEATURE_NAME_LEN = 64
MAX_FEATURES_TEXT = 2048  # UTF-8 bytes of names and string values together

_LICENCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class RelayedLicence:
    """A [[licence]] with a `mode`: served through the upstream, not from local seats."""

    key: str  # presented by local clients, and by the router upstream
    id: str
    mode: str  # "forward" | "block"
    block_seats: int | None = None  # block mode: seats asked for
    block_ttl: float = 7 * 86400.0  # block mode: asked for; upstream may grant less
    renew_every: float = 86400.0  # block mode
    lease_ttl: float = 90.0  # block mode: local sub-leases
    grace: float = 15.0


def licence_from_mapping(
    data: dict[str, Any], where: str, groups: Mapping[str, tuple[str, ...]]
) -> Licence:
    """One licence from a mapping of config-file keys (the admin interface's `licence
    add`/`update`), validated exactly as a [[licence]] table; errors name `where`."""
    return _licence(Table(data, "licence", where, _LICENCE_KEYS), groups)


def licence_to_mapping(licence: Licence) -> dict[str, Any]:
    """A licence as config-file keys (times as epoch floats): what `licence_from_mapping`
    reads back, after converting the times."""
    out = dataclasses.asdict(licence)
    out["reserve"] = dict(licence.reserve)
    out["max"] = dict(licence.max)
    out["allow"], out["deny"] = list(licence.allow), list(licence.deny)
    out["borrow_allow"] = list(licence.borrow_allow)
    out["queue_priority"] = dict(licence.queue_priority)
    out["counter"] = [dataclasses.asdict(c) for c in licence.counter]
    out["addon"] = [dataclasses.asdict(a) for a in licence.addon]
    return out


# --- [[licence]] ----------------------------------------------------------------------

_LICENCE_KEYS = tuple(f.name for f in fields(Licence))


_RELAYED_KEYS = tuple(f.name for f in fields(RelayedLicence))


def parse_groups(top: Table) -> dict[str, tuple[str, ...]]:
    t = top.table("groups", top.get("groups", {}))
    out: dict[str, tuple[str, ...]] = {}
    for name, rules in t.data.items():
        if not _LICENCE_ID.fullmatch(name):
            raise t.error(name, "a group name is 1 to 64 of A-Z, a-z, 0-9, '.', '_' or '-'")
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise t.error(name, 'must be an array of rules, e.g. ["user:alice", "ip:10.0.0.0/8"]')
        for i, rule in enumerate(rules):
            problem = check_rule(rule, in_group=True)
            if problem:
                raise t.error(name, problem, i)
        out[name] = tuple(rules)
    return out


def parse_licences(
    top: Table, groups: Mapping[str, tuple[str, ...]]
) -> tuple[tuple[Licence, ...], tuple[RelayedLicence, ...]]:
    value = top.get("licence", [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise top.error("licence", "must be an array of tables: write each one as [[licence]]")
    licences: list[Licence] = []
    relayed: list[RelayedLicence] = []
    by_id: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for i, item in enumerate(value):
        where = f"licence[{i}]"
        parsed: Licence | RelayedLicence
        if "mode" in item:
            parsed = _relayed(Table(item, where, top.source, _RELAYED_KEYS))
            relayed.append(parsed)
        else:
            parsed = _licence(Table(item, where, top.source, _LICENCE_KEYS), groups)
            licences.append(parsed)
        t = Table(item, where, top.source, item)
        if parsed.id in by_id:
            raise t.error("id", f"duplicate: licence[{by_id[parsed.id]}] has the same id")
        if parsed.key in by_key:  # the key is a secret: never echo it
            raise t.error("key", f"duplicate: licence[{by_key[parsed.key]}] has the same key")
        by_id[parsed.id] = by_key[parsed.key] = i
    return tuple(licences), tuple(relayed)


def _key_and_id(t: Table) -> tuple[str, str]:
    key = t.text("key", MISSING, MAX_KEY_LEN)
    if key != key.strip():
        raise t.error("key", "must not start or end with white space")
    licence_id = t.get("id")
    if not isinstance(licence_id, str) or not _LICENCE_ID.fullmatch(licence_id):
        raise t.error("id", "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    return key, licence_id


def _relayed(t: Table) -> RelayedLicence:
    key, licence_id = _key_and_id(t)
    mode = t.get("mode")
    if mode not in ("forward", "block"):
        raise t.error("mode", 'must be "forward" or "block" (absent: a local licence)')
    d = RelayedLicence(key, licence_id, mode)
    if mode == "forward":
        for name in ("block_seats", "block_ttl", "renew_every", "lease_ttl", "grace"):
            if name in t.data:
                raise t.error(name, 'applies to mode = "block" only')
        return d
    block_ttl = t.duration("block_ttl", d.block_ttl, minimum=1.0)
    renew_every = t.duration("renew_every", d.renew_every, minimum=1.0)
    if renew_every >= block_ttl:
        raise t.error("renew_every", "must be shorter than block_ttl, to renew before expiry")
    return RelayedLicence(
        key,
        licence_id,
        mode,
        block_seats=t.integer("block_seats", MISSING, 1, MAX_LICENCE_SEATS),
        block_ttl=block_ttl,
        renew_every=renew_every,
        lease_ttl=t.duration("lease_ttl", d.lease_ttl, minimum=1.0),
        grace=t.duration("grace", d.grace, allow_zero=True),
    )


def _licence(t: Table, groups: Mapping[str, tuple[str, ...]]) -> Licence:
    key, licence_id = _key_and_id(t)
    not_before = t.timestamp("not_before")
    expires = t.timestamp("expires")
    if not_before is not None and expires is not None and expires <= not_before:
        raise t.error("expires", "must be after not_before")
    return Licence(
        key=key,
        id=licence_id,
        product=t.text("product", MISSING, MAX_PRODUCT_LEN),
        seats=t.integer("seats", MISSING, 1, MAX_LICENCE_SEATS),
        lease_ttl=t.duration("lease_ttl", 90.0, minimum=1.0),
        grace=t.duration("grace", 15.0, allow_zero=True),
        not_before=not_before,
        expires=expires,
        features=_features(t),
        max_ttl=_max_ttl(t),
        delegable=t.flag("delegable", False),
        **_policies(t, groups),
    )


def _max_ttl(t: Table) -> float | None:
    if "max_ttl" not in t.data:
        return None
    max_ttl = t.duration("max_ttl", MISSING, minimum=1.0)
    if max_ttl < t.duration("lease_ttl", 90.0, minimum=1.0):
        raise t.error("max_ttl", "must not be shorter than lease_ttl")
    return max_ttl


def _features(t: Table) -> Features:
    value = t.get("features", {})
    if not isinstance(value, dict):
        raise t.error("features", "must be a table of name = value")
    if len(value) > MAX_FEATURES:
        raise t.error("features", f"at most {MAX_FEATURES} features")
    f = Table(value, t.key("features"), t.source, value)
    text_bytes = 0
    for name, item in value.items():
        if not name or len(name) > MAX_FEATURE_NAME_LEN or not name.isprintable():
            raise f.error(name, f"feature names must be 1 to {MAX_FEATURE_NAME_LEN} characters")
        text_bytes += len(name.encode())
        if isinstance(item, str):
            text_bytes += len(item.encode())
        elif isinstance(item, float) and not math.isfinite(item):
            raise f.error(name, "must be a finite number")
        elif not isinstance(item, bool | int | float):
            raise f.error(name, "must be a string, integer, boolean or float")
    if text_bytes > MAX_FEATURES_TEXT:
        raise t.error(
            "features",
            f"too large: {text_bytes} bytes of names and strings, at most {MAX_FEATURES_TEXT}",
        )
    return dict(value)


# --- licence policies (docs/policies.md) ----------------------------------------------

_COUNTER_KEYS = tuple(f.name for f in fields(Counter))
_ADDON_KEYS = tuple(f.name for f in fields(Addon))


def _policies(t: Table, groups: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    count_by = t.get("count_by", "lease")
    if count_by not in COUNT_BY:
        raise t.error("count_by", f"must be one of {', '.join(COUNT_BY)}")
    device_period = None
    if "device_period" in t.data:
        device_period = t.duration("device_period", MISSING, minimum=1.0)
    out: dict[str, Any] = {
        "count_by": count_by,
        "leases_per_unit": t.integer("leases_per_unit", LEASES_PER_UNIT, 1, MAX_LEASES_PER_UNIT),
        "device_period": device_period,
        "overdraft": t.integer("overdraft", 0, 0, MAX_LICENCE_SEATS),
        "allow": _rules(t, "allow", groups),
        "deny": _rules(t, "deny", groups),
        "reserve": _seat_map(t, "reserve", groups, lambda k: k in groups, "a group in [groups]"),
        "max": _seat_map(
            t,
            "max",
            groups,
            lambda k: k in ("user", "host") or (k.startswith("group:") and k[6:] in groups),
            '"user", "host" or "group:NAME" of a group in [groups]',
        ),
        "counter": _counters(t),
        "addon": _addons(t),
        **_borrowing(t, groups),
        **_queueing(t, groups),
        **_idling(t),
    }
    return out


#: The priority classes a licence's `queue_priority` may give.
PRIORITY_RANGE = (-1000, 1000)


def _queueing(t: Table, groups: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """queue_max, queue_priority (docs/policies.md, "Queueing")."""
    value = t.get("queue_priority", {})
    if not isinstance(value, dict):
        raise t.error("queue_priority", "must be a table of group = priority")
    sub = Table(value, t.key("queue_priority"), t.source, value)
    priority: dict[str, int] = {}
    for group in value:
        if group not in groups:
            raise sub.error(group, "must name a group in [groups]")
        priority[group] = sub.integer(group, MISSING, *PRIORITY_RANGE)
    return {
        "queue_max": t.integer("queue_max", QUEUE_MAX, 0, MAX_QUEUE),
        "queue_priority": priority,
    }


def _idling(t: Table) -> dict[str, Any]:
    """idle_timeout, idle_reclaim, idle_threshold, linger (docs/policies.md)."""
    timeout = None
    if "idle_timeout" in t.data:
        timeout = t.duration("idle_timeout", MISSING, minimum=1.0)
    reclaim = t.get("idle_reclaim", "when_needed")
    if reclaim not in IDLE_RECLAIM:
        raise t.error("idle_reclaim", f"must be one of {', '.join(IDLE_RECLAIM)}")
    threshold = t.get("idle_threshold", 1.0)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise t.error("idle_threshold", "must be a number from 0 to 1 (a share of the seats)")
    if not 0.0 <= threshold <= 1.0:
        raise t.error("idle_threshold", "must be from 0 to 1 (a share of the seats)")
    if timeout is None:
        for name, value, default in (
            ("idle_reclaim", reclaim, "when_needed"),
            ("idle_threshold", threshold, 1.0),
        ):
            if value != default:
                raise t.error(name, "needs idle_timeout: when a lease counts as idle")
    linger = t.duration("linger", MISSING, minimum=1.0) if "linger" in t.data else None
    return {
        "idle_timeout": timeout,
        "idle_reclaim": reclaim,
        "idle_threshold": float(threshold),
        "linger": linger,
    }


def _borrowing(t: Table, groups: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """borrow_after, borrow_max, borrow_allow (docs/policies.md, "Borrowing")."""
    after = None
    if "borrow_after" in t.data:
        after = t.duration("borrow_after", MISSING, minimum=1.0)
        longest = max(t.duration("lease_ttl", 90.0, minimum=1.0), _max_ttl(t) or 0.0)
        if after >= longest:
            raise t.error(
                "borrow_after",
                "must be shorter than max_ttl: no lease could be longer, so none a borrow",
            )
    limit = t.integer("borrow_max", None, 0, MAX_LICENCE_SEATS) if "borrow_max" in t.data else None
    allow = _rules(t, "borrow_allow", groups)
    if after is None and (limit is not None or allow):
        name = "borrow_max" if limit is not None else "borrow_allow"
        raise t.error(name, "needs borrow_after: which leases are borrows")
    return {"borrow_after": after, "borrow_max": limit, "borrow_allow": allow}


def _rules(t: Table, name: str, groups: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    value = t.get(name, [])
    if not isinstance(value, list | tuple) or not all(isinstance(r, str) for r in value):
        raise t.error(name, 'must be an array of rules, e.g. ["group:cad", "host:lab-*"]')
    for i, rule in enumerate(value):
        problem = check_rule(rule, groups=groups)
        if problem:
            raise t.error(name, problem, i)
    return tuple(value)


def _seat_map(
    t: Table,
    name: str,
    groups: Mapping[str, tuple[str, ...]],
    valid: Callable[[str], bool],
    what: str,
) -> dict[str, int]:
    value = t.get(name, {})
    if not isinstance(value, dict):
        raise t.error(name, "must be a table of name = seats")
    sub = Table(value, t.key(name), t.source, value)
    out: dict[str, int] = {}
    for key in value:
        if not valid(key):
            raise sub.error(key, f"must name {what}")
        out[key] = sub.integer(key, MISSING, 0, MAX_LICENCE_SEATS)
    return out


def _counters(t: Table) -> tuple[Counter, ...]:
    value = t.get("counter", [])
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise t.error("counter", "must be an array of tables: write each as [[licence.counter]]")
    out: list[Counter] = []
    for i, item in enumerate(value):
        c = Table(item, f"{t.key('counter')}[{i}]", t.source, _COUNTER_KEYS)
        name = c.get("name")
        if not isinstance(name, str) or not _LICENCE_ID.fullmatch(name):
            raise c.error("name", "must be 1 to 64 of A-Z, a-z, 0-9, '.', '_' or '-'")
        if any(x.name == name for x in out):
            raise c.error("name", "duplicate counter name")
        reset = c.get("reset", "never")
        if reset not in RESETS:
            raise c.error("reset", f"must be one of {', '.join(RESETS)}")
        out.append(
            Counter(
                name=name,
                limit=c.integer("limit", MISSING, 1, MAX_COUNTER_LIMIT),
                reset=reset,
                dedup_window=c.duration("dedup_window", 3.0, allow_zero=True),
            )
        )
    return tuple(out)


def _addons(t: Table) -> tuple[Addon, ...]:
    value = t.get("addon", [])
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise t.error("addon", "must be an array of tables: write each as [[licence.addon]]")
    out: list[Addon] = []
    for i, item in enumerate(value):
        a = Table(item, f"{t.key('addon')}[{i}]", t.source, _ADDON_KEYS)
        starts, ends = a.timestamp("starts"), a.timestamp("ends")
        if starts is not None and ends is not None and ends <= starts:
            raise a.error("ends", "must be after starts")
        seats = a.integer("seats", 0, 0, MAX_LICENCE_SEATS)
        features = _features(a)
        if not seats and not features:
            raise a.error("seats", "an add-on gives seats, features or both")
        out.append(Addon(seats=seats, features=features, starts=starts, ends=ends))
    return tuple(out)
