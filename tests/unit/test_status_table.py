"""`rayledger status`'s table: a row per validator, down ones included, with where each one's
committed state stands (checkpointed height / entries held in memory) and the peers it has a
direct stream up to."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from rayledger.cluster.ops import status_table


def test_status_table_shows_each_validator_and_its_state() -> None:
    up = {
        "index": 0,
        "site": "eu",
        "height": 40,
        "round": 41,
        "rounds_by_timeout": 2,
        "leader": 1,
        "head": "ab" * 32,
        "mempool": {"pending_rows": 3, "in_flight_rows": 1000, "limit_rows": 4000},
        "peers": [1, 2, 3],
        "streams": {"enabled": True, "connected": [1, 3]},
        "shards": {"0": 40, "1": None},
        "evidence": 0,
        "rejected": {"batch: bad_signature": 2},
        "state_checkpoint": 16,
        "state_held_entries": 12345,
    }
    by_ray = {
        **up,
        "index": 1,
        "site": "us",
        "peers": [0, 2],
        "streams": {"enabled": False, "connected": []},
    }
    unlinked = {
        **up,
        "index": 2,
        "site": "sa",
        "streams": {"enabled": True, "connected": []},
        "mempool": {"pending_rows": 0, "in_flight_rows": 5, "limit_rows": 90, "parked_rows": 7},
    }
    down = {"index": 3, "site": "ap", "down": "killed"}
    net = SimpleNamespace(
        name="t",
        genesis=SimpleNamespace(chain_name="chain"),
        status=lambda: [up, by_ray, unlinked, down],
    )
    console = Console(width=300, record=True)
    console.print(status_table(net))  # type: ignore[arg-type]
    out = console.export_text()
    assert "state on disk at / held" in out
    row = next(line for line in out.splitlines() if "eu" in line)
    assert "16 / 12,345" in row and "40 ?" in row and "3+1000/4000" in row
    assert "round (by timeout)" in out and "41 (2)" in row
    assert "1,2,3 (1,3)" in row
    assert "0,2 (ray)" in next(line for line in out.splitlines() if "us" in line)
    assert "3+1000/4000 " in row and "parked" not in row
    sa = next(line for line in out.splitlines() if "sa" in line)
    assert "1,2,3 (none)" in sa and "0+5/90 (7 parked)" in sa
    assert "down (killed)" in out
