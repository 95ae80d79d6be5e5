"""A mempool announces its sealed batches on its streams to the validators, and by Ray call to
a validator with no stream up (no Ray here: the calls and the object store are stand-ins)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rayledger.actors import mempool as mempool_module
from rayledger.actors.mempool import decode_batch_frame, seal_tag
from rayledger.actors.streams import StreamServer
from rayledger.chain import batch_digest
from rayledger.crypto import key_from_seed
from rayledger.tx import TxKind, make_batch
from tests.unit.test_mempool_admission import mempool
from tests.unit.test_validator_seal import Method

N = 4


class RayValidator:
    """A validator handle: what was announced to it by Ray call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.batch_ready = SimpleNamespace(remote=lambda *a: self.calls.append(a))


def test_sealed_batches_go_on_streams_and_by_ray_where_none_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mempool_module.ray, "put", lambda batch: ("ref", batch.num_rows))
    m = mempool(tmp_path, batch_rows=4)
    key = key_from_seed(b"\x0d" * 32)
    rows = make_batch(
        key, TxKind.ANCHOR, range(12), [bytes([i]) * 32 for i in range(12)], m.genesis.chain_id
    )
    seal_key = b"\x5a" * 32

    async def scenario() -> None:
        frames: list[list[tuple[int, bytes]]] = [[], []]
        counts: dict[str, int] = {}

        def taker(i: int) -> Any:
            return lambda sender, payload, hold: frames[i].append((sender, payload))

        # Validator 0 (this mempool's own, which gives it a seal key) and validator 1 take
        # streams; validator 2 gave no endpoint; validator 3's endpoint is malformed
        servers = [StreamServer(i, N, taker(i), counts.setdefault, N) for i in range(2)]
        for s in servers:
            await s.start("127.0.0.1")
        # Each with this mempool's own token (sender n + its index)
        endpoints = [s.endpoint_for(N + m.index) for s in servers]
        handles = [RayValidator() for _ in range(N)]
        await m.set_validator(0, handles[0], seal_key, endpoints[0])
        await m.set_validator(1, handles[1], None, endpoints[1])
        await m.set_validator(2, handles[2])
        await m.set_validator(3, handles[3], None, ("host", 0, b"short"))
        assert m.stream_events == {"stream: bad_endpoint": 1} and sorted(m.streams) == [0, 1]
        for _ in range(50):  # the streams connect when the validator is set, not on first use
            if all(st.connected for st in m.streams.values()):
                break
            await asyncio.sleep(0.02)
        assert (await m.submit(rows)).accepted == 12  # three batches of 4 rows, sealed
        for _ in range(100):
            if sum(map(len, frames)) == 6:
                break
            await asyncio.sleep(0.02)
        sealed = [rows.slice(i, 4) for i in (0, 4, 8)]
        digests = [batch_digest(b) for b in sealed]
        # Each of validators 0 and 1 got each batch on its stream, once, in order, from
        # sender N + 0 (mempool 0); only this institution's validator gets the seal tag
        for i in (0, 1):
            assert [s for s, _ in frames[i]] == [N] * 3
            got = [decode_batch_frame(p) for _, p in frames[i]]
            assert [(d, seq) for d, seq, _, _ in got] == [(d, k + 1) for k, d in enumerate(digests)]
            for (digest, _, tag, batch), b in zip(got, sealed, strict=True):
                assert batch.num_rows == 4 and batch.column("tx_id").equals(b.column("tx_id"))
                assert tag == (seal_tag(seal_key, digest, batch) if i == 0 else None)
        # Validator 2 (no stream) got the digests and references by Ray call; the call with
        # validator 3's malformed endpoint changed nothing (the mempool does not know it)
        announced = [(c[0], c[2]) for c in handles[2].calls]
        assert announced == [(d, (0, k + 1)) for k, d in enumerate(digests)]
        assert all(c[1] == [("ref", 4)] and c[3] is None for c in handles[2].calls)
        assert handles[0].calls == handles[1].calls == handles[3].calls == []
        assert sorted(m.validators) == [0, 1, 2]
        st = (await m.status())["streams"]
        assert st["connected"] == [0, 1] and st["frames_out"] == 6 and st["ray_sends"] == 3
        # Validator 1 goes away: the next batch goes to it by Ray call, the rest as before
        servers[1].close()
        for _ in range(100):
            if not m.streams[1].connected:
                break
            await asyncio.sleep(0.02)
        await m.on_commit(digests)  # room for more
        more = make_batch(key, TxKind.ANCHOR, range(12, 16), [b"\x77" * 32] * 4, m.genesis.chain_id)
        assert (await m.submit(more)).accepted == 4
        assert [c[2] for c in handles[1].calls] == [(0, 4)]
        assert (await m.status())["streams"]["ray_sends"] == 5
        # Set again with the same endpoint (its validator re-keys it): the same stream goes on
        kept = m.streams[0]
        await m.set_validator(0, handles[0], seal_key, endpoints[0])
        assert m.streams[0] is kept and kept.connected
        # A validator set again without an endpoint is reached by Ray only from then on
        await m.set_validator(0, handles[0], seal_key)
        assert sorted(m.streams) == [1]
        servers[0].close()
        for st_ in m.streams.values():
            st_.close()
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 30))


