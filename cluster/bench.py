"""``rayledger bench core``: throughput of the core's hot paths, each beside its raw limit.

Every figure is measured in this run; ratios compare against a bare loop over the same bytes
(hashlib for ids, one-thread ``cryptography`` for signatures) measured in the same run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rayledger.actors.storage import BlockStore
from rayledger.block import (
    QuorumCert,
    build_block,
    compute_tx_root,
    genesis_header,
    make_results,
)
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.kernels import byte_rows, ed25519_verify_batch
from rayledger.kernels.bench import best_seconds
from rayledger.merkle import merkle_root
from rayledger.tx import (
    TxKind,
    canonical_buffer,
    compact_batch,
    compute_tx_ids,
    make_batch,
    tx_ids_of,
    verify_signatures,
)

if TYPE_CHECKING:
    from rayledger.cluster.network import NetworkSpec

_CHAIN = hashlib.sha256(b"rayledger/bench").digest()


@dataclass(frozen=True)
class Figure:
    operation: str
    items: int
    seconds: float
    unit: str = "rows"
    baseline: str = ""
    baseline_rate: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def ratio(self) -> float | None:
        return self.rate / self.baseline_rate if self.baseline_rate else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "items": self.items,
            "seconds": round(self.seconds, 4),
            "rate_per_s": round(self.rate, 1),
            "baseline": self.baseline,
            "baseline_rate_per_s": round(self.baseline_rate, 1),
            "ratio": None if self.ratio is None else round(self.ratio, 3),
        }


def _timed(fn: Callable[[], object], repeat: int = 3) -> float:
    return best_seconds(fn, repeat, warm_up=False)


def bench_core(
    rows: int = 100_000, sign_rows: int = 20_000, leaves: int = 1_000_000, block_rows: int = 10_000
) -> list[Figure]:
    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(16)]
    payload = b"p" * 71  # with the 79-byte header, ~150-byte transactions
    figures: list[Figure] = []

    signers = [keys[i % 16] for i in range(sign_rows)]
    t_sign = _timed(
        lambda: make_batch(signers, 2, range(sign_rows), [payload] * sign_rows, _CHAIN), repeat=1
    )
    figures.append(Figure("make_batch (sign)", sign_rows, t_sign))

    batch = make_batch(
        [keys[i % 16] for i in range(rows)], 2, range(rows), [payload] * rows, _CHAIN
    )
    values, offsets = canonical_buffer(batch, _CHAIN)
    messages = [values[offsets[i] : offsets[i + 1]].tobytes() for i in range(rows)]
    sha = hashlib.sha256
    t_loop = _timed(lambda: [sha(m).digest() for m in messages])
    t_ids = _timed(lambda: compute_tx_ids(batch))
    figures.append(
        Figure(
            "compute_tx_ids",
            rows,
            t_ids,
            baseline="hashlib loop, same bytes",
            baseline_rate=rows / t_loop,
        )
    )

    n_verify = min(rows, 20_000)
    sub = batch.slice(0, n_verify)
    pubs = [Ed25519PublicKey.from_public_bytes(public_bytes(k)) for k in keys]
    ids = compute_tx_ids(sub)
    sigs = sub.column("signature").to_pylist()

    def one_core() -> None:
        for i in range(n_verify):
            pubs[i % 16].verify(sigs[i], ids[i].tobytes())

    t_one = _timed(one_core, repeat=1)
    t_ver = _timed(lambda: verify_signatures(sub), repeat=1)
    figures.append(
        Figure(
            f"verify_signatures ({os.cpu_count()} cores)",
            n_verify,
            t_ver,
            baseline="cryptography, one core",
            baseline_rate=n_verify / t_one,
        )
    )

    leaf_arr = np.frombuffer(os.urandom(32 * leaves), np.uint8).reshape(leaves, 32)
    t_ref = _timed(lambda: merkle_root(leaf_arr), 1)
    t_root = _timed(lambda: compute_tx_root(leaf_arr), 1)
    figures.append(
        Figure(
            "tx_root (Merkle, batch kernel)",
            leaves,
            t_root,
            "leaves",
            baseline="rayledger.merkle reference",
            baseline_rate=leaves / t_ref,
        )
    )

    figures.extend(_bench_store(batch, block_rows))
    return figures


def _bench_store(batch: pa.RecordBatch, block_rows: int) -> list[Figure]:
    genesis = genesis_header(_CHAIN, 1)
    proposer = public_bytes(key_from_seed(bytes(32)))
    blocks = []
    parent, qc = genesis, QuorumCert.genesis(genesis.hash)
    for start in range(0, batch.num_rows, block_rows):
        body = batch.slice(start, block_rows)
        results = make_results(np.zeros(body.num_rows, np.uint8), [b""] * body.num_rows)
        block = build_block(
            parent,
            body,
            results,
            round_=parent.height + 1,
            proposer=proposer,
            timestamp_ms=parent.height + 2,
            parent_qc=qc,
        )
        blocks.append(block)
        parent = block.header
        qc = QuorumCert(parent.hash, parent.round, b"\x07", (bytes(64),) * 3)
    rows = batch.num_rows
    with tempfile.TemporaryDirectory(prefix="rayledger-bench-") as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        with BlockStore(path, genesis) as store:
            for b in blocks:
                store.append(b)
        t_append = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = BlockStore(path, genesis)
        t_open = time.perf_counter() - t0
        t_scan = _timed(lambda: store.scan())
        t_scan_cols = _timed(lambda: store.scan(["sender", "nonce"]))
        store.close()
    return [
        Figure(f"store append ({block_rows:,}-row blocks, verified, fsync)", rows, t_append),
        Figure("store reopen (verify chain and roots)", rows, t_open),
        Figure("store scan (all columns)", rows, t_scan),
        Figure("store scan (sender, nonce)", rows, t_scan_cols),
    ]


class _TrustAll:
    """A verifier that accepts everything: isolates the core's own CPU cost."""

    def verify(
        self, public_keys: np.ndarray, signatures: np.ndarray, messages: np.ndarray
    ) -> np.ndarray:
        return np.ones(len(public_keys), np.bool_)


