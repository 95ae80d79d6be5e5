"""One storage shard's partition of a validator's committed ledger (no Ray here).

A validator has ``S`` storage shards. Every committed block reaches every shard once, in
height order, and each shard keeps its part of it, partitioned by key hash:

- transactions (the signed row, its height and index, status and result) whose id falls in
  the shard: ``u64_be(tx_id[:8]) % S``;
- state entries (key -> value, and the height that last wrote it) whose key falls in the
  shard: ``u64_be(SHA-256(key)[:8]) % S``;
- the Merkle leaves of the blocks whose height falls in the shard: ``height % S`` (the
  transaction ids and result leaf hashes a receipt's audit paths are computed from);
- every block header, the QC that certifies it and the commit proofs: small, kept by all, so
  any shard can prove a commit.

So reads (receipts, state, transaction lookups) are served by the shard that owns the key,
never through the validator's event loop. The validator's own block store stays the chain's
durable record (consensus, sync and restart read it); a shard is derived from it and is brought
up to date from it after any loss: ``apply`` is idempotent and refuses gaps.

A shard's rows of each block are appended to ``rows.seg`` as one Arrow IPC stream (a frame);
the SQLite database (WAL mode) indexes them (tx id -> height, index, frame, position) and holds
the headers, proofs' leaves and the state partition. A block is indexed in one SQLite
transaction with the applied height, after its frame is written, so a crash leaves the shard at
a block boundary; bytes after the last indexed frame are cut off on open, and a rows file
shorter than its index refuses to open (``StoreCorruption``). Each frame's CRC-32 is indexed
with it, so a frame damaged on disk reads as ``StoreError``, never as other rows.

The transaction index and the state are keyed by hashes; a block's entries go first to the
shard's index buffer (``buffer.py``: a ``pending`` row in the same SQLite transaction, and
memory), which writes them as sorted runs, merged in tiers (``runs.py``), many blocks at a
time. Reads look in the buffer, then the runs, newest first, so they change what costs, never
what is read.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rayledger.actors.storage.buffer import (
    INDEX_BATCH_ROWS,
    BlockPart,
    IndexBuffer,
    StateEntry,
    TxEntry,
)
from rayledger.actors.storage.runs import STATE, TXS, RunDamaged
from rayledger.block import BLOCK_ROW_SCHEMA, BlockHeader, QuorumCert, result_leaf_hashes
from rayledger.errors import DecodeError, InvalidBlock, NotFound, StoreCorruption, StoreError
from rayledger.kernels import merkle_levels, merkle_levels_of_leaf_hashes, sha256_batch
from rayledger.merkle import inclusion_proof_from_levels
from rayledger.receipt import CommitProof, Receipt
from rayledger.tx import Transaction, tx_ids_of

log = logging.getLogger(__name__)

WRITES_SCHEMA = pa.schema(
    [pa.field("key", pa.binary(), nullable=False), pa.field("value", pa.binary(), nullable=False)]
)

# SQLite page cache of a shard (KiB); see ShardStore
SHARD_CACHE_KIB = 256 * 1024
# Rows applied between two checkpoints of the shard's WAL into its database, made by a thread
# of the shard's own (see ShardStore): about 1 KB of WAL a row
SHARD_CHECKPOINT_ROWS = 50_000
# Bytes of blocks' rows a shard keeps decoded after reading them (``ShardStore._frame``)
FRAMES_KEEP_BYTES = 64 << 20
# Ids or keys one read may ask for (``locate``, ``get_states``): more are refused, and callers
# ask in parts (a million ids in one call kept a shard busy 11 s, with 300 MB more memory)
READ_MAX_KEYS = 65_536


def read_parts(rows: Sequence[int]) -> list[Sequence[int]]:
    """``rows`` in consecutive parts of at most ``READ_MAX_KEYS`` (one read each)."""
    return [rows[i : i + READ_MAX_KEYS] for i in range(0, len(rows), READ_MAX_KEYS)]


def _check_read_size(what: str, n: int) -> None:
    if n > READ_MAX_KEYS:
        raise ValueError(f"{n} {what} in one read: at most {READ_MAX_KEYS}, ask in parts")


_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS headers (
    height INTEGER PRIMARY KEY,
    hash   BLOB NOT NULL,
    header BLOB NOT NULL,
    qc     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    height   INTEGER PRIMARY KEY,
    child    BLOB NOT NULL,
    child_qc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    height  INTEGER PRIMARY KEY,
    tx_ids  BLOB NOT NULL,
    results BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    height INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    crc    INTEGER
);
CREATE TABLE IF NOT EXISTS txs (
    tx_id  BLOB PRIMARY KEY,
    height INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    pos    INTEGER NOT NULL,
    status INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    key    BLOB PRIMARY KEY,
    value  BLOB NOT NULL,
    height INTEGER NOT NULL
) WITHOUT ROWID;
"""


