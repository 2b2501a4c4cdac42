"""Signed statements of docs/protocol.md section 4: the format every signed thing licd
makes shares (lease tokens, entitlements, renewal requests), and public keys as text.

A statement is a 64-byte Ed25519 signature followed by the msgpack map it signs (PyNaCl's
`SigningKey.sign()` output); the map names its type (`typ`), its signer (`iss`) and when
it holds (`iat`..`exp`). `sign()` makes one, `open_statement()` checks one against the
key that should have signed it and returns its payload as a `Statement`. Protocol 2 may
sign payloads in a batch instead ("Batched signatures"): `sign_batch()` signs several
under one signature, and `open_statement()` given a payload with its `BatchProof` checks
it the same way, the Merkle tree being `merkle`'s. What each type of statement holds is
the business of `tokens` (leases, chains) and `entitlements`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from . import merkle
from .errors import TokenInvalid
from .messages import BatchProof, Features
from .wire import REPLY_LIMITS, decode_body

SIGNATURE_LEN = 64
KEY_LEN = 32
#: Hex digits of a key shown as its fingerprint in messages (section 4).
FINGERPRINT_LEN = 16
_HEX = re.compile(r"[0-9a-fA-F]+")


def key_to_text(key: bytes) -> str:
    """A public key as text: 64 lowercase hex digits."""
    return key.hex()


def fingerprint(key: bytes) -> str:
    """A key's short name in messages: the first 16 of the hex digits `licd key show` prints."""
    return key_to_text(key)[:FINGERPRINT_LEN]


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


def sign_batch(key: SigningKey, payloads: Sequence[bytes]) -> list[BatchProof]:
    """Sign at least two msgpack payloads with one signature over their Merkle tree's
    root: each payload's batch proof, in order (section 4, "Batched signatures")."""
    if len(payloads) < 2:
        raise ValueError("a batch holds at least two payloads (sign one on its own)")
    root, paths = merkle.tree(payloads)
    sig = key.sign(merkle.batch_message(len(payloads), root)).signature
    return [BatchProof(sig, len(payloads), i, path) for i, path in enumerate(paths)]


@dataclass(frozen=True)
class Batched:
    """How a batched token is proven: its payload's bytes as received and their batch
    proof. `open_statement(payload, key, batch)` checks them again, offline, as a whole
    statement's bytes are checked."""

    payload: bytes
    batch: BatchProof


@dataclass(frozen=True)
class Statement:
    """A verified statement's payload, with the key that signed it."""

    typ: str
    iss: bytes
    iat: float
    exp: float
    delegate: bytes | None
    payload: dict[str, Any]
    #: A batched token's payload and batch proof, what re-presents it; None for a whole
    #: statement (its own bytes are its proof).
    proof: Batched | None = None

    @property
    def lid(self) -> str | None:
        v = self.payload.get("lid")
        return v if isinstance(v, str) else None

    @property
    def licence(self) -> str | None:
        """`lic`: the licence's public id, as the signer names it."""
        v = self.payload.get("lic")
        return v if isinstance(v, str) else None

    @property
    def site(self) -> str | None:
        """The site name of the daemon that signed the statement."""
        v = self.payload.get("site")
        return v if isinstance(v, str) else None

    @property
    def nonce(self) -> bytes | None:
        v = self.payload.get("nonce")
        return v if isinstance(v, bytes) else None

    @property
    def product(self) -> str | None:
        v = self.payload.get("product")
        return v if isinstance(v, str) else None

    @property
    def seats(self) -> int | None:
        v = self.payload.get("seats")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def features(self) -> Features:
        v = self.payload.get("features")
        return dict(v) if isinstance(v, dict) else {}

    @property
    def overdraft(self) -> bool:
        """licd: `ovr`, a lease granted beyond the licence's seats, within its overdraft."""
        return self.payload.get("ovr") is True


def signed_body(blob: bytes, signer: bytes, batch: BatchProof | None = None) -> bytes:
    """The payload `signer` signed, or TokenInvalid. Without `batch`, `blob` is a whole
    statement: its signature must verify over the rest. With `batch`, `blob` is the payload
    alone: its leaf, `index`, `size` and `path` must lead to a root (else TokenInvalid
    from `merkle.root_from_path`), and `sig` must verify over that root's batch message.
    Nothing is decoded here."""
    if batch is None:
        if len(blob) <= SIGNATURE_LEN:
            raise TokenInvalid("signed statement too short")
        signature, body = blob[:SIGNATURE_LEN], blob[SIGNATURE_LEN:]
        message = body
    else:
        root = merkle.root_from_path(blob, batch.index, batch.size, batch.path)
        signature, body = batch.sig, blob
        message = merkle.batch_message(batch.size, root)
    try:
        VerifyKey(signer).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise TokenInvalid("bad signature") from None
    return body


def open_statement(blob: bytes, signer: bytes, batch: BatchProof | None = None) -> Statement:
    """Check `blob` was signed by `signer` and return its payload, or raise TokenInvalid.

    `blob` is a whole statement, or with `batch` (protocol 2) a batched payload and its
    proof (`signed_body`); the payload is then read by the same rules either way, and a
    batched one's Statement keeps its `proof`. A whole statement sent as a payload does
    not decode as a map (its signature comes first): "not a msgpack map".
    """
    body = signed_body(blob, signer, batch)
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
    proof = None if batch is None else Batched(blob, batch)
    return Statement(typ, signer, float(iat), float(exp), delegate, payload, proof)  # type: ignore[arg-type]


def _is_time(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
