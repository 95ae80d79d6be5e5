"""Hostile bytes and objects at the decoders that face the outside (a Byzantine peer, a
malicious client, a corrupt file): each gets the project's own error and changes nothing;
no struct/Arrow/ValueError leaks out, and no length or compression field makes the reader
allocate far more than it was given. (Findings of a fuzzing pass; see the commit message.)"""

from __future__ import annotations

import array
import pickle
import struct

import numpy as np
import pyarrow as pa
import pytest

from rayledger.actors.mempool import decode_batch_frame, encode_batch_frame
from rayledger.block import QuorumCert
from rayledger.chain import admit_batch, batch_digest
from rayledger.codec import Reader
from rayledger.consensus.wire import decode_message, decode_messages
from rayledger.crypto import key_from_seed
from rayledger.errors import DecodeError, LedgerError, SchemaMismatch
from rayledger.tx import batch_from_ipc, batch_to_ipc, decode_tx, make_batch, validate_batch

CHAIN = bytes(range(32))
KEY = key_from_seed(b"\x01" * 32)


def good_batch(n: int = 3) -> pa.RecordBatch:
    return make_batch(KEY, 1, range(n), [b"p%d" % i * (i + 1) for i in range(n)], CHAIN)


def stream(batches: list[pa.RecordBatch], **options: object) -> bytes:
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(**options)  # type: ignore[arg-type]
    with pa.ipc.new_stream(sink, batches[0].schema, options=opts) as writer:
        for b in batches:
            writer.write_batch(b)
    return bytes(sink.getvalue().to_pybytes())


# ---- flatbuffer patching, to build what no Arrow writer here emits ---------------------------


def _field(meta: bytearray, table: int, index: int) -> int:
    vtable = table - struct.unpack_from("<i", meta, table)[0]
    offset = struct.unpack_from("<H", meta, vtable + 4 + 2 * index)[0]
    assert offset, "field absent"
    return table + offset


def _deref(meta: bytearray, pos: int) -> int:
    return pos + int(struct.unpack_from("<I", meta, pos)[0])


def _patched(data: bytes, patch: object) -> bytes:
    """``data`` with ``patch(message_type, metadata, header_table)`` applied in place to each
    message's flatbuffer metadata (same length, so the stream's framing holds)."""
    out = bytearray(data)
    for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(data)):
        meta = bytearray(message.metadata.to_pybytes())
        at = bytes(out).find(bytes(meta))
        header = _deref(meta, _field(meta, _deref(meta, 0), 2))
        patch(message.type, meta, header)  # type: ignore[operator]
        out[at : at + len(meta)] = meta
    return bytes(out)


def aliased_columns(columns: int, size: int) -> bytes:
    """Two record batches of ``columns`` binary columns, every one pointing at the same
    ``size`` body bytes: a few MB of stream that concatenating would copy once per column."""
    cols = [pa.array([b"x" * size])] + [pa.array([b""])] * (columns - 1)
    batch = pa.RecordBatch.from_arrays(cols, names=[f"c{i}" for i in range(columns)])

    def patch(kind: str, meta: bytearray, table: int) -> None:
        if kind != "record batch":
            return
        first = _deref(meta, _field(meta, table, 2)) + 4  # buffers: validity, offsets, values
        for i in range(1, columns):
            meta[first + 48 * i + 16 : first + 48 * i + 48] = meta[first + 16 : first + 48]

    return _patched(stream([batch, batch]), patch)


def big_endian(data: bytes) -> bytes:
    """The stream with its schema marked big-endian (the endianness slot of the Schema
    table pointed at a nonzero short): the reader would swap every buffer into a copy."""

    def patch(kind: str, meta: bytearray, table: int) -> None:
        if kind == "schema":
            vtable = table - struct.unpack_from("<i", meta, table)[0]
            struct.pack_into("<H", meta, vtable + 4, 4)

    return _patched(data, patch)


# ---- Arrow IPC: batch_from_ipc and the batch frame --------------------------------------------


def test_a_well_formed_stream_still_reads() -> None:
    batch = good_batch(5)
    for b in (batch, batch.slice(1, 3), batch.slice(0, 0)):
        assert batch_from_ipc(batch_to_ipc(b)).equals(b)
    assert batch_from_ipc(stream([batch, batch])).num_rows == 10
    frame = encode_batch_frame(bytes(32), 4, None, batch_to_ipc(batch))
    assert decode_batch_frame(frame, max_rows=5)[3].equals(batch)


