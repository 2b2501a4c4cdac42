"""A real daemon on 127.0.0.1, in this process with a fake clock, spoken to by raw peers."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import socket
import sqlite3
import struct
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

import licd
import licd_client
from licd.clock import ManualClock
from licd.core.events import Event
from licd.daemon import setup_logging
from licd.deferred import Deferred
from licd.engine import SeatLease
from licd.shells.server import WRITE_HIGH_WATER
from licd_client import tokens
from licd_client.errors import TokenInvalid
from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode
from tests.support import DICOM, RawPeer, address, holder, make_config, running


async def connected(addr: tuple[str, int]) -> RawPeer:
    peer = await RawPeer.connect(addr)
    await peer.hello()
    return peer


async def test_hello_gives_key_site_and_time(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        peer = await RawPeer.connect(address(daemon))
        reply = await peer.hello()
        assert reply["protocol"] == 1
        assert reply["server"].startswith("licd/")
        assert reply["site"] == "test"
        assert reply["key"] == daemon.signer.public
        assert reply["chain"] == []
        assert reply["time"] == clock.wall
        await peer.close()


async def test_unsupported_protocol_lists_supported(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await RawPeer.connect(address(daemon))
        reply = await peer.call("hello", protocol=7, client="future/1")
        assert reply["error"] == "unsupported_protocol"
        assert reply["detail"] == {"supported": [1, 2]}
        await peer.hello()  # the connection stays usable
        await peer.close()


async def test_op_before_hello_is_refused_and_closed(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await RawPeer.connect(address(daemon))
        reply = await peer.call("available", key=DICOM.key)
        assert reply["ok"] is False and reply["error"] == "hello_required"
        assert await peer.closed()
        assert daemon.engine.in_use(DICOM.id) == 0


async def test_op_before_hello_is_hello_required_even_with_bad_arguments(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await RawPeer.connect(address(daemon))
        reply = await peer.call("checkout", seats="x")
        assert (reply["ok"], reply["error"]) == (False, "hello_required")
        assert await peer.closed()
        # Not an op of the protocol at all: the request is malformed, hello or not.
        peer = await RawPeer.connect(address(daemon))
        reply = await peer.call("no-such-op")
        assert (reply["ok"], reply["error"]) == (False, "bad_request")
        assert await peer.closed()


async def test_seed_000_scenario_with_verified_tokens(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        anchor = daemon.signer.public
        peers = [await connected(address(daemon)) for _ in range(4)]
        leases = []
        for peer, host in zip(peers[:3], "ABC", strict=True):
            nonce = os.urandom(16)
            reply = await peer.checkout(h=holder(f"machine_{host}"), nonce=nonce)
            assert reply["ok"] is True, reply
            leaf = tokens.verify_lease(
                [anchor], reply["chain"], reply["token"], nonce=nonce, handle=reply["handle"]
            )
            assert leaf.payload["lic"] == DICOM.id
            assert leaf.payload["holder"]["host"] == f"machine_{host}"
            assert DICOM.key.encode() not in reply["token"]
            assert reply["lease"] not in reply["handle"]
            assert reply["features"] == DICOM.features
            assert reply["renew_in"] == pytest.approx(reply["ttl"] / 3)
            leases.append(reply)
        denied = await peers[3].checkout(h=holder("machine_D"))
        assert denied["ok"] is False
        assert denied["error"] == "seats_exhausted"
        assert denied["message"] == "maximum allowed concurrent licences reached"
        assert denied["detail"] == {"in_use": 3, "total": 3, "rule": "seats"}
        released = await peers[0].call("checkin", lease=leases[0]["lease"])
        assert released["released"] is True
        again = await peers[0].call("checkin", lease=leases[0]["lease"])
        assert again == {"id": again["id"], "ok": True, "released": False}
        assert (await peers[3].checkout(h=holder("machine_D")))["ok"] is True
        for peer in peers:
            await peer.close()


async def test_token_checks_fail_on_tampering(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(address(daemon))
        nonce = os.urandom(16)
        reply = await peer.checkout(nonce=nonce)
        token = bytearray(reply["token"])
        token[-3] ^= 0x01
        with pytest.raises(TokenInvalid):
            tokens.verify_lease([daemon.signer.public], [], bytes(token), nonce=nonce)
        with pytest.raises(TokenInvalid):
            tokens.verify_lease([os.urandom(32)], [], reply["token"], nonce=nonce)
        with pytest.raises(TokenInvalid):
            tokens.verify_lease([daemon.signer.public], [], reply["token"], nonce=b"x" * 16)
        await peer.close()


async def test_dead_client_seat_returns_after_ttl_plus_grace(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        peer = await connected(address(daemon))
        assert (await peer.checkout(seats=3))["ok"] is True
        await peer.close()  # the client dies without checking in
        clock.advance(DICOM.lease_ttl + DICOM.grace - 0.5)
        assert await daemon.service.reap_once(clock.now()) == []
        other = await connected(address(daemon))
        assert (await other.checkout(h=holder("b")))["error"] == "seats_exhausted"
        clock.advance(1)
        assert len(await daemon.service.reap_once(clock.now())) == 1
        assert (await other.checkout(h=holder("b")))["ok"] is True
        await other.close()
    # The reclaim was committed: a restart does not bring the lease back.
    async with running(make_config(tmp_path), clock) as daemon:
        assert daemon.engine.in_use(DICOM.id) == 1


async def test_retried_checkout_holds_one_seat(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        first = await connected(address(daemon))
        await first.send(
            {
                "op": "checkout",
                "id": 1,
                "key": DICOM.key,
                "holder": holder().to_wire(),
                "request": "logical-1-0123456789abcdef",
                "nonce": os.urandom(16),
            }
        )
        await first.close()  # the reply is lost with the connection
        second = await connected(address(daemon))
        reply = await second.checkout(request="logical-1-0123456789abcdef")
        again = await second.checkout(request="logical-1-0123456789abcdef")
        assert reply["ok"] and again["ok"]
        assert reply["lease"] == again["lease"]
        assert reply["token"] != again["token"]
        assert (await second.call("available", key=DICOM.key))["in_use"] == 1
        await second.close()


async def test_leases_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        key = daemon.signer.public
        peer = await connected(address(daemon))
        held = [(await peer.checkout(h=holder(h)))["lease"] for h in ("a", "b")]
        await peer.close()
    clock.advance(60)
    async with running(make_config(tmp_path), clock) as daemon:
        assert daemon.signer.public == key
        peer = await connected(address(daemon))
        for secret in held:
            nonce = os.urandom(16)
            reply = await peer.call("heartbeat", lease=secret, nonce=nonce)
            assert reply["ok"] is True, reply
            tokens.verify_lease([key], reply["chain"], reply["token"], nonce=nonce)
        assert (await peer.call("available", key=DICOM.key))["in_use"] == 2
        await peer.close()


async def test_storage_failure_grants_nothing(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        with sqlite3.connect(daemon.store.where) as db:
            db.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON lease BEGIN SELECT RAISE(ABORT, 'x'); END"
            )
        peer = await connected(address(daemon))
        reply = await peer.checkout(seats=3)
        assert reply["ok"] is False and reply["error"] == "unavailable"
        assert "token" not in reply
        assert daemon.engine.in_use(DICOM.id) == 0
        await peer.close()


async def test_unknown_licence_and_lease(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(address(daemon))
        assert (await peer.checkout(key="NOPE"))["error"] == "unknown_licence"
        reply = await peer.call("heartbeat", lease="not-a-lease", nonce=os.urandom(16))
        assert reply["error"] == "lease_unknown"
        await peer.close()


async def test_expired_licence_still_loads(tmp_path: Path) -> None:
    clock = ManualClock()
    old = replace(DICOM, expires=clock.wall - 1)
    async with running(make_config(tmp_path, old), clock) as daemon:
        peer = await connected(address(daemon))
        assert (await peer.checkout())["error"] == "licence_expired"
        await peer.close()


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, replace(DICOM, seats=10))) as daemon:
        peer = await connected(address(daemon))
        frames = b""
        for i in range(8):
            op = (
                {"op": "available", "key": DICOM.key}
                if i % 2
                else {
                    "op": "checkout",
                    "key": DICOM.key,
                    "holder": holder(f"h{i}").to_wire(),
                    "request": f"r{i:021d}",
                    "nonce": os.urandom(16),
                }
            )
            body = msgpack.packb({"id": 100 + i, **op})
            frames += struct.pack(">I", len(body)) + body
        await peer.send_bytes(frames)
        ids = []
        for _ in range(8):
            reply = await peer.recv()
            assert reply is not None and reply["ok"] is True, reply
            ids.append(reply["id"])
        assert ids == list(range(100, 108))
        await peer.close()


def _frames(*messages: dict[str, object]) -> bytes:
    bodies = [msgpack.packb(message) for message in messages]
    return b"".join(struct.pack(">I", len(body)) + body for body in bodies)


async def test_more_pipelined_requests_than_the_cap_are_all_answered_in_order(
    tmp_path: Path,
) -> None:
    # Past max_pipeline (4 here) owed replies, the connection is not read until they go.
    config = make_config(tmp_path, replace(DICOM, seats=100), max_pipeline=4)
    async with running(config) as daemon:
        peer = await connected(address(daemon))
        messages: list[dict[str, object]] = []
        for i in range(60):
            if i % 3:
                messages.append({"id": 1000 + i, "op": "available", "key": DICOM.key})
            else:
                messages.append(
                    {
                        "id": 1000 + i,
                        "op": "checkout",
                        "key": DICOM.key,
                        "holder": holder(f"h{i}").to_wire(),
                        "request": f"r{i:021d}",
                        "nonce": os.urandom(16),
                    }
                )
        await peer.send_bytes(_frames(*messages))
        replies = [await peer.recv() for _ in messages]
        assert [r["id"] for r in replies if r is not None] == [m["id"] for m in messages]
        assert all(r is not None and r["ok"] is True for r in replies), replies
        assert (await peer.call("available", key=DICOM.key))["in_use"] == 20
        await peer.close()


async def test_replies_owed_are_sent_after_the_peer_half_closes(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, replace(DICOM, seats=10))) as daemon:
        peer = await connected(address(daemon))
        leases = [(await peer.checkout(h=holder(f"h{i}")))["lease"] for i in range(3)]
        # Checkins, which wait for their commit too (a checkout owed at a half-close is
        # another matter: tests/integration/test_interrupted_checkout.py).
        messages = [{"id": 7 + i, "op": "checkin", "lease": x} for i, x in enumerate(leases)]
        peer.writer.write(_frames(*messages))
        peer.writer.write_eof()  # nothing more from us: the checkins are still answered
        replies = [await peer.recv() for _ in messages]
        assert [(r or {}).get("released") for r in replies] == [True, True, True]
        assert await peer.recv() is None  # then the daemon closes
        await peer.close()
        assert daemon.engine.in_use(DICOM.id) == 0


async def test_a_peer_that_never_reads_is_cut_off_and_others_are_served(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, write_timeout=0.3, max_connections_per_peer=10)
    async with running(config) as daemon:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address(daemon))
        reader, writer = await asyncio.open_connection(sock=sock)
        hog = RawPeer(reader, writer)
        await hog.hello()
        lease = await hog.checkout()
        beat = {"op": "heartbeat", "lease": lease["lease"], "nonce": os.urandom(16)}
        # Tens of thousands of renewals, none of them read: all but the first few are
        # answered rate_limited (about 130 bytes each), megabytes more than any buffer.
        writer.write(_frames(*({"id": i, **beat} for i in range(100_000))))
        [hog_here] = daemon.server.connections
        bystander = await connected(address(daemon))
        async with asyncio.timeout(10):
            await hog_here.wait_closed()  # the hog is cut off...
        assert daemon.server.connection_count == 1
        # ...and everyone else is served as before.
        assert (await bystander.call("available", key=DICOM.key))["in_use"] == 1
        await bystander.close()
        await hog.close()


async def test_a_closed_connection_whose_peer_never_reads_is_cut_off(tmp_path: Path) -> None:
    # Replies below the write high-water mark, then a half-close: the daemon closes its
    # side once they are written, and cuts the peer off if it never reads them.
    loop = asyncio.get_running_loop()
    config = make_config(tmp_path, write_timeout=0.5)
    async with running(config) as daemon:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address(daemon))
            hello = {"id": 0, "op": "hello", "protocol": 1, "client": "tests/1"}
            checkout = {
                "id": 1,
                "op": "checkout",
                "key": DICOM.key,
                "holder": holder().to_wire(),
                "request": "r1" * 11,
                "nonce": os.urandom(16),
            }
            await loop.sock_sendall(sock, _frames(hello, checkout))
            decoder = FrameDecoder(1 << 20, REPLY_LIMITS)
            replies: list[dict[str, object]] = []
            while len(replies) < 2:  # the last replies this peer reads
                decoder.feed(await loop.sock_recv(sock, 65536))
                while (frame := decoder.next_frame()) is not None:
                    replies.append(frame)
            beat = {"op": "heartbeat", "lease": replies[1]["lease"], "nonce": os.urandom(16)}
            [here] = daemon.server.connections
            assert here.transport is not None
            for i in range(40_000):  # one at a time, until a reply waits in the daemon
                await loop.sock_sendall(sock, _frames({"id": i, **beat}))
                await asyncio.sleep(0)
                if here.transport.get_write_buffer_size():
                    break
            assert 0 < here.transport.get_write_buffer_size() < WRITE_HIGH_WATER
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                await here.wait_closed()
            assert daemon.server.connection_count == 0
        finally:
            sock.close()


async def test_frames_split_across_reads_keep_a_busy_connection_alive(tmp_path: Path) -> None:
    # Every read ends inside a frame, for longer than frame_timeout in all: each frame
    # is on time, so the connection lives.
    config = make_config(tmp_path, frame_timeout=1.0)
    async with running(config) as daemon:
        peer = await connected(address(daemon))
        stream = _frames(*({"id": i, "op": "available", "key": DICOM.key} for i in range(8)))
        size = len(stream) // 8  # the frames are all the same size
        cuts = [0, *(n * size + size // 2 for n in range(1, 8)), len(stream)]
        for start, end in itertools.pairwise(cuts):  # the rest of a frame, half the next
            await peer.send_bytes(stream[start:end])
            await asyncio.sleep(0.2)
        replies = [await peer.recv() for _ in range(8)]
        assert [r["id"] for r in replies if r is not None] == list(range(8))
        await peer.close()


async def test_a_frame_half_read_while_we_wait_on_a_commit_is_not_timed_out(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, replace(DICOM, seats=10), frame_timeout=0.3, max_pipeline=1)
    async with running(config) as daemon:
        peer = await connected(address(daemon))
        one, two = (
            _frames(
                {
                    "id": i,
                    "op": "checkout",
                    "key": DICOM.key,
                    "holder": holder(f"h{i}").to_wire(),
                    "request": f"r{i:021d}",
                    "nonce": os.urandom(16),
                }
            )
            for i in (1, 2)
        )
        other = sqlite3.connect(daemon.service.store.where, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # the first checkout's commit must wait
            await peer.send_bytes(one[:10])  # a frame begun...
            await asyncio.sleep(0.05)
            await peer.send_bytes(one[10:] + two[:10])  # ...ended, and the next begun
            await asyncio.sleep(0.6)  # the daemon waits on the commit, not reading us
            other.execute("COMMIT")
        finally:
            other.close()
        await peer.send_bytes(two[10:])
        replies = [await peer.recv() for _ in range(2)]
        assert [(r or {}).get("ok") for r in replies] == [True, True]
        await peer.close()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">I", 1 << 30), "frame_too_large"),
        (struct.pack(">I", 0), "frame_too_large"),
        (struct.pack(">I", 2000) + b"\x91" * 2000, "frame_too_large"),  # > 1 KiB before hello
        (struct.pack(">I", 1000) + b"\x91" * 999 + b"\xc0", "bad_request"),  # nested bomb
        (struct.pack(">I", 16) + os.urandom(16), "bad_request"),
        (struct.pack(">I", 3) + b"\x93\x01\x02", "bad_request"),  # not a map
    ],
    ids=["huge", "zero", "big-before-hello", "bomb", "garbage", "array"],
)
async def test_bad_frames_get_one_error_and_a_close(
    tmp_path: Path, payload: bytes, code: str
) -> None:
    async with running(make_config(tmp_path)) as daemon:
        bystander = await connected(address(daemon))
        peer = await RawPeer.connect(address(daemon))
        await peer.send_bytes(payload)
        reply = await peer.recv()
        assert reply is not None
        assert (reply["id"], reply["ok"], reply["error"]) == (None, False, code)
        assert await peer.closed()
        assert (await bystander.call("available", key=DICOM.key))["ok"] is True
        await bystander.close()


async def test_unknown_keys_get_bad_request_and_close(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(address(daemon))
        reply = await peer.call("available", key=DICOM.key, colour="blue")
        assert reply["error"] == "bad_request" and "colour" in reply["message"]
        assert await peer.closed()


async def test_raw_peer_closed_is_false_while_the_daemon_keeps_the_connection(
    tmp_path: Path,
) -> None:
    """The helper itself: `closed()` once returned True for a connection left open."""
    async with running(make_config(tmp_path)) as daemon:  # idle_timeout: 120 s
        peer = await connected(address(daemon))
        assert await peer.closed(within=0.2) is False


async def test_no_request_is_carried_out_after_a_closing_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(make_config(tmp_path)) as daemon:
        # Checkout commits wait for the test: the first checkout's reply stays owed, so
        # the bad request's closing answer queues behind it.
        store = daemon.service.store
        insert = store.insert_lease
        held: list[tuple[Deferred[None], Deferred[None]]] = []

        def gated_insert(lease: SeatLease, event: Event | None = None) -> Deferred[None]:
            gate: Deferred[None] = Deferred()
            held.append((insert(lease, event), gate))
            return gate

        monkeypatch.setattr(store, "insert_lease", gated_insert)
        peer = await connected(address(daemon))
        witness = await connected(address(daemon))
        first, later = os.urandom(16).hex(), os.urandom(16).hex()
        wire_holder = holder().to_wire()
        checkout = {"op": "checkout", "key": DICOM.key, "holder": wire_holder}
        try:
            await peer.send_bytes(
                encode({**checkout, "id": 1, "request": first, "nonce": os.urandom(16)})
                + encode({"op": "available", "id": 2, "key": DICOM.key, "colour": "blue"})
                + encode({**checkout, "id": 3, "request": later, "nonce": os.urandom(16)})
            )
            # A round trip on another connection: the daemon has read every connection
            # that was readable before it, so all three frames reached it (if it reads).
            assert (await witness.call("available", key=DICOM.key))["ok"] is True
            assert len(held) >= 1, "the first checkout was not even started"
            carried_out = [x.request for x in daemon.engine.leases]
            assert carried_out == [first], "a checkout after the closing error was granted"
            for commit, gate in held:
                await commit
                gate.settle(None)
            one = await peer.recv()
            assert one is not None and (one["id"], one["ok"]) == (1, True), one
            two = await peer.recv()
            assert two is not None and (two["id"], two["error"]) == (2, "bad_request"), two
            assert await peer.closed()
            assert daemon.engine.in_use(DICOM.id) == 1
        finally:
            for commit, gate in held:
                await commit
                if not gate.done():
                    gate.settle(None)
            await peer.close()
            await witness.close()


#: Where the daemon under test allocates: an allocation counts when any frame of its
#: traceback is in these packages and none is in the tests (the peer's own decoding).
DAEMON_CODE = [
    tracemalloc.Filter(True, str(Path(path).parent / "*"), all_frames=True)
    for path in (licd.__file__ or "", licd_client.__file__ or "")
] + [tracemalloc.Filter(False, str(Path(__file__).parents[1] / "*"), all_frames=True)]


def daemon_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes the daemon's code holds in `after` beyond `before`."""
    stats = after.filter_traces(DAEMON_CODE).compare_to(
        before.filter_traces(DAEMON_CODE), "filename"
    )
    return sum(stat.size_diff for stat in stats)


