"""Who a rule matches: the `allow`, `deny`, `reserve` and `max` vocabulary.

A rule is `user:NAME`, `host:PATTERN` (shell-style wildcards), `hostid:ID`,
`ip:NETWORK` (an address or CIDR) or `group:NAME` (a named list of rules from the
config's [groups]; groups do not nest). `Who` is the holder plus the address it
connected from. Pure: no I/O, nothing remembered between calls.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from licd_client.messages import Holder

KINDS = ("user", "host", "hostid", "ip", "group")


@dataclass(frozen=True)
class Who:
    holder: Holder
    ip: str | None


def check_rule(rule: str, *, groups: Iterable[str] = (), in_group: bool = False) -> str | None:
    """What is wrong with `rule` (None when it is well formed)."""
    kind, sep, value = rule.partition(":")
    if not sep or kind not in KINDS or not value:
        return f"{rule!r}: a rule is one of {', '.join(k + ':…' for k in KINDS)}"
    if kind == "ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{rule!r}: not an IP address or network"
    if kind == "group":
        if in_group:
            return f"{rule!r}: groups do not nest"
        if value not in set(groups):
            return f"{rule!r}: no such group in [groups]"
    return None


def matches(rule: str, who: Who, groups: Mapping[str, tuple[str, ...]]) -> bool:
    kind, _, value = rule.partition(":")
    h = who.holder
    if kind == "user":
        return h.user == value
    if kind == "host":
        return fnmatch.fnmatchcase(h.host.lower(), value.lower())
    if kind == "hostid":
        return h.hostid == value
    if kind == "ip":
        if who.ip is None:
            return False
        try:
            return ipaddress.ip_address(who.ip) in ipaddress.ip_network(value, strict=False)
        except ValueError:
            return False
    if kind == "group":
        return any(matches(r, who, {}) for r in groups.get(value, ()))
    return False


def first_match(
    rules: Iterable[str], who: Who, groups: Mapping[str, tuple[str, ...]]
) -> str | None:
    return next((r for r in rules if matches(r, who, groups)), None)
