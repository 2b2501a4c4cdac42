"""`licd report usage --by` and `--suggest`: who held the seats, who was refused, and how
many seats would have done, from the audit log (docs/admin.md, "The usage report").

`read_log` rebuilds the leases from the log (a checkout opens one; the checkin, reclaim
or revoke of the same licence and handle closes it; one whose checkout has left the log
counts from before its start) and the refusals: `denied` entries (each standing for its
`detail.count` denials) and `queue_left` ones (a queued checkout that left without a
seat). A refusal is *later served* when the same holder (licence, hostid, user) checks
out within `within` after it, and *true* otherwise.

`by_key` sums them per user, host, group or app: the peak and p95 seats held at once
(p95 weighted by time: the most held at once all but 5% of the range), seat-hours,
checkouts, true and later-served denials, time queued and idle hours. `suggest` replays
a licence's requests (`demand`: what a request is, and how long one never served would
have held its seats) with 1, 2, ... seats and returns the first count that refuses at
most the target share of them. Pure functions of audit entries; `fetch_by` and
`fetch_suggestions` read them from a running daemon.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from licd.cli import format as fmt
from licd.cli.report import Call, audit_until, entry_time, usage_slots
from licd.engine.policy import Who, matches
from licd_client.messages import Holder
from licd_client.safetext import escape

BY = ("user", "host", "group", "app")
NONE = "(none)"  # the key of a holder without one (no user, no app, in no group)
RELEASES = frozenset({"checkin", "reclaim", "revoke"})
SEATS_SHORT = "seats_exhausted"  # the refusal more seats would have spared
P95_SHARE = 0.05  # p95: the level exceeded at most this share of the time
DEFAULT_WITHIN = 600.0  # a refusal followed by a checkout within 10m was "later served"
DEFAULT_TARGET = 0.01  # --suggest's default: at most 1% of requests refused
NOTE_WIDTH = 88  # the notes under a table, wrapped


# ------------------------------------------------------------------------ the log


@dataclass(frozen=True, slots=True)
class Party:
    """Who an entry is about, as its columns (and its `detail.app`) say."""

    licence: str | None
    host: str
    hostid: str
    user: str
    ip: str | None
    app: str | None

    @property
    def holder(self) -> tuple[str | None, str, str]:
        """One holder of one licence: what "the same holder" means here."""
        return (self.licence, self.hostid, self.user)


@dataclass(eq=False, slots=True)
class Lease:
    """A lease as the log tells it, from its checkout to its release."""

    who: Party
    seats: int
    start: float  # -inf: its checkout is no longer in the log (retired)
    order: int  # the checkout's place in the log (-1 when retired)
    end: float = math.inf  # inf: not released by the end of the entries read
    end_order: int = -1
    queued: float = 0.0  # seconds it waited in the licence's queue first
    idle: float = 0.0  # seconds its heartbeats reported idle (told at its release)


@dataclass(eq=False, slots=True)
class Refusal:
    """A `denied` entry (`count` denials) or a queued checkout that left without a seat."""

    who: Party
    seats: int
    time: float  # when refused: the denial, or the leaving
    asked: float  # when asked: `time`, less a queued checkout's wait
    count: int
    short: bool  # for want of a seat (seats_exhausted, or queued)
    waited: float | None  # a queue_left's wait
    served: Lease | None = None  # the holder's checkout within `within` after, if any


@dataclass(frozen=True)
class Log:
    leases: list[Lease]
    refusals: list[Refusal]


def read_log(entries: Iterable[Mapping[str, Any]], *, licence: str | None, within: float) -> Log:
    """The leases and refusals of `licence` (of every licence: None), from audit entries
    in log order; taken in time order, those of equal times in log order."""
    rows = sorted(
        (t, order, entry)
        for order, entry in enumerate(entries)
        if (t := entry_time(entry)) is not None
        and (licence is None or entry.get("licence") == licence)
    )
    leases: list[Lease] = []
    refusals: list[Refusal] = []
    held: dict[tuple[str | None, str | None], Lease] = {}  # (licence, handle) -> open lease
    for t, order, entry in rows:
        event, detail = entry.get("event"), _detail(entry)
        key = (entry.get("licence"), entry.get("handle"))
        if event == "checkout":
            lease = Lease(_party(entry), _seats(entry), t, order, queued=_seconds(detail, "queued"))
            held[key] = lease
            leases.append(lease)
        elif event in RELEASES:
            ended = held.pop(key, None)
            if ended is None:  # its checkout has left the log
                ended = Lease(_party(entry), _seats(entry), -math.inf, -1)
                leases.append(ended)
            ended.end, ended.end_order, ended.idle = t, order, _seconds(detail, "idle")
        elif event == "denied":
            count = detail.get("count")
            count = count if isinstance(count, int) and not isinstance(count, bool) else 1
            short = entry.get("reason") == SEATS_SHORT
            refusals.append(Refusal(_party(entry), _seats(entry), t, t, max(count, 1), short, None))
        elif event == "queue_left":
            waited = _seconds(detail, "waited")
            refusals.append(Refusal(_party(entry), _seats(entry), t, t - waited, 1, True, waited))
    _match_served(leases, refusals, within)
    return Log(leases, refusals)


def _match_served(leases: Sequence[Lease], refusals: Iterable[Refusal], within: float) -> None:
    """Set each refusal's `served`: the holder's first checkout in [time, time + within]."""
    checkouts: dict[tuple[str | None, str, str], list[Lease]] = {}
    for lease in leases:  # in time order
        if lease.order >= 0:
            checkouts.setdefault(lease.who.holder, []).append(lease)
    for refusal in refusals:
        mine = checkouts.get(refusal.who.holder, [])
        i = bisect.bisect_left(mine, refusal.time, key=lambda x: x.start)
        if i < len(mine) and mine[i].start <= refusal.time + within:
            refusal.served = mine[i]


def _party(entry: Mapping[str, Any]) -> Party:
    app = _detail(entry).get("app")
    return Party(
        licence=_str(entry.get("licence")),
        host=_str(entry.get("host")) or "",
        hostid=_str(entry.get("hostid")) or "",
        user=_str(entry.get("user")) or "",
        ip=_str(entry.get("ip")),
        app=app if isinstance(app, str) else None,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _detail(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    detail = entry.get("detail")
    return detail if isinstance(detail, Mapping) else {}


def _seats(entry: Mapping[str, Any]) -> int:
    value = entry.get("seats")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _seconds(detail: Mapping[str, Any], name: str) -> float:
    """A duration of the detail's (0 when absent or not a finite, non-negative number)."""
    value = detail.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return max(float(value), 0.0)


