"""Signing with the daemon's key: lease tokens (docs/protocol.md section 4) and renewal
requests to a vendor (docs/entitlements.md).

`Signer` holds the key and, on a router, the chains that link it to the vendor's key,
and dates each token no earlier than its chain. The payload's format is
`licd_client.tokens.lease_payload`'s, the same module that reads it back; the key file
is `licd.store.keyfile`'s. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

from nacl.signing import SigningKey

from licd.engine import Grant
from licd_client import entitlements, tokens


class Signer:
    """Signs lease tokens with the daemon key for one site."""

    def __init__(self, key: SigningKey, site: str) -> None:
        self._key = key
        self.public = bytes(key.verify_key)
        self.site = site
        self.chain: list[bytes] = []  # empty: clients trust this daemon's key directly
        #: Per licence, the statements linking this key to the vendor's (a router's
        #: block-mode licences: upstream chain + block token).
        self.chains: dict[str, list[bytes]] = {}
        #: Per licence, the latest issue time in its chain: a token is never dated before
        #: it (clients check that every link was valid when the token was issued), even if
        #: this machine's clock is behind upstream's.
        self.chain_iat: dict[str, float] = {}

    def chain_for(self, licence_id: str) -> list[bytes]:
        return self.chains.get(licence_id, self.chain)

    def renewal_request(
        self,
        *,
        made: float,
        components: Sequence[str],
        entitlements_held: Sequence[bytes],
        usage: Sequence[entitlements.LicenceUsage],
    ) -> bytes:
        """A request to the vendor to renew the entitlements held, signed by this key."""
        return entitlements.make_request(
            self._key,
            site=self.site,
            made=made,
            components=components,
            entitlements=entitlements_held,
            usage=usage,
        )

    def usage_report(self, *, made: float, usage: entitlements.LicenceUsage) -> bytes:
        """A site router's report of its use of a block, for upstream, signed by this key."""
        return entitlements.make_usage_report(self._key, site=self.site, made=made, usage=usage)

    def lease_token(self, grant: Grant, nonce: bytes, now: float) -> bytes:
        lease, licence = grant.lease, grant.licence
        payload = tokens.lease_payload(
            issuer=self.public,
            issued=max(now, self.chain_iat.get(lease.licence_id, now)),
            expires=lease.expires,
            handle=lease.handle,
            licence=licence.id,
            product=licence.product,
            seats=lease.seats,
            features=grant.features,
            holder=lease.holder,
            nonce=nonce,
            site=self.site,
            delegate=lease.delegate,
            overdraft=lease.overdraft,  # granted beyond the licence's seats, in its overdraft
        )
        return tokens.sign(self._key, payload)
