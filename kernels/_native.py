"""The CPU backend's compiled hashing loop (``c/hashrows.c``), built at first use and cached.

Hashing small messages one ``hashlib`` call at a time spends most of its time in the
interpreter: 650-1,300 ns for a 65-byte Merkle node on the development machine, of which
OpenSSL's compression takes under 100 (SHA-NI: 45 ns a 64-byte block). The loop in
``c/hashrows.c`` calls OpenSSL's ``SHA256_Init/Update/Final`` (or ``SHA512_*``) for every row
of a batch in one foreign call that also releases the GIL. It takes those functions from the
libcrypto that ``hashlib`` itself is linked to, so the digests come from the same code.

It is compiled like the CUDA kernels, at first use, with the C compiler ``$CC`` (default
``cc``), into ``$RAYLEDGER_CACHE_DIR`` (default ``~/.cache/rayledger``), named by a hash of the
source, the compiler and the platform; concurrent first uses (the actors of a network start
together) wait on one build. Where there is no compiler, no writable cache or no such
OpenSSL functions, or with ``RAYLEDGER_NATIVE_HASH=0``, ``available()`` is false and the
backend hashes with ``hashlib`` as before: the same bytes, more slowly.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV_SWITCH = "RAYLEDGER_NATIVE_HASH"
ENV_CACHE = "RAYLEDGER_CACHE_DIR"
SOURCE = Path(__file__).resolve().parent / "c" / "hashrows.c"
DIGEST_SIZES = {"sha256": 32, "sha512": 64}
_PREFIX = {"sha256": "SHA256", "sha512": "SHA512"}


class NativeHasher:
    """The loaded loop and OpenSSL's digest functions for each algorithm."""

    def __init__(self, lib: ctypes.CDLL, functions: dict[str, tuple[int, int, int]]) -> None:
        self._fn = lib.rl_hash_rows
        self._fn.restype = ctypes.c_int64
        self._fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.functions = functions

    def hash_rows(
        self,
        algorithm: str,
        head: np.ndarray,
        values: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Digest of ``head[i] || values[offsets[i]:offsets[i + 1]]`` for every row.

        ``head`` is an ``(n, width) uint8`` array (width may be 0); ``values`` and ``offsets``
        (``n + 1`` non-decreasing int64 positions inside ``values``) are both given or both
        None. Everything is checked here: the C loop is never handed a shape it could read
        past.
        """
        init, update, final = self.functions[algorithm]
        size = DIGEST_SIZES[algorithm]
        if head.dtype != np.uint8 or head.ndim != 2:
            raise ValueError(f"head must be a two-dimensional uint8 array, got {head.dtype}")
        head = np.ascontiguousarray(head)
        n, width = head.shape
        values_ptr = offsets_ptr = None
        if (values is None) != (offsets is None):
            raise ValueError("values and offsets come together")
        if values is not None and offsets is not None:
            if values.dtype != np.uint8 or values.ndim != 1 or not values.flags.c_contiguous:
                raise ValueError("values must be a contiguous one-dimensional uint8 array")
            # A private copy, checked, is what the loop reads: the caller's own array, checked
            # and then changed by another of its threads while the loop ran without the GIL,
            # sent it reading far past ``values`` (a segfault in a review's script)
            offsets = np.array(offsets, dtype=np.int64, order="C", copy=True)
            if offsets.shape != (n + 1,):
                raise ValueError(f"{n} rows need {n + 1} offsets, got {offsets.shape}")
            if n and (
                int(offsets[0]) < 0
                or int(offsets[-1]) > len(values)
                or bool(np.any(offsets[1:] < offsets[:-1]))
            ):
                raise ValueError("offsets must be non-decreasing positions inside values")
            values_ptr, offsets_ptr = values.ctypes.data, offsets.ctypes.data
        if out is None:
            out = np.empty((n, size), np.uint8)
        elif out.shape != (n, size) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous ({n}, {size}) uint8 array")
        if n:
            failed = self._fn(
                init,
                update,
                final,
                size,
                head.ctypes.data,
                width,
                values_ptr,
                offsets_ptr,
                n,
                out.ctypes.data,
            )
            if failed:
                raise RuntimeError(f"OpenSSL failed to hash row {failed - 1}")
        return out


_lock = threading.Lock()
_loaded: NativeHasher | None = None
_tried = False


def _openssl_functions() -> dict[str, tuple[int, int, int]] | None:
    """Addresses of ``SHA256_Init`` ... ``SHA512_Final`` in hashlib's own libcrypto."""
    try:
        import _hashlib

        crypto = ctypes.CDLL(_hashlib.__file__)
        found = {}
        for algorithm, prefix in _PREFIX.items():
            found[algorithm] = tuple(
                ctypes.cast(getattr(crypto, f"{prefix}_{step}"), ctypes.c_void_p).value or 0
                for step in ("Init", "Update", "Final")
            )
    except (ImportError, OSError, AttributeError):
        return None
    if any(0 in fns for fns in found.values()):
        return None
    return found  # type: ignore[return-value]


def _cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE, "").strip()
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "rayledger"


def _build(cc: str, source: bytes, target: Path) -> None:
    """Compile ``source`` into ``target`` (atomically: a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-x", "c", "-o", tmp, "-"],
                input=source,
                capture_output=True,
                check=True,
                timeout=120,
            )
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _load() -> NativeHasher | None:
    if os.environ.get(ENV_SWITCH, "").strip() == "0":
        return None
    functions = _openssl_functions()
    if functions is None:
        log.info("native hashing off: hashlib's libcrypto has no SHA*_Init/Update/Final")
        return None
    cc = os.environ.get("CC", "").strip() or "cc"
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(
        b"\0".join([source, cc.encode(), platform.machine().encode(), sys.platform.encode()])
    ).hexdigest()[:20]
    target = _cache_dir() / f"hashrows-{tag}.so"
    try:
        if not target.exists():
            _build(cc, source, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.info("native hashing off: could not build %s with %s: %s %s", SOURCE, cc, exc, detail)
        return None
    return NativeHasher(lib, functions)


def get() -> NativeHasher | None:
    """The compiled loop, built or loaded on first call (None where it cannot be had)."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            _loaded = _load()
            _tried = True
    return _loaded


def reset() -> None:
    """Forget the loaded loop so that the next ``get()`` looks again (tests switch it)."""
    global _loaded, _tried
    with _lock:
        _loaded, _tried = None, False


def available() -> bool:
    return get() is not None
