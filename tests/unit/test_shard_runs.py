"""Sorted runs (``actors/storage/runs.py``): whatever the writes, block sizes and merges, every
key reads as its rule says (state: the newest entry; the transaction index: the newest that is
not a replayed copy, else the oldest), before and after reopening; damaged bytes read as
``StoreCorruption``, never as other entries."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.actors.storage import ShardStore, buffer, runs
from rayledger.actors.storage.runs import (
    BAD_NONCE,
    KEY,
    STATE,
    TXS,
    RunSet,
    key_array,
    state_entries,
    state_hashes,
    tx_entries,
)
from rayledger.errors import StoreCorruption
from tests.unit.test_shard_buffer import BLOCKS, GENESIS, IDS, SEED, reference, view

POOL = [bytes([i]) * 31 + bytes([j]) for i in (0, 7, 255) for j in range(4)]  # 12 ids
STATE_KEYS = [b"", b"a", b"acct/" + b"\x00" * 32, b"anchor/x" * 9]
TxRow = tuple[bytes, int, int, int, int]


def open_set(db: sqlite3.Connection) -> RunSet:
    s = RunSet()
    s.load(db)
    return s


def write(
    db: sqlite3.Connection, s: RunSet, kind: int, rows: list, top: int, budget: int | None = None
) -> None:
    """One transaction: ``rows`` as a run, then about ``budget`` entries merged."""
    cur = db.cursor()
    cur.execute("BEGIN")
    s.begin()
    if not rows:
        entries = state_entries([])
    elif kind == TXS:
        ids, *columns = zip(*rows, strict=True)
        raw = np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32)
        entries = tx_entries(raw, *(np.array(c) for c in columns))
    else:
        entries = state_entries(rows)
    s.write(cur, kind, entries, top)
    s.merge_step(cur, budget)
    cur.execute("COMMIT")
    s.adopt()


def tx_model(versions: list[TxRow]) -> dict[bytes, tuple[int, int, int, int]]:
    """The rule, oldest version first."""
    out: dict[bytes, TxRow] = {}
    for v in versions:
        if v[0] not in out or v[4] != BAD_NONCE:
            out[v[0]] = v
    return {k: v[1:] for k, v in out.items()}


def read_txs(db: sqlite3.Connection, s: RunSet) -> dict[bytes, tuple]:
    """Every id of POOL as the buffer reads runs: newest first, the first entry that is not a
    replayed copy, else the last copy seen."""
    found: dict[bytes, tuple] = {}
    copies: dict[bytes, tuple] = {}
    for run in reversed(s.runs[TXS]):
        for k, e in zip(POOL, s.find_txs(db, run, key_array(POOL)), strict=True):
            if e is not None and k not in found:
                (copies if e[3] == BAD_NONCE else found)[k] = e
    return {**copies, **found}


def assert_tiers(s: RunSet) -> None:
    levels = [r.level for r in s.runs[TXS]]
    assert levels == sorted(levels, reverse=True)  # older runs are never lower


generation = st.dictionaries(
    st.sampled_from(POOL),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 3])),
    min_size=1,
)


@settings(max_examples=80, deadline=None)
@given(
    gens=st.lists(generation, min_size=1, max_size=14),
    block_rows=st.sampled_from([1, 2, 5, 512]),
    fanout=st.sampled_from([2, 3, 4]),
    slice_blocks=st.sampled_from([1, 2, 64]),
    budget=st.sampled_from([None, 1, 40]),
    reopen=st.integers(0, 14),
)
def test_transaction_runs_keep_the_replay_rule_through_merges(
    gens: list[dict],
    block_rows: int,
    fanout: int,
    slice_blocks: int,
    budget: int | None,
    reopen: int,
) -> None:
    """Merges to the end in each transaction (``budget`` None), or a slice or a few at a
    time, across transactions and a reopening that cuts one short."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    versions: list[TxRow] = []
    with (
        mock.patch.object(runs, "BLOCK_ROWS", block_rows),
        mock.patch.object(runs, "FANOUT", fanout),
        mock.patch.object(runs, "MERGE_SLICE_BLOCKS", slice_blocks),
    ):
        s = open_set(db)
        for h, gen in enumerate(gens, start=1):
            rows = [(k, h, idx, pos, status) for k, (idx, pos, status) in gen.items()]
            versions += rows
            write(db, s, TXS, rows, h, budget)
            if h == reopen:
                s = open_set(db)
            assert read_txs(db, s) == tx_model(versions)
            assert_tiers(s)
            levels = [r.level for r in s.runs[TXS]]
            if budget is None:
                assert all(levels.count(v) < fanout for v in levels)
        before = len(s.runs[TXS])
        write(db, s, TXS, [], len(gens), None)  # the merges still due, to the end
        assert not s.merging
        assert len(s.runs[TXS]) <= before
        assert all([r.level for r in s.runs[TXS]].count(v) < fanout for v in range(9))
        assert db.execute(
            "SELECT count(*) FROM run_blocks WHERE run NOT IN (SELECT id FROM runs)"
        ).fetchone() == (0,)


