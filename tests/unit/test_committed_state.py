"""A validator's committed state on disk (``actors/storage/state.py``): reads equal an
in-memory model of the state whatever was checkpointed, memory stays bounded, a checkpoint is
whole or absent, and a reopened file holds exactly the state of its checkpoint. The Bloom
filter of the file's keys never hides a key it holds, keeps most absent keys from being
looked up, grows with the file, and a checkpoint stands when it cannot grow."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.actors.storage.state import CommittedState, KeyFilter
from rayledger.execution import StateView


def block_hash(height: int) -> bytes:
    return hashlib.sha256(b"block %d" % height).digest()


def random_blocks(seed: int, blocks: int, keys: int) -> list[dict[bytes, bytes]]:
    """Blocks of writes over a small key space (keys rewritten often, some values empty)."""
    rng = random.Random(seed)
    out = []
    for _ in range(blocks):
        n = rng.randint(0, 6)
        out.append(
            {
                b"k%d" % rng.randrange(keys): rng.choice([b"", rng.randbytes(rng.randint(1, 9))])
                for _ in range(n)
            }
        )
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    blocks=st.integers(0, 40),
    every=st.integers(1, 7),
    lag=st.integers(0, 5),
    reopen_at=st.integers(0, 40),
)
def test_reads_match_a_model_through_checkpoints_and_a_reopen(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    blocks: int,
    every: int,
    lag: int,
    reopen_at: int,
) -> None:
    path = tmp_path_factory.mktemp("state") / "state.db"
    state = CommittedState(path)
    state.seed(0, block_hash(0), [(b"genesis", b"g"), (b"k0", b"zero")])
    model = {b"genesis": b"g", b"k0": b"zero"}
    for height, writes in enumerate(random_blocks(seed, blocks, 12), start=1):
        state.absorb(height, writes)
        model.update(writes)
        if height - lag - state.height >= every:
            state.checkpoint_now(height - lag, block_hash(height - lag))
        if height % 3 == 0:  # read ahead, as before executing a block: reads do not change
            state.prefetch({b"k%d" % i for i in range(0, 12, 2)} | {b"absent"})
        for i in range(12):
            key = b"k%d" % i
            assert state.get(key) == model.get(key)
        assert state.get(b"genesis") == b"g" and state.get(b"absent") is None
        # A child view (an uncommitted block) reads through to it
        child = state.child()
        child.set(b"k1", b"mine")
        assert child.get(b"k1") == b"mine" and child.get(b"k2") == model.get(b"k2")
        # Which keys it holds, asked of many at once (a block's anchors): the reads' answer
        asked = {b"k%d" % i for i in range(12)} | {b"genesis", b"absent", b"zz"}
        assert state.present(asked) == {k for k in asked if k in model}
        assert child.present(sorted(asked)) == {k for k in asked if k in model} | {b"k1"}
        assert state.entries() == model
        # What memory holds: the blocks above the checkpoint, their keys at most
        assert state.held_blocks == height - state.height
        if height == reopen_at:
            # A restart: the file holds exactly the state of its checkpoint
            at, expect = state.height, dict(model)
            state.close()
            state = CommittedState(path)
            assert state.height == at and state.block_hash == block_hash(at)
            # Re-absorbing the blocks above the checkpoint gives the state back
            replay = {b"genesis": b"g", b"k0": b"zero"}
            for w in random_blocks(seed, blocks, 12)[:at]:
                replay.update(w)
            assert state.entries() == replay
            for h, w in enumerate(random_blocks(seed, blocks, 12)[at:height], start=at + 1):
                state.absorb(h, w)
            assert state.entries() == expect
    state.close()


def test_memory_holds_only_the_blocks_above_the_checkpoint(tmp_path: Path) -> None:
    """A long run of fresh keys (anchors): with a checkpoint every 8 blocks, 16 behind the
    head, memory holds at most 24 blocks' writes however long the chain."""
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, block_hash(0), [])
    most = 0
    for height in range(1, 401):
        state.absorb(height, {b"anc:%d/%d" % (height, i): b"v" for i in range(50)})
        if height - 16 - state.height >= 8:
            state.checkpoint_now(height - 16, block_hash(height - 16))
        most = max(most, state.held_entries)
    assert most <= 24 * 50
    assert state.get(b"anc:1/0") == b"v" and state.get(b"anc:400/49") == b"v"
    assert len(state.entries()) == 400 * 50


