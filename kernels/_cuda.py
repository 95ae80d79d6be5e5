"""CUDA backend: the kernels of ``kernels/cuda/*.cu`` launched through CuPy.

CuPy is imported on first use only. The sources (hashes, Merkle trees, Ed25519) are compiled
once per process into one ``cupy.RawModule`` (CuPy also caches the binary on disk). Host
batches travel through pinned staging buffers that are reused across calls: a batch is cut into
chunks of about ``CHUNK_BYTES`` that alternate between two streams and two staging slots, so
that packing one chunk on the host, copying another to the device and hashing (or verifying) a
third overlap. Kernel arguments
are numpy scalars of exactly the C parameter types (RawKernel does not check them).

Inputs arrive validated (``_inputs``); the kernels check every row's offsets again and flag a
bad row rather than read outside the buffer, and a flagged batch raises ``ValueError``.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rayledger.kernels._backend import load_cupy
from rayledger.kernels._inputs import fixed_width

CUDA_DIR = Path(__file__).with_name("cuda")
# sha256.cu first: it holds the prelude the others include when compiled on their own.
SOURCES = ("sha256.cu", "sha512.cu", "merkle.cu", "ed25519.cu")
KERNELS = (
    "sha256_var",
    "sha256_var32",
    "sha256_fixed",
    "sha256_rows",
    "sha256_rows32",
    "sha512_var",
    "sha512_var32",
    "sha512_fixed",
    "merkle_leaves",
    "merkle_level",
    "ed25519_verify",
    "ed25519_verify_var",
)
BLOCK = 256
# An Ed25519 thread holds two 9-point tables and many field elements: smaller blocks let more
# of them stay resident on an SM (capped by what the compiled kernel allows).
ED25519_BLOCK = 128
# Input bytes per pipelined chunk: large enough that each copy runs near full bandwidth,
# small enough that the first kernel starts early and the staging slots stay modest.
CHUNK_BYTES = 32 << 20
_ALIGN = 256
_DIGEST = {"sha256": 32, "sha512": 64}


def level_sizes(n: int) -> list[int]:
    """Node counts of the tree levels over ``n >= 1`` leaves, leaves first, root (1) last."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def module_source() -> str:
    """The text compiled into the RawModule: the three sources, prelude first."""
    return "\n".join((CUDA_DIR / name).read_text() for name in SOURCES)