def test_a_compressed_stream_is_refused_before_it_inflates() -> None:
    # 8 MB of payload in a few hundred bytes: a 32 MB frame would have inflated to ~1 TB
    batch = good_batch(1)
    cols = [
        c if n != "payload" else pa.array([bytes(8 << 20)])
        for n, c in zip(batch.schema.names, batch.columns, strict=True)
    ]
    data = stream([pa.RecordBatch.from_arrays(cols, schema=batch.schema)], compression="zstd")
    assert len(data) < 4096
    with pytest.raises(DecodeError, match="compressed record batch"):
        batch_from_ipc(data)
    with pytest.raises(ValueError, match="compressed record batch"):
        decode_batch_frame(encode_batch_frame(bytes(32), 1, None, data), max_rows=100)


def test_dictionary_batches_are_refused() -> None:
    # Delta dictionaries are concatenated anew for each batch: memory quadratic in the stream
    schema = pa.schema([pa.field("payload", pa.dictionary(pa.int32(), pa.binary()))])
    values: list[bytes] = []
    batches = []
    for i in range(4):
        values.append(b"%d" % i * 10)
        arr = pa.DictionaryArray.from_arrays(pa.array([i], pa.int32()), pa.array(values))
        batches.append(pa.RecordBatch.from_arrays([arr], schema=schema))
    with pytest.raises(DecodeError, match="dictionary batch"):
        batch_from_ipc(stream(batches, emit_dictionary_deltas=True))
    with pytest.raises(DecodeError, match="dictionary batch"):
        batch_from_ipc(stream(batches[:1]))


def test_a_big_endian_schema_is_refused() -> None:
    data = big_endian(batch_to_ipc(good_batch()))
    with pytest.raises(DecodeError, match="big-endian"):
        batch_from_ipc(data)


def test_buffers_shared_between_columns_are_refused_before_concatenation() -> None:
    data = aliased_columns(200, 20_000)
    assert len(data) < 200_000  # would have become 8 MB once combined
    with pytest.raises(DecodeError, match="claims"):
        batch_from_ipc(data, max_rows=100)
    with pytest.raises(ValueError, match="claims"):
        decode_batch_frame(encode_batch_frame(bytes(32), 1, None, data), max_rows=100)


def test_mutated_ipc_streams_raise_only_ledger_errors() -> None:
    batch = good_batch()
    digest = batch_digest(batch)
    raw = batch_to_ipc(batch)
    seen = 0
    # Every truncation, and every byte set to 0xEF (one makes the payload's offsets buffer
    # a size that is no multiple of 4, which Arrow's validation lets through)
    mutants = [raw[:i] for i in range(len(raw))]
    mutants += [raw[:i] + b"\xef" + raw[i + 1 :] for i in range(len(raw)) if raw[i] != 0xEF]
    for data in mutants:
        try:
            got = batch_from_ipc(data, max_rows=100)
            admit_batch(got, digest, chain_id=CHAIN, max_payload=4096)
        except LedgerError:
            seen += 1
    assert seen > len(raw)


def test_a_batch_frame_that_is_not_bytes_is_a_value_error() -> None:
    for data in ("x" * 100, None, [0] * 50, 7):
        with pytest.raises(ValueError, match="batch frame is bytes"):
            decode_batch_frame(data)  # type: ignore[arg-type]


def test_a_batch_frame_of_no_rows_or_of_unusable_columns_is_a_value_error() -> None:
    empty = good_batch().slice(0, 0)
    with pytest.raises(ValueError, match="holds no rows"):
        decode_batch_frame(encode_batch_frame(batch_digest(empty), 1, None, batch_to_ipc(empty)))
    # A stream of a schema alone, with a union column (also nested): Arrow cannot build its
    # empty batch (ArrowNotImplementedError escaped before)
    union = pa.sparse_union([pa.field("a", pa.int8()), pa.field("b", pa.binary())])
    for column in (union, pa.struct([pa.field("u", union)]), pa.list_(union)):
        sink = pa.BufferOutputStream()
        pa.ipc.new_stream(sink, pa.schema([pa.field("x", column)])).close()
        body = sink.getvalue().to_pybytes()
        with pytest.raises(DecodeError, match="unusable columns"):
            batch_from_ipc(body)
        with pytest.raises(ValueError, match="unusable columns"):
            decode_batch_frame(encode_batch_frame(bytes(32), 1, None, body))


