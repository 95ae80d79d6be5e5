"""The block store: append-only Arrow IPC block segments with an SQLite index.

Layout under the store's directory::

    index.sqlite           WAL-mode SQLite: height -> (segment, offset, length),
                           tx_id -> (height, index)
    segments/00000000.seg  frames, one per block, appended in height order

A frame is ``magic "RLB1" | body_len u64 | body | SHA-256(body)`` where the body is
``height u64 | header (u32-prefixed) | parent QC (u32-prefixed) | Arrow IPC stream of the rows``.

Durability order for ``append``: the frame is written and fsynced, then the index rows are
committed (SQLite ``synchronous=FULL``), and only then does ``append`` return. So every
acknowledged block is in both places. On open every indexed frame is re-read and verified
(checksum, header hash, hash chain, tx and result roots); any mismatch raises
``StoreCorruption`` naming the height and file. A store opened ``verify_from_mark`` (a validator
restarting) verifies only the frames above its verified mark, which every append moves; every
read still checks its frame's checksum. Bytes after the last indexed frame were never
acknowledged: a complete, valid next block there is indexed (its append was interrupted between
the two steps), anything else is moved aside to a ``.torn`` file and listed in ``recovery``,
never deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayledger.block import (
    BLOCK_ROW_SCHEMA,
    RESULT_FIELDS,
    Block,
    BlockHeader,
    QuorumCert,
    check_block,
)
from rayledger.codec import Reader
from rayledger.errors import (
    InvalidBlock,
    LedgerError,
    NotFound,
    StoreCorruption,
    StoreError,
)
from rayledger.execution import Status
from rayledger.tx import TX_SCHEMA, tx_ids_of

log = logging.getLogger(__name__)

MAGIC = b"RLB1"
_PREFIX = struct.Struct(">4sQ")
_CHECKSUM = 32
DEFAULT_SEGMENT_BYTES = 256 * 1024 * 1024

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height   INTEGER PRIMARY KEY,
    hash     BLOB NOT NULL UNIQUE,
    segment  INTEGER NOT NULL,
    offset   INTEGER NOT NULL,
    length   INTEGER NOT NULL,
    tx_count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS txs (
    tx_id  BLOB PRIMARY KEY,
    height INTEGER NOT NULL,
    idx    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commit_proofs (
    height INTEGER PRIMARY KEY,
    proof  BLOB NOT NULL
);
"""

# A height keeps the first commit proof stored for it
_INSERT_PROOF = "INSERT OR IGNORE INTO commit_proofs (height, proof) VALUES (?, ?)"


@dataclass(frozen=True)
class TxLocation:
    height: int
    index: int


def encode_frame(block: Block) -> bytes:
    sink = pa.BufferOutputStream()
    rows = block.rows()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_batch(rows)
    header = block.header.encode()
    qc = block.parent_qc.encode()
    body = b"".join(
        [
            struct.pack(">QI", block.height, len(header)),
            header,
            struct.pack(">I", len(qc)),
            qc,
            sink.getvalue().to_pybytes(),
        ]
    )
    return _PREFIX.pack(MAGIC, len(body)) + body + hashlib.sha256(body).digest()


def decode_frame_body(body: memoryview) -> tuple[int, BlockHeader, QuorumCert, pa.RecordBatch]:
    r = Reader(body, "block frame")
    height = r.u64("height")
    header = BlockHeader.decode(r.fixed(r.u32("header length"), "header"))
    qc = QuorumCert.decode(r.fixed(r.u32("qc length"), "parent qc"))
    table = pa.ipc.open_stream(pa.py_buffer(body[len(body) - r.remaining :])).read_all()
    if table.schema.remove_metadata() != BLOCK_ROW_SCHEMA:
        raise InvalidBlock(f"height {height}: stored rows do not have the block row schema")
    batches = table.combine_chunks().to_batches()
    rows = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=BLOCK_ROW_SCHEMA)
    return height, header, qc, rows


