"""A storage shard's index buffer: the transaction index and state entries of recent blocks,
held in memory and written as sorted runs (``runs.py``) many blocks at a time.

Each block's part of the index goes to a ``pending`` table (one row per block, keyed by height:
an append, a few pages) and into the *active* generation here. When the generation holds
``batch_rows`` rows it is written as one run of each kind, in the same SQLite transaction as
that apply's blocks, which also deletes its heights from ``pending``. A crash anywhere leaves
every unwritten row in ``pending``, and opening replays it, so the buffer is never the only copy
of anything.

Reads look in the active generation, then the runs, newest first, then the B-trees (``txs`` and
``state``: the genesis state, and what shards written before runs existed hold). The
transaction index keeps one rule everywhere: a later row of the same id replaces an earlier one
unless its status is ``BAD_NONCE`` (a replayed copy never displaces the row that consumed the
nonce).
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rayledger.actors.storage.runs import (
    BAD_NONCE,
    KEY,
    STATE,
    TX_ENTRY,
    TXS,
    Entries,
    RunSet,
    concat_entries,
    key_array,
    resolve,
    state_entries,
    state_hashes,
    tx_entries,
    tx_entry,
)
from rayledger.tx import batch_from_ipc, batch_to_ipc

# Rows (index entries and state writes) the active generation gathers before it is written;
# entries merged for each row applied, and at least in any transaction (a merge of any size
# is spread over many applies, and finishes while blocks come empty)
INDEX_BATCH_ROWS = 50_000
MERGE_PACE = 8
MERGE_MIN_ENTRIES = 8_192

PENDING_SQL = """
CREATE TABLE IF NOT EXISTS pending (
    height INTEGER PRIMARY KEY,
    txs    BLOB NOT NULL,
    writes BLOB NOT NULL
);
"""

# (height, idx, pos, status) of a transaction; (value, height) of a state key
TxEntry = tuple[int, int, int, int]
StateEntry = tuple[bytes, int]
# A state write as held here: (key, *StateEntry)
StateRow = tuple[bytes, bytes, int]
_ENTRY = 32 + 4 + 1  # tx id, index in the block (u32 BE), status (u8); pos is the row's order


@dataclass
class BlockPart:
    """The index entries and state writes one block brings to a shard (its own rows only)."""

    height: int
    ids: np.ndarray  # (n, 32) uint8, in the shard's row order (pos = 0..n-1)
    idx: np.ndarray  # (n,) index of each row in the block
    status: np.ndarray  # (n,)
    writes: pa.RecordBatch  # (key, value), the keys this shard owns

    @property
    def rows(self) -> int:
        return len(self.ids) + self.writes.num_rows

    def encode(self) -> tuple[bytes, bytes]:
        n = len(self.ids)
        packed = np.empty((n, _ENTRY), np.uint8)
        packed[:, :32] = self.ids.reshape(n, 32)
        packed[:, 32:36] = np.asarray(self.idx, ">u4").view(np.uint8).reshape(n, 4)
        packed[:, 36] = np.asarray(self.status, np.uint8)
        return packed.tobytes(), batch_to_ipc(self.writes)

    @classmethod
    def decode(cls, height: int, txs: bytes, writes: bytes) -> BlockPart:
        """``ValueError`` or ``DecodeError`` for bytes ``encode`` did not write."""
        if len(txs) % _ENTRY:
            raise ValueError(f"pending index entries of block {height} are {len(txs)} bytes")
        packed = np.frombuffer(txs, np.uint8).reshape(-1, _ENTRY)
        return cls(
            height,
            packed[:, :32],
            np.ascontiguousarray(packed[:, 32:36]).view(">u4").ravel().astype(np.int64),
            packed[:, 36].astype(np.int64),
            batch_from_ipc(writes),
        )


@dataclass
class Generation:
    """The blocks merged since the last runs were written: their index entries as the blocks'
    own arrays (in age order; sorted, with the rule applied, only when read or written), and
    their state writes by key."""

    parts: list[BlockPart] = field(default_factory=list)
    state: dict[bytes, StateRow] = field(default_factory=dict)
    top: int = 0  # the highest height merged in
    tx_rows: int = 0
    # The entries of ``parts[:_sorted_parts]``, one per id in key order (``txs``)
    _sorted: Entries = field(
        default_factory=lambda: Entries(np.empty(0, KEY), np.empty(0, TX_ENTRY))
    )
    _sorted_parts: int = 0

    @property
    def rows(self) -> int:
        return self.tx_rows + len(self.state)

    def merge(self, part: BlockPart) -> None:
        h = part.height
        if len(part.ids):
            self.parts.append(part)
            self.tx_rows += len(part.ids)
        if part.writes.num_rows:
            wkeys = part.writes.column(0).to_pylist()
            values = part.writes.column(1).to_pylist()
            triples = zip(wkeys, values, itertools.repeat(h), strict=False)
            self.state.update(zip(wkeys, triples, strict=False))
        self.top = max(self.top, h)

    def txs(self) -> Entries:
        """One index entry per id, in key order: of an id's rows (blocks in height order, a
        block's in row order), the newest that is not a replayed copy, else the oldest. The
        blocks merged since the last call are sorted and merged into the last answer (the
        rule holds for any adjacent range of rows), so a reader after every block costs
        about one pass over the generation, not a sort of it."""
        new = self.parts[self._sorted_parts :]
        if new:
            sizes = [len(p.ids) for p in new]
            fresh = tx_entries(
                np.concatenate([p.ids.reshape(-1, 32) for p in new]),
                np.repeat([p.height for p in new], sizes),
                np.concatenate([p.idx for p in new]),
                np.concatenate([np.arange(n) for n in sizes]),
                np.concatenate([p.status for p in new]),
            )
            if len(self._sorted):
                fresh = resolve(TXS, concat_entries(TXS, [self._sorted, fresh]))
            self._sorted, self._sorted_parts = fresh, len(self.parts)
        return self._sorted


class IndexBuffer:
    """See the module's docstring. Single-threaded, like the shard that owns it. A shard's
    transaction starts with ``begin`` and, once it commits, ends with ``committed``: only then
    are the staged blocks merged and the written runs adopted (a transaction rolled back leaves
    both as they were; the next ``begin`` forgets what it staged)."""

    def __init__(self, batch_rows: int = INDEX_BATCH_ROWS) -> None:
        if batch_rows < 0:
            raise ValueError(f"index buffer of {batch_rows} rows")
        self.batch_rows = batch_rows
        self.active = Generation()
        self.runs = RunSet()
        self._staged: list[BlockPart] = []
        self._written = False
        self._db: sqlite3.Connection | None = None

    def load(self, db: sqlite3.Connection) -> None:
        """Read the runs, and replay the ``pending`` table (after a restart): every block not
        yet written to a run. ``ValueError`` (or ``DecodeError``) if either is damaged."""
        self._db = db
        db.executescript(PENDING_SQL)
        self.runs.load(db)
        for height, txs, writes in db.execute(
            "SELECT height, txs, writes FROM pending ORDER BY height"
        ):
            self.active.merge(BlockPart.decode(int(height), bytes(txs), bytes(writes)))

    @property
    def rows(self) -> int:
        """Rows held here, not yet in a run."""
        return self.active.rows

    # ---- writing, inside the shard's transaction ---------------------------------------------

    def begin(self) -> None:
        self._staged, self._written = [], False  # what a rolled-back transaction left
        self.runs.begin()

    def stage(self, cur: sqlite3.Cursor, part: BlockPart) -> None:
        """Record one block's part in ``pending`` (merged here once the transaction commits)."""
        if not part.rows:
            return
        txs, writes = part.encode()
        cur.execute(
            "INSERT INTO pending (height, txs, writes) VALUES (?, ?, ?)",
            (part.height, txs, writes),
        )
        self._staged.append(part)

    def write_step(self, cur: sqlite3.Cursor, *, everything: bool = False) -> None:
        """Write the active generation as runs if it is full, and go on merging: about
        ``MERGE_PACE`` entries for each row staged in this transaction (at least
        ``MERGE_MIN_ENTRIES``). ``everything``: the generation if it holds anything, and every
        merge to the end."""
        gen = self.active
        if gen.rows and (everything or gen.rows >= self.batch_rows):
            self.runs.write(cur, TXS, gen.txs(), gen.top)
            self.runs.write(cur, STATE, state_entries(list(gen.state.values())), gen.top)
            cur.execute("DELETE FROM pending WHERE height <= ?", (gen.top,))
            self._written = True
        staged = sum(p.rows for p in self._staged)
        self.runs.merge_step(
            cur, None if everything else max(MERGE_MIN_ENTRIES, MERGE_PACE * staged)
        )

    def committed(self) -> None:
        self.runs.adopt()
        if self._written:
            self.active = Generation(top=self.active.top)
        for part in self._staged:
            self.active.merge(part)
        self._staged, self._written = [], False

    # ---- reading -----------------------------------------------------------------------------

    def find_txs(
        self, ids: Sequence[bytes], fetch: Callable[[list[bytes]], dict[bytes, TxEntry]]
    ) -> list[TxEntry | None]:
        """Each id's index entry (``None``: not indexed); ``fetch`` looks ids up in the
        ``txs`` B-tree."""
        out: list[TxEntry | None] = [None] * len(ids)
        # The oldest replayed copy seen so far (looking from the newest): the answer when
        # there is nothing else
        copy: list[TxEntry | None] = [None] * len(ids)

        def see(i: int, entry: TxEntry) -> None:
            if entry[3] != BAD_NONCE:
                out[i] = entry
            else:
                copy[i] = entry

        recent = self.active.txs()
        if len(recent) and len(ids):
            keys = key_array(ids)
            at = np.minimum(np.searchsorted(recent.keys, keys), len(recent) - 1)
            for i in np.flatnonzero(recent.keys[at] == keys).tolist():
                see(i, tx_entry(recent.data[at[i]]))
        ask = [i for i, e in enumerate(out) if e is None]
        for run in reversed(self.runs.runs[TXS]):
            if not ask:
                break
            assert self._db is not None
            entries = self.runs.find_txs(self._db, run, key_array([ids[i] for i in ask]))
            for i, entry in zip(ask, entries, strict=True):
                if entry is not None:
                    see(i, entry)
            ask = [i for i in ask if out[i] is None]
        if ask:
            rows = fetch([ids[i] for i in ask])
            for i in ask:
                if (entry := rows.get(ids[i])) is not None:
                    see(i, entry)
        return [e if e is not None else c for e, c in zip(out, copy, strict=True)]

    def find_states(
        self, keys: Sequence[bytes], fetch: Callable[[list[bytes]], dict[bytes, StateEntry]]
    ) -> list[StateEntry | None]:
        """Each key's (value, height that wrote it); ``fetch`` looks keys up in the ``state``
        B-tree."""
        out: list[StateEntry | None] = []
        for k in keys:
            row = self.active.state.get(k)
            out.append(None if row is None else row[1:])
        ask = [i for i, e in enumerate(out) if e is None]
        hashes = state_hashes([keys[i] for i in ask])
        for run in reversed(self.runs.runs[STATE]):
            if not ask:
                break
            assert self._db is not None
            for i, entry in zip(ask, self.runs.find_states(self._db, run, hashes), strict=True):
                if entry is not None and entry[0] == keys[i]:
                    out[i] = entry[1:]
            kept = [n for n, i in enumerate(ask) if out[i] is None]
            ask, hashes = [ask[n] for n in kept], hashes[kept]
        if ask:
            rows = fetch([keys[i] for i in ask])
            for i in ask:
                out[i] = rows.get(keys[i])
        return out
