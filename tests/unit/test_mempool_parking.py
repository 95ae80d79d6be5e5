"""A mempool seals each sender's rows in nonce order: rows ahead of their sender's sequence are
parked until the nonces before them arrive or commit, and sealed apart once held too long, so
that a sender that skipped a nonce never holds back other senders' rows in the same batch."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyarrow as pa
import pytest

import rayledger.actors.mempool as mempool_mod
from rayledger.actors.mempool import Mempool
from rayledger.crypto import SigningKey, key_from_seed, public_bytes
from rayledger.tx import TxKind, make_batch
from tests.unit.test_mempool_admission import mempool

A = key_from_seed(b"\x21" * 32)
B = key_from_seed(b"\x22" * 32)


def rows(m: Mempool, key: SigningKey, nonces: list[int], tag: bytes = b"r") -> pa.RecordBatch:
    payloads = [tag + bytes([n % 256]) * 31 for n in nonces]
    return make_batch(key, TxKind.ANCHOR, nonces, payloads, m.genesis.chain_id)


def committed_at(table: dict[bytes, int]):  # type: ignore[no-untyped-def]
    """What the storage shards would answer: the committed nonce of every sender they know."""

    async def committed(senders: list[bytes]) -> dict[bytes, int]:
        return {s: table.get(s, 0) for s in senders}

    return committed


def pending_order(m: Mempool) -> list[tuple[bytes, int]]:
    if not m.pending:
        return []
    t = pa.Table.from_batches(m.pending)
    return list(
        zip(
            [bytes(s) for s in t.column("sender").to_pylist()],
            t.column("nonce").to_pylist(),
            strict=True,
        )
    )


def sealing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> tuple[Mempool, list[pa.RecordBatch]]:
    """A mempool whose shards know no sender yet, and the batches it seals (as put into the
    object store)."""
    m = mempool(tmp_path, **settings)
    m._committed_nonces = committed_at({})  # type: ignore[method-assign]
    put: list[pa.RecordBatch] = []
    monkeypatch.setattr(mempool_mod.ray, "put", lambda obj: put.append(obj) or object())
    return m, put


def run(m: Mempool, scenario) -> None:  # type: ignore[no-untyped-def]
    async def wrapped() -> None:
        try:
            await scenario()
        finally:
            if m._ticker is not None:
                m._ticker.cancel()

    asyncio.run(wrapped())


def test_rows_ahead_wait_for_the_nonce_before_them_then_follow_it_in_order(
    tmp_path: Path,
) -> None:
    m = mempool(tmp_path)
    a = public_bytes(A)
    m._committed_nonces = committed_at({a: 3})  # type: ignore[method-assign]

    async def scenario() -> None:
        res = await m.submit(rows(m, A, [5, 6, 8]))
        assert res.accepted == 3 and not res.rejected  # accepted, and held
        assert m.pending_rows == 0 and m.parked_rows == 3
        assert (await m.status())["parked_rows"] == 3
        # The same nonce again, another transaction: refused, nothing changes
        res = await m.submit(rows(m, A, [6], tag=b"x"))
        assert res.accepted == 0 and res.rejected == {"nonce_parked": 1}
        assert m.parked_rows == 3
        # Nonce 3 is in sequence; 4 then fills the gap: 5 and 6 follow, 8 still waits for 7
        assert (await m.submit(rows(m, A, [3]))).accepted == 1
        assert m.parked_rows == 3 and pending_order(m) == [(a, 3)]
        assert (await m.submit(rows(m, A, [4]))).accepted == 1
        assert pending_order(m) == [(a, 3), (a, 4), (a, 5), (a, 6)]
        assert m.parked_rows == 1 and m.next_nonce[a] == 7
        assert (await m.submit(rows(m, A, [7, 9]))).accepted == 2
        assert [n for _, n in pending_order(m)] == [3, 4, 5, 6, 7, 8, 9]
        assert m.parked_rows == 0 and not m.parked
        # 9 was parked too (ahead of 8 when it came), and followed 8 at once
        assert m.counts["parked"] == 4 and m.counts["unparked"] == 4
        assert m.counts["accepted"] == 7

    run(m, scenario)


def test_another_senders_gap_does_not_hold_back_rows_in_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, put = sealing(tmp_path, monkeypatch, batch_rows=4)
    a, b = public_bytes(A), public_bytes(B)

    async def scenario() -> None:
        # Sender a skipped its nonce 0; sender b is in order: b's four rows seal at once
        mixed = make_batch(
            [A, B, A, B, B, B],
            TxKind.ANCHOR,
            [1, 0, 2, 1, 2, 3],
            [bytes([i]) * 32 for i in range(6)],
            m.genesis.chain_id,
        )
        assert (await m.submit(mixed)).accepted == 6
        assert len(put) == 1
        assert [bytes(s) for s in put[0].column("sender").to_pylist()] == [b] * 4
        assert m.parked_rows == 2 and m.pending_rows == 0
        assert sorted(m.parked[a]) == [1, 2]

    run(m, scenario)


def test_rows_whose_gap_stays_open_are_sealed_apart_after_the_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, put = sealing(tmp_path, monkeypatch, mempool_gap_hold_ms=2000)
    a, b = public_bytes(A), public_bytes(B)

    async def scenario() -> None:
        await m.submit(rows(m, A, [2, 3]))
        await m.submit(rows(m, B, [0, 1]))
        later = time.monotonic() + 1.5
        await m.submit(rows(m, A, [5]))
        m.parked[a][5] = (later, m.parked[a][5][1])  # parked 1.5 s after the others
        m._seal_expired_gaps(later)  # not held long enough yet
        assert not put and m.parked_rows == 3
        m._seal_expired_gaps(later + 1)  # 2 and 3 held past the hold, 5 not yet
        assert len(put) == 1
        assert [bytes(s) for s in put[0].column("sender").to_pylist()] == [a, a]
        assert put[0].column("nonce").to_pylist() == [2, 3]
        assert m.counts["gap_expired"] == 2 and m.parked_rows == 1
        assert m._park_due == later + 2  # no scan of the parked rows before 5 is due
        assert pending_order(m) == [(b, 0), (b, 1)]  # never sealed with a's
        assert m.in_flight == {d: 2 for d in m.in_flight} and m.sealed == 1
        # a's sequence did not move: its later row ahead waits its own turn
        assert m.next_nonce[a] == 0 and sorted(m.parked[a]) == [5]
        m._seal_expired_gaps(later + 3)
        assert put[1].column("nonce").to_pylist() == [5] and not m.parked

    run(m, scenario)


def test_a_gap_closed_by_a_commit_elsewhere_releases_the_rows_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of the sender committed that this mempool never admitted: it sends through other
    mempools too. Its parked rows go on at once, each run of consecutive nonces sealed in a
    batch of its own (a batch with rows that can commit and rows behind a gap whose rows are
    parked elsewhere could wait for ever), and its later rows are not held."""
    m, put = sealing(tmp_path, monkeypatch)
    a, b = public_bytes(A), public_bytes(B)
    table = {a: 0, b: 0}
    m._committed_nonces = committed_at(table)  # type: ignore[method-assign]

    async def scenario() -> None:
        await m.submit(rows(m, A, [4, 5, 9]))
        await m.submit(rows(m, B, [3]))
        assert m.parked_rows == 4 and m.next_nonce[a] == 0
        await m._poll_parked()  # nothing committed yet: they wait
        assert m.parked_rows == 4 and m._park_poll is None and not put
        table[a] = 4  # a's nonces 0..3 committed through another mempool
        await m._poll_parked()
        assert [b_.column("nonce").to_pylist() for b_ in put] == [[4, 5], [9]]
        assert sorted(m.parked) == [b] and m.parked_rows == 1 and a in m.spread
        assert m.counts["spread_senders"] == 1 and m.counts["unparked"] == 3
        await m.submit(rows(m, A, [12]))
        assert m.parked_rows == 1 and pending_order(m) == [(a, 12)]
        # b's gap closed through this mempool: its parked row follows into the pending rows
        await m.submit(rows(m, B, [0, 1, 2]))
        assert not m.parked and b not in m.spread
        assert pending_order(m) == [(a, 12), (b, 0), (b, 1), (b, 2), (b, 3)]

    run(m, scenario)


