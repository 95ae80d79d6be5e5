"""The running network on Ray: 4 validators with mempools on one machine (virtual sites).

Scenarios (one Ray instance for the module, 2 CPUs pinned, fractional actors):
- 20,000 transactions (transfers and anchors from four clients, through all four mempools,
  checked by each institution's verifier actor): every one committed exactly once, and all
  validators hold identical block hashes and state roots at every height.
- kill 1 of 4: commits continue; restart it: it catches up from its disk plus its peers.
- kill 2 of 4: commits stop and nothing forks; bring one back: commits resume.
- mempool admission: invalid signatures and duplicates are counted and dropped, a foreign
  chain's batch is refused whole, and an overloaded mempool answers busy and keeps nothing of
  that submission while everything it accepted is committed; a flood is answered busy far
  below the configured capacity (the limit is learnt from commit latency).
- a client that skipped a nonce: leaders hold back its first batch for the gap wait, not each
  later batch that carries its rows (and other clients') anew.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from rayledger.actors.mempool import seal_tag
from rayledger.actors.storage import shard_of_tx_ids
from rayledger.actors.validator import ACTOR_STRATEGIES, FAST_CLOCK_MS, SELF_START_S
from rayledger.block import BlockHeader
from rayledger.chain import SPOT_ROWS, batch_digest
from rayledger.cluster.client import Client, SubmitError
from rayledger.cluster.local import Network, NetworkOptions
from rayledger.cluster.network import load_network
from rayledger.consensus.core import CoreConfig
from rayledger.consensus.sim import STRATEGIES
from rayledger.crypto import SigningKey, public_bytes
from rayledger.errors import InvalidBlock, NotFound, StoreError
from rayledger.execution import Status
from rayledger.kernels import available_backends
from rayledger.tx import TxKind, make_batch, tx_ids_of, validate_batch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    yield
    ray.shutdown()


def start(tmp_path: Path, name: str, **kw: object) -> Network:
    opts = NetworkOptions(base_timeout_ms=400, name=name, **kw)  # type: ignore[arg-type]
    return Network.create(load_network(CONFIG), tmp_path, opts)


def client_batches(net: Network, total: int, start_nonce: int = 0) -> list[pa.RecordBatch]:
    """Four clients' signed transactions: client 0 pays client 1, the others anchor records."""
    clients = net.clients
    per = total // len(clients)
    to = net.genesis.accounts[1].public_key
    out = []
    for k, name in enumerate(clients):
        key = net.client_key(name)
        nonces = range(start_nonce, start_nonce + per)
        if k == 0:
            payloads = [to + struct.pack(">Q", 1)] * per
            out.append(make_batch(key, TxKind.TRANSFER, nonces, payloads, net.chain_id))
        else:
            payloads = [os.urandom(32) + b'{"record":%d}' % i for i in nonces]
            out.append(make_batch(key, TxKind.ANCHOR, nonces, payloads, net.chain_id))
    return out


def headers(net: Network, i: int) -> list[tuple[int, bytes, bytes]]:
    return net.headers(i)


def commit_all(net: Network, batches: list[pa.RecordBatch]) -> None:
    """Submit client k's batch through mempool k, then wait until every live validator has
    committed them all."""
    for k, b in enumerate(batches):
        net.submit(b, mempool=k)
    for b in batches:
        net.wait_committed(b)


def assert_agreement(net: Network, live: list[int]) -> int:
    chains = [headers(net, i) for i in live]
    common = min(len(c) for c in chains)
    for c in chains[1:]:
        assert c[:common] == chains[0][:common], "validators disagree on a block or state root"
    return common


def test_twenty_thousand_transactions_committed_once_everywhere(tmp_path: Path) -> None:
    # The verifier actors are on here (by default only on larger machines): both paths run.
    net = start(tmp_path, "e2e", batch_rows=2_500, verifier_actors=True)
    try:
        batches = client_batches(net, 20_000)
        for k, b in enumerate(batches):
            for part in range(0, b.num_rows, 2_500):
                res = net.submit(b.slice(part, 2_500), mempool=k % 4)
                assert res.accepted == min(2_500, b.num_rows - part) and not res.busy
        for b in batches:
            net.wait_committed(b, timeout_s=300)
        assert_agreement(net, [0, 1, 2, 3])
        submitted = {r.tobytes() for b in batches for r in tx_ids_of(b)}
        for i in range(4):
            ids = ray.get(net.validator(i).committed_ids.remote())
            keys = [r.tobytes() for r in ids]
            assert len(keys) == len(set(keys)), "a transaction was committed twice"
            assert set(keys) == submitted
        # Each client's rows went through one mempool in nonce order and were proposed in
        # the order that mempool sealed them, though checks finish out of order: none fails
        # its nonce
        assert ray.get(net.validator(0).status_counts.remote()) == {int(Status.OK): 20_000}
        assert all(s["evidence"] == 0 for s in net.status())
        # Each verifier checked the batches of the other three institutions' mempools (each
        # mempool took one client's 5,000 rows); its own mempool's batches came tagged with
        # its validator's seal key and were not checked a second time
        checked = [ray.get(net._actor(f"verifier-{i}").status.remote()) for i in range(4)]
        # (a batch a mempool sent again while its first copy was being checked is not
        # checked again). On a loaded machine a proposal can name a batch before its
        # announcement reaches a validator: that validator fetches it from a peer and checks
        # it itself, in full (``fetched_rows``), and its verifier may never see it.
        fetched = [(s["fetched_rows"], s["rejected"]) for s in net.status()]
        for c, (rows, _) in zip(checked, fetched, strict=True):
            assert c["checked_rows"] <= 15_000 <= c["checked_rows"] + rows, (checked, fetched)
            assert not c["refused"], checked
        assert all(s["own_batches"] > 0 for s in net.status())
        assert [s["mempool"]["sealing_for"] for s in net.status()] == [[0], [1], [2], [3]]
        assert {c["backend"] for c in checked} == {available_backends()[0]}
        assert [s["verifier"]["backend"] for s in net.status()] == [available_backends()[0]] * 4
        # Each mempool's admission checks went through its institution's verifier
        assert sum(c["admission_rows"] for c in checked) == 20_000
        # Consensus messages went on direct streams between the validators (by Ray call
        # only until each stream was up: a few at the start)
        for s in net.status():
            streams = s["streams"]
            assert streams["connected"] == [j for j in range(4) if j != s["index"]]
            # (inbound: from the three peers and the four mempools)
            assert streams["inbound"] == 7 and streams["frames_in"] > 5
            assert streams["frames_out"] > 5 and streams["frames_out"] > streams["ray_sends"]
            # and the mempools' sealed batches on the mempools' streams to every validator
            assert streams["batch_frames_in"] > 0
            batches_out = s["mempool"]["streams"]
            assert batches_out["connected"] == [0, 1, 2, 3]
            assert batches_out["frames_out"] > batches_out["ray_sends"]
    finally:
        net.shutdown()


