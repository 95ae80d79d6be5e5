"""The validator actor: the consensus core, the executing block builder and the block store,
driven by one serialized event loop.

Everything that changes consensus state happens in the actor's asyncio loop without awaiting
in between, so events are handled one at a time. A ``Persist`` action is written and fsynced
before the actions after it (the vote it guards) leave; a committed block is fsynced in the
block store before its transactions are reported committed. A restarted validator rebuilds
its state from its own disk (committed blocks, re-executed; safety state; recent proposals)
and catches up from its peers.

Peers are other validators' actor handles; a message to a peer is a fire-and-forget call
carrying every message for that peer produced by one event. The emulated WAN latency between
two sites is applied on arrival (the sender names the earliest time its message may be
handled), so a sender busy with other work never adds to it, as on a real network.

The votes and proposals an event produces leave before the blocks it commits are written:
a vote needs only the safety state persisted, and the next round's leader should not wait for
this validator's disk and storage shards.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayledger.actors.loopwatch import LoopWatch
from rayledger.actors.mempool import (
    RESTART_RETRIES,
    decode_batch_frame,
    in_actor,
    restarted,
    seal_tag,
)
from rayledger.actors.storage import (
    BlockStore,
    CommittedBlock,
    read_parts,
    rows_by_shard,
    shard_of_tx_ids,
    writes_batch,
)
from rayledger.actors.storage.engine import fsync_write
from rayledger.actors.storage.lock import hold_lock, is_disk_failure, stop_on_disk_failure
from rayledger.actors.storage.slots import SlotFile
from rayledger.actors.storage.snapshot import load_snapshot
from rayledger.actors.storage.state import CommittedState
from rayledger.actors.streams import StreamSender, StreamServer, parse_endpoint
from rayledger.block import BlockHeader, QuorumCert
from rayledger.chain import LedgerBuilder, admit_batch
from rayledger.codec import Reader, u32, u64, var_bytes
from rayledger.config import parse_genesis
from rayledger.consensus import (
    Action,
    AskBacklog,
    Broadcast,
    Commit,
    Core,
    CoreConfig,
    Evidence,
    FetchBatches,
    Message,
    Persist,
    Proposal,
    Rejected,
    SafetyState,
    Send,
    SetTimer,
    Vote,
)
from rayledger.consensus.byzantine import conflicting_proposal, corrupt_signature, double_vote
from rayledger.consensus.wire import (
    decode_messages,
    decode_proposal,
    decode_safety,
    encode_messages,
    encode_proposal,
    encode_safety,
)
from rayledger.crypto import Ed25519Signer, Ed25519Verifier, read_key_file
from rayledger.errors import LedgerError, StoreError
from rayledger.execution import StateView, Status, execute_block, genesis_state
from rayledger.kernels import cpu_verify_work
from rayledger.tx import TX_SCHEMA, batch_from_ipc, batch_to_ipc, compact_batch, tx_ids_of

log = logging.getLogger(__name__)

# Recent blocks whose state writes a (re)started validator keeps for shards that lag behind;
# a shard further behind is rebuilt by re-executing the stored chain.
SHARD_REPLAY_KEEP = 64
# The committed state goes to the validator's state.db every this many blocks, or sooner once
# the writes held in memory since the last checkpoint reach this many entries (about 320 bytes
# each), SHARD_REPLAY_KEEP blocks behind the head by default, so that a restart re-executes
# those for the shards
CHECKPOINT_EVERY = 1000
STATE_MEMORY_ENTRIES = 1_000_000
# Blocks sent to a shard in one call, and blocks held for shards that do not acknowledge
SHARD_CHUNK = 32
SHARD_PENDING_MAX = 1024
SHARD_PUSH_DELAY_S = 0.1
# How long a mempool's batch waits for a predecessor that never takes its turn before it is
# held anyway. Every announced batch takes its turn (checked, refused or unreadable), so this
# is for one that never arrives; a predecessor that is only slow (its check queued behind
# others on a saturated machine) must be waited for: released ahead of it, the later batch's
# rows would be proposed before their sender's earlier nonces and fail with BAD_NONCE.
REORDER_WAIT_S = 30.0
# Batches of one mempool waiting for a predecessor, at most (an honest mempool's wait behind
# checks finishing out of order, a few): past it, the lowest gap is given up at once. Sealing
# numbers with gaps (a Byzantine mempool's) each kept an entry until a gap's wait ran out,
# one gap every REORDER_WAIT_S: 100,000 of them were held for a month.
ORIGIN_WAITING_MAX = 4096
# Wall-clock commit times kept in memory (for load generators polling ``committed_since``).
COMMIT_TIMES_KEEP = 65_536
# The safety record also keeps the proposals voted for and not yet committed, with their
# batches (``_safety_record``): after every validator restarted at once (a power cut, a Ray
# cluster lost, `rayledger down` killing them in turn), the block the highest QC certifies
# was kept by nobody, and no leader could extend it: the chain stopped for good. Usually one
# or two; at most this many, the newest
VOTED_KEEP = 8
SAFETY_WITH_VOTES = b"RLSV"
# Transaction ids of the latest committed blocks kept in memory (for ``committed_since``)
COMMIT_IDS_KEEP_ROWS = 1_000_000
# Pieces of evidence kept in memory (all are counted)
EVIDENCE_KEEP = 1024
# Announced batches' checks under way at once (here, or in the verifier); the others wait in
# a queue per mempool, and the mempools share the checks fairly by rows: one that floods this
# validator (Byzantine, or far busier than the rest) delays only its own batches, not the
# others' nor the event loop. A batch announced by reference is fetched before it queues (a
# reference that never resolves holds no check back), within FETCH_TIMEOUT_S. At most
# INTAKE_BATCHES batches and INTAKE_ROWS rows wait per mempool: more are dropped and counted
# (an honest mempool announces a batch again that stays uncommitted; and it holds at most its
# capacity uncommitted: INTAKE_ROWS is raised to twice that).
CHECKS_AT_ONCE = 2
INTAKE_BATCHES = 1024
INTAKE_ROWS = 262_144
# And at most this many bytes of batches (their Arrow buffers) per mempool, raised to twice its
# byte capacity: rows of 64 KiB made the row bound alone 16 GB held for one mempool
INTAKE_BYTES = 1 << 30
FETCH_TIMEOUT_S = 60.0
# How long a peer asked for a batch a proposal names has to answer before the next is asked
# (the last one asked is waited for)
GET_BATCH_TIMEOUT_S = 30.0
# Announced batches whose mempool is remembered until they commit (at most this many), so
# that commits of other institutions' batches are not reported to this institution's mempool
BATCH_ORIGINS_KEEP = 8192
# A validator process whose directory says it has started before (``STARTED_MARK``), and that
# nobody has started within this long, starts itself: Ray brought it back after a crash and
# its control plane's answer to "restarted?" (``restarted``) was wrong or never came, so
# neither Ray's path nor an operator's starts it. Long enough that a deployer starting the
# network (which waits for every validator to exist first) comes before it.
SELF_START_S = 10.0
STARTED_MARK = "started"

# The simulator's strategies (``consensus.sim.STRATEGIES``), each as a validator actor plays it
ACTOR_STRATEGIES = (
    "none",
    "silent",
    "invalid-signature",
    "double-voter",
    "equivocating-leader",
    "equivocate",
    "lazy-leader",
    "slow-leader",
    "vote-withholder",
    "stale-replayer",
    "fast-clock",
)
# How late a ``slow-leader`` sends its proposals, in base round timeouts (the simulator's)
SLOW_LEADER_DELAY = 0.75
# A ``stale-replayer`` keeps this many of the messages it received, and sends
# ``STALE_REPLAYS`` of them, picked at random, to every peer each time one of its timers fires
STALE_KEEP = 256
STALE_REPLAYS = 3
# How far ahead the clock of a ``fast-clock`` validator is (its blocks' timestamps)
FAST_CLOCK_MS = 3_600_000
# Rejections are counted by kind: the numbers in a reason (a round, milliseconds) would make
# one key per message, and a Byzantine peer could grow the count without bound
_NUMBERS = re.compile(r"\d+")


class Validator:
    """One institution's validator. Created through ``ray.remote`` by the cluster layer."""

    def __init__(self, data_dir: str, index: int) -> None:
        """Everything comes from the network's data directory: ``genesis.toml``,
        ``network.json`` (transport and timing settings), ``keys/<name>.key`` and this
        validator's own ``validator-<index>/`` (block store, safety state). A start that
        cannot write to its disk (full, say: a torn tail set aside needs room) ends the
        process, which Ray starts again, rather than failing the actor for good."""
        try:
            self._open(data_dir, index)
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_failure(exc):
                raise
            stop_on_disk_failure(f"validator {index}, starting,", exc)

    def _open(self, data_dir: str, index: int) -> None:
        root = Path(data_dir)
        settings = json.loads((root / "network.json").read_text())
        self.genesis = parse_genesis((root / "genesis.toml").read_text())
        name = self.genesis.validators.validators[index].name
        self.signer = Ed25519Signer(read_key_file(root / "keys" / f"{name}.key"))
        self.network = settings["name"]
        base_timeout_ms = int(settings.get("base_timeout_ms", 1000))
        idle_block_ms = int(settings.get("idle_block_ms", base_timeout_ms // 2))
        straggler_wait_ms = int(settings.get("straggler_wait_ms", CoreConfig.straggler_wait_ms))
        failure_cycles = int(
            settings.get("leader_failure_cycles", CoreConfig.leader_failure_cycles)
        )
        max_batches_per_block = int(settings.get("max_batches_per_block", 64))
        clock_ahead_ms = int(settings.get("max_clock_ahead_ms", CoreConfig.max_clock_ahead_ms))
        matrix = settings.get("latency_ms")
        latency_ms = list(matrix[index]) if matrix else None
        verifier_backend = settings.get("verifier_backend", "auto")
        self.shards = int(settings.get("storage_shards", 0))
        self.shard_pending_max = int(settings.get("shard_pending_blocks", SHARD_PENDING_MAX))
        # Heights of committed batches kept servable to peers from memory (the core refuses
        # a repeat within its committed window; older repeats come with their batch again)
        self.batch_window = int(settings.get("batch_window_heights", CoreConfig().committed_window))
        self.checkpoint_every = max(1, int(settings.get("snapshot_every_blocks", CHECKPOINT_EVERY)))
        self.state_lag = max(0, int(settings.get("state_lag_blocks", SHARD_REPLAY_KEEP)))
        self.state_memory = int(settings.get("state_memory_entries", STATE_MEMORY_ENTRIES))
        # Parallelism on a Ray node comes from actors; no per-actor hashing processes.
        os.environ.setdefault("RAYLEDGER_CPU_WORKERS", "0")
        self.index = index
        self.verifier = Ed25519Verifier(verifier_backend)
        self.dir = root / f"validator-{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # This process alone uses the directory from here on (see actors.storage.lock)
        self._lock = hold_lock(self.dir / "validator.lock", f"validator {index} ({self.dir})")
        # The safety state persisted before every vote (``safety.bin``: its form before the
        # two slots, still read)
        self.safety_file = SlotFile(self.dir, "safety", legacy=self.dir / "safety.bin")
        self.latency = latency_ms or [0.0] * self.genesis.validators.n
        self.peers: dict[int, Any] = {}
        # Consensus messages go on direct streams to the peers (``actors.streams``), by Ray
        # call while a stream is not up; ``peer_streams: false`` sends every one by Ray
        self.peer_streams = bool(settings.get("peer_streams", True))
        self.stream_server: StreamServer | None = None
        self.stream_out: dict[int, StreamSender] = {}
        self._frames_out_before = 0  # frames sent on streams that were replaced since
        self.ray_sends = 0  # consensus messages' sends by Ray call
        # Sealed batches that came on mempools' streams (the others came by Ray call), and
        # their handling while it awaits checks
        self.batch_frames_in = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self.mempool: Any = None
        self.verifier_actor: Any = None
        self.batches: dict[bytes, pa.RecordBatch] = {}
        # Batches whose checks are under way here (a copy sent again meanwhile is dropped)
        self._checking: set[bytes] = set()
        # Checks waiting their turn: per mempool (-1: announced with none), the waiters and
        # the rows of the batches among them that came in memory; mempools in turn order
        self.checks_at_once = max(1, int(settings.get("validator_checks_at_once", CHECKS_AT_ONCE)))
        self.intake_batches = max(1, int(settings.get("validator_intake_batches", INTAKE_BATCHES)))
        # An honest mempool has at most its capacity uncommitted: never dropped for it
        intake_rows = settings.get("validator_intake_rows")
        if intake_rows is None:
            intake_rows = max(INTAKE_ROWS, 2 * int(settings.get("mempool_capacity", 0)))
        self.intake_rows = max(1, int(intake_rows))
        intake_bytes = settings.get("validator_intake_bytes")
        if intake_bytes is None:
            intake_bytes = max(INTAKE_BYTES, 2 * int(settings.get("mempool_capacity_bytes", 0)))
        self.intake_bytes = max(1, int(intake_bytes))
        self._intake: dict[int, collections.deque[tuple[asyncio.Future[None], int, int]]] = {}
        self._intake_rows: dict[int, int] = {}
        self._intake_bytes: dict[int, int] = {}
        self._checks_running = 0
        # Rows checked per mempool (by announcement), and those of the mempool served last:
        # the fair queue's clock
        self._served: dict[int, int] = {}
        self._clock = 0
        # Batches waiting their turn (digest -> turn, mempool, rows), and announcements being
        # checked (digest -> done once checked and held or refused)
        self._turns: dict[bytes, tuple[asyncio.Future[None], int, int]] = {}
        self._checks_done: dict[bytes, asyncio.Future[None]] = {}
        # Per mempool: the next sealing sequence number to hold, and batches waiting for it
        self.origin_next: dict[int, int] = {}
        self.origin_waiting: dict[int, dict[int, tuple[bytes, pa.RecordBatch | None]]] = {}
        # Mempool -> the sealing number whose wait (``_release_waiting``) is under way
        self._stall_timers: dict[int, int] = {}
        # Announced batches not committed yet: whether this institution's mempool announced
        # it (True) or only other institutions' (False), in the order first announced
        self.batch_is_ours: dict[bytes, bool] = {}
        # The latest evidence of misbehaviour (a Byzantine peer can produce it every round:
        # kept bounded), with counts of all of it by kind
        self.evidence: collections.deque[Evidence] = collections.deque(maxlen=EVIDENCE_KEEP)
        self.evidence_counts: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.started = False
        # Batches being fetched for proposals, each done when its fetch ends (``_fetch``)
        self._fetching: dict[bytes, asyncio.Future[None]] = {}
        # Started by itself (``start_unless_started``), nobody having started it
        self.self_started = False
        # Given to this institution's own mempool only, kept in memory (a new one after every
        # restart): a batch announced with seal_tag(seal_key, digest, batch) was verified by
        # that mempool, and its signatures are not checked a second time here
        self.seal_key = os.urandom(32)
        self.own_batches = 0
        # Batches a mempool sent again that were new here (``batch_ready``'s ``resent_by``)
        self.batches_resent = 0
        # Rows of batches fetched from a peer for a proposal (checked here, in full)
        self.fetched_rows = 0
        # Mempools asked for their backlog by a leader's wait for a gap (``AskBacklog``)
        self.backlog_asked = 0
        self._rekeyed_at = 0.0
        self.me: Any = None  # this actor's own handle, known from start()
        # Fault injection (chaos and tests): peers cut off by a partition, and a Byzantine
        # strategy from the simulator's catalogue applied to what this validator sends.
        self.blocked: set[int] = set()
        self.strategy = "none"
        self._stale: collections.deque[Message] = collections.deque(maxlen=STALE_KEEP)

        # With storage shards the (partitioned) transaction index is theirs, not the store's
        # Opened from its verified mark: a restart re-reads what was appended since, not the
        # whole chain (reads check every frame's checksum; an audit opens it in full)
        self.store = BlockStore(
            self.dir / "store",
            self.genesis.header,
            verify_from_mark=True,
            index_txs=not self.shards,
        )
        # Storage shards: committed blocks waiting to reach every shard (height -> object ref
        # of a CommittedBlock, shared by all shards), the height each shard has acknowledged,
        # and the state writes of recent blocks (to rebuild what a shard lost).
        # Commit proofs (what receipts carry) of the last ``shard_pending_max`` heights stay
        # in memory; older ones are read back from the store when a shard needs rebuilding
        # (``replayed_proofs``, dropped again as the shards acknowledge).
        self._import_commit_log()
        self.proofs_from = max(0, self.store.height - self.shard_pending_max)
        self.commit_proofs = self._load_commit_proofs(self.proofs_from, self.store.height)
        self.replayed_proofs: dict[int, tuple[QuorumCert, BlockHeader, QuorumCert]] = {}
        self.replayed_proofs_from: int | None = None
        self.shard_pending: dict[int, CommittedBlock] = {}
        self.shard_acked: dict[int, int] = {}
        self.shard_handles: dict[int, Any] = {}
        self.shard_wake: dict[int, asyncio.Event] = {}
        self._shard_tasks: list[asyncio.Task[None]] = []
        # How late this validator's event loop runs (status ``loop``); a stall of half the
        # base round timeout, which can end rounds by timeout, is logged
        self.loop_watch = LoopWatch(f"validator {index}", warn_ms=base_timeout_ms / 2)
        self._loop_task: asyncio.Task[None] | None = None
        self._refill_lock = asyncio.Lock()
        # Block reads for peers' batch fetches (get_batch), in a thread, one at a time
        self._disk_reads = asyncio.Lock()
        # Seconds this validator's event loop spent committing (and handing blocks to shards)
        self.timings: dict[str, float] = {}
        # Wall-clock commit time of each height committed since this process started.
        self.commit_times: dict[int, float] = {}
        # The transaction ids of the latest committed blocks (at most COMMIT_IDS_KEEP_ROWS),
        # so that a load generator's polls do not read blocks back from disk
        self.commit_ids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._commit_id_rows = 0
        self.committed_batches = self._load_batch_index()
        keep_from = self.store.height - SHARD_REPLAY_KEEP
        base, head, self.restored_from, self.replayed_writes = self._replay(keep_from)
        assert isinstance(base, CommittedState)
        self.state = base
        self.builder = LedgerBuilder(
            self.batches, head, base, max_txs=self.genesis.limits.max_block_txs
        )
        self._recent_proposals: collections.deque[bytes] = collections.deque(
            maxlen=CoreConfig().committed_window
        )
        self._proposal_log_count = 0
        # Proposals voted for and not committed, and their batches (``_safety_record``)
        self.voted: dict[bytes, Proposal] = {}
        self.voted_ipc: dict[bytes, bytes] = {}
        self.voted_batches: dict[bytes, pa.RecordBatch] = {}
        persisted, known = self._load_consensus()
        known = [p for p in known if p.block.height <= head.height]
        # Those committed since the record was written are in the store already
        self.voted = {h: p for h, p in self.voted.items() if p.block.height > head.height}
        named = {d for p in self.voted.values() for d in p.block.batch_digests}
        self.voted_batches = {d: b for d, b in self.voted_batches.items() if d in named}
        known += list(self.voted.values())
        self.core = Core(
            validators=self.genesis.validators,
            index=index,
            signer=self.signer,
            verifier=self.verifier,
            genesis=self.genesis.header,
            builder=self.builder,
            config=CoreConfig(
                base_timeout_ms=base_timeout_ms,
                max_batches_per_block=max_batches_per_block,
                idle_block_ms=idle_block_ms,
                straggler_wait_ms=straggler_wait_ms,
                leader_failure_cycles=failure_cycles,
                max_clock_ahead_ms=clock_ahead_ms,
                # A batch ahead of its sender's earlier nonces waits for them (a partition cut
                # the earlier batch off, say) for up to five round timeouts, 5 s at least:
                # enough for the leader that holds them to catch up, come round and propose
                gap_wait_ms=max(5000, 5 * base_timeout_ms),
            ),
            persisted=persisted,
            committed_head=head,
            known_blocks=known,
        )
        # Timers set by the core, with their rounds: those of rounds the core has left are
        # cancelled (it would drop them when they fire; each firing wakes this process)
        self._timers: list[tuple[int, asyncio.TimerHandle]] = []
        # Rounds entered by a timeout certificate so far (each is logged)
        self._timed_out_rounds = 0
        self._starting: asyncio.Future[None] | None = None
        if restarted():
            # Ray brought this validator back after its process died (a crash, its node
            # lost and a node of its site there again): rebuilt from its disk above, it finds
            # its peers and its mempool again as `rayledger chaos restart` would have it do
            log.warning("validator %d: restarted by Ray after a crash; rejoining", index)
            me = ray.get_runtime_context().current_actor
            me.start.options(max_task_retries=RESTART_RETRIES).remote()
        elif (self.dir / STARTED_MARK).exists() and in_actor():
            me = ray.get_runtime_context().current_actor
            me.start_unless_started.options(max_task_retries=RESTART_RETRIES).remote(SELF_START_S)

    # ---- persistence -----------------------------------------------------------------------

    def _replay(
        self, keep_from: int, *, need_all: bool = False
    ) -> tuple[StateView, BlockHeader, int, dict[int, dict[bytes, bytes]]]:
        """Rebuild the committed state by re-executing the stored chain above the last
        checkpoint of ``state.db``; a stored state root that differs from re-execution means
        the store or this code is wrong: refuse. Returns the state, its head, the height it
        began from (0: genesis) and the writes of re-executed blocks above ``keep_from`` (for
        the storage shards).

        ``need_all``: the writes of every block above ``keep_from`` are needed (a shard's
        rebuild, beside the live state): the chain is re-executed on a state of its own in
        memory, from genesis or from a snapshot of the earlier form at or below
        ``keep_from``. It reads only the store and that file, so it may run in a thread."""
        base: StateView
        if need_all:
            base, _ = genesis_state(self.genesis.accounts)
            head = self.genesis.header
            snap = self._legacy_snapshot()
            if snap is not None and snap[0].height <= keep_from:
                head, base.writes = snap
        else:
            base, head = self._open_state()
        start = head.height
        writes: dict[int, dict[bytes, bytes]] = {}
        for header, rows in self.store.iter_rows(head.height + 1, self.store.height):
            view, _, root = execute_block(base, rows, header.height, head.state_root)
            if root != header.state_root:
                raise LedgerError(f"height {header.height}: re-executed state root differs")
            if header.height > keep_from and self.shards:
                writes[header.height] = dict(view.writes)
            base.absorb(header.height, view.writes)
            head = header
            if isinstance(base, CommittedState):  # memory stays bounded while it replays
                upto = head.height - self.state_lag
                if self._checkpoint_due(base, upto):
                    base.checkpoint_now(upto, self.store.get_header(upto).hash)
        return base, head, start, writes

    def _open_state(self) -> tuple[CommittedState, BlockHeader]:
        """The committed state as of its last checkpoint, and that block's header. A file
        that names no block of this store (another chain; a store that lost its tail) is
        rebuilt: seeded with the genesis state, or with a snapshot of the earlier form."""
        state = CommittedState(self.dir / "state.db")
        if state.block_hash is not None:
            h = state.height
            header = self.genesis.header if h == 0 else None
            if 0 < h <= self.store.height:
                header = self.store.get_header(h)
            if header is not None and header.hash == state.block_hash:
                return state, header
            log.warning("validator %d: state.db (height %d) is not of this chain", self.index, h)
        base, _ = genesis_state(self.genesis.accounts)
        head, entries = self.genesis.header, base.writes
        snap = self._legacy_snapshot()
        if snap is not None:
            head, entries = snap
        state.seed(head.height, head.hash, entries.items())
        return state, head

    def _legacy_snapshot(self) -> tuple[BlockHeader, dict[bytes, bytes]] | None:
        """The state snapshot earlier versions wrote (``state.snap``), if it is of this chain:
        a validator upgraded in place starts from it instead of genesis."""
        snap = load_snapshot(self.dir / "state.snap")
        if snap is None:
            return None
        height, block_hash, state = snap
        if 0 < height <= self.store.height:
            header = self.store.get_header(height)
            if header.hash == block_hash:
                return header, state
        log.warning("validator %d: state snapshot is not of this chain", self.index)
        return None

    def _checkpoint_due(self, state: CommittedState, upto: int) -> bool:
        """Whether to write the state as of ``upto``: ``checkpoint_every`` blocks since the
        last checkpoint, or ``state_memory`` entries held in memory since."""
        if upto <= state.height:
            return False
        return upto - state.height >= self.checkpoint_every or state.held_entries >= max(
            1, self.state_memory
        )

    def _maybe_checkpoint(self) -> None:
        """Write the committed state as of ``state_lag`` blocks behind the head to
        ``state.db`` when one is due, by a thread (the event loop goes on reading it); the
        blocks written then leave memory."""
        state = self.state
        upto = self.builder.head.height - self.state_lag
        if not self._checkpoint_due(state, upto):
            return
        job = state.begin_checkpoint(upto, self.store.get_header(upto).hash)
        if job is None:  # one is being written
            return
        future = asyncio.get_running_loop().run_in_executor(None, state.write_checkpoint, job)

        def written(f: asyncio.Future[None]) -> None:
            failed = f.cancelled() or f.exception() is not None
            if failed:
                log.error(
                    "validator %d: state checkpoint at %d failed: %r",
                    self.index,
                    upto,
                    None if f.cancelled() else f.exception(),
                )
            state.end_checkpoint(upto, job[1], written=not failed)

        future.add_done_callback(written)

    def _load_commit_proofs(
        self, lo: int, hi: int
    ) -> dict[int, tuple[QuorumCert, BlockHeader, QuorumCert]]:
        """height -> (QC certifying it, its child in the next round, the child's QC) for the
        last block of every commit with ``lo <= height <= hi`` (and in the store), in height
        order: what proves a commit in a receipt. Reads only the store (a thread may)."""
        out = {}
        for height, record in self.store.commit_proofs(lo, min(hi, self.store.height)):
            r = Reader(record, "commit proof record")
            r.u64("height")
            qc = QuorumCert.decode(r.var_bytes("qc"))
            child = BlockHeader.decode(r.var_bytes("child"))
            child_qc = QuorumCert.decode(r.var_bytes("child qc"))
            out[height] = (qc, child, child_qc)
        return out

    def _load_consensus(self) -> tuple[SafetyState | None, list[Proposal]]:
        state = None
        data = self.safety_file.read()
        if data is not None and data.startswith(SAFETY_WITH_VOTES):
            state = self._read_safety_record(data)
        elif data is not None:  # the form before the voted proposals were kept
            state = decode_safety(data)
        window = CoreConfig().committed_window
        records = _read_records(self.dir / "proposals.log")
        self._proposal_log_count = len(records)
        self._recent_proposals.extend(records[-window:])
        return state, [decode_proposal(r) for r in records[-window:]]

    def _safety_record(self, state: SafetyState, voted: Proposal | None) -> bytes:
        """The safety state, and the proposals voted for above the committed head with the
        batches they name (those held: a batch not held here is one peers must serve), in one
        record: one write, one fsync, before the vote leaves."""
        if voted is not None:
            self.voted[voted.block.hash] = voted
        low = self.core.committed.height
        for h in [h for h, p in self.voted.items() if p.block.height <= low]:
            del self.voted[h]
        while len(self.voted) > VOTED_KEEP:
            _pop_first(self.voted)
        named = {d for p in self.voted.values() for d in p.block.batch_digests}
        for d in [d for d in self.voted_ipc if d not in named]:
            del self.voted_ipc[d]
        parts = [SAFETY_WITH_VOTES, var_bytes(encode_safety(state)), u32(len(self.voted))]
        for p in self.voted.values():
            held = []
            for d in p.block.batch_digests:
                if d not in self.voted_ipc and d in self.batches:
                    self.voted_ipc[d] = batch_to_ipc(self.batches[d])
                if d in self.voted_ipc:
                    held.append(var_bytes(d) + var_bytes(self.voted_ipc[d]))
            parts += [var_bytes(encode_proposal(p)), u32(len(held)), *held]
        return b"".join(parts)

    def _read_safety_record(self, data: bytes) -> SafetyState:
        """The state of a ``_safety_record``; its proposals and batches go to ``voted`` and
        ``voted_batches`` (the core and the batch map take them at start)."""
        r = Reader(data[len(SAFETY_WITH_VOTES) :], "safety record")
        state = decode_safety(r.var_bytes("safety state"))
        for _ in range(r.u32("voted proposals")):
            p = decode_proposal(r.var_bytes("voted proposal"))
            self.voted[p.block.hash] = p
            for _ in range(r.u32("batches")):
                digest = bytes(r.var_bytes("batch digest"))
                raw = bytes(r.var_bytes("batch"))
                self.voted_ipc[digest] = raw
                self.voted_batches[digest] = batch_from_ipc(raw)
        r.finish()
        return state

    def _import_commit_log(self) -> None:
        """Move the proofs of a commits.log (where earlier versions kept them) into the store."""
        path = self.dir / "commits.log"
        if not path.exists():
            return
        proofs = [(int.from_bytes(r[:8], "big"), r) for r in _read_records(path)]
        self.store.put_commit_proofs([(h, r) for h, r in proofs if h <= self.store.height])
        path.rename(path.with_name("commits.log.imported"))

    def _load_batch_index(self) -> dict[bytes, tuple[int, int, int]]:
        """digest -> (height, first row, rows) of the batches committed in the last
        ``batch_window`` heights (what peers may still ask for), in height order."""
        path = self.dir / "batches.idx"
        data = path.read_bytes() if path.exists() else b""
        if len(data) % 48:  # a torn entry (crash during its append): cut so appends align
            _cut(path, len(data) - len(data) % 48)
        self._batch_index_entries = len(data) // 48
        low = self.store.height - self.batch_window
        out: dict[bytes, tuple[int, int, int]] = {}
        for pos in range(0, len(data) - len(data) % 48, 48):
            height, offset, rows = struct.unpack(">QII", data[pos + 32 : pos + 48])
            if low < height <= self.store.height:
                digest = data[pos : pos + 32]
                out.pop(digest, None)  # committed again later: keep the map in height order
                out[digest] = (height, offset, rows)
        return out

    def _bound_memory(self) -> None:
        """Keep what this validator holds per height bounded (it commits for ever): commit
        proofs beyond the shard queue's depth, batches beyond ``batch_window`` heights and
        old commit times leave memory; the logs on disk keep what a restart, a lagging
        peer or a shard rebuild needs, and batches.idx is rewritten once it holds twice the
        window."""
        head = self.store.height
        floor = head - self.shard_pending_max
        if floor > self.proofs_from:
            while self.commit_proofs and next(iter(self.commit_proofs)) < floor:
                h, proof = _pop_first(self.commit_proofs)
                if self.replayed_proofs_from is not None:  # a rebuild reads these: keep
                    self.replayed_proofs[h] = proof
            self.proofs_from = floor
        low = head - self.batch_window
        while self.committed_batches and next(iter(self.committed_batches.values()))[0] <= low:
            _pop_first(self.committed_batches)
        while len(self.commit_times) > COMMIT_TIMES_KEEP:
            _pop_first(self.commit_times)
        if self._batch_index_entries > 2 * len(self.committed_batches) + 1024:
            fsync_write(
                self.dir / "batches.idx",
                b"".join(d + struct.pack(">QII", *at) for d, at in self.committed_batches.items()),
            )
            self._batch_index_entries = len(self.committed_batches)

    def _append_proposals(self, proposals: tuple[Proposal, ...]) -> None:
        """Append committed proposals (a restart reloads the last window of them). The log is
        rewritten with only that window once it holds twice as many, so it stays bounded."""
        raws = [encode_proposal(p) for p in proposals]
        self._recent_proposals.extend(raws)
        self._proposal_log_count += len(raws)
        path = self.dir / "proposals.log"
        if self._proposal_log_count > 2 * (self._recent_proposals.maxlen or 0):
            fsync_write(path, b"".join(_record(r) for r in self._recent_proposals))
            self._proposal_log_count = len(self._recent_proposals)
            return
        with open(path, "ab") as f:
            f.write(b"".join(_record(r) for r in raws))
            f.flush()
            os.fsync(f.fileno())

    # ---- wiring ------------------------------------------------------------------------------

    async def mempool_back(self, index: int) -> None:
        """Mempool ``index`` restarted (Ray brought it back after a crash) and knows no
        validator: give it this one's handle, stream endpoint and, if it is this institution's,
        the seal key, as at start."""
        if not self.started or not 0 <= index < self.genesis.validators.n:
            return
        try:
            mempool = self._actor(f"mempool-{index}")
        except ValueError:
            return
        key = self.seal_key if index == self.index else None
        # Asked from the mempool's __init__: it may still be coming up when this arrives
        mempool.set_validator.options(max_task_retries=RESTART_RETRIES).remote(
            self.index, self.me, key, self._endpoint(n_mempool=index)
        )
        if index == self.index:
            self.mempool = mempool

    async def set_peer(self, index: int, handle: Any, endpoint: Any = None) -> None:
        """A peer (re)started: its new handle, and where it accepts streams (None: it sends
        and takes everything by Ray). Answered with this validator's own endpoint, which a
        restarted peer does not know."""
        if index == self.index or not 0 <= index < self.genesis.validators.n:
            return
        self.peers[index] = handle
        self._stream_to(index, endpoint)
        mine = self._endpoint(index)
        if endpoint is not None and mine is not None:
            handle.peer_endpoint.remote(self.index, mine)

    async def peer_endpoint(self, index: int, endpoint: Any) -> None:
        """A peer's answer to ``set_peer``: where it accepts streams."""
        if index != self.index and 0 <= index < self.genesis.validators.n:
            self._stream_to(index, endpoint)

    def _stream_to(self, index: int, endpoint: Any) -> None:
        """Stream to peer ``index`` at ``endpoint`` from now on (None: by Ray call only). A
        malformed endpoint is counted and changes nothing."""
        ep = None
        if endpoint is not None and self.peer_streams:
            ep = parse_endpoint(endpoint, index, self._count)
            if ep is None:
                return
        old = self.stream_out.pop(index, None)
        if old is not None:
            self._frames_out_before += old.frames_out
            old.close()
        if ep is not None:
            self.stream_out[index] = StreamSender(self.index, ep, self._count)

    async def start(self) -> bool:
        """Find the peers and the mempool by name, tell them where this validator is, and
        enter the first round. Called once all validators exist, and after every restart;
        a call while another runs (Ray's restart and an operator's) waits for that one.
        False if this process had started before the call (nothing done)."""
        if self.started:
            return False
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())  # first, or again if it failed
        await asyncio.shield(self._starting)
        return True

    async def start_unless_started(self, delay_s: float) -> bool:
        """Start after ``delay_s`` unless something has started this process meanwhile (see
        ``SELF_START_S``). True if it was this call that started it."""
        await asyncio.sleep(delay_s)
        if self.started or self._starting is not None:
            return False
        log.warning(
            "validator %d: ran before and not started within %.0f s: starting by itself",
            self.index,
            delay_s,
        )
        self.self_started = True
        return await self.start()

    async def _start(self) -> None:
        if self.started:
            return
        me = self.me = ray.get_runtime_context().current_actor
        if self.peer_streams:
            n = self.genesis.validators.n
            self.stream_server = StreamServer(
                self.index, n, self._on_frame, self._count, mempools=n
            )
            await self.stream_server.start(ray.util.get_node_ip_address())
        for j in range(self.genesis.validators.n):
            if j == self.index:
                continue
            try:
                handle = self._actor(f"validator-{j}")
            except ValueError:  # down: it announces itself when it comes back
                continue
            self.peers[j] = handle
            # (a peer being restarted takes it once up)
            handle.set_peer.options(max_task_retries=RESTART_RETRIES).remote(
                self.index, me, self._endpoint(j)
            )
        try:
            self.verifier_actor = self._actor(f"verifier-{self.index}")
        except ValueError:  # none deployed: verify in this process
            self.verifier_actor = None
        for j in range(self.genesis.validators.n):
            try:
                mempool = self._actor(f"mempool-{j}")
            except ValueError:
                continue
            key = self.seal_key if j == self.index else None
            # With every batch it holds in flight: this process starts with none in memory
            mempool.set_validator.options(max_task_retries=RESTART_RETRIES).remote(
                self.index, me, key, self._endpoint(n_mempool=j), held=True
            )
            if j == self.index:
                self.mempool = mempool
        self.started = True
        try:  # a process of this validator started from here on starts by itself if need be
            (self.dir / STARTED_MARK).touch()
        except OSError as exc:
            log.warning("validator %d: cannot mark its directory started: %r", self.index, exc)
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self.loop_watch.run())
        for k in range(self.shards):
            self.shard_wake[k] = asyncio.Event()
            self._shard_tasks.append(loop.create_task(self._push_shard(k)))
        self._wake_shards()
        self.core.tick(self._clock_ms())  # a first proposal's timestamp
        # The batches of the blocks voted for before a restart, for the core's start to
        # take those blocks again (checked when they were voted for, kept on this disk)
        restored, self.voted_batches = self.voted_batches, {}
        for digest, batch in restored.items():
            self._hold(digest, batch)
        self._run(self.core.start())

    def _actor(self, role: str) -> Any:
        return ray.get_actor(f"{self.network}-{role}", namespace="rayledger")

    async def where(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "index": self.index,
            "node_id": ctx.get_node_id(),
            "labels": {
                k: v for k, v in ctx.get_node_labels().items() if not k.startswith("ray.io/")
            },
        }

    # ---- inbound -------------------------------------------------------------------------------

    async def set_blocked(self, peers: list[int]) -> None:
        """Drop all traffic to and from these peers and their sites' mempools (a network
        partition) until unblocked. A mempool unblocked is asked for the batches it holds in
        flight: those it announced meanwhile were dropped here."""
        healed = self.blocked - set(peers)
        self.blocked = set(peers)
        for j in sorted(healed):
            self._ask_held(j)

    def _ask_held(self, mempool: int) -> bool:
        """Ask ``mempool`` to send this validator every batch it holds in flight
        (``Mempool.announce_held``); False if it is down (a mempool restarted holds nothing
        from before)."""
        try:
            self._actor(f"mempool-{mempool}").announce_held.remote(self.index)
        except ValueError:
            return False
        return True

    def _ask_backlog(self, mempool: int) -> None:
        """Ask ``mempool`` for every batch it holds in flight (``Mempool.announce_held``):
        the batch ahead of one a proposal of ours holds back may have been lost here. Not
        across a partition: the heal asks."""
        if mempool not in self.blocked and self._ask_held(mempool):
            self.backlog_asked += 1

    async def set_strategy(self, strategy: str) -> None:
        if strategy not in ACTOR_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(ACTOR_STRATEGIES)}")
        fast = self.strategy == "fast-clock"
        self.strategy = strategy
        if fast and strategy != "fast-clock":
            # Its clock set right (the core's only moves forward by itself)
            self.core.now_ms = self._clock_ms()

    async def deliver(self, sender: int, data: bytes, not_before: float | None = None) -> None:
        """Messages from peer ``sender`` in their canonical wire form (``consensus.wire``),
        sent by Ray call (a stream's frames take the same way from ``_on_frame``): bytes that
        do not parse are counted and dropped; the core checks the rest.

        ``not_before``: with the WAN emulated, the wall-clock time (``time.time()``) before
        which they must not be handled; the hold never exceeds the emulated latency of the
        link from ``sender`` (none without emulation). Anything but a finite number is
        counted and the messages dropped."""
        if not_before is not None and (
            not isinstance(not_before, (int, float)) or isinstance(not_before, bool)
        ):
            self._count("wire: bad_hold")
            return
        self._on_frame(sender, data, not_before)

    def _on_frame(self, sender: int, data: bytes, not_before: float | None) -> None:
        n = self.genesis.validators.n
        if sender >= n:  # a mempool's sealed batch (the server admits no other sender)
            self._on_batch_frame(sender - n, data)
            return
        if not_before is not None:
            if not math.isfinite(not_before):
                self._count("wire: bad_hold")
                return
            wait = min(not_before - time.time(), self._link_s(sender))
            if wait > 0:
                asyncio.get_running_loop().call_later(wait, self._on_messages, sender, data)
                return
        self._on_messages(sender, data)

    def _on_messages(self, sender: int, data: bytes) -> None:
        if sender in self.blocked:  # a partition applies to what arrives while it lasts
            return
        try:
            messages = decode_messages(data)
        except (LedgerError, TypeError) as exc:
            code = exc.code if isinstance(exc, LedgerError) else "not_bytes"
            self._count(f"wire: {code}")
            return
        self.core.tick(self._clock_ms())
        if self.strategy == "stale-replayer":
            self._stale.extend(messages)
        self._run(self.core.on_messages(messages))

    def _on_batch_frame(self, mempool: int, data: bytes) -> None:
        """A batch mempool ``mempool`` sealed, on its stream: handled as ``batch_ready``, with
        the batch at hand instead of a reference. A frame that does not parse is counted."""
        try:
            digest, seq, tag, batch = decode_batch_frame(
                data, max_rows=self.genesis.limits.max_batch_rows
            )
        except ValueError as exc:
            log.warning("validator %d: batch frame from mempool %d: %s", self.index, mempool, exc)
            self._count("stream: bad_batch_frame")
            return
        self.batch_frames_in += 1
        task = asyncio.get_running_loop().create_task(
            self.batch_ready(digest, [], (mempool, seq), tag, body=batch)
        )
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def batch_ready(
        self,
        digest: bytes,
        refs: list[Any],
        origin: tuple[int, int] | None = None,
        tag: bytes | None = None,
        *,
        body: pa.RecordBatch | None = None,
        resent_by: int | None = None,
    ) -> None:
        """A mempool sealed a batch (``origin``: the mempool and its sealing sequence number):
        check it ourselves (in this institution's verifier when there is one, so the event
        loop stays free), then tell the core, in the order the mempool sealed its batches.

        A batch from this institution's own mempool, tagged under the seal key this validator
        gave it (over the digest and the signature column), had every signature verified
        there, in this institution: only its shape, ids and digest are checked here. Any other
        batch, and one with a missing or wrong tag, is checked in full: other institutions'
        checks are never trusted.

        ``body``: the batch itself, where it came on the mempool's stream (``refs`` is then
        empty).

        With the WAN emulated, a batch from another site's mempool (each sits at its
        validator's site) is taken only after that link's latency, however it came: batches
        cross the WAN as consensus messages do. One mempool's batches share their link's
        latency, so they keep their order. A partition that cuts a mempool's site off drops
        its batches as it drops consensus messages (each takes its turn, so the mempool's
        later batches do not wait for it): a proposal that names one after the heal is served
        by a peer that holds it.

        ``resent_by``: mempool ``resent_by`` sent this batch again, outside its sealing order
        (it was long in flight: this validator may have missed it); it crosses the WAN and a
        partition as the mempool's batches do, and is taken at once if it is new here."""
        if not _well_formed_announcement(digest, origin, resent_by, self.genesis.validators.n):
            # By Ray call anything may come: a NaN or a string for a sealing number wedged
            # that mempool's order here for good (NaN never compares), and batches piled up
            self._count("batch: malformed announcement")
            return
        mempool = origin[0] if origin is not None else resent_by
        if mempool is not None:
            hold = self._link_s(mempool)
            if hold > 0:
                await asyncio.sleep(hold)
            self._note_origin(digest, mempool)
            if origin is not None:
                # A mempool's order starts here with the first of its batches to arrive, not
                # the first whose check finishes (one check can overtake another)
                self.origin_next.setdefault(origin[0], origin[1])
            if mempool in self.blocked:
                self._count("batch: partitioned")
                self._in_order(origin, digest, None)
                return
        # Held, or committed here already (a batch sent again, one that came after a peer's
        # proposal had it fetched): not checked or held a second time
        if digest in self.batches or digest in self.committed_batches:
            self._in_order(origin, digest, None)
            return
        if resent_by is not None:
            # Sent again while its first copy is still being checked here, or checked and
            # waiting its turn behind its mempool's earlier batches: that copy will be held
            if digest in self._checking or self._awaits_turn(digest):
                self._count("batch: resent, in flight here")
                return
            self.batches_resent += 1
        self._checking.add(digest)
        # Done once this announcement is checked and took its turn (``_fetch`` waits for it)
        done = self._checks_done.get(digest)
        mine = done is None
        if done is None:
            done = self._checks_done[digest] = asyncio.get_running_loop().create_future()
        try:
            try:
                canonical = await self._check_in_turn(digest, refs, origin, tag, body, mempool)
            finally:
                self._checking.discard(digest)
            # Its turn is taken whatever the outcome: the mempool's next batches wait for it
            self._in_order(origin, digest, canonical)
        finally:
            if mine:
                del self._checks_done[digest]
                done.set_result(None)

    async def _check_in_turn(
        self,
        digest: bytes,
        refs: list[Any],
        origin: tuple[int, int] | None,
        tag: bytes | None,
        body: pa.RecordBatch | None,
        mempool: int | None,
    ) -> pa.RecordBatch | None:
        """``_check_announced`` once this batch's turn comes: at most ``checks_at_once`` run
        at once, and the mempools with batches waiting share the checking fairly by rows
        (``_next_checks``), each mempool's batches in the order they came. ``None`` also
        where its mempool has too many waiting (dropped, counted), or where a batch announced
        by reference cannot be fetched."""
        source = -1 if mempool is None else mempool
        if body is None:
            try:
                fetched: pa.RecordBatch = await asyncio.wait_for(refs[0], FETCH_TIMEOUT_S)
            except Exception as exc:  # its object lost, or it never came
                log.warning("validator %d: batch %s: %r", self.index, digest.hex()[:16], exc)
                self._count("batch: unreadable")
                return None
            body = fetched
        rows, size = body.num_rows, body.nbytes
        if rows == 0:
            # A mempool never seals one; charged nothing in the fair queue below, a flood of
            # them would keep its mempool first in line for good, every other one waiting
            self._count("batch: empty")
            return None
        queue = self._intake.get(source)
        if queue is not None and (
            len(queue) >= self.intake_batches
            or self._intake_rows.get(source, 0) + rows > self.intake_rows
            or self._intake_bytes.get(source, 0) + size > self.intake_bytes
        ):
            self._count("batch: intake full")
            return None
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if queue is None:
            queue = self._intake[source] = collections.deque()
            # Back from idle: it starts level with the mempools being served, without credit
            # for the time it sent nothing
            self._served[source] = max(self._served.get(source, 0), self._clock)
        queue.append((turn, rows, size))
        self._intake_rows[source] = self._intake_rows.get(source, 0) + rows
        self._intake_bytes[source] = self._intake_bytes.get(source, 0) + size
        self._turns[digest] = (turn, source, rows)
        self._next_checks()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # its turn had come: give it up
                self._checks_running -= 1
                self._next_checks()
            raise
        finally:
            if self._turns.get(digest, (None,))[0] is turn:
                del self._turns[digest]
        try:
            return await self._check_announced(digest, refs, origin, tag, body)
        except Exception as exc:  # unreadable (its object lost) or the verifier failed
            log.warning("validator %d: batch %s: %s", self.index, digest.hex()[:16], exc)
            self._count("batch: unreadable")
            return None
        finally:
            self._checks_running -= 1
            self._next_checks()

    def _promote(self, digest: bytes) -> None:
        """A proposal names this batch while its check waits its turn: it starts now (past
        ``checks_at_once`` if need be), charged to its mempool as in its turn."""
        entry = self._turns.get(digest)
        if entry is None or entry[0].done():
            return
        turn, source, rows = entry
        turn.set_result(None)  # _next_checks passes over it (done) when it comes up
        self._served[source] = self._served.get(source, 0) + rows
        self._checks_running += 1
        self._count("batch: checked ahead of its turn")

    def _next_checks(self) -> None:
        """Start waiting checks while fewer than ``checks_at_once`` run. Start-time fair
        queueing by rows: the mempool with batches waiting that has had the fewest rows
        checked starts its oldest (a mempool sealing 2,000-row batches gets one checked
        while one sealing 40-row batches gets fifty)."""
        while self._checks_running < self.checks_at_once and self._intake:
            source = min(self._intake, key=self._served.__getitem__)
            self._clock = self._served[source]
            queue = self._intake[source]
            turn, rows, size = queue.popleft()
            self._intake_rows[source] -= rows
            self._intake_bytes[source] -= size
            if not queue:
                del self._intake[source], self._intake_rows[source], self._intake_bytes[source]
            if turn.done():  # its caller went away (cancelled)
                continue
            turn.set_result(None)
            self._served[source] += rows
            self._checks_running += 1

    async def _check_announced(
        self,
        digest: bytes,
        refs: list[Any],
        origin: tuple[int, int] | None,
        tag: bytes | None,
        body: pa.RecordBatch | None = None,
    ) -> pa.RecordBatch | None:
        """The canonical batch, or None where it is refused (or held meanwhile)."""
        batch = body
        own = False
        if isinstance(tag, bytes):
            if batch is None:
                batch = await refs[0]
            own = hmac.compare_digest(tag, seal_tag(self.seal_key, digest, batch))
        if own:
            self.own_batches += 1
        elif origin is not None and origin[0] == self.index:
            self._rekey_mempool()
        if own or self.verifier_actor is None:
            if batch is None:
                batch = await refs[0]
            return self._admit(digest, batch, check_signatures=not own)
        if not refs:  # it came on a stream: the verifier reads it by reference
            refs = [ray.put(batch)]
        reason = await self.verifier_actor.check.remote(digest, refs)
        if digest in self.batches or reason is not None:
            if reason is not None:
                self._count(f"batch: {reason}")
            return None
        if batch is None:
            batch = await refs[0]
        return batch.select(TX_SCHEMA.names).cast(TX_SCHEMA.with_metadata(batch.schema.metadata))

    def _note_origin(self, digest: bytes, mempool: Any) -> None:
        """Remember whether a batch is this institution's: the commit of one that only other
        institutions' mempools announced is not reported to ours, which has nothing to free
        for it. One our mempool announced stays ours whoever announces it too (the same rows
        sealed in two places, or a peer copying them)."""
        if self.batch_is_ours.get(digest):
            return
        self.batch_is_ours[digest] = mempool == self.index
        if len(self.batch_is_ours) > BATCH_ORIGINS_KEEP:
            # One never committed (refused, or lost): forgetting it costs at most a report
            del self.batch_is_ours[next(iter(self.batch_is_ours))]

    def _mempool_news(self, digests: list[bytes]) -> list[bytes]:
        """Of batches just committed, those to report to this institution's mempool: all but
        the ones known to be other institutions' only (an unknown one is reported: it may be
        ours, announced before this validator restarted)."""
        return [d for d in digests if self.batch_is_ours.pop(d, True)]

    def _in_order(
        self, origin: tuple[int, int] | None, digest: bytes, batch: pa.RecordBatch | None
    ) -> None:
        """Hold batches of one mempool in the order it sealed them, so that one sender's
        nonces, submitted in sequence to one mempool, are proposed in sequence: checks finish
        out of order. ``batch`` None: the batch is refused, unreadable or already held (it only
        takes its turn). A batch waits at most ``REORDER_WAIT_S`` for a missing predecessor."""
        if origin is None:
            if batch is not None:
                self._hold(digest, batch)
            return
        mempool, seq = origin
        expected = self.origin_next.get(mempool)
        if expected is None or seq < expected:  # first batch seen, or the mempool restarted
            expected = seq
        waiting = self.origin_waiting.setdefault(mempool, {})
        waiting[seq] = (digest, batch)
        if len(waiting) > ORIGIN_WAITING_MAX and expected not in waiting:
            self._count("batch: too many waiting for a predecessor")
            expected = min(waiting)
        while expected in waiting:
            d, b = waiting.pop(expected)
            if b is not None and d not in self.batches:
                self._hold(d, b, mempool)
            expected += 1
        self.origin_next[mempool] = expected
        if waiting and self._stall_timers.get(mempool) != expected:
            # One wait per gap (not one timer per batch arriving behind it)
            self._stall_timers[mempool] = expected
            asyncio.get_running_loop().call_later(
                REORDER_WAIT_S, self._release_waiting, mempool, expected
            )

    def _awaits_turn(self, digest: bytes) -> bool:
        """Whether ``digest`` was checked and waits for its mempool's earlier batches (a scan:
        only batches sent again ask, and few batches wait)."""
        waiting = (entry for w in self.origin_waiting.values() for entry in w.values())
        return any(d == digest and b is not None for d, b in waiting)

    def _release_waiting(self, mempool: int, stalled_at: int) -> None:
        """A predecessor never came (refused, lost with a crashed mempool): stop waiting."""
        if self._stall_timers.get(mempool) == stalled_at:
            del self._stall_timers[mempool]
        waiting = self.origin_waiting.get(mempool, {})
        if self.origin_next.get(mempool) != stalled_at or not waiting:
            return
        self.origin_next[mempool] = min(waiting)
        d, b = waiting[min(waiting)]
        self._in_order((mempool, min(waiting)), d, b)

    def _rekey_mempool(self) -> None:
        """Our mempool announced a batch without our seal key's tag: it restarted since
        ``start`` (or the key has not reached it yet). Give it the key again, at most once a
        second; meanwhile its batches are checked in full."""
        now = time.monotonic()
        if self.me is None or now - self._rekeyed_at < 1.0:  # not started: start() gives it
            return
        self._rekeyed_at = now
        try:
            mempool = self._actor(f"mempool-{self.index}")
        except ValueError:
            return
        mempool.set_validator.options(max_task_retries=RESTART_RETRIES).remote(
            self.index, self.me, self.seal_key, self._endpoint(n_mempool=self.index)
        )

    def _endpoint(
        self, peer: int | None = None, *, n_mempool: int | None = None
    ) -> tuple[str, int, bytes] | None:
        """Where this validator accepts streams, with the token of validator ``peer`` or of
        mempool ``n_mempool`` (None: it takes everything by Ray)."""
        server = self.stream_server
        if server is None:
            return None
        sender = peer if n_mempool is None else self.genesis.validators.n + n_mempool
        assert sender is not None
        return server.endpoint_for(sender)

    def _admit(
        self, digest: bytes, batch: pa.RecordBatch, *, check_signatures: bool = True
    ) -> pa.RecordBatch | None:
        """The canonical batch if it passes this validator's own checks, else ``None``."""
        try:
            return admit_batch(
                batch,
                digest,
                chain_id=self.genesis.chain_id,
                max_payload=self.genesis.limits.max_payload_bytes,
                check_signatures=check_signatures,
            )
        except LedgerError as exc:
            self._count(f"batch: {exc.code}")
            return None

    def _admit_batch(self, digest: bytes, batch: pa.RecordBatch) -> bool:
        canonical = self._admit(digest, batch)
        if canonical is None:
            return False
        self._hold(digest, canonical)
        return True

    def _hold(self, digest: bytes, batch: pa.RecordBatch, mempool: int | None = None) -> None:
        """Hold a checked batch for proposals (``mempool``: the one that sealed it, where
        known: a leader takes each mempool's batches in turn)."""
        self.batches[digest] = batch
        self.core.tick(self._clock_ms())  # when it became available (a gap's wait)
        self._run(self.core.on_batch_available(digest, mempool))

    async def get_batch(self, digest: bytes) -> pa.RecordBatch | None:
        """A batch held, or committed within ``batch_window`` heights (for a peer missing
        it). A committed one is read from the block store in a thread, one at a time: a
        whole block read per call, and consensus goes on meanwhile."""
        batch = self.batches.get(digest)
        if batch is None and digest in self.committed_batches:
            height, offset, rows = self.committed_batches[digest]
            async with self._disk_reads:
                block = await asyncio.to_thread(self.store.get_block, height)
            # Its own rows only (a slice would be sent with the whole block)
            batch = compact_batch(block.txs.slice(offset, rows))
        return batch

    def _clock_ms(self) -> int:
        """This validator's clock for its core (its blocks' timestamps, and how far ahead of
        it a proposal may be stamped): wall-clock time, an hour ahead for ``fast-clock``."""
        now = int(time.time() * 1000)
        return now + FAST_CLOCK_MS if self.strategy == "fast-clock" else now

    def _on_timer(self, round_: int, purpose: str) -> None:
        self.core.tick(self._clock_ms())
        if purpose == "propose":
            self._run(self.core.on_propose_timer(round_))
        else:
            self._run(self.core.on_local_timeout(round_))
        if self.strategy == "stale-replayer" and self._stale:
            picked = random.sample(list(self._stale), min(STALE_REPLAYS, len(self._stale)))
            self._flush({peer: list(picked) for peer in self.peers})

    # ---- actions -------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        outbox: dict[int, list[Message]] = {}
        commits: list[Commit] = []
        for action in actions:
            match action:
                case Persist(state=state, proposal=voted):
                    self._flush(outbox)
                    try:
                        self.safety_file.write(self._safety_record(state, voted))
                    except OSError as exc:  # the vote it guards never leaves
                        stop_on_disk_failure(f"validator {self.index}", exc)
                case Broadcast(message=msg) if self.strategy == "slow-leader" and isinstance(
                    msg, Proposal
                ):
                    # Sent as late as a round allows without timing out: SLOW_LEADER_DELAY
                    # of the base timeout after this validator entered the round (the voters'
                    # timers run from about then; an idle wait counts), to everyone
                    late = {peer: [msg] for peer in self.peers}
                    held_ms = self.core.now_ms - self.core.entered_ms
                    delay_ms = SLOW_LEADER_DELAY * self.core.cfg.base_timeout_ms - held_ms
                    asyncio.get_running_loop().call_later(
                        max(0, delay_ms) / 1000, self._flush, late
                    )
                case Broadcast(message=msg):
                    for peer in self.peers:
                        outbox.setdefault(peer, []).extend(self._hostile(msg, peer, True))
                case Send(to=to, message=msg):
                    outbox.setdefault(to, []).extend(self._hostile(msg, to, False))
                case SetTimer(round=round_, delay_ms=delay, purpose=purpose):
                    loop = asyncio.get_running_loop()
                    handle = loop.call_later(delay / 1000, self._on_timer, round_, purpose)
                    self._timers.append((round_, handle))
                case Commit():
                    commits.append(action)
                case FetchBatches(digests=digests, source=source):
                    task = asyncio.get_running_loop().create_task(self._fetch(digests, source))
                    self._batch_tasks.add(task)  # held until done (the loop keeps weak refs)
                    task.add_done_callback(self._batch_tasks.discard)
                case AskBacklog(source=source):
                    self._ask_backlog(source)
                case Evidence():
                    self.evidence.append(action)
                    self.evidence_counts[action.kind] = self.evidence_counts.get(action.kind, 0) + 1
                    log.warning(
                        "evidence: %s by validator %d in round %d",
                        action.kind,
                        action.offender,
                        action.round,
                    )
                case Rejected(reason=reason):
                    self._count(reason)
        self._flush(outbox)
        self._cancel_stale_timers()
        if self.core.rounds_by_timeout != self._timed_out_rounds:
            self._timed_out_rounds = self.core.rounds_by_timeout
            tc = self.core.last_tc
            ended = tc.round if tc is not None else self.core.round - 1
            log.warning(
                "validator %d: round %d ended by a timeout certificate (its leader, validator "
                "%d, got no block certified in time); now in round %d",
                self.index,
                ended,
                self.core.leader(ended),
                self.core.round,
            )
        # After the messages: nothing sent depends on the blocks being written, and no other
        # event runs in between (no await here), so nobody sees the commit half done
        for commit in commits:
            try:
                self._commit(commit)
            except (OSError, sqlite3.Error, StoreError) as exc:
                # Blocks committed in memory and not on disk: every later one would fail
                # to extend the stored head, for good (a validator whose disk filled stayed
                # up at its height while the others went on, even once space came back)
                stop_on_disk_failure(f"validator {self.index}", exc)

    def _cancel_stale_timers(self) -> None:
        """Cancel the timers of rounds before the core's: ``on_local_timeout`` and
        ``on_propose_timer`` act only on the current round (a timer that fired already is
        cancelled harmlessly)."""
        now = self.core.round
        stale = [handle for round_, handle in self._timers if round_ < now]
        if stale:
            for handle in stale:
                handle.cancel()
            self._timers = [(r, h) for r, h in self._timers if r >= now]

    def _hostile(self, msg: Message, peer: int, broadcast: bool) -> list[Message]:
        """What a Byzantine strategy sends in place of ``msg`` (honest: ``[msg]``)."""
        match self.strategy:
            case "silent":
                return []
            case "lazy-leader" if isinstance(msg, Proposal):
                return []
            case "invalid-signature":
                return [corrupt_signature(msg)]
            case "vote-withholder" if isinstance(msg, Vote):
                return []
            case "double-voter" | "equivocate" if isinstance(msg, Vote):
                return [msg, double_vote(self.core, msg)]
            case "equivocating-leader" | "equivocate" if isinstance(msg, Proposal) and broadcast:
                # Half the peers see another block; the next leader sees both
                other = conflicting_proposal(self.core, msg)
                if peer == self.core.leader(msg.round + 1):
                    return [msg, other]
                return [other] if peer % 2 else [msg]
        return [msg]

    def _link_s(self, peer: Any) -> float:
        """The emulated one-way latency to or from ``peer``, in seconds (0 for no such peer)."""
        if type(peer) is int and 0 <= peer < len(self.latency):
            return self.latency[peer] / 1000
        return 0.0

    def _flush(self, outbox: dict[int, list[Message]]) -> None:
        now = time.time()
        for peer, msgs in outbox.items():
            handle = self.peers.get(peer)
            if handle is None or peer in self.blocked or not msgs:
                continue
            delay = self._link_s(peer)
            hold = now + delay if delay > 0 else None  # the emulated WAN's, if any
            data = encode_messages(msgs)
            stream = self.stream_out.get(peer)
            if stream is not None and stream.send(data, hold):
                continue
            self.ray_sends += 1
            handle.deliver.remote(self.index, data, hold)
        outbox.clear()

    def _commit(self, action: Commit) -> None:
        t0 = time.perf_counter()
        self._commit_blocks(action)
        self.timings["commit_s"] = self.timings.get("commit_s", 0.0) + time.perf_counter() - t0
        self.timings["blocks"] = self.timings.get("blocks", 0) + len(action.blocks)

    def _commit_blocks(self, action: Commit) -> None:
        proposals = action.blocks
        digests = []
        index = bytearray()
        shard_blocks = []
        top = proposals[-1].block.height
        # The commit proof receipts carry, stored with the top block (one durable write)
        proof = (action.certifying_qcs[-1], action.child, action.commit_qc)
        encoded_proof = u64(top) + b"".join(var_bytes(x.encode()) for x in proof)
        for p, qc in zip(proposals, action.certifying_qcs, strict=True):
            # What the shards need of the block is read before the commit folds it away
            for_shards = (
                (self.builder.writes_of(p.block.hash), self.builder.result_leaves_of(p.block.hash))
                if self.shards
                else None
            )
            block = self.builder.commit(p.block.hash, p.qc)
            self.store.append(
                block, verify=False, commit_proof=encoded_proof if block.height == top else None
            )
            if for_shards is not None:
                shard_blocks.append((block, qc, *for_shards))
            self.commit_times[block.height] = time.time()
            ids = tx_ids_of(block.txs)
            self.commit_ids[block.height] = (ids, _failed_rows(block.results))
            self._commit_id_rows += len(ids)
            while self._commit_id_rows > COMMIT_IDS_KEEP_ROWS:
                self._commit_id_rows -= len(_pop_first(self.commit_ids)[1][0])
            offset = 0
            for d in p.block.batch_digests:
                rows = self.batches[d].num_rows
                # Re-inserted, not updated: the map stays in height order (see _bound_memory)
                self.committed_batches.pop(d, None)
                self.committed_batches[d] = (block.height, offset, rows)
                index += d + struct.pack(">QII", block.height, offset, rows)
                offset += rows
            digests.extend(p.block.batch_digests)
        # Kept to serve peers that lag behind (after a restart too): the proposals, and where
        # each committed batch lies in the store.
        self._append_proposals(proposals)
        self.commit_proofs[top] = proof
        if index:  # empty blocks (an idle network's heartbeat) add nothing to write
            with open(self.dir / "batches.idx", "ab") as f:
                f.write(bytes(index))
                f.flush()
                os.fsync(f.fileno())
        self._batch_index_entries += len(index) // 48
        for d in digests:
            self.batches.pop(d, None)
        # Only when a batch of this institution's mempool is among them: an empty block, or
        # one of other institutions' batches, frees nothing there, and a call costs the idle
        # mempool's process a few milliseconds of CPU (measured on 2 cores)
        news = self._mempool_news(digests)
        if self.mempool is not None and news:
            self.mempool.on_commit.remote(news)
        t0 = time.perf_counter()
        for block, qc, writes, leaves in shard_blocks:
            self._queue_for_shards(block.header, qc, block.rows(), writes, leaves)
        self._wake_shards()
        self._maybe_checkpoint()
        self._bound_memory()
        self.timings["shards_s"] = self.timings.get("shards_s", 0.0) + time.perf_counter() - t0

    # ---- storage shards ------------------------------------------------------------------------

    def _committed_block(
        self,
        header: BlockHeader,
        qc: QuorumCert,
        rows: pa.RecordBatch,
        writes: dict,
        leaves: np.ndarray | None = None,
    ) -> CommittedBlock:
        """What the shards of this validator are sent for one block. Not put in the object
        store block by block: a put costs about 1.4 ms whatever the block's size (measured on
        2 cores), more than the rest of a small block's commit; each push sends the blocks it
        carries in one call instead."""
        proof = self.commit_proofs.get(header.height) or self.replayed_proofs.get(header.height)
        commit = (proof[1], proof[2]) if proof is not None else None
        return CommittedBlock(header, qc, rows, writes_batch(writes), commit, leaves)

    def _queue_for_shards(
        self,
        header: BlockHeader,
        qc: QuorumCert,
        rows: pa.RecordBatch,
        writes: dict,
        leaves: np.ndarray,
    ) -> None:
        self.shard_pending[header.height] = self._committed_block(header, qc, rows, writes, leaves)
        if len(self.shard_pending) > self.shard_pending_max:
            # A shard that does not acknowledge for this long catches up from the store
            del self.shard_pending[min(self.shard_pending)]

    def _wake_shards(self) -> None:
        for event in self.shard_wake.values():
            event.set()

    def _certifying_qc(self, height: int) -> QuorumCert:
        if height < self.store.height:
            return self.store.get_block(height + 1).parent_qc
        return self.commit_proofs[height][0]

    async def _catch_up(self, acked: int) -> list[CommittedBlock]:
        """Blocks above ``acked`` for a shard that fell behind what is queued (it lost its
        disk, was down for long, or this validator restarted), built from the block store;
        their state writes come from re-execution, in a thread so that consensus goes on."""
        async with self._refill_lock:
            first_queued = min(self.shard_pending, default=self.store.height + 1)
            upto = min(self.store.height, acked + SHARD_CHUNK, first_queued - 1)
            if upto == self.store.height and upto not in self.commit_proofs:
                # The head's certifying QC is in its commit proof; a crash between storing
                # the block and its proof leaves none: the head goes with the next commit.
                upto -= 1
            if any(h not in self.replayed_writes for h in range(acked + 1, upto + 1)):
                log.warning("validator %d: re-executing the chain for a storage shard", self.index)
                *_, writes = await asyncio.to_thread(self._replay, acked, need_all=True)
                self.replayed_writes.update(writes)
            covered = self.replayed_proofs_from
            if acked + 1 < self.proofs_from and (covered is None or acked + 1 < covered):
                # Commit proofs older than those in memory: read them back, all at once. The
                # claim is made before reading, so that proofs leaving memory meanwhile are
                # kept too (_bound_memory) and the range stays whole.
                upper = self.proofs_from - 1 if covered is None else covered - 1
                self.replayed_proofs_from = acked + 1
                older = await asyncio.to_thread(self._load_commit_proofs, acked + 1, upper)
                self.replayed_proofs.update(older)
            blocks = [self.store.get_block(h) for h in range(acked + 1, upto + 1)]
            out = []
            for i, block in enumerate(blocks):
                # The QC certifying a block is its child's parent QC: read each block once
                qc = blocks[i + 1].parent_qc if i + 1 < len(blocks) else None
                h = block.height
                out.append(
                    self._committed_block(
                        block.header,
                        qc or self._certifying_qc(h),
                        block.rows(),
                        self.replayed_writes[h],
                    )
                )
            return out

    def _trim_shard_queue(self) -> None:
        if len(self.shard_acked) < self.shards:
            return
        done = min(self.shard_acked.values())
        for h in [h for h in self.shard_pending if h <= done]:
            del self.shard_pending[h]
        for h in [h for h in self.replayed_writes if h <= done]:
            del self.replayed_writes[h]
        if self.replayed_proofs_from is not None and self.replayed_proofs_from <= done:
            for h in [h for h in self.replayed_proofs if h <= done]:
                del self.replayed_proofs[h]
            if done + 1 >= self.proofs_from:
                self.replayed_proofs_from = None  # every shard is past what was read back
            else:
                self.replayed_proofs_from = done + 1

    async def _push_shard(self, k: int) -> None:
        """Keep shard ``k`` up to date, in height order, for the life of this validator: a
        shard that fails or restarts is asked where it stands and sent the rest."""
        wake = self.shard_wake[k]
        while True:
            await wake.wait()
            # Let a few commits gather: one call and one shard transaction carry them all
            await asyncio.sleep(SHARD_PUSH_DELAY_S)
            wake.clear()
            while True:
                try:
                    handle = self.shard_handles.get(k)
                    if handle is None:
                        handle = self._actor(f"shard-{self.index}-{k}")
                        self.shard_handles[k] = handle
                    if k not in self.shard_acked:
                        self.shard_acked[k] = await handle.height.remote()
                    acked = self.shard_acked[k]
                    if acked >= self.store.height:
                        break
                    if acked + 1 in self.shard_pending:
                        # Contiguous heights only: a shard refuses a gap
                        blocks = list(
                            itertools.takewhile(
                                lambda block: block is not None,
                                (
                                    self.shard_pending.get(h)
                                    for h in range(acked + 1, acked + 1 + SHARD_CHUNK)
                                ),
                            )
                        )
                    else:
                        blocks = await self._catch_up(acked)
                    if not blocks:
                        break
                    self.shard_acked[k] = await handle.apply.remote(blocks)
                    self._trim_shard_queue()
                except Exception as exc:  # the shard is down or refused: ask again later
                    log.warning("validator %d: storage shard %d: %s", self.index, k, exc)
                    self.shard_acked.pop(k, None)
                    self.shard_handles.pop(k, None)
                    await asyncio.sleep(0.5)

    async def _fetch(self, digests: tuple[bytes, ...], source: int) -> None:
        """Batches a proposal names that are not held here. One announced to this validator
        and still being checked (or waiting its turn: it starts now) is waited for rather
        than fetched and checked a second time; once checked, one that waits for its
        mempool's earlier batches is held at once (the proposal orders it). The rest, and any
        whose announced copy was refused, come from the proposer or another peer."""
        checking = [self._checks_done[d] for d in digests if d in self._checks_done]
        if checking:
            for d in digests:
                self._promote(d)
            await asyncio.wait(checking)
            for mempool, waiting in self.origin_waiting.items():
                for seq, (d, b) in list(waiting.items()):
                    if b is not None and d in digests and d not in self.batches:
                        self._hold(d, b, mempool)
                        # It still takes its turn there, with nothing left to hold (held
                        # again then, after its commit, it would stay in memory for good)
                        waiting[seq] = (d, None)
        order = [source] + [i for i in self.peers if i != source]
        loop = asyncio.get_running_loop()
        for d in digests:
            # Being fetched for another proposal (one proposed again after a timeout names
            # the same batches): that fetch is waited for, not run a second time beside it
            while d in self._fetching:
                await asyncio.shield(self._fetching[d])
            if d in self.batches:
                continue
            done = self._fetching[d] = loop.create_future()
            try:
                await self._fetch_one(d, order)
            finally:
                del self._fetching[d]
                done.set_result(None)

    async def _fetch_one(self, d: bytes, order: list[int]) -> None:
        asked = [self.peers[peer] for peer in order if peer in self.peers]
        for n, handle in enumerate(asked):
            if d in self.batches:
                return
            # A peer that never answers (Byzantine, or its node unreachable) is passed over
            # after GET_BATCH_TIMEOUT_S while others are left to ask; the last is waited for
            # (a peer slow to answer, its reads queued behind a catch-up, still answers)
            last = n == len(asked) - 1
            try:
                batch = await asyncio.wait_for(
                    handle.get_batch.remote(d), None if last else GET_BATCH_TIMEOUT_S
                )
            except Exception:  # a crashed peer, or one that did not answer in time
                continue
            if batch is not None and self._admit_batch(d, batch):
                self._count("batch: fetched for a proposal")
                self.fetched_rows += batch.num_rows
                return

    def _count(self, reason: str) -> None:
        key = _NUMBERS.sub("N", reason)
        self.rejected[key] = self.rejected.get(key, 0) + 1

    # ---- queries -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        s = self.core.status()
        return {
            "index": self.index,
            # This process's (a validator that Ray restarted after a crash has a new one)
            "pid": os.getpid(),
            "round": s.round,
            "leader": s.leader,
            # Whom leader reputation passes over as this round's leader, and why
            "passed_over": self.core.passed_over(),
            # Proposals held for a passed-over validator's late vote (short, long: see
            # CoreConfig.straggler_wait_ms) and the late votes they brought into a QC
            "straggler_waits": dict(self.core.straggler_counts),
            "rounds_by_timeout": s.rounds_by_timeout,
            "height": self.store.height,
            "head": self.store.head.hash.hex(),
            "state_root": self.store.head.state_root.hex(),
            "highest_vote_round": s.highest_vote_round,
            "batches_held": len(self.batches),
            # Batches of this institution's own mempool, admitted without checking their
            # signatures a second time (the mempool verified them)
            "own_batches": self.own_batches,
            "self_started": self.self_started,
            # Times a proposal of ours left a batch out to wait for its senders' earlier
            # nonces, and rows it proposed anyway that failed for want of them (logged)
            "batches_deferred": self.builder.deferred,
            "gap_rows_proposed": self.builder.gap_rows_proposed,
            "batches_resent": self.batches_resent,
            "backlog_asked": self.backlog_asked,
            "fetched_rows": self.fetched_rows,
            # Announced batches being checked, and waiting their mempool's turn to be
            "checks_running": self._checks_running,
            "checks_waiting": sum(len(q) for q in self._intake.values()),
            "evidence": sum(self.evidence_counts.values()),
            "rejected": dict(self.rejected),
            "evidence_kinds": sorted(self.evidence_counts),
            "peers": sorted(self.peers),
            "blocked": sorted(self.blocked),
            # Direct streams: peers this validator has one up to, frames each way
            "streams": {
                "enabled": self.peer_streams,
                "connected": sorted(k for k, v in self.stream_out.items() if v.connected),
                "frames_out": self._frames_out_before
                + sum(v.frames_out for v in self.stream_out.values()),
                "frames_in": self.stream_server.frames_in if self.stream_server else 0,
                "inbound": self.stream_server.open_streams if self.stream_server else 0,
                "ray_sends": self.ray_sends,
                # Of the frames in, sealed batches from the mempools
                "batch_frames_in": self.batch_frames_in,
            },
            "strategy": self.strategy,
            "loop": self.loop_watch.status(),
            # This validator's clock (its blocks' timestamps; see CoreConfig.max_clock_ahead_ms)
            "clock_ms": self._clock_ms(),
            "shards": {str(k): self.shard_acked.get(k) for k in range(self.shards)},
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            # Entries held in memory per height (bounded; see _bound_memory)
            "held": {
                "commit_proofs": len(self.commit_proofs),
                "replayed_proofs": len(self.replayed_proofs),
                "committed_batches": len(self.committed_batches),
                "commit_times": len(self.commit_times),
            },
            "cpu_s": round(time.process_time(), 3),
            # Signatures checked on this process's CPU, and their checking threads' CPU time
            "signature_checks": cpu_verify_work(),
            # The height of the state checkpoint the last start re-executed from
            "restored_from_snapshot": self.restored_from,
            # The committed state: checkpointed to disk up to this height, and the entries
            # of the blocks since, held in memory (bounded: see _maybe_checkpoint)
            "state_checkpoint": self.state.height,
            "state_held_entries": self.state.held_entries,
        }

    async def headers(self, from_height: int = 1) -> list[tuple[int, bytes, bytes]]:
        """(height, block hash, state root) of every stored block from ``from_height``."""
        headers = [self.store.get_header(h) for h in range(from_height, self.store.height + 1)]
        return [(h.height, h.hash, h.state_root) for h in headers]

    async def locate(self, tx_ids: list[bytes]) -> list[int | None]:
        """Height of each committed transaction id (``None`` if not committed here, or not
        yet in this validator's storage shards, which keep the transaction index)."""
        if not self.shards:
            out: list[int | None] = []
            for t in tx_ids:
                try:
                    out.append(self.store.locate_tx(t).height)
                except LedgerError:
                    out.append(None)
            return out
        if not tx_ids:
            return []
        ids = np.frombuffer(b"".join(tx_ids), np.uint8).reshape(-1, 32)
        found: list[int | None] = [None] * len(tx_ids)
        for k, rows in rows_by_shard(shard_of_tx_ids(ids, self.shards)).items():
            for part in read_parts(rows):  # a shard answers at most READ_MAX_KEYS at a time
                try:
                    handle = self.shard_handles.get(k) or self._actor(f"shard-{self.index}-{k}")
                    heights = await handle.locate.remote([tx_ids[i] for i in part])
                except Exception:  # a shard restarting: its rows read as not committed yet
                    break
                for i, h in zip(part, heights, strict=True):
                    found[i] = h
        return found

    async def batches_committed(self, digests: list[bytes]) -> list[bool]:
        """Whether each batch was committed here (within the last ``batch_window`` heights):
        how a mempool whose own validator is down learns that its batches went through."""
        return [d in self.committed_batches for d in digests]

    async def committed_at(self, tx_ids: list[bytes]) -> float | None:
        """When the last of these transactions was committed here (wall clock), or ``None``
        while any of them is not."""
        heights = await self.locate(tx_ids)
        if any(h is None for h in heights):
            return None
        return max((self.commit_times.get(h, 0.0) for h in heights if h is not None), default=0.0)

    async def committed_since(
        self, height: int, limit: int = 256
    ) -> list[tuple[int, float, np.ndarray, np.ndarray]]:
        """(height, wall-clock commit time, ``(n, 32)`` tx ids, the rows that failed: their
        status is not OK) of blocks committed above ``height`` since this process started:
        one call per poll for a load generator."""
        out = []
        for h in range(height + 1, min(self.store.height, height + limit) + 1):
            if h in self.commit_times:
                held = self.commit_ids.get(h)
                if held is None:
                    block = self.store.get_block(h)
                    held = (tx_ids_of(block.txs), _failed_rows(block.results))
                out.append((h, self.commit_times[h], *held))
        return out

    async def status_counts(self) -> dict[int, int]:
        """How many committed transactions ended with each status."""
        counts: dict[int, int] = {}
        for _, rows in self.store.iter_rows():
            values, n = np.unique(rows.column("status").to_numpy(), return_counts=True)
            for v, c in zip(values.tolist(), n.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + c
        return counts

    async def committed_ids(self) -> np.ndarray:
        return np.concatenate(
            [tx_ids_of(rows) for _, rows in self.store.iter_rows()] or [np.empty((0, 32), np.uint8)]
        )


def _failed_rows(results: pa.RecordBatch) -> np.ndarray:
    """Positions of the rows whose execution status is not OK."""
    return np.flatnonzero(results.column("status").to_numpy(zero_copy_only=False) != Status.OK)


def _pop_first(d: dict[Any, Any]) -> tuple[Any, Any]:
    """Remove and return the oldest entry of an insertion-ordered dict."""
    key = next(iter(d))
    return key, d.pop(key)


def _well_formed_announcement(digest: object, origin: object, resent_by: object, n: int) -> bool:
    """A 32-byte digest, and a mempool index in range with a sealing number below 2^63 (or
    a resending mempool's index), each a plain int."""

    def index(value: object) -> bool:
        return type(value) is int and 0 <= value < n

    if not isinstance(digest, bytes) or len(digest) != 32:
        return False
    if origin is not None:
        if not (isinstance(origin, tuple) and len(origin) == 2 and index(origin[0])):
            return False
        seq = origin[1]
        if type(seq) is not int or not 0 <= seq < 1 << 63:
            return False
    return resent_by is None or index(resent_by)


def _record(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _read_records(path: Path) -> list[bytes]:
    """The complete length-prefixed records of a log. A torn last record (a crash during its
    append, so never acknowledged) is cut off, so that later appends follow whole records."""
    data = path.read_bytes() if path.exists() else b""
    out = []
    pos = 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 + size > len(data):
            break
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    if pos < len(data):
        log.warning("%s: cutting a torn record of %d bytes", path, len(data) - pos)
        _cut(path, pos)
    return out


def _cut(path: Path, size: int) -> None:
    """Truncate a log to its last whole record, durably."""
    with open(path, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())
