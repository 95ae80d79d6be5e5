"""A mempool's journal: rows are on the disk before "accepted" is answered, and a mempool
started again admits those not committed (no Ray here: the calls and the object store are
stand-ins)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from rayledger.actors import journal as journal_module
from rayledger.actors import mempool as mempool_module
from rayledger.actors.journal import Journal, read_frames
from rayledger.actors.mempool import JOURNAL_COLUMN, Mempool
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.errors import AlreadyOpen
from rayledger.tx import TX_SCHEMA, TxKind, make_batch, tx_ids_of
from tests.unit.test_mempool_admission import mempool
from tests.unit.test_mempool_streams import RayValidator

CHAIN = b"\x07" * 32


def rows(seed: int, nonces: list[int], chain: bytes = CHAIN) -> pa.RecordBatch:
    key = key_from_seed(bytes([seed]) * 32)
    digests = [bytes([seed, n % 256]) + bytes(30) for n in nonces]
    return make_batch(key, TxKind.ANCHOR, nonces, digests, chain)


def journal(path: Path, **kw: Any) -> Journal:
    return Journal(path, what="test journal", lock_wait_s=0.1, **kw)


def eio_fsync(fds: list[int], directory: Path | None) -> None:
    """``_fsync_all`` on a failing disk: the descriptors closed, the fsync failed."""
    for fd in fds:
        journal_module.os.close(fd)
    raise OSError(errno.EIO, "Input/output error")


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.log"))


# ---- the journal on its own -------------------------------------------------------------


def test_batches_written_and_synced_are_read_back_in_order(tmp_path: Path) -> None:
    j = journal(tmp_path)
    written = [rows(1, [0, 1]), rows(2, [5]), rows(1, [2, 3, 4])]

    async def scenario() -> None:
        for b in written:
            j.write(b)
        await j.sync()

    asyncio.run(scenario())
    assert j.fsyncs == 1 and j.status()["live_entries"] == 6
    j.close()
    again = journal(tmp_path)
    assert [b.equals(w) for b, w in zip(again.recovered, written, strict=True)] == [True] * 3
    assert again.recovered_rows == 6 and again.torn == []


def test_a_torn_or_corrupt_tail_ends_reading_there(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for n in range(3):
        j.write(rows(1, [n]))
    j.close()
    (seg,) = tmp_path.glob("*.log")
    data = seg.read_bytes()
    whole, stopped = read_frames(data)
    assert len(whole) == 3 and stopped is None
    frame = len(data) // 3
    # A crash in the middle of a write: the last frame is cut short
    seg.write_bytes(data[: 2 * frame + frame // 2])
    cut = journal(tmp_path)
    assert len(cut.recovered) == 2 and "cut short" in cut.torn[0]
    cut.close()
    # A bit flipped in the second frame's body: that frame and what follows are not taken
    flipped = bytearray(data)
    flipped[frame + frame // 2] ^= 0x01
    seg.write_bytes(bytes(flipped))
    bad = journal(tmp_path)
    assert len(bad.recovered) == 1 and "CRC" in bad.torn[0]
    bad.close()
    # Bytes that are no frame at all
    seg.write_bytes(b"\x00" * 40)
    junk = journal(tmp_path)
    assert junk.recovered == [] and "no frame" in junk.torn[0]


def test_a_frame_whose_body_is_not_arrow_is_refused(tmp_path: Path) -> None:
    body = b"not an arrow stream"
    header = journal_module._HEADER.pack(
        journal_module.MAGIC, len(body), journal_module.zlib.crc32(body)
    )
    batches, stopped = read_frames(header + body)
    assert batches == [] and stopped is not None and "does not decode" in stopped


def test_seal_records_are_read_back_and_malformed_ones_skipped(tmp_path: Path) -> None:
    j = journal(tmp_path)
    batch = rows(1, [0, 1, 2])
    j.write(batch)
    j.note_sealed(b"\x05" * 32, tx_ids_of(batch)[:2])
    # Records that carry the seal key but are not seal records of ours
    meta = {journal_module.SEALED_KEY: b"zz"}
    j._append(pa.record_batch({"tx_id": pa.array([b"\x00" * 32], pa.binary(32))}, metadata=meta), 0)
    meta = {journal_module.SEALED_KEY: (b"\x05" * 32).hex().encode()}
    j._append(pa.RecordBatch.from_pydict({}, metadata=meta), 0)
    j._append(pa.record_batch({"x": pa.array([1])}, metadata=meta), 0)
    assert j.status()["live_entries"] == 3 + 1
    j.close()
    again = journal(tmp_path)
    assert again.recovered_rows == 3 and len(again.recovered) == 1
    ((digest, ids),) = again.sealed
    assert digest == b"\x05" * 32 and np.array_equal(ids, tx_ids_of(batch)[:2])
    assert again.torn == ["00000001.log: a malformed seal record"] * 3


def test_segments_go_when_all_their_rows_are_done(tmp_path: Path) -> None:
    j = journal(tmp_path, segment_bytes=1)  # every write opens a segment of its own
    segs = [j.write(rows(1, [n, n + 10])) for n in range(3)]
    assert segs == [1, 2, 3] and len(segments(tmp_path)) == 3
    j.done({1: 1})
    assert len(segments(tmp_path)) == 3  # one row of segment 1 is still live
    j.done({1: 1, 2: 2})
    assert segments(tmp_path) == ["00000003.log"]
    # The newest goes too once done with, and the next write opens another
    j.done({3: 2})
    assert segments(tmp_path) == [] and j.status()["live_entries"] == 0
    assert j.write(rows(1, [7])) == 4 and segments(tmp_path) == ["00000004.log"]
    asyncio.run(j.sync())


def test_concurrent_appends_share_their_fsyncs(tmp_path: Path) -> None:
    j = journal(tmp_path)

    async def one(n: int) -> None:
        j.write(rows(1, [n]))
        await j.sync()

    async def scenario() -> None:
        await asyncio.gather(*(one(n) for n in range(50)))

    asyncio.run(scenario())
    assert 1 <= j.fsyncs <= 2
    assert j._synced == j._written == 50


def test_a_rotation_that_cannot_open_its_segment_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (or disk) when the next segment is opened: that append is refused
    and the journal keeps writing where it was. Before, the closed descriptor stayed in use,
    and the next append went to whatever file the process opened next under its number."""
    j = journal(tmp_path, segment_bytes=1)
    assert j.write(rows(1, [0])) == 1
    real = j._file
    monkeypatch.setattr(j, "_file", lambda n: tmp_path / "missing" / f"{n}.log")
    with pytest.raises(OSError):
        j.write(rows(1, [1]))
    assert (j.segment, j._written, j.status()["live_entries"]) == (1, 1, 1)
    other = journal_module.os.open(
        tmp_path / "other", journal_module.os.O_RDWR | journal_module.os.O_CREAT
    )
    monkeypatch.setattr(j, "_file", real)
    assert j.write(rows(1, [2])) == 2
    asyncio.run(j.sync())
    assert journal_module.os.fstat(other).st_size == 0
    journal_module.os.close(other)
    j.close()
    again = journal(tmp_path)
    assert [b.column("nonce").to_pylist() for b in again.recovered] == [[0], [2]]


