"""`rayledger bench e2e` runs the loaded network briefly and reports consistent figures."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rayledger.cluster.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


def test_bench_e2e_reports_measured_figures() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "4", "--config", str(CONFIG), "--batch-rows", "500"]
        + ["--forged-rate", "1000"],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["agreement"] is True
    # An impostor announced batches of 500 forged rows twice a second: refused, none counted
    assert 2_000 <= r["forged_rows"] <= 5_000 and r["forged_rows"] % 500 == 0
    assert 0 < r["forged_batches_refused"] <= r["forged_rows"] / 500
    assert "impostor's forged batches" in result.output
    assert r["committed"] > 0 and r["committed"] <= r["submitted"]
    # The network's own checkpoint interval, which a 4 s run does not reach
    assert r["checkpoint_every_blocks"] == 1000 and r["state_checkpoint_height"] == 0
    # Every client's rows reach the chain in its nonce order: none fails for its nonce
    assert r["failed"] == 0 and "committed with an error status" in result.output
    assert r["gap_rows_proposed"] == 0 and r["gap_client_rows"] is None
    assert r["rows_parked"] == 0 and r["rows_sealed_apart"] == 0
    assert r["verifications_per_tx"] == 4
    assert abs(r["raw_limit_tps"] - r["one_core_verify_per_s"] * r["cores"] / 4) < 1
    before, after = r["one_core_verify_before_after"]
    assert before > 0 and after > 0
    assert r["one_core_verify_per_s"] == pytest.approx((before + after) / 2, rel=1e-3)
    assert r["efficiency"] == pytest.approx(r["committed_tps"] / r["raw_limit_tps"], rel=1e-2)
    assert r["one_core_openssl_per_s"] > 0
    assert r["efficiency_openssl"] == pytest.approx(
        r["committed_tps"] / (r["one_core_openssl_per_s"] * r["cores"] / 4), rel=1e-2, abs=1e-3
    )
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    # The network's own checks, timed where they ran: every committed row was checked in
    # four institutions (on CPUs here), at a speed of the probe's order
    per_check = r["check_us_in_network"]
    assert 0.2 < per_check * r["one_core_verify_per_s"] / 1e6 < 5
    assert r["efficiency_in_situ"] == pytest.approx(
        r["committed_tps"] * 4 * per_check / (r["cores"] * 1e6), rel=1e-2, abs=1e-3
    )
    assert "signature checks in the network" in result.output
    assert r["blocks_per_s"] > 0 and 0 < r["txs_per_block"] <= r["committed"]
    # The whole machine over the window: some of it busy (the network ran), none of it
    # counted twice; the table splits the busy share into the signature checks and the rest
    assert 0 < r["machine_busy"] <= 1 and 0 <= r["machine_steal"] <= 1
    assert r["machine_busy"] + r["machine_steal"] <= 1 + 1e-9
    assert "whole machine in the load window" in result.output
    # Validator 0's rounds: a quiet 4-validator network has rounds, few of them by timeout
    assert r["rounds"] > 0 and 0 <= r["rounds_by_timeout"] < r["rounds"]
    assert "validator 0's rounds" in result.output
    # Pre-signed work for the whole window: the rate is the network's, not the clients'
    assert r["clients_out_of_work"] == 0 and "clients out of work" not in result.output
    # Accepted rows were fsynced in the mempools' journals before each answer
    assert r["mempool_journal"] is True and r["journal_fsyncs"] > 0
    assert "mempools' journals" in result.output


def test_bench_e2e_says_when_its_clients_ran_out_of_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed loop, work sized for 40 tx/s: the clients spend it within the window, and the
    result says the committed rate is a floor."""
    from rayledger.cluster import bench

    monkeypatch.setattr(bench, "CLOSED_LOOP_GPU_PACE", 40)
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "3", "--config", str(CONFIG), "--batch-rows", "100"],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["clients_out_of_work"] == 4 and r["submitted"] <= 40 * 3 * 1.5 + 100 * 4
    assert "clients out of work" in result.output and r["agreement"] is True


def test_closed_loop_work_is_sized_for_a_gpu_where_the_verifiers_have_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rayledger.kernels
    from rayledger.cluster.bench import _gpu_checks

    monkeypatch.setattr(rayledger.kernels, "available_backends", lambda: ["cuda", "cpu"])
    assert _gpu_checks(None) and _gpu_checks(True) and not _gpu_checks(False)
    monkeypatch.setattr(rayledger.kernels, "available_backends", lambda: ["cpu"])
    assert not _gpu_checks(None) and not _gpu_checks(True)


