"""Batched signatures (protocol 2) through a real daemon: a connection that said hello
with protocol 2 gets, while the daemon is busy, heartbeat replies whose tokens share one
signature over a Merkle tree, each with its proof, and every one verifies; one that
said hello with 1 never gets a batch; a block (delegate) is always signed whole."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from licd_client import AsyncClient, merkle
from licd_client.messages import BatchProof
from licd_client.statements import open_statement
from licd_client.wire import encode
from tests.support import DICOM, RawPeer, address, holder, make_config, running

ROUND = 8  # heartbeats sent in one write: one turn of the daemon's loop


async def hello(peer: RawPeer, protocol: int) -> None:
    reply = await peer.call("hello", protocol=protocol, client="tests/1")
    assert reply["ok"] is True and reply["protocol"] == protocol


async def leases(peer: RawPeer, key: str, **args: Any) -> list[str]:
    """ROUND leases (heartbeats are rate-limited per lease: one a round each)."""
    out = []
    for i in range(ROUND):
        reply = await peer.checkout(key, holder(f"h{i}"), **args)
        assert reply["ok"] is True, reply
        out.append(reply["lease"])
    return out


async def round_of_heartbeats(peer: RawPeer, held: list[str]) -> list[dict[str, Any]]:
    """One heartbeat of each lease, all in one write (pipelined), and their replies."""
    frames = [
        encode({"op": "heartbeat", "id": 100 + i, "lease": lease, "nonce": os.urandom(16)})
        for i, lease in enumerate(held)
    ]
    await peer.send_bytes(b"".join(frames))
    replies = [await peer.recv() for _ in range(ROUND)]
    assert all(r is not None and r["ok"] is True for r in replies), replies
    return [r for r in replies if r is not None]


def signed_by(key: bytes, reply: dict[str, Any]) -> bool:
    """Whether the reply's token is signed by `key`, whole or through its batch."""
    batch = reply.get("batch")
    if batch is None:
        VerifyKey(key).verify(reply["token"])
        return True
    proof = BatchProof.from_wire(batch)
    root = merkle.root_from_path(reply["token"], proof.index, proof.size, proof.path)
    VerifyKey(key).verify(merkle.batch_message(proof.size, root), proof.sig)
    return True


async def test_a_busy_loops_tokens_share_one_signature_and_each_verifies(tmp_path: Path) -> None:
    config = make_config(tmp_path, replace(DICOM, seats=100))
    async with running(config) as daemon:
        key = daemon.signer.public
        peer = await RawPeer.connect(address(daemon))
        await hello(peer, 2)
        lease = await leases(peer, DICOM.key)
        await round_of_heartbeats(peer, lease)  # a busy turn: the next ones are batched
        replies = await round_of_heartbeats(peer, lease)
        batched = [r for r in replies if "batch" in r]
        assert batched, "no reply of a busy turn was batched"
        sigs = {r["batch"]["sig"] for r in batched}
        assert len(sigs) < len(batched)  # shared signatures
        assert all(signed_by(key, r) for r in replies)
        # A proof moved to another reply's token does not verify.
        first, second = batched[0], batched[1]
        forged = {**first, "token": second["token"]}
        try:
            signed_by(key, forged)
        except Exception:
            pass
        else:
            raise AssertionError("a batch proof verified another token")
        # A quiet turn again: one heartbeat alone, a whole statement.
        await round_of_heartbeats(peer, lease)
        alone = await peer.call("heartbeat", lease=lease[0], nonce=os.urandom(16))
        alone = await peer.call("heartbeat", lease=lease[1], nonce=os.urandom(16))
        assert "batch" not in alone and signed_by(key, alone)

        # Protocol 1 never sees a batch, however busy.
        old = await RawPeer.connect(address(daemon))
        await hello(old, 1)
        for _ in range(3):
            assert all("batch" not in r for r in await round_of_heartbeats(old, lease))
        # A block (delegate) is a chain link: always a whole statement.
        blocks = replace(DICOM, key="BLOCK-KEY-1", id="blocks", seats=100, delegable=True)
        await peer.close()
        await old.close()
    config = make_config(tmp_path / "b", blocks)
    async with running(config) as daemon:
        peer = await RawPeer.connect(address(daemon))
        await hello(peer, 2)
        held = await leases(peer, blocks.key, delegate=os.urandom(32))
        for _ in range(3):
            for r in await round_of_heartbeats(peer, held):
                assert "batch" not in r and signed_by(daemon.signer.public, r)
        await peer.close()


async def test_the_client_library_verifies_the_batched_tokens_of_a_busy_daemon(
    tmp_path: Path,
) -> None:
    async with running(make_config(tmp_path, replace(DICOM, seats=100))) as daemon:
        host, port = address(daemon)
        clients = [AsyncClient(f"{host}:{port}", daemon.signer.public.hex()) for _ in range(20)]
        held = [await c.checkout(DICOM.key, instance=str(i)) for i, c in enumerate(clients)]
        batched = 0
        for _ in range(5):  # renewals sent together: the daemon reads them in a turn or two
            await asyncio.gather(*(lease.renew_once() for lease in held))
            assert all(lease.valid for lease in held)
            batched += sum(
                lease.statement is not None and lease.statement.proof is not None for lease in held
            )
        assert batched, "no renewal's token was batched"
        proven = next(x.statement for x in held if x.statement and x.statement.proof)
        assert proven is not None and proven.proof is not None
        # The proof stands on its own, offline: the payload and its batch, checked again.
        again = open_statement(proven.proof.payload, daemon.signer.public, proven.proof.batch)
        assert again == proven
        for lease in held:
            await lease.release()
        for client in clients:
            await client.aclose()
