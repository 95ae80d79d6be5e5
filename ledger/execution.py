"""Deterministic execution of ordered transactions: accounts and transfers, record anchoring.

State is a key-value map. A block is executed on a ``StateView`` of its parent's state, so
blocks that are certified but not yet committed can be executed speculatively (each branch has
its own view) and a view is folded into its parent when its block commits.

Rules, applied row by row in block order:

- every kind: the nonce must equal the sender's next nonce (else ``BAD_NONCE`` and nothing
  changes); otherwise the nonce is consumed, whatever the outcome of the kind's own rule;
- ``TRANSFER``: payload ``recipient 32B | amount u64``; no overdraft (``INSUFFICIENT_FUNDS``);
  the result is the sender's balance after it;
- ``ANCHOR``: payload ``digest 32B | metadata`` (metadata up to ``MAX_ANCHOR_METADATA``); a
  digest is anchored once (``ALREADY_ANCHORED``); the result is the anchoring height;
- other kinds are not executed yet and get ``UNSUPPORTED_KIND``.

The state root chains every block's write set:
``root_h = SHA-256("rayledger/state/v1" | root_{h-1} | SHA-256(sorted writes))``, so two
validators with equal roots applied the same writes in the same order.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain

import numpy as np
import pyarrow as pa

from rayledger.block import RESULT_SCHEMA
from rayledger.kernels import as_offsets_and_values, byte_rows, sha256_batch
from rayledger.tx import TxKind

MAX_ANCHOR_METADATA = 4096
_U64 = struct.Struct(">Q")
_STATE_DOMAIN = b"rayledger/state/v1"


class Status(IntEnum):
    OK = 0
    BAD_NONCE = 1
    INSUFFICIENT_FUNDS = 2
    BAD_PAYLOAD = 3
    UNSUPPORTED_KIND = 4
    ALREADY_ANCHORED = 5


def balance_key(account: bytes) -> bytes:
    return b"bal:" + account


def nonce_key(account: bytes) -> bytes:
    return b"non:" + account


def anchor_key(digest: bytes) -> bytes:
    return b"anc:" + digest


class StateView:
    """A layer of writes over a parent view (or over nothing: the base state)."""

    __slots__ = ("parent", "writes")

    def __init__(self, parent: StateView | None = None) -> None:
        self.parent = parent
        self.writes: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        view = self
        while True:
            value = view.writes.get(key)
            if value is not None:
                return value
            parent = view.parent
            if parent is None:
                return None
            if parent.__class__ is not StateView:  # a base that reads elsewhere (its disk)
                return parent.get(key)
            view = parent

    def present(self, keys: Collection[bytes]) -> set[bytes]:
        """The keys of ``keys`` this view holds a value for. One set operation a layer and
        no Python step per key: a block of anchors asks it of all its digests at once."""
        rest = keys if isinstance(keys, set) else set(keys)
        found: set[bytes] = set()
        view = self
        while rest:
            hit = view.writes.keys() & rest  # values are bytes, never None: held
            if hit:
                found |= hit
                rest = rest - hit
            parent = view.parent
            if parent is None:
                break
            if parent.__class__ is not StateView:  # a base that reads elsewhere (its disk)
                return found | parent.present(rest)
            view = parent
        return found

    def set(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def child(self) -> StateView:
        return StateView(self)

    def disk_base(self) -> StateView | None:
        """The base under this view when it reads a disk (it takes ``prefetch``), else None."""
        view = self
        while view.__class__ is StateView:
            if view.parent is None:
                return None
            view = view.parent
        return view

    def prefetch(self, keys: Collection[bytes]) -> None:
        """Read ``keys`` ahead, all at once (only a base that reads a disk does anything)."""

    def absorb(self, height: int, writes: dict[bytes, bytes]) -> None:
        """Fold committed block ``height``'s writes into this base state (held in memory
        here; a validator's base keeps them on its disk: actors/storage/state.py)."""
        self.writes.update(writes)

    def fold_into_parent(self) -> StateView:
        """Apply this layer to its parent (its block committed); return the parent."""
        if self.parent is None:
            raise ValueError("the base state has no parent")
        self.parent.writes.update(self.writes)
        return self.parent

    def get_u64(self, key: bytes) -> int:
        raw = self.get(key)
        return 0 if raw is None else int(_U64.unpack(raw)[0])


