"""A validator takes its own mempool's word on signatures only for batches tagged under its
seal key; every other announcement is checked in full (no Ray needed)."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from rayledger.actors import validator as validator_module
from rayledger.actors.mempool import decode_batch_frame, encode_batch_frame, seal_tag
from rayledger.actors.validator import Validator
from rayledger.chain import batch_digest
from rayledger.consensus import AskBacklog
from rayledger.crypto import key_from_seed
from rayledger.tx import TxKind, batch_to_ipc, make_batch, validate_batch

CHAIN = b"\x05" * 32
LIMITS = SimpleNamespace(max_payload_bytes=4096, max_batch_rows=100)
N = 4  # validators: mempool i streams as sender N + i


class Method:
    """A stand-in for a Ray actor method: ``remote`` calls ``fn``; ``options`` (a call's
    retries) are recorded."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.options_given = fn, []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def options(self, **kwargs: Any) -> Method:
        self.options_given.append(kwargs)
        return self


class FakeMempool:
    def __init__(self) -> None:
        self.calls: list[tuple[int, Any, bytes | None]] = []
        self.set_validator = Method(lambda *a: self.calls.append(a))
        self.held_for: list[int] = []  # announce_held's callers
        self.announce_held = SimpleNamespace(remote=self.held_for.append)


def validator() -> tuple[Validator, list[bytes], FakeMempool]:
    v = Validator.__new__(Validator)
    v.index = 2
    v.genesis = SimpleNamespace(chain_id=CHAIN, limits=LIMITS, validators=SimpleNamespace(n=N))
    v.batches, v.rejected, v.committed_batches = {}, {}, {}
    v._checking, v.batches_resent, v.fetched_rows, v.backlog_asked = set(), 0, 0, 0
    v.origin_next, v.origin_waiting, v.batch_is_ours, v._stall_timers = {}, {}, {}, {}
    v.verifier_actor = None
    v.stream_server, v.batch_frames_in, v._batch_tasks = None, 0, set()
    v.latency = [0.0] * N  # no emulated WAN
    v.blocked = set()  # no partition
    v.seal_key, v.own_batches, v._rekeyed_at, v.me = os.urandom(32), 0, 0.0, "me"
    v.checks_at_once, v.intake_batches, v.intake_rows = 2, 1024, 262_144
    v.intake_bytes, v._intake_bytes = 1 << 30, {}
    v._intake, v._intake_rows, v._checks_running, v._served, v._clock = {}, {}, 0, {}, 0
    v._turns, v._checks_done, v._disk_reads, v._fetching = {}, {}, asyncio.Lock(), {}
    held: list[bytes] = []
    v._hold = lambda digest, batch, mempool=None: held.append(digest)  # type: ignore[method-assign]
    mempool = FakeMempool()
    v._actor = lambda role: mempool  # type: ignore[method-assign]
    return v, held, mempool


def batches() -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """A valid batch and one with a bad signature in row 3."""
    key = key_from_seed(b"\x11" * 32)
    good = make_batch(key, TxKind.ANCHOR, range(6), [bytes([i]) * 32 for i in range(6)], CHAIN)
    sigs = np.frombuffer(good.column("signature").buffers()[1], np.uint8).copy()
    sigs[64 * 3] ^= 1
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(64), 6, [None, pa.py_buffer(sigs)])
    bad = good.set_column(good.schema.get_field_index("signature"), "signature", column)
    return good, bad


def digest_of(batch: pa.RecordBatch) -> bytes:
    return batch_digest(validate_batch(batch, chain_id=CHAIN, max_payload=4096))


def announce(v: Validator, batch: pa.RecordBatch, origin: Any, tag: bytes | None) -> None:
    async def ref() -> pa.RecordBatch:
        return batch

    asyncio.run(v.batch_ready(digest_of(batch), [ref()], origin, tag))


async def drain(v: Validator) -> None:
    """Until every batch task is done, those they start included. A task leaves the set in a
    done callback, which runs only once the loop gets a turn; from Python 3.12 a gather of
    tasks that are all done returns at once, without one, so this yields a turn each time."""
    while v._batch_tasks:
        await asyncio.gather(*v._batch_tasks)
        await asyncio.sleep(0)