# ------------------------------------------------------------------------- by key


@dataclass(frozen=True, slots=True)
class Levels:
    """Seats held at once over a range: the most, the p95 (by time), their integral."""

    peak: int
    p95: int
    seat_seconds: float


def levels(leases: Iterable[Lease], start: float, end: float) -> Levels:
    """The seats `leases` held at once over [start, end): the level carried in at the
    start and every level reached within (each lease's start and end taken in log
    order, so a seat returned and taken at one instant is not held twice)."""
    steps = []
    for lease in leases:
        steps.append((lease.start, lease.order, lease.seats))
        if lease.end < math.inf:
            steps.append((lease.end, lease.end_order, -lease.seats))
    steps.sort()
    level, last, peak = 0, start, None
    span: dict[int, float] = {}  # level -> seconds held at it within the range
    for t, _, delta in steps:
        if t >= end:
            break
        if t >= start:
            peak = level if peak is None else peak
            span[level] = span.get(level, 0.0) + (t - last)
            last = t
        level += delta
        if peak is not None:
            peak = max(peak, level)
    span[level] = span.get(level, 0.0) + (end - last)
    peak = level if peak is None else peak
    return Levels(peak, p95(span), sum(k * v for k, v in span.items()))


def p95(span: Mapping[int, float]) -> int:
    """The lowest level exceeded for at most 5% of the time (`span`: level -> seconds)."""
    allowed, above = P95_SHARE * sum(span.values()), 0.0
    for level in sorted(span, reverse=True):
        above += span[level]
        if above > allowed:
            return level
    return 0


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """One row of `--by`: a user's, host's, group's or app's use of the seats."""

    key: str
    peak: int
    p95: int
    seat_hours: float
    checkouts: int
    true_denials: int  # not followed by the holder's checkout within `within`
    later_served: int  # followed by one
    queued: int  # waits: checkouts served from the queue, and queued ones that left
    queued_hours: float
    queued_median: float | None  # seconds
    idle_hours: float


