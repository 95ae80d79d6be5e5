"""Receipts: offline proof that a transaction was committed, and with what result.

A receipt carries the signed transaction, where it sits (height, index), its status and
result, two RFC 6962 audit paths (the transaction id under the block's ``tx_root``; the leaf
``tx_id | status | result`` under its ``result_root``), the block header, and a commit proof:
the headers from that block up to a committed block ``c`` (each naming the previous one as
parent), a QC certifying ``c``, ``c``'s child in the next round and a QC certifying that child.
That is the two-chain commit rule, so anyone holding only the validator set's public keys can
check the receipt; no node is trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from rayledger.block import BlockHeader, QuorumCert, verify_qc
from rayledger.codec import Reader, u8, u16, u32, u64, var_bytes
from rayledger.config import ValidatorSet
from rayledger.crypto import small_order_mask
from rayledger.errors import (
    DecodeError,
    InvalidQuorumCert,
    InvalidReceipt,
    LedgerError,
    UnknownVersion,
    WrongLength,
)
from rayledger.kernels import ed25519_verify_batch
from rayledger.merkle import HASH_SIZE, verify_inclusion
from rayledger.tx import Transaction, decode_tx

RECEIPT_VERSION = 1
# Bounds a decoder applies before allocating: a tree of 2**64 leaves has 64-hash paths
_MAX_PATH = 64


@dataclass(frozen=True)
class CommitProof:
    """Block ``header`` is committed: ``qc`` certifies it, ``child`` extends it in the next
    round, and ``child_qc`` certifies the child (Jolteon's two-chain rule)."""

    header: BlockHeader
    qc: QuorumCert
    child: BlockHeader
    child_qc: QuorumCert

    def encode(self) -> bytes:
        return b"".join(
            var_bytes(x)
            for x in (
                self.header.encode(),
                self.qc.encode(),
                self.child.encode(),
                self.child_qc.encode(),
            )
        )

    @classmethod
    def read(cls, r: Reader) -> CommitProof:
        return cls(
            BlockHeader.decode(r.var_bytes("committed header", 1 << 24)),
            QuorumCert.decode(r.var_bytes("committed qc", 1 << 20)),
            BlockHeader.decode(r.var_bytes("child header", 1 << 24)),
            QuorumCert.decode(r.var_bytes("child qc", 1 << 20)),
        )


@dataclass(frozen=True)
class Receipt:
    tx: Transaction
    height: int
    index: int
    status: int
    result: bytes
    tx_proof: tuple[bytes, ...]
    result_proof: tuple[bytes, ...]
    header: BlockHeader
    # Headers height+1 .. commit.header.height, in order (empty when the block itself is the
    # one the commit proof names)
    chain: tuple[BlockHeader, ...]
    commit: CommitProof

    @property
    def tx_id(self) -> bytes:
        return self.tx.tx_id

    def encode(self) -> bytes:
        parts = [
            u8(RECEIPT_VERSION),
            var_bytes(self.tx.encode()),
            u64(self.height),
            u32(self.index),
            u8(self.status),
            var_bytes(self.result),
            u8(len(self.tx_proof)),
            *self.tx_proof,
            u8(len(self.result_proof)),
            *self.result_proof,
            var_bytes(self.header.encode()),
            u16(len(self.chain)),
            *(var_bytes(h.encode()) for h in self.chain),
            self.commit.encode(),
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_payload: int = 1 << 20) -> Receipt:
        """Parse a receipt; malformed bytes raise a ``DecodeError`` naming the field. Parsing
        checks nothing cryptographic: call ``verify_receipt``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):  # a peer's answer: anything
            raise DecodeError(f"receipt: {type(data).__name__}, not bytes")
        r = Reader(data, "receipt")
        version = r.u8("version")
        if version != RECEIPT_VERSION:
            raise UnknownVersion(f"receipt version {version} (supported: {RECEIPT_VERSION})")
        tx = decode_tx(r.var_bytes("transaction", max_payload + 256), max_payload=max_payload)
        height = r.u64("height")
        index = r.u32("index")
        status = r.u8("status")
        result = r.var_bytes("result", max_payload)
        tx_proof = _read_path(r, "tx proof")
        result_proof = _read_path(r, "result proof")
        header = BlockHeader.decode(r.var_bytes("header", 1 << 24))
        count = r.u16("chain length")
        chain = tuple(
            BlockHeader.decode(r.var_bytes("chain header", 1 << 24)) for _ in range(count)
        )
        commit = CommitProof.read(r)
        r.finish()
        return cls(tx, height, index, status, result, tx_proof, result_proof, header, chain, commit)


def _read_path(r: Reader, what: str) -> tuple[bytes, ...]:
    count = r.u8(f"{what} length")
    if count > _MAX_PATH:
        raise WrongLength(f"receipt: {what} of {count} hashes exceeds {_MAX_PATH}")
    return tuple(r.fixed(HASH_SIZE, what) for _ in range(count))


def result_leaf(tx_id: bytes, status: int, result: bytes) -> bytes:
    """The ``result_root`` leaf of one transaction (see ``block.compute_result_root``)."""
    return tx_id + bytes([status]) + result


def verify_receipt(
    receipt: Receipt, validators: ValidatorSet, chain_id: bytes, genesis_hash: bytes
) -> None:
    """Raise ``InvalidReceipt`` naming the first check that fails; return if the receipt proves
    that its transaction was committed at ``height``/``index`` with ``status``/``result``.
    A receipt built in memory with a field of the wrong type or range (a status of 256, a
    string for bytes) is an ``InvalidReceipt`` too."""
    try:
        _verify_receipt(receipt, validators, chain_id, genesis_hash)
    except LedgerError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, struct.error) as exc:
        raise InvalidReceipt(f"a malformed field: {exc}") from exc


def _verify_receipt(
    receipt: Receipt, validators: ValidatorSet, chain_id: bytes, genesis_hash: bytes
) -> None:
    tx, header = receipt.tx, receipt.header
    if tx.chain_id != chain_id or header.chain_id != chain_id:
        raise InvalidReceipt("the transaction or its block belongs to another chain")
    if len(tx.signature) != 64:
        raise InvalidReceipt("the transaction carries no signature")
    ok = ed25519_verify_batch(
        np.frombuffer(tx.sender, np.uint8).reshape(1, 32),
        np.frombuffer(tx.signature, np.uint8).reshape(1, 64),
        np.frombuffer(tx.tx_id, np.uint8).reshape(1, 32),
    )
    if small_order_mask(np.frombuffer(tx.sender, np.uint8))[0]:
        raise InvalidReceipt("the sender's key is a point of small order")
    if not bool(ok[0]):
        raise InvalidReceipt("the sender's signature over the transaction id does not verify")
    if receipt.height != header.height or receipt.height < 1:
        raise InvalidReceipt(f"height {receipt.height} is not the header's ({header.height})")
    if not verify_inclusion(
        tx.tx_id, receipt.index, header.tx_count, receipt.tx_proof, header.tx_root
    ):
        raise InvalidReceipt("the transaction's inclusion proof does not match the tx root")
    leaf = result_leaf(tx.tx_id, receipt.status, receipt.result)
    if not verify_inclusion(
        leaf, receipt.index, header.tx_count, receipt.result_proof, header.result_root
    ):
        raise InvalidReceipt("the status and result do not match the block's result root")
    cursor = header
    for h in receipt.chain:
        if h.parent_hash != cursor.hash or h.height != cursor.height + 1:
            raise InvalidReceipt(f"header {h.height} does not extend header {cursor.height}")
        cursor = h
    proof = receipt.commit
    if proof.header != cursor:
        raise InvalidReceipt("the commit proof is for another block than the header chain's end")
    if proof.child.parent_hash != cursor.hash or proof.child.height != cursor.height + 1:
        raise InvalidReceipt("the commit proof's child does not extend the committed block")
    if proof.child.round != cursor.round + 1:
        raise InvalidReceipt("the child is not in the next round: no two-chain commit")
    for qc, certified in ((proof.qc, cursor), (proof.child_qc, proof.child)):
        if qc.block_hash != certified.hash or qc.round != certified.round:
            raise InvalidReceipt(f"a QC names another block than height {certified.height}")
        try:
            verify_qc(qc, validators.public_keys, validators.quorum, chain_id, genesis_hash)
        except InvalidQuorumCert as exc:
            raise InvalidReceipt(f"QC for height {certified.height}: {exc.message}") from exc


def receipt_ok(
    receipt: Receipt, validators: ValidatorSet, chain_id: bytes, genesis_hash: bytes
) -> bool:
    try:
        verify_receipt(receipt, validators, chain_id, genesis_hash)
    except LedgerError:
        return False
    return True
