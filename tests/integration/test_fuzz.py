"""Bounded fuzzing of a real daemon (in this process, loopback, fake clock).

A seeded `random.Random` makes mutated frames: valid requests (hello, checkout,
heartbeat, checkin, available, consume) with bytes flipped, cut short or extended,
fields dropped or replaced by values of the wrong type or size, pipelined bursts, random
msgpack and random length prefixes. Several connections send them at once, each
reconnecting when the daemon closes it. The daemon must never answer `internal` nor log
an error, must answer or close every connection, and must leave a good client able to
work and the seats in use as they were once the fuzzed leases are checked in.

Bounded by a number of frames and by a loop-time budget (the budget ends the fuzzing
early, it never fails the test). The seed is printed first and is in every assertion
message: LICD_FUZZ_SEED=<seed> pytest tests/integration/test_fuzz.py replays the frames
(the interleaving of the connections may differ; the failing frame is in the message).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest

from licd.daemon import Daemon
from licd.engine.licence import Counter
from licd_client.wire import encode
from tests.support import DICOM, RawPeer, address, holder, make_config, running

SEED_ENV = "LICD_FUZZ_SEED"
MAX_FRAMES = 4000
BUDGET = 10.0  # seconds of loop time for the fuzzing itself; the test stops there
CONNECTIONS = 3  # at once
#: A daemon that neither answers a whole frame nor closes within this is hung: a failure.
ANSWER_WITHIN = 10.0
#: The reply a well-behaved daemon may give to bad input; never `internal`.
NEVER = "internal"

METERED = replace(
    DICOM,
    key="MMMM-NNNN-OOOO",
    id="metered",
    seats=2,
    counter=(Counter("scans", limit=1_000_000, dedup_window=3.0),),
)
KEYS = (DICOM.key, METERED.key)


def fuzz_seed() -> int:
    env = os.environ.get(SEED_ENV)
    return int(env) if env else random.SystemRandom().randrange(2**32)


# ----------------------------------------------------------------- frame makers

#: Values of every msgpack type, at and past the limits the protocol sets.
ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    float("inf"),
    float("nan"),
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    "",
    "é",
    "\x00",
    "x" * 21,
    "x" * 65,
    "x" * 255,
    "x" * 256,
    "x" * 1025,
    b"",
    b"\x00" * 15,
    b"\x00" * 16,
    b"\x00" * 17,
    b"\x00" * 32,
    b"\x00" * 1025,
    [],
    [1] * 65,
    {},
    {"a": 1},
    {"host": 1},
)

LENGTH_PREFIXES = (0, 1, 2, 4, 1023, 1024, 1025, 16383, 16384, 16385, 2**31, 2**32 - 1)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-encodable value (maps, arrays, scalars), nested a few levels."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(ODD_VALUES)
    if kind == 1:
        return rng.randrange(-(2**63), 2**64)
    if kind == 2:
        return rng.random() * 10 ** rng.randrange(-5, 30)
    if kind == 3:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(40)))
    if kind == 4:
        return rng.randbytes(rng.randrange(40))
    if kind == 5:
        return rng.choice(("op", "id", "key", "lease", "hello", "checkout", "scans"))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 7:
        return {
            rng.choice(("op", "id", "key", "holder", "seats", "x")): random_value(rng, depth + 1)
            for _ in range(rng.randrange(6))
        }
    key = rng.choice((0, -1, 2**64 - 1, 1.5, None, True, b"op", "op", ""))  # not only str
    return {key: random_value(rng, depth + 1)}


@dataclass
class Frames:
    """Frames to send, from `rng`. `leases` holds secrets the daemon granted so far."""

    rng: random.Random
    leases: list[str] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def request(self) -> dict[str, Any]:
        """A valid request of a random op (valid at least until the daemon's state says no)."""
        rng = self.rng
        op = rng.choice(("hello", "checkout", "checkout", "heartbeat", "checkin", "available"))
        op = rng.choice((op, "consume"))
        rid = next(self.ids)
        lease = rng.choice(self.leases) if self.leases and rng.random() < 0.8 else "no-such"
        if op == "hello":
            return {"op": op, "id": rid, "protocol": 1, "client": "fuzz/1"}
        if op == "checkout":
            args: dict[str, Any] = {
                "key": rng.choice(KEYS),
                "holder": holder(f"fuzz-{rng.randrange(4)}").to_wire(),
                "request": rng.randbytes(16).hex(),
                "nonce": rng.randbytes(16),
                "seats": rng.choice((1, 1, 2)),
            }
            if rng.random() < 0.3:
                args["ttl"] = rng.choice((1.0, 30, 90.0, 1e9))
            return {"op": op, "id": rid, **args}
        if op == "heartbeat":
            return {"op": op, "id": rid, "lease": lease, "nonce": rng.randbytes(16)}
        if op == "checkin":
            return {"op": op, "id": rid, "lease": lease}
        if op == "available":
            return {"op": op, "id": rid, "key": rng.choice(KEYS)}
        consume = {"op": op, "id": rid, "lease": lease, "counter": "scans", "units": 1}
        if rng.random() < 0.5:
            consume["dedup"] = rng.randbytes(8).hex()
        return consume

    def mutated_map(self) -> dict[Any, Any]:
        rng = self.rng
        message: dict[Any, Any] = self.request()
        for _ in range(rng.randrange(1, 4)):
            target = message
            if isinstance(message.get("holder"), dict) and rng.random() < 0.3:
                target = message["holder"] = dict(message["holder"])
            name = rng.choice([*target, "op", "id", "extra", 7])
            if rng.random() < 0.2:
                target.pop(name, None)
            else:
                target[name] = rng.choice((rng.choice(ODD_VALUES), random_value(rng)))
        return message

    def frame(self) -> tuple[str, bytes]:
        """(what kind of mutation, the bytes to send)."""
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return "valid", encode(self.request())
        if kind == 1:
            flipped = bytearray(encode(self.request()))
            for _ in range(rng.randrange(1, 5)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return "flipped", bytes(flipped)
        if kind == 2:
            data = encode(self.request())
            return "truncated", data[: rng.randrange(len(data))]
        if kind == 3:
            return "extended", encode(self.request()) + rng.randbytes(rng.randrange(1, 64))
        if kind == 4:
            return "fields", encode(self.mutated_map())
        if kind == 5:
            return "msgpack", encode_any(random_value(rng))
        if kind == 6:
            length = rng.choice((*LENGTH_PREFIXES, rng.randrange(2**32)))
            body = rng.randbytes(min(length, rng.randrange(2048)))
            return "prefix", struct.pack(">I", length) + body
        if kind == 7:
            return "bytes", rng.randbytes(rng.randrange(1, 256))
        if kind == 8:
            burst = [encode(self.request()) for _ in range(rng.randrange(2, 12))]
            if rng.random() < 0.5:
                burst[rng.randrange(len(burst))] = encode(self.mutated_map())
            return "pipelined", b"".join(burst)
        body = msgpack.packb(self.request(), use_bin_type=True)
        body += rng.choice((b"\xc1", b"\xd4\x01\x00", b"\x81", b"\x80"))  # never-used, ext...
        return "trailing", struct.pack(">I", len(body)) + body


def encode_any(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def ends_on_a_frame(data: bytes) -> bool:
    """Whether `data` is whole frames (by their length prefixes), none left half-sent."""
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            return False
        (length,) = struct.unpack_from(">I", data, at)
        at += 4 + length
    return at == len(data)


# --------------------------------------------------------------------- the run


@dataclass
class Fuzz:
    seed: int
    daemon: Daemon
    deadline: float  # loop time
    sent: int = 0
    closes: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)
    sync_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(10**12))

    def more(self) -> bool:
        loop = asyncio.get_running_loop()
        return self.sent < MAX_FRAMES and loop.time() < self.deadline

    def where(self, worker: int, n: int, kind: str, data: bytes) -> str:
        shown = data[:300].hex() + ("..." if len(data) > 300 else "")
        return f"{SEED_ENV}={self.seed} connection {worker}, frame {n} ({kind}): {shown}"

    def check(self, reply: Any, where: Callable[[], str]) -> None:
        assert isinstance(reply, dict), f"{where()}: not a map: {reply!r}"
        assert reply.get("error") != NEVER, f"{where()}: answered {reply!r}"
        assert isinstance(reply.get("ok"), bool), f"{where()}: no ok: {reply!r}"
        outcome = "ok" if reply["ok"] else str(reply.get("error"))
        self.replies[outcome] = self.replies.get(outcome, 0) + 1
        if reply["ok"] and isinstance(reply.get("lease"), str):
            self.granted.add(reply["lease"])

    async def worker(self, n: int, rng: random.Random) -> None:
        frames = Frames(rng)
        peer: RawPeer | None = None
        count = 0
        try:
            while self.more():
                if peer is None:
                    peer = await RawPeer.connect(address(self.daemon))
                    if rng.random() < 0.9:  # else the frame goes before hello
                        hello = {"op": "hello", "id": 0, "protocol": 1, "client": "fuzz/1"}
                        await peer.send(hello)
                        reply = await peer.recv(ANSWER_WITHIN)
                        assert reply is not None and reply["ok"], f"{self.seed=}: {reply!r}"
                kind, data = frames.frame()
                count += 1
                self.sent += 1

                def where(kind: str = kind, data: bytes = data, count: int = count) -> str:
                    return self.where(n, count, kind, data)

                if not await self.exchange(peer, data, where):
                    self.closes += 1
                    await peer.close()
                    peer = None
                frames.leases = sorted(self.granted)
        finally:
            if peer is not None:
                await peer.close()

    async def exchange(self, peer: RawPeer, data: bytes, where: Callable[[], str]) -> bool:
        """Send `data`, read every reply it earns; False when the daemon closed."""
        sync: int | None = None
        try:
            if ends_on_a_frame(data):
                # A request of ours after it: its answer says the daemon is done with `data`.
                sync = next(self.sync_ids)
                await peer.send_bytes(
                    data + encode({"op": "available", "id": sync, "key": KEYS[0]})
                )
            else:  # a frame begun: the daemon waits for the rest, which never comes
                await peer.send_bytes(data)
                peer.writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the daemon closed on something sent before: read what it said
        while True:
            try:
                reply = await peer.recv(ANSWER_WITHIN)
            except TimeoutError:
                raise AssertionError(
                    f"{where()}: neither answered nor closed within {ANSWER_WITHIN:g} s"
                ) from None
            except (ConnectionError, OSError):
                return False
            if reply is None:
                return False
            self.check(reply, where)
            if sync is not None and reply.get("id") == sync:
                return True


async def test_fuzzed_frames_never_hurt_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = fuzz_seed()
    print(f"{SEED_ENV}={seed}")
    caplog.set_level(logging.WARNING)
    async with running(make_config(tmp_path, DICOM, METERED)) as daemon:
        good = await RawPeer.connect(address(daemon))
        await good.hello()
        kept = await good.checkout(h=holder("good"))
        assert kept["ok"] is True, kept
        before = {x: daemon.engine.in_use(x) for x in (DICOM.id, METERED.id)}

        loop = asyncio.get_running_loop()
        fuzz = Fuzz(seed, daemon, deadline=loop.time() + BUDGET)
        workers = [fuzz.worker(n, random.Random(f"{seed}/{n}")) for n in range(1, CONNECTIONS + 1)]
        await asyncio.gather(*workers)
        print(f"{fuzz.sent} frames, {fuzz.closes} closes, replies {fuzz.replies}")
        context = f"{SEED_ENV}={seed}"

        # No error logged: an exception in a protocol callback is logged by asyncio and
        # the connection dropped, without any `internal` reply to see.
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, f"{context}: {[r.getMessage() for r in errors]}"

        # The seats: every lease the fuzzing was granted goes back; nothing else is held.
        for secret in sorted(fuzz.granted):
            reply = await good.call("checkin", lease=secret)
            assert reply["ok"] or reply["error"] == "lease_unknown", f"{context}: {reply}"
        # No lease granted without its answer (a request pipelined after one whose
        # answer closes the connection was once carried out all the same).
        unanswered = [
            (x.handle, x.holder.host, x.request)
            for x in daemon.engine.leases
            if x.secret != kept["lease"]
        ]
        assert unanswered == [], f"{context}: granted, never answered: {unanswered}"
        after = {x: daemon.engine.in_use(x) for x in (DICOM.id, METERED.id)}
        assert after == before, f"{context}: seats in use {before} -> {after}"
        assert [x.secret for x in daemon.engine.leases] == [kept["lease"]], context

        # Still serving, and a good client works: the lease kept, a new one, a checkin.
        beat = await good.call("heartbeat", lease=kept["lease"], nonce=os.urandom(16))
        assert beat["ok"] is True, f"{context}: {beat}"
        fresh = await RawPeer.connect(address(daemon))
        await fresh.hello()
        new = await fresh.checkout(h=holder("after"))
        assert new["ok"] is True, f"{context}: {new}"
        assert daemon.engine.in_use(DICOM.id) == before[DICOM.id] + 1, context
        assert (await fresh.call("checkin", lease=new["lease"]))["ok"] is True, context
        assert (await good.call("checkin", lease=kept["lease"]))["ok"] is True, context
        assert daemon.engine.in_use(DICOM.id) == 0, context
        await fresh.close()
        await good.close()
