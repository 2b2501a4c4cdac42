"""Denial aggregation (pure, fake clock) and audit retention against a real store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from licd.clock import ManualClock
from licd.core.audit_upkeep import DenialLog, export_file, max_entries_per_interval, retire
from licd.core.events import Event, Kind
from licd.store.base import Store
from licd.store.sqlite import SqliteStore
from tests.support import writing

NOW = 1_790_000_000.0


def denial(ip: str = "10.0.0.9", reason: str = "unknown_licence", **kw: object) -> Event:
    return Event(Kind.DENIED, kw.pop("time", NOW), ip=ip, reason=reason, **kw)  # type: ignore[arg-type]


def test_repeated_denials_are_one_counted_entry_per_interval() -> None:
    clock = ManualClock()
    log = DenialLog(interval=60.0)
    first = denial(host="ws-1")
    assert log.note(first, clock.now().mono) is first  # the first is written at once
    for n in range(1, 1000):
        clock.advance(0.01)
        assert log.note(denial(host=f"ws-{n}", time=NOW + n), clock.now().mono) is None
    assert log.due(clock.now().mono) == []  # the interval is not over yet
    clock.advance(60.0)
    (summary,) = log.due(clock.now().mono)
    assert (summary.kind, summary.ip, summary.reason) == (Kind.DENIED, "10.0.0.9", first.reason)
    assert summary.detail == {"count": 999, "first": NOW + 1, "last": NOW + 999}
    assert summary.host == "ws-999"  # the latest holder stands for the group
    # A steady stream stays one entry per interval, with no new "first" entry.
    clock.advance(1.0)
    assert log.note(denial(time=NOW + 2000), clock.now().mono) is None
    clock.advance(60.0)
    assert [e.detail["count"] for e in log.due(clock.now().mono)] == [1]
    clock.advance(60.0)  # a quiet interval closes the group...
    assert log.due(clock.now().mono) == [] and len(log) == 0
    again = denial(time=NOW + 3000)
    assert log.note(again, clock.now().mono) is again  # ...and the next is a first again


def test_groups_are_by_address_licence_and_reason() -> None:
    log = DenialLog()
    written = [
        log.note(e, 0.0)
        for e in (
            denial("10.0.0.1"),
            denial("10.0.0.2"),
            denial("10.0.0.1", licence="cad"),
            denial("10.0.0.1", reason="seats_exhausted"),
            denial("10.0.0.1"),  # a repeat
        )
    ]
    assert [e is not None for e in written] == [True, True, True, True, False]


def test_beyond_max_groups_denials_fold_into_one_group_per_reason() -> None:
    log = DenialLog(interval=10.0, max_groups=4)
    written = sum(
        log.note(denial(f"10.0.{n // 250}.{n % 250}", time=NOW + n), 0.0) is not None
        for n in range(10_000)
    )
    assert written == 4 + 1  # four addresses of their own, then one for the rest
    entries = log.due(10.0, every=True)
    (overflow,) = entries
    assert overflow.ip is None and overflow.detail["count"] == 10_000 - 5
    assert len(log) == 0


def test_no_flood_writes_more_than_the_bound() -> None:
    """Whatever mix of addresses, licences and reasons arrives, at most
    max_entries_per_interval() entries are written in any interval."""
    clock = ManualClock()
    log = DenialLog(interval=5.0, max_groups=8)
    reasons = ("unknown_licence", "seats_exhausted", "denied", "licence_expired")
    per_interval: dict[int, int] = {}
    start = clock.now().mono
    for n in range(20_000):
        clock.advance(0.003)
        now = clock.now().mono
        event = denial(f"10.1.{n % 37}.{n % 11}", reasons[n % 4], licence=f"l{n % 3}")
        written = [log.note(event, now)] + log.due(now)
        slot = int((now - start) // 5.0)
        per_interval[slot] = per_interval.get(slot, 0) + sum(e is not None for e in written)
    assert max(per_interval.values()) <= max_entries_per_interval(8)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with writing(await SqliteStore.open(tmp_path / "licd.db")) as s:
        yield s


async def test_retire_exports_then_deletes_old_entries_in_chunks(
    store: Store, tmp_path: Path
) -> None:
    month = 31 * 86400.0
    times = [NOW - 2 * month + n for n in range(5)] + [NOW - month, NOW, NOW + 1]
    for n, t in enumerate(times):
        await store.append(Event(Kind.CHECKOUT, t, handle=f"h{n}", host="ws\n\u00e9"))
    directory = tmp_path / "export"
    retired = await retire(store, cutoff=NOW - 10, directory=directory, chunk=2)
    assert retired == 6
    assert [e.event.handle for e in await store.audit()] == ["h6", "h7"]
    exported = []
    for path in sorted(directory.iterdir()):
        assert path == export_file(directory, json.loads(path.read_text().splitlines()[0])["time"])
        exported += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [e["handle"] for e in exported] == [f"h{n}" for n in range(6)]
    assert exported[0]["host"] == "ws\n\u00e9"  # one line per entry, the text kept exactly
    assert len(list(directory.iterdir())) == 2  # one file per month
    # Again: nothing more to retire, and the export is not written twice.
    assert await retire(store, cutoff=NOW - 10, directory=directory) == 0
    assert sum(len(p.read_text().splitlines()) for p in directory.iterdir()) == 6


async def test_retire_stops_after_its_chunks_and_keeps_what_it_did_not_export(
    store: Store, tmp_path: Path
) -> None:
    for n in range(7):
        await store.append(Event(Kind.CHECKOUT, NOW + n, handle=f"h{n}"))
    done = await retire(store, cutoff=NOW + 100, directory=tmp_path / "x", chunk=2, max_chunks=2)
    assert done == 4
    assert [e.event.handle for e in await store.audit()] == ["h4", "h5", "h6"]


async def test_retire_deletes_nothing_when_the_export_fails(store: Store, tmp_path: Path) -> None:
    await store.append(Event(Kind.CHECKOUT, NOW, handle="h0"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError):
        await retire(store, cutoff=NOW + 1, directory=blocker)
    assert [e.event.handle for e in await store.audit()] == ["h0"]
