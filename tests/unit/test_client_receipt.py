"""The client's receipt look-up across validators, without Ray: each validator's shard answers
with a good receipt, a forged one, another transaction's, bytes that do not decode, a damaged
store, "not committed", or not at all. A verified receipt is taken from whoever serves it; a
refusal is specific; "not committed" is believed at once (the chain is the same everywhere)."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import ray

from rayledger.actors.storage import (
    CommittedBlock,
    shard_of_height,
    shard_of_tx_ids,
    writes_batch,
)
from rayledger.actors.storage import partition as partition_module
from rayledger.actors.storage import shard as shard_module
from rayledger.actors.storage.partition import assemble_receipt
from rayledger.actors.storage.shard import StorageShard
from rayledger.block import QuorumCert, genesis_header
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.cluster import client as client_mod
from rayledger.cluster.client import Client
from rayledger.errors import DecodeError, InvalidReceipt, NotFound, NotYetAvailable, StoreError
from rayledger.execution import Status, genesis_state
from rayledger.receipt import Receipt, verify_receipt
from rayledger.tx import TxKind, make_batch, tx_ids_of

from .test_shard import (
    ACCOUNTS,
    CHAIN,
    PB,
    SHARDS,
    VS,
    A,
    all_ids,
    build_chain,
    open_shards,
    qc_for,
    receipt_from,
)


@pytest.fixture(scope="module")
def receipts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    genesis, blocks, _ = build_chain()
    shards = open_shards(tmp_path_factory.mktemp("shards"), genesis)
    for s in shards:
        s.apply(blocks)
    ids = all_ids(blocks)
    good = receipt_from(shards, ids[0])
    other = receipt_from(shards, ids[1])
    for s in shards:
        s.close()
    status = Status.BAD_NONCE if good.status != Status.BAD_NONCE else Status.OK
    return {
        "genesis": genesis,
        "tx": ids[0],
        "good": good.encode(),
        "forged": dataclasses.replace(good, status=status).encode(),
        "other": other.encode(),
    }


def _replayed_chain() -> tuple[Any, list[CommittedBlock]]:
    """Blocks 1-3 in rounds 1-3: block 1 pays with A's nonces 0-2, block 2 holds a copy of
    its first row (a replay: ``BAD_NONCE``), block 3 pays with nonce 3 and certifies block 2,
    so block 2 (and block 1 below it) is proven committed."""
    base, root = genesis_state(ACCOUNTS)
    genesis = genesis_header(CHAIN, 1, root)
    pay = make_batch(A, TxKind.TRANSFER, range(4), [PB + struct.pack(">Q", 3)] * 4, CHAIN)
    parts = [pay.slice(0, 3), pay.slice(0, 1), pay.slice(3)]
    batches = {batch_digest(b): b for b in parts}
    builder = LedgerBuilder(batches, genesis, base)
    headers, writes = [], []
    parent = genesis
    for r, d in zip((1, 2, 3), batches, strict=True):
        h = builder.build(parent, r, VS.validators[r % 4].public_key, 10 + r, (d,))
        headers.append(h)
        writes.append(builder.writes_of(h.hash))
        parent = h
    blocks, parent_qc = [], QuorumCert.genesis(genesis.hash)
    for i, h in enumerate(headers):
        qc = qc_for(h)
        rows = builder.commit(h.hash, parent_qc).rows()
        parent_qc = qc
        commit = (headers[2], qc_for(headers[2], (1, 2, 3))) if h.height == 2 else None
        blocks.append(CommittedBlock(h, qc, rows, writes_batch(writes[i]), commit))
    return genesis, blocks


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The receipt of the row that counted (OK, block 1) and of its replayed copy (BAD_NONCE,
    block 2), both proven committed."""
    genesis, blocks = _replayed_chain()
    shards = open_shards(tmp_path_factory.mktemp("replayed"), genesis)
    for s in shards:
        s.apply(blocks)
    tx = bytes(tx_ids_of(blocks[0].rows)[0])
    counted = receipt_from(shards, tx)  # what an honest shard serves
    owner = shards[int(shard_of_tx_ids(np.frombuffer(tx, np.uint8), SHARDS)[0])]
    row = blocks[1].rows.slice(0, 1).to_pylist()[0] | {"height": 2, "index": 0}
    headers, commit = owner.commit_proof(2)
    proofs = shards[shard_of_height(2, SHARDS)].proofs(2, 0)
    copy = assemble_receipt(row, headers, commit, proofs, CHAIN)
    for s in shards:
        s.close()
    assert (counted.height, counted.status, copy.height, copy.status) == (
        1,
        Status.OK,
        2,
        Status.BAD_NONCE,
    )
    for r in (counted, copy):
        verify_receipt(r, VS, CHAIN, genesis.hash)
    return {"genesis": genesis, "tx": tx, "counted": counted.encode(), "copy": copy.encode()}


