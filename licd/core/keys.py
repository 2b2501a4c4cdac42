"""The daemon's Ed25519 key: created on first start, kept in the state directory, and
used to sign every lease token (docs/protocol.md section 4).

The key file holds the 32-byte seed as 64 hex digits, mode 0600, written once with
O_EXCL so two starting daemons cannot overwrite each other's key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from licd.engine import Grant
from licd_client import tokens

KEY_FILE = "daemon.key"


class KeyFileError(Exception):
    """The key file is missing, unreadable or malformed."""


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def load_key(path: Path) -> SigningKey:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no daemon key yet; start the daemon once to create it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the daemon key: {exc}") from None
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise KeyFileError(f"{path}: not a daemon key (expected 64 hex digits)")
    return SigningKey(seed)


def load_or_create_key(path: Path) -> SigningKey:
    """The key at `path`, generated (mode 0600) if there is none yet."""
    if not path.exists():
        key = SigningKey.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_key(path)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(bytes(key).hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return key
    return load_key(path)


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

    def lease_token(self, grant: Grant, nonce: bytes, now: float) -> bytes:
        lease, licence = grant.lease, grant.licence
        holder = lease.holder
        payload: dict[str, Any] = {
            "typ": "lease",
            "iss": self.public,
            "iat": max(now, self.chain_iat.get(lease.licence_id, now)),
            "exp": lease.expires,
            "lid": lease.handle,
            "lic": licence.id,
            "product": licence.product,
            "seats": lease.seats,
            "features": grant.features,
            "holder": {"host": holder.host, "hostid": holder.hostid, "user": holder.user},
            "nonce": nonce,
            "site": self.site,
        }
        if lease.delegate is not None:
            payload["del"] = lease.delegate
        if lease.overdraft:
            payload["ovr"] = True  # granted beyond the licence's seats, within its overdraft
        return tokens.sign(self._key, payload)
