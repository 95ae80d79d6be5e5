"""CPU backend: OpenSSL over zero-copy views of the buffers, spread over cores for large batches.

Where the compiled loop of ``_native`` is available (a C compiler once, and hashlib's
libcrypto), every row of a batch is hashed in one foreign call that releases the GIL; a batch
of at least ``NATIVE_PARALLEL_MIN_ROWS`` rows is cut into one share per core, hashed on threads.
Elsewhere ``hashlib`` hashes one row per call: a batch of at least ``PARALLEL_MIN_ROWS`` rows is
cut into one share per core, the calling thread hashing the first share from the caller's own
buffers while each worker process hashes a copy of its share in shared memory (see
``_hashproc``); below that size, or when another thread already holds the workers, the calling
thread hashes everything itself. Results are the same bytes every way.

``RAYLEDGER_CPU_WORKERS`` sets the number of helper threads or worker processes (default:
usable cores - 1; ``0`` turns them off, e.g. where an actor must keep to one core).
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rayledger.kernels import _native
from rayledger.kernels._hashproc import (
    _REQUEST,
    ALGORITHM_CODES,
    DIGEST_SIZES,
    hash_messages,
    hash_rows,
)
from rayledger.kernels._inputs import byte_rows, fixed_width

WORKERS_ENV = "RAYLEDGER_CPU_WORKERS"
# Measured on 2 cores with ``bench_cpu_workers`` (kernels/bench.py), SHA-256 of 32- and 150-byte
# messages, one worker plus the caller against the caller alone: with the second core free,
# 1.17x at 1 k rows, 1.34-1.4x at 4 k, 1.7x at 16 k, 1.8x at 200 k; with the second core busy
# in another process, 0.8x at 1 k, 0.85x at 4 k, 0.95-1.0x from 16 k. From 4 k rows the gain
# on a free core outweighs the loss on a busy one; set RAYLEDGER_CPU_WORKERS=0 where the other
# cores are always taken.
PARALLEL_MIN_ROWS = 4096
# Relative cost of one message in bytes hashed: hashlib's per-call overhead is worth about
# 600 bytes of SHA-256 here, so shares are balanced on rows * 600 + bytes.
_ROW_COST = 600
# The compiled loop hashes a small message in about 100 ns: a share for a helper thread is worth
# its hand-over (tens of microseconds) from a few thousand rows; a row costs about 60 bytes.
NATIVE_PARALLEL_MIN_ROWS = 16384
_NATIVE_ROW_COST = 60
_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hashproc.py")

Tail = tuple[np.ndarray, np.ndarray]


def _configured_workers() -> int:
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        try:
            count = int(raw)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a whole number, got {raw!r}") from None
        if count < 0:
            raise ValueError(f"{WORKERS_ENV} must be >= 0, got {count}")
        return count
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


class _Region:
    """A growable shared-memory region (memfd) that one worker maps as well."""

    def __init__(self) -> None:
        self.map: mmap.mmap | None = None
        self.fd: int | None = None
        self.capacity = 0
        self.changed = False

    def ensure(self, size: int) -> None:
        if size <= self.capacity and self.map is not None:
            return
        capacity = max(size, 2 * self.capacity, 1 << 20)
        fd = os.memfd_create("rayledger-hash", os.MFD_CLOEXEC)
        os.ftruncate(fd, capacity)
        self.close()
        self.map = mmap.mmap(fd, capacity)
        self.fd, self.capacity, self.changed = fd, capacity, True

    def view(self, size: int) -> np.ndarray:
        assert self.map is not None
        return np.frombuffer(self.map, np.uint8, count=size)

    def close(self) -> None:
        # The mapping itself goes with its last view; only the descriptor is ours to close.
        if self.fd is not None:
            os.close(self.fd)
        self.map, self.fd = None, None


class _Worker:
    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _WORKER_PATH, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.sock = mine
        self.inp = _Region()
        self.out = _Region()
        self.rows = 0
        self.digest_size = 0

    def submit(self, algorithm: str, head: np.ndarray, tail: Tail | None, lo: int, hi: int) -> None:
        """Copy rows ``lo:hi`` into this worker's region and start it on them."""
        n, width = hi - lo, head.shape[1]
        tail_bytes, pos = 0, 0
        if tail is not None:
            values, offsets = tail
            start, stop = int(offsets[lo]), int(offsets[hi])
            tail_bytes = stop - start
            pos = (n + 1) * 8
        self.digest_size = DIGEST_SIZES[algorithm]
        self.inp.ensure(pos + n * width + tail_bytes)
        self.out.ensure(n * self.digest_size)
        region = self.inp.view(pos + n * width + tail_bytes)
        if tail is not None:
            region[:pos].view(np.int64)[:] = offsets[lo : hi + 1]
            region[:pos].view(np.int64)[:] -= start
            region[pos + n * width :] = values[start:stop]
        region[pos : pos + n * width] = head[lo:hi].reshape(-1)
        del region
        request = _REQUEST.pack(
            ALGORITHM_CODES.index(algorithm),
            n,
            width,
            int(tail is not None),
            tail_bytes,
            self.inp.capacity,
            self.out.capacity,
            0,
        )
        if self.inp.changed or self.out.changed:
            assert self.inp.fd is not None and self.out.fd is not None
            socket.send_fds(self.sock, [request], [self.inp.fd, self.out.fd])
            self.inp.changed = self.out.changed = False
        else:
            self.sock.sendall(request)
        self.rows = n

    def collect(self, into: np.ndarray) -> bool:
        """Wait for the worker; copy its digests into ``into``. False when it failed."""
        reply = self.sock.recv(256)
        if reply[:1] != b"k":
            return False
        into.reshape(-1)[:] = self.out.view(self.rows * self.digest_size)
        return True

    def close(self, wait: bool) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.inp.close()
        self.out.close()
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)


