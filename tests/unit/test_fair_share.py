"""One mempool cannot crowd the others out: a leader takes each mempool's batches in turn, a
block holds at most the genesis ``max_block_txs`` rows (a larger one is refused), and a
validator checks announced batches in their mempools' turns, with a bounded queue each.

Found with a load run: a driver announcing 60 batches of 2,000 rows as mempool 3 held the
other mempools' batches back behind all of them, at every validator (their checks queued
behind the flood's, then their proposals behind its batches)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

import pyarrow as pa

from rayledger import chain as chain_module
from rayledger.actors import validator as validator_module
from rayledger.block import genesis_header
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.consensus import Broadcast, CoreConfig, Proposal
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import genesis_state
from rayledger.tx import TxKind, make_batch
from tests.unit.consensus_harness import Keyring, digest
from tests.unit.test_validator_seal import validator

CHAIN = bytes(range(32))
PROPOSER = public_bytes(key_from_seed(b"\x09" * 32))


def proposed(sources: list[tuple[str, int | None]], max_batches: int = 4) -> list[str]:
    """The batches (by label) a leader's first proposal names, given ``(label, source)`` in
    the order they became available."""
    keys = replace(
        Keyring.make(4, crypto="mac"), config=CoreConfig(max_batches_per_block=max_batches)
    )
    leader = keys.leader(1)
    core = keys.core(leader)
    names = {digest(label): label for label, _ in sources}
    for label, source in sources:
        core.on_batch_available(digest(label), source)
    proposals = [a.message for a in core.start() if isinstance(a, Broadcast)]
    assert len(proposals) == 1 and isinstance(proposals[0], Proposal)
    return [names[d] for d in proposals[0].block.batch_digests]


def test_a_leader_takes_each_mempools_batches_in_turn() -> None:
    # Mempool 3 announced six batches before mempools 0 and 1 announced theirs
    flood = [(f"m3-{k}", 3) for k in range(6)]
    others = [("m0-0", 0), ("m0-1", 0), ("m1-0", 1)]
    assert proposed(flood + others) == ["m3-0", "m0-0", "m1-0", "m3-1"]
    assert proposed(flood + others, max_batches=8) == [
        "m3-0", "m0-0", "m1-0", "m3-1", "m0-1", "m3-2", "m3-3", "m3-4",
    ]  # fmt: skip
    # A batch whose source is not known (fetched for a peer's proposal) is a source of its own
    assert proposed(flood + [("fetched", None)]) == ["m3-0", "fetched", "m3-1", "m3-2"]


def test_one_source_or_none_keeps_the_arrival_order() -> None:
    flood = [(f"m3-{k}", 3) for k in range(6)]
    assert proposed(flood) == ["m3-0", "m3-1", "m3-2", "m3-3"]
    assert proposed([(f"b{k}", None) for k in range(6)]) == ["b0", "b1", "b2", "b3"]


def anchors(seed: int, rows: int) -> pa.RecordBatch:
    key = key_from_seed(bytes([seed]) * 32)
    return make_batch(key, TxKind.ANCHOR, range(rows), [os.urandom(32) for _ in range(rows)], CHAIN)


def test_a_block_holds_at_most_max_block_txs_rows_and_a_larger_one_is_refused() -> None:
    ten, twenty, five = anchors(1, 10), anchors(2, 20), anchors(3, 5)
    held = {batch_digest(b): b for b in (ten, twenty, five)}
    d10, d20, d5 = held
    base, root = genesis_state([])
    genesis = genesis_header(CHAIN, 1, root)
    limited = LedgerBuilder(held, genesis, base, max_txs=25)
    # The 20-row batch would take the block to 30 rows: it waits, the 5-row one after it goes
    header = limited.build(genesis, 1, PROPOSER, 2, (d10, d20, d5))
    assert header.batch_digests == (d10, d5) and header.tx_count == 15
    assert limited.check(header, genesis) is None
    # Exactly at the limit is allowed
    assert limited.build(genesis, 1, PROPOSER, 2, (d20, d5)).tx_count == 25
    # A leader without the limit (Byzantine, or another configuration) proposes all 35 rows
    unlimited = LedgerBuilder(held, genesis, base)
    over = unlimited.build(genesis, 1, PROPOSER, 2, (d10, d20, d5))
    assert over.tx_count == 35
    assert limited.check(over, genesis) == "35 rows exceed the block limit of 25"


def test_a_block_holds_at_most_max_block_payload_bytes_and_a_larger_one_is_refused(
    monkeypatch: Any,
) -> None:
    """Past Arrow's 2 GiB a block body combined into chunks, and the body read as its first
    chunk dropped the others' rows (never executed, their batches counted as ordered)."""
    ten, twenty, five = anchors(1, 10), anchors(2, 20), anchors(3, 5)  # 32-byte payloads
    held = {batch_digest(b): b for b in (ten, twenty, five)}
    d10, d20, d5 = held
    base, root = genesis_state([])
    genesis = genesis_header(CHAIN, 1, root)
    over = LedgerBuilder(held, genesis, base).build(genesis, 1, PROPOSER, 2, (d10, d20, d5))
    assert over.tx_count == 35
    monkeypatch.setattr(chain_module, "MAX_BLOCK_PAYLOAD_BYTES", 25 * 32)
    limited = LedgerBuilder(held, genesis, base)
    header = limited.build(genesis, 1, PROPOSER, 2, (d10, d20, d5))
    assert header.batch_digests == (d10, d5) and header.tx_count == 15
    assert limited.check(header, genesis) is None
    assert limited.check(over, genesis) == "1120 payload bytes exceed the block limit of 800"


