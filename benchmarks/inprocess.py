"""`python -m benchmarks.inprocess`: the daemon's own CPU per request, without sockets.

Opens a real daemon in this process (real SQLite state with `synchronous=FULL`, a real
key, the serving code's garbage-collector settings) and drives its dispatcher directly:
`--clients` concurrent holders each doing checkout + checkin cycles, or renewing one
lease. It prints the process CPU per cycle (or per renewal), which moves far less
between runs than the loopback scenarios, so two versions of the code can be compared
by alternating runs. `--profile` adds cProfile's top functions. No network, no
generator competing for the cores, and no targets: a tool for finding costs, not a
figure to report against a floor. `--backend postgres` stores in a throwaway
PostgreSQL primary with a synchronous standby (benchmarks/pgstore.py) instead, and
prints the servers' CPU per cycle beside the daemon's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from licd.cli.main import GC_YOUNG_THRESHOLD
from licd.config.settings import StoreConfig, load_config
from licd.core.dispatch import Answer, Dispatcher, Session
from licd.daemon import Daemon
from licd.deferred import Deferred

from .daemon import LICENCE_KEY, cpu_seconds, licence, write_config
from .pgstore import NODE, PgCluster


async def _answer(d: Dispatcher, session: Session, request: dict[str, Any]) -> dict[str, Any]:
    answer: Answer | Deferred[Answer] = d.handle(session, request)
    reply, _ = answer if isinstance(answer, tuple) else await answer
    if not reply.get("ok"):
        raise RuntimeError(f"{request['op']} refused: {reply}")
    return reply


def _holder(i: int) -> dict[str, Any]:
    return {"host": f"h{i}", "hostid": f"id-{i}", "user": "bench", "pid": 1}


#: Request keys must have at least 22 characters (128 bits): this makes each one so.
REQUEST_PAD = "x" * 22


async def _cycles(d: Dispatcher, session: Session, i: int, n: int) -> None:
    for k in range(n):
        checkout = {
            "op": "checkout",
            "id": 1,
            "key": LICENCE_KEY,
            "holder": _holder(i),
            "request": f"r{i}-{k}-{REQUEST_PAD}",
            "nonce": os.urandom(16),
        }
        lease = (await _answer(d, session, checkout))["lease"]
        await _answer(d, session, {"op": "checkin", "id": 2, "lease": lease})


async def _renewals(d: Dispatcher, session: Session, i: int, n: int) -> None:
    checkout = {
        "op": "checkout",
        "id": 1,
        "key": LICENCE_KEY,
        "holder": _holder(i),
        "request": f"r{i}-{REQUEST_PAD}",
        "nonce": os.urandom(16),
    }
    lease = (await _answer(d, session, checkout))["lease"]
    beat = {"op": "heartbeat", "id": 3, "lease": lease, "nonce": os.urandom(16)}
    for _ in range(n):
        await _answer(d, session, beat)


def _db_cpu(pg: PgCluster | None) -> float:
    """CPU seconds the PostgreSQL servers' processes used so far (0 without them)."""
    if pg is None:
        return 0.0
    total = 0.0
    for pids in pg.processes():
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += cpu_seconds(pid)
    return total


async def run(
    what: str, count: int, clients: int, profile: bool, pg: PgCluster | None, protocol: int = 1
) -> None:
    with tempfile.TemporaryDirectory(prefix="licd-inprocess-") as tmp:
        config = load_config(write_config(Path(tmp), licence(seats=clients + 100, lease_ttl=90)))
        if pg is not None:
            store = StoreConfig(backend="postgres", dsn=pg.database(what), node=NODE)
            config = dataclasses.replace(config, store=store)
        daemon = await Daemon.open(config)
        stop = asyncio.Event()
        ready = asyncio.Event()
        serving = asyncio.create_task(daemon.run(stop, on_ready=lambda _: ready.set()))
        await ready.wait()
        gc.freeze()
        try:
            d = daemon.server.dispatcher
            session = Session("127.0.0.1", hello_done=True, protocol=protocol)
            work = _cycles if what == "churn" else _renewals
            per = max(1, count // clients)
            await asyncio.gather(*(work(d, session, i, 5) for i in range(clients)))  # warm-up
            profiler = cProfile.Profile() if profile else None
            db = _db_cpu(pg)
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            await asyncio.gather(*(work(d, session, clients + i, per) for i in range(clients)))
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            db = _db_cpu(pg) - db
            n = per * clients
            unit = "cycle" if what == "churn" else "renewal"
            servers = "" if pg is None else f", PostgreSQL {db / n * 1e6:.1f} us of CPU"
            print(
                f"{what} (protocol {protocol}): {n:,} {unit}s by {clients} clients:"
                f" {cpu / n * 1e6:.1f} us of CPU"
                f" per {unit}{servers}, {n / wall:,.0f}/s,"
                f" {daemon.service.store.transactions} commits"
            )
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        finally:
            stop.set()
            await serving


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__)
    parser.add_argument("what", choices=("churn", "heartbeat"))
    parser.add_argument("--count", type=int, default=20_000, help="cycles or renewals")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 30")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the store: SQLite (default), or PostgreSQL with a synchronous standby",
    )
    parser.add_argument(
        "--protocol",
        type=int,
        choices=(1, 2),
        default=1,
        help="the clients' protocol: 2 lets the daemon batch signatures (docs/protocol.md)",
    )
    args = parser.parse_args()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])  # as `licd serve` does
    pg = PgCluster() if args.backend == "postgres" else None
    try:
        if pg is not None:
            pg.start()
            print(pg.describe())
        asyncio.run(run(args.what, args.count, args.clients, args.profile, pg, args.protocol))
    finally:
        if pg is not None:
            pg.cleanup()


if __name__ == "__main__":
    main()
