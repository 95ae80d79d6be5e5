"""Tests for rayledger.tx: the canonical layout, single-transaction decode and its rejections,
and the columnar TxBatch (ids, signatures, validation, Arrow IPC) against per-row references."""

from __future__ import annotations

import hashlib
import pickle
import random
import struct

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.crypto import key_from_seed, public_bytes
from rayledger.errors import (
    DecodeError,
    LedgerError,
    PayloadTooLarge,
    SchemaMismatch,
    TrailingBytes,
    TruncatedInput,
    UnknownKind,
    UnknownVersion,
    WrongChain,
    WrongLength,
)
from rayledger.tx import (
    CHAIN_ID_KEY,
    HEADER_SIZE,
    TX_SCHEMA,
    TX_VERSION,
    Transaction,
    batch_chain_id,
    batch_from_ipc,
    batch_to_ipc,
    compact_batch,
    compute_tx_ids,
    decode_tx,
    encode_tx,
    make_batch,
    sign_tx,
    tx_ids_of,
    validate_batch,
    verify_signatures,
)

CHAIN = hashlib.sha256(b"rayledger test chain").digest()
OTHER_CHAIN = hashlib.sha256(b"some other chain").digest()
KEYS = [key_from_seed(bytes([i + 1]) * 32) for i in range(3)]
PUBS = [public_bytes(k) for k in KEYS]

_hyp = settings(max_examples=40, deadline=None)


def _ref_canonical(chain: bytes, kind: int, sender: bytes, nonce: int, payload: bytes) -> bytes:
    return (
        struct.pack(">B", 1)
        + chain
        + struct.pack(">H", kind)
        + sender
        + struct.pack(">Q", nonce)
        + struct.pack(">I", len(payload))
        + payload
    )


def _ref_ids(batch: pa.RecordBatch, chain: bytes = CHAIN) -> list[bytes]:
    rows = batch.select(["kind", "sender", "nonce", "payload"]).to_pylist()
    return [
        hashlib.sha256(
            _ref_canonical(chain, r["kind"], r["sender"], r["nonce"], r["payload"])
        ).digest()
        for r in rows
    ]


def _ids(arr: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in arr]


def _sample_batch(n: int = 8) -> pa.RecordBatch:
    signers = [KEYS[i % len(KEYS)] for i in range(n)]
    kinds = [1 + i % 2 for i in range(n)]  # the kinds executed (validate_batch refuses others)
    nonces = [i * 1_000_003 for i in range(n)]
    payloads = [bytes([i]) * (i * 5 + 1) for i in range(n)]
    return make_batch(signers, kinds, nonces, payloads, CHAIN)


def _with_column(batch: pa.RecordBatch, name: str, arr: pa.Array) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, pa.field(name, arr.type, nullable=False), arr)


def _replace_row(batch: pa.RecordBatch, name: str, row: int, value: object) -> pa.RecordBatch:
    values = batch.column(name).to_pylist()
    values[row] = value
    return _with_column(batch, name, pa.array(values, batch.schema.field(name).type))