def shard_of_tx_ids(tx_ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each ``(n, 32)`` transaction id: its first 8 bytes, big-endian, mod S."""
    ids = np.ascontiguousarray(tx_ids, np.uint8).reshape(-1, 32)
    return (ids[:, :8].copy().view(">u8").ravel() % np.uint64(shards)).astype(np.int64)


def shard_of_keys(keys: pa.Array | Sequence[bytes], shards: int) -> np.ndarray:
    """The shard of each state key: the first 8 bytes of its SHA-256, big-endian, mod S."""
    arr = keys if isinstance(keys, pa.Array) else pa.array(list(keys), pa.binary())
    if len(arr) == 0:
        return np.empty(0, np.int64)
    return shard_of_tx_ids(sha256_batch(arr), shards)


def rows_by_shard(owners: np.ndarray) -> dict[int, list[int]]:
    """Row indices grouped by owning shard (``owners`` from ``shard_of_tx_ids`` or
    ``shard_of_keys``), in row order within each group."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(np.asarray(owners).tolist()):
        groups.setdefault(k, []).append(i)
    return groups


def shard_of_height(height: int, shards: int) -> int:
    return height % shards


@dataclass(frozen=True)
class CommittedBlock:
    """What a validator hands its shards for one committed block."""

    header: BlockHeader
    qc: QuorumCert  # certifies ``header``
    rows: pa.RecordBatch  # BLOCK_ROW_SCHEMA, block order
    writes: pa.RecordBatch  # WRITES_SCHEMA: the state the block wrote
    # When this block is the last of a commit: the child in the next round and its QC
    commit: tuple[BlockHeader, QuorumCert] | None = None
    # The ``(n, 32) uint8`` result leaf hashes, as the validator hashed them for the header's
    # result root (taken on its word, like the rows: the same institution); None: hashed here
    result_leaves: np.ndarray | None = None


def writes_batch(writes: dict[bytes, bytes]) -> pa.RecordBatch:
    keys = sorted(writes)
    return pa.RecordBatch.from_arrays(
        [pa.array(keys, pa.binary()), pa.array(list(map(writes.__getitem__, keys)), pa.binary())],
        schema=WRITES_SCHEMA,
    )


class ShardStore:
    def __init__(
        self,
        path: Path,
        shard: int,
        shards: int,
        genesis: BlockHeader,
        genesis_state: dict[bytes, bytes] | None = None,
        *,
        index_batch_rows: int = INDEX_BATCH_ROWS,
    ) -> None:
        """``genesis_state`` (the genesis accounts' entries) seeds a new shard's partition.
        ``index_batch_rows``: rows of the transaction index and state gathered in memory (and
        in the ``pending`` table) before they are written as sorted runs (see ``buffer.py``)."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        self.shard, self.shards = shard, shards
        self.genesis = genesis
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "shard.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a process crash loses nothing; a power loss may lose the last blocks, and
        # the shard then reports the lower height and its validator sends them again.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The tx index and the state are keyed by hashes, so every block's inserts land on
        # pages all over their B-trees: a page cache that holds them (SQLite allocates it as
        # it fills) and rare checkpoints (a page written by several blocks is copied to the
        # database once: every 50,000 WAL pages instead of 1,000 took applying 10,000-row
        # blocks from 6.8-12.2 to 4.7-9.1 us per transaction, 2 shards, 500,000 rows).
        self._db.execute(f"PRAGMA cache_size=-{SHARD_CACHE_KIB}")
        # The writer never checkpoints: a checkpoint made by the apply that crossed the line
        # held that apply, and the reads queued behind it (a mempool's nonce reads), for
        # 0.1-0.5 s in a script (a 200 MB WAL), more on a busy machine. A thread of this
        # store's own makes them on its own connection instead (``_Checkpointer``).
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA_SQL)
        self._check_meta()
        self._buffer = IndexBuffer(index_batch_rows)
        try:
            self._buffer.load(self._db)
        except (ValueError, DecodeError) as exc:
            self._db.close()
            raise StoreCorruption(
                f"shard {shard}: the index runs or pending rows are damaged ({exc})",
                height=None,
                path=str(self.path),
            ) from None
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(frames)")}
        if "crc" not in columns:  # a shard written before frames carried checksums
            self._db.execute("ALTER TABLE frames ADD COLUMN crc INTEGER")
        row = self._db.execute("SELECT max(height) FROM headers").fetchone()
        self._height = int(row[0] or 0)
        self._seg_path = path / "rows.seg"
        end = self._db.execute("SELECT max(offset + length) FROM frames").fetchone()[0] or 0
        self._seg = open(self._seg_path, "a+b")  # noqa: SIM115 (held open for the shard's life)
        size = self._seg.seek(0, os.SEEK_END)
        if size > end:
            # A frame written by an apply that never committed its index: not part of the shard
            self._seg.truncate(end)
        elif size < end:
            self.close()
            raise StoreCorruption(
                f"shard {shard}: the rows file has {size} bytes, its index needs {end}",
                height=self._height,
                path=str(self._seg_path),
            )
        self._seg_end = end
        self._head_hash = self._hash_at(self._height)
        if genesis_state and self._height == 0:
            self._seed(genesis_state)
        self._levels = functools.lru_cache(maxsize=16)(self._block_levels)
        # Blocks' rows read lately (``_frame``), newest last, at most FRAMES_KEEP_BYTES of them
        self._frames: collections.OrderedDict[int, tuple[pa.RecordBatch, int]] = (
            collections.OrderedDict()
        )
        self._frames_bytes = 0
        # Last: a store that failed to open leaves no thread behind
        self._checkpointer = _Checkpointer(self.path, f"shard-{shard}")
        self._rows_since_checkpoint = 0

    def _check_meta(self) -> None:
        want = {
            "genesis": self.genesis.hash,
            "partition": f"{self.shard}/{self.shards}".encode(),
        }
        for key, value in want.items():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif bytes(row[0]) != value:
                raise StoreError(
                    f"{self.path} holds {key} {bytes(row[0])!r}, not {value!r} of this shard"
                )

    def _seed(self, state: dict[bytes, bytes]) -> None:
        keys = sorted(state)
        owners = shard_of_keys(keys, self.shards)
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO state (key, value, height) VALUES (?, ?, 0)",
                ((k, state[k]) for k, o in zip(keys, owners, strict=True) if o == self.shard),
            )

    def _hash_at(self, height: int) -> bytes:
        if height == 0:
            return self.genesis.hash
        row = self._db.execute("SELECT hash FROM headers WHERE height = ?", (height,)).fetchone()
        return bytes(row[0])

    @property
    def height(self) -> int:
        """The last block applied here."""
        return self._height

    @property
    def buffered_rows(self) -> int:
        """Index and state rows held in the index buffer, not yet in a run."""
        return self._buffer.rows

    @property
    def index_runs(self) -> dict[str, list[int]]:
        """The level of each sorted run of the transaction index and of state, oldest first."""
        runs = self._buffer.runs.runs
        return {kind: [r.level for r in runs[k]] for kind, k in (("txs", TXS), ("state", STATE))}

    # ---- writing -----------------------------------------------------------------------------

    def apply(self, blocks: Iterable[CommittedBlock]) -> int:
        """Apply committed blocks in height order, in one transaction; ones already applied
        are skipped. If any block does not extend the one before it (``StoreError`` for a gap,
        ``InvalidBlock`` for another parent or rows that do not match), nothing is applied.
        Returns the height."""
        todo: list[CommittedBlock] = []
        height, head = self._height, self._head_hash
        for block in blocks:
            h = block.header.height
            if h <= height:
                continue
            if h != height + 1:
                raise StoreError(f"shard at height {height} cannot apply block {h} (gap)")
            if block.header.parent_hash != head:
                raise InvalidBlock(f"block {h} does not extend the shard's block {h - 1}")
            schema = block.rows.schema.remove_metadata()
            if block.rows.num_rows != block.header.tx_count or schema != BLOCK_ROW_SCHEMA:
                raise InvalidBlock(f"block {h}: rows do not match the header or the row schema")
            if block.qc.block_hash != block.header.hash:
                raise InvalidBlock(f"block {h}: the QC certifies another block")
            leaves = block.result_leaves
            if leaves is not None and not (
                isinstance(leaves, np.ndarray)
                and leaves.dtype == np.uint8
                and leaves.shape == (block.header.tx_count, 32)
            ):
                raise InvalidBlock(f"block {h}: result leaf hashes are not one 32-byte row per tx")
            todo.append(block)
            height, head = h, block.header.hash
        if not todo:
            return self._height
        with self._transaction() as cur, self._runs_checked():
            for block in todo:
                self._apply_one(cur, block)
            self._buffer.write_step(cur)
        self._height, self._head_hash = height, head
        self._rows_since_checkpoint += sum(b.header.tx_count for b in todo) + len(todo)
        if self._rows_since_checkpoint >= SHARD_CHECKPOINT_ROWS:
            self._rows_since_checkpoint = 0
            self._checkpointer.request()
        return self._height

    def flush(self) -> None:
        """Write everything the index buffer holds as runs now, and finish every merge (nothing
        depends on it: without it a restart replays ``pending``)."""
        if self._buffer.rows or self._buffer.runs.merging:
            with self._transaction() as cur, self._runs_checked():
                self._buffer.write_step(cur, everything=True)

    @contextlib.contextmanager
    def _runs_checked(self) -> Iterator[None]:
        """A run's blocks are read when needed (a lookup, a merge): bytes that are not what
        was written read as ``StoreCorruption``, never as other entries."""
        try:
            yield
        except RunDamaged as exc:
            raise StoreCorruption(
                f"shard {self.shard}: an index run is damaged ({exc})",
                height=self._height,
                path=str(self.path),
            ) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One SQLite write transaction, with the index buffer's changes kept only if it
        commits (and the rows file's end put back if it does not)."""
        seg_end = self._seg_end
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        self._buffer.begin()
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            self._seg_end = seg_end  # frames of the rolled-back blocks are overwritten next
            raise
        self._buffer.committed()

    def _apply_one(self, cur: sqlite3.Cursor, block: CommittedBlock) -> None:
        h = block.header.height
        rows = block.rows
        ids = tx_ids_of(rows)
        cur.execute(
            "INSERT INTO headers (height, hash, header, qc) VALUES (?, ?, ?, ?)",
            (h, block.header.hash, block.header.encode(), block.qc.encode()),
        )
        if block.commit is not None:
            child, child_qc = block.commit
            cur.execute(
                "INSERT INTO commits (height, child, child_qc) VALUES (?, ?, ?)",
                (h, child.encode(), child_qc.encode()),
            )
        if shard_of_height(h, self.shards) == self.shard:
            leaves = block.result_leaves
            if leaves is None:
                leaves = result_leaf_hashes(ids, rows.select(["status", "result"]))
            cur.execute(
                "INSERT INTO leaves (height, tx_ids, results) VALUES (?, ?, ?)",
                (h, ids.tobytes(), leaves.tobytes()),
            )
        mine, part = self._mine(rows, lambda: shard_of_tx_ids(ids, self.shards))
        if len(mine):
            offset, length, crc = self._append_frame(part)
            cur.execute(
                "INSERT INTO frames (height, offset, length, crc) VALUES (?, ?, ?, ?)",
                (h, offset, length, crc),
            )
        writes = block.writes
        if writes.num_rows:
            writes = self._mine(writes, lambda: shard_of_keys(writes.column("key"), self.shards))[1]
        statuses = part.column("status").to_numpy(zero_copy_only=False)
        self._buffer.stage(
            cur, BlockPart(h, ids if self.shards == 1 else ids[mine], mine, statuses, writes)
        )

    def _mine(
        self, batch: pa.RecordBatch, owners: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, pa.RecordBatch]:
        """The indices and rows of ``batch`` this shard owns (``owners()`` gives each row's
        shard; not computed when there is only one)."""
        if self.shards == 1:
            return np.arange(batch.num_rows), batch
        sel = np.flatnonzero(owners() == self.shard)
        return sel, batch.take(pa.array(sel))

    def _append_frame(self, rows: pa.RecordBatch) -> tuple[int, int, int]:
        """Append one block's rows; (offset, length, CRC-32 of the frame's bytes)."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_batch(rows)
        data = sink.getvalue()
        offset = self._seg_end
        self._seg.seek(offset)
        self._seg.write(data)
        self._seg.flush()
        self._seg_end = offset + data.size
        return offset, data.size, zlib.crc32(data)

    def _frame(self, height: int) -> pa.RecordBatch:
        """The rows of block ``height`` in this shard; ``StoreError`` if their bytes on disk
        are not the ones written (short, or failing the frame's CRC-32), never other rows.
        The latest read are kept (a block's rows are written once, never changed): a client
        reading the rows of its batch one by one read, checked and decoded the whole frame
        each time (4.3 ms a row for a 10.6 MB frame of 50,000 rows)."""
        kept = self._frames.get(height)
        if kept is not None:
            self._frames.move_to_end(height)
            return kept[0]
        rows = self._read_frame(height)
        size = rows.get_total_buffer_size()
        if size <= FRAMES_KEEP_BYTES:
            self._frames[height] = (rows, size)
            self._frames_bytes += size
            while self._frames_bytes > FRAMES_KEEP_BYTES:
                _, (_, dropped) = self._frames.popitem(last=False)
                self._frames_bytes -= dropped
        return rows

    def _read_frame(self, height: int) -> pa.RecordBatch:
        row = self._db.execute(
            "SELECT offset, length, crc FROM frames WHERE height = ?", (height,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no rows of block {height} in shard {self.shard}")
        offset, length, crc = int(row[0]), int(row[1]), row[2]
        with open(self._seg_path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        damaged = f"shard {self.shard}: the rows of block {height} in {self._seg_path} are damaged"
        if len(data) != length:
            raise StoreError(f"{damaged} (short read: {len(data)} of {length} bytes)")
        if crc is not None and zlib.crc32(data) != int(crc):
            raise StoreError(f"{damaged} (checksum mismatch)")
        try:
            return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()
        except (pa.ArrowException, OSError, StopIteration) as exc:  # OSError: ArrowIOError
            raise StoreError(f"{damaged} ({exc})") from None

    # ---- reading -----------------------------------------------------------------------------

    def owns_tx(self, tx_id: bytes) -> bool:
        return int(shard_of_tx_ids(np.frombuffer(tx_id, np.uint8), self.shards)[0]) == self.shard

    def owns_key(self, key: bytes) -> bool:
        return int(shard_of_keys([key], self.shards)[0]) == self.shard

    def _check_tx_id(self, tx_id: bytes) -> None:
        if not isinstance(tx_id, bytes) or len(tx_id) != 32:
            raise ValueError("a transaction id is 32 bytes")
        if not self.owns_tx(tx_id):
            raise ValueError(f"transaction {tx_id.hex()[:16]}… is not in shard {self.shard}")

    def locate(self, tx_ids: Sequence[bytes]) -> list[int | None]:
        """The height of each transaction (``None`` if not committed as far as applied)."""
        ids = list(tx_ids)
        _check_read_size("transaction ids", len(ids))
        if not all(isinstance(t, bytes) and len(t) == 32 for t in ids):
            raise ValueError("a transaction id is 32 bytes")
        if ids and self.shards > 1:
            owners = shard_of_tx_ids(np.frombuffer(b"".join(ids), np.uint8), self.shards)
            if (owners != self.shard).any():
                t = ids[int(np.argmax(owners != self.shard))]
                raise ValueError(f"transaction {t.hex()[:16]}… is not in shard {self.shard}")
        return [None if e is None else e[0] for e in self._find_txs(ids)]

    def get_tx(self, tx_id: bytes) -> dict[str, Any]:
        """The committed row of one transaction; ``NotFound`` if it is not committed."""
        self._check_tx_id(tx_id)
        entry = self._find_txs([tx_id])[0]
        if entry is None:
            raise NotFound(
                f"transaction {tx_id.hex()[:16]}… is not committed (as of height {self._height})"
            )
        height, idx, pos, _ = entry
        found = self._frame(height).slice(pos, 1).to_pylist()[0]
        if found["tx_id"] != tx_id:
            raise StoreError(f"shard {self.shard}: block {height} row {pos} is another transaction")
        found.update(height=height, index=idx)
        return found

    def get_state(self, key: bytes) -> tuple[bytes, int] | None:
        """(value, height that wrote it) of a state key, or ``None`` if never written."""
        if not self.owns_key(key):
            raise ValueError(f"state key {key.hex()[:16]}… is not in shard {self.shard}")
        return self._find_states([key])[0]

    def get_states(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of many state keys of this shard (``None`` where never written)."""
        keys = list(keys)
        _check_read_size("state keys", len(keys))
        if not all(isinstance(k, bytes) for k in keys):
            raise ValueError("a state key is bytes")
        if keys and self.shards > 1:
            foreign = shard_of_keys(list(keys), self.shards) != self.shard
            if foreign.any():
                k = keys[int(np.argmax(foreign))]
                raise ValueError(f"state key {k.hex()[:16]}… is not in shard {self.shard}")
        return [None if e is None else e[0] for e in self._find_states(keys)]

    def _find_txs(self, ids: Sequence[bytes]) -> list[TxEntry | None]:
        """(height, idx, pos, status) of each id, from the index buffer or SQLite."""

        def fetch(ask: list[bytes]) -> dict[bytes, TxEntry]:
            sql = "SELECT tx_id, height, idx, pos, status FROM txs WHERE tx_id IN ({})"
            return {k: (int(h), int(i), int(p), int(st)) for k, h, i, p, st in self._in(sql, ask)}

        with self._runs_checked():
            return self._buffer.find_txs(ids, fetch)

    def _find_states(self, keys: Sequence[bytes]) -> list[StateEntry | None]:
        """(value, height that wrote it) of each key, from the index buffer or SQLite."""

        def fetch(ask: list[bytes]) -> dict[bytes, StateEntry]:
            sql = "SELECT key, value, height FROM state WHERE key IN ({})"
            return {k: (bytes(v), int(h)) for k, v, h in self._in(sql, ask)}

        with self._runs_checked():
            return self._buffer.find_states(keys, fetch)

    def _in(self, sql: str, keys: list[bytes]) -> Iterator[tuple[Any, ...]]:
        """The rows a ``... IN ({})`` query finds for ``keys`` (first column: the key, as
        bytes), asked 500 keys at a time (SQLite's bound on parameters)."""
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            for row in self._db.execute(sql.format(",".join("?" * len(chunk))), chunk):
                yield (bytes(row[0]), *row[1:])

    def header(self, height: int) -> BlockHeader:
        row = self._db.execute("SELECT header FROM headers WHERE height = ?", (height,)).fetchone()
        if row is None:
            raise NotFound(f"no block at height {height} in this shard (at {self._height})")
        return BlockHeader.decode(bytes(row[0]))

    def _block_levels(self, height: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Both trees of a block, level by level (as ``(n, 32)`` arrays, hashed in one batch
        per level: a 50,000-row block's took 227 ms in a Python loop, 236 MB for 16 kept)."""
        row = self._db.execute(
            "SELECT tx_ids, results FROM leaves WHERE height = ?", (height,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no leaves of block {height} in shard {self.shard}")
        ids = np.frombuffer(bytes(row[0]), np.uint8).reshape(-1, 32)
        results = np.frombuffer(bytes(row[1]), np.uint8).reshape(-1, 32)
        return merkle_levels(ids, backend="cpu"), merkle_levels_of_leaf_hashes(results)

    def proofs(self, height: int, index: int) -> tuple[list[bytes], list[bytes]]:
        """Audit paths of transaction ``index`` of block ``height`` under its tx root and its
        result root (this shard must own the height)."""
        if shard_of_height(height, self.shards) != self.shard:
            raise ValueError(f"block {height} is not in shard {self.shard}")
        tx_levels, result_levels = self._levels(height)
        return (
            inclusion_proof_from_levels(tx_levels, index),
            inclusion_proof_from_levels(result_levels, index),
        )

    def commit_proof(self, height: int) -> tuple[list[BlockHeader], CommitProof]:
        """Headers ``height+1 .. c`` and the commit proof of ``c``, the first block at or above
        ``height`` whose commit was proven."""
        row = self._db.execute(
            "SELECT height, child, child_qc FROM commits WHERE height >= ? ORDER BY height LIMIT 1",
            (height,),
        ).fetchone()
        if row is None or height < 1:
            raise NotFound(f"no commit proof for block {height} (applied to {self._height})")
        top = int(row[0])
        headers = [self.header(h) for h in range(height, top + 1)]
        qc = self._db.execute("SELECT qc FROM headers WHERE height = ?", (top,)).fetchone()
        proof = CommitProof(
            headers[-1],
            QuorumCert.decode(bytes(qc[0])),
            BlockHeader.decode(bytes(row[1])),
            QuorumCert.decode(bytes(row[2])),
        )
        return headers, proof

    @property
    def wal_checkpoints(self) -> tuple[int, int]:
        """``(made, failed)``: the WAL checkpoints this store's thread made and those that
        raised (each logged; the next request tries again)."""
        return self._checkpointer.made, self._checkpointer.failed

    def close(self) -> None:
        checkpointer = getattr(self, "_checkpointer", None)  # absent if opening failed
        if checkpointer is not None:
            checkpointer.stop()
        self._db.close()
        self._seg.close()


class _Checkpointer:
    """A thread that checkpoints a database's WAL on request, on a connection of its own.

    First PASSIVE: the bulk of the WAL is copied without waiting for the writer or the
    readers, who go on meanwhile (SQLite's step releases the GIL). Then RESTART: the frames
    written meanwhile are copied while new writes wait (a few milliseconds), and the next
    writer starts the WAL over, so it stays about ``SHARD_CHECKPOINT_ROWS`` rows long (without
    that second pass a shard written without pause never has all of its WAL copied, and the
    WAL grows for ever). A checkpoint that raises is logged and counted, and the next request
    tries again: until then the WAL only grows."""

    def __init__(self, path: Path, name: str) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self.made = self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")  # RESTART waits for the writer's transaction
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    self._checkpoint(db)
                    self.made += 1
                except sqlite3.Error as exc:
                    self.failed += 1
                    log.warning("%s: WAL checkpoint failed (%s); retried later", self._path, exc)
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()


def assemble_receipt(
    row: dict[str, Any],
    headers: list[BlockHeader],
    commit: CommitProof,
    proofs: tuple[list[bytes], list[bytes]],
    chain_id: bytes,
) -> Receipt:
    """A ``Receipt`` from the parts two shards hold: the transaction owner's row
    (``ShardStore.get_tx``), its block's headers and commit proof (``commit_proof``), and the
    audit paths (``proofs``) from the shard that holds the block's leaves."""
    tx = Transaction(
        chain_id, row["kind"], row["sender"], row["nonce"], row["payload"], row["signature"]
    )
    return Receipt(
        tx=tx,
        height=row["height"],
        index=row["index"],
        status=row["status"],
        result=row["result"],
        tx_proof=tuple(proofs[0]),
        result_proof=tuple(proofs[1]),
        header=headers[0],
        chain=tuple(headers[1:]),
        commit=commit,
    )
