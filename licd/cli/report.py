"""Usage reports from the audit log: peak seats, denials and overdraft checkouts per slot.

Checkout, checkin, reclaim and revoke entries record `detail.in_use` (a licence's seats
in use right after them), so the level at any time is the last such value before it. A
slot's peak is the most of the level carried into it and every value recorded within it.
Output goes through cli_format's escaping and CSV cells, like every `licd` command's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from licd.cli import format as fmt
from licd.config.settings import parse_duration
from licd_client.safetext import escape

DAY = 86400.0
MAX_SLOTS = 100_000  # more is a mistake (1s slots over a day are 86,400)
PAGE = 1000  # audit entries asked for per admin request
LEVEL_EVENTS = frozenset({"checkout", "checkin", "reclaim", "revoke"})  # carry `in_use`
FORMATS = ("table", "csv", "json")
CSV_COLUMNS = ("slot_start", "slot_end", "peak", "denials", "overdraft")

Call = Callable[..., dict[str, Any]]  # an admin request: (op, **args) -> its results


@dataclass(frozen=True, slots=True)
class Slot:
    """One time slot, [start, end): the most seats in use at once, and the counts."""

    start: float
    end: float
    peak: int
    denials: int
    overdraft: int


@dataclass(frozen=True)
class Usage:
    """A usage report: the slots of one licence (or of all, summed) over a range."""

    licence: str | None  # None: every licence, summed
    start: float
    end: float
    slot: float
    seats: int | None  # the licence's seats now (all licences': their sum), if known
    slots: tuple[Slot, ...]


# ------------------------------------------------------------------- the counting


def parse_slot(text: str) -> float:
    """A slot length (`3m`, `1h`, `90`): whole seconds, at least one."""
    seconds = parse_duration(text, what="slot")
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"slot: {text!r} is not a whole number of seconds (at least 1s)")
    return seconds


def window(start: float | None, end: float | None, slot: float, now: float) -> tuple[float, float]:
    """The report's range, on slot boundaries: slots are absolute (multiples of the slot
    since the epoch, so 3m slots are the day's 480 from 00:00 UTC). Raises ValueError."""
    start, end = bounds(start, end, slot, now)
    count = slot_count(start, end, slot)
    if count > MAX_SLOTS:
        raise ValueError(
            f"{count} slots is too many (at most {MAX_SLOTS}): use a longer --slot or a"
            " shorter range"
        )
    return start, end


def bounds(start: float | None, end: float | None, step: float, now: float) -> tuple[float, float]:
    """A range on multiples of `step`: `end` (default `now`) rounded up, `start` (default
    a day before the end) down. Raises ValueError unless the start is before the end."""
    end = math.ceil((now if end is None else end) / step) * step
    start = end - DAY if start is None else math.floor(start / step) * step
    if start >= end:
        raise ValueError("--from must be before --to")
    return start, end


def slot_count(start: float, end: float, slot: float) -> int:
    """How many slots [start, end) holds; the last one is partial if `end` is not on a
    boundary."""
    if not slot > 0 or not end > start:
        raise ValueError("a report needs a slot > 0 and a start before its end")
    return math.ceil((end - start) / slot)


def usage_slots(
    entries: Iterable[Mapping[str, Any]],
    *,
    licence: str | None,
    start: float,
    end: float,
    slot: float,
) -> list[Slot]:
    """The slots from `start` (slot k is [start + k*slot, start + (k+1)*slot), the last
    cut at `end`) with their peaks and counts, from audit entries given in log order.

    An entry counts if it names `licence` (any entry when that is None: the levels of
    the licences are then summed). Entries before `start` only set the level carried
    in; entries at or after `end` are ignored. Entries are taken in time order, those
    with equal times in log order. An entry exactly on a boundary is in the later slot,
    whose peak still includes the level before it (the one in force as the slot opens).
    """
    count = slot_count(start, end, slot)
    carried: dict[str | None, tuple[float, int, int]] = {}  # licence -> (time, order, level)
    inside: list[tuple[float, int, Mapping[str, Any]]] = []
    for order, entry in enumerate(entries):
        t = entry_time(entry)
        if (licence is not None and entry.get("licence") != licence) or t is None or t >= end:
            continue
        if t >= start:
            inside.append((t, order, entry))
            continue
        level = level_after(entry)
        name = entry.get("licence")
        if level is not None and (name not in carried or (t, order) >= carried[name][:2]):
            carried[name] = (t, order, level)
    inside.sort(key=lambda x: (x[0], x[1]))

    levels = {name: level for name, (_, _, level) in carried.items()}
    total = sum(levels.values())
    peaks, denials, overdraft = [0] * count, [0] * count, [0] * count
    seeded = -1  # slots up to this one have the level at their start as their peak
    for t, _, entry in inside:
        k = _index(t, start, slot, count)
        while seeded < k:
            seeded += 1
            peaks[seeded] = total
        if entry.get("event") == "denied":
            # Repeated denials are one audit entry with their `count` (docs/admin.md),
            # all of them counted in the slot of the entry's time (the latest).
            times = (entry.get("detail") or {}).get("count", 1)
            denials[k] += times if isinstance(times, int) and times > 0 else 1
        elif is_overdraft(entry):
            overdraft[k] += 1
        level = level_after(entry)
        if level is not None:
            name = entry.get("licence")
            total += level - levels.get(name, 0)
            levels[name] = level
            peaks[k] = max(peaks[k], total)
    for k in range(seeded + 1, count):
        peaks[k] = total
    return [
        Slot(start + k * slot, min(end, start + (k + 1) * slot), peaks[k], denials[k], overdraft[k])
        for k in range(count)
    ]


