"""The mempool actor: admission of TxBatches, batching, dissemination and backpressure.

Admission checks a submitted batch's schema, chain and sizes, verifies every signature
(through the institution's verifier actor, on its GPU, where it has one), drops transactions
it has already seen, and refuses nonces that could only fail execution: a row whose nonce is
below the sender's committed next nonce (read from the institution's storage shards) is
stale, and one not above the same sender's previous row in the submission is out of order (a
later submission may still fill a gap: a row refused for its signature and sent again).
Each sender's rows are sealed in nonce order: a row ahead of its sender's sequence (the nonce
before it neither committed nor admitted here) is held apart ("parked") until the nonces
before it arrive or commit, and one whose gap stays open past ``mempool_gap_hold_ms`` is
sealed in a batch of its own; so a sender that skipped a nonce never holds back the rows of
others in the same batch (see ``Mempool._admit``). The accepted rows in sequence wait in a
bounded buffer and are sealed into a batch when enough rows are pending or the batch interval
passes. A sealed batch goes to the Ray object store once, and
to every validator: on this mempool's direct stream to it (the batch itself, as Arrow IPC,
with its digest and sealing number; see ``encode_batch_frame``), or, while that stream is not
up, as its digest and object reference by Ray call. The rows held count those being admitted,
pending, and sealed but not yet committed: when a submission would take them over the limit,
the whole submission is answered "busy", with a hint of when to retry, and nothing of it is
kept (never a silent drop). The limit is learnt from how fast this mempool's batches commit
(``InflightLimit``), within the configured capacity.

Accepted means durable: a submission is answered once the rows accepted from it are fsynced
in this mempool's journal (``actors/journal.py``; submissions arriving together share an
fsync), and each row stays there until the batch holding it commits. A mempool that starts
with rows in its journal (Ray restarted it after a crash, its machine rebooted, or the
network went down and up) admits them again, but for those whose nonce has committed since,
once its validators have given their handles (``Mempool._recover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import struct
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayledger.actors.journal import Journal
from rayledger.actors.storage.lock import stop_on_disk_failure
from rayledger.actors.storage.partition import read_parts, rows_by_shard, shard_of_keys
from rayledger.actors.streams import StreamSender, parse_endpoint
from rayledger.chain import MAX_BLOCK_PAYLOAD_BYTES, batch_digest, payload_bytes
from rayledger.config import parse_genesis
from rayledger.errors import LedgerError, SchemaMismatch, WrongLength
from rayledger.execution import nonce_key
from rayledger.kernels import as_offsets_and_values, byte_rows, cpu_verify_work
from rayledger.tx import (
    TX_SCHEMA,
    batch_from_ipc,
    batch_to_ipc,
    compact_batch,
    fixed_rows,
    tx_ids_of,
    validate_batch,
    verify_signatures,
)

log = logging.getLogger(__name__)

# The least commit latency a learnt limit aims at: below about a second the machine's own jitter
# (p99 two to three times p50 under load, measured on 2 cores) makes ordinary batches late,
# and a mempool at half load would answer busy (seen with 250-row batches at 1,000 tx/s)
MIN_TARGET_S = 1.0

# How often a mempool asks the validators about batches long in flight, how long "long" is at
# least, and how long it waits for one validator's answer (see Mempool._poll_commits)
COMMIT_POLL_S = 1.0
STALE_MIN_S = 3.0
POLL_TIMEOUT_S = 5.0
# Rows accepted here carry, until they are sealed, the journal segment that holds them, so
# that the segment can go once every batch holding its rows has committed (see actors/journal.py)
JOURNAL_COLUMN = "_journal_segment"
# How long a restarted mempool waits for every validator to give its handle before it seals
# the rows its journal gave back (a validator missing then gets them when they are resent)
RECOVER_WAIT_S = 10.0
# How often a mempool that lacks some validator's handle asks that validator for it again. A
# restarted mempool asks them all at once, but a call can be lost on the way (the validator's
# Ray still routed it to the process that had just died): its batches then went to nobody
ASK_VALIDATORS_S = 2.0

# A batch long in flight and not committed is sent to every validator again: one that
# missed it (a partition cut this mempool's site off when it was sealed, or the validator
# restarted since) then holds it, and its sender's later batches do not wait for it in vain
# (see LedgerBuilder.build). Again 2 s later, then after twice as long each time up to 32 s,
# at most 16 batches a poll, oldest first: a network overloaded for long does not spend
# itself on resending what every validator holds
REANNOUNCE_S = 2.0
REANNOUNCE_MAX_S = 32.0
REANNOUNCE_BATCHES = 16

# Batches a mempool remembers the sealing time of, awaiting their commit
SEALED_KEEP = 4096

# How often a mempool holding rows ahead of their sender's sequence asks its storage shards
# whether the nonces before them have committed (through another mempool, or before a restart)
PARK_POLL_S = 0.25

# The weight of the newest commit in a mempool's moving average of commit latency, and the
# least wait a busy answer asks for
RECENT_WEIGHT = 0.2
MIN_RETRY_S = 0.01


@dataclass
class Admission:
    accepted: int = 0
    busy: bool = False
    rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    # With ``busy``: about when capacity should be free again (a hint for the client's wait)
    retry_after_ms: int = 0


def seal_tag(key: bytes, digest: bytes, batch: pa.RecordBatch) -> bytes:
    """HMAC-SHA-256, under a validator's seal key, of a sealed batch's digest and of its
    signature column: the digest names the transactions' content but not their signatures,
    so a tag seen once cannot vouch for the same transactions with other signatures. A batch
    without a well-formed signature column gets an empty tag, which matches none."""
    try:
        signatures = np.ascontiguousarray(fixed_rows(batch.column("signature"), 64))
    except Exception:  # noqa: BLE001 - malformed: the full check will name the problem
        return b""
    mac = hmac.new(key, digest, hashlib.sha256)
    mac.update(signatures.data)
    return mac.digest()


# A sealed batch on a stream: its digest, its sealing number, whether a seal tag follows (0 or
# 1), then the tag (32 bytes) if so, then the batch as an Arrow IPC stream
BATCH_FRAME = struct.Struct(">32sQB")


def encode_batch_frame(digest: bytes, seq: int, tag: bytes | None, ipc: bytes) -> bytes:
    head = BATCH_FRAME.pack(digest, seq, tag is not None)
    return head + (tag or b"") + ipc


def decode_batch_frame(
    data: bytes, *, max_rows: int | None = None
) -> tuple[bytes, int, bytes | None, pa.RecordBatch]:
    """(digest, sealing number, seal tag or None, batch) of a batch frame, or ``ValueError``
    naming the problem (the batch's own checks come after, as for one read by reference)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"a batch frame is bytes, not {type(data).__name__}")
    if len(data) < BATCH_FRAME.size:
        raise ValueError(f"batch frame of {len(data)} bytes is shorter than its header")
    digest, seq, tagged = BATCH_FRAME.unpack_from(data)
    if tagged > 1:
        raise ValueError(f"batch frame tag flag {tagged} is neither 0 nor 1")
    at = BATCH_FRAME.size
    tag = None
    if tagged:
        if len(data) < at + 32:
            raise ValueError("batch frame ends inside its seal tag")
        tag, at = data[at : at + 32], at + 32
    try:
        batch = batch_from_ipc(pa.py_buffer(data)[at:], max_rows=max_rows)
    except LedgerError as exc:
        raise ValueError(f"batch frame body: {exc}") from exc
    if batch.num_rows == 0:  # a mempool never seals one; its check would cost and count nothing
        raise ValueError("batch frame holds no rows")
    return digest, seq, tag, batch


class InflightLimit:
    """How many rows a mempool may hold uncommitted, learnt from how fast its batches commit.

    A fixed capacity either starves a fast network or, on a slow one, queues minutes of work:
    every signature of that backlog is checked by every validator long before its batch can be
    proposed, and the checks then compete with consensus for the cores (measured on 2 cores
    with 200,000 rows allowed and twice the network's capacity offered: 133 committed tx/s
    instead of about 1,100, latencies of 30 s). So the limit follows the commit latency of
    this mempool's own batches (sealed to committed at its validator), like a TCP Vegas
    limiter: a batch that commits within ``target_s`` (by default twice the lowest latency
    seen, the network's unloaded pace, and at least ``MIN_TARGET_S``) raises the limit by its
    rows, if the limit was in use;
    a later one lowers it by a tenth. Under overload the work in flight is then about the
    network's rate times the target, everything beyond is answered busy at once, and the rows
    admitted commit in about ``target_s``.

    The lowest latency is never forgotten: a minimum over a sliding window would, under
    sustained overload, take the overloaded latency as the new norm and double the target
    each window. If the network's unloaded pace really worsens for good (a far site now needed
    for a quorum), the limit errs low: throughput falls to about the floor per commit
    latency, never latency up; ``mempool_target_latency_ms`` then sets the target outright.
    The limit stays within [``floor_rows``, ``ceiling_rows``]; a submission is always admitted
    while nothing is in flight (up to the ceiling), so a large one cannot starve."""

    def __init__(self, floor_rows: int, ceiling_rows: int, target_s: float | None = None) -> None:
        if floor_rows < 1 or ceiling_rows < 1:
            raise ValueError("the in-flight limits must be positive")
        self.ceiling = ceiling_rows
        self.floor = min(floor_rows, ceiling_rows)
        self.limit = self.floor
        self.fixed_target = target_s
        self.lowest_s: float | None = None
        self._sealed: dict[bytes, tuple[float, int, bool]] = {}
        self.late = 0
        # The commit latency of recent batches (a moving average, None before the first): when
        # a batch in flight should commit, for the busy answer's hint
        self.recent_s: float | None = None

    def target_s(self) -> float | None:
        """The commit latency aimed at (None: nothing committed yet to learn it from)."""
        if self.fixed_target is not None:
            return self.fixed_target
        return None if self.lowest_s is None else max(2 * self.lowest_s, MIN_TARGET_S)

    def sealed(self, digest: bytes, rows: int, in_flight: int, now: float) -> None:
        """A batch of ``rows`` left for the validators with ``in_flight`` rows uncommitted."""
        self._sealed[digest] = (now, rows, 2 * in_flight >= self.limit)
        if len(self._sealed) > SEALED_KEEP:  # refused or lost batches never commit
            del self._sealed[next(iter(self._sealed))]

    def committed(self, digest: bytes, now: float) -> None:
        """A batch sealed here committed (others' digests are ignored)."""
        entry = self._sealed.pop(digest, None)
        if entry is None:
            return
        at, rows, in_use = entry
        latency = now - at
        self.lowest_s = latency if self.lowest_s is None else min(self.lowest_s, latency)
        self.recent_s = (
            latency
            if self.recent_s is None
            else (1 - RECENT_WEIGHT) * self.recent_s + RECENT_WEIGHT * latency
        )
        target = self.target_s()
        if target is not None and latency <= target:
            if in_use:  # a limit nobody pushed against says nothing about the network
                self.limit = min(self.ceiling, self.limit + rows)
        else:
            self.late += 1
            self.limit = max(self.floor, int(self.limit * 0.9))

    def forget(self, digest: bytes) -> None:
        """No latency sample will come for this batch."""
        self._sealed.pop(digest, None)

    def admits(self, in_flight: int, rows: int) -> bool:
        return in_flight + rows <= self.ceiling and (
            in_flight == 0 or in_flight + rows <= self.limit
        )

    def retry_after_s(self, in_flight: int, rows: int, now: float | None = None) -> float:
        """About how long until ``rows`` more fit beside ``in_flight``: when the oldest batches
        in flight that must commit first should have, each ``recent_s`` after it was sealed
        (rows not sealed yet: ``recent_s`` from now; a batch already overdue: as long as it
        has been, from a tenth of ``recent_s`` up to all of it).
        Before any commit was seen: the excess at the rate the limit implies. Always within
        [``MIN_RETRY_S``, the target]."""
        target = self.target_s() or 0.5
        cap = max(target, MIN_RETRY_S)
        excess = in_flight + rows - self.limit  # the limit never exceeds the ceiling
        recent = self.recent_s
        if recent is None:
            return min(max(excess * target / max(self.limit, 1), MIN_RETRY_S), cap)
        now = time.monotonic() if now is None else now
        wait = recent  # enough rows free only once rows not sealed yet have committed
        freed = 0
        for at, sealed_rows, _ in self._sealed.values():  # oldest first
            freed += sealed_rows
            if freed >= excess:
                due = at + recent - now
                # Overdue: back off as it stays so, from a tenth of the usual latency
                wait = due if due > 0 else max(recent / 10, min(-due, recent))
                break
        return min(max(wait, MIN_RETRY_S), cap)


# Ray runs a call again this often where it failed for want of its actor (``max_task_retries``):
# a call made while its receiver is being restarted, a call an actor makes to itself from its
# ``__init__`` among them, fails at once ("the actor is restarting") without it, though its
# receiver comes up a moment later; on a loaded machine about one restart in twenty (measured
# with a script: a self-call from ``__init__`` lost in 1 of 20 restarts under load, none with
# retries). The calls so marked are idempotent: Ray may run one twice.
RESTART_RETRIES = 10
# The most bytes of rows a mempool holds uncommitted, by default (``mempool_capacity_bytes``)
CAPACITY_BYTES = 1 << 30
# Large submissions answered busy whose return is awaited, at most (``Mempool._large_busy``)
RETURNING_KEEP = 1024


def _submission_key(batch: pa.RecordBatch) -> bytes | None:
    """What tells a submission sent again from others: its first and last signatures and its
    length (None where it has no well-formed signature column: it will be refused anyway)."""
    try:
        signatures = fixed_rows(batch.column("signature"), 64)
    except Exception:  # noqa: BLE001 - malformed: the full check will name the problem
        return None
    if not len(signatures):
        return None
    return hashlib.sha256(
        signatures[0].tobytes() + signatures[-1].tobytes() + struct.pack("<Q", batch.num_rows)
    ).digest()


# The journal's rows are admitted again in parts of at most this many payload bytes (one
# Arrow batch holds at most 2 GiB of them)
RECOVER_PART_BYTES = 1 << 30


def _parts_by_payload(batches: list[pa.RecordBatch], most: int) -> Iterable[list[pa.RecordBatch]]:
    """``batches`` in order, in consecutive parts of at most ``most`` payload bytes (a batch
    larger on its own is a part of its own)."""
    part: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        n = payload_bytes(batch)
        if part and size + n > most:
            yield part
            part, size = [], 0
        part.append(batch)
        size += n
    if part:
        yield part


# The most payload bytes a sealed batch holds (beside its rows' limit): a quarter of a block's
# (``MAX_BLOCK_PAYLOAD_BYTES``), so that it is ever ordered, and far below Arrow's 2 GiB, past
# which its rows combined into chunks and the first chunk alone was sealed (with ``batch_rows``
# set high and payloads near 64 KiB, the rest left memory for good)
SEAL_MAX_PAYLOAD_BYTES = MAX_BLOCK_PAYLOAD_BYTES // 4


def _seal_parts(table: pa.Table, most_rows: int) -> Iterator[pa.RecordBatch]:
    """``table``'s rows in order, as batches of at most ``most_rows`` rows and
    ``SEAL_MAX_PAYLOAD_BYTES`` payload bytes (at least one row each)."""
    lengths = [np.diff(as_offsets_and_values(c)[1]) for c in table.column("payload").chunks]
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, np.int64)
    start = 0
    while start < table.num_rows:
        below = int(ends[start - 1]) if start else 0
        fits = int(np.searchsorted(ends, below + SEAL_MAX_PAYLOAD_BYTES, side="right")) - start
        take = max(1, min(most_rows, fits))
        yield table.slice(start, take).combine_chunks().to_batches()[0]
        start += take


