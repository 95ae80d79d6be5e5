"""Kernel benchmarks: every backend present on the same inputs in one run, reported as rates
and ratios (GPU / CPU, and the batch call / a bare one-core loop, the raw CPU limit).

``bench_kernels`` is what ``rayledger bench kernels`` prints; ``bench_cpu_workers`` measured the
break-even of the CPU worker processes (``_cpu.PARALLEL_MIN_ROWS``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rayledger.kernels import _cpu
from rayledger.kernels._backend import available_backends
from rayledger.kernels.ed25519 import ed25519_verify_batch
from rayledger.kernels.merkle import merkle_root
from rayledger.kernels.sha import sha256_batch, sha256_rows, sha512_batch

Row = dict[str, Any]


def best_seconds(fn: Callable[[], object], repeat: int = 3, *, warm_up: bool = True) -> float:
    """Best of ``repeat`` wall times (the least disturbed run on a shared machine), after one
    warm-up call (module compilation, worker start, staging buffers) unless told not to."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _row(
    operation: str, backend: str, size: int, batch: int, seconds: float, **ratios: float | None
) -> Row:
    return {
        "operation": operation,
        "backend": backend,
        "message_size": size,
        "batch_size": batch,
        "rate_per_s": batch / seconds,
        "ratio_gpu_cpu": ratios.get("ratio_gpu_cpu"),
        "ratio_to_raw_loop": ratios.get("ratio_to_raw_loop"),
        # The same ratio under its earlier name, for the hash rows (against hashlib)
        "ratio_to_hashlib": (
            ratios.get("ratio_to_raw_loop") if operation.startswith("sha") else None
        ),
    }


def _fixed_messages(size: int, n: int, seed: int) -> pa.FixedSizeBinaryArray:
    raw = np.random.default_rng(seed).integers(0, 256, n * size, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [None, pa.py_buffer(raw)])


def _hashlib_loop(algorithm: str, arr: pa.FixedSizeBinaryArray) -> Callable[[], object]:
    messages = arr.to_pylist()
    sha = getattr(hashlib, algorithm)

    def loop() -> None:
        for m in messages:
            sha(m).digest()

    return loop


def _with_gpu_ratio(rows: list[Row]) -> list[Row]:
    """Give each cuda row (and its cpu partner) the GPU/CPU ratio of the same operation."""
    cpu = {(r["operation"], r["message_size"]): r for r in rows if r["backend"] == "cpu"}
    for r in rows:
        partner = cpu.get((r["operation"], r["message_size"]))
        if r["backend"].startswith("cuda") and partner is not None:
            r["ratio_gpu_cpu"] = r["rate_per_s"] / partner["rate_per_s"]
            if partner["ratio_gpu_cpu"] is None or r["backend"] == "cuda":
                partner["ratio_gpu_cpu"] = r["ratio_gpu_cpu"]
    return rows