def _grid(threads: int) -> tuple[int]:
    return (max(1, -(-threads // BLOCK)),)


def _align(pos: int) -> int:
    return -(-pos // _ALIGN) * _ALIGN


def _chunk_bounds(n: int, cost: np.ndarray | None, row_cost: int) -> list[int]:
    """Row boundaries of chunks of about CHUNK_BYTES; ``cost[i]`` is the bytes before row i."""
    if cost is None:
        per_chunk = max(1, CHUNK_BYTES // max(row_cost, 1))
        return [*range(0, n, per_chunk), n]
    targets = np.arange(CHUNK_BYTES, int(cost[-1]), CHUNK_BYTES, dtype=np.int64)
    cuts = np.searchsorted(cost, targets, side="right").tolist()
    bounds = [0]
    for cut in cuts:
        if bounds[-1] < cut < n:
            bounds.append(cut)
    bounds.append(n)
    return bounds


class _Device:
    """Per-process CUDA state: module, streams, staging buffers. Used under ``lock``."""

    def __init__(self) -> None:
        cp = load_cupy()
        self.cp = cp
        self.cupyx = importlib.import_module("cupyx")
        self.module = cp.RawModule(code=module_source())
        self.fn = {name: self.module.get_function(name) for name in KERNELS}
        self.streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.pinned_in: list[np.ndarray] = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self.pinned_out = np.empty(0, np.uint8)
        self.dev_in: list[Any] = [None, None]
        self.err = cp.zeros(2, dtype=cp.int32)
        self.lock = threading.Lock()

    # ---- buffers ------------------------------------------------------------------------

    def _pinned(self, current: np.ndarray, size: int) -> np.ndarray:
        if len(current) >= size:
            return current
        return self.cupyx.empty_pinned(max(size, 2 * len(current), 1 << 20), np.uint8)

    def _staging(self, slot: int, size: int) -> tuple[np.ndarray, Any]:
        """The slot's pinned and device buffers, once the slot's previous chunk is done."""
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        self.pinned_in[slot] = self._pinned(self.pinned_in[slot], size)
        dev = self.dev_in[slot]
        if dev is None or dev.size < size:
            # The old buffer returns to CuPy's pool: let its last kernel finish first.
            self.streams[slot].synchronize()
            self.dev_in[slot] = self.cp.empty(max(size, 1 << 20), dtype=self.cp.uint8)
        return self.pinned_in[slot], self.dev_in[slot]

    def _to_device(self, slot: int, parts: list[np.ndarray]) -> list[Any]:
        """Pack ``parts`` into the slot (each 256-byte aligned) and copy them up on its stream."""
        positions, pos = [], 0
        for part in parts:
            positions.append(pos)
            pos = _align(pos + part.nbytes)
        pinned, dev = self._staging(slot, pos)
        for part, at in zip(parts, positions, strict=True):
            pinned[at : at + part.nbytes] = part.reshape(-1).view(np.uint8)
        used = positions[-1] + parts[-1].nbytes
        if used:
            dev.data.copy_from_host_async(
                ctypes.c_void_p(pinned.ctypes.data), used, self.streams[slot]
            )
        return [dev[at : at + part.nbytes] for part, at in zip(parts, positions, strict=True)]

    # ---- pipelined chunks -------------------------------------------------------------------

    def _chunks(self, bounds: list[int]) -> Iterator[tuple[int, Any, int, int]]:
        """(slot, stream, first row, end row) of each chunk, alternating slots and streams,
        after clearing both slots' error flags."""
        for slot, stream in enumerate(self.streams):
            with stream:
                self.err[slot : slot + 1].fill(0)
        for c, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            yield c % 2, self.streams[c % 2], lo, hi

    def _finish(self) -> None:
        """Wait for both streams; a row flagged by a device-side bounds check raises."""
        for stream in self.streams:
            stream.synchronize()
        if int(self.err.sum().get()):
            raise ValueError("offsets point outside the values buffer (flagged on the device)")

    def _block(self, name: str) -> int:
        fn = self.fn[name]
        return min(ED25519_BLOCK, int(getattr(fn, "max_threads_per_block", ED25519_BLOCK)))

    # ---- hashing --------------------------------------------------------------------------

    def hash_rows(
        self,
        algorithm: str,
        head: np.ndarray | None,
        values: np.ndarray | None,
        offsets: np.ndarray | None,
    ) -> np.ndarray:
        cp = self.cp
        digest = _DIGEST[algorithm]
        fixed_src: np.ndarray | None = None
        width = 0
        if values is None or offsets is None:
            assert head is not None
            fixed_src, width = head.reshape(-1), head.shape[1]
            n = head.shape[0]
        else:
            n = len(offsets) - 1
            if head is not None and head.shape[1] == 0:
                head = None
            common = fixed_width(values, offsets) if head is None else None
            if common is not None:
                start = int(offsets[0])
                fixed_src, width = values[start : start + n * common], common
        if head is not None and fixed_src is None and algorithm != "sha256":
            raise ValueError(f"row hashing is implemented for sha256 only, not {algorithm}")
        k = head.shape[1] if head is not None else 0
        if fixed_src is not None:
            bounds = _chunk_bounds(n, None, width)
        else:
            assert values is not None and offsets is not None
            cost = offsets.astype(np.int64) - int(offsets[0])
            cost += np.arange(n + 1, dtype=np.int64) * (k + offsets.itemsize)
            bounds = _chunk_bounds(n, cost, 0)

        out_dev = cp.empty(n * digest, dtype=cp.uint8)
        self.pinned_out = self._pinned(self.pinned_out, n * digest)
        out_host = self.pinned_out
        for slot, stream, lo, hi in self._chunks(bounds):
            rows = hi - lo
            out_view = out_dev[lo * digest : hi * digest]
            err = self.err[slot : slot + 1]
            if fixed_src is not None:
                (d_values,) = self._to_device(slot, [fixed_src[lo * width : hi * width]])
                args: tuple[Any, ...] = (d_values, np.uint64(width), np.uint64(rows), out_view)
                name = f"{algorithm}_fixed"
            else:
                assert values is not None and offsets is not None
                chunk_offsets = offsets[lo : hi + 1]
                base = int(chunk_offsets[0])
                parts = [chunk_offsets, values[base : int(chunk_offsets[-1])]]
                if head is not None:
                    parts.append(head[lo:hi])
                moved = self._to_device(slot, parts)
                d_offsets = moved[0].view(cp.int32 if offsets.dtype == np.int32 else cp.int64)
                suffix = "32" if offsets.dtype == np.int32 else ""
                size = np.uint64(moved[1].size)
                if head is not None:
                    name = f"sha256_rows{suffix}"
                    args = (moved[2], np.uint64(k), moved[1], size, d_offsets)
                else:
                    name = f"{algorithm}_var{suffix}"
                    args = (moved[1], size, d_offsets)
                args += (np.int64(base), np.uint64(rows), out_view, err)
            with stream:
                self.fn[name](_grid(rows), (BLOCK,), args)
            out_view.data.copy_to_host_async(
                ctypes.c_void_p(out_host.ctypes.data + lo * digest), rows * digest, stream
            )
            self.events[slot] = stream.record()
        self._finish()
        return out_host[: n * digest].reshape(n, digest).copy()

    def hash_fixed_on_device(self, algorithm: str, d_values: Any, width: int, n: int) -> Any:
        """Digests of ``n`` messages of ``width`` bytes already on the device, left there."""
        out = self.cp.empty((n, _DIGEST[algorithm]), dtype=self.cp.uint8)
        stream = self.streams[0]
        with stream:
            self.fn[f"{algorithm}_fixed"](
                _grid(n), (BLOCK,), (d_values, np.uint64(width), np.uint64(n), out)
            )
        stream.synchronize()
        return out

    # ---- Ed25519 --------------------------------------------------------------------------

    def ed25519_verify(self, keys: np.ndarray, sigs: np.ndarray, msgs: np.ndarray) -> np.ndarray:
        """Row i: does ``sigs[i]`` verify over ``msgs[i]`` under ``keys[i]``? (checked shapes)"""
        n = len(keys)
        fn, block = self.fn["ed25519_verify"], self._block("ed25519_verify")
        ok_dev = self.cp.empty(n, dtype=self.cp.uint8)
        self.pinned_out = self._pinned(self.pinned_out, n)
        for slot, stream, lo, hi in self._chunks(_chunk_bounds(n, None, 32 + 64 + 32)):
            d_keys, d_sigs, d_msgs = self._to_device(slot, [keys[lo:hi], sigs[lo:hi], msgs[lo:hi]])
            rows = hi - lo
            ok_view = ok_dev[lo:hi]
            with stream:
                fn(
                    (max(1, -(-rows // block)),),
                    (block,),
                    (d_keys, d_sigs, d_msgs, np.uint64(rows), ok_view),
                )
            ok_view.data.copy_to_host_async(
                ctypes.c_void_p(self.pinned_out.ctypes.data + lo), rows, stream
            )
            self.events[slot] = stream.record()
        self._finish()
        return self.pinned_out[:n].astype(np.bool_)

    def ed25519_verify_var(
        self, keys: np.ndarray, sigs: np.ndarray, values: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray:
        """As ``ed25519_verify`` with messages ``values[offsets[i]:offsets[i + 1]]``."""
        cp = self.cp
        n = len(keys)
        fn, block = self.fn["ed25519_verify_var"], self._block("ed25519_verify_var")
        offsets = offsets.astype(np.int64, copy=False)
        cost = offsets - int(offsets[0]) + np.arange(n + 1, dtype=np.int64) * (32 + 64 + 8)
        ok_dev = cp.empty(n, dtype=cp.uint8)
        self.pinned_out = self._pinned(self.pinned_out, n)
        for slot, stream, lo, hi in self._chunks(_chunk_bounds(n, cost, 0)):
            rows = hi - lo
            chunk_offsets = offsets[lo : hi + 1]
            base = int(chunk_offsets[0])
            parts = [keys[lo:hi], sigs[lo:hi], chunk_offsets, values[base : int(chunk_offsets[-1])]]
            d_keys, d_sigs, d_offsets, d_values = self._to_device(slot, parts)
            ok_view = ok_dev[lo:hi]
            args = (
                d_keys,
                d_sigs,
                d_values,
                np.uint64(d_values.size),
                d_offsets.view(cp.int64),
                np.int64(base),
                np.uint64(rows),
                ok_view,
                self.err[slot : slot + 1],
            )
            with stream:
                fn((max(1, -(-rows // block)),), (block,), args)
            ok_view.data.copy_to_host_async(
                ctypes.c_void_p(self.pinned_out.ctypes.data + lo), rows, stream
            )
            self.events[slot] = stream.record()
        self._finish()
        return self.pinned_out[:n].astype(np.bool_)

    # ---- Merkle trees ---------------------------------------------------------------------

    def build_tree(self, d_leaves: Any, n: int) -> tuple[Any, list[int]]:
        """Every level of the tree over ``n >= 1`` device leaves, in one device buffer."""
        sizes = level_sizes(n)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        tree = self.cp.empty(starts[-1] * 32, dtype=self.cp.uint8)
        stream = self.streams[0]
        with stream:
            self.fn["merkle_leaves"](_grid(n), (BLOCK,), (d_leaves, np.uint64(n), tree))
            for h in range(len(sizes) - 1):
                children = tree[starts[h] * 32 : starts[h + 1] * 32]
                parents = tree[starts[h + 1] * 32 : starts[h + 2] * 32]
                self.fn["merkle_level"](
                    _grid(sizes[h + 1]), (BLOCK,), (children, np.uint64(sizes[h]), parents)
                )
        return tree, starts

    def _leaves_up(self, leaves: np.ndarray) -> Any:
        (d_leaves,) = self._to_device(0, [leaves])
        return d_leaves

    def merkle_levels(self, leaves: np.ndarray) -> list[np.ndarray]:
        tree, starts = self.build_tree(self._leaves_up(leaves), len(leaves))
        total = starts[-1] * 32
        self.pinned_out = self._pinned(self.pinned_out, total)
        stream = self.streams[0]
        tree.data.copy_to_host_async(ctypes.c_void_p(self.pinned_out.ctypes.data), total, stream)
        stream.synchronize()
        flat = self.pinned_out[:total].reshape(-1, 32).copy()
        return [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def merkle_root_on_device(self, d_leaves: Any, n: int) -> bytes:
        tree, starts = self.build_tree(d_leaves, n)
        root = np.empty(32, np.uint8)
        stream = self.streams[0]
        tree[(starts[-1] - 1) * 32 :].data.copy_to_host_async(
            ctypes.c_void_p(root.ctypes.data), 32, stream
        )
        stream.synchronize()
        return root.tobytes()

    def merkle_root(self, leaves: np.ndarray) -> bytes:
        return self.merkle_root_on_device(self._leaves_up(leaves), len(leaves))


_device: _Device | None = None
_device_lock = threading.Lock()


def device() -> _Device:
    """The process's CUDA state, created (and the module compiled) on first use."""
    global _device
    with _device_lock:
        if _device is None:
            _device = _Device()
        return _device


def hash_rows(
    algorithm: str,
    head: np.ndarray | None,
    values: np.ndarray | None,
    offsets: np.ndarray | None,
) -> np.ndarray:
    """Digest of ``head[i] || values[offsets[i]:offsets[i + 1]]`` per row (either may be absent)."""
    dev = device()
    with dev.lock:
        return dev.hash_rows(algorithm, head, values, offsets)


def ed25519_verify(keys: np.ndarray, sigs: np.ndarray, msgs: np.ndarray) -> np.ndarray:
    """Boolean mask: row i's signature over its 32-byte message verifies under its key."""
    if len(keys) == 0:
        return np.zeros(0, np.bool_)
    dev = device()
    with dev.lock:
        return dev.ed25519_verify(keys, sigs, msgs)


def ed25519_verify_var(
    keys: np.ndarray, sigs: np.ndarray, values: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """As ``ed25519_verify`` for messages of any length (``values``, checked ``offsets``)."""
    dev = device()
    with dev.lock:
        return dev.ed25519_verify_var(keys, sigs, values, offsets)


def merkle_levels(leaves: np.ndarray) -> list[np.ndarray]:
    """All tree levels over ``(n >= 1, 32)`` leaves, built on the device, copied back once."""
    dev = device()
    with dev.lock:
        return dev.merkle_levels(leaves)


def merkle_root(leaves: np.ndarray) -> bytes:
    """The root over ``(n >= 1, 32)`` leaves, built on the device; only the root comes back."""
    dev = device()
    with dev.lock:
        return dev.merkle_root(leaves)
