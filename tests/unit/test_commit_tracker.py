"""The load generator's commit tracking (`bench e2e`): chunks settle when their last
transaction commits, and rows committed with an error status are counted apart."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rayledger.cluster.bench import Chunk, CommitTracker, in_situ_efficiency


def _ids(tag: str, n: int) -> np.ndarray:
    return np.frombuffer(
        b"".join(hashlib.sha256(f"{tag}/{i}".encode()).digest() for i in range(n)), np.uint8
    ).reshape(n, 32)


def _chunk(ids: np.ndarray, due: float = 0.0) -> Chunk:
    return Chunk(due, [row.tobytes() for row in ids], len(ids))


def test_a_chunk_settles_at_its_last_commit_across_blocks() -> None:
    ids = _ids("a", 10)
    chunk = _chunk(ids, due=100.0)
    tracker = CommitTracker()
    assert tracker.settle(chunk) is None
    tracker.learn(ids[:4], 101.0, np.array([], np.int64))
    assert tracker.settle(chunk) is None and chunk.found == 4
    # Later rows committed in an earlier block than the middle ones: the latest time counts
    tracker.learn(ids[7:], 101.5, np.array([], np.int64))
    assert tracker.settle(chunk) is None and chunk.found == 4
    tracker.learn(ids[4:7], 102.5, np.array([], np.int64))
    assert tracker.settle(chunk) == (102.5, 0)


def test_rows_committed_with_an_error_status_are_counted_as_failed() -> None:
    # A sender's nonce gap: its later rows commit, but with BAD_NONCE
    ids = _ids("gap", 8)
    other = _ids("other", 5)
    tracker = CommitTracker()
    block = np.concatenate([other, ids])
    # Rows 5.. of the block (rows 0.. of ``ids``) are fine; the last three failed
    tracker.learn(block, 50.0, np.array([10, 11, 12], np.int64))
    assert tracker.settle(_chunk(ids)) == (50.0, 3)
    assert tracker.settle(_chunk(other)) == (50.0, 0)


def test_failed_rows_count_only_in_the_chunk_holding_them() -> None:
    first, second = _ids("first", 3), _ids("second", 3)
    tracker = CommitTracker()
    tracker.learn(first, 1.0, np.array([0], np.int64))
    tracker.learn(second, 2.0, np.array([], np.int64))
    assert tracker.settle(_chunk(first)) == (1.0, 1)
    assert tracker.settle(_chunk(second)) == (2.0, 0)


def test_an_empty_block_and_a_sliced_id_array_are_read_right() -> None:
    ids = _ids("s", 6)
    tracker = CommitTracker()
    tracker.learn(np.empty((0, 32), np.uint8), 1.0, np.array([], np.int64))
    # A non-contiguous view (every other row) names exactly those rows
    tracker.learn(ids[::2], 3.0, np.array([1], np.int64))
    assert tracker.settle(_chunk(ids[::2])) == (3.0, 1)
    assert tracker.settle(_chunk(ids[1::2])) is None


def test_in_situ_efficiency_uses_the_networks_own_checking_speed() -> None:
    # 8,000 rows checked in 0.56 s of thread CPU: 70 us each; 2 cores, 4 checks a tx
    us, eff = in_situ_efficiency(3_500.0, 4, 2, (8_000, 0.56), 1_900)
    assert us == pytest.approx(70.0) and eff == pytest.approx(3_500 * 4 * 70e-6 / 2)
    # Fewer rows on CPUs than half the committed checks: a GPU made them, no efficiency
    assert in_situ_efficiency(3_500.0, 4, 2, (3_000, 0.21), 1_900) == (pytest.approx(70.0), None)
    assert in_situ_efficiency(3_500.0, 4, 2, (0, 0.0), 1_900) == (None, None)
