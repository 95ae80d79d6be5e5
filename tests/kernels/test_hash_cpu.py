"""CPU kernels of rayledger.kernels: SHA-256/SHA-512 batches, row hashing and RFC 6962 Merkle
trees against hashlib and rayledger.merkle, input validation and backend choice.

Scenarios:
- every length 0..300 in one batch, and every length near a 64/128-byte block boundary up to
  4 KiB, for each input form (offset pairs int32/int64, Arrow binary/large/fixed, slices, chunks);
- random batches (hypothesis), including values with gaps between messages;
- the worker-process path gives the same bytes as the single-thread path, survives a dead
  worker, and is off with RAYLEDGER_CPU_WORKERS=0;
- every test runs twice: through the compiled OpenSSL loop (``_native``, its batches split over
  threads where the pool's would be) and through ``hashlib`` alone; the loop refuses malformed
  buffers itself, is built once per cache (concurrent first uses included), and its absence (no
  compiler, switched off) leaves ``hashlib``;
- Merkle roots and levels equal rayledger.merkle for n = 0..1000 and for large random n;
- every malformed input is a ValueError naming the problem;
- backend choice: auto, RAYLEDGER_KERNELS, and an explicit cuda request without a GPU.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger import merkle as ledger_merkle
from rayledger.kernels import (
    _backend,
    _cpu,
    _native,
    as_offsets_and_values,
    available_backends,
    ed25519_verify_batch,
    merkle_levels,
    merkle_root,
    prepare,
    resolve_backend,
    sha256_batch,
    sha256_rows,
    sha512_batch,
)
from rayledger.kernels._hashproc import hash_rows

ALGORITHMS = {"sha256": sha256_batch, "sha512": sha512_batch}
_RNG = random.Random(20260514)
_hyp = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv(_cpu.WORKERS_ENV, raising=False)


@pytest.fixture(autouse=True, params=["native", "hashlib"])
def hash_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test through the compiled loop and through hashlib alone."""
    if request.param == "native":
        if not _native.available():
            pytest.skip("the compiled hashing loop cannot be built here (no C compiler?)")
        # The same batch sizes that reach the worker processes reach the helper threads.
        monkeypatch.setattr(_cpu, "NATIVE_PARALLEL_MIN_ROWS", _cpu.PARALLEL_MIN_ROWS)
    else:
        monkeypatch.setattr(_native, "get", lambda: None)
    return str(request.param)


def _want(algorithm: str, messages: list[bytes]) -> list[bytes]:
    return [hashlib.new(algorithm, m).digest() for m in messages]


def _rows(arr: np.ndarray, size: int) -> list[bytes]:
    assert arr.dtype == np.uint8
    assert arr.shape == (arr.shape[0], size)
    return [row.tobytes() for row in arr]


def _pair(messages: list[bytes], odt: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(messages) + 1, odt)
    offsets[1:] = np.cumsum([len(m) for m in messages])
    return np.frombuffer(b"".join(messages), np.uint8).copy(), offsets


def _boundary_lengths(block: int, pad: int, limit: int = 4096) -> list[int]:
    # The padding moves to a new block when length % block crosses block - pad.
    near = {0, 1, 2, block - pad - 2, block - pad - 1, block - pad, block - pad + 1}
    near |= {block - 2, block - 1}
    return [n for n in range(limit + 1) if n % block in near]


EVERY_LENGTH = [_RNG.randbytes(n) for n in range(301)]
BOUNDARY = {
    "sha256": [_RNG.randbytes(n) for n in _boundary_lengths(64, 9)],
    "sha512": [_RNG.randbytes(n) for n in _boundary_lengths(128, 17)],
}


