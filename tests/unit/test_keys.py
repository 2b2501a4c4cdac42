"""The Signer: a lease token it signs verifies with licd_client and carries the lease;
the BatchSigner signs a quiet loop's tokens one by one and a busy one's together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from licd.core.keys import BatchSigner, Signer
from licd.deferred import Deferred
from licd.engine import Grant, SeatLease
from licd_client import merkle
from licd_client.errors import TokenInvalid
from licd_client.messages import BatchProof, Features
from licd_client.tokens import verify_lease
from tests.support import DICOM, holder

NOW = 1_790_000_000.0
NONCE = bytes(range(16))
KEY = SigningKey(bytes([7]) * 32)
PUBLIC = bytes(KEY.verify_key)
FEATURES: Features = {"tier": "pro", "modules": "core,ocr", "ocr": True}


def grant(**lease_changes: object) -> Grant:
    lease = SeatLease(
        secret="s" * 32,
        handle="k3v7p2m6q4xa",
        licence_id=DICOM.id,
        holder=holder("ws-7", user="bob", pid=4242),
        request="r" * 32,
        seats=2,
        ttl=90.0,
        created=NOW,
        expires=NOW + 90.0,
        last_heartbeat=NOW,
    )
    lease = replace(lease, **lease_changes)  # type: ignore[arg-type]
    return Grant(lease=lease, licence=DICOM, ttl=90.0, fresh=True, features=FEATURES)


def test_a_lease_token_verifies_and_carries_the_lease() -> None:
    signer = Signer(KEY, "hq")
    token = signer.lease_token(grant(), NONCE, NOW)
    leaf = verify_lease([PUBLIC], [], token, nonce=NONCE, handle="k3v7p2m6q4xa", at=NOW)
    assert (leaf.typ, leaf.iss, leaf.iat, leaf.exp) == ("lease", PUBLIC, NOW, NOW + 90.0)
    assert (leaf.lid, leaf.licence, leaf.site) == ("k3v7p2m6q4xa", DICOM.id, "hq")
    assert (leaf.product, leaf.seats, leaf.features) == ("dicom", 2, FEATURES)
    # The holder as the protocol names it: no pid, and never the licence key or secret.
    assert leaf.payload["holder"] == {"host": "ws-7", "hostid": "id-ws-7", "user": "bob"}
    assert leaf.delegate is None and not leaf.overdraft
    assert not {"del", "ovr"} & leaf.payload.keys()
    assert DICOM.key.encode() not in token and b"s" * 32 not in token


def test_a_token_signed_by_another_key_is_refused() -> None:
    token = Signer(SigningKey(bytes([8]) * 32), "hq").lease_token(grant(), NONCE, NOW)
    with pytest.raises(TokenInvalid):
        verify_lease([PUBLIC], [], token, nonce=NONCE)


def test_a_block_names_its_delegate_and_an_overdraft_lease_says_so() -> None:
    delegate = bytes(SigningKey(bytes([9]) * 32).verify_key)
    token = Signer(KEY, "hq").lease_token(grant(delegate=delegate, overdraft=True), NONCE, NOW)
    leaf = verify_lease([PUBLIC], [], token, nonce=NONCE)
    assert leaf.delegate == delegate and leaf.payload["del"] == delegate
    assert leaf.overdraft and leaf.payload["ovr"] is True


def test_a_token_is_never_dated_before_its_chain() -> None:
    signer = Signer(KEY, "site-1")
    signer.chain_iat[DICOM.id] = NOW + 30.0  # the block was issued by a clock ahead of ours
    ahead = verify_lease([PUBLIC], [], signer.lease_token(grant(), NONCE, NOW), nonce=NONCE)
    assert ahead.iat == NOW + 30.0
    signer.chain_iat[DICOM.id] = NOW - 30.0  # an older block: the token is dated now
    behind = verify_lease([PUBLIC], [], signer.lease_token(grant(), NONCE, NOW), nonce=NONCE)
    assert behind.iat == NOW
    other = verify_lease(
        [PUBLIC], [], signer.lease_token(grant(licence_id="other"), NONCE, NOW), nonce=NONCE
    )
    assert other.iat == NOW  # another licence's chain dates nothing here


def test_each_licence_is_served_its_own_chain() -> None:
    signer = Signer(KEY, "site-1")
    signer.chain = [b"own"]
    signer.chains[DICOM.id] = [b"upstream", b"block"]
    assert signer.chain_for(DICOM.id) == [b"upstream", b"block"]
    assert signer.chain_for("other") == [b"own"]


class Turns:
    """The event loop's turns, by hand: what `schedule` was given runs at `end()`."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []

    def schedule(self, fn: Callable[[], None]) -> None:
        self.scheduled.append(fn)

    def end(self) -> None:
        ran, self.scheduled = self.scheduled, []
        for fn in ran:
            fn()


def batch_verifies(body: bytes, proof: BatchProof) -> bool:
    root = merkle.root_from_path(body, proof.index, proof.size, proof.path)
    try:
        VerifyKey(PUBLIC).verify(merkle.batch_message(proof.size, root), proof.sig)
    except BadSignatureError:
        return False
    return True


def test_the_batch_signer_signs_a_quiet_loops_tokens_at_once_and_a_busy_ones_together() -> None:
    signer, turns = Signer(KEY, "hq"), Turns()
    batcher = BatchSigner(signer, turns.schedule)
    bodies = [signer.lease_body(grant(handle=f"h{i:011d}"), NONCE, NOW) for i in range(4)]
    # A quiet turn: one token, signed at once, whole.
    only = batcher.sign(bodies[0])
    assert only == (signer.sign_body(bodies[0]), None)
    turns.end()
    # A busy turn: still at once, but the next turns batch.
    assert not isinstance(batcher.sign(bodies[0]), Deferred)
    assert not isinstance(batcher.sign(bodies[1]), Deferred)
    turns.end()
    waiting = [batcher.sign(body) for body in bodies[:3]]
    assert all(isinstance(w, Deferred) and not w.done() for w in waiting)
    turns.end()
    proofs = []
    for body, w in zip(bodies, waiting, strict=False):
        assert isinstance(w, Deferred)
        token, proof = w.result()
        assert token == body and proof is not None and proof.size == 3
        assert batch_verifies(body, proof)
        proofs.append(proof)
    assert [p.index for p in proofs] == [0, 1, 2] and len({p.sig for p in proofs}) == 1
    # A leaf moved to another index, or another body, does not verify.
    assert not batch_verifies(bodies[0], replace(proofs[0], index=1))
    assert not batch_verifies(bodies[0], replace(proofs[0], size=4))
    assert not batch_verifies(bodies[3], proofs[0])
    # A turn of one while batching: signed whole, and the next turn signs at once again.
    alone = batcher.sign(bodies[3])
    assert isinstance(alone, Deferred)
    turns.end()
    assert alone.result() == (signer.sign_body(bodies[3]), None)
    assert not isinstance(batcher.sign(bodies[3]), Deferred)


def test_a_full_tree_is_signed_at_once_and_the_rest_go_in_the_next() -> None:
    signer, turns = Signer(KEY, "hq"), Turns()
    batcher = BatchSigner(signer, turns.schedule, max_batch=2)
    for _ in range(2):
        batcher.sign(b"x")
    turns.end()  # busy: batching from now on
    first = [batcher.sign(bytes([i])) for i in range(3)]
    done = [w.done() for w in first if isinstance(w, Deferred)]
    assert done == [True, True, False]  # two filled a tree, signed before the turn ended
    turns.end()
    last = first[2]
    assert isinstance(last, Deferred) and last.result()[1] is None  # alone in its tree
