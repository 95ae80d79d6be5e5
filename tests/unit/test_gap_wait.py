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
import pytest

from rayledger import chain
from rayledger.block import genesis_header
from rayledger.chain import LedgerBuilder, batch_digest, gaps_and_missing
from rayledger.consensus import AskBacklog, Core, CoreConfig, DigestBuilder
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
    # and the nonce each of those senders is missing there
    rows, missing = gaps_and_missing(base, body, results)
    assert rows.tolist() == [1, 3] and missing.tolist() == [1, 0]
    # Nothing failed: nothing to look at
    fine = anchors(A, range(3))
    _, results, _ = execute_block(base.child(), fine, 1, bytes(32))
    rows, missing = gaps_and_missing(base, fine, results)
    assert rows.tolist() == [] and missing.tolist() == []


def test_a_batch_ahead_of_its_senders_nonces_waits_then_goes_in() -> None:
    early, late = anchors(A, range(0, 10)), anchors(A, range(10, 20))
    lb, genesis, (d_early, d_late) = builder(early, late)
    # Only the later batch is here: it waits while the leader may wait
    asked: list[bytes] = []

    def may_wait(d: bytes, found_ms: int) -> bool:
        asked.append(d)
        return True

    header = lb.build(genesis, 1, PROPOSER, 2, (d_late,), may_wait)
    assert header.batch_digests == () and header.tx_count == 0
    assert asked == [d_late] and lb.deferred == 1
    # Once the wait is over it goes in, and fails as before
    header = lb.build(genesis, 1, PROPOSER, 2, (d_late,), lambda d, f: False)
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
    header = lb.build(genesis, 1, PROPOSER, 2, tuple(digests), lambda d, f: True)
    assert header.batch_digests == (digests[2],) and statuses(lb, header) == [OK] * 3
    assert lb.deferred == 2
    # Where only P may still wait, Q goes in without it (last) and its rows fail: the wait
    # is the leader's per batch
    header = lb.build(genesis, 1, PROPOSER, 2, tuple(digests), lambda d, f: d == digests[0])
    assert header.batch_digests == (digests[2], digests[1])
    assert statuses(lb, header) == [OK] * 3 + [BAD] * 5


def test_a_batch_ahead_of_one_in_the_same_block_goes_after_it() -> None:
    # Batches can become available out of order (the earlier one fetched late, after a
    # partition): the later one moves behind it, waiting or not, and nothing fails
    early, late = anchors(A, range(0, 10)), anchors(A, range(10, 20))
    other = anchors(B, range(0, 4))
    for may_wait in (lambda d, f: True, lambda d, f: False):
        lb, genesis, (d_early, d_late, d_other) = builder(early, late, other)
        header = lb.build(genesis, 1, PROPOSER, 2, (d_late, d_other, d_early), may_wait)
        assert header.batch_digests == (d_other, d_early, d_late)
        assert statuses(lb, header) == [OK] * 24 and lb.deferred == 0


class _Recorder(DigestBuilder):
    def __init__(self, found: int = 0) -> None:
        self.answers: list[tuple[bytes, bool]] = []
        self.found = found  # when the builder found each batch's gap

    def build(self, parent, round_, proposer, timestamp_ms, digests, may_wait=None):  # type: ignore[no-untyped-def]
        if may_wait is not None:
            self.answers += [(d, may_wait(d, self.found)) for d in digests]
        return super().build(parent, round_, proposer, timestamp_ms, digests)


