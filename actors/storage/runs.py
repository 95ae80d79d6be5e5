"""Sorted runs: a storage shard's transaction index and state as immutable, key-ordered runs
in its SQLite file, merged in tiers (a log-structured merge tree), instead of B-trees updated in
place.

Both are keyed by hashes (a transaction's id; SHA-256 of a state key), so rows written into a
B-tree land on pages all over it, and every row costs a page written; the cost grows with the
index (measured on the 2-core machine: key-ordered upserts of 50,000-row generations into a
B-tree growing to 1,000,000 rows, 7.8 us a row; the same generations written as sorted runs,
0.6 us). A run is written once, in key order, in blocks of ``BLOCK_ROWS`` entries; the first key
of each block (its *fence*) is held in memory, so finding a key in a run reads one block. When
``FANOUT`` runs of one kind share a level they are merged into one run of the next level, so
each entry is rewritten about log_FANOUT(entries / run size) times in all and a lookup reads at
most ``FANOUT - 1`` runs per level.

Runs are ordered by age (a merged run is as old as the newest run it replaces; runs merged are
always adjacent in age, as a tier's oldest runs are merged first). Which entry of a key is the
answer is the rule of its kind, and it holds for any adjacent range of versions, so merging
keeps it: state, the newest; the transaction index, the newest that is not a replayed copy
(``BAD_NONCE``) and, if all are, the oldest (a replay never displaces the row that consumed the
nonce).

A merge goes a slice of the key space at a time, a few slices per transaction, so that no
apply stalls on a large one; its inputs serve reads until its run is complete. Everything here
changes only inside the caller's SQLite transaction: ``write`` and ``merge_step`` write rows and
change a working copy of the runs, which ``adopt`` makes the one read once the transaction
commits (and ``begin`` forgets, if it did not).
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayledger.execution import Status
from rayledger.kernels import sha256_batch

BAD_NONCE = int(Status.BAD_NONCE)

# Entries per block of a run, runs of one level merged at once, blocks of a tier's largest
# run merged per slice of the key space, and decoded blocks kept
BLOCK_ROWS = 512
FANOUT = 4
MERGE_SLICE_BLOCKS = 16
CACHE_BLOCKS = 512

TXS, STATE = 0, 1

RUNS_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    id     INTEGER PRIMARY KEY,
    age    INTEGER NOT NULL,     -- a newer run has a larger age (a merged run: its newest's)
    kind   INTEGER NOT NULL,     -- 0: the transaction index, 1: state
    level  INTEGER NOT NULL,
    top    INTEGER NOT NULL,     -- the highest block height whose entries it holds
    rows   INTEGER NOT NULL,
    fences BLOB NOT NULL         -- the first key of each block, 32 bytes each
);
CREATE TABLE IF NOT EXISTS run_blocks (
    run     INTEGER NOT NULL,
    block   INTEGER NOT NULL,
    keys    BLOB NOT NULL,       -- 32 bytes an entry, ascending
    offsets BLOB NOT NULL,       -- state: each entry's start in data and the end (u32 LE)
    data    BLOB NOT NULL,       -- transactions: TX_ENTRY records; state: STATE_HEAD, key, value
    crc     INTEGER NOT NULL,    -- CRC-32 of keys, offsets and data
    PRIMARY KEY (run, block)
);
"""

# A transaction's entry: (height, index in the block, position in the shard's rows, status)
TX_ENTRY = np.dtype([("height", "<u8"), ("idx", "<u4"), ("pos", "<u4"), ("status", "u1")])
# A state entry's head: the height that wrote it and the key's length (key and value follow)
STATE_HEAD = struct.Struct("<QI")
KEY = np.dtype("S32")  # compared as bytes (all are 32 long, so padding never matters)

TxEntry = tuple[int, int, int, int]
StateEntry = tuple[bytes, int]
Db = sqlite3.Connection | sqlite3.Cursor


class RunDamaged(ValueError):
    """A run's bytes in SQLite are not what was written."""