def test_a_checkpoint_is_whole_or_absent(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = CommittedState(path)
    state.seed(0, block_hash(0), [(b"a", b"0")])
    for h in range(1, 5):
        state.absorb(h, {b"a": b"%d" % h, b"b%d" % h: b"x"})
    job = state.begin_checkpoint(3, block_hash(3))
    assert job is not None
    # A second one while it is written: refused (None), not interleaved
    assert state.begin_checkpoint(4, block_hash(4)) is None
    # The write fails inside its transaction, after the rows that sort before a value SQLite
    # cannot store: nothing of it lands (a copy of the job: the held blocks stay as they are)
    upto, h, layers = job
    with pytest.raises(sqlite3.Error):
        state.write_checkpoint((upto, h, [*layers, {b"zz": object()}]))  # type: ignore[dict-item]
    state.end_checkpoint(3, block_hash(3), written=False)
    # Still the state of height 4 in reads; the file still at 0
    assert state.get(b"a") == b"4" and state.height == 0 and state.held_blocks == 4
    reopened = CommittedState(path)
    assert reopened.height == 0 and reopened.entries() == {b"a": b"0"}
    reopened.close()
    # Written, it lands whole, with its height and hash
    state.checkpoint_now(3, block_hash(3))
    reopened = CommittedState(path)
    assert reopened.height == 3 and reopened.block_hash == block_hash(3)
    assert reopened.entries() == {b"a": b"3", b"b1": b"x", b"b2": b"x", b"b3": b"x"}
    reopened.close()
    assert state.get(b"a") == b"4" and state.held_blocks == 1


def test_refusals(tmp_path: Path) -> None:
    state = CommittedState(tmp_path / "state.db")
    state.seed(5, block_hash(5), [(b"a", b"1")])
    # Blocks come in height order, after the checkpoint
    with pytest.raises(ValueError, match="does not follow"):
        state.absorb(7, {})
    state.absorb(6, {b"a": b"2"})
    with pytest.raises(ValueError, match="does not follow"):
        state.absorb(6, {})
    # Only whole committed blocks change it
    with pytest.raises(TypeError):
        state.set(b"a", b"3")
    with pytest.raises(TypeError):
        state.writes  # noqa: B018
    # A checkpoint of a block not absorbed; one at or below the file's height is nothing to do
    with pytest.raises(ValueError, match="not committed here"):
        state.begin_checkpoint(7, block_hash(7))
    assert state.begin_checkpoint(5, block_hash(5)) is None
    with pytest.raises(ValueError, match="no checkpoint"):
        state.end_checkpoint(6, block_hash(6), written=True)
    # Seeding over held blocks would lose them
    with pytest.raises(ValueError, match="holds blocks"):
        state.seed(0, block_hash(0), [])
    assert state.get(b"a") == b"2"


def test_an_in_memory_view_still_folds_as_before() -> None:
    base = StateView()
    base.absorb(1, {b"a": b"1"})
    child = base.child()
    child.set(b"b", b"2")
    assert child.get(b"a") == b"1" and child.get(b"b") == b"2" and base.get(b"b") is None


def test_keys_read_ahead_never_go_stale(tmp_path: Path) -> None:
    """A key read ahead as absent, then written by a committed block that a checkpoint moves
    to the file, reads as written; one read ahead with a value, then rewritten, too."""
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, block_hash(0), [(b"anc:old", b"1")])
    state.prefetch({b"anc:new", b"anc:old", b"non:x"})
    assert state.get(b"anc:new") is None and state.get(b"anc:old") == b"1"
    assert state.present({b"anc:new", b"anc:old", b"non:x", b"anc:not-read"}) == {b"anc:old"}
    state.absorb(1, {b"anc:new": b"2", b"anc:old": b"3"})
    state.checkpoint_now(1, block_hash(1))
    assert state.held_entries == 0
    assert state.get(b"anc:new") == b"2" and state.get(b"anc:old") == b"3"
    # Read ahead again after the checkpoint: from the file now
    state.prefetch({b"anc:new", b"anc:old", b"anc:none"})
    assert state.get(b"anc:new") == b"2" and state.get(b"anc:none") is None
    # Read ahead, not read ahead (looked up), and absent; in memory again after a new block
    assert state.present([b"anc:new", b"anc:none", b"anc:old"]) == {b"anc:new", b"anc:old"}
    state.absorb(2, {b"anc:none": b"4"})
    assert state.present({b"anc:none", b"anc:new", b"bal:x"}) == {b"anc:none", b"anc:new"}
    # More keys than one query takes
    state.absorb(3, {b"anc:%d" % i: b"v%d" % i for i in range(2000)})
    state.checkpoint_now(3, block_hash(3))
    state.prefetch({b"anc:%d" % i for i in range(0, 4000, 3)})
    assert all(state.get(b"anc:%d" % i) == b"v%d" % i for i in range(0, 2000, 3))
    assert state.get(b"anc:3999") is None