def wait_height(net: Network, i: int, height: int, timeout_s: float = 60) -> None:
    t0 = time.monotonic()
    while net.height(i) < height:
        assert time.monotonic() - t0 < timeout_s, f"validator {i} stuck below {height}"
        time.sleep(0.2)


def test_kill_one_commits_continue_and_restart_catches_up(tmp_path: Path) -> None:
    # State checkpoints every 5 blocks, 2 behind the head: the restart re-executes from the
    # last one, not from genesis
    net = start(tmp_path, "kill1", snapshot_every_blocks=5, state_lag_blocks=2)
    try:
        commit_all(net, client_batches(net, 2_000))
        # Killed only once it has checkpointed its state (at a height of 5 or more; idle
        # blocks come every half round timeout)
        t0 = time.monotonic()
        while net.status()[3]["state_checkpoint"] < 5:
            assert time.monotonic() - t0 < 60, "validator 3 wrote no state checkpoint"
            time.sleep(0.2)
        # Killed and restarted as `rayledger chaos` does, from another process's handles:
        # this one's handle to validator 3 goes stale
        other = Network(tmp_path)
        other.kill(3)
        assert net.status()[3]["down"]
        second = client_batches(net, 2_000, start_nonce=500)
        for k, b in enumerate(second):
            net.submit(b, mempool=k)  # mempool 3 too: its validator is down, not it
        for b in second:
            net.wait_committed(b, validators=[0, 1, 2])
        # The dead validator's rounds as leader ended by timeout certificates, which the live
        # ones count (`rayledger status` shows them)
        assert all(net.status()[i]["rounds_by_timeout"] > 0 for i in (0, 1, 2))
        # Nobody reports those commits to mempool 3: it asks the other validators, and its
        # limit is free again
        t0 = time.monotonic()
        while ray.get(net.mempool(3).status.remote())["in_flight_rows"]:
            assert time.monotonic() - t0 < 60, "mempool 3 never learnt its batches committed"
            time.sleep(0.5)
        assert ray.get(net.mempool(3).status.remote())["counts"]["commits_polled"] > 0
        assert other.restart(3)
        # Up now: a second restart (an operator's, after Ray's own) has nothing to do
        assert not other.restart(3)
        # The live view (`rayledger up`) finds the restarted validator by its name
        restored = net.status()[3]["restored_from_snapshot"]
        assert restored >= 5
        top = net.height(0)
        wait_height(net, 3, top)
        for b in second:
            net.wait_committed(b, validators=[3])
        assert_agreement(net, [0, 1, 2, 3])
        # Validator 3's state is the others' (the snapshot held it exactly): the same next
        # transfer succeeds on all and leaves the same state root
        third = client_batches(net, 400, start_nonce=1_000)
        for k, b in enumerate(third):
            net.submit(b, mempool=k)
        for b in third:
            net.wait_committed(b)
        assert_agreement(net, [0, 1, 2, 3])
        # The restarted validator gave its mempool a new seal key: mempool 3's batch of the
        # third round came tagged under it and was not checked a second time
        assert net.status()[3]["own_batches"] > 0
        # Its peers dropped their streams to the dead process and opened new ones to the
        # restarted one (told by it where), and it to them (told in their answers)
        t0 = time.monotonic()
        while True:
            st = net.status()
            if all(
                s["streams"]["connected"] == [j for j in range(4) if j != i]
                for i, s in enumerate(st)
            ):
                break
            assert time.monotonic() - t0 < 30, [s["streams"] for s in st]
            time.sleep(0.5)
        frames = st[3]["streams"]["frames_in"]
        wait_height(net, 3, net.height(0) + 3)
        assert net.status()[3]["streams"]["frames_in"] > frames
        # The mempools stream their batches to the restarted process too (it told them where
        # when it started): the third round's came that way
        assert st[3]["streams"]["batch_frames_in"] > 0
        assert all(s["mempool"]["streams"]["connected"] == [0, 1, 2, 3] for s in st)
    finally:
        net.shutdown()


def wait_count(mempool: object, key: str, timeout_s: float = 30) -> None:
    """Wait until a mempool has counted ``key`` at least once."""
    deadline = time.monotonic() + timeout_s
    while not ray.get(mempool.status.remote())["counts"].get(key):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"no {key} within {timeout_s} s"
        time.sleep(0.1)


def test_kill_two_stops_commits_without_fork_then_resumes(tmp_path: Path) -> None:
    net = start(tmp_path, "kill2")
    try:
        net.kill(2)
        net.kill(3)
        time.sleep(1.0)
        before = {i: net.height(i) for i in (0, 1)}
        batch = client_batches(net, 400)[1]
        net.submit(batch, mempool=0)
        time.sleep(3.0)
        after = {i: net.height(i) for i in (0, 1)}
        # Without a quorum nothing new commits (one block already certified may finish).
        assert all(after[i] <= before[i] + 1 for i in (0, 1))
        assert_agreement(net, [0, 1])
        net.restart(2)
        # Validator 2 starts with nothing in memory: mempool 0 sends it the batch it holds in
        # flight (announced while validator 2 was down), not only the batches after it
        wait_count(net.mempool(0), "announced_held")
        net.wait_committed(batch, validators=[0, 1, 2], timeout_s=120)
        assert_agreement(net, [0, 1, 2])
    finally:
        net.shutdown()