def level_after(entry: Mapping[str, Any]) -> int | None:
    """The licence's seats in use right after this entry, if it records them."""
    detail = entry.get("detail")
    if entry.get("event") not in LEVEL_EVENTS or not isinstance(detail, Mapping):
        return None
    value = detail.get("in_use")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def is_overdraft(entry: Mapping[str, Any]) -> bool:
    """A checkout granted beyond the licence's seats (within its overdraft)."""
    detail = entry.get("detail")
    flagged = isinstance(detail, Mapping) and detail.get("overdraft") is True
    return entry.get("event") == "checkout" and (flagged or entry.get("reason") == "overdraft")


def _index(t: float, start: float, slot: float, count: int) -> int:
    """The slot holding time t; its boundaries are exactly start + k * slot."""
    k = int((t - start) // slot)
    if t < start + k * slot:
        k -= 1
    elif t >= start + (k + 1) * slot:
        k += 1
    return min(max(k, 0), count - 1)


def entry_time(entry: Mapping[str, Any]) -> float | None:
    """An audit entry's time, or None when it has none that is a number."""
    value = entry.get("time")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


# ------------------------------------------------------------------ from the daemon


def audit_until(call: Call, end: float) -> Iterator[dict[str, Any]]:
    """Every audit entry before `end`, from the first, page by page. The whole log is
    read: the level at a report's start may have been set long before it."""
    after = 0
    while True:
        page = call("audit", after=after, until=end, limit=PAGE)
        yield from page["entries"]
        if len(page["entries"]) < PAGE:
            return
        after = page["last"]


def fetch(call: Call, licence: str | None, start: float, end: float, slot: float) -> Usage:
    """The usage report over [start, end) from a running daemon's audit log."""
    slots = usage_slots(audit_until(call, end), licence=licence, start=start, end=end, slot=slot)
    listed = [x for x in call("licence.list")["licences"] if licence is None or x["id"] == licence]
    seats = sum(int(x["seats"]) for x in listed) if listed else None
    return Usage(licence, start, end, slot, seats, tuple(slots))


# ------------------------------------------------------------------------ output


def render(usage: Usage, style: str) -> str:
    """The report as `table` (for people), `csv` or `json` (for scripts)."""
    renderers = {"table": table_text, "csv": csv_text, "json": json_text}
    return renderers[style](usage)


def slot_rows(usage: Usage) -> list[dict[str, Any]]:
    """One mapping per slot, times in ISO 8601 UTC: what CSV and JSON carry."""
    return [
        {
            "slot_start": fmt.iso(s.start),
            "slot_end": fmt.iso(s.end),
            "peak": s.peak,
            "denials": s.denials,
            "overdraft": s.overdraft,
        }
        for s in usage.slots
    ]


def csv_text(usage: Usage) -> str:
    """A header row, then one row per slot (cells neutralised as every licd CSV's are)."""
    rows = [[row[name] for name in CSV_COLUMNS] for row in slot_rows(usage)]
    return "\n".join(fmt.csv_line(row) for row in [list(CSV_COLUMNS), *rows])


def json_text(usage: Usage) -> str:
    return json.dumps(slot_rows(usage))


def span_text(seconds: float) -> str:
    """`3m`, `1h`, `90s`, `2d`: a slot or row length."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _subject(usage: Usage) -> str:
    name = "all licences" if usage.licence is None else f"licence {escape(usage.licence)}"
    return name if usage.seats is None else f"{name} ({usage.seats} seats now)"


def summary(usage: Usage) -> str:
    """The report's totals in a sentence: the top peak and when, denials, overdraft."""
    top = max(usage.slots, key=lambda s: s.peak)
    parts = [f"peak {top.peak}" + (f" at {fmt.when(top.start)}" if top.peak else "")]
    if usage.seats is not None:
        full = sum(1 for s in usage.slots if s.peak >= usage.seats)
        parts.append(f"{full} of {len(usage.slots)} slots at or over the seats")
    parts.append(f"{sum(s.denials for s in usage.slots)} denied")
    parts.append(f"{sum(s.overdraft for s in usage.slots)} overdraft checkouts")
    return "; ".join(parts)


BAR_WIDTH = 40
MAX_ROWS = 48  # more slots than this are shown a few to a row
_ROW_SPANS = (60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _row_span(usage: Usage) -> float:
    """How long one table row is: a slot, or the shortest round span (a multiple of the
    slot) that keeps the table within MAX_ROWS rows."""
    slot = usage.slot
    spans = [float(s) for s in _ROW_SPANS if s >= slot and s % slot == 0]
    spans.append(slot * math.ceil(len(usage.slots) / MAX_ROWS))
    for span in [slot, *spans]:
        if len({math.floor(s.start / span) for s in usage.slots}) <= MAX_ROWS:
            return span
    return spans[-1]  # at worst one row over MAX_ROWS, when the range is off its boundaries


def table_text(usage: Usage) -> str:
    """A chart for a terminal: one row per slot, or per round span of slots (each row
    showing its slots' highest peak and their counts) with a bar for the peak."""
    span = _row_span(usage)
    rows: list[tuple[float, list[Slot]]] = []
    for s in usage.slots:
        key = math.floor(s.start / span)
        if rows and math.floor(rows[-1][0] / span) == key:
            rows[-1][1].append(s)
        else:
            rows.append((s.start, [s]))
    scale = max([usage.seats or 0, 1, *(s.peak for s in usage.slots)])
    head = f"Seats in use, {_subject(usage)}: {fmt.when(usage.start)} to {fmt.when(usage.end)}"
    head += f", {span_text(usage.slot)} slots ({len(usage.slots)})"
    if span != usage.slot:
        head += f", {span_text(span)} a row"
    lines = [head, ""]
    lines.append(f"{'FROM (UTC)':<20}  {'PEAK':>4}  {'DENIED':>6}  {'OVERDRAFT':>9}  SEATS IN USE")
    for first, group in rows:
        peak = max(s.peak for s in group)
        denied, over = sum(s.denials for s in group), sum(s.overdraft for s in group)
        line = f"{fmt.when(first):<20}  {peak:>4}  {denied:>6}  {over:>9}  "
        lines.append((line + _bar(peak, usage.seats, scale)).rstrip())
    lines += ["", summary(usage) + "."]
    lines.append("Peak: most seats in use at once. Every slot: --format csv or json.")
    return "\n".join(lines)


def _bar(peak: int, seats: int | None, scale: int) -> str:
    """`█` up to the seats, `▒` beyond them, `│` marking the seats when not reached."""
    length = round(peak * BAR_WIDTH / scale) or (1 if peak else 0)
    limit = None if seats is None else round(seats * BAR_WIDTH / scale)
    cells = []
    for i in range(max(length, (limit or 0) + 1)):
        if i < length:
            cells.append("█" if limit is None or i < limit else "▒")
        else:
            cells.append("│" if i == limit else " ")
    return "".join(cells)


# --------------------------------------------------------------------------- SVG

SVG_W, SVG_H = 960, 470
_LEFT, _RIGHT, _TOP, _BOTTOM = 84, 72, 64, 130
_BLUE, _RED, _ORANGE = "#4c78a8", "#d62728", "#f58518"


def svg_text(usage: Usage) -> str:
    """A standalone SVG chart: a bar per slot for its peak (orange above the seats), the
    seats as a dashed line, and markers under the axis for denials and overdrafts."""
    slots = usage.slots
    width, height = SVG_W - _LEFT - _RIGHT, SVG_H - _TOP - _BOTTOM
    base = _TOP + height
    step, top = _y_scale(max([usage.seats or 0, 1, *(s.peak for s in slots)]))
    x_per_second = width / (usage.end - usage.start)

    def x(t: float) -> float:
        return _LEFT + (t - usage.start) * x_per_second

    def y(v: float) -> float:
        return base - v * height / top

    title = f"Seats in use, {_subject(usage)}"
    sub = f"{fmt.when(usage.start)} to {fmt.when(usage.end)}, {span_text(usage.slot)} slots"
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}"'
        f' viewBox="0 0 {SVG_W} {SVG_H}" font-family="sans-serif" font-size="12">',
        f"<title>{_esc(title)}: {_esc(sub)}</title>",
        f'<rect x="0" y="0" width="{SVG_W}" height="{SVG_H}" fill="#ffffff"/>',
        f'<text x="{_LEFT}" y="24" font-size="16" font-weight="bold">{_esc(title)}</text>',
        f'<text x="{_LEFT}" y="44" fill="#444444">{_esc(sub)}</text>',
    ]
    for v in range(0, top + 1, step):  # the y axis: seats
        out.append(_line(_LEFT - 4, y(v), _LEFT + width, y(v), "#e0e0e0" if v else "#000000"))
        out.append(_text(_LEFT - 8, y(v) + 4, str(v), anchor="end"))
    out.append(_text(16, _TOP + height / 2, "seats", rotate=True))
    for t in _time_ticks(usage.start, usage.end):  # the x axis: time, UTC
        out.append(_line(x(t), base, x(t), base + 4, "#000000"))
        out.append(_text(x(t), base + 16, _tick_label(t, usage.end - usage.start), "middle"))
    out.append(_line(_LEFT, _TOP, _LEFT, base, "#000000"))
    out.append('<g class="peaks">')
    for s in slots:
        colour = _ORANGE if usage.seats is not None and s.peak > usage.seats else _BLUE
        wide = x(s.end) - x(s.start)
        wide = wide - 1 if wide > 4 else max(wide, 0.5)  # a gap between wide bars
        out.append(
            f'<rect class="peak" x="{x(s.start):.2f}" y="{y(s.peak):.2f}"'
            f' width="{wide:.2f}" height="{base - y(s.peak):.2f}"'
            f' fill="{colour}"><title>{_esc(_slot_title(s))}</title></rect>'
        )
    out.append("</g>")
    if usage.seats is not None:
        ys = y(usage.seats)
        out.append(_line(_LEFT, ys, _LEFT + width, ys, _RED, dashed=True))
        out.append(_text(_LEFT + width + 4, ys + 4, f"{usage.seats} seats", fill=_RED))
    for row, (name, colour) in enumerate((("denied", _RED), ("overdraft", _ORANGE))):
        ym = base + 40 + row * 18
        out.append(_text(_LEFT - 8, ym + 4, name, anchor="end", fill=colour))
        for s in slots:
            n = s.denials if name == "denied" else s.overdraft
            if n:
                cx, r = (x(s.start) + x(s.end)) / 2, min(2.5 + math.log2(n), 7.0)
                out.append(
                    f'<circle class="{name}" cx="{cx:.2f}" cy="{ym}" r="{r:.2f}" fill="{colour}">'
                    f"<title>{_esc(f'{n} {name}, {fmt.when(s.start)}')}</title></circle>"
                )
    notes = "Bars: the most seats in use at once in each slot (orange: over the seats)."
    out.append(_text(_LEFT, SVG_H - 30, notes, fill="#444444"))
    totals = summary(usage)
    out.append(_text(_LEFT, SVG_H - 12, f"{totals[:1].upper()}{totals[1:]}.", fill="#444444"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _y_scale(highest: int) -> tuple[int, int]:
    """A round tick step (1, 2, 5, 10, 20, ...; at most 6 ticks) and the axis top."""
    step = 1
    for step in (m * 10**e for e in range(12) for m in (1, 2, 5)):
        if math.ceil(highest / step) <= 6:
            break
    return step, math.ceil(highest / step) * step


_TICK_SPANS = (60, 300, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)


def _time_ticks(start: float, end: float) -> list[float]:
    """Round times (UTC) in [start, end]: at most 9 of them."""
    span = next((s for s in _TICK_SPANS if (end - start) / s <= 8), None)
    if span is None:
        span = math.ceil((end - start) / 8 / 86400) * 86400
    first = math.ceil(start / span) * span
    return [float(t) for t in range(int(first), int(end) + 1, int(span))]


def _tick_label(t: float, length: float) -> str:
    pattern = "%H:%M" if length <= DAY else "%m-%d %H:%M"
    if length > 14 * DAY:
        pattern = "%m-%d"
    return datetime.fromtimestamp(t, UTC).strftime(pattern)


def _slot_title(s: Slot) -> str:
    return (
        f"{fmt.when(s.start)} to {fmt.when(s.end)}: peak {s.peak},"
        f" {s.denials} denied, {s.overdraft} overdraft"
    )


def _esc(text: str) -> str:
    return xml_escape(text, {'"': "&quot;"})


def _line(x1: float, y1: float, x2: float, y2: float, colour: str, *, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (
        f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="{colour}"{dash}/>'
    )


def _text(
    x: float,
    y: float,
    text: str,
    anchor: str = "start",
    *,
    fill: str = "#000000",
    rotate: bool = False,
) -> str:
    turn = f' transform="rotate(-90 {x:.2f} {y:.2f})"' if rotate else ""
    return (
        f'<text x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}" fill="{fill}"{turn}>'
        f"{_esc(text)}</text>"
    )
