"""The two-slot durable record (``actors/storage/slots.py``) that a validator's safety state
is persisted in before every vote: newest record wins, a torn write falls back to the record
before it, and damage everywhere is an error, never an empty answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayledger.actors.storage import slots as slots_mod
from rayledger.actors.storage.slots import SlotFile
from rayledger.errors import StoreCorruption


def test_records_alternate_slots_and_the_newest_is_read(tmp_path: Path) -> None:
    f = SlotFile(tmp_path, "safety")
    assert f.read() is None
    for i in range(5):
        f.write(b"state %d" % i + b"x" * (10 - 2 * i))  # shorter and shorter: old bytes remain
    assert SlotFile(tmp_path, "safety").read() == b"state 4" + b"xx"
    assert (tmp_path / "safety.0").exists() and (tmp_path / "safety.1").exists()
    # A second writer opened later continues the sequence (it never rewrites the newest slot)
    g = SlotFile(tmp_path, "safety")
    g.write(b"state 5")
    assert SlotFile(tmp_path, "safety").read() == b"state 5"


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_torn_newest_slot_falls_back_to_the_record_before(tmp_path: Path, damage: str) -> None:
    f = SlotFile(tmp_path, "safety")
    f.write(b"first")
    f.write(b"second")  # slot .0 (sequence 2); "first" is in slot .1
    newest = tmp_path / "safety.0"
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[14] ^= 1
    elif damage == "truncate":
        data = data[:20]
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    again = SlotFile(tmp_path, "safety")
    assert again.read() == b"first"
    # The next write replaces the damaged slot, not the good one
    again.write(b"third")
    assert SlotFile(tmp_path, "safety").read() == b"third"
    assert (tmp_path / "safety.1").read_bytes()[12:17] == b"first"


def test_no_valid_slot_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    f = SlotFile(tmp_path, "safety", legacy=tmp_path / "safety.bin")
    (tmp_path / "safety.bin").write_bytes(b"legacy")
    f.write(b"one")
    f.write(b"two")
    for slot in ("safety.0", "safety.1"):
        (tmp_path / slot).write_bytes(b"\x00" * 40)
    with pytest.raises(StoreCorruption, match="no valid record"):
        SlotFile(tmp_path, "safety", legacy=tmp_path / "safety.bin").read()


def test_a_legacy_whole_file_is_read_until_the_first_slot_write(tmp_path: Path) -> None:
    legacy = tmp_path / "safety.bin"
    legacy.write_bytes(b"from before the slots")
    f = SlotFile(tmp_path, "safety", legacy=legacy)
    assert f.read() == b"from before the slots"
    f.write(b"new")
    assert SlotFile(tmp_path, "safety", legacy=legacy).read() == b"new"


@pytest.mark.parametrize("crash_at", ["write", "fsync", "rename"])
def test_a_crash_in_a_slots_first_write_leaves_no_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """A validator killed in its very first vote: the first record was never written, and
    it starts again with none (before, the torn slot was the only one, read as damage)."""

    class Killed(Exception):
        pass

    def dies(*args: object) -> None:
        raise Killed

    f = SlotFile(tmp_path, "safety")
    target = {"write": "pwrite", "fsync": "fsync", "rename": "replace"}[crash_at]
    with monkeypatch.context() as m:
        m.setattr(slots_mod.os, target, dies)
        with pytest.raises(Killed):
            f.write(b"first vote")
    assert not (tmp_path / "safety.1").exists()
    again = SlotFile(tmp_path, "safety")
    assert again.read() is None
    again.write(b"first vote")
    assert SlotFile(tmp_path, "safety").read() == b"first vote"
    # The second slot's first record too: the first one stays the one read
    with monkeypatch.context() as m:
        m.setattr(slots_mod.os, target, dies)
        with pytest.raises(Killed):
            again.write(b"second vote")
    assert not (tmp_path / "safety.0").exists()
    assert SlotFile(tmp_path, "safety").read() == b"first vote"
