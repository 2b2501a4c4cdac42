"""Lease tokens and delegation chains of docs/protocol.md section 4.

The statement format itself is `statements`'s. The lease token's format lives here both
ways: `lease_payload()` writes it (the daemon signs what it returns), `Statement` reads it
back. `verify_lease()` accepts a lease token only when a
chain leads from a trust anchor to it: the anchor signed chain[0], whose `del` key signed
chain[1], ..., and the last key signed the token. Every link is a statement of a known
type (`LINK_TYPES`), was valid when the token was issued, may not outlive its parent,
and binds content: what it delegates (product, seats, features) bounds every statement
below it. A vendor's entitlement may be chain[0] only; its terms (`entitlements`) bound
the statement directly below it, which also carries its licence id, is issued no earlier
than its `nbf` and lasts no longer than its `max_ttl`. A batched token (protocol 2: its
payload and a `BatchProof`) is opened by `statements.open_statement` with its proof, by the
same key a whole one would be, and then judged by every rule above. No I/O, and no wall
clock: callers pass the instants to check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .entitlements import ENTITLEMENT, Entitlement, read_entitlement
from .errors import TokenInvalid, UntrustedKey
from .messages import BatchProof, Features, Holder

# The statement format is statements.py's; re-exported, as the names callers know here.
from .statements import KEY_LEN as KEY_LEN
from .statements import SIGNATURE_LEN as SIGNATURE_LEN
from .statements import Statement as Statement
from .statements import fingerprint as fingerprint
from .statements import key_from_text as key_from_text
from .statements import key_to_text as key_to_text
from .statements import open_statement as open_statement
from .statements import sign as sign
from .statements import sign_batch as sign_batch
from .statements import signed_body
from .wire import REPLY_LIMITS, decode_body

#: The statement types a chain link may be (section 4): a block, i.e. a lease taken with
#: `delegate`, anywhere; a vendor's entitlement, as chain[0] only. The token itself is
#: always a "lease".
LINK_TYPES = frozenset({"lease", ENTITLEMENT})


def lease_payload(
    *,
    issuer: bytes,
    issued: float,
    expires: float,
    handle: str,
    licence: str,
    product: str,
    seats: int,
    features: Features,
    holder: Holder,
    nonce: bytes,
    site: str,
    delegate: bytes | None = None,
    overdraft: bool = False,
) -> dict[str, Any]:
    """A lease token's payload (section 4), to be signed by `issuer`'s key: the lease
    `handle` of licence id `licence` (never its key), granting `seats` of `product` with
    `features` to `holder` (host, hostid and user only), answering `nonce`. `del` is there
    only for a block (`delegate`), `ovr` only for a lease granted in overdraft."""
    payload: dict[str, Any] = {
        "typ": "lease",
        "iss": issuer,
        "iat": issued,
        "exp": expires,
        "lid": handle,
        "lic": licence,
        "product": product,
        "seats": seats,
        "features": features,
        "holder": {"host": holder.host, "hostid": holder.hostid, "user": holder.user},
        "nonce": nonce,
        "site": site,
    }
    if delegate is not None:
        payload["del"] = delegate
    if overdraft:
        payload["ovr"] = True
    return payload


def verify_chain(
    anchors: Iterable[bytes],
    chain: Sequence[bytes],
    token: bytes,
    *,
    batch: BatchProof | None = None,
    at: float | None = None,
) -> Statement:
    """Verify `token` through `chain` from one of `anchors`; return the token's payload.

    With `batch` (protocol 2), `token` is the payload alone and `batch` its proof; the
    signer is the same (the last link's `del`, or the anchor), and the result the same
    Statement, whose `proof` keeps the payload and the batch.

    Each link must be of a known type (an entitlement only as chain[0]), hold a `del`
    key, be valid at the token's issue time (and at `at`, if given), expire no later than
    its parent, and bound the content of the statement below it (`_check_bounds`; an
    entitlement's further rules in `_entitled`). The token must be within every link's
    validity too. Raises TokenInvalid naming the first failure; UntrustedKey when the
    statement nearest the anchor is genuinely signed, by a key that is no anchor.
    """
    anchor_set = set(anchors)
    if not anchor_set:
        raise TokenInvalid("no trust anchor configured")
    # The statement nearest the anchor: chain[0] (links are never batched), or the token.
    first, first_batch = (chain[0], None) if chain else (token, batch)
    signer = _claimed_signer(first, first_batch)
    if signer is not None and signer not in anchor_set and _signed_by(first, signer, first_batch):
        trusted = ", ".join(sorted(fingerprint(a) for a in anchor_set))
        whose = "chain[0]'s" if chain else "the token's"
        are = "fingerprints are" if len(anchor_set) > 1 else "fingerprint is"
        raise UntrustedKey(
            f"the server's key is not the trusted one: {whose} signature is by key "
            f"fingerprint {fingerprint(signer)}, the trusted key {are} {trusted}",
            signer=signer,
        )
    failures: list[str] = []
    for anchor in anchor_set:
        try:
            return _verify_from(anchor, chain, token, batch, at)
        except TokenInvalid as exc:
            failures.append(str(exc))
    raise TokenInvalid(failures[0] if len(failures) == 1 else "; ".join(sorted(set(failures))))


def _claimed_signer(blob: bytes, batch: BatchProof | None) -> bytes | None:
    """The key a statement (or with `batch`, a batched payload) names as its `iss`, not yet
    checked, if it names one."""
    body = blob if batch is not None else blob[SIGNATURE_LEN:]
    try:
        iss = decode_body(body, REPLY_LIMITS).get("iss")
    except Exception:  # not a statement at all: the ordinary checks name the fault
        return None
    return iss if isinstance(iss, bytes) and len(iss) == KEY_LEN else None


def _signed_by(blob: bytes, key: bytes, batch: BatchProof | None) -> bool:
    try:
        signed_body(blob, key, batch)
    except TokenInvalid:
        return False
    return True


@dataclass(frozen=True)
class _Grant:
    """What a statement allows the one directly below it: the bounds `_check_bounds`
    applies, and how its messages name the parent (`by`)."""

    product: str | None
    seats: int
    features: Features
    by: str


def _granted_by_link(parent: Statement, where: str) -> _Grant:
    """What a block (a lease-type link) grants `where`, its own fields read strictly."""
    name = f"{where}'s parent"
    features = parent.payload.get("features")
    if features is not None and not isinstance(features, dict):
        raise TokenInvalid(f"{name}'s 'features' is not a map")
    if parent.seats is None or parent.seats < 0:
        raise TokenInvalid(f"{name} names no seats")
    return _Grant(parent.product, parent.seats, parent.features, "its parent")


def _entitled(entitlement: Entitlement, child: Statement, where: str) -> _Grant:
    """The rules an entitlement sets the statement directly below it (same licence id,
    issued no earlier than `nbf`, no longer than `max_ttl`), and what it grants at the
    child's issue time: its product, its seats and features with the add-ons then active."""
    terms = entitlement.terms
    if child.licence != terms.licence_id:
        raise TokenInvalid(
            f"{where} is for licence {_shown(child.licence)}, "
            f"the entitlement for {_shown(terms.licence_id)}"
        )
    if terms.not_before is not None and child.iat < terms.not_before:
        raise TokenInvalid(f"{where} was issued before the entitlement is valid (its nbf)")
    # exp <= iat + max_ttl, as a signer computes exp, rather than exp - iat: no rounding.
    if terms.max_ttl is not None and child.exp > child.iat + terms.max_ttl:
        raise TokenInvalid(
            f"{where} is valid for {round(child.exp - child.iat, 3):.15g} s, longer than the "
            f"entitlement's max_ttl of {round(terms.max_ttl, 3):.15g} s"
        )
    at = child.iat
    return _Grant(terms.product, terms.seats_at(at), terms.features_at(at), "the entitlement")


def _check_bounds(grant: _Grant, child: Statement, where: str) -> None:
    """`child` stays within what its parent grants, or TokenInvalid naming `where`.

    Product equal (when the parent names one), seats a uint no more than the parent's,
    features a subset of the parent's: the same keys with the same values and types.
    """
    features = child.payload.get("features")
    if features is not None and not isinstance(features, dict):
        raise TokenInvalid(f"{where}'s 'features' is not a map")
    if child.seats is None or child.seats < 0:
        raise TokenInvalid(f"{where} names no seats")
    if grant.product is not None and child.product != grant.product:
        raise TokenInvalid(
            f"{where} is for product {_shown(child.product)}, "
            f"{grant.by} for {_shown(grant.product)}"
        )
    if child.seats > grant.seats:
        raise TokenInvalid(
            f"{where} holds {child.seats} seat(s), more than {grant.by}'s {grant.seats}"
        )
    granted = grant.features
    for name, value in child.features.items():
        if name not in granted:
            raise TokenInvalid(f"{where} has feature {_shown(name)}, which {grant.by} has not")
        if type(value) is not type(granted[name]) or value != granted[name]:
            raise TokenInvalid(
                f"{where} has feature {_shown(name)} = {_shown(value)}, "
                f"{grant.by} {_shown(granted[name])}"
            )


def _shown(value: object) -> str:
    """A value the server chose, quoted and cut short for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _verify_from(
    anchor: bytes,
    chain: Sequence[bytes],
    token: bytes,
    batch: BatchProof | None,
    at: float | None,
) -> Statement:
    signer = anchor
    links: list[Statement] = []
    entitlement: Entitlement | None = None  # chain[0], when the chain starts at a vendor's

    def grant(child: Statement, where: str) -> _Grant:
        """What the last link so far grants `child`, directly below it."""
        if entitlement is not None and len(links) == 1:
            return _entitled(entitlement, child, where)
        return _granted_by_link(links[-1], where)

    for i, blob in enumerate(chain):
        try:
            link = open_statement(blob, signer)
        except TokenInvalid as exc:
            raise TokenInvalid(f"chain[{i}]: {exc}") from None
        if link.typ == ENTITLEMENT and i > 0:
            raise TokenInvalid(f"chain[{i}] is an entitlement, which may only be chain[0]")
        if link.typ not in LINK_TYPES:
            raise TokenInvalid(f"chain[{i}] is a {link.typ!r} statement, not a known link type")
        if link.typ == ENTITLEMENT:
            try:
                entitlement = read_entitlement(link, blob)
            except TokenInvalid as exc:
                raise TokenInvalid(f"chain[{i}]: {exc}") from None
        if link.delegate is None:
            raise TokenInvalid(f"chain[{i}] delegates to no key")
        if links and link.exp > links[-1].exp:
            raise TokenInvalid(f"chain[{i}] expires after its parent")
        if links:
            _check_bounds(grant(link, f"chain[{i}]"), link, f"chain[{i}]")
        links.append(link)
        signer = link.delegate
    try:
        leaf = open_statement(token, signer, batch)
    except TokenInvalid as exc:
        raise TokenInvalid(f"token: {exc}") from None
    if leaf.typ != "lease":
        raise TokenInvalid("token is not a lease statement")
    if links and leaf.exp > links[-1].exp:
        raise TokenInvalid("token expires after the statement that delegated to its signer")
    if links:
        _check_bounds(grant(leaf, "token"), leaf, "token")
    for i, link in enumerate(links):
        if not link.iat <= leaf.iat <= link.exp:
            raise TokenInvalid(f"chain[{i}] was not valid when the token was issued")
        if at is not None and not link.iat <= at <= link.exp:
            raise TokenInvalid(f"chain[{i}] is not valid now")
    if at is not None and not leaf.iat <= at <= leaf.exp:
        raise TokenInvalid("token is not valid now")
    return leaf


def verify_lease(
    anchors: Iterable[bytes],
    chain: Sequence[bytes],
    token: bytes,
    *,
    nonce: bytes,
    handle: str | None = None,
    batch: BatchProof | None = None,
    at: float | None = None,
) -> Statement:
    """`verify_chain` plus the checks a client makes of its own lease: the nonce it sent
    and the handle the daemon named. `batch`: the reply's, for a batched token."""
    leaf = verify_chain(anchors, chain, token, batch=batch, at=at)
    if leaf.nonce != nonce:
        raise TokenInvalid("token's nonce is not the one this client sent")
    if handle is not None and leaf.lid != handle:
        raise TokenInvalid("token names another lease")
    return leaf
