"""The mempool's learnt in-flight limit, without Ray: batches that commit within the target
raise it (only while it is in use), late ones lower it to no less than the floor, the
ceiling always holds, and a busy answer keeps nothing and says when to come back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rayledger.actors import mempool as mempool_mod
from rayledger.actors.mempool import InflightLimit
from rayledger.crypto import key_from_seed
from rayledger.tx import TxKind, make_batch

from .test_mempool_admission import mempool


def drive(limit: InflightLimit, latency: float, batches: int, rows: int, t0: float) -> float:
    """Seal and commit ``batches`` one after another, each taking ``latency`` seconds, with the
    limit fully in use; returns the clock after the last."""
    t = t0
    for i in range(batches):
        d = b"%d/%f" % (i, t)
        limit.sealed(d, rows, in_flight=limit.limit, now=t)
        t += latency
        limit.committed(d, now=t)
    return t


def test_fast_commits_raise_the_limit_up_to_the_ceiling() -> None:
    limit = InflightLimit(floor_rows=2_000, ceiling_rows=10_000)
    assert limit.limit == 2_000 and limit.target_s() is None
    drive(limit, 0.5, 3, 1_000, 0.0)
    assert limit.target_s() == pytest.approx(1.0)
    assert limit.limit == 5_000 and limit.late == 0
    drive(limit, 0.5, 20, 1_000, 10.0)
    assert limit.limit == 10_000


def test_a_limit_nobody_uses_does_not_grow() -> None:
    limit = InflightLimit(floor_rows=2_000, ceiling_rows=100_000)
    for i in range(10):
        limit.sealed(bytes([i]), 100, in_flight=0, now=float(i))
        limit.committed(bytes([i]), now=i + 0.3)
    assert limit.limit == 2_000


def test_late_commits_lower_the_limit_to_the_floor() -> None:
    limit = InflightLimit(floor_rows=2_000, ceiling_rows=100_000)
    t = drive(limit, 0.5, 30, 1_000, 0.0)
    assert limit.limit == 32_000
    # Overload: the same batches now take three times the unloaded latency
    drive(limit, 1.5, 5, 1_000, t)
    assert limit.late == 5 and limit.limit == int(32_000 * 0.9**5)
    drive(limit, 1.5, 100, 1_000, t + 100)
    assert limit.limit == 2_000


def test_sustained_overload_does_not_become_the_norm() -> None:
    limit = InflightLimit(floor_rows=10, ceiling_rows=100_000)
    drive(limit, 1.0, 1, 10, 0.0)
    assert limit.target_s() == pytest.approx(2.0)
    # An hour at twice the target: the limit stays at the floor, the target where it was
    drive(limit, 4.0, 900, 10, 100.0)
    assert limit.target_s() == pytest.approx(2.0) and limit.limit == 10
    drive(limit, 0.7, 1, 10, 5_000.0)
    assert limit.target_s() == pytest.approx(1.4)


def test_the_target_is_never_below_the_least() -> None:
    limit = InflightLimit(floor_rows=10, ceiling_rows=100_000)
    drive(limit, 0.05, 1, 10, 0.0)
    assert limit.target_s() == mempool_mod.MIN_TARGET_S
    drive(limit, 0.9, 5, 10, 1.0)  # jitter well above the lowest, below the least target
    assert limit.late == 0


def test_a_fixed_target_is_kept() -> None:
    limit = InflightLimit(floor_rows=10, ceiling_rows=1_000, target_s=3.0)
    assert limit.target_s() == 3.0
    drive(limit, 2.5, 4, 10, 0.0)
    assert limit.late == 0 and limit.limit == 50
    drive(limit, 3.5, 1, 10, 50.0)
    assert limit.late == 1 and limit.limit == 45


def test_admission_rules() -> None:
    limit = InflightLimit(floor_rows=2_000, ceiling_rows=5_000)
    # Nothing in flight: anything up to the ceiling, so a large submission cannot starve
    assert limit.admits(0, 5_000) and not limit.admits(0, 5_001)
    assert limit.admits(1_000, 1_000) and not limit.admits(1_000, 1_001)
    wait = limit.retry_after_s(1_000, 1_500)
    assert 0.05 <= wait <= 0.5
    # The floor never exceeds the ceiling
    assert InflightLimit(floor_rows=50, ceiling_rows=10).limit == 10
    with pytest.raises(ValueError, match="positive"):
        InflightLimit(floor_rows=0, ceiling_rows=10)


def test_the_hint_is_when_the_batches_in_the_way_should_commit() -> None:
    limit = InflightLimit(floor_rows=1_000, ceiling_rows=1_000)
    # Before any commit: the excess at the rate the limit implies, within [10 ms, target]
    assert limit.recent_s is None and limit.retry_after_s(1_000, 1_000, now=0.0) == 0.5
    drive(limit, 0.6, 5, 1_000, 0.0)  # commits take 0.6 s: the target is 1.2 s
    assert limit.recent_s == pytest.approx(0.6)
    # One batch in flight, sealed at t=10: room once it commits, about t=10.6
    limit.sealed(b"a", 1_000, in_flight=0, now=10.0)
    assert limit.retry_after_s(1_000, 1_000, now=10.1) == pytest.approx(0.5)
    assert limit.retry_after_s(1_000, 1_000, now=10.55) == pytest.approx(0.05)
    # Overdue: back off as it stays so, from a tenth of the latency up to all of it
    assert limit.retry_after_s(1_000, 1_000, now=10.61) == pytest.approx(0.06)
    assert limit.retry_after_s(1_000, 1_000, now=10.9) == pytest.approx(0.3)
    assert limit.retry_after_s(1_000, 1_000, now=15.0) == pytest.approx(0.6)
    # The excess needs the second batch too: its due time counts
    wide = InflightLimit(floor_rows=3_000, ceiling_rows=3_000)
    drive(wide, 0.6, 5, 1_000, 0.0)
    wide.sealed(b"a", 1_000, in_flight=0, now=10.0)
    wide.sealed(b"b", 1_000, in_flight=1_000, now=10.2)
    assert wide.retry_after_s(2_000, 2_000, now=10.3) == pytest.approx(0.3)
    assert wide.retry_after_s(2_000, 2_500, now=10.3) == pytest.approx(0.5)
    # Rows not sealed yet (pending) beyond them: a whole latency from now
    assert wide.retry_after_s(3_000, 3_000, now=10.3) == pytest.approx(0.6)
    # The floor: never less than 10 ms
    assert wide.retry_after_s(2_000, 1_001, now=10.599) == pytest.approx(0.01)


def test_foreign_digests_and_lost_batches() -> None:
    limit = InflightLimit(floor_rows=10, ceiling_rows=1_000)
    limit.committed(b"not sealed here", now=1.0)
    assert limit.target_s() is None and limit.limit == 10
    for i in range(mempool_mod.SEALED_KEEP + 5):
        limit.sealed(i.to_bytes(4, "big"), 1, in_flight=0, now=0.0)
    assert len(limit._sealed) == mempool_mod.SEALED_KEEP
    limit.committed((0).to_bytes(4, "big"), now=1.0)  # forgotten: no sample
    assert limit.target_s() is None


def test_busy_keeps_nothing_and_counts_submissions_being_checked(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_capacity=20)
    key = key_from_seed(b"\x09" * 32)
    rows = make_batch(
        key, TxKind.ANCHOR, range(40), [bytes([i]) * 32 for i in range(40)], m.genesis.chain_id
    )
    checked = m._verify

    async def slow_verify(batch):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)  # a verifier actor's round trip
        return await checked(batch)

    m._verify = slow_verify  # type: ignore[method-assign]

    async def scenario() -> None:
        first, second = await asyncio.gather(
            m.submit(rows.slice(0, 12)), m.submit(rows.slice(12, 12))
        )
        # The second came while the first was being checked: 12 + 12 rows exceed 20
        assert first.accepted == 12 and not first.busy
        assert second.busy and second.accepted == 0 and second.retry_after_ms > 0
        assert m.pending_rows == 12 and m.admitting == 0
        assert (await m.submit(rows.slice(12, 8))).accepted == 8
        full = await m.submit(rows.slice(20, 1))
        assert full.busy and m.pending_rows == 20
        assert m.counts == {"accepted": 20, "busy": 13}
        # Nothing of a refused submission was remembered: it is admitted once there is room
        m.pending, m.pending_rows = [], 0
        assert (await m.submit(rows.slice(12, 12))).rejected == {"duplicate": 8}
        status = await m.status()
        assert status["limit_rows"] == 20 and status["target_latency_ms"] is None
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())


def test_a_submission_larger_than_the_capacity_is_refused_not_busy(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_capacity=20)
    key = key_from_seed(b"\x0b" * 32)
    rows = make_batch(
        key, TxKind.ANCHOR, range(21), [bytes([i]) * 32 for i in range(21)], m.genesis.chain_id
    )

    async def scenario() -> None:
        # It could never fit, even into an empty mempool: a busy answer would be retried for
        # ever, so it is refused by name and nothing of it is kept
        answer = await m.submit(rows)
        assert not answer.busy and answer.accepted == 0
        assert answer.rejected == {"over_capacity": 21}
        assert answer.error is not None and "capacity of 20 rows" in answer.error
        assert m.pending_rows == 0 and m.admitting == 0 and m.seen == {}
        assert m.counts == {"over_capacity": 21}
        assert (await m.submit(rows.slice(0, 20))).accepted == 20
        if m._ticker is not None:
            m._ticker.cancel()

    asyncio.run(scenario())


def test_batches_never_heard_of_stop_counting_after_the_expiry(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_capacity=20)
    assert m.expiry_s == 120.0
    key = key_from_seed(b"\x0a" * 32)
    rows = make_batch(
        key, TxKind.ANCHOR, range(8), [bytes([i]) * 32 for i in range(8)], m.genesis.chain_id
    )
    # Two batches in flight: one whose commit will never be heard of, one recent
    m.in_flight, m.sealed_at = {b"lost": 12, b"recent": 5}, {b"lost": 0.0, b"recent": 100.0}
    m._refs = {b"lost": object(), b"recent": object()}

    async def scenario() -> None:
        assert (await m.submit(rows)).busy
        m._expire(119.9)
        assert m.in_flight == {b"lost": 12, b"recent": 5}
        m._expire(121.0)
        assert m.in_flight == {b"recent": 5} and list(m._refs) == [b"recent"]
        assert m.counts["expired"] == 12
        assert (await m.submit(rows)).accepted == 8
        await m.on_commit([b"recent", b"lost"])  # a late commit of the expired one is harmless
        assert m.in_flight == {} and m.sealed_at == {}
        assert m._ticker is not None
        m._ticker.cancel()

    asyncio.run(scenario())


class _Answers:
    """A validator handle's ``batches_committed`` outside Ray: fixed answers, or down."""

    def __init__(self, committed: set[bytes] | None, asked: list[int], index: int) -> None:
        self.committed, self.asked, self.index = committed, asked, index
        self.batches_committed = self

    def remote(self, digests: list[bytes]) -> asyncio.Future[list[bool]]:
        self.asked.append(self.index)
        if self.committed is None:
            raise RuntimeError("the actor died")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result([d in self.committed for d in digests])
        return fut


def test_batches_committed_while_the_own_validator_is_down_are_learnt(tmp_path: Path) -> None:
    m = mempool(tmp_path, mempool_capacity=100)
    m.in_flight, m.sealed_at = {b"old": 10, b"new": 5}, {b"old": 0.0, b"new": 99.0}
    m._refs = {b"old": object(), b"new": object()}
    asked: list[int] = []
    m.validators = {
        0: _Answers(set(), asked, 0),  # this mempool's own validator: asked last
        1: _Answers(None, asked, 1),  # down
        2: _Answers({b"old", b"new"}, asked, 2),
    }

    async def scenario() -> None:
        await m._poll_commits(100.0)
        # Only the batch in flight for long was asked about; the first validator that
        # answered was believed
        assert asked == [1, 2]
        assert m.in_flight == {b"new": 5} and list(m.sealed_at) == [b"new"]
        assert m.counts == {"commits_polled": 10} and m._poll is None
        asked.clear()
        await m._poll_commits(100.5)  # nothing old: nobody asked
        assert asked == []

    asyncio.run(scenario())
