"""A mempool bounds the bytes it holds uncommitted, not only the rows: rows of up to the
genesis's payload limit (64 KiB) each made the row capacity alone (200,000 rows) a bound of
13 GB. Bytes being admitted, pending, parked and in flight count; beyond the byte capacity a
submission is answered busy and nothing of it is kept, and one that could never fit is
refused by name. Every path rows take in and out of the mempool keeps the count right."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import rayledger.actors.mempool as mempool_mod
from rayledger.crypto import key_from_seed, public_bytes
from tests.unit.test_mempool_admission import mempool
from tests.unit.test_mempool_parking import A, B, committed_at, rows, run, sealing


def _parked_bytes(m: mempool_mod.Mempool) -> int:
    return sum(row.nbytes for held in m.parked.values() for _, row in held.values())


def _counted_right(m: mempool_mod.Mempool) -> None:
    assert m.admitting_bytes == 0
    assert m.pending_bytes == sum(b.nbytes for b in m.pending)
    assert m.parked_bytes == _parked_bytes(m)
    assert set(m.in_flight_bytes) == set(m.in_flight)


def test_the_byte_capacity_is_a_setting(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert mempool(tmp_path / "a").capacity_bytes == mempool_mod.CAPACITY_BYTES == 1 << 30
    assert mempool(tmp_path / "b", mempool_capacity_bytes=12_345).capacity_bytes == 12_345


def test_rows_beyond_the_byte_capacity_are_answered_busy_and_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, put = sealing(tmp_path, monkeypatch)  # 200,000 rows allowed: far from the row limit
    first, second = rows(m, A, list(range(10))), rows(m, A, [10, 11])

    async def scenario() -> None:
        assert (await m.submit(first)).accepted == 10
        held = m._held_bytes()
        assert held == m.pending_bytes >= first.nbytes
        m.capacity_bytes = held + second.nbytes - 1
        answer = await m.submit(second)
        assert answer.busy and answer.accepted == 0 and answer.retry_after_ms > 0
        assert m.counts["busy"] == 2 and m._held_bytes() == held and m.pending_rows == 10
        assert (await m.status())["held_bytes"] == held
        # Sealed, the rows still count, in flight, until their batch commits
        m._seal(100)
        (digest,) = m.in_flight
        assert m.pending_bytes == 0 and m.in_flight_bytes[digest] == put[0].nbytes
        m.capacity_bytes = put[0].nbytes + second.nbytes - 1
        assert (await m.submit(second)).busy
        await m.on_commit([digest])
        assert m._held_bytes() == 0
        # Nothing of the busy answers was kept: admitted now that there is room
        assert (await m.submit(second)).accepted == 2
        _counted_right(m)

    run(m, scenario)


def test_a_submission_larger_than_the_byte_capacity_is_refused_not_busy(tmp_path: Path) -> None:
    m = mempool(tmp_path)
    big = rows(m, A, [0, 1, 2])
    m.capacity_bytes = big.nbytes - 1

    async def scenario() -> None:
        # It could never fit, even into an empty mempool: a busy answer would be retried for
        # ever, so it is refused by name and nothing of it is kept
        answer = await m.submit(big)
        assert not answer.busy and answer.accepted == 0
        assert answer.rejected == {"over_capacity": 3}
        assert answer.error is not None and "bytes" in answer.error
        assert m._held_bytes() == 0 and m.pending_rows == 0 and m.seen == {}
        # While nothing is held, anything within the capacity is admitted
        assert (await m.submit(big.slice(0, 2))).accepted == 2

    run(m, scenario)


def test_parked_rows_count_their_bytes_on_every_way_in_and_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, put = sealing(tmp_path, monkeypatch, mempool_gap_hold_ms=1000)
    a, b = public_bytes(A), public_bytes(B)
    table = {a: 0, b: 0}
    m._committed_nonces = committed_at(table)  # type: ignore[method-assign]

    async def scenario() -> None:
        # Parked ahead of a gap: counted while held
        await m.submit(rows(m, A, [2, 3]))
        await m.submit(rows(m, B, [4]))
        assert m.parked_rows == 3 and m.parked_bytes == _parked_bytes(m) > 0
        # The gap closes: released to pending
        await m.submit(rows(m, A, [0, 1]))
        assert m.parked_rows == 1 and m.pending_rows == 4
        _counted_right(m)
        # Held past the hold: sealed apart, in flight
        m._seal_expired_gaps(m._park_due + 1)
        assert m.parked_rows == 0 and m.parked_bytes == 0 and len(put) == 1
        _counted_right(m)
        # Rows of a sender committed beyond what this mempool saw (it sends elsewhere too):
        # its parked rows go on at once
        await m.submit(rows(m, B, [7, 8]))
        assert m.parked_bytes > 0
        table[b] = 6
        await m.submit(rows(m, B, [9]))
        assert m.parked_rows == 0 and m.parked_bytes == 0
        _counted_right(m)
        m._seal(100)
        await m.on_commit(list(m.in_flight))
        assert m._held_bytes() == 0 and m.in_flight_bytes == {}

    run(m, scenario)


def test_a_large_submission_sent_again_after_its_busy_answer_gets_in_under_steady_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load from small submissions, each taking the room a commit frees, one that
    needs a quarter of the limit or more fits only once that much is free at once: it was
    answered busy for as long as the load lasted. Sent again no sooner than its answer said,
    it is admitted past the learnt limit (a latency target), within the capacity (the memory
    bound); smaller ones still wait for the limit."""
    m, put = sealing(tmp_path, monkeypatch, mempool_capacity=1_000, batch_rows=20)
    assert m.limit.limit == 40  # the learnt limit starts at its floor, two batches
    c = key_from_seed(b"\x23" * 32)

    async def scenario() -> None:
        assert (await m.submit(rows(m, A, list(range(30))))).accepted == 30
        large, small = rows(m, B, list(range(15))), rows(m, c, [0, 1, 2, 3, 4])
        first = await m.submit(large)
        assert first.busy and first.retry_after_ms > 0
        assert (await m.submit(large)).busy  # back too soon: still busy
        assert (await m.submit(small)).accepted == 5  # 35 held: the small one fits
        await asyncio.sleep(first.retry_after_ms / 1000)
        answer = await m.submit(large)
        assert answer.accepted == 15 and not answer.busy, answer
        assert m.counts["admitted_past_limit"] == 15
        # 50 held against a limit of 40: the limit still holds for the others
        again = rows(m, c, [5, 6, 7])
        busy = await m.submit(again)
        assert busy.busy
        await asyncio.sleep(busy.retry_after_ms / 1000)
        assert (await m.submit(again)).busy  # a small one has no way past the limit
        # Nor does a large one while more than the limit is held beside it
        later = rows(m, B, list(range(15, 30)))
        wait = await m.submit(later)
        assert wait.busy
        await asyncio.sleep(wait.retry_after_ms / 1000)
        assert (await m.submit(later)).busy
        _counted_right(m)

    run(m, scenario)