def bench_consensus(rounds_small: int = 400, rounds_large: int = 40) -> list[Figure]:
    """Simulated rounds per wall second (n = 4 and 64) and the core's cost per vote."""
    from rayledger.consensus.messages import Vote
    from rayledger.consensus.sim import SimConfig, Simulation

    figures: list[Figure] = []
    for n, rounds in ((4, rounds_small), (64, rounds_large)):
        for crypto in ("ed25519", "mac"):
            sim = Simulation(SimConfig(validators=n, rounds=rounds, crypto=crypto))
            t0 = time.perf_counter()
            result = sim.run()
            figures.append(
                Figure(
                    f"simulate n={n} ({crypto} signatures)",
                    result.rounds,
                    time.perf_counter() - t0,
                    unit="rounds",
                )
            )

    # The core's own cost per message: every verifier call answers "valid" at once.
    sim = Simulation(SimConfig(validators=64, rounds=rounds_large, crypto="mac"))
    spent: dict[str, float] = {}
    counts: dict[str, int] = {}
    for node in sim.nodes:
        for core in node.personas:
            core.verifier = _TrustAll()
            inner = core.on_messages

            def timed(messages: Any, inner: Any = inner) -> Any:
                t0 = time.perf_counter()
                out = inner(messages)
                kind = type(messages[0]).__name__
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - t0
                counts[kind] = counts.get(kind, 0) + len(messages)
                return out

            core.on_messages = timed  # type: ignore[method-assign]
    sim.run()
    figures.append(
        Figure(
            "core: handle one vote, n=64 (no signature check)",
            counts.get(Vote.__name__, 0),
            spent.get(Vote.__name__, 1.0),
            unit="votes",
        )
    )
    figures.append(
        Figure(
            "core: handle one proposal, n=64 (no signature check)",
            counts.get("Proposal", 0),
            spent.get("Proposal", 1.0),
            unit="proposals",
        )
    )

    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(64)]
    msgs = np.frombuffer(os.urandom(32 * 4096), np.uint8).reshape(-1, 32)
    pubs = np.frombuffer(
        b"".join(public_bytes(keys[i % 64]) for i in range(4096)), np.uint8
    ).reshape(-1, 32)
    sigs = np.frombuffer(
        b"".join(keys[i % 64].sign(msgs[i].tobytes()) for i in range(4096)), np.uint8
    ).reshape(-1, 64)
    from rayledger.crypto import Ed25519Verifier

    verifier = Ed25519Verifier()
    t_ver = _timed(lambda: verifier.verify(pubs, sigs, msgs), repeat=1)
    figures.append(
        Figure(
            f"Ed25519 vote signature check (batch, {os.cpu_count()} cores)",
            4096,
            t_ver,
            unit="signatures",
        )
    )
    return figures