def split_rows(rows: pa.RecordBatch, chain_id: bytes) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    meta = {b"rayledger.chain_id": chain_id.hex().encode()}
    txs = pa.RecordBatch.from_arrays(
        [rows.column(f.name) for f in TX_SCHEMA], schema=TX_SCHEMA.with_metadata(meta)
    )
    results = pa.RecordBatch.from_arrays(
        [rows.column(f.name) for f in RESULT_FIELDS], schema=pa.schema(RESULT_FIELDS)
    )
    return txs, results


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: a temporary file, fsync, rename, fsync of the
    directory. A crash leaves the old content or the new one, never a mix."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class BlockStore:
    """Durable, verified storage of one chain's committed blocks (single writer, thread-safe).

    ``genesis`` fixes the chain: a store opened with another chain's genesis refuses to open.
    """

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` holds a block store (opening one where none is creates it)."""
        return (path / "index.sqlite").is_file() and (path / "segments").is_dir()

    def __init__(
        self,
        path: str | os.PathLike[str],
        genesis: BlockHeader,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        verify_on_open: bool = True,
        verify_from_mark: bool = False,
        index_txs: bool = True,
        read_only: bool = False,
        _after_segment_write: Callable[[int], None] | None = None,
    ) -> None:
        """``index_txs``: keep the tx id -> (height, index) index here. A validator whose
        storage shards keep the (partitioned) transaction index creates its store without it;
        the choice is fixed when the store is created.

        ``verify_from_mark``: re-verify on open only the frames above the verified mark (the
        last block appended or verified at an open), so that opening a long chain costs what
        was written since, not the whole chain; the index is still checked for gaps, and every
        frame read later is checked against its checksum. A store whose mark does not match
        its index is verified in full.

        ``read_only`` (`rayledger store verify`): an existing store is verified as it is and
        nothing is written: no index created or marked, and what an open for writing would
        recover after the last indexed frame (a block to index, bytes to set aside) is only
        listed in ``recovery``. ``StoreError`` where no store is; ``StoreCorruption`` for an
        index that is not an SQLite database of this layout."""
        self.path = Path(path)
        self.read_only = read_only
        self.genesis = genesis
        self.segment_bytes = segment_bytes
        self.recovery: list[str] = []
        self._after_segment_write = _after_segment_write
        self._lock = threading.RLock()
        self._maps: dict[int, pa.MemoryMappedFile] = {}
        if read_only:
            self._db = self._open_read_only()
        else:
            (self.path / "segments").mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path / "index.sqlite", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA_SQL)
        self._check_genesis()
        self.index_txs = self._tx_index_setting(index_txs)
        self._head = genesis
        self._tail: tuple[int, int] = (0, 0)  # (segment, end offset) of the last indexed frame
        self._open_chain(verify_on_open, verify_from_mark)
        self._recover_tail()

    # ---- opening ---------------------------------------------------------------------------

    def _open_read_only(self) -> sqlite3.Connection:
        index = self.path / "index.sqlite"
        if not self.exists(self.path):
            raise StoreError(f"no block store in {self.path} (index.sqlite and segments/)")
        # Without a write-ahead log beside it (a store closed cleanly) the index is read as
        # immutable: a read-only open of a WAL database would create its -shm and -wal files.
        # With one (a writer that crashed, or is running), read through it, read only.
        wal = index.with_name(index.name + "-wal").exists()
        db = sqlite3.connect(
            f"{index.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}", uri=True,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreCorruption(f"not an index: {exc}", height=None, path=str(index)) from None
        if not {"meta", "blocks"} <= tables:
            db.close()
            raise StoreCorruption(
                "not an index: no meta and blocks tables", height=None, path=str(index)
            )
        return db

    def _check_genesis(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'genesis'").fetchone()
        if row is None and self.read_only:
            raise StoreCorruption(
                "the index names no genesis", height=None, path=str(self.path / "index.sqlite")
            )
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('genesis', ?)", (self.genesis.encode(),)
            )
            return
        stored = BlockHeader.decode(row[0])
        # Verify the store belongs to this chain
        if stored.hash != self.genesis.hash:
            raise StoreError(
                f"{self.path} holds chain {stored.chain_id.hex()[:16]}..., "
                f"not {self.genesis.chain_id.hex()[:16]}..."
            )

    def _tx_index_setting(self, wanted: bool) -> bool:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'tx_index'").fetchone()
        if row is None and self.read_only:
            return wanted
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('tx_index', ?)", (b"1" if wanted else b"0",)
            )
            return wanted
        return bytes(row[0]) == b"1"

    def _segment_path(self, segment: int) -> Path:
        return self.path / "segments" / f"{segment:08d}.seg"

    def _read_frame(self, segment: int, offset: int, length: int, height: int | None) -> memoryview:
        """The verified body of one indexed frame, or ``StoreCorruption``."""
        path = self._segment_path(segment)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreCorruption(
                "segment file is missing", height=height, path=str(path)
            ) from None
        if offset + length > size:
            raise StoreCorruption(
                f"segment is truncated: frame needs bytes up to {offset + length}, file has {size}",
                height=height,
                path=str(path),
            )
        mm = self._maps.get(segment)
        if mm is None or mm.size() < offset + length:
            mm = self._maps[segment] = pa.memory_map(str(path))
        frame = memoryview(mm.read_at(length, offset))
        body = self._frame_body(frame)
        if body is None:
            raise StoreCorruption("frame fails its checksum", height=height, path=str(path))
        return body

    @staticmethod
    def _frame_body(frame: memoryview) -> memoryview | None:
        if len(frame) < _PREFIX.size + _CHECKSUM:
            return None
        magic, body_len = _PREFIX.unpack(frame[: _PREFIX.size])
        if magic != MAGIC or _PREFIX.size + body_len + _CHECKSUM != len(frame):
            return None
        body = frame[_PREFIX.size : _PREFIX.size + body_len]
        if hashlib.sha256(body).digest() != bytes(frame[-_CHECKSUM:]):
            return None
        return body

    def _decode_checked(
        self, body: memoryview, parent: BlockHeader, height: int, path: Path
    ) -> Block:
        try:
            frame_height, header, qc, rows = decode_frame_body(body)
            if frame_height != height:
                raise InvalidBlock(f"frame holds height {frame_height}, expected {height}")
            txs, results = split_rows(rows, header.chain_id)
            block = Block(header, txs, results, qc)
            check_block(block, parent)
        except (LedgerError, pa.ArrowException) as exc:
            raise StoreCorruption(str(exc), height=height, path=str(path)) from exc
        return block

    def _mark(self) -> BlockHeader | None:
        """The verified mark's block when it is one the index holds without gaps below it (its
        frame checked against its checksum), else ``None``. Sets the tail to its frame."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'verified'").fetchone()
        if row is None or len(row[0]) != 40:
            return None
        height, block_hash = struct.unpack(">Q32s", row[0])
        count, low, high = self._db.execute(
            "SELECT count(*), min(height), max(height) FROM blocks WHERE height <= ?", (height,)
        ).fetchone()
        if height == 0 or count != height or low != 1 or high != height:
            return None  # a full verification names what is wrong
        segment, offset, length = self._location(height)
        header = self._load(height)[0]
        if header.hash != block_hash:
            return None
        self._tail = (segment, offset + length)
        return header

    def _set_mark(self, header: BlockHeader, cur: sqlite3.Cursor | None = None) -> None:
        (cur or self._db).execute(
            "INSERT INTO meta (key, value) VALUES ('verified', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (struct.pack(">Q32s", header.height, header.hash),),
        )

    def _open_chain(self, verify: bool, from_mark: bool = False) -> None:
        parent = (self._mark() if from_mark else None) or self.genesis
        rows = self._db.execute(
            "SELECT height, hash, segment, offset, length FROM blocks WHERE height > ? "
            "ORDER BY height",
            (parent.height,),
        ).fetchall()
        for height, block_hash, segment, offset, length in rows:
            path = self._segment_path(segment)
            if height != parent.height + 1:
                raise StoreCorruption(
                    f"index skips from height {parent.height} to {height}",
                    height=height,
                    path=str(self.path / "index.sqlite"),
                )
            if verify:
                body = self._read_frame(segment, offset, length, height)
                header = self._decode_checked(body, parent, height, path).header
            else:
                header = self.get_header(height)
            # Verify the frame is the block the index acknowledged
            if header.hash != block_hash:
                raise StoreCorruption(
                    "block hash differs from the index", height=height, path=str(path)
                )
            parent = header
            self._tail = (segment, offset + length)
        self._head = parent
        if verify and parent.height and not self.read_only:
            self._set_mark(parent)

    def _recover_tail(self) -> None:
        """Index complete next blocks left by an interrupted append; set torn bytes aside."""
        segment, end = self._tail
        while (path := self._segment_path(segment)).exists():
            with open(path, "rb") as f:
                f.seek(end)
                tail = memoryview(f.read())
            pos = 0
            while pos < len(tail):
                length = self._complete_frame_length(tail[pos:])
                body = self._frame_body(tail[pos : pos + length]) if length else None
                height = self._head.height + 1
                try:
                    block = self._decode_checked(body, self._head, height, path) if body else None
                except StoreCorruption:
                    block = None
                if block is None or length is None:
                    if self.read_only:
                        self.recovery.append(
                            f"{len(tail) - pos} unacknowledged bytes after the last block in "
                            f"{path.name}: its next open for writing moves them aside"
                        )
                        break
                    self._quarantine(path, end + pos, end + len(tail))
                    break
                if self.read_only:
                    self.recovery.append(
                        f"height {height} complete in {path.name} after an interrupted append,"
                        " not indexed: its next open for writing indexes it"
                    )
                    self._head = block.header
                else:
                    self._index(block, segment, end + pos, length)
                    self.recovery.append(
                        f"indexed height {height}, found complete in {path.name} after an "
                        "interrupted append"
                    )
                pos += length
            segment, end = segment + 1, 0

    @staticmethod
    def _complete_frame_length(data: memoryview) -> int | None:
        if len(data) < _PREFIX.size:
            return None
        magic, body_len = _PREFIX.unpack(data[: _PREFIX.size])
        total = _PREFIX.size + body_len + _CHECKSUM
        if magic != MAGIC or total > len(data):
            return None
        return int(total)

    def _quarantine(self, path: Path, start: int, size: int) -> None:
        aside = path.with_name(f"{path.name}.torn-{start}")
        with open(path, "rb") as src, open(aside, "wb") as dst:
            src.seek(start)
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
        with open(path, "r+b") as f:
            f.truncate(start)
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
        self._maps.pop(int(path.stem), None)
        msg = (
            f"{size - start} unacknowledged bytes after the last block in {path.name} "
            f"moved to {aside.name}"
        )
        log.warning(msg)
        self.recovery.append(msg)

    # ---- writing ---------------------------------------------------------------------------

    @property
    def head(self) -> BlockHeader:
        return self._head

    @property
    def height(self) -> int:
        return self._head.height

    def append(
        self, block: Block, *, verify: bool = True, commit_proof: bytes | None = None
    ) -> None:
        """Store the next block; durable on disk when this returns. ``commit_proof``: the
        encoded proof that this block is committed, kept in the same index transaction (as
        ``put_commit_proofs`` would, one durable write fewer).

        Raises ``InvalidBlock`` (and changes nothing) if the block does not extend the head,
        or fails its roots. A transaction id stored before may appear again (a replayed
        copy, which execution marks BAD_NONCE); the tx index keeps the row that counted.
        """
        with self._lock:
            if verify:
                check_block(block, self._head)
            elif block.header.parent_hash != self._head.hash:
                raise InvalidBlock(f"height {block.height} does not extend the stored head")
            ids = tx_ids_of(block.txs)
            frame = encode_frame(block)
            segment, end = self._tail
            if end > 0 and end + len(frame) > self.segment_bytes:
                segment, end = segment + 1, 0
            path = self._segment_path(segment)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.lseek(fd, end, os.SEEK_SET)
                os.write(fd, frame)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(path.parent)
            if self._after_segment_write is not None:
                self._after_segment_write(block.height)
            self._index(block, segment, end, len(frame), ids, commit_proof)

    def _index(
        self,
        block: Block,
        segment: int,
        offset: int,
        length: int,
        ids: np.ndarray | None = None,
        commit_proof: bytes | None = None,
    ) -> None:
        if ids is None:
            ids = tx_ids_of(block.txs)
        raw = ids.tobytes()
        h = block.height
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "INSERT INTO blocks (height, hash, segment, offset, length, tx_count) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (h, block.hash, segment, offset, length, block.header.tx_count),
            )
            # A transaction id can be ordered again (a client replays it through another
            # mempool): execution gives the copy BAD_NONCE, and the index keeps pointing at
            # the row that consumed the nonce, which is the one its receipt is about.
            if self.index_txs:
                statuses = block.results.column("status").to_numpy(zero_copy_only=False)
                cur.executemany(
                    "INSERT INTO txs (tx_id, height, idx) VALUES (?, ?, ?) "
                    "ON CONFLICT (tx_id) DO UPDATE SET height = excluded.height, "
                    "idx = excluded.idx WHERE ?",
                    (
                        (raw[i * 32 : (i + 1) * 32], h, i, int(statuses[i]) != Status.BAD_NONCE)
                        for i in range(len(ids))
                    ),
                )
            if commit_proof is not None:
                cur.execute(_INSERT_PROOF, (h, commit_proof))
            # Appended blocks were checked (or built) by the writer: the mark moves with them
            self._set_mark(block.header, cur)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        self._head = block.header
        self._tail = (segment, offset + length)

    # ---- commit proofs ---------------------------------------------------------------------

    def put_commit_proofs(self, proofs: Sequence[tuple[int, bytes]]) -> None:
        """Keep the encoded proofs that blocks at these (stored) heights are committed, in one
        durable transaction; a height already holding one keeps it."""
        with self._lock:
            if any(not 0 < h <= self._head.height for h, _ in proofs):
                raise InvalidBlock(f"commit proof for a height not stored (head {self.height})")
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(_INSERT_PROOF, proofs)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def commit_proofs(self, low: int, high: int) -> list[tuple[int, bytes]]:
        """The stored commit proofs with ``low <= height <= high``, in height order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT height, proof FROM commit_proofs WHERE height BETWEEN ? AND ? "
                "ORDER BY height",
                (low, high),
            ).fetchall()
        return [(int(h), bytes(p)) for h, p in rows]

    # ---- reading ---------------------------------------------------------------------------

    def _location(self, height: int) -> tuple[int, int, int]:
        row = self._db.execute(
            "SELECT segment, offset, length FROM blocks WHERE height = ?", (height,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no block at height {height} (head is {self._head.height})")
        return int(row[0]), int(row[1]), int(row[2])

    def _load(self, height: int) -> tuple[BlockHeader, QuorumCert, pa.RecordBatch]:
        segment, offset, length = self._location(height)
        body = self._read_frame(segment, offset, length, height)
        try:
            _, header, qc, rows = decode_frame_body(body)
        except (LedgerError, pa.ArrowException) as exc:
            raise StoreCorruption(
                str(exc), height=height, path=str(self._segment_path(segment))
            ) from exc
        return header, qc, rows

    def get_header(self, height: int) -> BlockHeader:
        if height == 0:
            return self.genesis
        with self._lock:
            return self._load(height)[0]

    def get_block(self, height: int) -> Block:
        with self._lock:
            header, qc, rows = self._load(height)
        txs, results = split_rows(rows, header.chain_id)
        return Block(header, txs, results, qc)

    def height_of(self, block_hash: bytes) -> int:
        row = self._db.execute("SELECT height FROM blocks WHERE hash = ?", (block_hash,)).fetchone()
        if row is None:
            raise NotFound(f"no block with hash {block_hash.hex()}")
        return int(row[0])

    def locate_tx(self, tx_id: bytes) -> TxLocation:
        if not self.index_txs:
            raise StoreError(f"{self.path} keeps no transaction index (its storage shards do)")
        row = self._db.execute("SELECT height, idx FROM txs WHERE tx_id = ?", (tx_id,)).fetchone()
        if row is None:
            raise NotFound(f"no committed transaction {tx_id.hex()}")
        return TxLocation(int(row[0]), int(row[1]))

    def get_tx(self, tx_id: bytes) -> tuple[TxLocation, pa.RecordBatch]:
        """The location and the one stored row (transaction and result) of a transaction."""
        loc = self.locate_tx(tx_id)
        with self._lock:
            rows = self._load(loc.height)[2]
        return loc, rows.slice(loc.index, 1)

    def iter_rows(
        self, from_height: int = 1, to_height: int | None = None
    ) -> Iterator[tuple[BlockHeader, pa.RecordBatch]]:
        last = self._head.height if to_height is None else min(to_height, self._head.height)
        for height in range(max(1, from_height), last + 1):
            with self._lock:
                header, _, rows = self._load(height)
            yield header, rows

    def scan(
        self,
        columns: Sequence[str] | None = None,
        from_height: int = 1,
        to_height: int | None = None,
    ) -> pa.Table:
        """Committed rows of heights ``from_height..to_height`` (inclusive) as one Arrow table,
        with ``height`` and ``index`` columns prepended."""
        names = list(columns) if columns is not None else BLOCK_ROW_SCHEMA.names
        unknown = [c for c in names if c not in BLOCK_ROW_SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; stored: {BLOCK_ROW_SCHEMA.names}")
        fields = [pa.field("height", pa.uint64(), False), pa.field("index", pa.uint32(), False)]
        schema = pa.schema(fields + [BLOCK_ROW_SCHEMA.field(c) for c in names])
        parts = []
        for header, rows in self.iter_rows(from_height, to_height):
            n = rows.num_rows
            parts.append(
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(np.full(n, header.height, np.uint64)),
                        pa.array(np.arange(n, dtype=np.uint32)),
                        *[rows.column(c) for c in names],
                    ],
                    schema=schema,
                )
            )
        return pa.Table.from_batches(parts, schema=schema)

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
            self._db.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
