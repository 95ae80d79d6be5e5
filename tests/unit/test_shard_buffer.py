"""The storage shard's index buffer and sorted runs (``actors/storage/buffer.py``, ``runs.py``):
whatever the generation size and the merges, restarts and failed transactions in between, a
shard reads exactly as one whose index and state went straight to SQLite; the replay rule of the
transaction index holds across generations and merges."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayledger.actors.storage import CommittedBlock, ShardStore, partition, runs, writes_batch
from rayledger.actors.storage.buffer import BAD_NONCE, BlockPart, IndexBuffer
from rayledger.block import QuorumCert, genesis_header
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.errors import NotFound, StoreCorruption
from rayledger.execution import Status, genesis_state
from rayledger.tx import TxKind, make_batch, tx_ids_of
from tests.unit.test_shard import ACCOUNTS, CHAIN, SHARDS, VS, A, all_ids, build_chain, qc_for

GENESIS, BLOCKS, BUILDER = build_chain()
SEED = genesis_state(ACCOUNTS)[0].writes
KEYS = sorted(set(SEED) | {k for b in BLOCKS for k in b.writes.column("key").to_pylist()})
IDS = all_ids(BLOCKS)


def view(shard: ShardStore) -> tuple[list, list, list]:
    """Everything a reader can ask a shard about its transactions and state."""
    mine_ids = [t for t in IDS if shard.owns_tx(t)]
    mine_keys = [k for k in KEYS if shard.owns_key(k)]
    txs = []
    for t in mine_ids:
        try:
            row = shard.get_tx(t)
            txs.append((row["height"], row["index"], row["status"], row["tx_id"]))
        except NotFound:
            txs.append(None)
    return (
        txs + [shard.locate(mine_ids)],
        [shard.get_state(k) for k in mine_keys],
        shard.get_states(mine_keys),
    )


_REFERENCE: dict[tuple[int, int, int], tuple[list, list, list]] = {}


def reference(shard: int, shards: int, height: int) -> tuple[list, list, list]:
    """What a shard applied to ``height`` must answer, worked out from the blocks themselves:
    a transaction's entry is its newest that is not a replayed copy, else its oldest; a state
    key's value is the last written (the genesis state at height 0)."""
    key = (shard, shards, height)
    if key not in _REFERENCE:
        entries: dict[bytes, tuple[int, int, int, bytes]] = {}
        state = {k: (v, 0) for k, v in SEED.items()}
        for block in BLOCKS[:height]:
            h = block.header.height
            rows = block.rows.select(["tx_id", "status"]).to_pylist()
            for i, row in enumerate(rows):
                held = entries.get(row["tx_id"])
                if held is None or row["status"] != BAD_NONCE:
                    entries[row["tx_id"]] = (h, i, row["status"], row["tx_id"])
            for k, v in zip(*block.writes.to_pydict().values(), strict=True):
                state[k] = (v, h)
        owner = ShardStore.__new__(ShardStore)
        owner.shard, owner.shards = shard, shards
        mine_ids = [t for t in IDS if owner.owns_tx(t)]
        mine_keys = [k for k in KEYS if owner.owns_key(k)]
        txs: list = [entries.get(t) for t in mine_ids]
        _REFERENCE[key] = (
            [*txs, [None if e is None else e[0] for e in txs]],
            [state.get(k) for k in mine_keys],
            [None if k not in state else state[k][0] for k in mine_keys],
        )
    return _REFERENCE[key]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    placement=st.sampled_from([(0, 1), (0, SHARDS), (1, SHARDS), (2, SHARDS)]),
    batch_rows=st.sampled_from([0, 1, 7, 30, 1_000]),
    block_rows=st.sampled_from([1, 2, 3, 512]),
    fanout=st.sampled_from([2, 3, 4]),
    cuts=st.sets(st.integers(1, len(BLOCKS) - 1)),
    reopen=st.lists(st.booleans(), min_size=len(BLOCKS), max_size=len(BLOCKS)),
)
def test_any_schedule_of_runs_reads_like_a_shard_written_straight_to_sqlite(
    placement: tuple[int, int],
    batch_rows: int,
    block_rows: int,
    fanout: int,
    cuts: set[int],
    reopen: list[bool],
) -> None:
    k, shards = placement
    bounds = [0, *sorted(cuts), len(BLOCKS)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(runs, "BLOCK_ROWS", block_rows),
        mock.patch.object(runs, "FANOUT", fanout),
        mock.patch.object(runs, "MERGE_SLICE_BLOCKS", 1),
    ):

        def open_shard() -> ShardStore:
            return ShardStore(Path(tmp), k, shards, GENESIS, SEED, index_batch_rows=batch_rows)

        shard = open_shard()
        for n, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            assert shard.apply(BLOCKS[lo:hi]) == hi
            assert view(shard) == reference(k, shards, hi)
            if reopen[n]:  # a restart: what is in no run yet is replayed from ``pending``
                shard.close()
                shard = open_shard()
                assert shard.height == hi
                assert view(shard) == reference(k, shards, hi)
        shard.flush()
        assert shard._db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0
        assert view(shard) == reference(k, shards, len(BLOCKS))
        shard.close()


