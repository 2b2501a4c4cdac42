"""Unit tests of licd_client.tokens: signed statements and trust chains (protocol section 4).

Payloads are built here by hand, with PyNaCl keys, exactly as the protocol describes them,
so the verifier is checked against the contract rather than against the daemon's signer.
Batched tokens (protocol 2) too: their trees are merkle's (tests/unit/test_merkle.py),
their signatures made here over the batch message.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

from licd_client import merkle
from licd_client.errors import TokenInvalid, UntrustedKey
from licd_client.messages import BatchProof, Holder
from licd_client.statements import Batched
from licd_client.tokens import (
    SIGNATURE_LEN,
    Statement,
    fingerprint,
    key_from_text,
    key_to_text,
    open_statement,
    sign,
    sign_batch,
    verify_chain,
    verify_lease,
)
from licd_client.tokens import lease_payload as write_lease_payload

T0 = 1_700_000_000.0
NONCE = bytes(range(16))
HANDLE = "h-7f3a"


def key(n: int) -> SigningKey:
    """A deterministic signing key, so failures reproduce."""
    return SigningKey(bytes([n]) * 32)


def pub(k: SigningKey) -> bytes:
    return bytes(k.verify_key)


VENDOR = key(1)  # the trust anchor
SITE = key(2)  # delegated to by the vendor (a site router)
DAEMON = key(3)  # delegated to by the site; signs lease tokens
STRANGER = key(9)  # trusted by no one


def lease_payload(signer: SigningKey, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "typ": "lease",
        "iss": pub(signer),
        "iat": T0,
        "exp": T0 + 90.0,
        "lid": HANDLE,
        "lic": "dicom-hq",
        "product": "dicom",
        "seats": 2,
        "features": {"tier": "pro", "max_studies": 10, "beta": False},
        "holder": {"host": "machine-a", "hostid": "id-a", "user": "alice"},
        "nonce": NONCE,
        "site": "hq",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def block_payload(signer: SigningKey, delegate: SigningKey, **changes: Any) -> dict[str, Any]:
    """A block: a lease taken with `delegate`, the one link type of section 4. Its content
    (product, seats, features) bounds every statement below it."""
    payload = lease_payload(
        signer,
        iat=T0 - 86_400.0,
        exp=T0 + 30 * 86_400.0,
        seats=10,
        features={"tier": "pro", "max_studies": 10, "beta": False, "ratio": 0.5},
        **{"del": pub(delegate)},
    )
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def token(signer: SigningKey = VENDOR, **changes: Any) -> bytes:
    return sign(signer, lease_payload(signer, **changes))


def block(signer: SigningKey, delegate: SigningKey, **changes: Any) -> bytes:
    return sign(signer, block_payload(signer, delegate, **changes))


def two_link_chain(**site_block_changes: Any) -> list[bytes]:
    """VENDOR -> SITE -> DAEMON: chain[0] signed by the vendor, chain[1] by the site."""
    return [
        block(VENDOR, SITE, exp=T0 + 30 * 86_400.0),
        block(SITE, DAEMON, **{"exp": T0 + 7 * 86_400.0, "seats": 5, **site_block_changes}),
    ]


def flip(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x01
    return bytes(out)


# ------------------------------------------------------------------- accepted


def test_sign_is_signature_then_msgpack_payload() -> None:
    payload = lease_payload(VENDOR)
    blob = sign(VENDOR, payload)
    assert blob[SIGNATURE_LEN:] == msgpack.packb(payload, use_bin_type=True)
    assert VENDOR.verify_key.verify(blob) == blob[SIGNATURE_LEN:]


def test_empty_chain_anchor_signed_the_token() -> None:
    leaf = verify_chain([pub(VENDOR)], [], token(VENDOR), at=T0 + 10)
    assert leaf.typ == "lease"
    assert leaf.iss == pub(VENDOR)
    assert (leaf.iat, leaf.exp) == (T0, T0 + 90.0)
    assert leaf.delegate is None
    assert leaf.lid == HANDLE
    assert leaf.nonce == NONCE
    assert leaf.seats == 2
    assert leaf.features == {"tier": "pro", "max_studies": 10, "beta": False}
    assert leaf.payload["lic"] == "dicom-hq"
    assert leaf.payload["holder"] == {"host": "machine-a", "hostid": "id-a", "user": "alice"}


def test_verify_lease_with_its_nonce_and_handle() -> None:
    leaf = verify_lease([pub(VENDOR)], [], token(VENDOR), nonce=NONCE, handle=HANDLE, at=T0)
    assert leaf.lid == HANDLE


def test_chain_of_two_blocks_from_a_root_anchor() -> None:
    chain = two_link_chain()
    leaf = verify_lease([pub(VENDOR)], chain, token(DAEMON), nonce=NONCE, handle=HANDLE, at=T0)
    assert leaf.iss == pub(DAEMON)
    # Without `at`, only the chain's own consistency is checked.
    assert verify_chain([pub(VENDOR)], chain, token(DAEMON)).iss == pub(DAEMON)


def test_intermediate_key_can_be_an_anchor_too() -> None:
    chain = two_link_chain()
    assert verify_chain([pub(SITE)], chain[1:], token(DAEMON), at=T0).iss == pub(DAEMON)


def test_a_routers_block_chain_is_accepted() -> None:
    """Section 5: a router's chain is the upstream chain + [its block]; its sub-leases copy
    the block's product and features and hold some or all of its seats."""
    chain = [*two_link_chain(), block(DAEMON, STRANGER, exp=T0 + 86_400.0, seats=5)]
    block_features = block_payload(DAEMON, STRANGER)["features"]
    for seats in (1, 5):
        sub_lease = token(STRANGER, seats=seats, features=block_features)
        leaf = verify_chain([pub(VENDOR)], chain, sub_lease, at=T0 + 5)
        assert leaf.iss == pub(STRANGER) and leaf.seats == seats
    # Fewer features than the block (a subset), and none at all, are within it too.
    assert verify_chain([pub(VENDOR)], chain, token(STRANGER)).features["tier"] == "pro"
    assert verify_chain([pub(VENDOR)], chain, token(STRANGER, features=None)).features == {}


