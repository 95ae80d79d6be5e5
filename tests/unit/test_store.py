"""Block store: append, reopen, reads, scans; crash safety; corruption detection.

Scenarios:
- append/reopen/read: blocks survive a reopen, reads by height, hash and tx id, columnar scan.
- rejecting appends: wrong parent, tampered body; the store is unchanged after each.
- a replayed transaction (ordered again, BAD_NONCE) and a duplicate inside one block are stored;
  the tx index keeps the row that consumed the nonce.
- crash between segment write and index commit (child process SIGKILLed): nothing
  acknowledged is lost and the complete frame is indexed on reopen.
- torn write (partial frame at the tail): set aside to a .torn file, reported, acknowledged
  blocks intact.
- corruption: one flipped byte in any block's frame, a truncated segment, a missing segment,
  a frame swapped for another: StoreCorruption naming the height and the file; so does an
  index that points at another height's frame, names another hash or too short a frame, and
  a frame rewritten with its checksum around rows that are not block rows.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from rayledger.actors.storage import BlockStore, TxLocation
from rayledger.actors.storage.engine import _PREFIX, MAGIC, encode_frame
from rayledger.block import (
    Block,
    BlockHeader,
    QuorumCert,
    build_block,
    genesis_header,
    make_results,
)
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.errors import InvalidBlock, NotFound, StoreCorruption, StoreError
from rayledger.execution import Status
from rayledger.tx import make_batch, tx_ids_of

CHAIN = bytes(range(32))
KEYS = [key_from_seed(bytes([i]) * 32) for i in range(1, 5)]
GENESIS = genesis_header(CHAIN, 1_700_000_000_000)


def make_chain(count: int, rows: int = 50, start_nonce: int = 0) -> list[Block]:
    """``count`` linked blocks after genesis, each with ``rows`` signed transactions."""
    blocks: list[Block] = []
    parent: BlockHeader = GENESIS
    qc = QuorumCert.genesis(GENESIS.hash)
    nonce = start_nonce
    for h in range(1, count + 1):
        txs = make_batch(
            [KEYS[i % 4] for i in range(rows)],
            [i % 7 for i in range(rows)],
            range(nonce, nonce + rows),
            [f"payload {h}/{i}".encode() * (i % 5) for i in range(rows)],
            CHAIN,
        )
        nonce += rows
        results = make_results(
            [i % 2 for i in range(rows)], [bytes([h, i % 256]) for i in range(rows)]
        )
        block = build_block(
            parent,
            txs,
            results,
            round_=h,
            proposer=public_bytes(KEYS[h % 4]),
            timestamp_ms=GENESIS.timestamp_ms + h,
            parent_qc=qc,
        )
        blocks.append(block)
        parent = block.header
        qc = QuorumCert(parent.hash, parent.round, b"\x07", (bytes(64),) * 3)
    return blocks


@pytest.fixture(scope="module")
def chain() -> list[Block]:
    return make_chain(6)


def filled(path: Path, blocks: list[Block], **kw: object) -> BlockStore:
    store = BlockStore(path, GENESIS, **kw)  # type: ignore[arg-type]
    for b in blocks:
        store.append(b)
    return store


def test_append_reopen_and_read(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain).close()
    with BlockStore(tmp_path, GENESIS) as store:
        assert store.height == len(chain)
        assert store.head == chain[-1].header
        assert store.recovery == []
        for b in chain:
            got = store.get_block(b.height)
            assert got.header == b.header
            assert got.parent_qc == b.parent_qc
            assert got.txs.equals(b.txs)
            assert got.results.equals(b.results)
            assert store.height_of(b.hash) == b.height
        assert store.get_header(0) == GENESIS
        tx_id = tx_ids_of(chain[2].txs)[7].tobytes()
        loc, row = store.get_tx(tx_id)
        assert (loc.height, loc.index) == (3, 7)
        assert row.column("tx_id")[0].as_py() == tx_id
        assert row.column("result")[0].as_py() == chain[2].results.column("result")[7].as_py()


def test_missing_reads_raise_not_found(tmp_path: Path, chain: list[Block]) -> None:
    with filled(tmp_path, chain[:2]) as store:
        with pytest.raises(NotFound):
            store.get_block(3)
        with pytest.raises(NotFound):
            store.locate_tx(bytes(32))
        with pytest.raises(NotFound):
            store.height_of(bytes(32))


def test_store_without_tx_index_says_so_and_keeps_the_choice(
    tmp_path: Path, chain: list[Block]
) -> None:
    with filled(tmp_path, chain[:2], index_txs=False) as store:
        assert store.get_block(2).header == chain[1].header
        with pytest.raises(StoreError, match="no transaction index"):
            store.locate_tx(tx_ids_of(chain[0].txs)[0].tobytes())
    # The choice was fixed at creation: reopening does not pretend to have an index
    with BlockStore(tmp_path, GENESIS, index_txs=True) as store:
        assert store.height == 2 and not store.index_txs
        with pytest.raises(StoreError, match="no transaction index"):
            store.get_tx(tx_ids_of(chain[0].txs)[0].tobytes())


def test_scan_is_columnar_history(tmp_path: Path, chain: list[Block]) -> None:
    with filled(tmp_path, chain) as store:
        table = store.scan(["nonce", "status"], from_height=2, to_height=4)
        assert table.column_names == ["height", "index", "nonce", "status"]
        expected = pa.concat_arrays([b.txs.column("nonce") for b in chain[1:4]])
        assert table.column("nonce").combine_chunks().equals(expected)
        assert table.column("height").to_pylist() == [h for h in (2, 3, 4) for _ in range(50)]
        assert table.column("index").to_pylist()[:3] == [0, 1, 2]
        assert store.scan().num_rows == 50 * len(chain)
        assert store.scan(from_height=10).num_rows == 0
        with pytest.raises(ValueError, match="unknown columns"):
            store.scan(["nope"])


def test_segments_roll_over(tmp_path: Path, chain: list[Block]) -> None:
    size = max(len(encode_frame(b)) for b in chain)
    filled(tmp_path, chain, segment_bytes=size * 2 + 1).close()
    segs = sorted((tmp_path / "segments").glob("*.seg"))
    assert len(segs) == 3
    with BlockStore(tmp_path, GENESIS) as store:
        assert store.height == len(chain)
        assert store.scan(["tx_id"]).num_rows == 50 * len(chain)


def _assert_unchanged(store: BlockStore, height: int) -> None:
    assert store.height == height
    assert store.scan(["tx_id"]).num_rows == 50 * height


def test_rejects_block_not_extending_head(tmp_path: Path, chain: list[Block]) -> None:
    with filled(tmp_path, chain[:2]) as store:
        with pytest.raises(InvalidBlock, match="does not follow"):
            store.append(chain[3])
        with pytest.raises(InvalidBlock):
            store.append(chain[1])
        with pytest.raises(InvalidBlock, match="does not extend"):
            store.append(chain[3], verify=False)
        _assert_unchanged(store, 2)


def test_replayed_transaction_keeps_its_receipt(tmp_path: Path, chain: list[Block]) -> None:
    """A transaction ordered again (replayed through another mempool) is stored with the
    BAD_NONCE that execution gives it; the index keeps the row that consumed the nonce."""
    with filled(tmp_path, chain[:2]) as store:
        replayed = make_results([Status.BAD_NONCE] * 50, [b""] * 50)
        replay = build_block(
            chain[1].header,
            chain[0].txs,
            replayed,
            round_=3,
            proposer=public_bytes(KEYS[0]),
            timestamp_ms=1,
            parent_qc=chain[2].parent_qc,
        )
        store.append(replay)
        tx_id = tx_ids_of(chain[0].txs)[4].tobytes()
        assert store.locate_tx(tx_id) == TxLocation(1, 4)
    with BlockStore(tmp_path, GENESIS) as store:
        assert store.height == 3 and store.locate_tx(tx_id) == TxLocation(1, 4)


def test_duplicate_inside_block_indexes_the_row_that_counted(
    tmp_path: Path, chain: list[Block]
) -> None:
    with BlockStore(tmp_path, GENESIS) as store:
        first = chain[0].txs.slice(0, 1)
        doubled = pa.concat_batches([first, chain[0].txs.slice(1, 5), first])
        results = make_results([Status.BAD_NONCE, 0, 0, 0, 0, 0, Status.OK], [b""] * 7)
        block = build_block(
            GENESIS,
            doubled,
            results,
            round_=1,
            proposer=public_bytes(KEYS[0]),
            timestamp_ms=1,
            parent_qc=QuorumCert.genesis(GENESIS.hash),
        )
        store.append(block)
        assert store.locate_tx(tx_ids_of(first)[0].tobytes()) == TxLocation(1, 6)


def test_rejects_tampered_body(tmp_path: Path, chain: list[Block]) -> None:
    with BlockStore(tmp_path, GENESIS) as store:
        b = chain[0]
        nonces = b.txs.column("nonce").to_pylist()
        nonces[3] += 1
        cols = [
            pa.array(nonces, pa.uint64()) if n == "nonce" else b.txs.column(n)
            for n in b.txs.schema.names
        ]
        forged = Block(
            b.header, pa.RecordBatch.from_arrays(cols, schema=b.txs.schema), b.results, b.parent_qc
        )
        with pytest.raises(InvalidBlock, match="tx_id column"):
            store.append(forged)
        assert store.height == 0
        assert not any((tmp_path / "segments").iterdir())


def test_other_chain_refused(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain[:1]).close()
    other = genesis_header(bytes(32), 5)
    with pytest.raises(StoreError, match="holds chain"):
        BlockStore(tmp_path, other)


# ---- crash safety ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from unit.test_store import GENESIS, make_chain
    from rayledger.actors.storage import BlockStore, TxLocation

    kill_at = int(sys.argv[2])
    def hook(height):
        if height == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    store = BlockStore(sys.argv[1], GENESIS, _after_segment_write=hook)
    for block in make_chain(6):
        store.append(block)
        print(block.height, flush=True)
    """
)


