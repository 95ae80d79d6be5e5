"""State snapshots: a round trip, and a damaged or foreign file is ignored, never trusted."""

from __future__ import annotations

from pathlib import Path

from rayledger.actors.storage.snapshot import load_snapshot, save_snapshot


def test_round_trip_and_damage_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.snap"
    assert load_snapshot(path) is None
    state = {b"bal:" + bytes([i]) * 32: i.to_bytes(8, "big") for i in range(50)}
    save_snapshot(path, 17, b"\x07" * 32, state)
    assert load_snapshot(path) == (17, b"\x07" * 32, state)
    good = path.read_bytes()
    for pos in (0, 5, len(good) // 2, len(good) - 1):
        damaged = bytearray(good)
        damaged[pos] ^= 1
        path.write_bytes(bytes(damaged))
        assert load_snapshot(path) is None
    path.write_bytes(good[:20])
    assert load_snapshot(path) is None
    save_snapshot(path, 0, bytes(32), {})
    assert load_snapshot(path) == (0, bytes(32), {})
    assert not (tmp_path / "state.tmp").exists()
