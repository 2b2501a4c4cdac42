"""Unit tests of licd_client.merkle: RFC 6962 trees and RFC 9162 inclusion proofs.

The structure is checked against roots computed here by hand (the hashing written out
again, not merkle's) and against the published RFC 6962 test vectors of Certificate
Transparency; every leaf's path of every tree of 1 to 33 leaves must lead to its root,
and any single-bit change to a leaf's data, its path (every bit up to 9 leaves, a sample
of each sibling's bits beyond), its index or the tree's size must be refused: the path
no longer fits, or it leads to another batch message than the one signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack
import pytest

from licd_client import merkle
from licd_client.errors import TokenInvalid


def h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def leaf(data: bytes) -> bytes:
    return h(b"\x00", data)


def node(left: bytes, right: bytes) -> bytes:
    return h(b"\x01", left, right)


def data(n: int) -> list[bytes]:
    """`n` distinct leaves' data."""
    return [b"leaf %d" % i for i in range(n)]


# The RFC 6962 test vectors of Certificate Transparency (as in transparency-dev/merkle,
# testonly/constants.go): eight leaves, the root of each tree of their first n, and
# audit paths as [index, size, path].
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


# ------------------------------------------------------------------ structure


def test_small_trees_by_hand() -> None:
    d = data(7)
    x = [leaf(v) for v in d]
    n01, n23, n45 = node(x[0], x[1]), node(x[2], x[3]), node(x[4], x[5])
    n0123 = node(n01, n23)
    by_hand = {
        1: x[0],
        2: n01,
        3: node(n01, x[2]),  # split at 2: [0, 1] | [2]
        4: n0123,
        5: node(n0123, x[4]),  # split at 4: [0..3] | [4]
        6: node(n0123, n45),
        7: node(n0123, node(n45, x[6])),  # [4..6] splits at 2 again
    }
    for size, root in by_hand.items():
        assert merkle.tree(d[:size])[0] == root, size
    # Paths, nearest sibling first: leaf 4 of 7 climbs past 5, then 6, then [0..3].
    assert merkle.tree(d)[1][4] == [x[5], x[6], n0123]
    assert merkle.tree(d)[1][6] == [n45, n0123]
    assert merkle.tree(d[:5])[1][4] == [n0123]


def test_leaves_and_nodes_are_domain_separated() -> None:
    a, b = leaf(b"a"), leaf(b"b")
    assert merkle.leaf_hash(b"a") == a
    assert merkle.node_hash(a, b) == node(a, b)
    # A node's preimage as a leaf's data gives another hash: no leaf passes for a node.
    assert merkle.leaf_hash(a + b) != merkle.node_hash(a, b)


def test_the_rfc_6962_reference_roots_and_paths() -> None:
    for size in range(1, 9):
        assert merkle.tree(CT_LEAVES[:size])[0].hex() == CT_ROOTS[size - 1], size
    for index, size, path in CT_PATHS:
        assert [p.hex() for p in merkle.tree(CT_LEAVES[:size])[1][index]] == path
        root = merkle.root_from_path(
            CT_LEAVES[index], index, size, [bytes.fromhex(p) for p in path]
        )
        assert root.hex() == CT_ROOTS[size - 1]


def test_a_tree_needs_a_leaf() -> None:
    with pytest.raises(ValueError):
        merkle.tree([])


def test_the_batch_message() -> None:
    root = bytes(range(32))
    message = merkle.batch_message(5, root)
    assert message == b"licd-batch-v1\x00" + bytes(7) + b"\x05" + root
    assert len(merkle.BATCH_DOMAIN) == 14
    # It cannot be read as a statement's payload, a msgpack map: its first byte is a
    # positive fixint, and more follows.
    unpacker = msgpack.Unpacker()
    unpacker.feed(message)
    assert next(unpacker) == ord("l")
    with pytest.raises(msgpack.ExtraData):
        msgpack.unpackb(message)


# --------------------------------------------------------------------- proofs