def test_kill_between_segment_write_and_index(tmp_path: Path, chain: list[Block]) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parents[1])))
    store_dir = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, str(script), str(store_dir), "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acknowledged = [int(x) for x in proc.stdout.split()]
    assert acknowledged == [1, 2, 3]
    with BlockStore(store_dir, GENESIS) as store:
        # Block 4 was fully written and fsynced before the kill: it is recovered, not lost.
        assert store.height == 4
        assert store.head == chain[3].header
        assert any("interrupted append" in r for r in store.recovery)
        for h in acknowledged:
            assert store.get_block(h).header == chain[h - 1].header
        store.append(chain[4])
    with BlockStore(store_dir, GENESIS) as store:
        assert store.height == 5
        assert store.recovery == []


def test_torn_tail_is_set_aside_and_reported(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain[:3]).close()
    seg = tmp_path / "segments" / "00000000.seg"
    size = seg.stat().st_size
    partial = encode_frame(chain[3])[:-100]
    with open(seg, "ab") as f:
        f.write(partial)
    with BlockStore(tmp_path, GENESIS) as store:
        assert store.height == 3
        assert len(store.recovery) == 1 and "unacknowledged" in store.recovery[0]
        assert seg.stat().st_size == size
        torn = list((tmp_path / "segments").glob("*.torn-*"))
        assert len(torn) == 1 and torn[0].read_bytes() == partial
        store.append(chain[3])
        assert store.height == 4


