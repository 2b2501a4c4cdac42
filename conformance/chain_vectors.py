"""chains.json: signed lease tokens with their chains, and the verdict on each (section 4).

The cases: direct, router block, nested routers and forward leases as licd issues them
(conformance/issuers.py), then what a broken or hostile issuer would send: a stale
block, a router granting more than its block, a flipped byte, a stranger's key. Then a
daemon the vendor entitled (chain = [entitlement], signed by licd_client.entitlements),
and tokens breaking each of the entitlement's content rules. Then batched tokens
(protocol 2: the payload with its batch proof), direct and under a router's block, and
broken proofs: a forged path, a moved leaf, another size or root, a path that does not
fit. `build()`
verifies each with licd_client's `verify_lease` and refuses to write one whose verdict
(and, for a rejection, its reason) is not the one the case was written for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from licd_client.entitlements import AddonTerm, Terms, issue, key_hash
from licd_client.errors import TokenInvalid
from licd_client.messages import BatchProof
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
    batched,
    fixed_key,
    flipped,
    resigned,
)
from .notation import Disagreement, tagged

#: Why a chain is rejected: a class a client in any language can tell, not licd's words.
REASONS = {
    "signature": r"bad signature",
    "untrusted": r"not the trusted one",
    "malformed": r"too short|not a msgpack map|without|'iss'|'del'|entitlement[a-z -]*: ",
    "link": r"delegates to no key|not a known link type|may only be chain\[0\]",
    "token_type": r"not a lease",
    "period": r"valid|expires after",
    "scope": r"product|seat|feature|licence",
    "nonce": r"nonce",
    "handle": r"another lease",
    "batch": r"batch: ",
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
    batch: BatchProof | None = None  # a batched token's proof: `token` is its payload


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
        *_entitlement_cases(vendor, router),
        # sub_lease again: the router serves [block] while it signs the batch's others.
        *_batched_cases(vendor, router, stranger, sub_lease([block]), block),
    ]


#: The entitled site daemon's licence: the entitlement's id, product, seats and features.
ENTITLED_LICENCE = replace(VENDOR_LICENCE, key="SITE-0000-0002", id="dicom-site", seats=5)


def _entitlement_cases(vendor: Issuer, router: Issuer) -> list[Case]:
    """A site daemon the vendor entitled: its leases carry chain = [entitlement] (signed by
    the vendor, `del` = the daemon's key), so clients trusting the vendor accept them."""
    daemon = Issuer(fixed_key("entitled site daemon"), "branch", ENTITLED_LICENCE)
    # 5 seats for 30 days, valid from an hour before T0, leases of at most a week; an
    # add-on of 3 seats and the "export" feature from T0 + 1 day to T0 + 2 days.
    terms = Terms(
        licence_id=ENTITLED_LICENCE.id,
        key_hash=key_hash(ENTITLED_LICENCE.key),
        product=ENTITLED_LICENCE.product,
        seats=5,
        expires=T0 + 30 * DAY,
        sequence=1,
        features=FEATURES,
        addons=(AddonTerm(3, {"export": True}, starts=T0 + DAY, ends=T0 + 2 * DAY),),
        not_before=T0 - HOUR,
        max_ttl=7 * DAY,
    )
    entitlement = issue(vendor.key, daemon.public, T0 - DAY, terms).statement
    daemon.chain = [entitlement]
    anchors = [vendor.public]

    def lease(at: float = T0, ttl: float = 90.0, **changes: Any) -> bytes:
        return daemon.issue(HANDLE, now=at, expires=at + ttl, **changes)

    other_licence = Issuer(
        daemon.key, daemon.site, replace(ENTITLED_LICENCE, id="dicom-other"), [entitlement]
    )
    # A router holding a vendor block names the site daemon in an "entitlement" it signed.
    fake = issue(router.key, daemon.public, T0 - HOUR, replace(terms, not_before=None))
    behind_block = Issuer(
        daemon.key,
        daemon.site,
        ENTITLED_LICENCE,
        [
            vendor.issue(
                "b7r2n5w4c3ez",
                now=T0 - DAY,
                expires=T0 + 7 * DAY,
                seats=5,
                holder=ROUTER_HOST,
                nonce=BLOCK_NONCE,
                delegate=router.public,
            ),
            fake.statement,
        ],
    )
    in_addon, after_addon = T0 + DAY + HOUR, T0 + 2 * DAY + HOUR
    c = Case
    return [
        c(
            "entitlement",
            "A daemon the vendor entitled: chain = [entitlement], which the vendor signed "
            "with del = the daemon's key; the token stays within its terms.",
            anchors,
            [entitlement],
            lease(),
        ),
        c(
            "entitlement_addon_active",
            "A token issued while an add-on is active holds the entitlement's seats plus "
            "the add-on's, and the add-on's feature.",
            anchors,
            [entitlement],
            lease(in_addon, seats=8, features={**FEATURES, "export": True}),
        ),
        c(
            "entitlement_addon_ended",
            "The same seats once the add-on has ended: more than the entitlement grants.",
            anchors,
            [entitlement],
            lease(after_addon, seats=8),
            "scope",
        ),
        c(
            "entitlement_too_many_seats",
            "The token holds more seats than the entitlement.",
            anchors,
            [entitlement],
            lease(seats=6),
            "scope",
        ),
        c(
            "entitlement_feature_not_granted",
            "The token has a feature the entitlement does not grant at its issue time.",
            anchors,
            [entitlement],
            lease(features={**FEATURES, "export": True}),
            "scope",
        ),
        c(
            "entitlement_wrong_product",
            "The token's product is not the entitlement's.",
            anchors,
            [entitlement],
            lease(product="cad"),
            "scope",
        ),
        c(
            "entitlement_wrong_licence",
            "The token's lic is not the entitlement's licence id.",
            anchors,
            [entitlement],
            other_licence.issue(HANDLE, now=T0, expires=T0 + 90),
            "scope",
        ),
        c(
            "entitlement_before_nbf",
            "The token was issued after the entitlement's iat but before its nbf.",
            anchors,
            [entitlement],
            lease(T0 - 2 * HOUR),
            "period",
        ),
        c(
            "entitlement_longer_than_max_ttl",
            "The token's exp - iat is more than the entitlement's max_ttl.",
            anchors,
            [entitlement],
            lease(ttl=7 * DAY + 1),
            "period",
        ),
        c(
            "entitlement_outlived",
            "The token expires after the entitlement.",
            anchors,
            [entitlement],
            lease(T0 + 29 * DAY, ttl=2 * DAY),
            "period",
        ),
        c(
            "entitlement_not_first",
            "An entitlement at chain[1], signed by the router the vendor's block delegated "
            "to: an entitlement may only be chain[0].",
            anchors,
            behind_block.chain,
            behind_block.issue(HANDLE, now=T0, expires=T0 + 90),
            "link",
        ),
        c(
            "entitlement_tampered",
            "One bit of the entitlement's signature flipped.",
            anchors,
            [flipped(entitlement, 10)],
            lease(),
            "signature",
        ),
        c(
            "entitlement_malformed",
            "An entitlement the vendor signed without keyhash: every field is checked.",
            anchors,
            [resigned(vendor, entitlement, keyhash=None)],
            lease(),
            "malformed",
        ),
        c(
            "entitlement_daemon_as_anchor",
            "The client trusts the entitled daemon's key; the chain starts at the vendor's, "
            "so it leads from no anchor.",
            [daemon.public],
            [entitlement],
            lease(),
            "untrusted",
        ),
    ]


def _batched_cases(
    vendor: Issuer, router: Issuer, stranger: Issuer, sub: bytes, block: bytes
) -> list[Case]:
    """Batched tokens (protocol 2): accepted at the first and the last leaf of trees of 2, 3
    and 5, direct and under a router's block; then proofs broken one way at a time."""
    anchors = [vendor.public]
    direct = vendor.issue(HANDLE, now=T0, expires=T0 + 90)
    accepted = []
    for scenario, whose, issuer, chain, token in (
        ("direct", "The vendor's daemon's lease", vendor, [], direct),
        ("router_block", "The site router's sub-lease (chain = [block])", router, [block], sub),
    ):
        for size in (2, 3, 5):
            for index, place in ((0, "first"), (size - 1, "last")):
                payload, proof = batched(issuer, token, size, index)
                accepted.append(
                    Case(
                        f"batched_{scenario}_{size}_{place}",
                        f"{whose} signed in a batch of {size}, at leaf {index}: the token "
                        "is its payload, the batch its proof.",
                        anchors,
                        chain,
                        payload,
                        batch=proof,
                    )
                )
    payload, proof = batched(vendor, direct, 5, 0)
    path = proof.path
    another = batched(vendor, vendor.issue(HANDLE, now=T0, expires=T0 + 91), 5, 0)[1]

    def broken(
        name: str,
        description: str,
        reason: str,
        *,
        token: bytes = payload,
        trusted: list[bytes] = anchors,
        **batch_changes: Any,
    ) -> Case:
        """The direct lease at leaf 0 of 5, one thing changed: the token, the anchors or
        a field of the batch."""
        batch = replace(proof, **batch_changes)
        return Case(name, description, trusted, [], token, reason, batch=batch)

    whole, whole_proof = batched(vendor, direct, 3, 1, whole=True)
    misrouted, misrouted_proof = batched(router, sub, 3, 2, signed_by=vendor)
    return [
        *accepted,
        broken(
            "batched_forged_path",
            "One bit of the path's first sibling flipped: it leads to another root.",
            "signature",
            path=[flipped(path[0], 0), *path[1:]],
        ),
        broken(
            "batched_leaf_moved",
            "The same path at another index: it leads to another root.",
            "signature",
            index=1,
        ),
        broken(
            "batched_size_changed",
            "size 6 instead of 5: the first leaf's path fits and leads to the same root, "
            "but the signature covers the size.",
            "signature",
            size=6,
        ),
        broken(
            "batched_other_root",
            "The signature of another batch of 5, over another root.",
            "signature",
            sig=another.sig,
        ),
        broken(
            "batched_statement_signature",
            "The signature the whole statement would carry, given as the batch's: a batch "
            "signature signs the batch message, never a payload.",
            "signature",
            sig=direct[:SIGNATURE_LEN],
        ),
        broken(
            "batched_payload_tampered",
            "One bit of the payload flipped.",
            "signature",
            token=flipped(payload, len(payload) - 1),
        ),
        Case(
            "batched_router_signed_by_vendor",
            "The router's sub-lease in a batch the vendor signed: the token's signer is the "
            "block's del, the router, for a batch as for a whole token.",
            anchors,
            [block],
            misrouted,
            "signature",
            batch=misrouted_proof,
        ),
        broken(
            "batched_index_is_size",
            "index 5 in a tree of 5 leaves.",
            "batch",
            index=5,
        ),
        broken(
            "batched_path_too_long",
            "One sibling more than the leaf's place in the tree has.",
            "batch",
            path=[*path, path[0]],
        ),
        broken(
            "batched_path_too_short",
            "The path without its last sibling.",
            "batch",
            path=path[:-1],
        ),
        broken(
            "batched_sibling_31_bytes",
            "A sibling of 31 bytes: every one is a SHA-256 hash.",
            "batch",
            path=[path[0][:31], *path[1:]],
        ),
        Case(
            "batched_whole_statement",
            "A daemon that batched whole statements: the proof is good, but the token, "
            "signature first, is no payload (a msgpack map).",
            anchors,
            [],
            whole,
            "malformed",
            batch=whole_proof,
        ),
        broken(
            "batched_wrong_anchor",
            "The client trusts another key only; the batch is genuinely the vendor's.",
            "untrusted",
            trusted=[stranger.public],
        ),
        Case(
            "batched_wrong_nonce",
            "A batched token is judged by every rule of a whole one: here, its nonce.",
            anchors,
            [],
            payload,
            "nonce",
            nonce=bytes(16),
            batch=proof,
        ),
    ]


def _verify(case: Case) -> Statement | str:
    """The token's statement, or licd_client's words for why it is refused."""
    try:
        return verify_lease(
            case.anchors,
            case.chain,
            case.token,
            nonce=case.nonce,
            handle=case.handle,
            batch=case.batch,
            at=case.at,
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
        if case.batch is not None:
            vector["batch"] = {
                "sig": case.batch.sig.hex(),
                "size": case.batch.size,
                "index": case.batch.index,
                "path": [p.hex() for p in case.batch.path],
            }
        if case.reason is None and isinstance(outcome, Statement):
            vector.update(
                verdict="accepted", signer=outcome.iss.hex(), lease=tagged(outcome.payload)
            )
        else:
            vector.update(verdict="rejected", reason=case.reason)
        vectors.append(vector)
    return vectors