def test_several_anchors_where_only_one_is_right() -> None:
    anchors = [pub(key(40)), pub(STRANGER), pub(VENDOR), pub(key(41))]
    assert verify_chain(anchors, [], token(VENDOR), at=T0).iss == pub(VENDOR)
    assert verify_chain(anchors, two_link_chain(), token(DAEMON), at=T0).iss == pub(DAEMON)


def test_anchors_may_be_any_iterable() -> None:
    anchors = (pub(k) for k in (STRANGER, VENDOR))
    assert verify_chain(anchors, [], token(VENDOR)).iss == pub(VENDOR)


def test_validity_bounds_are_inclusive() -> None:
    for at in (T0, T0 + 90.0):
        assert verify_chain([pub(VENDOR)], [], token(VENDOR), at=at).exp == T0 + 90.0


# ---------------------------------------------------------------- anchors


def test_no_anchors_is_invalid() -> None:
    with pytest.raises(TokenInvalid, match="anchor"):
        verify_chain([], [], token(VENDOR))
    with pytest.raises(TokenInvalid):
        verify_lease(iter(()), [], token(VENDOR), nonce=NONCE)


def test_token_signed_by_another_key_is_invalid() -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], token(STRANGER))


def test_token_signed_by_another_key_claiming_the_anchor_is_invalid() -> None:
    forged = sign(STRANGER, lease_payload(VENDOR))  # iss says VENDOR
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], forged)


def test_wrong_anchors_only_is_invalid() -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(STRANGER), pub(key(40))], two_link_chain(), token(DAEMON))


def test_the_chain_is_needed_when_the_anchor_did_not_sign_the_token() -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], token(DAEMON))


# -------------------------------------------------------------- tampering


TOKEN = token(VENDOR)


@pytest.mark.parametrize(
    "index",
    [0, 1, 31, 32, 63, 64, 65, len(TOKEN) // 2, len(TOKEN) - 2, len(TOKEN) - 1],
    ids=lambda i: f"byte{i}",
)
def test_a_flipped_byte_anywhere_in_the_token_is_invalid(index: int) -> None:
    with pytest.raises(TokenInvalid):
        verify_lease([pub(VENDOR)], [], flip(TOKEN, index), nonce=NONCE)


@pytest.mark.parametrize("link", [0, 1])
@pytest.mark.parametrize("index", [0, 63, 64, -1])
def test_a_flipped_byte_in_a_chain_link_is_invalid(link: int, index: int) -> None:
    chain = two_link_chain()
    chain[link] = flip(chain[link], index)
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00" * SIGNATURE_LEN, TOKEN[:SIGNATURE_LEN], TOKEN[:-1], TOKEN + b"\x00"],
    ids=["empty", "zeros", "signature-only", "truncated", "extended"],
)
def test_truncated_or_extended_token_is_invalid(blob: bytes) -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], blob)


@pytest.mark.parametrize(
    "body",
    [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"typ": "lease"}) + b"\x00"],
    ids=["garbage", "array", "trailing"],
)
def test_a_properly_signed_non_map_payload_is_invalid(body: bytes) -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], bytes(VENDOR.sign(body)))


