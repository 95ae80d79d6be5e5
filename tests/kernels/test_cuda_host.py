"""The CUDA kernels' per-thread code, compiled for the host and checked against hashlib.

Every kernel in kernels/cuda/*.cu is a thin __global__ wrapper around a __host__ __device__
body ``rl_*_body(i, ...)``; here a C++ compiler builds those bodies into a shared library and a
loop over i plays the grid (with a few surplus "threads" past n, as the last block has). This
checks the SHA-256/SHA-512 cores, padding, offset handling, bounds checks and the Merkle level
layout without a GPU; what it cannot check is the device-only code under ``__CUDA_ARCH__``
(the aligned word loads and stores), which tests/kernels/test_hash_gpu.py covers on a GPU.

Scenarios:
- every length 0..300 and every length near a block boundary up to 4 KiB, int64 and int32
  offsets, offsets rebased by a base;
- fixed-width rows (word and byte paths), row concatenation head || tail;
- bad offsets: zero digest and the error flag, nothing read;
- Merkle trees built level by level in one buffer as _cuda.py lays them out, against
  rayledger.merkle for n = 1..300 and a few larger n.

Skipped when neither g++ nor nvcc is on PATH.
"""

from __future__ import annotations

import ctypes
import hashlib
import random

import numpy as np
import pytest

from rayledger import merkle as ledger_merkle
from rayledger.kernels import _cuda
from tests.kernels._harness import build_harness


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_harness(tmp_path_factory.mktemp("cuda_host"))


