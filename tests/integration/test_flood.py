"""A bounded loopback flood: 8 hostile connections sending denied checkouts.

The audit log must grow by at most the bound docs/admin.md states ("Limits": entries
per denial interval, bytes per entry), and a legitimate client on another address must
keep getting its checkouts granted meanwhile. Time is the daemon's injected clock,
moved by the flood itself, so the bound is checked against the time the daemon saw.
No latency is asserted here: benchmarks/ measures that (the `flood` scenario).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from pathlib import Path

from licd.clock import ManualClock
from licd.core.audit_upkeep import MAX_ENTRY_BYTES, max_entries_per_interval
from licd.store.sqlite import DB_FILE
from licd_client.messages import Holder
from tests.support import DICOM, RawPeer, address, holder, make_config, running

HOSTILE = 8  # connections, each from an address of its own
PIPELINE = 8  # requests each keeps in flight
ROUNDS = 250  # of PIPELINE requests per connection: 16,000 denials in all
SECONDS_PER_ROUND = 1.0  # daemon time the flood's first connection moves per round
LONG = "\U0001d535" * 255  # the longest host and user, 4 bytes a character in UTF-8


def audit_rows(path: Path) -> list[tuple[str, int]]:
    """(event, bytes of its stored values) per audit row, read after the daemon stopped."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT event, time, licence, handle, host, hostid, user, ip, seats, reason,"
            " admin_uid, detail FROM audit"
        ).fetchall()
    return [(row[0], sum(len(str(v).encode()) for v in row if v is not None)) for row in rows]


async def connect(daemon_address: tuple[str, int], source: str) -> RawPeer:
    reader, writer = await asyncio.open_connection(*daemon_address, local_addr=(source, 0))
    peer = RawPeer(reader, writer)
    await peer.hello()
    return peer


async def test_a_denial_flood_is_bounded_in_the_audit_log_and_spares_legitimate_checkouts(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    started = clock.now().mono
    flooding = asyncio.Event()
    legit_answers: list[str] = []
    async with running(make_config(tmp_path), clock) as daemon:
        addr = address(daemon)
        hostile = [await connect(addr, f"127.0.0.{2 + n}") for n in range(HOSTILE)]
        legit = await connect(addr, "127.0.0.1")
        bogus = Holder(host=LONG, hostid=LONG, user=LONG, pid=1).to_wire()

        async def flood(peer: RawPeer, moves_time: bool) -> None:
            for _ in range(ROUNDS):
                for _ in range(PIPELINE):
                    peer._next_id += 1
                    await peer.send(
                        {
                            "op": "checkout",
                            "id": peer._next_id,
                            "key": secrets.token_hex(8),  # a fresh unknown key each time
                            "holder": bogus,
                            "request": secrets.token_hex(16),
                            "nonce": os.urandom(16),
                        }
                    )
                for _ in range(PIPELINE):
                    reply = await peer.recv()
                    assert reply is not None and reply["error"] in (
                        "unknown_licence",
                        "rate_limited",
                    )
                if moves_time:
                    clock.advance(SECONDS_PER_ROUND)
                    daemon.service.flush_denials(clock.now())  # as the daemon's task does

        async def checkouts() -> None:
            for n in range(100_000):  # bounded; ends with the flood
                if not flooding.is_set():
                    return
                reply = await legit.checkout(
                    DICOM.key, holder(f"ws-{n}"), request=secrets.token_hex(16)
                )
                legit_answers.append("granted" if reply["ok"] else reply["error"])
                if reply["ok"]:
                    assert (await legit.call("checkin", lease=reply["lease"]))["ok"] is True

        flooding.set()
        legit_task = asyncio.create_task(checkouts())
        await asyncio.gather(*(flood(p, n == 0) for n, p in enumerate(hostile)))
        flooding.clear()
        await legit_task
        elapsed = clock.now().mono - started
        interval = daemon.config.audit.denial_interval
        for peer in [*hostile, legit]:
            await peer.close()
    # The daemon has stopped: every counted denial is written (the store was closed).
    rows = audit_rows(tmp_path / DB_FILE)
    denied = [size for event, size in rows if event == "denied"]
    intervals = elapsed / interval + 1  # the flood's own, and the one it started in
    assert len(denied) <= max_entries_per_interval() * intervals  # the documented bound
    assert max(denied) <= MAX_ENTRY_BYTES
    assert sum(denied) <= max_entries_per_interval() * intervals * MAX_ENTRY_BYTES
    # What aggregation makes of it: per address, one entry at once and one per interval.
    assert len(denied) <= HOSTILE * (1 + intervals)
    # The legitimate client was served all along, and never rate limited.
    assert legit_answers and set(legit_answers) == {"granted"}
    assert sum(1 for event, _ in rows if event == "checkout") == len(legit_answers)
