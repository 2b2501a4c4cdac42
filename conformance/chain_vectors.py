"""chains.json: signed lease tokens with their chains, and the verdict on each (section 4).

The cases: direct, router block, nested routers and forward leases as licd issues them
(conformance/issuers.py), then what a broken or hostile issuer would send: a stale
block, a router granting more than its block, a flipped byte, a stranger's key. `build()`
verifies each with licd_client's `verify_lease` and refuses to write one whose verdict
(and, for a rejection, its reason) is not the one the case was written for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from licd_client.errors import TokenInvalid
from licd_client.tokens import SIGNATURE_LEN, Statement, verify_lease

from .issuers import (
    BLOCK_NONCE,
    DAY,
    FEATURES,
    HANDLE,
    HOUR,
    MACHINE,
    NONCE,
    REGION_LICENCE,
    REGION_NONCE,
    ROUTER_HOST,
    SITE_LICENCE,
    T0,
    VENDOR_LICENCE,
    Issuer,
    fixed_key,
    flipped,
    resigned,
)
from .notation import Disagreement, tagged

#: Why a chain is rejected: a class a client in any language can tell, not licd's words.
REASONS = {
    "signature": r"bad signature",
    "untrusted": r"not the trusted one",
    "malformed": r"too short|not a msgpack map|without|'iss'|'del'",
    "link": r"delegates to no key|not a known link type",
    "token_type": r"not a lease",
    "period": r"valid|expires after",
    "scope": r"product|seat|feature",
    "nonce": r"nonce",
    "handle": r"another lease",
}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    anchors: list[bytes]
    chain: list[bytes]
    token: bytes
    reason: str | None = None  # None: accepted
    nonce: bytes = NONCE
    handle: str = HANDLE  # the handle of the reply the token came in
    at: float | None = None


def _cases() -> list[Case]:
    vendor = Issuer(fixed_key("vendor"), "acme", VENDOR_LICENCE)
    region = Issuer(fixed_key("regional router"), "emea", REGION_LICENCE)
    router = Issuer(fixed_key("site router"), "branch", SITE_LICENCE)
    stranger = Issuer(fixed_key("stranger"), "nowhere", VENDOR_LICENCE)
    anchors = [vendor.public]

    direct = vendor.issue(HANDLE, now=T0, expires=T0 + 90)
    forward = vendor.issue(HANDLE, now=T0, expires=T0 + 90, seats=2, holder=replace(MACHINE, pid=7))
    block_iat, block_exp = T0 - HOUR, T0 - HOUR + 7 * DAY

    def block_by(issuer: Issuer, **changes: Any) -> bytes:
        """A block for the site router, 5 seats for a week, as `issuer` grants it."""
        terms: dict[str, Any] = {
            "now": block_iat,
            "expires": block_exp,
            "seats": 5,
            "holder": ROUTER_HOST,
            "nonce": BLOCK_NONCE,
            "delegate": router.public,
        }
        return issuer.issue("b7r2n5w4c3ez", **{**terms, **changes})

    def sub_lease(chain: list[bytes], **changes: Any) -> bytes:
        """The client's lease as the site router signs it, serving `chain`."""
        router.chain = chain
        return router.issue(HANDLE, **{"now": T0, "expires": T0 + 90, **changes})

    # Block mode: the vendor grants the site router a block; the router signs sub-leases
    # with chain = upstream chain (here empty) + [block token].
    block = block_by(vendor)
    sub = sub_lease([block])
    # Two routers: the vendor grants the regional router 10 seats for two weeks, the
    # regional router grants the site router 5 of them for a week.
    region_block = vendor.issue(
        "r2q7p3n6m4la",
        now=T0 - 2 * HOUR,
        expires=T0 - 2 * HOUR + 14 * DAY,
        seats=10,
        holder=replace(ROUTER_HOST, host="router-emea", hostid="id-router-emea"),
        nonce=REGION_NONCE,
        delegate=region.public,
    )
    region.chain = [region_block]
    site_block = block_by(region)
    nested = sub_lease([region_block, site_block])
    late_block = block_by(region, expires=T0 + 15 * DAY)  # after the regional block's end
    big_site_block = block_by(region, seats=12)  # more than the regional block's 10
    stale_block = block_by(vendor, now=T0 - 8 * DAY, expires=T0 - DAY)
    early_block = block_by(vendor, now=T0 + 60, expires=T0 + 60 + 7 * DAY)
    short_block = block_by(vendor, expires=T0 + 60)
    tight_block = block_by(vendor, now=T0, expires=T0 + 90)
    plain_lease = block_by(vendor, delegate=None)
    voucher = resigned(vendor, block, typ="voucher")
    seatless_block = resigned(vendor, block, seats=None)
    productless_block = resigned(vendor, block, product=None)
    not_a_lease = resigned(vendor, direct, typ="voucher")
    payload_start = SIGNATURE_LEN + 1

    c = Case
    return [
        # -------------------------------------------------------------- accepted
        c(
            "direct",
            "The vendor's daemon signed the lease; the chain is empty.",
            anchors,
            [],
            direct,
        ),
        c(
            "router_block",
            "A site router in block mode: chain = [block token], which the "
            "vendor signed with del = the router's key; the router signed the sub-lease.",
            anchors,
            [block],
            sub,
        ),
        c(
            "nested_routers",
            "Two routers: vendor -> regional block -> site block -> "
            "sub-lease (chain = upstream chain + [block token]).",
            anchors,
            [region_block, site_block],
            nested,
        ),
        c(
            "forward",
            "A router in forward mode passes the vendor's token and chain on "
            "unchanged: the client trusts the vendor, never the router.",
            anchors,
            [],
            forward,
        ),
        c(
            "several_anchors",
            "Several anchors, one of them the vendor's.",
            [stranger.public, router.public, vendor.public],
            [block],
            sub,
        ),
        c(
            "bounds_inclusive",
            "The token's iat and exp equal its link's: validity bounds are inclusive.",
            anchors,
            [tight_block],
            sub_lease([tight_block]),
        ),
        c(
            "overdraft",
            "A lease granted in overdraft carries ovr = true.",
            anchors,
            [],
            vendor.issue(HANDLE, now=T0, expires=T0 + 90, overdraft=True),
        ),
        c(
            "all_seats_fewer_features",
            "A sub-lease of all the block's seats and some of its features.",
            anchors,
            [block],
            sub_lease([block], seats=5, features={"tier": "pro"}),
        ),
        c(
            "block_without_product",
            "A block that names no product constrains none.",
            anchors,
            [productless_block],
            sub_lease([productless_block], product="cad"),
        ),
        c(
            "at_inside",
            "at (an instant to judge validity at) inside every statement's validity.",
            anchors,
            [block],
            sub,
            at=T0 + 45,
        ),
        # -------------------------------------------------------------- rejected
        c(
            "expired_link",
            "The block had expired before the sub-lease was issued (and so the token outlives it).",
            anchors,
            [stale_block],
            sub_lease([stale_block]),
            "period",
        ),
        c(
            "link_not_yet_valid",
            "The block was issued after the sub-lease (a signer that "
            "does not date its tokens from its chain).",
            anchors,
            [early_block],
            sub_lease([early_block], dated_from_chain=False),
            "period",
        ),
        c(
            "token_outlives_link",
            "The sub-lease expires after the block.",
            anchors,
            [short_block],
            sub_lease([short_block]),
            "period",
        ),
        c(
            "link_outlives_parent",
            "The site block expires after the regional block that delegated to its signer.",
            anchors,
            [region_block, late_block],
            sub_lease([region_block, late_block]),
            "period",
        ),
        c(
            "wrong_product",
            "The sub-lease's product is not the block's.",
            anchors,
            [block],
            sub_lease([block], product="cad"),
            "scope",
        ),
        c(
            "too_many_seats",
            "The sub-lease holds more seats than the block.",
            anchors,
            [block],
            sub_lease([block], seats=6),
            "scope",
        ),
        c(
            "extra_feature",
            "The sub-lease grants a feature the block does not.",
            anchors,
            [block],
            sub_lease([block], features={**FEATURES, "export": True}),
            "scope",
        ),
        c(
            "feature_value_changed",
            "The sub-lease changes the value of a block's feature.",
            anchors,
            [block],
            sub_lease([block], features={**FEATURES, "tier": "enterprise"}),
            "scope",
        ),
        c(
            "feature_type_changed",
            "The sub-lease has max_studies 500.0 where the block has "
            "500: an integer and a float are different values.",
            anchors,
            [block],
            sub_lease([block], features={**FEATURES, "max_studies": 500.0}),
            "scope",
        ),
        c(
            "seats_bool",
            "The sub-lease's seats is true: a boolean is not a uint.",
            anchors,
            [block],
            resigned(router, sub, seats=True),
            "scope",
        ),
        c(
            "link_without_seats",
            "A block that names no seats bounds nothing, and is refused.",
            anchors,
            [seatless_block],
            sub_lease([seatless_block]),
            "scope",
        ),
        c(
            "block_exceeds_parent",
            "The site block holds more seats than the regional block it was cut from.",
            anchors,
            [region_block, big_site_block],
            sub_lease([region_block, big_site_block]),
            "scope",
        ),
        c(
            "unknown_link_type",
            "A link whose typ is no statement type of the protocol, though it carries del.",
            anchors,
            [voucher],
            sub_lease([voucher]),
            "link",
        ),
        c(
            "link_without_del",
            "A link that delegates to no key: a plain lease.",
            anchors,
            [plain_lease],
            sub_lease([plain_lease]),
            "link",
        ),
        c(
            "token_not_lease",
            'The token\'s typ is not "lease".',
            anchors,
            [],
            not_a_lease,
            "token_type",
        ),
        c(
            "tampered_signature",
            "One bit of the token's signature flipped.",
            anchors,
            [],
            flipped(direct, 10),
            "signature",
        ),
        c(
            "tampered_payload",
            "One bit of the token's payload flipped.",
            anchors,
            [],
            flipped(direct, len(direct) - 1),
            "signature",
        ),
        c(
            "tampered_link",
            "One bit of the block's payload flipped.",
            anchors,
            [flipped(block, payload_start + 8)],
            sub,
            "signature",
        ),
        c(
            "wrong_anchor",
            "The client trusts another key only.",
            [stranger.public],
            [],
            direct,
            "untrusted",
        ),
        c(
            "router_as_anchor",
            "The client trusts the router's key; the chain starts at the "
            "vendor's, so it leads from no anchor.",
            [router.public],
            [block],
            sub,
            "untrusted",
        ),
        c(
            "chain_missing",
            "The router's sub-lease without its chain.",
            anchors,
            [],
            sub,
            "untrusted",
        ),
        c(
            "links_reversed",
            "The two blocks in the wrong order.",
            anchors,
            [site_block, region_block],
            nested,
            "untrusted",
        ),
        c(
            "forged_iss",
            "Signed by a stranger, its iss naming the vendor's key: a bad signature.",
            anchors,
            [],
            resigned(stranger, direct),
            "signature",
        ),
        c(
            "iss_not_signer",
            "Signed by the vendor, but its iss names another key.",
            anchors,
            [],
            resigned(vendor, direct, iss=stranger.public),
            "malformed",
        ),
        c(
            "exp_before_iat",
            "A token whose exp is before its iat.",
            anchors,
            [],
            resigned(vendor, direct, exp=T0 - 1),
            "malformed",
        ),
        c(
            "truncated",
            "A token cut to its signature.",
            anchors,
            [],
            direct[:SIGNATURE_LEN],
            "malformed",
        ),
        c(
            "payload_not_map",
            "A properly signed payload that is an array.",
            anchors,
            [],
            bytes(vendor.key.sign(msgpack.packb(["lease"]))),
            "malformed",
        ),
        c(
            "wrong_nonce",
            "The token carries another nonce than the one sent.",
            anchors,
            [],
            direct,
            "nonce",
            nonce=bytes(16),
        ),
        c(
            "wrong_handle",
            "The token names another lease than the reply's handle.",
            anchors,
            [],
            direct,
            "handle",
            handle="zzzzzzzzzzzz",
        ),
        c("at_after_exp", "at after the token's exp.", anchors, [], direct, "period", at=T0 + 90.5),
        c(
            "at_before_iat",
            "at before the token's iat.",
            anchors,
            [block],
            sub,
            "period",
            at=T0 - 1,
        ),
    ]


