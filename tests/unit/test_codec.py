"""Tests for rayledger.codec: the fixed-layout integer/byte helpers, Reader's precise errors,
and pack_rows against a naive per-row concatenation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.codec import Reader, fixed, pack_rows, u8, u16, u32, u64, var_bytes
from rayledger.errors import DecodeError, TrailingBytes, TruncatedInput, WrongLength

_hyp = settings(max_examples=60, deadline=None)


# ---- writers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "fmt", "value"),
    [
        (u8, ">B", 0xAB),
        (u16, ">H", 0xABCD),
        (u32, ">I", 0xDEADBEEF),
        (u64, ">Q", 0x0102030405060708),
    ],
)
def test_integers_are_big_endian(fn, fmt, value: int) -> None:
    assert fn(value) == struct.pack(fmt, value)


@pytest.mark.parametrize(
    ("fn", "bound"), [(u8, 1 << 8), (u16, 1 << 16), (u32, 1 << 32), (u64, 1 << 64)]
)
def test_integers_reject_out_of_range(fn, bound: int) -> None:
    with pytest.raises(struct.error):
        fn(bound)
    with pytest.raises(struct.error):
        fn(-1)


def test_fixed_accepts_exact_width_and_returns_bytes() -> None:
    assert fixed(bytearray(b"abcd"), 4, "f") == b"abcd"
    assert type(fixed(bytearray(b"abcd"), 4, "f")) is bytes


@pytest.mark.parametrize("value", [b"abc", b"abcde", b""])
def test_fixed_wrong_width(value: bytes) -> None:
    with pytest.raises(WrongLength) as exc:
        fixed(value, 4, "field_x")
    assert exc.value.code == "wrong_length"
    assert "field_x" in str(exc.value)


def test_var_bytes_is_u32_length_prefixed() -> None:
    assert var_bytes(b"") == b"\x00\x00\x00\x00"
    assert var_bytes(b"xyz") == b"\x00\x00\x00\x03xyz"


# ---- Reader -------------------------------------------------------------------------------


@given(
    a=st.integers(0, (1 << 8) - 1),
    b=st.integers(0, (1 << 16) - 1),
    c=st.integers(0, (1 << 32) - 1),
    d=st.integers(0, (1 << 64) - 1),
    f=st.binary(min_size=7, max_size=7),
    v=st.binary(max_size=300),
)
@_hyp
def test_reader_round_trip(a: int, b: int, c: int, d: int, f: bytes, v: bytes) -> None:
    data = u8(a) + u16(b) + u32(c) + u64(d) + fixed(f, 7, "f") + var_bytes(v)
    r = Reader(data, "thing")
    assert r.u8("a") == a
    assert r.u16("b") == b
    assert r.u32("c") == c
    assert r.u64("d") == d
    assert r.fixed(7, "f") == f
    assert r.var_bytes("v", max_len=len(v)) == v
    assert r.remaining == 0
    r.finish()


def test_reader_accepts_memoryview() -> None:
    r = Reader(memoryview(b"\x00\x05hello"), "m")
    assert r.u16("n") == 5
    assert r.fixed(5, "s") == b"hello"
    r.finish()


# One layout, cut at every length short of the whole; each cut names the field it falls in.
_LAYOUT = [("a", 1), ("b", 2), ("c", 4), ("d", 8), ("f", 3), ("v length", 4), ("v", 5)]
_DATA = u8(1) + u16(2) + u32(3) + u64(4) + b"fff" + var_bytes(b"vvvvv")


def _read_all(r: Reader) -> None:
    r.u8("a")
    r.u16("b")
    r.u32("c")
    r.u64("d")
    r.fixed(3, "f")
    r.var_bytes("v")


def _field_at(cut: int) -> str:
    pos = 0
    for name, width in _LAYOUT:
        if cut < pos + width:
            return name
        pos += width
    raise AssertionError("cut past the end")


@pytest.mark.parametrize("cut", range(len(_DATA)))
def test_reader_truncated_at_each_field(cut: int) -> None:
    r = Reader(_DATA[:cut], "thing")
    with pytest.raises(TruncatedInput) as exc:
        _read_all(r)
    assert exc.value.code == "truncated"
    assert isinstance(exc.value, DecodeError)
    assert f"truncated in {_field_at(cut)} " in str(exc.value)


def test_reader_full_layout_reads_cleanly() -> None:
    r = Reader(_DATA, "thing")
    _read_all(r)
    r.finish()


@pytest.mark.parametrize("extra", [b"\x00", b"abc"])
def test_reader_finish_rejects_trailing_bytes(extra: bytes) -> None:
    r = Reader(_DATA + extra, "thing")
    _read_all(r)
    assert r.remaining == len(extra)
    with pytest.raises(TrailingBytes) as exc:
        r.finish()
    assert exc.value.code == "trailing_bytes"


def test_reader_finish_rejects_unread_input() -> None:
    r = Reader(b"\x01\x02", "thing")
    r.u8("a")
    with pytest.raises(TrailingBytes):
        r.finish()


def test_reader_fixed_truncated() -> None:
    with pytest.raises(TruncatedInput) as exc:
        Reader(b"abc", "thing").fixed(4, "key")
    assert exc.value.code == "truncated"


def test_reader_var_bytes_max_len() -> None:
    data = var_bytes(b"12345")
    assert Reader(data, "t").var_bytes("v", max_len=5) == b"12345"
    with pytest.raises(WrongLength) as exc:
        Reader(data, "t").var_bytes("v", max_len=4)
    assert exc.value.code == "wrong_length"


def test_reader_var_bytes_max_len_checked_before_reading_body() -> None:
    # Declares 2^32 - 1 bytes with none present: the limit, not truncation, is what fails.
    data = u32(0xFFFFFFFF)
    with pytest.raises(WrongLength):
        Reader(data, "t").var_bytes("v", max_len=1024)
    with pytest.raises(TruncatedInput):
        Reader(data, "t").var_bytes("v")


# ---- pack_rows ----------------------------------------------------------------------------


def _naive_pack(head: np.ndarray, tails: list[bytes]) -> tuple[bytes, list[int]]:
    out = b""
    offsets = [0]
    for i, tail in enumerate(tails):
        out += head[i].tobytes() + tail
        offsets.append(len(out))
    return out, offsets


@st.composite
def _rows(draw: st.DrawFn) -> tuple[np.ndarray, list[bytes], int, int]:
    n = draw(st.integers(0, 12))
    k = draw(st.integers(0, 6))
    head = np.frombuffer(draw(st.binary(min_size=n * k, max_size=n * k)), np.uint8).reshape(n, k)
    tails = draw(st.lists(st.binary(max_size=20), min_size=n, max_size=n))
    prefix = draw(st.integers(0, 10))  # values before the first tail: offsets start above 0
    suffix = draw(st.integers(0, 10))  # values after the last tail
    return head, tails, prefix, suffix


@given(_rows(), st.sampled_from([np.int32, np.int64]))
@_hyp
def test_pack_rows_matches_naive(rows: tuple[np.ndarray, list[bytes], int, int], odt) -> None:
    head, tails, prefix, suffix = rows
    values = np.frombuffer(b"\xee" * prefix + b"".join(tails) + b"\xdd" * suffix, np.uint8)
    offsets = np.array(np.cumsum([prefix, *(len(t) for t in tails)]), dtype=odt)
    got_values, got_offsets = pack_rows(head, values, offsets)
    want_values, want_offsets = _naive_pack(head, tails)
    assert got_values.dtype == np.uint8
    assert got_offsets.dtype == np.int64
    assert got_values.tobytes() == want_values
    assert got_offsets.tolist() == want_offsets


def test_pack_rows_zero_rows() -> None:
    values, offsets = pack_rows(
        np.empty((0, 5), np.uint8), np.empty(0, np.uint8), np.zeros(1, np.int64)
    )
    assert values.size == 0
    assert offsets.tolist() == [0]


def test_pack_rows_zero_rows_sliced_offset() -> None:
    values, offsets = pack_rows(
        np.empty((0, 3), np.uint8), np.arange(10, dtype=np.uint8), np.array([7], np.int64)
    )
    assert values.size == 0
    assert offsets.tolist() == [0]


def test_pack_rows_all_empty_tails() -> None:
    head = np.arange(12, dtype=np.uint8).reshape(4, 3)
    values, offsets = pack_rows(head, np.arange(5, dtype=np.uint8), np.full(5, 2, np.int64))
    assert values.tobytes() == head.tobytes()
    assert offsets.tolist() == [0, 3, 6, 9, 12]


def test_pack_rows_sliced_tails() -> None:
    head = np.array([[1, 1], [2, 2]], np.uint8)
    tail_values = np.frombuffer(b"XXabcdeYY", np.uint8)
    values, offsets = pack_rows(head, tail_values, np.array([2, 4, 7], np.int64))
    assert values.tobytes() == b"\x01\x01ab\x02\x02cde"
    assert offsets.tolist() == [0, 4, 9]