# ---- corruption --------------------------------------------------------------------------


def _frame_spans(blocks: list[Block]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for b in blocks:
        n = len(encode_frame(b))
        spans.append((pos, n))
        pos += n
    return spans


@pytest.mark.parametrize("victim", [1, 3, 6])
@pytest.mark.parametrize("where", [0.0, 0.01, 0.2, 0.5, 0.9, 0.999])
def test_flipped_byte_is_detected_with_height(
    tmp_path: Path, chain: list[Block], victim: int, where: float
) -> None:
    filled(tmp_path, chain).close()
    seg = tmp_path / "segments" / "00000000.seg"
    start, length = _frame_spans(chain)[victim - 1]
    data = bytearray(seg.read_bytes())
    data[start + int(where * (length - 1))] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreCorruption) as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == victim
    assert err.value.path == str(seg)
    assert err.value.code == "store_corruption"


def test_truncated_segment_is_detected(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain).close()
    seg = tmp_path / "segments" / "00000000.seg"
    start, _ = _frame_spans(chain)[4]
    with open(seg, "r+b") as f:
        f.truncate(start + 10)
    with pytest.raises(StoreCorruption, match="truncated") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 5


def test_missing_segment_is_detected(tmp_path: Path, chain: list[Block]) -> None:
    size = max(len(encode_frame(b)) for b in chain)
    filled(tmp_path, chain, segment_bytes=size * 2 + 1).close()
    (tmp_path / "segments" / "00000001.seg").unlink()
    with pytest.raises(StoreCorruption, match="missing") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 3


