"""Batch cryptography for the ledger: SHA-256, SHA-512, RFC 6962 Merkle trees and Ed25519.

Inputs are columnar (Arrow arrays or numpy buffers with offsets); outputs are numpy arrays with
one row per message. Two backends give byte-identical results: ``cpu`` (OpenSSL over
zero-copy views in one compiled loop per batch, ``hashlib`` where that cannot be built; see
``_native``) and ``cuda`` (CuPy kernels compiled from
``kernels/cuda/*.cu``). ``backend="auto"`` picks ``cuda`` when CuPy sees a device, and the
``RAYLEDGER_KERNELS`` environment variable forces one; an explicit choice never falls back.
"""

from __future__ import annotations

from rayledger.kernels._backend import available_backends, prepare, resolve_backend
from rayledger.kernels._inputs import byte_rows
from rayledger.kernels.ed25519 import cpu_verify_work, ed25519_verify_batch
from rayledger.kernels.merkle import (
    merkle_levels,
    merkle_levels_of_leaf_hashes,
    merkle_root,
    merkle_root_of_leaf_hashes,
)
from rayledger.kernels.sha import (
    Messages,
    as_offsets_and_values,
    sha256_batch,
    sha256_rows,
    sha512_batch,
)

__all__ = [
    "Messages",
    "as_offsets_and_values",
    "available_backends",
    "byte_rows",
    "cpu_verify_work",
    "ed25519_verify_batch",
    "merkle_levels",
    "merkle_levels_of_leaf_hashes",
    "merkle_root",
    "merkle_root_of_leaf_hashes",
    "prepare",
    "resolve_backend",
    "sha256_batch",
    "sha256_rows",
    "sha512_batch",
]