def test_a_link_signed_by_the_wrong_key_is_invalid() -> None:
    chain = two_link_chain()
    # chain[1] should be signed by SITE (chain[0]'s del); sign it with VENDOR instead.
    chain[1] = sign(VENDOR, block_payload(SITE, DAEMON, exp=T0 + 86_400.0))
    with pytest.raises(TokenInvalid, match=r"chain\[1\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))
    # ...and honestly labelled as VENDOR's, it is still not SITE's signature.
    chain[1] = block(VENDOR, DAEMON, exp=T0 + 86_400.0)
    with pytest.raises(TokenInvalid, match=r"chain\[1\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


def test_links_in_the_wrong_order_are_invalid() -> None:
    chain = two_link_chain()
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], chain[::-1], token(DAEMON))


def test_token_signed_by_a_key_other_than_the_last_del_is_invalid() -> None:
    with pytest.raises(TokenInvalid, match="token"):
        verify_chain([pub(VENDOR)], two_link_chain(), token(SITE))


# ------------------------------------------------------------- statement rules


def test_iss_not_matching_the_signer_is_invalid() -> None:
    lying = sign(VENDOR, lease_payload(VENDOR, iss=pub(STRANGER)))
    with pytest.raises(TokenInvalid, match="iss"):
        verify_chain([pub(VENDOR)], [], lying)
    missing = sign(VENDOR, lease_payload(VENDOR, iss=None))
    with pytest.raises(TokenInvalid, match="iss"):
        verify_chain([pub(VENDOR)], [], missing)


def test_link_iss_not_matching_its_signer_is_invalid() -> None:
    chain = two_link_chain()
    chain[0] = sign(VENDOR, block_payload(VENDOR, SITE, iss=pub(STRANGER)))
    with pytest.raises(TokenInvalid, match=r"chain\[0\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


@pytest.mark.parametrize("typ", ["cert", "Lease", "", None, 1])
def test_leaf_typ_not_lease_is_invalid(typ: Any) -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], token(VENDOR, typ=typ))


@pytest.mark.parametrize(
    "changes",
    [
        {"iat": None},
        {"exp": None},
        {"iat": "yesterday"},
        {"exp": True},
        {"iat": T0 + 100.0, "exp": T0},
    ],
    ids=["no-iat", "no-exp", "iat-str", "exp-bool", "exp-before-iat"],
)
def test_token_without_a_valid_period_is_invalid(changes: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], [], token(VENDOR, **changes))