# The results of a block without rows (immutable: shared by every empty block)
EMPTY_RESULTS = pa.RecordBatch.from_arrays(
    [pa.array([], pa.uint8()), pa.array([], pa.binary())], schema=RESULT_SCHEMA
)


def compute_state_root(previous: bytes, writes: dict[bytes, bytes]) -> bytes:
    keys = sorted(writes)
    values = list(map(writes.__getitem__, keys))
    # Every entry is ``u64 len | key | u64 len | value``; the few distinct lengths are packed
    # once and the body is joined without a Python step per entry
    packed = {n: _U64.pack(n) for n in {*map(len, keys), *map(len, values)}}.__getitem__
    body = b"".join(
        chain.from_iterable(
            zip(
                map(packed, map(len, keys)),
                keys,
                map(packed, map(len, values)),
                values,
                strict=True,
            )
        )
    )
    return hashlib.sha256(_STATE_DOMAIN + previous + hashlib.sha256(body).digest()).digest()


@dataclass(frozen=True)
class Account:
    public_key: bytes
    balance: int


def genesis_state(accounts: Iterable[Account]) -> tuple[StateView, bytes]:
    """The base state holding the genesis balances, and its state root."""
    base = StateView()
    for a in accounts:
        if len(a.public_key) != 32 or not 0 <= a.balance < 1 << 64:
            raise ValueError("an account needs a 32-byte key and a u64 balance")
        base.set(balance_key(a.public_key), _U64.pack(a.balance))
    return base, compute_state_root(bytes(32), base.writes)


def execute_block(
    parent_view: StateView, txs: pa.RecordBatch, height: int, parent_state_root: bytes
) -> tuple[StateView, pa.RecordBatch, bytes]:
    """Execute a block's rows on a child of ``parent_view``.

    Returns the block's view (its writes only), its results (``status``, ``result``) and the
    resulting state root.

    The rules are applied row by row as the module describes; nonces and balances are kept as
    integers while the block runs and written once at its end (the write set, and so the
    state root, is the same as writing them row by row: a key is written iff some row wrote
    it, with its last value). Each validator runs this for every block, so it is kept tight.
    """
    if txs.num_rows == 0:  # an empty block (an idle network's heartbeat) writes nothing
        view = parent_view.child()
        return view, EMPTY_RESULTS, compute_state_root(parent_state_root, view.writes)
    fast = _execute_anchor_block(parent_view, txs, height)
    if fast is not None:
        view, out = fast
        return view, out, compute_state_root(parent_state_root, view.writes)
    return execute_rows(parent_view, txs, height, parent_state_root)


