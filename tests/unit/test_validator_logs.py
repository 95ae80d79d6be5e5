"""The validator's append-only logs: a torn record from a crash is cut so later appends stay
readable, and the proposals log is compacted to its window (no Ray needed)."""

from __future__ import annotations

import collections
from pathlib import Path

from rayledger.actors.validator import Validator, _read_records, _record
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
    entry = b"\x01" * 32 + struct.pack(">QII", 3, 0, 10)
    (tmp_path / "batches.idx").write_bytes(entry + entry[:20])
    assert v._load_batch_index() == {b"\x01" * 32: (3, 0, 10)}
    assert (tmp_path / "batches.idx").stat().st_size == 48
