"""Transactions: the canonical byte layout, signing, and the columnar TxBatch.

Canonical bytes (big-endian)::

    version u8 | chain_id 32B | kind u16 | sender 32B | nonce u64 | payload_len u32 | payload

``tx_id = SHA-256(canonical bytes)`` and the sender signs the 32-byte ``tx_id`` with Ed25519.
A signed transaction on the wire is the canonical bytes followed by the 64-byte signature.

In bulk a transaction is a row of a TxBatch, an Arrow record batch with ``TX_SCHEMA``; the
chain id is batch-level and travels in the schema metadata. Ids are always recomputed from
the row's content: a ``tx_id`` column supplied by someone else is never trusted.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

import numpy as np
import pyarrow as pa

from rayledger.codec import Reader, fixed, pack_rows
from rayledger.crypto import SigningKey, public_bytes, small_order_mask
from rayledger.errors import (
    DecodeError,
    PayloadTooLarge,
    SchemaMismatch,
    UnknownKind,
    UnknownVersion,
    WrongChain,
    WrongLength,
)
from rayledger.kernels import (
    as_offsets_and_values,
    ed25519_verify_batch,
    sha256_rows,
)

TX_VERSION = 1
DEFAULT_MAX_PAYLOAD = 64 * 1024
_HEADER = struct.Struct(">B32sH32sQI")
HEADER_SIZE = _HEADER.size  # 79
CHAIN_ID_KEY = b"rayledger.chain_id"


class TxKind(IntEnum):
    """The e-service transaction kinds (the ``kind`` field); execution rules come per kind."""

    TRANSFER = 1
    ANCHOR = 2
    IDENTITY = 3
    PROVENANCE = 4
    VOTE = 5


# The kinds ledger/execution.py executes. A batch holding another is refused whole at every
# admission (``validate_batch``: a mempool's, and each validator's of a peer's batch), so no
# row of a kind nobody executes is ordered or stored; the executor's UNSUPPORTED_KIND stays
# for blocks stored before this check.
EXECUTED_KINDS = (TxKind.TRANSFER, TxKind.ANCHOR)

BODY_FIELDS = (
    pa.field("kind", pa.uint16(), nullable=False),
    pa.field("sender", pa.binary(32), nullable=False),
    pa.field("nonce", pa.uint64(), nullable=False),
    pa.field("payload", pa.binary(), nullable=False),
    pa.field("signature", pa.binary(64), nullable=False),
)
TX_ID_FIELD = pa.field("tx_id", pa.binary(32), nullable=False)
TX_SCHEMA = pa.schema([*BODY_FIELDS, TX_ID_FIELD])
_WIDTHS = {"sender": 32, "signature": 64, "tx_id": 32}


@dataclass(frozen=True)
class Transaction:
    """One transaction, for single submissions and receipts (bulk paths use TxBatch)."""

    chain_id: bytes
    kind: int
    sender: bytes
    nonce: int
    payload: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        fixed(self.chain_id, 32, "chain_id")
        fixed(self.sender, 32, "sender")
        if self.signature:
            fixed(self.signature, 64, "signature")
        if not 0 <= self.kind < 1 << 16:
            raise WrongLength(f"kind {self.kind} does not fit in u16")
        if not 0 <= self.nonce < 1 << 64:
            raise WrongLength(f"nonce {self.nonce} does not fit in u64")

    @cached_property
    def canonical(self) -> bytes:
        return encode_tx(self.chain_id, self.kind, self.sender, self.nonce, self.payload)

    @cached_property
    def tx_id(self) -> bytes:
        return hashlib.sha256(self.canonical).digest()

    def encode(self) -> bytes:
        """Wire form: canonical bytes followed by the signature."""
        if not self.signature:
            raise ValueError("transaction is not signed")
        return self.canonical + self.signature


def encode_tx(chain_id: bytes, kind: int, sender: bytes, nonce: int, payload: bytes) -> bytes:
    """The canonical bytes whose SHA-256 is the transaction id."""
    return _HEADER.pack(TX_VERSION, chain_id, kind, sender, nonce, len(payload)) + payload


def sign_tx(key: SigningKey, chain_id: bytes, kind: int, nonce: int, payload: bytes) -> Transaction:
    unsigned = Transaction(chain_id, kind, public_bytes(key), nonce, payload)
    return Transaction(chain_id, kind, unsigned.sender, nonce, payload, key.sign(unsigned.tx_id))


def decode_tx(
    data: bytes,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    chain_id: bytes | None = None,
) -> Transaction:
    """Parse a signed transaction in wire form; every malformation raises its own error."""
    r = Reader(data, "transaction")
    version = r.u8("version")
    # Verify the layout version before reading fields whose meaning depends on it
    if version != TX_VERSION:
        raise UnknownVersion(f"transaction version {version} (supported: {TX_VERSION})")
    tx_chain = r.fixed(32, "chain_id")
    if chain_id is not None and tx_chain != chain_id:
        raise WrongChain(f"transaction is for chain {tx_chain.hex()[:16]}..., not this chain")
    kind = r.u16("kind")
    sender = r.fixed(32, "sender")
    nonce = r.u64("nonce")
    payload_len = r.u32("payload_len")
    # Verify the declared payload size before reading it
    if payload_len > max_payload:
        raise PayloadTooLarge(f"payload of {payload_len} bytes exceeds the maximum {max_payload}")
    payload = r.fixed(payload_len, "payload")
    signature = r.fixed(64, "signature")
    r.finish()
    return Transaction(tx_chain, kind, sender, nonce, payload, signature)


# ---- TxBatch ---------------------------------------------------------------------------------


def fixed_rows(col: pa.Array, width: int) -> np.ndarray:
    """A zero-copy ``(n, width)`` view of a fixed-size binary column (its offset respected)."""
    values, _ = as_offsets_and_values(col)
    return values.reshape(-1, width) if len(values) else np.empty((0, width), np.uint8)


def batch_chain_id(batch: pa.RecordBatch, chain_id: bytes | None = None) -> bytes:
    """The batch's chain id from its metadata, checked against ``chain_id`` when given."""
    meta = batch.schema.metadata or {}
    raw = meta.get(CHAIN_ID_KEY)
    declared = None
    if raw:
        try:
            declared = bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DecodeError("chain id in batch metadata is not hex") from None
    if declared is not None and len(declared) != 32:
        raise WrongLength("chain id in batch metadata must be 32 bytes")
    if chain_id is None:
        if declared is None:
            raise WrongChain("batch names no chain id and none was given")
        return declared
    fixed(chain_id, 32, "chain_id")
    if declared is not None and declared != chain_id:
        raise WrongChain(f"batch is for chain {declared.hex()[:16]}..., not this chain")
    return chain_id


