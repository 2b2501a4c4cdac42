"""Floors: what the machine does with no licd in the way, measured in the same run.

- A bare asyncio server (its own process: `python -m benchmarks.floor --port 0`) that
  reads the same 4-byte-prefixed frames, decodes each body with msgpack under the same
  limits, and answers a fixed pre-encoded reply the size of a heartbeat reply: no engine,
  no store, no signature. `streams` uses asyncio streams as licd's server does;
  `protocol` uses a bare asyncio.Protocol (the cheapest the event loop allows).
- Raw SQLite commits with WAL and synchronous=FULL on the disk of the state directory.
The server stops by itself after --max-seconds; the SQLite loops are bounded in count
and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import msgpack

from licd_client.wire import PREFIX, REQUEST_LIMITS

MAX_FRAME = 16384
LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": REQUEST_LIMITS.max_str_len,
    "max_bin_len": REQUEST_LIMITS.max_bin_len,
    "max_array_len": REQUEST_LIMITS.max_array_len,
    "max_map_len": REQUEST_LIMITS.max_map_len,
    "max_ext_len": 0,
}


def fixed_reply(size: int) -> bytes:
    """A pre-encoded frame shaped like a heartbeat reply, about `size` bytes long."""
    reply: dict[str, Any] = {
        "id": 1,
        "ok": True,
        "handle": "abcdefghijkl",
        "token": b"",
        "chain": [],
        "expires": 1.9e9,
        "ttl": 90.0,
        "renew_in": 30.0,
        "seats": 1,
        "features": {"tier": "pro"},
    }
    base = len(msgpack.packb(reply, use_bin_type=True)) + PREFIX.size
    reply["token"] = b"\x5a" * max(0, size - base - 3)  # bin header of 2-3 bytes
    body: bytes = msgpack.packb(reply, use_bin_type=True)
    return PREFIX.pack(len(body)) + body


def _frames(buf: bytearray) -> int | None:
    """Decode every complete frame in `buf` (consuming them); how many, or None when a
    frame is bad (the connection must close)."""
    n = 0
    while len(buf) >= PREFIX.size:
        (length,) = PREFIX.unpack_from(buf)
        if not 1 <= length <= MAX_FRAME:
            return None
        if len(buf) < PREFIX.size + length:
            break
        body = bytes(buf[PREFIX.size : PREFIX.size + length])
        del buf[: PREFIX.size + length]
        try:
            value = msgpack.unpackb(body, **LIMITS)
        except Exception:
            return None
        if not isinstance(value, dict):
            return None
        n += 1
    return n


async def _serve_streams(reply: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                n = _frames(buf)
                if n is None:
                    break
                if n:
                    writer.write(reply * n)
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, limit=65536, backlog=1024)


class _BareProtocol(asyncio.Protocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # any asyncio loop's

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        n = _frames(self.buf)
        if n is None:
            self.transport.close()
        elif n:
            self.transport.write(self.reply * n)


async def _serve(mode: str, reply: bytes, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if mode == "streams":
        server = await _serve_streams(reply)
    else:
        server = await loop.create_server(
            lambda: _BareProtocol(reply), "127.0.0.1", 0, backlog=1024
        )
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):  # stops by itself, whatever happens
            await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    parser.add_argument("--mode", choices=("streams", "protocol"), default="streams")
    parser.add_argument("--reply-size", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    from .loadgen import raise_nofile

    raise_nofile()
    asyncio.run(_serve(args.mode, fixed_reply(args.reply_size), args.max_seconds))


class FloorServer:
    """The bare server as a child process; `port` and `pid` once started."""

    def __init__(self, mode: str, reply_size: int, max_seconds: float = 900.0) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.floor",
                "--mode",
                mode,
                "--reply-size",
                str(reply_size),
                "--max-seconds",
                str(max_seconds),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the floor server did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- SQLite


def _bounded(run_one: Callable[[int], int], seconds: float, max_rounds: int) -> tuple[int, float]:
    """Call run_one(i) until `seconds` pass or `max_rounds` calls; (units, elapsed)."""
    units = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for i in range(max_rounds):
        units += run_one(i)
        if time.perf_counter() >= deadline:
            break
    return units, time.perf_counter() - t0


def sqlite_floor(directory: Path, seconds: float) -> dict[str, float]:
    """One-row commits/s and rows/s in 100-row commits, WAL + synchronous=FULL, in a
    fresh database in `directory` (put it on the state directory's disk)."""
    path = directory / "floor.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(
            "CREATE TABLE t (secret TEXT PRIMARY KEY, licence TEXT, host TEXT, expires REAL,"
            " data BLOB) WITHOUT ROWID"
        )
        row_data = os.urandom(120)

        def rows(i: int, n: int) -> list[tuple[Any, ...]]:
            return [
                (f"s{i}-{j}-{os.urandom(8).hex()}", "bench", "host", 1.9e9, row_data)
                for j in range(n)
            ]

        def commit(batch: int) -> Callable[[int], int]:
            def one(i: int) -> int:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows(i, batch))
                db.execute("COMMIT")
                return batch

            return one

        commits, t_one = _bounded(commit(1), seconds, 200_000)
        batched_rows, t_batch = _bounded(commit(100), seconds, 20_000)
    finally:
        db.close()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(f"{path}{suffix}")
    return {
        "commits_per_s": commits / t_one,
        "rows_per_s_batch100": batched_rows / t_batch,
        "fsync_ms": t_one / max(commits, 1) * 1000.0,
    }


if __name__ == "__main__":
    main()
