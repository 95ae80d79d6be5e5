"""Batch Ed25519 verification with OpenSSL's acceptance rule.

Two backends answer identically for every row: ``cpu`` (one thread per core for large
batches) and ``cuda``, which runs ``kernels/cuda/ed25519.cu``: OpenSSL's rule (S < L, its lenient
key decoding, the cofactorless equation compared byte for byte) one signature per GPU thread.

The ``cpu`` backend asks libsodium (through PyNaCl) first: it verifies about 1.8 times as fast as
OpenSSL here, and its rule is OpenSSL's with more refusals (it also refuses small-order and
non-canonical keys and small-order R; the equation, the hash and S < L are the same), so a row it
accepts is a row OpenSSL accepts. Every row it refuses goes to OpenSSL through ``cryptography``,
whose answer stands: honest rows cost one libsodium check, and the answer is OpenSSL's for every
row. ``tests/kernels`` checks both halves of that claim on hostile rows of every family.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from rayledger.kernels._backend import for_batch, resolve_backend
from rayledger.kernels._inputs import Messages, message_buffers

# Below this many rows a thread hand-off costs more than it saves.
_PARALLEL_MIN_ROWS = 512
_pool: ThreadPoolExecutor | None = None
# Rows the cpu backend checked in this process, and the CPU time of the threads that checked
# them (inside the checks only): the speed the checks actually ran at here
_work = [0, 0.0]
_work_lock = threading.Lock()


def cpu_verify_work() -> tuple[int, float]:
    """``(rows, seconds)``: the signatures the cpu backend checked in this process so far and
    the CPU seconds its checking threads spent on them (benchmarks compare a network's own
    checking speed with a quiet core's)."""
    with _work_lock:
        return int(_work[0]), float(_work[1])


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    """One pool per process, made once however many threads check batches at once."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="ed25519")
        return _pool


def _verify_range(
    keys: np.ndarray,
    sigs: np.ndarray,
    message: Callable[[int], bytes],
    signed: Callable[[int], bytes],
    start: int,
    stop: int,
    out: np.ndarray,
) -> None:
    """Rows ``start:stop``; ``signed(i)`` is row i's signature followed by its message."""
    began = time.thread_time()
    cache: dict[bytes, Ed25519PublicKey | None] = {}
    for i in range(start, stop):
        raw = keys[i].tobytes()
        try:
            crypto_sign_open(signed(i), raw)
            out[i] = True
            continue
        except CryptoError:
            pass  # refused by the stricter rule: OpenSSL decides
        out[i] = _openssl_verify(cache, raw, sigs[i].tobytes(), message(i))
    spent = time.thread_time() - began
    with _work_lock:
        _work[0] += stop - start
        _work[1] += spent


def _openssl_verify(
    cache: dict[bytes, Ed25519PublicKey | None], raw: bytes, sig: bytes, msg: bytes
) -> bool:
    """OpenSSL's answer (keys decoded once per batch range: senders repeat)."""
    if raw in cache:
        key = cache[raw]
    else:
        try:
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            key = None
        cache[raw] = key
    if key is None:
        return False
    try:
        key.verify(sig, msg)
    except InvalidSignature:
        return False
    return True


def _check(name: str, arr: np.ndarray, width: int, n: int) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"{name} must be a two-dimensional uint8 numpy array")
    if arr.shape != (n, width):
        raise ValueError(f"{name} must have shape ({n}, {width}), got {arr.shape}")
    return arr


def ed25519_verify_batch(
    public_keys: np.ndarray,
    signatures: np.ndarray,
    messages: np.ndarray | Messages,
    backend: str = "auto",
) -> np.ndarray:
    """Verify row i's signature over row i's message; return a boolean mask.

    ``public_keys`` is ``(n, 32)`` and ``signatures`` ``(n, 64)`` uint8. ``messages`` is an
    ``(n, w)`` uint8 array (the ledger signs 32-byte digests: the fast path) or, for messages
    of any length, a ``pyarrow`` Binary, LargeBinary or FixedSizeBinary array or a
    ``(values, offsets)`` pair, as the hash functions take them. The answer for every row is
    exactly what OpenSSL's ``EVP_DigestVerify`` gives, which is the acceptance rule every
    validator must share.
    """
    chosen = resolve_backend(backend)
    n = len(public_keys) if isinstance(public_keys, np.ndarray) else -1
    _check("public_keys", public_keys, 32, n)
    _check("signatures", signatures, 64, n)
    fixed: np.ndarray | None = None
    values = offsets = None
    if isinstance(messages, np.ndarray):
        if messages.dtype != np.uint8 or messages.ndim != 2:
            raise ValueError("messages must be a two-dimensional uint8 numpy array")
        if messages.shape[0] != n:
            raise ValueError(f"messages must have {n} rows, got {messages.shape[0]}")
        if messages.shape[1] == 32:
            fixed = messages
        else:
            values = np.ascontiguousarray(messages).reshape(-1)
            offsets = np.arange(n + 1, dtype=np.int64) * messages.shape[1]
    else:
        values, offsets = message_buffers(messages)
        if len(offsets) != n + 1:
            raise ValueError(f"{n} keys but {len(offsets) - 1} messages")
    if for_batch(backend, chosen, n, "ed25519") == "cuda" and n:
        from rayledger.kernels import _cuda

        if fixed is not None:
            return _cuda.ed25519_verify(public_keys, signatures, fixed)
        assert values is not None and offsets is not None
        return _cuda.ed25519_verify_var(public_keys, signatures, values, offsets)
    if fixed is not None:
        rows = fixed
        # Signature and digest side by side: libsodium takes them as one buffer per row.
        joined = np.concatenate((signatures, fixed), axis=1)

        def message(i: int) -> bytes:
            return rows[i].tobytes()

        def signed(i: int) -> bytes:
            return joined[i].tobytes()

    else:
        assert values is not None and offsets is not None
        bounds, data = offsets.tolist(), values

        def message(i: int) -> bytes:
            return data[bounds[i] : bounds[i + 1]].tobytes()

        def signed(i: int) -> bytes:
            return signatures[i].tobytes() + message(i)

    out = np.zeros(n, dtype=np.bool_)
    workers = _workers()
    if n < _PARALLEL_MIN_ROWS or workers == 1:
        _verify_range(public_keys, signatures, message, signed, 0, n, out)
        return out
    step = -(-n // workers)
    futures = [
        _get_pool().submit(
            _verify_range, public_keys, signatures, message, signed, s, min(s + step, n), out
        )
        for s in range(0, n, step)
    ]
    for f in futures:
        f.result()
    return out
