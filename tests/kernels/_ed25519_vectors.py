"""Ed25519 test vectors for the verification kernels: honest, tampered and hostile rows.

A small affine reference of the curve (Python integers, slow and plain) builds the hostile
cases: small-order and mixed-order keys, torsion in R, S at and past L, non-canonical
encodings of y, keys with x = 0 and the sign bit set, and keys off the curve. The expected
answer for every row is not computed here: the tests ask OpenSSL (the cpu backend) and require
the kernel to give the same answer; ``categories`` lets them check that each hostile family
produced both answers where the rule allows both, so the comparison is not vacuous.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from rayledger.crypto import SMALL_ORDER_KEYS

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRTM1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int]  # affine (x, y)
IDENTITY: Point = (0, 1)


def add(p: Point, q: Point) -> Point:
    """Affine twisted Edwards addition for a = -1 (complete: d is not a square)."""
    (x1, y1), (x2, y2) = p, q
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def mul(k: int, p: Point) -> Point:
    """k * p by double-and-add in extended coordinates (one inversion at the end)."""
    Ext = tuple[int, int, int, int]

    def ext_add(a: Ext, b: Ext) -> Ext:
        x1, y1, z1, t1 = a
        x2, y2, z2, t2 = b
        aa, bb = (y1 - x1) * (y2 - x2) % P, (y1 + x1) * (y2 + x2) % P
        cc, dd = 2 * D * t1 * t2 % P, 2 * z1 * z2 % P
        e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
        return e * f % P, g * h % P, f * g % P, e * h % P

    acc: Ext = (0, 1, 1, 0)
    base: Ext = (p[0], p[1], 1, p[0] * p[1] % P)
    while k:
        if k & 1:
            acc = ext_add(acc, base)
        base = ext_add(base, base)
        k >>= 1
    zi = pow(acc[2], P - 2, P)
    return acc[0] * zi % P, acc[1] * zi % P


def neg(p: Point) -> Point:
    return (-p[0]) % P, p[1]


def encode(p: Point) -> bytes:
    x, y = p
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def x_for(y: int) -> int | None:
    """Some x with (x, y) on the curve, or None."""
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == u:
        return x
    if v * x * x % P == (-u) % P:
        return x * SQRTM1 % P
    return None


def decode(data: bytes) -> Point:
    """Strict decoding of a canonical encoding (the reference only decodes its own)."""
    raw = int.from_bytes(data, "little")
    y, sign = raw & ((1 << 255) - 1), raw >> 255
    x = x_for(y)
    assert y < P and x is not None
    return (P - x) % P if (x & 1) != sign else x, y


BY = 4 * pow(5, P - 2, P) % P
B: Point = decode(BY.to_bytes(32, "little"))


def challenge(r: bytes, a: bytes, m: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + a + m).digest(), "little") % L


def _order8_point() -> Point:
    """A point of order exactly 8 (the torsion part of some curve point)."""
    for y in range(2, 200):
        x = x_for(y)
        if x is None:
            continue
        t = mul(L, (x, y))
        if mul(4, t) != IDENTITY:
            return t
    raise AssertionError("no order-8 point found")


T8 = _order8_point()
TORSION = [mul(k, T8) for k in range(8)]


class Vectors:
    """Rows of (key, signature, message) with a category name per row."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.sigs: list[bytes] = []
        self.msgs: list[bytes] = []
        self.categories: list[str] = []

    def add(self, category: str, key: bytes, sig: bytes, msg: bytes) -> None:
        assert len(key) == 32 and len(sig) == 64 and len(msg) == 32
        self.keys.append(key)
        self.sigs.append(sig)
        self.msgs.append(msg)
        self.categories.append(category)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def stack(rows: list[bytes], width: int) -> np.ndarray:
            return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), width).copy()

        return stack(self.keys, 32), stack(self.sigs, 64), stack(self.msgs, 32)


def _scalar(s: int) -> bytes:
    return s.to_bytes(32, "little")