def _forms(messages: list[bytes]) -> dict[str, object]:
    return {
        "pair-int64": _pair(messages),
        "pair-int32": _pair(messages, np.int32),
        "binary": pa.array(messages, pa.binary()),
        "large-binary": pa.array(messages, pa.large_binary()),
        "chunked": pa.chunked_array(
            [pa.array(messages[:7], pa.binary()), pa.array(messages[7:], pa.binary())]
        ),
    }


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_length_0_to_300_in_one_batch(algorithm: str) -> None:
    want = _want(algorithm, EVERY_LENGTH)
    for form, messages in _forms(EVERY_LENGTH).items():
        got = ALGORITHMS[algorithm](messages, backend="cpu")  # type: ignore[arg-type]
        assert _rows(got, len(want[0])) == want, form


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_block_boundaries_up_to_4k(algorithm: str) -> None:
    messages = BOUNDARY[algorithm]
    want = _want(algorithm, messages)
    assert _rows(ALGORITHMS[algorithm](_pair(messages), backend="cpu"), len(want[0])) == want


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("width", [0, 1, 32, 64, 96, 200])
def test_fixed_size_binary_and_slices(algorithm: str, width: int) -> None:
    messages = [_RNG.randbytes(width) for _ in range(40)]
    size = len(_want(algorithm, [b""])[0])
    arr = pa.array(messages, pa.binary(width))
    assert _rows(ALGORITHMS[algorithm](arr), size) == _want(algorithm, messages)
    assert _rows(ALGORITHMS[algorithm](arr.slice(5, 20)), size) == _want(algorithm, messages[5:25])
    assert _rows(ALGORITHMS[algorithm](pa.array(messages).slice(3, 9)), size) == _want(
        algorithm, messages[3:12]
    )


@given(st.lists(st.binary(max_size=300), max_size=40), st.data())
@_hyp
def test_random_batches_match_hashlib(messages: list[bytes], data: st.DataObject) -> None:
    # Messages scattered in a larger buffer: gaps before, between and after them.
    count = len(messages) + 1
    gaps = data.draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))
    buf = bytearray()
    bounds = []
    for m, gap in zip(messages, gaps, strict=False):
        buf += b"\xa5" * gap
        bounds.append((len(buf), len(buf) + len(m)))
        buf += m
    buf += b"\x5a" * gaps[-1]
    values = np.frombuffer(bytes(buf), np.uint8)
    for algorithm, fn in ALGORITHMS.items():
        size = 32 if algorithm == "sha256" else 64
        want = _want(algorithm, messages)
        contiguous = _pair(messages)
        assert _rows(fn(contiguous), size) == want
        assert _rows(fn(pa.array(messages, pa.binary())), size) == want
        # Offsets address a sub-range of a bigger buffer
        padded = np.concatenate([np.full(3, 7, np.uint8), contiguous[0], np.full(4, 9, np.uint8)])
        assert _rows(fn((padded, contiguous[1] + 3)), size) == want
        for i, (start, stop) in enumerate(bounds):
            one = np.array([start, stop], np.int64)
            assert fn((values, one))[0].tobytes() == want[i]


def test_empty_batches() -> None:
    for fn, size in ((sha256_batch, 32), (sha512_batch, 64)):
        assert fn((np.empty(0, np.uint8), np.zeros(1, np.int64))).shape == (0, size)
        assert fn(pa.array([], pa.binary())).shape == (0, size)
        assert fn(pa.array([], pa.binary(32))).shape == (0, size)
    assert sha256_rows(np.empty((0, 5), np.uint8)).shape == (0, 32)
    assert sha256_rows(np.empty((0, 5), np.uint8), pa.array([], pa.binary())).shape == (0, 32)


def test_as_offsets_and_values_views_arrow_buffers() -> None:
    arr = pa.array(EVERY_LENGTH[:50], pa.binary())
    values, offsets = as_offsets_and_values(arr)
    assert offsets.dtype == np.int64
    assert np.shares_memory(values, np.frombuffer(arr.buffers()[2], np.uint8))


# ---- sha256_rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 33, 79])
def test_sha256_rows_matches_concatenation(k: int) -> None:
    n = 120
    head = np.frombuffer(_RNG.randbytes(n * k), np.uint8).reshape(n, k)
    tails = [_RNG.randbytes(_RNG.randrange(0, 300)) for _ in range(n)]
    want = _want("sha256", [head[i].tobytes() + tails[i] for i in range(n)])
    assert _rows(sha256_rows(head, _pair(tails)), 32) == want
    assert _rows(sha256_rows(head, pa.array(tails)), 32) == want
    assert _rows(sha256_rows(head), 32) == _want("sha256", [row.tobytes() for row in head])
    assert _rows(sha256_rows(np.asfortranarray(head)), 32) == _want(
        "sha256", [row.tobytes() for row in head]
    )


