"""Signed statements of docs/protocol.md section 4: lease tokens, certificates, delegation.

A statement is a 64-byte Ed25519 signature followed by the msgpack payload it signs
(PyNaCl's `SigningKey.sign()` output). `sign()` makes one; `verify_lease()` accepts a
lease token only when a chain leads from a trust anchor to it: the anchor signed
chain[0], whose `del` key signed chain[1], ..., and the last key signed the token. Every
link must have been valid when the token was issued and may not outlive its parent.
No I/O, and no wall clock: callers pass the instants to check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import TokenInvalid
from .messages import Features
from .wire import REPLY_LIMITS, decode_body

SIGNATURE_LEN = 64
KEY_LEN = 32
_HEX = re.compile(r"[0-9a-fA-F]+")


def key_to_text(key: bytes) -> str:
    """A public key as text: 64 lowercase hex digits."""
    return key.hex()


def key_from_text(text: str) -> bytes:
    """Parse 64 hex digits into a 32-byte public key, or raise ValueError."""
    text = text.strip()
    if len(text) != 2 * KEY_LEN:
        raise ValueError(f"a public key is {2 * KEY_LEN} hex digits, got {len(text)} characters")
    if not _HEX.fullmatch(text):
        raise ValueError("a public key is written in hex digits (0-9, a-f)")
    return bytes.fromhex(text)


def sign(key: SigningKey, payload: dict[str, Any]) -> bytes:
    """Sign a payload: signature (64 bytes) + msgpack payload."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return bytes(key.sign(body))


@dataclass(frozen=True)
class Statement:
    """A verified statement's payload, with the key that signed it."""

    typ: str
    iss: bytes
    iat: float
    exp: float
    delegate: bytes | None
    payload: dict[str, Any]

    @property
    def lid(self) -> str | None:
        v = self.payload.get("lid")
        return v if isinstance(v, str) else None

    @property
    def nonce(self) -> bytes | None:
        v = self.payload.get("nonce")
        return v if isinstance(v, bytes) else None

    @property
    def seats(self) -> int | None:
        v = self.payload.get("seats")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def features(self) -> Features:
        v = self.payload.get("features")
        return dict(v) if isinstance(v, dict) else {}


def open_statement(blob: bytes, signer: bytes) -> Statement:
    """Check `blob` was signed by `signer` and return its payload, or raise TokenInvalid."""
    if len(blob) <= SIGNATURE_LEN:
        raise TokenInvalid("signed statement too short")
    try:
        body = VerifyKey(signer).verify(blob)
    except (BadSignatureError, ValueError, TypeError):
        raise TokenInvalid("bad signature") from None
    try:
        payload = decode_body(body, REPLY_LIMITS)
    except Exception:
        raise TokenInvalid("signed payload is not a msgpack map") from None
    typ, iss = payload.get("typ"), payload.get("iss")
    iat, exp = payload.get("iat"), payload.get("exp")
    delegate = payload.get("del")
    if not isinstance(typ, str):
        raise TokenInvalid("statement without 'typ'")
    if iss != signer:
        raise TokenInvalid("statement's 'iss' is not the key that signed it")
    if not _is_time(iat) or not _is_time(exp) or exp < iat:  # type: ignore[operator]
        raise TokenInvalid("statement without a valid 'iat'..'exp'")
    if delegate is not None and (not isinstance(delegate, bytes) or len(delegate) != KEY_LEN):
        raise TokenInvalid("statement's 'del' is not a 32-byte key")
    return Statement(typ, signer, float(iat), float(exp), delegate, payload)  # type: ignore[arg-type]


def _is_time(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def verify_chain(
    anchors: Iterable[bytes],
    chain: Sequence[bytes],
    token: bytes,
    *,
    at: float | None = None,
) -> Statement:
    """Verify `token` through `chain` from one of `anchors`; return the token's payload.

    Each link must hold a `del` key, be valid at the token's issue time (and at `at`, if
    given), and expire no later than its parent. The token must be within every link's
    validity too. Raises TokenInvalid naming the first failure.
    """
    anchor_set = set(anchors)
    if not anchor_set:
        raise TokenInvalid("no trust anchor configured")
    failures: list[str] = []
    for anchor in anchor_set:
        try:
            return _verify_from(anchor, chain, token, at)
        except TokenInvalid as exc:
            failures.append(str(exc))
    raise TokenInvalid(failures[0] if len(failures) == 1 else "; ".join(sorted(set(failures))))


def _verify_from(
    anchor: bytes, chain: Sequence[bytes], token: bytes, at: float | None
) -> Statement:
    signer = anchor
    links: list[Statement] = []
    for i, blob in enumerate(chain):
        try:
            link = open_statement(blob, signer)
        except TokenInvalid as exc:
            raise TokenInvalid(f"chain[{i}]: {exc}") from None
        if link.delegate is None:
            raise TokenInvalid(f"chain[{i}] delegates to no key")
        if links and link.exp > links[-1].exp:
            raise TokenInvalid(f"chain[{i}] expires after its parent")
        links.append(link)
        signer = link.delegate
    try:
        leaf = open_statement(token, signer)
    except TokenInvalid as exc:
        raise TokenInvalid(f"token: {exc}") from None
    if leaf.typ != "lease":
        raise TokenInvalid("token is not a lease statement")
    if links and leaf.exp > links[-1].exp:
        raise TokenInvalid("token expires after the statement that delegated to its signer")
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
    at: float | None = None,
) -> Statement:
    """`verify_chain` plus the checks a client makes of its own lease: the nonce it sent
    and the handle the daemon named."""
    leaf = verify_chain(anchors, chain, token, at=at)
    if leaf.nonce != nonce:
        raise TokenInvalid("token's nonce is not the one this client sent")
    if handle is not None and leaf.lid != handle:
        raise TokenInvalid("token names another lease")
    return leaf
