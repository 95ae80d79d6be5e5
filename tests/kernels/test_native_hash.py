"""The compiled hashing loop of the CPU backend (kernels/_native.py, kernels/c/hashrows.c).

Scenarios:
- it builds wherever there is a C compiler, and gives hashlib's digests for SHA-256 and
  SHA-512, with and without a head, with offsets of either width and a batch sliced out of a
  larger buffer;
- every malformed buffer is refused in Python before C sees it (dtype, shape, offsets past the
  end, negative or decreasing, values without offsets, a wrong output array);
- the build goes to the cache once, under a name that changes with the source; a second
  loader reuses it; three processes starting together on an empty cache all load it;
- no compiler, RAYLEDGER_NATIVE_HASH=0 or an unwritable cache: ``get()`` is None and the
  backend still hashes (with hashlib);
- the split over helper threads gives the same bytes as one call.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rayledger.kernels import _cpu, _native, merkle_root, merkle_root_of_leaf_hashes, sha256_batch
from rayledger.merkle import merkle_root as ledger_merkle_root
from rayledger.merkle import merkle_root_of_leaf_hashes as ledger_root_of_leaf_hashes

_RNG = random.Random(20261202)


@pytest.fixture
def native() -> _native.NativeHasher:
    hasher = _native.get()
    if hasher is None:
        pytest.skip("the compiled hashing loop cannot be built here")
    return hasher


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty cache and a loader that looks again; the real one is restored afterwards."""
    monkeypatch.setenv(_native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(_native.ENV_SWITCH, raising=False)
    _native.reset()
    yield tmp_path / "cache"
    _native.reset()


def _pair(messages: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(messages) + 1, np.int64)
    offsets[1:] = np.cumsum([len(m) for m in messages])
    return np.frombuffer(b"".join(messages), np.uint8).copy(), offsets


def test_the_source_ships_with_the_package() -> None:
    root = Path(__file__).resolve().parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "rayledger.kernels.c" in setuptools["packages"]
    assert "*.c" in setuptools["package-data"]["rayledger.kernels.c"]
    assert _native.SOURCE.is_file() and _native.SOURCE.parent.name == "c"


def test_a_c_compiler_means_the_loop_is_built() -> None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the backend hashes with hashlib")
    assert _native.available(), "a C compiler is present, yet the hashing loop did not build"


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_digests_equal_hashlib(native: _native.NativeHasher, algorithm: str) -> None:
    messages = [_RNG.randbytes(n) for n in range(0, 700, 3)]
    n = len(messages)
    values, offsets = _pair(messages)
    head = np.frombuffer(_RNG.randbytes(n * 7), np.uint8).reshape(n, 7)

    def want(rows: list[bytes]) -> np.ndarray:
        raw = b"".join(hashlib.new(algorithm, r).digest() for r in rows)
        return np.frombuffer(raw, np.uint8).reshape(len(rows), -1)

    empty_head = np.empty((n, 0), np.uint8)
    assert np.array_equal(native.hash_rows(algorithm, empty_head, values, offsets), want(messages))
    both = [head[i].tobytes() + messages[i] for i in range(n)]
    assert np.array_equal(native.hash_rows(algorithm, head, values, offsets), want(both))
    assert np.array_equal(
        native.hash_rows(algorithm, head, values, offsets.astype(np.int32)), want(both)
    )
    assert np.array_equal(native.hash_rows(algorithm, head), want([row.tobytes() for row in head]))
    # Rows 10..20 of the batch: offsets keep pointing into the whole buffer
    assert np.array_equal(
        native.hash_rows(algorithm, head[10:20], values, offsets[10:21]), want(both[10:20])
    )
    assert native.hash_rows(algorithm, np.empty((0, 3), np.uint8)).shape == (0, len(want([b""])[0]))


def test_malformed_buffers_are_refused_before_c(native: _native.NativeHasher) -> None:
    values, offsets = _pair([b"abc", b"", b"defgh"])
    head = np.zeros((3, 2), np.uint8)
    cases = [
        (dict(head=head.astype(np.int16)), "head must be"),
        (dict(head=np.zeros(6, np.uint8)), "head must be"),
        (dict(values=values), "come together"),
        (dict(offsets=offsets), "come together"),
        (dict(values=values.astype(np.int32), offsets=offsets), "values must be"),
        (dict(values=values[::2], offsets=offsets), "values must be"),
        (dict(values=values, offsets=offsets[:-1]), "need 4 offsets"),
        (dict(values=values, offsets=offsets + 1), "inside values"),
        (dict(values=values, offsets=np.array([0, 3, 2, 8])), "non-decreasing"),
        (dict(values=values, offsets=np.array([-1, 3, 3, 8])), "inside values"),
        (dict(out=np.empty((3, 31), np.uint8)), "out must be"),
        (dict(out=np.empty((3, 32), np.int8)), "out must be"),
    ]
    for override, problem in cases:
        args: dict[str, object] = dict(head=head, values=None, offsets=None, out=None)
        args.update(override)
        with pytest.raises(ValueError, match=problem):
            native.hash_rows("sha256", **args)  # type: ignore[arg-type]


def test_the_loop_reads_a_private_copy_of_the_offsets_it_checked(
    native: _native.NativeHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop runs without the GIL: reading the caller's own int64 offsets, another of the
    caller's threads could change them after the check and send it far past ``values`` (a
    review's script: a segfault)."""
    values, offsets = _pair([b"abc", b"", b"defgh"])
    offsets = offsets.astype(np.int64)
    seen: list[int] = []
    loop = native._fn

    def spy(*args: object) -> int:
        seen.append(int(args[7]))  # type: ignore[call-overload]
        return int(loop(*args))

    monkeypatch.setattr(native, "_fn", spy)
    got = native.hash_rows("sha256", np.empty((3, 0), np.uint8), values, offsets)
    assert bytes(got[2]) == hashlib.sha256(b"defgh").digest()
    assert seen and seen[0] != offsets.ctypes.data


def test_built_once_and_reused(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    first = _native.get()
    assert first is not None
    built = list(fresh.glob("hashrows-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns

    def no_build(*_: object) -> None:
        raise AssertionError("built again although the cache holds it")

    monkeypatch.setattr(_native, "_build", no_build)
    _native.reset()
    again = _native.get()
    assert again is not None
    assert built[0].stat().st_mtime_ns == stamp
    rows = np.frombuffer(b"x" * 64, np.uint8).reshape(2, 32)
    assert np.array_equal(again.hash_rows("sha256", rows), first.hash_rows("sha256", rows))


def test_name_follows_the_source(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert _native.get() is not None
    changed = fresh.parent / "hashrows.c"
    changed.write_bytes(_native.SOURCE.read_bytes() + b"\n/* another revision */\n")
    monkeypatch.setattr(_native, "SOURCE", changed)
    _native.reset()
    assert _native.get() is not None
    assert len(list(fresh.glob("hashrows-*.so"))) == 2


def _load_in_child(cache: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.environ[_native.ENV_CACHE] = cache
    _native.reset()
    hasher = _native.get()
    rows = np.frombuffer(b"abc" * 10, np.uint8).reshape(10, 3)
    queue.put(None if hasher is None else hasher.hash_rows("sha256", rows).tobytes())


def test_processes_starting_together_share_one_build(fresh: Path) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(fresh), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [hashlib.sha256(b"abc").digest() * 10] * 3
    # One library and its lock: no second build, no temporary file left behind
    assert sorted(p.suffix for p in fresh.iterdir()) == [".lock", ".so"]


@pytest.mark.parametrize("how", ["no compiler", "switched off", "cache unwritable"])
def test_without_the_loop_hashlib_hashes(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    if how == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    elif how == "switched off":
        monkeypatch.setenv(_native.ENV_SWITCH, "0")
    else:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        monkeypatch.setenv(_native.ENV_CACHE, str(blocker / "cache"))
    assert _native.get() is None
    assert not _native.available()
    messages = [_RNG.randbytes(n) for n in range(100)]
    got = sha256_batch(_pair(messages), backend="cpu")
    assert [r.tobytes() for r in got] == [hashlib.sha256(m).digest() for m in messages]


def test_thread_split_equals_one_call(
    native: _native.NativeHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = [_RNG.randbytes(_RNG.randrange(0, 300)) for _ in range(5000)]
    values, offsets = _pair(messages)
    monkeypatch.setenv(_cpu.WORKERS_ENV, "3")
    monkeypatch.setattr(_cpu, "NATIVE_PARALLEL_MIN_ROWS", 100)
    split = sha256_batch((values, offsets), backend="cpu")
    assert np.array_equal(
        split, native.hash_rows("sha256", np.empty((5000, 0), np.uint8), values, offsets)
    )


def test_root_over_leaf_hashes_equals_ledger() -> None:
    for n in (0, 1, 2, 3, 7, 8, 9, 100, 1023, 1025):
        leaves = np.frombuffer(_RNG.randbytes(n * 32), np.uint8).reshape(n, 32)
        hashed = np.frombuffer(
            b"".join(hashlib.sha256(b"\x00" + leaf.tobytes()).digest() for leaf in leaves),
            np.uint8,
        ).reshape(n, 32)
        want = ledger_root_of_leaf_hashes(hashed)
        assert merkle_root_of_leaf_hashes(hashed) == want
        assert want == ledger_merkle_root([leaf.tobytes() for leaf in leaves])
        assert merkle_root(leaves, backend="cpu") == want
    with pytest.raises(ValueError, match="leaf_hashes"):
        merkle_root_of_leaf_hashes(np.zeros((2, 31), np.uint8))