def test_a_link_without_del_is_invalid() -> None:
    chain = two_link_chain()
    chain[0] = sign(VENDOR, block_payload(VENDOR, SITE, **{"del": None}))
    with pytest.raises(TokenInvalid, match="delegates to no key"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


@pytest.mark.parametrize("delegate", [b"\x01" * 31, b"\x01" * 33, "aa" * 32])
def test_a_link_with_a_malformed_del_is_invalid(delegate: Any) -> None:
    chain = [sign(VENDOR, block_payload(VENDOR, DAEMON, **{"del": delegate}))]
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


def test_a_link_that_expires_after_its_parent_is_invalid() -> None:
    chain = two_link_chain(exp=T0 + 31 * 86_400.0)  # parent expires at T0 + 30 days
    with pytest.raises(TokenInvalid, match="expires after its parent"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


def test_a_link_that_expires_with_its_parent_is_accepted() -> None:
    chain = two_link_chain(exp=T0 + 30 * 86_400.0)
    assert verify_chain([pub(VENDOR)], chain, token(DAEMON)).iss == pub(DAEMON)


def test_a_token_that_expires_after_its_link_is_invalid() -> None:
    chain = two_link_chain(exp=T0 + 60.0)
    with pytest.raises(TokenInvalid, match="expires after"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON, exp=T0 + 90.0))


def test_token_issued_before_a_link_was_valid_is_invalid() -> None:
    chain = two_link_chain(iat=T0 + 10.0)
    with pytest.raises(TokenInvalid, match=r"chain\[1\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON, iat=T0, exp=T0 + 90.0))


def test_token_issued_after_a_link_expired_is_invalid() -> None:
    chain = two_link_chain(iat=T0 - 200.0, exp=T0 - 100.0)
    with pytest.raises(TokenInvalid):
        verify_chain([pub(VENDOR)], chain, token(DAEMON, iat=T0, exp=T0 + 90.0))


def test_token_issued_before_the_root_link_was_valid_is_invalid() -> None:
    chain = two_link_chain()
    chain[0] = block(VENDOR, SITE, iat=T0 + 5.0, exp=T0 + 30 * 86_400.0)
    with pytest.raises(TokenInvalid, match=r"chain\[0\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


@pytest.mark.parametrize("at", [T0 - 0.001, T0 - 3600.0, T0 + 90.001, T0 + 86_400.0])
def test_at_outside_the_token_validity_is_invalid(at: float) -> None:
    with pytest.raises(TokenInvalid, match="not valid now"):
        verify_chain([pub(VENDOR)], [], token(VENDOR), at=at)
    with pytest.raises(TokenInvalid, match="not valid now"):
        verify_lease([pub(VENDOR)], two_link_chain(), token(DAEMON), nonce=NONCE, at=at)


def test_at_outside_a_link_validity_is_invalid() -> None:
    # The site's block and the token lapse together; the lapsed link is reported.
    chain = two_link_chain(exp=T0 + 3600.0)
    tok = token(DAEMON, exp=T0 + 3600.0)
    assert verify_chain([pub(VENDOR)], chain, tok, at=T0 + 3600.0).iss == pub(DAEMON)
    with pytest.raises(TokenInvalid, match=r"chain\[1\] is not valid now"):
        verify_chain([pub(VENDOR)], chain, tok, at=T0 + 3600.5)


# ------------------------------------------------------------ content binding


def untrusted_key_message(whose: str, signer: SigningKey, *anchors: SigningKey) -> str:
    trusted = ", ".join(sorted(pub(a).hex()[:16] for a in anchors))
    are = "fingerprints are" if len(anchors) > 1 else "fingerprint is"
    return (
        f"the server's key is not the trusted one: {whose} signature is by key "
        f"fingerprint {pub(signer).hex()[:16]}, the trusted key {are} {trusted}"
    )


def test_fingerprint_is_the_first_16_hex_digits_of_the_key() -> None:
    assert fingerprint(pub(VENDOR)) == key_to_text(pub(VENDOR))[:16]
    assert fingerprint(bytes(range(32))) == "0001020304050607"


@pytest.mark.parametrize(
    ("link", "token_changes", "error"),
    [
        (0, {}, r"chain\[1\] is for product 'imaging', its parent for 'dicom'"),
        (1, {}, r"token is for product 'dicom', its parent for 'imaging'"),
        (1, {"product": "imaging"}, None),
    ],
    ids=["link-vs-link", "token-vs-link", "consistent"],
)
def test_a_statement_for_another_product_is_invalid(
    link: int, token_changes: dict[str, Any], error: str | None
) -> None:
    """chain[1] names product 'imaging': with chain[0] for 'dicom' the link is refused;
    with chain[0] naming none, the token must be for 'imaging'."""
    chain = two_link_chain(product="imaging")
    if link == 1:
        chain[0] = block(VENDOR, SITE, product=None)
    tok = token(DAEMON, **token_changes)
    if error is None:
        assert verify_chain([pub(VENDOR)], chain, tok).payload["product"] == "imaging"
    else:
        with pytest.raises(TokenInvalid, match=error):
            verify_chain([pub(VENDOR)], chain, tok)


def test_a_token_without_the_product_its_link_names_is_invalid() -> None:
    with pytest.raises(TokenInvalid, match="token is for product None, its parent for 'dicom'"):
        verify_chain([pub(VENDOR)], two_link_chain(), token(DAEMON, product=None))


def test_a_link_naming_no_product_leaves_the_product_free() -> None:
    chain = [block(VENDOR, SITE, product=None), block(SITE, DAEMON, product=None, seats=5)]
    leaf = verify_chain([pub(VENDOR)], chain, token(DAEMON, product="anything"))
    assert leaf.payload["product"] == "anything"


@pytest.mark.parametrize(
    ("site_seats", "token_seats", "error"),
    [
        (11, 2, r"chain\[1\] holds 11 seat\(s\), more than its parent's 10"),
        (5, 6, "token holds 6 seat\\(s\\), more than its parent's 5"),
        (10, 10, None),
        (5, 5, None),
        (0, 0, None),
        (0, 1, "token holds 1 seat\\(s\\), more than its parent's 0"),
    ],
)
def test_a_statement_with_more_seats_than_its_parent_is_invalid(
    site_seats: int, token_seats: int, error: str | None
) -> None:
    chain = two_link_chain(seats=site_seats)  # chain[0] holds 10
    tok = token(DAEMON, seats=token_seats)
    if error is None:
        assert verify_chain([pub(VENDOR)], chain, tok).seats == token_seats
    else:
        with pytest.raises(TokenInvalid, match=error):
            verify_chain([pub(VENDOR)], chain, tok)


@pytest.mark.parametrize("seats", [None, -1, True, 2.0, "2"], ids=repr)
def test_seats_that_are_no_uint_bound_nothing_and_are_invalid(seats: Any) -> None:
    with pytest.raises(TokenInvalid, match=r"chain\[1\]'s parent names no seats"):
        verify_chain(
            [pub(VENDOR)], [block(VENDOR, SITE, seats=seats), two_link_chain()[1]], token(DAEMON)
        )
    with pytest.raises(TokenInvalid, match=r"chain\[1\] names no seats"):
        verify_chain([pub(VENDOR)], two_link_chain(seats=seats), token(DAEMON))
    with pytest.raises(TokenInvalid, match="token names no seats"):
        verify_chain([pub(VENDOR)], two_link_chain(), token(DAEMON, seats=seats))
    # With no chain there is no parent to bound the token: the anchor signed it.
    assert verify_chain([pub(VENDOR)], [], token(VENDOR, seats=seats)).iss == pub(VENDOR)


@pytest.mark.parametrize(
    ("features", "error"),
    [
        ({"tier": "pro", "gpu": True}, "token has feature 'gpu', which its parent has not"),
        ({"tier": "enterprise"}, "token has feature 'tier' = 'enterprise', its parent 'pro'"),
        ({"max_studies": 11}, "token has feature 'max_studies' = 11, its parent 10"),
        ({"beta": True}, "token has feature 'beta' = True, its parent False"),
        ({"beta": 0}, "token has feature 'beta' = 0, its parent False"),
        ({"max_studies": 10.0}, "token has feature 'max_studies' = 10.0, its parent 10"),
        ({"max_studies": True}, "token has feature 'max_studies' = True, its parent 10"),
        ({"ratio": 0.25}, "token has feature 'ratio' = 0.25, its parent 0.5"),
        ({"tier": "pro", "max_studies": 10, "beta": False, "ratio": 0.5}, None),
        ({"ratio": 0.5}, None),
    ],
    ids=[
        "extra",
        "other-str",
        "other-int",
        "other-bool",
        "int-for-bool",
        "float-for-int",
        "bool-for-int",
        "other-float",
        "all",
        "one",
    ],
)
def test_token_features_must_be_a_subset_of_its_links(
    features: dict[str, Any], error: str | None
) -> None:
    tok = token(DAEMON, features=features)
    if error is None:
        assert verify_chain([pub(VENDOR)], two_link_chain(), tok).features == features
    else:
        with pytest.raises(TokenInvalid, match=re.escape(error)):
            verify_chain([pub(VENDOR)], two_link_chain(), tok)


def test_link_features_must_be_a_subset_of_their_parents() -> None:
    chain = two_link_chain(features={"tier": "pro", "seats_per_gpu": 4})
    with pytest.raises(TokenInvalid, match=r"chain\[1\] has feature 'seats_per_gpu'"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON, features={}))
    chain = two_link_chain(features={"tier": "enterprise"})
    with pytest.raises(TokenInvalid, match=r"chain\[1\] has feature 'tier' = 'enterprise'"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON, features={}))


@pytest.mark.parametrize("features", [["tier"], "pro", 1])
def test_features_that_are_no_map_are_invalid(features: Any) -> None:
    with pytest.raises(TokenInvalid, match="token's 'features' is not a map"):
        verify_chain([pub(VENDOR)], two_link_chain(), token(DAEMON, features=features))
    chain = [block(VENDOR, SITE, features=features), two_link_chain()[1]]
    with pytest.raises(TokenInvalid, match=r"chain\[1\]'s parent's 'features' is not a map"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))