def test_a_sender_seen_committed_beyond_its_rows_here_is_not_held(tmp_path: Path) -> None:
    m = mempool(tmp_path)
    a, b = public_bytes(A), public_bytes(B)
    table = {a: 0, b: 0}
    m._committed_nonces = committed_at(table)  # type: ignore[method-assign]

    async def scenario() -> None:
        await m.submit(rows(m, A, list(range(10))))
        await m.submit(rows(m, B, list(range(10))))
        assert m.next_nonce[a] == 10 and m.next_nonce[b] == 10
        table[a] = 15  # a's 10..14 came through another mempool; b's 10.. not committed
        await m.submit(rows(m, A, [17]))
        await m.submit(rows(m, B, [17]))
        assert a in m.spread and b not in m.spread
        assert m.pending_rows == 21 and sorted(m.parked) == [b]

    run(m, scenario)


def test_a_failed_poll_changes_nothing(tmp_path: Path) -> None:
    m = mempool(tmp_path)
    m._committed_nonces = committed_at({})  # type: ignore[method-assign]

    async def down(senders: list[bytes]) -> dict[bytes, int]:
        raise RuntimeError("shard down")

    async def scenario() -> None:
        await m.submit(rows(m, A, [1]))
        m._committed_nonces = down  # type: ignore[method-assign]
        await m._poll_parked()
        assert m.parked_rows == 1 and m.pending_rows == 0 and m._park_poll is None

    run(m, scenario)


