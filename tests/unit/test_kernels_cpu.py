"""Tests for the CPU kernels (rayledger.kernels): batch SHA-256 against hashlib for every input
form, input validation, backend selection, and batch Ed25519 against per-row ``cryptography``
(OpenSSL) verification, including adversarial signatures and the threaded path."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.crypto import key_from_seed, public_bytes
from rayledger.kernels import (
    as_offsets_and_values,
    available_backends,
    ed25519_verify_batch,
    resolve_backend,
    sha256_batch,
    sha256_rows,
)
from rayledger.kernels import ed25519 as ed25519_mod
from rayledger.kernels._backend import ENV_VAR

L = 2**252 + 27742317777372353535851937790883648493  # order of the Ed25519 base point
NO_CUDA = "cuda" not in available_backends()

_hyp = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _digests(messages: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(m).digest() for m in messages]


def _rows(arr: np.ndarray) -> list[bytes]:
    assert arr.dtype == np.uint8
    assert arr.ndim == 2
    assert arr.shape[1] == 32
    return [row.tobytes() for row in arr]


def _pair(messages: list[bytes], odt: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    values = np.frombuffer(b"".join(messages), np.uint8)
    offsets = np.zeros(len(messages) + 1, odt)
    np.cumsum([len(m) for m in messages], out=offsets[1:])
    return values, offsets


_RNG = random.Random(1234)
MESSAGES = [_RNG.randbytes(n) for n in range(301)]  # every length 0..300, one batch
_WANT = _digests(MESSAGES)


# ---- sha256_batch -------------------------------------------------------------------------


@pytest.mark.parametrize("odt", [np.int64, np.int32])
def test_sha256_every_length_offsets_pair(odt: type) -> None:
    assert _rows(sha256_batch(_pair(MESSAGES, odt))) == _WANT


@pytest.mark.parametrize("arrow_type", [pa.binary(), pa.large_binary()])
def test_sha256_every_length_arrow(arrow_type: pa.DataType) -> None:
    arr = pa.array(MESSAGES, arrow_type)
    assert _rows(sha256_batch(arr)) == _WANT
    assert _rows(sha256_batch(arr, backend="cpu")) == _WANT


@pytest.mark.parametrize("arrow_type", [pa.binary(), pa.large_binary()])
@pytest.mark.parametrize(("start", "length"), [(0, 0), (5, 20), (299, 2), (1, 300), (150, 0)])
def test_sha256_sliced_arrow(arrow_type: pa.DataType, start: int, length: int) -> None:
    arr = pa.array(MESSAGES, arrow_type).slice(start, length)
    assert _rows(sha256_batch(arr)) == _WANT[start : start + length]


@pytest.mark.parametrize("width", [0, 1, 32, 64, 100])
def test_sha256_fixed_size_binary(width: int) -> None:
    msgs = [bytes([i]) * width for i in range(17)]
    arr = pa.array(msgs, pa.binary(width))
    assert _rows(sha256_batch(arr)) == _digests(msgs)
    assert _rows(sha256_batch(arr.slice(3, 9))) == _digests(msgs[3:12])
    assert _rows(sha256_batch(arr.slice(17))) == []


def test_sha256_chunked_array() -> None:
    chunked = pa.chunked_array([pa.array(MESSAGES[:10]), pa.array(MESSAGES[10:40])])
    assert _rows(sha256_batch(chunked)) == _WANT[:40]


def test_sha256_pair_with_offsets_above_zero() -> None:
    values, offsets = _pair(MESSAGES[:50])
    padded = np.concatenate([np.full(7, 0xAA, np.uint8), values, np.full(5, 0xBB, np.uint8)])
    assert _rows(sha256_batch((padded, offsets + 7))) == _WANT[:50]
    assert _rows(sha256_batch((padded, (offsets + 7)[10:21]))) == _WANT[10:20]


@given(st.lists(st.binary(max_size=200), max_size=30))
@_hyp
def test_sha256_matches_hashlib(messages: list[bytes]) -> None:
    assert _rows(sha256_batch(_pair(messages))) == _digests(messages)
    assert _rows(sha256_batch(pa.array(messages, pa.binary()))) == _digests(messages)


def test_sha256_large_batches_match_hashlib() -> None:
    # Large enough for the CPU backend to share the rows out (to worker processes where present),
    # with a sliced Arrow array so the shares start at offsets above 0.
    rng = random.Random(7)
    msgs = [rng.randbytes(rng.randrange(0, 160)) for _ in range(20_100)]
    want = _digests(msgs)
    assert _rows(sha256_batch(_pair(msgs))) == want
    assert _rows(sha256_batch(pa.array(msgs).slice(100))) == want[100:]
    head = np.frombuffer(rng.randbytes(20_000 * 5), np.uint8).reshape(-1, 5)
    rows = _digests([head[i].tobytes() + m for i, m in enumerate(msgs[100:])])
    assert _rows(sha256_rows(head, pa.array(msgs).slice(100))) == rows
    assert _rows(sha256_rows(head)) == _digests([row.tobytes() for row in head])


def test_sha256_empty_batches() -> None:
    assert sha256_batch((np.empty(0, np.uint8), np.zeros(1, np.int64))).shape == (0, 32)
    assert sha256_batch(pa.array([], pa.binary())).shape == (0, 32)
    assert sha256_batch(pa.array([], pa.binary(32))).shape == (0, 32)
    assert _rows(sha256_batch((np.empty(0, np.uint8), np.zeros(3, np.int64)))) == _digests(
        [b"", b""]
    )


def test_as_offsets_and_values_is_zero_copy_for_binary() -> None:
    arr = pa.array(MESSAGES[:20], pa.large_binary())
    values, offsets = as_offsets_and_values(arr)
    assert offsets.dtype == np.int64
    assert np.shares_memory(values, np.frombuffer(arr.buffers()[2], np.uint8))


_VALUES = np.arange(10, dtype=np.uint8)


@pytest.mark.parametrize(
    "messages",
    [
        (_VALUES, np.array([0, 5, 3], np.int64)),
        (_VALUES, np.array([0, 11], np.int64)),
        (_VALUES, np.array([-1, 4], np.int64)),
        (_VALUES, np.array([], np.int64)),
        (_VALUES, np.array([[0, 1]], np.int64)),
        (_VALUES, np.array([0, 5], np.uint64)),
        (_VALUES, np.array([0, 5], np.float64)),
        (_VALUES, [0, 5]),
        (_VALUES.astype(np.int8), np.array([0, 5], np.int64)),
        (_VALUES.astype(np.uint16), np.array([0, 5], np.int64)),
        (_VALUES.reshape(2, 5), np.array([0, 5], np.int64)),
        (np.arange(20, dtype=np.uint8)[::2], np.array([0, 5], np.int64)),
        (b"0123456789", np.array([0, 5], np.int64)),
        (_VALUES, np.array([0, 5], np.int64), None),
        [_VALUES, np.array([0, 5], np.int64)],
        pa.array([b"a", None, b"c"], pa.binary()),
        pa.array([b"a", None], pa.binary(1)),
        pa.array(["a", "b"], pa.string()),
        pa.array([1, 2], pa.int32()),
    ],
    ids=[
        "decreasing",
        "past-end",
        "negative-start",
        "no-offsets",
        "2d-offsets",
        "uint64-offsets",
        "float-offsets",
        "list-offsets",
        "int8-values",
        "uint16-values",
        "2d-values",
        "strided-values",
        "bytes-values",
        "triple",
        "list-pair",
        "binary-nulls",
        "fixed-nulls",
        "string-array",
        "int-array",
    ],
)
def test_sha256_bad_input(messages: object) -> None:
    with pytest.raises(ValueError):
        sha256_batch(messages)  # type: ignore[arg-type]


# ---- sha256_rows --------------------------------------------------------------------------


def test_sha256_rows_head_and_tail() -> None:
    head = np.frombuffer(_RNG.randbytes(40 * 7), np.uint8).reshape(40, 7)
    tails = MESSAGES[100:140]
    want = _digests([head[i].tobytes() + tails[i] for i in range(40)])
    assert _rows(sha256_rows(head, _pair(tails))) == want
    assert _rows(sha256_rows(head, pa.array(tails))) == want
    sliced = pa.array(MESSAGES[90:150]).slice(10, 40)
    assert _rows(sha256_rows(head, sliced)) == want


def test_sha256_rows_head_only() -> None:
    head = np.arange(5 * 9, dtype=np.uint8).reshape(5, 9)
    assert _rows(sha256_rows(head)) == _digests([row.tobytes() for row in head])
    assert _rows(sha256_rows(np.asfortranarray(head))) == _digests([row.tobytes() for row in head])
    assert sha256_rows(np.empty((0, 4), np.uint8)).shape == (0, 32)


def test_sha256_rows_bad_input() -> None:
    head = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError):
        sha256_rows(head, pa.array([b"a", b"b"]))
    with pytest.raises(ValueError):
        sha256_rows(head, pa.array([b"a", b"b", b"c", b"d"]))
    with pytest.raises(ValueError):
        sha256_rows(head.astype(np.int16))
    with pytest.raises(ValueError):
        sha256_rows(head.reshape(-1))
    with pytest.raises(ValueError):
        sha256_rows(head, (np.zeros(3, np.uint8), np.array([0, 2, 1, 3], np.int64)))


# ---- backend selection --------------------------------------------------------------------


def test_resolve_backend_defaults_to_cpu() -> None:
    assert available_backends()[-1] == "cpu"
    assert resolve_backend() == available_backends()[0]
    assert resolve_backend("cpu") == "cpu"


def test_resolve_backend_unknown() -> None:
    with pytest.raises(ValueError):
        resolve_backend("bogus")
    with pytest.raises(ValueError):
        sha256_batch(pa.array([b"x"]), backend="bogus")
    with pytest.raises(ValueError):
        _verify_rows([_valid_row(0)], backend="bogus")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA backend is available here")
def test_resolve_backend_cuda_unavailable() -> None:
    with pytest.raises(RuntimeError):
        resolve_backend("cuda")
    with pytest.raises(RuntimeError):
        sha256_batch(pa.array([b"x"]), backend="cuda")
    with pytest.raises(RuntimeError):
        _verify_rows([_valid_row(0)], backend="cuda")


def test_env_var_selects_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_backend() == "cpu"
    assert _rows(sha256_batch(pa.array(MESSAGES[:3]))) == _WANT[:3]
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_backend() == available_backends()[0]
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend() == available_backends()[0]
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        resolve_backend()
    # An explicit request is not overridden by the environment
    assert resolve_backend("cpu") == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA backend is available here")
def test_env_var_cuda_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError):
        resolve_backend()
    with pytest.raises(RuntimeError):
        sha256_batch(pa.array([b"x"]))


# ---- ed25519_verify_batch -----------------------------------------------------------------

KEYS = [key_from_seed(bytes([0x20 + i]) * 32) for i in range(4)]
PUBS = [public_bytes(k) for k in KEYS]

Row = tuple[bytes, bytes, bytes]  # public key, signature, message


def _valid_row(i: int) -> Row:
    msg = hashlib.sha256(i.to_bytes(8, "big")).digest()
    key = KEYS[i % len(KEYS)]
    return public_bytes(key), key.sign(msg), msg


def _stack(items: list[bytes], width: int) -> np.ndarray:
    return np.frombuffer(b"".join(items), np.uint8).reshape(len(items), width)


def _verify_rows(rows: list[Row], backend: str = "auto") -> list[bool]:
    keys = _stack([r[0] for r in rows], 32)
    sigs = _stack([r[1] for r in rows], 64)
    msgs = _stack([r[2] for r in rows], 32)
    out = ed25519_verify_batch(keys, sigs, msgs, backend=backend)
    assert out.dtype == np.bool_
    assert out.shape == (len(rows),)
    return out.tolist()


def _reference(row: Row) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(row[0]).verify(row[1], row[2])
    except (InvalidSignature, ValueError):
        return False
    return True


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _s_plus_l(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:], "little") + L
    return sig[:32] + s.to_bytes(32, "little")


# A y coordinate >= p (non-canonical) and a y with no x on the curve (2 is a non-square case).
_BAD_KEYS = [bytes(32), b"\xff" * 31 + b"\x7f", b"\x02" + bytes(31), b"\xff" * 32]


def test_ed25519_valid_rows() -> None:
    assert _verify_rows([_valid_row(i) for i in range(10)]) == [True] * 10


def test_ed25519_empty() -> None:
    empty = np.empty((0, 32), np.uint8)
    out = ed25519_verify_batch(empty, np.empty((0, 64), np.uint8), empty)
    assert out.shape == (0,)


@pytest.mark.parametrize("bit", [0, 100, 255, 256, 300, 511])
def test_ed25519_flipped_signature_bit(bit: int) -> None:
    rows = [_valid_row(i) for i in range(3)]
    pub, sig, msg = rows[1]
    rows[1] = (pub, _flip(sig, bit), msg)
    assert _verify_rows(rows) == [True, False, True]


@pytest.mark.parametrize("bit", [0, 77, 255])
def test_ed25519_flipped_message_or_key_bit(bit: int) -> None:
    pub, sig, msg = _valid_row(0)
    assert _verify_rows([(pub, sig, _flip(msg, bit)), (_flip(pub, bit), sig, msg)]) == [
        False,
        False,
    ]


def test_ed25519_signature_of_another_key() -> None:
    pub, sig, msg = _valid_row(0)
    assert _verify_rows([(PUBS[1], sig, msg)]) == [False]


@pytest.mark.parametrize("bad_key", _BAD_KEYS, ids=["zero", "y-above-p", "off-curve", "all-ff"])
def test_ed25519_invalid_public_key_is_false(bad_key: bytes) -> None:
    pub, sig, msg = _valid_row(0)
    assert _verify_rows([(bad_key, sig, msg), (pub, sig, msg), (bad_key, sig, msg)]) == [
        False,
        True,
        False,
    ]


def test_ed25519_rejects_s_not_below_l() -> None:
    pub, sig, msg = _valid_row(3)
    assert _verify_rows([(pub, sig, msg)]) == [True]
    malleated = _s_plus_l(sig)
    assert malleated != sig
    assert int.from_bytes(malleated[32:], "little") >= L
    assert _verify_rows([(pub, malleated, msg)]) == [False]
    assert _reference((pub, malleated, msg)) is False
    exactly_l = sig[:32] + L.to_bytes(32, "little")
    assert _verify_rows([(pub, exactly_l, msg)]) == [False]


def _good() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [_valid_row(i) for i in range(3)]
    return (
        _stack([r[0] for r in rows], 32),
        _stack([r[1] for r in rows], 64),
        _stack([r[2] for r in rows], 32),
    )


@pytest.mark.parametrize(
    "which",
    [
        "keys-list",
        "keys-int8",
        "keys-1d",
        "keys-width",
        "sigs-width",
        "sigs-rows",
        "sigs-uint16",
        "msgs-rows",
        "msgs-int8",
        "msgs-3d",
    ],
)
def test_ed25519_shape_and_dtype_errors(which: str) -> None:
    keys, sigs, msgs = _good()
    match which:
        case "keys-list":
            keys = [bytes(k) for k in keys]  # type: ignore[assignment]
        case "keys-int8":
            keys = keys.astype(np.int8)
        case "keys-1d":
            keys = keys.reshape(-1)
        case "keys-width":
            keys = keys[:, :31]
        case "sigs-width":
            sigs = sigs[:, :63]
        case "sigs-rows":
            sigs = sigs[:2]
        case "sigs-uint16":
            sigs = sigs.astype(np.uint16)
        case "msgs-int8":
            msgs = msgs.astype(np.int8)
        case "msgs-rows":
            msgs = np.concatenate([msgs, msgs[:1]])
        case "msgs-3d":
            msgs = msgs.reshape(3, 32, 1)
    with pytest.raises(ValueError):
        ed25519_verify_batch(keys, sigs, msgs)


def test_ed25519_messages_of_another_width_are_those_bytes() -> None:
    keys, sigs, msgs = _good()
    assert ed25519_verify_batch(keys, sigs, msgs).all()
    # 33-byte rows are 33-byte messages: not what was signed
    longer = np.concatenate([msgs, msgs[:, :1]], axis=1)
    assert not ed25519_verify_batch(keys, sigs, longer).any()
    values = np.ascontiguousarray(msgs).reshape(-1)
    assert ed25519_verify_batch(keys, sigs, (values, np.arange(4, dtype=np.int64) * 32)).all()


def _mixed_rows(n: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pub, sig, msg = _valid_row(i)
        match rng.randrange(8):
            case 0:
                sig = _flip(sig, rng.randrange(512))
            case 1:
                msg = _flip(msg, rng.randrange(256))
            case 2:
                pub = rng.choice(_BAD_KEYS)
            case 3:
                sig = _s_plus_l(sig)
            case 4:
                pub = PUBS[(i + 1) % len(PUBS)]
        rows.append((pub, sig, msg))
    return rows


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_ed25519_threaded_path_matches_per_row(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # Above 512 rows the batch is split across a thread pool; force a known worker count so the
    # split is exercised (including a last chunk shorter than the rest) on any machine.
    monkeypatch.setattr(ed25519_mod, "_workers", lambda: workers)
    monkeypatch.setattr(ed25519_mod, "_pool", None)
    rows = _mixed_rows(1203, seed=workers)
    want = [_reference(r) for r in rows]
    assert 0 < sum(want) < len(want)
    assert _verify_rows(rows) == want


def test_ed25519_threaded_on_strided_views() -> None:
    rows = _mixed_rows(1100, seed=99)
    keys = _stack([r[0] for r in rows], 32)
    sigs = _stack([r[1] for r in rows], 64)
    msgs = _stack([r[2] for r in rows], 32)
    want = [_reference(r) for r in rows]
    got = ed25519_verify_batch(keys[::2], sigs[::2], msgs[::2])
    assert got.tolist() == want[::2]


def test_byte_rows_gives_each_row_as_bytes() -> None:
    from rayledger.kernels import byte_rows

    rows = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert byte_rows(rows) == [bytes(range(i * 6, i * 6 + 6)) for i in range(4)]
    # A strided view (every other row, or a column range) is read as it looks
    assert byte_rows(rows[::2]) == [bytes(range(0, 6)), bytes(range(12, 18))]
    assert byte_rows(rows[:, 2:4]) == [bytes([i * 6 + 2, i * 6 + 3]) for i in range(4)]
    # Trailing zero bytes are kept (numpy's bytes dtype would strip them)
    assert byte_rows(np.zeros((2, 3), np.uint8)) == [b"\0\0\0", b"\0\0\0"]
    assert byte_rows(np.empty((3, 0), np.uint8)) == [b"", b"", b""]
    assert byte_rows(np.empty((0, 32), np.uint8)) == []
