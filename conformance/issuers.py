"""The daemons of the chain scenarios: fixed keys, licences, and tokens signed as licd signs.

An `Issuer` is one daemon (the vendor's, a regional router, a site router): its token
is made by licd's own `Signer.lease_token`, serving the issuer's chain as a router does.
`batched` sends one in a batch (protocol 2), signed with licd_client's `sign_batch` among
tokens the issuer signed for other clients in the same turn. Keys derive from fixed names
and every instant is fixed, so every run signs the same bytes. `resigned` and `flipped`
make what a broken or hostile issuer would send.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
from nacl.signing import SigningKey

from licd.core.keys import Signer
from licd.engine import Grant, Licence, SeatLease
from licd_client.messages import BatchProof, Features, Holder
from licd_client.tokens import SIGNATURE_LEN, sign, sign_batch

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: when the client's lease is issued
HOUR, DAY = 3600.0, 86400.0
NONCE = bytes(range(16))  # the nonce the client sent
HANDLE = "k3v7p2m6q4xa"  # the client's lease, as each daemon names it in its reply
BLOCK_NONCE = bytes(range(16, 32))  # the router's own nonces upstream
REGION_NONCE = bytes(range(32, 48))


def fixed_key(name: str) -> SigningKey:
    """A signing key derived from `name`: the same key on every run."""
    return SigningKey(hashlib.sha256(f"licd conformance: {name}".encode()).digest())


FEATURES: Features = {"tier": "pro", "max_studies": 500, "ocr": True, "ratio": 0.5}
VENDOR_LICENCE = Licence(
    key="ACME-0000-0001",
    id="dicom-acme",
    product="dicom",
    seats=20,
    features=FEATURES,
    delegable=True,
    max_ttl=35 * DAY,
)
# A router's licence takes its block's product, seats and features.
REGION_LICENCE = replace(VENDOR_LICENCE, key="EMEA-0000-0001", id="dicom-emea", seats=10)
SITE_LICENCE = replace(VENDOR_LICENCE, key="SITE-0000-0001", id="dicom-branch", seats=5)
MACHINE = Holder(host="machine-a", hostid="id-machine-a", user="alice", pid=4242)
ROUTER_HOST = Holder(host="router-1", hostid="id-router-1", user="licd", pid=99, app="licd-router")


@dataclass
class Issuer:
    """One daemon in a scenario: its key, site, the licence it serves, and its chain."""

    key: SigningKey
    site: str
    licence: Licence
    chain: list[bytes] = field(default_factory=list)

    @property
    def public(self) -> bytes:
        return bytes(self.key.verify_key)

    def issue(
        self,
        handle: str,
        *,
        now: float,
        expires: float,
        seats: int = 1,
        holder: Holder = MACHINE,
        nonce: bytes = NONCE,
        delegate: bytes | None = None,
        features: Features | None = None,
        overdraft: bool = False,
        product: str | None = None,
        dated_from_chain: bool = True,
    ) -> bytes:
        """A token as this daemon's `Signer` signs it, serving its chain."""
        licence = self.licence if product is None else replace(self.licence, product=product)
        lease = SeatLease(
            secret="s" * 32,
            handle=handle,
            licence_id=licence.id,
            holder=holder,
            request="r" * 32,
            seats=seats,
            ttl=expires - now,
            created=now,
            expires=expires,
            last_heartbeat=now,
            delegate=delegate,
            overdraft=overdraft,
        )
        grant = Grant(
            lease=lease,
            licence=licence,
            ttl=expires - now,
            fresh=True,
            features=licence.features if features is None else features,
        )
        signer = Signer(self.key, self.site)
        signer.chains[licence.id] = self.chain
        if dated_from_chain and self.chain:  # as a router does: never before its block
            signer.chain_iat[licence.id] = payload(self.chain[-1])["iat"]
        return signer.lease_token(grant, nonce, now)


def payload(statement: bytes) -> dict[str, Any]:
    value: dict[str, Any] = msgpack.unpackb(statement[SIGNATURE_LEN:], raw=False)
    return value


def resigned(key: Issuer, statement: bytes, **changes: Any) -> bytes:
    """`statement`'s payload with `changes` (None removes a key), signed by `key`."""
    body = {**payload(statement), **changes}
    return sign(key.key, {k: v for k, v in body.items() if v is not None})


def flipped(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x01
    return bytes(out)


def batched(
    issuer: Issuer,
    token: bytes,
    size: int,
    index: int,
    *,
    whole: bool = False,
    signed_by: Issuer | None = None,
) -> tuple[bytes, BatchProof]:
    """`token`, signed by `issuer`, as it would come in a batch of `size` at `index`: its
    payload and its batch proof. The other leaves are the payloads of tokens `issuer`
    signed for other clients at the same instant. What a broken or hostile daemon would
    send: `whole`, a batch of whole statements (the token sent as it is, the tree over
    statements); `signed_by`, the batch signed by another issuer's key."""
    others = [
        issuer.issue(f"{'abcdefgh'[i]}3v7p2m6q4xb", now=T0, expires=T0 + 90, nonce=bytes([i]) * 16)
        for i in range(size - 1)
    ]
    leaves = [t if whole else t[SIGNATURE_LEN:] for t in [*others[:index], token, *others[index:]]]
    return leaves[index], sign_batch((signed_by or issuer).key, leaves)[index]