class _Pool:
    def __init__(self, count: int) -> None:
        self.pid = os.getpid()
        self.workers: list[_Worker] = []
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except (OSError, ValueError):
            self.close(wait=False)
            raise

    def close(self, wait: bool) -> None:
        for worker in self.workers:
            worker.close(wait)
        self.workers = []


_pool: _Pool | None = None
_pool_broken = False
_pool_lock = threading.Lock()


def _get_pool() -> _Pool | None:
    global _pool, _pool_broken
    if _pool is not None and _pool.pid != os.getpid():
        # Inherited through fork: those workers answer the parent. Drop our copies of the sockets.
        for worker in _pool.workers:
            with contextlib.suppress(OSError):
                worker.sock.close()
        _pool, _pool_broken = None, False
    if _pool is None and not _pool_broken:
        count = _configured_workers()
        if count == 0:
            return None
        try:
            _pool = _Pool(count)
        except (OSError, ValueError):  # no usable interpreter to start: hash in the caller
            _pool_broken = True
    return _pool


def _shutdown() -> None:
    global _pool
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close(wait=True)
    _pool = None


atexit.register(_shutdown)


def _local(algorithm: str, head: np.ndarray, tail: Tail | None, lo: int, hi: int) -> bytes:
    width = head.shape[1]
    if tail is None:
        if width == 0:
            return hash_rows(algorithm, b"", 0, hi - lo)
        return hash_messages(algorithm, byte_rows(head[lo:hi]))
    values, offsets = tail
    if width == 0:
        common = fixed_width(values, offsets[lo : hi + 1])
        if common:
            start = int(offsets[lo])
            rows = values[start : start + (hi - lo) * common].reshape(hi - lo, common)
            return hash_messages(algorithm, byte_rows(rows))
    rows_bytes = head[lo:hi].tobytes() if width else b""
    return hash_rows(
        algorithm, rows_bytes, width, hi - lo, values.data, offsets[lo : hi + 1].tolist()
    )