def _flip(data: bytes, index: int = 0, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


# ---- single transactions ------------------------------------------------------------------


def test_encode_tx_layout() -> None:
    sender = bytes(range(100, 132))
    payload = b"hello, ledger"
    got = encode_tx(CHAIN, 0x0102, sender, 0x0A0B0C0D0E0F1011, payload)
    assert got == _ref_canonical(CHAIN, 0x0102, sender, 0x0A0B0C0D0E0F1011, payload)
    # The same, field by field at fixed offsets
    assert got[0] == TX_VERSION == 1
    assert got[1:33] == CHAIN
    assert got[33:35] == b"\x01\x02"
    assert got[35:67] == sender
    assert got[67:75] == bytes.fromhex("0a0b0c0d0e0f1011")
    assert got[75:79] == len(payload).to_bytes(4, "big")
    assert got[79:] == payload
    assert HEADER_SIZE == 79


def test_encode_tx_empty_payload() -> None:
    got = encode_tx(CHAIN, 0, PUBS[0], 0, b"")
    assert len(got) == HEADER_SIZE
    assert got[75:79] == b"\x00\x00\x00\x00"


def test_transaction_id_and_signature() -> None:
    tx = sign_tx(KEYS[0], CHAIN, 9, 42, b"payload")
    assert tx.sender == PUBS[0]
    assert tx.canonical == _ref_canonical(CHAIN, 9, PUBS[0], 42, b"payload")
    assert tx.tx_id == hashlib.sha256(tx.canonical).digest()
    Ed25519PublicKey.from_public_bytes(PUBS[0]).verify(tx.signature, tx.tx_id)
    assert tx.encode() == tx.canonical + tx.signature


def test_unsigned_transaction_does_not_encode() -> None:
    with pytest.raises(ValueError):
        Transaction(CHAIN, 1, PUBS[0], 0, b"").encode()


@given(
    kind=st.integers(0, 0xFFFF),
    nonce=st.integers(0, (1 << 64) - 1),
    payload=st.binary(max_size=4096),
)
@_hyp
def test_decode_tx_round_trip(kind: int, nonce: int, payload: bytes) -> None:
    tx = sign_tx(KEYS[1], CHAIN, kind, nonce, payload)
    assert decode_tx(tx.encode()) == tx
    assert decode_tx(tx.encode(), chain_id=CHAIN) == tx
    assert decode_tx(tx.encode(), max_payload=len(payload)) == tx


def test_decode_tx_accepts_memoryview_and_bytearray() -> None:
    tx = sign_tx(KEYS[0], CHAIN, 1, 2, b"abc")
    assert decode_tx(memoryview(tx.encode())) == tx
    assert decode_tx(bytearray(tx.encode())) == tx


_WIRE = sign_tx(KEYS[0], CHAIN, 3, 4, b"0123456789").encode()


@pytest.mark.parametrize("cut", range(len(_WIRE)))
def test_decode_tx_truncated_at_every_length(cut: int) -> None:
    # Every proper prefix, including a cut inside the payload or signature, is truncation;
    # the declared payload length (10) is within the limit so no other check fires first.
    with pytest.raises(TruncatedInput) as exc:
        decode_tx(_WIRE[:cut])
    assert exc.value.code == "truncated"
    with pytest.raises(TruncatedInput):
        decode_tx(_WIRE[:cut], chain_id=CHAIN if cut >= 33 else OTHER_CHAIN)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_decode_tx_unknown_version(version: int) -> None:
    wire = bytes([version]) + _WIRE[1:]
    with pytest.raises(UnknownVersion) as exc:
        decode_tx(wire)
    assert exc.value.code == "unknown_version"
    # The version is checked before anything else is read
    with pytest.raises(UnknownVersion):
        decode_tx(bytes([version]))


def test_decode_tx_payload_too_large_without_the_bytes() -> None:
    head = struct.pack(">B32sH32sQI", 1, CHAIN, 1, PUBS[0], 0, 1025)
    with pytest.raises(PayloadTooLarge) as exc:
        decode_tx(head, max_payload=1024)
    assert exc.value.code == "payload_too_large"
    huge = struct.pack(">B32sH32sQI", 1, CHAIN, 1, PUBS[0], 0, 0xFFFFFFFF)
    with pytest.raises(PayloadTooLarge):
        decode_tx(huge)


def test_decode_tx_payload_limit_boundary() -> None:
    tx = sign_tx(KEYS[0], CHAIN, 1, 1, b"x" * 100)
    assert decode_tx(tx.encode(), max_payload=100) == tx
    with pytest.raises(PayloadTooLarge):
        decode_tx(tx.encode(), max_payload=99)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 64])
def test_decode_tx_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(TrailingBytes) as exc:
        decode_tx(_WIRE + extra)
    assert exc.value.code == "trailing_bytes"


