"""Ed25519 keys for validators and e-service clients: generation, key files, signing, and the
``Signer``/``Verifier`` interfaces through which the protocol signs and checks in batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rayledger.errors import ConfigError
from rayledger.kernels import ed25519_verify_batch

SigningKey = Ed25519PrivateKey

# Encodings of the eight points of small order (8P = identity), canonical and not. A signature
# "by" such a key can be made without any secret (with A the identity, R = [S]B verifies for any
# message), so the ledger refuses them as keys; the signature rule itself stays OpenSSL's.
SMALL_ORDER_KEYS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    )
)


def small_order_mask(public_keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``(n, 32)`` keys that encode a point of small order."""
    keys = np.ascontiguousarray(public_keys, np.uint8).reshape(-1, 32)
    # Every such encoding has bytes 9..30 all 0x00 or all 0xff, or is one of the four order-8
    # points: a cheap filter first, exact membership for the few candidates
    middle = keys[:, 9:31]
    candidates = (middle == 0).all(axis=1) | (middle == 0xFF).all(axis=1)
    candidates |= np.isin(keys[:, 0], (0x26, 0xC7))
    out = np.zeros(len(keys), np.bool_)
    for i in np.flatnonzero(candidates).tolist():
        out[i] = keys[i].tobytes() in SMALL_ORDER_KEYS
    return out


_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def is_curve_point(key: bytes) -> bool:
    """Whether 32 bytes are the canonical encoding of a point on Ed25519 (RFC 8032, 5.1.3).

    OpenSSL loads any 32 bytes as a public key and only fails each verification later, so a
    key that is no point at all (a typo, a hash pasted by mistake) would make a validator that
    can never vote, or an account nobody can spend from. Keys are few (a genesis file's), so
    plain integers do: y below p, x^2 = (y^2 - 1) / (d y^2 + 1) a square, and not "-0"."""
    if len(key) != 32:
        return False
    y = int.from_bytes(key, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return False
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P:
            return False
    return not (x == 0 and sign)


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
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


class Signer(Protocol):
    """Signs 32-byte protocol digests with one validator's key."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


class Verifier(Protocol):
    """Checks many signatures in one call (one kernel launch on a GPU backend)."""

    def verify(
        self, public_keys: np.ndarray, signatures: np.ndarray, messages: np.ndarray
    ) -> np.ndarray:
        """Row i: does ``signatures[i]`` sign ``messages[i]`` under ``public_keys[i]``?"""
        ...


class Ed25519Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public = public_bytes(key)

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


class Ed25519Verifier:
    """OpenSSL's acceptance rule through ``rayledger.kernels`` (backend chosen there)."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def verify(
        self, public_keys: np.ndarray, signatures: np.ndarray, messages: np.ndarray
    ) -> np.ndarray:
        return ed25519_verify_batch(public_keys, signatures, messages, backend=self.backend)