def test_a_batch_tagged_under_the_seal_key_is_not_checked_again() -> None:
    v, held, mempool = validator()
    _, bad = batches()
    # The tag says this institution's mempool verified it: the signatures are not re-checked
    # (so even this row with a bad signature passes: the mempool's check is the one counted)
    announce(v, bad, (2, 1), seal_tag(v.seal_key, digest_of(bad), bad))
    assert held == [digest_of(bad)] and v.own_batches == 1 and not v.rejected
    assert mempool.calls == []


def test_a_tagged_batch_still_has_its_digest_and_shape_checked() -> None:
    """The tag spares the signature check only: a batch that is not the one its digest names
    is refused though the tag over that digest and its signatures is genuine."""
    v, held, _ = validator()
    good, _ = batches()
    other = good.slice(0, 5)
    digest = digest_of(good)

    async def ref() -> pa.RecordBatch:
        return other

    tag = seal_tag(v.seal_key, digest, other)
    asyncio.run(v.batch_ready(digest, [ref()], (2, 1), tag))
    assert held == [] and v.own_batches == 1
    assert v.rejected == {"batch: invalid_batch": 1}


def test_untagged_or_wrongly_tagged_batches_are_checked_in_full() -> None:
    v, held, mempool = validator()
    good, bad = batches()
    other = os.urandom(32)
    # The ids, and so the digest, do not cover the signatures: same digest, other signatures
    assert digest_of(good) == digest_of(bad)
    for origin, tag in [
        ((0, 1), None),  # another institution's mempool
        (None, b"\x00" * 32),  # a tag that is not an HMAC under the key
        ((1, 1), seal_tag(other, digest_of(bad), bad)),  # under another key
        ((3, 1), seal_tag(v.seal_key, b"\x07" * 32, bad)),  # under the key, another digest
        # A genuine tag, seen on its way, replayed for the same transactions with other
        # signatures: the tag covers the signature column, so it does not match
        ((2, 1), seal_tag(v.seal_key, digest_of(good), good)),
        ((1, 2), "not bytes"),  # any object a caller sends: no error, a full check
    ]:
        announce(v, bad, origin, tag)
    assert held == [] and v.own_batches == 0
    assert v.rejected == {"batch: invalid_signature": 6}
    # The replayed one claimed to come from our own mempool: it is given the key again
    assert mempool.calls == [(2, "me", v.seal_key, None)]
    announce(v, good, (0, 2), None)  # checked in full, and valid
    assert held == [digest_of(good)]
    # A batch with no signature column gets an empty tag, which matches none
    assert seal_tag(v.seal_key, digest_of(good), good.drop_columns(["signature"])) == b""


def test_our_mempool_announcing_without_the_tag_is_given_the_key_again() -> None:
    v, held, mempool = validator()
    good, bad = batches()
    # Our own mempool (index 2), restarted since start(): checked in full, and re-keyed
    announce(v, bad, (2, 5), None)
    assert v.rejected == {"batch: invalid_signature": 1} and held == []
    assert mempool.calls == [(2, "me", v.seal_key, None)]
    announce(v, good, (2, 6), None)  # within the second: not re-keyed again
    assert held == [digest_of(good)] and len(mempool.calls) == 1
    v._rekeyed_at -= 1.0
    announce(v, good.slice(0, 2), (2, 7), b"\x01" * 32)
    assert len(mempool.calls) == 2
    # Before start() the validator has no handle of its own to give: start() will key it
    v.me, v._rekeyed_at = None, 0.0
    announce(v, good.slice(0, 3), (2, 8), None)
    assert len(mempool.calls) == 2


def test_commits_are_reported_to_our_mempool_unless_the_batch_is_another_institutions() -> None:
    """Only batches this institution's mempool may have sealed are reported to it when they
    commit: one announced by other institutions' mempools only is not (nothing to free
    there), an unknown one is (it may be ours, announced before a restart), and one our
    mempool announced is ours whoever announces it too, before or after."""
    v, _, _ = validator()
    good, _ = batches()
    ours, theirs, both, ours_first = (good.slice(i, 1) for i in range(4))
    announce(v, ours, (2, 1), None)
    announce(v, theirs, (0, 1), None)
    announce(v, theirs, (3, 1), None)
    announce(v, both, (1, 1), None)
    announce(v, both, (2, 2), None)
    announce(v, ours_first, (2, 3), None)
    announce(v, ours_first, (1, 2), None)
    unknown = b"\x07" * 32
    committed = [digest_of(b) for b in (ours, theirs, both, ours_first)] + [unknown]
    assert v._mempool_news(committed) == [
        digest_of(ours),
        digest_of(both),
        digest_of(ours_first),
        unknown,
    ]
    # Every batch is forgotten once committed: a repeat is reported
    assert v.batch_is_ours == {}
    assert v._mempool_news([digest_of(theirs)]) == [digest_of(theirs)]
    assert v._mempool_news([]) == []


