"""Execution: nonces, transfers, anchors, unsupported kinds, speculative views, state roots.

Each rule has its accepting and its rejecting row; the state after a rejected row is unchanged
except for the nonce, which every row with the right nonce consumes.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pyarrow as pa
import pytest

from rayledger import execution
from rayledger.actors.storage.state import CommittedState
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import (
    MAX_ANCHOR_METADATA,
    Account,
    StateView,
    Status,
    anchor_key,
    balance_key,
    compute_state_root,
    execute_block,
    genesis_state,
    nonce_key,
)
from rayledger.tx import TX_SCHEMA, TxKind, make_batch

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


def test_anchors_already_held_at_any_depth_of_the_state(tmp_path: Path) -> None:
    """A block of anchors (the column-wise path) refuses a digest the state holds wherever
    it is held: in the file of a validator's committed state, in its memory (committed since
    the checkpoint), or in an uncommitted parent block; the others anchor."""
    on_disk, in_memory, in_parent, new = (bytes([b]) * 32 for b in (1, 2, 3, 4))
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, bytes(32), [(anchor_key(on_disk), b"x")])
    state.absorb(1, {anchor_key(in_memory): b"y"})
    parent = state.child()
    parent.set(anchor_key(in_parent), b"z")
    rows = [(C, TxKind.ANCHOR, i, d) for i, d in enumerate((on_disk, in_memory, in_parent, new))]
    batch = make_batch(*(list(col) for col in zip(*rows, strict=True)), CHAIN)
    seen = []
    real = execution._execute_anchor_block

    def spy(*args: object) -> object:
        seen.append(real(*args))  # type: ignore[arg-type]
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(execution, "_execute_anchor_block", spy)
        view, results, _ = execute_block(parent, batch, 3, bytes(32))
    assert seen and seen[0] is not None, "the block did not take the column-wise path"
    assert results.column("status").to_pylist() == [Status.ALREADY_ANCHORED] * 3 + [Status.OK]
    assert set(view.writes) == {anchor_key(new), nonce_key(PC)}
    assert parent.present([anchor_key(d) for d in (on_disk, in_memory, in_parent, new)]) == {
        anchor_key(d) for d in (on_disk, in_memory, in_parent)
    }
    state.close()


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


# ---- the executor against a plain reading of the rules ---------------------------------------


def reference_root(previous: bytes, writes: dict[bytes, bytes]) -> bytes:
    """The module's formula, spelled out: SHA-256 over the sorted, length-prefixed writes."""
    h = hashlib.sha256()
    for key in sorted(writes):
        h.update(struct.pack(">Q", len(key)) + key + struct.pack(">Q", len(writes[key])))
        h.update(writes[key])
    return hashlib.sha256(b"rayledger/state/v1" + previous + h.digest()).digest()


def reference_block(
    parent: StateView, rows: list[tuple[bytes, int, int, bytes]], height: int
) -> tuple[StateView, list[int], list[bytes]]:
    """Every rule applied row by row, every write made at once, on a child view."""
    view = parent.child()
    statuses, results = [], []
    for sender, kind, nonce, body in rows:
        expected = view.get_u64(nonce_key(sender))
        status, result = Status.OK, b""
        if nonce != expected:
            statuses.append(Status.BAD_NONCE)
            results.append(b"")
            continue
        view.set(nonce_key(sender), struct.pack(">Q", expected + 1))
        if kind == TxKind.TRANSFER:
            if len(body) != 40:
                status = Status.BAD_PAYLOAD
            else:
                to, amount = body[:32], struct.unpack(">Q", body[32:])[0]
                have = view.get_u64(balance_key(sender))
                if amount > have:
                    status = Status.INSUFFICIENT_FUNDS
                elif to == sender:
                    result = struct.pack(">Q", have)
                elif view.get_u64(balance_key(to)) + amount >= 1 << 64:
                    status = Status.BAD_PAYLOAD
                else:
                    got = view.get_u64(balance_key(to))
                    view.set(balance_key(sender), struct.pack(">Q", have - amount))
                    view.set(balance_key(to), struct.pack(">Q", got + amount))
                    result = struct.pack(">Q", have - amount)
        elif kind == TxKind.ANCHOR:
            key = anchor_key(body[:32])
            if not 32 <= len(body) <= 32 + MAX_ANCHOR_METADATA:
                status = Status.BAD_PAYLOAD
            elif view.get(key) is not None:
                status = Status.ALREADY_ANCHORED
            else:
                meta = hashlib.sha256(body[32:]).digest()
                view.set(key, sender + struct.pack(">Q", height) + meta)
                result = struct.pack(">Q", height)
        else:
            status = Status.UNSUPPORTED_KIND
        statuses.append(status)
        results.append(result)
    return view, statuses, results


