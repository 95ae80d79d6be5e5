"""Storage shards and receipts without Ray: a real certified chain is applied to S shards; the
partitions together hold exactly the ledger; receipts assembled from two shards verify with the
validator keys alone, and every forged part is refused with its reason."""

from __future__ import annotations

import dataclasses
import sqlite3
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rayledger.actors.storage import (
    CommittedBlock,
    ShardStore,
    partition,
    shard_of_height,
    shard_of_keys,
    shard_of_tx_ids,
    writes_batch,
)
from rayledger.actors.storage.partition import assemble_receipt
from rayledger.block import (
    BlockHeader,
    QuorumCert,
    genesis_header,
    make_bitmap,
    result_leaf_hashes,
    vote_message,
)
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.config import Validator, ValidatorSet
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.errors import (
    DecodeError,
    InvalidBlock,
    InvalidReceipt,
    NotFound,
    StoreCorruption,
    StoreError,
    TruncatedInput,
    WrongLength,
)
from rayledger.execution import Account, Status, balance_key, genesis_state
from rayledger.receipt import Receipt, receipt_ok, verify_receipt
from rayledger.tx import TxKind, make_batch, tx_ids_of

CHAIN = bytes(range(32))
VKEYS = [key_from_seed(bytes([0x40 + i]) * 32) for i in range(4)]
VS = ValidatorSet(tuple(Validator(f"v{i}", public_bytes(k)) for i, k in enumerate(VKEYS)))
A, B = key_from_seed(b"\x01" * 32), key_from_seed(b"\x02" * 32)
PA, PB = public_bytes(A), public_bytes(B)
# An account no block touches: its genesis balance is state all the same
PC = public_bytes(key_from_seed(b"\x03" * 32))
ACCOUNTS = [Account(PA, 1_000), Account(PB, 500), Account(PC, 7)]
SHARDS = 3
# Rounds of blocks 1..5: block 3 is followed by a round gap, so 1-2 commit through child 3,
# 3-4 through child 5, and 5 has no commit proof yet.
ROUNDS = (1, 2, 3, 5, 6)
COMMITS = {2: 3, 4: 5}


def qc_for(header: BlockHeader, signers: tuple[int, ...] = (0, 1, 2)) -> QuorumCert:
    msg = vote_message(CHAIN, header.hash, header.round)
    sigs = tuple(VKEYS[i].sign(msg) for i in signers)
    return QuorumCert(header.hash, header.round, make_bitmap(list(signers), VS.n), sigs)


def build_chain() -> tuple[BlockHeader, list[CommittedBlock], LedgerBuilder]:
    base, root = genesis_state(ACCOUNTS)
    genesis = genesis_header(CHAIN, 1, root)
    transfers = make_batch(
        A, TxKind.TRANSFER, range(0, 40), [PB + struct.pack(">Q", 3)] * 40, CHAIN
    )
    anchors = make_batch(
        B, TxKind.ANCHOR, range(0, 30), [bytes([i]) * 32 for i in range(30)], CHAIN
    )
    votes = make_batch(B, TxKind.VOTE, range(30, 35), [b"yes"] * 5, CHAIN)
    parts = [transfers.slice(0, 25), anchors, transfers.slice(25), votes, transfers.slice(0, 5)]
    batches = {batch_digest(b): b for b in parts}
    digests = list(batches)
    builder = LedgerBuilder(batches, genesis, base)
    headers, writes = [], []
    parent = genesis
    for r, d in zip(ROUNDS, digests, strict=True):
        h = builder.build(parent, r, VS.validators[r % 4].public_key, 10 + r, (d,))
        headers.append(h)
        writes.append(builder.writes_of(h.hash))
        parent = h
    blocks = []
    parent_qc = QuorumCert.genesis(genesis.hash)
    for i, h in enumerate(headers):
        qc = qc_for(h)
        rows = builder.commit(h.hash, parent_qc).rows()
        parent_qc = qc
        commit = None
        if h.height in COMMITS:
            child = headers[COMMITS[h.height] - 1]
            commit = (child, qc_for(child, (1, 2, 3)))
        blocks.append(CommittedBlock(h, qc, rows, writes_batch(writes[i]), commit))
    return genesis, blocks, builder


