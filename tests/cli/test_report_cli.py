"""Tests of `licd report usage` against a real daemon on its admin socket.

Seats are taken, refused and returned through a raw protocol peer while a fake clock
moves a minute at a time; the report, read from the daemon's audit log, must show each
minute's peak, denials and overdraft checkouts (see tests/cli/test_admin_cli.py).
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from licd.cli import format as fmt
from licd.clock import ManualClock
from licd.daemon import Daemon
from tests.cli.test_admin_cli import connected, licd, ok, sock, take
from tests.support import DICOM, make_config, running

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