def test_frame_replaced_by_valid_foreign_frame(tmp_path: Path, chain: list[Block]) -> None:
    """A well-formed frame of another chain with the same length: checksum passes, chain fails."""
    filled(tmp_path, chain[:2]).close()
    seg = tmp_path / "segments" / "00000000.seg"
    data = bytearray(seg.read_bytes())
    start, length = _frame_spans(chain)[1]
    other = make_chain(2, start_nonce=10_000)[1]
    frame = encode_frame(other)
    assert len(frame) == length
    data[start : start + length] = frame
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreCorruption) as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 2


def test_unverified_open_still_checks_checksums(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain).close()
    seg = tmp_path / "segments" / "00000000.seg"
    data = bytearray(seg.read_bytes())
    data[_frame_spans(chain)[2][0] + 40] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreCorruption) as err:
        BlockStore(tmp_path, GENESIS, verify_on_open=False)
    assert err.value.height == 3
    assert os.path.exists(seg)


# ---- opening from the verified mark (a long chain opens in the time of its recent blocks) ----


def _flip(seg: Path, at: int) -> None:
    data = bytearray(seg.read_bytes())
    data[at] ^= 0x01
    seg.write_bytes(bytes(data))


def test_open_from_the_mark_reads_one_frame_and_reads_still_check(
    tmp_path: Path, chain: list[Block], monkeypatch: pytest.MonkeyPatch
) -> None:
    filled(tmp_path, chain).close()
    reads: list[int | None] = []
    original = BlockStore._read_frame

    def counting(self: BlockStore, segment: int, offset: int, length: int, height: int | None):  # type: ignore[no-untyped-def]
        reads.append(height)
        return original(self, segment, offset, length, height)

    monkeypatch.setattr(BlockStore, "_read_frame", counting)
    with BlockStore(tmp_path, GENESIS, verify_from_mark=True) as store:
        assert store.head == chain[-1].header and reads == [6]
    monkeypatch.undo()
    # Damage below the mark is not looked for at such an open, but found by any read of it
    # (and by a full open, the default)
    seg = tmp_path / "segments" / "00000000.seg"
    _flip(seg, _frame_spans(chain)[1][0] + 50)
    with BlockStore(tmp_path, GENESIS, verify_from_mark=True) as store:
        assert store.height == 6
        with pytest.raises(StoreCorruption) as err:
            store.get_block(2)
        assert err.value.height == 2
        store.append(make_chain(7)[6])  # the store goes on; the mark moves with appends
    with pytest.raises(StoreCorruption) as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 2


def test_blocks_above_a_lagging_mark_are_verified(tmp_path: Path, chain: list[Block]) -> None:
    store = filled(tmp_path, chain)
    store._set_mark(chain[2].header)  # as if blocks 4.. were indexed by another writer
    store.close()
    _flip(tmp_path / "segments" / "00000000.seg", _frame_spans(chain)[4][0] + 60)
    with pytest.raises(StoreCorruption) as err:
        BlockStore(tmp_path, GENESIS, verify_from_mark=True)
    assert err.value.height == 5


@pytest.mark.parametrize("damage", ["gap below", "foreign mark", "mark above the head"])
def test_a_mark_the_index_does_not_bear_out_means_a_full_verification(
    tmp_path: Path, chain: list[Block], damage: str
) -> None:
    import sqlite3
    import struct

    store = filled(tmp_path, chain)
    store.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    if damage == "gap below":
        db.execute("DELETE FROM blocks WHERE height = 2")
    elif damage == "foreign mark":
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'verified'",
            (struct.pack(">Q32s", 6, b"x" * 32),),
        )
    else:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'verified'",
            (struct.pack(">Q32s", 9, b"x" * 32),),
        )
    db.commit()
    db.close()
    if damage == "gap below":
        with pytest.raises(StoreCorruption, match="skips from height 1 to 3"):
            BlockStore(tmp_path, GENESIS, verify_from_mark=True)
        return
    _flip(tmp_path / "segments" / "00000000.seg", _frame_spans(chain)[0][0] + 70)
    with pytest.raises(StoreCorruption) as err:  # found: the open started from genesis
        BlockStore(tmp_path, GENESIS, verify_from_mark=True)
    assert err.value.height == 1