@dataclass(frozen=True)
class Run:
    id: int
    age: int
    kind: int
    level: int
    top: int
    rows: int
    fences: np.ndarray  # (blocks,) KEY


@dataclass
class Entries:
    """Entries of one kind in key order, one per key: ``keys`` (n,) KEY; transactions:
    ``data`` (n,) TX_ENTRY; state: ``data`` bytes and ``offsets`` (n + 1,) into them."""

    keys: np.ndarray
    data: np.ndarray
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, sel: np.ndarray) -> Entries:
        """The entries at ``sel`` (an index array), in its order."""
        if self.offsets is None:
            return Entries(self.keys[sel], self.data[sel])
        # Arrow copies each entry's bytes whole (a per-byte index array, the numpy way, costs
        # about ten times as much on the state entries a merge moves)
        offsets, data = _binary(_as_binary(self.offsets, self.data).take(pa.array(sel)))
        return Entries(self.keys[sel], data, offsets)

    def slice(self, start: int, end: int) -> Entries:
        """Entries ``start`` to ``end - 1``: views of these, no bytes copied."""
        if self.offsets is None:
            return Entries(self.keys[start:end], self.data[start:end])
        offsets = self.offsets[start : end + 1]
        data = self.data[int(offsets[0]) : int(offsets[-1])]
        return Entries(self.keys[start:end], data, offsets - offsets[0])


def key_array(keys: Sequence[bytes]) -> np.ndarray:
    """32-byte keys as an (n,) KEY array (compared and sorted as bytes)."""
    raw = b"".join(keys)
    if len(raw) != 32 * len(keys):
        raise ValueError("run keys are 32 bytes")
    return np.frombuffer(raw, KEY) if keys else np.empty(0, KEY)


def state_hashes(keys: Sequence[bytes] | pa.Array) -> np.ndarray:
    """The run key of each state key: its SHA-256."""
    if not len(keys):
        return np.empty(0, KEY)
    arr = keys if isinstance(keys, pa.Array) else pa.array(list(keys), pa.binary())
    return np.ascontiguousarray(sha256_batch(arr)).view(KEY).ravel()


def tx_entries(
    ids: np.ndarray, height: np.ndarray, idx: np.ndarray, pos: np.ndarray, status: np.ndarray
) -> Entries:
    """Transaction index rows (``ids`` (n, 32) uint8; the rest (n,)), oldest first, as one
    entry per id in key order: the newest row that is not a replayed copy, else the oldest."""
    data = np.empty(len(ids), TX_ENTRY)
    data["height"], data["idx"], data["pos"], data["status"] = height, idx, pos, status
    keys = np.ascontiguousarray(ids, np.uint8).reshape(-1).view(KEY)
    return resolve(TXS, Entries(keys, data))


def state_entries(rows: Sequence[tuple[bytes, bytes, int]]) -> Entries:
    """State rows ``(key, value, height)``, one per key, in run-key order."""
    n = len(rows)
    keys = pa.array([r[0] for r in rows], pa.large_binary())
    hashes = state_hashes(keys)
    order = np.argsort(hashes, kind="stable")
    head = np.empty(n, [("height", "<u8"), ("key_length", "<u4")])
    head["height"] = [r[2] for r in rows]
    head["key_length"] = np.diff(_binary(keys)[0])
    heads = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(STATE_HEAD.size), n, [None, pa.py_buffer(head)]
    ).cast(pa.large_binary())
    values = pa.array([r[1] for r in rows], pa.large_binary())
    # Each entry is its head, key and value, one after the other
    joined = pc.binary_join_element_wise(heads, keys, values, pa.scalar(b"", pa.large_binary()))
    offsets, data = _binary(joined.take(pa.array(order)))
    return Entries(hashes[order], data, offsets)


