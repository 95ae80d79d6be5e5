"""Blocks, their headers and hashes, and quorum certificates.

``block_hash = SHA-256(canonical header bytes)``. A block carries its body (a canonical
TxBatch), the execution results of its rows, and the quorum certificate of its parent.
Header layout (big-endian)::

    version u8 | chain_id 32B | height u64 | round u64 | parent_hash 32B | proposer 32B
    | timestamp_ms u64 | tx_count u32 | tx_root 32B | result_root 32B | state_root 32B
    | n_batches u32 | batch_digests n*32B
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from rayledger.codec import Reader, fixed, u8, u16, u32, u64
from rayledger.errors import InvalidBlock, InvalidQuorumCert, UnknownVersion, WrongLength
from rayledger.kernels import ed25519_verify_batch, merkle_root_of_leaf_hashes, sha256_rows
from rayledger.kernels import merkle_root as kernel_merkle_root
from rayledger.merkle import EMPTY_ROOT
from rayledger.tx import TX_SCHEMA, compute_tx_ids, tx_ids_of

BLOCK_VERSION = 1
ZERO_HASH = bytes(32)
MAX_BATCH_DIGESTS = 1 << 16
_VOTE_DOMAIN = b"rayledger/vote/v1"

RESULT_FIELDS = (
    pa.field("status", pa.uint8(), nullable=False),
    pa.field("result", pa.binary(), nullable=False),
)
RESULT_SCHEMA = pa.schema(RESULT_FIELDS)
# What a block's rows look like at rest: the TxBatch columns followed by the results.
BLOCK_ROW_SCHEMA = pa.schema([*TX_SCHEMA, *RESULT_FIELDS])


@dataclass(frozen=True)
class BlockHeader:
    chain_id: bytes
    height: int
    round: int
    parent_hash: bytes
    proposer: bytes
    timestamp_ms: int
    tx_count: int
    tx_root: bytes
    result_root: bytes
    state_root: bytes = ZERO_HASH
    batch_digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        for name in ("chain_id", "parent_hash", "proposer", "tx_root", "result_root", "state_root"):
            fixed(getattr(self, name), 32, name)
        for digest in self.batch_digests:
            fixed(digest, 32, "batch digest")
        if len(self.batch_digests) > MAX_BATCH_DIGESTS:
            raise WrongLength(f"{len(self.batch_digests)} batch digests exceed {MAX_BATCH_DIGESTS}")

    def encode(self) -> bytes:
        return b"".join(
            [
                u8(BLOCK_VERSION),
                self.chain_id,
                u64(self.height),
                u64(self.round),
                self.parent_hash,
                self.proposer,
                u64(self.timestamp_ms),
                u32(self.tx_count),
                self.tx_root,
                self.result_root,
                self.state_root,
                u32(len(self.batch_digests)),
                *self.batch_digests,
            ]
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> BlockHeader:
        r = Reader(data, "block header")
        version = r.u8("version")
        if version != BLOCK_VERSION:
            raise UnknownVersion(f"block header version {version} (supported: {BLOCK_VERSION})")
        chain_id = r.fixed(32, "chain_id")
        height = r.u64("height")
        round_ = r.u64("round")
        parent_hash = r.fixed(32, "parent_hash")
        proposer = r.fixed(32, "proposer")
        timestamp_ms = r.u64("timestamp_ms")
        tx_count = r.u32("tx_count")
        tx_root = r.fixed(32, "tx_root")
        result_root = r.fixed(32, "result_root")
        state_root = r.fixed(32, "state_root")
        n_digests = r.u32("n_batches")
        if n_digests > MAX_BATCH_DIGESTS:
            raise WrongLength(f"{n_digests} batch digests exceed {MAX_BATCH_DIGESTS}")
        digests = tuple(r.fixed(32, "batch digest") for _ in range(n_digests))
        r.finish()
        return cls(
            chain_id,
            height,
            round_,
            parent_hash,
            proposer,
            timestamp_ms,
            tx_count,
            tx_root,
            result_root,
            state_root,
            digests,
        )

    @cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()


def vote_message(chain_id: bytes, block_hash: bytes, round_: int) -> bytes:
    """The 32-byte message a validator signs to vote for ``block_hash`` in ``round_``."""
    return hashlib.sha256(_VOTE_DOMAIN + chain_id + block_hash + u64(round_)).digest()


@dataclass(frozen=True)
class QuorumCert:
    """2f+1 votes for one block: a signer bitmap (bit i = validator i, LSB first) and signatures
    in ascending validator order."""

    block_hash: bytes
    round: int
    signers: bytes
    signatures: tuple[bytes, ...] = field(default=())

    def __post_init__(self) -> None:
        fixed(self.block_hash, 32, "qc block_hash")
        for sig in self.signatures:
            fixed(sig, 64, "qc signature")

    @classmethod
    def genesis(cls, genesis_hash: bytes) -> QuorumCert:
        """The certificate that the genesis block carries implicitly: round 0, no signers."""
        return cls(genesis_hash, 0, b"", ())

    def signer_indices(self) -> list[int]:
        bits = np.unpackbits(np.frombuffer(self.signers, np.uint8), bitorder="little")
        return [int(i) for i in np.flatnonzero(bits)]

    def encode(self) -> bytes:
        return b"".join(
            [
                self.block_hash,
                u64(self.round),
                u16(len(self.signers)),
                self.signers,
                *self.signatures,
            ]
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> QuorumCert:
        r = Reader(data, "quorum certificate")
        block_hash = r.fixed(32, "block_hash")
        round_ = r.u64("round")
        signers = r.fixed(r.u16("bitmap length"), "signer bitmap")
        count = int(np.unpackbits(np.frombuffer(signers, np.uint8)).sum())
        signatures = tuple(r.fixed(64, "signature") for _ in range(count))
        r.finish()
        return cls(block_hash, round_, signers, signatures)


def make_bitmap(indices: Sequence[int], n: int) -> bytes:
    """The signer bitmap of validators ``indices`` out of ``n`` (bit i = validator i)."""
    if any(not 0 <= i < n for i in indices):
        raise ValueError(f"signer indices must lie in 0..{n - 1}")
    bits = np.zeros(-(-n // 8) * 8, np.uint8)
    bits[list(indices)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def verify_qc(
    qc: QuorumCert,
    public_keys: np.ndarray,
    quorum: int,
    chain_id: bytes,
    genesis_hash: bytes,
) -> None:
    """Raise ``InvalidQuorumCert`` unless ``qc`` carries a quorum of valid votes.

    ``public_keys`` is the validator set's ``(n, 32)`` key array in index order.
    """
    if qc.round == 0 and not qc.signers:
        # Verify the unsigned certificate is only ever the genesis one
        if qc.block_hash != genesis_hash or qc.signatures:
            raise InvalidQuorumCert("an unsigned certificate may only certify genesis")
        return
    n = len(public_keys)
    # Verify the bitmap has one bit per validator and no bits beyond them
    if len(qc.signers) != -(-n // 8):
        raise InvalidQuorumCert(f"signer bitmap of {len(qc.signers)} bytes for {n} validators")
    indices = qc.signer_indices()
    if indices and indices[-1] >= n:
        raise InvalidQuorumCert(f"signer bitmap names validator {indices[-1]} of {n}")
    # Verify there is a quorum of distinct signers
    if len(indices) < quorum:
        raise InvalidQuorumCert(f"{len(indices)} signers, quorum is {quorum}")
    if len(qc.signatures) != len(indices):
        raise InvalidQuorumCert(f"{len(qc.signatures)} signatures for {len(indices)} signers")
    msg = np.frombuffer(vote_message(chain_id, qc.block_hash, qc.round), np.uint8)
    ok = ed25519_verify_batch(
        public_keys[indices],
        np.frombuffer(b"".join(qc.signatures), np.uint8).reshape(-1, 64),
        np.tile(msg, (len(indices), 1)),
    )
    # Verify every signature, not only a quorum of them: a QC with a forged vote is invalid
    if not ok.all():
        raise InvalidQuorumCert(f"bad vote signature from validator {indices[int(np.argmin(ok))]}")


def compute_tx_root(tx_ids: np.ndarray) -> bytes:
    """RFC 6962 root over the transaction ids, in block order (batch kernel, any backend)."""
    return kernel_merkle_root(np.asarray(tx_ids, np.uint8).reshape(-1, 32))


def compute_result_root(tx_ids: np.ndarray, results: pa.RecordBatch) -> bytes:
    """RFC 6962 root over the leaves ``tx_id | status u8 | result``, in block order."""
    return merkle_root_of_leaf_hashes(result_leaf_hashes(tx_ids, results))


def result_leaf_hashes(tx_ids: np.ndarray, results: pa.RecordBatch) -> np.ndarray:
    """``(n, 32)`` leaf hashes ``SHA-256(0x00 | tx_id | status u8 | result)`` of a block."""
    status = results.column("status").to_numpy(zero_copy_only=False).astype(np.uint8)
    n = len(status)
    # The leaf prefix 0x00 goes into the row head, so one bulk call yields the leaf hashes.
    head = np.concatenate(
        [np.zeros((n, 1), np.uint8), tx_ids.reshape(n, 32), status[:, None]], axis=1
    )
    return sha256_rows(head, results.column("result"))


@dataclass(frozen=True)
class Block:
    header: BlockHeader
    txs: pa.RecordBatch
    results: pa.RecordBatch
    parent_qc: QuorumCert

    @property
    def hash(self) -> bytes:
        return self.header.hash

    @property
    def height(self) -> int:
        return self.header.height

    def rows(self) -> pa.RecordBatch:
        """Body and results side by side, as stored."""
        return pa.RecordBatch.from_arrays(
            [*self.txs.columns, *self.results.columns], schema=BLOCK_ROW_SCHEMA
        )


def make_results(statuses: Sequence[int] | np.ndarray, results: Sequence[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(np.asarray(statuses, np.uint8), pa.uint8()), pa.array(results, pa.binary())],
        schema=RESULT_SCHEMA,
    )


def build_block(
    parent: BlockHeader,
    txs: pa.RecordBatch,
    results: pa.RecordBatch,
    *,
    round_: int,
    proposer: bytes,
    timestamp_ms: int,
    parent_qc: QuorumCert,
    state_root: bytes = ZERO_HASH,
    batch_digests: Sequence[bytes] = (),
) -> Block:
    """Assemble the child of ``parent`` over a canonical TxBatch and its execution results."""
    if txs.num_rows != results.num_rows:
        raise InvalidBlock(f"{txs.num_rows} transactions but {results.num_rows} results")
    body = txs.select([f.name for f in TX_SCHEMA]).cast(TX_SCHEMA)
    header = child_header(
        parent,
        tx_ids_of(body),
        results,
        round_=round_,
        proposer=proposer,
        timestamp_ms=timestamp_ms,
        state_root=state_root,
        batch_digests=batch_digests,
    )
    return Block(header, body, results.cast(RESULT_SCHEMA), parent_qc)


def child_header(
    parent: BlockHeader,
    tx_ids: np.ndarray,
    results: pa.RecordBatch,
    *,
    round_: int,
    proposer: bytes,
    timestamp_ms: int,
    state_root: bytes,
    batch_digests: Sequence[bytes],
    result_leaves: np.ndarray | None = None,
    tx_root: bytes | None = None,
) -> BlockHeader:
    """The header of ``parent``'s child whose rows have these ids and execution results
    (``result_leaves``: their ``result_leaf_hashes``, and ``tx_root``: the root of the ids,
    when the caller has them already)."""
    if result_leaves is None:
        result_leaves = result_leaf_hashes(tx_ids, results)
    return BlockHeader(
        chain_id=parent.chain_id,
        height=parent.height + 1,
        round=round_,
        parent_hash=parent.hash,
        proposer=proposer,
        timestamp_ms=timestamp_ms,
        tx_count=len(tx_ids),
        tx_root=compute_tx_root(tx_ids) if tx_root is None else tx_root,
        result_root=merkle_root_of_leaf_hashes(result_leaves),
        state_root=state_root,
        batch_digests=tuple(batch_digests),
    )


def genesis_header(
    chain_id: bytes, timestamp_ms: int, state_root: bytes = ZERO_HASH
) -> BlockHeader:
    return BlockHeader(
        chain_id=chain_id,
        height=0,
        round=0,
        parent_hash=ZERO_HASH,
        proposer=ZERO_HASH,
        timestamp_ms=timestamp_ms,
        tx_count=0,
        tx_root=EMPTY_ROOT,
        result_root=EMPTY_ROOT,
        state_root=state_root,
    )


def check_block(block: Block, parent: BlockHeader) -> None:
    """Raise ``InvalidBlock`` unless ``block`` is a well-formed child of ``parent``.

    Transaction ids are recomputed from the body, never read from its ``tx_id`` column.
    """
    h = block.header
    # Verify the block extends the parent on the same chain
    if h.chain_id != parent.chain_id:
        raise InvalidBlock(f"height {h.height}: chain id differs from the parent's")
    if h.height != parent.height + 1:
        raise InvalidBlock(f"height {h.height} does not follow parent height {parent.height}")
    if h.parent_hash != parent.hash:
        raise InvalidBlock(f"height {h.height}: parent hash does not match the parent block")
    if h.round <= parent.round and parent.height > 0:
        raise InvalidBlock(f"height {h.height}: round {h.round} not above parent's {parent.round}")
    # Verify the QC certifies the parent
    if block.parent_qc.block_hash != parent.hash or block.parent_qc.round != parent.round:
        raise InvalidBlock(f"height {h.height}: parent QC does not certify the parent")
    if block.txs.num_rows != h.tx_count or block.results.num_rows != h.tx_count:
        raise InvalidBlock(
            f"height {h.height}: header says {h.tx_count} transactions, body has "
            f"{block.txs.num_rows} and {block.results.num_rows} results"
        )
    ids = compute_tx_ids(block.txs, h.chain_id)
    # Verify the stored ids are the ids of the stored content
    if not np.array_equal(ids, tx_ids_of(block.txs)):
        raise InvalidBlock(f"height {h.height}: a tx_id column entry differs from its content")
    if compute_tx_root(ids) != h.tx_root:
        raise InvalidBlock(f"height {h.height}: tx_root does not match the body")
    if compute_result_root(ids, block.results) != h.result_root:
        raise InvalidBlock(f"height {h.height}: result_root does not match the results")