@pytest.mark.parametrize("size", range(1, 34))
def test_every_leaf_s_path_leads_to_the_root(size: int) -> None:
    d = data(size)
    root, paths = merkle.tree(d)
    assert len(paths) == size
    for index, path in enumerate(paths):
        assert len(path) <= max(1, (size - 1).bit_length())
        assert merkle.root_from_path(d[index], index, size, path) == root


def refused(value: bytes, index: int, size: int, path: Sequence[bytes], signed: bytes) -> bool:
    """A verifier's verdict on a changed proof: the path does not fit the tree, or it
    leads to another batch message than the one signed (the root or the size differs)."""
    try:
        root = merkle.root_from_path(value, index, size, path)
    except TokenInvalid:
        return True
    return merkle.batch_message(size, root) != signed


def flips(blob: bytes, *, every: bool = True) -> list[bytes]:
    """`blob` with each of its bits flipped in turn; unless `every`, only the bits of its
    first and last bytes and one bit of each byte between (the tests' time)."""
    out = []
    for bit in range(8 * len(blob)):
        at = bit // 8
        if every or at in (0, len(blob) - 1) or bit % 8 == at % 8:
            changed = bytearray(blob)
            changed[at] ^= 1 << (bit % 8)
            out.append(bytes(changed))
    return out


@pytest.mark.parametrize("size", range(1, 34))
def test_any_single_bit_change_is_refused(size: int) -> None:
    d = data(size)
    root, paths = merkle.tree(d)
    signed = merkle.batch_message(size, root)
    for index, path in enumerate(paths):
        assert not refused(d[index], index, size, path, signed)
        for value in flips(d[index]):
            assert refused(value, index, size, path, signed), (size, index, "data")
        for i, sibling in enumerate(path):
            for changed in flips(sibling, every=size <= 9):
                forged = [*path[:i], changed, *path[i + 1 :]]
                assert refused(d[index], index, size, forged, signed), (size, index, "path", i)
        for bit in range(64):
            other = index ^ (1 << bit)
            assert refused(d[index], other, size, path, signed), (size, index, "index", bit)
            bigger = size ^ (1 << bit)
            assert refused(d[index], index, bigger, path, signed), (size, index, "size", bit)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 33])
def test_a_path_too_short_or_too_long_does_not_fit(size: int) -> None:
    d = data(size)
    _, paths = merkle.tree(d)
    for index, path in enumerate(paths):
        for wrong in ([*path, bytes(32)], [bytes(32), *path], path[1:], path[:-1]):
            if wrong == path:
                continue  # a path of one tree of size 1 has nothing to drop
            with pytest.raises(TokenInvalid, match="does not fit"):
                merkle.root_from_path(d[index], index, size, wrong)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_a_sibling_that_is_no_hash_does_not_fit(length: int) -> None:
    d = data(3)
    _, paths = merkle.tree(d)
    path = [paths[0][0], bytes(length)]
    with pytest.raises(TokenInvalid, match="does not fit"):
        merkle.root_from_path(d[0], 0, 3, path)


@pytest.mark.parametrize(("index", "size"), [(3, 3), (4, 3), (-1, 3), (0, 0), (0, -1)])
def test_an_index_outside_the_tree(index: int, size: int) -> None:
    with pytest.raises(TokenInvalid, match="outside the tree"):
        merkle.root_from_path(b"x", index, size, [])


def test_the_longest_path() -> None:
    size = 2**64 - 1  # the largest size the batch message can carry
    path = [bytes([i]) * 32 for i in range(merkle.MAX_PATH)]
    merkle.root_from_path(b"x", 0, size, path)  # 64 siblings fit the first leaf
    with pytest.raises(TokenInvalid):  # a 65th does not: no such tree is that deep
        merkle.root_from_path(b"x", 0, size, [*path, bytes(32)])
    # A longer path is refused before any hashing, even for a tree that would need it
    # (whose size no batch message can carry).
    with pytest.raises(TokenInvalid):
        merkle.root_from_path(b"x", 0, 2**70, [bytes(32)] * 70)
