"""Floors: what the machine does with no licd in the way, measured in the same run.

- Four asyncio servers (each its own process, `FloorServer`: `python -m
  benchmarks.floor --mode MODE`, listening on a free port of 127.0.0.1 it prints) that
  read the same 4-byte-prefixed frames and decode each body with msgpack under the same
  limits (`FLOORS` names them):
  - `protocol`: a bare asyncio.Protocol (the cheapest the event loop allows) answering a
    fixed pre-encoded reply the size of a heartbeat reply: no engine, no store, no
    signature;
  - `streams`: the same with asyncio streams;
  - `signing`: the bare Protocol, but each reply to a request carrying a `nonce`
    (heartbeat, checkout) holds a fresh Ed25519 signature (PyNaCl) over a payload shaped
    like a lease token's (`licd_client.tokens.lease_payload`, that nonce, the time): one
    signature per reply, as licd signs today; other replies are the fixed one;
  - `batched`: the signing floor, but the replies produced in one event-loop iteration
    share one signature over the Merkle root of their payloads, in protocol 2's form
    (`statements.sign_batch`): each carries its payload and its batch proof. A reply
    alone in its iteration is signed inline, as the signing floor's.
  Replies are encoded from templates made once (`_Template`): only the token's fields
  are packed per reply. `open_reply()` checks a signing floor's reply. Each runs on the
  event loop licd's `[server] event_loop` picks for the same choice (`--event-loop`,
  "auto" as the benchmark's daemons: uvloop when installed).
- Raw SQLite commits with WAL and synchronous=FULL on the disk of the state directory.
A server stops by itself after --max-seconds; on SIGTERM a signing floor prints how
many replies it signed with how many signatures. The SQLite loops are bounded in count
and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
from nacl.signing import SigningKey

from licd.config.settings import EVENT_LOOPS
from licd.daemon import event_loop_factory
from licd_client import tokens
from licd_client.messages import BatchProof, Holder
from licd_client.statements import open_statement, sign_batch
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
#: The floor servers, by mode: the label figures name them by.
FLOORS = {
    "protocol": "bare Protocol",
    "streams": "bare streams",
    "signing": "signing",
    "batched": "batched signing",
}
SIGNED = ("signing", "batched")
_pack = msgpack.Packer(use_bin_type=True).pack


def _reply_fields() -> dict[str, Any]:
    """A heartbeat reply's fields, but its token."""
    return {
        "id": 1,
        "ok": True,
        "handle": "abcdefghijkl",
        "chain": [],
        "expires": 1.9e9,
        "ttl": 90.0,
        "renew_in": 30.0,
        "seats": 1,
        "features": {"tier": "pro"},
    }


