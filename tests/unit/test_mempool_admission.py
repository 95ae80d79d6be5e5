"""Mempool admission without Ray: duplicates are refused within the bounded window of recent
ids, and ids older than the window are forgotten (execution then refuses the copy)."""

from __future__ import annotations

import asyncio
import json
import pickle
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from rayledger.actors import mempool as mempool_module
from rayledger.actors.mempool import Mempool
from rayledger.config import Validator, new_genesis
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.tx import TxKind, make_batch


def mempool(tmp_path: Path, **settings: object) -> Mempool:
    """A mempool outside Ray that never seals (its batch size and interval are out of reach)."""
    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(4)]
    genesis = new_genesis("m", [Validator(f"v{i}", public_bytes(k)) for i, k in enumerate(keys)], 5)
    genesis.save(tmp_path / "genesis.toml")
    network = {"batch_rows": 10**9, "batch_interval_ms": 10**9, **settings}
    (tmp_path / "network.json").write_text(json.dumps(network))
    return Mempool(str(tmp_path), 0)


def test_duplicates_refused_within_the_window_and_forgotten_after(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_seen_ids=10)
    key = key_from_seed(b"\x09" * 32)
    batch = make_batch(
        key, TxKind.ANCHOR, range(8), [bytes([i]) * 32 for i in range(8)], m.genesis.chain_id
    )
    more = make_batch(
        key,
        TxKind.ANCHOR,
        range(8, 16),
        [bytes([i]) * 32 for i in range(8, 16)],
        m.genesis.chain_id,
    )

    async def scenario() -> None:
        first = await m.submit(batch)
        assert first.accepted == 8
        again = await m.submit(batch.slice(0, 4))
        assert again.accepted == 0 and again.rejected == {"duplicate": 4}
        assert (await m.submit(more)).accepted == 8
        assert len(m.seen) == 10
        # The oldest six ids fell out of the window.
        assert (await m.submit(batch.slice(0, 6))).accepted == 6
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())


def test_nonces_out_of_order_or_below_the_committed_one_are_refused(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_seen_ids=100)
    a, b = key_from_seed(b"\x0b" * 32), key_from_seed(b"\x0c" * 32)
    chain = m.genesis.chain_id

    async def committed(senders: list[bytes]) -> dict[bytes, int]:
        # What the storage shards would answer: sender a has committed nonces 0..4
        return {public_bytes(a): 5} if public_bytes(a) in senders else {}

    m._committed_nonces = committed  # type: ignore[method-assign]

    async def scenario() -> None:
        stale = make_batch(a, TxKind.ANCHOR, [3, 5, 6], [bytes([i]) * 32 for i in range(3)], chain)
        res = await m.submit(stale)
        assert res.accepted == 2 and res.rejected == {"stale_nonce": 1}
        # Within one submission each sender's nonces must rise; a later submission may fill
        # a gap (a row refused for its signature, sent again)
        mixed = make_batch(
            [a, b, b, a], TxKind.ANCHOR, [8, 9, 8, 7], [bytes([i]) * 32 for i in range(4, 8)], chain
        )
        res = await m.submit(mixed)
        assert res.accepted == 2 and res.rejected == {"nonce_order": 2}
        gap = make_batch(a, TxKind.ANCHOR, [7], [b"g" * 32], chain)
        assert (await m.submit(gap)).accepted == 1
        assert m.pending_rows == 5
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())


