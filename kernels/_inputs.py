"""Checks and zero-copy views of batch inputs, shared by every backend.

Every public kernel validates its inputs here before any backend sees them, so a malformed
batch is a ``ValueError`` naming the problem, never a wrong digest or an out-of-bounds read.
"""

from __future__ import annotations

from typing import TypeAlias, cast

import numpy as np
import pyarrow as pa

Messages: TypeAlias = pa.Array | pa.ChunkedArray | tuple[np.ndarray, np.ndarray]


def _fixed_view(arr: pa.FixedSizeBinaryArray) -> np.ndarray:
    width = arr.type.byte_width
    data = arr.buffers()[1]
    flat = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    if width == 0:
        return flat[:0]
    return flat[: len(flat) // width * width].reshape(-1, width)[arr.offset : arr.offset + len(arr)]


def check_offsets(offsets: np.ndarray, size: int, name: str = "offsets") -> None:
    """Offsets must be ``n + 1`` non-decreasing positions inside a buffer of ``size`` bytes."""
    if not isinstance(offsets, np.ndarray) or offsets.dtype not in (np.int32, np.int64):
        got = offsets.dtype if isinstance(offsets, np.ndarray) else type(offsets).__name__
        raise ValueError(f"{name} must be an int32 or int64 numpy array, got {got}")
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError(f"{name} must be one-dimensional with n + 1 entries")
    if not offsets.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    if int(offsets[0]) < 0 or int(offsets.min()) < 0:
        raise ValueError(f"{name} must not be negative")
    if int(offsets[-1]) > size or int(offsets.max()) > size:
        raise ValueError(f"{name} point past the end of the {size}-byte values buffer")
    if len(offsets) > 1 and bool(np.any(offsets[1:] < offsets[:-1])):
        raise ValueError(f"{name} must be non-decreasing")


def message_buffers(messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """``(values uint8, offsets)`` of a batch, validated, offsets in their own int32/int64 type.

    Accepts a ``pyarrow`` Binary/LargeBinary/FixedSizeBinary array (or chunked array) without
    nulls, or a ``(values, offsets)`` pair of C-contiguous numpy arrays. Arrow buffers are viewed,
    not copied (a chunked array is combined first).
    """
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    if isinstance(messages, pa.Array):
        if messages.null_count:
            raise ValueError("messages contain nulls")
        n = len(messages)
        if pa.types.is_fixed_size_binary(messages.type):
            width = messages.type.byte_width
            rows = _fixed_view(messages)
            if width and len(rows) != n:
                raise ValueError("fixed-size binary array is shorter than its length")
            values = np.ascontiguousarray(rows).reshape(-1)
            return values, np.arange(n + 1, dtype=np.int64) * width
        if pa.types.is_binary(messages.type) or pa.types.is_large_binary(messages.type):
            odt = np.int32 if pa.types.is_binary(messages.type) else np.int64
            bufs = messages.buffers()
            offsets = np.frombuffer(bufs[1], odt)[messages.offset : messages.offset + n + 1]
            if len(offsets) != n + 1:
                raise ValueError("binary array offsets are shorter than its length")
            values = (
                np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
            )
            check_offsets(offsets, len(values))
            return values, offsets
        raise ValueError(f"unsupported message array type {messages.type}")
    if not (isinstance(messages, tuple) and len(messages) == 2):
        raise ValueError("messages must be an Arrow binary array or a (values, offsets) pair")
    values, offsets = messages
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8 or values.ndim != 1:
        got = (
            f"{values.dtype} array of {values.ndim} dimensions"
            if isinstance(values, np.ndarray)
            else type(values).__name__
        )
        raise ValueError(f"values must be a one-dimensional uint8 numpy array, got {got}")
    if not values.flags.c_contiguous:
        raise ValueError("values must be contiguous")
    check_offsets(offsets, len(values))
    return values, offsets


def as_offsets_and_values(messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(values uint8, offsets int64 of length n + 1)`` views of a message batch.

    Accepts a ``pyarrow`` Binary/LargeBinary/FixedSizeBinary array (without nulls) or a
    ``(values, offsets)`` pair. Nothing is copied where Arrow's buffers can be viewed directly
    (int32 offsets are widened).
    """
    values, offsets = message_buffers(messages)
    return values, offsets.astype(np.int64, copy=False)


def check_rows(arr: object, name: str, width: int | None = None) -> np.ndarray:
    """``arr`` as a C-contiguous ``(n, width) uint8`` array, else a ``ValueError`` saying why.

    A strided block of rows is copied (rows are small and already laid out column-wise by their
    builders); flat message buffers, by contrast, must be contiguous (see ``message_buffers``).
    """
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be two-dimensional (n, width), got shape {arr.shape}")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{name} must have shape (n, {width}), got {arr.shape}")
    return np.ascontiguousarray(arr)


def byte_rows(rows: np.ndarray) -> list[bytes]:
    """Each row of an ``(n, width) uint8`` array as ``bytes``: numpy builds them in C, much
    cheaper than slicing a buffer once per row (a strided array is copied first)."""
    rows = np.ascontiguousarray(rows)
    if rows.shape[1] == 0:
        return [b""] * rows.shape[0]
    return cast("list[bytes]", rows.view(np.dtype((np.void, rows.shape[1]))).ravel().tolist())


def fixed_width(values: np.ndarray, offsets: np.ndarray) -> int | None:
    """The common length of every message, or ``None`` when lengths differ (or n == 0)."""
    n = len(offsets) - 1
    if n == 0:
        return None
    total = int(offsets[-1]) - int(offsets[0])
    if total % n:
        return None
    width = total // n
    start = int(offsets[0])
    if width == 0:
        # Non-decreasing offsets with equal ends: every message is empty.
        return 0
    expected = np.arange(start, start + (n + 1) * width, width, dtype=np.int64)
    return width if np.array_equal(offsets, expected) else None