def bench_shard(
    transactions: int = 500_000, block_rows: int = 500, window: int = 100_000
) -> list[Figure]:
    """CPU per transaction of one storage shard applying committed blocks of anchors, in
    windows of ``window`` transactions as its index grows: its tx index and state gathered in
    the index buffer and written as sorted runs, against the same blocks written as a run each
    (merged as often as that takes), measured in the same run."""
    from rayledger.actors.storage import CommittedBlock, ShardStore, writes_batch
    from rayledger.chain import LedgerBuilder, batch_digest
    from rayledger.execution import genesis_state

    base, root = genesis_state([])
    genesis = genesis_header(_CHAIN, 1, root)
    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(8)]
    batches: dict[bytes, pa.RecordBatch] = {}
    builder = LedgerBuilder(batches, genesis, base)
    blocks: list[CommittedBlock] = []
    parent = genesis
    for h in range(1, -(-transactions // block_rows) + 1):
        n = min(block_rows, transactions - (h - 1) * block_rows)
        first = (h - 1) // len(keys) * block_rows
        batch = make_batch(
            keys[h % len(keys)],
            TxKind.ANCHOR,
            range(first, first + n),
            [hashlib.sha256(b"%d/%d" % (h, i)).digest() for i in range(n)],
            _CHAIN,
        )
        digest = batch_digest(batch)
        batches[digest] = batch
        header = builder.build(parent, h, public_bytes(keys[0]), h, (digest,))
        writes = writes_batch(builder.writes_of(header.hash))
        leaves = builder.result_leaves_of(header.hash)
        rows = builder.commit(header.hash, QuorumCert.genesis(genesis.hash)).rows()
        del batches[digest]
        qc = QuorumCert(header.hash, h, b"\x0f", (bytes(64),) * 3)
        blocks.append(CommittedBlock(header, qc, rows, writes, None, leaves))
        parent = header

    def windows(**options: int) -> list[tuple[int, int, float]]:
        out: list[tuple[int, int, float]] = []
        with tempfile.TemporaryDirectory(prefix="rayledger-bench-shard-") as tmp:
            shard = ShardStore(Path(tmp), 0, 1, genesis, **options)
            done, start, t0 = 0, 0, time.process_time()
            for i, block in enumerate(blocks):
                shard.apply([block])
                done += block.rows.num_rows
                last = i == len(blocks) - 1
                if last:  # what the buffer still holds is written too, and counted
                    shard.flush()
                if done - start >= window or last:
                    out.append((start, done, time.process_time() - t0))
                    start, t0 = done, time.process_time()
            shard.close()
        return out

    buffered = windows()
    direct = windows(index_batch_rows=0)
    return [
        Figure(
            f"shard apply, transactions {a:,}-{b:,}",
            b - a,
            seconds,
            unit="transactions",
            baseline="a run per block",
            baseline_rate=(b - a) / slow,
        )
        for (a, b, seconds), (_, _, slow) in zip(buffered, direct, strict=True)
    ]


# Closed loop on a machine whose verifiers check on a GPU: the pace pre-signed work is sized
# for (tx/s; the target is 50,000), and on any machine the most it is sized for
CLOSED_LOOP_GPU_PACE = 100_000


def _gpu_checks(verifier_actors: bool | None) -> bool:
    """Whether the network's verifier actors will check signatures on a GPU: this process
    sees one (a single machine: theirs) and they are not switched off."""
    from rayledger.kernels import available_backends

    return verifier_actors is not False and available_backends()[0] == "cuda"


def _one_core_verify_rates(samples: int = 3_000) -> tuple[float, float]:
    """Signatures over 32-byte digests verified per second on one core: by the cpu backend
    the network uses (chunks below its threading threshold, so one thread), and by
    ``cryptography`` (OpenSSL) alone, one call per signature."""
    from rayledger.kernels.ed25519 import _PARALLEL_MIN_ROWS

    keys = [key_from_seed(bytes([i + 1]) * 32) for i in range(8)]
    pubs = [Ed25519PublicKey.from_public_bytes(public_bytes(k)) for k in keys]
    msgs = [os.urandom(32) for _ in range(samples)]
    sigs = [keys[i % 8].sign(m) for i, m in enumerate(msgs)]
    t0 = time.perf_counter()
    for i in range(samples):
        pubs[i % 8].verify(sigs[i], msgs[i])
    openssl = samples / (time.perf_counter() - t0)

    def rows(items: list[bytes], width: int) -> np.ndarray:
        return np.frombuffer(b"".join(items), np.uint8).reshape(-1, width)

    key_rows = rows([public_bytes(keys[i % 8]) for i in range(samples)], 32)
    sig_rows, msg_rows = rows(sigs, 64), rows(msgs, 32)
    step = _PARALLEL_MIN_ROWS - 1
    t0 = time.perf_counter()
    for s in range(0, samples, step):
        ok = ed25519_verify_batch(
            key_rows[s : s + step], sig_rows[s : s + step], msg_rows[s : s + step], "cpu"
        )
        if not ok.all():
            raise AssertionError("the cpu backend refused a valid signature")
    return samples / (time.perf_counter() - t0), openssl


def _rounded(v: Any) -> Any:
    """A result's value for JSON: floats to 3 decimals, inside tuples (as lists) and dicts."""
    if isinstance(v, tuple):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 3) if isinstance(v, float) else v


@dataclass
class E2EResult:
    validators: int
    duration_s: float
    submitted: int
    # Transactions committed with status OK in the window (the TPS counts only these)
    committed: int
    committed_tps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    busy_answers: int
    # The mean of the rates measured just before and just after the run: the machine's own
    # speed drifts (by a third within minutes on the 2-core machine), and the efficiency is
    # a ratio to it
    one_core_verify_per_s: float
    one_core_openssl_per_s: float
    cores: int
    verifications_per_tx: int
    raw_limit_tps: float
    efficiency: float
    # The same against OpenSSL's one-core rate (the yardstick of runs before libsodium)
    efficiency_openssl: float
    agreement: bool
    # Open loop: the offered rate (None: closed loop)
    offered_tps: float | None = None
    storage_shards: int = 0
    # CPU time of each kind of actor over the load window, per transaction committed in it
    # (microseconds; all of a role's processes together, every thread, Ray's own included),
    # of the load generator (this process), and of Ray's own processes (``ray``: raylet, GCS,
    # agents, idle workers; read from /proc, absent elsewhere)
    cpu_us_per_tx: dict[str, float] = field(default_factory=dict)
    # False in a ceiling run: Ed25519 curve math skipped (see bench_e2e)
    signatures_checked: bool = True
    # Blocks validator 0 committed in the load window, and their mean size (idle blocks too)
    blocks_per_s: float = 0.0
    txs_per_block: float = 0.0
    # The cpu backend's one-core rate before and after the run
    one_core_verify_before_after: tuple[float, float] = (0.0, 0.0)
    # The whole machine over the load window (every process: the network, Ray's own, this
    # load generator, anything else running): the fraction of all cores' time busy, and the
    # fraction the hypervisor stole (None: not measurable here). Efficiency is the share
    # the committed transactions' signature checks took (see bench_e2e), so busy minus
    # efficiency is everything else, and 1 - busy what the pipeline left unused.
    machine_busy: float | None = None
    machine_steal: float | None = None
    # Transactions of the window committed with an error status (a bad nonce, say): final,
    # but failed, so not in ``committed``. Zero unless the network reorders a sender's rows.
    failed: int = 0
    # The CPU time of one signature check as the network's actors made them in the window
    # (their checking threads' CPU per row, microseconds), and the efficiency against that
    # speed instead of the quiet probe's (see in_situ_efficiency; None: checks on a GPU)
    check_us_in_network: float | None = None
    efficiency_in_situ: float | None = None
    # Validators write their committed state to disk every this many blocks (the network's
    # setting), and the height validator 0 had written when the window closed (0: none yet;
    # a 30 s run at the default of 1,000 blocks writes none, a long-running network does)
    checkpoint_every_blocks: int = 0
    state_checkpoint_height: int = 0
    # Consensus messages on direct streams between validators (else all by Ray call), and
    # how validator 0 sent its messages over the run: frames on streams, Ray calls
    peer_streams: bool = True
    # Mempools answered "accepted" once the rows were fsynced in their journals, and mempool
    # 0's fsyncs over the run (None: journals off)
    mempool_journal: bool = True
    journal_fsyncs: int | None = None
    stream_frames: int = 0
    ray_sends: int = 0
    # How mempool 0 announced its sealed batches over the run: on streams, by Ray call
    batch_frames: int = 0
    batch_ray_sends: int = 0
    # Validator 0's rounds over the run, and those it entered by a timeout certificate (a
    # leader whose block was not certified in time: each costs the round's timeout)
    rounds: int = 0
    rounds_by_timeout: int = 0
    # The live validators' event loops since they started: the worst lateness of any, in ms,
    # and their stalls past 250 ms in all (a stalled loop delays timers: rounds time out)
    loop_worst_ms: float = 0.0
    loop_stalls: int = 0
    # With ``gap_client``: the broken client's rows admitted (every one fails: its nonce 0
    # never came), and over all validators the times a leader held a batch back for a
    # sender's missing nonce, and the rows it proposed that failed for one
    gap_client_rows: int | None = None
    batches_deferred: int = 0
    gap_rows_proposed: int = 0
    # Mempool 0's rows parked ahead of their sender's sequence, and those sealed apart after
    # the hold (the broken client's, where it runs)
    rows_parked: int = 0
    rows_sealed_apart: int = 0
    # With ``forged_rate``: the forged rows announced to every validator, and the forged
    # batches each validator refused (the mean over the validators)
    forged_rows: int | None = None
    forged_batches_refused: float = 0.0
    # Clients whose pre-signed work ran out before the window closed: the committed rate is
    # then a floor of what the network can do (0 in a run sized right)
    clients_out_of_work: int = 0
    # Validators crashed before the load and kept down (``down``): the figures are the
    # others'
    down: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: _rounded(v) for k, v in self.__dict__.items()}