@pytest.fixture(scope="module")
def chain() -> tuple[BlockHeader, list[CommittedBlock], LedgerBuilder]:
    return build_chain()


def open_shards(root: Path, genesis: BlockHeader) -> list[ShardStore]:
    seed = genesis_state(ACCOUNTS)[0].writes
    return [ShardStore(root / f"s{k}", k, SHARDS, genesis, seed) for k in range(SHARDS)]


@pytest.fixture(params=["buffered", "written"])
def applied(request: pytest.FixtureRequest, tmp_path: Path, chain):  # noqa: ANN001, ANN201
    """The chain applied to every shard; its index and state still in the index buffer
    ("buffered") or written to the B-trees ("written")."""
    genesis, blocks, _ = chain
    shards = open_shards(tmp_path, genesis)
    for s in shards:
        assert s.apply(blocks) == 5
        if request.param == "written":
            s.flush()
            assert s._db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0
            assert s.buffered_rows == 0
        else:
            assert s._db.execute("SELECT count(*) FROM txs").fetchone()[0] == 0
            assert s.buffered_rows > 0
    yield shards
    for s in shards:
        s.close()


def all_ids(blocks: list[CommittedBlock]) -> list[bytes]:
    ids = np.concatenate([tx_ids_of(b.rows) for b in blocks])
    return list(dict.fromkeys(bytes(r) for r in ids))


def receipt_from(shards: list[ShardStore], tx_id: bytes) -> Receipt:
    owner = shards[int(shard_of_tx_ids(np.frombuffer(tx_id, np.uint8), SHARDS)[0])]
    row = owner.get_tx(tx_id)
    headers, commit = owner.commit_proof(row["height"])
    proofs = shards[shard_of_height(row["height"], SHARDS)].proofs(row["height"], row["index"])
    return assemble_receipt(row, headers, commit, proofs, CHAIN)


def test_partitions_together_hold_exactly_the_ledger(applied, chain) -> None:  # noqa: ANN001
    genesis, blocks, builder = chain
    ids = all_ids(blocks)
    owners = shard_of_tx_ids(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32), SHARDS)
    assert set(owners.tolist()) == set(range(SHARDS))
    for k, shard in enumerate(applied):
        mine = [t for t, o in zip(ids, owners, strict=True) if o == k]
        assert all(h is not None for h in shard.locate(mine))
        other = [t for t, o in zip(ids, owners, strict=True) if o != k]
        with pytest.raises(ValueError, match="not in shard"):
            shard.locate(other[:1])
    state = builder.base.writes
    key_owners = shard_of_keys(list(state), SHARDS)
    for (key, value), k in zip(state.items(), key_owners, strict=True):
        got = applied[k].get_state(key)
        assert got is not None and got[0] == value
        with pytest.raises(ValueError, match="not in shard"):
            applied[(k + 1) % SHARDS].get_state(key)
    # A genesis balance no block wrote is served too, as of height 0
    owner = applied[int(shard_of_keys([balance_key(PC)], SHARDS)[0])]
    assert owner.get_state(balance_key(PC)) == (struct.pack(">Q", 7), 0)
    nobody = balance_key(bytes(32))
    assert applied[int(shard_of_keys([nobody], SHARDS)[0])].get_state(nobody) is None
    assert applied[0].header(3) == blocks[2].header


def test_replayed_ids_keep_the_row_that_consumed_the_nonce(applied, chain) -> None:  # noqa: ANN001
    _, blocks, _ = chain
    replayed = [bytes(r) for r in tx_ids_of(blocks[4].rows)]
    statuses = blocks[4].rows.column("status").to_pylist()
    assert statuses == [Status.BAD_NONCE] * 5
    for t in replayed:
        owner = applied[int(shard_of_tx_ids(np.frombuffer(t, np.uint8), SHARDS)[0])]
        row = owner.get_tx(t)
        assert (row["height"], row["status"]) == (1, Status.OK)