def test_segments_rotated_out_are_fsynced_by_the_next_sync_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation hands the full segment to the next sync, which fsyncs it in its thread with
    the newest one and the directory; a sync answers only once all three are done."""
    calls: list[tuple[int, bool]] = []
    real = journal_module._fsync_all

    def spy(fds: list[int], directory: Path | None) -> None:
        calls.append((len(fds), directory is not None))
        real(fds, directory)

    monkeypatch.setattr(journal_module, "_fsync_all", spy)
    j = journal(tmp_path, segment_bytes=1)
    j.write(rows(1, [0]))
    j.write(rows(1, [1]))  # segment 1 rotated out, unsynced
    assert calls == [] and len(j._retired) == 1
    asyncio.run(j.sync())
    assert calls == [(2, True)] and j._retired == [] and j._dir_synced
    j.write(rows(1, [2]))  # segment 3: a new directory entry again
    asyncio.run(j.sync())
    assert calls[-1] == (2, True)
    j.write(rows(1, [3]))  # fits nowhere but a new segment either (segment_bytes=1)
    j._size = 0  # pretend it fits: the same segment
    j.write(rows(1, [4]))
    asyncio.run(j.sync())
    assert calls[-1] == (2, True)  # 3 rotated out and 4 (new entry)
    j.close()


def test_a_new_segment_opened_during_an_fsync_gets_its_own_directory_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync that started before a segment was opened does not vouch for its directory
    entry: the next one syncs the directory again."""
    j = journal(tmp_path, segment_bytes=1)
    dirs: list[bool] = []
    real = journal_module._fsync_all

    def spy(fds: list[int], directory: Path | None) -> None:
        dirs.append(directory is not None)
        j.write(rows(2, [len(dirs)]))  # a rotation while the fsync runs (a thread in life)
        real(fds, directory)

    monkeypatch.setattr(journal_module, "_fsync_all", spy)

    async def scenario() -> None:
        j.write(rows(1, [0]))
        await j.sync()
        assert not j._dir_synced  # segment 2 came during that fsync
        monkeypatch.setattr(journal_module, "_fsync_all", real)
        await j.sync()
        assert j._dir_synced

    asyncio.run(scenario())
    assert dirs == [True]
    j.close()