@dataclass(eq=False)
class Chunk:
    """Rows a load generator's client had admitted in one submission."""

    due: float  # when it was submitted (open loop: when it was due)
    ids: list[bytes]  # its transactions' ids
    accepted: int  # rows the mempool admitted
    found: int = 0  # ids seen committed so far, in order (each is looked up once)
    last_at: float = 0.0  # the latest commit time among them


class CommitTracker:
    """Matches a load generator's chunks to the commits that validator 0 reports.

    Commit times are learnt a block list at a time (``learn``: no per-transaction lookups
    in the network while it is under load). ``settle`` tells when every id of a chunk has
    committed: the chunk's latency runs to its last transaction's commit, and its rows
    committed with an error status (a sender's nonce gap, say) are counted apart from the
    rows committed OK.
    """

    def __init__(self) -> None:
        self._at: dict[bytes, float] = {}
        self._failed: set[bytes] = set()

    def learn(self, ids: np.ndarray, at: float, failed_rows: np.ndarray) -> None:
        """A block committed at ``at`` holding the ``(n, 32)`` ``ids``, of which the rows
        ``failed_rows`` committed with an error status."""
        self._at.update(zip(byte_rows(ids), repeat(at)))
        self._failed.update(byte_rows(ids[failed_rows]))

    def settle(self, chunk: Chunk) -> tuple[float, int] | None:
        """``(commit time of its last transaction, rows that failed)`` once every id of
        ``chunk`` committed; None while some are still to commit."""
        k, at = chunk.found, chunk.last_at
        while k < len(chunk.ids) and (found := self._at.get(chunk.ids[k])) is not None:
            at, k = max(at, found), k + 1
        chunk.found, chunk.last_at = k, at
        if k < len(chunk.ids):
            return None
        bad = sum(1 for i in chunk.ids if i in self._failed) if self._failed else 0
        return at, bad


def _skip_curve_math() -> None:
    """Worker set-up hook of a ceiling run's own Ray instance: every batch signature check
    answers "valid" without the curve math (ids and digests are still hashed, consensus
    votes still verified). Never installed anywhere but in ``bench_e2e(ceiling=True)``."""
    import rayledger.tx as tx

    def free(keys: np.ndarray, sigs: np.ndarray, msgs: Any, backend: str = "auto") -> np.ndarray:
        return np.ones(len(keys), np.bool_)

    tx.ed25519_verify_batch = free  # type: ignore[assignment]


def _cpu_by_role(
    net: Any, validators: int, down: int = 0
) -> tuple[dict[str, float], tuple[int, float]]:
    """CPU seconds used so far by each kind of actor, summed over the institutions (a status
    without ``cpu_s`` counts nothing; an actor that does not answer within 30 s is an error),
    and by this process under ``"load generator"`` (its clients, its commit tracking and its
    Ray threads: a cost of the measurement, on the same cores as the network); and the
    signatures the actors checked on their CPUs so far with their checking threads' CPU
    seconds (``signature_checks`` of their status)."""
    import ray

    roles: dict[str, list[Any]] = {"validator": [], "mempool": [], "shard": [], "verifier": []}
    for i in range(validators):
        if i < validators - down:  # the last ``down`` validators were crashed for the run
            roles["validator"].append(net.validator(i))
        roles["mempool"].append(net.mempool(i))
        roles["shard"].extend(net.shard(i, k) for k in range(net.shards))
        if net.settings.get("verifier_actors"):
            roles["verifier"].append(net._actor(f"verifier-{i}"))
    out: dict[str, float] = {}
    rows, seconds = 0, 0.0
    for role, handles in roles.items():
        if handles:
            answers = ray.get([h.status.remote() for h in handles], timeout=30)
            out[role] = sum(float(a.get("cpu_s", 0.0)) for a in answers)
            for a in answers:
                checked, spent = a.get("signature_checks", (0, 0.0))
                rows, seconds = rows + int(checked), seconds + float(spent)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["load generator"] = usage.ru_utime + usage.ru_stime
    return out, (rows, seconds)