def test_batches_sealed_from_a_slice_carry_only_their_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's submission that is a slice of a larger batch shares that batch's buffers;
    what the mempool seals and puts in the object store (for every validator to read) holds
    only the sealed rows."""
    import rayledger.actors.mempool as mempool_mod

    m = mempool(tmp_path, batch_rows=100)
    key = key_from_seed(b"\x0d" * 32)
    whole = make_batch(
        key,
        TxKind.ANCHOR,
        range(3000),
        [bytes([i % 256]) * 32 for i in range(3000)],
        m.genesis.chain_id,
    )
    put: list[pa.RecordBatch] = []
    monkeypatch.setattr(mempool_mod.ray, "put", lambda obj: put.append(obj) or object())

    async def scenario() -> None:
        assert (await m.submit(whole.slice(0, 300))).accepted == 300
        if m._ticker is not None:
            m._ticker.cancel()

    asyncio.run(scenario())
    assert [b.num_rows for b in put] == [100, 100, 100]
    assert pa.Table.from_batches(put).column("nonce").to_pylist() == list(range(300))
    whole_size = len(pickle.dumps(whole, protocol=5))
    for batch in put:
        assert len(pickle.dumps(batch, protocol=5)) < whole_size / 20


def test_a_kind_nobody_executes_is_refused_whole_and_counted(tmp_path: Path) -> None:
    """Principle 6: an unknown kind is refused with its reason and never stored (it used to be
    admitted, ordered and committed with status UNSUPPORTED_KIND, its nonce spent)."""
    m = mempool(tmp_path, mempool_seen_ids=100)
    key = key_from_seed(b"\x09" * 32)
    kinds = [TxKind.ANCHOR, TxKind.VOTE, TxKind.ANCHOR]
    bad = make_batch(key, kinds, range(3), [bytes([i]) * 32 for i in range(3)], m.genesis.chain_id)
    good = make_batch(
        key, TxKind.ANCHOR, range(3), [bytes([i]) * 32 for i in range(3)], m.genesis.chain_id
    )

    async def scenario() -> None:
        refused = await m.submit(bad)
        assert refused.accepted == 0 and refused.rejected == {"unknown_kind": 3}
        assert "row 1: kind 5 is not executed here" in (refused.error or "")
        assert m.pending_rows == 0 and not m.seen
        assert (await m.status())["counts"]["unknown_kind"] == 3
        assert (await m.submit(good)).accepted == 3  # nothing of it was kept: nonces 0..2 free
        if m._ticker is not None:
            m._ticker.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("thing", [None, b"rows", "rows", 5])
def test_a_submission_that_is_no_record_batch_gets_an_answer_not_an_exception(
    tmp_path: Path, thing: object
) -> None:
    m = mempool(tmp_path)

    async def scenario() -> None:
        answer = await m.submit(thing)  # type: ignore[arg-type]
        assert answer.accepted == 0 and answer.rejected == {"schema_mismatch": 1}
        assert "not " + type(thing).__name__ in (answer.error or "")
        assert m.pending_rows == 0 and m.admitting == 0
        if m._ticker is not None:
            m._ticker.cancel()

    asyncio.run(scenario())


def test_a_table_is_refused_as_no_record_batch(tmp_path: Path) -> None:
    m = mempool(tmp_path)
    key = key_from_seed(b"\x09" * 32)
    batch = make_batch(key, TxKind.ANCHOR, range(2), [b"a" * 32, b"b" * 32], m.genesis.chain_id)

    async def scenario() -> None:
        answer = await m.submit(pa.Table.from_batches([batch]))  # type: ignore[arg-type]
        assert answer.rejected == {"schema_mismatch": 1} and "not Table" in (answer.error or "")
        assert (await m.submit(batch)).accepted == 2
        if m._ticker is not None:
            m._ticker.cancel()

    asyncio.run(scenario())


def test_a_batch_over_the_row_limit_is_refused_before_any_work_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200,000-row batch over ``max_batch_rows`` was validated (hashed, copied) on the event
    loop for 1.4 s before its refusal, its rows counted as admitting meanwhile."""
    m = mempool(tmp_path)
    limit = 10
    m.genesis = replace(m.genesis, limits=replace(m.genesis.limits, max_batch_rows=limit))
    key = key_from_seed(b"\x0a" * 32)
    payloads = [bytes([i]) * 32 for i in range(limit + 1)]
    over = make_batch(key, TxKind.ANCHOR, range(limit + 1), payloads, m.genesis.chain_id)

    def validate(*args: object, **kwargs: object) -> None:
        raise AssertionError("validated before its size was checked")

    monkeypatch.setattr(mempool_module, "validate_batch", validate)
    answer = asyncio.run(m.submit(over))
    assert answer.accepted == 0 and answer.rejected == {"wrong_length": limit + 1}
    assert "batch limit" in (answer.error or "") and m.admitting == 0