def test_a_merge_spread_over_transactions_and_cut_short_by_a_restart(tmp_path: Path) -> None:
    """One slice a transaction: runs pile up while a merge goes on, the oldest of a level are
    merged first, and a restart mid-merge drops its blocks and starts it again."""
    orphans = "SELECT count(*) FROM run_blocks WHERE run NOT IN (SELECT id FROM runs)"
    db = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None)
    versions: list[TxRow] = []
    with (
        mock.patch.object(runs, "BLOCK_ROWS", 1),
        mock.patch.object(runs, "FANOUT", 2),
        mock.patch.object(runs, "MERGE_SLICE_BLOCKS", 1),
    ):
        s, reopened = open_set(db), False
        for h in range(1, 25):
            rows = [
                (POOL[(5 * h + i) % 12], h, i, i, BAD_NONCE if i == h % 3 else 0) for i in range(3)
            ]
            versions += rows
            write(db, s, TXS, rows, h, budget=1)
            if not reopened and h >= 5 and s.merging:
                reopened = True
                assert db.execute(orphans).fetchone()[0] > 0
                s = open_set(db)
                assert s.merging  # due again: its tier is still full
                assert db.execute(orphans).fetchone() == (0,)
            assert read_txs(db, s) == tx_model(versions)
            assert_tiers(s)
        assert reopened
        assert max(Counter(r.level for r in s.runs[TXS]).values()) > 2  # they did pile up
        write(db, s, TXS, [], 24, None)
        assert not s.merging
        assert max(Counter(r.level for r in s.runs[TXS]).values()) == 1
        assert read_txs(db, s) == tx_model(versions)
        assert db.execute(orphans).fetchone() == (0,)


def test_flush_finishes_every_merge_due_even_after_a_restart(tmp_path: Path) -> None:
    with (
        mock.patch.object(runs, "BLOCK_ROWS", 1),
        mock.patch.object(runs, "FANOUT", 2),
        mock.patch.object(runs, "MERGE_SLICE_BLOCKS", 1),
        mock.patch.object(buffer, "MERGE_MIN_ENTRIES", 1),
        mock.patch.object(buffer, "MERGE_PACE", 0),  # one slice an apply
    ):
        shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED, index_batch_rows=0)
        for block in BLOCKS:
            shard.apply([block])
        assert shard._buffer.runs.merging
        shard.close()
        shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED, index_batch_rows=0)
        assert shard._buffer.runs.merging
        shard.flush()
        assert not shard._buffer.runs.merging
        assert all(len(levels) == len(set(levels)) for levels in shard.index_runs.values())
        assert view(shard) == reference(0, 1, len(BLOCKS))
        shard.close()