def _verify(case: Case) -> Statement | str:
    """The token's statement, or licd_client's words for why it is refused."""
    try:
        return verify_lease(
            case.anchors, case.chain, case.token, nonce=case.nonce, handle=case.handle, at=case.at
        )
    except TokenInvalid as exc:
        return str(exc)


def _check(case: Case, outcome: Statement | str) -> None:
    """Raise Disagreement unless licd_client's verdict is the case's."""
    if isinstance(outcome, Statement):
        if case.reason is not None:
            raise Disagreement(f"chains/{case.name}: licd_client accepts it")
    elif case.reason is None:
        raise Disagreement(f"chains/{case.name}: licd_client rejects it: {outcome}")
    elif not re.search(REASONS[case.reason], outcome):
        raise Disagreement(f"chains/{case.name}: rejected for another reason: {outcome}")


def build() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for case in _cases():
        outcome = _verify(case)
        _check(case, outcome)
        vector: dict[str, Any] = {
            "name": case.name,
            "description": case.description,
            "anchors": [a.hex() for a in case.anchors],
            "chain": [link.hex() for link in case.chain],
            "token": case.token.hex(),
            "nonce": case.nonce.hex(),
            "handle": case.handle,
            "at": case.at,
        }
        if case.reason is None and isinstance(outcome, Statement):
            vector.update(
                verdict="accepted", signer=outcome.iss.hex(), lease=tagged(outcome.payload)
            )
        else:
            vector.update(verdict="rejected", reason=case.reason)
        vectors.append(vector)
    return vectors
