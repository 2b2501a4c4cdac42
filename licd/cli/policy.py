"""The licence-policy options of `licd licence add` and `licd licence update`.

Each option sets one policy key of docs/policies.md by its config-file name; the daemon
validates the result exactly as it validates the config file (and its error names the
key). This module only turns command-line text into those keys; it decides nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from licd.cli.format import parse_time
from licd.config.settings import parse_duration
from licd.engine.licence import COUNT_BY, IDLE_RECLAIM

F = TypeVar("F", bound=Callable[..., Any])

CLEAR = "none"


def _pairs(
    what: str, example: str, value: str = "SEATS"
) -> Callable[[click.Context, click.Parameter, Any], dict[str, int] | None]:
    """NAME=NUMBER options (a negative NUMBER only when `value` is not SEATS)."""

    def parse(ctx: click.Context, param: click.Parameter, values: Any) -> dict[str, int] | None:
        if not values:
            return None
        out: dict[str, int] = {}
        for text in values:
            name, sep, number = str(text).partition("=")
            digits = number[1:] if value != "SEATS" and number.startswith("-") else number
            if not sep or not digits.isdigit():
                raise click.BadParameter(f"{text!r}: write {what}={value}, e.g. {example}")
            out[name] = int(number)
        return out

    return parse


def _duration_or_clear(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None or value == CLEAR:
        return value
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _counters(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
    if not values:
        return None
    out = []
    for text in values:
        parts = str(text).split(":")
        if len(parts) < 2 or len(parts) > 4 or not parts[1].isdigit():
            raise click.BadParameter(f"{text!r}: write NAME:LIMIT[:RESET[:DEDUP_WINDOW]]")
        counter: dict[str, Any] = {"name": parts[0], "limit": int(parts[1])}
        if len(parts) > 2:
            counter["reset"] = parts[2]
        if len(parts) > 3:
            try:
                counter["dedup_window"] = parse_duration(parts[3], what="dedup window")
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        out.append(counter)
    return out


def _addons(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
    if not values:
        return None
    out = []
    for text in values:
        try:
            addon = json.loads(text)
            if not isinstance(addon, dict):
                raise ValueError("an add-on is a JSON object")
            for name in ("starts", "ends"):
                if isinstance(addon.get(name), str):
                    addon[name] = parse_time(addon[name])
        except ValueError as exc:
            raise click.BadParameter(
                f'{exc}; e.g. \'{{"seats": 5, "features": {{"render": "on"}}, '
                '"starts": "2026-12-01T00:00:00Z", "ends": "2026-12-24T00:00:00Z"}\''
            ) from None
        out.append(addon)
    return out


_OPTIONS = [
    click.option("--count-by", type=click.Choice(COUNT_BY), help="What shares a seat."),
    click.option(
        "--device-period",
        callback=_duration_or_clear,
        metavar="DURATION|none",
        help="Device leases: a seat stays with a machine this long.",
    ),
    click.option(
        "--max-ttl",
        callback=_duration_or_clear,
        metavar="DURATION|none",
        help="The longest lease a client may ask for.",
    ),
    click.option("--overdraft", type=click.IntRange(min=0), help="Seats beyond the limit."),
    click.option(
        "--borrow-after",
        callback=_duration_or_clear,
        metavar="DURATION|none",
        help="A lease longer than this is a borrow.",
    ),
    click.option(
        "--borrow-max", type=click.IntRange(min=0), help="Seats that may be borrowed at once."
    ),
    click.option(
        "--borrow-allow", multiple=True, metavar="RULE", help="Who may borrow (replaces the list)."
    ),
    click.option(
        "--queue-max", type=click.IntRange(min=0), help="Checkouts that may wait (0: no queue)."
    ),
    click.option(
        "--queue-priority",
        multiple=True,
        metavar="GROUP=N",
        callback=_pairs("GROUP", "cad=10", "PRIORITY"),
        help="A group's class in the queue, higher first (replaces the table).",
    ),
    click.option(
        "--idle-timeout",
        callback=_duration_or_clear,
        metavar="DURATION|none",
        help="A lease idle this long may be reclaimed.",
    ),
    click.option(
        "--idle-reclaim", type=click.Choice(IDLE_RECLAIM), help="When idle leases are reclaimed."
    ),
    click.option(
        "--idle-threshold",
        type=click.FloatRange(0.0, 1.0),
        help="when_needed: the share of seats in use from which idle leases are reclaimed.",
    ),
    click.option(
        "--linger",
        callback=_duration_or_clear,
        metavar="DURATION|none",
        help="A checked-in seat stays its holder's this long.",
    ),
    click.option("--delegable/--not-delegable", default=None, help="May routers take blocks?"),
    click.option("--allow", multiple=True, metavar="RULE", help="Allow rule (replaces the list)."),
    click.option("--deny", multiple=True, metavar="RULE", help="Deny rule (replaces the list)."),
    click.option("--clear-rules", is_flag=True, help="Empty the allow and deny lists first."),
    click.option(
        "--reserve",
        multiple=True,
        metavar="GROUP=SEATS",
        callback=_pairs("GROUP", "cad=3"),
        help="Seats kept for a group (replaces the table).",
    ),
    click.option(
        "--max",
        "max_",
        multiple=True,
        metavar="KEY=SEATS",
        callback=_pairs("user|host|group:NAME", "user=1"),
        help="A cap per user, host or group (replaces the table).",
    ),
    click.option(
        "--counter",
        multiple=True,
        metavar="NAME:LIMIT[:RESET[:WINDOW]]",
        callback=_counters,
        help="A metered counter (replaces the list).",
    ),
    click.option(
        "--addon",
        multiple=True,
        metavar="JSON",
        callback=_addons,
        help="A scheduled add-on, as JSON (replaces the list).",
    ),
]


def policy_options(command: F) -> F:
    """Add every policy option to a click command."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def policy_changes(opts: dict[str, Any]) -> dict[str, Any]:
    """The policy keys the options set, by their config-file names (None clears)."""
    out: dict[str, Any] = {}
    for opt in ("count_by", "overdraft", "queue_max", "idle_reclaim", "idle_threshold"):
        if opts[opt] is not None:
            out[opt] = opts[opt]
    if opts["borrow_max"] is not None:
        out["borrow_max"] = opts["borrow_max"]
    if opts["borrow_allow"]:
        out["borrow_allow"] = list(opts["borrow_allow"])
    for opt in ("device_period", "max_ttl", "borrow_after", "idle_timeout", "linger"):
        if opts[opt] is not None:
            out[opt] = None if opts[opt] == CLEAR else opts[opt]
    if opts["delegable"] is not None:
        out["delegable"] = opts["delegable"]
    if opts["clear_rules"]:
        out["allow"], out["deny"] = [], []
    for name in ("allow", "deny"):
        if opts[name]:
            out[name] = list(opts[name])
    for opt, key in (
        ("reserve", "reserve"),
        ("max_", "max"),
        ("counter", "counter"),
        ("queue_priority", "queue_priority"),
    ):
        if opts[opt] is not None:
            out[key] = opts[opt]
    if opts["addon"] is not None:
        out["addon"] = opts["addon"]
    return out