# ---- the worker-process path ------------------------------------------------------------------


def _big_batch(n: int) -> list[bytes]:
    rng = np.random.default_rng(n)
    lengths = rng.integers(0, 400, n)
    lengths[:: n // 7] = 3000  # a few large messages skew the byte-balanced split
    raw = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8).tobytes()
    out, pos = [], 0
    for length in lengths.tolist():
        out.append(raw[pos : pos + length])
        pos += length
    return out


def test_worker_processes_match_single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = _big_batch(_cpu.PARALLEL_MIN_ROWS * 2 + 17)
    pair = _pair(messages)
    for algorithm, fn in ALGORITHMS.items():
        parallel = fn(pair, backend="cpu")
        assert _rows(parallel, parallel.shape[1]) == _want(algorithm, messages)
    n = len(messages)
    head = np.frombuffer(_RNG.randbytes(n * 79), np.uint8).reshape(n, 79)
    want_rows = _want("sha256", [head[i].tobytes() + messages[i] for i in range(n)])
    assert _rows(sha256_rows(head, pair), 32) == want_rows
    assert _rows(sha256_rows(head), 32) == _want("sha256", [row.tobytes() for row in head])
    monkeypatch.setattr(_cpu, "PARALLEL_MIN_ROWS", 1)
    # Growing regions after a small batch, and tiny shares with empty messages.
    assert _rows(sha256_batch(_pair([b"", b"x", b""])), 32) == _want("sha256", [b"", b"x", b""])
    assert _rows(sha256_batch(pair), 32) == _want("sha256", messages)


def test_dead_worker_falls_back_and_restarts(hash_loop: str) -> None:
    messages = _big_batch(_cpu.PARALLEL_MIN_ROWS + 5)
    want = _want("sha256", messages)
    assert _rows(sha256_batch(_pair(messages)), 32) == want
    if hash_loop == "native":
        pytest.skip("the compiled loop shares work out to threads, not worker processes")
    pool = _cpu._pool
    if pool is None or not pool.workers:
        pytest.skip("no worker processes on a one-core machine")
    for worker in pool.workers:
        worker.proc.kill()
        worker.proc.wait()
    assert _rows(sha256_batch(_pair(messages)), 32) == want
    assert _cpu._pool is None
    assert _rows(sha256_batch(_pair(messages)), 32) == want
    assert _cpu._pool is not None


def test_workers_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_cpu.WORKERS_ENV, "0")
    assert _cpu._configured_workers() == 0
    monkeypatch.setenv(_cpu.WORKERS_ENV, "3")
    assert _cpu._configured_workers() == 3
    for bad in ("-1", "many"):
        monkeypatch.setenv(_cpu.WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=_cpu.WORKERS_ENV):
            _cpu._configured_workers()


def test_no_workers_hashes_in_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_cpu.WORKERS_ENV, "0")
    monkeypatch.setattr(_cpu, "_pool", None)
    messages = _big_batch(_cpu.PARALLEL_MIN_ROWS + 1)
    assert _rows(sha512_batch(_pair(messages)), 64) == _want("sha512", messages)
    assert _cpu._pool is None


def test_hash_rows_loop() -> None:
    assert hash_rows("sha256", b"", 0, 2) == hashlib.sha256(b"").digest() * 2
    with pytest.raises(TypeError):
        hash_rows("sha256", memoryview(b"ab"), 1, 2, b"xy", [0, 1, 2])


# ---- Merkle trees -------------------------------------------------------------------------------

LEAVES = np.frombuffer(_RNG.randbytes(1000 * 32), np.uint8).reshape(1000, 32)