def test_a_long_value_is_cut_short_in_the_message() -> None:
    chain = two_link_chain(product="p" * 500)
    with pytest.raises(TokenInvalid) as info:
        verify_chain([pub(VENDOR)], chain, token(DAEMON))
    assert "'ppppp" in str(info.value) and len(str(info.value)) < 120


@pytest.mark.parametrize("typ", ["cert", "Entitlement", "Lease", "", None, 7])
def test_a_link_of_an_unknown_type_is_invalid(typ: Any) -> None:
    """("entitlement" is a link type, as chain[0] only: test_chain_entitlements.py.)"""
    chain = two_link_chain(typ=typ)
    with pytest.raises(TokenInvalid, match=r"chain\[1\]"):
        verify_chain([pub(VENDOR)], chain, token(DAEMON))
    if isinstance(typ, str):
        with pytest.raises(TokenInvalid, match=f"is a '{typ}' statement, not a known link type"):
            verify_chain([pub(VENDOR)], chain, token(DAEMON))


# ------------------------------------------------------------ an untrusted server key


def test_a_token_signed_by_an_untrusted_key_names_both_fingerprints() -> None:
    with pytest.raises(UntrustedKey) as info:
        verify_chain([pub(VENDOR)], [], token(STRANGER))
    assert str(info.value) == untrusted_key_message("the token's", STRANGER, VENDOR)
    assert info.value.signer == pub(STRANGER)
    assert isinstance(info.value, TokenInvalid)  # callers catching TokenInvalid see it


def test_a_chain_from_an_untrusted_key_names_both_fingerprints() -> None:
    anchors = [pub(STRANGER), pub(key(40))]
    with pytest.raises(UntrustedKey) as info:
        verify_lease(anchors, two_link_chain(), token(DAEMON), nonce=NONCE)
    expected = untrusted_key_message("chain[0]'s", VENDOR, STRANGER, key(40))
    assert str(info.value) == expected
    assert info.value.signer == pub(VENDOR)