def execute_rows(
    parent_view: StateView, txs: pa.RecordBatch, height: int, parent_state_root: bytes
) -> tuple[StateView, pa.RecordBatch, bytes]:
    """``execute_block`` one row at a time, for any mix of kinds (the rules' reference)."""
    view = parent_view.child()
    writes = view.writes
    read = parent_view.get
    n = txs.num_rows
    kinds = txs.column("kind").to_numpy(zero_copy_only=False).tolist()
    nonces = txs.column("nonce").to_numpy(zero_copy_only=False).tolist()
    senders = _rows(txs.column("sender"))
    pvalues, poffsets = as_offsets_and_values(txs.column("payload"))
    payload = pvalues.tobytes()
    bounds = poffsets.tolist()
    statuses = bytearray(n)
    results: list[bytes] = [b""] * n
    pack, unpack = _U64.pack, _U64.unpack
    next_nonce: dict[bytes, int] = {}  # senders seen: their next nonce as of this row
    consumed: set[bytes] = set()  # senders whose nonce this block moved
    balances: dict[bytes, int] = {}  # accounts read: their balance as of this row
    moved: set[bytes] = set()  # accounts whose balance this block wrote

    def balance(account: bytes) -> int:
        value = balances.get(account)
        if value is None:
            raw = read(balance_key(account))
            value = balances[account] = 0 if raw is None else unpack(raw)[0]
        return value

    transfer, anchor = int(TxKind.TRANSFER), int(TxKind.ANCHOR)
    disk = parent_view.disk_base()
    if disk is not None:
        # The state is on disk: what the rows may read, in one query instead of one a row
        wanted = {nonce_key(s) for s in senders}
        for i in range(n):
            start = bounds[i]
            if kinds[i] == anchor:
                wanted.add(anchor_key(payload[start : start + 32]))
            elif kinds[i] == transfer:
                wanted.add(balance_key(senders[i]))
                wanted.add(balance_key(payload[start : start + 32]))
        disk.prefetch(wanted)
    for i in range(n):
        sender = senders[i]
        expected = next_nonce.get(sender)
        if expected is None:
            raw = read(nonce_key(sender))
            expected = 0 if raw is None else unpack(raw)[0]
        if nonces[i] != expected:
            next_nonce[sender] = expected
            statuses[i] = Status.BAD_NONCE
            continue
        next_nonce[sender] = expected + 1
        consumed.add(sender)
        kind = kinds[i]
        if kind == transfer:
            start, stop = bounds[i], bounds[i + 1]
            if stop - start != 40:
                statuses[i] = Status.BAD_PAYLOAD
                continue
            recipient = payload[start : start + 32]
            amount = unpack(payload[start + 32 : stop])[0]
            have = balance(sender)
            if amount > have:
                statuses[i] = Status.INSUFFICIENT_FUNDS
                continue
            if recipient != sender:
                received = balance(recipient)
                if received + amount >= 1 << 64:
                    statuses[i] = Status.BAD_PAYLOAD
                    continue
                balances[sender] = have = have - amount
                balances[recipient] = received + amount
                moved.add(sender)
                moved.add(recipient)
            results[i] = pack(have)
        elif kind == anchor:
            start, stop = bounds[i], bounds[i + 1]
            if not 32 <= stop - start <= 32 + MAX_ANCHOR_METADATA:
                statuses[i] = Status.BAD_PAYLOAD
                continue
            key = anchor_key(payload[start : start + 32])
            if key in writes or read(key) is not None:
                statuses[i] = Status.ALREADY_ANCHORED
                continue
            meta = hashlib.sha256(payload[start + 32 : stop]).digest()
            writes[key] = sender + pack(height) + meta
            results[i] = pack(height)
        else:
            statuses[i] = Status.UNSUPPORTED_KIND
    for sender in consumed:
        writes[nonce_key(sender)] = pack(next_nonce[sender])
    for account in moved:
        writes[balance_key(account)] = pack(balances[account])
    out = pa.RecordBatch.from_arrays(
        [pa.array(np.frombuffer(statuses, np.uint8), pa.uint8()), pa.array(results, pa.binary())],
        schema=RESULT_SCHEMA,
    )
    return view, out, compute_state_root(parent_state_root, writes)