def test_every_validator_down_at_once_the_chain_resumes_from_their_disks(tmp_path: Path) -> None:
    """All four validators killed in turn, as `rayledger down`, a power cut or a lost Ray
    cluster would: the newest certified block is then usually committed nowhere, and each
    validator's persisted high QC may name it. Each keeps the proposals it voted for, with
    their batches, in its safety record, so that the restarted network takes that block again
    and extends it (before, 1 run of 3 of `rayledger up` killed and resumed stayed stopped
    for good). Three rounds of it, with transactions in flight."""
    net = start(tmp_path, "allfour")
    try:
        commit_all(net, client_batches(net, 400))
        for cycle in range(3):
            more = client_batches(net, 400, start_nonce=100 * (cycle + 1))
            net.submit(more[cycle], mempool=cycle)
            time.sleep(0.2 + 0.3 * cycle)
            top = max(net.height(i) for i in range(4))
            for i in range(4):
                net.kill(i)
            for i in range(4):
                net.restart(i)
            t0 = time.monotonic()
            while min(net.height(i) for i in range(4)) < top + 3:
                heights = [net.height(i) for i in range(4)]
                assert time.monotonic() - t0 < 60, f"cycle {cycle}: stopped at {heights} ({top})"
                time.sleep(0.2)
            net.wait_committed(more[cycle], validators=[0, 1, 2, 3], timeout_s=60)
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_mempool_admission_and_backpressure(tmp_path: Path) -> None:
    net = start(tmp_path, "mempool", mempool_capacity=3_000, batch_rows=1_000)
    try:
        good = client_batches(net, 2_000)[1]
        sigs = np.frombuffer(good.column("signature").buffers()[1], np.uint8).copy()
        sigs[64 * 5] ^= 1
        forged = pa.RecordBatch.from_arrays(
            [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(64), good.num_rows, [None, pa.py_buffer(sigs)]
                )
                if n == "signature"
                else good.column(n)
                for n in good.schema.names
            ],
            schema=good.schema,
        )
        # Bytes from a peer that are not consensus messages are counted and dropped
        ray.get(net.validator(0).deliver.remote(1, b"\x00\x00\x00\x01garbage"))
        ray.get(net.validator(0).deliver.remote(1, ["a", "list"]))
        rejected = ray.get(net.validator(0).status.remote())["rejected"]
        assert rejected["wire: wrong_length"] == 1 and rejected["wire: not_bytes"] == 1
        # The emulated WAN hold a sender asks for: anything but a finite time is dropped
        # unread; a time far ahead is held no longer than the link's latency (5 ms here)
        for hold in ("soon", float("nan"), float("inf"), True):
            ray.get(net.validator(0).deliver.remote(1, b"\x00\x00\x00\x01garbage", hold))
        t0 = time.monotonic()
        far = time.time() + 3600
        ray.get(net.validator(0).deliver.remote(1, b"\x00\x00\x00\x01garbage", far))
        while ray.get(net.validator(0).status.remote())["rejected"]["wire: wrong_length"] < 2:
            assert time.monotonic() - t0 < 5, "a message was held past its link's latency"
            time.sleep(0.01)
        rejected = ray.get(net.validator(0).status.remote())["rejected"]
        assert rejected["wire: bad_hold"] == 4 and rejected["wire: wrong_length"] == 2
        # A malformed stream endpoint from a peer is counted and changes nothing: the stream
        # to that peer stays up
        t0 = time.monotonic()
        while (
            1 not in (before := ray.get(net.validator(0).status.remote())["streams"])["connected"]
        ):
            assert time.monotonic() - t0 < 30, "no stream from validator 0 to 1"
            time.sleep(0.1)
        for bad in (("h", 0, b"t" * 32), ("h", 5, b"short"), "h:5"):
            ray.get(net.validator(0).peer_endpoint.remote(1, bad))
        after = ray.get(net.validator(0).status.remote())
        assert after["rejected"]["stream: bad_endpoint"] == 3
        assert after["streams"]["connected"] == before["connected"]
        # A batch announced with a tag that is not the validator's seal key's (as anyone in
        # the cluster could send) is checked in full: the bad signature refuses it
        bad = forged.slice(0, 100)
        digest = batch_digest(
            validate_batch(
                bad, chain_id=net.chain_id, max_payload=net.genesis.limits.max_payload_bytes
            )
        )
        for tag in (b"\x00" * 32, seal_tag(b"\x01" * 32, digest, bad)):
            ray.get(net.validator(0).batch_ready.remote(digest, [ray.put(bad)], None, tag))
        st = ray.get(net.validator(0).status.remote())
        assert st["rejected"]["batch: invalid_signature"] == 2 and st["own_batches"] == 0
        res = net.submit(forged.slice(0, 100), mempool=0)
        assert res.accepted == 99 and res.rejected == {"invalid_signature": 1}
        res = net.submit(good.slice(0, 100), mempool=0)
        assert res.accepted == 1 and res.rejected == {"duplicate": 99}
        other = make_batch(
            net.client_key("records-office"), TxKind.ANCHOR, [0], [b"x" * 32], b"\x07" * 32
        )
        res = net.submit(other, mempool=0)
        assert res.accepted == 0 and res.rejected == {"wrong_chain": 1}
        # Pending plus in-flight rows may not exceed 3,000: a submission larger than that could
        # never fit, and is refused by name (a busy answer would be retried for ever). Busy
        # answers under overload: test_a_flooded_mempool_answers_busy_below_its_capacity...
        big = client_batches(net, 16_000, start_nonce=1_000)[2]
        res = net.submit(big, mempool=1)
        assert not res.busy and res.accepted == 0 and big.num_rows > 3_000
        assert res.rejected == {"over_capacity": big.num_rows} and "capacity" in str(res.error)
        assert ray.get(net.mempool(1).status.remote())["pending_rows"] == 0
        accepted = [good.slice(100, 400)]
        assert good.num_rows == 500
        assert net.submit(accepted[0], mempool=1).accepted == 400
        for b in accepted + [good.slice(0, 100)]:
            net.wait_committed(b)
    finally:
        net.shutdown()


def test_a_flooded_mempool_answers_busy_below_its_capacity_and_commits_what_it_took(
    tmp_path: Path,
) -> None:
    """The in-flight limit is learnt, starting at two batches: far below the 200,000-row
    capacity, a flood is answered busy at once (with a hint), and every row taken commits."""
    net = start(tmp_path, "flood", batch_rows=250)
    try:
        chunks = client_batches(net, 4_000)  # four senders, 1,000 rows each
        answers = ray.get([net.mempool(0).submit.remote(c) for c in chunks])
        busy = [c for c, a in zip(chunks, answers, strict=True) if a.busy]
        assert busy and all(a.retry_after_ms > 0 and a.accepted == 0 for a in answers if a.busy)
        assert sum(a.accepted for a in answers) == 1_000 * (len(chunks) - len(busy))
        for c in busy:
            deadline = time.monotonic() + 120
            while (answer := net.submit(c, mempool=0)).busy:
                assert time.monotonic() < deadline, "busy for two minutes"
                time.sleep(answer.retry_after_ms / 1000)
            assert answer.accepted == 1_000
        for c in chunks:
            net.wait_committed(c)
        status = ray.get(net.mempool(0).status.remote())
        assert status["capacity_rows"] == 200_000 and status["limit_rows"] >= 500
        assert status["counts"]["accepted"] == 4_000 and status["counts"]["busy"] >= 1_000
        assert status["pending_rows"] == 0
    finally:
        net.shutdown()