def test_after_a_failed_fsync_every_sync_and_append_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the kernel may have dropped the pages: a later fsync that
    succeeds proves nothing, so no later sync may answer as if it did."""
    j = journal(tmp_path)

    j.write(rows(1, [0]))
    monkeypatch.setattr(journal_module, "_fsync_all", eio_fsync)
    with pytest.raises(OSError, match="Input/output"):
        asyncio.run(j.sync())
    monkeypatch.undo()
    with pytest.raises(OSError, match="Input/output"):
        j.write(rows(1, [1]))
    with pytest.raises(OSError, match="Input/output"):
        asyncio.run(j.sync())
    j.close()


def test_a_segment_that_cannot_be_deleted_is_left_and_nothing_else_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = journal(tmp_path, segment_bytes=1)
    j.write(rows(1, [0]))
    j.write(rows(1, [1]))

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        j.done({1: 1, 2: 1})  # neither can go: left, logged, counts still taken
    assert j.status()["live_entries"] == 0 and len(segments(tmp_path)) == 2
    j.write(rows(1, [2]))
    j.close()


def test_a_journal_of_seal_records_alone_is_cleared_at_opening(tmp_path: Path) -> None:
    """Seal records whose rows' segments are gone (their batches were done with) and torn
    tails leave nothing to admit again: their segments go at once, not never."""
    j = journal(tmp_path, segment_bytes=1)
    batch = rows(1, [0, 1])
    j.write(batch)
    j.note_sealed(b"\x05" * 32, tx_ids_of(batch))
    j.done({1: 2})  # the rows' segment went; the crash came before the seal record's
    j.close()
    assert segments(tmp_path) == ["00000002.log"]
    again = journal(tmp_path)
    assert again.recovered == [] and again.sealed == [] and segments(tmp_path) == []
    again.close()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    held = journal(tmp_path)
    with pytest.raises(AlreadyOpen):
        journal(tmp_path)
    held.close()
    journal(tmp_path).close()


# ---- the mempool with its journal -------------------------------------------------------


def committed_as(table: dict[bytes, int]) -> Any:
    async def committed(senders: list[bytes]) -> dict[bytes, int]:
        return {s: table.get(s, 0) for s in senders}

    return committed


def crash(m: Mempool) -> None:
    """What a crash leaves: the journal's files (the lock goes with the process)."""
    if m._ticker is not None:
        m._ticker.cancel()
    assert m.journal is not None
    m.journal.close()