def _execute_anchor_block(
    parent_view: StateView, txs: pa.RecordBatch, height: int
) -> tuple[StateView, pa.RecordBatch] | None:
    """``execute_block`` column by column for the common block: every row an anchor, every
    nonce the sender's next. None for any other block (``execute_rows`` then runs it).

    Same writes and results as the row loop: every sender's nonce moves past its rows; a
    payload of the wrong length is ``BAD_PAYLOAD``; of rows naming one digest, the first in
    block order anchors it unless the state holds it already, the others are
    ``ALREADY_ANCHORED``; the metadata hashes are one batch."""
    n = txs.num_rows
    if n == 0:
        return None
    kinds = txs.column("kind").to_numpy(zero_copy_only=False)
    if not bool(np.all(kinds == int(TxKind.ANCHOR))):
        return None
    read = parent_view.get
    nonces = txs.column("nonce").to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
    sender_rows = np.ascontiguousarray(as_offsets_and_values(txs.column("sender"))[0]).reshape(
        n, 32
    )
    # Each sender's rows must carry its next nonces in order (else the row loop decides)
    _, first, inverse = np.unique(
        sender_rows.view(np.dtype((np.void, 32))).ravel(), return_index=True, return_inverse=True
    )
    inverse = inverse.reshape(-1)
    senders = [sender_rows[i].tobytes() for i in first.tolist()]
    disk = parent_view.disk_base()
    pvalues, poffsets = as_offsets_and_values(txs.column("payload"))
    starts = poffsets[:-1]
    lengths = poffsets[1:] - starts
    sized = (lengths >= 32) & (lengths <= 32 + MAX_ANCHOR_METADATA)
    rows = np.flatnonzero(sized)
    digests = (
        pvalues[starts[rows, None] + np.arange(32)] if len(rows) else np.empty((0, 32), np.uint8)
    )
    prefix = np.frombuffer(b"anc:", np.uint8)
    keyed = np.concatenate([np.broadcast_to(prefix, (len(rows), 4)), digests], axis=1)
    keys = byte_rows(keyed)
    if disk is not None:
        disk.prefetch([nonce_key(s) for s in senders] + keys)
    expected = np.zeros(len(senders), np.uint64)
    for j, sender in enumerate(senders):
        raw = read(nonce_key(sender))
        if raw is not None:
            expected[j] = _U64.unpack(raw)[0]
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(senders))
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - group_start[inverse[order]]
    if not np.array_equal(nonces[order], expected[inverse[order]] + rank.astype(np.uint64)):
        return None
    statuses = np.where(sized, np.uint8(Status.OK), np.uint8(Status.BAD_PAYLOAD)).astype(np.uint8)
    # The first row naming each digest, unless the state holds it already
    _, first_of_key = np.unique(keyed.view(np.dtype((np.void, 36))).ravel(), return_index=True)
    fresh = np.zeros(len(rows), np.bool_)
    fresh[first_of_key] = True
    firsts = first_of_key.tolist()
    held = parent_view.present([keys[i] for i in firsts])
    if held:
        for i in firsts:
            if keys[i] in held:
                fresh[i] = False
    statuses[rows[~fresh]] = Status.ALREADY_ANCHORED
    written = rows[fresh]
    # Metadata hashes, one batch: payload bytes past each written row's digest
    meta_len = lengths[written] - 32
    meta_offsets = np.zeros(len(written) + 1, np.int64)
    np.cumsum(meta_len, out=meta_offsets[1:])
    total = int(meta_offsets[-1])
    gather = np.repeat(starts[written] + 32 - meta_offsets[:-1], meta_len) + np.arange(total)
    meta = sha256_batch((np.ascontiguousarray(pvalues[gather]), meta_offsets))
    stamp = np.frombuffer(_U64.pack(height), np.uint8)
    values = np.concatenate(
        [sender_rows[written], np.broadcast_to(stamp, (len(written), 8)), meta], axis=1
    )
    view = parent_view.child()
    writes = view.writes
    new_keys = [keys[i] for i in np.flatnonzero(fresh).tolist()]
    writes.update(zip(new_keys, byte_rows(values), strict=True))
    for j, sender in enumerate(senders):
        writes[nonce_key(sender)] = _U64.pack(int(expected[j]) + int(counts[j]))
    result_offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.where(statuses == Status.OK, 8, 0), out=result_offsets[1:])
    result_values = np.tile(stamp, len(written))
    results = pa.BinaryArray.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(result_offsets), pa.py_buffer(result_values)]
    )
    out = pa.RecordBatch.from_arrays(
        [pa.array(statuses, pa.uint8()), results], schema=RESULT_SCHEMA
    )
    return view, out


def _rows(col: pa.Array) -> list[bytes]:
    """The values of a 32-byte column, one ``bytes`` a row."""
    values, _ = as_offsets_and_values(col)
    return byte_rows(values.reshape(-1, 32))