def test_the_core_lets_a_batch_wait_for_gap_wait_ms_from_when_it_became_available() -> None:
    keys = Keyring.make(4, crypto="mac")
    t0 = keys.genesis.timestamp_ms
    recorder = _Recorder(found=t0 + 13_000)  # the builder found the gaps just now
    leader = keys.leader(1)

    def core(cfg: CoreConfig) -> Core:
        return replace(keys, config=cfg).core(leader, builder=recorder)

    def answers(found_ms: int) -> list[tuple[bytes, bool]]:
        recorder.answers.clear()
        recorder.found = found_ms
        c = core(CoreConfig(gap_wait_ms=3000))
        c.tick(t0 + 10_000)
        c.on_batch_available(digest("old"))
        c.tick(t0 + 12_500)
        c.on_batch_available(digest("new"))
        c.tick(t0 + 13_200)  # "old" 3.2 s here, "new" 0.7 s
        c.start()
        return recorder.answers

    assert answers(t0 + 13_000) == [(digest("old"), False), (digest("new"), True)]
    # A gap the builder found 3.1 s ago: waited for long enough, by any batch
    assert answers(t0 + 10_100) == [(digest("old"), False), (digest("new"), False)]
    assert answers(t0 + 10_300) == [(digest("old"), False), (digest("new"), True)]
    # 0: a leader never waits (the builder is not asked)
    recorder.answers.clear()
    c = core(CoreConfig(gap_wait_ms=0))
    c.on_batch_available(digest("old"))
    c.start()
    assert recorder.answers == [] and c.status().round == 1


def test_a_long_wait_asks_the_batchs_mempool_for_its_backlog_at_a_bounded_rate() -> None:
    """A batch held back for a quarter of the gap wait asks its mempool to send every batch
    it holds in flight again (``AskBacklog``): the earlier batch may have been lost here.
    Again at most once per half of the gap wait per mempool; never once the wait is over,
    and never for a batch whose mempool is not known.

    Found from a soak's logs: a leader lacking a sender's earlier batch (there, a restarted
    one) waited the gap wait blind and then proposed 61,600 rows that failed their nonces."""
    keys = Keyring.make(4, crypto="mac")
    t0 = keys.genesis.timestamp_ms
    c = replace(keys, config=CoreConfig(gap_wait_ms=4000)).core(
        keys.leader(1), builder=_Recorder(found=t0 + 10_000)
    )
    c.tick(t0 + 10_000)
    c.on_batch_available(digest("a"), 2)
    c.on_batch_available(digest("b"), 3)
    c.on_batch_available(digest("c"))  # its mempool not known

    def asks(at: int, *names: str) -> list[AskBacklog]:
        c.tick(t0 + at)
        for name in names:
            c._may_wait(digest(name), t0 + 10_000)
        return [a for a in c._flush() if isinstance(a, AskBacklog)]

    assert asks(10_999, "a", "b", "c") == []  # a little out of order only
    # The first proposal after a quarter of the wait asks both mempools, once each
    c.tick(t0 + 11_000)
    assert [a for a in c.start() if isinstance(a, AskBacklog)] == [AskBacklog(2), AskBacklog(3)]
    assert asks(11_000, "a", "b", "c", "a") == []
    assert asks(12_999, "a", "b") == []
    assert asks(13_000, "a", "b", "a") == [AskBacklog(2), AskBacklog(3)]
    assert asks(13_999, "a") == []
    # The wait is over: the batch goes in, nobody is asked
    assert asks(14_000, "a", "b") == []
    assert c._may_wait(digest("a"), t0 + 10_000) is False


def test_a_sender_that_skipped_a_nonce_makes_batches_wait_once_not_each_anew() -> None:
    """A sender missing nonce 0 for good (a client that skipped it): all its later rows fail.
    The leader waits for that gap once, from when it found it; each new batch with rows of
    that sender (and other senders' rows that share it) is not held back for it again.

    Found with a load run: one client skipping a nonce, sharing a mempool with three honest
    ones, made every batch wait the full gap wait; the mempool filled and answered busy."""
    a_rows = [anchors(A, range(1 + 5 * k, 6 + 5 * k)) for k in range(3)]  # 0 never comes
    honest = [anchors(B, range(10 * k, 10 * k + 10)) for k in range(3)]
    batches = [mixed(a, b) for a, b in zip(a_rows, honest, strict=True)]
    lb, genesis, digests = builder(*batches)
    wait_ms = 3000
    available = {d: 1000 * (k + 1) for k, d in enumerate(digests)}  # one a second
    asked: list[tuple[int, int]] = []

    def proposal(now: int, digests_: tuple[bytes, ...]) -> tuple[bytes, ...]:
        def may_wait(d: bytes, found_ms: int) -> bool:  # CoreConfig.gap_wait_ms's rule
            asked.append((digests.index(d), found_ms))
            return now - min(available[d], found_ms) < wait_ms

        return lb.build(genesis, 1, PROPOSER, now, digests_, may_wait).batch_digests

    # The first batch is found lacking A's 0 at 1,500 and waits
    assert proposal(1_500, tuple(digests[:1])) == ()
    assert asked == [(0, 1_500)] and lb.deferred == 1
    # At 4,600 the gap is 3.1 s old: the batches of 2 s and 1 s ago go in at once, A's rows
    # failing and B's committing, where each would have waited 3 s of its own
    asked.clear()
    header = lb.build(
        genesis,
        1,
        PROPOSER,
        4_600,
        tuple(digests),
        lambda d, f: 4_600 - min(available[d], f) < wait_ms,
    )
    assert header.batch_digests == tuple(digests) and lb.deferred == 1
    assert statuses(lb, header) == ([BAD] * 5 + [OK] * 10) * 3
    # The gap is remembered with when it was found, not found anew
    assert lb._gap_seen == {(public_bytes(A), 0): 1_500}


