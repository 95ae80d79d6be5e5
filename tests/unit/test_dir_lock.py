"""One process at a time per validator directory, storage shard and `rayledger up`: a second
waits for the first to let go, then gives up naming it; and a process whose disk fails stops
(Ray starts it again from its disk) before anything its failed write guards leaves
(actors.storage.lock)."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from rayledger.actors.storage import lock as lock_mod
from rayledger.actors.storage.lock import hold_lock, is_disk_failure, release_lock
from rayledger.actors.validator import Validator
from rayledger.cluster import ops
from rayledger.cluster.local import NetworkOptions
from rayledger.consensus import Commit, Persist, SafetyState, Send
from rayledger.errors import AlreadyOpen

from .consensus_harness import Keyring

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


# ---- a disk that fails: the process stops, and Ray starts it again from its disk ----------


def test_disk_failures_are_told_from_other_errors() -> None:
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        assert is_disk_failure(OSError(code, os.strerror(code)))
    assert not is_disk_failure(FileNotFoundError(errno.ENOENT, "no network.json"))
    assert not is_disk_failure(PermissionError(errno.EACCES, "denied"))
    assert is_disk_failure(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_failure(sqlite3.OperationalError("disk I/O error"))
    assert not is_disk_failure(sqlite3.OperationalError("no such table: blocks"))
    assert not is_disk_failure(ValueError("x"))


class _Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``os._exit`` recorded (and raised as ``_Exited``) instead of ending the test run."""
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(lock_mod.os, "_exit", fake_exit)
    monkeypatch.setattr(lock_mod, "DISK_FAILURE_PAUSE_S", 0.0)
    return codes


def test_a_vote_whose_safety_state_cannot_be_written_never_leaves(
    exits: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keyring.make()
    p1 = keys.chain(1)[0]
    vote = keys.vote(0, p1.block.hash, 1)
    sent: list[dict[int, list[object]]] = []

    class FullDisk:
        def write(self, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    v = Validator.__new__(Validator)
    v.index = 0
    v.safety_file = FullDisk()  # type: ignore[assignment]
    v.voted, v.voted_ipc, v.batches = {}, {}, {}
    v.core = SimpleNamespace(committed=keys.genesis)  # type: ignore[assignment]
    v._flush = lambda outbox: sent.append({k: list(m) for k, m in outbox.items()})  # type: ignore[method-assign]
    with pytest.raises(_Exited):
        v._run([Persist(SafetyState(1, 0, keys.qc(keys.genesis), None), p1), Send(3, vote)])
    assert exits == [lock_mod.DISK_FAILURE_EXIT]
    assert all(not outbox for outbox in sent)  # the vote was never flushed
    assert "validator 0 could not write to its disk (OSError" in caplog.text


def test_a_commit_that_cannot_be_written_stops_the_validator(exits: list[int]) -> None:
    v = Validator.__new__(Validator)
    v.index = 2
    v._flush = lambda outbox: None  # type: ignore[method-assign]
    v._cancel_stale_timers = lambda: None  # type: ignore[method-assign]
    v.core = SimpleNamespace(rounds_by_timeout=0)  # type: ignore[assignment]
    v._timed_out_rounds = 0

    def full(commit: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    v._commit = full  # type: ignore[method-assign]
    with pytest.raises(_Exited):
        v._run([Commit((), (), None, None)])  # type: ignore[arg-type]
    assert exits == [lock_mod.DISK_FAILURE_EXIT]
