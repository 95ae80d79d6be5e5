"""`rayledger bench e2e` runs the loaded network briefly and reports consistent figures."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from rayledger.cluster.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


def test_bench_e2e_reports_measured_figures() -> None:
    result = CliRunner().invoke(
        app, ["bench", "e2e", "--duration", "4", "--config", str(CONFIG), "--batch-rows", "500"]
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["agreement"] is True
    assert r["committed"] > 0 and r["committed"] <= r["submitted"]
    assert r["verifications_per_tx"] == 5
    assert abs(r["raw_limit_tps"] - r["one_core_verify_per_s"] * r["cores"] / 5) < 1
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]


def test_bench_e2e_open_loop_offers_its_rate() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "4", "--config", str(CONFIG), "--rate", "400"]
        + ["--batch-rows", "200", "--shards", "2"],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["offered_tps"] == 400 and r["storage_shards"] == 2
    # On schedule: about the offered rows were submitted, none answered busy
    assert 0.8 * 400 * 4 <= r["submitted"] <= 400 * 4 + 4 * 200 and r["busy_answers"] == 0
    assert 0 < r["committed"] <= r["submitted"] and r["agreement"] is True
    # Where the cores went, per committed transaction, by kind of actor
    assert set(r["cpu_us_per_tx"]) >= {"validator", "mempool", "shard"}
    assert all(us > 0 for us in r["cpu_us_per_tx"].values())
