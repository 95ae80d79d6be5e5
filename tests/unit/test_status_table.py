"""`rayledger status`'s table: a row per validator, down ones included, with where each one's
committed state stands (checkpointed height / entries held in memory) and the peers it has a
direct stream up to. Printed whole where the output is not a terminal (a log, a pipe), and as
JSON with ``--json``; a validator that does not answer says why."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from rich.console import Console
from typer.testing import CliRunner

from rayledger.cluster import ops
from rayledger.cluster.cli import app
from rayledger.cluster.client import Client
from rayledger.cluster.local import _why_down
from rayledger.cluster.ops import status_table


def _statuses() -> list[dict[str, Any]]:
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
        "clock_offset_ms": -3,
        "loop": {"worst_ms_last_minute": 12.4, "worst_ms": 30.0, "stalls": 0, "stall_ms": 250.0},
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
        "clock_offset_ms": 3_600_012,
        "index": 2,
        "site": "sa",
        "streams": {"enabled": True, "connected": []},
        "mempool": {"pending_rows": 0, "in_flight_rows": 5, "limit_rows": 90, "parked_rows": 7},
        "passed_over": {"unseen": [3], "failed": [0, 1], "final": True},
        "loop": {"worst_ms_last_minute": 612.0, "worst_ms": 900.0, "stalls": 3, "stall_ms": 250.0},
    }
    down = {"index": 3, "site": "ap", "down": "killed"}
    return [up, by_ray, unlinked, down]


def _net() -> SimpleNamespace:
    statuses = _statuses()
    return SimpleNamespace(
        name="t", genesis=SimpleNamespace(chain_name="chain"), status=lambda: statuses
    )


def test_status_table_shows_each_validator_and_its_state() -> None:
    net = _net()
    console = Console(width=360, record=True)
    console.print(status_table(net))  # type: ignore[arg-type]
    out = console.export_text()
    assert "state on disk at / held" in out
    row = next(line for line in out.splitlines() if "eu" in line)
    assert "16 / 12,345" in row and "40 ?" in row and "3+1000/4000" in row
    assert "round (by timeout)" in out and "41 (2)" in row
    assert "1,2,3 (1,3)" in row and "-0.003 s" in row
    assert "+3600.012 s" in next(line for line in out.splitlines() if "sa" in line)
    assert "0,2 (ray)" in next(line for line in out.splitlines() if "us" in line)
    assert "3+1000/4000 " in row and "parked" not in row
    sa = next(line for line in out.splitlines() if "sa" in line)
    assert "1,2,3 (none)" in sa and "0+5/90 (7 parked)" in sa
    # Whom leader reputation passes over, and why (nobody: the leader alone)
    assert "1 (passes over: unseen 3; failed 0,1)" in sa
    assert "passes over" not in row
    # How late each event loop ran at worst in the last minute, and its stalls
    assert "loop late" in out and "12 ms" in row and "stalls" not in row
    assert "612 ms, 3 stalls" in sa
    assert "down (killed)" in out


def test_status_command_prints_the_whole_table_into_a_pipe_and_json_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _net()
    net.status()[0]["raw"] = b"\x01\xff"  # bytes a status may carry: written as hex
    monkeypatch.setattr(ops, "connect", lambda data_dir: net)
    runner = CliRunner()
    table = runner.invoke(app, ["status"])
    assert table.exit_code == 0, table.output
    # Not a terminal: every heading on one line, not squeezed into 80 columns
    header = next(line for line in table.output.splitlines() if "validator" in line)
    assert "round (by timeout)" in header and "state on disk at / held" in header
    assert "down (killed)" in table.output
    as_json = runner.invoke(app, ["status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.output)
    assert [st["index"] for st in doc] == [0, 1, 2, 3]
    assert doc[0]["raw"] == "01ff" and doc[0]["mempool"]["limit_rows"] == 4000
    assert doc[3] == {"index": 3, "site": "ap", "down": "killed"}


def test_status_command_without_a_network_fails_clearly(tmp_path: Any) -> None:
    result = CliRunner().invoke(app, ["status", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no running network" in result.output


def _dead_address() -> str:
    """A local port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    "command", [["status"], ["down"], ["chaos", "heal"], ["receipt", "ab" * 32]]
)
def test_a_network_recorded_but_gone_fails_at_once(tmp_path: Any, command: list[str]) -> None:
    """``up`` killed (or the machine restarted) leaves its Ray address behind: every command
    that joins the network says it is not running, within seconds. Ray's own join retried
    for minutes (`rayledger status` was still waiting after five)."""
    (tmp_path / "ray_address").write_text(_dead_address())
    t0 = time.monotonic()
    result = CliRunner().invoke(app, [*command, "--data-dir", str(tmp_path)], terminal_width=200)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert f"error: the network recorded in {tmp_path} is not running" in out, out
    assert "start it with `rayledger up`" in out and time.monotonic() - t0 < 10
    assert not ray.is_initialized()


@pytest.mark.parametrize("text", ["hello world", "", "host:", ":80", "10.0.0.1"])
def test_a_recorded_address_that_is_not_one_is_named(tmp_path: Any, text: str) -> None:
    (tmp_path / "ray_address").write_text(text)
    for command in (["status"], ["down"], ["chaos", "heal"]):
        result = CliRunner().invoke(
            app, [*command, "--data-dir", str(tmp_path)], terminal_width=200
        )
        out = " ".join(result.output.split())
        assert result.exit_code == 2, out
        assert f"is not a Ray address HOST:PORT (recorded in {tmp_path}/ray_address)" in out, out
    assert not ray.is_initialized()


def test_a_client_given_a_dead_address_fails_at_once(tmp_path: Any) -> None:
    with pytest.raises(ConnectionError, match="the network is not running: no Ray cluster"):
        Client.connect(tmp_path, address=_dead_address())
    with pytest.raises(ConnectionError, match=f"the network recorded in {tmp_path}"):
        (tmp_path / "ray_address").write_text(_dead_address())
        Client.connect(tmp_path)
    assert not ray.is_initialized()


def test_a_validator_that_does_not_answer_says_why() -> None:
    assert _why_down(ValueError("Failed to look up actor")) == "no actor (killed, or not started)"
    assert _why_down(ray.exceptions.GetTimeoutError()) == "no answer in 10 s"
    assert _why_down(ray.exceptions.ActorDiedError()) == "actor died"
    assert _why_down(ray.exceptions.RaySystemError("x")) == "RaySystemError"
