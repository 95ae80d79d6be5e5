"""A storage shard's index buffer: the transaction index and state entries of recent blocks,
held in memory and written to the shard's SQLite B-trees in key order, many blocks at a time.

Both B-trees are keyed by hashes, so the rows of one block land on pages all over them: written
block by block, every row costs a page written to the WAL (measured on the 2-core machine,
500-row blocks into a 1,000,000-row index: ~18 us a row; the same rows written 50,000 at a time
in key order: ~6 us). So each block's part of the index goes to a ``pending`` table instead (one
row per block, keyed by height: an append, a few pages) and into the *active* generation here.
When the active generation holds ``batch_rows`` rows it is frozen and drained into the B-trees in
key order, a slice of the key space per apply (``steps`` applies in all), in the same SQLite
transaction as that apply's blocks; the last slice deletes its heights from ``pending``. A crash
anywhere leaves every undrained row in ``pending``, and opening replays it (upserts are
idempotent), so the buffer is never the only copy of anything.

Reads look in the active generation, then the frozen one, then SQLite. The transaction index
keeps SQLite's upsert rule everywhere: a later row of the same id replaces an earlier one unless
its status is ``BAD_NONCE`` (a replayed copy never displaces the row that consumed the nonce).
"""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rayledger.execution import Status
from rayledger.tx import batch_from_ipc, batch_to_ipc

BAD_NONCE = int(Status.BAD_NONCE)

# Rows (index entries and state writes) the active generation gathers before it is drained,
# and the applies its draining is spread over
INDEX_BATCH_ROWS = 50_000
DRAIN_STEPS = 8

PENDING_SQL = """
CREATE TABLE IF NOT EXISTS pending (
    height INTEGER PRIMARY KEY,
    txs    BLOB NOT NULL,
    writes BLOB NOT NULL
);
"""

TX_UPSERT = (
    "INSERT INTO txs (tx_id, height, idx, pos, status) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (tx_id) DO UPDATE SET height = excluded.height, idx = excluded.idx, "
    f"pos = excluded.pos, status = excluded.status WHERE excluded.status != {BAD_NONCE}"
)
STATE_UPSERT = (
    "INSERT INTO state (key, value, height) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, height = excluded.height"
)

# (height, idx, pos, status) of a transaction; (value, height) of a state key
TxEntry = tuple[int, int, int, int]
StateEntry = tuple[bytes, int]
# Held here as the upserts' parameters: (tx_id, *TxEntry) and (key, *StateEntry)
TxRow = tuple[bytes, int, int, int, int]
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
    txs: dict[bytes, TxRow] = field(default_factory=dict)
    state: dict[bytes, StateRow] = field(default_factory=dict)
    top: int = 0  # the highest height merged in

    @property
    def rows(self) -> int:
        return len(self.txs) + len(self.state)

    def merge(self, part: BlockPart) -> None:
        h, n = part.height, len(part.ids)
        raw = np.ascontiguousarray(part.ids, np.uint8).tobytes()
        keys = [raw[i : i + 32] for i in range(0, 32 * n, 32)]
        idx, status = part.idx.tolist(), part.status.tolist()
        rows = zip(keys, itertools.repeat(h), idx, range(n), status, strict=False)
        replays = [i for i, st in enumerate(status) if st == BAD_NONCE]
        if not replays:
            self.txs.update(zip(keys, rows, strict=False))
        else:
            # Later rows replace earlier ones, but a replayed copy only takes an id not yet
            # held (as the upsert does): the others first, in order, then the copies
            rows_list = list(rows)
            skip = set(replays)
            self.txs.update((keys[i], rows_list[i]) for i in range(n) if i not in skip)
            for i in replays:
                self.txs.setdefault(keys[i], rows_list[i])
        if part.writes.num_rows:
            wkeys = part.writes.column(0).to_pylist()
            values = part.writes.column(1).to_pylist()
            triples = zip(wkeys, values, itertools.repeat(h), strict=False)
            self.state.update(zip(wkeys, triples, strict=False))
        self.top = max(self.top, h)