def test_equivocating_validator_is_caught_and_cannot_fork(tmp_path: Path) -> None:
    # Every consensus message by Ray call here (the direct streams are off): that path too
    net = start(tmp_path, "byz", peer_streams=False)
    try:
        net.set_strategy(1, "equivocating-leader")
        batches = client_batches(net, 4_000)
        for k, b in enumerate(batches):
            net.submit(b, mempool=k)
        for b in batches:
            net.wait_committed(b, validators=[0, 2, 3], timeout_s=180)
        assert_agreement(net, [0, 1, 2, 3])
        honest = [s for s in net.status() if s["index"] != 1]
        assert sum(s["evidence"] for s in honest) > 0
        assert all(set(s["evidence_kinds"]) <= {"equivocating_proposal"} for s in honest)
        assert all(
            s["streams"]["frames_out"] == 0 and s["streams"]["ray_sends"] > 0 for s in net.status()
        )
        # and every batch by Ray call too
        assert all(
            s["mempool"]["streams"]["frames_out"] == 0
            and s["mempool"]["streams"]["ray_sends"] > 0
            and s["streams"]["batch_frames_in"] == 0
            for s in net.status()
        )
    finally:
        net.shutdown()


def test_each_strategy_of_the_simulator_plays_in_a_validator_actor(tmp_path: Path) -> None:
    """The simulator's Byzantine strategies the actors lacked, each played by validator 3 in
    turn under load: the others keep committing, nothing forks, and what each strategy does
    shows (`rayledger chaos byzantine N STRATEGY` refused the simulator's `equivocate`)."""
    assert sorted(ACTOR_STRATEGIES) == sorted(STRATEGIES)
    net = start(tmp_path, "strategies")
    try:
        nonce = 0
        for strategy in ("equivocate", "vote-withholder", "slow-leader", "stale-replayer"):
            net.set_strategy(3, strategy)
            assert net.status()[3]["strategy"] == strategy
            batches = client_batches(net, 800, start_nonce=nonce)
            nonce += 200
            for k, b in enumerate(batches):
                net.submit(b, mempool=k)
            for b in batches:
                net.wait_committed(b, validators=[0, 1, 2], timeout_s=120)
            honest = net.status()[:3]
            if strategy == "equivocate":
                # Two votes a round to the next leader, two blocks a round it leads
                kinds = {k for s in honest for k in s["evidence_kinds"]}
                assert "double_vote" in kinds and kinds <= {"double_vote", "equivocating_proposal"}
            # (A vote withholder still leads its turns: seen live as a proposer, it is not
            # passed over, and the other three's votes make every QC)
        net.set_strategy(3, "none")
        last = client_batches(net, 400, start_nonce=nonce)
        for k, b in enumerate(last):
            net.submit(b, mempool=k)
        for b in last:
            net.wait_committed(b, timeout_s=120)
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_blocks_stamped_an_hour_ahead_get_no_votes(tmp_path: Path) -> None:
    # Validator 2's clock runs an hour ahead: the others refuse to vote for its blocks, so
    # no committed block is stamped further ahead than the bound, and the chain goes on
    net = start(tmp_path, "clock", storage_shards=1)
    try:
        net.set_strategy(2, "fast-clock")
        commit_all(net, client_batches(net, 2_000))
        # `rayledger status` shows each validator's clock against the caller's
        offsets = [s["clock_offset_ms"] for s in net.status()]
        assert abs(offsets[2] - FAST_CLOCK_MS) < 1_000, offsets
        assert all(abs(offsets[i]) < 1_000 for i in (0, 1, 3)), offsets
        net.set_strategy(2, "none")  # and its clock is set right
        assert abs(net.status()[2]["clock_offset_ms"]) < 1_000
        commit_all(net, client_batches(net, 400, start_nonce=500))
        assert_agreement(net, [0, 1, 2, 3])
        now_ms = time.time() * 1000
        top = net.status()[0]["shards"]["0"] or 0  # the height its shard has applied
        assert top > 0
        stamps = [
            BlockHeader.decode(ray.get(net.shard(0, 0).header.remote(h))).timestamp_ms
            for h in range(1, top + 1)
        ]
        assert max(stamps) <= now_ms + CoreConfig.max_clock_ahead_ms
        refused = "proposal timestamp N ms ahead of this validator's clock"
        statuses = net.status()
        counts = [s["rejected"].get(refused, 0) for s in statuses]
        assert all(counts[i] > 0 for i in (0, 1, 3)) and counts[2] == 0, counts
        # Each validator process holds its directory's lock (actors.storage.lock), and each
        # storage shard its own
        for s in statuses:
            held = (tmp_path / f"validator-{s['index']}" / "validator.lock").read_text()
            assert held.startswith(f"pid {s['pid']} on ")
            assert (tmp_path / f"validator-{s['index']}" / "shard-0.lock").read_text()
    finally:
        net.shutdown()


def test_partitioned_site_under_wan_latency_recovers(tmp_path: Path) -> None:
    net = start(tmp_path, "part")
    try:
        assert max(max(row) for row in net.settings["latency_ms"]) > 0  # the WAN matrix is on
        net.partition([[3]])
        batches = client_batches(net, 2_000)
        for k, b in enumerate(batches):
            net.submit(b, mempool=k % 3)
        for b in batches:
            net.wait_committed(b, validators=[0, 1, 2])
        cut_height = net.height(3)
        assert cut_height < net.height(0)
        # The cut-off site's own mempool takes rows too: only its validator hears of them
        # (the others drop that mempool's batches, as validator 3 dropped theirs)
        cut_off = client_batches(net, 400, start_nonce=500)[3]
        assert net.submit(cut_off, mempool=3).accepted == cut_off.num_rows
        deadline = time.monotonic() + 30
        while not all(s["rejected"].get("batch: partitioned", 0) for s in net.status()):
            assert time.monotonic() < deadline, [s["rejected"] for s in net.status()]
            time.sleep(0.2)
        net.heal()
        # The validators cut off from mempool 3 ask it for the batches it holds in flight
        wait_count(net.mempool(3), "announced_held")
        # The same client's next rows, through the same mempool at once after the heal, reach
        # every validator, while the rows before them are held by validator 3 alone (still
        # catching up): the other leaders leave them out until validator 3 has proposed those
        # (a gap's wait), so that none fails its nonce
        after = client_batches(net, 400, start_nonce=600)[3]
        assert net.submit(after, mempool=3).accepted == after.num_rows
        for b in batches:
            net.wait_committed(b, validators=[3], timeout_s=120)
        # After the heal validator 3 proposes them in its turn, and the others fetch them
        net.wait_committed(cut_off, timeout_s=120)
        net.wait_committed(after, timeout_s=120)
        assert_agreement(net, [0, 1, 2, 3])
        for i in range(4):
            assert ray.get(net.validator(i).status_counts.remote()) == {int(Status.OK): 2_200}
    finally:
        net.shutdown()