def _cpu_per(
    start: dict[str, float],
    end: dict[str, float],
    ray_start: dict[int, int] | None,
    ray_end: dict[int, int] | None,
    units: int,
    scale: float,
) -> dict[str, float]:
    """CPU between two ``_cpu_by_role`` readings by role, and of Ray's own processes between
    two ``ray_own_cpu`` readings (where read), per unit of work, times ``scale`` (1e6: µs;
    empty when no unit was done)."""
    if units <= 0:
        return {}
    out = {role: (end[role] - start[role]) / units * scale for role in end}
    ray_s = cpu_between(ray_start, ray_end)
    if ray_s is not None:
        out["ray"] = ray_s / units * scale
    return out


def in_situ_efficiency(
    tps: float, per_tx: int, cores: int, checks: tuple[int, float], committed: int
) -> tuple[float | None, float | None]:
    """``(us per check, efficiency)`` against the speed the network's own signature checks
    ran at (``checks``: the rows its actors checked on their CPUs in the window and their
    checking threads' CPU seconds): the raw limit with that speed in place of a quiet core's,
    so the machine's drift between the probe and the run cancels. The efficiency is None
    where fewer rows were checked on CPUs than half the committed transactions' checks (a
    GPU made them), the speed None where none was."""
    rows, seconds = checks
    if rows <= 0 or seconds <= 0:
        return None, None
    us = seconds / rows * 1e6
    if rows < per_tx * committed / 2:
        return us, None
    return us, tps * per_tx * us / (cores * 1e6)


def machine_cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int, int] | None:
    """This machine's CPU time so far, all cores and every process (the kernel's too), as
    ``(busy, steal, total)`` clock ticks from ``/proc/stat``: busy is user, nice, system, irq
    and softirq; steal is time the hypervisor gave this VM's cores to others; total adds idle
    and iowait. None where there is no such file (not Linux)."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + steal + idle + iowait


def machine_shares(
    start: tuple[int, int, int] | None, end: tuple[int, int, int] | None
) -> tuple[float, float] | None:
    """The fractions of all cores' time between two ``machine_cpu_times`` that were busy and
    stolen by the hypervisor (None without both, or with no time between them)."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    total = end[2] - start[2]
    return (end[0] - start[0]) / total, (end[1] - start[1]) / total


# Command-line marks of Ray's own processes: raylet, GCS, log monitor, autoscaler monitor,
# dashboard and its agents, and worker processes started but holding no actor
_RAY_OWN = (
    "/ray/core/src/ray/raylet/raylet",
    "/ray/core/src/ray/gcs/gcs_server",
    "ray/_private/log_monitor.py",
    "ray/autoscaler/_private/monitor.py",
    "ray/dashboard/",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::IDLE",
)


def ray_own_cpu(proc: Path = Path("/proc")) -> dict[int, int] | None:
    """CPU time so far (clock ticks) of each of Ray's own processes on this machine, by pid,
    from ``/proc``: what runs Ray itself rather than the network's actors (which report
    their own) or this process. None where there is no ``/proc``."""
    if not proc.is_dir():
        return None
    out: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            )
            if not any(mark in command for mark in _RAY_OWN):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not a process entry
            continue
    return out


