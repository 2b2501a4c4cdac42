"""A Merkle tree over SHA-256 as RFC 6962 defines it (section 2.1), for the batched-signing
floor (`floor.py`): one signature over the root of a batch of payloads, and each payload's
audit path to that root.

Leaves and nodes are domain-separated: a leaf hashes `0x00 || payload`, a node
`0x01 || left || right`, so no leaf can pass for a node. A tree of n > 1 leaves splits
at k, the largest power of two below n: its left subtree holds the first k leaves. An
audit path lists the sibling hashes from the leaf up to the root. `root_from_path()`
is RFC 9162's verification (section 2.1.3.2). No I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF = b"\x00"
NODE = b"\x01"


def leaf_hash(payload: bytes) -> bytes:
    return hashlib.sha256(LEAF + payload).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE + left + right).digest()


def tree(payloads: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over `payloads` (at least one) and each one's audit path, leaf to root."""
    if not payloads:
        raise ValueError("a Merkle tree needs at least one leaf")
    hashes = [leaf_hash(p) for p in payloads]
    paths: list[list[bytes]] = [[] for _ in payloads]

    def subtree(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return hashes[lo]
        k = 1 << ((hi - lo - 1).bit_length() - 1)  # the largest power of two < hi - lo
        left, right = subtree(lo, lo + k), subtree(lo + k, hi)
        for i in range(lo, lo + k):
            paths[i].append(right)
        for i in range(lo + k, hi):
            paths[i].append(left)
        return node_hash(left, right)

    return subtree(0, len(payloads)), paths


def root_from_path(payload: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that `path` leads to from `payload` at `index` in a tree of `size` leaves,
    or None when the path cannot belong to such a leaf (too long, too short, bad index)."""
    if not 0 <= index < size:
        return None
    fn, sn = index, size - 1
    r = leaf_hash(payload)
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None
