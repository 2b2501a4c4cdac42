"""The `flood` scenario: legitimate checkouts while 8 hostile connections send denials.

The hostile connections come from 127.0.0.2 (another peer address than the load
generator's 127.0.0.1), each keeping `PIPELINE` checkouts of unknown keys in flight, as
fast as the daemon answers, for the whole window; meanwhile the load generator's churn
connections check out and in. Figures: the legitimate checkout p50/p99 (target p99 <
20 ms) beside the same load without the flood, the flood's rate and answers, and the
audit entries the flood left (docs/admin.md, "Limits", bounds them).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode

from .daemon import LicdProcess, licence, write_config
from .harness import Context, drive, errors, lat
from .stats import Figure, Target

HOSTILE = 8
PIPELINE = 8
SOURCE = "127.0.0.2"
LEGIT_CONNECTIONS = 8


async def _hostile(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(SOURCE, 0))
    decoder = FrameDecoder(1 << 20, REPLY_LIMITS)
    holder = {"host": "x" * 255, "hostid": "y" * 255, "user": "z" * 255, "pid": 1}

    async def reply() -> dict[str, Any]:
        while (frame := decoder.next_frame()) is None:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the daemon closed a hostile connection")
            decoder.feed(data)
        return frame

    writer.write(encode({"op": "hello", "id": 0, "protocol": 1, "client": "flood/1"}))
    await reply()
    rid = 0
    for _ in range(100_000_000):  # bounded; ends with stop()
        if stop.is_set():
            break
        for _ in range(PIPELINE):
            rid += 1
            message = {
                "op": "checkout",
                "id": rid,
                "key": secrets.token_hex(8),
                "holder": holder,
                "request": secrets.token_hex(16),
                "nonce": os.urandom(16),
            }
            writer.write(encode(message))
        for _ in range(PIPELINE):
            answer = await reply()
            code = str(answer.get("error", "ok"))
            counts[code] = counts.get(code, 0) + 1
    writer.close()


class Flood:
    """The hostile connections, on an event loop in a thread of their own, from `start()`
    until `stop()`; `counts` are their answers by error code."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await asyncio.gather(
                *(_hostile(self.port, self._stop, self.counts) for _ in range(HOSTILE))
            )

        asyncio.run(main())

    def start(self) -> None:
        self._thread.start()

    def wait_for(self, code: str, timeout: float) -> bool:
        """Until some answer is `code` (the burst is spent), at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.counts.get(code):
            time.sleep(0.1)
        return bool(self.counts.get(code))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(timeout=30.0)
        return dict(self.counts)


def _denial_rows(db: Path) -> tuple[int, int]:
    """Denial entries in the audit log and the bytes of their values."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT time, licence, host, hostid, user, ip, seats, reason, detail FROM audit"
            " WHERE event = 'denied'"
        ).fetchall()
    return len(rows), sum(len(str(v).encode()) for row in rows for v in row if v is not None)


def flood(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    if ctx.postgres:
        raise RuntimeError("flood reads the audit log from SQLite's file: --backend sqlite only")
    o = ctx.opts
    figs: list[Figure] = []
    details: dict[str, Any] = {}
    s = "flood"
    results = {}
    for label, hostile in (("quiet", False), ("flood", True)):
        d = ctx.directory(f"flood-{label}")
        config = write_config(d, licence(seats=LEGIT_CONNECTIONS + 100, lease_ttl=90))
        with LicdProcess(config, d) as licd:
            licd.start()
            flood = Flood(licd.port)
            if hostile:
                flood.start()
                # The attack's steady state: its burst of denials (100,000) spent, the
                # flood answered mostly `rate_limited`. Its first seconds are figures too.
                spent = flood.wait_for("rate_limited", 120.0)
                details["burst_spent"] = spent
                details["before_window"] = dict(flood.counts)
            try:
                run = drive(licd.port, licd.pid, "churn", LEGIT_CONNECTIONS, o)
            finally:
                counts = flood.stop() if hostile else {}
        results[label] = run
        if hostile:
            entries, size = _denial_rows(d / "state" / "licd.db")
            before = details["before_window"]
            during = {k: v - before.get(k, 0) for k, v in counts.items()}
            details.update({"flood_answers": counts, "audit_entries": entries, "audit_bytes": size})
            window = run.results.window or 1.0
            for code, n in sorted(during.items()):
                figs.append(Figure(s, f"hostile answers/s: {code}", n / window, "req/s"))
            figs.append(
                Figure(s, "audit entries from the flood", float(entries), note=f"{size} bytes")
            )
    quiet = results["quiet"].summary("checkout")
    loud = results["flood"].summary("checkout")
    details.update({"quiet": quiet, "flood": loud})
    figs.append(
        Figure(s, "legit checkout p50", lat(loud, "p50_ms"), "ms", lat(quiet, "p50_ms"), "no flood")
    )
    figs.append(
        Figure(
            s,
            "legit checkout p99",
            lat(loud, "p99_ms"),
            "ms",
            lat(quiet, "p99_ms"),
            "no flood",
            Target("<", 20.0),
        )
    )
    figs.append(Figure(s, "legit checkouts/s", loud["rate"], "req/s", quiet["rate"], "no flood"))
    return figs + errors(s, results["flood"], "licd"), details
