"""A mempool's journal: the rows it accepted, on its disk before it answers "accepted".

A mempool answers a submission only once the rows it accepted from it are fsynced here, so a
crash (of the actor, its process or its machine) between the answer and the commit of those
rows loses none of them: the next start of the mempool reads them back, drops those whose
sender's nonce has committed since, and admits the rest again (``Mempool._recover``). A row
that was also in a batch sealed before the crash may then be ordered twice; execution gives
the later copy ``BAD_NONCE`` and the transaction index keeps the row that counted.

Layout: ``<dir>/LOCK`` (one process at a time, see ``storage/lock.py``) and numbered segment
files ``<dir>/<n>.log``, each a run of frames ``magic "RLMJ" | u32 length | u32 CRC-32 |
Arrow IPC stream of one record batch``. Appends go to the newest segment until it passes
``segment_bytes``. Each segment counts the rows of it not yet done with (committed, or given
up on by the mempool); a segment that is not the newest is deleted when its count reaches
zero. Reading stops at the first frame that is cut short or fails its CRC (the tail of a
write a crash interrupted): what follows it was never acknowledged.

Besides the rows accepted, a frame records each batch sealed (``note_sealed``: its digest
and its rows' ids, in order), so that a restarted mempool announces the very batches it had
sealed (the validators that hold one drop it at once, by its digest) rather than sealing their
rows anew, which would order them twice. A seal record counts as one live entry of its
segment until its batch is done with.

Appends are written at once (``write``) and made durable in groups: every ``sync`` waits for
one fsync that covers everything written before it, and calls arriving while an fsync runs
share the next one, so a burst of small submissions costs a few fsyncs, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rayledger.actors.storage.lock import LOCK_WAIT_S, hold_lock, release_lock
from rayledger.errors import LedgerError
from rayledger.tx import batch_from_ipc, fixed_rows

log = logging.getLogger(__name__)

MAGIC = b"RLMJ"
# A seal record is a batch of one ``tx_id`` column whose schema carries the batch's digest
SEALED_KEY = b"rayledger.journal.sealed"
_HEADER = struct.Struct(">4sII")
SEGMENT_BYTES = 64 << 20
_SUFFIX = ".log"


def encode_frame(batch: pa.RecordBatch) -> tuple[bytes, pa.Buffer]:
    """A frame's header and body (written together, not joined: no copy of the body)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    body = sink.getvalue()
    return _HEADER.pack(MAGIC, body.size, zlib.crc32(body)), body


def read_frames(data: bytes) -> tuple[list[pa.RecordBatch], str | None]:
    """The batches of a segment's bytes, in order, and why reading stopped early (None: it
    read to the end)."""
    out: list[pa.RecordBatch] = []
    at = 0
    while at < len(data):
        if len(data) - at < _HEADER.size:
            return out, "a frame header cut short"
        magic, length, crc = _HEADER.unpack_from(data, at)
        if magic != MAGIC:
            return out, f"no frame at byte {at}"
        body = data[at + _HEADER.size : at + _HEADER.size + length]
        if len(body) < length:
            return out, "a frame cut short"
        if zlib.crc32(body) != crc:
            return out, f"a frame at byte {at} fails its CRC"
        try:
            out.append(batch_from_ipc(body))
        except LedgerError as exc:
            return out, f"a frame at byte {at} does not decode ({exc})"
        at += _HEADER.size + length
    return out, None