class Ref:
    """An object-store reference stand-in: awaiting it gives the batch."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return self.batch


class RayValidatorKw(RayValidator):
    """A validator handle whose calls keep their keyword arguments too."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_ready = SimpleNamespace(remote=lambda *a, **kw: self.calls.append((*a, kw)))


def test_a_validator_that_restarted_or_healed_is_sent_every_batch_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validator (re)started with nothing in memory, or cut off from this mempool by a
    partition that healed, missed batches announced before: the mempool sends it every batch
    in flight, oldest first, by reference, as sent again (outside the sealing order), with the
    seal tag where the validator gave a key; batches committed since are not sent."""
    monkeypatch.setattr(mempool_module.ray, "put", Ref)
    m = mempool(tmp_path, batch_rows=4)
    key = key_from_seed(b"\x0e" * 32)
    rows = make_batch(
        key, TxKind.ANCHOR, range(16), [bytes([i]) * 32 for i in range(16)], m.genesis.chain_id
    )
    sealed = [rows.slice(i, 4) for i in (0, 4, 8, 12)]
    digests = [batch_digest(b) for b in sealed]
    seal_key = b"\x5b" * 32

    async def drain() -> None:
        while m._held_tasks:
            await asyncio.gather(*m._held_tasks)

    async def scenario() -> None:
        first = [RayValidatorKw() for _ in range(2)]
        await m.set_validator(0, first[0], seal_key)
        await m.set_validator(1, first[1])
        assert (await m.submit(rows)).accepted == 16  # four batches of 4 rows
        assert [c[0] for c in first[1].calls] == digests
        await m.on_commit([digests[1]])  # committed: no longer in flight
        # Set without ``held`` (a validator re-keying this mempool): nothing sent again
        await m.set_validator(1, first[1])
        await drain()
        assert len(first[1].calls) == 4
        # Validator 1 restarts: its new handle gets the three batches still in flight, in
        # sealing order, as sent again by mempool 0, untagged (it gave no key)
        again = RayValidatorKw()
        await m.set_validator(1, again, held=True)
        await drain()
        assert [c[0] for c in again.calls] == [digests[0], digests[2], digests[3]]
        for c, i in zip(again.calls, (0, 2, 3), strict=True):
            assert c[1][0].batch.equals(sealed[i]) and c[2] is None and c[3] is None
            assert c[4] == {"resent_by": 0}
        # This institution's validator restarts with a new key: the tags are under it
        own, new_key = RayValidatorKw(), b"\x5c" * 32
        await m.set_validator(0, own, new_key, held=True)
        await drain()
        assert [c[3] for c in own.calls] == [
            seal_tag(new_key, digests[i], sealed[i]) for i in (0, 2, 3)
        ]
        # A partition healed: asked for them again, on the handle it holds
        await m.announce_held(1)
        await drain()
        assert [c[0] for c in again.calls[3:]] == [digests[0], digests[2], digests[3]]
        assert m.counts["announced_held"] == 9
        # A validator not known here, or nothing in flight: nothing sent
        await m.announce_held(3)
        await m.on_commit([digests[0], digests[2], digests[3]])
        await m.announce_held(1)
        await drain()
        assert len(again.calls) == 6 and m.counts["announced_held"] == 9
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_mempool_asks_again_for_the_handles_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted mempool asks every validator for its handle, but an answer can be lost
    (the validator's call went to the process that had just died): it asks those it still
    lacks again, every ``ASK_VALIDATORS_S``, and stops once it holds them all. One that is
    down (no such actor) is skipped. Without this its batches went to nobody for good."""
    monkeypatch.setattr(mempool_module, "ASK_VALIDATORS_S", 0.05)
    asked: list[tuple[int, int]] = []  # (validator, the mempool it was asked for)

    def get_actor(name: str, namespace: str) -> Any:
        index = int(name.rsplit("-", 1)[1])
        if index == 3:
            raise ValueError(f"no actor {name}")  # down
        return SimpleNamespace(mempool_back=Method(lambda m: asked.append((index, m))))

    monkeypatch.setattr(mempool_module.ray, "get_actor", get_actor)
    m = mempool(tmp_path, batch_interval_ms=10)
    m.index = 2

    async def scenario() -> None:
        await m.set_validator(0, RayValidator())  # the only answer that came
        await asyncio.sleep(0.3)
        assert {v for v, _ in asked} == {1, 2} and {i for _, i in asked} == {2}
        assert len(asked) >= 4  # asked again, not once
        assert m.counts["validators_asked"] >= 2 * 3  # 1, 2 and 3 each time
        for i in (1, 2, 3):
            await m.set_validator(i, RayValidator())
        await asyncio.sleep(0.1)  # an ask under way when the last came may still finish
        before = len(asked)
        await asyncio.sleep(0.3)
        assert len(asked) == before and (await m.status())["validators"] == [0, 1, 2, 3]

    asyncio.run(scenario())
