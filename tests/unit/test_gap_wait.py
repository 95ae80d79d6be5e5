"""A leader puts a batch whose rows would fail for want of a sender's earlier nonces after the
block's other batches, and leaves it out while it may wait (``LedgerBuilder.build``'s
``may_wait``, ``CoreConfig.gap_wait_ms``).

Found by a chaos run: a partition dropped one of a mempool's batches at three validators;
after the heal those three proposed the mempool's next batch first, its rows failed
``BAD_NONCE`` (a gap), the dropped batch committed after it, and every later transaction of
that sender failed too (40,600 of them in that run). In the next run a leader held both
batches, the later one first.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pyarrow as pa

from rayledger.block import genesis_header
from rayledger.chain import LedgerBuilder, batch_digest, gap_rows
from rayledger.consensus import Core, CoreConfig, DigestBuilder
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import Account, Status, execute_block, genesis_state
from rayledger.tx import TxKind, make_batch
from tests.unit.consensus_harness import Keyring, digest

CHAIN = bytes(range(32))
A, B = key_from_seed(b"\x01" * 32), key_from_seed(b"\x02" * 32)
PROPOSER = public_bytes(key_from_seed(b"\x09" * 32))
OK, BAD = int(Status.OK), int(Status.BAD_NONCE)


def anchors(key: object, nonces: range | list[int]) -> pa.RecordBatch:
    return make_batch(key, TxKind.ANCHOR, nonces, [os.urandom(32) for _ in nonces], CHAIN)


def mixed(*parts: pa.RecordBatch) -> pa.RecordBatch:
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def builder(*batches: pa.RecordBatch) -> tuple[LedgerBuilder, object, list[bytes]]:
    base, root = genesis_state([Account(public_bytes(A), 1000)])
    genesis = genesis_header(CHAIN, 1, root)
    held = {batch_digest(b): b for b in batches}
    return LedgerBuilder(held, genesis, base), genesis, [batch_digest(b) for b in batches]


def statuses(lb: LedgerBuilder, header: object) -> list[int]:
    return lb._bodies[header.hash][1].column("status").to_pylist()  # type: ignore[attr-defined]


def test_gap_rows_are_nonces_ahead_not_behind() -> None:
    base, _ = genesis_state([])
    # A: 0, 2 (ahead: its 1 is missing), 0 again (behind: a replay); B: 3 (ahead of 0)
    body = mixed(anchors(A, [0]), anchors(A, [2]), anchors(A, [0]), anchors(B, [3]))
    _, results, _ = execute_block(base.child(), body, 1, bytes(32))
    assert results.column("status").to_pylist() == [OK, BAD, BAD, BAD]
    assert gap_rows(base, body, results).tolist() == [1, 3]
    # Nothing failed: nothing to look at
    fine = anchors(A, range(3))
    _, results, _ = execute_block(base.child(), fine, 1, bytes(32))
    assert gap_rows(base, fine, results).tolist() == []


def test_a_batch_ahead_of_its_senders_nonces_waits_then_goes_in() -> None:
    early, late = anchors(A, range(0, 10)), anchors(A, range(10, 20))
    lb, genesis, (d_early, d_late) = builder(early, late)
    # Only the later batch is here: it waits while the leader may wait
    asked: list[bytes] = []

    def may_wait(d: bytes) -> bool:
        asked.append(d)
        return True

    header = lb.build(genesis, 1, PROPOSER, 2, (d_late,), may_wait)
    assert header.batch_digests == () and header.tx_count == 0
    assert asked == [d_late] and lb.deferred == 1
    # Once the wait is over it goes in, and fails as before
    header = lb.build(genesis, 1, PROPOSER, 2, (d_late,), lambda d: False)
    assert header.batch_digests == (d_late,) and statuses(lb, header) == [BAD] * 10
    assert lb.gap_rows_proposed == 10
    # Both here, in order: nothing waits and nothing fails
    header = lb.build(genesis, 1, PROPOSER, 2, (d_early, d_late), may_wait)
    assert header.batch_digests == (d_early, d_late) and statuses(lb, header) == [OK] * 20
    assert lb.deferred == 1
    # A voter executes the digests the header names, with no wait of its own
    voter, _, _ = builder(early, late)
    assert voter.check(header, genesis) is None


def test_leaving_a_batch_out_can_make_a_later_one_wait_too() -> None:
    # P holds A's rows 10-19 (ahead: A's 0-9 are missing) and B's 0-4; Q holds B's 5-9.
    # P waits, so Q is ahead of B's nonces in turn and waits as well; R, B-free, goes in.
    p = mixed(anchors(A, range(10, 20)), anchors(B, range(0, 5)))
    q, r = anchors(B, range(5, 10)), anchors(key_from_seed(b"\x03" * 32), range(0, 3))
    lb, genesis, digests = builder(p, q, r)
    header = lb.build(genesis, 1, PROPOSER, 2, tuple(digests), lambda d: True)
    assert header.batch_digests == (digests[2],) and statuses(lb, header) == [OK] * 3
    assert lb.deferred == 2
    # Where only P may still wait, Q goes in without it (last) and its rows fail: the wait
    # is the leader's per batch
    header = lb.build(genesis, 1, PROPOSER, 2, tuple(digests), lambda d: d == digests[0])
    assert header.batch_digests == (digests[2], digests[1])
    assert statuses(lb, header) == [OK] * 3 + [BAD] * 5


def test_a_batch_ahead_of_one_in_the_same_block_goes_after_it() -> None:
    # Batches can become available out of order (the earlier one fetched late, after a
    # partition): the later one moves behind it, waiting or not, and nothing fails
    early, late = anchors(A, range(0, 10)), anchors(A, range(10, 20))
    other = anchors(B, range(0, 4))
    for may_wait in (lambda d: True, lambda d: False):
        lb, genesis, (d_early, d_late, d_other) = builder(early, late, other)
        header = lb.build(genesis, 1, PROPOSER, 2, (d_late, d_other, d_early), may_wait)
        assert header.batch_digests == (d_other, d_early, d_late)
        assert statuses(lb, header) == [OK] * 24 and lb.deferred == 0


class _Recorder(DigestBuilder):
    def __init__(self) -> None:
        self.answers: list[tuple[bytes, bool]] = []

    def build(self, parent, round_, proposer, timestamp_ms, digests, may_wait=None):  # type: ignore[no-untyped-def]
        if may_wait is not None:
            self.answers += [(d, may_wait(d)) for d in digests]
        return super().build(parent, round_, proposer, timestamp_ms, digests)


def test_the_core_lets_a_batch_wait_for_gap_wait_ms_from_when_it_became_available() -> None:
    keys = Keyring.make(4, crypto="mac")
    recorder = _Recorder()
    leader = keys.leader(1)

    def core(cfg: CoreConfig) -> Core:
        return replace(keys, config=cfg).core(leader, builder=recorder)

    c = core(CoreConfig(gap_wait_ms=3000))
    c.tick(keys.genesis.timestamp_ms + 10_000)
    c.on_batch_available(digest("old"))
    c.tick(keys.genesis.timestamp_ms + 12_500)
    c.on_batch_available(digest("new"))
    c.tick(keys.genesis.timestamp_ms + 13_200)  # "old" 3.2 s here, "new" 0.7 s
    c.start()
    assert recorder.answers == [(digest("old"), False), (digest("new"), True)]
    # 0: a leader never waits (the builder is not asked)
    recorder.answers.clear()
    c = core(CoreConfig(gap_wait_ms=0))
    c.on_batch_available(digest("old"))
    c.start()
    assert recorder.answers == [] and c.status().round == 1
