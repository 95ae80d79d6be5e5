"""Backend choice: which implementation serves a batch call.

``auto`` means ``cuda`` when CuPy imports and sees at least one CUDA device, else ``cpu``. The
``RAYLEDGER_KERNELS`` environment variable (``cpu``, ``cuda`` or ``auto``) decides what ``auto``
means for the whole process. An explicit request, by argument or by that variable, never falls
back: ``cuda`` on a machine without a usable GPU raises ``RuntimeError`` saying why.

The ``RAYLEDGER_CUDA_MIN_ROWS`` environment variable makes ``auto`` leave batches of fewer rows
on the CPU: a launch, two copies and the first use's compilation cost more than hashing a few
hundred messages or checking a few signatures on a core, so a process that only verifies a
receipt now and then need never start CUDA. Unset (the default), ``auto`` sends every batch to
the GPU, as documented above. Explicit requests ignore it. ``rayledger bench kernels`` on a GPU
prints small batches on both backends: the crossover to set it from.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

ENV_VAR = "RAYLEDGER_KERNELS"
MIN_ROWS_VAR = "RAYLEDGER_CUDA_MIN_ROWS"
_KNOWN = ("cpu", "cuda")
# Smallest batch that ``auto`` sends to the GPU, per kind of work, unless MIN_ROWS_VAR says
# otherwise: every batch, as the backend choice is documented.
AUTO_CUDA_MIN_ROWS = {"hash": 0, "ed25519": 0}


def load_cupy() -> ModuleType:
    """CuPy, imported on first use only: the ground floor must import on machines without it."""
    return importlib.import_module("cupy")


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why the ``cuda`` backend cannot run here, or ``None`` when it can (checked once)."""
    try:
        cupy = load_cupy()
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA failing to load
        return f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, or the driver refuses
        return f"CUDA reports no usable device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "CUDA reports no device"
    return None


def available_backends() -> list[str]:
    """Backends that can run on this machine, best first."""
    return ["cuda", "cpu"] if cuda_unavailable_reason() is None else ["cpu"]


def forced_backend() -> str:
    """What ``RAYLEDGER_KERNELS`` says ``auto`` means in this process ("" or "auto": nothing)."""
    return os.environ.get(ENV_VAR, "").strip().lower()


def resolve_backend(requested: str = "auto") -> str:
    """Map a requested backend to one that runs here; an explicit request never falls back."""
    source = "argument"
    if requested == "auto":
        forced = forced_backend()
        if forced in ("", "auto"):
            return available_backends()[0]
        requested, source = forced, f"{ENV_VAR} environment variable"
    if requested not in _KNOWN:
        raise ValueError(
            f"unknown kernel backend {requested!r} (from the {source}); "
            f"known: auto, {', '.join(_KNOWN)}"
        )
    if requested == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(
                f"kernel backend 'cuda' was requested (by the {source}) but cannot run here: "
                f"{reason}"
            )
    return requested


def for_batch(requested: str, chosen: str, rows: int, kind: str) -> str:
    """The backend for one batch of ``rows``: ``chosen`` (what ``resolve_backend(requested)``
    gave), except that ``auto`` keeps a batch smaller than the kind's threshold on the CPU."""
    if chosen != "cuda" or requested != "auto":
        return chosen
    if forced_backend() == "cuda":
        return chosen  # forced for the whole process
    raw = os.environ.get(MIN_ROWS_VAR, "").strip()
    try:
        least = int(raw) if raw else AUTO_CUDA_MIN_ROWS[kind]
    except ValueError:
        raise ValueError(f"{MIN_ROWS_VAR} must be a whole number of rows, not {raw!r}") from None
    return "cuda" if rows >= least else "cpu"


def prepare(backend: str = "auto") -> str:
    """Resolve ``backend`` and make it ready to serve: for ``cuda``, compile the kernel module
    and set up the device now (seconds on a cold compiler cache) rather than under the first
    batch. Returns the backend that will serve ``backend`` requests."""
    chosen = resolve_backend(backend)
    if chosen == "cuda":
        from rayledger.kernels import _cuda

        _cuda.device()
    return chosen
