"""The cpu backend of Ed25519 verification: libsodium first, OpenSSL for every row it refuses.

The answer must be OpenSSL's for every row. That holds if libsodium never accepts a row OpenSSL
refuses (its rule is OpenSSL's with more refusals); these tests check that claim on hostile rows
of every family and on random corruptions, and check that the fallback is really exercised:
rows libsodium refuses and OpenSSL accepts exist in the vectors and come out accepted.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from rayledger.kernels import cpu_verify_work, ed25519_verify_batch
from rayledger.kernels.ed25519 import _PARALLEL_MIN_ROWS
from tests.kernels import _ed25519_vectors as ref


@pytest.mark.parametrize("seed", [8032, 1, 2, 3])
def test_hostile_rows_get_openssls_answer(seed: int) -> None:
    vec = ref.build(seed=seed, honest_rows=16)
    keys, sigs, msgs = vec.arrays()
    want = ref.openssl(keys, sigs, msgs)
    strict = ref.libsodium(keys, sigs, msgs)
    assert not (strict & ~want).any(), "libsodium accepted a row OpenSSL refuses"
    got = ed25519_verify_batch(keys, sigs, msgs, backend="cpu")
    wrong = [(vec.categories[i], i) for i in np.flatnonzero(got != want)]
    assert not wrong, wrong
    # The fallback has teeth: OpenSSL accepts rows libsodium refuses, and they are accepted.
    fallback = Counter(
        c for c, s, w in zip(vec.categories, strict, want, strict=True) if w and not s
    )
    assert fallback["small-order key"] and fallback["identity spellings"], fallback
    assert strict[np.array(vec.categories) == "honest"].all()


def test_many_rows_across_threads_get_openssls_answer() -> None:
    vec = ref.build(seed=99, honest_rows=64)
    keys, sigs, msgs = vec.arrays()
    reps = -(-2 * _PARALLEL_MIN_ROWS // len(keys))
    keys, sigs, msgs = (np.tile(a, (reps, 1)) for a in (keys, sigs, msgs))
    assert len(keys) >= 2 * _PARALLEL_MIN_ROWS
    got = ed25519_verify_batch(keys, sigs, msgs, backend="cpu")
    assert (got == ref.openssl(keys, sigs, msgs)).all()


def test_random_corruptions_get_openssls_answer() -> None:
    """Valid rows with bytes of the key, R, S or the message changed at random."""
    rng = random.Random(4242)
    vec = ref.Vectors()
    ref.honest(rng, 200, vec)
    keys, sigs, msgs = (a.copy() for a in vec.arrays())
    for i in range(len(keys)):
        target = (keys, sigs, sigs, msgs)[i % 4]
        lo, hi = ((0, 32), (0, 32), (32, 64), (0, 32))[i % 4]
        target[i, rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    want = ref.openssl(keys, sigs, msgs)
    assert not (ref.libsodium(keys, sigs, msgs) & ~want).any()
    assert (ed25519_verify_batch(keys, sigs, msgs, backend="cpu") == want).all()


def test_messages_of_any_length_get_openssls_answer() -> None:
    rng = random.Random(1024)
    keys, sigs, msgs, valid = ref.variable_length(rng, ref.lengths_around_blocks(400))
    want = ref.openssl(keys, sigs, msgs)
    assert (want == valid).all()
    got = ed25519_verify_batch(keys, sigs, pa.array(msgs, pa.binary()), backend="cpu")
    assert (got == want).all()
    # The hostile families with messages longer than a digest, as (values, offsets)
    vec = ref.build(seed=7, honest_rows=4)
    k, s, m = vec.arrays()
    long = [bytes(row) * 3 for row in m]
    values = np.frombuffer(b"".join(long), np.uint8)
    offsets = np.arange(len(long) + 1, dtype=np.int64) * 96
    got = ed25519_verify_batch(k, s, (values, offsets), backend="cpu")
    assert (got == ref.openssl(k, s, long)).all()


def test_the_cpu_backend_counts_the_rows_it_checks_and_their_cpu_time() -> None:
    vec = ref.build(seed=5, honest_rows=2 * _PARALLEL_MIN_ROWS)
    keys, sigs, msgs = vec.arrays()
    rows0, seconds0 = cpu_verify_work()
    ed25519_verify_batch(keys, sigs, msgs, backend="cpu")  # across threads
    ed25519_verify_batch(keys[:3], sigs[:3], msgs[:3], backend="cpu")  # one range
    rows1, seconds1 = cpu_verify_work()
    assert rows1 - rows0 == len(keys) + 3
    # Thread CPU time of real checks: tens of microseconds a row on any machine
    assert 1e-6 * (len(keys) + 3) < seconds1 - seconds0 < 0.1 * (len(keys) + 3)