class _Handle:
    def __init__(self, v: int) -> None:
        self.receipt = SimpleNamespace(remote=lambda tx_id: ("asked", v))


def _client(receipts: dict[str, Any], answers: list[Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    client = Client.__new__(Client)
    client.dir = Path(".")
    client.name = "fake"
    client.genesis = SimpleNamespace(
        validators=VS,
        header=receipts["genesis"],
        chain_id=CHAIN,
        limits=SimpleNamespace(max_payload_bytes=4096),
    )
    client.n, client.shards, client.validator = len(answers), SHARDS, 0
    asked: list[int] = []

    def shard(k: int, v: int | None = None) -> _Handle:
        if answers[v or 0] == "gone":
            raise ValueError("Failed to look up actor")  # what ray.get_actor raises
        return _Handle(v or 0)

    def get(ref: tuple[str, int]) -> bytes:
        asked.append(ref[1])
        answer = answers[ref[1]]
        if isinstance(answer, BaseException):
            raise answer
        return receipts[answer] if isinstance(answer, str) else answer

    monkeypatch.setattr(client, "_shard", shard)
    monkeypatch.setattr(client_mod.ray, "get", get)
    client.asked = asked
    return client


def _task_error(cause: Exception) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("receipt", "traceback", cause)


@pytest.mark.parametrize(
    "first",
    [
        "forged",
        "other",
        b"\x01not a receipt",
        _task_error(StoreError("the rows of block 2 are damaged")),
        ray.exceptions.RayActorError(),
        "gone",
    ],
    ids=["forged", "another tx", "undecodable", "damaged store", "crashed", "gone"],
)
def test_a_bad_answer_is_passed_over_for_a_verified_receipt(
    receipts: dict[str, Any], monkeypatch: pytest.MonkeyPatch, first: Any
) -> None:
    client = _client(receipts, [first, "good", "good", "good"], monkeypatch)
    assert client.receipt(receipts["tx"]).encode() == receipts["good"]


def test_all_forged_is_a_specific_refusal_naming_the_check(
    receipts: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(receipts, ["forged", "other", b"junk", "forged"], monkeypatch)
    with pytest.raises(InvalidReceipt, match="status"):
        client.receipt(receipts["tx"])
    assert client.asked == [0, 1, 2, 3]
    client = _client(receipts, [b"junk", "gone", "gone", "gone"], monkeypatch)
    with pytest.raises(DecodeError):
        client.receipt(receipts["tx"])


def test_not_committed_is_believed_at_once_and_other_failures_surface(
    receipts: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(receipts, [_task_error(NotFound("not committed")), "good"], monkeypatch)
    with pytest.raises(NotFound):
        client.receipt(receipts["tx"])
    assert client.asked == [0]
    client = _client(receipts, [_task_error(RuntimeError("bug")), "good"], monkeypatch)
    with pytest.raises(ray.exceptions.RayTaskError):
        client.receipt(receipts["tx"])
    client = _client(receipts, ["gone", ray.exceptions.RayActorError()], monkeypatch)
    with pytest.raises(ConnectionError, match="no validator's storage shard"):
        client.receipt(receipts["tx"])
    with pytest.raises(ValueError, match="32 bytes"):
        client.receipt(b"short")


@pytest.mark.parametrize(
    ("answers", "want", "asked"),
    [
        # A Byzantine shard serves the replayed copy's receipt, or a lagging one has not the
        # row yet: the row that counted is found at the others
        (["copy", "counted", "counted", "counted"], "counted", [0, 1]),
        (["copy", "copy", _task_error(NotFound("not yet")), "counted"], "counted", [0, 1, 2, 3]),
        (["copy", b"junk", "gone", "counted"], "counted", [0, 1, 3]),
        # Only copies anywhere (the transaction never executed): the first is the answer
        (["copy", "copy", _task_error(NotFound("not yet")), "copy"], "copy", [0, 1, 2, 3]),
        (["copy", "gone", ray.exceptions.RayActorError(), "forged"], "copy", [0, 2, 3]),
    ],
    ids=["next", "last", "past junk and gone", "copies only", "copy and refusals"],
)
def test_a_receipt_of_a_row_that_did_not_execute_is_the_answer_only_where_no_other_is(
    replayed: dict[str, Any],
    receipts: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    answers: list[Any],
    want: str,
    asked: list[int],
) -> None:
    client = _client(replayed | {"forged": receipts["forged"]}, answers, monkeypatch)
    got = client.receipt(replayed["tx"])
    assert got.encode() == replayed[want] and client.asked == asked


def test_an_answer_that_is_not_bytes_is_passed_over(
    receipts: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for junk in ({"a": "dict"}, 7, None, [b"x"]):
        client = _client(receipts, [junk, "good"], monkeypatch)
        assert client.receipt(receipts["tx"]).encode() == receipts["good"]
        with pytest.raises(DecodeError, match="not bytes"):
            Receipt.decode(junk)  # type: ignore[arg-type]


def test_a_shard_whose_sibling_is_behind_or_down_says_so_and_the_client_asks_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row of a committed transaction and its block's audit paths lie with different
    shards, each written on its own: with the second behind (or down), the shard answered
    NotFound, which a client believes at once ("not committed"), though it had just seen the
    transaction committed. Now it answers NotYetAvailable, and the client asks on."""
    genesis, blocks, _ = build_chain()
    shards = open_shards(tmp_path, genesis)
    ids = all_ids(blocks)
    owner_of = {t: int(shard_of_tx_ids(np.frombuffer(t, np.uint8), SHARDS)[0]) for t in ids}
    # A transaction of block 4, whose row and whose audit paths lie with different shards
    tx = next(
        t
        for t in ids[::-1]
        if shard_of_height(4, SHARDS) != owner_of[t]
        and t in {bytes(r) for r in tx_ids_of(blocks[3].rows)}
    )
    lagging = shard_of_height(4, SHARDS)
    for k, s in enumerate(shards):
        s.apply(blocks if k != lagging else blocks[:3])
    actor = StorageShard.__new__(StorageShard)
    actor.network, actor.validator, actor.shard = "n", 0, owner_of[tx]
    actor.shards, actor.chain_id, actor.store = SHARDS, CHAIN, shards[owner_of[tx]]

    async def proofs(height: int, index: int) -> Any:
        try:
            return shards[lagging].proofs(height, index)
        except NotFound as exc:  # as Ray hands a task's error back
            raise _task_error(exc) from None

    sibling = SimpleNamespace(proofs=SimpleNamespace(remote=proofs))
    monkeypatch.setattr(shard_module.ray, "get_actor", lambda name, namespace: sibling)
    with pytest.raises(NotYetAvailable, match="committed at height 4"):
        asyncio.run(actor.receipt(tx))

    def gone(name: str, namespace: str) -> Any:
        raise ValueError(f"Failed to look up actor {name}")

    monkeypatch.setattr(shard_module.ray, "get_actor", gone)
    with pytest.raises(NotYetAvailable):
        asyncio.run(actor.receipt(tx))
    # Caught up, the receipt is whole and verifies
    shards[lagging].apply(blocks[3:])
    monkeypatch.setattr(shard_module.ray, "get_actor", lambda name, namespace: sibling)
    good = asyncio.run(actor.receipt(tx))
    verify_receipt(Receipt.decode(good), VS, CHAIN, genesis.hash)
    absent = next(
        t
        for t in (bytes([i]) * 32 for i in range(256))
        if int(shard_of_tx_ids(np.frombuffer(t, np.uint8), SHARDS)[0]) == actor.shard
    )
    with pytest.raises(NotFound):  # not committed at all: as before
        asyncio.run(actor.receipt(absent))
    for s in shards:
        s.close()
    # The client passes NotYetAvailable over for the next validator's shard
    receipts = {"genesis": genesis, "tx": tx, "good": good}
    later = _task_error(NotYetAvailable("not complete here yet"))
    client = _client(receipts, [later, "good", "good", "good"], monkeypatch)
    assert client.receipt(tx).encode() == good and client.asked == [0, 1]


def test_the_clients_locate_asks_each_shard_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard answers at most READ_MAX_KEYS ids a read: a client waiting for a large batch
    asks for its ids in parts, and every answer lands on its own row."""
    monkeypatch.setattr(partition_module, "READ_MAX_KEYS", 3)
    client = Client.__new__(Client)
    client.shards = 2
    sizes: list[int] = []

    def shard(k: int, validator: int | None = None) -> Any:
        def locate(ids: list[bytes]) -> list[int | None]:
            sizes.append(len(ids))
            return [None if t[0] % 3 == 0 else t[0] for t in ids]

        return SimpleNamespace(locate=SimpleNamespace(remote=locate))

    monkeypatch.setattr(client, "_shard", shard)
    monkeypatch.setattr(client_mod.ray, "get", lambda answer: answer)
    ids = np.array([[i] * 32 for i in range(1, 12)], np.uint8)
    assert client.locate(ids) == [None if i % 3 == 0 else i for i in range(1, 12)]
    assert max(sizes) == 3 and sum(sizes) == 11