def test_a_batch_only_a_crashed_validator_held_is_sent_again_and_committed(
    tmp_path: Path,
) -> None:
    """A partition cuts site 3 off while its mempool seals a batch (only validator 3 hears of
    it), then validator 3 crashes and the partition heals: the mempool sends the batch, long
    in flight, to every validator again, and the others commit it; the client's next rows,
    submitted at the heal, wait for it rather than fail their nonces. While the partition
    lasts, the batch sent again is dropped as the first was."""
    net = start(tmp_path, "resend")
    try:
        net.partition([[3]])
        first, after = (client_batches(net, 400, start_nonce=s)[3] for s in (0, 100))
        assert net.submit(first, mempool=3).accepted == first.num_rows
        ids = [r.tobytes() for r in tx_ids_of(first)]
        deadline = time.monotonic() + 30
        mempool = net.mempool(3)
        # Long in flight (3 s): sent again, and dropped again at the partition
        while not ray.get(mempool.status.remote())["counts"].get("reannounced"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
        # to each of the four validators, by Ray call (not counted as sends for want of a stream)
        assert ray.get(mempool.status.remote())["streams"]["resends"] >= 4
        assert ray.get(net.validator(0).locate.remote(ids)) == [None] * len(ids)
        assert net.status()[0]["batches_resent"] == 0
        net.kill(3)
        net.heal()
        assert net.submit(after, mempool=3).accepted == after.num_rows
        net.wait_committed(first, timeout_s=60, validators=[0, 1, 2])
        net.wait_committed(after, timeout_s=60, validators=[0, 1, 2])
        assert sum(s.get("batches_resent", 0) for s in net.status()) >= 1
        for i in range(3):
            assert ray.get(net.validator(i).status_counts.remote()) == {int(Status.OK): 200}
        # Sent again once committed (a validator answered the mempool's poll before this one
        # committed it): neither checked nor held again
        before = net.status()[0]
        v0 = net.validator(0)
        assert ray.get(v0.batches_committed.remote([batch_digest(first)])) == [True]
        ray.get(
            v0.batch_ready.remote(batch_digest(first), [ray.put(first)], None, None, resent_by=3)
        )
        after_status = net.status()[0]
        assert after_status["batches_resent"] == before["batches_resent"]
        assert after_status["batches_held"] == before["batches_held"]
    finally:
        net.shutdown()


def test_a_mempool_flooding_the_validators_with_forged_batches_costs_them_little(
    tmp_path: Path,
) -> None:
    """A Byzantine mempool (this driver, announcing as mempool 3) sends every validator 30
    batches of 1,000 rows, every signature forged: each validator refuses each one on a
    sample of its rows (not 1,000 checks, each about three times the cost of a sound one),
    and the other mempools' transactions commit meanwhile, every one."""
    net = start(tmp_path, "forged")
    try:
        key = net.client_key(net.clients[3])
        flood = []
        for j in range(30):
            nonces = range(1000 * j, 1000 * (j + 1))
            b = make_batch(
                key, TxKind.ANCHOR, nonces, [os.urandom(32) for _ in nonces], net.chain_id
            )
            sigs = np.frombuffer(b.column("signature").buffers()[1], np.uint8).copy()
            sigs[7::64] ^= 1
            forged = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(64), b.num_rows, [None, pa.py_buffer(sigs)]
            )
            b = b.set_column(b.schema.get_field_index("signature"), "signature", forged)
            digest = batch_digest(validate_batch(b, chain_id=net.chain_id, max_payload=4096))
            flood.append((digest, ray.put(b)))
        checked_before = [s["signature_checks"][0] for s in net.status()]
        for seq, (digest, ref) in enumerate(flood, start=1):
            for i in range(4):
                net.validator(i).batch_ready.remote(digest, [ref], (3, seq), None)
        honest = client_batches(net, 2000)[:3]  # 500 rows of each of three clients
        for k, b in enumerate(honest):
            assert net.submit(b, mempool=k).accepted == b.num_rows
        for b in honest:
            net.wait_committed(b, timeout_s=60)
        deadline = time.time() + 60
        while time.time() < deadline:
            refused = [s["rejected"].get("batch: invalid_signature", 0) for s in net.status()]
            if refused == [30] * 4:
                break
            time.sleep(0.5)
        assert refused == [30] * 4
        after = [s["signature_checks"][0] for s in net.status()]
        checked = [a - b for a, b in zip(after, checked_before, strict=True)]
        # The honest rows of the other institutions' mempools (1,000 or 1,500) and the
        # sample of each forged batch (32 rows, each perhaps checked by both libraries); all
        # of their rows would be 31,000 or more
        assert all(c <= 1500 + 30 * 2 * SPOT_ROWS for c in checked), checked
        counts = ray.get(net.validator(0).status_counts.remote())
        assert counts == {int(Status.OK): 1500}
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_a_client_that_skipped_a_nonce_holds_batches_back_once_not_each_time(
    tmp_path: Path,
) -> None:
    """A client skipped its nonce 0 for good: all its rows fail ``BAD_NONCE``. Its mempool
    holds each of its rows for the gap hold, then seals it apart (see the next test). Leaders
    hold back the first batch with its rows for the gap wait (its nonce 0 might be on its way
    through another mempool), but not the batches after it (they would each have waited the
    gap wait in turn). A leader that waits a while asks the batch's mempool for its backlog
    (the earlier batch may have been lost on the way), and asks no more once the gap is
    old."""
    net = start(tmp_path, "gap")
    try:
        broken, honest = (net.client_key(name) for name in net.clients[1:3])

        def rows(broken_nonce: int, honest_nonces: range) -> pa.RecordBatch:
            parts = [
                make_batch(
                    key, TxKind.ANCHOR, nonces, [os.urandom(32) for _ in nonces], net.chain_id
                )
                for key, nonces in ((broken, [broken_nonce]), (honest, honest_nonces))
            ]
            return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]

        first = rows(1, range(0, 50))
        assert net.submit(first).accepted == 51
        net.wait_committed(first, timeout_s=60)
        status = net.status()
        held_back = [s["batches_deferred"] for s in status]
        assert sum(held_back) > 0
        # Asked for their backlog; each mempool asked sent what it held in flight again
        asked = [s["backlog_asked"] for s in status]
        # A 5 s wait asks at 1.25 s and 3.75 s at most: twice per validator
        assert 0 < sum(asked) <= 4 * 2, asked
        counts = [ray.get(net.mempool(j).status.remote())["counts"] for j in range(4)]
        assert sum(c.get("announced_held", 0) for c in counts) > 0, counts
        time.sleep(5.5)  # the gap is older than the gap wait (5 s here) at every leader
        later = [rows(2 + k, range(50 + 10 * k, 60 + 10 * k)) for k in range(5)]
        for b in later:
            assert net.submit(b).accepted == 11
            time.sleep(0.2)
        for b in later:
            net.wait_committed(b, timeout_s=60)
        status = net.status()
        assert [s["batches_deferred"] for s in status] == held_back
        assert [s["backlog_asked"] for s in status] == asked
        counts = ray.get(net.validator(0).status_counts.remote())
        assert counts == {int(Status.OK): 100, int(Status.BAD_NONCE): 6}
    finally:
        net.shutdown()


