"""The verifier actor's class without Ray: a GPU that cannot serve (its kernels fail to compile,
its driver refuses) leaves the institution checking batches on the CPU, said in its status; a
process told to use the GPU (RAYLEDGER_KERNELS=cuda) fails instead of falling back quietly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rayledger.actors import verifier as verifier_mod
from rayledger.cluster.network import load_network, make_genesis
from rayledger.kernels import _backend

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    genesis, _ = make_genesis(load_network(CONFIG), int(time.time() * 1000), dev=True)
    genesis.save(tmp_path / "genesis.toml")
    (tmp_path / "network.json").write_text(json.dumps({"name": "t"}))
    return tmp_path


def _broken(backend: str = "auto") -> str:
    raise RuntimeError("NVRTC_ERROR_COMPILATION")


def test_a_gpu_that_cannot_serve_leaves_checks_on_the_cpu(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_backend.ENV_VAR, "auto")  # restored after the test, whatever is set
    monkeypatch.setattr(verifier_mod, "prepare", _broken)
    v = verifier_mod.Verifier(str(data_dir), 0)
    assert v.backend.startswith("cpu (cuda failed: RuntimeError: NVRTC_ERROR_COMPILATION")
    assert _backend.resolve_backend() == "cpu"  # this process now checks on the CPU


def test_an_explicit_gpu_request_is_not_quietly_dropped(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    monkeypatch.setattr(verifier_mod, "prepare", _broken)
    with pytest.raises(RuntimeError, match="NVRTC"):
        verifier_mod.Verifier(str(data_dir), 0)


def test_a_working_backend_is_reported(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_backend.ENV_VAR, "auto")  # restored after the test, whatever is set
    v = verifier_mod.Verifier(str(data_dir), 1)
    assert v.backend == _backend.available_backends()[0]