def test_decode_tx_wrong_chain() -> None:
    with pytest.raises(WrongChain) as exc:
        decode_tx(_WIRE, chain_id=OTHER_CHAIN)
    assert exc.value.code == "wrong_chain"
    assert not isinstance(exc.value, DecodeError)
    # Without an expected chain the transaction's own chain is taken as is
    assert decode_tx(_WIRE).chain_id == CHAIN


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chain_id": bytes(31)},
        {"chain_id": bytes(33)},
        {"sender": bytes(31)},
        {"sender": b""},
        {"signature": bytes(63)},
        {"signature": bytes(65)},
        {"kind": -1},
        {"kind": 1 << 16},
        {"nonce": -1},
        {"nonce": 1 << 64},
    ],
)
def test_transaction_rejects_bad_fields(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "chain_id": CHAIN,
        "kind": 1,
        "sender": PUBS[0],
        "nonce": 0,
        "payload": b"",
        "signature": bytes(64),
    }
    fields.update(kwargs)
    with pytest.raises(WrongLength) as exc:
        Transaction(**fields)  # type: ignore[arg-type]
    assert exc.value.code == "wrong_length"


def test_transaction_field_bounds_accepted() -> None:
    tx = Transaction(CHAIN, 0xFFFF, PUBS[0], (1 << 64) - 1, b"", bytes(64))
    assert tx.canonical[33:35] == b"\xff\xff"
    assert Transaction(CHAIN, 0, PUBS[0], 0, b"").signature == b""


# ---- TxBatch: construction and ids --------------------------------------------------------


def test_make_batch_schema_and_metadata() -> None:
    batch = _sample_batch()
    assert batch.schema.names == TX_SCHEMA.names
    assert batch.schema.types == TX_SCHEMA.types
    assert batch.schema.equals(TX_SCHEMA)
    assert [f.nullable for f in batch.schema] == [False] * len(TX_SCHEMA)
    assert batch.schema.metadata[CHAIN_ID_KEY] == CHAIN.hex().encode()
    assert batch_chain_id(batch) == CHAIN
    assert batch_chain_id(batch, CHAIN) == CHAIN


def test_make_batch_rows_equal_sign_tx() -> None:
    batch = make_batch(KEYS[2], 5, [10, 11], [b"a", b""], CHAIN)
    for row, (nonce, payload) in zip(batch.to_pylist(), [(10, b"a"), (11, b"")], strict=True):
        tx = sign_tx(KEYS[2], CHAIN, 5, nonce, payload)
        assert row == {
            "kind": 5,
            "sender": PUBS[2],
            "nonce": nonce,
            "payload": payload,
            "signature": tx.signature,
            "tx_id": tx.tx_id,
        }


def test_make_batch_length_mismatch() -> None:
    with pytest.raises(ValueError):
        make_batch([KEYS[0]], [1, 2], [1, 2], [b"", b""], CHAIN)


def test_make_batch_wrong_chain_width() -> None:
    with pytest.raises(WrongLength):
        make_batch(KEYS[0], 1, [1], [b""], CHAIN[:31])


def test_make_batch_empty() -> None:
    batch = make_batch(KEYS[0], 1, [], [], CHAIN)
    assert batch.num_rows == 0
    assert batch.schema.equals(TX_SCHEMA)
    assert compute_tx_ids(batch).shape == (0, 32)
    assert verify_signatures(batch).shape == (0,)


_row = st.tuples(
    st.integers(0, len(KEYS) - 1),
    st.integers(0, 0xFFFF),
    st.integers(0, (1 << 64) - 1),
    st.binary(max_size=300),
)


