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
