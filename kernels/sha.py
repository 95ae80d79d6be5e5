"""Batch SHA-256 and SHA-512 over many messages held in one contiguous buffer."""

from __future__ import annotations

import numpy as np

from rayledger.kernels._backend import for_batch, resolve_backend
from rayledger.kernels._cpu import hash_batch
from rayledger.kernels._hashproc import DIGEST_SIZES
from rayledger.kernels._inputs import (
    Messages,
    as_offsets_and_values,
    check_rows,
    message_buffers,
)

__all__ = ["Messages", "as_offsets_and_values", "sha256_batch", "sha256_rows", "sha512_batch"]


def _hash_messages(algorithm: str, messages: Messages, backend: str) -> np.ndarray:
    chosen = resolve_backend(backend)
    values, offsets = message_buffers(messages)
    n = len(offsets) - 1
    if n == 0:
        return np.empty((0, DIGEST_SIZES[algorithm]), np.uint8)
    if for_batch(backend, chosen, n, "hash") == "cuda":
        from rayledger.kernels import _cuda

        return _cuda.hash_rows(algorithm, None, values, offsets)
    return hash_batch(algorithm, np.empty((n, 0), np.uint8), (values, offsets))


def sha256_batch(messages: Messages, backend: str = "auto") -> np.ndarray:
    """SHA-256 of every message in the batch, as an ``(n, 32) uint8`` array.

    ``messages`` is a ``pyarrow`` Binary, LargeBinary or FixedSizeBinary array without nulls, or
    a ``(values uint8, offsets int32/int64)`` pair; lengths may differ and may be zero.
    """
    return _hash_messages("sha256", messages, backend)


def sha512_batch(messages: Messages, backend: str = "auto") -> np.ndarray:
    """SHA-512 of every message in the batch, as an ``(n, 64) uint8`` array (inputs as above)."""
    return _hash_messages("sha512", messages, backend)


def sha256_rows(
    head: np.ndarray, tail: Messages | None = None, backend: str = "auto"
) -> np.ndarray:
    """SHA-256 of ``head[i] || tail[i]`` for every row, as an ``(n, 32) uint8`` array.

    ``head`` is an ``(n, k) uint8`` block of per-row prefixes (a header built
    column-wise); ``tail`` holds the variable-length rest. This hashes records whose layout is
    "fixed header then payload" without first packing them into one buffer.
    """
    chosen = resolve_backend(backend)
    head = check_rows(head, "head")
    n = head.shape[0]
    values: np.ndarray | None = None
    offsets: np.ndarray | None = None
    if tail is not None:
        values, offsets = message_buffers(tail)
        if len(offsets) != n + 1:
            raise ValueError(f"head has {n} rows but tail has {len(offsets) - 1} messages")
    if n == 0:
        return np.empty((0, 32), np.uint8)
    if for_batch(backend, chosen, n, "hash") == "cuda":
        from rayledger.kernels import _cuda

        return _cuda.hash_rows("sha256", head, values, offsets)
    rest = None if values is None or offsets is None else (values, offsets)
    return hash_batch("sha256", head, rest)