def test_rows_ahead_of_their_senders_nonce_wait_apart_and_commit_once_it_comes(
    tmp_path: Path,
) -> None:
    """One submission mixes a client whose nonce 0 is late (its rows 1..5 come first) with
    another client's rows in order: the mempool seals the rows in order at once and parks
    the others, so the other client's rows commit while they wait; nonce 0 then arrives and
    all six commit OK, in order."""
    net = start(tmp_path, "park", mempool_gap_hold_ms=120_000)
    try:
        late, prompt = (net.client_key(name) for name in net.clients[1:3])

        def rows(key: SigningKey, nonces: list[int]) -> pa.RecordBatch:
            return make_batch(
                key, TxKind.ANCHOR, nonces, [os.urandom(32) for _ in nonces], net.chain_id
            )

        ahead, in_order = rows(late, [1, 2, 3, 4, 5]), rows(prompt, list(range(40)))
        mixed = pa.Table.from_batches([ahead, in_order]).combine_chunks().to_batches()[0]
        assert net.submit(mixed, mempool=2).accepted == 45
        net.wait_committed(in_order, timeout_s=60)
        status = ray.get(net.mempool(2).status.remote())
        assert status["parked_rows"] == 5 and status["counts"]["parked"] == 5
        assert (
            ray.get(net.validator(0).locate.remote([r.tobytes() for r in tx_ids_of(ahead)]))
            == [None] * 5
        )
        fill = rows(late, [0])
        assert net.submit(fill, mempool=2).accepted == 1
        net.wait_committed(ahead, timeout_s=60)
        counts = ray.get(net.validator(0).status_counts.remote())
        assert counts == {int(Status.OK): 46}
        assert ray.get(net.mempool(2).status.remote())["parked_rows"] == 0
    finally:
        net.shutdown()


def test_a_shard_verifier_or_mempool_comes_back_however_often_it_crashes(tmp_path: Path) -> None:
    """Ray restarts a crashed storage shard (from its disk), verifier or mempool every time,
    not only the first few: a network runs for months. A restarted mempool asks the
    validators for their handles again: the rows submitted to it after its crashes commit."""
    net = start(tmp_path, "crashes", verifier_actors=True)
    try:
        batches = client_batches(net, 400)
        for k, b in enumerate(batches):
            net.submit(b, mempool=k)
        for b in batches:
            net.wait_committed(b, timeout_s=60)
        for _ in range(5):
            net.crash_shard(0, 0)
            ray.kill(net._actor("verifier-0"), no_restart=False)
            ray.kill(net.mempool(1), no_restart=False)
            deadline = time.monotonic() + 60
            while True:
                try:
                    ray.get(net.shard(0, 0).height.remote(), timeout=10)
                    ray.get(net._actor("verifier-0").status.remote(), timeout=10)
                    ray.get(net.mempool(1).status.remote(), timeout=10)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    assert time.monotonic() < deadline, "not restarted"
                    time.sleep(0.2)
        more = client_batches(net, 400, start_nonce=100)
        for k, b in enumerate(more):
            net.submit(b, mempool=k)
        for k, b in enumerate([*batches, *more]):
            try:
                net.wait_committed(b, validators=[0], timeout_s=60)  # read through its shard
            except TimeoutError:
                # Seen once (Python 3.12, a full tests/actors run), not reproduced since: say
                # which batch and where every validator, shard and mempool stood
                where = [
                    {
                        key: st.get(key)
                        for key in ("index", "height", "shards", "rejected", "fetched_rows", "down")
                    }
                    | {
                        "mempool": {
                            m: st.get("mempool", {}).get(m)
                            for m in ("pending_rows", "in_flight_rows", "counts", "validators")
                        }
                    }
                    for st in net.status()
                ]
                raise AssertionError(
                    f"batch {k} (mempool {k % 4}) not committed: {where}"
                ) from None
    finally:
        net.shutdown()