def test_every_committed_transaction_has_a_receipt_that_verifies(applied, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    seen_status = set()
    for t in all_ids(blocks):
        receipt = receipt_from(applied, t)
        verify_receipt(receipt, VS, CHAIN, genesis.hash)
        again = Receipt.decode(receipt.encode())
        assert again == receipt
        assert receipt.tx_id == t
        seen_status.add(receipt.status)
        assert receipt.commit.header.height in COMMITS
    assert {Status.OK, Status.UNSUPPORTED_KIND} <= seen_status


def test_uncommitted_and_unproven_are_not_found(applied, chain) -> None:  # noqa: ANN001
    _, blocks, _ = chain
    with pytest.raises(NotFound, match="no commit proof for block 5"):
        applied[0].commit_proof(5)
    stranger = bytes(32)
    owner = applied[int(shard_of_tx_ids(np.frombuffer(stranger, np.uint8), SHARDS)[0])]
    with pytest.raises(NotFound, match="not committed"):
        owner.get_tx(stranger)
    assert owner.locate([stranger]) == [None]
    with pytest.raises(ValueError, match="32 bytes"):
        owner.get_tx(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        owner.locate([stranger, b"short"])
    with pytest.raises(ValueError, match="not in shard"):
        applied[1].proofs(3, 0)  # height 3 lives in shard 0
    with pytest.raises(NotFound):
        applied[0].header(99)


def test_apply_is_idempotent_refuses_gaps_and_forks_and_changes_nothing(tmp_path, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 0, SHARDS, genesis)
    assert shard.apply(blocks[:2]) == 2
    assert shard.apply(blocks[:2]) == 2
    with pytest.raises(StoreError, match="gap"):
        shard.apply([blocks[3]])
    forked = dataclasses.replace(blocks[2].header, parent_hash=bytes(32))
    with pytest.raises(InvalidBlock, match="does not extend"):
        shard.apply([dataclasses.replace(blocks[2], header=forked, qc=qc_for(forked))])
    with pytest.raises(InvalidBlock, match="rows do not match"):
        shard.apply([dataclasses.replace(blocks[2], rows=blocks[2].rows.slice(1))])
    with pytest.raises(InvalidBlock, match="certifies another block"):
        shard.apply([dataclasses.replace(blocks[2], qc=blocks[1].qc)])
    # Several blocks go in one transaction: a bad one after good ones applies none of them
    with pytest.raises(InvalidBlock, match="rows do not match"):
        shard.apply([blocks[2], dataclasses.replace(blocks[3], rows=blocks[3].rows.slice(1))])
    assert shard.height == 2
    ids3 = [bytes(r) for r in tx_ids_of(blocks[2].rows)]
    mine = [t for t in ids3 if shard.owns_tx(t)]
    assert mine and shard.locate(mine) == [None] * len(mine)
    assert shard.apply(blocks) == 5
    shard.close()


def test_reopen_keeps_the_partition_and_refuses_another(tmp_path, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 1, SHARDS, genesis)
    shard.apply(blocks[:3])
    shard.close()
    again = ShardStore(tmp_path / "s", 1, SHARDS, genesis)
    assert again.height == 3 and again.apply(blocks) == 5
    again.close()
    with pytest.raises(StoreError, match="partition"):
        ShardStore(tmp_path / "s", 2, SHARDS, genesis)
    with pytest.raises(StoreError, match="genesis"):
        ShardStore(tmp_path / "s", 1, SHARDS, genesis_header(CHAIN, 2))
    with pytest.raises(ValueError):
        ShardStore(tmp_path / "t", 3, SHARDS, genesis)


# ---- forged receipts ----------------------------------------------------------------------------


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


def _forgeries(r: Receipt, blocks: list[CommittedBlock]) -> dict[str, tuple[Receipt, str]]:
    h = [b.header for b in blocks]
    c = r.commit
    return {
        "signature": (
            dataclasses.replace(r, tx=dataclasses.replace(r.tx, signature=_flip(r.tx.signature))),
            "signature",
        ),
        "unsigned": (
            dataclasses.replace(r, tx=dataclasses.replace(r.tx, signature=b"")),
            "no signature",
        ),
        "height": (dataclasses.replace(r, height=r.height + 1), "height"),
        "index": (dataclasses.replace(r, index=r.index + 1), "inclusion proof"),
        "tx proof": (
            dataclasses.replace(r, tx_proof=(_flip(r.tx_proof[0]), *r.tx_proof[1:])),
            "inclusion proof",
        ),
        "status": (dataclasses.replace(r, status=Status.INSUFFICIENT_FUNDS), "result root"),
        "result": (dataclasses.replace(r, result=r.result + b"x"), "result root"),
        "chain dropped": (dataclasses.replace(r, chain=()), "another block"),
        "chain foreign": (dataclasses.replace(r, chain=(h[2],)), "does not extend"),
        "child foreign": (
            dataclasses.replace(
                r, commit=dataclasses.replace(c, child=h[4], child_qc=qc_for(h[4]))
            ),
            "child does not extend",
        ),
        "qc foreign": (
            dataclasses.replace(r, commit=dataclasses.replace(c, qc=qc_for(h[0]))),
            "names another block",
        ),
        "qc short": (
            dataclasses.replace(r, commit=dataclasses.replace(c, qc=qc_for(c.header, (0, 1)))),
            "quorum",
        ),
        "qc forged vote": (
            dataclasses.replace(
                r,
                commit=dataclasses.replace(
                    c,
                    child_qc=dataclasses.replace(
                        c.child_qc,
                        signatures=(_flip(c.child_qc.signatures[0]), *c.child_qc.signatures[1:]),
                    ),
                ),
            ),
            "bad vote signature",
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "signature",
        "unsigned",
        "height",
        "index",
        "tx proof",
        "status",
        "result",
        "chain dropped",
        "chain foreign",
        "child foreign",
        "qc foreign",
        "qc short",
        "qc forged vote",
    ],
)
def test_forged_receipt_is_refused_with_its_reason(applied, chain, name: str) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    t = bytes(tx_ids_of(blocks[0].rows)[0])
    receipt = receipt_from(applied, t)
    assert len(receipt.chain) == 1  # block 1 is proven through block 2's commit
    assert receipt_ok(receipt, VS, CHAIN, genesis.hash)
    forged, reason = _forgeries(receipt, blocks)[name]
    with pytest.raises(InvalidReceipt, match=reason):
        verify_receipt(forged, VS, CHAIN, genesis.hash)
    assert not receipt_ok(forged, VS, CHAIN, genesis.hash)


def test_a_receipt_built_with_fields_out_of_type_or_range_is_refused(applied, chain) -> None:  # noqa: ANN001
    """``receipt_ok`` answered some of these with a ValueError, TypeError or AttributeError."""
    genesis, blocks, _ = chain
    receipt = receipt_from(applied, bytes(tx_ids_of(blocks[0].rows)[0]))
    for field, value in [
        ("status", 256),
        ("status", -1),
        ("result", "text"),
        ("index", -1),
        ("height", "1"),
        ("tx_proof", (b"x",)),
        ("chain", (None,)),
    ]:
        odd = dataclasses.replace(receipt, **{field: value})
        with pytest.raises(InvalidReceipt):
            verify_receipt(odd, VS, CHAIN, genesis.hash)
        assert receipt_ok(odd, VS, CHAIN, genesis.hash) is False, (field, value)


def test_receipt_refused_on_another_chain_and_without_two_chain(applied, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    t = bytes(tx_ids_of(blocks[2].rows)[0])
    receipt = receipt_from(applied, t)
    verify_receipt(receipt, VS, CHAIN, genesis.hash)
    with pytest.raises(InvalidReceipt, match="another chain"):
        verify_receipt(receipt, VS, bytes(32), genesis.hash)
    # Block 3's own child (block 4) is two rounds later: not a commit proof
    h3, h4 = blocks[2].header, blocks[3].header
    no_commit = dataclasses.replace(
        receipt,
        chain=(),
        commit=dataclasses.replace(
            receipt.commit, header=h3, qc=qc_for(h3), child=h4, child_qc=qc_for(h4)
        ),
    )
    with pytest.raises(InvalidReceipt, match="next round"):
        verify_receipt(no_commit, VS, CHAIN, genesis.hash)


def test_receipt_decoding_refuses_malformed_bytes(applied, chain) -> None:  # noqa: ANN001
    _, blocks, _ = chain
    raw = receipt_from(applied, bytes(tx_ids_of(blocks[1].rows)[0])).encode()
    with pytest.raises(TruncatedInput):
        Receipt.decode(raw[:-1])
    with pytest.raises(DecodeError, match="trailing"):
        Receipt.decode(raw + b"\x00")
    with pytest.raises(DecodeError, match="version"):
        Receipt.decode(b"\x09" + raw[1:])
    for cut in range(0, len(raw), 97):
        with pytest.raises(DecodeError):
            Receipt.decode(raw[:cut])
    receipt = Receipt.decode(raw)
    for field, what in (("tx_proof", "tx proof"), ("result_proof", "result proof")):
        long = dataclasses.replace(receipt, **{field: (bytes(32),) * 65}).encode()
        with pytest.raises(WrongLength, match=f"{what} of 65 hashes exceeds 64"):
            Receipt.decode(long)


def test_bytes_after_the_last_indexed_frame_are_cut_on_open(tmp_path, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 0, 1, genesis)
    shard.apply(blocks[:2])
    shard.close()
    seg = tmp_path / "s" / "rows.seg"
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # a frame whose index never committed (crash in between)
        f.write(b"\xff" * 1000)
    again = ShardStore(tmp_path / "s", 0, 1, genesis)
    assert seg.stat().st_size == size and again.height == 2
    assert again.apply(blocks) == 5
    t = bytes(tx_ids_of(blocks[3].rows)[2])
    row = again.get_tx(t)
    assert (row["height"], row["index"], row["tx_id"]) == (4, 2, t)
    again.close()


def test_receipt_from_a_small_order_sender_is_refused(applied, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    receipt = receipt_from(applied, bytes(tx_ids_of(blocks[0].rows)[0]))
    identity = bytes.fromhex("01" + "00" * 31)
    tx = dataclasses.replace(receipt.tx, sender=identity, signature=identity + bytes(32))
    with pytest.raises(InvalidReceipt, match="small order"):
        verify_receipt(dataclasses.replace(receipt, tx=tx), VS, CHAIN, genesis.hash)


def test_get_states_reads_many_keys_and_refuses_foreign_ones(applied, chain) -> None:  # noqa: ANN001
    _, _, builder = chain
    state = builder.base.writes
    owners = shard_of_keys(list(state), SHARDS)
    mine = [k for k, o in zip(state, owners, strict=True) if o == 0]
    nobody = next(
        k
        for k in (balance_key(bytes([i]) * 32) for i in range(50))
        if shard_of_keys([k], SHARDS)[0] == 0
    )
    assert applied[0].get_states([*mine, nobody]) == [*(state[k] for k in mine), None]
    assert applied[0].get_states([]) == []
    foreign = next(k for k, o in zip(state, owners, strict=True) if o != 0)
    with pytest.raises(ValueError, match="not in shard 0"):
        applied[0].get_states([*mine, foreign])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_frame_reads_as_store_error_never_as_other_rows(
    tmp_path: Path,
    chain,  # noqa: ANN001
    damage: str,
) -> None:
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 0, 1, genesis)
    shard.apply(blocks)
    t3 = bytes(tx_ids_of(blocks[2].rows)[1])
    t4 = bytes(tx_ids_of(blocks[3].rows)[0])
    assert shard.get_tx(t3)["height"] == 3
    offset, length = shard._db.execute(
        "SELECT offset, length FROM frames WHERE height = 3"
    ).fetchone()
    shard.close()
    seg = tmp_path / "s" / "rows.seg"
    data = bytearray(seg.read_bytes())
    if damage == "flip":  # one bit of a payload byte: the Arrow stream still parses
        data[offset + length - 40] ^= 0x01
        seg.write_bytes(bytes(data))
    again = ShardStore(tmp_path / "s", 0, 1, genesis)
    if damage == "truncate":  # the file lost its tail (frames 3.. are indexed, not on disk)
        again._seg.truncate(offset + length // 2)
    with pytest.raises(StoreError, match="rows of block 3 .* damaged"):
        again.get_tx(t3)
    with pytest.raises(StoreError, match="damaged"):
        again.get_tx(t3)  # asked again: a damaged frame is never kept as read
    if damage == "flip":  # the other blocks' rows are intact and still served
        assert again.get_tx(t4)["height"] == 4
    again.close()


def test_a_rows_file_shorter_than_its_index_refuses_to_open(tmp_path: Path, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 0, 1, genesis)
    shard.apply(blocks)
    shard.close()
    seg = tmp_path / "s" / "rows.seg"
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 1)
    with pytest.raises(StoreCorruption, match=r"rows file has \d+ bytes, its index needs"):
        ShardStore(tmp_path / "s", 0, 1, genesis)


def test_frames_of_a_shard_from_before_checksums_still_read(tmp_path: Path, chain) -> None:  # noqa: ANN001
    genesis, blocks, _ = chain
    shard = ShardStore(tmp_path / "s", 0, 1, genesis)
    shard.apply(blocks[:3])
    shard.close()
    db = sqlite3.connect(tmp_path / "s" / "shard.sqlite")
    db.executescript(  # the frames table as it was: no crc column
        "CREATE TABLE old AS SELECT height, offset, length FROM frames;"
        "DROP TABLE frames; ALTER TABLE old RENAME TO frames;"
    )
    db.close()
    again = ShardStore(tmp_path / "s", 0, 1, genesis)
    t = bytes(tx_ids_of(blocks[1].rows)[0])
    assert again.get_tx(t)["height"] == 2
    assert again.apply(blocks) == 5
    crcs = dict(again._db.execute("SELECT height, crc FROM frames").fetchall())
    assert crcs[2] is None and all(crcs[h] is not None for h in (4, 5))
    # Such a frame has no checksum: bytes that no longer parse as Arrow still read as damage
    offset = again._db.execute("SELECT offset FROM frames WHERE height = 2").fetchone()[0]
    with open(tmp_path / "s" / "rows.seg", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)
    assert again.get_tx(t)["height"] == 2  # the rows read (and checked) before are kept
    again._frames.clear()
    with pytest.raises(StoreError, match="rows of block 2 .* damaged"):
        again.get_tx(t)
    again.close()


def test_result_leaves_from_the_validator_are_stored_as_given(
    tmp_path: Path,
    chain,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    genesis, blocks, _ = chain
    leaves = [
        result_leaf_hashes(tx_ids_of(b.rows), b.rows.select(["status", "result"])) for b in blocks
    ]
    carried = [dataclasses.replace(b, result_leaves=x) for b, x in zip(blocks, leaves, strict=True)]
    # A block carrying its leaf hashes is not hashed again here
    monkeypatch.setattr(partition, "result_leaf_hashes", None)
    shards = open_shards(tmp_path, genesis)
    for s in shards:
        assert s.apply(carried) == 5
    for tx_id in all_ids(blocks):
        verify_receipt(receipt_from(shards, tx_id), VS, CHAIN, genesis.hash)
    for s in shards:
        s.close()


@pytest.mark.parametrize(
    "leaves",
    [
        np.zeros((3, 32), np.uint8),  # rows missing
        np.zeros((25, 31), np.uint8),  # not 32 bytes each
        np.zeros((25, 32), np.uint16),  # not bytes
        [bytes(32)] * 25,  # not an array
    ],
)
def test_result_leaves_of_the_wrong_shape_are_refused_and_change_nothing(
    tmp_path: Path,
    chain,
    leaves: object,  # noqa: ANN001
) -> None:
    genesis, blocks, _ = chain
    assert blocks[0].header.tx_count == 25
    shard = ShardStore(tmp_path / "s", 0, SHARDS, genesis)
    with pytest.raises(InvalidBlock, match="result leaf hashes"):
        shard.apply([dataclasses.replace(blocks[0], result_leaves=leaves)])
    assert shard.height == 0
    assert shard.apply(blocks) == 5
    shard.close()


# ---- the WAL checkpoints, made by the store's own thread ---------------------------------------


def _wait_for(predicate, timeout: float = 20.0) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _checkpoint_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.endswith("-checkpoint")}


def test_the_wal_is_checkpointed_by_the_stores_own_thread(
    tmp_path: Path,
    chain,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    genesis, blocks, _ = chain
    monkeypatch.setattr(partition, "SHARD_CHECKPOINT_ROWS", 1)  # every apply asks for one
    shard = ShardStore(tmp_path / "s", 0, SHARDS, genesis)
    # The writer's connection never checkpoints (an apply would wait for it)
    assert shard._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert "shard-0-checkpoint" in _checkpoint_threads()
    for block in blocks:
        shard.apply([block])
    assert _wait_for(lambda: shard.wal_checkpoints[0] >= 1), shard.wal_checkpoints
    # Once the thread is done, every frame of the WAL is in the database file
    other = sqlite3.connect(shard.path)
    assert _wait_for(
        lambda: (lambda r: r[0] == 0 and r[1] == r[2])(
            other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        )
    )
    other.close()
    assert shard.wal_checkpoints[1] == 0
    shard.close()
    assert "shard-0-checkpoint" not in _checkpoint_threads()
    again = ShardStore(tmp_path / "s", 0, SHARDS, genesis)
    assert again.height == len(blocks)
    again.close()


def test_a_failed_checkpoint_is_counted_and_the_shard_goes_on(
    tmp_path: Path,
    chain,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    genesis, blocks, _ = chain
    monkeypatch.setattr(partition, "SHARD_CHECKPOINT_ROWS", 1)

    def broken(self: object, db: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(partition._Checkpointer, "_checkpoint", broken)
    shard = ShardStore(tmp_path / "s", 1, SHARDS, genesis)
    for block in blocks[:3]:
        shard.apply([block])
    assert _wait_for(lambda: shard.wal_checkpoints[1] >= 1), shard.wal_checkpoints
    assert shard.wal_checkpoints[0] == 0
    # Nothing lost and nothing stuck: the shard applies on and reopens whole
    assert shard.apply(blocks) == len(blocks)
    shard.close()
    again = ShardStore(tmp_path / "s", 1, SHARDS, genesis)
    assert again.height == len(blocks)
    again.close()


def test_rows_read_lately_are_kept_within_a_bound(
    applied,
    chain,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """Each read of one row read, checked and decoded its block's whole frame (4.3 ms a row
    of a 50,000-row block); the latest frames read are kept, within FRAMES_KEEP_BYTES."""
    genesis, blocks, _ = chain
    reads: list[int] = []
    for shard in applied:
        read = shard._read_frame
        monkeypatch.setattr(shard, "_read_frame", lambda h, read=read: reads.append(h) or read(h))
    ids = [bytes(t) for t in tx_ids_of(blocks[0].rows)]
    owners = shard_of_tx_ids(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32), SHARDS)
    for t, k in zip(ids, owners, strict=True):
        assert applied[k].get_tx(t)["height"] == 1
    assert reads.count(1) == len(set(owners.tolist()))  # once per shard holding its rows
    one = applied[int(owners[0])]
    monkeypatch.setattr(partition, "FRAMES_KEEP_BYTES", 1)  # none fits: none is kept
    one._frames.clear()
    one._frames_bytes = 0
    one.get_tx(ids[0])
    one.get_tx(ids[0])
    assert one._frames == {} and reads[-2:] == [1, 1]


def test_one_read_asks_for_at_most_read_max_keys_and_callers_ask_in_parts(
    applied,
    chain,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """A million ids in one ``locate`` kept a shard busy 11 s; state keys of another type
    than bytes raised Arrow's or Python's errors."""
    genesis, blocks, _ = chain
    monkeypatch.setattr(partition, "READ_MAX_KEYS", 4)
    ids = all_ids(blocks)
    owners = shard_of_tx_ids(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32), SHARDS)
    k = int(np.bincount(owners).argmax())
    mine = [t for t, o in zip(ids, owners, strict=True) if o == k]
    assert len(mine) > 4
    with pytest.raises(ValueError, match="at most 4, ask in parts"):
        applied[k].locate(mine)
    assert partition.read_parts(list(range(10))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [h for p in partition.read_parts(mine) for h in applied[k].locate(p)] == [
        h for t in mine for h in applied[k].locate([t])
    ]
    with pytest.raises(ValueError, match="at most 4"):
        applied[0].get_states([b"k%d" % i for i in range(5)])
    for odd in ([7], ["str"], [bytearray(b"x")]):
        with pytest.raises(ValueError, match="a state key is bytes"):
            applied[0].get_states(odd)  # type: ignore[arg-type]
