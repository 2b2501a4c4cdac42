"""Unit tests of licd_client.tokens with a vendor's entitlement as chain[0] (protocol
section 4, "Entitlements"): a client trusting only the vendor key accepts the daemon's
leases, and every content rule the entitlement sets the statement below it.

The entitlement is signed by licd_client.entitlements.issue; lease tokens and blocks are
payloads built here by hand, as the protocol describes them, and signed with fixed keys.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

from licd_client.entitlements import AddonTerm, Terms, issue, key_hash
from licd_client.errors import TokenInvalid, UntrustedKey
from licd_client.messages import Features
from licd_client.tokens import SIGNATURE_LEN, Statement, sign, verify_chain, verify_lease

T0 = 1_767_225_600.0
HOUR, DAY = 3600.0, 86_400.0
NONCE = bytes(range(16))
HANDLE = "k3v7p2m6q4xa"

VENDOR = SigningKey(bytes([21]) * 32)  # the clients' only trust anchor
DAEMON = SigningKey(bytes([22]) * 32)  # the site daemon the vendor entitled
ROUTER = SigningKey(bytes([23]) * 32)  # a router taking a block from the site daemon
STRANGER = SigningKey(bytes([29]) * 32)


def pub(k: SigningKey) -> bytes:
    return bytes(k.verify_key)


FEATURES: Features = {"tier": "pro", "max_studies": 500, "ocr": True}
# 5 seats, plus 3 and another tier with export from day 1 to day 2 (an add-on).
TERMS = Terms(
    licence_id="dicom-site",
    key_hash=key_hash("ACME-0000-0001"),
    product="dicom",
    seats=5,
    expires=T0 + 30 * DAY,
    sequence=3,
    features=FEATURES,
    addons=(
        AddonTerm(
            seats=3,
            features={"tier": "enterprise", "export": True},
            starts=T0 + DAY,
            ends=T0 + 2 * DAY,
        ),
    ),
    not_before=T0 - HOUR,
    max_ttl=7 * DAY,
)


def entitlement(issued: float = T0 - DAY, **changes: Any) -> bytes:
    """The vendor's entitlement of TERMS (with `changes`) for the site daemon's key."""
    return issue(VENDOR, pub(DAEMON), issued, replace(TERMS, **changes)).statement


def lease_payload(signer: SigningKey, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "typ": "lease",
        "iss": pub(signer),
        "iat": T0,
        "exp": T0 + 90.0,
        "lid": HANDLE,
        "lic": "dicom-site",
        "product": "dicom",
        "seats": 1,
        "features": {"tier": "pro"},
        "holder": {"host": "machine-a", "hostid": "id-a", "user": "alice"},
        "nonce": NONCE,
        "site": "branch",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def token(signer: SigningKey = DAEMON, **changes: Any) -> bytes:
    return sign(signer, lease_payload(signer, **changes))


def block(**changes: Any) -> bytes:
    """A block the site daemon grants the router: 3 seats of the entitled licence."""
    base = {"iat": T0 - HOUR, "exp": T0 + DAY, "seats": 3, "features": FEATURES}
    return token(DAEMON, **{**base, "del": pub(ROUTER), **changes})


def verify(chain: list[bytes], tok: bytes, at: float | None = None) -> Statement:
    return verify_chain([pub(VENDOR)], chain, tok, at=at)


def refused(chain: list[bytes], tok: bytes, message: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        verify(chain, tok)
    assert str(info.value) == message


def payload_of(blob: bytes) -> dict[str, Any]:
    value: dict[str, Any] = msgpack.unpackb(blob[SIGNATURE_LEN:], raw=False)
    return value


# -------------------------------------------------------------------- accepted


def test_a_client_trusting_only_the_vendor_accepts_the_entitled_daemons_lease() -> None:
    leaf = verify_lease(
        [pub(VENDOR)], [entitlement()], token(), nonce=NONCE, handle=HANDLE, at=T0 + 45
    )
    assert leaf.iss == pub(DAEMON)
    assert (leaf.licence, leaf.product, leaf.seats) == ("dicom-site", "dicom", 1)


def test_all_the_seats_and_features_granted_are_accepted() -> None:
    leaf = verify([entitlement()], token(seats=5, features=FEATURES))
    assert (leaf.seats, leaf.features) == (5, FEATURES)
    assert verify([entitlement()], token(features=None)).features == {}


def test_a_client_trusting_the_daemon_key_does_not_accept_an_entitled_lease() -> None:
    """The chain starts at the vendor's key, as a router's does (section 4)."""
    for anchor in (DAEMON, STRANGER):
        with pytest.raises(UntrustedKey) as info:
            verify_chain([pub(anchor)], [entitlement()], token())
        assert info.value.signer == pub(VENDOR)


# ----------------------------------------------------------- the content rules


@pytest.mark.parametrize(
    ("lic", "message"),
    [
        ("dicom-hq", "token is for licence 'dicom-hq', the entitlement for 'dicom-site'"),
        (None, "token is for licence None, the entitlement for 'dicom-site'"),
        (7, "token is for licence None, the entitlement for 'dicom-site'"),
    ],
)
def test_the_token_carries_the_entitlements_licence_id(lic: Any, message: str) -> None:
    refused([entitlement()], token(lic=lic), message)


@pytest.mark.parametrize(
    ("product", "message"),
    [
        ("cad", "token is for product 'cad', the entitlement for 'dicom'"),
        (None, "token is for product None, the entitlement for 'dicom'"),
    ],
)
def test_the_token_is_for_the_entitlements_product(product: Any, message: str) -> None:
    refused([entitlement()], token(product=product), message)


def test_the_token_holds_no_more_seats_than_the_entitlement() -> None:
    refused([entitlement()], token(seats=6), "token holds 6 seat(s), more than the entitlement's 5")
    refused([entitlement()], token(seats=None), "token names no seats")
    refused([entitlement()], token(seats=True), "token names no seats")


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"export": True}, "token has feature 'export', which the entitlement has not"),
        ({"tier": "enterprise"}, "token has feature 'tier' = 'enterprise', the entitlement 'pro'"),
        ({"max_studies": 500.0}, "token has feature 'max_studies' = 500.0, the entitlement 500"),
        ({"ocr": 1}, "token has feature 'ocr' = 1, the entitlement True"),
        (["tier"], "token's 'features' is not a map"),
    ],
    ids=["not-granted", "other-value", "float-for-int", "int-for-bool", "not-a-map"],
)
def test_the_tokens_features_are_a_subset_of_the_entitlements(features: Any, message: str) -> None:
    refused([entitlement()], token(features=features), message)


@pytest.mark.parametrize(
    ("issued", "seats", "features", "message"),
    [
        (T0 + DAY, 8, {"tier": "enterprise", "export": True}, None),  # starts: inclusive
        (T0 + 2 * DAY - 1, 8, {"export": True, "ocr": True}, None),
        (T0 + DAY - 1, 8, {}, "token holds 8 seat(s), more than the entitlement's 5"),
        (T0 + 2 * DAY, 6, {}, "token holds 6 seat(s), more than the entitlement's 5"),  # ends
        (
            T0 + 2 * DAY,
            1,
            {"export": True},
            "token has feature 'export', which the entitlement has not",
        ),
        (
            T0 + DAY,
            1,
            {"tier": "pro"},
            "token has feature 'tier' = 'pro', the entitlement 'enterprise'",
        ),
    ],
    ids=["at-start", "before-end", "before-start", "at-end", "feature-after-end", "overridden"],
)
def test_add_ons_count_while_active_at_the_tokens_issue_time(
    issued: float, seats: int, features: dict[str, Any], message: str | None
) -> None:
    tok = token(iat=issued, exp=issued + 90.0, seats=seats, features=features)
    if message is None:
        assert verify([entitlement()], tok).seats == seats
    else:
        refused([entitlement()], tok, message)


def test_an_add_on_is_judged_at_the_tokens_issue_time_not_later() -> None:
    ends = T0 + 2 * DAY
    tok = token(iat=ends - 10, exp=ends + 80, seats=8, features={})
    assert verify([entitlement()], tok, at=ends + 40).seats == 8


def test_the_token_is_issued_no_earlier_than_the_entitlements_nbf() -> None:
    nbf = T0 - HOUR
    assert verify([entitlement()], token(iat=nbf, exp=nbf + 90)).iat == nbf
    refused(
        [entitlement()],
        token(iat=nbf - 1, exp=nbf + 89),
        "token was issued before the entitlement is valid (its nbf)",
    )
    # Without nbf, the entitlement's own iat is the limit (the rule of every link).
    early = token(iat=T0 - DAY + 1, exp=T0 - DAY + 91)
    assert verify([entitlement(not_before=None)], early).iat == T0 - DAY + 1
    refused(
        [entitlement(not_before=None)],
        token(iat=T0 - DAY - 1, exp=T0 - DAY + 89),
        "chain[0] was not valid when the token was issued",
    )


def test_the_token_lasts_no_longer_than_the_entitlements_max_ttl() -> None:
    week = 7 * DAY
    assert verify([entitlement()], token(exp=T0 + week)).exp == T0 + week
    refused(
        [entitlement()],
        token(exp=T0 + week + 0.001),
        "token is valid for 604800.001 s, longer than the entitlement's max_ttl of 604800 s",
    )
    assert verify([entitlement(max_ttl=None)], token(exp=T0 + 20 * DAY)).exp == T0 + 20 * DAY


def test_max_ttl_is_judged_as_a_signer_computes_exp() -> None:
    """exp = iat + ttl in binary floating point; (iat + 90.7) - iat is above 90.7."""
    assert (T0 + 90.7) - T0 > 90.7
    assert verify([entitlement(max_ttl=90.7)], token(exp=T0 + 90.7)).exp == T0 + 90.7


def test_the_token_expires_no_later_than_the_entitlement() -> None:
    ends = TERMS.expires
    tok = token(iat=ends - 90, exp=ends)
    assert verify([entitlement()], tok).exp == ends
    refused(
        [entitlement()],
        token(iat=ends - 90, exp=ends + 1),
        "token expires after the statement that delegated to its signer",
    )


# ------------------------------------------------- a router's block below it


def test_a_block_below_the_entitlement_obeys_its_rules_and_bounds_the_sub_lease() -> None:
    chain = [entitlement(), block()]
    # The router's sub-lease names the router's own licence id: only the block carries
    # the entitlement's; the block (its parent) bounds the sub-lease.
    sub = token(ROUTER, lic="dicom-branch", seats=3, features={"ocr": True})
    assert verify(chain, sub, at=T0 + 10).iss == pub(ROUTER)
    refused(chain, token(ROUTER, seats=4), "token holds 4 seat(s), more than its parent's 3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seats": 6}, "chain[1] holds 6 seat(s), more than the entitlement's 5"),
        (
            {"lic": "dicom-hq"},
            "chain[1] is for licence 'dicom-hq', the entitlement for 'dicom-site'",
        ),
        ({"product": "cad"}, "chain[1] is for product 'cad', the entitlement for 'dicom'"),
        (
            {"features": {**FEATURES, "export": True}},
            "chain[1] has feature 'export', which the entitlement has not",
        ),
        (
            {"iat": T0 - 2 * HOUR},
            "chain[1] was issued before the entitlement is valid (its nbf)",
        ),
        (
            {"exp": T0 - HOUR + 8 * DAY},
            "chain[1] is valid for 691200 s, longer than the entitlement's max_ttl of 604800 s",
        ),
        ({"exp": T0 + 31 * DAY}, "chain[1] expires after its parent"),
    ],
    ids=["seats", "lic", "product", "feature", "nbf", "max_ttl", "exp"],
)
def test_a_block_below_the_entitlement_is_refused_when_it_breaks_a_rule(
    changes: dict[str, Any], message: str
) -> None:
    refused([entitlement(), block(**changes)], token(ROUTER, lic="dicom-branch"), message)


# ------------------------------------------------- where an entitlement may be


def test_an_entitlement_may_only_be_chain_0() -> None:
    # A router's block from the vendor, then an "entitlement" the router signed itself.
    vendor_block = token(VENDOR, iat=T0 - DAY, exp=T0 + DAY, seats=5, **{"del": pub(ROUTER)})
    fake = issue(ROUTER, pub(DAEMON), T0 - HOUR, replace(TERMS, not_before=None)).statement
    refused([vendor_block, fake], token(), "chain[1] is an entitlement, which may only be chain[0]")
    # Nor below another entitlement.
    again = issue(DAEMON, pub(ROUTER), T0 - HOUR, replace(TERMS, not_before=None)).statement
    refused(
        [entitlement(), again],
        token(ROUTER),
        "chain[1] is an entitlement, which may only be chain[0]",
    )


def test_an_entitlement_is_no_token() -> None:
    refused([], entitlement(), "token is not a lease statement")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keyhash": None}, "chain[0]: entitlement: 'keyhash' is required"),
        ({"seats": 0}, "chain[0]: entitlement: 'seats' must be at least 1"),
        ({"del": None}, "chain[0]: entitlement: 'del' (the daemon key it is for) is required"),
        ({"voucher": True}, "chain[0]: entitlement: unknown keys 'voucher'"),
    ],
    ids=["keyhash", "seats", "del", "unknown"],
)
def test_an_entitlement_is_read_whole(changes: dict[str, Any], message: str) -> None:
    body = {**payload_of(entitlement()), **changes}
    bad = sign(VENDOR, {k: v for k, v in body.items() if v is not None})
    refused([bad], token(), message)


@pytest.mark.parametrize("index", [10, -1], ids=["signature", "payload"])
def test_a_tampered_entitlement_is_refused(index: int) -> None:
    ent = bytearray(entitlement())
    ent[index] ^= 0x01
    with pytest.raises(TokenInvalid, match=re.escape("chain[0]: bad signature")):
        verify([bytes(ent)], token())
