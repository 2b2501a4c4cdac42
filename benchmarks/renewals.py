"""The `renewals` scenario: one lease heartbeated as fast as one connection can send.

A client in a tight heartbeat loop (8 requests in flight) on one lease, for a fixed
window (30 s unless --duration is longer), against a daemon with the default renewal
limit. Figures: the daemon's RSS growth over the window (target < 5 MiB: memory is
O(live leases) whatever clients send), and how its answers split between renewals and
`rate_limited`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode

from .daemon import LICENCE_KEY, LicdProcess, licence, rss_bytes, write_config
from .harness import Context
from .stats import Figure, Target

MIB = 1024 * 1024
PIPELINE = 8
WARMUP = 2.0  # seconds of the loop before the first RSS reading


async def _loop(port: int, pid: int, seconds: float) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder = FrameDecoder(1 << 20, REPLY_LIMITS)

    async def call(message: dict[str, Any]) -> dict[str, Any]:
        writer.write(encode(message))
        return await reply()

    async def reply() -> dict[str, Any]:
        while (frame := decoder.next_frame()) is None:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            decoder.feed(data)
        return frame

    await call({"op": "hello", "id": 0, "protocol": 1, "client": "renewals/1"})
    holder = {"host": "hammer", "hostid": "hammer-id", "user": "u", "pid": 1}
    lease = await call(
        {
            "op": "checkout",
            "id": 1,
            "key": LICENCE_KEY,
            "holder": holder,
            "request": os.urandom(16).hex(),
            "nonce": os.urandom(16),
        }
    )
    secret = lease["lease"]
    counts: dict[str, int] = {}
    rss: dict[str, int] = {}
    started = time.monotonic()
    window_start = started + WARMUP
    end = window_start + seconds
    rid = 1
    for _ in range(100_000_000):  # bounded; ends at `end`
        now = time.monotonic()
        if now >= end:
            break
        if "start" not in rss and now >= window_start:
            rss["start"] = rss_bytes(pid)
        for _ in range(PIPELINE):
            rid += 1
            message = {"op": "heartbeat", "id": rid, "lease": secret, "nonce": os.urandom(16)}
            writer.write(encode(message))
        for _ in range(PIPELINE):
            code = str((await reply()).get("error", "ok"))
            if now >= window_start:
                counts[code] = counts.get(code, 0) + 1
    rss["end"] = rss_bytes(pid)
    writer.close()
    return {"counts": counts, "rss": rss, "window": seconds}


def renewals(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    s = "renewals"
    seconds = max(30.0, ctx.opts.duration)
    d = ctx.directory(s)
    # The generated config lifts the renewal limit for the throughput scenarios: this
    # one runs with the default a site has.
    config = write_config(
        d, licence(seats=10, lease_ttl=90), store=ctx.store_table(s), renewals_per_second=1.0
    )
    with LicdProcess(config, d) as licd:
        licd.start()
        out = asyncio.run(_loop(licd.port, licd.pid, seconds))
    grown = (out["rss"]["end"] - out["rss"]["start"]) / MIB
    figs = [Figure(s, "daemon RSS growth", grown, "MiB", target=Target("<", 5.0))]
    for code, n in sorted(out["counts"].items()):
        figs.append(Figure(s, f"answers/s: {code}", n / seconds, "req/s"))
    return figs, out