def _frame(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


def fixed_reply(size: int) -> bytes:
    """A pre-encoded frame shaped like a heartbeat reply, about `size` bytes long."""
    reply = {**_reply_fields(), "token": b""}
    base = len(_pack(reply)) + PREFIX.size
    reply["token"] = b"\x5a" * max(0, size - base - 3)  # bin header of 2-3 bytes
    return _frame(_pack(reply))


class _Template:
    """A msgpack map encoded once, but for the values of its `variable` keys (a map
    of at most 15 entries: its header is one byte)."""

    def __init__(self, sample: dict[str, Any], variable: tuple[str, ...]) -> None:
        if len(sample) > 15 or not set(variable) <= set(sample):
            raise ValueError("a template is a map of at most 15 entries, with its variables")
        fixed = b"".join(_pack(k) + _pack(v) for k, v in sample.items() if k not in variable)
        self._head = bytes([0x80 | len(sample)]) + fixed
        self._keys = [_pack(k) for k in variable]

    def body(self, *values: Any) -> bytes:
        tail = b"".join(k + _pack(v) for k, v in zip(self._keys, values, strict=True))
        return self._head + tail


class TokenMaker:
    """Signed replies: a lease token's payload answering a nonce, signed alone or, in a
    batch, under one signature over the batch's Merkle root."""

    def __init__(self, key: SigningKey, plain: bytes) -> None:
        self.key = key
        self.public = bytes(key.verify_key)
        self.plain = plain  # the reply to a request without a nonce (hello, checkin)
        self.replies = self.signatures = 0
        sample = tokens.lease_payload(
            issuer=self.public,
            issued=0.0,
            expires=0.0,
            handle="abcdefghijkl",
            licence="bench",
            product="bench",
            seats=1,
            features={"tier": "pro", "modules": "core,ocr"},
            holder=Holder(host="bench-w0", hostid="bench-w0-c0", user="bench", pid=1),
            nonce=bytes(16),
            site="bench",
        )
        self._payload = _Template(sample, ("iat", "exp", "nonce"))
        fields = _reply_fields()
        self._inline = _Template({**fields, "token": b""}, ("token",))
        self._batched = _Template({**fields, "token": b"", "batch": {}}, ("token", "batch"))

    def payload(self, nonce: bytes) -> bytes:
        """A lease token's payload (unsigned), issued now, answering `nonce`."""
        now = time.time()
        return self._payload.body(now, now + 90.0, nonce)

    def signed(self, payload: bytes) -> bytes:
        """The reply frame carrying `payload` signed alone (a lease token's form)."""
        self.replies += 1
        self.signatures += 1
        return _frame(self._inline.body(bytes(self.key.sign(payload))))

    def batch(self, payloads: list[bytes]) -> list[bytes]:
        """The reply frames of `payloads`, one signature for all, as protocol 2 batches
        them (`statements.sign_batch`): each carries its payload and its `batch` proof.
        One payload alone: `signed()`."""
        if len(payloads) == 1:
            return [self.signed(payloads[0])]
        proofs = sign_batch(self.key, payloads)
        self.replies += len(payloads)
        self.signatures += 1
        return [
            _frame(self._batched.body(payload, proof.to_wire()))
            for payload, proof in zip(payloads, proofs, strict=True)
        ]


def open_reply(reply: dict[str, Any], public: bytes) -> dict[str, Any]:
    """The lease payload a signing floor's reply carries, once its signature (whole, or
    its batch's) checks out against `public`, as a client checks a lease's; else
    TokenInvalid."""
    batch = BatchProof.from_wire(reply["batch"]) if "batch" in reply else None
    return open_statement(reply["token"], public, batch).payload


def _requests(buf: bytearray) -> list[dict[str, Any]] | None:
    """Decode every complete frame in `buf` (consuming them); the requests, or None when
    a frame is bad (the connection must close)."""
    out: list[dict[str, Any]] = []
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
        out.append(value)
    return out


def _nonce(request: dict[str, Any]) -> bytes | None:
    nonce = request.get("nonce")
    return nonce if isinstance(nonce, bytes) else None


async def _serve_streams(reply: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                requests = _requests(buf)
                if requests is None:
                    break
                if requests:
                    writer.write(reply * len(requests))
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, limit=65536, backlog=1024)


class BareProtocol(asyncio.Protocol):
    """The `protocol` floor: every request answered with the fixed reply."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # any asyncio loop's

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        requests = _requests(self.buf)
        if requests is None:
            self.transport.close()
        elif requests:
            self.respond(self.transport, requests)

    def respond(self, transport: asyncio.Transport, requests: list[dict[str, Any]]) -> None:
        transport.write(self.reply * len(requests))


class SigningProtocol(BareProtocol):
    """The `signing` floor: each reply to a nonce signed as it is made."""

    def __init__(self, maker: TokenMaker) -> None:
        super().__init__(maker.plain)
        self.maker = maker

    def respond(self, transport: asyncio.Transport, requests: list[dict[str, Any]]) -> None:
        maker = self.maker
        transport.write(
            b"".join(
                self.reply if (n := _nonce(r)) is None else maker.signed(maker.payload(n))
                for r in requests
            )
        )


class Batcher:
    """The replies of one event-loop iteration, across connections: the first schedules
    `flush()` (`call_soon`: it runs once the callbacks already due in this iteration,
    every connection's `data_received` among them, have run), which signs them all at
    once and writes each connection's replies in order."""

    def __init__(self, maker: TokenMaker) -> None:
        self.maker = maker
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[asyncio.Transport, bytes | None]] = []

    def add(self, transport: asyncio.Transport, payload: bytes | None) -> None:
        """Queue a reply: a payload to sign, or None for the plain reply."""
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append((transport, payload))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        payloads = [p for _, p in pending if p is not None]
        signed = iter(self.maker.batch(payloads) if payloads else ())
        out: dict[asyncio.Transport, list[bytes]] = {}
        for transport, payload in pending:
            frame = self.maker.plain if payload is None else next(signed)
            out.setdefault(transport, []).append(frame)
        for transport, frames in out.items():
            if not transport.is_closing():
                transport.write(b"".join(frames))


class BatchingProtocol(BareProtocol):
    """The `batched` floor: replies to nonces signed per loop iteration (`Batcher`)."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher.maker.plain)
        self.batcher = batcher

    def respond(self, transport: asyncio.Transport, requests: list[dict[str, Any]]) -> None:
        maker = self.batcher.maker
        for r in requests:
            n = _nonce(r)
            self.batcher.add(transport, None if n is None else maker.payload(n))


async def _serve(mode: str, reply: bytes, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    maker = TokenMaker(SigningKey.generate(), reply)
    factory: Callable[[], asyncio.Protocol]
    if mode == "streams":
        server = await _serve_streams(reply)
    else:
        if mode == "signing":
            factory = functools.partial(SigningProtocol, maker)
        elif mode == "batched":
            factory = functools.partial(BatchingProtocol, Batcher(maker))
        else:
            factory = functools.partial(BareProtocol, reply)
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    loop_name = type(loop).__module__.partition(".")[0]  # as licd's listening line names it
    print(f"listening {port} {maker.public.hex()} {loop_name}", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):  # stops by itself, whatever happens
            await stop.wait()
    server.close()
    if mode in SIGNED:
        print(f"signed {maker.replies} {maker.signatures}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    parser.add_argument("--mode", choices=tuple(FLOORS), default="streams")
    parser.add_argument("--reply-size", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args(argv)
    from .loadgen import raise_nofile

    raise_nofile()
    with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
        runner.run(_serve(args.mode, fixed_reply(args.reply_size), args.max_seconds))


class FloorServer:
    """A floor server as a child process; `port`, `pid`, `public` (the signing floors'
    key) and `loop` (its event loop's name) once started; after `stop()`, `stats` (the
    signing floors: replies signed, signatures made, replies per signature)."""

    def __init__(self, mode: str, reply_size: int, max_seconds: float = 900.0) -> None:
        self.mode = mode
        self.stats: dict[str, float] = {}
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
        _, port, public, self.loop = line.split()
        self.port = int(port)
        self.public = bytes.fromhex(public)

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
            for line in self.proc.stdout.read().splitlines():
                if line.startswith("signed "):
                    replies, signatures = (int(x) for x in line.split()[1:])
                    self.stats = {
                        "replies_signed": replies,
                        "signatures": signatures,
                        "replies_per_signature": replies / max(signatures, 1),
                    }
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
    """One-row commits/s (and the CPU each costs) and rows/s in 100-row commits, WAL +
    synchronous=FULL, in a fresh database in `directory` (put it on the state
    directory's disk)."""
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

        cpu = time.process_time()
        commits, t_one = _bounded(commit(1), seconds, 200_000)
        cpu = time.process_time() - cpu
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
        # What one commit costs in CPU (the kernel's part of the flush included), whatever
        # the rows: a daemon that commits N times a second spends at least N times this.
        "cpu_us_per_commit": cpu / max(commits, 1) * 1e6,
    }


if __name__ == "__main__":
    main()