def random_rows(
    rng: random.Random,
    keys: list,
    nonces: dict[bytes, int],
    n: int,
    anchors_only: bool = False,
    bad_nonce: float = 0.1,
) -> list:
    pubs = [public_bytes(k) for k in keys]
    rows = []
    for _ in range(n):
        k = rng.randrange(len(keys))
        nonce = nonces[pubs[k]]
        if rng.random() < bad_nonce:  # a gap, a replay, or a far future nonce
            nonce = rng.choice([nonce + 1, max(0, nonce - 1), nonce + 1000])
        else:
            nonces[pubs[k]] += 1
        choice = 0.7 if anchors_only else rng.random()
        if choice < 0.5:
            to = rng.choice(pubs + [b"\x55" * 32])
            amount = rng.choice([0, 1, rng.randrange(50), 10**6, (1 << 64) - 1])
            body = to + struct.pack(">Q", amount)
            if rng.random() < 0.05:
                body = body[: rng.randrange(40)]
            kind = TxKind.TRANSFER
        elif choice < 0.9:
            digest = bytes([rng.randrange(8)]) * 32  # few digests: repeats within and across
            body = digest + rng.randbytes(rng.choice([0, 3, 40]))
            if rng.random() < 0.05:
                body = rng.choice([b"", b"x" * 31, digest + b"m" * (MAX_ANCHOR_METADATA + 1)])
            kind = TxKind.ANCHOR
        else:
            kind, body = rng.choice([TxKind.VOTE, 77]), b"v"
        rows.append((keys[k], int(kind), nonce, body))
    return rows


def check_random_chain(seed: int, anchors_only: bool = False) -> set[int]:
    """Four random blocks on each other, executed and read plainly; the statuses seen.
    ``anchors_only``: every row an anchor, most blocks with every nonce right (the column-wise
    path), some with one wrong (the row loop)."""
    seen: set[int] = set()
    rng = random.Random(seed)
    keys = [key_from_seed(bytes([40 + i]) * 32) for i in range(5)]
    accounts = [Account(public_bytes(k), rng.choice([0, 30, 1000, (1 << 64) - 20])) for k in keys]
    base, root = genesis_state(accounts)
    ref_base, _ = genesis_state(accounts)
    nonces = {public_bytes(k): 0 for k in keys}
    view, ref_view, ref_root = base, ref_base, root
    for height in range(1, 5):  # a chain of speculative views, each on its parent
        rows = random_rows(
            rng,
            keys,
            nonces,
            rng.choice([0, 1, 60, 300]),
            anchors_only=anchors_only,
            bad_nonce=rng.choice([0.0, 0.0, 0.01]) if anchors_only else 0.1,
        )
        batch = (
            make_batch(
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                CHAIN,
            )
            if rows
            else make_batch([], [], [], [], CHAIN)
        )
        view, results, root = execute_block(view, batch, height, root)
        ref_view, statuses, values = reference_block(
            ref_view, [(public_bytes(r[0]), r[1], r[2], r[3]) for r in rows], height
        )
        assert results.column("status").to_pylist() == statuses
        assert results.column("result").to_pylist() == values
        assert view.writes == ref_view.writes
        ref_root = reference_root(ref_root, ref_view.writes)
        assert root == ref_root
        seen.update(statuses)
    return seen