def test_a_restarted_mempool_admits_again_what_it_accepted_and_was_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: ("ref", batch.num_rows))
    first = mempool(tmp_path)
    chain = first.genesis.chain_id
    a, b = public_bytes(key_from_seed(b"\x01" * 32)), public_bytes(key_from_seed(b"\x02" * 32))
    first._committed_nonces = committed_as({})  # type: ignore[method-assign]
    journal_dir = tmp_path / "mempool-0" / "journal"

    async def accept() -> None:
        assert (await first.submit(rows(1, [0, 1, 2, 3, 4, 5], chain))).accepted == 6
        # b's nonce 2 is missing: its nonce 3 is held apart (parked)
        assert (await first.submit(rows(2, [0, 1, 3], chain))).accepted == 3
        assert first.journal is not None and first.journal._synced == first.journal._written
        assert (first.pending_rows, first.parked_rows) == (8, 1)

    asyncio.run(accept())
    crash(first)

    # Started again: meanwhile a's nonces 0..2 committed (sealed before the crash)
    second = mempool(tmp_path)
    assert second.journal is not None and second.journal.recovered_rows == 9
    second._committed_nonces = committed_as({a: 3})  # type: ignore[method-assign]
    handles = [RayValidator() for _ in range(4)]

    async def recover() -> bytes:
        # A client whose answer was lost with the crash offers its rows again: the answer
        # waits for the recovery (its validators give their handles meanwhile), and they are
        # the journal's, answered duplicate (not sealed twice)
        again = asyncio.ensure_future(second.submit(rows(1, [3, 4, 5], chain)))
        await asyncio.sleep(0.05)
        assert not again.done() and second._recovery is not None
        for i, h in enumerate(handles):
            await second.set_validator(i, h)
        await second._recovery
        assert (await again).accepted == 0 and (await again).rejected == {"duplicate": 3}
        assert second.counts["recovered"] == 6
        assert second.counts["recovered_stale_nonce"] == 3
        # Sealed at once, but for b's nonce 3, still parked
        assert (second.pending_rows, second.parked_rows) == (0, 1)
        # The old segments went once the rows were journaled again
        assert len(segments(journal_dir)) == 1
        (call,) = handles[0].calls
        digest, (ref,) = call[0], call[1]
        assert ref == ("ref", 5)
        # Its 5 rows and its seal record, in the one segment
        assert set(second.sources[digest].values()) == {6}
        await second.on_commit([digest])
        assert second.journal.status()["live_entries"] == 1  # the parked row
        return digest

    asyncio.run(recover())
    crash(second)

    # Again: b's nonce 2 came another way and committed; only b's nonce 3 is left to commit
    third = mempool(tmp_path)
    third._committed_nonces = committed_as({a: 6, b: 3})  # type: ignore[method-assign]

    async def once_more() -> None:
        # Two validators give their handles; the others are down: it does not wait for ever
        await third.set_validator(0, RayValidator())
        await third.set_validator(1, RayValidator())
        assert third._recovery is not None
        await third._recovery
        assert third.counts["recovered"] == 1
        assert third.pending_rows == 0 and third.parked_rows == 0 and third.sealed == 1

    monkeypatch.setattr(mempool_module, "RECOVER_WAIT_S", 0.2)
    asyncio.run(once_more())
    assert third.journal is not None and third.journal.recovered == []
    crash(third)