def bench_kernels(
    batch_size: int = 200_000,
    gpu_batch_size: int = 1 << 22,
    merkle_leaves: int = 1 << 20,
    gpu_merkle_leaves: tuple[int, ...] = (1 << 20, 1 << 24),
    repeat: int = 3,
    ed25519_batch_size: int = 20_000,
    gpu_ed25519_batch_size: int = 1 << 20,
) -> list[Row]:
    """Rates of every kernel on every backend here, with ratios measured in this run.

    Rows: ``operation, backend, message_size, batch_size, rate_per_s, ratio_gpu_cpu`` (None
    without a GPU) and ``ratio_to_raw_loop`` (cpu rows: the batch call over a bare one-core loop
    on the same inputs, ``hashlib`` for hashes and OpenSSL for Ed25519). Backends:
    ``hashlib-loop`` and ``openssl-loop`` (the raw one-core limits), ``cpu``,
    and with a GPU ``cuda`` (host buffers in, digests out, copies included) and
    ``cuda-resident`` (inputs already on the device, digests left there).
    """
    gpu = "cuda" in available_backends()
    rows: list[Row] = []
    cases: list[tuple[str, int, Callable[..., np.ndarray]]] = [
        ("sha256", 32, sha256_batch),
        ("sha256", 64, sha256_batch),
        ("sha256", 150, sha256_batch),
        ("sha512", 96, sha512_batch),
    ]
    for operation, size, fn in cases:
        arr = _fixed_messages(size, batch_size, seed=size)
        loop_s = best_seconds(_hashlib_loop(operation, arr), repeat)
        rows.append(_row(operation, "hashlib-loop", size, batch_size, loop_s))
        cpu_s = best_seconds(partial(fn, arr, backend="cpu"), repeat)
        rows.append(
            _row(
                operation,
                "cpu",
                size,
                batch_size,
                cpu_s,
                ratio_to_raw_loop=loop_s / cpu_s,
            )
        )
        if gpu:
            big = _fixed_messages(size, gpu_batch_size, seed=size)
            gpu_s = best_seconds(partial(fn, big, backend="cuda"), repeat)
            rows.append(_row(operation, "cuda", size, gpu_batch_size, gpu_s))
            rows.append(_resident_row(operation, size, big, repeat))

    # Transaction ids: a 79-byte header per row, then a variable payload (about 150 bytes).
    head = np.random.default_rng(79).integers(0, 256, (batch_size, 79), dtype=np.uint8)
    payload = _payloads(batch_size)
    tx_s = best_seconds(lambda: sha256_rows(head, payload, backend="cpu"), repeat)
    rows.append(_row("sha256_rows (tx ids)", "cpu", 150, batch_size, tx_s))
    if gpu:
        big_head = np.random.default_rng(80).integers(0, 256, (gpu_batch_size, 79), np.uint8)
        big_payload = _payloads(gpu_batch_size)
        gpu_s = best_seconds(lambda: sha256_rows(big_head, big_payload, backend="cuda"), repeat)
        rows.append(_row("sha256_rows (tx ids)", "cuda", 150, gpu_batch_size, gpu_s))

    leaves = np.random.default_rng(6962).integers(0, 256, (merkle_leaves, 32), dtype=np.uint8)
    cpu_s = best_seconds(lambda: merkle_root(leaves, backend="cpu"), repeat)
    rows.append(_row("merkle_root", "cpu", 32, merkle_leaves, cpu_s))
    if gpu:
        for n in gpu_merkle_leaves:
            many = np.random.default_rng(n).integers(0, 256, (n, 32), dtype=np.uint8)
            gpu_s = best_seconds(partial(merkle_root, many, backend="cuda"), repeat)
            rows.append(_row("merkle_root", "cuda", 32, n, gpu_s))
            rows.append(_resident_merkle_row(many, repeat))
    rows += _ed25519_rows(ed25519_batch_size, gpu_ed25519_batch_size if gpu else 0, repeat)
    if gpu:
        rows += _crossover_rows(repeat)
    return _with_gpu_ratio(rows)


def _crossover_rows(repeat: int) -> list[Row]:
    """Small batches on both backends, explicitly: where the GPU starts to pay, which is what
    ``RAYLEDGER_CUDA_MIN_ROWS`` should say (batch / ``rate_per_s`` is the latency)."""
    rows: list[Row] = []
    for n in (64, 1024, 16_384):
        arr = _fixed_messages(32, n, seed=n)
        for backend in ("cpu", "cuda"):
            seconds = best_seconds(partial(sha256_batch, arr, backend=backend), max(repeat, 5))
            rows.append(_row(f"sha256 (batch of {n:,})", backend, 32, n, seconds))
    keys, sigs, msgs = _signed_rows(1024)
    for n in (16, 64, 256, 1024):
        part = (keys[:n], sigs[:n], msgs[:n])
        for backend in ("cpu", "cuda"):
            seconds = best_seconds(partial(ed25519_verify_batch, *part, backend), max(repeat, 5))
            rows.append(_row(f"ed25519_verify (batch of {n:,})", backend, 32, n, seconds))
    return rows