@pytest.mark.parametrize("seed", range(12))
def test_blocks_match_the_plain_reading_of_the_rules(seed: int) -> None:
    assert {Status.OK, Status.BAD_NONCE} <= check_random_chain(seed)


def test_the_random_blocks_reach_every_status() -> None:
    seen = set().union(*(check_random_chain(seed) for seed in range(12)))
    assert seen == set(Status)


@pytest.mark.parametrize("seed", range(16))
def test_anchor_blocks_column_wise_match_the_rules(seed: int) -> None:
    seen = check_random_chain(1000 + seed, anchors_only=True)
    assert Status.OK in seen


def test_anchor_blocks_take_the_column_wise_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chains above do reach the column-wise path, and the row loop for the others."""
    taken = {"columns": 0, "rows": 0}
    columns, rows_loop = execution._execute_anchor_block, execution.execute_rows

    def spy_columns(*args: object) -> object:
        out = columns(*args)  # type: ignore[arg-type]
        taken["columns"] += out is not None
        return out

    def spy_rows(*args: object) -> object:
        taken["rows"] += 1
        return rows_loop(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(execution, "_execute_anchor_block", spy_columns)
    monkeypatch.setattr(execution, "execute_rows", spy_rows)
    seen = set().union(*(check_random_chain(1000 + s, anchors_only=True) for s in range(16)))
    assert taken["columns"] >= 10 and taken["rows"] >= 5
    assert seen == {Status.OK, Status.BAD_NONCE, Status.BAD_PAYLOAD, Status.ALREADY_ANCHORED}


def test_anchor_block_over_many_senders_and_a_sliced_batch() -> None:
    """Senders in any order, one row each or many, and a batch sliced out of a larger one
    (its columns' offsets do not start at zero)."""
    keys = [key_from_seed(bytes([90 + i]) * 32) for i in range(40)]
    rng = random.Random(7)
    rows = []
    nonces = [0] * len(keys)
    for i in range(400):
        k = rng.randrange(len(keys))
        body = rng.randbytes(32) + rng.randbytes(rng.choice([0, 5, 100]))
        if i % 17 == 0:
            body = rows[-1][3] if rows else body  # the same digest twice
        rows.append((keys[k], int(TxKind.ANCHOR), nonces[k], body))
        nonces[k] += 1
    prefix = [(keys[0], int(TxKind.ANCHOR), 999, b"p" * 32)] * 3
    whole = make_batch(
        [r[0] for r in prefix + rows],
        [r[1] for r in prefix + rows],
        [r[2] for r in prefix + rows],
        [r[3] for r in prefix + rows],
        CHAIN,
    )
    batch = whole.slice(3)
    base, root = genesis_state([])
    view, results, new_root = execute_block(base, batch, 9, root)
    ref_view, statuses, values = reference_block(
        base, [(public_bytes(r[0]), r[1], r[2], r[3]) for r in rows], 9
    )
    assert execution._execute_anchor_block(base, batch, 9) is not None
    assert results.column("status").to_pylist() == statuses
    assert results.column("result").to_pylist() == values
    assert view.writes == ref_view.writes
    assert new_root == reference_root(root, ref_view.writes)


def test_an_empty_block_gives_what_the_row_loop_gives() -> None:
    base, root = genesis_state([Account(PA, 100)])
    empty = pa.RecordBatch.from_pylist([], schema=TX_SCHEMA)
    view, results, new_root = execute_block(base, empty, 7, root)
    ref_view, ref_results, ref_root = execution.execute_rows(base, empty, 7, root)
    assert view.parent is base and view.writes == ref_view.writes == {}
    assert results.equals(ref_results) and results.schema == ref_results.schema
    assert new_root == ref_root == compute_state_root(root, {})
    assert new_root != root  # the root still moves with every block