@settings(max_examples=60, deadline=None)
@given(
    gens=st.lists(
        st.dictionaries(st.sampled_from(STATE_KEYS), st.binary(max_size=40), min_size=1),
        min_size=1,
        max_size=10,
    ),
    block_rows=st.sampled_from([1, 3, 512]),
    slice_blocks=st.sampled_from([1, 64]),
)
def test_state_runs_answer_the_newest_value(
    gens: list[dict], block_rows: int, slice_blocks: int
) -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    want: dict[bytes, tuple[bytes, bytes, int]] = {}
    with (
        mock.patch.object(runs, "BLOCK_ROWS", block_rows),
        mock.patch.object(runs, "FANOUT", 2),
        mock.patch.object(runs, "MERGE_SLICE_BLOCKS", slice_blocks),
    ):
        s = open_set(db)
        for h, gen in enumerate(gens, start=1):
            write(db, s, STATE, [(k, v, h) for k, v in gen.items()], h)
            want.update({k: (k, v, h) for k, v in gen.items()})
            hashes = state_hashes(STATE_KEYS)
            newest = dict.fromkeys(STATE_KEYS)
            for run in s.runs[STATE]:  # oldest first: later runs overwrite
                for k, e in zip(STATE_KEYS, s.find_states(db, run, hashes), strict=True):
                    if e is not None:
                        newest[k] = e
            assert newest == {k: want.get(k) for k in STATE_KEYS}
        assert s.top == len(gens)


def _entry_bytes(e: runs.Entries) -> list[bytes]:
    assert e.offsets is not None and e.offsets[0] == 0 and e.offsets[-1] == len(e.data)
    return [e.data[a:b].tobytes() for a, b in zip(e.offsets[:-1], e.offsets[1:], strict=True)]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.dictionaries(
        st.binary(max_size=70), st.tuples(st.binary(max_size=300), st.integers(0, 2**64 - 1))
    ),
    data=st.data(),
)
def test_state_entries_take_and_slice_move_whole_entries(rows: dict, data: st.DataObject) -> None:
    """An entry is its head (height, key length), key and value, in run-key order; ``take``
    and ``slice`` give exactly the entries asked for, each whole, offsets from 0."""
    entries = state_entries([(k, v, h) for k, (v, h) in rows.items()])
    by_hash = {bytes(state_hashes([k])[0]): k for k in rows}
    assert list(entries.keys.tolist()) == sorted(by_hash)
    want = []
    for h in entries.keys.tolist():
        k = by_hash[h]
        v, height = rows[k]
        want.append(runs.STATE_HEAD.pack(height, len(k)) + k + v)
    assert _entry_bytes(entries) == want
    n = len(want)
    sel = data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n)) if n else []
    taken = entries.take(np.array(sel, np.int64))
    assert _entry_bytes(taken) == [want[i] for i in sel]
    assert taken.keys.tolist() == [entries.keys[i] for i in sel]
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    part = entries.slice(lo, hi)
    assert _entry_bytes(part) == want[lo:hi] and part.keys.tolist() == entries.keys[lo:hi].tolist()
    # A slice of a slice, and a take from it, still read from the right bytes
    if hi > lo:
        assert _entry_bytes(part.take(np.array([hi - lo - 1, 0]))) == [want[hi - 1], want[lo]]
        assert _entry_bytes(part.slice(1, hi - lo)) == want[lo + 1 : hi]


def test_keys_sort_and_compare_as_bytes() -> None:
    raw = [b"\x00" * 32, b"\x00" * 31 + b"\x01", b"a" + b"\x00" * 31, b"a\x01" + b"\x00" * 30]
    raw += [bytes(np.random.default_rng(1).integers(0, 256, 32, np.uint8)) for _ in range(50)]
    keys = key_array(raw)
    assert keys.dtype == KEY
    assert np.sort(keys).tobytes() == b"".join(sorted(raw))
    with pytest.raises(ValueError, match="32 bytes"):
        key_array([b"short"])