def test_a_failed_transaction_keeps_neither_its_blocks_nor_its_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_3, at_end = reference(0, 1, 3), reference(0, 1, len(BLOCKS))  # before the patch
    monkeypatch.setattr(runs, "FANOUT", 2)
    shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED, index_batch_rows=1)
    shard.apply(BLOCKS[:2])
    shard.apply(BLOCKS[2:3])  # blocks 1-2 become runs
    assert shard.index_runs == {"txs": [0], "state": [0]}
    assert view(shard) == at_3
    before = shard.index_runs, shard._seg_end
    tables = [
        shard._db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()  # noqa: S608
        for t in ("pending", "runs", "run_blocks")
    ]
    real = IndexBuffer.write_step

    def failing(self: IndexBuffer, cur: sqlite3.Cursor, **kw: bool) -> None:
        real(self, cur, **kw)  # writes block 3's run and merges it with the first
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(IndexBuffer, "write_step", failing)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        shard.apply(BLOCKS[3:])
    assert shard.height == 3
    assert (shard.index_runs, shard._seg_end) == before
    assert [
        shard._db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()  # noqa: S608
        for t in ("pending", "runs", "run_blocks")
    ] == tables
    with pytest.raises(sqlite3.OperationalError):
        shard.flush()
    assert view(shard) == at_3
    monkeypatch.setattr(IndexBuffer, "write_step", real)
    assert shard.apply(BLOCKS) == len(BLOCKS)
    assert view(shard) == at_end
    assert shard.index_runs == {"txs": [1], "state": [1]}  # the merge was done again, once
    shard.flush()
    assert view(shard) == at_end
    shard.close()
    reopened = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED)
    assert view(reopened) == at_end
    reopened.close()


def test_memory_and_runs_stay_bounded_as_blocks_come(tmp_path: Path) -> None:
    """The buffer holds at most ``batch_rows`` and one apply's rows; the runs stay few (at most
    FANOUT - 1 a level, levels growing with the log of the entries) whatever the count."""
    base, root = genesis_state(ACCOUNTS)
    genesis = genesis_header(CHAIN, 1, root)
    batches = [
        make_batch(
            A, TxKind.ANCHOR, range(8 * i, 8 * i + 8), [bytes([i, j]) * 16 for j in range(8)], CHAIN
        )
        for i in range(60)
    ]
    builder = LedgerBuilder({batch_digest(b): b for b in batches}, genesis, base)
    shard = ShardStore(tmp_path / "s", 0, 1, genesis, index_batch_rows=10)
    parent, largest = genesis, 0
    for r, batch in enumerate(batches, start=1):
        h = builder.build(parent, r, VS.validators[0].public_key, r, (batch_digest(batch),))
        writes = writes_batch(builder.writes_of(h.hash))
        rows = builder.commit(h.hash, QuorumCert.genesis(genesis.hash)).rows()
        shard.apply([CommittedBlock(h, qc_for(h), rows, writes)])
        largest = max(largest, rows.num_rows + writes.num_rows)
        assert shard._buffer.rows < 10 + largest
        for levels in shard.index_runs.values():
            assert levels == sorted(levels, reverse=True)  # older runs are never lower
            assert all(levels.count(v) < runs.FANOUT for v in set(levels))
        parent = h
    # 60 blocks of 16 rows, a run every block: 60 runs of each kind were written, 3 levels
    assert max(shard.index_runs["txs"]) == 2
    tx_ids = [bytes(t) for b in batches for t in tx_ids_of(b)]
    assert shard.locate(tx_ids) == [1 + i // 8 for i in range(len(tx_ids))]
    shard.close()


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("txs", b"\x00" * 36, "36 bytes"),  # not a whole number of entries
        ("writes", b"not an arrow stream", "pending"),
    ],
)
def test_damaged_pending_rows_refuse_to_open(
    tmp_path: Path, column: str, value: bytes, reason: str
) -> None:
    shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED)
    shard.apply(BLOCKS)
    shard.close()
    db = sqlite3.connect(tmp_path / "s" / "shard.sqlite")
    with db:
        db.execute(f"UPDATE pending SET {column} = ? WHERE height = 2", (value,))  # noqa: S608
    db.close()
    with pytest.raises(StoreCorruption, match=reason):
        ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED)


