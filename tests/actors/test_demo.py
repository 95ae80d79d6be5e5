"""`rayledger demo` end to end: the network on Ray commits every client's transactions through
a validator crash and restart, all validators agree, and the audited receipt verifies."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from rayledger.cluster.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


def test_network_demo_runs_end_to_end() -> None:
    result = CliRunner().invoke(app, ["demo", "--config", str(CONFIG), "--txs", "1600"])
    assert result.exit_code == 0, result.output
    assert "validator 3 restarted" in result.output
    assert "state roots up to height" in result.output and ": yes" in result.output
    assert "(status OK)" in result.output and "QC verified" in result.output
