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
    want = ed25519_verify_batch(keys, sigs, msgs, backend="cpu")
    got = kernel_verify(lib, keys, sigs, msgs)
    assert (got == want).all(), np.flatnonzero(got != want)
    honest = np.array(vec.categories) == "honest"
    assert want[honest].all() and not want[~honest].any()


def test_hostile_rows_agree_with_openssl(lib: ctypes.CDLL) -> None:
    vec = ref.build(seed=8032, honest_rows=8)
    keys, sigs, msgs = vec.arrays()
    want = ed25519_verify_batch(keys, sigs, msgs, backend="cpu")
    got = kernel_verify(lib, keys, sigs, msgs)
    wrong = [(vec.categories[i], i) for i in np.flatnonzero(got != want)]
    assert not wrong, wrong
    accepted = Counter(c for c, ok in zip(vec.categories, want, strict=True) if ok)
    rejected = Counter(c for c, ok in zip(vec.categories, want, strict=True) if not ok)
    # The families where the rule gives both answers did give both: the comparison has teeth.
    for family in ("small-order key", "mixed-order key", "identity spellings", "non-canonical key"):
        assert accepted[family] and rejected[family], (family, accepted, rejected)
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