def test_nothing_is_held_for_a_sender_whose_nonce_is_not_known(tmp_path: Path) -> None:
    """No storage shard answered and no row of the sender came lately: its rows go on (the
    leaders still order them)."""
    m = mempool(tmp_path)
    a = public_bytes(A)

    async def unknown(senders: list[bytes]) -> dict[bytes, int]:
        return {}

    m._committed_nonces = unknown  # type: ignore[method-assign]

    async def scenario() -> None:
        await m.submit(rows(m, A, [7, 8]))
        assert m.parked_rows == 0 and m.pending_rows == 2 and m.next_nonce[a] == 9
        # From then on the sequence is known here: a row ahead of it waits
        await m.submit(rows(m, A, [11]))
        assert m.parked_rows == 1 and m.pending_rows == 2

    run(m, scenario)


def test_parked_rows_are_bounded_by_sender_and_in_all(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_park_per_sender=3, mempool_park_rows=5)
    m._committed_nonces = committed_at({})  # type: ignore[method-assign]

    async def scenario() -> None:
        res = await m.submit(rows(m, A, [1, 2, 3, 4, 5]))
        assert res.accepted == 3 and res.rejected == {"nonce_gap_limit": 2}
        res = await m.submit(rows(m, B, [1, 2, 3]))
        assert res.accepted == 2 and res.rejected == {"nonce_gap_limit": 1}
        assert m.parked_rows == 5 and m.counts["nonce_gap_limit"] == 3
        # Refused rows are not remembered: once there is room they are admitted
        res = await m.submit(rows(m, A, [0]))
        assert res.accepted == 1 and m.parked_rows == 2  # a's 1..3 followed its 0
        res = await m.submit(rows(m, A, [4, 5]))
        assert res.accepted == 2 and m.pending_rows == 6 and m.parked_rows == 2

    run(m, scenario)


def test_senders_remembered_are_bounded(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_senders=2)
    m._committed_nonces = committed_at({})  # type: ignore[method-assign]
    keys = [key_from_seed(bytes([0x30 + i]) * 32) for i in range(3)]

    async def scenario() -> None:
        for k in keys:
            await m.submit(rows(m, k, [0]))
        assert list(m.next_nonce) == [public_bytes(k) for k in keys[1:]]
        # A sender remembered goes on in sequence; the one forgotten falls back to its
        # committed nonce (0 here, its row 0 not committed yet): its row 1 waits for that
        await m.submit(rows(m, keys[2], [1]))
        assert m.parked_rows == 0 and m.pending_rows == 4
        await m.submit(rows(m, keys[0], [1]))
        assert m.parked_rows == 1 and m.pending_rows == 4

    run(m, scenario)