def _shares(
    head: np.ndarray, tail: Tail | None, parts: int, row_cost: int = _ROW_COST
) -> list[int]:
    """Row boundaries cutting the batch into ``parts`` shares of about equal hashing cost."""
    n, width = head.shape
    cost = np.arange(n + 1, dtype=np.int64) * (row_cost + width)
    if tail is not None:
        offsets = tail[1]
        cost += offsets.astype(np.int64, copy=False) - int(offsets[0])
    targets = np.arange(1, parts, dtype=np.int64) * int(cost[-1]) // parts
    cuts = np.searchsorted(cost, targets).tolist()
    return [0, *cuts, n]


_threads: ThreadPoolExecutor | None = None
_threads_pid = 0


def _native_batch(
    native: _native.NativeHasher, algorithm: str, head: np.ndarray, tail: Tail | None
) -> np.ndarray:
    global _threads, _threads_pid
    values, offsets = tail if tail is not None else (None, None)
    n = head.shape[0]
    helpers = _configured_workers() if n >= NATIVE_PARALLEL_MIN_ROWS else 0
    if helpers == 0:
        return native.hash_rows(algorithm, head, values, offsets)
    with _pool_lock:
        if _threads is None or _threads_pid != os.getpid():
            _threads = ThreadPoolExecutor(helpers, thread_name_prefix="rayledger-hash")
            _threads_pid = os.getpid()
        threads = _threads
    head = np.ascontiguousarray(head)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    out = np.empty((n, DIGEST_SIZES[algorithm]), np.uint8)
    bounds = _shares(head, tail, helpers + 1, _NATIVE_ROW_COST)

    def share(lo: int, hi: int) -> None:
        native.hash_rows(
            algorithm,
            head[lo:hi],
            values,
            None if offsets is None else offsets[lo : hi + 1],
            out[lo:hi],
        )

    futures = [
        threads.submit(share, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    share(0, bounds[1])
    for future in futures:
        future.result()
    return out


def hash_batch(algorithm: str, head: np.ndarray, tail: Tail | None = None) -> np.ndarray:
    """Digest of ``head[i] || tail[i]`` for every row, as an ``(n, digest size)`` uint8 array.

    ``head`` is a C-contiguous ``(n, width) uint8`` array (width may be 0); ``tail`` is an already
    validated ``(values, offsets)`` pair with ``n + 1`` offsets.
    """
    global _pool, _pool_broken
    native = _native.get()
    if native is not None:
        return _native_batch(native, algorithm, head, tail)
    n = head.shape[0]
    size = DIGEST_SIZES[algorithm]
    if n < PARALLEL_MIN_ROWS or not _pool_lock.acquire(blocking=False):
        return np.frombuffer(_local(algorithm, head, tail, 0, n), np.uint8).reshape(n, size)
    try:
        pool = _get_pool()
        if pool is None or not pool.workers:
            return np.frombuffer(_local(algorithm, head, tail, 0, n), np.uint8).reshape(n, size)
        bounds = _shares(head, tail, len(pool.workers) + 1)
        out = np.empty((n, size), np.uint8)
        started: list[tuple[_Worker, int, int]] = []
        failed: list[tuple[int, int]] = []
        for worker, lo, hi in zip(pool.workers, bounds[1:-1], bounds[2:], strict=True):
            if hi == lo:
                continue
            try:
                worker.submit(algorithm, head, tail, lo, hi)
                started.append((worker, lo, hi))
            except OSError:
                failed.append((lo, hi))
        out[: bounds[1]] = np.frombuffer(
            _local(algorithm, head, tail, 0, bounds[1]), np.uint8
        ).reshape(-1, size)
        for worker, lo, hi in started:
            try:
                ok = worker.collect(out[lo:hi])
            except OSError:
                ok = False
            if not ok:
                failed.append((lo, hi))
        if failed:
            # A worker died or refused: hash its share here and start afresh next time.
            for lo, hi in failed:
                out[lo:hi] = np.frombuffer(_local(algorithm, head, tail, lo, hi), np.uint8).reshape(
                    -1, size
                )
            pool.close(wait=False)
            _pool = None
        return out
    finally:
        _pool_lock.release()