@pytest.mark.parametrize("part_bytes", [1 << 30, 1])
def test_a_large_journal_is_admitted_again_in_parts_and_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part_bytes: int
) -> None:
    """Combined past Arrow's 2 GiB, the journal's rows split into chunks and the recovery
    took the first alone: 3,700 of 33,300 rows of 64 KiB answered "accepted" were dropped with
    the old segments. In parts (here one per journaled submission, ``part_bytes`` 1), every
    row comes back, each sender's in nonce order."""
    monkeypatch.setattr(mempool_module, "RECOVER_PART_BYTES", part_bytes)
    sent: list[pa.RecordBatch] = []
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: sent.append(batch) or "ref")
    first = mempool(tmp_path)
    chain = first.genesis.chain_id
    first._committed_nonces = committed_as({})  # type: ignore[method-assign]
    submissions = [rows(1, [0, 1, 2], chain), rows(2, [0, 1], chain), rows(1, [3, 4], chain)]

    async def accept() -> None:
        for b in submissions:
            assert (await first.submit(b)).accepted == b.num_rows

    asyncio.run(accept())
    crash(first)
    second = mempool(tmp_path)
    second._committed_nonces = committed_as({})  # type: ignore[method-assign]

    async def recover() -> None:
        for i in range(4):
            await second.set_validator(i, RayValidator())
        assert second._recovery is not None
        await second._recovery

    asyncio.run(recover())
    assert second.counts["recovered"] == 7 and second.pending_rows == second.parked_rows == 0
    assert len(sent) == (1 if part_bytes > 1 else 3)
    got = pa.Table.from_batches([b.select(["sender", "nonce"]) for b in sent]).to_pylist()
    assert sorted((r["sender"], r["nonce"]) for r in got) == sorted(
        (r["sender"], r["nonce"])
        for b in submissions
        for r in b.select(["sender", "nonce"]).to_pylist()
    )
    for sender in {r["sender"] for r in got}:
        assert [r["nonce"] for r in got if r["sender"] == sender] == sorted(
            r["nonce"] for r in got if r["sender"] == sender
        )
    crash(second)


def test_sealed_batches_carry_no_journal_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put: list[pa.RecordBatch] = []
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: put.append(batch) or "ref")
    m = mempool(tmp_path, batch_rows=3)
    batch = rows(1, [0, 1, 2, 3], m.genesis.chain_id)

    async def scenario() -> None:
        await m.set_validator(0, RayValidator())
        await m.submit(batch)
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())
    (sealed,) = put
    assert sealed.schema.names == TX_SCHEMA.names and JOURNAL_COLUMN not in sealed.schema.names
    assert np.array_equal(tx_ids_of(sealed), tx_ids_of(batch)[:3])
    assert m.pending_rows == 1 and m.pending[0].schema.names[-1] == JOURNAL_COLUMN


def test_a_submission_that_cannot_be_journaled_is_refused_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = mempool(tmp_path)
    batch = rows(1, [0, 1, 2], m.genesis.chain_id)
    real_writev = journal_module.os.writev

    def full(fd: int, buffers: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        monkeypatch.setattr(journal_module.os, "writev", full)
        res = await m.submit(batch)
        assert res.accepted == 0 and res.rejected == {"journal_unavailable": 3}
        assert res.error is not None and "No space left" in res.error
        assert (m.pending_rows, m.parked_rows, len(m.seen)) == (0, 0, 0)
        assert m.counts.get("accepted", 0) == 0
        # The disk has room again: the same rows are taken
        monkeypatch.setattr(journal_module.os, "writev", real_writev)
        assert (await m.submit(batch)).accepted == 3
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())
    m.journal.close()  # type: ignore[union-attr]
    # What went to the disk is the accepted submission alone
    assert journal(tmp_path / "mempool-0" / "journal").recovered_rows == 3


def test_a_failed_fsync_stops_the_mempool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = mempool(tmp_path)
    stopped: list[str] = []

    class Stopped(Exception):
        pass

    def stop(what: str, exc: BaseException) -> None:
        stopped.append(f"{what}: {exc}")
        raise Stopped

    monkeypatch.setattr(mempool_module, "stop_on_disk_failure", stop)
    monkeypatch.setattr(journal_module, "_fsync_all", eio_fsync)

    async def scenario() -> None:
        with pytest.raises(Stopped):
            await m.submit(rows(1, [0], m.genesis.chain_id))
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())
    assert stopped == ["mempool 0: [Errno 5] Input/output error"]