def test_merkle_root_equals_ledger_for_every_n_to_1000() -> None:
    for n in range(1001):
        assert merkle_root(LEAVES[:n], backend="cpu") == ledger_merkle.merkle_root(LEAVES[:n]), n


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 255, 256, 257, 511, 999, 1000])
def test_merkle_levels_equal_ledger(n: int) -> None:
    ours = merkle_levels(LEAVES[:n], backend="cpu")
    theirs = ledger_merkle.merkle_levels(LEAVES[:n])
    assert [[row.tobytes() for row in level] for level in ours] == theirs
    assert all(level.dtype == np.uint8 and level.shape[1:] == (32,) for level in ours)
    if n:
        assert ours[-1].shape == (1, 32)
        assert ours[-1][0].tobytes() == merkle_root(LEAVES[:n])


def test_merkle_empty_tree() -> None:
    empty = np.empty((0, 32), np.uint8)
    assert merkle_root(empty) == hashlib.sha256(b"").digest() == ledger_merkle.EMPTY_ROOT
    assert merkle_levels(empty) == []


@pytest.mark.parametrize("seed", [1, 2])
def test_merkle_large_random_n(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(_cpu.PARALLEL_MIN_ROWS * 2, 70_000))
    leaves = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    levels = merkle_levels(leaves)
    theirs = ledger_merkle.merkle_levels(leaves)
    assert len(levels) == len(theirs)
    for ours_level, their_level in zip(levels, theirs, strict=True):
        assert ours_level.tobytes() == b"".join(their_level)
    assert merkle_root(leaves) == theirs[-1][0]


def test_merkle_accepts_strided_leaves() -> None:
    wide = np.frombuffer(_RNG.randbytes(50 * 40), np.uint8).reshape(50, 40)
    assert merkle_root(wide[:, 4:36]) == ledger_merkle.merkle_root(
        np.ascontiguousarray(wide[:, 4:36])
    )


# ---- bad input ----------------------------------------------------------------------------------

_V = np.arange(10, dtype=np.uint8)


def _arrow_offsets(kind: pa.DataType, offsets: list[int], dtype: type) -> pa.Array:
    """A binary array over six bytes with these offsets, as a peer could send it."""
    buffers = [None, pa.py_buffer(np.array(offsets, dtype).tobytes()), pa.py_buffer(b"abcdef")]
    return pa.Array.from_buffers(kind, len(offsets) - 1, buffers)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ((_V, np.array([0, 5, 3], np.int64)), "non-decreasing"),
        ((_V, np.array([0, 5, 3, 8], np.int32)), "non-decreasing"),
        ((_V, np.array([0, 11], np.int64)), "past the end"),
        ((_V, np.array([0, 4, 11, 10], np.int64)), "past the end"),
        ((_V, np.array([-1, 4], np.int64)), "negative"),
        ((_V, np.array([0, -3, 4], np.int32)), "negative"),
        ((_V, np.array([], np.int64)), "n \\+ 1"),
        ((_V, np.array([[0, 1]], np.int64)), "one-dimensional"),
        ((_V, np.array([0, 5], np.uint64)), "int32 or int64"),
        ((_V, np.array([0, 5], np.float64)), "int32 or int64"),
        ((_V, [0, 5]), "int32 or int64"),
        ((_V, np.array([0, 2, 4, 6], np.int64)[::2]), "offsets must be contiguous"),
        ((_V.astype(np.int8), np.array([0, 5], np.int64)), "uint8"),
        ((_V.astype(np.uint16), np.array([0, 5], np.int64)), "uint8"),
        ((_V.reshape(2, 5), np.array([0, 5], np.int64)), "one-dimensional"),
        (
            (np.arange(20, dtype=np.uint8)[::2], np.array([0, 5], np.int64)),
            "values must be contiguous",
        ),
        ((b"0123456789", np.array([0, 5], np.int64)), "uint8 numpy array"),
        ((_V, np.array([0, 5], np.int64), None), "pair"),
        ([_V, np.array([0, 5], np.int64)], "pair"),
        # Arrow arrays whose offsets pyarrow's own (cheap) validation lets through
        (_arrow_offsets(pa.binary(), [0, 5, 3], np.int32), "non-decreasing"),
        (_arrow_offsets(pa.large_binary(), [0, 5, 3], np.int64), "non-decreasing"),
        (_arrow_offsets(pa.binary(), [0, -1, 3], np.int32), "negative"),
        (pa.array([b"a", None, b"c"], pa.binary()), "nulls"),
        (pa.array([b"a", None], pa.binary(1)), "nulls"),
        (pa.array(["a", "b"], pa.string()), "unsupported"),
        (pa.array([1, 2], pa.int32()), "unsupported"),
    ],
)
@pytest.mark.parametrize("fn", [sha256_batch, sha512_batch])
def test_bad_messages_name_the_problem(messages: object, problem: str, fn: object) -> None:
    with pytest.raises(ValueError, match=problem):
        fn(messages)  # type: ignore[operator]


