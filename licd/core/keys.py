"""Signing with the daemon's key: lease tokens (docs/protocol.md section 4), batched
(protocol 2) or one by one, and renewal requests to a vendor (docs/entitlements.md).

`Signer` holds the key and, on a router, the chains that link it to the vendor's key,
and dates each token no earlier than its chain. `BatchSigner` signs the tokens of one
turn of the event loop with one signature over their Merkle tree (licd_client.merkle,
`statements.sign_batch`)
while the daemon is busy, and each on its own while it is not. The payload's format is
`licd_client.tokens.lease_payload`'s, the same module that reads it back; the key file
is `licd.store.keyfile`'s. No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgpack
from nacl.signing import SigningKey

from licd.deferred import Deferred
from licd.engine import Grant
from licd_client import entitlements, statements, tokens
from licd_client.messages import BatchProof

#: A signed token: the whole statement and no proof, or the payload and its batch proof.
Signed = tuple[bytes, BatchProof | None]
#: Tokens in one tree at most (more in one turn: the next tree).
MAX_BATCH = 1024


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
        """The lease's token, a whole statement."""
        return self.sign_body(self.lease_body(grant, nonce, now))

    def sign_body(self, body: bytes) -> bytes:
        """A statement of an encoded payload: its signature, then it."""
        return bytes(self._key.sign(body))

    def sign_batch(self, bodies: Sequence[bytes]) -> list[BatchProof]:
        """Two or more encoded payloads under one signature: each one's batch proof."""
        return statements.sign_batch(self._key, bodies)

    def lease_body(self, grant: Grant, nonce: bytes, now: float) -> bytes:
        """The lease token's payload, encoded (what a statement signs)."""
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
        body: bytes = msgpack.packb(payload, use_bin_type=True)
        return body


class BatchSigner:
    """Signs the lease tokens of one turn of the event loop together (protocol 2).

    While replies come one a turn, each is signed at once, on its own (`sign` returns
    it). Once a turn has made two, the daemon is busy: from the next turn each token
    waits for the end of its turn (`sign` returns a `Deferred`), and all of that turn's
    share one signature over their tree; a turn that made only one goes back to
    signing at once. `schedule` runs a callable after the callbacks of the current turn
    (the loop's `call_soon`)."""

    def __init__(
        self,
        signer: Signer,
        schedule: Callable[[Callable[[], None]], object],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._signer = signer
        self._schedule = schedule
        self._max = max_batch
        self._batching = False
        self._this_turn = 0  # tokens signed at once in this turn
        self._pending: list[tuple[bytes, Deferred[Signed]]] = []

    def sign(self, body: bytes) -> Signed | Deferred[Signed]:
        if not self._batching:
            self._this_turn += 1
            if self._this_turn == 1:
                self._schedule(self._end_turn)
            return self._signer.sign_body(body), None
        done: Deferred[Signed] = Deferred()
        if not self._pending:
            self._schedule(self._flush)
        self._pending.append((body, done))
        if len(self._pending) >= self._max:
            self._flush()
        return done

    def _end_turn(self) -> None:
        self._batching = self._this_turn > 1
        self._this_turn = 0

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        if len(pending) == 1:  # a quiet turn: signed on its own, and so are the next
            self._batching = False
            body, done = pending[0]
            done.settle((self._signer.sign_body(body), None))
            return
        proofs = self._signer.sign_batch([body for body, _ in pending])
        for (body, done), proof in zip(pending, proofs, strict=True):
            done.settle((body, proof))
