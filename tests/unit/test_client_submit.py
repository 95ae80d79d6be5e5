"""`Client.submit` without Ray: chunks go out in buffers of their own, one sender's rows to one
mempool in order, and a chunk answered busy is offered again by reference."""

from __future__ import annotations

import itertools
import pickle
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

import rayledger.cluster.client as client_mod
from rayledger.cluster.client import Client, SubmitError
from rayledger.crypto import key_from_seed
from rayledger.tx import TxKind, make_batch

CHAIN = b"\x06" * 32


class FakeMempool:
    """Answers busy ``busy`` times to each offer, then admits; records what it was sent."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.sent: list[Any] = []
        self.submit = SimpleNamespace(remote=self._submit)

    def _submit(self, offer: Any) -> Any:
        self.sent.append(offer)
        if self.busy:
            self.busy -= 1
            return SimpleNamespace(busy=True, retry_after_ms=1)
        batch = offer.value if isinstance(offer, Ref) else offer
        return SimpleNamespace(busy=False, error=None, accepted=batch.num_rows, rejected={})


class Ref:
    def __init__(self, value: Any) -> None:
        self.value = value


def client(monkeypatch: pytest.MonkeyPatch, mempool: FakeMempool) -> tuple[Client, list[Any]]:
    c = Client.__new__(Client)
    c.name, c.n = "t", 4
    c._next_mempool = itertools.cycle(range(4))
    c._actor = lambda role: mempool  # type: ignore[method-assign]
    puts: list[Any] = []

    def put(value: Any) -> Ref:
        puts.append(value)
        return Ref(value)

    def get(answer: Any) -> Any:
        if isinstance(answer, BaseException):  # the call failed: ray.get raises
            raise answer
        return answer

    monkeypatch.setattr(client_mod.ray, "get", get)
    monkeypatch.setattr(client_mod.ray, "put", put)
    return c, puts


def batch(rows: int) -> pa.RecordBatch:
    key = key_from_seed(b"\x31" * 32)
    return make_batch(
        key, TxKind.ANCHOR, range(rows), [bytes([i % 256]) * 32 for i in range(rows)], CHAIN
    )


def test_chunks_are_sent_in_buffers_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    mempool = FakeMempool(busy=0)
    c, puts = client(monkeypatch, mempool)
    whole = batch(4000)
    out = c.submit(whole, mempool=1, chunk_rows=500)
    assert out.accepted == 4000 and out.busy_retries == 0 and puts == []
    assert [b.num_rows for b in mempool.sent] == [500] * 8
    assert pa.Table.from_batches(mempool.sent).column("nonce").to_pylist() == list(range(4000))
    size = len(pickle.dumps(whole, protocol=5))
    assert all(len(pickle.dumps(b, protocol=5)) * 5 < size for b in mempool.sent)


def test_a_busy_chunk_is_put_once_and_offered_again_by_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mempool = FakeMempool(busy=3)
    c, puts = client(monkeypatch, mempool)
    out = c.submit(batch(300), mempool=0, chunk_rows=300)
    assert out.accepted == 300 and out.busy_retries == 3
    assert len(puts) == 1 and puts[0].num_rows == 300
    # The first offer by value, the three after it by the one reference
    assert isinstance(mempool.sent[0], pa.RecordBatch)
    assert all(offer is mempool.sent[1] for offer in mempool.sent[1:])
    assert len(mempool.sent) == 4 and isinstance(mempool.sent[1], Ref)


def test_a_mempool_busy_past_the_timeout_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    mempool = FakeMempool(busy=10**9)
    c, _ = client(monkeypatch, mempool)
    with pytest.raises(SubmitError, match="stayed busy"):
        c.submit(batch(10), mempool=0, busy_timeout_s=0.05)


class CrashingMempool(FakeMempool):
    """Dies ``crashes`` times before answering (the first after accepting part of the chunk,
    as a process that journaled rows and died before its answer), then answers; the rows it
    had accepted come back as duplicates, as a restarted mempool holding them answers."""

    def __init__(self, crashes: int) -> None:
        super().__init__(busy=0)
        self.crashes = crashes
        self.held = 0

    def _submit(self, offer: Any) -> Any:
        self.sent.append(offer)
        if self.crashes:
            self.crashes -= 1
            self.held = 40
            return client_mod.ray.exceptions.ActorDiedError()
        batch = offer.value if isinstance(offer, Ref) else offer
        fresh = batch.num_rows - self.held
        return SimpleNamespace(
            busy=False, error=None, accepted=fresh, rejected={"duplicate": self.held}
        )


def test_a_chunk_whose_mempool_died_before_answering_is_offered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod.time, "sleep", lambda s: None)
    mempool = CrashingMempool(crashes=2)
    c, _ = client(monkeypatch, mempool)
    out = c.submit(batch(100), mempool=2, chunk_rows=100)
    assert out.crash_retries == 2 and len(mempool.sent) == 3
    assert all(sent.equals(mempool.sent[0]) for sent in mempool.sent)
    assert out.accepted == 60 and out.rejected == {"duplicate": 40}


def test_a_mempool_that_stays_down_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    mempool = CrashingMempool(crashes=10**9)
    c, _ = client(monkeypatch, mempool)
    with pytest.raises(SubmitError, match="did not come back"):
        c.submit(batch(10), mempool=0, busy_timeout_s=0.3)
