"""A validator's committed state across restarts (no Ray): it restarts from its state.db
checkpoint and re-executes only the blocks above it, to exactly the state a full re-execution
gives; memory holds only the blocks above the checkpoint; a state.db of another chain is
rebuilt, a snapshot of the earlier form is taken over, and a shard's rebuild replays beside
the live state without touching it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from rayledger.actors.storage import BlockStore
from rayledger.actors.storage.snapshot import save_snapshot
from rayledger.actors.storage.state import CommittedState
from rayledger.actors.validator import Validator
from rayledger.block import QuorumCert
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.config import Account, Genesis, new_genesis
from rayledger.config import Validator as Member
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import StateView, genesis_state
from rayledger.tx import TxKind, make_batch

BLOCKS = 30


def build_chain(root: Path) -> tuple[Genesis, list[dict[bytes, bytes]]]:
    """A stored chain of BLOCKS executed blocks (anchors and transfers from two senders, so
    keys are both new and rewritten); returns the genesis and the state after each height."""
    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(4)]
    alice, bob = key_from_seed(b"\x0a" * 32), key_from_seed(b"\x0b" * 32)
    genesis = new_genesis(
        "state",
        [Member(f"v{i}", public_bytes(k)) for i, k in enumerate(keys)],
        5,
        accounts=[Account(public_bytes(alice), 10**9)],
    )
    base, _ = genesis_state(genesis.accounts)
    held: dict[bytes, object] = {}
    builder = LedgerBuilder(held, genesis.header, base)  # type: ignore[arg-type]
    store = BlockStore(root / "store", genesis.header, verify_from_mark=True, index_txs=False)
    parent = genesis.header
    states = [dict(base.writes)]
    carol = public_bytes(key_from_seed(b"\x0c" * 32))
    nonce = {0: 0, 1: 0}
    for h in range(1, BLOCKS + 1):
        who = h % 2
        signer, to = (alice, public_bytes(bob)) if who else (bob, carol)
        kinds, payloads = [], []
        for i in range(20):
            if i % 4 == 3:  # a transfer of 1 (bob has nothing until alice pays him)
                kinds.append(int(TxKind.TRANSFER))
                payloads.append(to + (1).to_bytes(8, "big"))
            elif i == 5 and h > 6:  # anchored five blocks ago: refused, read from the state
                kinds.append(int(TxKind.ANCHOR))
                payloads.append(hashlib.sha256(b"%d/%d" % (h - 5, 0)).digest())
            else:
                kinds.append(int(TxKind.ANCHOR))
                payloads.append(hashlib.sha256(b"%d/%d" % (h, i)).digest())
        anchors = make_batch(
            signer, kinds, range(nonce[who], nonce[who] + 20), payloads, genesis.chain_id
        )
        nonce[who] += 20
        digest = batch_digest(anchors)
        held[digest] = anchors
        header = builder.build(parent, h, public_bytes(keys[0]), 1000 * h, (digest,))
        qc = QuorumCert(parent.hash, h, bytes([7]), tuple(bytes(64) for _ in range(3)))
        store.append(builder.commit(header.hash, qc), verify=False)
        states.append(dict(base.writes))
        parent = header
    store.close()
    return genesis, states


def validator(
    root: Path, genesis: Genesis, *, lag: int, every: int, shards: int = 0, memory: int = 10**6
) -> Validator:
    v = Validator.__new__(Validator)
    v.dir, v.index, v.genesis, v.shards = root, 0, genesis, shards
    v.state_lag, v.checkpoint_every, v.state_memory = lag, every, memory
    v.store = BlockStore(root / "store", genesis.header, verify_from_mark=True, index_txs=False)
    return v


def test_restarts_from_the_checkpoint_to_the_same_state(tmp_path: Path) -> None:
    genesis, states = build_chain(tmp_path)
    v = validator(tmp_path, genesis, lag=4, every=5)
    base, head, start, writes = v._replay(BLOCKS - 4)
    assert isinstance(base, CommittedState)
    assert head.height == BLOCKS and start == 0 and writes == {}  # no shards: none kept
    assert base.entries() == states[BLOCKS]
    # Checkpointed while it replayed: memory holds at most lag + every blocks
    assert base.height == 25 and base.held_blocks == 5
    base.close()
    # Restarted: from the checkpoint, re-executing only the blocks above it
    v = validator(tmp_path, genesis, lag=4, every=5, shards=2)
    base, head, start, writes = v._replay(BLOCKS - 4)
    assert isinstance(base, CommittedState)
    assert start == 25 and head.height == BLOCKS and sorted(writes) == [27, 28, 29, 30]
    assert base.entries() == states[BLOCKS]
    for h in (26, 27):  # each re-executed block's writes are what it changed
        changed = {k: v for k, v in states[h].items() if states[h - 1].get(k) != v}
        assert base.get(next(iter(changed))) is not None
    # The file alone holds exactly the state of its checkpoint
    on_disk = CommittedState(tmp_path / "state.db")
    assert on_disk.height == 25 and on_disk.entries() == states[25]
    on_disk.close()
    base.close()


def test_a_checkpoint_comes_sooner_once_memory_holds_enough(tmp_path: Path) -> None:
    genesis, states = build_chain(tmp_path)
    # Blocks write 21-22 entries: with at most 50 held, a checkpoint every 2-3 blocks
    v = validator(tmp_path, genesis, lag=1, every=1000, memory=50)
    base, *_ = v._replay(BLOCKS)
    assert isinstance(base, CommittedState)
    assert base.height >= BLOCKS - 4 and base.held_entries <= 50 + 2 * 22
    assert base.entries() == states[BLOCKS]
    base.close()


def test_a_state_file_of_another_chain_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    genesis, states = build_chain(tmp_path)
    other = CommittedState(tmp_path / "state.db")
    other.seed(12, b"\x99" * 32, [(b"foreign", b"x")])
    other.close()
    v = validator(tmp_path, genesis, lag=2, every=3)
    with caplog.at_level(logging.WARNING):
        base, head, start, _ = v._replay(0)
    assert "not of this chain" in caplog.text
    assert start == 0 and base.get(b"foreign") is None
    assert base.entries() == states[BLOCKS]  # type: ignore[attr-defined]
    base.close()  # type: ignore[attr-defined]
    # One ahead of the store (the store lost its tail): rebuilt too
    ahead = CommittedState(tmp_path / "state.db")
    assert ahead.height == 27
    ahead.close()
    v = validator(tmp_path, genesis, lag=2, every=3)
    fake = CommittedState(tmp_path / "state.db")
    for h in range(28, 32):
        fake.absorb(h, {})
    fake.checkpoint_now(31, b"\x01" * 32)
    fake.close()
    base, _, start, _ = v._replay(0)
    assert start == 0 and base.entries() == states[BLOCKS]  # type: ignore[attr-defined]
    base.close()  # type: ignore[attr-defined]


def test_a_snapshot_of_the_earlier_form_is_taken_over(tmp_path: Path) -> None:
    genesis, states = build_chain(tmp_path)
    store = BlockStore(tmp_path / "store", genesis.header, verify_from_mark=True, index_txs=False)
    at10 = store.get_header(10)
    store.close()
    save_snapshot(tmp_path / "state.snap", 10, at10.hash, states[10])
    v = validator(tmp_path, genesis, lag=0, every=100)
    base, head, start, _ = v._replay(0)
    assert start == 10 and head.height == BLOCKS
    assert base.entries() == states[BLOCKS]  # type: ignore[attr-defined]
    base.close()  # type: ignore[attr-defined]


def test_a_snapshot_of_another_chain_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    genesis, states = build_chain(tmp_path)
    save_snapshot(tmp_path / "state.snap", 10, b"\x42" * 32, {b"foreign": b"x"})
    v = validator(tmp_path, genesis, lag=0, every=100)
    with caplog.at_level(logging.WARNING):
        base, _, start, _ = v._replay(0)
    assert "state snapshot is not of this chain" in caplog.text
    assert start == 0 and base.entries() == states[BLOCKS]  # type: ignore[attr-defined]
    base.close()  # type: ignore[attr-defined]


def test_a_shard_rebuild_replays_beside_the_live_state(tmp_path: Path) -> None:
    genesis, states = build_chain(tmp_path)
    v = validator(tmp_path, genesis, lag=3, every=4, shards=1)
    live, *_ = v._replay(BLOCKS)
    assert isinstance(live, CommittedState)
    at, held = live.height, live.held_blocks
    # A shard acknowledged height 6 only: every block above is re-executed, in memory
    base, head, start, writes = v._replay(6, need_all=True)
    assert type(base) is StateView and start == 0 and head.height == BLOCKS
    assert sorted(writes) == list(range(7, BLOCKS + 1))
    assert base.writes == states[BLOCKS]
    # The live state and its file are untouched
    assert live.height == at and live.held_blocks == held
    assert live.entries() == states[BLOCKS]
    live.close()