@given(rows=st.lists(_row, max_size=12), data=st.data())
@_hyp
def test_compute_tx_ids_matches_hashlib(rows: list[tuple[int, int, int, bytes]], data) -> None:
    batch = make_batch(
        [KEYS[r[0]] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        CHAIN,
    )
    want = _ref_ids(batch)
    assert _ids(compute_tx_ids(batch)) == want
    assert _ids(tx_ids_of(batch)) == want
    start = data.draw(st.integers(0, len(rows)))
    length = data.draw(st.integers(0, len(rows) - start))
    sliced = batch.slice(start, length)
    assert _ids(compute_tx_ids(sliced)) == want[start : start + length]
    assert _ids(tx_ids_of(sliced)) == want[start : start + length]
    assert verify_signatures(sliced).all()


def test_compute_tx_ids_on_slice() -> None:
    batch = _sample_batch(10)
    sliced = batch.slice(3, 5)
    assert _ids(compute_tx_ids(sliced)) == _ref_ids(batch)[3:8]
    assert _ids(tx_ids_of(sliced)) == _ref_ids(batch)[3:8]
    assert verify_signatures(sliced).tolist() == [True] * 5
    checked = validate_batch(sliced, chain_id=CHAIN)
    assert _ids(tx_ids_of(checked)) == _ref_ids(batch)[3:8]


def test_verify_signatures_with_the_callers_own_ids() -> None:
    batch = validate_batch(_sample_batch(6), chain_id=CHAIN)
    ids = tx_ids_of(batch)
    assert verify_signatures(batch, CHAIN, ids=ids).tolist() == [True] * 6
    # The ids are what the signatures are checked over: other ids fail every row
    other = compute_tx_ids(_sample_batch(6).replace_schema_metadata(None), OTHER_CHAIN)
    assert verify_signatures(batch, CHAIN, ids=other).tolist() == [False] * 6
    with pytest.raises(ValueError, match="shape"):
        verify_signatures(batch, CHAIN, ids=ids[:5])


def test_compute_tx_ids_uses_the_chain() -> None:
    batch = _sample_batch(3)
    body = batch.replace_schema_metadata(None)
    assert _ids(compute_tx_ids(body, OTHER_CHAIN)) == _ref_ids(batch, OTHER_CHAIN)
    assert _ids(compute_tx_ids(body, CHAIN)) == _ref_ids(batch)


def test_compute_tx_ids_without_any_chain() -> None:
    body = _sample_batch(3).replace_schema_metadata(None)
    with pytest.raises(WrongChain) as exc:
        compute_tx_ids(body)
    assert exc.value.code == "wrong_chain"
    with pytest.raises(WrongChain):
        verify_signatures(body)


def test_compute_tx_ids_foreign_chain() -> None:
    with pytest.raises(WrongChain) as exc:
        compute_tx_ids(_sample_batch(2), OTHER_CHAIN)
    assert exc.value.code == "wrong_chain"


def test_batch_chain_id_bad_metadata_width() -> None:
    batch = _sample_batch(1).replace_schema_metadata({CHAIN_ID_KEY: CHAIN[:31].hex().encode()})
    with pytest.raises(WrongLength) as exc:
        batch_chain_id(batch)
    assert exc.value.code == "wrong_length"


def test_batch_chain_id_bad_expected_width() -> None:
    with pytest.raises(WrongLength):
        batch_chain_id(_sample_batch(1), CHAIN[:31])


# ---- TxBatch: signatures ------------------------------------------------------------------


def test_verify_signatures_all_valid() -> None:
    batch = _sample_batch(9)
    assert verify_signatures(batch).tolist() == [True] * 9
    assert verify_signatures(batch, CHAIN).tolist() == [True] * 9


def _tamper(batch: pa.RecordBatch, field: str, row: int) -> pa.RecordBatch:
    value = batch.column(field)[row].as_py()
    if field in ("payload", "sender", "signature"):
        value = _flip(value, index=len(value) // 2, bit=row % 8)
    else:
        value ^= 1 << (row % 8)
    return _replace_row(batch, field, row, value)


@pytest.mark.parametrize("field", ["payload", "nonce", "kind", "sender", "signature"])
def test_one_tampered_row_fails_alone(field: str) -> None:
    batch = _sample_batch(6)
    for row in range(batch.num_rows):
        tampered = _tamper(batch, field, row)
        want = [i != row for i in range(batch.num_rows)]
        assert verify_signatures(tampered).tolist() == want, (field, row)


def test_signature_over_another_chain_fails() -> None:
    batch = _sample_batch(3).replace_schema_metadata(None)
    assert verify_signatures(batch, CHAIN).all()
    assert not verify_signatures(batch, OTHER_CHAIN).any()


def test_forged_tx_id_column_is_ignored() -> None:
    batch = _sample_batch(4)
    rng = np.random.default_rng(0)
    forged_ids = pa.array([rng.bytes(32) for _ in range(4)], pa.binary(32))
    forged = _with_column(batch, "tx_id", forged_ids)
    assert verify_signatures(forged).all()
    checked = validate_batch(forged, chain_id=CHAIN)
    assert _ids(tx_ids_of(checked)) == _ref_ids(batch)
    # A tampered row with its tx_id column set to the tampered content's id still fails
    tampered = _tamper(batch, "payload", 1)
    assert verify_signatures(tampered).tolist() == [True, False, True, True]


# ---- TxBatch: validate_batch --------------------------------------------------------------


def test_validate_batch_canonical_form() -> None:
    batch = _sample_batch(5)
    checked = validate_batch(batch, chain_id=CHAIN)
    assert checked.schema.equals(TX_SCHEMA)
    assert checked.schema.metadata[CHAIN_ID_KEY] == CHAIN.hex().encode()
    assert checked.equals(batch)


def test_validate_batch_without_tx_id_or_metadata() -> None:
    batch = _sample_batch(4)
    body = batch.drop_columns(["tx_id"]).replace_schema_metadata(None)
    checked = validate_batch(body, chain_id=CHAIN)
    assert checked.schema.equals(TX_SCHEMA)
    assert checked.schema.metadata[CHAIN_ID_KEY] == CHAIN.hex().encode()
    assert _ids(tx_ids_of(checked)) == _ref_ids(batch)


def test_validate_batch_reorders_columns() -> None:
    batch = _sample_batch(3)
    shuffled = batch.select(["payload", "tx_id", "kind", "signature", "nonce", "sender"])
    assert validate_batch(shuffled, chain_id=CHAIN).equals(batch)


def test_validate_batch_empty() -> None:
    batch = make_batch(KEYS[0], 1, [], [], CHAIN)
    assert validate_batch(batch, chain_id=CHAIN).num_rows == 0


@pytest.mark.parametrize("column", ["kind", "sender", "nonce", "payload", "signature"])
def test_validate_batch_missing_column(column: str) -> None:
    with pytest.raises(SchemaMismatch) as exc:
        validate_batch(_sample_batch(2).drop_columns([column]), chain_id=CHAIN)
    assert exc.value.code == "schema_mismatch"


def test_validate_batch_extra_column() -> None:
    batch = _sample_batch(2)
    extra = batch.append_column("memo", pa.array([b"a", b"b"], pa.binary()))
    with pytest.raises(SchemaMismatch) as exc:
        validate_batch(extra, chain_id=CHAIN)
    assert exc.value.code == "schema_mismatch"


def test_validate_batch_duplicate_body_column() -> None:
    batch = _sample_batch(2)
    dup = batch.append_column("kind", batch.column("kind"))
    with pytest.raises(SchemaMismatch):
        validate_batch(dup, chain_id=CHAIN)


@pytest.mark.parametrize(
    ("column", "arrow_type"),
    [
        ("kind", pa.int32()),
        ("kind", pa.uint32()),
        ("nonce", pa.int64()),
        ("payload", pa.large_binary()),
        ("payload", pa.string()),
        ("sender", pa.binary()),
        ("signature", pa.large_binary()),
        ("tx_id", pa.binary()),
    ],
)
def test_validate_batch_wrong_type(column: str, arrow_type: pa.DataType) -> None:
    batch = _sample_batch(2)
    values = batch.column(column).to_pylist()
    if pa.types.is_string(arrow_type):
        values = [v.decode("latin-1") for v in values]
    bad = _with_column(batch, column, pa.array(values, arrow_type))
    with pytest.raises(SchemaMismatch) as exc:
        validate_batch(bad, chain_id=CHAIN)
    assert exc.value.code == "schema_mismatch"


@pytest.mark.parametrize(
    ("column", "width"), [("sender", 31), ("sender", 33), ("signature", 65), ("tx_id", 31)]
)
def test_validate_batch_wrong_width(column: str, width: int) -> None:
    batch = _sample_batch(2)
    values = [(v + bytes(width))[:width] for v in batch.column(column).to_pylist()]
    bad = _with_column(batch, column, pa.array(values, pa.binary(width)))
    with pytest.raises(WrongLength) as exc:
        validate_batch(bad, chain_id=CHAIN)
    assert exc.value.code == "wrong_length"


@pytest.mark.parametrize("column", ["kind", "sender", "nonce", "payload", "signature", "tx_id"])
def test_validate_batch_nulls(column: str) -> None:
    batch = _sample_batch(3)
    values = batch.column(column).to_pylist()
    values[1] = None
    arr = pa.array(values, batch.schema.field(column).type)
    i = batch.schema.get_field_index(column)
    bad = batch.set_column(i, pa.field(column, arr.type, nullable=True), arr)
    with pytest.raises(SchemaMismatch) as exc:
        validate_batch(bad, chain_id=CHAIN)
    assert exc.value.code == "schema_mismatch"


def test_validate_batch_payload_limit() -> None:
    batch = make_batch(KEYS[0], 1, [0, 1, 2], [b"", b"x" * 100, b"y" * 10], CHAIN)
    assert validate_batch(batch, chain_id=CHAIN, max_payload=100).num_rows == 3
    with pytest.raises(PayloadTooLarge) as exc:
        validate_batch(batch, chain_id=CHAIN, max_payload=99)
    assert exc.value.code == "payload_too_large"
    assert "row 1" in str(exc.value)


def test_validate_batch_payload_limit_on_slice() -> None:
    batch = make_batch(KEYS[0], 1, [0, 1, 2], [b"x" * 500, b"", b"y" * 10], CHAIN)
    assert validate_batch(batch.slice(1), chain_id=CHAIN, max_payload=10).num_rows == 2


def test_validate_batch_foreign_chain() -> None:
    with pytest.raises(WrongChain) as exc:
        validate_batch(_sample_batch(2), chain_id=OTHER_CHAIN)
    assert exc.value.code == "wrong_chain"


def test_validate_batch_non_hex_metadata_chain() -> None:
    batch = _sample_batch(1).replace_schema_metadata({CHAIN_ID_KEY: b"zz" * 32})
    with pytest.raises(DecodeError):
        validate_batch(batch, chain_id=CHAIN)


def test_validate_batch_non_utf8_metadata_chain() -> None:
    batch = _sample_batch(1).replace_schema_metadata({CHAIN_ID_KEY: b"\xff" * 64})
    with pytest.raises(DecodeError):
        validate_batch(batch, chain_id=CHAIN)


def test_validate_batch_duplicate_tx_id_column() -> None:
    batch = _sample_batch(2)
    dup = batch.append_column("tx_id", batch.column("tx_id"))
    with pytest.raises(SchemaMismatch):
        validate_batch(dup, chain_id=CHAIN)


# ---- Arrow IPC ----------------------------------------------------------------------------


def test_ipc_round_trip() -> None:
    batch = _sample_batch(7)
    back = batch_from_ipc(batch_to_ipc(batch))
    assert back.equals(batch)
    assert back.schema.metadata == batch.schema.metadata
    assert batch_from_ipc(pa.py_buffer(batch_to_ipc(batch))).equals(batch)
    assert validate_batch(back, chain_id=CHAIN).equals(batch)


def test_ipc_round_trip_of_slice() -> None:
    batch = _sample_batch(10)
    back = batch_from_ipc(batch_to_ipc(batch.slice(3, 5)))
    assert back.equals(batch.slice(3, 5))
    assert verify_signatures(back).all()
    assert _ids(compute_tx_ids(back)) == _ref_ids(batch)[3:8]


def test_ipc_round_trip_empty() -> None:
    batch = make_batch(KEYS[0], 1, [], [], CHAIN)
    back = batch_from_ipc(batch_to_ipc(batch))
    assert back.num_rows == 0
    assert back.schema.equals(TX_SCHEMA)
    assert back.schema.metadata[CHAIN_ID_KEY] == CHAIN.hex().encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        bytes(range(256)) * 4,
        b"\xff\xff\xff\xff" + bytes(20),
    ],
)
def test_ipc_garbage(data: bytes) -> None:
    with pytest.raises(DecodeError) as exc:
        batch_from_ipc(data)
    assert exc.value.code == "decode_error"


