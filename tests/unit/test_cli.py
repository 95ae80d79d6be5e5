"""The ``rayledger`` command: help, keys, genesis, store verification, demo and bench.

Scenarios:
- --help lists every command group.
- keys new writes a 0600 key and refuses to overwrite; keys show reads it back.
- genesis new/show from configs/local.toml, with written keys; refuses an existing output.
- store verify accepts the demo's store (or the directory holding it) and rejects it after one
  flipped byte (exit 2); a directory without a store is an error, and nothing is created there.
- demo runs end to end on a small batch; bench core prints its JSON figures.
- the core (ledger/, kernels/) imports no Ray, HTTP or clock-driven machinery.
"""

from __future__ import annotations

import ast
import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayledger.cluster.cli import app
from rayledger.config import load_genesis
from rayledger.crypto import public_bytes, read_key_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "local.toml"
runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "keys", "genesis", "store", "bench"):
        assert command in result.output


def test_keys_new_and_show(tmp_path: Path) -> None:
    path = tmp_path / "k" / "v0.key"
    result = runner.invoke(app, ["keys", "new", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pub = public_bytes(read_key_file(path)).hex()
    assert pub in result.output
    shown = runner.invoke(app, ["keys", "show", str(path)])
    assert shown.exit_code == 0 and pub in shown.output
    again = runner.invoke(app, ["keys", "new", str(path)])
    assert again.exit_code == 2 and "never overwritten" in again.output
    assert public_bytes(read_key_file(path)).hex() == pub


def test_keys_show_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    result = runner.invoke(app, ["keys", "show", str(bad)])
    assert result.exit_code == 2 and "config_error" in result.output


def test_genesis_new_and_show(tmp_path: Path) -> None:
    out = tmp_path / "genesis.toml"
    keys = tmp_path / "keys"
    result = runner.invoke(
        app, ["genesis", "new", "--out", str(out), "--config", str(CONFIG), "--keys-dir", str(keys)]
    )
    assert result.exit_code == 0, result.output
    g = load_genesis(out)
    assert g.validators.n == 4 and g.validators.quorum == 3
    for v in g.validators.validators:
        assert public_bytes(read_key_file(keys / f"{v.name}.key")) == v.public_key
    shown = runner.invoke(app, ["genesis", "show", str(out)])
    assert shown.exit_code == 0 and g.chain_id.hex() in shown.output
    again = runner.invoke(app, ["genesis", "new", "--out", str(out), "--config", str(CONFIG)])
    assert again.exit_code == 2


def test_genesis_dev_keys_are_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    for out in (a, b):
        result = runner.invoke(
            app, ["genesis", "new", "--out", str(out), "--config", str(CONFIG), "--dev"]
        )
        assert result.exit_code == 0, result.output
    assert load_genesis(a).validators == load_genesis(b).validators


def test_demo_then_store_verify_detects_corruption(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    result = runner.invoke(
        app,
        [
            "demo",
            "--offline",
            "--config",
            str(CONFIG),
            "--data-dir",
            str(data),
            "--txs",
            "600",
            "--block-size",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "verifies" in result.output and "rejected" in result.output
    assert "QC verified" in result.output
    args = ["store", "verify", str(data / "store"), "--genesis", str(data / "genesis.toml")]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0 and "3 blocks verified" in ok.output
    # The directory above the store (as a validator's directory holds its ``store``) will do;
    # a directory without a store is an error, and none is created there
    above = runner.invoke(app, ["store", "verify", str(data), "--genesis", args[-1]])
    assert above.exit_code == 0 and "3 blocks verified" in above.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = runner.invoke(app, ["store", "verify", str(empty), "--genesis", args[-1]])
    assert none.exit_code == 2 and "no block store" in none.output
    assert list(empty.iterdir()) == []
    missing = runner.invoke(
        app, ["store", "verify", str(tmp_path / "nowhere"), "--genesis", args[-1]]
    )
    assert missing.exit_code == 2 and not (tmp_path / "nowhere").exists()
    seg = data / "store" / "segments" / "00000000.seg"
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    seg.write_bytes(bytes(raw))
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "store_corruption" in bad.output


def test_bench_core_prints_figures() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "core",
            "--rows",
            "2000",
            "--sign-rows",
            "200",
            "--leaves",
            "1000",
            "--block-rows",
            "500",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    ops = {f["operation"]: f for f in report["figures"]}
    assert ops["compute_tx_ids"]["ratio"] > 0
    assert all(f["rate_per_s"] > 0 for f in report["figures"])


def _imports(folder: str) -> list[tuple[Path, str]]:
    found = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((path, node.module))
    return found


def _matches(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


OUTER = {
    "ray",
    "fastapi",
    "uvicorn",
    "httpx",
    "rayledger.actors",
    "rayledger.api",
    "rayledger.cluster",
}


def test_core_imports_nothing_of_the_outer_layers() -> None:
    # The pure core reads no clock and starts no event loop; it never reaches up a layer.
    for path, name in _imports("ledger"):
        assert not _matches(name, OUTER | {"time", "datetime", "asyncio", "cupy"}), (
            f"{path.relative_to(ROOT)} imports {name}"
        )
    # kernels is the ground floor: nothing of ours but itself.
    for path, name in _imports("kernels"):
        ours = name.startswith("rayledger") and not _matches(name, {"rayledger.kernels"})
        assert not ours and not _matches(name, OUTER), f"{path.relative_to(ROOT)} imports {name}"


def test_bench_shard_prints_a_figure_per_window() -> None:
    result = runner.invoke(
        app,
        ["bench", "shard", "--transactions", "1000", "--block-rows", "100", "--window", "400"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    windows = [f["operation"] for f in report["figures"]]
    assert windows == [
        "shard apply, transactions 0-400",
        "shard apply, transactions 400-800",
        "shard apply, transactions 800-1,000",
    ]
    assert all(f["ratio"] > 0 and f["baseline"] == "a run per block" for f in report["figures"])


def test_bench_consensus_prints_figures() -> None:
    result = runner.invoke(
        app, ["bench", "consensus", "--rounds-small", "10", "--rounds-large", "5"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    ops = {f["operation"]: f for f in report["figures"]}
    assert ops["simulate n=64 (mac signatures)"]["items"] >= 5
    assert ops["core: handle one vote, n=64 (no signature check)"]["items"] > 0


def test_bench_kernels_prints_rows() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "kernels",
            "--batch-size",
            "2000",
            "--merkle-leaves",
            "64",
            "--ed25519-batch-size",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["rows"]
    cpu = [r for r in rows if r["operation"] == "sha256" and r["backend"] == "cpu"]
    assert cpu and all(r["ratio_to_raw_loop"] > 0 for r in cpu)
    ed = [r for r in rows if r["operation"] == "ed25519_verify" and r["backend"] == "cpu"]
    assert ed and ed[0]["batch_size"] == 200 and ed[0]["ratio_to_raw_loop"] > 0


def test_receipt_refuses_bad_ids_and_a_missing_network(tmp_path: Path) -> None:
    bad_hex = runner.invoke(app, ["receipt", "zz", "--data-dir", str(tmp_path)])
    assert bad_hex.exit_code == 2 and "hex" in bad_hex.output.lower()
    no_net = runner.invoke(app, ["receipt", "ab" * 32, "--data-dir", str(tmp_path)])
    assert no_net.exit_code == 2 and "no running network" in no_net.output


def test_client_connect_needs_a_recorded_network(tmp_path: Path) -> None:
    from rayledger.cluster.client import Client

    with pytest.raises(FileNotFoundError, match="no running network recorded"):
        Client.connect(tmp_path)


def test_machine_cpu_shares_from_proc_stat(tmp_path: Path) -> None:
    from rayledger.cluster.bench import machine_cpu_times, machine_shares

    stat_file = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat_file.write_text("cpu  100 10 40 800 20 5 5 20 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    start = machine_cpu_times(stat_file)
    assert start == (160, 20, 1000)  # guest time is inside user already: not added
    stat_file.write_text("cpu  250 10 90 1400 30 5 5 60 7 0\n")
    end = machine_cpu_times(stat_file)
    assert end == (360, 60, 1850)
    busy, steal = machine_shares(start, end)  # type: ignore[misc]
    assert busy == 200 / 850 and steal == 40 / 850
    # Nothing to measure: no file, a foreign format, or no time between the readings
    assert machine_cpu_times(tmp_path / "absent") is None
    stat_file.write_text("intr 1 2 3\n")
    assert machine_cpu_times(stat_file) is None
    assert machine_shares(start, start) is None and machine_shares(None, end) is None
    # This machine's own, where it has one: busy and steal never exceed the total
    here = machine_cpu_times()
    if here is not None:
        assert 0 <= here[0] + here[1] <= here[2]


def test_ray_own_cpu_reads_only_rays_processes(tmp_path: Path) -> None:
    """Ray's own processes (raylet, GCS, agents, idle workers) by pid from a /proc-like tree;
    the network's actors, this process and anything else are left out."""
    import os

    from rayledger.cluster.bench import cpu_between, ray_own_cpu

    def proc(pid: int, command: str, utime: int, stime: int, name: str = "x") -> None:
        d = tmp_path / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cmdline").write_bytes(command.replace(" ", "\0").encode() + b"\0")
        # comm may hold spaces and parentheses: the fields are read after the last ')'
        rest = " ".join(["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30)
        (d / "stat").write_text(f"{pid} ({name}) {rest}\n")

    site = "/venv/lib/python3.11/site-packages/ray"
    proc(10, f"{site}/core/src/ray/raylet/raylet --raylet_socket_name=x", 100, 50, "raylet")
    proc(11, f"{site}/core/src/ray/gcs/gcs_server --log_dir=x", 30, 10)
    proc(12, "ray::DashboardAgent", 7, 3, "ray::Dash (x)")
    proc(13, "ray::IDLE", 1, 1)
    proc(20, "ray::Validator.deliver", 900, 100)  # an actor: reports its own CPU
    proc(21, "python -c from rayledger.cluster.cli import main", 500, 0)
    proc(22, f"python -u {site}/_private/log_monitor.py --x", 2, 2)
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "99").mkdir()  # a process gone between listing and reading
    start = ray_own_cpu(tmp_path)
    assert start == {10: 150, 11: 40, 12: 10, 13: 2, 22: 4}
    # Later: the raylet used 2 s more, an idle worker exited, a new agent started
    proc(10, f"{site}/core/src/ray/raylet/raylet --raylet_socket_name=x", 200, 50 + 100, "raylet")
    (tmp_path / "13" / "stat").unlink()
    proc(14, "ray::RuntimeEnvAgent", 5, 5)
    end = ray_own_cpu(tmp_path)
    assert end is not None and 13 not in end and end[14] == 10
    hz = os.sysconf("SC_CLK_TCK")
    assert cpu_between(start, end) == (200 + 10) / hz
    assert cpu_between(None, end) is None and cpu_between(start, None) is None
    assert ray_own_cpu(tmp_path / "absent") is None


def test_the_default_config_is_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands' default ``configs/local.toml`` is relative to where they run: outside a
    source checkout the copy shipped with the package serves; a file of that name where the
    command runs wins; an unknown name fails naming the shipped ones."""
    from rayledger.cluster.network import bundled_configs, config_path, load_network
    from rayledger.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    assert bundled_configs() == ["local.toml", "multisite.toml"]
    assert load_network("configs/local.toml") == load_network(CONFIG)
    assert load_network("multisite.toml") == load_network(CONFIG.with_name("multisite.toml"))
    out = tmp_path / "genesis.toml"
    made = runner.invoke(app, ["genesis", "new", "--out", str(out), "--dev"])
    assert made.exit_code == 0, made.output
    assert load_genesis(out).validators.n == 4
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "local.toml"
    own.write_text(CONFIG.read_text().replace("rayledger-local", "my-chain", 1))
    assert config_path("configs/local.toml") == Path("configs/local.toml")
    assert load_network("configs/local.toml").chain_name == "my-chain"
    with pytest.raises(ConfigError, match="shipped with rayledger.*local.toml, multisite.toml"):
        load_network("configs/nope.toml")
    with pytest.raises(ConfigError, match="cannot read network config"):
        load_network(tmp_path / "elsewhere" / "local.toml")
    assert config_path("other/local.toml") == Path("other/local.toml")


def test_soak_keeps_its_data_only_in_a_new_or_empty_directory(tmp_path: Path) -> None:
    """``soak --keep`` refuses a directory with anything in it, or a file, before starting
    anything, and leaves what is there as it was."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("mine too")
    for target in (busy, a_file):
        args = ["soak", "--duration", "1", "--config", str(CONFIG), "--keep", str(target)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "is not a new or empty directory" in " ".join(result.output.split())
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert (busy / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine too"
