"""Ed25519 verification: the cuda backend against the cpu backend (OpenSSL), row for row.

Marked ``gpu``; skipped unless CuPy imports and sees a device. tests/kernels/test_cuda_fake.py
runs the same scenarios at smaller sizes through the host-compiled kernel. Scenarios:
- honest, bit-flipped and hostile rows (tests/kernels/_ed25519_vectors.py), one batch;
- a batch cut into many pipelined chunks (both streams and staging slots in turn);
- a large batch at the default chunk size, rows repeated from a signed pool;
- column slices (non-contiguous inputs), and shapes refused before any launch;
- messages of every length around the SHA-512 block boundaries (Arrow binary and large
  binary, fixed rows of another width), in one batch and cut into many chunks; offsets that
  leave the buffer flagged by the device-side bounds check, nothing read.
Run once under ``compute-sanitizer --tool memcheck`` on the GPU machine as well.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from rayledger.kernels import _cuda, available_backends, ed25519_verify_batch
from tests.kernels import _ed25519_vectors as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in available_backends(), reason="no CUDA device (or no CuPy)"),
]


def _same(keys: np.ndarray, sigs: np.ndarray, msgs: Any) -> np.ndarray:
    want = ref.openssl(keys, sigs, msgs)
    got = ed25519_verify_batch(keys, sigs, msgs, backend="cuda")
    assert got.dtype == np.bool_ and got.shape == want.shape
    assert (got == want).all(), np.flatnonzero(got != want)[:20]
    return got


def test_hostile_and_honest_rows(honest_rows: int = 512) -> None:
    vec = ref.build(seed=2026, honest_rows=honest_rows)
    got = _same(*vec.arrays())
    assert got.any() and not got.all()


def test_many_pipelined_chunks(monkeypatch: pytest.MonkeyPatch, rows: int = 3000) -> None:
    monkeypatch.setattr(_cuda, "CHUNK_BYTES", 128 * 97)  # 97 rows a chunk, a ragged last one
    vec = ref.build(seed=97, honest_rows=rows // 2)
    _same(*vec.arrays())


def test_large_batch(n: int = 1 << 20) -> None:
    vec = ref.Vectors()
    ref.honest(__import__("random").Random(5), 2048, vec)
    keys, sigs, msgs = vec.arrays()
    pick = np.random.default_rng(6).integers(0, len(keys), n)
    got = _same(keys[pick], sigs[pick], msgs[pick])
    assert got.sum() == (np.array(vec.categories)[pick] == "honest").sum()


def test_column_slices_and_empty_batch() -> None:
    vec = ref.build(seed=3, honest_rows=32)
    keys, sigs, msgs = vec.arrays()
    wide = np.concatenate([keys, sigs, msgs], axis=1)  # one row of 128 bytes per signature
    _same(wide[:, :32], wide[:, 32:96], wide[:, 96:])
    empty = ed25519_verify_batch(keys[:0], sigs[:0], msgs[:0], backend="cuda")
    assert empty.shape == (0,) and empty.dtype == np.bool_


@pytest.mark.parametrize(
    ("keys", "sigs", "msgs"),
    [
        ((4, 31), (4, 64), (4, 32)),
        ((4, 32), (3, 64), (4, 32)),
        ((4, 32), (4, 64), (4, 33)),
    ],
)
def test_bad_shapes_refused_before_launch(
    keys: tuple[int, int], sigs: tuple[int, int], msgs: tuple[int, int]
) -> None:
    with pytest.raises(ValueError, match="must have shape"):
        ed25519_verify_batch(
            np.zeros(keys, np.uint8), np.zeros(sigs, np.uint8), np.zeros(msgs, np.uint8), "cuda"
        )


def test_messages_of_any_length(limit: int = 1200) -> None:
    keys, sigs, msgs, valid = ref.variable_length(
        random.Random(9), ref.lengths_around_blocks(limit)
    )
    assert (_same(keys, sigs, pa.array(msgs, pa.binary())) == valid).all()
    assert (_same(keys, sigs, pa.array(msgs, pa.large_binary())) == valid).all()
    k, s, m, ok = ref.variable_length(random.Random(10), [48] * 40)
    assert (_same(k, s, np.frombuffer(b"".join(m), np.uint8).reshape(40, 48)) == ok).all()


def test_messages_of_any_length_in_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "CHUNK_BYTES", 4096)
    lengths = [random.Random(11).randrange(0, 700) for _ in range(400)] + [9000]  # > a chunk
    keys, sigs, msgs, valid = ref.variable_length(random.Random(12), lengths)
    assert (_same(keys, sigs, pa.array(msgs, pa.binary())) == valid).all()


@pytest.mark.parametrize("bad", [[0, 5, 3], [0, 4, 11], [0, 2, 1 << 40]])
def test_offsets_leaving_the_buffer_are_flagged_on_the_device(bad: list[int]) -> None:
    keys, sigs, msgs = ref.build(seed=5, honest_rows=2).arrays()
    values = np.arange(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="flagged on the device"):
        _cuda.ed25519_verify_var(keys[:2], sigs[:2], values, np.array(bad, np.int64))
    _same(keys, sigs, msgs)  # the device is still usable afterwards