def test_a_batch_waits_for_the_latest_found_of_its_gaps() -> None:
    """A's gap is old (a broken sender), B's new (its earlier batch is on its way): a batch
    with rows behind both still waits, for B's."""
    lb, genesis, digests = builder(mixed(anchors(A, [1]), anchors(B, [5])))
    lb._gap_seen[(public_bytes(A), 0)] = 100
    found: list[int] = []

    def may_wait(d: bytes, found_ms: int) -> bool:
        found.append(found_ms)
        return True

    assert lb.build(genesis, 1, PROPOSER, 9_000, tuple(digests), may_wait).batch_digests == ()
    assert found == [9_000]
    assert lb._gap_seen == {(public_bytes(A), 0): 100, (public_bytes(B), 0): 9_000}


def test_the_memory_of_gaps_found_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "GAPS_KEEP", 2)
    keys = [key_from_seed(bytes([k + 10]) * 32) for k in range(3)]
    lb, genesis, digests = builder(*(anchors(k, [1]) for k in keys))
    for t, d in enumerate(digests):
        lb.build(genesis, 1, PROPOSER, 100 + t, (d,), lambda d, f: True)
    # The oldest gap is forgotten
    assert lb._gap_seen == {(public_bytes(keys[1]), 0): 101, (public_bytes(keys[2]), 0): 102}


def test_batches_of_one_sender_in_reverse_order_go_in_in_nonce_order() -> None:
    """A mempool sends its batches long in flight again, outside its sealing order (after a
    partition): a leader can hold a sender's batches in any order, here the reverse of eight.
    Batches behind a gap go after the others, nearest to their sender's next nonce first, so
    one pass puts them in order (moved as they were, it took a pass per batch and, past the
    passes allowed, proposed rows that failed)."""
    parts = [anchors(A, range(10 * k, 10 * k + 10)) for k in range(8)]
    lb, genesis, digests = builder(*parts)
    header = lb.build(genesis, 1, PROPOSER, 2, tuple(reversed(digests)), lambda d, f: True)
    assert header.batch_digests == tuple(digests)
    assert statuses(lb, header) == [OK] * 80 and lb.deferred == 0 and lb.gap_rows_proposed == 0


def test_when_reordering_does_not_settle_the_batches_that_may_wait_are_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the reordering passes allowed, the batches still behind a gap are left out while
    they may wait, not proposed to fail."""
    monkeypatch.setattr(chain, "REORDER_PASSES", 0)
    early, late = anchors(A, range(0, 10)), anchors(A, range(10, 20))
    other = anchors(B, range(0, 4))
    lb, genesis, (d_early, d_late, d_other) = builder(early, late, other)
    header = lb.build(genesis, 1, PROPOSER, 2, (d_late, d_other, d_early), lambda d, f: True)
    assert header.batch_digests == (d_other, d_early) and lb.deferred == 1
    assert statuses(lb, header) == [OK] * 14 and lb.gap_rows_proposed == 0
