"""Tests of licd.cli.report: per-slot peaks, denials and overdrafts from audit entries.

The main check simulates a day of audit entries (seeded; a 10-seat licence with 2 seats
of overdraft, and another beside it) and compares all 480 slots with peaks found another
way: replaying the seats taken and returned into a per-second timeline.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import itertools
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from licd.cli import report
from licd.cli.report import Slot, Usage, usage_slots

DAY = 86400
DAY0 = 1_789_948_800.0  # 2026-09-21 00:00:00 UTC
SLOT = 180.0
SVG = "{http://www.w3.org/2000/svg}"


# ---------------------------------------------------------------- a simulated day


class Day:
    """Audit entries of a simulated day, in log order (denials written a little late,
    as the daemon does), with the seats each licence has."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.entries: list[dict[str, Any]] = []
        self.in_use = {"cad": 0, "cam": 0}
        self.seats = {"cad": 10, "cam": 4}
        self.overdraft = {"cad": 2, "cam": 0}
        self._late: list[dict[str, Any]] = []  # denials, written with the next commit
        self._handles = itertools.count(1)
        self._simulate()

    def _simulate(self) -> None:
        rng = self.rng
        queue: list[tuple[float, int, str, str, int]] = []  # time, seq, what, licence, seats
        seq = itertools.count()
        for licence, busy, quiet in (("cad", 200.0, 900.0), ("cam", 600.0, 3600.0)):
            t = DAY0 - 4 * 3600  # from before the day: seats are held as it starts
            while t < DAY0 + DAY + 3600:
                hour = (t - DAY0) % DAY / 3600
                t += rng.expovariate(1 / (busy if 8 <= hour < 18 else quiet))
                heapq.heappush(queue, (t, next(seq), "arrive", licence, 0))
        for k in rng.sample(range(480), 40):  # some exactly on slot boundaries
            heapq.heappush(queue, (DAY0 + k * SLOT, next(seq), "arrive", "cad", 0))
        heapq.heappush(queue, (DAY0 + 12 * 3600 + 7, next(seq), "edit", "cad", 0))
        while queue:
            t, _, what, licence, seats = heapq.heappop(queue)
            if what == "arrive":
                seats = 2 if rng.random() < 0.1 else 1
                if self._checkout(t, licence, seats):
                    hold = rng.expovariate(1 / 2400)
                    if rng.random() < 0.15:  # returned exactly on a boundary
                        hold = (int((t + hold - DAY0) // SLOT) + 1) * SLOT + DAY0 - t
                    kind = "reclaim" if rng.random() < 0.05 else "checkin"
                    heapq.heappush(queue, (t + hold, next(seq), kind, licence, seats))
            elif what == "edit":
                self._log(t, "licence_updated", "cad", seats=12, detail={"changes": {}})
            else:
                self.in_use[licence] -= seats
                self._log(t, what, licence, seats=seats, detail={"in_use": self.in_use[licence]})
        self.entries += self._late

    def _checkout(self, t: float, licence: str, seats: int) -> bool:
        level, limit = self.in_use[licence], self.seats[licence]
        if level + seats > limit + self.overdraft[licence]:
            detail = {"in_use": level, "total": limit}
            self._late.append(self._entry(t, "denied", licence, seats, "seats_exhausted", detail))
            if self.rng.random() < 0.1:  # and one with an unknown key: no licence
                self._late.append(self._entry(t, "denied", None, 1, "unknown_licence", {}))
            return False
        self.in_use[licence] = level + seats
        over = level + seats > limit
        detail = {"in_use": level + seats, "overdraft": over}
        self._log(
            t, "checkout", licence, seats=seats, reason="overdraft" if over else None, detail=detail
        )
        return True

    def _log(self, t: float, event: str, licence: str, **fields: Any) -> None:
        self.entries.append(
            self._entry(
                t, event, licence, fields.get("seats"), fields.get("reason"), fields["detail"]
            )
        )
        self.entries += self._late  # a commit writes the waiting denials too
        self._late = []

    def _entry(
        self,
        t: float,
        event: str,
        licence: str | None,
        seats: int | None,
        reason: str | None,
        detail: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "id": 0,  # numbered below, in log order
            "time": t,
            "event": event,
            "licence": licence,
            "handle": f"h{next(self._handles)}",
            "host": "ws-1",
            "seats": seats,
            "reason": reason,
            "detail": detail,
        }

    def numbered(self) -> list[dict[str, Any]]:
        return [{**e, "id": i} for i, e in enumerate(self.entries, 1)]


# ------------------------------------------------------- the peaks, independently

SIGN = {"checkout": 1, "checkin": -1, "reclaim": -1, "revoke": -1}


def replayed_peaks(
    entries: Iterable[Mapping[str, Any]], licence: str | None, start: float, slots: int
) -> list[int]:
    """Replay seats taken and returned (not the logged in_use) into a per-second
    timeline: each second's highest level, then the highest second of each slot."""
    moves = sorted(
        (
            (e["time"], SIGN[e["event"]] * e["seats"])
            for e in entries
            if e["event"] in SIGN and (licence is None or e["licence"] == licence)
        ),
        key=lambda m: m[0],
    )
    level, i = 0, 0
    while i < len(moves) and moves[i][0] < start:
        level += moves[i][1]
        i += 1
    per_second = []
    for s in range(int(slots * SLOT)):
        highest = level
        while i < len(moves) and moves[i][0] < start + s + 1:
            level += moves[i][1]
            highest = max(highest, level)
            i += 1
        per_second.append(highest)
    step = int(SLOT)
    return [max(per_second[k * step : (k + 1) * step]) for k in range(slots)]


def counted(entries: Iterable[Mapping[str, Any]], licence: str | None, what: str) -> list[int]:
    """Denials or overdraft checkouts per slot, found by bisecting the boundaries."""
    bounds = [DAY0 + k * SLOT for k in range(481)]
    out = [0] * 480
    for e in entries:
        if licence is not None and e["licence"] != licence:
            continue
        hit = e["event"] == "denied" if what == "denials" else e["reason"] == "overdraft"
        if hit and DAY0 <= e["time"] < DAY0 + DAY:
            out[bisect.bisect_right(bounds, e["time"]) - 1] += 1
    return out


@pytest.mark.parametrize("seed", [4, 480, 2026])
@pytest.mark.parametrize("licence", ["cad", None])
def test_a_simulated_day_matches_peaks_replayed_per_second(seed: int, licence: str | None) -> None:
    day = Day(seed)
    entries = day.numbered()
    assert [e["time"] for e in entries] != sorted(e["time"] for e in entries)  # late denials
    slots = usage_slots(entries, licence=licence, start=DAY0, end=DAY0 + DAY, slot=SLOT)

    assert len(slots) == 480
    assert [s.start for s in slots] == [DAY0 + k * SLOT for k in range(480)]
    assert [s.end for s in slots] == [DAY0 + (k + 1) * SLOT for k in range(480)]
    assert [s.peak for s in slots] == replayed_peaks(entries, licence, DAY0, 480)
    assert [s.denials for s in slots] == counted(entries, licence, "denials")
    assert [s.overdraft for s in slots] == counted(entries, licence, "overdraft")
    # The day is a real test: busy, full at times, into overdraft and refused.
    cad = usage_slots(entries, licence="cad", start=DAY0, end=DAY0 + DAY, slot=SLOT)
    assert cad[0].peak > 0  # seats held from before midnight
    assert max(s.peak for s in cad) == 12
    assert sum(s.denials for s in cad) > 10 and sum(s.overdraft for s in cad) > 10


def test_the_same_day_in_hour_slots_takes_the_most_of_each_hour() -> None:
    entries = Day(7).numbered()
    hours = usage_slots(entries, licence="cad", start=DAY0, end=DAY0 + DAY, slot=3600)
    threes = usage_slots(entries, licence="cad", start=DAY0, end=DAY0 + DAY, slot=SLOT)
    assert [h.peak for h in hours] == [
        max(s.peak for s in threes[i : i + 20]) for i in range(0, 480, 20)
    ]
    assert [h.denials for h in hours] == [
        sum(s.denials for s in threes[i : i + 20]) for i in range(0, 480, 20)
    ]


# ------------------------------------------------------------------- edge cases


def entry(t: float, event: str, in_use: int | None = None, **more: Any) -> dict[str, Any]:
    detail = {} if in_use is None else {"in_use": in_use}
    return {"time": t, "event": event, "licence": "cad", "detail": detail, **more}


def peaks(entries: list[dict[str, Any]], slots: int = 4, **kw: Any) -> list[int]:
    args: dict[str, Any] = {"licence": "cad", "start": DAY0, "end": DAY0 + slots * SLOT}
    return [s.peak for s in usage_slots(entries, slot=SLOT, **(args | kw))]


def test_an_event_on_a_boundary_belongs_to_the_later_slot() -> None:
    taken = [entry(DAY0 + SLOT, "checkout", 1)]
    assert peaks(taken) == [0, 1, 1, 1]
    # Returned exactly at the boundary: the level carried into the later slot is the
    # one before it, so the seat still counts there.
    returned = [entry(DAY0 + 10, "checkout", 2), entry(DAY0 + 2 * SLOT, "checkin", 1)]
    assert peaks(returned) == [2, 2, 2, 1]
    denied = [entry(DAY0 + SLOT, "denied", reason="seats_exhausted")]
    assert [
        s.denials
        for s in usage_slots(denied, licence=None, start=DAY0, end=DAY0 + 2 * SLOT, slot=SLOT)
    ] == [0, 1]


def test_the_level_is_carried_into_empty_slots_and_from_before_the_start() -> None:
    before = [entry(DAY0 - 3600, "checkout", 1), entry(DAY0 - 60, "checkout", 3)]
    assert peaks(before) == [3, 3, 3, 3]
    assert peaks([*before, entry(DAY0 + 30, "checkin", 0)]) == [3, 0, 0, 0]
    # A spike inside a slot is its peak even if gone by the next one.
    spike = [entry(DAY0 + 200, "checkout", 5), entry(DAY0 + 250, "checkin", 1)]
    assert peaks(spike) == [0, 5, 1, 1]
    # The last entry before the start is the one of the latest time, not the last given.
    assert peaks([entry(DAY0 - 60, "checkout", 3), entry(DAY0 - 3600, "checkout", 1)]) == [3] * 4


def test_only_seat_changes_move_the_level() -> None:
    entries = [
        entry(DAY0 + 10, "checkout", 2),
        entry(DAY0 + 200, "licence_updated", seats=50, detail={"changes": {"seats": [10, 50]}}),
        entry(DAY0 + 210, "denied", 9, reason="seats_exhausted"),  # in_use of the refusal
        entry(DAY0 + 220, "reload", 7),
        entry(DAY0 + 400, "revoke", 1),
        entry(DAY0 + 600, "reclaim", 0),
        entry(DAY0 + 610, "checkout", True),  # not a count: ignored
        {"time": "soon", "event": "checkout", "licence": "cad", "detail": {"in_use": 30}},
    ]
    assert peaks(entries, slots=5) == [2, 2, 2, 1, 0]


def test_entries_at_or_after_the_end_are_ignored() -> None:
    entries = [entry(DAY0 + 10, "checkout", 1), entry(DAY0 + 2 * SLOT, "checkout", 8)]
    assert peaks(entries, slots=2) == [1, 1]


def test_two_licences_are_summed_when_no_licence_is_named() -> None:
    entries = [
        entry(DAY0 - 10, "checkout", 2),  # cad: 2 from before the start
        {**entry(DAY0 + 10, "checkout", 3), "licence": "cam"},  # 5 together
        entry(DAY0 + 20, "checkin", 0),  # 3
        entry(DAY0 + SLOT + 5, "checkout", 1),  # 4
        {**entry(DAY0 + 2 * SLOT + 1, "checkin", 0), "licence": "cam"},  # 1
    ]
    assert peaks(entries, licence=None) == [5, 4, 4, 1]
    assert peaks(entries, licence="cad") == [2, 1, 1, 1]
    assert peaks(entries, licence="cam") == [3, 3, 3, 0]
    # The peak of the sum, not the sum of the peaks: cad's 2 and cam's 3 never overlap.
    apart = [entry(DAY0 + 10, "checkout", 2), entry(DAY0 + 20, "checkin", 0)]
    apart += [{**entry(DAY0 + 30, "checkout", 3), "licence": "cam"}]
    assert peaks(apart, slots=1, licence=None) == [3]


def test_overdraft_checkouts_and_denials_are_counted_per_slot() -> None:
    entries = [
        entry(
            DAY0 + 1, "checkout", 11, reason="overdraft", detail={"in_use": 11, "overdraft": True}
        ),
        entry(DAY0 + 2, "checkout", 12, detail={"in_use": 12, "overdraft": True}),
        entry(DAY0 + 3, "denied", reason="seats_exhausted"),
        entry(DAY0 + SLOT + 1, "denied", reason="seats_exhausted"),
        entry(DAY0 + SLOT + 2, "denied", reason="not_allowed"),
        entry(DAY0 + SLOT + 3, "checkout", 12, detail={"in_use": 12, "overdraft": False}),
    ]
    slots = usage_slots(entries, licence="cad", start=DAY0, end=DAY0 + 2 * SLOT, slot=SLOT)
    assert [(s.peak, s.denials, s.overdraft) for s in slots] == [(12, 1, 2), (12, 2, 0)]


def test_a_counted_denial_entry_counts_every_denial_it_stands_for() -> None:
    entries = [
        entry(DAY0 + 1, "denied", reason="seats_exhausted"),
        entry(DAY0 + 50, "denied", reason="seats_exhausted", detail={"count": 41}),
        entry(DAY0 + SLOT + 1, "denied", reason="seats_exhausted", detail={"count": "x"}),
    ]
    slots = usage_slots(entries, licence="cad", start=DAY0, end=DAY0 + 2 * SLOT, slot=SLOT)
    assert [s.denials for s in slots] == [42, 1]


def test_a_range_off_the_boundaries_ends_with_a_partial_slot() -> None:
    slots = usage_slots([], licence=None, start=DAY0, end=DAY0 + 400, slot=SLOT)
    assert [(s.start - DAY0, s.end - DAY0) for s in slots] == [(0, 180), (180, 360), (360, 400)]
    with pytest.raises(ValueError, match="start before its end"):
        usage_slots([], licence=None, start=DAY0, end=DAY0, slot=SLOT)


def test_window_aligns_to_absolute_slots_and_defaults_to_the_last_day() -> None:
    now = DAY0 + 5 * 3600 + 100  # 05:01:40
    start, end = report.window(None, None, SLOT, now)
    assert (start, end) == (DAY0 + 5 * 3600 + 180 - DAY, DAY0 + 5 * 3600 + 180)
    assert report.slot_count(start, end, SLOT) == 480  # a day of 3-minute slots
    assert report.window(DAY0 + 10, DAY0 + 3600 + 1, 3600, now) == (DAY0, DAY0 + 7200)
    assert report.window(None, DAY0 + DAY, SLOT, now) == (DAY0, DAY0 + DAY)
    with pytest.raises(ValueError, match="--from must be before --to"):
        report.window(DAY0 + 7200, DAY0, SLOT, now)
    with pytest.raises(ValueError, match="too many"):
        report.window(DAY0 - 30 * DAY, None, 1, now)


@pytest.mark.parametrize(("text", "seconds"), [("3m", 180.0), ("1h", 3600.0), ("90", 90.0)])
def test_parse_slot(text: str, seconds: float) -> None:
    assert report.parse_slot(text) == seconds


@pytest.mark.parametrize("text", ["0", "0.5s", "1.5s", "fast", "-3m"])
def test_parse_slot_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="slot"):
        report.parse_slot(text)


# ------------------------------------------------------------------------ output


def day_usage(seed: int = 4, seats: int | None = 10) -> Usage:
    slots = usage_slots(Day(seed).numbered(), licence="cad", start=DAY0, end=DAY0 + DAY, slot=SLOT)
    return Usage("cad", DAY0, DAY0 + DAY, SLOT, seats, tuple(slots))


def test_csv_has_a_header_and_a_row_per_slot_with_iso_times() -> None:
    usage = day_usage()
    rows = list(csv.reader(report.render(usage, "csv").splitlines()))
    assert rows[0] == ["slot_start", "slot_end", "peak", "denials", "overdraft"]
    assert len(rows) == 481
    assert rows[1][:2] == ["2026-09-21T00:00:00.000Z", "2026-09-21T00:03:00.000Z"]
    assert rows[-1][1] == "2026-09-22T00:00:00.000Z"
    assert [int(r[2]) for r in rows[1:]] == [s.peak for s in usage.slots]
    assert [int(r[3]) for r in rows[1:]] == [s.denials for s in usage.slots]


def test_json_is_an_array_of_slot_objects() -> None:
    usage = day_usage()
    data = json.loads(report.render(usage, "json"))
    assert isinstance(data, list) and len(data) == 480
    assert data[1] == {
        "slot_start": "2026-09-21T00:03:00.000Z",
        "slot_end": "2026-09-21T00:06:00.000Z",
        "peak": usage.slots[1].peak,
        "denials": usage.slots[1].denials,
        "overdraft": usage.slots[1].overdraft,
    }


def test_the_table_shows_a_day_in_half_hour_rows_with_bars() -> None:
    usage = day_usage()
    lines = report.render(usage, "table").splitlines()
    assert lines[0] == (
        "Seats in use, licence cad (10 seats now): 2026-09-21 00:00:00Z to"
        " 2026-09-22 00:00:00Z, 3m slots (480), 30m a row"
    )
    assert lines[2].split() == [
        "FROM",
        "(UTC)",
        "PEAK",
        "DENIED",
        "OVERDRAFT",
        "SEATS",
        "IN",
        "USE",
    ]
    rows = lines[3:51]
    assert [r[:20].strip() for r in rows[:2]] == ["2026-09-21 00:00:00Z", "2026-09-21 00:30:00Z"]
    assert lines[51] == ""
    for i, row in enumerate(rows):
        group = usage.slots[i * 10 : (i + 1) * 10]
        peak, denied, over = row[20:].split()[:3]
        assert int(peak) == max(s.peak for s in group)
        assert int(denied) == sum(s.denials for s in group)
        assert int(over) == sum(s.overdraft for s in group)
        bar = row[47:]
        assert len(bar.rstrip("│ ")) == round(int(peak) * 40 / 12) or (int(peak) == 0 and not bar)
        assert ("▒" in bar) == (int(peak) > 10)  # beyond the seats
    assert "denied" in lines[52] and "overdraft checkouts" in lines[52]


def test_the_table_has_a_row_per_slot_for_short_ranges() -> None:
    slots = (Slot(DAY0, DAY0 + 60, 0, 0, 0), Slot(DAY0 + 60, DAY0 + 120, 4, 1, 1))
    text = report.table_text(Usage(None, DAY0, DAY0 + 120, 60, 3, slots))
    lines = text.splitlines()
    assert "all licences (3 seats now)" in lines[0] and "a row" not in lines[0]
    assert lines[3].split() == ["2026-09-21", "00:00:00Z", "0", "0", "0", "│"]
    assert lines[4].split()[2:5] == ["4", "1", "1"]
    assert lines[4].endswith("█" * 30 + "▒" * 10)
    assert "peak 4 at 2026-09-21 00:01:00Z; 1 of 2 slots at or over the seats" in text


def test_the_svg_is_well_formed_with_a_bar_per_slot_and_markers() -> None:
    usage = day_usage()
    root = ET.fromstring(report.svg_text(usage))
    assert root.tag == f"{SVG}svg"
    bars = root.findall(f".//{SVG}rect[@class='peak']")
    assert len(bars) == 480
    heights = [float(b.attrib["height"]) for b in bars]
    top = max(s.peak for s in usage.slots)
    assert heights.index(max(heights)) == [s.peak for s in usage.slots].index(top)
    assert all(h == 0 for h, s in zip(heights, usage.slots, strict=True) if s.peak == 0)
    denied = root.findall(f".//{SVG}circle[@class='denied']")
    assert len(denied) == sum(1 for s in usage.slots if s.denials)
    over = root.findall(f".//{SVG}circle[@class='overdraft']")
    assert len(over) == sum(1 for s in usage.slots if s.overdraft)
    title = root.findtext(f"{SVG}title") or ""
    assert "licence cad" in title and "2026-09-21 00:00:00Z to 2026-09-22 00:00:00Z" in title
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "10 seats" in texts and "00:00" in texts and "12:00" in texts


def test_the_svg_escapes_text() -> None:
    slots = (Slot(DAY0, DAY0 + 60, 2, 0, 0),)
    svg = report.svg_text(Usage('a<b&"c"', DAY0, DAY0 + 60, 60, None, slots))
    root = ET.fromstring(svg)
    assert 'licence a<b&"c"' in (root.findtext(f"{SVG}title") or "")
    assert len(root.findall(f".//{SVG}rect[@class='peak']")) == 1


# ------------------------------------------------------------------ from the daemon


def test_fetch_pages_through_the_log_up_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "PAGE", 2)
    log = [
        {
            "id": 1,
            "time": DAY0 - 50,
            "event": "checkout",
            "licence": "cad",
            "detail": {"in_use": 1},
        },
        {"id": 2, "time": DAY0 + 5, "event": "checkout", "licence": "cad", "detail": {"in_use": 2}},
        {"id": 3, "time": DAY0 + 70, "event": "checkin", "licence": "cad", "detail": {"in_use": 1}},
    ]
    calls: list[tuple[str, dict[str, Any]]] = []

    def call(op: str, **args: Any) -> dict[str, Any]:
        calls.append((op, args))
        if op == "licence.list":
            return {"licences": [{"id": "cad", "seats": 10}, {"id": "cam", "seats": 4}]}
        page = [e for e in log if e["id"] > args["after"]][: args["limit"]]
        return {"entries": page, "last": page[-1]["id"] if page else args["after"]}

    usage = report.fetch(call, "cad", DAY0, DAY0 + 120, 60)
    assert [s.peak for s in usage.slots] == [2, 2]
    assert usage.seats == 10 and usage.licence == "cad"
    audits = [args for op, args in calls if op == "audit"]
    assert [a["after"] for a in audits] == [0, 2]  # from the very first entry
    assert all(a["until"] == DAY0 + 120 and "since" not in a for a in audits)
    assert report.fetch(call, None, DAY0, DAY0 + 120, 60).seats == 14
    assert report.fetch(call, "gone", DAY0, DAY0 + 120, 60).seats is None


def test_a_licence_name_with_control_characters_is_shown_escaped() -> None:
    slots = (Slot(DAY0, DAY0 + 60, 2, 0, 0),)
    usage = Usage("cad\n\x1b[2J\x00", DAY0, DAY0 + 60, 60, None, slots)
    for text in (report.table_text(usage), report.svg_text(usage)):
        assert "\x1b" not in text and "\x00" not in text and "licence cad\\n\\x1b[2J\\x00" in text
    ET.fromstring(report.svg_text(usage))  # XML 1.0 allows no NUL or ESC: still well-formed