def _p(arr: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(arr.ctypes.data)


U64, I64 = ctypes.c_uint64, ctypes.c_int64
_RNG = random.Random(6962)


def _pair(messages: list[bytes], odt: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(messages) + 1, odt)
    offsets[1:] = np.cumsum([len(m) for m in messages])
    values = np.frombuffer(b"".join(messages) + b"\0", np.uint8).copy()
    return values, offsets


def _var(
    lib: ctypes.CDLL,
    algorithm: str,
    values: np.ndarray,
    offsets: np.ndarray,
    base: int = 0,
    size: int | None = None,
) -> tuple[np.ndarray, int]:
    digest = 32 if algorithm == "sha256" else 64
    n = len(offsets) - 1
    suffix = "32" if offsets.dtype == np.int32 else ""
    fn = getattr(lib, f"h_{algorithm}_var{suffix}")
    out = np.full((n + 3, digest), 0xEE, np.uint8)
    err = np.zeros(1, np.int32)
    size = len(values) if size is None else size
    fn(_p(values), U64(size), _p(offsets), I64(base), U64(n), _p(out), _p(err))
    # Surplus threads past n must write nothing.
    assert (out[n:] == 0xEE).all()
    return out[:n], int(err[0])


def _digests(algorithm: str, messages: list[bytes]) -> bytes:
    return b"".join(hashlib.new(algorithm, m).digest() for m in messages)


def _boundary(block: int, pad: int) -> list[bytes]:
    near = {0, 1, block - pad - 1, block - pad, block - pad + 1, block - 1}
    return [_RNG.randbytes(n) for n in range(4097) if n % block in near]


EVERY = [_RNG.randbytes(n) for n in range(301)]


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("odt", [np.int64, np.int32])
def test_var_every_length_and_block_boundaries(lib: ctypes.CDLL, algorithm: str, odt: type) -> None:
    block, pad = (64, 9) if algorithm == "sha256" else (128, 17)
    for messages in (EVERY, _boundary(block, pad)):
        out, err = _var(lib, algorithm, *_pair(messages, odt))
        assert err == 0
        assert out.tobytes() == _digests(algorithm, messages)


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_var_offsets_rebased_by_base(lib: ctypes.CDLL, algorithm: str) -> None:
    # The device holds values[base:] only; offsets keep their original values.
    values, offsets = _pair(EVERY[100:140])
    out, err = _var(lib, algorithm, values, offsets + 1000, base=1000)
    assert err == 0
    assert out.tobytes() == _digests(algorithm, EVERY[100:140])


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize(
    "bad",
    [[0, 5, 3, 8], [0, 5, 11, 11], [-1, 4, 5, 6], [0, 4, 4, 1 << 40]],
    ids=["decreasing", "past-end", "negative", "huge"],
)
def test_var_bad_offsets_read_nothing(lib: ctypes.CDLL, algorithm: str, bad: list[int]) -> None:
    values = np.arange(10, dtype=np.uint8)
    offsets = np.array(bad, np.int64)
    out, err = _var(lib, algorithm, values, offsets)
    assert err == 1
    for i in range(3):
        start, end = bad[i], bad[i + 1]
        if 0 <= start <= end <= 10:
            want = hashlib.new(algorithm, values[start:end].tobytes()).digest()
            assert out[i].tobytes() == want
        else:
            assert not out[i].any()


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("width", [0, 1, 3, 8, 32, 33, 55, 56, 64, 96, 111, 112, 128, 200])
def test_fixed_width(lib: ctypes.CDLL, algorithm: str, width: int) -> None:
    n = 37
    messages = [_RNG.randbytes(width) for _ in range(n)]
    values = np.frombuffer(b"".join(messages) + b"\0", np.uint8).copy()
    digest = 32 if algorithm == "sha256" else 64
    out = np.full((n + 3, digest), 0xEE, np.uint8)
    getattr(lib, f"h_{algorithm}_fixed")(_p(values), U64(width), U64(n), _p(out))
    assert out[:n].tobytes() == _digests(algorithm, messages)
    assert (out[n:] == 0xEE).all()


@pytest.mark.parametrize("k", [0, 1, 33, 64, 79])
@pytest.mark.parametrize("odt", [np.int64, np.int32])
def test_rows_head_then_tail(lib: ctypes.CDLL, k: int, odt: type) -> None:
    n = 150
    head = np.frombuffer(_RNG.randbytes(n * k) + b"\0", np.uint8).copy()
    tails = [_RNG.randbytes(_RNG.randrange(0, 260)) for _ in range(n)]
    values, offsets = _pair(tails, odt)
    out = np.full((n + 3, 32), 0xEE, np.uint8)
    err = np.zeros(1, np.int32)
    fn = lib.h_sha256_rows32 if odt == np.int32 else lib.h_sha256_rows
    fn(
        _p(head),
        U64(k),
        _p(values),
        U64(len(values)),
        _p(offsets),
        I64(0),
        U64(n),
        _p(out),
        _p(err),
    )
    rows = [head[i * k : (i + 1) * k].tobytes() + tails[i] for i in range(n)]
    assert err[0] == 0
    assert out[:n].tobytes() == _digests("sha256", rows)
    assert (out[n:] == 0xEE).all()


def _host_tree(lib: ctypes.CDLL, leaves: np.ndarray) -> list[np.ndarray]:
    """The tree as _cuda.merkle_levels lays it out: every level in one buffer."""
    sizes = _cuda.level_sizes(len(leaves))
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    tree = np.zeros((starts[-1], 32), np.uint8)
    lib.h_merkle_leaves(_p(leaves), U64(len(leaves)), _p(tree))
    for h in range(len(sizes) - 1):
        children = tree[starts[h] :]
        parents = tree[starts[h + 1] :]
        lib.h_merkle_level(_p(children), U64(sizes[h]), _p(parents))
    return [tree[starts[h] : starts[h + 1]] for h in range(len(sizes))]


def test_merkle_levels_equal_ledger(lib: ctypes.CDLL) -> None:
    leaves = np.frombuffer(_RNG.randbytes(1100 * 32), np.uint8).reshape(1100, 32)
    for n in [*range(1, 300), 511, 512, 513, 1023, 1024, 1025, 1100]:
        ours = _host_tree(lib, leaves[:n])
        theirs = ledger_merkle.merkle_levels(leaves[:n])
        assert [level.tobytes() for level in ours] == [b"".join(level) for level in theirs], n
