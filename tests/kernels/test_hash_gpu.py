"""The cuda backend against the cpu backend, byte for byte, on the same inputs.

Marked ``gpu``; skipped unless CuPy imports and sees a device. Scenarios:
- every length 0..300 and every length near a 64/128-byte block boundary up to 4 KiB, with
  int32 and int64 offsets and every Arrow form; fixed widths (the word-load path);
- random batches (hypothesis); sha256_rows with and without a tail;
- batches cut into many pipelined chunks (both streams and staging slots in turn);
- Merkle roots and levels for n = 0..1000 and n = 2^20, and a random large n;
- bad offsets: refused on the host before launch, and flagged by the device-side bounds
  check (never read out of bounds) when the host check is bypassed.
Run once under ``compute-sanitizer --tool memcheck`` on the GPU machine as well.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.kernels import (
    _cuda,
    available_backends,
    merkle_levels,
    merkle_root,
    sha256_batch,
    sha256_rows,
    sha512_batch,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in available_backends(), reason="no CUDA device (or no CuPy)"),
]

ALGORITHMS = {"sha256": sha256_batch, "sha512": sha512_batch}
_RNG = random.Random(4096)


def _pair(messages: list[bytes], odt: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(messages) + 1, odt)
    offsets[1:] = np.cumsum([len(m) for m in messages])
    return np.frombuffer(b"".join(messages), np.uint8).copy(), offsets


def _same(fn: object, *args: object) -> np.ndarray:
    gpu = fn(*args, backend="cuda")  # type: ignore[operator]
    cpu = fn(*args, backend="cpu")  # type: ignore[operator]
    assert gpu.dtype == np.uint8
    assert gpu.shape == cpu.shape
    assert gpu.tobytes() == cpu.tobytes()
    return gpu


def _boundary(block: int, pad: int) -> list[bytes]:
    near = {0, 1, 2, block - pad - 1, block - pad, block - pad + 1, block - 2, block - 1}
    return [_RNG.randbytes(n) for n in range(4097) if n % block in near]


EVERY = [_RNG.randbytes(n) for n in range(301)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_length_and_block_boundaries(algorithm: str) -> None:
    fn = ALGORITHMS[algorithm]
    block, pad = (64, 9) if algorithm == "sha256" else (128, 17)
    for messages in (EVERY, _boundary(block, pad)):
        for odt in (np.int64, np.int32):
            _same(fn, _pair(messages, odt))
        _same(fn, pa.array(messages, pa.binary()))
        _same(fn, pa.array(messages, pa.large_binary()))
    got = fn(_pair(EVERY), backend="cuda")
    assert got[0].tobytes() == hashlib.new(algorithm, b"").digest()
    assert got[300].tobytes() == hashlib.new(algorithm, EVERY[300]).digest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("width", [0, 1, 31, 32, 33, 64, 96, 150, 256])
def test_fixed_widths(algorithm: str, width: int) -> None:
    messages = [_RNG.randbytes(width) for _ in range(1000)]
    _same(ALGORITHMS[algorithm], pa.array(messages, pa.binary(width)))
    _same(ALGORITHMS[algorithm], pa.array(messages, pa.binary(width)).slice(3, 500))
    # Equal lengths at an odd start in the values buffer: the fixed path, re-aligned.
    values, offsets = _pair([b"x", *messages])
    _same(ALGORITHMS[algorithm], (values, offsets[1:]))


@given(st.lists(st.binary(max_size=600), max_size=60))
@settings(max_examples=50, deadline=None)
def test_random_batches(messages: list[bytes]) -> None:
    for fn in ALGORITHMS.values():
        _same(fn, _pair(messages))
        _same(fn, _pair(messages, np.int32))


@pytest.mark.parametrize("k", [0, 1, 33, 79])
def test_rows(k: int) -> None:
    n = 3000
    head = np.frombuffer(_RNG.randbytes(n * k), np.uint8).reshape(n, k)
    tails = [_RNG.randbytes(_RNG.randrange(0, 400)) for _ in range(n)]
    _same(sha256_rows, head, _pair(tails))
    _same(sha256_rows, head, _pair(tails, np.int32))
    _same(sha256_rows, head, pa.array(tails))
    _same(sha256_rows, head)


def test_many_pipelined_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "CHUNK_BYTES", 4096)
    messages = [_RNG.randbytes(_RNG.randrange(0, 700)) for _ in range(5000)]
    messages[100] = _RNG.randbytes(20_000)  # one message bigger than a chunk
    for fn in ALGORITHMS.values():
        _same(fn, _pair(messages))
        _same(fn, _pair(messages, np.int32))
        _same(fn, pa.array([m[:64].ljust(64, b"-") for m in messages], pa.binary(64)))
    head = np.frombuffer(_RNG.randbytes(5000 * 79), np.uint8).reshape(5000, 79)
    _same(sha256_rows, head, _pair(messages))
    _same(sha256_rows, head)


def test_large_batch_default_chunks() -> None:
    n = 1 << 20
    values = np.random.default_rng(1).integers(0, 256, n * 150, dtype=np.uint8)
    lengths = np.random.default_rng(2).integers(100, 200, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _same(sha256_batch, (values, offsets))


LEAVES = np.frombuffer(_RNG.randbytes(1000 * 32), np.uint8).reshape(1000, 32)


def test_merkle_every_n_to_1000() -> None:
    for n in range(1001):
        assert merkle_root(LEAVES[:n], backend="cuda") == merkle_root(LEAVES[:n], backend="cpu")
    for n in [*range(1, 70), 255, 256, 257, 999, 1000]:
        gpu = merkle_levels(LEAVES[:n], backend="cuda")
        cpu = merkle_levels(LEAVES[:n], backend="cpu")
        assert [level.tobytes() for level in gpu] == [level.tobytes() for level in cpu]
    assert merkle_levels(LEAVES[:0], backend="cuda") == []


@pytest.mark.parametrize("n", [1 << 20, 987_654])
def test_merkle_large(n: int) -> None:
    leaves = np.random.default_rng(n).integers(0, 256, (n, 32), dtype=np.uint8)
    assert merkle_root(leaves, backend="cuda") == merkle_root(leaves, backend="cpu")
    gpu = merkle_levels(leaves, backend="cuda")
    cpu = merkle_levels(leaves, backend="cpu")
    assert [level.tobytes() for level in gpu] == [level.tobytes() for level in cpu]


def test_merkle_root_on_device_matches() -> None:
    leaves = np.random.default_rng(7).integers(0, 256, (4097, 32), dtype=np.uint8)
    dev = _cuda.device()
    with dev.lock:
        root = dev.merkle_root_on_device(dev.cp.asarray(leaves).reshape(-1), len(leaves))
    assert root == merkle_root(leaves, backend="cpu")


@pytest.mark.parametrize("fn", [sha256_batch, sha512_batch])
def test_bad_offsets_refused_before_launch(fn: object) -> None:
    values = np.arange(10, dtype=np.uint8)
    for offsets in ([0, 5, 3], [0, 11], [-1, 4]):
        with pytest.raises(ValueError):
            fn((values, np.array(offsets, np.int64)), backend="cuda")  # type: ignore[operator]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [[0, 5, 3, 8], [0, 4, 11], [0, 2, 2, 1 << 40]])
def test_device_bounds_check_flags_bad_rows(algorithm: str, bad: list[int]) -> None:
    values = np.arange(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="flagged on the device"):
        _cuda.hash_rows(algorithm, None, values, np.array(bad, np.int64))
    # The device is still usable afterwards.
    _same(ALGORITHMS[algorithm], _pair(EVERY[:10]))
