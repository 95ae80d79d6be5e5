"""Execution: nonces, transfers, anchors, unsupported kinds, speculative views, state roots.

Each rule has its accepting and its rejecting row; the state after a rejected row is unchanged
except for the nonce, which every row with the right nonce consumes.
"""

from __future__ import annotations

import struct

import pytest

from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import (
    Account,
    StateView,
    Status,
    balance_key,
    compute_state_root,
    execute_block,
    genesis_state,
    nonce_key,
)
from rayledger.tx import TxKind, make_batch

CHAIN = bytes(range(32))
A, B, C = (key_from_seed(bytes([i]) * 32) for i in (1, 2, 3))
PA, PB, PC = (public_bytes(k) for k in (A, B, C))


def transfer(to: bytes, amount: int) -> bytes:
    return to + struct.pack(">Q", amount)


def run(rows: list[tuple[object, int, int, bytes]], view: StateView | None = None, height: int = 1):
    base, root = genesis_state([Account(PA, 100), Account(PB, 5)])
    view = view or base
    batch = make_batch(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        CHAIN,
    )
    child, results, new_root = execute_block(view, batch, height, root)
    return base, child, results.column("status").to_pylist(), results, new_root, root


def test_transfer_moves_funds_and_consumes_nonce() -> None:
    _, view, st, res, _, _ = run([(A, TxKind.TRANSFER, 0, transfer(PB, 30))])
    assert st == [Status.OK]
    assert view.get_u64(balance_key(PA)) == 70 and view.get_u64(balance_key(PB)) == 35
    assert view.get_u64(nonce_key(PA)) == 1
    assert struct.unpack(">Q", res.column("result")[0].as_py())[0] == 70


def test_overdraft_rejected_but_nonce_consumed() -> None:
    _, view, st, _, _, _ = run([(B, TxKind.TRANSFER, 0, transfer(PA, 6))])
    assert st == [Status.INSUFFICIENT_FUNDS]
    assert view.get_u64(balance_key(PB)) == 5 and view.get_u64(balance_key(PA)) == 100
    assert view.get_u64(nonce_key(PB)) == 1


def test_nonce_must_be_next_in_order() -> None:
    _, view, st, _, _, _ = run(
        [
            (A, TxKind.TRANSFER, 1, transfer(PB, 1)),  # gap
            (A, TxKind.TRANSFER, 0, transfer(PB, 1)),
            (A, TxKind.TRANSFER, 0, transfer(PB, 1)),  # replay of nonce 0
            (A, TxKind.TRANSFER, 1, transfer(PB, 1)),
        ]
    )
    assert st == [Status.BAD_NONCE, Status.OK, Status.BAD_NONCE, Status.OK]
    assert view.get_u64(balance_key(PB)) == 7 and view.get_u64(nonce_key(PA)) == 2


@pytest.mark.parametrize("payload", [b"", PB, PB + b"\x00" * 7, PB + b"\x00" * 9])
def test_transfer_bad_payload(payload: bytes) -> None:
    _, view, st, _, _, _ = run([(A, TxKind.TRANSFER, 0, payload)])
    assert st == [Status.BAD_PAYLOAD]
    assert view.get_u64(balance_key(PA)) == 100


def test_transfer_overflowing_recipient_rejected() -> None:
    base, _ = genesis_state([Account(PA, 10), Account(PB, (1 << 64) - 5)])
    batch = make_batch(A, TxKind.TRANSFER, [0], [transfer(PB, 10)], CHAIN)
    view, res, _ = execute_block(base, batch, 1, bytes(32))
    assert res.column("status").to_pylist() == [Status.BAD_PAYLOAD]
    assert view.get_u64(balance_key(PB)) == (1 << 64) - 5


def test_self_transfer_changes_nothing_but_nonce() -> None:
    _, view, st, _, _, _ = run([(A, TxKind.TRANSFER, 0, transfer(PA, 50))])
    assert st == [Status.OK] and view.get_u64(balance_key(PA)) == 100


def test_anchor_once() -> None:
    digest = b"\x11" * 32
    _, view, st, res, _, _ = run(
        [
            (C, TxKind.ANCHOR, 0, digest + b'{"doc":"deed.pdf"}'),
            (C, TxKind.ANCHOR, 1, digest),
            (C, TxKind.ANCHOR, 2, b"short"),
            (C, TxKind.ANCHOR, 3, b"\x22" * 32 + b"m" * 5000),
        ],
        height=7,
    )
    assert st == [Status.OK, Status.ALREADY_ANCHORED, Status.BAD_PAYLOAD, Status.BAD_PAYLOAD]
    assert struct.unpack(">Q", res.column("result")[0].as_py())[0] == 7


def test_unsupported_kinds_are_reported() -> None:
    _, _, st, _, _, _ = run([(C, TxKind.VOTE, 0, b"x"), (C, 999, 1, b"")])
    assert st == [Status.UNSUPPORTED_KIND, Status.UNSUPPORTED_KIND]


def test_branches_do_not_see_each_other_and_fold_on_commit() -> None:
    base, root = genesis_state([Account(PA, 100)])
    left = make_batch(A, TxKind.TRANSFER, [0], [transfer(PB, 10)], CHAIN)
    right = make_batch(A, TxKind.TRANSFER, [0], [transfer(PC, 20)], CHAIN)
    lv, _, lroot = execute_block(base, left, 1, root)
    rv, _, rroot = execute_block(base, right, 1, root)
    assert lroot != rroot
    assert lv.get_u64(balance_key(PC)) == 0 and rv.get_u64(balance_key(PB)) == 0
    assert base.get_u64(balance_key(PA)) == 100
    folded = lv.fold_into_parent()
    assert folded is base and base.get_u64(balance_key(PB)) == 10
    with pytest.raises(ValueError):
        base.fold_into_parent()


def test_state_root_is_deterministic_and_order_free_within_a_write_set() -> None:
    w1 = {b"a": b"1", b"b": b"2"}
    w2 = {b"b": b"2", b"a": b"1"}
    assert compute_state_root(bytes(32), w1) == compute_state_root(bytes(32), w2)
    assert compute_state_root(bytes(32), w1) != compute_state_root(bytes(32), {b"a": b"1"})
    assert compute_state_root(bytes(32), w1) != compute_state_root(b"\x01" * 32, w1)
    # Length prefixes: moving a byte between key and value changes the root.
    assert compute_state_root(bytes(32), {b"ab": b"c"}) != compute_state_root(
        bytes(32), {b"a": b"bc"}
    )


def test_same_block_same_root_on_two_validators() -> None:
    rows = [(A, TxKind.TRANSFER, i, transfer(PB, 1)) for i in range(20)]
    *_, root1, _ = run(rows)
    *_, root2, _ = run(rows)
    assert root1 == root2


def test_genesis_state_rejects_bad_accounts() -> None:
    with pytest.raises(ValueError):
        genesis_state([Account(b"short", 1)])
    with pytest.raises(ValueError):
        genesis_state([Account(PA, -1)])
