"""Rendering and reading values for the `licd` admin commands: tables, times, CSV, JSON.

People get aligned tables, UTC times as `YYYY-MM-DD HH:MM:SS` with a Z and durations
like `1h 02m`; scripts get the daemon's values unchanged as JSON. Every value shown to a
person or written to CSV passes licd_client.safetext here (a client chose many of them),
so none can carry a control character or start a spreadsheet formula. Also the few
parsers the commands share (ISO times, `name=value` features). No sockets and no click.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from licd.config.settings import parse_duration
from licd_client.safetext import csv_cell, escape, one_line, quoted

NONE = "-"
AUDIT_COLUMNS = (
    "id",
    "time",
    "event",
    "licence",
    "handle",
    "host",
    "hostid",
    "user",
    "ip",
    "seats",
    "reason",
    "admin_uid",
    "detail",
)
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")

# ------------------------------------------------------------------------ values


def when(epoch: float | None) -> str:
    """An epoch time for people: `2026-09-21 12:00:00Z` (UTC), `-` for none."""
    if epoch is None:
        return NONE
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def iso(epoch: float | None) -> str:
    """An epoch time for files: ISO 8601 in UTC with milliseconds, empty for none."""
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def duration(seconds: float | None) -> str:
    """`45s`, `5m 03s`, `1h 02m`, `3d 04h`, `12d`; `-` for none."""
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    days = s // 86400
    return f"{days}d" if days >= 10 else f"{days}d {s % 86400 // 3600:02d}h"


def days_left(days: float | None) -> str:
    """A licence's time to expiry (the daemon gives days): `12d`, `5h 03m`, `expired`."""
    if days is None:
        return NONE
    return "expired" if days <= 0 else duration(days * 86400)


def features(values: Mapping[str, Any]) -> str:
    """`modules=core,ocr tier=pro`, `-` for none."""
    if not values:
        return NONE
    return " ".join(f"{k}={_text(v)}" for k, v in sorted(values.items()))


