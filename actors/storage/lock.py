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
import sqlite3
import time
from pathlib import Path
from typing import NoReturn

from rayledger.errors import AlreadyOpen

log = logging.getLogger(__name__)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

# How a process that could not write to its disk ends (EX_IOERR), and its pause before, so
# that a disk still full does not make a tight restart loop
DISK_FAILURE_EXIT = 74
DISK_FAILURE_PAUSE_S = 5.0

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
    with contextlib.suppress(OSError):  # who holds it, for the message (a full disk: none)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def is_disk_failure(exc: BaseException) -> bool:
    """Did a write fail for want of a working disk (full, over quota, failing, read-only),
    rather than for a missing or malformed file?"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        return any(s in text for s in ("disk is full", "disk i/o", "readonly", "read-only"))
    return False


def stop_on_disk_failure(what: str, exc: BaseException) -> NoReturn:
    """End this process because a durable write failed (a full disk, an I/O error): what it
    holds in memory is now ahead of its disk, and going on would write after a gap or vote
    without the safety state that guards the vote. Ray restarts the actor, which starts again
    from what its disk holds and catches up from its peers once writes succeed again; until
    then each start ends here again, DISK_FAILURE_PAUSE_S apart at least."""
    log.critical(
        "%s could not write to its disk (%s: %s); it stops, and restarts from what its disk holds",
        what,
        type(exc).__name__,
        exc,
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    time.sleep(DISK_FAILURE_PAUSE_S)
    os._exit(DISK_FAILURE_EXIT)


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