def test_rows_parked_ahead_of_a_gap_count_against_the_in_flight_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each parked row is sealed within the gap hold whatever comes: left out of the busy
    check, a client sending from fresh keys at nonce 1 put 64,000 rows in flight against a
    limit of 2,000 without one busy answer."""
    m, _ = sealing(tmp_path, monkeypatch, batch_rows=50)  # the limit starts at its floor, 100
    keys = [key_from_seed(bytes([0x40 + i]) * 32) for i in range(3)]

    async def scenario() -> None:
        for key in keys[:2]:  # nonce 0 never sent: all 40 rows park
            assert (await m.submit(rows(m, key, list(range(1, 41))))).accepted == 40
        assert m.parked_rows == 80 and m.pending_rows == 0
        answer = await m.submit(rows(m, keys[2], list(range(30))))
        assert answer.busy and answer.accepted == 0
        assert (await m.submit(rows(m, keys[2], list(range(20))))).accepted == 20

    asyncio.run(scenario())


def test_one_submission_parks_up_to_the_limit_across_many_senders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows parked by one submission are counted as they go (the count was summed anew per row:
    15 s for 65,536 senders), and the limit holds across senders."""
    m, _ = sealing(tmp_path, monkeypatch, mempool_park_rows=100)
    keys = [key_from_seed(i.to_bytes(2, "big") * 16) for i in range(150)]
    batch = pa.concat_batches([rows(m, k, [1]) for k in keys])

    async def scenario() -> None:
        answer = await m.submit(batch)
        assert answer.accepted == 100 and answer.rejected == {"nonce_gap_limit": 50}
        assert m.parked_rows == 100

    asyncio.run(scenario())


def test_a_timer_step_that_fails_neither_ends_the_timer_nor_loses_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object store refusing a sealed batch once (full, say) raised out of the timer
    task, which ended for good: nothing was sealed again, and the rows, taken out of the
    pending ones before the put, were gone from memory."""
    m = mempool(tmp_path, batch_interval_ms=5)
    m._committed_nonces = committed_at({})  # type: ignore[method-assign]
    put: list[pa.RecordBatch] = []
    failures = [RuntimeError("the object store is full")]

    def put_once(batch: pa.RecordBatch) -> object:
        if failures:
            raise failures.pop()
        put.append(batch)
        return object()

    monkeypatch.setattr(mempool_mod.ray, "put", put_once)

    async def scenario() -> None:
        assert (await m.submit(rows(m, A, [0, 1, 2]))).accepted == 3
        for _ in range(200):
            await asyncio.sleep(0.01)
            if put:
                break

    asyncio.run(scenario())
    assert [b.num_rows for b in put] == [3] and m.pending_rows == 0
    assert m.counts["timer_failed"] == 1


def test_a_sealed_batch_holds_at_most_seal_max_payload_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows only bounded a sealed batch: with ``batch_rows`` set high and payloads near
    64 KiB, one could pass a block's payload limit (never ordered) or Arrow's 2 GiB (its rows
    combined into chunks, and the first chunk alone was sealed)."""
    monkeypatch.setattr(mempool_mod, "SEAL_MAX_PAYLOAD_BYTES", 3 * 32)  # three 32-byte rows
    m, put = sealing(tmp_path, monkeypatch, batch_rows=10)
    keys = [key_from_seed(bytes([0x60 + i]) * 32) for i in range(2)]

    async def scenario() -> None:
        for key in keys:  # in sequence: pending, 14 rows in all
            assert (await m.submit(rows(m, key, list(range(7))))).accepted == 7
        while m.pending_rows:
            m._seal(m.batch_rows)

    asyncio.run(scenario())
    assert [b.num_rows for b in put] == [3, 3, 3, 3, 2]
    assert pending_order(m) == []
    sealed = pa.Table.from_batches([b.select(["sender", "nonce"]) for b in put]).to_pylist()
    assert [(r["sender"], r["nonce"]) for r in sealed] == [
        (public_bytes(k), n) for k in keys for n in range(7)
    ]