def test_a_commit_proof_appended_with_its_block_is_kept_with_it(
    tmp_path: Path, chain: list[Block]
) -> None:
    store = filled(tmp_path, chain[:2])
    store.append(chain[2], commit_proof=b"three")
    # A block refused (it does not extend the head) stores neither itself nor its proof
    with pytest.raises(InvalidBlock):
        store.append(chain[4], commit_proof=b"five")
    store.append(chain[3], verify=False)
    store.put_commit_proofs([(3, b"other")])  # a height keeps its first proof
    store.close()
    with BlockStore(tmp_path, GENESIS, verify_from_mark=True) as again:
        assert again.height == 4
        assert again.commit_proofs(0, 10) == [(3, b"three")]


def test_commit_proofs_are_kept_by_height_durably(tmp_path: Path, chain: list[Block]) -> None:
    store = filled(tmp_path, chain)
    store.put_commit_proofs([(2, b"two"), (5, b"five")])
    store.put_commit_proofs([(5, b"other"), (6, b"six")])  # a height keeps its first proof
    with pytest.raises(InvalidBlock, match="not stored"):
        store.put_commit_proofs([(7, b"seven")])
    with pytest.raises(InvalidBlock, match="not stored"):
        store.put_commit_proofs([(0, b"genesis")])
    store.close()
    with BlockStore(tmp_path, GENESIS, verify_from_mark=True) as again:
        assert again.commit_proofs(0, 10) == [(2, b"two"), (5, b"five"), (6, b"six")]
        assert again.commit_proofs(3, 5) == [(5, b"five")]
        assert again.commit_proofs(7, 9) == []


# ---- an index or a frame that is well formed but wrong ---------------------------------------


def _index(path: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(path / "index.sqlite") as db:
        db.execute(sql, args)


def test_index_pointing_at_another_heights_frame_is_detected(
    tmp_path: Path, chain: list[Block]
) -> None:
    filled(tmp_path, chain[:3]).close()
    (start, length) = _frame_spans(chain)[2]
    _index(tmp_path, "UPDATE blocks SET offset = ?, length = ? WHERE height = 2", start, length)
    with pytest.raises(StoreCorruption, match="frame holds height 3, expected 2") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 2


def test_index_naming_another_hash_is_detected(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain[:3]).close()
    _index(tmp_path, "UPDATE blocks SET hash = ? WHERE height = 2", bytes(32))
    with pytest.raises(StoreCorruption, match="block hash differs from the index") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 2


def test_index_length_shorter_than_any_frame_is_detected(
    tmp_path: Path, chain: list[Block]
) -> None:
    filled(tmp_path, chain[:3]).close()
    _index(tmp_path, "UPDATE blocks SET length = 10 WHERE height = 2")
    with pytest.raises(StoreCorruption, match="checksum") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 2


def test_rows_of_another_schema_under_a_good_checksum_are_detected(
    tmp_path: Path, chain: list[Block]
) -> None:
    """A frame whose checksum holds (rewritten with it) but whose rows are not block rows."""
    filled(tmp_path, chain[:1]).close()
    block = chain[0]
    sink = pa.BufferOutputStream()
    other = pa.record_batch({"x": [1, 2]})
    with pa.ipc.new_stream(sink, other.schema) as writer:
        writer.write_batch(other)
    header, qc = block.header.encode(), block.parent_qc.encode()
    body = b"".join(
        [
            struct.pack(">QI", 1, len(header)),
            header,
            struct.pack(">I", len(qc)),
            qc,
            sink.getvalue().to_pybytes(),
        ]
    )
    frame = _PREFIX.pack(MAGIC, len(body)) + body + hashlib.sha256(body).digest()
    (tmp_path / "segments" / "00000000.seg").write_bytes(frame)
    _index(tmp_path, "UPDATE blocks SET length = ? WHERE height = 1", len(frame))
    with pytest.raises(StoreCorruption, match="block row schema") as err:
        BlockStore(tmp_path, GENESIS)
    assert err.value.height == 1
    # Unverified, the open still reads its head's frame
    with pytest.raises(StoreCorruption, match="block row schema") as err:
        BlockStore(tmp_path, GENESIS, verify_on_open=False)
    assert err.value.height == 1