def test_a_crashed_mempool_loses_no_row_it_accepted(tmp_path: Path) -> None:
    """Rows a mempool answered "accepted" for are in its journal: when its process dies
    before it sealed them (a long batch interval holds them here), Ray restarts it and it
    admits them again, and they commit. Without the journal they were lost."""
    net = start(tmp_path, "mcrash", batch_interval_ms=600_000, batch_rows=10_000)
    try:
        batch = client_batches(net, 400)[1]
        assert net.submit(batch, mempool=1).accepted == 100
        status = ray.get(net.mempool(1).status.remote())
        assert status["pending_rows"] == 100 and status["journal"]["live_entries"] == 100
        ray.kill(net.mempool(1), no_restart=False)
        net.wait_committed(batch, validators=[0, 1, 2, 3], timeout_s=60)
        status = ray.get(net.mempool(1).status.remote())
        assert status["counts"]["recovered"] == 100
        assert status["journal"]["recovered_rows"] == 100
        # Committed: nothing is left in the journal to admit again at the next start
        t0 = time.monotonic()
        while ray.get(net.mempool(1).status.remote())["journal"]["live_entries"]:
            assert time.monotonic() - t0 < 30, "the committed rows stay in the journal"
            time.sleep(0.2)
        assert list((tmp_path / "mempool-1" / "journal").glob("*.log")) == []
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_a_crashed_mempool_sends_its_sealed_batches_again_as_they_were(tmp_path: Path) -> None:
    """Batches a mempool sealed and announced before it crashed, held by the validators but
    not committed yet (two of four down: no quorum), go out again under their digests from
    the restarted mempool's journal: every row commits once, none twice (sealed anew with
    other rows, they were ordered twice, the second copy BAD_NONCE)."""
    net = start(tmp_path, "mreseal")
    try:
        net.kill(2)
        net.kill(3)
        batch = client_batches(net, 400)[1]
        for part in (batch.slice(0, 50), batch.slice(50, 50)):  # two batches
            assert net.submit(part, mempool=1).accepted == 50
            t0 = time.monotonic()
            while ray.get(net.mempool(1).status.remote())["pending_rows"]:
                assert time.monotonic() - t0 < 10, "not sealed"
                time.sleep(0.05)
        assert ray.get(net.mempool(1).status.remote())["in_flight_rows"] == 100
        ray.kill(net.mempool(1), no_restart=False)
        t0, seen = time.monotonic(), None
        while True:
            try:
                seen = ray.get(net.mempool(1).status.remote(), timeout=10)
                counts = seen["counts"]
                if counts.get("recovered"):
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                seen = repr(exc)[:300]
            # (once, in a full `make test` on 2 cores, not within 60 s: what it showed then
            # was not kept; now it is)
            assert time.monotonic() - t0 < 120, f"mempool 1 did not recover: {seen}"
            time.sleep(0.2)
        assert counts["recovered_batches"] == 2 and counts["recovered"] == 100
        net.restart(2)
        net.restart(3)
        net.wait_committed(batch, validators=[0, 1, 2, 3], timeout_s=90)
        for i in range(4):
            ids = ray.get(net.validator(i).committed_ids.remote())
            assert len(ids) == len({r.tobytes() for r in ids}) == 100
            assert ray.get(net.validator(i).status_counts.remote()) == {int(Status.OK): 100}
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_a_validator_whose_process_dies_comes_back_by_itself(tmp_path: Path) -> None:
    """A validator's process that dies (a crash, not `rayledger chaos kill`) is restarted by
    Ray from its own disk, rejoins its peers and its mempool by itself and catches up: no
    operator needed, however often it happens."""
    net = start(tmp_path, "vcrash")
    try:
        commit_all(net, client_batches(net, 400))
        for crash in range(2):
            pid = net.status()[2]["pid"]
            ray.kill(net.validator(2), no_restart=False)
            more = client_batches(net, 400, start_nonce=100 * (crash + 1))
            for k, b in enumerate(more):
                net.submit(b, mempool=k)
            t0 = time.monotonic()
            while True:
                st = net.status()[2]
                if "down" not in st and st["pid"] != pid and st["height"] >= net.height(0):
                    break
                assert time.monotonic() - t0 < 60, f"validator 2 not back: {st}"
                time.sleep(0.2)
            for b in more:
                net.wait_committed(b, validators=[0, 1, 2, 3])
        assert_agreement(net, [0, 1, 2, 3])
        # Its peers and the mempools stream to the new process (it told them where)
        t0 = time.monotonic()
        while not all(2 in s["streams"]["connected"] for i, s in enumerate(net.status()) if i != 2):
            assert time.monotonic() - t0 < 30, "peers did not reconnect to validator 2"
            time.sleep(0.5)
        assert not any(s["self_started"] for s in net.status())
        # A process that comes back with nobody to start it (Ray's "restarted?" answered
        # wrongly, or never): the validator's directory says it ran before, so it starts
        # itself, SELF_START_S later, and catches up
        ray.kill(net.validator(2), no_restart=True)
        net._handles.pop("validator-2", None)
        more = client_batches(net, 400, start_nonce=300)
        for k, b in enumerate(more):
            net.submit(b, mempool=k)
        net._start_validator(2)  # created as Ray would bring it back; start() never called
        t0 = time.monotonic()
        while True:
            st = net.status()[2]
            if st.get("self_started") and st["height"] >= net.height(0):
                break
            assert time.monotonic() - t0 < SELF_START_S + 60, f"validator 2 not back: {st}"
            time.sleep(0.5)
        for b in more:
            net.wait_committed(b, validators=[0, 1, 2, 3])
        assert_agreement(net, [0, 1, 2, 3])
    finally:
        net.shutdown()


def test_an_actor_that_cannot_be_placed_is_a_clear_error(tmp_path: Path) -> None:
    """multisite.toml wants nodes labelled with sites; this single node has none."""
    spec = load_network(CONFIG.with_name("multisite.toml"))
    with pytest.raises(RuntimeError, match="could not place .*validator-0"):
        Network.create(spec, tmp_path, NetworkOptions(name="unplaced", place_timeout_s=3))
    with pytest.raises(ValueError):
        ray.get_actor("unplaced-validator-0", namespace="rayledger")


def test_transactions_replayed_through_another_mempool_do_not_stop_the_chain(
    tmp_path: Path,
) -> None:
    """A client sends overlapping batches to two mempools (their dedupe is local): the copies
    are ordered, executed as BAD_NONCE, stored, and every validator keeps committing."""
    net = start(tmp_path, "replay", batch_rows=300)
    try:
        batch = client_batches(net, 2_400)[2]
        # Both submitted at once, before either is committed (else the second mempool would
        # refuse the copies as stale, from its shards' committed nonces)
        refs = [
            net.mempool(0).submit.remote(batch.slice(0, 400)),
            net.mempool(1).submit.remote(batch.slice(200, 400)),
        ]
        assert [r.accepted for r in ray.get(refs)] == [400, 400]
        net.wait_committed(batch)
        more = client_batches(net, 400, start_nonce=600)[2]
        net.submit(more, mempool=2)
        net.wait_committed(more)
        assert_agreement(net, [0, 1, 2, 3])
        assert all(s["evidence"] == 0 for s in net.status())
    finally:
        net.shutdown()


