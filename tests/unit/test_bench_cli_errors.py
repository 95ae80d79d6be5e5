"""``rayledger bench e2e`` and ``bench rounds`` refuse bad input before Ray starts.

Scenarios (each exit 2 with one ``error:`` line naming the option or the file, no traceback,
Ray never started, nor the CPU probe that ``bench e2e`` runs before it):
- e2e: --validators other than the config's count; --rate, --forged-rate or --duration inf
  (their min bounds refuse nan and -inf, not inf); a config that does not exist, is not
  text, has a string for its clients, or has no clients (the load comes from them).
- rounds: --duration inf; a config that does not exist, is not text, or has a string for its
  clients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

import rayledger.cluster.bench as bench
import rayledger.cluster.local as local
from rayledger.cluster.cli import app

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "local.toml"
runner = CliRunner()


def _write_configs(folder: Path) -> dict[str, str]:
    """Bad configs in ``folder``: garbage bytes, clients as a string, and no clients; by
    name, relative to ``folder`` (short: rich folds a word longer than its console's width)."""
    text = CONFIG.read_text()
    # local.toml without its [[clients]] tables (they run up to the links' comment)
    without_clients = text[: text.index("[[clients]]")] + text[text.index("# Emulated WAN") :]
    files = {
        "garbage": b"\xff\xfe\x00not toml \x80\x81",
        "string-clients": ('clients = "x"\n' + without_clients).encode(),
        "no-clients": without_clients.encode(),
    }
    for name, data in files.items():
        (folder / f"{name}.toml").write_bytes(data)
    return {name: f"{name}.toml" for name in files}


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching Ray, or the minutes-long setup before it, fails the test."""

    def reached(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the benchmark went on past its checks")

    monkeypatch.setattr(local, "init_local_ray", reached)
    monkeypatch.setattr(ray, "init", reached)
    monkeypatch.setattr(bench, "_one_core_verify_rates", reached)


# (command and options, with {name} for a bad config of _write_configs; the message)
CASES = [
    (
        ["e2e", "--validators", "5", "--config", str(CONFIG)],
        f"error: --validators 5 does not match {CONFIG}, which describes 4 validators",
    ),
    (["e2e", "--rate", "inf"], "error: --rate must be a finite number of tx/s, not inf"),
    (
        ["e2e", "--forged-rate", "inf"],
        "error: --forged-rate must be a finite number of rows/s, not inf",
    ),
    # A day at most (typer's own refusal): 1e10 s overflowed a sleep once Ray was up
    (["e2e", "--duration", "inf"], "Invalid value for '--duration': Input should be less than"),
    (["e2e", "--duration", "1e10"], "Invalid value for '--duration': Input should be less than"),
    (
        ["e2e", "--config", "/nonexistent.toml"],
        "error: [config_error] cannot read network config /nonexistent.toml",
    ),
    (["e2e", "--config", "{garbage}"], "cannot read network config {garbage}"),
    (["e2e", "--config", "{string-clients}"], "error: [config_error] {string-clients}: clients"),
    (
        ["e2e", "--config", "{no-clients}"],
        "error: {no-clients} describes no clients: bench e2e has nobody to send the load",
    ),
    (["rounds", "--duration", "inf"], "Invalid value for '--duration': Input should be less"),
    (["rounds", "--duration", "1e10"], "Invalid value for '--duration': Input should be less"),
    (
        ["rounds", "--config", "/nonexistent.toml"],
        "error: [config_error] cannot read network config /nonexistent.toml",
    ),
    (["rounds", "--config", "{garbage}"], "cannot read network config {garbage}"),
    (["rounds", "--config", "{string-clients}"], "error: [config_error] {string-clients}: clients"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bench_refuses_bad_input_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    names = _write_configs(tmp_path)
    result = runner.invoke(app, ["bench", *(a.format_map(names) for a in args)], terminal_width=200)
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2, (result.output, result.exception)
    assert message.format_map(names) in output, output
    assert "Traceback" not in output
    assert not ray.is_initialized()