def test_the_memory_of_batch_origins_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(validator_module, "BATCH_ORIGINS_KEEP", 3)
    v, _, _ = validator()
    digests = [bytes([i]) * 32 for i in range(5)]
    for d in digests:
        v._note_origin(d, 0)
    # The oldest two were never committed: forgotten, so their commit would be reported
    assert list(v.batch_is_ours) == digests[2:]
    assert v._mempool_news(digests) == digests[:2]


def test_an_unreadable_batch_takes_its_turn() -> None:
    """A batch whose object cannot be read (lost with its mempool) is counted and passed
    over at once: the mempool's next batch does not wait for it."""
    v, held, _ = validator()
    good, _ = batches()

    async def lost() -> pa.RecordBatch:
        raise RuntimeError("the object was lost")

    async def ref() -> pa.RecordBatch:
        return good

    async def run() -> None:
        await v.batch_ready(b"\x01" * 32, [lost()], (0, 1), None)
        await v.batch_ready(digest_of(good), [ref()], (0, 2), None)

    asyncio.run(run())
    assert held == [digest_of(good)] and v.rejected == {"batch: unreadable": 1}


@pytest.mark.parametrize("fresh", [False, True])
def test_a_slow_predecessor_is_waited_for(fresh: bool) -> None:
    """One mempool's batches are held in the order it sealed them, however long the earlier
    one's check takes: held first, the later one's rows would precede their sender's earlier
    nonces in a block and fail. ``fresh``: the first batches this validator sees from that
    mempool (just started): the order starts with the first to arrive."""
    v, held, _ = validator()
    if not fresh:
        v.origin_next[0] = 1  # batches of mempool 0 seen up to 0: 1 comes next
    key = key_from_seed(b"\x12" * 32)
    first, second = (
        make_batch(
            key, TxKind.ANCHOR, range(a, a + 4), [bytes([a + i]) * 32 for i in range(4)], CHAIN
        )
        for a in (0, 4)
    )

    async def slow() -> pa.RecordBatch:
        await asyncio.sleep(1.5)  # a check queued behind others on a saturated machine
        return first

    async def fast() -> pa.RecordBatch:
        return second

    async def run() -> None:
        await asyncio.gather(
            v.batch_ready(digest_of(first), [slow()], (0, 1), None),
            v.batch_ready(digest_of(second), [fast()], (0, 2), None),
        )

    asyncio.run(run())
    assert not v.rejected
    assert held == [digest_of(first), digest_of(second)]