def test_the_buffer_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError, match="-1 rows"):
        IndexBuffer(-1)


# ---- the replay rule across generations, against SQLite's own upsert -----------------------

ID = bytes(range(32))
OK, BAD, FAILED = int(Status.OK), BAD_NONCE, int(Status.INSUFFICIENT_FUNDS)


def part(height: int, status: int) -> BlockPart:
    writes = pa.RecordBatch.from_arrays(
        [pa.array([b"k"], pa.binary()), pa.array([b"v%d" % height], pa.binary())],
        schema=partition.WRITES_SCHEMA,
    )
    ids = np.frombuffer(ID, np.uint8).reshape(1, 32)
    return BlockPart(height, ids, np.array([height % 3]), np.array([status]), writes)


# SQLite's upsert as the reference of the rule (what shards before runs wrote to their B-tree)
TX_UPSERT = (
    "INSERT INTO txs (tx_id, height, idx, pos, status) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (tx_id) DO UPDATE SET height = excluded.height, idx = excluded.idx, "
    f"pos = excluded.pos, status = excluded.status WHERE excluded.status != {BAD_NONCE}"
)


@pytest.mark.parametrize(
    "statuses",
    [
        [OK, BAD, BAD],
        [BAD, BAD, OK, BAD],  # a replay before the row that consumes the nonce
        [BAD, OK, BAD, OK, BAD],
        [FAILED, BAD, OK],
        [BAD, BAD, BAD],
    ],
)
@pytest.mark.parametrize(("batch_rows", "fanout"), [(0, 2), (0, 4), (2, 2), (3, 3), (100, 4)])
@pytest.mark.parametrize("legacy", [None, OK, BAD])  # an entry in the B-tree of an older shard
def test_replays_resolve_as_sqlites_upsert_would(
    statuses: list[int],
    batch_rows: int,
    fanout: int,
    legacy: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs, "FANOUT", fanout)
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(partition._SCHEMA_SQL)
    straight = sqlite3.connect(":memory:", isolation_level=None)
    straight.executescript(partition._SCHEMA_SQL)
    if legacy is not None:
        for conn in (db, straight):
            conn.execute(TX_UPSERT, (ID, 0, 7, 7, legacy))
    buf = IndexBuffer(batch_rows)
    buf.load(db)

    def fetch(ask: list[bytes]) -> dict:
        rows = db.execute("SELECT tx_id, height, idx, pos, status FROM txs").fetchall()
        return {bytes(r[0]): tuple(r[1:]) for r in rows if bytes(r[0]) in ask}

    def states(ask: list[bytes]) -> dict:
        rows = db.execute("SELECT key, value, height FROM state").fetchall()
        return {bytes(r[0]): (bytes(r[1]), r[2]) for r in rows if bytes(r[0]) in ask}

    for h, status in enumerate(statuses, start=1):
        cur = db.cursor()
        cur.execute("BEGIN")
        buf.begin()
        buf.stage(cur, part(h, status))
        buf.write_step(cur)
        cur.execute("COMMIT")
        buf.committed()
        straight.execute(TX_UPSERT, (ID, h, h % 3, 0, status))
        want = straight.execute("SELECT height, idx, pos, status FROM txs").fetchone()
        assert buf.find_txs([ID], fetch) == [tuple(want)]
        assert buf.find_states([b"k", b"other"], states) == [(b"v%d" % h, h), None]


@pytest.mark.parametrize(
    ("statuses", "answer"),
    [([BAD, OK, BAD], 1), ([BAD, BAD], 0), ([OK, FAILED], 1), ([FAILED, BAD, OK, BAD], 2)],
)
def test_copies_of_one_id_within_a_block_resolve_by_the_rule(
    statuses: list[int], answer: int
) -> None:
    """Rows of one block in row order: the last that is not a replayed copy, else the first."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(partition._SCHEMA_SQL)
    buf = IndexBuffer(100)
    buf.load(db)
    n = len(statuses)
    ids = np.tile(np.frombuffer(ID, np.uint8), (n, 1))
    writes = partition.writes_batch({})
    buf.begin()
    buf.stage(db.cursor(), BlockPart(4, ids, np.arange(10, 10 + n), np.array(statuses), writes))
    buf.committed()
    want = (4, 10 + answer, answer, statuses[answer])
    assert buf.find_txs([ID], lambda ask: {}) == [want]
    cur = db.cursor()
    buf.begin()
    buf.write_step(cur, everything=True)  # the same answer from the run written
    buf.committed()
    assert buf.rows == 0
    assert buf.find_txs([ID], lambda ask: {}) == [want]
