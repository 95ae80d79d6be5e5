"""The CUDA sources compile: each of kernels/cuda/*.cu on its own, and the text that
kernels/_cuda.py hands to cupy.RawModule, with ``nvcc -arch=sm_90`` (no device needed).

Scenarios:
- every .cu file compiles on its own, warnings as errors;
- the concatenated module source compiles, every kernel _cuda.py launches is defined there as
  an extern "C" __global__ function, and ptxas reports no register spills (and no stack frame
  but Ed25519's point tables);
- the module source also compiles under NVRTC, the compiler cupy.RawModule uses at first use
  on the GPU machine (its version may differ from nvcc's), for sm_90, with an empty log.

The nvcc tests are skipped when nvcc is not on PATH, the NVRTC test where CuPy's NVRTC binding
does not load (CuPy absent, or no libnvrtc). Neither needs a device.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rayledger.kernels import _cuda

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
ROOT = Path(__file__).resolve().parents[2]


def _nvcc(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert NVCC is not None
    return subprocess.run(
        [NVCC, "-arch=sm_90", "-Werror", "all-warnings", *extra, "-c", str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def compiled(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("nvcc")
    module = tmp / "module.cu"
    module.write_text(_cuda.module_source())
    jobs = {name: (_cuda.CUDA_DIR / name, tmp / f"{name}.o", ()) for name in _cuda.SOURCES}
    jobs["module"] = (module, tmp / "module.o", ("-Xptxas", "-v"))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(_nvcc, *job[:2], *job[2]) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@needs_nvcc
@pytest.mark.parametrize("name", _cuda.SOURCES)
def test_each_source_compiles(
    compiled: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    done = compiled[name]
    assert done.returncode == 0, done.stderr


@needs_nvcc
def test_module_source_compiles_without_spills(
    compiled: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = compiled["module"]
    assert done.returncode == 0, done.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'", done.stderr)
    assert sorted(entries) == sorted(_cuda.KERNELS)
    frames = dict(
        zip(
            entries,
            re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", done.stderr),
            strict=True,
        )
    )
    # A spill puts the hash state in local memory: a large, silent slowdown.
    hashes = [name for name in _cuda.KERNELS if not name.startswith("ed25519")]
    assert all(frames[name] == ("0", "0") for name in hashes), done.stderr
    # Ed25519 keeps its two point tables (indexed by the scalar's digits, so not registers)
    # in local memory on purpose, 2 x 9 x 128 bytes; anything beyond that would be spilling.
    for name in ("ed25519_verify", "ed25519_verify_var"):
        stack, spills = frames[name]
        assert spills == "0" and int(stack) <= 2 * 9 * 128 + 256, (name, frames[name])


def _nvrtc() -> Any:
    try:
        from cupy_backends.cuda.libs import nvrtc  # type: ignore[import-not-found]

        nvrtc.getVersion()
    except Exception as exc:  # no CuPy, or CuPy without a loadable libnvrtc
        pytest.skip(f"CuPy's NVRTC binding does not load ({type(exc).__name__})")
    return nvrtc


def test_module_source_compiles_under_nvrtc() -> None:
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(_cuda.module_source(), "module.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--gpu-architecture=sm_90"])
    except Exception as exc:
        pytest.fail(f"NVRTC {nvrtc.getVersion()}: {exc}\n{nvrtc.getProgramLog(program)}")
    assert nvrtc.getProgramLog(program).strip("\x00\n ") == ""


def test_every_launched_kernel_is_defined() -> None:
    source = _cuda.module_source()
    defined = set(re.findall(r'extern "C" __global__ void (\w+)\(', source))
    assert defined == set(_cuda.KERNELS)


def test_sources_are_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "rayledger.kernels.cuda" in setuptools["packages"]
    assert "*.cu" in setuptools["package-data"]["rayledger.kernels.cuda"]
    assert all((_cuda.CUDA_DIR / name).is_file() for name in _cuda.SOURCES)
    assert sorted(p.name for p in _cuda.CUDA_DIR.glob("*.cu")) == sorted(_cuda.SOURCES)


def test_level_sizes() -> None:
    assert _cuda.level_sizes(1) == [1]
    assert _cuda.level_sizes(5) == [5, 3, 2, 1]
    assert _cuda.level_sizes(8) == [8, 4, 2, 1]
    assert len(_cuda.level_sizes(1 << 24)) == 25
