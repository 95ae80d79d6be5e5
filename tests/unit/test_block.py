"""Tests for rayledger.block: header and QC encodings, signer bitmaps, quorum-certificate
verification, and check_block's rules, each rule tested by a block that breaks only it.

Scenarios for check_block (4 validators, quorum 3):
  genesis -> block 1 (round 1, genesis QC) -> block 2 (round 3, QC of validators 0, 1, 2);
  each rejection test changes one thing in block 1 or block 2 and keeps the rest consistent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.block import (
    BLOCK_ROW_SCHEMA,
    BLOCK_VERSION,
    EMPTY_ROOT,
    MAX_BATCH_DIGESTS,
    ZERO_HASH,
    Block,
    BlockHeader,
    QuorumCert,
    build_block,
    check_block,
    compute_result_root,
    compute_tx_root,
    genesis_header,
    make_bitmap,
    make_results,
    verify_qc,
    vote_message,
)
from rayledger.codec import u32
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.errors import (
    InvalidBlock,
    InvalidQuorumCert,
    TrailingBytes,
    TruncatedInput,
    UnknownVersion,
    WrongLength,
)
from rayledger.merkle import merkle_root
from rayledger.tx import TX_SCHEMA, make_batch, tx_ids_of, validate_batch

CHAIN = hashlib.sha256(b"block test chain").digest()
OTHER_CHAIN = hashlib.sha256(b"another chain").digest()
VKEYS = [key_from_seed(bytes([0x40 + i]) * 32) for i in range(4)]
VPUBS = np.frombuffer(b"".join(public_bytes(k) for k in VKEYS), np.uint8).reshape(4, 32)
QUORUM = 3
CLIENT = key_from_seed(b"\x07" * 32)
GENESIS = genesis_header(CHAIN, 1_700_000_000_000)

_hyp = settings(max_examples=50, deadline=None)

_hash = st.binary(min_size=32, max_size=32)
_u64 = st.integers(0, (1 << 64) - 1)


def _qc(
    block_hash: bytes,
    round_: int,
    signers: list[int],
    *,
    chain: bytes = CHAIN,
    signed_hash: bytes | None = None,
    signed_round: int | None = None,
) -> QuorumCert:
    msg = vote_message(
        chain,
        block_hash if signed_hash is None else signed_hash,
        round_ if signed_round is None else signed_round,
    )
    sigs = tuple(VKEYS[i].sign(msg) for i in signers)
    return QuorumCert(block_hash, round_, make_bitmap(signers, len(VKEYS)), sigs)


def _txs(n: int, seed: int = 0) -> pa.RecordBatch:
    return make_batch(
        CLIENT,
        [1 + (seed + i) % 2 for i in range(n)],  # the kinds executed: transfer, anchor
        [seed * 100 + i for i in range(n)],
        [bytes([seed + i]) * (3 * i) for i in range(n)],
        CHAIN,
    )


def _results(n: int) -> pa.RecordBatch:
    return make_results([i % 3 for i in range(n)], [b"r" * i for i in range(n)])


def _child(
    parent: BlockHeader,
    txs: pa.RecordBatch,
    round_: int,
    parent_qc: QuorumCert,
    results: pa.RecordBatch | None = None,
) -> Block:
    return build_block(
        parent,
        txs,
        _results(txs.num_rows) if results is None else results,
        round_=round_,
        proposer=bytes(VPUBS[round_ % 4]),
        timestamp_ms=parent.timestamp_ms + 1000,
        parent_qc=parent_qc,
    )


BLOCK1 = _child(GENESIS, _txs(5), 1, QuorumCert.genesis(GENESIS.hash))
BLOCK2 = _child(BLOCK1.header, _txs(4, seed=10), 3, _qc(BLOCK1.hash, 1, [0, 1, 2]))


def _with_header(block: Block, **changes: object) -> Block:
    return dataclasses.replace(block, header=dataclasses.replace(block.header, **changes))


def _tamper_column(batch: pa.RecordBatch, name: str, row: int, value: object) -> pa.RecordBatch:
    values = batch.column(name).to_pylist()
    values[row] = value
    field = batch.schema.field(name)
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, field, pa.array(values, field.type))


# ---- BlockHeader --------------------------------------------------------------------------


@st.composite
def _headers(draw: st.DrawFn) -> BlockHeader:
    return BlockHeader(
        chain_id=draw(_hash),
        height=draw(_u64),
        round=draw(_u64),
        parent_hash=draw(_hash),
        proposer=draw(_hash),
        timestamp_ms=draw(_u64),
        tx_count=draw(st.integers(0, (1 << 32) - 1)),
        tx_root=draw(_hash),
        result_root=draw(_hash),
        state_root=draw(_hash),
        batch_digests=tuple(draw(st.lists(_hash, max_size=5))),
    )


@given(_headers())
@_hyp
def test_header_round_trip(header: BlockHeader) -> None:
    data = header.encode()
    assert BlockHeader.decode(data) == header
    assert BlockHeader.decode(memoryview(data)) == header
    assert header.hash == hashlib.sha256(data).digest()


def test_header_layout() -> None:
    h = BLOCK2.header
    digests = (b"\x0d" * 32, b"\x0e" * 32)
    h = dataclasses.replace(h, state_root=b"\x0c" * 32, batch_digests=digests)
    want = struct.pack(
        ">B32sQQ32s32sQI32s32s32sI",
        BLOCK_VERSION,
        h.chain_id,
        h.height,
        h.round,
        h.parent_hash,
        h.proposer,
        h.timestamp_ms,
        h.tx_count,
        h.tx_root,
        h.result_root,
        h.state_root,
        2,
    ) + b"".join(digests)
    assert h.encode() == want
    assert h.hash == hashlib.sha256(want).digest()


def test_genesis_header() -> None:
    assert GENESIS.height == 0
    assert GENESIS.round == 0
    assert GENESIS.parent_hash == ZERO_HASH
    assert GENESIS.tx_count == 0
    assert GENESIS.tx_root == GENESIS.result_root == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert genesis_header(CHAIN, 1).hash != genesis_header(CHAIN, 2).hash
    assert genesis_header(OTHER_CHAIN, 1).hash != genesis_header(CHAIN, 1).hash


_HEADER_BYTES = dataclasses.replace(
    BLOCK1.header, batch_digests=(b"\x01" * 32, b"\x02" * 32)
).encode()


@pytest.mark.parametrize("cut", range(len(_HEADER_BYTES)))
def test_header_truncated_at_every_length(cut: int) -> None:
    with pytest.raises(TruncatedInput) as exc:
        BlockHeader.decode(_HEADER_BYTES[:cut])
    assert exc.value.code == "truncated"


def test_header_trailing_bytes() -> None:
    with pytest.raises(TrailingBytes) as exc:
        BlockHeader.decode(_HEADER_BYTES + b"\x00")
    assert exc.value.code == "trailing_bytes"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_header_unknown_version(version: int) -> None:
    with pytest.raises(UnknownVersion) as exc:
        BlockHeader.decode(bytes([version]) + _HEADER_BYTES[1:])
    assert exc.value.code == "unknown_version"


def test_header_too_many_digests_checked_before_reading_them() -> None:
    base = GENESIS.encode()[:-4]
    with pytest.raises(WrongLength) as exc:
        BlockHeader.decode(base + u32(MAX_BATCH_DIGESTS + 1))
    assert exc.value.code == "wrong_length"
    with pytest.raises(TruncatedInput):
        BlockHeader.decode(base + u32(MAX_BATCH_DIGESTS))


@pytest.mark.parametrize(
    "field", ["chain_id", "parent_hash", "proposer", "tx_root", "result_root", "state_root"]
)
def test_header_rejects_wrong_width(field: str) -> None:
    with pytest.raises(WrongLength) as exc:
        dataclasses.replace(GENESIS, **{field: bytes(31)})
    assert exc.value.code == "wrong_length"


def test_header_rejects_bad_digests() -> None:
    with pytest.raises(WrongLength):
        dataclasses.replace(GENESIS, batch_digests=(bytes(32), bytes(33)))
    many = (bytes(32),) * MAX_BATCH_DIGESTS
    assert len(dataclasses.replace(GENESIS, batch_digests=many).batch_digests) == len(many)
    with pytest.raises(WrongLength):
        dataclasses.replace(GENESIS, batch_digests=(*many, bytes(32)))


# ---- QuorumCert encoding and bitmaps ------------------------------------------------------


@st.composite
def _qcs(draw: st.DrawFn) -> QuorumCert:
    bitmap = draw(st.binary(max_size=6))
    count = sum(bin(b).count("1") for b in bitmap)
    sigs = draw(st.lists(st.binary(min_size=64, max_size=64), min_size=count, max_size=count))
    return QuorumCert(draw(_hash), draw(_u64), bitmap, tuple(sigs))


@given(_qcs())
@_hyp
def test_qc_round_trip(qc: QuorumCert) -> None:
    assert QuorumCert.decode(qc.encode()) == qc


def test_qc_layout() -> None:
    qc = _qc(BLOCK1.hash, 1, [0, 2, 3])
    assert qc.encode() == (
        BLOCK1.hash + struct.pack(">QH", 1, 1) + b"\x0d" + b"".join(qc.signatures)
    )


def test_qc_decode_truncated_and_trailing() -> None:
    data = _qc(BLOCK1.hash, 1, [0, 1, 2]).encode()
    for cut in range(len(data)):
        with pytest.raises(TruncatedInput):
            QuorumCert.decode(data[:cut])
    with pytest.raises(TrailingBytes):
        QuorumCert.decode(data + b"\x00")


def test_qc_rejects_wrong_widths() -> None:
    with pytest.raises(WrongLength):
        QuorumCert(bytes(31), 1, b"\x01", (bytes(64),))
    with pytest.raises(WrongLength):
        QuorumCert(bytes(32), 1, b"\x01", (bytes(63),))


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
@_hyp
def test_bitmap_round_trip(case: tuple[int, set[int]]) -> None:
    n, indices = case
    bitmap = make_bitmap(sorted(indices), n)
    assert len(bitmap) == -(-n // 8)
    assert QuorumCert(bytes(32), 1, bitmap).signer_indices() == sorted(indices)


def test_bitmap_refuses_indices_outside_the_set() -> None:
    for indices in ([4], [0, 4], [-1]):
        with pytest.raises(ValueError, match="signer indices must lie in 0..3"):
            make_bitmap(indices, 4)


def test_bitmap_is_lsb_first() -> None:
    assert make_bitmap([0], 4) == b"\x01"
    assert make_bitmap([0, 9], 10) == b"\x01\x02"
    assert make_bitmap([7, 8], 16) == b"\x80\x01"
    assert make_bitmap([], 9) == b"\x00\x00"


# ---- verify_qc ----------------------------------------------------------------------------


def _verify(qc: QuorumCert) -> None:
    verify_qc(qc, VPUBS, QUORUM, CHAIN, GENESIS.hash)


@pytest.mark.parametrize("signers", [[0, 1, 2], [1, 2, 3], [0, 1, 3], [0, 1, 2, 3]])
def test_verify_qc_accepts_a_quorum(signers: list[int]) -> None:
    _verify(_qc(BLOCK1.hash, 1, signers))


def test_vote_message_binds_chain_block_and_round() -> None:
    base = vote_message(CHAIN, BLOCK1.hash, 1)
    assert len(base) == 32
    assert vote_message(OTHER_CHAIN, BLOCK1.hash, 1) != base
    assert vote_message(CHAIN, BLOCK2.hash, 1) != base
    assert vote_message(CHAIN, BLOCK1.hash, 2) != base


def _assert_invalid_qc(qc: QuorumCert) -> None:
    with pytest.raises(InvalidQuorumCert) as exc:
        _verify(qc)
    assert exc.value.code == "invalid_qc"


def test_verify_qc_too_few_signers() -> None:
    _assert_invalid_qc(_qc(BLOCK1.hash, 1, [0, 1]))
    _assert_invalid_qc(_qc(BLOCK1.hash, 1, []))


def test_verify_qc_bad_signature() -> None:
    qc = _qc(BLOCK1.hash, 1, [0, 1, 2, 3])
    sigs = list(qc.signatures)
    sigs[3] = bytes([sigs[3][0] ^ 1]) + sigs[3][1:]
    # Three good votes are a quorum, but a certificate with any forged vote is invalid
    _assert_invalid_qc(dataclasses.replace(qc, signatures=tuple(sigs)))


def test_verify_qc_signatures_swapped_between_validators() -> None:
    qc = _qc(BLOCK1.hash, 1, [0, 1, 2])
    sigs = qc.signatures
    _assert_invalid_qc(dataclasses.replace(qc, signatures=(sigs[1], sigs[0], sigs[2])))


def test_verify_qc_wrong_bitmap_length() -> None:
    qc = _qc(BLOCK1.hash, 1, [0, 1, 2])
    _assert_invalid_qc(dataclasses.replace(qc, signers=qc.signers + b"\x00"))


def test_verify_qc_bit_beyond_validators() -> None:
    qc = _qc(BLOCK1.hash, 1, [0, 1, 2])
    extra = VKEYS[3].sign(vote_message(CHAIN, BLOCK1.hash, 1))
    _assert_invalid_qc(dataclasses.replace(qc, signers=b"\x17", signatures=(*qc.signatures, extra)))


@pytest.mark.parametrize("count", [2, 4])
def test_verify_qc_signature_count_differs_from_signers(count: int) -> None:
    full = _qc(BLOCK1.hash, 1, [0, 1, 2, 3])
    qc = dataclasses.replace(full, signers=make_bitmap([0, 1, 2], 4))
    _assert_invalid_qc(dataclasses.replace(qc, signatures=full.signatures[:count]))


def test_verify_qc_votes_for_another_round() -> None:
    _assert_invalid_qc(_qc(BLOCK1.hash, 1, [0, 1, 2], signed_round=2))


def test_verify_qc_votes_for_another_block() -> None:
    _assert_invalid_qc(_qc(BLOCK1.hash, 1, [0, 1, 2], signed_hash=BLOCK2.hash))


def test_verify_qc_votes_on_another_chain() -> None:
    _assert_invalid_qc(_qc(BLOCK1.hash, 1, [0, 1, 2], chain=OTHER_CHAIN))


def test_verify_qc_genesis() -> None:
    _verify(QuorumCert.genesis(GENESIS.hash))
    _assert_invalid_qc(QuorumCert.genesis(BLOCK1.hash))
    # No signers but signatures attached: not the genesis certificate either
    sig = VKEYS[0].sign(vote_message(CHAIN, GENESIS.hash, 0))
    _assert_invalid_qc(QuorumCert(GENESIS.hash, 0, b"", (sig,)))


def test_verify_qc_unsigned_later_round() -> None:
    _assert_invalid_qc(QuorumCert(GENESIS.hash, 1, b"", ()))


# ---- build_block / check_block ------------------------------------------------------------


def test_build_block_then_check_block() -> None:
    check_block(BLOCK1, GENESIS)
    check_block(BLOCK2, BLOCK1.header)
    h = BLOCK2.header
    assert h.chain_id == CHAIN
    assert h.height == 2
    assert h.round == 3
    assert h.parent_hash == BLOCK1.hash
    assert h.tx_count == 4
    assert BLOCK2.txs.schema.equals(TX_SCHEMA)
    assert BLOCK2.hash == h.hash == hashlib.sha256(h.encode()).digest()
    assert BLOCK2.height == 2


def test_build_block_from_validated_slice() -> None:
    txs = validate_batch(_txs(8, seed=3).slice(2, 5), chain_id=CHAIN)
    block = _child(GENESIS, txs, 1, QuorumCert.genesis(GENESIS.hash))
    check_block(block, GENESIS)


def test_build_block_empty() -> None:
    block = _child(GENESIS, _txs(0), 1, QuorumCert.genesis(GENESIS.hash))
    assert block.header.tx_root == block.header.result_root == EMPTY_ROOT
    check_block(block, GENESIS)


def test_build_block_row_count_mismatch() -> None:
    with pytest.raises(InvalidBlock) as exc:
        _child(GENESIS, _txs(3), 1, QuorumCert.genesis(GENESIS.hash), results=_results(2))
    assert exc.value.code == "invalid_block"


def test_block_rows() -> None:
    rows = BLOCK1.rows()
    assert rows.schema.equals(BLOCK_ROW_SCHEMA)
    assert rows.num_rows == 5
    assert rows.column("payload").equals(BLOCK1.txs.column("payload"))
    assert rows.column("result").equals(BLOCK1.results.column("result"))


def test_roots_match_per_row_leaves() -> None:
    ids = tx_ids_of(BLOCK2.txs)
    rows = BLOCK2.results.to_pylist()
    leaves = [ids[i].tobytes() + bytes([r["status"]]) + r["result"] for i, r in enumerate(rows)]
    assert compute_result_root(ids, BLOCK2.results) == merkle_root(leaves)
    assert compute_tx_root(ids) == merkle_root([row.tobytes() for row in ids])
    assert BLOCK2.header.result_root == merkle_root(leaves)


def _assert_invalid_block(block: Block, parent: BlockHeader, match: str) -> None:
    with pytest.raises(InvalidBlock, match=match) as exc:
        check_block(block, parent)
    assert exc.value.code == "invalid_block"


def test_check_block_wrong_chain() -> None:
    # An empty body makes the chain id the only thing that differs
    empty = _child(GENESIS, _txs(0), 1, QuorumCert.genesis(GENESIS.hash))
    check_block(empty, GENESIS)
    _assert_invalid_block(_with_header(empty, chain_id=OTHER_CHAIN), GENESIS, "chain id")
    _assert_invalid_block(_with_header(BLOCK1, chain_id=OTHER_CHAIN), GENESIS, "chain id")


@pytest.mark.parametrize("height", [0, 1, 3, 4])
def test_check_block_wrong_height(height: int) -> None:
    _assert_invalid_block(
        _with_header(BLOCK2, height=height), BLOCK1.header, "does not follow parent height"
    )


def test_check_block_wrong_parent_hash() -> None:
    block = _with_header(BLOCK2, parent_hash=GENESIS.hash)
    _assert_invalid_block(block, BLOCK1.header, "parent hash")
    _assert_invalid_block(_with_header(BLOCK1, parent_hash=ZERO_HASH), GENESIS, "parent hash")


@pytest.mark.parametrize("round_", [0, 1])
def test_check_block_round_not_above_parent(round_: int) -> None:
    _assert_invalid_block(_with_header(BLOCK2, round=round_), BLOCK1.header, "not above parent")


def test_check_block_round_after_genesis_may_be_zero() -> None:
    check_block(_with_header(BLOCK1, round=0), GENESIS)


def test_check_block_qc_for_another_block() -> None:
    block = dataclasses.replace(BLOCK2, parent_qc=_qc(GENESIS.hash, 1, [0, 1, 2]))
    _assert_invalid_block(block, BLOCK1.header, "parent QC")
    block = dataclasses.replace(BLOCK1, parent_qc=QuorumCert.genesis(BLOCK2.hash))
    _assert_invalid_block(block, GENESIS, "parent QC")


def test_check_block_qc_for_another_round() -> None:
    block = dataclasses.replace(BLOCK2, parent_qc=_qc(BLOCK1.hash, 2, [0, 1, 2]))
    _assert_invalid_block(block, BLOCK1.header, "parent QC")


@pytest.mark.parametrize("tx_count", [0, 3, 5])
def test_check_block_tx_count_mismatch(tx_count: int) -> None:
    _assert_invalid_block(_with_header(BLOCK2, tx_count=tx_count), BLOCK1.header, "header says")


def test_check_block_body_count_mismatch() -> None:
    block = dataclasses.replace(BLOCK2, txs=BLOCK2.txs.slice(0, 3))
    _assert_invalid_block(block, BLOCK1.header, "header says")


def test_check_block_results_count_mismatch() -> None:
    block = dataclasses.replace(BLOCK2, results=BLOCK2.results.slice(0, 3))
    _assert_invalid_block(block, BLOCK1.header, "header says")


def test_check_block_forged_tx_id_column() -> None:
    # Content intact, so the roots still match: only the tx_id check can catch this
    block = dataclasses.replace(BLOCK2, txs=_tamper_column(BLOCK2.txs, "tx_id", 2, b"\x99" * 32))
    _assert_invalid_block(block, BLOCK1.header, "tx_id column")


@pytest.mark.parametrize("row", range(4))
def test_check_block_tampered_payload_stale_ids(row: int) -> None:
    payload = BLOCK2.txs.column("payload")[row].as_py() or b"\x00"
    txs = _tamper_column(BLOCK2.txs, "payload", row, bytes([payload[0] ^ 1]) + payload[1:])
    _assert_invalid_block(dataclasses.replace(BLOCK2, txs=txs), BLOCK1.header, "tx_id column")


@pytest.mark.parametrize("column", ["payload", "nonce", "kind"])
def test_check_block_tampered_body_with_matching_ids(column: str) -> None:
    value = BLOCK2.txs.column(column)[1].as_py()
    if column == "payload":
        value = bytes([value[0] ^ 1]) + value[1:]
    else:  # a nonce one off, or the other kind executed
        value = 3 - value if column == "kind" else value ^ 1
    txs = validate_batch(_tamper_column(BLOCK2.txs, column, 1, value), chain_id=CHAIN)
    _assert_invalid_block(dataclasses.replace(BLOCK2, txs=txs), BLOCK1.header, "tx_root")


def test_check_block_reordered_rows() -> None:
    txs = pa.concat_batches([BLOCK2.txs.slice(1, 1), BLOCK2.txs.slice(0, 1), BLOCK2.txs.slice(2)])
    _assert_invalid_block(dataclasses.replace(BLOCK2, txs=txs), BLOCK1.header, "tx_root")


@pytest.mark.parametrize(("column", "value"), [("result", b"R"), ("status", 9)])
def test_check_block_tampered_result(column: str, value: object) -> None:
    results = _tamper_column(BLOCK2.results, column, 1, value)
    _assert_invalid_block(
        dataclasses.replace(BLOCK2, results=results), BLOCK1.header, "result_root"
    )