async def test_bad_input_does_not_grow_memory(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        bomb = struct.pack(">I", 16000) + b"\x91" * 15999 + b"\xc0"

        async def attack() -> None:
            peer = await connected(address(daemon))
            await peer.send_bytes(bomb)
            reply = await peer.recv()
            assert reply is not None and reply["error"] == "bad_request"
            assert await peer.closed()

        await attack()  # warm up
        with pytest.MonkeyPatch.context() as quiet:
            # Garbage earlier tests left (a failed one's open connections, say) goes
            # now: its warnings are theirs, and it must not count here either way.
            quiet.setattr(sys, "unraisablehook", lambda _: None)
            gc.collect()
        was_tracing = tracemalloc.is_tracing()
        tracemalloc.start(25)  # frames enough to see the daemon's code under asyncio's
        try:
            gc.collect()
            before = tracemalloc.take_snapshot()
            for _ in range(50):
                await attack()
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            if not was_tracing:
                tracemalloc.stop()
        grown = daemon_growth(before, after)
        top = after.filter_traces(DAEMON_CODE).compare_to(
            before.filter_traces(DAEMON_CODE), "lineno"
        )
        # About 2 KiB here (timers, the reaper's state); a connection kept would be more
        # than 16 KiB over the 50 connections even if its buffers were freed.
        assert grown < 16 * 1024, [str(x) for x in top[:10]]
        assert daemon.server.connection_count == 0


async def test_connection_caps(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_connections=3, max_connections_per_peer=2)
    async with running(config) as daemon:
        a = await connected(address(daemon))
        b = await connected(address(daemon))
        c = await RawPeer.connect(address(daemon))
        reply = await c.recv()
        assert reply is not None and reply["error"] == "too_many_connections"
        assert await c.closed()
        await a.close()
        d = await connected(address(daemon))  # room again once one left
        await b.close()
        await d.close()


async def test_hello_and_frame_timeouts(tmp_path: Path) -> None:
    config = make_config(tmp_path, hello_timeout=0.2, frame_timeout=0.2, idle_timeout=0.3)
    async with running(config) as daemon:
        silent = await RawPeer.connect(address(daemon))
        assert await silent.closed(within=5)
        partial = await connected(address(daemon))
        await partial.send_bytes(b"\x00\x00")  # a frame started, never finished
        assert await partial.closed(within=5)
        idle = await connected(address(daemon))
        assert await idle.closed(within=5)


async def test_shutdown_refuses_new_requests_and_keeps_leases(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(address(daemon))
        assert (await peer.checkout())["ok"] is True
        daemon.server.dispatcher.shutting_down = True
        reply = await peer.call("available", key=DICOM.key)
        assert reply["error"] == "shutting_down"
        daemon.server.dispatcher.shutting_down = False
        stopping = asyncio.create_task(daemon.server.stop())
        assert await peer.closed()
        await stopping
    async with running(make_config(tmp_path)) as daemon:
        assert daemon.engine.in_use(DICOM.id) == 1


async def test_logs_never_show_lease_secrets_or_licence_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # licd's own loggers at their most talkative. (aiosqlite's debug log quotes SQL
    # parameters; setup_logging keeps it at WARNING, see the next test.)
    caplog.set_level("DEBUG", logger="licd")
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        peer = await connected(address(daemon))
        secrets = []
        for i in range(3):
            reply = await peer.checkout(h=holder(f"h{i}"))
            secrets.append(reply["lease"])
        assert (await peer.checkout(h=holder("h9")))["error"] == "seats_exhausted"
        assert (await peer.checkout(key="SECRET-WRONG-KEY"))["error"] == "unknown_licence"
        await peer.call("heartbeat", lease=secrets[0], nonce=os.urandom(16))
        await peer.call("checkin", lease=secrets[0])
        clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
        await daemon.service.reap_once(clock.now())
        await peer.close()
    text = caplog.text
    assert "event=checkout" in text and "event=denied" in text and "event=reclaim" in text
    for secret in [*secrets, DICOM.key, "SECRET-WRONG-KEY"]:
        assert secret not in text


def test_setup_logging_keeps_sql_parameters_out() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug")
        assert logging.getLogger("licd").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