def _with_chain(schema: pa.Schema, chain_id: bytes) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[CHAIN_ID_KEY] = chain_id.hex().encode()
    return schema.with_metadata(meta)


def _canonical_headers(
    batch: pa.RecordBatch, chain_id: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's 79-byte canonical header, built column-wise, and the payload buffers."""
    n = batch.num_rows
    kinds = batch.column("kind").to_numpy(zero_copy_only=False).astype(">u2")
    nonces = batch.column("nonce").to_numpy(zero_copy_only=False).astype(">u8")
    pvalues, poffsets = as_offsets_and_values(batch.column("payload"))
    header = np.empty((n, HEADER_SIZE), np.uint8)
    header[:, 0] = TX_VERSION
    header[:, 1:33] = np.frombuffer(chain_id, np.uint8)
    header[:, 33:35] = kinds.view(np.uint8).reshape(n, 2)
    header[:, 35:67] = fixed_rows(batch.column("sender"), 32)
    header[:, 67:75] = nonces.view(np.uint8).reshape(n, 8)
    header[:, 75:79] = np.diff(poffsets).astype(">u4").view(np.uint8).reshape(n, 4)
    return header, pvalues, poffsets


def canonical_buffer(batch: pa.RecordBatch, chain_id: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Every row's canonical bytes laid end to end, built column-wise: ``(values, offsets)``."""
    return pack_rows(*_canonical_headers(batch, chain_id))


def compute_tx_ids(
    batch: pa.RecordBatch, chain_id: bytes | None = None, backend: str = "auto"
) -> np.ndarray:
    """The ``(n, 32) uint8`` transaction ids of a batch, recomputed from its content."""
    header, pvalues, poffsets = _canonical_headers(batch, batch_chain_id(batch, chain_id))
    return sha256_rows(header, (pvalues, poffsets), backend=backend)


def _fsb(rows: np.ndarray, width: int) -> pa.FixedSizeBinaryArray:
    flat = np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(rows), [None, pa.py_buffer(flat)]
    )


_sign_pool: ThreadPoolExecutor | None = None


def _sign_rows(keys: Sequence[SigningKey], ids: np.ndarray) -> np.ndarray:
    def run(start: int, stop: int) -> bytes:
        return b"".join([keys[i].sign(ids[i].tobytes()) for i in range(start, stop)])

    n = len(keys)
    global _sign_pool
    if _sign_pool is None:
        _sign_pool = ThreadPoolExecutor(thread_name_prefix="ed25519-sign")
    step = max(1024, -(-n // (_sign_pool._max_workers or 1)))
    parts = list(_sign_pool.map(lambda s: run(s, min(s + step, n)), range(0, n, step)))
    return np.frombuffer(b"".join(parts), np.uint8).reshape(n, 64)


def make_batch(
    signers: SigningKey | Sequence[SigningKey],
    kinds: int | Sequence[int] | np.ndarray,
    nonces: Sequence[int] | np.ndarray,
    payloads: Sequence[bytes] | pa.Array,
    chain_id: bytes,
) -> pa.RecordBatch:
    """Build and sign a TxBatch: row i is signed by ``signers[i]`` (or by one signer for all)."""
    fixed(chain_id, 32, "chain_id")
    nonce_arr = np.asarray(nonces, dtype=np.uint64)
    n = len(nonce_arr)
    keys: Sequence[SigningKey] = [signers] * n if isinstance(signers, SigningKey) else signers
    kind_arr = (
        np.full(n, kinds, np.uint16) if isinstance(kinds, int) else np.asarray(kinds, np.uint16)
    )
    payload_arr = payloads if isinstance(payloads, pa.Array) else pa.array(payloads, pa.binary())
    if not (len(keys) == len(kind_arr) == len(payload_arr) == n):
        raise ValueError("signers, kinds, nonces and payloads must have the same length")
    pub_cache: dict[int, bytes] = {}
    senders = np.empty((n, 32), np.uint8)
    for i, key in enumerate(keys):
        pub = pub_cache.get(id(key))
        if pub is None:
            pub = pub_cache[id(key)] = public_bytes(key)
        senders[i] = np.frombuffer(pub, np.uint8)
    unsigned = pa.RecordBatch.from_arrays(
        [
            pa.array(kind_arr, pa.uint16()),
            _fsb(senders, 32),
            pa.array(nonce_arr, pa.uint64()),
            payload_arr.cast(pa.binary()),
        ],
        schema=pa.schema(BODY_FIELDS[:4]),
    )
    ids = compute_tx_ids(unsigned, chain_id)
    sigs = _sign_rows(keys, ids) if n else np.empty((0, 64), np.uint8)
    return pa.RecordBatch.from_arrays(
        [*unsigned.columns, _fsb(sigs, 64), _fsb(ids, 32)], schema=_with_chain(TX_SCHEMA, chain_id)
    )


def compact_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` in buffers holding only its own rows. A slice shares its parent's buffers,
    and pickling (every Ray call and object) sends them whole: a 1,000-row slice of a
    100,000-row batch travels as the 100,000 rows. Only such a view is copied."""
    if batch.get_total_buffer_size() <= batch.nbytes + batch.nbytes // 4 + 4096:
        return batch
    return _copied(batch)


def _copied(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` in buffers of its own (freshly allocated, holding its rows only)."""
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([column]) for column in batch.columns], schema=batch.schema
    )


def validate_batch(
    batch: pa.RecordBatch,
    *,
    chain_id: bytes,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> pa.RecordBatch:
    """Check a submitted batch's shape and return it in canonical form with its derived ids.

    Rejects missing or extra columns, wrong types or widths, nulls, oversize payloads and a
    foreign chain id. Any supplied ``tx_id`` column is replaced by ids recomputed here. The
    result owns its buffers (``compact_batch``).
    """
    if not isinstance(batch, pa.RecordBatch):
        raise SchemaMismatch(f"a TxBatch is an Arrow record batch, not {type(batch).__name__}")
    names = [f.name for f in BODY_FIELDS]
    got = [f.name for f in batch.schema if f.name != "tx_id"]
    # Verify the batch has exactly the TxBatch columns, each once
    if len(set(batch.schema.names)) != len(batch.schema.names):
        raise SchemaMismatch(f"batch repeats a column: {batch.schema.names}")
    if sorted(got) != sorted(names):
        raise SchemaMismatch(f"batch columns {got} differ from {names} (plus optional tx_id)")
    for field in [*BODY_FIELDS, TX_ID_FIELD]:
        if field.name not in batch.schema.names:
            continue
        actual = batch.schema.field(field.name).type
        if actual == field.type:
            continue
        width = _WIDTHS.get(field.name)
        if width is not None and pa.types.is_fixed_size_binary(actual):
            raise WrongLength(f"column {field.name} has width {actual.byte_width}, not {width}")
        raise SchemaMismatch(f"column {field.name} has type {actual}, not {field.type}")
    for name in batch.schema.names:
        if batch.column(name).null_count:
            raise SchemaMismatch(f"column {name} contains nulls")
    chain = batch_chain_id(batch, chain_id)
    kinds = batch.column("kind").to_numpy(zero_copy_only=False)
    unknown = ~np.isin(kinds, np.array(EXECUTED_KINDS, np.uint16))
    if unknown.any():
        row = int(np.argmax(unknown))
        known = ", ".join(f"{int(k)} ({k.name.lower()})" for k in EXECUTED_KINDS)
        raise UnknownKind(
            f"row {row}: kind {int(kinds[row])} is not executed here"
            f" ({int(unknown.sum())} rows; executed: {known})"
        )
    try:
        _, poffsets = as_offsets_and_values(batch.column("payload"))
    except ValueError as exc:  # offsets an Arrow object built without full validation holds
        raise SchemaMismatch(f"column payload: {exc}") from None
    if batch.num_rows:
        longest = int(np.diff(poffsets).max())
        if longest > max_payload:
            row = int(np.argmax(np.diff(poffsets)))
            raise PayloadTooLarge(
                f"row {row}: payload of {longest} bytes exceeds the maximum {max_payload}"
            )
    # In buffers of its own: a canonical batch is kept, sealed and sent on, never the
    # submitter's larger batch it may be a slice of
    body = compact_batch(
        pa.RecordBatch.from_arrays(
            [batch.column(f.name) for f in BODY_FIELDS], schema=pa.schema(BODY_FIELDS)
        )
    )
    ids = compute_tx_ids(body, chain)
    return pa.RecordBatch.from_arrays(
        [*body.columns, _fsb(ids, 32)], schema=_with_chain(TX_SCHEMA, chain)
    )


def verify_signatures(
    batch: pa.RecordBatch,
    chain_id: bytes | None = None,
    *,
    ids: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of rows whose signature verifies over their recomputed tx id, by a sender
    key that is not of small order (see ``crypto.SMALL_ORDER_KEYS``).

    ``ids``: the rows' ids as the caller itself just derived them from this batch's content
    (the canonical batch ``validate_batch`` returned, in the same process), so that they are
    not hashed twice; never ids that arrived with the batch.

    ``rows``: only these rows (indices or a boolean mask; the mask returned is theirs, in
    their order), without copying the rest of the batch."""
    if ids is None:
        ids = compute_tx_ids(batch, chain_id)
    elif ids.shape != (batch.num_rows, 32):
        raise ValueError(f"ids must have shape ({batch.num_rows}, 32), got {ids.shape}")
    senders = fixed_rows(batch.column("sender"), 32)
    signatures = fixed_rows(batch.column("signature"), 64)
    if rows is not None:
        senders, signatures, ids = senders[rows], signatures[rows], ids[rows]
    ok = ed25519_verify_batch(senders, signatures, ids)
    return ok & ~small_order_mask(senders)


def tx_ids_of(batch: pa.RecordBatch) -> np.ndarray:
    """A zero-copy ``(n, 32)`` view of a canonical batch's ``tx_id`` column."""
    return fixed_rows(batch.column("tx_id"), 32)


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _costly_message(meta: bytes) -> str | None:
    """What in an IPC message's flatbuffer metadata (Message.fbs) would make the reader
    allocate more than the stream's own size, or None: a big-endian schema (every buffer is
    swapped into a copy), a dictionary batch (deltas are concatenated anew each time), a
    compressed body (a few KB inflate to GBs). This project writes none of them."""

    def field(table: int, index: int) -> int | None:
        vtable = table - struct.unpack_from("<i", meta, table)[0]
        if 4 + 2 * index + 2 > struct.unpack_from("<H", meta, vtable)[0]:
            return None
        offset = struct.unpack_from("<H", meta, vtable + 4 + 2 * index)[0]
        return table + offset if offset else None

    def deref(pos: int) -> int:
        return pos + struct.unpack_from("<I", meta, pos)[0]

    root = deref(0)
    kind, header = field(root, 1), field(root, 2)
    if kind is None or header is None:
        return None
    table = deref(header)
    if meta[kind] == 1:  # Schema: field 0 is its endianness (0: little)
        endianness = field(table, 0)
        if endianness is not None and struct.unpack_from("<h", meta, endianness)[0] != 0:
            return "a big-endian schema"
    elif meta[kind] == 2:
        return "a dictionary batch"
    elif meta[kind] == 3 and field(table, 3) is not None:  # RecordBatch: 3 is compression
        return "a compressed record batch"
    return None


# Bytes an Arrow IPC stream of one TxBatch may hold beyond its rows' buffers (the schema, the
# messages' metadata, alignment) before its batch is copied out of it (``batch_from_ipc``)
PADDING_SLACK = 16384


def batch_from_ipc(data: bytes | pa.Buffer, *, max_rows: int | None = None) -> pa.RecordBatch:
    """Read one TxBatch from an Arrow IPC stream (several record batches are concatenated)."""
    try:
        buf = pa.py_buffer(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        # Verify nothing in the stream makes reading it allocate more than its own size
        for message in pa.ipc.MessageReader.open_stream(buf):
            costly = _costly_message(message.metadata.to_pybytes())
            if costly is not None:
                raise DecodeError(f"Arrow IPC stream holds {costly}")
        reader = pa.ipc.open_stream(buf)
        table = reader.read_all()
        # Verify every offset and length before anything indexes into the buffers
        table.validate(full=True)
    except (
        pa.ArrowException,
        OSError,
        UnicodeDecodeError,
        ValueError,
        struct.error,
        IndexError,
    ) as exc:
        raise DecodeError(f"not a valid Arrow IPC stream: {exc}") from exc
    if max_rows is not None and table.num_rows > max_rows:
        raise WrongLength(f"batch of {table.num_rows} rows exceeds the maximum {max_rows}")
    # Verify no two arrays share body bytes: concatenating would copy them once per array
    if table.nbytes > len(buf):
        raise DecodeError(f"Arrow IPC stream of {len(buf)} bytes claims {table.nbytes}")
    try:
        combined = table.combine_chunks()
        batches = combined.to_batches()
        if not batches:
            return pa.RecordBatch.from_pylist([], schema=table.schema)
    except pa.ArrowException as exc:  # a type it cannot build (a union, say): not a TxBatch
        raise DecodeError(f"Arrow IPC stream of unusable columns: {exc}") from exc
    # One batch read zero-copy keeps the whole stream in memory: a stream padded far past its
    # rows (a body length raised, unused bytes after the buffers) is copied out of it instead
    if len(buf) > batches[0].nbytes + batches[0].nbytes // 4 + PADDING_SLACK:
        return _copied(batches[0])
    return batches[0]
