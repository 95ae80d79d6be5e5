"""kernels/_cuda.py driven end to end without a GPU: CuPy replaced by tests/kernels/_fake_cupy.py,
whose kernels are the host-compiled bodies of kernels/cuda/*.cu.

The cuda backend must then agree with the cpu backend byte for byte, and every launch must pass
the fake's checks: each argument of the C parameter's exact type, pointers of the right element
type, a grid that covers every row, launches on a stream. The scenarios are those of
test_hash_gpu.py (run here at smaller sizes), plus a count of launches per Merkle tree.
Skipped when no host compiler is present.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from rayledger.kernels import (
    _backend,
    _cuda,
    ed25519_verify_batch,
    merkle_root,
    prepare,
    sha256_batch,
)
from rayledger.kernels.bench import bench_kernels
from tests.kernels import test_ed25519_gpu as ed
from tests.kernels import test_hash_gpu as gpu
from tests.kernels._fake_cupy import make_cupy
from tests.kernels._harness import build_harness


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_harness(tmp_path_factory.mktemp("fake_gpu"))


@pytest.fixture(autouse=True)
def fake_gpu(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    cp, cupyx = make_cupy(lib)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    # The shared scenarios are small: whatever this process was told, every batch to the device
    monkeypatch.setenv(_backend.MIN_ROWS_VAR, "0")
    monkeypatch.setattr(_cuda, "load_cupy", lambda: cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(_cuda, "_device", None)
    yield
    monkeypatch.setattr(_cuda, "_device", None)


def test_auto_uses_the_fake_device() -> None:
    assert _backend.available_backends() == ["cuda", "cpu"]
    assert _backend.resolve_backend() == "cuda"
    sha256_batch((np.zeros(3, np.uint8), np.array([0, 1, 3], np.int64)))
    assert _cuda.device().fn["sha256_var"].launches == 1  # type: ignore[attr-defined]


def test_auto_can_keep_small_batches_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.random.default_rng(0).integers(0, 256, (64, 32), dtype=np.uint8)
    vec = ed.ref.build(seed=4, honest_rows=16)
    keys, sigs, msgs = vec.arrays()
    # Unset, as documented: ``auto`` sends every batch to the device, however small
    monkeypatch.delenv(_backend.MIN_ROWS_VAR)
    merkle_root(rows[:2])
    ed25519_verify_batch(keys[:1], sigs[:1], msgs[:1])
    launches = {k: f.launches for k, f in _cuda.device().fn.items()}  # type: ignore[attr-defined]
    assert launches["merkle_leaves"] == 1 and launches["ed25519_verify"] == 1
    monkeypatch.setattr(_cuda, "_device", None)
    # With a threshold, batches below it stay on the CPU: CUDA never starts for them
    monkeypatch.setenv(_backend.MIN_ROWS_VAR, "32")
    sha256_batch(pa.array([r.tobytes() for r in rows[:31]], pa.binary(32)))
    merkle_root(rows[:31])
    ed25519_verify_batch(keys[:31], sigs[:31], msgs[:31])
    assert _cuda._device is None
    sha256_batch(pa.array([r.tobytes() for r in rows[:32]], pa.binary(32)))
    merkle_root(rows[:32])
    got = ed25519_verify_batch(keys[:32], sigs[:32], msgs[:32])
    assert got.tolist() == ed25519_verify_batch(keys[:32], sigs[:32], msgs[:32], "cpu").tolist()
    launches = {k: f.launches for k, f in _cuda.device().fn.items()}  # type: ignore[attr-defined]
    assert launches["sha256_fixed"] == 1 and launches["merkle_leaves"] == 1
    assert launches["ed25519_verify"] == 1
    # Explicit requests (argument or environment) are served as asked, whatever the size
    before = sum(launches.values())
    sha256_batch(pa.array([b"x"]), backend="cuda")
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    ed25519_verify_batch(keys[:1], sigs[:1], msgs[:1])
    launches = {k: f.launches for k, f in _cuda.device().fn.items()}  # type: ignore[attr-defined]
    assert sum(launches.values()) == before + 2 and launches["ed25519_verify"] == 2
    monkeypatch.setenv(_backend.MIN_ROWS_VAR, "many")
    monkeypatch.delenv(_backend.ENV_VAR)
    with pytest.raises(ValueError, match="RAYLEDGER_CUDA_MIN_ROWS"):
        merkle_root(rows)


@pytest.mark.parametrize("algorithm", gpu.ALGORITHMS)
def test_every_length_and_block_boundaries(algorithm: str) -> None:
    gpu.test_every_length_and_block_boundaries(algorithm)


@pytest.mark.parametrize("algorithm", gpu.ALGORITHMS)
@pytest.mark.parametrize("width", [0, 1, 32, 33, 64, 96])
def test_fixed_widths(algorithm: str, width: int) -> None:
    gpu.test_fixed_widths(algorithm, width)


def test_random_batches() -> None:
    gpu.test_random_batches()


@pytest.mark.parametrize("k", [0, 1, 79])
def test_rows(k: int) -> None:
    gpu.test_rows(k)


def test_many_pipelined_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu.test_many_pipelined_chunks(monkeypatch)
    launches = {name: k.launches for name, k in _cuda.device().fn.items()}  # type: ignore[attr-defined]
    assert launches["sha256_var"] > 100
    assert launches["sha256_var32"] > 100
    assert launches["sha512_fixed"] > 50


def test_merkle() -> None:
    gpu.test_merkle_every_n_to_1000()
    gpu.test_merkle_large(70_001)
    gpu.test_merkle_root_on_device_matches()


def test_merkle_is_one_launch_per_level() -> None:
    leaves = np.random.default_rng(3).integers(0, 256, (1000, 32), dtype=np.uint8)
    merkle_root(leaves)
    fn = _cuda.device().fn
    assert fn["merkle_leaves"].launches == 1  # type: ignore[attr-defined]
    assert fn["merkle_level"].launches == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("fn", [gpu.sha256_batch, gpu.sha512_batch])
def test_bad_offsets_refused_before_launch(fn: object) -> None:
    gpu.test_bad_offsets_refused_before_launch(fn)
    assert _cuda._device is None or not any(
        k.launches  # type: ignore[attr-defined]
        for k in _cuda._device.fn.values()
    )


@pytest.mark.parametrize("algorithm", gpu.ALGORITHMS)
@pytest.mark.parametrize("bad", [[0, 5, 3, 8], [0, 4, 11], [0, 2, 2, 1 << 40]])
def test_device_bounds_check_flags_bad_rows(algorithm: str, bad: list[int]) -> None:
    gpu.test_device_bounds_check_flags_bad_rows(algorithm, bad)


def test_bench_reports_gpu_rows_and_ratios() -> None:
    rows = bench_kernels(
        batch_size=300,
        gpu_batch_size=300,
        merkle_leaves=64,
        gpu_merkle_leaves=(64,),
        repeat=1,
        ed25519_batch_size=200,
        gpu_ed25519_batch_size=300,
    )
    backends = {(r["operation"], r["backend"]) for r in rows}
    assert ("sha256", "cuda-resident") in backends
    assert ("sha512", "cuda") in backends
    assert ("merkle_root", "cuda-resident") in backends
    assert ("sha256_rows (tx ids)", "cuda") in backends
    assert ("ed25519_verify", "cuda") in backends
    assert ("ed25519_verify (batch of 64)", "cuda") in backends
    assert ("sha256 (batch of 1,024)", "cpu") in backends
    for r in rows:
        if r["backend"] in ("cpu", "cuda", "cuda-resident"):
            assert r["ratio_gpu_cpu"] is not None and r["ratio_gpu_cpu"] > 0, r


def test_prepare_compiles_the_module_and_launches_nothing() -> None:
    assert _cuda._device is None
    assert prepare() == "cuda"
    dev = _cuda.device()
    assert set(dev.fn) == set(_cuda.KERNELS)
    assert not any(k.launches for k in dev.fn.values())  # type: ignore[attr-defined]


def test_ed25519_rows() -> None:
    ed.test_hostile_and_honest_rows(honest_rows=16)
    assert _cuda.device().fn["ed25519_verify"].launches == 1  # type: ignore[attr-defined]


def test_ed25519_pipelined_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    ed.test_many_pipelined_chunks(monkeypatch, rows=300)
    kernel = _cuda.device().fn["ed25519_verify"]
    rows = len(ed.ref.build(seed=97, honest_rows=150).keys)
    assert kernel.launches == -(-rows // 97) > 4  # type: ignore[attr-defined]
    assert set(kernel.blocks) == {_cuda.ED25519_BLOCK}  # type: ignore[attr-defined]


def test_ed25519_block_capped_by_the_compiled_kernel() -> None:
    kernel = _cuda.device().fn["ed25519_verify"]
    kernel.max_threads_per_block = 64  # type: ignore[attr-defined]
    ed.test_column_slices_and_empty_batch()
    assert set(kernel.blocks) == {64}  # type: ignore[attr-defined]


def test_ed25519_large_batch() -> None:
    ed.test_large_batch(n=3000)


@pytest.mark.parametrize("shapes", [((4, 31), (4, 64), (4, 32)), ((4, 32), (3, 64), (4, 32))])
def test_ed25519_bad_shapes_refused_before_launch(shapes: tuple[tuple[int, int], ...]) -> None:
    ed.test_bad_shapes_refused_before_launch(*shapes)
    assert _cuda._device is None


def test_ed25519_messages_of_any_length() -> None:
    ed.test_messages_of_any_length(limit=400)
    kernel = _cuda.device().fn["ed25519_verify_var"]
    assert kernel.launches == 3  # type: ignore[attr-defined]


def test_ed25519_messages_of_any_length_in_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    ed.test_messages_of_any_length_in_many_chunks(monkeypatch)
    assert _cuda.device().fn["ed25519_verify_var"].launches > 20  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [[0, 5, 3], [0, 4, 11], [0, 2, 1 << 40]])
def test_ed25519_offsets_leaving_the_buffer_are_flagged_on_the_device(bad: list[int]) -> None:
    ed.test_offsets_leaving_the_buffer_are_flagged_on_the_device(bad)