def in_actor() -> bool:
    """Whether this code runs in a Ray actor (an actor's class is also built outside Ray, in
    tests: Ray is then never started by asking)."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def restarted(tries: int = 5) -> bool:
    """Whether this actor is a restart after a crash (False outside Ray). Ray's control plane
    is asked, again after a pause where the question fails (a busy GCS)."""
    if not in_actor():
        return False
    ctx = ray.get_runtime_context()
    for attempt in range(tries):
        try:
            with warnings.catch_warnings():
                # Ray's property reads its own deprecated ``actor_id``: its warning would
                # reach the driver's console (``rayledger up``) from every mempool
                warnings.simplefilter("ignore", DeprecationWarning)
                return bool(ctx.was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001 - the GCS did not answer: ask again
            log.warning("whether this actor was restarted: no answer", exc_info=True)
            time.sleep(0.2 * (attempt + 1))
    return False


class Mempool:
    def __init__(self, data_dir: str, index: int) -> None:
        root = Path(data_dir)
        settings = json.loads((root / "network.json").read_text())
        genesis_toml = (root / "genesis.toml").read_text()
        capacity_rows = int(settings.get("mempool_capacity", 200_000))
        batch_rows = int(settings.get("batch_rows", 5_000))
        batch_interval_ms = float(settings.get("batch_interval_ms", 50.0))
        # Parallelism on a Ray node comes from actors; no per-actor hashing processes.
        os.environ.setdefault("RAYLEDGER_CPU_WORKERS", "0")
        self.genesis = parse_genesis(genesis_toml)
        self.index = index
        self.capacity = capacity_rows
        # And the most bytes (of the rows' Arrow buffers) it holds so: rows of up to the
        # genesis's payload limit each made the row capacity alone a bound of 200,000 x 64 KiB,
        # 13 GB, for one mempool to take in (``_held_bytes``)
        self.capacity_bytes = int(settings.get("mempool_capacity_bytes", CAPACITY_BYTES))
        self.batch_rows = batch_rows
        self.interval = batch_interval_ms / 1000
        target_ms = settings.get("mempool_target_latency_ms")
        self.limit = InflightLimit(
            floor_rows=2 * batch_rows,
            ceiling_rows=capacity_rows,
            target_s=None if target_ms is None else float(target_ms) / 1000,
        )
        self.validators: dict[int, Any] = {}
        self.seal_keys: dict[int, bytes] = {}
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        # Rows of submissions between the capacity check and their verdict (checks await)
        self.admitting = 0
        self.admitting_bytes = 0
        self.in_flight: dict[bytes, int] = {}
        self.in_flight_bytes: dict[bytes, int] = {}
        # Large submissions answered busy: when each may come back (``_large_busy``)
        self._returning: dict[bytes, float] = {}
        # When each batch in flight was sealed, oldest first. A batch whose commit is never
        # heard of (its validator crashed between committing and telling us; the batch was
        # refused) would hold its rows against the limit for ever: after this long it stops.
        self.sealed_at: dict[bytes, float] = {}
        self.expiry_s = float(settings.get("mempool_inflight_expiry_s", 120.0))
        self._poll: asyncio.Task[None] | None = None
        self._polled_at = 0.0
        # When each batch long in flight may be sent again, and the wait after that
        # (``_reannounce``)
        self._resend: dict[bytes, tuple[float, float]] = {}
        # Recently admitted ids, oldest first, bounded: a copy older than the window is still
        # harmless, since execution gives it BAD_NONCE (its nonce was consumed).
        self.seen: dict[bytes, None] = {}
        self.seen_limit = int(settings.get("mempool_seen_ids", 2_000_000))
        # Each sender's nonce after the last of its rows sealed or pending here, most recently
        # used last, bounded (a sender forgotten falls back to its committed nonce)
        self.next_nonce: dict[bytes, int] = {}
        self.senders_limit = int(settings.get("mempool_senders", 262_144))
        # Senders seen to send through other mempools too (their rows committed beyond those
        # admitted here): never parked, the leaders order their rows (see _note_spread)
        self.spread: set[bytes] = set()
        # Rows ahead of their sender's sequence: sender -> nonce -> (when parked, the row)
        self.parked: dict[bytes, dict[int, tuple[float, pa.RecordBatch]]] = {}
        self.parked_rows = 0
        self.parked_bytes = 0
        self.park_hold_s = float(settings.get("mempool_gap_hold_ms", 5000)) / 1000
        self.park_limit = int(settings.get("mempool_park_rows", 65_536))
        self.park_per_sender = int(settings.get("mempool_park_per_sender", 4_096))
        self._park_poll: asyncio.Task[None] | None = None
        self._park_polled = 0.0
        # No parked row is due to be sealed apart before this (a scan of them all finds it)
        self._park_due = float("inf")
        self.network = settings.get("name", "")
        self.shards = int(settings.get("storage_shards", 0))
        self._shard_handles: dict[int, Any] = {}
        self.use_verifier = bool(settings.get("verifier_actors", False))
        self._verifier: Any = None
        self.sealed = 0
        self.counts: dict[str, int] = {}
        self._refs: dict[bytes, Any] = {}
        self._held_tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        # Streams to validators that gave an endpoint, and what went which way
        self.streams: dict[int, StreamSender] = {}
        self._frames_out_before = 0
        self.ray_sends = 0
        self.resends = 0  # by Ray call too, but not for want of a stream: see _reannounce
        self.stream_events: dict[str, int] = {}
        # The rows accepted and not yet committed, on disk (None: configured off). What a
        # journal left by an earlier run holds is admitted again once validators are known.
        self.journal: Journal | None = None
        if settings.get("mempool_journal", True):
            self.journal = Journal(
                root / f"mempool-{index}" / "journal",
                what=f"mempool {index}",
                segment_bytes=int(settings.get("mempool_journal_segment_mb", 64)) << 20,
            )
        # Each batch in flight: how many of its rows each journal segment holds
        self.sources: dict[bytes, dict[int, int]] = {}
        self._recovery: asyncio.Task[None] | None = None
        # The ids of the rows the journal gave back, until they are admitted again: a client
        # offering them again meanwhile (its answer was lost with the crash) is answered
        # "duplicate", and they are not sealed twice
        self._recovering: set[bytes] = set()
        if self.journal is not None:
            for batch in self.journal.recovered:
                ids = batch.column("tx_id") if "tx_id" in batch.schema.names else None
                if ids is not None and ids.type == pa.binary(32):
                    self._recovering.update(byte_rows(fixed_rows(ids, 32)))
        self._asked_at = time.monotonic()
        self._asking: asyncio.Task[None] | None = None
        if restarted():
            self._ask_validators(range(self.genesis.validators.n))
        if ray.is_initialized():
            # Its timer runs from now (asking for handles that do not come, recovering the
            # journal), not only once a validator or a client calls: whether Ray restarted
            # this process is a question to Ray's control plane, and under load its answer
            # was once wrong or lost (a restarted mempool asked nobody, its journal's rows
            # waited, and nobody sent it a handle for 120 s)
            ray.get_runtime_context().current_actor.wake.options(
                max_task_retries=RESTART_RETRIES
            ).remote()

    async def wake(self) -> None:
        """Start the timer (and the journal's recovery) now: see ``_start``."""
        self._start()

    def _ask_validators(self, indices: Iterable[int]) -> None:
        """Ray restarted this mempool after a crash: it knows no validator (each gives its
        handle at its own start). Ask the live ones to give them again; the first to answer
        starts the recovery of the rows its journal holds (``_recover``). Asked again every
        ``ASK_VALIDATORS_S`` while one is missing (``_ask_missing``)."""
        for i in indices:
            try:
                handle = ray.get_actor(f"{self.network}-validator-{i}", namespace="rayledger")
            except ValueError:  # down: it gives its handle when it starts again
                continue
            handle.mempool_back.options(max_task_retries=RESTART_RETRIES).remote(self.index)

    async def set_validator(
        self,
        index: int,
        handle: Any,
        seal_key: bytes | None = None,
        endpoint: Any = None,
        *,
        held: bool = False,
    ) -> None:
        """Validator ``index`` (re)started: announce batches to this handle from now on.
        ``seal_key``: given by this institution's own validator only, a secret it keeps in
        memory; batches announced to it carry ``seal_tag(seal_key, digest, batch)``, by which it
        knows them for batches this mempool verified (see ``Validator.batch_ready``).
        ``endpoint``: where the validator accepts streams (None: by Ray call only); this
        mempool opens one as sender ``n + index`` (validators are senders 0..n-1). A call with
        a malformed endpoint is counted and changes nothing. ``held``: the validator starts
        with nothing in memory: it is sent every batch in flight too (``announce_held``)."""
        self._start()
        ep = None
        if endpoint is not None:
            ep = parse_endpoint(endpoint, index, self._stream_event)
            if ep is None:
                return
        old = self.streams.get(index)
        if old is not None and (ep is None or old.endpoint != ep):
            del self.streams[index]
            self._frames_out_before += old.frames_out
            old.close()
        if ep is not None and index not in self.streams:  # the same endpoint keeps its stream
            sender = self.genesis.validators.n + self.index
            self.streams[index] = StreamSender(sender, ep, self._stream_event)
            self.streams[index].start()
        self.validators[index] = handle
        if seal_key is not None:
            self.seal_keys[index] = seal_key
        else:
            self.seal_keys.pop(index, None)
        if held:
            await self.announce_held(index)

    async def announce_held(self, index: int) -> None:
        """Send validator ``index`` every batch in flight, oldest first, by reference: it
        (re)started with nothing in memory, or a partition between it and this mempool
        healed, and so missed batches announced before. Without them it would propose this
        mempool's later batches ahead of the earlier ones that the others hold, backlogged by
        the outage, and their rows would fail their senders' nonces once its wait for the
        gap ran out (``LedgerBuilder.build``). A validator that holds one drops it at once.
        Sent in the background: the caller is not held up."""
        if index not in self.validators or not self.in_flight:
            return
        digests = [d for d in self.sealed_at if d in self._refs]
        task = asyncio.get_running_loop().create_task(self._send_held(index, digests))
        self._held_tasks.add(task)  # held until done (the loop keeps weak refs)
        task.add_done_callback(self._held_tasks.discard)

    async def _send_held(self, index: int, digests: list[bytes]) -> None:
        for digest in digests:
            ref = self._refs.get(digest)
            if ref is None:
                continue  # committed since
            batch = await ref
            # The validator's latest handle and key (it may have re-keyed this mempool since)
            v = self.validators.get(index)
            if v is None:
                return
            self._count("announced_held", 1)
            self._send_again(index, v, digest, ref, batch)

    def _send_again(
        self, index: int, v: Any, digest: bytes, ref: Any, batch: pa.RecordBatch
    ) -> None:
        """Announce a sealed batch to validator ``index`` again, by Ray call and outside the
        sealing order, tagged under its seal key if it gave one."""
        key = self.seal_keys.get(index)
        tag = None if key is None else seal_tag(key, digest, batch)
        self.resends += 1
        v.batch_ready.remote(digest, [ref], None, tag, resent_by=self.index)

    async def submit(self, batch: pa.RecordBatch) -> Admission:
        """Admit a batch of signed transactions (rows that fail are counted, not stored).
        The answer comes once the rows accepted are on this mempool's disk."""
        self._start()
        if self._recovery is not None and not self._recovery.done():
            # The journal's rows first: admitted before them, a sender's later rows would
            # each wait ahead of a gap (parked) until the recovery, to the parking limit
            with contextlib.suppress(Exception):  # failed: logged and counted there
                await asyncio.shield(self._recovery)
        if not isinstance(batch, pa.RecordBatch):  # a Table, None, bytes from a careless client
            exc = SchemaMismatch(f"a TxBatch is an Arrow record batch, not {type(batch).__name__}")
            self._count(exc.code, 1)
            return Admission(error=str(exc), rejected={exc.code: 1})
        if batch.num_rows > self.capacity:
            # It would not fit into an empty mempool: busy answers would be retried for ever
            self._count("over_capacity", batch.num_rows)
            return Admission(
                error=f"{batch.num_rows} rows exceed this mempool's capacity of "
                f"{self.capacity} rows: submit them in smaller batches",
                rejected={"over_capacity": batch.num_rows},
            )
        size = batch.nbytes
        if size > self.capacity_bytes:
            self._count("over_capacity", batch.num_rows)
            return Admission(
                error=f"{size:,} bytes of rows exceed this mempool's capacity of "
                f"{self.capacity_bytes:,} bytes: submit them in smaller batches",
                rejected={"over_capacity": batch.num_rows},
            )
        # Backpressure: answer busy before doing any work, and keep nothing. Rows parked
        # ahead of a gap count: each is sealed within the gap hold whatever comes (left out,
        # a client sending from fresh keys at nonce 1 put 64,000 rows in flight against a
        # limit of 2,000 without one busy answer)
        held = self.admitting + self.pending_rows + self.parked_rows + sum(self.in_flight.values())
        held_bytes = self._held_bytes()
        wait = self._busy_wait(held, held_bytes, batch.num_rows, size)
        if wait is not None and self._large(batch.num_rows, size):
            wait = self._large_busy(batch, held, held_bytes, size, wait)
        if wait is not None:
            self._count("busy", batch.num_rows)
            return Admission(busy=True, retry_after_ms=max(1, round(wait * 1000)))
        self.admitting += batch.num_rows
        self.admitting_bytes += size
        try:
            return await self._admit(batch)
        finally:
            self.admitting -= batch.num_rows
            self.admitting_bytes -= size

    def _busy_wait(self, held: int, held_bytes: int, rows: int, size: int) -> float | None:
        """None where ``rows`` rows of ``size`` bytes fit beside those held, else about how
        long until they should (the busy answer's hint)."""
        if not self.limit.admits(held, rows):
            return self.limit.retry_after_s(held, rows)
        if held_bytes and held_bytes + size > self.capacity_bytes:
            # Room once about as many rows as hold the excess bytes have committed
            free = -(-(held_bytes + size - self.capacity_bytes) * max(held, 1) // held_bytes)
            return self.limit.retry_after_s(self.limit.limit + free - rows, rows)
        return None

    def _large(self, rows: int, size: int) -> bool:
        """A quarter of the learnt limit or of the byte capacity, or more."""
        return rows * 4 >= self.limit.limit or size * 4 >= self.capacity_bytes

    def _large_busy(
        self, batch: pa.RecordBatch, held: int, held_bytes: int, size: int, wait: float
    ) -> float | None:
        """A large submission that does not fit: under steady load from smaller ones, each
        taking the room a commit frees, it was answered busy for as long as the load lasted
        (it fits only once that much is free at once). Sent again no sooner than its busy
        answer said, it is admitted past the learnt limit (a latency target), within the
        capacity in rows and bytes (the memory bound), if no more than the limit is held
        beside it; None then, else the wait, its return noted (``_returning``)."""
        key = _submission_key(batch)
        if key is None:
            return wait
        now = time.monotonic()
        due = self._returning.pop(key, None)
        rows = batch.num_rows
        if (
            due is not None
            and now >= due
            and held <= self.limit.limit
            and held + rows <= self.capacity
            and held_bytes + size <= self.capacity_bytes
        ):
            self._count("admitted_past_limit", rows)
            return None
        self._returning[key] = now + wait if due is None else min(due, now + wait)
        while len(self._returning) > RETURNING_KEEP:
            del self._returning[next(iter(self._returning))]
        return wait

    def _held_bytes(self) -> int:
        """Bytes of the rows held uncommitted: being admitted, pending, parked, in flight
        (anything up to ``capacity_bytes`` is admitted while nothing is held)."""
        return (
            self.admitting_bytes
            + self.pending_bytes
            + self.parked_bytes
            + sum(self.in_flight_bytes.values())
        )

    async def _admit(self, batch: pa.RecordBatch) -> Admission:
        try:
            if batch.num_rows > self.genesis.limits.max_batch_rows:  # before any work on it
                raise WrongLength(
                    f"{batch.num_rows} rows exceed the batch limit of "
                    f"{self.genesis.limits.max_batch_rows}: submit them in smaller batches"
                )
            canonical = validate_batch(
                batch,
                chain_id=self.genesis.chain_id,
                max_payload=self.genesis.limits.max_payload_bytes,
            )
        except LedgerError as exc:
            self._count(exc.code, batch.num_rows)
            return Admission(error=str(exc), rejected={exc.code: batch.num_rows})
        valid = await self._verify(canonical)
        senders = byte_rows(fixed_rows(canonical.column("sender"), 32))
        committed = await self._committed_nonces(list(dict.fromkeys(senders)))
        result = self._take(canonical, senders, valid, committed, in_order=True)
        for reason, n in result.rejected.items():
            self._count(reason, n)
        if result.accepted:
            self._count("accepted", result.accepted)
            await self._durable()
        return result

    def _take(
        self,
        canonical: pa.RecordBatch,
        senders: list[bytes],
        valid: np.ndarray,
        committed: dict[bytes, int],
        *,
        in_order: bool,
    ) -> Admission:
        """Keep the rows of ``canonical`` (``senders``: each row's) that pass (``valid``:
        their signatures did), each in sequence to the pending rows or ahead of it to the
        parked ones, journaled (not yet durable: ``_durable``); the verdicts, not counted
        yet. ``in_order``: a submission's rules (a sender's nonces rise within
        ``canonical``; rows the journal gave back, not yet admitted again, are duplicates);
        False for those rows themselves, in the order they were accepted, from several
        submissions, parked past the parking limits where they land ahead of a gap (the
        shards may now know the sender's next nonce below them). Nothing awaits here: no
        other call changes what the checks read until the rows are kept."""
        result = Admission()
        keys = byte_rows(tx_ids_of(canonical))
        nonces = canonical.column("nonce").to_numpy(zero_copy_only=False).tolist()
        fresh = np.zeros(len(keys), np.bool_)
        ahead = np.zeros(len(keys), np.bool_)
        batch_seen: dict[bytes, None] = {}
        last: dict[bytes, int] = {}  # each sender's last nonce admitted from this submission
        # Each sender's next nonce in sequence as this submission's rows go in (None: not known,
        # nothing is held back for it)
        expect: dict[bytes, int | None] = {}
        parking: dict[bytes, int] = {}  # rows of each sender parked by this submission
        # (sender, nonce) of those rows: one nonce of a sender parks once (a journal given
        # back may hold two rows of one nonce: parked by nonce, the second overwrote the first
        # and the parked count drifted for good); its size is their count (``parking``'s sum,
        # summed anew per row, cost 15 s for 65,536 senders)
        parking_at: set[tuple[bytes, int]] = set()
        for i, k in enumerate(keys):
            sender, nonce = senders[i], nonces[i]
            if not valid[i]:
                reason = "invalid_signature"
            elif k in self.seen or k in batch_seen or (in_order and k in self._recovering):
                reason = "duplicate"
            elif nonce < committed.get(sender, 0):
                reason = "stale_nonce"
            elif in_order and nonce <= last.get(sender, -1):
                reason = "nonce_order"
            else:
                if sender not in expect:
                    expect[sender] = self._expected(sender, committed)
                nxt = expect[sender]
                if nxt is None or nonce <= nxt:  # in sequence, or a nonce already taken
                    expect[sender] = max(nonce + 1, nxt or 0)
                else:
                    held = self.parked.get(sender, {})
                    n = parking.get(sender, 0)
                    if nonce in held or (sender, nonce) in parking_at:
                        reason = "nonce_parked"
                    elif in_order and (
                        len(held) + n >= self.park_per_sender
                        or self.parked_rows + len(parking_at) >= self.park_limit
                    ):
                        # (Not rows the journal gave back: each was answered "accepted",
                        # and what the mempool's capacity held, parked it holds too)
                        reason = "nonce_gap_limit"
                    else:
                        ahead[i] = True
                        parking[sender] = n + 1
                        parking_at.add((sender, nonce))
                        reason = ""
                    if reason:
                        result.rejected[reason] = result.rejected.get(reason, 0) + 1
                        continue
                fresh[i] = True
                batch_seen[k] = None
                last[sender] = nonce
                continue
            result.rejected[reason] = result.rejected.get(reason, 0) + 1
        result.accepted = int(fresh.sum())
        if not result.accepted:
            return result
        if self.journal is not None:
            try:
                kept = canonical if fresh.all() else canonical.filter(pa.array(fresh))
                segment = self.journal.write(kept)
            except OSError as exc:  # a full disk: nothing of the submission is kept
                log.error("mempool %d: journal write failed: %s", self.index, exc)
                return Admission(
                    error=f"mempool {self.index} cannot journal rows: {exc}",
                    rejected={"journal_unavailable": canonical.num_rows},
                )
            tag = pa.array(np.full(canonical.num_rows, segment, np.uint32))
            canonical = canonical.append_column(JOURNAL_COLUMN, tag)
        self.seen.update(batch_seen)
        excess = len(self.seen) - self.seen_limit
        if excess > 0:
            for key in list(itertools.islice(self.seen, excess)):
                del self.seen[key]
        in_sequence = fresh & ~ahead
        kept = canonical.filter(pa.array(in_sequence)) if not in_sequence.all() else canonical
        if kept.num_rows:
            self.pending.append(kept)
            self.pending_rows += kept.num_rows
            self.pending_bytes += kept.nbytes
        if parking:
            self._park(canonical.filter(pa.array(ahead)))
        # The senders whose sequence moved on: their parked rows that now follow it go too
        self._unpark({s: n for s, n in expect.items() if n is not None})
        while self.pending_rows >= self.batch_rows:
            self._seal(self.batch_rows)
        return result

    async def _durable(self) -> None:
        """Wait until the rows journaled so far are on the disk. A failed fsync ends the
        process (rows kept in memory are ahead of the disk, as for a validator's store): Ray
        restarts it from what its journal holds."""
        if self.journal is None:
            return
        try:
            await self.journal.sync()
        except OSError as exc:
            stop_on_disk_failure(f"mempool {self.index}", exc)

    def _start(self) -> None:
        """At the first call that needs them: the timer that seals and polls, and the
        recovery of what an earlier run of this mempool left in its journal."""
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        if self._recovery is None and self.journal is not None and self.journal.recovered:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Admit again the rows an earlier run of this mempool accepted and its journal
        holds, except those whose nonce has committed since (their rows, or others with their
        nonces, committed), their signatures not checked again (they were before they were
        journaled). The batches it had sealed from them go out again as they were (same
        digest: a validator that holds one drops it, so no row is ordered twice), unless
        every row of one has committed; the other rows are sealed anew, in the journaled
        order (a sender's rows ahead of a gap are parked as at admission). They go in once
        every validator gave its handle (a validator missing then gets them when they are
        resent). Whatever goes wrong, submissions go on: those waiting for the recovery are
        let through, and the rows it did not admit stay in the old segments for the next
        start."""
        try:
            await self._recover_rows()
        except Exception:  # noqa: BLE001 - a bug or a failing Ray call: not every submission
            log.exception("mempool %d: recovery from the journal failed", self.index)
            self._count("recovery_failed", 1)
        finally:
            # Rows not admitted again: a client offering them again is taken (a copy the old
            # segments still hold is dropped at the next start, its nonce committed)
            self._recovering = set()

    async def _recover_rows(self) -> None:
        journal = self.journal
        assert journal is not None
        deadline = time.monotonic() + RECOVER_WAIT_S
        while len(self.validators) < self.genesis.validators.n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        batches: list[pa.RecordBatch] = []
        for batch in journal.recovered:
            try:
                batches.append(
                    validate_batch(
                        batch,
                        chain_id=self.genesis.chain_id,
                        max_payload=self.genesis.limits.max_payload_bytes,
                    )
                )
            except LedgerError as exc:  # another network's journal in this directory
                self._count(f"recovered_{exc.code}", batch.num_rows)
        # In parts of at most RECOVER_PART_BYTES of payloads: combined past Arrow's 2 GiB, the
        # rows split into chunks, and the recovery read the first alone (the others' rows,
        # answered "accepted" before the crash, were dropped with the old segments). A batch
        # sealed across two parts is sealed anew, not sent again as it was.
        for part in _parts_by_payload(batches, RECOVER_PART_BYTES):
            if not await self._recover_part(part):
                return
        journal.drop_recovered()

    async def _recover_part(self, batches: list[pa.RecordBatch]) -> bool:
        """Admit again one part of the journal's rows; False where the recovery must stop
        (the old segments then stay for the next start)."""
        rows = pa.Table.from_batches(batches).combine_chunks()
        if rows.num_rows:
            canonical = rows.to_batches()[0]
            senders = byte_rows(fixed_rows(canonical.column("sender"), 32))
            try:  # slow shards do not hold the recovery (and the submissions waiting on it)
                committed = await asyncio.wait_for(
                    self._committed_nonces(list(dict.fromkeys(senders))), POLL_TIMEOUT_S
                )
            except TimeoutError:  # nothing known committed: sealed batches go out again (a
                committed = {}  # validator drops one it committed) and the rest anew
            sealed, resealed = self._sealed_before(canonical, senders, committed)
            try:
                for digest, take in sealed:
                    self._reseal(canonical.take(pa.array(take)), digest)
            except OSError as exc:  # the disk is full: the old segments stay for later
                log.error("mempool %d: journal write failed in recovery: %s", self.index, exc)
                self._count("recovery_failed", canonical.num_rows)
                return False
            rest = canonical.filter(pa.array(~resealed)) if resealed.any() else canonical
            kept = [s for s, r in zip(senders, resealed.tolist(), strict=True) if not r]
            valid = np.ones(rest.num_rows, np.bool_)
            result = self._take(rest, kept, valid, committed, in_order=False)
            if result.error is not None:
                self._count("recovery_failed", rest.num_rows)
                return False
            for reason, n in result.rejected.items():
                self._count(f"recovered_{reason}", n)
            self._count("recovered", result.accepted + sum(len(take) for _, take in sealed))
            log.info(
                "mempool %d: from the journal, %d sealed batches sent again, %d rows sealed "
                "anew, %d dropped %s",
                self.index,
                len(sealed),
                result.accepted,
                sum(result.rejected.values()),
                result.rejected,
            )
            await self._durable()
            # They waited long enough: sealed now, not at the next tick
            while self.pending_rows:
                self._seal(self.batch_rows)
        return True

    def _sealed_before(
        self, canonical: pa.RecordBatch, senders: list[bytes], committed: dict[bytes, int]
    ) -> tuple[list[tuple[bytes, list[int]]], np.ndarray]:
        """The batches the journal says were sealed, each as (digest, its rows' positions in
        ``canonical``, in order), but those of which a row is missing (done with: its batch
        committed) or every row committed; and the mask of the rows these batches hold or
        held (the rest are to be sealed anew)."""
        journal = self.journal
        assert journal is not None
        position: dict[bytes, int] = {}
        for i, key in enumerate(byte_rows(tx_ids_of(canonical))):
            position.setdefault(key, i)
        nonces = canonical.column("nonce").to_numpy(zero_copy_only=False)
        used = np.zeros(canonical.num_rows, np.bool_)
        out: list[tuple[bytes, list[int]]] = []
        for digest, ids in journal.sealed:
            take = [position.get(key) for key in byte_rows(ids)]
            if not take or any(i is None for i in take):
                continue
            rows = [i for i in take if i is not None]
            if used[rows].any():
                continue
            used[rows] = True
            if all(nonces[i] < committed.get(senders[i], 0) for i in rows):
                self._count("recovered_committed_batches", 1)
                continue
            out.append((digest, rows))
        return out, used

    def _reseal(self, batch: pa.RecordBatch, digest: bytes) -> None:
        """Announce again a batch sealed before a restart, journaled anew: its rows count as
        seen and as their senders' sequence here."""
        assert self.journal is not None
        segment = self.journal.write(batch)
        self.seen.update(dict.fromkeys(byte_rows(tx_ids_of(batch))))
        senders = byte_rows(fixed_rows(batch.column("sender"), 32))
        nonces = batch.column("nonce").to_numpy(zero_copy_only=False).tolist()
        after: dict[bytes, int] = {}
        for sender, nonce in zip(senders, nonces, strict=True):
            after[sender] = max(after.get(sender, 0), nonce + 1)
        self._unpark(after)
        tag = pa.array(np.full(batch.num_rows, segment, np.uint32))
        again = self._send(batch.append_column(JOURNAL_COLUMN, tag))
        if again != digest:  # not the batch it was: its rows may be ordered twice
            self._count("recovered_batch_changed", 1)
        self._count("recovered_batches", 1)

    def _expected(self, sender: bytes, committed: dict[bytes, int]) -> int | None:
        """``sender``'s next nonce in sequence here: after its last row sealed or pending here,
        or its committed one if later; None when neither is known (a storage shard did not
        answer, and no row of it came here lately), or when the sender spreads its rows over
        several mempools (none is held back for it)."""
        seq = self.next_nonce.get(sender)
        known = committed.get(sender)
        if self._note_spread(sender, known):
            return None
        if seq is None or known is None:
            return known if seq is None else seq
        return max(seq, known)

    def _note_spread(self, sender: bytes, committed: int | None) -> bool:
        """Whether ``sender`` sends through other mempools too: rows of it committed beyond the
        sequence known here, which came another way. This mempool cannot see those in flight,
        so it would hold each of its rows until the rows before them commit (one commit
        latency each, in a chain when the sender alternates mempools faster than that); its
        rows go on at once instead, and the leaders order them. Its parked rows go on too,
        each run of consecutive nonces sealed in a batch of its own: all in one batch (or with
        its later rows), rows that can commit would wait with rows behind a gap whose rows are
        parked in another mempool, which waits for them to commit."""
        if sender in self.spread:
            return True
        seq = self.next_nonce.get(sender)
        if committed is None or seq is None or committed <= seq:
            return False
        self.spread.add(sender)
        self._count("spread_senders", 1)
        held = self.parked.pop(sender, None)
        if held:
            self.parked_rows -= len(held)
            self.parked_bytes -= sum(row.nbytes for _, row in held.values())
            self._count("unparked", len(held))
            run: list[pa.RecordBatch] = []
            for nonce in sorted(held):
                run.append(held[nonce][1])
                if nonce + 1 not in held:
                    table = pa.Table.from_batches(run)
                    for batch in _seal_parts(table, table.num_rows):
                        self._send(batch)
                    run = []
        return True

    def _park(self, rows: pa.RecordBatch) -> None:
        """Hold rows ahead of their senders' sequence, each by sender and nonce."""
        now = time.monotonic()
        senders = byte_rows(fixed_rows(rows.column("sender"), 32))
        nonces = rows.column("nonce").to_numpy(zero_copy_only=False).tolist()
        for i, (sender, nonce) in enumerate(zip(senders, nonces, strict=True)):
            row = rows.slice(i, 1)
            self.parked.setdefault(sender, {})[nonce] = (now, row)
            self.parked_bytes += row.nbytes
        self.parked_rows += rows.num_rows
        self._park_due = min(self._park_due, now + self.park_hold_s)
        self._count("parked", rows.num_rows)

    def _unpark(self, expect: dict[bytes, int]) -> None:
        """Record each sender's next nonce in sequence, and move its parked rows that no
        longer wait for a gap (those below it: another row took their nonce, execution refuses
        them at once; then those that continue it) to the pending rows, in nonce order."""
        released: list[pa.RecordBatch] = []
        for sender, nxt in expect.items():
            nxt = max(nxt, self.next_nonce.pop(sender, nxt))  # most recently used goes last
            held = self.parked.get(sender)
            if held:
                for nonce in sorted(n for n in held if n < nxt):
                    released.append(held.pop(nonce)[1])
                while nxt in held:
                    released.append(held.pop(nxt)[1])
                    nxt += 1
                if not held:
                    del self.parked[sender]
            self.next_nonce[sender] = nxt
        excess = len(self.next_nonce) - self.senders_limit
        if excess > 0:
            for sender in list(itertools.islice(self.next_nonce, excess)):
                del self.next_nonce[sender]
                self.spread.discard(sender)
        if released:
            self._count("unparked", len(released))
            self._queue(released)

    def _queue(self, rows: list[pa.RecordBatch]) -> None:
        self.parked_rows -= len(rows)
        self.parked_bytes -= sum(row.nbytes for row in rows)
        # (each chunk: past Arrow's 2 GiB the rows combine into several, and the first alone
        # was kept: 65,536 parked rows of 64 KiB released at once lost 533 of them)
        for batch in pa.Table.from_batches(rows).combine_chunks().to_batches():
            self.pending.append(batch)
            self.pending_rows += batch.num_rows
            self.pending_bytes += batch.nbytes

    async def _verify(self, batch: pa.RecordBatch) -> np.ndarray:
        """Signature checks through the institution's verifier actor where it has one (the
        GPU there), else here."""
        if self.use_verifier:
            try:
                if self._verifier is None:
                    self._verifier = ray.get_actor(
                        f"{self.network}-verifier-{self.index}", namespace="rayledger"
                    )
                mask: np.ndarray = await self._verifier.verify_rows.remote(batch)
                return mask
            except Exception:  # the verifier is down or restarting: check here meanwhile
                self._verifier = None
        # ``batch`` is validate_batch's canonical form, made in this process: its ids hold
        return verify_signatures(batch, self.genesis.chain_id, ids=tx_ids_of(batch))

    async def _committed_nonces(self, senders: list[bytes]) -> dict[bytes, int]:
        """Each sender's next nonce as committed, from this institution's storage shards
        (0 for a sender without one; absent where there are no shards or they do not answer:
        the order check still applies)."""
        if not self.shards or not senders:
            return {}
        keys = [nonce_key(s) for s in senders]
        out: dict[bytes, int] = {}
        for k, rows in rows_by_shard(shard_of_keys(keys, self.shards)).items():
            for part in read_parts(rows):  # a shard answers at most READ_MAX_KEYS at a time
                try:
                    handle = self._shard_handles.get(k)
                    if handle is None:
                        handle = ray.get_actor(
                            f"{self.network}-shard-{self.index}-{k}", namespace="rayledger"
                        )
                        self._shard_handles[k] = handle
                    values = await handle.get_states.remote([keys[i] for i in part])
                except Exception:  # a shard down or restarting: no stale check for these
                    self._shard_handles.pop(k, None)
                    break
                for i, v in zip(part, values, strict=True):
                    out[senders[i]] = 0 if v is None else int.from_bytes(v, "big")
        return out

    def _seal(self, limit: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.pending[0].schema)
        head = next(_seal_parts(table.slice(0, limit), limit))  # (lengths of those rows only)
        rest = table.slice(head.num_rows)
        # Sent first: where it fails (the object store full, say) the rows stay pending and
        # the next tick seals them again, rather than leaving memory for good
        self._send(head)
        self.pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.pending_bytes = sum(b.nbytes for b in self.pending)

    def _send(self, head: pa.RecordBatch) -> bytes:
        """Seal ``head`` into a batch and announce it to every validator; its digest."""
        sources: dict[int, int] = {}
        if JOURNAL_COLUMN in head.schema.names:
            segments, counts = np.unique(head.column(JOURNAL_COLUMN).to_numpy(), return_counts=True)
            sources = dict(zip(segments.tolist(), counts.tolist(), strict=True))
            head = head.drop_columns([JOURNAL_COLUMN])
        # Its own buffers: a batch sealed from part of a larger submission would otherwise
        # carry the whole of it into the object store and to every validator
        batch = compact_batch(head.cast(TX_SCHEMA.with_metadata(head.schema.metadata)))
        digest = batch_digest(batch)
        held = self.sources.setdefault(digest, {})
        for segment, n in sources.items():
            held[segment] = held.get(segment, 0) + n
        if self.journal is not None:
            try:  # which rows went into which batch, for a restart (not waited for)
                segment = self.journal.note_sealed(digest, tx_ids_of(batch))
                held[segment] = held.get(segment, 0) + 1
            except OSError as exc:  # a restart would seal these rows anew
                log.warning("mempool %d: seal record not written: %s", self.index, exc)
        ref = ray.put(batch)
        self._refs[digest] = ref
        self.limit.sealed(digest, batch.num_rows, sum(self.in_flight.values()), time.monotonic())
        self.in_flight[digest] = batch.num_rows
        self.in_flight_bytes[digest] = batch.nbytes
        self.sealed_at[digest] = time.monotonic()
        self.sealed += 1
        ipc = batch_to_ipc(batch) if self.streams else b""
        for i, v in self.validators.items():
            key = self.seal_keys.get(i)
            tag = None if key is None else seal_tag(key, digest, batch)
            stream = self.streams.get(i)
            if stream is not None and stream.send(
                encode_batch_frame(digest, self.sealed, tag, ipc)
            ):
                continue
            self.ray_sends += 1
            v.batch_ready.remote(digest, [ref], (self.index, self.sealed), tag)
        return digest

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._tick_once()
            except Exception:  # noqa: BLE001 - one failed step must not end the timer for good
                log.exception("mempool %d: timer step failed", self.index)
                self._count("timer_failed", 1)

    def _tick_once(self) -> None:
        """One step of the timer: seal, release gaps held too long, expire, ask, poll."""
        if self.pending_rows:
            self._seal(self.batch_rows)
        now = time.monotonic()
        if self.parked:
            self._seal_expired_gaps(now)
            if self._park_poll is None and now - self._park_polled >= PARK_POLL_S:
                self._park_polled = now
                self._park_poll = asyncio.get_running_loop().create_task(self._poll_parked())
        self._expire(now)
        if (
            self._asking is None
            and len(self.validators) < self.genesis.validators.n
            and now - self._asked_at >= ASK_VALIDATORS_S
        ):
            self._asked_at = now
            self._asking = asyncio.get_running_loop().create_task(self._ask_missing())
        if self._poll is None and now - self._polled_at >= COMMIT_POLL_S:
            self._polled_at = now
            self._poll = asyncio.get_running_loop().create_task(self._poll_commits(now))

    async def _ask_missing(self) -> None:
        """Ask the validators this mempool has no handle from for theirs (the name lookups
        block: in a thread). One that is down gives it when it starts again."""
        try:
            missing = [i for i in range(self.genesis.validators.n) if i not in self.validators]
            await asyncio.to_thread(self._ask_validators, missing)
            self._count("validators_asked", len(missing))
        except Exception:  # noqa: BLE001 - Ray's control plane busy: asked again next time
            log.debug("mempool %d: validators not asked", self.index, exc_info=True)
        finally:
            self._asking = None

    def _seal_expired_gaps(self, now: float) -> None:
        """Rows parked longer than the hold are sealed, in batches of their own (sender and
        nonce order), never with rows in sequence: their gaps are likely never filled, and a
        leader holds back a batch with such rows for a while (see ``LedgerBuilder.build``).
        Their sender's sequence stays where it was: its later rows ahead of it are held, and
        sealed apart, in their turn (a fill that comes late goes with the rows in sequence,
        and a leader puts it before them)."""
        if now < self._park_due:
            return
        due: list[pa.RecordBatch] = []
        oldest = float("inf")  # of the rows that stay
        for sender in list(self.parked):
            held = self.parked[sender]
            for nonce in sorted(n for n, (at, _) in held.items() if now - at >= self.park_hold_s):
                due.append(held.pop(nonce)[1])
            if not held:
                del self.parked[sender]
            else:
                oldest = min(oldest, min(at for at, _ in held.values()))
        self._park_due = oldest + self.park_hold_s
        if not due:
            return
        self.parked_rows -= len(due)
        self.parked_bytes -= sum(row.nbytes for row in due)
        self._count("gap_expired", len(due))
        for batch in _seal_parts(pa.Table.from_batches(due), self.batch_rows):
            self._send(batch)

    async def _poll_parked(self) -> None:
        """Release parked rows whose gap closed elsewhere: the nonces before them committed
        (through another mempool, or sealed here before a restart)."""
        try:
            senders = list(self.parked)
            committed = await asyncio.wait_for(
                self._committed_nonces(senders), timeout=POLL_TIMEOUT_S
            )
            moved = {s: n for s, n in committed.items() if s in self.parked}
            self._unpark({s: n for s, n in moved.items() if not self._note_spread(s, n)})
        except Exception:  # noqa: BLE001 - shards slow or down: the hold still ends it
            log.debug("mempool %d: parked rows' senders not polled", self.index, exc_info=True)
        finally:
            self._park_poll = None

    async def _poll_commits(self, now: float) -> None:
        """Ask the validators whether batches in flight for long were committed: while this
        mempool's own validator is down (or a report was lost), the others commit its
        batches and nobody tells it, and without this its limit would stay full until the
        expiry. Freed batches give no latency sample (their commit time is not known)."""
        try:
            wait = max(2 * (self.limit.target_s() or MIN_TARGET_S), STALE_MIN_S)
            stale = [d for d, at in self.sealed_at.items() if now - at > wait]
            if not stale:
                return
            # Another institution's validator first: this one's may be the one that is down
            order = sorted(self.validators.items(), key=lambda item: item[0] == self.index)
            for _, handle in order:
                try:
                    done = await asyncio.wait_for(
                        handle.batches_committed.remote(stale), timeout=POLL_TIMEOUT_S
                    )
                except Exception:  # down or slow: ask the next one
                    continue
                for digest, committed in zip(stale, done, strict=True):
                    if committed and digest in self.in_flight:
                        self._count("commits_polled", self.in_flight[digest])
                        self._release(digest)
                break
            await self._reannounce([d for d in stale if d in self.in_flight], now)
        finally:
            self._poll = None

    async def _reannounce(self, digests: list[bytes], now: float) -> None:
        """Send batches long in flight to every validator again (by reference, outside the
        sealing order; a validator that holds one already drops it at once)."""
        due = [d for d in digests if now >= self._resend.get(d, (0.0, 0.0))[0]]
        for digest in due[:REANNOUNCE_BATCHES]:
            ref = self._refs.get(digest)
            if ref is None:
                continue
            wait = min(self._resend.get(digest, (0.0, REANNOUNCE_S / 2))[1] * 2, REANNOUNCE_MAX_S)
            self._resend[digest] = (now + wait, wait)
            self._count("reannounced", 1)
            batch = await ref
            for i, v in self.validators.items():
                self._send_again(i, v, digest, ref, batch)

    def _expire(self, now: float) -> None:
        """Stop counting batches sealed more than ``expiry_s`` ago and never heard of since
        (the validators still hold them: one that does commit is simply not counted)."""
        while self.sealed_at:
            digest, at = next(iter(self.sealed_at.items()))
            if now - at < self.expiry_s:
                return
            self._count("expired", self.in_flight.get(digest, 0))
            self._release(digest)
            log.warning(
                "mempool %d: batch %s not committed after %.0f s; no longer counted",
                self.index,
                digest.hex()[:16],
                now - at,
            )

    async def on_commit(self, digests: list[bytes]) -> None:
        """Batches committed (by this mempool's validator): their capacity is free again."""
        now = time.monotonic()
        for d in digests:
            self.limit.committed(d, now)
            self._release(d)

    def _release(self, digest: bytes) -> None:
        """A batch of this mempool committed: its rows stop counting against the limit."""
        self.in_flight.pop(digest, None)
        self.in_flight_bytes.pop(digest, None)
        sources = self.sources.pop(digest, None)
        if sources and self.journal is not None:
            self.journal.done(sources)
        self._refs.pop(digest, None)
        self.sealed_at.pop(digest, None)
        self._resend.pop(digest, None)
        self.limit.forget(digest)

    def _count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def _stream_event(self, key: str) -> None:
        self.stream_events[key] = self.stream_events.get(key, 0) + 1

    async def status(self) -> dict[str, Any]:
        target = self.limit.target_s()
        return {
            "index": self.index,
            "pending_rows": self.pending_rows,
            # Rows ahead of their sender's sequence, held until it reaches them
            "parked_rows": self.parked_rows,
            "in_flight_rows": sum(self.in_flight.values()),
            # Bytes of the rows held uncommitted, against the byte capacity
            "held_bytes": self._held_bytes(),
            "capacity_bytes": self.capacity_bytes,
            "sealed_batches": self.sealed,
            "capacity_rows": self.capacity,
            "limit_rows": self.limit.limit,
            "target_latency_ms": None if target is None else round(target * 1000),
            "late_batches": self.limit.late,
            "counts": dict(self.counts),
            # Validators this mempool tags its batches for (its own: they skip re-checking
            # signatures); the keys themselves are never shown
            "sealing_for": sorted(self.seal_keys),
            # Validators whose handles it holds: its batches go to these
            "validators": sorted(self.validators),
            # Batches announced on streams and by Ray call (where a stream was down), and
            # long uncommitted batches sent again by Ray call, to each validator
            "streams": {
                "connected": sorted(i for i, st in self.streams.items() if st.connected),
                "frames_out": self._frames_out_before
                + sum(st.frames_out for st in self.streams.values()),
                "ray_sends": self.ray_sends,
                "resends": self.resends,
                # A malformed endpoint, a validator that stopped reading
                "events": dict(self.stream_events),
            },
            # Rows accepted and not yet committed, on this mempool's disk (None: off)
            "journal": None if self.journal is None else self.journal.status(),
            "cpu_s": round(time.process_time(), 3),
            # Signatures checked on this process's CPU, and their checking threads' CPU time
            "signature_checks": cpu_verify_work(),
        }