@pytest.mark.parametrize("keep", [4, 50, 200, -10])
def test_ipc_truncated_stream(keep: int) -> None:
    with pytest.raises(DecodeError):
        batch_from_ipc(batch_to_ipc(_sample_batch(4))[:keep])


def test_ipc_max_rows() -> None:
    data = batch_to_ipc(_sample_batch(5))
    assert batch_from_ipc(data, max_rows=5).num_rows == 5
    with pytest.raises(WrongLength) as exc:
        batch_from_ipc(data, max_rows=4)
    assert exc.value.code == "wrong_length"


def test_ipc_several_record_batches_become_one() -> None:
    batch = _sample_batch(9)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch.slice(0, 2))
        writer.write_batch(batch.slice(2, 0))
        writer.write_batch(batch.slice(2, 4))
        writer.write_batch(batch.slice(6))
    data = sink.getvalue().to_pybytes()
    back = batch_from_ipc(data)
    assert isinstance(back, pa.RecordBatch)
    assert back.equals(batch)
    assert back.schema.metadata == batch.schema.metadata
    assert _ids(compute_tx_ids(back)) == _ref_ids(batch)
    with pytest.raises(WrongLength):
        batch_from_ipc(data, max_rows=8)


def _ipc_with_payload_offsets(new_offsets: list[int]) -> tuple[pa.RecordBatch, bytes]:
    batch = make_batch(KEYS[0], 1, [0, 1, 2, 3], [b"", b"a", b"bb", b"ccc"], CHAIN)
    data = batch_to_ipc(batch)
    old = np.array([0, 0, 1, 3, 6], np.int32).tobytes()
    assert data.count(old) == 1
    return batch, data.replace(old, np.array(new_offsets, np.int32).tobytes())


