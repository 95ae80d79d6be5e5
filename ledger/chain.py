"""The validator's block builder: a proposed block's payload is executed, not just named.

``LedgerBuilder`` implements the consensus ``BlockBuilder`` protocol over real batches: a block
names batch digests; its body is those batches' rows in order; it is executed on its parent's
(possibly uncommitted) state; and its header commits to the tx root, the result root and the
resulting state root. A voter re-executes the block and votes only if every field matches, so
a QC certifies the state as well as the order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from rayledger.block import (
    Block,
    BlockHeader,
    QuorumCert,
    child_header,
    compute_tx_root,
    result_leaf_hashes,
)
from rayledger.errors import InvalidBatch, InvalidBlock, InvalidSignature
from rayledger.execution import StateView, Status, execute_block, nonce_key
from rayledger.kernels import as_offsets_and_values
from rayledger.tx import TX_SCHEMA, tx_ids_of, validate_batch, verify_signatures

log = logging.getLogger(__name__)

# The body of a block without batches (immutable: shared)
_EMPTY_BODY = pa.RecordBatch.from_pylist([], schema=TX_SCHEMA)

# Gaps (a sender, the nonce it is missing) a leader remembers having found: the oldest are
# forgotten past this many (one found again is then waited for again, once)
GAPS_KEEP = 65_536
# Passes a leader's proposal may take to put batches behind a gap after the ones ahead of
# them (each one execution of the block); past them, those still behind one are left out
# while they may wait
REORDER_PASSES = 4
# A batch is refused whole for one bad signature: in a batch of at least SPOT_MIN_ROWS rows,
# SPOT_ROWS rows drawn at random are verified first, then the others, so that a batch of
# forged rows (a flood) costs its sample rather than every row, each about three times over
# (a signature libsodium refuses is checked again by OpenSSL). A sound batch has each row
# verified once, as without the sample: it costs one more call (about 50 us here).
SPOT_ROWS = 32
SPOT_MIN_ROWS = 2 * SPOT_ROWS
_spot_rng = np.random.default_rng()  # seeded from the OS: a sender cannot predict the rows


def batch_digest(batch: pa.RecordBatch) -> bytes:
    """A batch is named by the RFC 6962 root of its transaction ids, in order."""
    return compute_tx_root(tx_ids_of(batch))


def admit_batch(
    batch: pa.RecordBatch,
    digest: bytes,
    *,
    chain_id: bytes,
    max_payload: int,
    check_signatures: bool = True,
) -> pa.RecordBatch:
    """Check a batch that another institution's mempool disseminated, as if nobody had.

    Returns the batch in canonical form; raises a ``LedgerError`` naming the first problem:
    its shape, an id column that is not the ids of its content, a digest that does not name
    it, or any signature that does not verify. ``check_signatures=False`` is for a batch this
    institution's own mempool verified and sealed under this digest (authenticated by the
    caller): everything else is still checked.
    """
    canonical = validate_batch(batch, chain_id=chain_id, max_payload=max_payload)
    # Verify a supplied id column is the ids of the content (then the batch can be used as is)
    if "tx_id" in batch.schema.names and not np.array_equal(tx_ids_of(batch), tx_ids_of(canonical)):
        raise InvalidBatch("the tx_id column differs from the transactions' content")
    if batch_digest(canonical) != digest:
        raise InvalidBatch("the batch does not match its digest")
    if not check_signatures:
        return canonical
    # The canonical ids were derived just now from the content: not hashed a second time
    ids = tx_ids_of(canonical)
    rest = None
    if canonical.num_rows >= SPOT_MIN_ROWS:
        spot = np.sort(_spot_rng.choice(canonical.num_rows, SPOT_ROWS, replace=False))
        _refuse_bad_row(verify_signatures(canonical, chain_id, ids=ids, rows=spot), spot)
        rest = np.ones(canonical.num_rows, bool)
        rest[spot] = False
        rest = np.flatnonzero(rest)
    _refuse_bad_row(verify_signatures(canonical, chain_id, ids=ids, rows=rest), rest)
    return canonical


def _refuse_bad_row(valid: np.ndarray, rows: np.ndarray | None) -> None:
    """``InvalidSignature`` naming the first row (of ``rows``, else of the batch) that failed."""
    if not bool(valid.all()):
        first = int(np.argmin(valid))
        row = first if rows is None else int(rows[first])
        raise InvalidSignature(f"row {row} of the batch has a bad signature")


# The most payload bytes a block may hold: its body is one Arrow batch, whose binary column
# holds at most 2 GiB (combined past it, Arrow splits the column in chunks, and a body read as
# its first chunk dropped the other rows: they were never executed, yet their batches counted
# as ordered). A leader leaves out a batch that would take its block past it (as for rows);
# a voter refuses a block over it.
MAX_BLOCK_PAYLOAD_BYTES = 1 << 30


def payload_bytes(batch: pa.RecordBatch) -> int:
    """The bytes of a batch's payloads (its rows' offsets: the same for any buffer layout)."""
    offsets = as_offsets_and_values(batch.column("payload"))[1]
    return int(offsets[-1]) - int(offsets[0])


class LedgerBuilder:
    """Builds and checks blocks by executing them; one per validator.

    ``batches`` maps digest -> canonical TxBatch (rows already admitted: schema, limits,
    signatures, and the digest, which is ``batch_digest`` of the batch). ``base`` is the
    committed state at ``head``.
    """

    def __init__(
        self,
        batches: Mapping[bytes, pa.RecordBatch],
        head: BlockHeader,
        base: StateView,
        max_txs: int | None = None,
    ) -> None:
        """``max_txs``: the most rows a block may hold (the genesis ``max_block_txs``): a
        block built here holds no more, and one proposed with more is refused."""
        self.batches = batches
        self.max_txs = max_txs
        self.base = base
        self.head = head
        self._views: dict[bytes, StateView] = {head.hash: base}
        self._bodies: dict[bytes, tuple[pa.RecordBatch, pa.RecordBatch, np.ndarray]] = {}
        self._headers: dict[bytes, BlockHeader] = {}
        # Batches a proposal of ours left out to wait for an earlier one, and rows it
        # proposed that failed for want of their senders' earlier nonces (``build``)
        self.deferred = 0
        self.gap_rows_proposed = 0
        # Gaps found by our proposals: (sender, the nonce it is missing) -> when first found
        # (a proposal's timestamp), oldest first: a gap is waited for from then, not anew
        # for each batch that has rows behind it
        self._gap_seen: OrderedDict[tuple[bytes, int], int] = OrderedDict()

    def body_rows(self, digests: Sequence[bytes]) -> pa.RecordBatch:
        parts = [self.batches[d] for d in digests]
        if not parts:
            return _EMPTY_BODY
        table = pa.Table.from_batches([p.select(TX_SCHEMA.names) for p in parts])
        combined = table.combine_chunks().to_batches()
        if len(combined) > 1:  # past Arrow's 2 GiB: never a block (MAX_BLOCK_PAYLOAD_BYTES)
            raise InvalidBlock(f"a block body of {table.num_rows} rows does not fit one batch")
        return combined[0] if combined else _EMPTY_BODY

    def build(
        self,
        parent: BlockHeader,
        round_: int,
        proposer: bytes,
        timestamp_ms: int,
        digests: tuple[bytes, ...],
        may_wait: Callable[[bytes, int], bool] | None = None,
    ) -> BlockHeader:
        """Execute a child of ``parent`` and remember it (a header known already keeps its
        first execution: blocks built on it point to that one).

        ``may_wait`` (our own proposal): a batch with rows that fail because their sender's
        earlier nonces are not ahead of them (``gaps_and_missing``) is moved after the block's other
        batches, or left out if ``may_wait(digest, found_ms)``, and the block executed again,
        so that it does not burn those rows before the batch ahead of it is ordered (a
        leader's choice: voters execute the digests the header names, in its order).
        ``found_ms``: when a proposal of ours first found the latest found of the batch's
        gaps (a sender and the nonce it is missing), this proposal's ``timestamp_ms`` for a
        new one. A gap is waited for once: a sender that skipped a nonce, whose later rows
        all fail, makes batches wait only until its gap is old, not each one anew."""
        parent_view = self._views.get(parent.hash)
        if parent_view is None:
            raise KeyError("the parent block has not been executed here")
        digests = self._fit(digests)
        txs = self.body_rows(digests)
        view, results, state_root = execute_block(
            parent_view, txs, parent.height + 1, parent.state_root
        )
        # A batch with gap rows goes after the others (the batch ahead of it may be among
        # them: batches reach a validator out of order after a partition or a restart), those
        # nearest to their senders' next nonces first; one still with gap rows there is left
        # out while it may wait. Each change can open a gap for another batch (rows of its
        # senders moved or went): a few passes settle it, each rare and each one execution.
        # Past REORDER_PASSES every pass leaves batches out, or ends.
        gaps = np.empty(0, np.int64)
        if may_wait is not None:
            gaps, missing = gaps_and_missing(parent_view, txs, results)
            passes = 0
            while True:
                passes += 1
                held = self._gap_distances(digests, txs, gaps, missing)
                order = [d for i, d in enumerate(digests) if i not in held]
                order += [digests[i] for i in sorted(held, key=lambda i: (held[i], i))]
                if tuple(order) == digests or passes > REORDER_PASSES:
                    found = self._gaps_found(digests, txs, gaps, missing, timestamp_ms)
                    waiting = {i for i in held if may_wait(digests[i], found[i])}
                    if not waiting:
                        break
                    self.deferred += len(waiting)
                    order = [d for i, d in enumerate(digests) if i not in waiting]
                digests = tuple(order)
                txs = self.body_rows(digests)
                view, results, state_root = execute_block(
                    parent_view, txs, parent.height + 1, parent.state_root
                )
                gaps, missing = gaps_and_missing(parent_view, txs, results)
        if len(gaps):
            self.gap_rows_proposed += len(gaps)
            log.warning(
                "block %d: %d rows go in ahead of their senders' earlier nonces and fail"
                " (batches %s waited their time)",
                parent.height + 1,
                len(gaps),
                ", ".join(digests[i].hex()[:12] for i in self._batches_of(digests, gaps)),
            )
        ids = tx_ids_of(txs) if txs.num_rows else np.empty((0, 32), np.uint8)
        leaves = result_leaf_hashes(ids, results) if len(ids) else np.empty((0, 32), np.uint8)
        header = child_header(
            parent,
            ids,
            results,
            round_=round_,
            proposer=proposer,
            timestamp_ms=timestamp_ms,
            state_root=state_root,
            batch_digests=digests,
            result_leaves=leaves,
            # A batch's digest is the root of its ids (checked when it was admitted), so a
            # block of one batch has it for its tx root: not hashed again
            tx_root=digests[0] if len(digests) == 1 else None,
        )
        if header.hash in self._headers:
            return header
        self._views[header.hash] = view
        self._bodies[header.hash] = (txs, results, leaves)
        self._headers[header.hash] = header
        return header

    def _gap_distances(
        self, digests: Sequence[bytes], txs: pa.RecordBatch, gaps: np.ndarray, missing: np.ndarray
    ) -> dict[int, int]:
        """For each batch with gap rows (its position in ``digests``), how far ahead of its
        sender's next nonce its nearest gap row is."""
        if not len(gaps):
            return {}
        where = self._batch_of_rows(digests, gaps)
        nonces = txs.column("nonce").to_numpy(zero_copy_only=False).astype(np.uint64)
        ahead = nonces[gaps] - missing.astype(np.uint64)
        batches, starts = np.unique(where, return_index=True)  # gaps are in row order
        nearest = np.minimum.reduceat(ahead, starts)
        return dict(zip(batches.tolist(), nearest.tolist(), strict=True))

    def _gaps_found(
        self,
        digests: Sequence[bytes],
        txs: pa.RecordBatch,
        gaps: np.ndarray,
        missing: np.ndarray,
        now_ms: int,
    ) -> dict[int, int]:
        """For each batch with gap rows (its position in ``digests``), when our proposals
        first found the latest found of its gaps; new ones are found at ``now_ms``."""
        if not len(gaps):
            return {}
        where = self._batch_of_rows(digests, gaps).astype(">i8")
        n = txs.num_rows
        senders = np.ascontiguousarray(as_offsets_and_values(txs.column("sender"))[0])
        keys = np.concatenate(
            [
                where.view(np.uint8).reshape(-1, 8),
                senders.reshape(n, 32)[gaps],
                missing.astype(">u8").view(np.uint8).reshape(-1, 8),
            ],
            axis=1,
        )
        found: dict[int, int] = {}
        for key in np.unique(keys.view(np.dtype((np.void, 48))).ravel()):
            raw = bytes(key)
            gap = (raw[8:40], int.from_bytes(raw[40:], "big"))
            at = self._gap_seen.setdefault(gap, now_ms)
            if len(self._gap_seen) > GAPS_KEEP:
                self._gap_seen.popitem(last=False)
            i = int.from_bytes(raw[:8], "big")
            found[i] = max(found.get(i, at), at)
        return found

    def _batch_of_rows(self, digests: Sequence[bytes], rows: np.ndarray) -> np.ndarray:
        """For each of the body rows ``rows``, the position in ``digests`` of its batch."""
        ends = np.cumsum([self.batches[d].num_rows for d in digests])
        return np.searchsorted(ends, rows, side="right")

    def _batches_of(self, digests: Sequence[bytes], rows: np.ndarray) -> list[int]:
        """The positions in ``digests`` of the batches holding body rows ``rows``."""
        if not len(rows):
            return []
        return np.unique(self._batch_of_rows(digests, rows)).tolist()

    def _fit(self, digests: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """The batches, in order, that fit in one block: each that would take the block past
        ``max_txs`` rows is left for a later one (the batches after it are still taken while
        they fit, so a large batch does not hold small ones back)."""
        room = self.max_txs if self.max_txs is not None else 1 << 62
        room_bytes = MAX_BLOCK_PAYLOAD_BYTES
        taken = []
        for d in digests:
            rows, size = self.batches[d].num_rows, payload_bytes(self.batches[d])
            if rows <= room and size <= room_bytes:
                taken.append(d)
                room -= rows
                room_bytes -= size
        return digests if len(taken) == len(digests) else tuple(taken)

    def check(self, block: BlockHeader, parent: BlockHeader) -> str | None:
        if parent.hash not in self._views:
            return "parent state unknown"
        if any(d not in self.batches for d in block.batch_digests):
            return "a named batch is not held"
        if self.max_txs is not None:
            rows = sum(self.batches[d].num_rows for d in block.batch_digests)
            if rows > self.max_txs:
                return f"{rows} rows exceed the block limit of {self.max_txs}"
        size = sum(payload_bytes(self.batches[d]) for d in block.batch_digests)
        if size > MAX_BLOCK_PAYLOAD_BYTES:
            return f"{size} payload bytes exceed the block limit of {MAX_BLOCK_PAYLOAD_BYTES}"
        if block.hash in self._headers and block.parent_hash == parent.hash:
            # This builder executed exactly this header already (a leader checking its own
            # proposal, a proposal delivered twice): the hash covers every field, so the
            # execution stands and is not repeated
            return None
        known = len(self._headers)
        expected = self.build(
            parent, block.round, block.proposer, block.timestamp_ms, block.batch_digests
        )
        if expected == block:
            return None
        if len(self._headers) > known:
            # Forget only this refused check's own execution: the header it yields may be one
            # built or accepted here before, under another proposal that differs in a root
            self._forget(expected.hash)
        for name in ("tx_count", "tx_root", "result_root", "state_root"):
            if getattr(expected, name) != getattr(block, name):
                return f"{name} differs from this validator's execution"
        return "header differs from this validator's execution"

    def _forget(self, block_hash: bytes) -> None:
        self._views.pop(block_hash, None)
        self._bodies.pop(block_hash, None)
        self._headers.pop(block_hash, None)

    def writes_of(self, block_hash: bytes) -> dict[bytes, bytes]:
        """The state an executed, not yet committed block writes (a copy)."""
        return dict(self._views[block_hash].writes)

    def result_leaves_of(self, block_hash: bytes) -> np.ndarray:
        """The ``(n, 32)`` result leaf hashes of an executed, not yet committed block (as
        hashed for its ``result_root``; storage keeps them for inclusion proofs)."""
        return self._bodies[block_hash][2]

    def commit(self, block_hash: bytes, parent_qc: QuorumCert) -> Block:
        """Fold a committed block's writes into the base state; return the block to store.

        Blocks must be committed in order; forks below the new head are dropped."""
        header = self._headers[block_hash]
        if header.parent_hash != self.head.hash:
            raise ValueError(f"height {header.height} does not extend the committed head")
        view = self._views[block_hash]
        self.base.absorb(header.height, view.writes)
        view.writes.clear()
        view.parent = self.base
        txs, results, _ = self._bodies[block_hash]
        self._views.pop(self.head.hash, None)
        self.head = header
        for h in [h for h, b in self._headers.items() if b.height <= header.height]:
            self._forget(h)
        self._views[header.hash] = view
        return Block(header, txs, results, parent_qc)


def gaps_and_missing(
    parent_view: StateView, txs: pa.RecordBatch, results: pa.RecordBatch
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an executed body that failed ``BAD_NONCE`` because their nonce is ahead of
    their sender's next one (an earlier nonce is missing: a gap), not behind it (a replay).

    A row's sender's next nonce is its nonce in ``parent_view`` plus the sender's rows before
    it that consumed one (every status but ``BAD_NONCE``). Only the senders of failed rows
    are looked at: a body without ``BAD_NONCE`` costs one comparison.

    Returned with them: for each, the nonce its sender is missing there (its next one)."""
    status = results.column("status").to_numpy(zero_copy_only=False)
    failed = status == int(Status.BAD_NONCE)
    if not failed.any():
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    n = txs.num_rows
    senders = np.ascontiguousarray(as_offsets_and_values(txs.column("sender"))[0]).reshape(n, 32)
    keyed = senders.view(np.dtype((np.void, 32))).ravel()
    nonces = txs.column("nonce").to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
    consumed = ~failed
    out: list[np.ndarray] = []
    next_nonce: list[np.ndarray] = []
    for sender in np.unique(keyed[failed]):
        rows = np.flatnonzero(keyed == sender)
        used = consumed[rows]
        base = parent_view.get_u64(nonce_key(bytes(sender)))
        expected = np.uint64(base) + (np.cumsum(used) - used).astype(np.uint64)
        ahead = ~used & (nonces[rows] > expected)
        out.append(rows[ahead])
        next_nonce.append(expected[ahead])
    gaps = np.concatenate(out)
    order = np.argsort(gaps, kind="stable")
    return gaps[order], np.concatenate(next_nonce)[order]
