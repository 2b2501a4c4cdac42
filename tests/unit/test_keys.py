"""The Signer: a lease token it signs verifies with licd_client and carries the lease."""

from __future__ import annotations

from dataclasses import replace

import pytest
from nacl.signing import SigningKey

from licd.core.keys import Signer
from licd.engine import Grant, SeatLease
from licd_client.errors import TokenInvalid
from licd_client.messages import Features
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