def test_ipc_offsets_patch_is_faithful() -> None:
    # The byte patch used below, with the original offsets, leaves a valid batch.
    batch, data = _ipc_with_payload_offsets([0, 0, 1, 3, 6])
    assert validate_batch(batch_from_ipc(data), chain_id=CHAIN).equals(batch)


@pytest.mark.parametrize(
    "offsets",
    [[0, 0, 1, 3, 1000], [0, 0, 1, 3, 2], [0, 0, 5, 3, 6]],
    ids=["past-end", "last-decreasing", "middle-decreasing"],
)
def test_ipc_corrupt_payload_offsets(offsets: list[int]) -> None:
    _, data = _ipc_with_payload_offsets(offsets)
    with pytest.raises(DecodeError):
        validate_batch(batch_from_ipc(data), chain_id=CHAIN)


def test_ipc_non_utf8_field_name() -> None:
    data = batch_to_ipc(_sample_batch(2))
    assert data.count(b"kind") == 1
    with pytest.raises(DecodeError):
        batch_from_ipc(data.replace(b"kind", b"\xffind"))


def test_ipc_fuzz_only_ledger_errors() -> None:
    data = batch_to_ipc(_sample_batch(4))
    rng = random.Random(20240601)
    escaped: dict[str, int] = {}
    for _ in range(600):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            verify_signatures(validate_batch(batch_from_ipc(bytes(mutated)), chain_id=CHAIN))
        except LedgerError:
            pass
        except Exception as exc:
            name = type(exc).__name__
            escaped[name] = escaped.get(name, 0) + 1
    assert not escaped, escaped


