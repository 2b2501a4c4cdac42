"""The benchmark's floor servers (benchmarks/floor.py) start, answer the load
generator's frames, and the signing floors' replies verify: a lone reply signed inline,
a batch's replies each on a path to the one signed root, which a moved leaf or a forged
path does not reach. No timing is asserted here: `make bench` measures that.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from nacl.signing import SigningKey

from benchmarks.floor import (
    FLOORS,
    SIGNED,
    Batcher,
    BatchingProtocol,
    FloorServer,
    TokenMaker,
    fixed_reply,
    open_reply,
)
from licd_client.errors import TokenInvalid
from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode
from tests.support import RawPeer


@pytest.mark.parametrize("mode", list(FLOORS))
async def test_a_floor_server_starts_and_answers(mode: str) -> None:
    floor = await asyncio.to_thread(FloorServer, mode, 400)
    try:
        peer = await RawPeer.connect(("127.0.0.1", floor.port))
        await peer.send({"op": "hello", "id": 1, "protocol": 1, "client": "test"})
        hello = await peer.recv()
        assert hello is not None and hello["ok"] is True
        nonce = os.urandom(16)
        await peer.send({"op": "heartbeat", "id": 2, "lease": "x" * 32, "nonce": nonce})
        reply = await peer.recv()
        assert reply is not None and reply["ok"] is True
        if mode in SIGNED:
            assert "batch" not in reply  # alone in its loop iteration: signed inline
            payload = open_reply(reply, floor.public)
            assert payload["typ"] == "lease" and payload["nonce"] == nonce
            with pytest.raises(TokenInvalid):
                open_reply(reply, bytes(32))
        peer.writer.close()
    finally:
        await asyncio.to_thread(floor.stop)
    if mode in SIGNED:
        assert floor.stats["replies_signed"] == floor.stats["signatures"] == 1


class _Collect(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = FrameDecoder(1 << 20, REPLY_LIMITS)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.decoder.feed(bytes(data))

    def is_closing(self) -> bool:
        return False

    def replies(self) -> list[dict[str, Any]]:
        out = []
        while (frame := self.decoder.next_frame()) is not None:
            out.append(frame)
        return out


async def test_the_replies_of_one_loop_iteration_share_one_signed_root() -> None:
    maker = TokenMaker(SigningKey.generate(), fixed_reply(400))
    batcher = Batcher(maker)
    sent: list[list[bytes | None]] = [[os.urandom(16) for _ in range(3)], [None, os.urandom(16)]]
    transports = []
    for nonces in sent:  # two connections, their requests read in the same iteration
        conn, transport = BatchingProtocol(batcher), _Collect()
        conn.connection_made(transport)
        frames = b"".join(
            encode({"op": "hello", "id": 1} if n is None else {"op": "heartbeat", "nonce": n})
            for n in nonces
        )
        conn.data_received(frames)
        transports.append(transport)
    await asyncio.sleep(0)  # the flush the first reply scheduled
    replies = [t.replies() for t in transports]
    assert maker.signatures == 1 and maker.replies == 4
    signed = []
    for nonces, theirs in zip(sent, replies, strict=True):
        assert len(theirs) == len(nonces)
        for nonce, reply in zip(nonces, theirs, strict=True):
            if nonce is None:
                assert reply["ok"] is True and "batch" not in reply  # the plain reply
                continue
            assert open_reply(reply, maker.public)["nonce"] == nonce
            signed.append(reply)
    assert len({r["batch"]["sig"] for r in signed}) == 1
    assert sorted(r["batch"]["index"] for r in signed) == [0, 1, 2, 3]
    first, second = signed[0]["batch"], signed[1]["batch"]
    moved = {**signed[0], "batch": {**first, "index": (first["index"] + 1) % 4}}
    forged = {**signed[1], "batch": {**second, "path": [bytes(32)] + second["path"][1:]}}
    for bad in (moved, forged, {**signed[2], "token": signed[3]["token"]}):
        with pytest.raises(TokenInvalid):
            open_reply(bad, maker.public)