Announced = tuple[bytes, int, pa.RecordBatch, bool]  # digest, mempool, batch, by reference


def run_checks(v: Any, announced: list[Announced]) -> list[bytes]:
    """Announce each at once (on a stream, or by reference); each check takes a few ms. The
    digests in the order their checks started."""
    started: list[bytes] = []

    async def check(digest: bytes, refs: Any, origin: Any, tag: Any, body: Any) -> None:
        assert body is not None  # fetched before the check where it came by reference
        started.append(digest)
        await asyncio.sleep(0.005)
        return None

    v._check_announced = check

    async def fetch(batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch

    async def run() -> None:
        tasks = [
            asyncio.ensure_future(
                v.batch_ready(d, [fetch(b)], (m, seq), None)
                if by_ref
                else v.batch_ready(d, [], (m, seq), None, body=b)
            )
            for seq, (d, m, b, by_ref) in enumerate(announced, start=1)
        ]
        await asyncio.gather(*tasks)

    asyncio.run(run())
    return started


def batches_of(mempool: int, count: int, rows: int, by_ref: bool = False) -> list[Announced]:
    body = anchors(mempool + 1, rows)
    return [(digest(f"m{mempool}-{rows}-{k}"), mempool, body, by_ref) for k in range(count)]


def ids(announced: list[Announced]) -> list[bytes]:
    return [d for d, _, _, _ in announced]


def test_announced_batches_are_checked_fairly_by_rows_across_mempools() -> None:
    v, _, _ = validator()
    v.checks_at_once = 1
    for by_ref in (False, True):
        flood = batches_of(3, 5, 20, by_ref)  # five batches of 20 rows
        honest = batches_of(1, 4, 2, by_ref)  # then four of 2 rows from another mempool
        started = run_checks(v, flood + honest)
        # First come, first served, the honest batches waited for every one of the flood's;
        # fair by rows, all four go before the flood's second (8 rows checked against 20)
        assert started == ids(flood[:1] + honest + flood[1:])
        assert v._checks_running == 0 and v._intake == {} and v._intake_rows == {}
        assert v._intake_bytes == {}
    # Back after a pause (the first round), mempool 1 started level with mempool 3 (100 rows
    # checked then), without credit for the time it sent nothing: 8 rows more since
    assert v._served == {3: 200, 1: 108}
    flood, honest = batches_of(3, 3, 20), batches_of(1, 3, 20)
    assert run_checks(v, flood + honest) == ids(
        [flood[0], honest[0], flood[1], honest[1], flood[2], honest[2]]
    )


def test_a_mempool_with_too_many_batches_waiting_has_the_next_dropped_and_counted() -> None:
    v, _, _ = validator()
    v.checks_at_once, v.intake_batches = 1, 2
    flood, other = batches_of(3, 5, 1), batches_of(1, 1, 1)
    started = run_checks(v, flood + other)
    # The first runs, two wait, the last two are dropped; mempool 1's is not held back by them
    assert started == ids(flood[:1] + other + flood[1:3])
    assert v.rejected == {"batch: intake full": 2}
    # The dropped batches took their turn: mempool 3's order goes on past them
    assert v.origin_next[3] == 6 and v.origin_waiting[3] == {}


def test_a_batch_of_no_rows_is_refused_before_it_queues() -> None:
    """Charged nothing by rows, a flood of empty batches kept its mempool first in line for
    good: another mempool's batches waited behind all of it."""
    for by_ref in (False, True):
        v, _, _ = validator()
        v.checks_at_once = 1
        flood, honest = batches_of(3, 200, 0, by_ref), batches_of(1, 4, 2, by_ref)
        assert run_checks(v, flood + honest) == ids(honest)
        assert v.rejected == {"batch: empty": 200} and v._served == {1: 8}
        # Each took its turn: mempool 3's order goes on past them
        assert v.origin_next[3] == 201 and v.origin_waiting[3] == {}


def test_the_rows_waiting_are_bounded_per_mempool_too() -> None:
    v, _, _ = validator()
    v.checks_at_once, v.intake_rows = 1, 10
    # Each frame brings 4 rows: two fit while waiting, a third does not
    flood, other = batches_of(3, 4, 4), batches_of(0, 1, 4)
    started = run_checks(v, flood + other)
    assert started == ids(flood[:1] + other + flood[1:3])
    assert v.rejected == {"batch: intake full": 1}


def test_the_bytes_waiting_are_bounded_per_mempool_too() -> None:
    """Rows of 64 KiB made the row bound alone 16 GB held for one mempool's batches."""
    v, _, _ = validator()
    flood, other = batches_of(3, 4, 4), batches_of(0, 1, 4)
    v.checks_at_once, v.intake_bytes = 1, 2 * flood[1][2].nbytes + 1
    started = run_checks(v, flood + other)
    assert started == ids(flood[:1] + other + flood[1:3])
    assert v.rejected == {"batch: intake full": 1}
    assert v._intake_bytes == {} and v._intake_rows == {}


def test_a_reference_that_never_resolves_holds_no_check_back(monkeypatch: Any) -> None:
    """Announced by reference, a batch is fetched before it waits for its turn: a reference
    that never resolves (a Byzantine announcer's) costs its own task until the fetch times
    out, and the other mempools' checks go on meanwhile."""
    from rayledger.actors import validator as validator_module

    monkeypatch.setattr(validator_module, "FETCH_TIMEOUT_S", 0.2)
    v, _, _ = validator()
    v.checks_at_once = 1
    started: list[bytes] = []

    async def check(digest: bytes, refs: Any, origin: Any, tag: Any, body: Any) -> None:
        started.append(digest)

    v._check_announced = check
    honest = batches_of(1, 3, 2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        hung = [
            asyncio.ensure_future(
                v.batch_ready(digest(f"hung-{k}"), [loop.create_future()], (3, k + 1), None)
            )
            for k in range(2)
        ]
        await asyncio.sleep(0)
        for seq, (d, m, b, _) in enumerate(honest, start=1):
            await v.batch_ready(d, [], (m, seq), None, body=b)
        # Checked while the two fetches still hang
        assert started == ids(honest) and not any(t.done() for t in hung)
        await asyncio.gather(*hung)

    asyncio.run(run())
    assert v.rejected == {"batch: unreadable": 2} and v._checks_running == 0


class FakePeer:
    """A peer serving ``get_batch`` from what it holds, recording what it was asked."""

    def __init__(self, held: dict[bytes, pa.RecordBatch]) -> None:
        self.asked: list[bytes] = []

        async def get_batch(digest: bytes) -> pa.RecordBatch | None:
            self.asked.append(digest)
            return held.get(digest)

        self.get_batch = type("Method", (), {"remote": staticmethod(get_batch)})


def fetching_validator() -> tuple[Any, list[bytes]]:
    v, _, _ = validator()
    v.checks_at_once = 1
    held: list[bytes] = []

    def hold(digest: bytes, batch: pa.RecordBatch, mempool: int | None = None) -> None:
        held.append(digest)
        v.batches[digest] = batch

    v._hold = hold
    return v, held


def test_a_batch_a_proposal_names_is_checked_ahead_of_its_turn_not_fetched_again() -> None:
    """A proposal names a batch whose announced copy waits its turn here: its check starts at
    once, and the proposal's fetch waits for it instead of fetching and checking it again."""
    v, held = fetching_validator()
    slow, named = batches_of(3, 1, 4), batches_of(1, 1, 4)
    peer = FakePeer({})
    v.peers = {0: peer}
    release = asyncio.Event()
    started: list[bytes] = []

    async def check(digest: bytes, refs: Any, origin: Any, tag: Any, body: Any) -> Any:
        started.append(digest)
        if digest == slow[0][0]:
            await release.wait()
        return body

    v._check_announced = check

    async def run() -> None:
        first = asyncio.ensure_future(v.batch_ready(slow[0][0], [], (3, 1), None, body=slow[0][2]))
        second = asyncio.ensure_future(
            v.batch_ready(named[0][0], [], (1, 1), None, body=named[0][2])
        )
        await asyncio.sleep(0.01)
        assert started == [slow[0][0]]  # one check at a time: the named batch waits its turn
        await asyncio.wait_for(v._fetch((named[0][0],), 0), 1.0)
        assert held == [named[0][0]] and peer.asked == [] and not first.done()
        release.set()
        await asyncio.gather(first, second)

    asyncio.run(run())
    assert started == [slow[0][0], named[0][0]] and held == [named[0][0], slow[0][0]]
    assert v.rejected == {"batch: checked ahead of its turn": 1} and v._checks_running == 0
    assert v._turns == {} and v._checks_done == {}


def test_a_named_batch_whose_announced_copy_is_refused_comes_from_a_peer() -> None:
    from tests.unit.test_validator_seal import batches as sound_and_forged
    from tests.unit.test_validator_seal import digest_of

    v, held = fetching_validator()
    good, bad = sound_and_forged()
    d = digest_of(good)  # the digest covers the ids, not the signatures
    peer = FakePeer({d: good})
    v.peers = {0: peer}
    check = v._check_announced

    async def slow_check(*args: Any) -> Any:
        await asyncio.sleep(0.02)
        return await check(*args)

    v._check_announced = slow_check

    async def run() -> None:
        announced = asyncio.ensure_future(v.batch_ready(d, [], (3, 1), None, body=bad))
        await asyncio.sleep(0.005)
        assert d in v._checks_done  # under check: the fetch waits for it, then asks a peer
        await v._fetch((d,), 0)
        assert announced.done()

    asyncio.run(run())
    assert v.rejected == {"batch: invalid_signature": 1, "batch: fetched for a proposal": 1}
    assert peer.asked == [d] and held == [d] and v.fetched_rows == good.num_rows


def test_a_peer_that_never_answers_is_passed_over_and_one_batch_is_fetched_once(
    monkeypatch: Any,
) -> None:
    """A proposer whose ``get_batch`` never returned held every fetch from it for good (the
    honest peers were never asked); and two proposals naming one batch (proposed again after
    a timeout) fetched it twice side by side."""
    from tests.unit.test_validator_seal import batches as sound_and_forged
    from tests.unit.test_validator_seal import digest_of

    monkeypatch.setattr(validator_module, "GET_BATCH_TIMEOUT_S", 0.05)
    v, held = fetching_validator()
    good, _ = sound_and_forged()
    d = digest_of(good)
    silent, honest = FakePeer({}), FakePeer({d: good})

    async def never(digest: bytes) -> None:
        silent.asked.append(digest)
        await asyncio.Event().wait()

    silent.get_batch = type("Method", (), {"remote": staticmethod(never)})
    v.peers = {1: silent, 3: honest}

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(v._fetch((d,), 1), v._fetch((d,), 1)), 5)

    asyncio.run(run())
    assert silent.asked == [d] and honest.asked == [d] and held == [d]
    assert v._fetching == {}


def test_a_named_batch_waiting_for_its_mempools_earlier_one_is_held_once() -> None:
    """Checked, a batch waits for its mempool's earlier batch; a proposal names it: it is held
    at once, and not held a second time when the earlier batch comes (by then it may have
    committed and left the held batches: held again, it would stay in memory for good)."""
    v, held = fetching_validator()
    first, second = batches_of(1, 2, 4)
    peer = FakePeer({})
    v.peers = {0: peer}

    async def check(digest: bytes, refs: Any, origin: Any, tag: Any, body: Any) -> Any:
        await asyncio.sleep(0.01)
        return body

    v._check_announced = check

    async def run() -> None:
        v.origin_next[1] = 1  # the mempool's first batch is still on its way
        announced = asyncio.ensure_future(
            v.batch_ready(second[0], [], (1, 2), None, body=second[2])
        )
        await asyncio.sleep(0.001)
        await v._fetch((second[0],), 0)  # waits for its check, then holds it out of turn
        assert announced.done() and held == [second[0]] and peer.asked == []
        del v.batches[second[0]]  # committed since
        await v.batch_ready(first[0], [], (1, 1), None, body=first[2])

    asyncio.run(run())
    assert held == [second[0], first[0]] and v.origin_next[1] == 3