def test_bench_e2e_open_loop_offers_its_rate() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "4", "--config", str(CONFIG), "--rate", "400"]
        + ["--batch-rows", "200", "--shards", "2", "--checkpoint-every", "2"],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["offered_tps"] == 400 and r["storage_shards"] == 2
    # The validators wrote their state to disk during the run, as asked
    assert r["checkpoint_every_blocks"] == 2 and r["state_checkpoint_height"] > 0
    assert "state checkpoints" in result.output
    # On schedule: about the offered rows were submitted, none answered busy
    assert 0.8 * 400 * 4 <= r["submitted"] <= 400 * 4 + 4 * 200 and r["busy_answers"] == 0
    assert 0 < r["committed"] <= r["submitted"] and r["agreement"] is True
    assert r["failed"] == 0 and r["forged_rows"] is None and r["forged_batches_refused"] == 0
    # Where the cores went, per committed transaction, by kind of actor
    assert set(r["cpu_us_per_tx"]) >= {"validator", "mempool", "shard", "load generator"}
    assert all(us > 0 for us in r["cpu_us_per_tx"].values())
    assert "load generator" in result.output
    if Path("/proc/self/stat").exists():  # Ray's own processes (raylet, GCS...), from /proc
        assert r["cpu_us_per_tx"]["ray"] > 0 and "Ray's own processes" in result.output


def test_bench_e2e_ceiling_run_says_so() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "3", "--config", str(CONFIG), "--rate", "400"]
        + ["--batch-rows", "200", "--ceiling", "--verifier-actors", "--gap-client"]
        + ["--no-journal"],
    )
    assert result.exit_code == 0, result.output
    assert "CEILING RUN" in result.output and "NOT checked" in result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["signatures_checked"] is False and r["agreement"] is True
    assert 0 < r["committed"] <= r["submitted"]
    # A broken client beside the others: its rows are admitted (and fail), not counted, and
    # none of the others' rows fails
    assert r["gap_client_rows"] > 0 and r["failed"] == 0
    # Its mempool parked every one of its rows (none of the others'), apart from theirs
    assert r["rows_parked"] == r["gap_client_rows"]
    assert "broken client (nonce 0 skipped)" in result.output
    # The GPU machine's layout, asked for on a small one: checks in verifier actors
    assert r["cpu_us_per_tx"]["verifier"] > 0
    assert r["mempool_journal"] is False and r["journal_fsyncs"] is None
    assert "--no-journal" in result.output


def test_bench_e2e_with_a_validator_down_runs_on_the_other_three() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "e2e", "--duration", "6", "--config", str(CONFIG), "--rate", "600"]
        + ["--batch-rows", "200", "--down", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "1 of them DOWN from the start" in result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["down"] == 1 and r["agreement"] is True
    # Every client's rows commit, its validator's crash or not (the clients of institution 3
    # submit through its mempool, which the other three validators read)
    assert 0 < r["committed"] <= r["submitted"] and r["failed"] == 0
    assert r["cpu_us_per_tx"]["validator"] > 0
    # The rounds validator 3 would lead (and those before them, whose votes go to it) end by
    # timeout until the committed window behind a round no longer shows it (n + 3 rounds:
    # a few seconds here), then it is passed over (tests/unit/test_consensus_sim.py)
    assert 0 < r["rounds_by_timeout"] < r["rounds"], r


def test_bench_e2e_refuses_more_validators_down_than_f() -> None:
    result = CliRunner().invoke(
        app, ["bench", "e2e", "--duration", "1", "--config", str(CONFIG), "--down", "2"]
    )
    assert result.exit_code == 2
    assert "down must be between 0 and f = 1" in result.output


def test_the_ceiling_hook_skips_only_the_curve_math(monkeypatch: pytest.MonkeyPatch) -> None:
    from rayledger import tx
    from rayledger.cluster.bench import _skip_curve_math
    from rayledger.crypto import key_from_seed
    from rayledger.tx import TxKind, make_batch, verify_signatures

    key = key_from_seed(b"\x05" * 32)
    batch = make_batch(key, TxKind.ANCHOR, range(4), [b"d" * 32] * 4, b"\x01" * 32)
    sigs = bytearray(batch.column("signature").buffers()[1].to_pybytes())
    sigs[0] ^= 1
    forged = batch.set_column(
        batch.schema.get_field_index("signature"),
        "signature",
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(64), 4, [None, pa.py_buffer(bytes(sigs))]),
    )
    assert verify_signatures(forged).tolist() == [False, True, True, True]
    monkeypatch.setattr(tx, "ed25519_verify_batch", tx.ed25519_verify_batch)  # restored after
    _skip_curve_math()
    assert verify_signatures(forged).tolist() == [True] * 4


def test_bench_rounds_reports_the_cpu_of_a_round() -> None:
    result = CliRunner().invoke(
        app, ["bench", "rounds", "--duration", "3", "--config", str(CONFIG)]
    )
    assert result.exit_code == 0, result.output
    r = json.loads(result.output.strip().splitlines()[-1])
    assert r["bench"] == "rounds" and r["validators"] == 4 and r["idle_block_ms"] == 10
    assert r["rounds"] > 0
    assert r["rounds_per_s"] == pytest.approx(r["rounds"] / r["duration_s"], rel=1e-3)
    per = r["cpu_ms_per_round"]
    assert set(per) >= {"validator", "mempool", "shard", "driver"}
    # Every round moves the validators (messages, votes, the block store) and the shards
    assert per["validator"] > 0 and per["shard"] > 0
    if r["machine_ms_per_round"] is not None:  # the roles fit in the whole machine's CPU
        assert sum(per.values()) <= r["machine_ms_per_round"] * 1.1 + 1
    assert "CPU per round" in result.output