def test_a_statement_only_claiming_an_untrusted_key_is_a_bad_signature() -> None:
    """Only a key that really signed is named: a forged or damaged statement is not
    blamed on the key it claims."""
    forged = sign(VENDOR, lease_payload(STRANGER))  # iss says STRANGER
    with pytest.raises(TokenInvalid, match="^token: statement's 'iss' is not the key") as info:
        verify_chain([pub(VENDOR)], [], forged)
    assert not isinstance(info.value, UntrustedKey)
    with pytest.raises(TokenInvalid, match="^token: bad signature$") as info:
        verify_chain([pub(VENDOR)], [], flip(token(STRANGER), 3))
    assert not isinstance(info.value, UntrustedKey)


# ------------------------------------------------------------ the client's checks


@pytest.mark.parametrize("nonce", [bytes(16), NONCE[::-1], NONCE[:15], b""])
def test_a_wrong_nonce_is_invalid(nonce: bytes) -> None:
    with pytest.raises(TokenInvalid, match="nonce"):
        verify_lease([pub(VENDOR)], [], token(VENDOR), nonce=nonce)


def test_a_token_without_a_nonce_is_invalid() -> None:
    with pytest.raises(TokenInvalid, match="nonce"):
        verify_lease([pub(VENDOR)], [], token(VENDOR, nonce=None), nonce=NONCE)


@pytest.mark.parametrize("handle", ["h-other", "", HANDLE.upper()])
def test_a_wrong_handle_is_invalid(handle: str) -> None:
    with pytest.raises(TokenInvalid, match="another lease"):
        verify_lease([pub(VENDOR)], [], token(VENDOR), nonce=NONCE, handle=handle)


def test_handle_is_not_checked_when_not_given() -> None:
    leaf = verify_lease([pub(VENDOR)], [], token(VENDOR, lid="whatever"), nonce=NONCE)
    assert leaf.lid == "whatever"


# ------------------------------------------------------------------ open_statement


def test_open_statement_returns_the_delegate() -> None:
    st = open_statement(block(VENDOR, SITE), pub(VENDOR))
    assert st.typ == "lease"
    assert st.delegate == pub(SITE)


@pytest.mark.parametrize("signer", [b"", b"\x00" * 31, "00" * 32], ids=["empty", "31", "str"])
def test_open_statement_with_a_malformed_signer_is_invalid(signer: Any) -> None:
    with pytest.raises(TokenInvalid):
        open_statement(TOKEN, signer)


# ------------------------------------------------------------------- key as text


def test_key_text_round_trip() -> None:
    for k in (VENDOR, SITE, DAEMON, SigningKey.generate()):
        text = key_to_text(pub(k))
        assert re.fullmatch(r"[0-9a-f]{64}", text), text
        assert key_from_text(text) == pub(k)


def test_key_from_text_tolerates_surrounding_whitespace() -> None:
    text = key_to_text(pub(VENDOR))
    assert key_from_text(f"  {text}\n") == pub(VENDOR)


