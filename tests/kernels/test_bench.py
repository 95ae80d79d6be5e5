"""kernels/bench.py on small sizes: the rows it reports and the ratios it derives."""

from __future__ import annotations

import pytest

from rayledger.kernels import _cpu, available_backends
from rayledger.kernels.bench import bench_cpu_workers, bench_kernels

KEYS = {
    "operation",
    "backend",
    "message_size",
    "batch_size",
    "rate_per_s",
    "ratio_gpu_cpu",
    "ratio_to_raw_loop",
    "ratio_to_hashlib",
}


@pytest.mark.skipif("cuda" in available_backends(), reason="small CPU-only run")
def test_bench_kernels_cpu_rows() -> None:
    rows = bench_kernels(batch_size=500, merkle_leaves=300, repeat=1, ed25519_batch_size=300)
    assert all(set(r) == KEYS for r in rows)
    assert all(r["rate_per_s"] > 0 and r["ratio_gpu_cpu"] is None for r in rows)
    seen = {(r["operation"], r["backend"], r["message_size"]) for r in rows}
    for size in (32, 64, 150):
        assert ("sha256", "cpu", size) in seen
        assert ("sha256", "hashlib-loop", size) in seen
    assert ("sha512", "cpu", 96) in seen
    assert ("merkle_root", "cpu", 32) in seen
    assert ("ed25519_verify", "openssl-loop", 32) in seen
    assert ("ed25519_verify", "cpu", 32) in seen
    cpu = [r for r in rows if r["backend"] == "cpu" and r["operation"] != "merkle_root"]
    assert all(r["ratio_to_raw_loop"] > 0 for r in cpu if r["operation"] != "sha256_rows (tx ids)")
    sha = [r for r in cpu if r["operation"] in ("sha256", "sha512")]
    assert sha and all(r["ratio_to_hashlib"] == r["ratio_to_raw_loop"] for r in sha)


def test_bench_cpu_workers_restores_the_threshold() -> None:
    saved = _cpu.PARALLEL_MIN_ROWS
    rows = bench_cpu_workers(sizes=(32,), batch_sizes=(200,), repeat=1)
    assert saved == _cpu.PARALLEL_MIN_ROWS
    assert [r["backend"] for r in rows] == ["cpu-1proc", "cpu"]
