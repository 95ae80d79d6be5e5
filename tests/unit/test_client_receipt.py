"""The client's receipt look-up across validators, without Ray: each validator's shard answers
with a good receipt, a forged one, another transaction's, bytes that do not decode, a damaged
store, "not committed", or not at all. A verified receipt is taken from whoever serves it; a
refusal is specific; "not committed" is believed at once (the chain is the same everywhere)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from rayledger.cluster import client as client_mod
from rayledger.cluster.client import Client
from rayledger.errors import DecodeError, InvalidReceipt, NotFound, StoreError
from rayledger.execution import Status

from .test_shard import CHAIN, SHARDS, VS, all_ids, build_chain, open_shards, receipt_from


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
