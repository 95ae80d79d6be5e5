"""A validator's committed state on its own disk, so that its memory does not grow with the state.

Execution reads the committed state through ``CommittedState``, the base of every view the
validator executes on: the writes of the blocks committed since its last checkpoint are held in
memory (the newest value of each key, and the height that wrote it); everything older is read
from ``state.db``, an SQLite file in WAL mode:

    state(key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID
    meta(height, hash): the block whose state the table holds (one row)
    prefixes(prefix): the kinds of key (their first 4 bytes) the table holds

A checkpoint writes the blocks up to a height in one SQLite transaction, with that height and
block hash, so the file always holds the state exactly as of one committed block: a crash
leaves the last checkpoint whole, and a restart re-executes the stored chain above it. A
checkpoint is written by a thread on a connection of its own while the event loop goes on
reading (WAL readers see the last committed checkpoint; the blocks being written stay in
memory until it commits, then leave it).

The file is this validator's derived data, like the snapshot it replaces: one that does not
name a block its store holds at that height is emptied, and the chain re-executed from
genesis.

A Bloom filter of the keys the file holds (``KeyFilter``, in memory, built from the file when
it is opened and kept up by every checkpoint) lets a read ahead skip the keys the file cannot
hold: a block of new anchors names hundreds of digests no one anchored before, and once
anchors reach the file each of them would otherwise be looked up there (about 2 µs a key on
the development machine, in ``IN`` lists: near the rest of the block's execution).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np

from rayledger.execution import StateView

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (one INTEGER PRIMARY KEY CHECK (one = 1),
                                 height INTEGER NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS prefixes (prefix BLOB PRIMARY KEY) WITHOUT ROWID;
"""
# Keys are named by a 4-byte kind ("anc:", "non:", "bal:"): a key of a kind the file holds
# none of is not looked up there (until anchors first reach the disk, a new anchor costs no
# read of it)
PREFIX = 4
# Keys per query when reading ahead (below SQLite's limit of bound parameters)
_IN_LIST = 900
_NOT_READ = object()