def test_a_recovery_that_fails_lets_submissions_through_and_keeps_the_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery that raises (a bug, a Ray call failing) is logged and counted; the
    submissions waiting on it go on, the rows it held are taken if offered again, and its
    segments stay for the next start. Before, every later submission raised its error."""
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: "ref")
    monkeypatch.setattr(mempool_module, "RECOVER_WAIT_S", 0.0)
    first = mempool(tmp_path)
    chain = first.genesis.chain_id
    first._committed_nonces = committed_as({})  # type: ignore[method-assign]
    asyncio.run(first.submit(rows(1, [0, 1], chain)))
    crash(first)
    journal_dir = tmp_path / "mempool-0" / "journal"
    left = segments(journal_dir)

    calls: list[int] = []

    async def broken(senders: list[bytes]) -> dict[bytes, int]:
        calls.append(len(senders))
        if len(calls) == 1:  # the recovery's read
            raise RuntimeError("shards unreachable in an unexpected way")
        return {}

    second = mempool(tmp_path)
    second._committed_nonces = broken  # type: ignore[method-assign]

    async def scenario() -> None:
        answer = await second.submit(rows(1, [0, 1, 2], chain))
        assert answer.error is None and answer.accepted == 3
        assert second._ticker is not None
        second._ticker.cancel()

    asyncio.run(scenario())
    assert second.counts["recovery_failed"] == 1 and second._recovering == set()
    assert set(left) <= set(segments(journal_dir))


def test_rows_of_another_network_in_the_journal_are_not_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: "ref")
    monkeypatch.setattr(mempool_module, "RECOVER_WAIT_S", 0.0)
    first = mempool(tmp_path)
    first.journal.write(rows(1, [0, 1], b"\x33" * 32))  # type: ignore[union-attr]
    crash(first)
    m = mempool(tmp_path)

    async def scenario() -> None:
        await m.set_validator(0, RayValidator())
        await m._recovery  # type: ignore[misc]
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())
    assert m.counts == {"recovered_wrong_chain": 2}
    assert m.pending_rows == 0 and segments(tmp_path / "mempool-0" / "journal") == []


def test_the_journal_can_be_turned_off(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_journal=False)
    batch = rows(1, [0, 1], m.genesis.chain_id)

    async def scenario() -> None:
        assert (await m.submit(batch)).accepted == 2
        assert m._ticker is not None
        m._ticker.cancel()
        assert (await m.status())["journal"] is None

    asyncio.run(scenario())
    assert m.pending[0].schema.names == TX_SCHEMA.names
    assert not (tmp_path / "mempool-0").exists()


def test_batches_sealed_before_a_restart_go_out_again_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch sealed and announced before the crash may be held by validators: announced
    again under its digest, they drop it (no row ordered twice); sealed anew with other rows,
    its rows would be ordered twice. One whose rows all committed is not sent again."""
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: "ref")
    first = mempool(tmp_path, batch_rows=4)
    chain = first.genesis.chain_id
    a = public_bytes(key_from_seed(b"\x01" * 32))
    first._committed_nonces = committed_as({})  # type: ignore[method-assign]
    first.limit.admits = lambda held, rows: True  # type: ignore[method-assign]
    before = RayValidator()

    async def accept() -> None:
        await first.set_validator(0, before)
        # Sealed: nonces 0..3 and 4..7 (two batches); pending: 8..9
        assert (await first.submit(rows(1, list(range(10)), chain))).accepted == 10
        # Sender 2's row, pending
        assert (await first.submit(rows(2, [0], chain))).accepted == 1

    asyncio.run(accept())
    digests = [call[0] for call in before.calls]
    assert len(digests) == 2 and first.pending_rows == 2 + 1
    crash(first)

    second = mempool(tmp_path, batch_rows=4)
    # The first batch committed meanwhile (sender 1's nonces 0..3); the second did not
    second._committed_nonces = committed_as({a: 4})  # type: ignore[method-assign]
    after = [RayValidator() for _ in range(4)]

    async def recover() -> None:
        for i, h in enumerate(after):
            await second.set_validator(i, h)
        await second._recovery  # type: ignore[misc]
        assert second._ticker is not None
        second._ticker.cancel()

    asyncio.run(recover())
    announced = [call[0] for call in after[0].calls]
    # The second batch first, as it was; then the 3 rows that were pending, sealed anew
    assert announced[0] == digests[1] and len(announced) == 2
    assert second.counts["recovered_batches"] == 1
    assert second.counts["recovered_committed_batches"] == 1
    assert "recovered_stale_nonce" not in second.counts
    assert second.counts["recovered"] == 7 and "recovered_batch_changed" not in second.counts
    assert second.in_flight == {digests[1]: 4, announced[1]: 3}
    # Sender 1's sequence here continues after the batch sent again: nothing parked
    assert second.parked_rows == 0 and second.next_nonce[a] == 10