def cpu_between(start: dict[int, int] | None, end: dict[int, int] | None) -> float | None:
    """Seconds of CPU between two ``ray_own_cpu`` readings: each process still there at the
    end, from its first reading (from 0 if it started since); one that exited counts nothing."""
    if start is None or end is None:
        return None
    ticks = sum(t - start.get(pid, 0) for pid, t in end.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def check_e2e(config: Path, spec: NetworkSpec, validators: int, down: int) -> None:
    """Raises ValueError, naming the option, where ``bench_e2e`` cannot run these options on
    the network ``spec`` read from ``config``: checked before Ray starts, so that a mistake
    costs nothing (``rayledger bench e2e`` calls it first, and reports it as an error)."""
    if validators != len(spec.validators):
        raise ValueError(
            f"--validators {validators} does not match {config}, which describes "
            f"{len(spec.validators)} validators"
        )
    if not spec.clients:
        # The load comes from the config's clients (each submits its own pre-signed rows)
        raise ValueError(f"{config} describes no clients: bench e2e has nobody to send the load")
    if not 0 <= down <= (validators - 1) // 3:
        raise ValueError(
            f"down must be between 0 and f = {(validators - 1) // 3} for {validators} validators"
        )


def bench_e2e(
    config: Path,
    validators: int = 4,
    duration_s: float = 30.0,
    batch_rows: int = 1_000,
    wan: bool = True,
    inflight_batches: int = 1,
    storage_shards: int | None = None,
    rate: float | None = None,
    ceiling: bool = False,
    verifier_actors: bool | None = None,
    checkpoint_every: int | None = None,
    peer_streams: bool = True,
    gap_client: bool = False,
    forged_rate: float | None = None,
    down: int = 0,
    journal: bool = True,
) -> E2EResult:
    """Committed TPS and commit latency of the whole network on Ray, against the raw limit.

    Clients pre-sign their transactions (signing is the client's cost). Closed loop (``rate``
    None): they submit as fast as the mempools admit them, ``inflight_batches`` per mempool (a
    fixed capacity); a busy answer makes that client wait the mempool's hint. Open loop
    (``rate`` tx/s offered in total): each client submits one ``batch_rows`` chunk on a fixed
    schedule whatever happened before, and latency counts from the scheduled time (no
    coordinated omission). A chunk answered busy is offered again after the mempool's hint,
    its latency still counting from its due time: offered beyond the network's rate, the
    mempools' learnt limits answer busy, latency grows with the schedule's lag, and the rows
    admitted commit at the network's full rate. Latency is from a submission to the commit of
    its last transaction on validator 0.

    ``verifier_actors``: check signatures in each institution's verifier actor (None: where
    the cluster has a GPU or more than 4 CPUs, as a deployment decides).

    ``checkpoint_every``: validators write their committed state to disk every this many
    blocks (None: the network's default, 1,000, which a short run never reaches): a steady
    state's cost, the checkpoints' writes and reads of the state file, in a short run.

    ``peer_streams``: False sends every consensus message by Ray call, as before the direct
    streams between validators (to measure them).

    ``gap_client``: one more client, a broken one that skipped its nonce 0, sends 5 anchors
    every 0.5 s through mempool 0 (answered busy, it tries again at its next tick). Every row
    of it fails ``BAD_NONCE`` and is not counted; the figures are the others' and show what it
    costs them (its mempool parks its rows, then seals them apart; the leaders wait for its
    missing nonce once).

    ``forged_rate``: an impostor in the cluster (this process, not a mempool) announces to
    every validator batches of ``batch_rows`` rows whose every signature is forged, at this
    many rows per second over the run: what checking and refusing them costs the network
    (each validator refuses a large batch on a sample of its rows) and its clients.

    ``down``: crash this many validators (the last ones, at most f) once the network is up,
    before the load starts, and keep them down: what running on the quorum alone costs. Their
    institutions' mempools and clients go on; the rounds those validators would lead end by
    timeout.

    ``ceiling``: the pipeline's own limit, as if the transactions' signatures were checked for
    free (what a GPU that kept up would leave): this run's Ray instance, which it starts and
    stops itself, skips the Ed25519 curve math of batch checks in every worker. Everything
    else runs as in production: id hashing, digests, execution, consensus with its signed
    votes, storage. The result says ``signatures_checked: false``.
    """
    import threading

    import ray
    from hdrh.histogram import HdrHistogram

    from rayledger.cluster.local import Network, NetworkOptions, init_local_ray
    from rayledger.cluster.network import load_network
    from rayledger.cluster.soak import Forger

    spec = load_network(config)
    check_e2e(config, spec, validators, down)
    one_core, one_core_openssl = _one_core_verify_rates()
    cores = os.cpu_count() or 1
    # Each transaction's signature is checked once in every institution: by the mempool that
    # admits it (whose own validator takes its word, see Validator.batch_ready) and by every
    # other validator (none trusts another institution's verification).
    per_tx = validators
    raw_limit = one_core * cores / per_tx
    clients = len(spec.clients)
    if rate is None:
        # Closed loop: pre-signed work for half again the pace the network may reach: the
        # CPU's signature limit, or where the verifiers will check on a GPU (its limit is
        # not known before the run) CLOSED_LOOP_GPU_PACE. Too little and the clients run out
        # before the window closes (``clients_out_of_work``: the rate is then a floor).
        pace = CLOSED_LOOP_GPU_PACE if _gpu_checks(verifier_actors) else raw_limit
        expected = int(min(pace, CLOSED_LOOP_GPU_PACE) * duration_s * 1.5) + batch_rows * 4
    else:  # open loop: the schedule submits rate x duration rows, and a chunk more each
        expected = int(rate * duration_s) + batch_rows * 2 * clients
    per_client = expected // clients

    with tempfile.TemporaryDirectory(prefix="rayledger-bench-") as tmp:
        init_local_ray(
            spec,
            runtime_env={"worker_process_setup_hook": _skip_curve_math} if ceiling else None,
        )
        try:
            opts = NetworkOptions(
                name="bench",
                base_timeout_ms=1000,
                batch_rows=batch_rows,
                # Work in flight per mempool: under saturation, latency is about the rows in
                # flight divided by the throughput (backpressure answers busy beyond it).
                mempool_capacity=batch_rows * inflight_batches if rate is None else 200_000,
                latency_ms=None if wan else [[0.0] * validators] * validators,
                storage_shards=storage_shards,
                verifier_actors=verifier_actors,
                peer_streams=peer_streams,
                mempool_journal=journal,
            )
            if checkpoint_every is not None:
                opts = replace(
                    opts,
                    snapshot_every_blocks=checkpoint_every,
                    state_lag_blocks=min(opts.state_lag_blocks, checkpoint_every),
                )
            net = Network.create(spec, Path(tmp), opts)
            shards_used = net.shards
            up = range(validators - down)
            for i in range(validators - down, validators):
                net.kill(i)
            work: list[list[pa.RecordBatch]] = []
            for k, name in enumerate(net.clients):
                key = net.client_key(name)
                rows = make_batch(
                    key,
                    TxKind.ANCHOR,
                    range(per_client),
                    [hashlib.sha256(b"%d/%d" % (k, i)).digest() for i in range(per_client)],
                    net.chain_id,
                )
                # Chunks in buffers of their own (a slice is pickled with its whole parent)
                work.append(
                    [
                        compact_batch(rows.slice(s, batch_rows))
                        for s in range(0, per_client, batch_rows)
                    ]
                )
            v0 = net.validator(0)
            hist = HdrHistogram(1, 600_000, 3)
            lock = threading.Lock()
            pending: list[Chunk] = []  # submitted, not yet seen committed
            stats = {"submitted": 0, "busy": 0, "gap_rows": 0}
            stop = time.monotonic() + duration_s

            interval = None if rate is None else batch_rows * clients / rate

            def client(k: int) -> None:
                mempool = net.mempool(k % validators)
                start = time.time() + (0 if interval is None else interval * k / clients)
                for n, b in enumerate(work[k]):
                    if interval is not None:
                        # Open loop: the chunk is due at its scheduled time, and its latency
                        # counts from then even if the client falls behind
                        due = start + n * interval
                        time.sleep(max(0.0, due - time.time()))
                    # Serialized once, into the object store: an offer answered busy is
                    # made again by reference
                    ref = ray.put(b)
                    while time.monotonic() < stop:
                        t = time.time() if interval is None else due
                        res = ray.get(mempool.submit.remote(ref))
                        if not res.busy:
                            ids = byte_rows(tx_ids_of(b))
                            with lock:
                                pending.append(Chunk(t, ids, res.accepted))
                                stats["submitted"] += res.accepted
                            break
                        with lock:
                            stats["busy"] += 1
                        time.sleep(min(max(res.retry_after_ms / 1000, 0.01), 0.5))
                    if time.monotonic() >= stop:
                        return
                with lock:  # its pre-signed work is spent and the window is still open
                    stats["out_of_work"] += 1

            def broken_client() -> None:
                key = key_from_seed(hashlib.sha256(b"rayledger bench: gap client").digest())
                mempool, nonce, tick = net.mempool(0), 1, time.monotonic()
                while tick < stop:
                    digests = [
                        hashlib.sha256(b"gap %d" % i).digest() for i in range(nonce, nonce + 5)
                    ]
                    b = make_batch(
                        key, TxKind.ANCHOR, range(nonce, nonce + 5), digests, net.chain_id
                    )
                    res = ray.get(mempool.submit.remote(b))
                    nonce += res.accepted
                    with lock:
                        stats["gap_rows"] += res.accepted
                    tick += 0.5
                    time.sleep(max(0.0, tick - time.monotonic()))

            def forger(rate: float) -> None:
                key = key_from_seed(hashlib.sha256(b"rayledger bench: forger").digest())
                impostor = Forger(net, batch_rows, key)
                period, tick = batch_rows / rate, time.monotonic()
                while tick < stop:
                    impostor.announce()
                    with lock:
                        stats["forged_rows"] += batch_rows
                    tick += period
                    time.sleep(max(0.0, tick - time.monotonic()))

            stats["forged_rows"] = stats["out_of_work"] = 0
            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            if gap_client:
                threads.append(threading.Thread(target=broken_client))
            if forged_rate:
                threads.append(threading.Thread(target=forger, args=(forged_rate,)))
            cpu_start, checks_start = _cpu_by_role(net, validators, down)
            ray_start = ray_own_cpu()
            machine_start = machine_cpu_times()
            machine_end = None
            ray_end: dict[int, int] | None = None
            cpu_end: dict[str, float] | None = None
            t_start = time.time()
            for th in threads:
                th.start()
            committed = 0
            tracker = CommitTracker()
            failed = 0
            seen_height = 0
            window_blocks: list[int] = []  # transactions of each block committed in the window
            while time.monotonic() < stop + 30 and (
                any(th.is_alive() for th in threads) or pending
            ):
                if cpu_end is None and time.monotonic() >= stop:
                    machine_end = machine_cpu_times()
                    cpu_end, checks_end = _cpu_by_role(net, validators, down)
                    ray_end = ray_own_cpu()
                for h, at, ids, bad in ray.get(v0.committed_since.remote(seen_height)):
                    seen_height = h
                    if t_start <= at <= t_start + duration_s:
                        window_blocks.append(len(ids))
                    tracker.learn(ids, at, bad)
                with lock:
                    waiting = list(pending)
                for chunk in waiting:
                    settled = tracker.settle(chunk)
                    if settled is None:
                        continue
                    at, bad = settled
                    hist.record_value(max(1, int((at - chunk.due) * 1000)), chunk.accepted)
                    with lock:
                        pending.remove(chunk)
                    if at <= t_start + duration_s:
                        committed += chunk.accepted - bad
                        failed += bad
                time.sleep(0.1)
            for th in threads:
                th.join()
            if cpu_end is None:
                machine_end = machine_cpu_times()
                cpu_end, checks_end = _cpu_by_role(net, validators, down)
                ray_end = ray_own_cpu()
            statuses = [ray.get(net.validator(i).status.remote(), timeout=30) for i in up]
            status0 = statuses[0]
            mempool0 = ray.get(net.mempool(0).status.remote(), timeout=30)
            checkpointed = int(status0["state_checkpoint"])
            chains = [net.headers(i) for i in up]
            common = min(len(c) for c in chains)
            agreement = all(c[:common] == chains[0][:common] for c in chains)
            net.shutdown()
        finally:
            ray.shutdown()
    tps = committed / duration_s
    # Nothing committed in the window: no per-transaction figure to give
    cpu_per_tx = {
        role: round(us, 1)
        for role, us in _cpu_per(cpu_start, cpu_end, ray_start, ray_end, committed, 1e6).items()
    }
    shares = machine_shares(machine_start, machine_end)
    # The machine's speed again, quiet as before the run (Ray is down): the ratios use both
    after, after_openssl = _one_core_verify_rates()
    before = one_core
    one_core, one_core_openssl = (before + after) / 2, (one_core_openssl + after_openssl) / 2
    raw_limit = one_core * cores / per_tx
    check_us, efficiency_in_situ = in_situ_efficiency(
        tps,
        per_tx,
        cores,
        (checks_end[0] - checks_start[0], checks_end[1] - checks_start[1]),
        committed,
    )
    return E2EResult(
        validators=validators,
        duration_s=duration_s,
        submitted=stats["submitted"],
        committed=committed,
        committed_tps=tps,
        p50_ms=hist.get_value_at_percentile(50),
        p95_ms=hist.get_value_at_percentile(95),
        p99_ms=hist.get_value_at_percentile(99),
        busy_answers=stats["busy"],
        one_core_verify_per_s=one_core,
        one_core_openssl_per_s=one_core_openssl,
        cores=cores,
        verifications_per_tx=per_tx,
        raw_limit_tps=raw_limit,
        efficiency=tps / raw_limit,
        efficiency_openssl=tps / (one_core_openssl * cores / per_tx),
        agreement=agreement,
        offered_tps=rate,
        storage_shards=shards_used,
        signatures_checked=not ceiling,
        blocks_per_s=len(window_blocks) / duration_s,
        txs_per_block=sum(window_blocks) / len(window_blocks) if window_blocks else 0.0,
        one_core_verify_before_after=(before, after),
        machine_busy=None if shares is None else shares[0],
        machine_steal=None if shares is None else shares[1],
        failed=failed,
        checkpoint_every_blocks=opts.snapshot_every_blocks,
        state_checkpoint_height=checkpointed,
        peer_streams=peer_streams,
        mempool_journal=journal,
        journal_fsyncs=None if mempool0["journal"] is None else int(mempool0["journal"]["fsyncs"]),
        stream_frames=int(status0["streams"]["frames_out"]),
        ray_sends=int(status0["streams"]["ray_sends"]),
        batch_frames=int(mempool0["streams"]["frames_out"]),
        batch_ray_sends=int(mempool0["streams"]["ray_sends"]),
        rounds=int(status0["round"]),
        rounds_by_timeout=int(status0["rounds_by_timeout"]),
        loop_worst_ms=max(float(s["loop"]["worst_ms"]) for s in statuses),
        loop_stalls=sum(int(s["loop"]["stalls"]) for s in statuses),
        gap_client_rows=stats["gap_rows"] if gap_client else None,
        batches_deferred=sum(int(s["batches_deferred"]) for s in statuses),
        gap_rows_proposed=sum(int(s["gap_rows_proposed"]) for s in statuses),
        rows_parked=int(mempool0["counts"].get("parked", 0)),
        rows_sealed_apart=int(mempool0["counts"].get("gap_expired", 0)),
        forged_rows=stats["forged_rows"] if forged_rate else None,
        clients_out_of_work=stats["out_of_work"],
        down=down,
        forged_batches_refused=sum(
            int(s["rejected"].get("batch: invalid_signature", 0)) for s in statuses
        )
        / len(statuses),
        cpu_us_per_tx=cpu_per_tx,
        check_us_in_network=check_us,
        efficiency_in_situ=efficiency_in_situ,
    )


@dataclass
class RoundsResult:
    validators: int
    duration_s: float
    idle_block_ms: int
    # Blocks validator 0 committed in the window (every round commits one: they are empty)
    rounds: int
    rounds_per_s: float
    # CPU milliseconds per round by kind of actor (every process of the kind), of this
    # process (the driver, polling) and of Ray's own processes (read from /proc, absent
    # elsewhere)
    cpu_ms_per_round: dict[str, float] = field(default_factory=dict)
    # The whole machine's busy CPU per round (None: no /proc/stat), and its busy share
    machine_ms_per_round: float | None = None
    machine_busy: float | None = None
    peer_streams: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {k: _rounded(v) for k, v in self.__dict__.items()}


def bench_rounds(
    config: Path,
    duration_s: float = 20.0,
    idle_block_ms: int = 10,
    wan: bool = False,
    peer_streams: bool = True,
) -> RoundsResult:
    """The CPU a consensus round costs the running network on Ray, with no load at all: every
    leader proposes an empty block ``idle_block_ms`` after its round starts, so rounds follow
    one another as fast as the protocol goes, and each costs what any round costs whatever it
    carries: the proposal and the votes (Ray calls, their signatures), the persisted vote,
    the block store's append, the storage shards' apply, timers. Under load that is the part
    of the CPU that a block's size does not change (``bench e2e`` commits about 5 blocks a
    second on 2 cores). ``wan``: emulate the config's latencies (fewer rounds a second).
    ``peer_streams``: False sends every consensus message by Ray call."""
    import ray

    from rayledger.cluster.local import Network, NetworkOptions, init_local_ray
    from rayledger.cluster.network import load_network

    spec = load_network(config)
    validators = len(spec.validators)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="rayledger-bench-rounds-") as tmp:
        init_local_ray(spec)
        try:
            opts = NetworkOptions(
                name="bench-rounds",
                idle_block_ms=idle_block_ms,
                latency_ms=None if wan else [[0.0] * validators] * validators,
                peer_streams=peer_streams,
            )
            net = Network.create(spec, Path(tmp), opts)
            deadline = time.monotonic() + 60
            while net.height(0) < 5:  # started, actors warm
                if time.monotonic() > deadline:
                    raise RuntimeError("the network committed nothing in 60 s")
                time.sleep(0.2)
            time.sleep(1.0)
            cpu_start, _ = _cpu_by_role(net, validators)
            ray_start, machine_start = ray_own_cpu(), machine_cpu_times()
            h0, t0 = net.height(0), time.monotonic()
            time.sleep(duration_s)
            h1, elapsed = net.height(0), time.monotonic() - t0
            cpu_end, _ = _cpu_by_role(net, validators)
            ray_end, machine_end = ray_own_cpu(), machine_cpu_times()
            net.shutdown()
        finally:
            ray.shutdown()
    rounds = h1 - h0
    per_round = _cpu_per(cpu_start, cpu_end, ray_start, ray_end, rounds, 1e3)
    if per_round:  # this process only polls the height: the driver, not a load generator
        per_round["driver"] = per_round.pop("load generator")
    shares = machine_shares(machine_start, machine_end)
    return RoundsResult(
        validators=validators,
        duration_s=elapsed,
        idle_block_ms=idle_block_ms,
        rounds=rounds,
        rounds_per_s=rounds / elapsed,
        cpu_ms_per_round=per_round,
        machine_ms_per_round=(
            None if shares is None or rounds <= 0 else shares[0] * cores * elapsed / rounds * 1e3
        ),
        machine_busy=None if shares is None else shares[0],
        peer_streams=peer_streams,
    )
