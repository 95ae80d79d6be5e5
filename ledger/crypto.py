"""Ed25519 keys for validators and e-service clients: generation, key files, signing.

Batch verification lives in ``rayledger.kernels``; this module is the single-key side.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rayledger.errors import ConfigError

SigningKey = Ed25519PrivateKey


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """A deterministic key from a 32-byte seed (tests, simulations, reproducible demos)."""
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def write_key_file(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> None:
    """Write a PKCS#8 PEM private key readable by its owner only (0600), never overwriting."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: a key file is an identity; silently replacing one would orphan its validator.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(target, 0o600)


def read_key_file(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key