def test_bad_rows_name_the_problem() -> None:
    head = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="3 rows but tail has 2"):
        sha256_rows(head, pa.array([b"a", b"b"]))
    with pytest.raises(ValueError, match="uint8"):
        sha256_rows(head.astype(np.int16))
    with pytest.raises(ValueError, match="two-dimensional"):
        sha256_rows(head.reshape(-1))
    with pytest.raises(ValueError, match="numpy array"):
        sha256_rows(b"abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-decreasing"):
        sha256_rows(head, (np.zeros(3, np.uint8), np.array([0, 2, 1, 3], np.int64)))


@pytest.mark.parametrize(
    ("leaves", "problem"),
    [
        (np.zeros((4, 31), np.uint8), "shape \\(n, 32\\)"),
        (np.zeros((4, 33), np.uint8), "shape \\(n, 32\\)"),
        (np.zeros(128, np.uint8), "two-dimensional"),
        (np.zeros((4, 32), np.int8), "uint8"),
        ([b"\x00" * 32], "numpy array"),
    ],
)
def test_bad_leaves_name_the_problem(leaves: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        merkle_root(leaves)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=problem):
        merkle_levels(leaves)  # type: ignore[arg-type]


# ---- backend choice -----------------------------------------------------------------------------

NO_CUDA = "cuda" not in available_backends()


def test_auto_resolves_to_the_best_backend_present() -> None:
    assert available_backends()[-1] == "cpu"
    assert resolve_backend() == available_backends()[0]
    assert resolve_backend("cpu") == "cpu"


def test_auto_picks_cuda_when_a_device_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda: None)
    assert available_backends() == ["cuda", "cpu"]
    assert resolve_backend() == "cuda"
    monkeypatch.setenv(_backend.ENV_VAR, "cpu")
    assert resolve_backend() == "cpu"


def test_env_var_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_backend.ENV_VAR, "cpu")
    assert resolve_backend() == "cpu"
    assert _rows(sha512_batch(pa.array([b"ab"])), 64) == _want("sha512", [b"ab"])
    for value in ("", "auto", " AUTO "):
        monkeypatch.setenv(_backend.ENV_VAR, value)
        assert resolve_backend() == available_backends()[0]
    monkeypatch.setenv(_backend.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="RAYLEDGER_KERNELS"):
        resolve_backend()
    assert resolve_backend("cpu") == "cpu"


def test_prepare_resolves_without_touching_a_device_on_cpu() -> None:
    assert prepare("cpu") == "cpu"
    assert prepare() == available_backends()[0]
    with pytest.raises(ValueError, match="unknown kernel backend"):
        prepare("gpu")


def test_unknown_backend_argument() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'bogus'"):
        sha512_batch(pa.array([b"x"]), backend="bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        merkle_root(LEAVES[:3], backend="gpu")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA backend is available here")
def test_explicit_cuda_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [
        lambda: sha256_batch(pa.array([b"x"]), backend="cuda"),
        lambda: sha512_batch(pa.array([b"x"]), backend="cuda"),
        lambda: sha256_rows(np.zeros((1, 2), np.uint8), backend="cuda"),
        lambda: merkle_root(LEAVES[:2], backend="cuda"),
        lambda: merkle_levels(LEAVES[:2], backend="cuda"),
        lambda: ed25519_verify_batch(
            np.zeros((1, 32), np.uint8),
            np.zeros((1, 64), np.uint8),
            np.zeros((1, 32), np.uint8),
            backend="cuda",
        ),
        lambda: prepare("cuda"),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="'cuda' was requested .* cannot run here: "):
            call()
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="RAYLEDGER_KERNELS"):
        sha256_batch(pa.array([b"x"]))
