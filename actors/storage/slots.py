"""A small record rewritten often and durably: two slot files, written in turn.

A validator persists its safety state before every vote. Replacing a file durably (a
temporary file, fsync, rename, fsync of the directory) costs two fsyncs; under load on the
development machine that was about 7.5 ms per vote, on the event loop, before the vote could
leave. Here each write goes to the slot not holding the newest record, in place, with one
fsync:

    <name>.0, <name>.1    sequence u64 | length u32 | body | SHA-256(sequence | length | body)

Reading takes the valid slot with the highest sequence. A write torn by a crash fails its
checksum and the other slot, the record before it, is read; that write never returned, so
nothing that depended on it (a vote) left. A slot's first record is written whole under
another name and renamed, so a slot that exists held a whole record once. A write of a
shorter record leaves old bytes after it; the length and checksum make them irrelevant.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from rayledger.actors.storage.engine import _fsync_dir
from rayledger.errors import StoreCorruption

_HEAD = struct.Struct(">QI")
_SUM = 32


class SlotFile:
    def __init__(self, folder: Path, name: str, legacy: Path | None = None) -> None:
        """``legacy``: a whole-file record from before the slots (read while no slot holds
        one)."""
        self.paths = (folder / f"{name}.0", folder / f"{name}.1")
        self.legacy = legacy
        self._seq: int | None = None  # the newest sequence written or read

    def _slot(self, path: Path) -> tuple[int, bytes] | None:
        """(sequence, body) of a slot; ``None`` if it is absent or does not hold a whole,
        valid record (``read`` judges what that means)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _HEAD.size + _SUM:
            return None
        seq, length = _HEAD.unpack_from(data)
        end = _HEAD.size + length
        if end + _SUM > len(data):
            return None
        if hashlib.sha256(data[:end]).digest() != data[end : end + _SUM]:
            return None
        return seq, data[_HEAD.size : end]

    def read(self) -> bytes | None:
        """The newest record, or ``None`` if none was ever written. ``StoreCorruption`` if
        slot files exist but none holds a valid record (never an empty answer then: for a
        validator that would mean forgetting its votes)."""
        found = [s for s in (self._slot(p) for p in self.paths) if s is not None]
        if found:
            seq, body = max(found)
            self._seq = seq
            return body
        present = [p for p in self.paths if p.exists()]
        if present:
            raise StoreCorruption(
                "no valid record in either slot", height=None, path=str(present[0])
            )
        self._seq = 0
        if self.legacy is not None and self.legacy.exists():
            return self.legacy.read_bytes()
        return None

    def write(self, body: bytes) -> None:
        """Make ``body`` the newest record, durably (one fsync; the slot's directory too the
        first time the slot is created)."""
        if self._seq is None:
            self.read()
        seq = (self._seq or 0) + 1
        path = self.paths[seq % 2]
        head = _HEAD.pack(seq, len(body))
        record = head + body + hashlib.sha256(head + body).digest()
        if path.exists():
            _write_synced(path, record, os.O_WRONLY)
        else:
            # A slot's first record is written whole under another name and then renamed: a
            # crash in it leaves no slot, where a torn one would be the only slot and read
            # as damage (a validator killed in its first vote could not start again)
            part = path.with_name(path.name + ".part")
            _write_synced(part, record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.replace(part, path)
            _fsync_dir(path.parent)
        self._seq = seq


def _write_synced(path: Path, record: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        if os.pwrite(fd, record, 0) != len(record):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)