def honest(rng: random.Random, n: int, vec: Vectors) -> None:
    """Valid signatures, and each with one bit flipped in its key, signature or message."""
    for _ in range(n):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        pub = key.public_key().public_bytes_raw()
        msg = rng.randbytes(32)
        sig = key.sign(msg)
        vec.add("honest", pub, sig, msg)
        row = bytearray(pub + sig + msg)
        bit = rng.randrange(len(row) * 8)
        row[bit // 8] ^= 1 << (bit % 8)
        vec.add("flipped", bytes(row[:32]), bytes(row[32:96]), bytes(row[96:]))


def hostile(rng: random.Random, vec: Vectors) -> None:
    """The families a forger or a careless implementation would try."""
    small = sorted(SMALL_ORDER_KEYS)
    identity = encode(IDENTITY)
    # Small-order keys (canonical and not) with S = 0 and R one of the torsion points: OpenSSL
    # accepts exactly when R encodes [k](-A), which depends on k = H(R || A || M).
    for a in small:
        for t in TORSION:
            for _ in range(2):
                vec.add("small-order key", a, encode(t) + bytes(32), rng.randbytes(32))
    # Mixed-order keys A = aB + T8 with S = r + k a: valid under the cofactored equation, and
    # under the cofactorless one only when [k] T8 = 0, i.e. k = 0 (mod 8).
    for _ in range(48):
        a, r = rng.randrange(1, L), rng.randrange(1, L)
        pub = encode(add(mul(a, B), T8))
        big_r = encode(mul(r, B))
        msg = rng.randbytes(32)
        s = (r + challenge(big_r, pub, msg) * a) % L
        vec.add("mixed-order key", pub, big_r + _scalar(s), msg)
    # Torsion in R with an honest key: [S]B - [k]A = rB, which is not R.
    for t in TORSION[1:]:
        a, r = rng.randrange(1, L), rng.randrange(1, L)
        pub = encode(mul(a, B))
        big_r = encode(add(mul(r, B), t))
        msg = rng.randbytes(32)
        s = (r + challenge(big_r, pub, msg) * a) % L
        vec.add("torsion in R", pub, big_r + _scalar(s), msg)
    # S at and past L: an honest signature with S + L (the malleated twin), S = L, S = L - 1,
    # and S with its top bits set.
    for _ in range(6):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        pub, msg = key.public_key().public_bytes_raw(), rng.randbytes(32)
        sig = key.sign(msg)
        s = int.from_bytes(sig[32:], "little")
        vec.add("S >= L", pub, sig[:32] + _scalar(s + L), msg)
        vec.add("S >= L", pub, sig[:32] + _scalar(L), msg)
        vec.add("S >= L", pub, sig[:32] + _scalar(L - 1), msg)
        vec.add("S >= L", pub, sig[:32] + _scalar(s | (0xE0 << 248)), msg)
    # The identity key written every way, with S = 0 and R the identity written every way:
    # only a canonical R can match (the check re-encodes), any spelling of the key decodes.
    spellings = [identity, _scalar(1 | (1 << 255)), _scalar(P + 1), _scalar((P + 1) | (1 << 255))]
    for key_bytes in spellings:
        for r_bytes in spellings:
            vec.add("identity spellings", key_bytes, r_bytes + bytes(32), rng.randbytes(32))
    # Non-canonical y in an honest-looking key: y + p for the y < 19 that are on the curve.
    for y in range(19):
        if x_for(y) is None:
            continue
        for sign in (0, 1):
            pub = _scalar((y + P) | (sign << 255))
            for t in (TORSION[0], TORSION[4]):
                vec.add("non-canonical key", pub, encode(t) + bytes(32), rng.randbytes(32))
    # Keys off the curve: y with no x (canonical and, for small y, not).
    off = [y for y in range(2, 400) if x_for(y) is None][:12]
    off += [y + P for y in range(19) if x_for(y) is None]
    for y in off:
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        msg = rng.randbytes(32)
        vec.add("off-curve key", _scalar(y), key.sign(msg), msg)
    # Bytes at random, and all-zero and all-one rows.
    for _ in range(16):
        vec.add("random", rng.randbytes(32), rng.randbytes(64), rng.randbytes(32))
    vec.add("random", bytes(32), bytes(64), bytes(32))
    vec.add("random", b"\xff" * 32, b"\xff" * 64, b"\xff" * 32)


def build(seed: int, honest_rows: int = 64) -> Vectors:
    rng = random.Random(seed)
    vec = Vectors()
    honest(rng, honest_rows, vec)
    hostile(rng, vec)
    return vec


def variable_length(
    rng: random.Random, lengths: list[int]
) -> tuple[np.ndarray, np.ndarray, list[bytes], np.ndarray]:
    """Keys, signatures and messages of the given lengths: valid ones, and every third row
    with one bit flipped in its message (or, for an empty message, in its signature); the
    last array says which rows are valid."""
    keys, sigs, msgs, valid = [], [], [], []
    for i, n in enumerate(lengths):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        msg = rng.randbytes(n)
        sig = key.sign(msg)
        if i % 3 == 2:
            if n:
                bad = bytearray(msg)
                bad[rng.randrange(n)] ^= 1 << rng.randrange(8)
                msg = bytes(bad)
            else:
                sig = sig[:40] + bytes([sig[40] ^ 1]) + sig[41:]
        keys.append(key.public_key().public_bytes_raw())
        sigs.append(sig)
        msgs.append(msg)
        valid.append(i % 3 != 2)
    k = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32).copy()
    s = np.frombuffer(b"".join(sigs), np.uint8).reshape(-1, 64).copy()
    return k, s, msgs, np.array(valid)


def lengths_around_blocks(limit: int = 1200) -> list[int]:
    """Every message length 0..200, and those near a SHA-512 block boundary of R || A || M up
    to ``limit`` (the padding needs 17 bytes: 64 + n = 111, 112, 128 (mod 128) turn)."""
    near = {46, 47, 48, 49, 63, 64, 65}
    return list(range(201)) + [n for n in range(201, limit) if n % 128 in near]


def openssl(keys: np.ndarray, sigs: np.ndarray, msgs: list[bytes] | np.ndarray) -> np.ndarray:
    """The rule itself: OpenSSL's answer for every row, one plain call each (the oracle)."""
    out = np.zeros(len(keys), np.bool_)
    for i in range(len(keys)):
        try:
            Ed25519PublicKey.from_public_bytes(keys[i].tobytes()).verify(
                sigs[i].tobytes(), bytes(msgs[i])
            )
            out[i] = True
        except (ValueError, InvalidSignature):
            pass
    return out


def libsodium(keys: np.ndarray, sigs: np.ndarray, msgs: list[bytes] | np.ndarray) -> np.ndarray:
    """libsodium's own answer for every row (stricter than OpenSSL's)."""
    out = np.zeros(len(keys), np.bool_)
    for i in range(len(keys)):
        try:
            crypto_sign_open(sigs[i].tobytes() + bytes(msgs[i]), keys[i].tobytes())
            out[i] = True
        except CryptoError:
            pass
    return out
