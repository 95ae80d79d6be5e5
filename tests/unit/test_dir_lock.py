"""One process at a time per validator directory, storage shard and `rayledger up`: a second
waits for the first to let go, then gives up naming it (actors.storage.lock)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from rayledger.actors.storage.lock import hold_lock, release_lock
from rayledger.cluster import ops
from rayledger.cluster.local import NetworkOptions
from rayledger.errors import AlreadyOpen

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rayledger.actors.storage.lock import hold_lock
    hold_lock(Path(sys.argv[1]), "test")
    print("held", flush=True)
    time.sleep(60)
    """
)


def _holder(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_waits_then_names_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "v" / "validator.lock"
    proc = _holder(lock)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            AlreadyOpen, match=f"validator 0 is held by another process \\(pid {proc.pid} on "
        ):
            hold_lock(lock, "validator 0", wait_s=0.3)
        assert time.monotonic() - t0 >= 0.3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Its death let go of it, however it died
    fd = hold_lock(lock, "validator 0", wait_s=0)
    assert f"pid {os.getpid()} on " in lock.read_text()
    # A second holder within this process is refused too (the lock is per open file)
    with pytest.raises(AlreadyOpen, match="already_open|held by another process"):
        hold_lock(lock, "validator 0", wait_s=0)
    release_lock(fd)
    release_lock(hold_lock(lock, "validator 0", wait_s=0))


def test_a_holder_exiting_within_the_wait_hands_over(tmp_path: Path) -> None:
    lock = tmp_path / "shard-0.lock"
    proc = _holder(lock)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # exiting while the next one waits (a restart)
    release_lock(hold_lock(lock, "storage shard 0-0", wait_s=10))
    assert time.monotonic() - t0 < 10
    proc.wait()


def test_rayledger_up_refuses_a_data_directory_another_up_holds(tmp_path: Path) -> None:
    proc = _holder(tmp_path / "up.lock")
    config = Path(__file__).resolve().parents[2] / "configs" / "local.toml"
    try:
        with pytest.raises(AlreadyOpen, match="rayledger up"):
            ops.up(Console(), config, tmp_path, None, NetworkOptions(), seconds=0)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "up.pid").exists()


def test_a_file_system_without_locks_is_said_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from rayledger.actors.storage import lock as lock_mod

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_locks)
    release_lock(hold_lock(tmp_path / "validator.lock", "validator 2", wait_s=0))
    assert "validator 2: no lock on" in caplog.text

    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(lock_mod.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        hold_lock(tmp_path / "validator.lock", "validator 2", wait_s=0)