def test_small_order_sender_keys_are_refused_though_openssl_accepts_their_forgeries() -> None:
    import numpy as np

    from rayledger.crypto import SMALL_ORDER_KEYS, small_order_mask
    from rayledger.kernels import ed25519_verify_batch
    from rayledger.tx import TX_SCHEMA, compute_tx_ids, verify_signatures

    identity = bytes.fromhex("01" + "00" * 31)
    # With A the identity point, R = [S]B verifies for any message: S = 0, R = identity
    forged_sig = identity + bytes(32)
    chain = bytes(range(32))
    body = pa.RecordBatch.from_pydict(
        {
            "kind": [2],
            "sender": [identity],
            "nonce": [0],
            "payload": [b"x" * 32],
            "signature": [forged_sig],
        },
        schema=pa.schema(list(TX_SCHEMA)[:5]),
    )
    ids = compute_tx_ids(body, chain)
    openssl = ed25519_verify_batch(
        np.frombuffer(identity, np.uint8).reshape(1, 32),
        np.frombuffer(forged_sig, np.uint8).reshape(1, 64),
        ids,
    )
    assert openssl.tolist() == [True]  # the acceptance rule itself takes it
    assert verify_signatures(body, chain).tolist() == [False]  # the ledger refuses the key
    keys = np.frombuffer(b"".join(sorted(SMALL_ORDER_KEYS)), np.uint8).reshape(-1, 32)
    assert small_order_mask(keys).all()
    normal = np.frombuffer(bytes(range(32)) * 3, np.uint8).reshape(3, 32)
    assert not small_order_mask(normal).any()