def _padded(ipc: bytes, pad: int) -> bytes:
    """``ipc`` with each record batch's body ``pad`` bytes longer (its body length raised in
    the message's flatbuffer, zeros after its buffers): the same rows, read as before."""
    out, pos = bytearray(), 0
    for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(ipc)):
        meta = message.metadata.to_pybytes()
        at = ipc.find(meta, pos)
        end = at + len(meta) + message.body.size
        if message.type == "record batch":
            m = bytearray(meta)
            root = struct.unpack_from("<I", m, 0)[0]
            vtable = root - struct.unpack_from("<i", m, root)[0]
            body_length = root + struct.unpack_from("<H", m, vtable + 4 + 2 * 3)[0]
            struct.pack_into("<q", m, body_length, message.body.size + pad)
            out += ipc[pos:at] + m + ipc[at + len(meta) : end] + bytes(pad)
        else:
            out += ipc[pos:end]
        pos = end
    return bytes(out + ipc[pos:])


def test_a_batch_padded_far_past_its_rows_is_copied_out_of_its_frame() -> None:
    """Read zero-copy, a one-row batch held until it commits kept its whole frame in memory:
    a peer sending 16 MiB frames of one row each pinned 16 MiB per row."""
    batch = good_batch(1)
    for pad in (0, 1 << 20):
        frame = encode_batch_frame(batch_digest(batch), 1, None, _padded(batch_to_ipc(batch), pad))
        _, _, _, got = decode_batch_frame(frame, max_rows=10)
        assert got.equals(batch)
        start = pa.py_buffer(frame).address
        inside = [
            b is not None and start <= b.address < start + len(frame)
            for column in got.columns
            for b in column.buffers()
        ]
        assert any(inside) if pad == 0 else not any(inside), pad


# ---- validate_batch on objects a peer or client hands over (Ray unpickles them) --------------


def _unvalidated_payload(batch: pa.RecordBatch, buffers: list[pa.Buffer | None]) -> pa.RecordBatch:
    """``batch`` with a payload column built from raw buffers, as pickle restores one (Arrow
    checks sizes there, not the offsets' order)."""
    payload = pa.lib._restore_array((pa.binary(), batch.num_rows, 0, 0, buffers, [], None))
    cols = [
        c if n != "payload" else payload
        for n, c in zip(batch.schema.names, batch.columns, strict=True)
    ]
    return pickle.loads(pickle.dumps(pa.RecordBatch.from_arrays(cols, schema=batch.schema)))


def test_payload_offsets_a_client_crafted_are_a_schema_mismatch() -> None:
    batch = good_batch()
    values = batch.column("payload").buffers()[2]
    decreasing = pa.py_buffer(np.array([0, 3, 1, 6], np.int32).tobytes())
    odd_size = pa.py_buffer(np.array([0, 2, 6, 12], np.int32).tobytes() + b"\x00")
    empty = good_batch().slice(0, 0)
    for hostile in (
        _unvalidated_payload(batch, [None, decreasing, values]),
        _unvalidated_payload(batch, [None, odd_size, values]),
        _unvalidated_payload(empty, [None, pa.py_buffer(b""), pa.py_buffer(b"")]),
    ):
        with pytest.raises(SchemaMismatch, match="column payload"):
            validate_batch(hostile, chain_id=CHAIN)
        with pytest.raises(SchemaMismatch):
            admit_batch(hostile, bytes(32), chain_id=CHAIN, max_payload=4096)


def test_what_is_not_a_record_batch_is_a_schema_mismatch() -> None:
    batch = good_batch()
    for hostile in (pa.Table.from_batches([batch]), None, "batch", batch.column("payload")):
        with pytest.raises(SchemaMismatch, match="record batch"):
            validate_batch(hostile, chain_id=CHAIN)  # type: ignore[arg-type]


# ---- the canonical codec on buffers of wider items -------------------------------------------


def test_buffers_of_wider_items_are_read_as_bytes() -> None:
    words = np.zeros(8, np.uint32)  # 32 bytes, 8 items: every length used to count items
    assert Reader(words, "x").remaining == 32
    for data in (words, memoryview(array.array("I", [0] * 8))):
        with pytest.raises(DecodeError):
            decode_messages(data)  # type: ignore[arg-type]
        with pytest.raises(DecodeError):
            decode_message(data)  # type: ignore[arg-type]
        with pytest.raises(DecodeError):
            decode_tx(data)  # type: ignore[arg-type]
    strided = np.zeros((4, 80), np.uint8)[:, ::2]
    for fn in (decode_message, decode_tx, QuorumCert.decode):
        with pytest.raises(DecodeError, match="contiguous"):
            fn(strided)  # type: ignore[operator]
