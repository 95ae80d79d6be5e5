"""Batch SHA-256 over variable-length messages held in one contiguous buffer."""

from __future__ import annotations

import hashlib
from typing import TypeAlias

import numpy as np
import pyarrow as pa

from rayledger.kernels._backend import resolve_backend

Messages: TypeAlias = pa.Array | tuple[np.ndarray, np.ndarray]


def _fixed_view(arr: pa.FixedSizeBinaryArray) -> np.ndarray:
    width = arr.type.byte_width
    data = arr.buffers()[1]
    flat = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    return flat.reshape(-1, width)[arr.offset : arr.offset + len(arr)] if width else flat[:0]


def as_offsets_and_values(messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(values uint8, offsets int64 of length n + 1)`` views of a message batch.

    Accepts a ``pyarrow`` Binary/LargeBinary/FixedSizeBinary array (without nulls) or a
    ``(values, offsets)`` pair. Nothing is copied where Arrow's buffers can be viewed directly.
    """
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    if isinstance(messages, pa.Array):
        if messages.null_count:
            raise ValueError("messages contain nulls")
        n = len(messages)
        if pa.types.is_fixed_size_binary(messages.type):
            width = messages.type.byte_width
            values = _fixed_view(messages).reshape(-1)
            return values, np.arange(n + 1, dtype=np.int64) * width
        if pa.types.is_binary(messages.type) or pa.types.is_large_binary(messages.type):
            odt = np.int32 if pa.types.is_binary(messages.type) else np.int64
            bufs = messages.buffers()
            offsets = np.frombuffer(bufs[1], odt)[messages.offset : messages.offset + n + 1]
            values = (
                np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
            )
            return values, offsets.astype(np.int64, copy=False)
        raise ValueError(f"unsupported message array type {messages.type}")
    if not (isinstance(messages, tuple) and len(messages) == 2):
        raise ValueError("messages must be an Arrow binary array or a (values, offsets) pair")
    values, offsets = messages
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8 or values.ndim != 1:
        raise ValueError("values must be a one-dimensional uint8 numpy array")
    if not values.flags.c_contiguous:
        raise ValueError("values must be contiguous")
    if not isinstance(offsets, np.ndarray) or offsets.dtype not in (np.int32, np.int64):
        raise ValueError("offsets must be an int32 or int64 numpy array")
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError("offsets must be one-dimensional with n + 1 entries")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] < 0 or offsets[-1] > len(values):
        raise ValueError("offsets point outside the values buffer")
    if len(offsets) > 1 and bool(np.any(np.diff(offsets) < 0)):
        raise ValueError("offsets must be non-decreasing")
    return values, offsets


def _sha256_cpu(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    view = values.data
    sha = hashlib.sha256
    bounds = offsets.tolist()
    digests = b"".join(
        [sha(view[bounds[i] : bounds[i + 1]]).digest() for i in range(len(bounds) - 1)]
    )
    return np.frombuffer(digests, np.uint8).reshape(-1, 32)


def sha256_batch(messages: Messages, backend: str = "auto") -> np.ndarray:
    """SHA-256 of every message in the batch, as an ``(n, 32) uint8`` array."""
    resolve_backend(backend)
    values, offsets = as_offsets_and_values(messages)
    if len(offsets) == 1:
        return np.empty((0, 32), np.uint8)
    return _sha256_cpu(values, offsets)


def sha256_rows(
    head: np.ndarray, tail: Messages | None = None, backend: str = "auto"
) -> np.ndarray:
    """SHA-256 of ``head[i] || tail[i]`` for every row, as an ``(n, 32) uint8`` array.

    ``head`` is a fixed-width ``(n, k) uint8`` block of per-row prefixes (a header built
    column-wise); ``tail`` holds the variable-length rest. This hashes records whose layout is
    "fixed header then payload" without first packing them into one buffer.
    """
    resolve_backend(backend)
    if not isinstance(head, np.ndarray) or head.dtype != np.uint8 or head.ndim != 2:
        raise ValueError("head must be a two-dimensional uint8 numpy array")
    n, k = head.shape
    sha = hashlib.sha256
    heads = np.ascontiguousarray(head).tobytes()
    if tail is None:
        digests = b"".join([sha(heads[i : i + k]).digest() for i in range(0, n * k, k)])
    else:
        values, offsets = as_offsets_and_values(tail)
        if len(offsets) != n + 1:
            raise ValueError(f"head has {n} rows but tail has {len(offsets) - 1}")
        view = values.data
        b = offsets.tolist()
        digests = b"".join(
            [sha(heads[i * k : (i + 1) * k] + view[b[i] : b[i + 1]]).digest() for i in range(n)]
        )
    return np.frombuffer(digests, np.uint8).reshape(n, 32)
