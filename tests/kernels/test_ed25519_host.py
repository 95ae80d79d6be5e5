"""The Ed25519 verification kernel's per-thread code, compiled for the host, against OpenSSL.

kernels/cuda/ed25519.cu is __host__ __device__ throughout, so the harness of
tests/kernels/_harness.py runs exactly the code a GPU thread runs. The answer for every row must
equal the cpu backend's (OpenSSL through ``cryptography``): honest signatures, single-bit
flips, and the hostile families of tests/kernels/_ed25519_vectors.py. The curve constants in the
source are recomputed from their definitions. Skipped when no host compiler is present.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from rayledger.kernels import _cuda, ed25519_verify_batch
from tests.kernels import _ed25519_vectors as ref
from tests.kernels._harness import build_harness


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_harness(tmp_path_factory.mktemp("ed25519_host"))


def kernel_verify(
    lib: ctypes.CDLL, keys: np.ndarray, sigs: np.ndarray, msgs: np.ndarray
) -> np.ndarray:
    """Run the harness over the rows (plus its surplus threads) and return the 0/1 answers."""
    n = len(keys)
    # Sentinel bytes past the end: the surplus threads of the last block must not write.
    ok = np.full(n + 8, 0xA5, np.uint8)

    def ptr(a: np.ndarray) -> ctypes.c_void_p:
        return ctypes.c_void_p(np.ascontiguousarray(a).ctypes.data)

    lib.h_ed25519_verify(ptr(keys), ptr(sigs), ptr(msgs), ctypes.c_uint64(n), ptr(ok))
    assert (ok[n:] == 0xA5).all(), "a thread past n wrote its answer"
    assert np.isin(ok[:n], (0, 1)).all()
    return ok[:n].astype(bool)


def _limbs(source: str, name: str) -> int:
    m = re.search(rf"#define {name} RL_FE\(([^)]*)\)", source) or re.search(
        rf"#define {name} \{{([^}}]*)\}}", source
    )
    assert m, name
    words = [int(w.strip().rstrip("u"), 16) for w in m.group(1).replace("\\", " ").split(",")]
    assert len(words) == 8
    return sum(w << (32 * i) for i, w in enumerate(words))


def test_constants_match_their_definitions() -> None:
    source = (_cuda.CUDA_DIR / "ed25519.cu").read_text()
    assert _limbs(source, "RL_ED_D") == ref.D
    assert _limbs(source, "RL_ED_D2") == 2 * ref.D % ref.P
    assert _limbs(source, "RL_ED_SQRTM1") == ref.SQRTM1
    assert _limbs(source, "RL_ED_SQRTM1") ** 2 % ref.P == ref.P - 1
    assert (_limbs(source, "RL_ED_BX"), _limbs(source, "RL_ED_BY")) == ref.B
    assert _limbs(source, "RL_ED_BX") % 2 == 0
    assert _limbs(source, "RL_ED_L") == ref.L
    assert ref.mul(ref.L, ref.B) == ref.IDENTITY


def test_honest_and_flipped_rows_agree_with_openssl(lib: ctypes.CDLL) -> None:
    vec = ref.Vectors()
    ref.honest(__import__("random").Random(25519), 300, vec)
    keys, sigs, msgs = vec.arrays()
    want = ref.openssl(keys, sigs, msgs)
    got = kernel_verify(lib, keys, sigs, msgs)
    assert (got == want).all(), np.flatnonzero(got != want)
    honest = np.array(vec.categories) == "honest"
    assert want[honest].all() and not want[~honest].any()


def test_hostile_rows_agree_with_openssl(lib: ctypes.CDLL) -> None:
    vec = ref.build(seed=8032, honest_rows=8)
    keys, sigs, msgs = vec.arrays()
    want = ref.openssl(keys, sigs, msgs)
    got = kernel_verify(lib, keys, sigs, msgs)
    wrong = [(vec.categories[i], i) for i in np.flatnonzero(got != want)]
    assert not wrong, wrong
    accepted = Counter(c for c, ok in zip(vec.categories, want, strict=True) if ok)
    rejected = Counter(c for c, ok in zip(vec.categories, want, strict=True) if not ok)
    # The families where the rule gives both answers did give both: the comparison has teeth.
    for family in ("small-order key", "mixed-order key", "identity spellings", "non-canonical key"):
        assert accepted[family] and rejected[family], (family, accepted, rejected)
    # A mixed-order key A = aB + T8 verifies under the cofactorless equation exactly when the
    # challenge kills the torsion: k = 0 (mod 8)
    for i, category in enumerate(vec.categories):
        if category == "mixed-order key":
            k = ref.challenge(sigs[i][:32].tobytes(), keys[i].tobytes(), msgs[i].tobytes())
            assert bool(want[i]) == (k % 8 == 0), i
    # And the families the rule always refuses were all refused.
    for family in ("torsion in R", "S >= L", "off-curve key", "random"):
        assert not accepted[family], (family, accepted[family])


def test_one_row_and_no_rows(lib: ctypes.CDLL) -> None:
    vec = ref.build(seed=1, honest_rows=1)
    keys, sigs, msgs = vec.arrays()
    assert kernel_verify(lib, keys[:1], sigs[:1], msgs[:1]).tolist() == [True]
    assert kernel_verify(lib, keys[:0], sigs[:0], msgs[:0]).tolist() == []


# ---- the field and scalar arithmetic, limb by limb, against Python integers ----------------

_OPS = {"add": 0, "sub": 1, "mul": 2, "sq": 3, "canonical": 4, "invert": 5, "pow22523": 6}
_M256 = (1 << 256) - 1


def _edge_values() -> list[int]:
    """Values < 2^256 (what the limbs may hold) where carries and reductions turn."""
    p = ref.P
    fixed = [0, 1, 2, 19, 37, 38, 39, p - 1, p, p + 1, p + 18, p + 19, 2 * p - 1, 2 * p]
    fixed += [(1 << 255) - 1, 1 << 255, _M256, _M256 - 37, _M256 - 38, (1 << 32) - 1]
    fixed += [(1 << k) - 1 for k in range(32, 257, 32)] + [1 << k for k in range(0, 256, 31)]
    rng = __import__("random").Random(255)
    fixed += [rng.getrandbits(256) for _ in range(300)]
    fixed += [_M256 ^ (1 << rng.randrange(256)) for _ in range(40)]  # nearly all ones
    return fixed


def _limbs_of(values: list[int], words: int = 8) -> np.ndarray:
    out = np.zeros((len(values), words), np.uint32)
    for i, v in enumerate(values):
        out[i] = [(v >> (32 * k)) & 0xFFFFFFFF for k in range(words)]
    return out


def _ints(limbs: np.ndarray) -> list[int]:
    return [sum(int(w) << (32 * k) for k, w in enumerate(row)) for row in limbs]


def _field(lib: ctypes.CDLL, op: str, a: list[int], b: list[int] | None = None) -> list[int]:
    x, y = _limbs_of(a), _limbs_of(b if b is not None else a)
    out = np.zeros_like(x)

    def ptr(arr: np.ndarray) -> ctypes.c_void_p:
        return ctypes.c_void_p(arr.ctypes.data)

    lib.h_fe_op(_OPS[op], ptr(x), ptr(y), ptr(out), ctypes.c_uint64(len(a)))
    return _ints(out)


def test_field_operations_agree_with_integers_on_edge_values(lib: ctypes.CDLL) -> None:
    p = ref.P
    vals = _edge_values()
    a = [v for v in vals for _ in range(3)]
    b = [vals[(i * 7 + 3) % len(vals)] for i in range(len(a))]
    # Every pair of extremes: the rare second wrap of a sum and second borrow of a difference
    extremes = [0, 1, 2, 19, 37, 38, p - 1, p, _M256 - 38, _M256 - 37, _M256 - 1, _M256]
    a += [x for x in extremes for _ in extremes]
    b += [y for _ in extremes for y in extremes]
    for op, want in (
        ("add", lambda x, y: (x + y) % p),
        ("sub", lambda x, y: (x - y) % p),
        ("mul", lambda x, y: x * y % p),
    ):
        got = _field(lib, op, a, b)
        assert all(g <= _M256 for g in got)
        bad = [(x, y) for x, y, g in zip(a, b, got, strict=True) if g % p != want(x, y)]
        assert not bad, (op, bad[:3])
    assert [g % p for g in _field(lib, "sq", vals)] == [v * v % p for v in vals]
    assert _field(lib, "canonical", vals) == [v % p for v in vals]
    nonzero = [v for v in vals if v % p]
    assert [g % p for g in _field(lib, "invert", nonzero)] == [pow(v, p - 2, p) for v in nonzero]
    assert [g % p for g in _field(lib, "pow22523", vals)] == [pow(v, (p - 5) // 8, p) for v in vals]


def test_scalar_reduction_agrees_with_integers(lib: ctypes.CDLL) -> None:
    rng = __import__("random").Random(512)
    top = (1 << 512) - 1
    values = [0, 1, ref.L - 1, ref.L, ref.L + 1, 2 * ref.L, top, top - ref.L]
    values += [rng.getrandbits(512) for _ in range(200)] + [rng.getrandbits(260) for _ in range(50)]
    x = _limbs_of(values, 16)
    out = np.zeros((len(values), 8), np.uint32)
    lib.h_fe_op(
        7,
        ctypes.c_void_p(x.ctypes.data),
        ctypes.c_void_p(x.ctypes.data),
        ctypes.c_void_p(out.ctypes.data),
        ctypes.c_uint64(len(values)),
    )
    assert _ints(out) == [v % ref.L for v in values]


# ---- messages of any length (the ed25519_verify_var kernel) -------------------------------


def _var_kernel(
    lib: ctypes.CDLL,
    keys: np.ndarray,
    sigs: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    base: int = 0,
) -> tuple[np.ndarray, int]:
    n = len(keys)
    ok = np.full(n + 8, 0xA5, np.uint8)
    err = np.zeros(1, np.int32)
    buf = np.concatenate([values, np.zeros(1, np.uint8)])  # never an empty buffer

    def ptr(a: np.ndarray) -> ctypes.c_void_p:
        return ctypes.c_void_p(a.ctypes.data)

    lib.h_ed25519_verify_var(
        ptr(keys),
        ptr(sigs),
        ptr(buf),
        ctypes.c_uint64(len(values)),
        ptr(offsets),
        ctypes.c_int64(base),
        ctypes.c_uint64(n),
        ptr(ok),
        ptr(err),
    )
    assert (ok[n:] == 0xA5).all(), "a thread past n wrote its answer"
    return ok[:n].astype(bool), int(err[0])


def test_messages_of_every_length_agree_with_openssl(lib: ctypes.CDLL) -> None:
    rng = __import__("random").Random(1024)
    keys, sigs, msgs, valid = ref.variable_length(rng, ref.lengths_around_blocks())
    values = np.frombuffer(b"".join(msgs), np.uint8)
    offsets = np.zeros(len(msgs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(m) for m in msgs])
    got, err = _var_kernel(lib, keys, sigs, values, offsets)
    want = ref.openssl(keys, sigs, msgs)
    assert err == 0 and (want == valid).all()
    assert (got == want).all(), np.flatnonzero(got != want)[:10]
    # The 32-byte rows through the general kernel give what the fast one gives
    vec = ref.build(seed=32, honest_rows=8)
    k, s, m = vec.arrays()
    flat = np.arange(len(k) + 1, dtype=np.int64) * 32
    assert (_var_kernel(lib, k, s, m.reshape(-1), flat)[0] == kernel_verify(lib, k, s, m)).all()
    # Offsets rebased by a base, as a chunk of a larger batch arrives on the device
    got2, _ = _var_kernel(
        lib, keys[5:9], sigs[5:9], values[offsets[5] :], offsets[5:10], offsets[5]
    )
    assert (got2 == want[5:9]).all()


@pytest.mark.parametrize("bad", [[0, 5, 3], [0, 4, 11], [-1, 2, 3], [0, 2, 1 << 40]])
def test_rows_whose_offsets_leave_the_buffer_are_flagged_and_read_nothing(
    lib: ctypes.CDLL, bad: list[int]
) -> None:
    vec = ref.build(seed=5, honest_rows=2)
    keys, sigs, _ = vec.arrays()
    got, err = _var_kernel(lib, keys[:2], sigs[:2], np.arange(10, dtype=np.uint8), np.array(bad))
    assert err == 1 and not got.any()


def test_the_api_takes_messages_of_any_length_and_refuses_mismatches() -> None:
    rng = __import__("random").Random(77)
    keys, sigs, msgs, valid = ref.variable_length(rng, [0, 1, 31, 33, 500, 64, 2, 3, 4])
    arrow = pa.array(msgs, pa.binary())
    assert (ed25519_verify_batch(keys, sigs, arrow, "cpu") == valid).all()
    assert (
        ed25519_verify_batch(keys, sigs, pa.array(msgs, pa.large_binary()), "cpu") == valid
    ).all()
    same = ref.variable_length(rng, [48] * 6)
    rows = np.frombuffer(b"".join(same[2]), np.uint8).reshape(6, 48)
    assert (ed25519_verify_batch(same[0], same[1], rows, "cpu") == same[3]).all()
    with pytest.raises(ValueError, match="9 keys but 8 messages"):
        ed25519_verify_batch(keys, sigs, arrow[:8], "cpu")
    with pytest.raises(ValueError, match="must have 9 rows"):
        ed25519_verify_batch(keys, sigs, np.zeros((8, 32), np.uint8), "cpu")
    with pytest.raises(ValueError, match="two-dimensional uint8"):
        ed25519_verify_batch(keys, sigs, np.zeros((9, 32), np.int8), "cpu")
    with pytest.raises(ValueError, match="nulls"):
        ed25519_verify_batch(keys, sigs, pa.array([b"x"] * 8 + [None], pa.binary()), "cpu")


# RFC 8032, section 7.1, tests 1-3: secret key, public key, message (hex).
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
    ),
]
RFC8032_TEST1_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_rfc8032_vectors(lib: ctypes.CDLL) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys, sigs, msgs = [], [], []
    for secret, public, message in RFC8032:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
        assert key.public_key().public_bytes_raw().hex() == public
        keys.append(bytes.fromhex(public))
        sigs.append(key.sign(bytes.fromhex(message)))  # deterministic: the RFC's signature
        msgs.append(bytes.fromhex(message))
    assert sigs[0].hex() == RFC8032_TEST1_SIGNATURE
    k = np.frombuffer(b"".join(keys), np.uint8).reshape(3, 32).copy()
    s = np.frombuffer(b"".join(sigs), np.uint8).reshape(3, 64).copy()
    values = np.frombuffer(b"".join(msgs), np.uint8).copy()
    offsets = np.array([0, 0, 1, 3], np.int64)
    got, err = _var_kernel(lib, k, s, values, offsets)
    assert got.tolist() == [True, True, True] and err == 0
    # Each signature under another vector's key or message fails
    got, _ = _var_kernel(lib, k[[1, 2, 0]], s, values, offsets)
    assert got.tolist() == [False, False, False]
