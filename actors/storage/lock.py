"""One process at a time per validator directory and per storage shard.

Two processes writing one validator's files would interleave block frames, and two signing
with its safety state could vote twice in a round: an equivocation by an honest institution.
That can happen without any bug of ours: ``rayledger up`` started twice on one data
directory, or, on a multi-node cluster with a shared data directory, Ray restarting a
validator on another node of its site while the process on a node it lost touch with still
runs. So each such directory is guarded by an exclusive ``flock`` held for the life of the
process (the kernel drops it when the process dies, however it dies; Linux's NFS client
maps it onto NFS locks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from rayledger.errors import AlreadyOpen

log = logging.getLogger(__name__)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

# A process that is being replaced (killed, or exiting) may hold its lock a little longer
LOCK_WAIT_S = 30.0
_POLL_S = 0.05


def hold_lock(path: Path, what: str, wait_s: float = LOCK_WAIT_S) -> int:
    """Take the exclusive lock on ``path`` (created if missing) for this process, waiting up
    to ``wait_s`` for another holder to let go; ``AlreadyOpen`` naming the holder (its pid and
    host, which the file records) otherwise. Returns the descriptor, which holds the lock:
    keep it open (``release_lock`` lets go)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                # A file system without locks (some network ones): said, not fatal
                log.warning(
                    "%s: no lock on %s (%s): run one process on it at a time", what, path, exc
                )
                break
            if not isinstance(exc, BlockingIOError):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise AlreadyOpen(
                    f"{what} is held by another process ({holder}); waited {wait_s:g} s"
                ) from None
            time.sleep(_POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