def _text(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _scalar(value: Any) -> str:
    """A value as a person sees it in a table or a line: its control characters escaped."""
    return escape(_text(value))


def as_json(value: Any) -> str:
    """The daemon's values unchanged, keys sorted: what scripts read."""
    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------------ tables


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An aligned table with a header row; number columns right-aligned, None as `-`."""
    raw = [list(row) for row in rows]
    numeric = [
        any(row[i] is not None for row in raw)
        and all(_is_number(row[i]) or row[i] is None for row in raw)
        for i in range(len(headers))
    ]
    cells = [[_scalar(v) for v in row] for row in raw]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(row, widths, numeric, strict=True)
        ]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`name   value` lines, the names padded to one width."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {_scalar(value)}" for name, value in pairs)


# ---------------------------------------------------------------------- commands


def status_text(result: Mapping[str, Any], socket: str | None = None) -> str:
    """`licd status`: the admin socket asked (`socket`, when given), the daemon's own
    state, then a table of licences."""
    asked = [] if socket is None else [("socket", socket)]
    daemon = fields(
        asked
        + [
            ("daemon", f"licd {result['version']}"),
            ("site", result["site"]),
            ("uptime", duration(result["uptime"])),
            ("listen", ", ".join(result["listen"]) or NONE),
            ("key", result["key"]),
            ("connections", result["connections"]),
        ]
    )
    rows = [
        (x["id"], x["product"], f"{x['in_use']}/{x['seats']}", x["available"])
        + (when(x["expires"]), days_left(x["days_left"]), x.get("mode", "local"))
        for x in result["licences"]
    ]
    head = ("LICENCE", "PRODUCT", "IN USE", "AVAILABLE", "EXPIRES", "DAYS LEFT", "MODE")
    parts = [daemon, table(head, rows) if rows else "(no licences)"]
    counters = [
        (x["id"], c["name"], f"{c['used']}/{c['limit']}", c["remaining"], c["reset"])
        for x in result["licences"]
        for c in x.get("counters", ())
    ]
    if counters:
        parts.append(table(("LICENCE", "COUNTER", "USED", "REMAINING", "RESET"), counters))
    upstream = result.get("upstream")
    if upstream:
        parts.append(
            fields(
                [
                    ("upstream", ", ".join(upstream["servers"])),
                    *link_fields(upstream["link"]),
                    ("forwarded", upstream["forwarded"]),
                ]
            )
        )
        blocks = [
            (b["licence"], b["seats"] if b["seats"] is not None else NONE)
            + (when(b["expires"]), when(b["last_renewal"]), when(b["next_renewal"]))
            + ("revoked" if b["revoked"] else "valid" if b["valid"] else "none",)
            + (b["last_error"] or NONE,)
            for b in upstream["blocks"]
        ]
        if blocks:
            block_head = ("BLOCK", "SEATS", "EXPIRES", "RENEWED", "NEXT", "STATE", "ERROR")
            parts.append(table(block_head, blocks))
    return "\n\n".join(parts)


def link_fields(link: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A router's upstream link for people: its state since a time (the router's start
    while it has not connected yet), the next attempt while it is down, and the last
    error with its time, `(recovered at T)` once the link is back up after it."""
    state = link["state"]
    if state == "connected":
        shown = f"connected since {when(link['since'])}"
    elif state == "connecting":
        shown = f"connecting since {when(link['since'])} (not yet connected)"
    else:
        shown = f"NOT connected since {when(link['since'])}"
        if link["next_attempt"] is not None:
            shown += f", next attempt {when(link['next_attempt'])}"
    error = NONE
    if link["last_error"] is not None:
        error = f"{when(link['last_error_at'])}  {link['last_error']}"
        if link["recovered_at"] is not None:
            error += f" (recovered at {when(link['recovered_at'])})"
    return [("link", shown), ("last error", error)]


def leases_text(leases: Sequence[Mapping[str, Any]]) -> str:
    if not leases:
        return "(no leases)"
    head = ("HANDLE", "LICENCE", "HOST", "HOSTID", "USER", "PID", "SEATS", "SINCE", "EXPIRES")
    rows = [
        (x["handle"], x["licence"], x["host"], x["hostid"], x["user"], x["pid"], x["seats"])
        + (when(x["since"]), when(x["expires"]), when(x["last_heartbeat"]), x["ip"])
        for x in leases
    ]
    return table((*head, "LAST HEARTBEAT", "IP"), rows)


def licences_text(licences: Sequence[Mapping[str, Any]], show_keys: bool) -> str:
    if not licences:
        return "(no licences)"
    head = ("ID", "PRODUCT", "SEATS", "IN USE", "TTL", "GRACE", "NOT BEFORE", "EXPIRES")
    rows = [
        (x["id"], x["product"], x["seats"], x["in_use"])
        + (duration(x["lease_ttl"]), duration(x["grace"]), when(x["not_before"]))
        + (when(x["expires"]), features(x["features"]))
        + ((x["key"],) if show_keys else ())
        for x in licences
    ]
    return table((*head, "FEATURES", *(("KEY",) if show_keys else ())), rows)


def revoked_text(handles: Sequence[str]) -> str:
    """`revoked 2 lease(s): h1, h2`, or that nothing matched."""
    if not handles:
        return "nothing revoked: no live lease matched"
    return f"revoked {len(handles)} lease(s): {', '.join(map(escape, handles))}"


def licence_text(licence: str, outcome: str) -> str:
    """`licence ID: OUTCOME`, what a licence edit or a reload did to one licence."""
    return f"licence {escape(licence)}: {escape(outcome)}"


def reload_text(result: Mapping[str, Any]) -> str:
    outcomes = result["licences"]
    lines = [licence_text(name, outcome) for name, outcome in sorted(outcomes.items())]
    for path, outcome in sorted(result.get("entitlements", {}).items()):
        lines.append(f"entitlement file {escape(path)}: {escape(outcome)}")
    if result["restart_needed"]:
        needed = ", ".join(map(escape, result["restart_needed"]))
        lines.append(f"needs a restart to apply: {needed}")
    return "\n".join(lines) or "reloaded: the file declares no licences"


# ------------------------------------------------------------------------- audit


def audit_csv_header() -> str:
    return csv_line(AUDIT_COLUMNS)


def audit_csv(entry: Mapping[str, Any]) -> str:
    """One audit entry as a CSV line: ISO times, the detail as compact JSON (every cell
    neutralised by `csv_line`)."""
    values = []
    for name in AUDIT_COLUMNS:
        value = entry.get(name)
        if name == "time":
            values.append(iso(value))
        elif name == "detail":
            values.append(json.dumps(value, sort_keys=True) if value else "")
        else:
            values.append("" if value is None else str(value))
    return csv_line(values)


def csv_line(values: Sequence[Any]) -> str:
    """One CSV row with no line terminator; every cell escaped, and one that would start
    a spreadsheet formula (`=`, `+`, `-`, `@`) prefixed with `'` (safetext.csv_cell)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([csv_cell(v) for v in values])
    return buf.getvalue()


AUDIT_HEADER = (
    f"{'ID':>6}  {'TIME (UTC)':<20}  {'EVENT':<15}  {'LICENCE':<14}  {'HANDLE':<14}  "
    f"{'HOST':<14}  {'USER':<10}  {'SEATS':>5}  DETAIL"
)


def audit_line(entry: Mapping[str, Any]) -> str:
    """One audit entry in fixed-width columns (so `--follow` output stays aligned)."""
    names = ("hostid", "reason", "ip")
    extra = [f"{name}={quoted(entry[name])}" for name in names if entry.get(name)]
    if entry.get("admin_uid") is not None:
        extra.append(f"admin_uid={quoted(entry['admin_uid'])}")
    if entry.get("detail"):  # JSON escapes all but DEL: one_line gets that too
        extra.append(one_line(json.dumps(entry["detail"], sort_keys=True)))
    seats = entry.get("seats")
    id_, event = _scalar(entry["id"]), _scalar(entry.get("event", ""))
    return (
        f"{id_:>6}  {when(entry.get('time')):<20}  {event:<15}  "
        f"{_scalar(entry.get('licence')):<14}  {_scalar(entry.get('handle')):<14}  "
        f"{_scalar(entry.get('host')):<14}  {_scalar(entry.get('user')):<10}  "
        f"{_scalar(seats):>5}  {' '.join(extra) or NONE}"
    ).rstrip()


# ----------------------------------------------------------------------- parsers


def parse_time(text: str) -> float:
    """Epoch seconds from an ISO 8601 date-time that carries an offset (or ends in Z).
    Raises ValueError saying what to write."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO date-time: write e.g. 2027-01-01T00:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise ValueError(
            f"{text!r} has no time zone: add an offset like Z or +01:00, e.g. 2027-01-01T00:00:00Z"
        )
    return value.timestamp()


def parse_since(text: str, now: float) -> float:
    """`1h` (that long before `now`) or an ISO date-time, as epoch seconds."""
    try:
        return now - parse_duration(text, allow_zero=True)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; or give a duration such as 1h or 2d") from None


def parse_feature(text: str) -> tuple[str, str | int | float | bool]:
    """`name=value`, the value typed: true/false, an integer, a finite float, else text."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r}: write a feature as name=value")
    value: str | int | float | bool = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    elif _INT.fullmatch(raw):
        value = int(raw)
    elif _FLOAT.fullmatch(raw) and math.isfinite(float(raw)):
        value = float(raw)
    return name, value
