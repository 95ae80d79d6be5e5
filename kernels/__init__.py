"""Batch cryptography for the ledger: SHA-256 over many messages and Ed25519 verification.

Inputs are columnar (Arrow arrays or numpy buffers with offsets); outputs are numpy arrays with
one row per message. Only the CPU backend exists so far; ``backend="auto"`` picks the best
backend present and ``RAYLEDGER_KERNELS`` forces one.
"""

from __future__ import annotations

from rayledger.kernels._backend import available_backends, resolve_backend
from rayledger.kernels.ed25519 import ed25519_verify_batch
from rayledger.kernels.sha import Messages, as_offsets_and_values, sha256_batch, sha256_rows

__all__ = [
    "Messages",
    "as_offsets_and_values",
    "available_backends",
    "ed25519_verify_batch",
    "resolve_backend",
    "sha256_batch",
    "sha256_rows",
]
