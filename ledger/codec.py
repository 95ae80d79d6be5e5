"""Canonical fixed-layout binary encoding: big-endian integers and fixed-width byte fields.

Everything that is hashed or signed (transactions, block headers, quorum certificates) is
encoded with these helpers, so every validator derives identical bytes. ``Reader`` raises a
precise ``DecodeError`` subclass at the field that fails.
"""

from __future__ import annotations

import struct

import numpy as np

from rayledger.errors import DecodeError, TrailingBytes, TruncatedInput, WrongLength

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def u8(v: int) -> bytes:
    return _U8.pack(v)


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def fixed(value: bytes, width: int, name: str) -> bytes:
    """A fixed-width byte field; the wrong width is a ``WrongLength`` naming the field."""
    if len(value) != width:
        raise WrongLength(f"{name} must be {width} bytes, got {len(value)}")
    return bytes(value)


def var_bytes(value: bytes) -> bytes:
    """A u32 length prefix followed by the bytes."""
    return _U32.pack(len(value)) + bytes(value)


class Reader:
    """Sequential reader over one encoded value; call ``finish`` to reject trailing bytes."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        view = memoryview(data)
        if view.format not in ("B", "b", "c") or view.ndim != 1:
            # Offsets below count bytes: a buffer of wider items (an array of u32) is bytes too
            try:
                view = view.cast("B")
            except TypeError:
                raise DecodeError(f"{what}: not a contiguous byte buffer") from None
        self._data = view
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise TruncatedInput(
                f"{self._what}: truncated in {field} (need {n} bytes at offset {self._pos}, "
                f"have {len(self._data) - self._pos})"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, field: str) -> int:
        return int(_U8.unpack(self._take(1, field))[0])

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(_U64.unpack(self._take(8, field))[0])

    def fixed(self, n: int, field: str) -> bytes:
        return bytes(self._take(n, field))

    def var_bytes(self, field: str, max_len: int | None = None) -> bytes:
        n = self.u32(f"{field} length")
        if max_len is not None and n > max_len:
            raise WrongLength(f"{self._what}: {field} of {n} bytes exceeds {max_len}")
        return self.fixed(n, field)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise TrailingBytes(
                f"{self._what}: {self.remaining} trailing bytes after offset {self._pos}"
            )


def pack_rows(
    head: np.ndarray, tail_values: np.ndarray, tail_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lay out row i as ``head[i] || tail_i`` end to end, column-wise (no per-row Python).

    ``head`` is ``(n, k) uint8``; tail i is ``tail_values[tail_offsets[i]:tail_offsets[i+1]]``.
    Returns ``(values uint8, offsets int64 of length n + 1)``.
    """
    n, k = head.shape
    lens = np.diff(tail_offsets)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lens + k, out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint8)
    out[(offsets[:-1, None] + np.arange(k)).reshape(-1)] = head.reshape(-1)
    total = int(lens.sum())
    if total:
        first = int(tail_offsets[0])
        shift = offsets[:-1] + k - (tail_offsets[:-1] - first)
        out[np.repeat(shift, lens) + np.arange(total)] = tail_values[first : first + total]
    return out, offsets