def wait_gone(name: str) -> None:
    """Until a killed actor's name is free (it is, once the actor is gone)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace="rayledger")
        except ValueError:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} still registered")


def test_storage_shards_serve_verified_receipts_and_state_without_the_validator(
    tmp_path: Path,
) -> None:
    # A validator holds at most 8 blocks for a shard that does not acknowledge them
    net = start(tmp_path, "shards", storage_shards=3, shard_pending_blocks=8)
    try:
        client = Client(net.dir, validator=1)
        batches = client_batches(net, 2_000)
        for b in batches:
            assert client.submit(b, chunk_rows=250).accepted == b.num_rows  # by sender
        for b in batches:
            client.wait_committed(b, validators=[0, 1, 2, 3], timeout_s=120)
        payer = net.client_key(net.clients[0])
        payee = net.genesis.accounts[1]
        paid = batches[0].num_rows
        for v in range(4):
            reader = Client(net.dir, validator=v)
            assert reader.balance(payee.public_key) == payee.balance + paid
            assert reader.next_nonce(public_bytes(payer)) == paid
        first_anchor = batches[1].column("payload")[0].as_py()[:32]
        assert client.anchor(first_anchor) is not None
        assert client.anchor(bytes(32)) is None
        sample = [bytes(tx_ids_of(b)[i]) for b in batches for i in (0, 137, b.num_rows - 1)]
        for t in sample:
            receipt = client.receipt(t)
            assert receipt.status == Status.OK and receipt.tx_id == t
        with pytest.raises(NotFound):
            client.receipt(bytes(32))
        # A committed transaction replayed through another mempool (whose dedupe never saw it)
        # is refused as stale: that mempool reads the sender's committed nonce from its shards
        # Refused whole (another chain's batch) and a mempool that does not exist: errors
        foreign = make_batch(
            net.client_key(net.clients[1]), TxKind.ANCHOR, [0], [b"f" * 32], bytes(32)
        )
        with pytest.raises(SubmitError, match="wrong_chain"):
            client.submit(foreign)
        with pytest.raises(ValueError, match="mempool 9 of 4"):
            client.submit(batches[2], mempool=9)
        routed = client._route(batches[2], None)[0][0]  # the mempool that admitted them
        replay = Client(net.dir).submit(batches[2].slice(0, 10), mempool=(routed + 1) % 4)
        assert replay.accepted == 0 and replay.rejected == {"stale_nonce": 10}

        # A shard applies lists of committed blocks only; anything else is refused, counted,
        # and changes nothing
        shard = net.shard(2, 0)
        height = ray.get(shard.height.remote())
        for junk in (["not a block"], "blocks", [None]):
            with pytest.raises(InvalidBlock, match="list of committed blocks"):
                ray.get(shard.apply.remote(junk))
        st = ray.get(shard.status.remote())
        assert st["rejected"] == 3 and st["height"] >= height
        # Validator 1 down: its shards still answer, and the receipts still verify
        net.kill(1)
        assert client.receipt(sample[0]).height >= 1
        # A shard gone for good: the client asks the same shard of another validator (the
        # receipt is verified, so whoever serves it needs no trust)
        owner = int(shard_of_tx_ids(np.frombuffer(sample[1], np.uint8), 3)[0])
        ray.kill(net.shard(3, owner), no_restart=True)
        assert Client(net.dir, validator=3).receipt(sample[1]).tx_id == sample[1]
        wait_gone(f"shards-shard-3-{owner}")
        net._start_shard(3, owner)
        # A shard whose rows file was damaged on disk: reading the rows is a StoreError, and
        # the client's receipt comes from another validator's copy
        t = sample[2]
        owner = int(shard_of_tx_ids(np.frombuffer(t, np.uint8), 3)[0])
        folder = net.dir / "validator-2" / f"shard-{owner}"
        db = sqlite3.connect(folder / "shard.sqlite")
        offset, length = db.execute(
            "SELECT offset, length FROM frames WHERE height = ?", (client.receipt(t).height,)
        ).fetchone()
        db.close()
        with open(folder / "rows.seg", "r+b") as f:
            f.seek(offset + length - 40)
            good = f.read(1)
            f.seek(offset + length - 40)
            f.write(bytes([good[0] ^ 1]))
        with pytest.raises(StoreError, match="damaged"):
            Client(net.dir, validator=2).transaction(t)
        assert Client(net.dir, validator=2).receipt(t).tx_id == t
        with open(folder / "rows.seg", "r+b") as f:
            f.seek(offset + length - 40)
            f.write(good)
        more = client_batches(net, 400, start_nonce=paid)
        # A shard of validator 0 crashes and comes back from its disk; its validator resends
        net.crash_shard(0, 0)
        with pytest.raises(ValueError, match="no storage shard 3: validator 0 has 3"):
            net.crash_shard(0, 3)
        for b in more:
            Client(net.dir, validator=0).submit(b, mempool=0)
        Client(net.dir, validator=0).wait_committed(
            pa.Table.from_batches(more).combine_chunks().to_batches()[0],
            validators=[0, 2, 3],
            timeout_s=120,
        )
        # Validator 1 restarts from its disk: its shards catch up with what they missed
        net.restart(1)
        for b in more:
            client.wait_committed(b, timeout_s=120)
            assert client.receipt(bytes(tx_ids_of(b)[-1])).status == Status.OK
        assert client.balance(payee.public_key) == payee.balance + paid + more[0].num_rows

        # A shard that lost its disk starts empty: its validator rebuilds it from the block
        # store, re-executing the chain for the state it needs, and reading the commit proofs
        # older than its queue back from the block store: the same receipts as before the loss
        ids = np.concatenate([tx_ids_of(b)[:50] for b in batches])
        early = [bytes(t) for t in ids[shard_of_tx_ids(ids, 3) == 1]]  # in the lost shard
        reader = Client(net.dir, validator=2)
        before = {t: reader.receipt(t).encode() for t in early}
        ray.kill(net.shard(2, 1), no_restart=True)
        wait_gone("shards-shard-2-1")
        shutil.rmtree(net.dir / "validator-2" / "shard-1")
        # Down long enough for far more than 8 blocks (idle ones included) to commit
        height = net.height(2)
        while net.height(2) < height + 30:
            time.sleep(0.1)
        net._start_shard(2, 1)
        last = client_batches(net, 200, start_nonce=paid + 100)
        for b in last:
            client.submit(b)
        for b in [*batches, *last]:
            reader.wait_committed(b, timeout_s=120)
        assert early and all(reader.receipt(t).encode() == before[t] for t in early)
        # A shard whose rows file lost its tail (its index says more): it sets the damaged
        # files aside, starts empty, and its validator rebuilds it; receipts are as before
        ray.kill(net.shard(2, 1), no_restart=True)
        wait_gone("shards-shard-2-1")
        seg = net.dir / "validator-2" / "shard-1" / "rows.seg"
        with open(seg, "r+b") as f:
            f.truncate(seg.stat().st_size // 2)
        net._start_shard(2, 1)
        status = ray.get(net.shard(2, 1).status.remote())
        assert status["set_aside"] and Path(status["set_aside"]).is_dir(), status
        target, deadline = net.height(2), time.monotonic() + 120
        while ray.get(net.shard(2, 1).height.remote()) < target:
            assert time.monotonic() < deadline, "the shard was not rebuilt"
            time.sleep(0.2)
        assert all(reader.receipt(t).encode() == before[t] for t in early)
        assert reader.balance(payee.public_key) == client.balance(payee.public_key)
        assert reader.next_nonce(public_bytes(payer)) == paid + 150
        # Proofs older than the shard queue (8 here) left memory, and the rebuild read them
        # back from the block store (the early receipts above carry them)
        for v in range(4):
            status = ray.get(net.validator(v).status.remote())
            assert status["height"] > 40 and status["held"]["commit_proofs"] <= 9, status
    finally:
        net.shutdown()
