"""A block store opened read only (`rayledger store verify`) is verified as it is, and nothing
in its directory changes: no index created or marked, no block indexed, no bytes set aside.
What an open for writing would recover is listed instead.

Found by a sweep of bad inputs: `store verify` on a directory holding an empty index.sqlite
and segments/ wrote a schema and a genesis into it and passed it ("ok: 0 blocks"); junk after
the last block was cut off the segment into a .torn file; a corrupt index ended in an SQLite
traceback. A verification that changes what it verifies is no evidence for a post-mortem."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayledger.actors.storage import BlockStore
from rayledger.actors.storage.engine import encode_frame
from rayledger.block import Block
from rayledger.cluster.cli import app
from rayledger.errors import StoreCorruption, StoreError
from tests.unit.test_store import GENESIS, filled, make_chain

GENESIS_TOML = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


@pytest.fixture(scope="module")
def chain() -> list[Block]:
    return make_chain(5)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_sound_store_is_verified_without_a_byte_changed(
    tmp_path: Path, chain: list[Block]
) -> None:
    filled(tmp_path, chain[:4]).close()
    before = snapshot(tmp_path)
    with BlockStore(tmp_path, GENESIS, read_only=True) as store:
        assert store.height == 4 and store.head == chain[3].header and store.recovery == []
        assert store.get_block(2).header == chain[1].header
    assert snapshot(tmp_path) == before


def test_a_store_whose_writer_is_open_is_read_through_its_log(
    tmp_path: Path, chain: list[Block]
) -> None:
    """With the write-ahead log beside the index (a writer running, or crashed), blocks that
    are in the log only are read too."""
    writer = filled(tmp_path, chain[:3])
    try:
        assert (tmp_path / "index.sqlite-wal").exists()
        with BlockStore(tmp_path, GENESIS, read_only=True) as store:
            assert store.height == 3 and store.head == chain[2].header
    finally:
        writer.close()


def test_what_recovery_would_do_is_listed_not_done(tmp_path: Path, chain: list[Block]) -> None:
    filled(tmp_path, chain[:3]).close()
    seg = tmp_path / "segments" / "00000000.seg"
    # Block 4 written whole but never indexed (an append interrupted between its two steps),
    # then the torn start of block 5
    with open(seg, "ab") as f:
        f.write(encode_frame(chain[3]))
        f.write(encode_frame(chain[4])[:-100])
    before = snapshot(tmp_path)
    with BlockStore(tmp_path, GENESIS, read_only=True) as store:
        assert store.height == 4  # block 4 verified as the chain's next
        assert len(store.recovery) == 2
        assert "height 4 complete in 00000000.seg" in store.recovery[0]
        assert "not indexed: its next open for writing indexes it" in store.recovery[0]
        assert "unacknowledged bytes after the last block in 00000000.seg" in store.recovery[1]
    assert snapshot(tmp_path) == before
    # An open for writing does what was listed
    with BlockStore(tmp_path, GENESIS) as store:
        assert store.height == 4 and len(list(seg.parent.glob("*.torn-*"))) == 1


def test_no_store_or_an_index_that_is_not_one_is_refused_and_left_as_it_was(
    tmp_path: Path, chain: list[Block]
) -> None:
    with pytest.raises(StoreError, match="no block store in"):
        BlockStore(tmp_path / "nowhere", GENESIS, read_only=True)
    assert not (tmp_path / "nowhere").exists()
    store_dir = tmp_path / "s"
    (store_dir / "segments").mkdir(parents=True)
    index = store_dir / "index.sqlite"
    index.write_bytes(b"")  # an empty file is an empty SQLite database
    with pytest.raises(StoreCorruption, match="no meta and blocks tables"):
        BlockStore(store_dir, GENESIS, read_only=True)
    assert index.read_bytes() == b""
    index.write_bytes(b"hello, not a database\n" * 100)
    with pytest.raises(StoreCorruption, match="not an index: file is not a database"):
        BlockStore(store_dir, GENESIS, read_only=True)
    # A schema without a genesis (a store created and never opened through): not a chain
    filled(tmp_path / "t", chain[:1]).close()
    index = tmp_path / "t" / "index.sqlite"
    with sqlite3.connect(index) as db:
        db.execute("DELETE FROM meta WHERE key = 'genesis'")
    with pytest.raises(StoreCorruption, match="the index names no genesis"):
        BlockStore(tmp_path / "t", GENESIS, read_only=True)


def test_store_verify_says_what_it_found_and_changes_nothing(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "demo"
    made = runner.invoke(
        app,
        ["demo", "--offline", "--config", str(GENESIS_TOML), "--data-dir", str(data),
         "--txs", "400", "--block-size", "200"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    genesis = str(data / "genesis.toml")
    store = data / "store"
    seg = store / "segments" / "00000000.seg"
    with open(seg, "ab") as f:
        f.write(b"\x00junk" * 60)
    (store / "segments" / "00000001.seg").write_bytes(seg.read_bytes())  # a stray copy
    before = snapshot(store)
    result = runner.invoke(app, ["store", "verify", str(store), "--genesis", genesis])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "found: 300 unacknowledged bytes after the last block in 00000000.seg" in out, out
    assert "after the last block in 00000001.seg" in out and "ok: 2 blocks verified" in out
    assert snapshot(store) == before
    # A corrupt index: named, exit 2, no traceback, left as it was
    (store / "index.sqlite").write_bytes(b"hello\n")
    for suffix in ("-wal", "-shm"):
        (store / f"index.sqlite{suffix}").unlink(missing_ok=True)
    result = runner.invoke(app, ["store", "verify", str(store), "--genesis", genesis])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "store_corruption" in out and "not an index" in out, out
    assert (store / "index.sqlite").read_bytes() == b"hello\n"
