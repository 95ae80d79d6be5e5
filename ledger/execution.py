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
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa

from rayledger.block import RESULT_SCHEMA
from rayledger.kernels import as_offsets_and_values
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
        view: StateView | None = self
        while view is not None:
            value = view.writes.get(key)
            if value is not None:
                return value
            view = view.parent
        return None

    def set(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def child(self) -> StateView:
        return StateView(self)

    def fold_into_parent(self) -> StateView:
        """Apply this layer to its parent (its block committed); return the parent."""
        if self.parent is None:
            raise ValueError("the base state has no parent")
        self.parent.writes.update(self.writes)
        return self.parent

    def get_u64(self, key: bytes) -> int:
        raw = self.get(key)
        return 0 if raw is None else int(_U64.unpack(raw)[0])


def compute_state_root(previous: bytes, writes: dict[bytes, bytes]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(writes):
        value = writes[key]
        h.update(_U64.pack(len(key)) + key + _U64.pack(len(value)) + value)
    return hashlib.sha256(_STATE_DOMAIN + previous + h.digest()).digest()


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
    """
    view = parent_view.child()
    n = txs.num_rows
    kinds = txs.column("kind").to_numpy(zero_copy_only=False)
    nonces = txs.column("nonce").to_numpy(zero_copy_only=False)
    senders = _rows(txs.column("sender"))
    pvalues, poffsets = as_offsets_and_values(txs.column("payload"))
    payload = pvalues.tobytes()
    bounds = poffsets.tolist()
    statuses = np.zeros(n, np.uint8)
    results: list[bytes] = [b""] * n
    for i in range(n):
        sender = senders[i]
        nkey = nonce_key(sender)
        expected = view.get_u64(nkey)
        if int(nonces[i]) != expected:
            statuses[i] = Status.BAD_NONCE
            continue
        view.set(nkey, _U64.pack(expected + 1))
        body = payload[bounds[i] : bounds[i + 1]]
        kind = int(kinds[i])
        if kind == TxKind.TRANSFER:
            statuses[i], results[i] = _transfer(view, sender, body)
        elif kind == TxKind.ANCHOR:
            statuses[i], results[i] = _anchor(view, sender, body, height)
        else:
            statuses[i] = Status.UNSUPPORTED_KIND
    out = pa.RecordBatch.from_arrays(
        [pa.array(statuses, pa.uint8()), pa.array(results, pa.binary())], schema=RESULT_SCHEMA
    )
    return view, out, compute_state_root(parent_state_root, view.writes)


def _rows(col: pa.Array) -> list[bytes]:
    values, _ = as_offsets_and_values(col)
    raw = values.tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def _transfer(view: StateView, sender: bytes, body: bytes) -> tuple[int, bytes]:
    # Verify the payload is exactly recipient | amount
    if len(body) != 40:
        return Status.BAD_PAYLOAD, b""
    recipient = body[:32]
    amount = int(_U64.unpack(body[32:])[0])
    balance = view.get_u64(balance_key(sender))
    # Verify no overdraft
    if amount > balance:
        return Status.INSUFFICIENT_FUNDS, b""
    if recipient != sender:
        received = view.get_u64(balance_key(recipient))
        if received + amount >= 1 << 64:
            return Status.BAD_PAYLOAD, b""
        view.set(balance_key(sender), _U64.pack(balance - amount))
        view.set(balance_key(recipient), _U64.pack(received + amount))
        balance -= amount
    return Status.OK, _U64.pack(balance)


def _anchor(view: StateView, sender: bytes, body: bytes, height: int) -> tuple[int, bytes]:
    # Verify a digest and bounded metadata
    if not 32 <= len(body) <= 32 + MAX_ANCHOR_METADATA:
        return Status.BAD_PAYLOAD, b""
    key = anchor_key(body[:32])
    if view.get(key) is not None:
        return Status.ALREADY_ANCHORED, b""
    view.set(key, sender + _U64.pack(height) + hashlib.sha256(body[32:]).digest())
    return Status.OK, _U64.pack(height)
