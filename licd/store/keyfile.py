"""The daemon's key file: its Ed25519 signing key, kept in the state directory.

Created on the daemon's first start and read by every later one (and by `licd key show`).
The file holds the 32-byte seed as 64 hex digits and a newline, mode 0600, written once
with O_EXCL (two starting daemons cannot overwrite each other's key) and fsynced before
the daemon uses it. What the key signs is `licd.core.keys`'s business.
"""

from __future__ import annotations

import os
from pathlib import Path

from nacl.signing import SigningKey

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
