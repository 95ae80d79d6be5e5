"""``rayledger soak``: random faults under load, then the checks; a failed check is exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayledger.cluster.cli import app
from rayledger.cluster.soak import SoakResult

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


def test_soak_runs_faults_under_load_and_checks_every_transaction() -> None:
    result = CliRunner().invoke(
        app,
        ["soak", "--duration", "20", "--seed", "3", "--config", str(CONFIG)]
        + ["--forged-rows", "600", "--settle", "120"],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["ok"] is True and r["agreement"] is True
    assert r["faults"] and r["accepted"] > 1_000
    assert r["committed"] == [r["accepted"]] * 4
    assert r["duplicates"] == r["missing"] == r["not_ok"] == [0] * 4
    assert r["forged_batches"] >= 10
    assert "verdict" in result.output and "OK" in result.output


def base(**kw: object) -> SoakResult:
    fields = dict(
        seed=1,
        duration_s=1.0,
        faults=["quiet"],
        accepted=10,
        committed=[10] * 4,
        duplicates=[0] * 4,
        missing=[0] * 4,
        not_ok=[0] * 4,
        agreement=True,
        heights=[3] * 4,
    )
    fields.update(kw)
    return SoakResult(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"agreement": False},
        {"accepted": 0, "committed": [0] * 4},
        {"committed": [10, 10, 9, 10]},
        {"committed": [11] * 4},  # a row no client had taken
        {"duplicates": [0, 1, 0, 0]},
        {"missing": [0, 0, 2, 0]},
        {"not_ok": [1, 0, 0, 0]},
    ],
)
def test_any_failed_check_fails_the_soak(change: dict[str, object]) -> None:
    assert base().ok is True
    assert base(**change).ok is False
