"""Batched signatures' Merkle trees (docs/protocol.md, "Batched signatures").

A daemon that signs many lease tokens at once signs one statement over the root of a
Merkle tree whose leaves are the tokens' payloads, and gives each token its leaf's index
and audit path. The tree is RFC 6962's (section 2.1): SHA-256, a leaf hashed as
`0x00 || data`, an inner node as `0x01 || left || right` (so no leaf can pass for a
node), and a tree of n > 1 leaves split at the largest power of two below n. Proofs
are checked as RFC 9162 section 2.1.3.2 says. The signed message is `batch_message`:
its domain prefix makes it unlike any statement's payload (a msgpack map), so a batch
signature can never be taken for a statement's. Pure functions, no keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from .errors import TokenInvalid

#: What a batch signature signs, before the tree's size and root.
BATCH_DOMAIN = b"licd-batch-v1\x00"
HASH_LEN = 32
#: The longest audit path a reply may carry: a tree of up to 2**64 leaves.
MAX_PATH = 64


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def batch_message(size: int, root: bytes) -> bytes:
    """The bytes a batch signature signs: the domain, the leaf count (8 bytes, big-endian)
    and the root."""
    return BATCH_DOMAIN + struct.pack(">Q", size) + root


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root of the tree over `leaves` (their data, hashed here) and each leaf's audit
    path, nearest sibling first. At least one leaf."""
    if not leaves:
        raise ValueError("a tree needs at least one leaf")
    return _tree([leaf_hash(x) for x in leaves])


def _tree(hashes: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    if len(hashes) == 1:
        return hashes[0], [[]]
    split = 1 << ((len(hashes) - 1).bit_length() - 1)  # the largest power of two below
    left, left_paths = _tree(hashes[:split])
    right, right_paths = _tree(hashes[split:])
    paths = [p + [right] for p in left_paths] + [p + [left] for p in right_paths]
    return node_hash(left, right), paths


def root_from_path(data: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root the audit path `path` leads to from leaf `index` (with data `data`) of a
    tree of `size` leaves; TokenInvalid when the path cannot belong to such a tree."""
    if not 0 <= index < size:
        raise TokenInvalid("batch: the leaf index is outside the tree")
    if len(path) > MAX_PATH:
        raise TokenInvalid(f"batch: an audit path has at most {MAX_PATH} hashes")
    fn, sn = index, size - 1
    result = leaf_hash(data)
    for sibling in path:
        if len(sibling) != HASH_LEN or sn == 0:
            raise TokenInvalid("batch: the audit path does not fit the tree")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TokenInvalid("batch: the audit path does not fit the tree")
    return result
