"""Tests for rayledger.merkle against a recursive RFC 6962 reference and published vectors."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayledger.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    consistency_proof_from_levels,
    hash_children,
    hash_leaf,
    inclusion_proof,
    inclusion_proof_from_levels,
    merkle_levels,
    merkle_levels_of_leaf_hashes,
    merkle_root,
    merkle_root_of_leaf_hashes,
    root_from_levels,
    verify_consistency,
    verify_inclusion,
    verify_inclusion_hash,
)

# ---------------------------------------------------------------------------
# Reference implementation: RFC 6962 section 2.1 written recursively, as in the RFC text.
# ---------------------------------------------------------------------------


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _sha(b"")
    if n == 1:
        return _sha(b"\x00" + d[0])
    k = _split(n)
    return _sha(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _split(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    if m == 0 or m == len(d):
        return []
    return ref_subproof(m, d, True)


def ref_shape(m: int, n: int) -> tuple[str, ...]:
    """Sides of the audit path elements (leaf upward) for leaf m of a tree of size n."""
    if n == 1:
        return ()
    k = _split(n)
    if m < k:
        return ref_shape(m, k) + ("R",)
    return ref_shape(m - k, n - k) + ("L",)


def make_leaves(n: int, tag: str = "tx") -> list[bytes]:
    return [_sha(f"{tag}:{i}".encode()) for i in range(n)]


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    buf = bytearray(data)
    buf[pos % len(buf)] ^= mask
    return bytes(buf)


# Roots of trees of 0..300 leaves, computed once with the reference.
LEAVES_300 = make_leaves(300)
REF_ROOTS = [ref_mth(LEAVES_300[:n]) for n in range(301)]

# ---------------------------------------------------------------------------
# Published RFC 6962 vectors (certificate-transparency / trillian merkle tests).
# ---------------------------------------------------------------------------

CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]

CT_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}

# (index (0-based), tree size, audit path)
CT_INCLUSION = [
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

# (old size, new size, consistency proof)
CT_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def _unhex(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


class TestVectors:
    def test_empty_root(self) -> None:
        expected = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        assert EMPTY_ROOT.hex() == expected
        assert merkle_root([]).hex() == expected
        assert merkle_root(np.zeros((0, 32), dtype=np.uint8)).hex() == expected
        assert ref_mth([]).hex() == expected

    @pytest.mark.parametrize("size", sorted(CT_ROOTS))
    def test_ct_prefix_roots(self, size: int) -> None:
        assert ref_mth(CT_LEAVES[:size]).hex() == CT_ROOTS[size]
        assert merkle_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size]

    @pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
    def test_ct_inclusion(self, index: int, size: int, path: list[str]) -> None:
        leaves = CT_LEAVES[:size]
        expected = _unhex(path)
        assert ref_path(index, leaves) == expected
        assert inclusion_proof(leaves, index) == expected
        root = bytes.fromhex(CT_ROOTS[size])
        assert verify_inclusion(leaves[index], index, size, expected, root)

    @pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
    def test_ct_consistency(self, old: int, new: int, proof: list[str]) -> None:
        leaves = CT_LEAVES[:new]
        expected = _unhex(proof)
        assert ref_proof(old, leaves) == expected
        assert consistency_proof(leaves, old) == expected
        old_root, new_root = bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new])
        assert verify_consistency(old, new, old_root, new_root, expected)

    def test_hash_primitives(self) -> None:
        assert hash_leaf(b"abc") == _sha(b"\x00abc")
        left, right = _sha(b"l"), _sha(b"r")
        assert hash_children(left, right) == _sha(b"\x01" + left + right)
        assert merkle_root([b"abc"]) == hash_leaf(b"abc")


# ---------------------------------------------------------------------------
# Roots and levels
# ---------------------------------------------------------------------------


def test_roots_match_reference_for_sizes_0_to_300() -> None:
    for n in range(301):
        assert merkle_root(LEAVES_300[:n]) == REF_ROOTS[n], n


def test_levels_structure() -> None:
    assert merkle_levels([]) == []
    assert root_from_levels([]) == EMPTY_ROOT
    for n in range(1, 301):
        levels = merkle_levels(LEAVES_300[:n])
        assert levels[0] == [hash_leaf(x) for x in LEAVES_300[:n]]
        assert levels[-1] == [REF_ROOTS[n]]
        assert root_from_levels(levels) == REF_ROOTS[n]
        for lower, upper in zip(levels, levels[1:], strict=False):
            assert len(upper) == (len(lower) + 1) // 2
        assert len(levels) == (n - 1).bit_length() + 1


def test_arbitrary_length_leaves() -> None:
    rng = random.Random(7)
    for n in range(0, 70):
        leaves = [rng.randbytes(rng.randrange(0, 100)) for _ in range(n)]
        assert merkle_root(leaves) == ref_mth(leaves)


def test_bytes_like_leaves_accepted() -> None:
    leaves = LEAVES_300[:13]
    assert merkle_root([bytearray(x) for x in leaves]) == REF_ROOTS[13]  # type: ignore[misc]
    assert merkle_root([memoryview(x) for x in leaves]) == REF_ROOTS[13]  # type: ignore[misc]
    assert merkle_root(tuple(leaves)) == REF_ROOTS[13]


def test_single_bytes_object_rejected() -> None:
    with pytest.raises(TypeError):
        merkle_root(b"\x00" * 64)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# numpy input
# ---------------------------------------------------------------------------


class TestNumpy:
    @pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 31, 64, 100, 257])
    def test_array_matches_list(self, n: int) -> None:
        rng = np.random.default_rng(n)
        arr = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
        as_list = [bytes(row) for row in arr]
        assert merkle_root(arr) == merkle_root(as_list) == ref_mth(as_list)
        assert merkle_levels(arr) == merkle_levels(as_list)
        if n:
            i = n // 2
            assert inclusion_proof(arr, i) == inclusion_proof(as_list, i)
            assert consistency_proof(arr, i) == consistency_proof(as_list, i)

    def test_non_contiguous_and_other_widths(self) -> None:
        rng = np.random.default_rng(1)
        base = rng.integers(0, 256, size=(40, 64), dtype=np.uint8)
        strided = base[::2, ::2]
        assert not strided.flags.c_contiguous
        assert merkle_root(strided) == ref_mth([bytes(r) for r in strided])
        fortran = np.asfortranarray(base[:, :32])
        assert merkle_root(fortran) == ref_mth([bytes(r) for r in base[:, :32]])
        wide = base[:, :48]
        assert merkle_root(wide) == ref_mth([bytes(r) for r in wide])
        assert merkle_root(np.zeros((5, 0), dtype=np.uint8)) == ref_mth([b""] * 5)

    def test_bad_arrays_rejected(self) -> None:
        with pytest.raises(ValueError):
            merkle_root(np.zeros((4, 32), dtype=np.int64))
        with pytest.raises(ValueError):
            merkle_root(np.zeros(32, dtype=np.uint8))
        for shape in ((4, 31), (4,), (2, 2, 32)):
            with pytest.raises(ValueError, match="leaf hashes must be"):
                merkle_root_of_leaf_hashes(np.zeros(shape, np.uint8))
            with pytest.raises(ValueError, match="leaf hashes must be"):
                merkle_levels_of_leaf_hashes(np.zeros(shape, np.uint8))


# ---------------------------------------------------------------------------
# Inclusion proofs
# ---------------------------------------------------------------------------


def _inclusion_rejections(leaves: list[bytes], index: int, proof: list[bytes], root: bytes) -> None:
    """Every tampering listed in the module contract makes verification fail."""
    n = len(leaves)
    leaf = leaves[index]
    assert not verify_inclusion(flip(leaf, index), index, n, proof, root)
    assert not verify_inclusion(leaf + b"\x00", index, n, proof, root)
    for j in range(len(proof)):
        bad = list(proof)
        bad[j] = flip(proof[j], index + j, 0x80)
        assert not verify_inclusion(leaf, index, n, bad, root)
        short = list(proof)
        short[j] = proof[j][:31]
        assert not verify_inclusion(leaf, index, n, short, root)
    assert not verify_inclusion(leaf, index, n, proof, flip(root, index))
    assert not verify_inclusion(leaf, index, n, proof, EMPTY_ROOT)
    # Leaves are distinct, so another index gives another sequence of sides.
    for wrong in {index - 1, index + 1, index ^ 1, index ^ 2, n - 1 - index, n, n + 3, -1}:
        if wrong != index:
            assert not verify_inclusion(leaf, wrong, n, proof, root)
    # A different height can never verify.
    for wrong_size in {2 * n, n // 2}:
        if wrong_size != n:
            assert not verify_inclusion(leaf, index, wrong_size, proof, root)
    # A neighbouring size passes only when its audit path has exactly the same shape (the
    # proof does not authenticate the size; the signed tree head does).
    for wrong_size in (n - 1, n + 1, n + 2):
        ok = verify_inclusion(leaf, index, wrong_size, proof, root)
        same_shape = index < wrong_size and ref_shape(index, wrong_size) == ref_shape(index, n)
        assert ok == same_shape
        if wrong_size <= 300 and wrong_size > index:
            assert not verify_inclusion(leaf, index, wrong_size, proof, REF_ROOTS[wrong_size])
    # Truncated and extended proofs.
    if proof:
        assert not verify_inclusion(leaf, index, n, proof[:-1], root)
        assert not verify_inclusion(leaf, index, n, proof[1:], root)
    assert not verify_inclusion(leaf, index, n, [*proof, root], root)
    assert not verify_inclusion(leaf, index, n, [root, *proof], root)
    assert not verify_inclusion(leaf, index, n, [*proof, proof[-1] if proof else root], root)
    assert not verify_inclusion(leaf, index, n, [*proof, b""], root)


def test_inclusion_all_indices_sizes_1_to_64() -> None:
    for n in range(1, 65):
        leaves = LEAVES_300[:n]
        levels = merkle_levels(leaves)
        root = REF_ROOTS[n]
        for i in range(n):
            proof = inclusion_proof_from_levels(levels, i)
            assert proof == ref_path(i, leaves), (n, i)
            assert inclusion_proof(leaves, i) == proof
            assert verify_inclusion(leaves[i], i, n, proof, root)
            assert verify_inclusion_hash(hash_leaf(leaves[i]), i, n, proof, root)
            _inclusion_rejections(leaves, i, proof, root)


def test_inclusion_sampled_sizes_up_to_300() -> None:
    rng = random.Random(300)
    sizes = [65, 127, 128, 129, 255, 256, 257, 299, 300, *rng.sample(range(66, 300), 12)]
    for n in sizes:
        leaves = LEAVES_300[:n]
        levels = merkle_levels(leaves)
        root = REF_ROOTS[n]
        for i in {0, 1, n // 2, n - 2, n - 1, *rng.sample(range(n), 6)}:
            proof = inclusion_proof_from_levels(levels, i)
            assert proof == ref_path(i, leaves), (n, i)
            assert verify_inclusion(leaves[i], i, n, proof, root)
            _inclusion_rejections(leaves, i, proof, root)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 13, 32, 33])
def test_inclusion_every_byte_flip(n: int) -> None:
    leaves = LEAVES_300[:n]
    root = REF_ROOTS[n]
    for i in range(n):
        proof = inclusion_proof(leaves, i)
        for pos in range(32):
            assert not verify_inclusion(flip(leaves[i], pos), i, n, proof, root)
            assert not verify_inclusion(leaves[i], i, n, proof, flip(root, pos))
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = flip(proof[j], pos, 0x10)
                assert not verify_inclusion(leaves[i], i, n, bad, root)


def test_inclusion_proof_index_errors() -> None:
    leaves = LEAVES_300[:10]
    for bad in (-1, 10, 11, 1 << 70):
        with pytest.raises(ValueError):
            inclusion_proof(leaves, bad)
    with pytest.raises(ValueError):
        inclusion_proof([], 0)
    with pytest.raises(ValueError):
        inclusion_proof_from_levels([], 0)


def test_verify_inclusion_never_raises_on_garbage() -> None:
    leaves = LEAVES_300[:6]
    proof = inclusion_proof(leaves, 2)
    root = REF_ROOTS[6]
    leaf = leaves[2]
    assert verify_inclusion(leaf, 2, 6, proof, root)
    assert verify_inclusion(leaf, np.int64(2), np.int64(6), tuple(proof), root)  # type: ignore[arg-type]
    assert verify_inclusion(bytearray(leaf), 2, 6, [bytearray(p) for p in proof], root)  # type: ignore[arg-type, misc]
    garbage: list[tuple[object, object, object, object, object]] = [
        (None, 2, 6, proof, root),
        ("text", 2, 6, proof, root),
        (leaf, 2.0, 6, proof, root),
        (leaf, "2", 6, proof, root),
        (leaf, True, 6, proof, root),
        (leaf, 2, None, proof, root),
        (leaf, 2, 6.0, proof, root),
        (leaf, 6, 6, proof, root),
        (leaf, -1, 6, proof, root),
        (leaf, 2, 0, proof, root),
        (leaf, 2, -6, proof, root),
        (leaf, 2, 6, None, root),
        (leaf, 2, 6, 5, root),
        (leaf, 2, 6, b"".join(proof), root),
        (leaf, 2, 6, [*proof[:-1], None], root),
        (leaf, 2, 6, [*proof[:-1], 7], root),
        (leaf, 2, 6, [*proof[:-1], "x" * 32], root),
        (leaf, 2, 6, [*proof[:-1], proof[-1] + b"\x00"], root),
        (leaf, 2, 6, (p for p in proof), None),
        (leaf, 2, 6, proof, root[:31]),
        (leaf, 2, 6, proof, root + b"\x00"),
        (leaf, 2, 6, proof, root.hex()),
        (leaf, 2, 1 << 200, proof, root),
    ]
    for args in garbage:
        assert verify_inclusion(*args) is False, args  # type: ignore[arg-type]
        if args[0] is leaf:
            assert verify_inclusion_hash(hash_leaf(leaf), *args[1:]) is False, args  # type: ignore[arg-type]

    def exploding() -> object:
        yield proof[0]
        raise RuntimeError("boom")

    assert verify_inclusion(leaf, 2, 6, exploding(), root) is False  # type: ignore[arg-type]
    # A released memoryview (its bytes cannot be read) as the leaf, or in the path
    gone = memoryview(bytearray(leaf))
    gone.release()
    assert verify_inclusion(gone, 2, 6, proof, root) is False
    assert verify_inclusion(leaf, 2, 6, [*proof[:-1], gone], root) is False  # type: ignore[list-item]
    assert verify_inclusion_hash(leaf[:31], 2, 6, proof, root) is False
    assert verify_inclusion_hash(leaf, 0, 1, [], leaf) is True  # any 32-byte leaf hash


# ---------------------------------------------------------------------------
# Consistency proofs
# ---------------------------------------------------------------------------


def _consistency_rejections(m: int, n: int, proof: list[bytes]) -> None:
    old_root, new_root = REF_ROOTS[m], REF_ROOTS[n]
    for j in range(len(proof)):
        bad = list(proof)
        bad[j] = flip(proof[j], m + n + j, 0x40)
        assert not verify_consistency(m, n, old_root, new_root, bad)
    assert not verify_consistency(m, n, flip(old_root, m), new_root, proof)
    assert not verify_consistency(m, n, old_root, flip(new_root, n), proof)
    assert not verify_consistency(m, n, new_root, old_root, proof)
    assert not verify_consistency(n, m, old_root, new_root, proof)
    assert not verify_consistency(n, m, new_root, old_root, proof)
    assert not verify_consistency(m, n, old_root, new_root, [])
    assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
    assert not verify_consistency(m, n, old_root, new_root, proof[1:])
    for extra in (old_root, new_root, proof[0], b"\x00" * 32):
        assert not verify_consistency(m, n, old_root, new_root, [*proof, extra])
        assert not verify_consistency(m, n, old_root, new_root, [extra, *proof])
    assert not verify_consistency(m, n, old_root, new_root, [*proof, b""])
    # The probes of the transparency-dev verifier tests: wrong old size or a new size of a
    # different height.
    for wrong_m, wrong_n in ((m - 1, n), (m + 1, n), (m ^ 2, n), (m, 2 * n), (m, n // 2)):
        if (wrong_m, wrong_n) != (m, n):
            assert not verify_consistency(wrong_m, wrong_n, old_root, new_root, proof)


def test_consistency_all_pairs_up_to_40() -> None:
    for n in range(41):
        leaves = LEAVES_300[:n]
        levels = merkle_levels(leaves)
        for m in range(n + 1):
            proof = consistency_proof_from_levels(levels, m)
            assert proof == ref_proof(m, leaves), (m, n)
            assert consistency_proof(leaves, m) == proof
            assert verify_consistency(m, n, REF_ROOTS[m], REF_ROOTS[n], proof), (m, n)
            if 0 < m < n:
                _consistency_rejections(m, n, proof)


def test_consistency_sampled_pairs_up_to_300() -> None:
    rng = random.Random(41)
    pairs = [(1, 300), (128, 256), (256, 257), (255, 256), (299, 300), (150, 300), (64, 300)]
    pairs += [tuple(sorted(rng.sample(range(1, 301), 2))) for _ in range(40)]  # type: ignore[misc]
    level_cache: dict[int, list[list[bytes]]] = {}
    for m, n in pairs:
        leaves = LEAVES_300[:n]
        levels = level_cache.setdefault(n, merkle_levels(leaves))
        proof = consistency_proof_from_levels(levels, m)
        assert proof == ref_proof(m, leaves), (m, n)
        assert verify_consistency(m, n, REF_ROOTS[m], REF_ROOTS[n], proof), (m, n)
        if m < n:
            _consistency_rejections(m, n, proof)


@pytest.mark.parametrize(("m", "n"), [(1, 2), (3, 7), (4, 8), (6, 8), (5, 13), (16, 33)])
def test_consistency_every_byte_flip(m: int, n: int) -> None:
    proof = consistency_proof(LEAVES_300[:n], m)
    old_root, new_root = REF_ROOTS[m], REF_ROOTS[n]
    for pos in range(32):
        assert not verify_consistency(m, n, flip(old_root, pos), new_root, proof)
        assert not verify_consistency(m, n, old_root, flip(new_root, pos), proof)
        for j in range(len(proof)):
            bad = list(proof)
            bad[j] = flip(proof[j], pos, 0x02)
            assert not verify_consistency(m, n, old_root, new_root, bad)


def test_consistency_trivial_cases() -> None:
    root = REF_ROOTS[5]
    assert verify_consistency(5, 5, root, root, [])
    assert not verify_consistency(5, 5, root, flip(root, 3), [])
    assert not verify_consistency(5, 5, root, root, [root])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, root, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, root, [root])
    assert not verify_consistency(0, 5, flip(EMPTY_ROOT, 0), root, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, root[:31], [])
    assert consistency_proof([], 0) == []
    assert consistency_proof(LEAVES_300[:5], 0) == []
    assert consistency_proof(LEAVES_300[:5], 5) == []


def test_consistency_proof_size_errors() -> None:
    leaves = LEAVES_300[:10]
    for bad in (-1, 11, 100):
        with pytest.raises(ValueError):
            consistency_proof(leaves, bad)
    with pytest.raises(ValueError):
        consistency_proof([], 1)


def test_verify_consistency_never_raises_on_garbage() -> None:
    proof = consistency_proof(LEAVES_300[:8], 6)
    old, new = REF_ROOTS[6], REF_ROOTS[8]
    assert verify_consistency(6, 8, old, new, proof)
    assert verify_consistency(np.int64(6), np.int64(8), old, new, tuple(proof))  # type: ignore[arg-type]
    garbage: list[tuple[object, object, object, object, object]] = [
        (None, 8, old, new, proof),
        (6, None, old, new, proof),
        (6.0, 8, old, new, proof),
        (6, "8", old, new, proof),
        (-1, 8, old, new, proof),
        (6, -8, old, new, proof),
        (9, 8, old, new, proof),
        (6, 8, None, new, proof),
        (6, 8, old, None, proof),
        (6, 8, old[:31], new, proof),
        (6, 8, old, new + b"\x00", proof),
        (6, 8, old.hex(), new, proof),
        (6, 8, old, new, None),
        (6, 8, old, new, 3),
        (6, 8, old, new, b"".join(proof)),
        (6, 8, old, new, [*proof[:-1], None]),
        (6, 8, old, new, [*proof[:-1], proof[-1][:31]]),
        (6, 1 << 200, old, new, proof),
        (1 << 199, 1 << 200, old, new, proof),
    ]
    for args in garbage:
        assert verify_consistency(*args) is False, args  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

leaf_lists = st.lists(st.binary(max_size=40), min_size=0, max_size=70)
_hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(leaf_lists)
def test_property_root_matches_reference(leaves: list[bytes]) -> None:
    assert merkle_root(leaves) == ref_mth(leaves)
    levels = merkle_levels(leaves)
    assert root_from_levels(levels) == ref_mth(leaves)


@_hyp
@given(leaf_lists.filter(bool), st.data())
def test_property_inclusion(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1), label="index")
    proof = inclusion_proof(leaves, i)
    assert proof == ref_path(i, leaves)
    root = ref_mth(leaves)
    assert verify_inclusion(leaves[i], i, n, proof, root)
    assert not verify_inclusion(leaves[i] + b"!", i, n, proof, root)


@_hyp
@given(leaf_lists, st.data())
def test_property_consistency(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    m = data.draw(st.integers(0, n), label="old_size")
    proof = consistency_proof(leaves, m)
    assert proof == ref_proof(m, leaves)
    old_root, new_root = ref_mth(leaves[:m]), ref_mth(leaves)
    assert verify_consistency(m, n, old_root, new_root, proof)
    if 0 < m < n:
        assert not verify_consistency(m, n, flip(old_root, m), new_root, proof)
        assert not verify_consistency(m, n, old_root, flip(new_root, n), proof)