def test_two_journaled_rows_of_one_nonce_park_once_at_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mempool accepts a second row for a nonce it admitted (its shards not answering, the
    nonce not known committed): given back by the journal, both landed ahead of the gap and
    were parked by nonce, the second over the first: ``parked_rows`` counted one row too many
    for good, and the row overwritten never left the journal."""
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: "ref")
    monkeypatch.setattr(mempool_module, "RECOVER_WAIT_S", 0.0)
    first = mempool(tmp_path)
    chain = first.genesis.chain_id

    async def shards_down(senders: list[bytes]) -> dict[bytes, int]:
        return {}

    first._committed_nonces = shards_down  # type: ignore[method-assign]
    key = key_from_seed(b"\x44" * 32)
    x = make_batch(key, TxKind.ANCHOR, [7], [b"X" * 32], chain)
    y = make_batch(key, TxKind.ANCHOR, [7], [b"Y" * 32], chain)

    async def accept() -> None:
        assert (await first.submit(x)).accepted == 1 and (await first.submit(y)).accepted == 1

    asyncio.run(accept())
    crash(first)
    second = mempool(tmp_path)
    second._committed_nonces = committed_as({public_bytes(key): 5})  # type: ignore[method-assign]

    async def recover() -> None:
        second._start()
        assert second._recovery is not None
        await second._recovery

    asyncio.run(recover())
    assert second.parked_rows == 1 == sum(len(h) for h in second.parked.values())
    assert second.counts["recovered_nonce_parked"] == 1
    crash(second)


def test_rows_given_back_ahead_of_a_gap_are_all_parked_past_the_parking_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows taken in sequence before the crash (nothing known of their sender then), given
    back where the shards now put the sender's next nonce below them (its earlier rows in
    another mempool, or a shard lagging): they land ahead of a gap. Parked up to the limits a
    submission has, the rest were dropped, though each was answered "accepted"."""
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: "ref")
    monkeypatch.setattr(mempool_module, "RECOVER_WAIT_S", 0.0)
    settings = {"mempool_park_per_sender": 8, "mempool_park_rows": 12}
    first = mempool(tmp_path, **settings)
    chain = first.genesis.chain_id
    a = public_bytes(key_from_seed(b"\x05" * 32))
    first.limit.admits = lambda held, rows: True  # type: ignore[method-assign]

    async def shards_down(senders: list[bytes]) -> dict[bytes, int]:
        return {}

    first._committed_nonces = shards_down  # type: ignore[method-assign]

    async def accept() -> None:
        assert (await first.submit(rows(5, list(range(100, 120)), chain))).accepted == 20

    asyncio.run(accept())
    assert first.parked_rows == 0 and first.pending_rows == 20
    crash(first)

    second = mempool(tmp_path, **settings)
    second._committed_nonces = committed_as({a: 90})  # type: ignore[method-assign]

    async def recover() -> None:
        second._start()
        assert second._recovery is not None
        await second._recovery
        assert second._ticker is not None
        second._ticker.cancel()

    asyncio.run(recover())
    assert second.parked_rows == 20 == len(second.parked[a])
    assert second.counts["recovered"] == 20 and "recovered_nonce_gap_limit" not in second.counts
    # A submission still meets the limits: the sender's later row is refused, not parked
    more = asyncio.run(second.submit(rows(5, [120], chain)))
    assert more.accepted == 0 and more.rejected == {"nonce_gap_limit": 1}
    crash(second)