def test_a_file_without_the_record_of_its_key_kinds_reads_them_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state = CommittedState(path)
    state.seed(3, block_hash(3), [(b"anc:a", b"1"), (b"non:b", b"2")])
    state.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE prefixes")
    db.commit()
    db.close()
    state = CommittedState(path)
    assert state.get(b"anc:a") == b"1" and state.get(b"non:b") == b"2"
    state.close()
    assert CommittedState(path).get(b"non:b") == b"2"


# ---- the Bloom filter of the file's keys ---------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=300), st.integers(0, 300))
def test_the_key_filter_holds_every_key_it_took(keys: list[bytes], capacity: int) -> None:
    f = KeyFilter(capacity)
    f.add(keys)
    assert f.may_hold(keys).all()
    assert f.may_hold([]).shape == (0,)


def test_the_key_filter_lets_few_absent_keys_through() -> None:
    rng = random.Random(11)
    f = KeyFilter(200_000)
    f.add([rng.randbytes(36) for _ in range(200_000)])
    absent = [b"anc:" + rng.randbytes(32) for _ in range(50_000)]
    assert f.may_hold(absent).mean() < 0.03


def anchors(first: int, n: int) -> dict[bytes, bytes]:
    return {b"anc:" + hashlib.sha256(b"%d" % i).digest(): b"v%d" % i for i in range(first, n)}


def test_read_ahead_asks_the_file_only_for_keys_it_may_hold(tmp_path: Path) -> None:
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, block_hash(0), [])
    held = anchors(0, 3000)
    state.absorb(1, held)
    state.checkpoint_now(1, block_hash(1))
    fresh = list(anchors(3000, 6000))
    wanted = fresh + list(held)[:100]
    before = list(state.read_ahead)
    state.prefetch(wanted)
    asked, looked_up = (a - b for a, b in zip(state.read_ahead, before, strict=True))
    assert asked == 3100
    assert 100 <= looked_up < 100 + 0.03 * 3000, looked_up
    assert all(state.get(k) is None for k in fresh)
    assert all(state.get(k) == held[k] for k in list(held)[:100])
    assert state.present(wanted) == set(list(held)[:100])
    # Reopened, the filter is built from the file: the same answers
    state.close()
    state = CommittedState(tmp_path / "state.db")
    state.prefetch(wanted)
    assert state.read_ahead[1] < 100 + 0.03 * 3000
    assert state.present(wanted) == set(list(held)[:100])
    state.close()


def test_the_filter_grows_with_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KeyFilter, "MIN_CAPACITY", 64)
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, block_hash(0), list(anchors(0, 10).items()))
    first = state._filter
    assert first.capacity == 64
    for h in range(1, 6):  # 500 keys a checkpoint: past the room of every filter so far
        state.absorb(h, anchors(h * 1000, h * 1000 + 500))
        state.checkpoint_now(h, block_hash(h))
    assert state._filter is not first and state._filter.capacity >= state._filter.count >= 2510
    everything = [k for h in range(1, 6) for k in anchors(h * 1000, h * 1000 + 500)]
    assert state._filter.may_hold(everything).all()
    state.prefetch(everything)
    assert state.present(everything) == set(everything)
    state.close()


def test_a_checkpoint_stands_when_the_bigger_filter_cannot_be_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyFilter, "MIN_CAPACITY", 64)
    state = CommittedState(tmp_path / "state.db")
    state.seed(0, block_hash(0), [])

    def broken(cls: type[KeyFilter], db: sqlite3.Connection) -> KeyFilter:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(KeyFilter, "build", classmethod(broken))
    keys = anchors(0, 300)
    state.absorb(1, keys)
    state.checkpoint_now(1, block_hash(1))  # past the filter's room: it would grow
    assert state.height == 1 and state.held_entries == 0
    assert state._filter.capacity == 64  # the old filter, which took the keys
    state.prefetch(list(keys))
    assert state.present(list(keys)) == set(keys)
    state.close()