def test_batches_waiting_for_a_predecessor_are_bounded_and_share_one_wait(
    monkeypatch: Any,
) -> None:
    """A mempool sealing with gaps (every other number): each batch behind a gap was kept
    until that gap's wait ran out, one gap every REORDER_WAIT_S, each with a timer of its own.
    Past ORIGIN_WAITING_MAX waiting, the lowest gap is given up at once."""
    monkeypatch.setattr(validator_module, "ORIGIN_WAITING_MAX", 8)
    v, held, _ = validator()
    timers: list[tuple[int, int]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        later = loop.call_later

        def call_later(delay: float, fn: Any, *args: Any) -> Any:
            timers.append(args)
            return later(delay, fn, *args)

        monkeypatch.setattr(loop, "call_later", call_later)
        v.origin_next[3] = 1
        for seq in range(2, 202, 2):
            v._in_order((3, seq), bytes([seq % 256]) * 32, None)

    asyncio.run(run())
    assert len(v.origin_waiting[3]) == 8 and min(v.origin_waiting[3]) == 186
    assert v.rejected == {"batch: too many waiting for a predecessor": 92}
    assert len(timers) == 93 and len(set(timers)) == 93  # one per gap, not per batch
    # The honest case: a batch behind one gap waits, and is held when the gap fills
    v, held, _ = validator()
    good, _ = batches()

    async def fill() -> None:
        v.origin_next[0] = 1
        v._in_order((0, 2), digest_of(good), good)
        assert held == [] and v._stall_timers == {0: 1}
        v._in_order((0, 1), b"\x01" * 32, None)

    asyncio.run(fill())
    assert held == [digest_of(good)] and v.origin_waiting[0] == {} and not v.rejected


def test_a_committed_batch_served_to_a_peer_carries_only_its_rows() -> None:
    """A lagging peer fetching a batch already committed gets its rows out of the stored
    block, in buffers of their own (a slice would be sent with the whole block)."""
    import pickle

    v, _, _ = validator()
    key = key_from_seed(b"\x12" * 32)
    block_txs = make_batch(
        key, TxKind.ANCHOR, range(3000), [bytes([i % 256]) * 32 for i in range(3000)], CHAIN
    )
    digest = b"\x33" * 32
    v.committed_batches = {digest: (7, 1000, 500)}
    v.store = SimpleNamespace(
        get_block=lambda h: SimpleNamespace(txs=block_txs) if h == 7 else None
    )
    served = asyncio.run(v.get_batch(digest))
    assert served is not None and served.equals(block_txs.slice(1000, 500))
    assert len(pickle.dumps(served, protocol=5)) * 4 < len(pickle.dumps(block_txs, protocol=5))
    assert asyncio.run(v.get_batch(b"\x34" * 32)) is None


def on_stream(v: Validator, frames: list[tuple[int, bytes]]) -> None:
    """Frames as the validator's stream server hands them over, each from its sender."""

    async def run() -> None:
        for sender, frame in frames:
            v._on_frame(sender, frame, None)
        await drain(v)

    asyncio.run(run())


def test_batches_on_a_mempools_stream_are_checked_as_those_by_reference() -> None:
    v, held, _ = validator()
    good, bad = batches()
    d = digest_of(good)
    own = encode_batch_frame(d, 1, seal_tag(v.seal_key, d, bad), batch_to_ipc(bad))
    # Our mempool's tagged batch is not checked again (the row with a bad signature passes);
    # another mempool's copy of the bad one is checked in full; the good one passes
    on_stream(v, [(N + 2, own)])
    assert held == [d] and v.own_batches == 1 and v.batch_frames_in == 1
    held.clear()
    v.batches = {}
    theirs = encode_batch_frame(d, 1, None, batch_to_ipc(bad))
    on_stream(v, [(N + 0, theirs), (N + 1, encode_batch_frame(d, 7, None, batch_to_ipc(good)))])
    assert held == [d] and v.rejected == {"batch: invalid_signature": 1}
    # The mempool is the sender's, and its sealing number orders its batches
    assert v.origin_next == {2: 2, 0: 2, 1: 8}


def test_a_stream_batch_is_held_in_its_mempools_order() -> None:
    v, held, _ = validator()
    good, _ = batches()
    first, second = good.slice(0, 3), good.slice(3, 3)
    frame = encode_batch_frame(digest_of(first), 4, None, batch_to_ipc(first))

    async def run() -> None:
        # The second arrives first (by Ray call while the stream was down): it waits
        await v.batch_ready(digest_of(second), [], (1, 5), None, body=second)
        assert held == []
        v._on_frame(N + 1, frame, None)
        await drain(v)

    v.origin_next[1] = 4
    asyncio.run(run())
    assert held == [digest_of(first), digest_of(second)]


def test_malformed_batch_frames_are_counted_and_change_nothing() -> None:
    v, held, _ = validator()
    good, _ = batches()
    d = digest_of(good)
    body = batch_to_ipc(good)
    frame = encode_batch_frame(d, 1, None, body)
    tagged = encode_batch_frame(d, 1, b"\x01" * 32, body)
    big = make_batch(
        key_from_seed(b"\x12" * 32),
        TxKind.ANCHOR,
        range(101),
        [bytes([i % 256]) * 32 for i in range(101)],
        CHAIN,
    )
    cases = {
        "shorter than its header": frame[:20],
        "neither 0 nor 1": frame[:40] + b"\x02" + frame[41:],
        "ends inside its seal tag": tagged[:50],
        "not a valid Arrow IPC stream": frame[:41] + b"\x00" * 64,
        "exceeds the maximum": encode_batch_frame(d, 1, None, batch_to_ipc(big)),
    }
    for problem, data in cases.items():
        with pytest.raises(ValueError, match=problem):
            decode_batch_frame(data, max_rows=LIMITS.max_batch_rows)
    on_stream(v, [(N + 0, data) for data in cases.values()])
    assert held == [] and v.batch_frames_in == 0 and v.origin_next == {}
    assert v.rejected == {"stream: bad_batch_frame": len(cases)}
    # The stream goes on: a good frame after them is taken
    on_stream(v, [(N + 0, frame)])
    assert held == [d]
    assert decode_batch_frame(frame)[:3] == (d, 1, None)


def test_with_the_wan_emulated_a_far_mempools_batch_arrives_after_the_links_latency() -> None:
    """Batches cross the emulated WAN as consensus messages do, on a stream or by Ray: one
    from another site's mempool is taken only after that link's latency, one from this
    site's at once."""
    v, held, _ = validator()
    v.latency = [0.0, 0.0, 0.0, 80.0]  # validator (and mempool) 3 is 80 ms away
    good, _ = batches()
    near, far, far_by_ray = good.slice(0, 2), good.slice(2, 2), good.slice(4, 2)
    taken: dict[bytes, float] = {}
    v._hold = lambda digest, batch, mempool=None: taken.setdefault(digest, time.monotonic())  # type: ignore[method-assign]

    async def ref() -> pa.RecordBatch:
        return far_by_ray

    async def run() -> float:
        t0 = time.monotonic()
        v._on_frame(N + 3, encode_batch_frame(digest_of(far), 1, None, batch_to_ipc(far)), None)
        v._on_frame(N + 1, encode_batch_frame(digest_of(near), 1, None, batch_to_ipc(near)), None)
        await asyncio.sleep(0)  # the frames' handling starts: mempool 3's next batch comes by Ray
        await v.batch_ready(digest_of(far_by_ray), [ref()], (3, 2), None)
        await drain(v)
        return t0

    t0 = asyncio.run(run())
    assert taken[digest_of(near)] - t0 < 0.06
    assert taken[digest_of(far)] - t0 >= 0.08 and taken[digest_of(far_by_ray)] - t0 >= 0.08
    assert list(taken) == [digest_of(near), digest_of(far), digest_of(far_by_ray)]
    assert held == []


def test_a_partition_drops_a_cut_off_mempools_batches_and_they_take_their_turn() -> None:
    v, held, _ = validator()
    good, _ = batches()
    first, second, third, fourth = (good.slice(i, 1) for i in range(4))
    v.blocked = {1}  # validator 1's site (and its mempool) is cut off
    asyncio.run(v.batch_ready(digest_of(first), [], (1, 1), None, body=first))  # by Ray
    on_stream(v, [(N + 1, encode_batch_frame(digest_of(second), 2, None, batch_to_ipc(second)))])
    assert held == [] and v.rejected == {"batch: partitioned": 2} and v.batch_frames_in == 1
    announce(v, third, (0, 1), None)  # another site's mempool: taken
    assert held == [digest_of(third)]
    v.blocked = set()  # healed: the mempool's next batch does not wait for the dropped ones
    announce(v, fourth, (1, 3), None)
    assert held == [digest_of(third), digest_of(fourth)]


def test_a_batch_sent_again_while_its_first_copy_is_in_flight_here_is_dropped() -> None:
    """A mempool sends a batch long uncommitted to every validator again. Here its first copy
    is still being checked, or was checked and waits for its mempool's earlier batch: the
    copy is dropped (counted), not checked a second time. A copy of a batch dropped by a
    partition, waiting its turn, is new here: checked and held."""
    v, held, _ = validator()
    good, _ = batches()
    first, second, third = good.slice(0, 2), good.slice(2, 2), good.slice(4, 2)
    release = asyncio.Event()

    async def slow(batch: pa.RecordBatch) -> pa.RecordBatch:
        await release.wait()  # a check queued behind others on a saturated machine
        return batch

    async def ref(batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch

    async def resend(batch: pa.RecordBatch) -> None:
        await v.batch_ready(digest_of(batch), [], None, None, body=batch, resent_by=0)

    async def run() -> None:
        v.origin_next[0] = 1
        checking = asyncio.ensure_future(
            v.batch_ready(digest_of(first), [slow(first)], (0, 1), None)
        )
        await asyncio.sleep(0)  # its check starts
        await v.batch_ready(digest_of(second), [ref(second)], (0, 2), None)  # waits for 1
        assert held == [] and v._checking == {digest_of(first)}
        await resend(first)  # its check is under way
        await resend(second)  # checked, waiting its turn
        assert held == [] and v.batches_resent == 0
        release.set()
        await checking
        assert held == [digest_of(first), digest_of(second)] and v._checking == set()
        # Dropped by a partition while mempool 0's batch 3 is missing: it waits its turn
        # empty, and the copy sent again after the heal is checked and held
        v.blocked = {0}
        await v.batch_ready(digest_of(third), [], (0, 4), None, body=third)
        v.blocked = set()
        await resend(third)

    asyncio.run(run())
    assert held == [digest_of(first), digest_of(second), digest_of(third)]
    assert v.batches_resent == 1 and not v._checking
    assert v.rejected == {"batch: resent, in flight here": 2, "batch: partitioned": 1}


def test_a_restarted_mempool_is_given_the_handle_again_and_the_key_only_if_ours() -> None:
    v, _, mempool = validator()
    v.started = False
    asyncio.run(v.mempool_back(2))
    assert mempool.calls == []  # not started: its start gives the handles
    v.started = True
    # Each mempool is given the endpoint with its own token
    v._endpoint = lambda peer=None, n_mempool=None: ("10.0.0.2", 9000, b"t%d" % n_mempool)  # type: ignore[method-assign,misc]
    asyncio.run(v.mempool_back(2))
    asyncio.run(v.mempool_back(0))
    assert mempool.calls == [
        (2, "me", v.seal_key, ("10.0.0.2", 9000, b"t2")),
        (2, "me", None, ("10.0.0.2", 9000, b"t0")),
    ]
    assert v.mempool is mempool
    # Retried by Ray where the mempool is still coming up (it asks from its __init__: without
    # retries the answer failed at once, "the actor is restarting", one restart in twenty)
    assert (
        mempool.set_validator.options_given
        == [{"max_task_retries": validator_module.RESTART_RETRIES}] * 2
    )
    for bad in (-1, N, 10**6):  # no such mempool: nothing is sent
        asyncio.run(v.mempool_back(bad))
    assert len(mempool.calls) == 2


def test_a_leaders_wait_for_a_gap_asks_the_mempool_for_its_backlog_unless_cut_off() -> None:
    """``AskBacklog`` (the core's, from a long wait for a gap) goes to the mempool named, as
    ``announce_held`` for this validator; not across a partition (the heal asks), nor to a
    mempool that is down (a restarted one holds nothing from before)."""
    v, _, mempool = validator()
    # For _run's housekeeping: no timers, no round ended by a timeout
    v.core, v._timers = SimpleNamespace(round=1, rounds_by_timeout=0), []
    v._timed_out_rounds = 0
    v._run([AskBacklog(1)])
    assert mempool.held_for == [2] and v.backlog_asked == 1
    v.blocked = {1}
    v._ask_backlog(1)
    assert mempool.held_for == [2] and v.backlog_asked == 1

    def down(role: str) -> Any:
        raise ValueError(f"no actor {role}")

    v.blocked = set()
    v._actor = down  # type: ignore[method-assign]
    v._ask_backlog(1)
    assert v.backlog_asked == 1


@pytest.mark.parametrize(
    ("digest", "origin", "resent_by"),
    [
        (b"\x01" * 32, (1, float("nan")), None),  # NaN never compares: the order wedged
        (b"\x01" * 32, (1, "x"), None),
        (b"\x01" * 32, (1, -1), None),
        (b"\x01" * 32, (1, 1 << 63), None),
        (b"\x01" * 32, (1, True), None),
        (b"\x01" * 32, (N, 1), None),
        (b"\x01" * 32, (-1, 1), None),
        (b"\x01" * 32, [1, 1], None),
        (b"\x01" * 32, (1, 1, 1), None),
        (b"\x01" * 31, (1, 1), None),
        ("digest", (1, 1), None),
        (b"\x01" * 32, None, N),
        (b"\x01" * 32, None, 1.0),
    ],
)
def test_a_malformed_announcement_is_counted_and_changes_nothing(
    digest: Any, origin: Any, resent_by: Any
) -> None:
    """Anything may come by Ray call: each part of an announcement is checked first."""
    v, held, _ = validator()
    good, _ = batches()
    announce(v, good, (1, 1), None)
    before = (dict(v.origin_next), {k: dict(w) for k, w in v.origin_waiting.items()})
    asyncio.run(v.batch_ready(digest, [], origin, None, resent_by=resent_by))
    assert v.rejected == {"batch: malformed announcement": 1}
    assert (dict(v.origin_next), {k: dict(w) for k, w in v.origin_waiting.items()}) == before
    assert held == [digest_of(good)]
