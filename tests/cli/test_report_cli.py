"""Tests of `licd report usage` against a real daemon on its admin socket.

Seats are taken, refused and returned through a raw protocol peer while a fake clock
moves a minute at a time; the report, read from the daemon's audit log, must show each
minute's peak, denials and overdraft checkouts (see tests/cli/test_admin_cli.py), and
with --by and --suggest each holder's use and the seats a replay of the log suggests.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from licd.cli import demand
from licd.cli import format as fmt
from licd.clock import ManualClock
from licd.daemon import Daemon
from licd_client.messages import Holder
from tests.cli.test_admin_cli import connected, licd, ok, sock, take
from tests.integration.test_queue import Queued, detached
from tests.support import DICOM, holder, make_config, running

T0 = 1_790_000_000.0  # the fake clock's start: 20 s into its minute
MINUTE = T0 - 20  # that minute's start


def iso(t: float) -> str:
    return fmt.iso(t).replace(".000", "")


def span(first: float, last: float) -> tuple[str, ...]:
    return ("--from", iso(first), "--to", iso(last))


async def busy_minutes(daemon: Daemon, clock: ManualClock) -> None:
    """Minute 0: two seats taken. Minute 1: two more (the second beyond the 3 seats, in
    the overdraft), one refused, three returned: one left in use after that."""
    async with connected(daemon) as peer:
        a = await take(peer, "machine-a")
        await take(peer, "machine-b")
        clock.advance(60)
        b = await take(peer, "machine-c")
        c = await take(peer, "machine-d")
        assert c.get("overdraft") is True
        refused = await peer.checkout(h=None)
        assert refused["error"] == "seats_exhausted"
        for lease in (a, b, c):
            assert (await peer.call("checkin", lease=lease["lease"]))["ok"] is True
    await daemon.service.store.barrier()  # the denial's entry is written lazily


@pytest.fixture
async def busy(tmp_path: Path) -> Any:
    clock = ManualClock(wall=T0)
    config = make_config(tmp_path, replace(DICOM, overdraft=1))
    async with running(config, clock) as daemon:
        await busy_minutes(daemon, clock)
        yield daemon


async def test_usage_json_shows_each_minutes_peak(busy: Daemon) -> None:
    args = ("report", "usage", *sock(busy), "--slot", "1m", *span(MINUTE - 60, MINUTE + 180))
    slots = json.loads(await ok(*args, "--format", "json"))
    assert [s["slot_start"] for s in slots] == [fmt.iso(MINUTE + k * 60) for k in range(-1, 3)]
    assert slots[-1]["slot_end"] == fmt.iso(MINUTE + 180)
    assert [(s["peak"], s["denials"], s["overdraft"]) for s in slots] == [
        (0, 0, 0),  # before anything
        (2, 0, 0),
        (4, 1, 1),
        (1, 0, 0),  # the seat still held, carried on
    ]
    assert json.loads(await ok(*args, "--json")) == slots
    only = json.loads(await ok(*args, "--licence", "dicom-hq", "--format", "json"))
    assert only == slots
    other = json.loads(await ok(*args, "--licence", "nope", "--format", "json"))
    assert [s["peak"] for s in other] == [0, 0, 0, 0]


async def test_usage_csv_and_table(busy: Daemon) -> None:
    args = ("report", "usage", *sock(busy), "--slot", "1m", *span(MINUTE, MINUTE + 120))
    lines = (await ok(*args, "--format", "csv")).splitlines()
    assert lines == [
        "slot_start,slot_end,peak,denials,overdraft",
        f"{fmt.iso(MINUTE)},{fmt.iso(MINUTE + 60)},2,0,0",
        f"{fmt.iso(MINUTE + 60)},{fmt.iso(MINUTE + 120)},4,1,1",
    ]
    table = (await ok(*args)).splitlines()
    assert table[0].startswith("Seats in use, all licences (3 seats now): 2026-09-21 ")
    assert table[0].endswith(", 1m slots (2)")
    named = await ok(*args, "--licence", "dicom-hq")
    assert named.startswith("Seats in use, licence dicom-hq (3 seats now)")
    assert table[3].split()[2:5] == ["2", "0", "0"]
    assert table[4].split()[2:5] == ["4", "1", "1"] and table[4].endswith("▒" * 10)
    # Times off the minute are widened to whole slots.
    assert await ok(*args, "--format", "csv") == await ok(
        "report",
        "usage",
        *sock(busy),
        "--slot",
        "1m",
        *span(MINUTE + 5, MINUTE + 61),
        "--format",
        "csv",
    )


async def test_usage_writes_an_svg_chart(busy: Daemon, tmp_path: Path) -> None:
    path = tmp_path / "usage.svg"
    args = ("report", "usage", *sock(busy), "--slot", "1m", *span(MINUTE - 120, MINUTE + 180))
    out = await ok(*args, "--svg", str(path), "--licence", "dicom-hq")
    assert out.startswith("Seats in use")  # the table is still printed
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = root.findall(f".//{ns}rect[@class='peak']")
    assert len(bars) == 5
    assert [float(b.attrib["height"]) > 0 for b in bars] == [False, False, True, True, True]
    assert len(root.findall(f".//{ns}circle[@class='denied']")) == 1
    assert len(root.findall(f".//{ns}circle[@class='overdraft']")) == 1
    assert "licence dicom-hq" in (root.findtext(f"{ns}title") or "")
    nowhere = await licd(*args, "--svg", str(tmp_path / "no" / "usage.svg"))
    assert nowhere.exit_code == 1 and "Could not open file" in nowhere.stderr


async def test_usage_defaults_to_the_last_day_in_3_minute_slots(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:  # real time: nothing logged
        before = time.time()
        slots = json.loads(await ok("report", "usage", *sock(daemon), "--json"))
    assert len(slots) == 480 and all(s["peak"] == 0 for s in slots)
    first, last = (fmt.parse_time(slots[i][k]) for i, k in ((0, "slot_start"), (-1, "slot_end")))
    assert first % 180 == 0 and last - first == 86400
    assert before <= last < time.time() + 180


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--slot", "0"), "greater than 0"),
        (("--slot", "fast"), "invalid duration"),
        (("--slot", "1.5s"), "whole number of seconds"),
        (("--from", "yesterday"), "or give a duration"),
        (("--from", "2026-09-22T00:00:00Z", "--to", "2026-09-21T00:00:00Z"), "before --to"),
        (("--from", "400d", "--slot", "1s"), "too many"),
        (("--format", "xml"), "xml"),
    ],
)
async def test_usage_refuses_bad_options(args: tuple[str, ...], message: str) -> None:
    result = await licd("report", "usage", "--socket", "/nonexistent.sock", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


async def test_usage_without_a_daemon_is_an_error(tmp_path: Path) -> None:
    chart = tmp_path / "usage.svg"
    result = await licd(
        "report", "usage", "--socket", str(tmp_path / "admin.sock"), "--svg", str(chart)
    )
    assert result.exit_code == 1 and result.stderr.startswith("Error:")
    assert not chart.exists()  # nothing to chart: no file either


# ------------------------------------------------------------- by holder, suggestion


async def test_usage_by_host_from_the_daemons_log(busy: Daemon) -> None:
    # Over [MINUTE - 60, MINUTE + 180) (240 s): machine-b holds a seat from T0 to the end
    # (160 s), machine-a from T0 to T0 + 60; machine-c and -d took theirs at T0 + 60 and
    # returned them at once. machine-a (alice) was refused once, and never served.
    args = ("report", "usage", *sock(busy), "--by", "host", *span(MINUTE - 60, MINUTE + 180))
    rows = json.loads(await ok(*args, "--format", "json"))
    assert [(r["host"], r["peak"], r["p95"], r["checkouts"]) for r in rows] == [
        ("machine-b", 1, 1, 1),
        ("machine-a", 1, 1, 1),
        ("machine-c", 1, 0, 1),
        ("machine-d", 1, 0, 1),
    ]
    assert [r["seat_hours"] for r in rows] == [0.044, 0.017, 0.0, 0.0]
    denials = [(r["true_denials"], r["later_served"]) for r in rows]
    assert denials == [(0, 0), (1, 0), (0, 0), (0, 0)]
    assert json.loads(await ok(*args, "--json")) == rows
    users = json.loads(await ok(*args[:-5], "user", *args[-4:], "--json"))
    assert [(r["user"], r["peak"], r["checkouts"], r["true_denials"]) for r in users] == [
        ("alice", 4, 4, 1)
    ]
    lines = (await ok(*args, "--format", "csv")).splitlines()
    assert lines[0] == ",".join(["host", *demand.BY_COLUMNS])
    assert lines[1] == "machine-b,1,1,0.044,1,0,0,0,0.0,,0.0"
    table = (await ok(*args)).splitlines()
    assert table[0].startswith("Seats held by host, all licences, 2026-09-21 ")
    assert table[3].split()[:5] == ["machine-b", "1", "1", "0.04", "1"]


async def test_usage_by_group_and_app(tmp_path: Path) -> None:
    groups = {"radiology": ("host:ws-r*",), "local": ("ip:127.0.0.0/8",), "none": ("user:x",)}
    config = replace(make_config(tmp_path), groups=groups)
    async with running(config, ManualClock(wall=T0)) as daemon:
        async with connected(daemon) as peer:
            viewer = Holder("ws-r1", "id-r1", "alice", 1, app="viewer")
            assert (await peer.checkout(h=viewer))["ok"] is True
            await take(peer, "ws-x")
        args = ("report", "usage", *sock(daemon), *span(MINUTE, MINUTE + 60), "--json")
        by_group = json.loads(await ok(*args, "--by", "group"))
        by_app = json.loads(await ok(*args, "--by", "app"))
    assert [(r["group"], r["peak"]) for r in by_group] == [("local", 2), ("radiology", 1)]
    assert [(r["app"], r["peak"]) for r in by_app] == [("(none)", 1), ("viewer", 1)]


async def sizing(daemon: Daemon, clock: ManualClock) -> None:
    """3 seats: a, b and c take them at T0; d is refused at +60 and served at +180 (a
    returned its seat at +120); e is refused at +240 and never served; b, c and d return
    theirs at +300."""
    async with connected(daemon) as peer:
        a, b, c = [await take(peer, f"machine-{x}") for x in "abc"]
        clock.advance(60)
        assert (await peer.checkout(h=holder("machine-d")))["error"] == "seats_exhausted"
        clock.advance(60)
        assert (await peer.call("checkin", lease=a["lease"]))["ok"] is True
        clock.advance(60)
        d = await take(peer, "machine-d")
        clock.advance(60)
        assert (await peer.checkout(h=holder("machine-e")))["error"] == "seats_exhausted"
        clock.advance(60)
        for lease in (b, c, d):
            assert (await peer.call("checkin", lease=lease["lease"]))["ok"] is True
    daemon.service.flush_denials(daemon.service.now(), every=True)  # e's, if it was folded
    await daemon.service.store.barrier()


async def test_usage_suggest_replays_the_log(tmp_path: Path) -> None:
    # Requests: a [0, 120), b and c [0, 300), d asked at +60 [60, 300), e at +240 held for
    # the median lease (120, 300, 300, 120: 210 s). In fact d and e were refused: 2 of 5.
    # 3 seats refuse d alone (a's seat is free by +240); 4 refuse none.
    clock = ManualClock(wall=T0)
    async with running(make_config(tmp_path), clock) as daemon:
        await sizing(daemon, clock)
        args = ("report", "usage", *sock(daemon), "--suggest", *span(MINUTE, MINUTE + 600))
        [strict] = json.loads(await ok(*args, "--json"))
        [loose] = json.loads(await ok(*args, "--max-denial-rate", "20%", "--format", "json"))
        table = (await ok(*args, "--licence", "dicom-hq")).splitlines()
        csv_lines = (await ok(*args, "--format", "csv")).splitlines()
    assert strict == {
        "licence": "dicom-hq",
        "seats": 3,
        "peak": 3,
        "requests": 5,
        "refused": 2,
        "denial_rate": 0.4,
        "suggested": 4,
        "replayed": 0,
        "replayed_rate": 0.0,
        "hold": 210.0,
    }
    assert (loose["suggested"], loose["replayed"], loose["replayed_rate"]) == (3, 1, 0.2)
    assert table[0].startswith("Seats to refuse at most 1% of requests, licence dicom-hq, ")
    assert table[3].split() == ["dicom-hq", "3", "3", "5", "40.0", "4", "0.0", "3m", "30s"]
    assert csv_lines[1] == "dicom-hq,3,3,5,2,0.4,4,0,0.0,210.0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--by", "licence"), "'licence' is not one of"),
        (("--by", "user", "--suggest"), "give --by or --suggest, not both"),
        (("--by", "user", "--slot", "1m"), "--slot and --svg are for the report per slot"),
        (("--suggest", "--svg", "x.svg"), "--slot and --svg are for the report per slot"),
        (
            (
                "--within",
                "5m",
            ),
            "--within is for --by and --suggest",
        ),
        (("--by", "app", "--within", "0"), "greater than 0"),
        (("--by", "app", "--max-denial-rate", "2%"), "--max-denial-rate is for --suggest"),
        (("--suggest", "--max-denial-rate", "0.02"), "give a percentage"),
        (("--suggest", "--max-denial-rate", "100%"), "below 100%"),
        (
            ("--suggest", "--from", "2026-09-22T00:00:00Z", "--to", "2026-09-21T00:00:00Z"),
            "before --to",
        ),
    ],
)
async def test_usage_by_and_suggest_refuse_bad_options(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = await licd("report", "usage", "--socket", "/nonexistent.sock", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.svg").exists()


async def test_a_year_by_holder_needs_no_longer_slot(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:  # real time: nothing logged
        rows = json.loads(
            await ok("report", "usage", *sock(daemon), "--by", "user", "--from", "400d", "--json")
        )
    assert rows == []


async def test_usage_by_host_and_suggest_read_the_queue_and_idle_time(tmp_path: Path) -> None:
    # One seat. a holds it from T0 and reports 20 s idle; b queues at T0 and is served
    # from the queue when a returns the seat at +30 (to +60); c queues at +30, vanishes
    # and leaves the queue 10.5 s later. Requests: a [0, 30), b asked at 0 [0, 60), c
    # asked at +30 and never served (held for the median lease, 30 s): b and c were not
    # served at once. 1 seat refuses b alone; 2 refuse none.
    one = replace(DICOM, seats=1, lease_ttl=30.0)
    clock = ManualClock(wall=T0)
    async with running(make_config(tmp_path, one), clock) as daemon:
        async with connected(daemon) as a:
            held = await take(a, "a")
            b = await Queued.send(daemon, holder("b"))
            assert await b.update() == (1, 1)
            clock.advance(25)
            beat = await a.call(
                "heartbeat", lease=held["lease"], nonce=os.urandom(16), idle_for=20.0
            )
            assert beat["ok"] is True
            clock.advance(5)
            assert (await a.call("checkin", lease=held["lease"]))["ok"] is True
            served = await b.frame()
            assert served["ok"] is True and served["lease"]
            c = await Queued.send(daemon, holder("c"))
            assert await c.update() == (1, 1)
            await c.peer.close()
            await detached(daemon, "id-c")
            clock.advance(10.5)
            daemon.service.tick_queues(clock.now())
            clock.advance(19.5)
            assert (await b.peer.call("checkin", lease=served["lease"]))["ok"] is True
            await b.peer.close()
        await daemon.service.store.barrier()  # queue entries are written lazily
        args = ("report", "usage", *sock(daemon), *span(MINUTE, MINUTE + 120), "--json")
        rows = {r["host"]: r for r in json.loads(await ok(*args, "--by", "host"))}
        [sized] = json.loads(await ok(*args, "--suggest"))
    assert (rows["a"]["checkouts"], rows["a"]["idle_hours"]) == (1, round(20 / 3600, 3))
    b_row, c_row = rows["b"], rows["c"]
    assert (b_row["queued"], b_row["queued_median"], b_row["true_denials"]) == (1, 30.0, 0)
    assert (c_row["queued"], c_row["queued_median"], c_row["true_denials"]) == (1, 10.5, 1)
    assert (c_row["checkouts"], c_row["peak"]) == (0, 0)
    assert (sized["requests"], sized["refused"], sized["hold"]) == (3, 2, 30.0)
    assert (sized["suggested"], sized["replayed"], sized["seats"]) == (2, 0, 1)
