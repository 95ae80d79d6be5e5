"""Backend choice: which implementation serves a batch call."""

from __future__ import annotations

import os

ENV_VAR = "RAYLEDGER_KERNELS"
_KNOWN = ("cpu", "cuda")


def available_backends() -> list[str]:
    """Backends that can run on this machine, best first."""
    return ["cpu"]


def resolve_backend(requested: str = "auto") -> str:
    """Map a requested backend to one that runs here; an explicit request never falls back."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested == "auto":
            return available_backends()[0]
    if requested not in _KNOWN:
        raise ValueError(f"unknown kernel backend {requested!r}; known: {', '.join(_KNOWN)}")
    if requested not in available_backends():
        raise RuntimeError(
            f"kernel backend {requested!r} is not available on this machine "
            f"(available: {', '.join(available_backends())})"
        )
    return requested