def _as_binary(offsets: np.ndarray, data: np.ndarray) -> pa.LargeBinaryArray:
    """A large binary array over ``data`` split at ``offsets`` (no bytes copied)."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(offsets) - 1,
        [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data, np.uint8))],
    )


def _binary(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The offsets (int64, n + 1, from 0) and bytes of a binary or large binary array."""
    _, off_buf, data_buf = arr.buffers()
    wide = pa.types.is_large_binary(arr.type)
    off = np.frombuffer(off_buf, np.int64 if wide else np.int32)
    off = off[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    if data_buf is None:
        return off - off[0], np.empty(0, np.uint8)
    return off - off[0], np.frombuffer(data_buf, np.uint8)[int(off[0]) : int(off[-1])]


def resolve(kind: int, entries: Entries) -> Entries:
    """Entries oldest first (several per key allowed) as one per key, in key order: each key's
    answer by the rule of its kind."""
    ranked = entries.take(np.argsort(entries.keys, kind="stable"))  # a key's oldest first
    return ranked.take(choose(kind, ranked.keys, ranked.data))


def tx_entry(e: np.void) -> TxEntry:
    return (int(e["height"]), int(e["idx"]), int(e["pos"]), int(e["status"]))


def choose(kind: int, keys: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Of entries sorted by key and, within a key, oldest first, the index of each key's
    answer (see the module's docstring)."""
    n = len(keys)
    if n == 0:
        return np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], n] - 1
    if kind == STATE:
        return ends
    # The newest entry of each key that is not a replayed copy, else the key's oldest
    score = np.where(data["status"] == BAD_NONCE, -1, np.arange(n))
    best = np.maximum.reduceat(score, starts)
    return np.where(best >= 0, best, starts)


@dataclass(frozen=True)
class _Out:
    """A run being written, in key order: its blocks so far and the entries held for the
    next one."""

    id: int
    kind: int
    blocks: int = 0
    rows: int = 0
    fences: tuple[bytes, ...] = ()
    held: Entries | None = None


@dataclass(frozen=True)
class _Merge:
    """A merge in progress: ``tier`` (adjacent runs of one level, oldest first) into ``out``,
    ``done`` of its key slices (between ``bounds``) merged so far."""

    tier: tuple[Run, ...]
    bounds: tuple[bytes | None, ...]
    out: _Out
    done: int = 0


@dataclass(frozen=True)
class _State:
    runs: tuple[Run, ...] = ()  # both kinds, oldest first
    merge: _Merge | None = None
    next_id: int = 1


class RunSet:
    """The runs of one shard (see the module's docstring); single-threaded, like the shard.

    A merge goes a slice of the key space at a time (``MERGE_SLICE_BLOCKS`` blocks of the
    tier's largest run) and a few slices per transaction, so that no apply stalls on it and
    memory stays bounded whatever the runs' size; its inputs serve reads until its run is
    complete. A merge cut short by a restart starts again (its blocks are dropped on open).
    """

    def __init__(self, cache_blocks: int = CACHE_BLOCKS) -> None:
        self._state = self._work = _State()
        self._cache: OrderedDict[tuple[int, int], Entries] = OrderedDict()
        self._cache_blocks = cache_blocks

    def load(self, db: sqlite3.Connection) -> None:
        """Create the tables if needed, drop the blocks of a merge a restart cut short, and
        read every run's fences."""
        db.executescript(RUNS_SQL)
        with db:
            db.execute("DELETE FROM run_blocks WHERE run NOT IN (SELECT id FROM runs)")
        rows = db.execute(
            "SELECT id, age, kind, level, top, rows, fences FROM runs ORDER BY age"
        ).fetchall()
        runs = []
        for rid, age, kind, level, top, count, fences in rows:
            if kind not in (TXS, STATE) or len(fences) % 32 or not fences:
                raise RunDamaged(f"run {rid} is damaged (kind {kind}, {len(fences)} fence bytes)")
            runs.append(Run(rid, age, kind, level, top, count, np.frombuffer(bytes(fences), KEY)))
        next_id = max([r.id + 1 for r in runs] + [r.age + 1 for r in runs] + [1])
        self._state = self._work = _State(tuple(runs), None, next_id)

    @property
    def runs(self) -> dict[int, tuple[Run, ...]]:
        """The complete runs of each kind, oldest first."""
        return {k: tuple(r for r in self._state.runs if r.kind == k) for k in (TXS, STATE)}

    @property
    def merging(self) -> bool:
        """A merge is under way or due (a tier is full)."""
        return self._state.merge is not None or bool(_full_tiers(self._state.runs))

    @property
    def top(self) -> int:
        """The highest height any run holds entries of (0: none)."""
        return max((r.top for r in self._state.runs), default=0)

    # ---- writing, inside the caller's transaction --------------------------------------------

    def begin(self) -> None:
        """A transaction starts (what a rolled-back one did is forgotten)."""
        self._work = self._state

    def adopt(self) -> None:
        """The transaction since ``begin`` committed."""
        kept = {r.id for r in self._work.runs}
        for key in [k for k in self._cache if k[0] not in kept]:
            del self._cache[key]
        self._state = self._work

    def write(self, cur: Db, kind: int, entries: Entries, top: int) -> None:
        """Write ``entries`` (one per key, in key order) as a new run of level 0."""
        if not len(entries):
            return
        w = self._work
        out = _extend(cur, _Out(w.next_id, kind), entries)
        run = _finish(cur, out, w.next_id, 0, top)
        self._work = replace(w, runs=(*w.runs, run), next_id=w.next_id + 1)

    def merge_step(self, cur: Db, budget: int | None) -> None:
        """Merge about ``budget`` entries (``None``: every tier that is full, to the end)."""
        spent = 0
        while budget is None or spent < budget:
            merge = self._work.merge or self._start()
            if merge is None:
                return
            lo, hi = merge.bounds[merge.done], merge.bounds[merge.done + 1]
            parts = [self._slice(cur, r, lo, hi) for r in merge.tier]
            whole = concat_entries(merge.out.kind, parts)
            picked = resolve(merge.out.kind, whole)
            merge = replace(merge, out=_extend(cur, merge.out, picked), done=merge.done + 1)
            spent += len(whole)
            if merge.done < len(merge.bounds) - 1:
                self._work = replace(self._work, merge=merge)
                continue
            tier = merge.tier
            ids = [r.id for r in tier]
            marks = ",".join("?" * len(ids))
            cur.execute(f"DELETE FROM runs WHERE id IN ({marks})", ids)
            cur.execute(f"DELETE FROM run_blocks WHERE run IN ({marks})", ids)
            top = max(r.top for r in tier)
            run = _finish(cur, merge.out, tier[-1].age, tier[0].level + 1, top)
            runs = [r for r in self._work.runs if r.id not in ids] + [run]
            self._work = replace(self._work, runs=tuple(sorted(runs, key=_age)), merge=None)

    def _start(self) -> _Merge | None:
        """The lowest full tier of either kind (its ``FANOUT`` oldest runs), or ``None``."""
        w = self._work
        full = _full_tiers(w.runs)
        if not full:
            return None
        level, kind = min(full)
        tier = tuple(r for r in w.runs if r.kind == kind and r.level == level)[:FANOUT]
        largest = max(tier, key=lambda r: r.rows)
        inner = [bytes(f) for f in largest.fences[MERGE_SLICE_BLOCKS::MERGE_SLICE_BLOCKS]]
        merge = _Merge(tier, (None, *inner, None), _Out(w.next_id, kind))
        self._work = replace(w, merge=merge, next_id=w.next_id + 1)
        return merge

    def _slice(self, db: Db, run: Run, lo: bytes | None, hi: bytes | None) -> Entries:
        """The entries of ``run`` with keys in ``[lo, hi)`` (``None``: unbounded)."""
        first = 0 if lo is None else max(0, int(np.searchsorted(run.fences, lo, "right")) - 1)
        last = len(run.fences) if hi is None else int(np.searchsorted(run.fences, hi, "left"))
        rows = db.execute(
            "SELECT block, keys, offsets, data, crc FROM run_blocks "
            "WHERE run = ? AND block >= ? AND block < ? ORDER BY block",
            (run.id, first, last),
        ).fetchall()
        if [r[0] for r in rows] != list(range(first, last)):
            raise RunDamaged(f"run {run.id} lacks blocks of {first}-{last - 1}")
        part = concat_entries(run.kind, [_parse(run, *r) for r in rows])
        start = 0 if lo is None else int(np.searchsorted(part.keys, lo, "left"))
        end = len(part) if hi is None else int(np.searchsorted(part.keys, hi, "left"))
        return part.slice(start, end)

    # ---- reading -----------------------------------------------------------------------------

    def _block(self, db: Db, run: Run, block: int) -> Entries:
        key = (run.id, block)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        row = db.execute(
            "SELECT block, keys, offsets, data, crc FROM run_blocks WHERE run = ? AND block = ?",
            key,
        ).fetchone()
        if row is None:
            raise RunDamaged(f"block {block} of run {run.id} is missing")
        entries = _parse(run, *row)
        self._cache[key] = entries
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return entries

    def find_txs(self, db: Db, run: Run, keys: np.ndarray) -> list[TxEntry | None]:
        """The entry ``run`` (of the transaction index) holds for each of ``keys`` (an (n,)
        KEY array of ids), or ``None``."""
        out: list[TxEntry | None] = [None] * len(keys)
        for i, blk, p in self._hits(db, run, keys):
            out[i] = tx_entry(blk.data[p])
        return out

    def find_states(
        self, db: Db, run: Run, keys: np.ndarray
    ) -> list[tuple[bytes, bytes, int] | None]:
        """The ``(key, value, height)`` ``run`` (of state) holds for each of ``keys`` (an (n,)
        KEY array of state key hashes), or ``None``."""
        out: list[tuple[bytes, bytes, int] | None] = [None] * len(keys)
        for i, blk, p in self._hits(db, run, keys):
            assert blk.offsets is not None
            raw = blk.data[int(blk.offsets[p]) : int(blk.offsets[p + 1])].tobytes()
            height, klen = STATE_HEAD.unpack_from(raw)
            head = STATE_HEAD.size
            out[i] = raw[head : head + klen], raw[head + klen :], height
        return out

    def _hits(self, db: Db, run: Run, keys: np.ndarray) -> Iterator[tuple[int, Entries, int]]:
        """(index in ``keys``, block, position in the block) of each key ``run`` holds."""
        block_of = np.searchsorted(run.fences, keys, side="right") - 1
        # Grouped by block in one sort (a scan of every key per block was O(keys x blocks):
        # 6.5 s for a million ids in a run of ten million entries)
        inside = np.flatnonzero(block_of >= 0)
        order = inside[np.argsort(block_of[inside], kind="stable")]
        blocks, starts, counts = np.unique(block_of[order], return_index=True, return_counts=True)
        for b, start, count in zip(blocks.tolist(), starts.tolist(), counts.tolist(), strict=True):
            sel = order[start : start + count]
            blk = self._block(db, run, b)
            pos = np.minimum(np.searchsorted(blk.keys, keys[sel]), len(blk) - 1)
            hit = blk.keys[pos] == keys[sel]
            yield from zip(sel[hit].tolist(), itertools.repeat(blk), pos[hit].tolist())


def _extend(cur: Db, out: _Out, entries: Entries) -> _Out:
    """``out`` with ``entries`` (all after its keys) added: every full block written."""
    held = entries if out.held is None else concat_entries(out.kind, [out.held, entries])
    full = len(held) - len(held) % BLOCK_ROWS
    return _blocks(cur, out, held, full)


def _finish(cur: Db, out: _Out, age: int, level: int, top: int) -> Run:
    """The run ``out`` completes (its last block written, its row inserted)."""
    if out.held is not None and len(out.held):
        out = _blocks(cur, out, out.held, len(out.held))
    fences = b"".join(out.fences)
    cur.execute(
        "INSERT INTO runs (id, age, kind, level, top, rows, fences) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (out.id, age, out.kind, level, top, out.rows, fences),
    )
    return Run(out.id, age, out.kind, level, top, out.rows, np.frombuffer(fences, KEY))


def _blocks(cur: Db, out: _Out, e: Entries, count: int) -> _Out:
    """Write the first ``count`` of ``e`` as blocks of ``out``; the rest is held."""
    rows: list[tuple[int, int, bytes, bytes, bytes, int]] = []
    fences = []
    for lo in range(0, count, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, count)
        if e.offsets is None:
            offsets, data = b"", e.data[lo:hi].tobytes()
        else:
            start, end = int(e.offsets[lo]), int(e.offsets[hi])
            offsets = (e.offsets[lo : hi + 1] - start).astype("<u4").tobytes()
            data = e.data[start:end].tobytes()
        keys = e.keys[lo:hi].tobytes()
        crc = zlib.crc32(data, zlib.crc32(offsets, zlib.crc32(keys)))
        rows.append((out.id, out.blocks + len(rows), keys, offsets, data, crc))
        fences.append(keys[:32])
    cur.executemany(
        "INSERT INTO run_blocks (run, block, keys, offsets, data, crc) VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    return replace(
        out,
        blocks=out.blocks + len(rows),
        rows=out.rows + count,
        fences=(*out.fences, b"".join(fences)),
        held=e.slice(count, len(e)),
    )


def _parse(run: Run, block: int, keys: bytes, offsets: bytes, data: bytes, crc: int) -> Entries:
    """A block's columns as read from SQLite; ``RunDamaged`` for bytes ``_blocks`` did not
    write."""
    keys, offsets, data = bytes(keys), bytes(offsets), bytes(data)
    where = f"block {block} of run {run.id}"
    if zlib.crc32(data, zlib.crc32(offsets, zlib.crc32(keys))) != crc:
        raise RunDamaged(f"{where} fails its checksum")
    if len(keys) % 32 or not keys:
        raise RunDamaged(f"{where} has {len(keys)} key bytes")
    k = np.frombuffer(keys, KEY)
    # Another block's bytes (or another run's) would pass their own checksum
    if block >= len(run.fences) or k[0] != run.fences[block] or (k[1:] <= k[:-1]).any():
        raise RunDamaged(f"{where} is not the block its run's fences name")
    if run.kind == TXS:
        if len(data) != len(k) * TX_ENTRY.itemsize:
            raise RunDamaged(f"{where} has {len(data)} entry bytes for {len(k)} keys")
        return Entries(k, np.frombuffer(data, TX_ENTRY))
    off = np.frombuffer(offsets, "<u4").astype(np.int64) if len(offsets) % 4 == 0 else None
    if off is None or len(off) != len(k) + 1 or off[0] != 0 or off[-1] != len(data):
        raise RunDamaged(f"{where} has damaged offsets")
    if (np.diff(off) < STATE_HEAD.size).any():
        raise RunDamaged(f"{where} has an entry shorter than its head")
    return Entries(k, np.frombuffer(data, np.uint8), off)


def concat_entries(kind: int, blocks: list[Entries]) -> Entries:
    """Entries of one kind, one list after the other (their key order is not checked)."""
    if not blocks and kind == TXS:
        return Entries(np.empty(0, KEY), np.empty(0, TX_ENTRY))
    if not blocks:
        return Entries(np.empty(0, KEY), np.empty(0, np.uint8), np.zeros(1, np.int64))
    keys = np.concatenate([b.keys for b in blocks])
    data = np.concatenate([b.data for b in blocks])
    if kind == TXS:
        return Entries(keys, data)
    ends = np.cumsum([0] + [len(b.data) for b in blocks])
    offsets = np.concatenate(
        [b.offsets[:-1] + base for b, base in zip(blocks, ends, strict=False)]  # type: ignore[index]
        + [np.array([ends[-1]], np.int64)]
    )
    return Entries(keys, data, offsets)


def _full_tiers(runs: tuple[Run, ...]) -> list[tuple[int, int]]:
    """(level, kind) of every tier holding ``FANOUT`` runs or more."""
    count = Counter((r.level, r.kind) for r in runs)
    return [tier for tier, n in count.items() if n >= FANOUT]


def _age(run: Run) -> int:
    return run.age