def test_every_listed_small_order_key_is_a_point_of_order_dividing_8() -> None:
    """Recomputed from the curve: decode each listed encoding (reducing y mod p, as a lenient
    decoder would) and check 8P is the identity; the canonical ones are the whole subgroup."""
    from rayledger.crypto import SMALL_ORDER_KEYS

    p = 2**255 - 19
    d = -121665 * pow(121666, p - 2, p) % p
    sqrt_m1 = pow(2, (p - 1) // 4, p)

    def decode(enc: bytes) -> tuple[int, int]:
        y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
        sign = enc[31] >> 7
        y %= p
        x2 = (y * y - 1) * pow(d * y * y + 1, p - 2, p) % p
        x = pow(x2, (p + 3) // 8, p)
        if (x * x - x2) % p:
            x = x * sqrt_m1 % p
        assert (x * x - x2) % p == 0, enc.hex()
        return ((p - x) % p if x & 1 != sign else x), y

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        (x1, y1), (x2, y2) = a, b
        t = d * x1 * x2 * y1 * y2
        return (
            (x1 * y2 + x2 * y1) * pow(1 + t, p - 2, p) % p,
            (y1 * y2 + x1 * x2) * pow(1 - t, p - 2, p) % p,
        )

    points = set()
    for enc in SMALL_ORDER_KEYS:
        pt = decode(enc)
        points.add(pt)
        for _ in range(3):
            pt = add(pt, pt)
        assert pt == (0, 1), enc.hex()
    assert len(points) == 8


def test_compact_batch_copies_a_slice_and_keeps_an_own_batch() -> None:
    key = key_from_seed(b"\x21" * 32)
    whole = make_batch(key, 2, range(2000), [bytes([i % 256]) * 32 for i in range(2000)], CHAIN)
    assert compact_batch(whole) is whole
    part = whole.slice(700, 100)
    own = compact_batch(part)
    assert own.equals(part) and own.schema.metadata == part.schema.metadata
    # The slice pickles with all 2,000 rows; its compact copy with its 100
    assert len(pickle.dumps(part, protocol=5)) > 15 * len(pickle.dumps(own, protocol=5))
    assert own.get_total_buffer_size() < 2 * own.nbytes
    assert compact_batch(own) is own
    empty = compact_batch(whole.slice(2000))
    assert empty.num_rows == 0 and empty.schema == whole.schema


def test_validate_batch_of_a_slice_owns_its_buffers() -> None:
    """A submission that is a slice of a client's larger batch: the canonical batch the
    mempool keeps and seals (and a validator stores) does not hold on to the rest."""
    key = key_from_seed(b"\x22" * 32)
    whole = make_batch(key, 2, range(2000), [bytes([i % 256]) * 32 for i in range(2000)], CHAIN)
    canonical = validate_batch(whole.slice(100, 100), chain_id=CHAIN)
    assert canonical.equals(validate_batch(compact_batch(whole.slice(100, 100)), chain_id=CHAIN))
    assert len(pickle.dumps(canonical, protocol=5)) * 10 < len(pickle.dumps(whole, protocol=5))


@pytest.mark.parametrize("kind", [0, 3, 4, 5, 6, 999, 65535])
def test_validate_batch_refuses_a_kind_nobody_executes(kind: int) -> None:
    good = _sample_batch(6)
    kinds = good.column("kind").to_pylist()
    kinds[4] = kind
    bad = _with_column(good, "kind", pa.array(kinds, pa.uint16()))
    with pytest.raises(UnknownKind, match=f"row 4: kind {kind} is not executed here") as exc:
        validate_batch(bad, chain_id=CHAIN)
    assert exc.value.code == "unknown_kind"
    assert validate_batch(good, chain_id=CHAIN).num_rows == 6