def _signed_rows(n: int, pool: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` valid (key, signature, 32-byte message) rows drawn from ``pool`` signed ones."""
    rng = np.random.default_rng(25519)
    seeds = rng.integers(0, 256, (pool, 32), dtype=np.uint8)
    msgs = rng.integers(0, 256, (pool, 32), dtype=np.uint8)
    keys = np.empty((pool, 32), np.uint8)
    sigs = np.empty((pool, 64), np.uint8)
    for i in range(pool):
        key = Ed25519PrivateKey.from_private_bytes(seeds[i].tobytes())
        keys[i] = np.frombuffer(key.public_key().public_bytes_raw(), np.uint8)
        sigs[i] = np.frombuffer(key.sign(msgs[i].tobytes()), np.uint8)
    pick = rng.integers(0, pool, n)
    return keys[pick], sigs[pick], msgs[pick]


def _ed25519_rows(batch: int, gpu_batch: int, repeat: int) -> list[Row]:
    """Ed25519 verification: a bare one-core OpenSSL loop, the cpu batch call, the GPU."""
    keys, sigs, msgs = _signed_rows(batch)
    sample = min(batch, 4_000)
    public = [Ed25519PublicKey.from_public_bytes(k.tobytes()) for k in keys[:sample]]
    pairs = [(s.tobytes(), m.tobytes()) for s, m in zip(sigs[:sample], msgs[:sample], strict=True)]

    def loop() -> None:
        for key, (sig, msg) in zip(public, pairs, strict=True):
            key.verify(sig, msg)

    loop_s = best_seconds(loop, repeat)
    cpu_s = best_seconds(partial(ed25519_verify_batch, keys, sigs, msgs, "cpu"), repeat)
    rows = [
        _row("ed25519_verify", "openssl-loop", 32, sample, loop_s),
        _row(
            "ed25519_verify",
            "cpu",
            32,
            batch,
            cpu_s,
            ratio_to_raw_loop=(batch / cpu_s) / (sample / loop_s),
        ),
    ]
    if gpu_batch:
        big = _signed_rows(gpu_batch)
        gpu_s = best_seconds(partial(ed25519_verify_batch, *big, "cuda"), repeat)
        rows.append(_row("ed25519_verify", "cuda", 32, gpu_batch, gpu_s))
    return rows


def _payloads(n: int) -> pa.BinaryArray:
    rng = np.random.default_rng(n)
    lengths = rng.integers(40, 103, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, 256, int(offsets[-1]), dtype=np.uint8)
    return pa.BinaryArray.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(values)]
    )


def _resident_row(operation: str, size: int, arr: pa.FixedSizeBinaryArray, repeat: int) -> Row:
    from rayledger.kernels import _cuda

    dev = _cuda.device()
    n = len(arr)
    raw = np.frombuffer(arr.buffers()[1], np.uint8)[: n * size]
    with dev.lock:
        d_values = dev.cp.asarray(raw)
        seconds = best_seconds(
            lambda: dev.hash_fixed_on_device(operation, d_values, size, n), repeat
        )
    return _row(operation, "cuda-resident", size, n, seconds)


def _resident_merkle_row(leaves: np.ndarray, repeat: int) -> Row:
    from rayledger.kernels import _cuda

    dev = _cuda.device()
    with dev.lock:
        d_leaves = dev.cp.asarray(leaves).reshape(-1)
        seconds = best_seconds(lambda: dev.merkle_root_on_device(d_leaves, len(leaves)), repeat)
    return _row("merkle_root", "cuda-resident", 32, len(leaves), seconds)


def bench_cpu_workers(
    sizes: tuple[int, ...] = (32, 150),
    batch_sizes: tuple[int, ...] = (1_000, 4_000, 16_000, 200_000),
    repeat: int = 5,
) -> list[Row]:
    """SHA-256 on the CPU with and without worker processes, for the split's break-even.

    Rows as in ``bench_kernels`` with backends ``cpu-1proc`` (the caller alone) and ``cpu``
    (caller plus workers); ``ratio_to_raw_loop`` is unused and ``ratio_gpu_cpu`` None.
    """
    rows: list[Row] = []
    saved = _cpu.PARALLEL_MIN_ROWS
    try:
        for size in sizes:
            for n in batch_sizes:
                arr = _fixed_messages(size, n, seed=n)
                for backend, threshold in (("cpu-1proc", 1 << 62), ("cpu", 1)):
                    _cpu.PARALLEL_MIN_ROWS = threshold
                    seconds = best_seconds(partial(sha256_batch, arr, "cpu"), repeat)
                    rows.append(_row("sha256", backend, size, n, seconds))
    finally:
        _cpu.PARALLEL_MIN_ROWS = saved
    return rows
