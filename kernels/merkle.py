"""RFC 6962 Merkle trees over batches of 32-byte leaves, level by level.

The same tree as ``rayledger.merkle`` (leaf ``SHA-256(0x00 || leaf)``, node
``SHA-256(0x01 || left || right)``, an unpaired last node carried up unchanged, which is the
RFC's largest-power-of-two split), built here without importing the ledger so that ``kernels``
stays the ground floor. On the ``cuda`` backend the whole tree is built on the device.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rayledger.kernels._backend import for_batch, resolve_backend
from rayledger.kernels._cpu import hash_batch
from rayledger.kernels._inputs import check_rows

__all__ = [
    "EMPTY_ROOT",
    "merkle_levels",
    "merkle_levels_of_leaf_hashes",
    "merkle_root",
    "merkle_root_of_leaf_hashes",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()


def _leaf_hashes(leaves: np.ndarray) -> np.ndarray:
    rows = np.empty((len(leaves), 33), np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = leaves
    return hash_batch("sha256", rows)


def _parents(level: np.ndarray) -> np.ndarray:
    pairs = len(level) // 2
    rows = np.empty((pairs, 65), np.uint8)
    rows[:, 0] = 1
    rows[:, 1:] = level[: 2 * pairs].reshape(pairs, 64)
    parents = hash_batch("sha256", rows)
    if len(level) & 1:
        # The unpaired last node moves up unchanged (RFC 6962's split at the largest power of 2).
        parents = np.concatenate([parents, level[-1:]])
    return parents


def merkle_levels(leaves: np.ndarray, backend: str = "auto") -> list[np.ndarray]:
    """Every level of the tree over ``leaves`` (``(n, 32) uint8``), leaf hashes first.

    Level 0 holds the ``(n, 32)`` leaf hashes and the last level is the ``(1, 32)`` root; an
    empty tree has no levels and returns ``[]`` (its root, ``EMPTY_ROOT``, is not a node).
    """
    chosen = resolve_backend(backend)
    leaves = check_rows(leaves, "leaves", 32)
    if len(leaves) == 0:
        return []
    if for_batch(backend, chosen, len(leaves), "hash") == "cuda":
        from rayledger.kernels import _cuda

        return _cuda.merkle_levels(leaves)
    levels = [_leaf_hashes(leaves)]
    while len(levels[-1]) > 1:
        levels.append(_parents(levels[-1]))
    return levels


def merkle_root(leaves: np.ndarray, backend: str = "auto") -> bytes:
    """RFC 6962 Merkle tree hash of ``leaves`` (``(n, 32) uint8``); ``SHA-256(b"")`` for none."""
    chosen = resolve_backend(backend)
    leaves = check_rows(leaves, "leaves", 32)
    if len(leaves) == 0:
        return EMPTY_ROOT
    if for_batch(backend, chosen, len(leaves), "hash") == "cuda":
        from rayledger.kernels import _cuda

        return _cuda.merkle_root(leaves)
    level = _leaf_hashes(leaves)
    while len(level) > 1:
        level = _parents(level)
    return level[0].tobytes()


def merkle_levels_of_leaf_hashes(leaf_hashes: np.ndarray) -> list[np.ndarray]:
    """``merkle_levels`` over leaves already hashed (``(n, 32) uint8``, level 0 as given), the
    levels above hashed on the CPU backend, one batch per level."""
    level = check_rows(leaf_hashes, "leaf_hashes", 32)
    if len(level) == 0:
        return []
    levels = [level]
    while len(levels[-1]) > 1:
        levels.append(_parents(levels[-1]))
    return levels


def merkle_root_of_leaf_hashes(leaf_hashes: np.ndarray) -> bytes:
    """The root over leaves already hashed (``SHA-256(0x00 || leaf)`` each, as ``(n, 32)
    uint8``), like ``rayledger.merkle.merkle_root_of_leaf_hashes``: the levels above them are
    hashed on the CPU backend, one batch per level (a block's result tree, a few thousand
    nodes: the host computed the leaves and reads the root)."""
    level = check_rows(leaf_hashes, "leaf_hashes", 32)
    if len(level) == 0:
        return EMPTY_ROOT
    while len(level) > 1:
        level = _parents(level)
    return level[0].tobytes()
