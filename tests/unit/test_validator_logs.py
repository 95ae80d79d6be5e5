"""The validator's append-only logs: a torn record from a crash is cut so later appends stay
readable, and the proposals log is compacted to its window; its timers of rounds left are
cancelled (no Ray needed)."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from types import SimpleNamespace

from rayledger.actors.validator import Validator, _read_records, _record
from rayledger.consensus import SetTimer
from rayledger.consensus.wire import decode_proposal

from .consensus_harness import Keyring


def test_torn_record_is_cut_and_later_appends_parse(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(_record(b"one") + _record(b"two") + _record(b"three")[:5])
    assert _read_records(log) == [b"one", b"two"]
    with open(log, "ab") as f:
        f.write(_record(b"four"))
    assert _read_records(log) == [b"one", b"two", b"four"]
    assert _read_records(tmp_path / "missing.log") == []


def test_proposals_log_is_compacted_to_its_window(tmp_path: Path) -> None:
    v = Validator.__new__(Validator)
    v.dir = tmp_path
    v._recent_proposals = collections.deque(maxlen=3)
    v._proposal_log_count = 0
    proposals = Keyring.make(4).chain(20)
    sizes = []
    for p in proposals:
        v._append_proposals((p,))
        sizes.append(len(_read_records(tmp_path / "proposals.log")))
    assert max(sizes) <= 7
    kept = [decode_proposal(r) for r in _read_records(tmp_path / "proposals.log")]
    assert kept[-3:] == proposals[-3:]


def test_torn_batch_index_entry_is_cut(tmp_path: Path) -> None:
    import struct
    from types import SimpleNamespace

    v = Validator.__new__(Validator)
    v.dir = tmp_path
    v.store = SimpleNamespace(height=5)
    v.batch_window = 4096
    entry = b"\x01" * 32 + struct.pack(">QII", 3, 0, 10)
    (tmp_path / "batches.idx").write_bytes(entry + entry[:20])
    assert v._load_batch_index() == {b"\x01" * 32: (3, 0, 10)}
    assert (tmp_path / "batches.idx").stat().st_size == 48


def test_memory_held_per_height_stays_bounded_and_the_batch_index_compacts(
    tmp_path: Path,
) -> None:
    import struct
    from types import SimpleNamespace

    from rayledger.actors import validator as vmod

    v = Validator.__new__(Validator)
    v.dir = tmp_path
    v.store = SimpleNamespace(height=0)
    v.shard_pending_max = 10
    v.batch_window = 50
    v.proofs_from = 0
    v.commit_proofs, v.replayed_proofs, v.replayed_proofs_from = {}, {}, None
    v.commit_times = {}
    v.committed_batches = v._load_batch_index()
    saved = vmod.COMMIT_TIMES_KEEP
    vmod.COMMIT_TIMES_KEEP = 30
    try:
        sizes = []
        for h in range(1, 3001):
            v.store.height = h
            v.commit_proofs[h] = ("proof", h)  # type: ignore[assignment]
            v.commit_times[h] = float(h)
            digest = h.to_bytes(32, "big")
            v.committed_batches[digest] = (h, 0, 7)
            with open(tmp_path / "batches.idx", "ab") as f:
                f.write(digest + struct.pack(">QII", h, 0, 7))
            v._batch_index_entries += 1
            if h == 2000:  # a shard rebuild begins: proofs leaving memory are kept for it
                v.replayed_proofs_from = v.proofs_from - 5
            v._bound_memory()
            sizes.append((tmp_path / "batches.idx").stat().st_size // 48)
    finally:
        vmod.COMMIT_TIMES_KEEP = saved
    assert sorted(v.commit_proofs) == list(range(2990, 3001)) and v.proofs_from == 2990
    assert sorted(v.replayed_proofs) == list(range(1989, 2990))  # contiguous, nothing lost
    assert sorted(h for h, _, _ in v.committed_batches.values()) == list(range(2951, 3001))
    assert sorted(v.commit_times) == list(range(2971, 3001))
    assert max(sizes) <= 2 * 50 + 1024 + 1  # the file is rewritten, not grown for ever
    # A restart reads back exactly the window, from the compacted file
    v.committed_batches = {}
    assert v._load_batch_index() == {h.to_bytes(32, "big"): (h, 0, 7) for h in range(2951, 3001)}


def test_an_earlier_commits_log_moves_into_the_store(tmp_path: Path) -> None:
    from rayledger.actors.storage import BlockStore

    from .test_store import GENESIS, make_chain

    store = BlockStore(tmp_path / "store", GENESIS)
    for b in make_chain(3):
        store.append(b)
    v = Validator.__new__(Validator)
    v.dir = tmp_path
    v.store = store
    records = [(h).to_bytes(8, "big") + b"proof %d" % h for h in (1, 3, 9)]  # 9: not stored
    (tmp_path / "commits.log").write_bytes(b"".join(_record(r) for r in records) + b"\x00\x00")
    v._import_commit_log()
    assert store.commit_proofs(0, 100) == [(1, records[0]), (3, records[1])]
    assert not (tmp_path / "commits.log").exists()
    assert (tmp_path / "commits.log.imported").exists()
    v._import_commit_log()  # nothing left to import
    store.close()


def test_timers_of_rounds_the_core_left_are_cancelled() -> None:
    fired: list[tuple[int, str]] = []

    async def run() -> None:
        v = Validator.__new__(Validator)
        v._timers = []
        v._on_timer = lambda round_, purpose: fired.append((round_, purpose))  # type: ignore[method-assign]
        v.core = SimpleNamespace(round=3, rounds_by_timeout=0)
        v._timed_out_rounds = 0
        v._run([SetTimer(3, 30), SetTimer(3, 30, "propose"), SetTimer(4, 60)])
        assert len(v._timers) == 3
        v.core.round = 4  # the core moved on: round 3's timers are dropped, round 4's kept
        v._run([])
        assert [r for r, _ in v._timers] == [4]
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert fired == [(4, SetTimer(4, 60).purpose)]


def test_each_round_entered_by_a_timeout_certificate_is_logged_once(caplog) -> None:  # type: ignore[no-untyped-def]
    v = Validator.__new__(Validator)
    v.index, v._timers, v._timed_out_rounds = 2, [], 0
    leaders = SimpleNamespace(leader=lambda r: r % 4)
    v.core = SimpleNamespace(
        round=8, rounds_by_timeout=0, last_tc=None, leaders=leaders, leader=leaders.leader
    )
    with caplog.at_level("WARNING", logger="rayledger.actors.validator"):
        v._run([])  # no round by timeout: nothing logged
        assert not caplog.records
        v.core.rounds_by_timeout, v.core.last_tc = 1, SimpleNamespace(round=7)
        v._run([])
        v._run([])  # the same count again: not logged twice
    assert [r.getMessage() for r in caplog.records] == [
        "validator 2: round 7 ended by a timeout certificate (its leader, validator 3, got no "
        "block certified in time); now in round 8"
    ]
