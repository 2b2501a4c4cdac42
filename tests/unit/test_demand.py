"""Tests of licd.cli.demand: the report by holder and the seat suggestion, on hand-made
audit entries whose answers are worked out by hand in the comments.

The range is one hour, [T0, T0 + 3600); `--within` is 10 minutes throughout.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from licd.cli import demand
from licd.cli.demand import KeyUsage, Log, Period, by_key, read_log, suggest

T0 = 1_789_981_200.0  # 2026-09-21 09:00:00Z
HOUR = 3600.0
WITHIN = 600.0


def entry(
    t: float,
    event: str,
    user: str,
    handle: str | None = None,
    *,
    licence: str | None = "cad",
    seats: int = 1,
    reason: str | None = None,
    ip: str | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """An audit entry as the `audit` op returns it, `t` seconds after T0."""
    return {
        "id": 0,
        "time": T0 + t,
        "event": event,
        "licence": licence,
        "handle": handle,
        "host": f"ws-{user}",
        "hostid": f"id-{user}",
        "user": user,
        "ip": ip,
        "seats": seats,
        "reason": reason,
        "admin_uid": None,
        "detail": detail,
    }


def log_of(*entries: dict[str, Any], licence: str | None = None) -> Log:
    return read_log(entries, licence=licence, within=WITHIN)


def rows(log: Log, by: str, **kw: Any) -> dict[str, KeyUsage]:
    return {x.key: x for x in by_key(log, by, start=T0, end=T0 + HOUR, **kw)}


# ---------------------------------------------------------------- the report by key

# alice: h1 from before the hour to +1800 (600 s reported idle), h2 (2 seats) +600..+700.
# bob: h3 from +1000, never returned. carol: refused at +100 (a counted entry of 3) and
# served at +400 (h4, to +1000). dave: refused for a seat at +200 and by a rule at +2000,
# never served. erin: refused at +300, served only at +1000 (h5): 700 s later. frank:
# served from the queue at +1500 after 120 s (h6). gina: queued, left after 300 s at +1200.
HOUR_LOG = (
    entry(-600, "checkout", "alice", "h1", in_use=1),
    entry(100, "denied", "carol", reason="seats_exhausted", count=3, first=T0 + 40),
    entry(200, "denied", "dave", reason="seats_exhausted"),
    entry(300, "denied", "erin", reason="seats_exhausted"),
    entry(400, "checkout", "carol", "h4"),
    entry(600, "checkout", "alice", "h2", seats=2, app="viewer"),
    entry(700, "checkin", "alice", "h2"),
    entry(1000, "checkout", "bob", "h3"),
    entry(1000, "checkin", "carol", "h4", idle=30),
    entry(1000, "checkout", "erin", "h5"),
    entry(1200, "queue_left", "gina", waited=300, why="gone"),
    entry(1500, "checkout", "frank", "h6", queued=120),
    entry(1800, "checkin", "alice", "h1", idle=600),
    entry(2000, "denied", "dave", reason="denied", rule="deny"),
    entry(2400, "checkin", "erin", "h5"),
    entry(3000, "checkin", "frank", "h6", idle=60),
)


def test_peak_p95_and_seat_hours_per_user() -> None:
    by = rows(log_of(*HOUR_LOG), "user")
    alice = by["alice"]
    # 1 seat for [0, 600), 3 for [600, 700), 1 for [700, 1800), none after: 3 seats at
    # once for 100 s (2.8% of the hour, within the 5%), 1 for 1700 s more.
    assert (alice.peak, alice.p95) == (3, 1)
    assert alice.seat_hours == pytest.approx((600 + 3 * 100 + 1100) / 3600)
    assert alice.checkouts == 1  # h1 began before the hour
    assert alice.idle_hours == pytest.approx(600 / 3600)
    bob = by["bob"]  # 1 seat from +1000 to the end: 2600 s
    assert (bob.peak, bob.p95, bob.checkouts) == (1, 1, 1)
    assert bob.seat_hours == pytest.approx(2600 / 3600)
    # The most seat-hours first (bob 2600 s, alice 2000, frank 1500, erin 1400, carol
    # 600), then the highest peak, then by name.
    assert list(by) == ["bob", "alice", "frank", "erin", "carol", "dave", "gina"]


def test_denials_split_into_true_and_later_served_counting_every_counted_one() -> None:
    by = rows(log_of(*HOUR_LOG), "user")
    split = {k: (x.true_denials, x.later_served) for k, x in by.items()}
    assert split["carol"] == (0, 3)  # the counted entry's 3, served 300 s later
    assert split["dave"] == (2, 0)  # one for a seat, one by a rule: neither served
    assert split["erin"] == (1, 0)  # served, but 700 s later: more than 10 minutes
    assert split["gina"] == (1, 0)  # left the queue, never served
    assert split["alice"] == split["bob"] == split["frank"] == (0, 0)
    # With 15 minutes, erin's was later served.
    wide = read_log(HOUR_LOG, licence=None, within=900)
    erin = {x.key: x for x in by_key(wide, "user", start=T0, end=T0 + HOUR)}["erin"]
    assert (erin.true_denials, erin.later_served) == (0, 1)


def test_time_queued_counts_waits_served_and_not() -> None:
    by = rows(log_of(*HOUR_LOG), "user")
    frank, gina = by["frank"], by["gina"]
    assert (frank.queued, frank.queued_hours, frank.queued_median) == (1, 120 / 3600, 120)
    assert (gina.queued, gina.queued_hours, gina.queued_median) == (1, 300 / 3600, 300)
    assert (gina.peak, gina.seat_hours, gina.checkouts) == (0, 0, 0)
    everyone = rows(log_of(*(dict(e, user="x") for e in HOUR_LOG)), "user")["x"]
    assert (everyone.queued, everyone.queued_median) == (2, 210)  # median of 120 and 300
    assert everyone.idle_hours == pytest.approx((30 + 600 + 60) / 3600)


def test_by_host_app_and_group() -> None:
    log = log_of(*HOUR_LOG)
    assert rows(log, "host")["ws-alice"] == replace(rows(log, "user")["alice"], key="ws-alice")
    apps = rows(log, "app")
    # Only h2's checkout names its app: 2 seats for 100 s. Everything else has none.
    assert (apps["viewer"].peak, apps["viewer"].p95, apps["viewer"].checkouts) == (2, 0, 1)
    assert set(apps) == {"viewer", demand.NONE}
    assert apps[demand.NONE].true_denials == 4 and apps[demand.NONE].later_served == 3
    groups = {"cad": ("user:alice", "user:bob"), "ws": ("host:ws-*",), "nobody": ("user:zed",)}
    grouped = rows(log, "group", groups=groups)
    assert set(grouped) == {"cad", "ws"}  # everyone is a ws-*; nobody is in none
    assert grouped["ws"].checkouts == 5
    # alice and bob together: 1 seat [0, 600), 3 [600, 700), 1 [700, 1000), 2 [1000, 1800),
    # 1 [1800, 3600): 2 or more for 900 s (25%), so the p95 is 2.
    assert (grouped["cad"].peak, grouped["cad"].p95) == (3, 2)
    assert grouped["cad"].seat_hours == pytest.approx((600 + 300 + 300 + 1600 + 1800) / 3600)
    alone = rows(log, "group", groups={"cad": ("user:alice",)})
    assert alone[demand.NONE].checkouts == 4  # bob, carol, erin, frank


def test_a_holder_in_a_group_by_address() -> None:
    log = log_of(
        entry(0, "checkout", "alice", "h1", ip="10.1.2.3"),
        entry(0, "checkout", "bob", "h2", ip="192.0.2.1"),
    )
    groups = {"lab": ("ip:10.0.0.0/8",), "cad": ("user:alice", "user:bob")}
    grouped = rows(log, "group", groups=groups)
    assert (grouped["lab"].peak, grouped["cad"].peak) == (1, 2)  # alice counts in both


def test_p95_is_the_lowest_level_exceeded_at_most_5_percent_of_the_time() -> None:
    # 2 seats for exactly 5% of the hour (180 s), 1 for 10% more: the p95 is 1; for 181 s
    # it would be 2.
    for more, p95 in ((0, 1), (1, 2)):
        log = log_of(
            entry(0, "checkout", "x", "h1"),
            entry(360, "checkin", "x", "h1"),
            entry(180 - more, "checkout", "x", "h2"),
            entry(360, "checkin", "x", "h2"),
        )
        x = rows(log, "user")["x"]
        assert (x.peak, x.p95) == (2, p95)
    assert demand.p95({0: 95.0, 3: 5.0}) == 0 and demand.p95({0: 94.0, 3: 6.0}) == 3


def test_later_served_means_within_the_window_both_ends_included() -> None:
    def split(gap: float) -> tuple[int, int]:
        log = log_of(
            entry(100, "denied", "x", reason="seats_exhausted"),
            entry(100 + gap, "checkout", "x", "h1"),
        )
        x = rows(log, "user")["x"]
        return (x.true_denials, x.later_served)

    assert [split(gap) for gap in (0, 600, 601)] == [(0, 1), (0, 1), (1, 0)]
    # Another holder's checkout (another host id, or another licence) serves nobody else.
    other = log_of(
        entry(100, "denied", "x", reason="seats_exhausted"),
        entry(200, "checkout", "y", "h1"),
        entry(200, "checkout", "x", "h2", licence="cam"),
    )
    assert rows(other, "user")["x"].true_denials == 1


def test_a_seat_returned_and_taken_at_one_instant_is_held_once_in_log_order() -> None:
    handover = [entry(0, "checkout", "x", "h1"), entry(0, "checkout", "x", "h2")]
    returned_first = [entry(-60, "checkout", "x", "h1"), entry(60, "checkin", "x", "h1")]
    returned_first.append(entry(60, "checkout", "x", "h2"))
    taken_first = [returned_first[0], returned_first[2], returned_first[1]]
    assert rows(log_of(*returned_first), "user")["x"].peak == 1
    assert rows(log_of(*taken_first), "user")["x"].peak == 2
    assert rows(log_of(*handover), "user")["x"].peak == 2


def test_a_lease_whose_checkout_left_the_log_counts_from_before_the_range() -> None:
    # Retention took its checkout: its checkin alone says it was held until +900.
    by = rows(log_of(entry(900, "checkin", "alice", "h1", idle=90)), "user")["alice"]
    assert (by.peak, by.checkouts, by.seat_hours) == (1, 0, 0.25)
    assert by.idle_hours == pytest.approx(90 / 3600)


def test_only_the_licence_asked_for() -> None:
    log = log_of(*HOUR_LOG, entry(0, "checkout", "alice", "h9", licence="cam"), licence="cam")
    assert [x.key for x in by_key(log, "user", start=T0, end=T0 + HOUR)] == ["alice"]
    assert log.refusals == []


def test_outside_the_range_nothing_counts() -> None:
    log = log_of(*HOUR_LOG)
    later = {x.key for x in by_key(log, "user", start=T0 + 3000, end=T0 + 2 * HOUR)}
    assert later == {"bob", "frank"}  # held into it (frank returned at its start)
    first = {x.key: x for x in by_key(log, "user", start=T0, end=T0 + 150)}
    assert set(first) == {"alice", "carol"}
    assert first["carol"].later_served == 3  # served after the range: it still counts
    assert first["alice"].idle_hours == 0  # h1's idle time is told after the range


# --------------------------------------------------------------------- the suggestion

# Licence cam, 2 seats (docs/admin.md's worked example). ann holds [0, 1000), bob [100,
# 1100). cy is refused at +500 and served at +1000 (L3, to +1600). dee is refused at +600,
# +610 and (a counted entry of 2) +900, never served: one request. eve waits in the queue
# from +800 and is served at +1100 (L4, to +1500). zed is refused by a rule. Lease lengths
# 1000, 1000, 600, 400: dee's request holds its seat 800 s (their median).
# Requests: ann 0-1000, bob 100-1100, cy 500-1600, dee 600-1400, eve 800-1500; cy, dee and
# eve in fact not served at once: 3 of 5.
#   1 seat:  ann; bob, cy, dee, eve refused      4 of 5
#   2 seats: ann, bob; cy, dee, eve refused      3 of 5 (as it was)
#   3 seats: ann, bob, cy; dee, eve refused      2 of 5
#   4 seats: ann, bob, cy, dee; eve refused      1 of 5
#   5 seats: none refused
CAM_LOG = (
    entry(0, "checkout", "ann", "L1", licence="cam"),
    entry(100, "checkout", "bob", "L2", licence="cam"),
    entry(500, "denied", "cy", licence="cam", reason="seats_exhausted", rule="seats"),
    entry(600, "denied", "dee", licence="cam", reason="seats_exhausted"),
    entry(610, "denied", "dee", licence="cam", reason="seats_exhausted"),
    entry(900, "denied", "dee", licence="cam", reason="seats_exhausted", count=2),
    entry(950, "denied", "zed", licence="cam", reason="denied", rule="deny"),  # not a seat
    entry(1000, "checkin", "ann", "L1", licence="cam"),
    entry(1000, "checkout", "cy", "L3", licence="cam"),
    entry(1100, "checkin", "bob", "L2", licence="cam"),
    entry(1100, "checkout", "eve", "L4", licence="cam", queued=300),
    entry(1500, "checkin", "eve", "L4", licence="cam"),
    entry(1600, "checkin", "cy", "L3", licence="cam"),
)


def cam(target: float, *entries: dict[str, Any]) -> demand.Suggestion:
    log = log_of(*(entries or CAM_LOG))
    return suggest(
        log, "cam", start=T0, end=T0 + HOUR, target=target, within=WITHIN, seats=2, peak=2
    )


def test_the_demand_replayed_from_the_log() -> None:
    wanted = demand.demand(log_of(*CAM_LOG), "cam", start=T0, end=T0 + HOUR, within=WITHIN)
    assert wanted.hold == 800
    assert wanted.held == []
    assert [(r.asked - T0, r.until - T0, r.refused) for r in wanted.asks] == [
        (0, 1000, False),
        (100, 1100, False),
        (500, 1600, True),
        (600, 1400, True),
        (800, 1500, True),
    ]
    assert [demand.replay(wanted, n) for n in range(1, 7)] == [4, 3, 2, 1, 0, 0]


@pytest.mark.parametrize(
    ("target", "seats", "replayed"),
    [(0.0, 5, 0), (0.01, 5, 0), (0.2, 4, 1), (0.39, 4, 1), (0.4, 3, 2), (0.6, 2, 3), (0.8, 1, 4)],
)
def test_the_fewest_seats_that_keep_refusals_under_the_target(
    target: float, seats: int, replayed: int
) -> None:
    got = cam(target)
    assert (got.suggested, got.replayed, got.requests, got.refused) == (seats, replayed, 5, 3)
    assert got.rate == 0.6 and got.replayed_rate == replayed / 5
    assert (got.seats, got.peak, got.hold) == (2, 2, 800)


def test_a_lease_held_as_the_range_starts_holds_its_seat_in_every_replay() -> None:
    # q held [-1000, -200): gone before the range. p holds [-500, 300). x takes a seat
    # [100, 200). y is refused at -100 (before the range: its request is not the range's)
    # and at +200 (the same run), then at +1000, 800 s after: a new request, held for the
    # median lease (of 800, 800 and 100 s): to +1800.
    entries = (
        entry(-1000, "checkout", "q", "Q", licence="cam"),
        entry(-500, "checkout", "p", "P", licence="cam"),
        entry(-200, "checkin", "q", "Q", licence="cam"),
        entry(-100, "denied", "y", licence="cam", reason="seats_exhausted"),
        entry(100, "checkout", "x", "X", licence="cam"),
        entry(200, "checkin", "x", "X", licence="cam"),
        entry(200, "denied", "y", licence="cam", reason="seats_exhausted"),
        entry(300, "checkin", "p", "P", licence="cam"),
        entry(1000, "denied", "y", licence="cam", reason="seats_exhausted"),
    )
    wanted = demand.demand(log_of(*entries), "cam", start=T0, end=T0 + HOUR, within=WITHIN)
    assert wanted.held == [(T0 + 300, 1)]
    assert [(r.asked - T0, r.until - T0) for r in wanted.asks] == [(100, 200), (1000, 1800)]
    assert [demand.replay(wanted, n) for n in (1, 2)] == [1, 0]  # p's seat stops x at 1
    assert cam(0.01, *entries).suggested == 2
    assert cam(0.5, *entries).suggested == 1


def test_a_seat_given_back_as_a_request_asks_is_free_for_it() -> None:
    # x holds [0, 300); y asks at 300 exactly (and holds to 400): 1 seat is enough.
    entries = (
        entry(0, "checkout", "x", "X", licence="cam"),
        entry(300, "checkout", "y", "Y", licence="cam"),
        entry(300, "checkin", "x", "X", licence="cam"),
        entry(400, "checkin", "y", "Y", licence="cam"),
    )
    assert cam(0.0, *entries).suggested == 1


def test_a_queued_checkout_that_left_is_asked_when_it_queued() -> None:
    # x queued at +100 and left at +400; it came back and was served at +500: one request,
    # asked at +100. y queued at +1000 and left after 200 s, never served: asked at +1000.
    entries = (
        entry(400, "queue_left", "x", licence="cam", waited=300, why="gone"),
        entry(500, "checkout", "x", "X", licence="cam"),
        entry(900, "checkin", "x", "X", licence="cam"),
        entry(1200, "queue_left", "y", licence="cam", waited=200, why="gone"),
    )
    wanted = demand.demand(log_of(*entries), "cam", start=T0, end=T0 + HOUR, within=WITHIN)
    assert [(r.asked - T0, r.until - T0, r.refused) for r in wanted.asks] == [
        (100, 900, True),
        (1000, 1400, True),  # held for the one lease's 400 s
    ]


def test_nothing_asked_suggests_one_seat() -> None:
    got = cam(0.01, entry(0, "checkout", "a", "L1", licence="other"))
    assert (got.requests, got.refused, got.suggested, got.rate, got.hold) == (0, 0, 1, 0.0, WITHIN)


def test_a_request_for_more_seats_than_any_licence_smaller_has() -> None:
    # 3 seats at once: refused by 1 and 2 seats alike, served by 3.
    got = cam(0.01, entry(0, "checkout", "a", "L1", licence="cam", seats=3))
    assert (got.suggested, got.replayed) == (3, 0)


# ------------------------------------------------------------------ parsing, output


@pytest.mark.parametrize(("text", "share"), [("1%", 0.01), ("0.5%", 0.005), ("0%", 0.0)])
def test_parse_rate(text: str, share: float) -> None:
    assert demand.parse_rate(text) == pytest.approx(share)


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.01", "give a percentage"), ("x%", "not a percentage"), ("100%", "below 100%")],
)
def test_parse_rate_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demand.parse_rate(text)


PERIOD = Period(T0, T0 + HOUR, None, WITHIN)


def test_by_output_as_table_csv_and_json() -> None:
    found = by_key(log_of(*HOUR_LOG), "user", start=T0, end=T0 + HOUR)
    mapped = json.loads(demand.by_text(found, "user", "json", PERIOD))
    assert mapped[1] == {
        "user": "alice",
        "peak": 3,
        "p95": 1,
        "seat_hours": 0.556,
        "checkouts": 1,
        "true_denials": 0,
        "later_served": 0,
        "queued": 0,
        "queued_hours": 0.0,
        "queued_median": None,
        "idle_hours": 0.167,
    }
    read = list(csv.DictReader(io.StringIO(demand.by_text(found, "user", "csv", PERIOD))))
    assert [r["user"] for r in read] == [x["user"] for x in mapped]
    assert read[-1] == {k: "" if v is None else str(v) for k, v in mapped[-1].items()}
    assert read[-1]["true_denials"] == "1" and read[-1]["queued_median"] == "300.0"
    table = demand.by_text(found, "user", "table", PERIOD).splitlines()
    assert table[0] == (
        "Seats held by user, all licences, 2026-09-21 09:00:00Z to 2026-09-21 10:00:00Z"
    )
    assert table[2].split() == ["USER", *demand.BY_HEADERS]
    assert table[4].split() == ["alice", "3", "1", "0.56", "1", "0", "0", "0", "0.0", "-", "0.17"]
    gina = ["gina", "0", "0", "0.0", "0", "1", "0", "1", "0.08", "5m", "00s", "0.0"]
    assert table[9].split() == gina
    assert "within 10m 00s by a checkout" in " ".join(table[-5:])


def test_suggestion_output_as_table_csv_and_json() -> None:
    got = [cam(0.2)]
    mapped = json.loads(demand.suggestions_text(got, "json", PERIOD, 0.2))
    assert mapped == [
        {
            "licence": "cam",
            "seats": 2,
            "peak": 2,
            "requests": 5,
            "refused": 3,
            "denial_rate": 0.6,
            "suggested": 4,
            "replayed": 1,
            "replayed_rate": 0.2,
            "hold": 800.0,
        }
    ]
    lines = demand.suggestions_text(got, "csv", PERIOD, 0.2).splitlines()
    assert lines == [",".join(demand.SUGGEST_COLUMNS), "cam,2,2,5,3,0.6,4,1,0.2,800.0"]
    table = demand.suggestions_text(got, "table", PERIOD, 0.2).splitlines()
    assert table[0].startswith("Seats to refuse at most 20% of requests, all licences, ")
    half = demand.suggestions_text(got, "table", PERIOD, 0.005)
    assert half.startswith("Seats to refuse at most 0.5% of requests")
    assert table[3].split() == ["cam", "2", "2", "5", "60.0", "4", "20.0", "13m", "20s"]


def test_client_strings_are_escaped_in_tables_and_neutralised_in_csv() -> None:
    odd = log_of(entry(0, "checkout", "=cmd\x1b[31m", "h1"))
    found = by_key(odd, "user", start=T0, end=T0 + HOUR)
    assert "\x1b" not in demand.by_text(found, "user", "table", PERIOD)
    assert demand.by_text(found, "user", "csv", PERIOD).splitlines()[1].startswith("'=cmd")
    assert math.isfinite(found[0].seat_hours)


def test_the_worked_example_of_docs_admin_md_is_what_the_report_prints() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "admin.md").read_text("utf-8")
    period = Period(T0, T0 + HOUR, "cam", WITHIN)
    log = read_log(CAM_LOG, licence="cam", within=WITHIN)
    by_user = demand.by_text(by_key(log, "user", start=T0, end=T0 + HOUR), "user", "table", period)
    sized = demand.suggestions_text([cam(0.2)], "table", period, 0.2)
    for shown in (by_user, sized):
        table = shown.split("\n\n")[:2]  # the heading and the table, without the notes
        assert "\n\n".join(table) in text
    assert demand.suggestions_text([cam(0.2)], "json", period, 0.2) in text.replace("\n", " ")


class Daemon:
    """The admin ops the reports ask of a daemon, over a fixed log."""

    def __init__(self, entries: tuple[dict[str, Any], ...]) -> None:
        self.entries = [{**e, "id": i} for i, e in enumerate(entries, 1)]
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.asked.append((op, args))
        if op == "audit":
            page = [
                e for e in self.entries if e["id"] > args["after"] and e["time"] < args["until"]
            ]
            return {"entries": page, "last": page[-1]["id"] if page else args["after"]}
        if op == "licence.list":
            return {"licences": [{"id": "cam", "seats": 2}, {"id": "idle", "seats": 7}]}
        assert op == "groups"
        return {"groups": {"cad": ["user:ann", "user:bob"]}}


def test_fetch_suggestions_for_the_licences_there_are_and_those_used() -> None:
    gone = entry(10, "checkout", "ann", "G1", licence="gone", in_use=1)
    later = entry(HOUR + 10, "checkout", "ann", "X1", licence="later")  # after the range
    daemon = Daemon((*CAM_LOG, gone, later))
    got = demand.fetch_suggestions(daemon.call, None, T0, T0 + HOUR, WITHIN, 0.2)
    assert [(x.licence, x.seats, x.peak, x.requests, x.suggested) for x in got] == [
        ("cam", 2, 0, 5, 4),  # no in_use in these entries: the slot report sees none
        ("gone", None, 1, 1, 1),
        ("idle", 7, 0, 0, 1),
    ]
    assert daemon.asked[0] == ("audit", {"after": 0, "until": T0 + HOUR + WITHIN, "limit": 1000})
    only = demand.fetch_suggestions(daemon.call, "cam", T0, T0 + HOUR, WITHIN, 0.2)
    assert [x.licence for x in only] == ["cam"]


def test_fetch_by_group_asks_the_daemon_for_its_groups() -> None:
    daemon = Daemon(CAM_LOG)
    got = demand.fetch_by(daemon.call, "group", "cam", T0, T0 + HOUR, WITHIN)
    assert [(x.key, x.peak, x.checkouts) for x in got] == [("cad", 2, 2), ("(none)", 2, 2)]
    assert [op for op, _ in daemon.asked] == ["audit", "groups"]
    demand.fetch_by(daemon.call, "user", "cam", T0, T0 + HOUR, WITHIN)
    assert [op for op, _ in daemon.asked][2:] == ["audit"]  # no groups needed


def test_fetch_by_reads_past_the_end_for_the_checkouts_that_served_refusals() -> None:
    near_the_end = (
        entry(HOUR - 60, "denied", "x", reason="seats_exhausted"),
        entry(HOUR + 60, "checkout", "x", "h1"),  # after the range, within 10 minutes
    )
    [x] = demand.fetch_by(Daemon(near_the_end).call, "user", None, T0, T0 + HOUR, WITHIN)
    assert (x.true_denials, x.later_served, x.checkouts, x.peak) == (0, 1, 0, 0)