def _fsync_all(fds: list[int], directory: Path | None) -> None:
    """fsync and close every descriptor (each closed whatever happens), then the directory."""
    failed: OSError | None = None
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed = failed or exc
        finally:
            os.close(fd)
    if failed is not None:
        raise failed
    if directory is not None:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Journal:
    """The journal in ``path`` (created if missing), held by this process until ``close``.
    The batches found there at opening are ``recovered``, and the seal records ``sealed``
    ((digest, ``(n, 32)`` ids)), each oldest first; their segments stay until
    ``drop_recovered``."""

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        segment_bytes: int = SEGMENT_BYTES,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self.path = path
        self.what = what
        self.segment_bytes = segment_bytes
        self._lock = hold_lock(path / "LOCK", what, lock_wait_s)
        self.recovered: list[pa.RecordBatch] = []
        self.sealed: list[tuple[bytes, np.ndarray]] = []
        self.recovered_rows = 0
        self.torn: list[str] = []  # where reading a segment stopped early, and why
        self._old: list[Path] = []
        newest = 0
        for seg in self._segments():
            self._old.append(seg)
            newest = max(newest, int(seg.stem))
            batches, stopped = read_frames(seg.read_bytes())
            if stopped is not None:
                self.torn.append(f"{seg.name}: {stopped}")
                log.warning("%s: journal %s: read stopped at %s", what, seg.name, stopped)
            for batch in batches:
                meta = batch.schema.metadata or {}
                if SEALED_KEY in meta:
                    try:
                        digest = bytes.fromhex(meta[SEALED_KEY].decode())
                        if batch.schema.types != [pa.binary(32)] or len(digest) != 32:
                            raise ValueError(batch.schema)
                        self.sealed.append((digest, fixed_rows(batch.column(0), 32).copy()))
                    except ValueError:  # not a record of ours: its rows are sealed anew
                        self.torn.append(f"{seg.name}: a malformed seal record")
                    continue
                self.recovered.append(batch)
                self.recovered_rows += batch.num_rows
        self.segment = newest  # the next write opens segment newest + 1
        self._fd: int | None = None
        # Segments rotated out whose writes no fsync has covered yet (the next one does, in
        # its thread: a rotation never fsyncs on the caller's event loop)
        self._retired: list[int] = []
        self._dir_synced = True  # whether the directory's entries are durable
        self._dir_epoch = 0  # segments opened so far (an fsync vouches only for its own)
        # The first fsync failure: every later ``sync`` raises it (after a failed fsync the
        # kernel may have dropped the pages; a later fsync that succeeds proves nothing)
        self.failed: OSError | None = None
        self._size = 0
        self._live: dict[int, int] = {}  # rows not yet done with, per segment
        self._written = 0  # appends written, and those an fsync has covered
        self._synced = 0
        self._syncing: asyncio.Task[None] | None = None
        self.fsyncs = 0
        self.deleted = 0
        if not self.recovered:
            # Seal records alone (their batches' rows were done with, or their segments
            # would be here) and torn tails (never acknowledged): nothing to admit again
            self.drop_recovered()

    def _segments(self) -> list[Path]:
        found = [p for p in self.path.glob(f"*{_SUFFIX}") if p.stem.isdigit()]
        return sorted(found, key=lambda p: int(p.stem))

    def _file(self, n: int) -> Path:
        return self.path / f"{n:08d}{_SUFFIX}"

    def write(self, batch: pa.RecordBatch) -> int:
        """Append ``batch`` (written, not yet durable: ``sync``) and count its rows live;
        returns the segment it went to. An ``OSError`` (a full disk) leaves the journal as it
        was: the caller keeps nothing of the batch."""
        return self._append(batch, batch.num_rows)

    def note_sealed(self, digest: bytes, ids: np.ndarray) -> int:
        """Record that the rows with these ids (``(n, 32)``, in the batch's order) were sealed
        into batch ``digest``; one live entry of the segment returned, until done with."""
        column = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(32), len(ids), [None, pa.py_buffer(np.ascontiguousarray(ids))]
        )
        schema = pa.schema([pa.field("tx_id", pa.binary(32))], {SEALED_KEY: digest.hex()})
        return self._append(pa.RecordBatch.from_arrays([column], schema=schema), 1)

    def _append(self, batch: pa.RecordBatch, live: int) -> int:
        header, body = encode_frame(batch)
        size = len(header) + body.size
        if self.failed is not None:
            raise self.failed
        if self._fd is None or (self._size and self._size + size > self.segment_bytes):
            self._rotate()
        assert self._fd is not None
        try:
            # A regular file takes it whole, or fails (a full disk may take part of it)
            if os.writev(self._fd, [header, memoryview(body)]) != size:
                raise OSError(errno.ENOSPC, f"{self.path}: a journal write was cut short")
        except OSError:
            # Cut the partial frame off, so later appends do not follow a torn one
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += size
        self._written += 1
        self._live[self.segment] = self._live.get(self.segment, 0) + live
        return self.segment

    def _rotate(self) -> None:
        """Open the next segment; its directory entry, and what the one before still holds
        unsynced, are made durable by the next ``sync``. The one before is deleted at once if
        none of its rows is live (and then not fsynced). Opened first: where that fails (no
        descriptors, a full disk), the journal is as it was and the caller's append is
        refused."""
        fd = os.open(self._file(self.segment + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        old, self._fd = self._fd, fd
        self.segment += 1
        self._size = 0
        self._dir_synced = False
        self._dir_epoch += 1
        if old is None:
            return
        if self._live.get(self.segment - 1):
            self._retired.append(old)
        else:  # nothing in it is needed any more: no fsync owed
            os.close(old)
            self._delete(self.segment - 1)

    async def sync(self) -> None:
        """Return once everything written before this call is on the disk (an fsync failure
        raises ``OSError``, and so does every call after it)."""
        target = self._written
        while self._synced < target:
            if self.failed is not None:
                raise self.failed
            if self._syncing is None:
                self._syncing = asyncio.get_running_loop().create_task(self._fsync())
            await asyncio.shield(self._syncing)

    async def _fsync(self) -> None:
        """One fsync covering every write so far: of the segments rotated out since the last
        one, of the newest, and of the directory where a segment was opened since. All is
        taken in one step before the thread runs, so that what it covers is exactly the
        writes counted in ``upto``."""
        try:
            upto, with_dir, epoch = self._written, not self._dir_synced, self._dir_epoch
            fds, self._retired = self._retired, []
            if self._fd is not None:
                # A descriptor of its own: a rotation or ``done`` meanwhile closes the journal's
                fds.append(os.dup(self._fd))
            if fds or with_dir:
                try:
                    await asyncio.to_thread(_fsync_all, fds, self.path if with_dir else None)
                except OSError as exc:
                    self.failed = exc
                    raise
                self.fsyncs += 1
                # Unless another segment was opened meanwhile: its entry is not covered
                if with_dir and epoch == self._dir_epoch:
                    self._dir_synced = True
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def done(self, rows: dict[int, int]) -> None:
        """Rows of these segments (segment -> count) are done with: committed, or given up.
        A segment goes when none of its rows is left; the newest too (the next write opens
        another), so that a restart finds only rows not yet done with."""
        for seg, n in rows.items():
            left = self._live.get(seg, 0) - n
            if left > 0:
                self._live[seg] = left
                continue
            self._live.pop(seg, None)
            if seg == self.segment and self._fd is not None:
                os.close(self._fd)  # an fsync running meanwhile has a descriptor of its own
                self._fd = None
            self._delete(seg)

    def _delete(self, seg: int) -> None:
        self._unlink(self._file(seg))

    def _unlink(self, segment: Path) -> None:
        """Delete a segment done with. One that cannot be (a read-only or failing disk) is
        left, and read again at the next start (its rows' nonces have committed: dropped)."""
        try:
            segment.unlink()
            self.deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: journal %s not deleted: %s", self.what, segment.name, exc)

    def drop_recovered(self) -> None:
        """The recovered batches are admitted again (journaled anew) or known to be
        committed: their segments go."""
        for seg in self._old:
            self._unlink(seg)
        self._old = []
        self.recovered = []
        self.sealed = []

    def status(self) -> dict[str, Any]:
        return {
            "segments": len(self._segments()),
            # Rows accepted, and seal records, not yet done with
            "live_entries": sum(self._live.values()),
            "recovered_rows": self.recovered_rows,
            "torn": list(self.torn),
            "fsyncs": self.fsyncs,
            "deleted_segments": self.deleted,
        }

    def close(self) -> None:
        for fd in [*self._retired, *([self._fd] if self._fd is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired = []
        self._fd = None
        release_lock(self._lock)