class IndexBuffer:
    """See the module's docstring. Single-threaded, like the shard that owns it. A shard's
    transaction starts with ``begin`` and, once it commits, ends with ``committed``: only then
    are the staged blocks merged and the drain moved on (a transaction rolled back leaves both
    as they were; the next ``begin`` forgets what it staged)."""

    def __init__(self, batch_rows: int = INDEX_BATCH_ROWS, steps: int = DRAIN_STEPS) -> None:
        if batch_rows < 0 or steps < 1:
            raise ValueError(f"index buffer of {batch_rows} rows drained in {steps} steps")
        self.batch_rows, self.steps = batch_rows, steps
        self.active = Generation()
        self.frozen: Generation | None = None
        # The frozen generation as upsert parameters in key order, and how far each is drained
        self._drain: tuple[list[TxRow], list[StateRow]] = ([], [])
        self._done = (0, 0)
        self._staged: list[BlockPart] = []
        self._planned: tuple[int, int] | None = None

    def load(self, db: sqlite3.Connection) -> None:
        """Replay the ``pending`` table (after a restart): every block not yet drained."""
        db.executescript(PENDING_SQL)
        for height, txs, writes in db.execute(
            "SELECT height, txs, writes FROM pending ORDER BY height"
        ):
            self.active.merge(BlockPart.decode(int(height), bytes(txs), bytes(writes)))

    @property
    def rows(self) -> int:
        """Rows held here (both generations, drained or not)."""
        return self.active.rows + (self.frozen.rows if self.frozen else 0)

    # ---- writing, inside the shard's transaction ---------------------------------------------

    def begin(self) -> None:
        self._staged, self._planned = [], None  # what a rolled-back transaction left

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

    def drain_step(self, cur: sqlite3.Cursor, *, everything: bool = False) -> None:
        """Write the next slice of the frozen generation (freezing the active one first if it
        is full); ``everything``: all of both."""
        if self.frozen is None and (everything or self.active.rows >= self.batch_rows):
            if not self.active.rows:
                return
            self._freeze()
        if self.frozen is None:
            return
        txs, state = self._drain
        done_t, done_s = self._done
        # The active generation filled up before the frozen one was drained (large blocks, a
        # shard catching up): the rest goes now, so that memory stays near ``batch_rows``
        if everything or self.active.rows >= self.batch_rows:
            end_t, end_s = len(txs), len(state)
        else:
            end_t = min(len(txs), done_t + math.ceil(len(txs) / self.steps))
            end_s = min(len(state), done_s + math.ceil(len(state) / self.steps))
        if end_t > done_t:
            cur.executemany(TX_UPSERT, txs[done_t:end_t])
        if end_s > done_s:
            cur.executemany(STATE_UPSERT, state[done_s:end_s])
        if end_t == len(txs) and end_s == len(state):
            cur.execute("DELETE FROM pending WHERE height <= ?", (self.frozen.top,))
        self._planned = (end_t, end_s)

    def committed(self) -> None:
        for part in self._staged:
            self.active.merge(part)
        if self._planned is not None:
            txs, state = self._drain
            if self._planned == (len(txs), len(state)):
                self.frozen, self._drain, self._done = None, ([], []), (0, 0)
            else:
                self._done = self._planned
        self._staged, self._planned = [], None

    def _freeze(self) -> None:
        frozen = self.frozen = self.active
        self.active = Generation(top=frozen.top)
        txs, state = frozen.txs, frozen.state
        self._drain = ([txs[k] for k in sorted(txs)], [state[k] for k in sorted(state)])
        self._done = (0, 0)

    # ---- reading -----------------------------------------------------------------------------

    def find_txs(
        self, ids: Sequence[bytes], fetch: Callable[[list[bytes]], dict[bytes, TxEntry]]
    ) -> list[TxEntry | None]:
        """Each id's index entry (``None``: not indexed); ``fetch`` looks ids up in SQLite."""
        gens = [g for g in (self.active, self.frozen) if g is not None]
        out: list[TxEntry | None] = []
        ask: list[bytes] = []
        for t in ids:
            # Newest first: the latest entry that is not a replayed copy is the answer
            hit = next((e for g in gens if (e := g.txs.get(t)) and e[4] != BAD_NONCE), None)
            out.append(None if hit is None else hit[1:])
            if hit is None:
                ask.append(t)
        if not ask:
            return out
        found = fetch(ask)
        for n, t in enumerate(ids):
            if out[n] is not None:
                continue
            db = found.get(t)
            if db is not None and db[3] != BAD_NONCE:
                out[n] = db
                continue
            # Only replayed copies (or nothing): the oldest, which the upserts would keep
            older = [db] + [None if (e := g.txs.get(t)) is None else e[1:] for g in reversed(gens)]
            out[n] = next((e for e in older if e is not None), None)
        return out

    def find_states(
        self, keys: Sequence[bytes], fetch: Callable[[list[bytes]], dict[bytes, StateEntry]]
    ) -> list[StateEntry | None]:
        gens = [g for g in (self.active, self.frozen) if g is not None]
        out: list[StateEntry | None] = []
        ask: list[bytes] = []
        for k in keys:
            hit = next((e for g in gens if (e := g.state.get(k)) is not None), None)
            out.append(None if hit is None else hit[1:])
            if hit is None:
                ask.append(k)
        if ask:
            found = fetch(ask)
            out = [found.get(k) if e is None else e for k, e in zip(keys, out, strict=True)]
        return out