@pytest.mark.parametrize(
    "text",
    ["", "ab", "a" * 63, "a" * 65, "a" * 128],
    ids=["empty", "2", "63", "65", "128"],
)
def test_key_from_text_wrong_length(text: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        key_from_text(text)


@pytest.mark.parametrize(
    "text",
    ["g" * 64, "0x" + "a" * 62, "z" + "a" * 63, "é" * 64, "-" + "1" * 63],
    ids=["g", "0x", "z", "non-ascii", "minus"],
)
def test_key_from_text_non_hex(text: str) -> None:
    with pytest.raises(ValueError, match="hex"):
        key_from_text(text)


@pytest.mark.parametrize(
    "text",
    ["00" * 15 + "  " + "00" * 16, "ab " * 16 + "cd" * 8],
    ids=["two-inner-spaces", "spaced-pairs"],
)
def test_key_from_text_rejects_inner_whitespace(text: str) -> None:
    assert len(text) == 64
    with pytest.raises(ValueError):
        key_from_text(text)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_times_are_refused(bad: float) -> None:
    signer = SigningKey.generate()
    iss = bytes(signer.verify_key)
    token = sign(signer, {"typ": "lease", "iss": iss, "iat": 1.0, "exp": bad, "nonce": b"n" * 16})
    with pytest.raises(TokenInvalid):
        verify_chain([iss], [], token)


def test_the_payload_writer_writes_the_format_of_section_4() -> None:
    """What the daemon signs is the payload the protocol describes (built by hand above):
    the holder without its pid or app, `del` and `ovr` only when asked for."""
    write = partial(
        write_lease_payload,
        issuer=pub(VENDOR),
        issued=T0,
        expires=T0 + 90.0,
        handle=HANDLE,
        licence="dicom-hq",
        product="dicom",
        seats=2,
        features={"tier": "pro", "max_studies": 10, "beta": False},
        holder=Holder(host="machine-a", hostid="id-a", user="alice", pid=7, app="cad"),
        nonce=NONCE,
        site="hq",
    )
    assert write() == lease_payload(VENDOR)
    block = write(delegate=pub(SITE), overdraft=True)
    assert block == lease_payload(VENDOR, ovr=True, **{"del": pub(SITE)})
    leaf = verify_lease([pub(VENDOR)], [], sign(VENDOR, block), nonce=NONCE)
    assert (leaf.licence, leaf.site) == ("dicom-hq", "hq")
    assert leaf.delegate == pub(SITE) and leaf.overdraft


# ------------------------------------------------------------ batched tokens


def packed(payload: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return body


def others(n: int) -> list[bytes]:
    """The payloads of `n` other tokens of the same batch."""
    return [packed(lease_payload(VENDOR, lid=f"h-{i}")) for i in range(n)]


def batched(
    signer: SigningKey = VENDOR, *, size: int = 3, index: int = 0, **changes: Any
) -> tuple[bytes, BatchProof]:
    """A lease token signed by `signer` in a batch of `size`, at `index`: its payload and
    its proof, the signature made by hand over the batch message."""
    body = packed(lease_payload(signer, **changes))
    bodies = others(size - 1)
    bodies.insert(index, body)
    root, paths = merkle.tree(bodies)
    sig = signer.sign(merkle.batch_message(size, root)).signature
    return body, BatchProof(sig, size, index, paths[index])


def without_proof(st: Statement) -> Statement:
    return Statement(st.typ, st.iss, st.iat, st.exp, st.delegate, st.payload)


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_a_batched_token_is_what_its_whole_statement_is(size: int) -> None:
    whole = verify_lease([pub(VENDOR)], [], token(VENDOR), nonce=NONCE, handle=HANDLE, at=T0)
    assert whole.proof is None
    for index in range(size):
        body, proof = batched(size=size, index=index)
        leaf = verify_lease([pub(VENDOR)], [], body, nonce=NONCE, handle=HANDLE, batch=proof, at=T0)
        assert without_proof(leaf) == whole
        assert leaf.proof == Batched(body, proof)


def test_a_batched_token_under_a_chain() -> None:
    """Signed by the key the chain delegates to, as a whole token would be."""
    body, proof = batched(DAEMON, size=5, index=4)
    leaf = verify_chain([pub(VENDOR)], two_link_chain(), body, batch=proof, at=T0)
    assert leaf.iss == pub(DAEMON) and leaf.proof == Batched(body, proof)
    assert without_proof(leaf) == verify_chain([pub(VENDOR)], two_link_chain(), token(DAEMON))
    # The anchor's signature over the same batch is not the delegate's.
    body, proof = batched(VENDOR, size=5, index=4, iss=pub(DAEMON))
    with pytest.raises(TokenInvalid, match="^token: bad signature$"):
        verify_chain([pub(VENDOR)], two_link_chain(), body, batch=proof)


def test_the_proof_checks_the_token_again_offline() -> None:
    body, proof = batched(size=5, index=3)
    leaf = verify_lease([pub(VENDOR)], [], body, nonce=NONCE, batch=proof)
    assert leaf.proof is not None
    assert open_statement(leaf.proof.payload, pub(VENDOR), leaf.proof.batch) == leaf
    again = verify_chain([pub(VENDOR)], [], leaf.proof.payload, batch=leaf.proof.batch, at=T0)
    assert again == leaf


def test_sign_batch_signs_as_the_protocol_says() -> None:
    bodies = others(5)
    root, paths = merkle.tree(bodies)
    sig = VENDOR.sign(merkle.batch_message(5, root)).signature
    assert sign_batch(VENDOR, bodies) == [BatchProof(sig, 5, i, p) for i, p in enumerate(paths)]
    for bad in ([], bodies[:1]):
        with pytest.raises(ValueError, match="at least two"):
            sign_batch(VENDOR, bad)


BODY, PROOF = batched(size=5, index=0)
BAD = "bad signature"
OUTSIDE = "batch: the leaf index is outside the tree"
UNFIT = "batch: the audit path does not fit the tree"
OTHER_ROOT = batched(size=5, index=0, lid="h-another")[1].sig


@pytest.mark.parametrize(
    ("body", "proof", "error"),
    [
        (BODY, replace(PROOF, path=[flip(PROOF.path[0], 7), *PROOF.path[1:]]), BAD),
        (BODY, replace(PROOF, index=1), BAD),  # the same path, another leaf
        (BODY, replace(PROOF, size=6), BAD),  # the root is the same: not the size
        (BODY, replace(PROOF, sig=OTHER_ROOT), BAD),
        (BODY, replace(PROOF, sig=flip(PROOF.sig, 0)), BAD),
        (BODY, replace(PROOF, sig=PROOF.sig[:-1]), BAD),
        (flip(BODY, len(BODY) - 1), PROOF, BAD),
        (BODY, replace(PROOF, index=5), OUTSIDE),
        (BODY, replace(PROOF, index=9), OUTSIDE),
        (BODY, replace(PROOF, path=[*PROOF.path, bytes(32)]), UNFIT),
        (BODY, replace(PROOF, path=PROOF.path[:-1]), UNFIT),
        (BODY, replace(PROOF, path=[]), UNFIT),
        (BODY, replace(PROOF, path=[PROOF.path[0][:31], *PROOF.path[1:]]), UNFIT),
        (BODY, replace(PROOF, size=4), UNFIT),
    ],
    ids=[
        "forged-path",
        "moved-leaf",
        "size-changed",
        "another-root",
        "flipped-signature",
        "short-signature",
        "flipped-payload",
        "index-is-size",
        "index-beyond",
        "path-too-long",
        "path-too-short",
        "no-path",
        "sibling-31-bytes",
        "size-smaller",
    ],
)
def test_a_broken_batch_is_refused(body: bytes, proof: BatchProof, error: str) -> None:
    assert verify_lease([pub(VENDOR)], [], BODY, nonce=NONCE, batch=PROOF).proof is not None
    with pytest.raises(TokenInvalid, match=f"^token: {error}$") as info:
        verify_lease([pub(VENDOR)], [], body, nonce=NONCE, batch=proof)
    assert not isinstance(info.value, UntrustedKey)


def test_a_whole_statement_sent_with_a_batch_is_refused_cleanly() -> None:
    """A daemon that batched whole statements: the leaf verifies, but the payload starts
    with a signature and is no map."""
    whole = token(VENDOR)
    bodies = [whole, *others(2)]
    proof = sign_batch(VENDOR, bodies)[0]
    with pytest.raises(TokenInvalid, match="^token: signed payload is not a msgpack map$"):
        verify_lease([pub(VENDOR)], [], whole, nonce=NONCE, batch=proof)
    # ...nor is it the payload's proof, nor the payload's proof its.
    with pytest.raises(TokenInvalid, match="^token: bad signature$"):
        verify_lease([pub(VENDOR)], [], whole, nonce=NONCE, batch=PROOF)


def test_batch_and_statement_signatures_cannot_stand_in_for_each_other() -> None:
    whole = sign(VENDOR, lease_payload(VENDOR))
    assert whole[SIGNATURE_LEN:] == BODY
    with pytest.raises(TokenInvalid, match="^token: bad signature$"):
        verify_lease([pub(VENDOR)], [], BODY, nonce=NONCE, batch=replace(PROOF, sig=whole[:64]))
    with pytest.raises(TokenInvalid, match="^token: bad signature$"):
        verify_lease([pub(VENDOR)], [], PROOF.sig + BODY, nonce=NONCE)


def test_a_batched_token_by_an_untrusted_key_names_it() -> None:
    body, proof = batched(STRANGER, size=2, index=1)
    with pytest.raises(UntrustedKey) as info:
        verify_lease([pub(VENDOR)], [], body, nonce=NONCE, batch=proof)
    assert info.value.signer == pub(STRANGER)
    assert str(info.value) == untrusted_key_message("the token's", STRANGER, VENDOR)
    # Only when the batch really leads to the key's signature: a broken one is not blamed.
    with pytest.raises(TokenInvalid, match="outside the tree") as refused:
        verify_lease([pub(VENDOR)], [], body, nonce=NONCE, batch=replace(proof, index=2))
    assert not isinstance(refused.value, UntrustedKey)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"nonce": bytes(16)}, "nonce"),
        ({"lid": "h-other"}, "another lease"),
        ({"iss": pub(STRANGER)}, "'iss' is not the key"),
        ({"typ": "voucher"}, "not a lease"),
        ({"exp": T0 - 1}, "'iat'..'exp'"),
    ],
    ids=["nonce", "handle", "iss", "typ", "period"],
)
def test_every_rule_applies_to_a_batched_token(changes: dict[str, Any], error: str) -> None:
    body, proof = batched(size=3, index=2, **changes)
    with pytest.raises(TokenInvalid, match=error):
        verify_lease([pub(VENDOR)], [], body, nonce=NONCE, handle=HANDLE, batch=proof)


def test_every_chain_rule_applies_to_a_batched_token() -> None:
    body, proof = batched(DAEMON, size=3, index=1, seats=6)  # the site block has 5
    with pytest.raises(TokenInvalid, match="more than its parent's 5"):
        verify_chain([pub(VENDOR)], two_link_chain(), body, batch=proof)
    body, proof = batched(DAEMON, size=3, index=1)
    with pytest.raises(TokenInvalid, match="token is not valid now"):
        verify_chain([pub(VENDOR)], two_link_chain(), body, batch=proof, at=T0 + 91)