def keys_of(by: str, who: Party, groups: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The rows `who` counts in: its user, host or app, or each group whose rules match
    it (today's [groups]); NONE when it has none."""
    if by == "group":
        holder = Holder(host=who.host, hostid=who.hostid, user=who.user, pid=0)
        mine = [g for g in groups if matches(f"group:{g}", Who(holder, who.ip), groups)]
        return mine or [NONE]
    value = {"user": who.user, "host": who.host, "app": who.app}[by]
    return [value or NONE]


@dataclass
class _Row:
    leases: list[Lease] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def by_key(
    log: Log,
    by: str,
    *,
    start: float,
    end: float,
    groups: Mapping[str, tuple[str, ...]] | None = None,
) -> list[KeyUsage]:
    """One row per key with a lease held or a refusal within [start, end), the most
    seat-hours first. Checkouts, waits and refusals count when they happen in the range,
    idle time when its lease is returned in it."""
    rows: dict[str, _Row] = {}
    for lease in log.leases:
        if lease.start < end and lease.end >= start:
            for key in keys_of(by, lease.who, groups or {}):
                rows.setdefault(key, _Row()).leases.append(lease)
    for refusal in log.refusals:
        if start <= refusal.time < end:
            for key in keys_of(by, refusal.who, groups or {}):
                rows.setdefault(key, _Row()).refusals.append(refusal)
    out = [_key_usage(key, row, start, end) for key, row in rows.items()]
    return sorted(out, key=lambda x: (-x.seat_hours, -x.peak, x.key))


def _key_usage(key: str, row: _Row, start: float, end: float) -> KeyUsage:
    held = levels(row.leases, start, end)
    begun = [x for x in row.leases if start <= x.start < end]
    waits = [x.queued for x in begun if x.queued > 0]
    waits += [x.waited for x in row.refusals if x.waited is not None]
    returned = [x for x in row.leases if start <= x.end < end]
    return KeyUsage(
        key=key,
        peak=held.peak,
        p95=held.p95,
        seat_hours=held.seat_seconds / 3600,
        checkouts=len(begun),
        true_denials=sum(x.count for x in row.refusals if x.served is None),
        later_served=sum(x.count for x in row.refusals if x.served is not None),
        queued=len(waits),
        queued_hours=sum(waits) / 3600,
        queued_median=statistics.median(waits) if waits else None,
        idle_hours=sum(x.idle for x in returned) / 3600,
    )


# ----------------------------------------------------------------------- suggest


@dataclass(frozen=True, slots=True)
class Request:
    """One holder's want of seats, as the replay sees it."""

    asked: float
    seats: int
    until: float  # when it gives them back (inf: still held)
    refused: bool  # in fact not served at once (refused, or queued)


@dataclass(frozen=True)
class Demand:
    """A licence's demand over a range, for the replay."""

    held: list[tuple[float, int]]  # (until, seats) of each lease held as the range starts
    asks: list[Request]  # the requests asked within the range, in the order asked
    hold: float  # seconds a request never served is taken to hold its seats


def demand(log: Log, licence: str, *, start: float, end: float, within: float) -> Demand:
    """The licence's requests asked in [start, end), and the leases held as it starts.

    Each checkout is a request, asked when its holder first asked for it: at the
    earliest seat refusal it later served (`Refusal.served`), or as it joined the
    queue, but not before the range; held until its release. A run of one holder's true
    seat refusals (each asked within `within` of the one before) is one request, never
    served, that would have held its seats for the licence's median lease length (or
    `within`, when no lease of it ended). Other refusals (by a rule, of an unknown key)
    are not demand that more seats would meet."""
    leases = [x for x in log.leases if x.who.licence == licence]
    lengths = [x.end - x.start for x in leases if -math.inf < x.start and x.end < math.inf]
    hold = statistics.median(lengths) if lengths else within
    first: dict[Lease, float] = {}  # a lease -> the earliest refusal it served, asked
    runs: dict[tuple[str | None, str, str], Refusal] = {}  # holder -> its run's latest
    asks: list[Request] = []
    for refusal in log.refusals:
        if refusal.who.licence != licence or not refusal.short:
            continue
        if refusal.served is not None:
            first[refusal.served] = min(first.get(refusal.served, math.inf), refusal.asked)
            continue
        latest = runs.get(refusal.who.holder)
        runs[refusal.who.holder] = refusal
        if latest is None or refusal.asked > latest.time + within:
            asks.append(Request(refusal.asked, refusal.seats, refusal.asked + hold, True))
    held = []
    for lease in leases:
        if lease.start < start:
            if lease.end > start:
                held.append((lease.end, lease.seats))
            continue
        asked = max(start, min(lease.start - lease.queued, first.get(lease, math.inf)))
        refused = lease.queued > 0 or lease in first
        asks.append(Request(asked, lease.seats, lease.end, refused))
    asks = sorted((x for x in asks if start <= x.asked < end), key=lambda x: x.asked)
    return Demand(held, asks, hold)


def replay(demand: Demand, seats: int) -> int:
    """How many of the requests a licence of `seats` seats refuses: each is served if
    its seats are free as it asks, and then holds them until its `until`; the leases
    held as the range starts hold theirs whatever the count."""
    held = list(demand.held)
    heapq.heapify(held)  # the soonest given back first
    used, refused = sum(n for _, n in held), 0
    for r in demand.asks:
        while held and held[0][0] <= r.asked:
            used -= heapq.heappop(held)[1]
        if used + r.seats <= seats:
            used += r.seats
            heapq.heappush(held, (r.until, r.seats))
        else:
            refused += 1
    return refused


@dataclass(frozen=True, slots=True)
class Suggestion:
    licence: str
    seats: int | None  # the licence's seats now (None: it is gone)
    peak: int  # the most seats in use at once in the range
    requests: int
    refused: int  # requests in fact not served at once
    suggested: int
    replayed: int  # requests the replay refuses with `suggested` seats
    hold: float  # seconds a request never served is taken to hold its seats

    @property
    def rate(self) -> float:
        return self.refused / self.requests if self.requests else 0.0

    @property
    def replayed_rate(self) -> float:
        return self.replayed / self.requests if self.requests else 0.0


def suggest(
    log: Log,
    licence: str,
    *,
    start: float,
    end: float,
    target: float,
    within: float,
    seats: int | None = None,
    peak: int = 0,
) -> Suggestion:
    """The fewest seats (at least 1) whose replay refuses at most `target` (a share,
    0 <= target < 1) of the requests asked in [start, end): tried from 1 up."""
    wanted = demand(log, licence, start=start, end=end, within=within)
    asks = wanted.asks
    n = 1
    while (replayed := replay(wanted, n)) > target * len(asks):
        n += 1
    refused = sum(1 for x in asks if x.refused)
    return Suggestion(licence, seats, peak, len(asks), refused, n, replayed, wanted.hold)


# ------------------------------------------------------------------ from the daemon


def fetch_by(
    call: Call, by: str, licence: str | None, start: float, end: float, within: float
) -> list[KeyUsage]:
    """`by_key` over [start, end) from a running daemon: the log up to `end + within`
    (a refusal near the end may be served just after it), and its [groups] for `group`."""
    log = read_log(audit_until(call, end + within), licence=licence, within=within)
    groups = call("groups")["groups"] if by == "group" else {}
    return by_key(log, by, start=start, end=end, groups={k: tuple(v) for k, v in groups.items()})


def fetch_suggestions(
    call: Call, licence: str | None, start: float, end: float, within: float, target: float
) -> list[Suggestion]:
    """`suggest` for the licence (None: each licence there is now, or that was used in
    the range), with its seats now and its peak in the range (as the slot report has it)."""
    entries = list(audit_until(call, end + within))
    log = read_log(entries, licence=licence, within=within)
    now = {x["id"]: int(x["seats"]) for x in call("licence.list")["licences"]}
    named: set[str] = set(now) if licence is None else {licence}
    if licence is None:
        used = [x.who for x in log.leases if x.start < end and x.end >= start]
        used += [x.who for x in log.refusals if start <= x.time < end]
        named |= {x.licence for x in used if x.licence is not None}
    out = []
    for lid in sorted(named):
        top = usage_slots(entries, licence=lid, start=start, end=end, slot=end - start)[0].peak
        out.append(
            suggest(
                log,
                lid,
                start=start,
                end=end,
                target=target,
                within=within,
                seats=now.get(lid),
                peak=top,
            )
        )
    return out


# ------------------------------------------------------------------------ input


def parse_rate(text: str) -> float:
    """A share given in percent (`1%`, `0.5%`): from 0 (none) up to, not including, 100%."""
    number = text.strip().removesuffix("%")
    if number == text.strip():
        raise ValueError(f"{text!r}: give a percentage, like 1% or 0.5%")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: not a percentage, like 1% or 0.5%") from None
    if not 0 <= value < 100:
        raise ValueError(f"{text!r}: must be at least 0% and below 100%")
    return value / 100


# ------------------------------------------------------------------------ output

BY_COLUMNS = (
    "peak",
    "p95",
    "seat_hours",
    "checkouts",
    "true_denials",
    "later_served",
    "queued",
    "queued_hours",
    "queued_median",
    "idle_hours",
)
BY_HEADERS = (
    "PEAK",
    "P95",
    "SEAT-H",
    "CHECKOUTS",
    "DENIED",
    "SERVED-LATER",
    "QUEUED",
    "QUEUED-H",
    "MEDIAN-WAIT",
    "IDLE-H",
)
SUGGEST_COLUMNS = (
    "licence",
    "seats",
    "peak",
    "requests",
    "refused",
    "denial_rate",
    "suggested",
    "replayed",
    "replayed_rate",
    "hold",
)


@dataclass(frozen=True)
class Period:
    """What a report covers: its range, its licence (None: all) and its `--within`."""

    start: float
    end: float
    licence: str | None
    within: float

    def subject(self) -> str:
        name = "all licences" if self.licence is None else f"licence {escape(self.licence)}"
        return f"{name}, {fmt.when(self.start)} to {fmt.when(self.end)}"


def by_rows(rows: Sequence[KeyUsage], by: str) -> list[dict[str, Any]]:
    """One mapping per key: what CSV and JSON carry (hours to 3 decimals, seconds to 1)."""
    return [
        {
            by: x.key,
            "peak": x.peak,
            "p95": x.p95,
            "seat_hours": round(x.seat_hours, 3),
            "checkouts": x.checkouts,
            "true_denials": x.true_denials,
            "later_served": x.later_served,
            "queued": x.queued,
            "queued_hours": round(x.queued_hours, 3),
            "queued_median": None if x.queued_median is None else round(x.queued_median, 1),
            "idle_hours": round(x.idle_hours, 3),
        }
        for x in rows
    ]


def by_text(rows: Sequence[KeyUsage], by: str, style: str, period: Period) -> str:
    """The `--by` report as `table`, `csv` or `json`."""
    mapped = by_rows(rows, by)
    if style == "json":
        return json.dumps(mapped)
    if style == "csv":
        header = (by, *BY_COLUMNS)
        return "\n".join(
            fmt.csv_line(r) for r in [header, *([x[k] for k in header] for x in mapped)]
        )
    head = f"Seats held by {by}, {period.subject()}"
    if not rows:
        return f"{head}\n\n(no lease held and nobody refused)"
    body = [
        (x.key, x.peak, x.p95, round(x.seat_hours, 2), x.checkouts, x.true_denials)
        + (x.later_served, x.queued, round(x.queued_hours, 2), fmt.duration(x.queued_median))
        + (round(x.idle_hours, 2),)
        for x in rows
    ]
    notes = (
        "PEAK: the most seats held at once; P95: the most held at once all but 5% of the"
        " time. DENIED: refusals (denials, and queued checkouts that left without a seat)"
        f" not followed within {fmt.duration(period.within)} by a checkout of the same"
        " holder (licence, host id, user); SERVED-LATER: those followed by one. QUEUED:"
        " waits in a queue, served or not. IDLE-H: the idle time reported by the leases"
        " returned in the range."
    )
    table = fmt.table((by.upper(), *BY_HEADERS), body)
    return "\n".join([head, "", table, "", *textwrap.wrap(notes, NOTE_WIDTH)])


def suggestion_rows(items: Sequence[Suggestion]) -> list[dict[str, Any]]:
    """One mapping per licence (rates as shares, to 4 decimals; `hold` in seconds)."""
    return [
        {
            "licence": x.licence,
            "seats": x.seats,
            "peak": x.peak,
            "requests": x.requests,
            "refused": x.refused,
            "denial_rate": round(x.rate, 4),
            "suggested": x.suggested,
            "replayed": x.replayed,
            "replayed_rate": round(x.replayed_rate, 4),
            "hold": round(x.hold, 1),
        }
        for x in items
    ]


def suggestions_text(items: Sequence[Suggestion], style: str, period: Period, target: float) -> str:
    """The `--suggest` report as `table`, `csv` or `json`."""
    mapped = suggestion_rows(items)
    if style == "json":
        return json.dumps(mapped)
    if style == "csv":
        rows = [[x[k] for k in SUGGEST_COLUMNS] for x in mapped]
        return "\n".join(fmt.csv_line(r) for r in [list(SUGGEST_COLUMNS), *rows])
    head = f"Seats to refuse at most {target * 100:g}% of requests, {period.subject()}"
    if not items:
        return f"{head}\n\n(no licence)"
    body = [
        (x.licence, x.seats, x.peak, x.requests, _percent(x.rate), x.suggested)
        + (_percent(x.replayed_rate), fmt.duration(x.hold))
        for x in items
    ]
    headers = ("LICENCE", "SEATS", "PEAK", "REQUESTS", "REFUSED%", "SUGGESTED", "REPLAYED%")
    notes = (
        "A request: a checkout, asked when its holder was first refused a seat for it or"
        " queued; or a run of one holder's refusals for want of a seat not followed by its"
        f" checkout within {fmt.duration(period.within)}, taken to hold its seats for the"
        " licence's median lease (HOLD). REFUSED%: requests not served at once. REPLAYED%:"
        " those the suggested seats refuse in a replay of the requests, each served if its"
        " seats are free as it asks."
    )
    table = fmt.table((*headers, "HOLD"), body)
    return "\n".join([head, "", table, "", *textwrap.wrap(notes, NOTE_WIDTH)])


def _percent(share: float) -> float:
    """A share as a percentage, to one decimal."""
    return round(share * 100, 1)
