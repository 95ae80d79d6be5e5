"""Batch Ed25519 verification with OpenSSL's acceptance rule.

Two backends answer identically for every row: ``cpu`` calls OpenSSL through ``cryptography``
(one thread per core for large batches), and ``cuda`` runs ``kernels/cuda/ed25519.cu``, which
implements OpenSSL's rule (S < L, its lenient key decoding, the cofactorless equation compared
byte for byte) one signature per GPU thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rayledger.kernels._backend import for_batch, resolve_backend
from rayledger.kernels._inputs import Messages, message_buffers

# Below this many rows a thread hand-off costs more than it saves.
_PARALLEL_MIN_ROWS = 512
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="ed25519")
    return _pool


def _verify_range(
    keys: np.ndarray,
    sigs: np.ndarray,
    message: Callable[[int], bytes],
    start: int,
    stop: int,
    out: np.ndarray,
) -> None:
    cache: dict[bytes, Ed25519PublicKey | None] = {}
    for i in range(start, stop):
        raw = keys[i].tobytes()
        if raw in cache:
            key = cache[raw]
        else:
            try:
                key = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                key = None
            cache[raw] = key
        if key is None:
            out[i] = False
            continue
        try:
            key.verify(sigs[i].tobytes(), message(i))
            out[i] = True
        except InvalidSignature:
            out[i] = False


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

        def message(i: int) -> bytes:
            return rows[i].tobytes()

    else:
        assert values is not None and offsets is not None
        bounds, data = offsets.tolist(), values

        def message(i: int) -> bytes:
            return data[bounds[i] : bounds[i + 1]].tobytes()

    out = np.zeros(n, dtype=np.bool_)
    workers = _workers()
    if n < _PARALLEL_MIN_ROWS or workers == 1:
        _verify_range(public_keys, signatures, message, 0, n, out)
        return out
    step = -(-n // workers)
    futures = [
        _get_pool().submit(
            _verify_range, public_keys, signatures, message, s, min(s + step, n), out
        )
        for s in range(0, n, step)
    ]
    for f in futures:
        f.result()
    return out