class KeyFilter:
    """A Bloom filter of byte-string keys: ``may_hold`` is true for every key added (and for a
    few percent of the others while no more than ``capacity`` keys were added).

    Blocked: each key sets and tests ``HASHES`` bits of one 64-bit word, so asking about a
    key costs one memory access wherever the filter is (a plain filter's seven accesses per
    key cost more than the lookups it saves once it outgrows the caches). The word and the
    bits come from Python's own hash of the key, which is keyed per process (SipHash): nobody
    can choose keys that all look held, so a filter lives in one process and is built there
    (``build``)."""

    HASHES = 7  # bits per key, each named by 6 bits of the hash
    BITS_PER_KEY = 10
    MIN_CAPACITY = 1 << 16
    MAX_WORDS = 1 << (64 - 6 * HASHES)  # the hash bits left to name a word

    def __init__(self, capacity: int) -> None:
        self.capacity = max(self.MIN_CAPACITY, capacity)
        words = 1 << (-(-self.capacity * self.BITS_PER_KEY // 64) - 1).bit_length()
        words = min(words, self.MAX_WORDS)
        self._mask = np.uint64(words - 1)
        self._words = np.zeros(words, np.uint64)
        self._shifts = (64 - 6 * (1 + np.arange(self.HASHES))).astype(np.uint64)
        self.count = 0  # keys added (a key added twice counts twice: a bound)

    @classmethod
    def build(cls, db: sqlite3.Connection) -> KeyFilter:
        """A filter of every key of ``db``'s state table, with room for as many again."""
        (rows,) = db.execute("SELECT count(*) FROM state").fetchone()
        out = cls(2 * int(rows))
        cursor = db.execute("SELECT key FROM state")
        while chunk := cursor.fetchmany(1 << 16):
            out.add([bytes(r[0]) for r in chunk])
        return out

    def _locate(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Each key's word (the hash's low bits) and its bits in it (the top 42 bits, six at a
        time)."""
        h = np.fromiter(map(hash, keys), np.int64, len(keys)).view(np.uint64)
        bits = np.left_shift(np.uint64(1), (h[:, None] >> self._shifts) & np.uint64(63))
        return h & self._mask, np.bitwise_or.reduce(bits, axis=1)

    def add(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        word, bits = self._locate(keys)
        np.bitwise_or.at(self._words, word, bits)
        self.count += len(keys)

    def may_hold(self, keys: Sequence[bytes]) -> np.ndarray:
        """A boolean per key: False where the key was certainly never added."""
        if not keys:
            return np.zeros(0, np.bool_)
        word, bits = self._locate(keys)
        return (self._words[word] & bits) == bits


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # A checkpoint must be durable once it is the state restarts begin from
    db.execute("PRAGMA synchronous=FULL")
    # Pages of the key B-tree stay cached between checkpoints and reads (64 MiB)
    db.execute("PRAGMA cache_size=-65536")
    return db


def _write(
    db: sqlite3.Connection,
    height: int,
    block_hash: bytes,
    rows: list[tuple[bytes, bytes]],
    *,
    replace_all: bool,
) -> set[bytes]:
    """Write ``rows`` (in key order) as the state at ``height``, in one transaction, with
    the kinds of key they hold; ``replace_all``: instead of everything the file held. Returns
    those kinds."""
    kinds = {k[:PREFIX] for k, _ in rows}
    db.execute("BEGIN IMMEDIATE")
    try:
        if replace_all:
            db.execute("DELETE FROM state")
            db.execute("DELETE FROM prefixes")
        db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", rows)
        db.executemany("INSERT OR IGNORE INTO prefixes VALUES (?)", [(k,) for k in kinds])
        db.execute("INSERT OR REPLACE INTO meta VALUES (1, ?, ?)", (height, block_hash))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return kinds


class CommittedState(StateView):
    """The committed state: the blocks since the last checkpoint in memory, the rest on disk.

    ``absorb`` takes each committed block's writes in height order; ``begin_checkpoint``
    hands out what a checkpoint writes (``write_checkpoint``, on any thread) and
    ``end_checkpoint`` lets it leave memory once written.
    """

    __slots__ = (
        "path",
        "height",
        "block_hash",
        "_db",
        "_writer",
        "_recent",
        "_layers",
        "_writing",
        "_on_disk",
        "_ahead",
        "_filter",
        "_grown",
        "read_ahead",
    )

    def __init__(self, path: Path) -> None:
        # StateView's own __init__ would give it a dict of writes, which it has not (mypy does
        # not see the inherited slot)
        self.parent = None  # type: ignore[misc]
        self.path = Path(path)
        self._db = _connect(self.path)
        self._db.executescript(_SCHEMA)
        # The checkpoints' own connection (one checkpoint at a time, on any thread)
        self._writer = _connect(self.path)
        row = self._db.execute("SELECT height, hash FROM meta WHERE one = 1").fetchone()
        # The block whose state the file holds (0 and no hash: nothing checkpointed yet)
        self.height: int = 0 if row is None else int(row[0])
        self.block_hash: bytes | None = None if row is None else bytes(row[1])
        # key -> (newest value, the height that wrote it), for blocks above the checkpoint
        self._recent: dict[bytes, tuple[bytes, int]] = {}
        # height -> that block's writes, in height order
        self._layers: dict[int, dict[bytes, bytes]] = {}
        self._writing: int | None = None  # the height of a checkpoint being written
        self._on_disk = {bytes(r[0]) for r in self._db.execute("SELECT prefix FROM prefixes")}
        if not self._on_disk and self._db.execute("SELECT 1 FROM state LIMIT 1").fetchone():
            # Rows but no record of their kinds (a file from before the record): read them once
            self._on_disk = {
                bytes(r[0])
                for r in self._db.execute(f"SELECT DISTINCT substr(key, 1, {PREFIX}) FROM state")
            }
            self._db.executemany(
                "INSERT OR IGNORE INTO prefixes VALUES (?)", [(k,) for k in self._on_disk]
            )
        # Keys read ahead for the block being executed: key -> value, None where absent
        self._ahead: dict[bytes, bytes | None] = {}
        # The keys the file holds (a Bloom filter), and a bigger one a checkpoint built
        self._filter = KeyFilter.build(self._db)
        self._grown: KeyFilter | None = None
        # Keys read ahead, and of those the ones looked up in the file (the filter's yield)
        self.read_ahead = [0, 0]

    # ---- reads (StateView) -------------------------------------------------------------------

    @property  # type: ignore[override]
    def writes(self) -> dict[bytes, bytes]:
        raise TypeError("the committed state is not one dict in memory: use get and absorb")

    def get(self, key: bytes) -> bytes | None:
        hit = self._recent.get(key)
        if hit is not None:
            return hit[0]
        if key[:PREFIX] not in self._on_disk:
            return None
        ahead = self._ahead.get(key, _NOT_READ)
        if ahead is not _NOT_READ:
            return ahead  # type: ignore[return-value]
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def present(self, keys: Collection[bytes]) -> set[bytes]:
        """The keys of ``keys`` the committed state holds (``StateView.present``): memory by
        set operations, then the file for the kinds it holds, from what ``prefetch`` read
        where it read them (a lookup each for any other key)."""
        rest = keys if isinstance(keys, set) else set(keys)
        found = self._recent.keys() & rest  # values are (bytes, height): held
        on_disk = self._on_disk
        rest = {k for k in rest - found if k[:PREFIX] in on_disk}
        if not rest:
            return found
        ahead = self._ahead
        read = ahead.keys() & rest
        found |= {k for k in read if ahead[k] is not None}
        for k in rest - read:
            if self.get(k) is not None:
                found.add(k)
        return found

    def prefetch(self, keys: Collection[bytes]) -> None:
        """Read the keys a block may read, in a few queries (an ``IN`` list costs a third of
        one lookup a key here); what was read ahead for the previous block is dropped. Values
        read ahead stay valid: memory is consulted first, and a checkpoint only moves values
        from memory to the file unchanged."""
        on_disk, recent = self._on_disk, self._recent
        wanted = [k for k in keys if k[:PREFIX] in on_disk and k not in recent]
        ahead: dict[bytes, bytes | None] = dict.fromkeys(wanted)  # None: absent
        held = self._filter.may_hold(wanted)
        todo = wanted if held.all() else [wanted[i] for i in np.flatnonzero(held).tolist()]
        self.read_ahead[0] += len(wanted)
        self.read_ahead[1] += len(todo)
        for s in range(0, len(todo), _IN_LIST):
            part = todo[s : s + _IN_LIST]
            query = f"SELECT key, value FROM state WHERE key IN ({','.join('?' * len(part))})"
            for k, v in self._db.execute(query, part):
                ahead[bytes(k)] = bytes(v)
        self._ahead = ahead

    def set(self, key: bytes, value: bytes) -> None:
        raise TypeError("the committed state changes only by whole committed blocks (absorb)")

    def child(self) -> StateView:
        return StateView(self)

    # ---- commits ------------------------------------------------------------------------------

    @property
    def top(self) -> int:
        """The height of the newest block absorbed (the checkpoint's when none is held)."""
        return next(reversed(self._layers)) if self._layers else self.height

    @property
    def held_entries(self) -> int:
        """Entries held in memory (the writes of the blocks above the checkpoint)."""
        return len(self._recent)

    @property
    def held_blocks(self) -> int:
        return len(self._layers)

    def absorb(self, height: int, writes: dict[bytes, bytes]) -> None:
        """Fold the writes of committed block ``height`` (the next one) into the state."""
        if height != self.top + 1:
            raise ValueError(f"block {height} does not follow the committed state at {self.top}")
        layer = dict(writes)
        self._ahead = {}  # read before this block: may be stale now
        self._layers[height] = layer
        # Each key's newest value and the height that wrote it (no Python step per entry)
        self._recent.update(zip(layer, zip(layer.values(), repeat(height)), strict=True))

    def seed(self, height: int, block_hash: bytes, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the whole file by ``entries``, as the state at ``height`` (genesis, or an
        older form of this validator's state); nothing may be held in memory."""
        if self._layers or self._writing is not None:
            raise ValueError("the state holds blocks: it cannot be seeded")
        kinds = _write(self._db, height, block_hash, sorted(entries), replace_all=True)
        self.height, self.block_hash, self._on_disk = height, block_hash, kinds
        self._filter, self._ahead = KeyFilter.build(self._db), {}

    def begin_checkpoint(
        self, upto: int, block_hash: bytes
    ) -> tuple[int, bytes, list[dict[bytes, bytes]]] | None:
        """What a checkpoint of the blocks up to ``upto`` (whose hash is ``block_hash``)
        writes, or None when there is nothing to write or a checkpoint is being written."""
        if self._writing is not None or upto <= self.height:
            return None
        if upto > self.top:
            raise ValueError(f"block {upto} is not committed here (top {self.top})")
        self._writing = upto
        layers = [layer for h, layer in self._layers.items() if h <= upto]
        return upto, block_hash, layers

    def write_checkpoint(self, job: tuple[int, bytes, list[dict[bytes, bytes]]]) -> None:
        """Write a checkpoint in one transaction, on a connection of its own (any thread)."""
        upto, block_hash, layers = job
        merged: dict[bytes, bytes] = {}
        for layer in layers:  # in height order: a later block's value replaces
            merged.update(layer)
        # In key order: each B-tree page is visited once, not once per key
        _write(self._writer, upto, block_hash, sorted(merged.items()), replace_all=False)
        if self._filter.count + len(merged) > self._filter.capacity:
            # Past the filter's room: a bigger one of the whole file, built here (off the
            # event loop), that ``end_checkpoint`` puts in place. The checkpoint is written
            # whatever happens here: without the bigger filter the old one takes the keys
            # (it answers for all of them, with more false positives)
            try:
                self._grown = KeyFilter.build(self._writer)
            except sqlite3.Error as exc:
                log.warning("state: the key filter could not grow (%s); keeping the old one", exc)

    def end_checkpoint(self, upto: int, block_hash: bytes, written: bool) -> None:
        """The checkpoint begun for ``upto`` finished (``written``) or failed: its blocks
        leave memory only if it was written."""
        if self._writing != upto:
            raise ValueError(f"no checkpoint of {upto} is being written")
        self._writing = None
        grown, self._grown = self._grown, None
        if not written:
            return
        recent, on_disk = self._recent, self._on_disk
        self._ahead = {}
        to_file: list[bytes] = []
        for h in [h for h in self._layers if h <= upto]:
            layer = self._layers.pop(h)
            to_file.extend(layer)
            for k in layer:
                on_disk.add(k[:PREFIX])
                hit = recent.get(k)
                if hit is not None and hit[1] <= upto:
                    del recent[k]
        # The file's keys reach the filter in the same call that takes them out of memory
        # (a grown filter was built from the file after this checkpoint's write: it holds
        # them already)
        if grown is not None:
            self._filter = grown
        else:
            self._filter.add(to_file)
        self.height, self.block_hash = upto, block_hash

    def checkpoint_now(self, upto: int, block_hash: bytes) -> None:
        """A checkpoint written here and now (a restart's replay, tests)."""
        job = self.begin_checkpoint(upto, block_hash)
        if job is None:
            return
        try:
            self.write_checkpoint(job)
        except BaseException:
            self.end_checkpoint(upto, block_hash, written=False)
            raise
        self.end_checkpoint(upto, block_hash, written=True)

    def entries(self) -> dict[bytes, bytes]:
        """The whole state as a dict (tests and audits: it reads every row)."""
        out = {bytes(k): bytes(v) for k, v in self._db.execute("SELECT key, value FROM state")}
        for k, (v, _) in self._recent.items():
            out[k] = v
        return out

    def close(self) -> None:
        self._db.close()
        self._writer.close()