# ---- damage ---------------------------------------------------------------------------------


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A shard whose index and state are all in runs of several blocks."""
    with mock.patch.object(runs, "BLOCK_ROWS", 2):
        shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED, index_batch_rows=0)
        shard.apply(BLOCKS)
        shard.flush()
        assert shard.buffered_rows == 0
        shard.close()
    return tmp_path / "s"


def tamper(folder: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(folder / "shard.sqlite")
    with db:
        assert db.execute(sql, args).rowcount >= 1
    db.close()


def first_block(folder: Path) -> tuple[int, int]:
    db = sqlite3.connect(folder / "shard.sqlite")
    row = db.execute(
        "SELECT run, block FROM run_blocks JOIN runs ON run = id WHERE kind = 0 ORDER BY run, block"
    ).fetchone()
    db.close()
    return row


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "UPDATE run_blocks SET data = zeroblob(length(data)) WHERE run = ? AND block = ?",
            "checksum",
        ),
        ("DELETE FROM run_blocks WHERE run = ? AND block = ?", "missing"),
        # A whole block moved: its own checksum holds, its place does not
        ("UPDATE run_blocks SET block = block + 1000 WHERE run = ? AND block = ?", "missing"),
    ],
)
def test_a_damaged_block_reads_as_corruption(written: Path, sql: str, reason: str) -> None:
    run, block = first_block(written)
    tamper(written, sql, run, block)
    shard = ShardStore(written, 0, 1, GENESIS, SEED)
    with pytest.raises(StoreCorruption, match=f"index run is damaged.*{reason}"):
        shard.locate(IDS)
    shard.close()


def test_a_block_swapped_with_another_reads_as_corruption(written: Path) -> None:
    db = sqlite3.connect(written / "shard.sqlite")
    run = db.execute("SELECT id FROM runs WHERE kind = 0 AND length(fences) >= 64").fetchone()[0]
    with db:  # blocks 0 and 1 exchange places, each with its own (valid) checksum
        db.execute("UPDATE run_blocks SET block = -1 WHERE run = ? AND block = 0", (run,))
        db.execute("UPDATE run_blocks SET block = 0 WHERE run = ? AND block = 1", (run,))
        db.execute("UPDATE run_blocks SET block = 1 WHERE run = ? AND block = -1", (run,))
    db.close()
    shard = ShardStore(written, 0, 1, GENESIS, SEED)
    with pytest.raises(StoreCorruption, match="not the block its run's fences name"):
        shard.locate(IDS)
    shard.close()


def test_damaged_fences_refuse_to_open(written: Path) -> None:
    tamper(written, "UPDATE runs SET fences = x'0102' WHERE kind = 1")
    with pytest.raises(StoreCorruption, match="run .* is damaged"):
        ShardStore(written, 0, 1, GENESIS, SEED)


def test_a_merge_over_a_damaged_block_changes_nothing(tmp_path: Path) -> None:
    with mock.patch.object(runs, "BLOCK_ROWS", 2), mock.patch.object(runs, "FANOUT", 2):
        shard = ShardStore(tmp_path / "s", 0, 1, GENESIS, SEED, index_batch_rows=0)
        shard.apply(BLOCKS[:2])
        shard.apply(BLOCKS[2:3])  # blocks 1-2: one run of each kind
        run, block = first_block(tmp_path / "s")
        tamper(
            tmp_path / "s",
            "UPDATE run_blocks SET crc = crc + 1 WHERE run = ? AND block = ?",
            run,
            block,
        )
        before = shard.index_runs, shard.height
        with pytest.raises(StoreCorruption, match="checksum"):
            shard.apply(BLOCKS[3:4])  # block 3's run would be merged with the damaged one
        assert (shard.index_runs, shard.height) == before
        shard.close()


@pytest.mark.parametrize("kind", ["binary", "large_binary"])
def test_binary_columns_read_from_a_slice(kind: str) -> None:
    arr = pa.array([b"ab", b"c", b"def", b""], getattr(pa, kind)()).slice(1, 2)
    offsets, data = runs._binary(arr)
    assert offsets.tolist() == [0, 1, 4] and data.tobytes() == b"cdef"
