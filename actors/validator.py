"""The validator actor: the consensus core, the executing block builder and the block store,
driven by one serialized event loop.

Everything that changes consensus state happens in the actor's asyncio loop without awaiting
in between, so events are handled one at a time. A ``Persist`` action is written and fsynced
before the actions after it (the vote it guards) leave; a committed block is fsynced in the
block store before its transactions are reported committed. A restarted validator rebuilds
its state from its own disk (committed blocks, re-executed; safety state; recent proposals)
and catches up from its peers.

Peers are other validators' actor handles; a message to a peer is a fire-and-forget call
carrying every message for that peer produced by one event, delayed by the emulated WAN
latency between the two sites.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayledger.actors.storage import BlockStore
from rayledger.chain import LedgerBuilder, admit_batch
from rayledger.config import parse_genesis
from rayledger.consensus import (
    Action,
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
from rayledger.crypto import Ed25519Signer, Ed25519Verifier, read_key_file
from rayledger.errors import LedgerError
from rayledger.execution import execute_block, genesis_state
from rayledger.tx import TX_SCHEMA, tx_ids_of

log = logging.getLogger(__name__)

ACTOR_STRATEGIES = ("none", "silent", "invalid-signature", "double-voter", "equivocating-leader")


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Validator:
    """One institution's validator. Created through ``ray.remote`` by the cluster layer."""

    def __init__(self, data_dir: str, index: int) -> None:
        """Everything comes from the network's data directory: ``genesis.toml``,
        ``network.json`` (transport and timing settings), ``keys/<name>.key`` and this
        validator's own ``validator-<index>/`` (block store, safety state)."""
        root = Path(data_dir)
        settings = json.loads((root / "network.json").read_text())
        self.genesis = parse_genesis((root / "genesis.toml").read_text())
        name = self.genesis.validators.validators[index].name
        self.signer = Ed25519Signer(read_key_file(root / "keys" / f"{name}.key"))
        self.network = settings["name"]
        base_timeout_ms = int(settings.get("base_timeout_ms", 1000))
        idle_block_ms = int(settings.get("idle_block_ms", base_timeout_ms // 10))
        max_batches_per_block = int(settings.get("max_batches_per_block", 64))
        matrix = settings.get("latency_ms")
        latency_ms = list(matrix[index]) if matrix else None
        verifier_backend = settings.get("verifier_backend", "auto")
        # Parallelism on a Ray node comes from actors; no per-actor hashing processes.
        os.environ.setdefault("RAYLEDGER_CPU_WORKERS", "0")
        self.index = index
        self.verifier = Ed25519Verifier(verifier_backend)
        self.dir = root / f"validator-{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.latency = latency_ms or [0.0] * self.genesis.validators.n
        self.peers: dict[int, Any] = {}
        self.mempool: Any = None
        self.verifier_actor: Any = None
        self.batches: dict[bytes, pa.RecordBatch] = {}
        self.evidence: list[Evidence] = []
        self.rejected: dict[str, int] = {}
        self.started = False
        # Fault injection (chaos and tests): peers cut off by a partition, and a Byzantine
        # strategy from the simulator's catalogue applied to what this validator sends.
        self.blocked: set[int] = set()
        self.strategy = "none"

        self.store = BlockStore(self.dir / "store", self.genesis.header)
        # Wall-clock commit time of each height committed since this process started.
        self.commit_times: dict[int, float] = {}
        self.committed_batches = self._load_batch_index()
        base, _ = genesis_state(self.genesis.accounts)
        head = self.genesis.header
        # Rebuild the committed state by re-executing the stored chain; a stored state root
        # that differs from re-execution means the store or this code is wrong: refuse.
        for header, rows in self.store.iter_rows():
            view, _, root = execute_block(base, rows, header.height, head.state_root)
            if root != header.state_root:
                raise LedgerError(f"height {header.height}: re-executed state root differs")
            base.writes.update(view.writes)
            head = header
        self.builder = LedgerBuilder(self.batches, head, base)
        persisted, known = self._load_consensus()
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
            ),
            persisted=persisted,
            committed_head=head,
            known_blocks=[p for p in known if p.block.height <= head.height],
        )

    # ---- persistence -----------------------------------------------------------------------

    def _load_consensus(self) -> tuple[SafetyState | None, list[Proposal]]:
        state = None
        path = self.dir / "safety.pkl"
        if path.exists():
            state = pickle.loads(path.read_bytes())
        known: list[Proposal] = []
        log_path = self.dir / "proposals.log"
        if log_path.exists():
            data = log_path.read_bytes()
            pos = 0
            while pos + 4 <= len(data):
                size = int.from_bytes(data[pos : pos + 4], "big")
                if pos + 4 + size > len(data):
                    break
                known.append(pickle.loads(data[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        return state, known[-CoreConfig().committed_window :]

    def _load_batch_index(self) -> dict[bytes, tuple[int, int, int]]:
        path = self.dir / "batches.idx"
        data = path.read_bytes() if path.exists() else b""
        out = {}
        for pos in range(0, len(data) - len(data) % 48, 48):
            height, offset, rows = struct.unpack(">QII", data[pos + 32 : pos + 48])
            if height <= self.store.height:
                out[data[pos : pos + 32]] = (height, offset, rows)
        return out

    def _append_proposals(self, proposals: tuple[Proposal, ...]) -> None:
        with open(self.dir / "proposals.log", "ab") as f:
            for p in proposals:
                raw = pickle.dumps(p)
                f.write(len(raw).to_bytes(4, "big") + raw)
            f.flush()
            os.fsync(f.fileno())

    # ---- wiring ------------------------------------------------------------------------------

    def set_peer(self, index: int, handle: Any) -> None:
        """A peer (re)started: its new handle."""
        if index != self.index:
            self.peers[index] = handle

    async def start(self) -> None:
        """Find the peers and the mempool by name, tell them where this validator is, and
        enter the first round. Called once all validators exist, and after every restart."""
        if self.started:
            return
        me = ray.get_runtime_context().current_actor
        for j in range(self.genesis.validators.n):
            if j == self.index:
                continue
            try:
                handle = self._actor(f"validator-{j}")
            except ValueError:  # down: it announces itself when it comes back
                continue
            self.peers[j] = handle
            handle.set_peer.remote(self.index, me)
        try:
            self.verifier_actor = self._actor(f"verifier-{self.index}")
        except ValueError:  # none deployed: verify in this process
            self.verifier_actor = None
        for j in range(self.genesis.validators.n):
            try:
                mempool = self._actor(f"mempool-{j}")
            except ValueError:
                continue
            mempool.set_validator.remote(self.index, me)
            if j == self.index:
                self.mempool = mempool
        self.started = True
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
        """Drop all traffic to and from these peers (a network partition) until unblocked."""
        self.blocked = set(peers)

    async def set_strategy(self, strategy: str) -> None:
        if strategy not in ACTOR_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(ACTOR_STRATEGIES)}")
        self.strategy = strategy

    async def deliver(self, sender: int, messages: list[Message]) -> None:
        if sender in self.blocked:
            return
        self.core.tick(int(time.time() * 1000))
        self._run(self.core.on_messages(messages))

    async def batch_ready(self, digest: bytes, refs: list[Any]) -> None:
        """A mempool sealed a batch: check it ourselves (in this institution's verifier when
        there is one, so the event loop stays free), then tell the core."""
        if digest in self.batches:
            return
        if self.verifier_actor is None:
            self._admit_batch(digest, await refs[0])
            return
        reason = await self.verifier_actor.check.remote(digest, refs)
        if digest in self.batches:
            return
        if reason is not None:
            self._count(f"batch: {reason}")
            return
        batch = await refs[0]
        self._hold(
            digest,
            batch.select(TX_SCHEMA.names).cast(TX_SCHEMA.with_metadata(batch.schema.metadata)),
        )

    def _admit_batch(self, digest: bytes, batch: pa.RecordBatch) -> bool:
        try:
            canonical = admit_batch(
                batch,
                digest,
                chain_id=self.genesis.chain_id,
                max_payload=self.genesis.limits.max_payload_bytes,
            )
        except LedgerError as exc:
            self._count(f"batch: {exc.code}")
            return False
        self._hold(digest, canonical)
        return True

    def _hold(self, digest: bytes, batch: pa.RecordBatch) -> None:
        self.batches[digest] = batch
        self._run(self.core.on_batch_available(digest))

    async def get_batch(self, digest: bytes) -> pa.RecordBatch | None:
        batch = self.batches.get(digest)
        if batch is None and digest in self.committed_batches:
            height, offset, rows = self.committed_batches[digest]
            batch = self.store.get_block(height).txs.slice(offset, rows)
        return batch

    def _on_timer(self, round_: int, purpose: str) -> None:
        self.core.tick(int(time.time() * 1000))
        if purpose == "propose":
            self._run(self.core.on_propose_timer(round_))
        else:
            self._run(self.core.on_local_timeout(round_))

    # ---- actions -------------------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        outbox: dict[int, list[Message]] = {}
        for action in actions:
            match action:
                case Persist(state=state):
                    self._flush(outbox)
                    _fsync_write(self.dir / "safety.pkl", pickle.dumps(state))
                case Broadcast(message=msg):
                    for peer in self.peers:
                        outbox.setdefault(peer, []).extend(self._hostile(msg, peer, True))
                case Send(to=to, message=msg):
                    outbox.setdefault(to, []).extend(self._hostile(msg, to, False))
                case SetTimer(round=round_, delay_ms=delay, purpose=purpose):
                    loop = asyncio.get_running_loop()
                    loop.call_later(delay / 1000, self._on_timer, round_, purpose)
                case Commit(blocks=blocks):
                    self._commit(blocks)
                case FetchBatches(digests=digests, source=source):
                    asyncio.get_running_loop().create_task(self._fetch(digests, source))
                case Evidence():
                    self.evidence.append(action)
                    log.warning(
                        "evidence: %s by validator %d in round %d",
                        action.kind,
                        action.offender,
                        action.round,
                    )
                case Rejected(reason=reason):
                    self._count(reason)
        self._flush(outbox)

    def _hostile(self, msg: Message, peer: int, broadcast: bool) -> list[Message]:
        """What a Byzantine strategy sends in place of ``msg`` (honest: ``[msg]``)."""
        match self.strategy:
            case "silent":
                return []
            case "invalid-signature":
                return [corrupt_signature(msg)]
            case "double-voter" if isinstance(msg, Vote):
                return [msg, double_vote(self.core, msg)]
            case "equivocating-leader" if isinstance(msg, Proposal) and broadcast:
                # Half the peers see another block; the next leader sees both
                other = conflicting_proposal(self.core, msg)
                if peer == self.core.leaders.leader(msg.round + 1):
                    return [msg, other]
                return [other] if peer % 2 else [msg]
        return [msg]

    def _flush(self, outbox: dict[int, list[Message]]) -> None:
        loop = asyncio.get_running_loop()
        for peer, msgs in outbox.items():
            handle = self.peers.get(peer)
            if handle is None or peer in self.blocked or not msgs:
                continue
            delay = self.latency[peer] / 1000 if peer < len(self.latency) else 0.0
            if delay > 0:
                loop.call_later(delay, _send, handle, self.index, list(msgs))
            else:
                _send(handle, self.index, list(msgs))
        outbox.clear()

    def _commit(self, proposals: tuple[Proposal, ...]) -> None:
        digests = []
        index = bytearray()
        for p in proposals:
            block = self.builder.commit(p.block.hash, p.qc)
            self.store.append(block, verify=False)
            self.commit_times[block.height] = time.time()
            offset = 0
            for d in p.block.batch_digests:
                rows = self.batches[d].num_rows
                self.committed_batches[d] = (block.height, offset, rows)
                index += d + struct.pack(">QII", block.height, offset, rows)
                offset += rows
            digests.extend(p.block.batch_digests)
        # Kept to serve peers that lag behind (after a restart too): the proposals, and where
        # each committed batch lies in the store.
        self._append_proposals(proposals)
        with open(self.dir / "batches.idx", "ab") as f:
            f.write(bytes(index))
            f.flush()
            os.fsync(f.fileno())
        for d in digests:
            self.batches.pop(d, None)
        if self.mempool is not None:
            self.mempool.on_commit.remote(digests)

    async def _fetch(self, digests: tuple[bytes, ...], source: int) -> None:
        order = [source] + [i for i in self.peers if i != source]
        for d in digests:
            for peer in order:
                handle = self.peers.get(peer)
                if handle is None or d in self.batches:
                    continue
                try:
                    batch = await handle.get_batch.remote(d)
                except Exception:  # a crashed peer: ask the next one
                    continue
                if batch is not None and self._admit_batch(d, batch):
                    break

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # ---- queries -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        s = self.core.status()
        return {
            "index": self.index,
            "round": s.round,
            "leader": s.leader,
            "height": self.store.height,
            "head": self.store.head.hash.hex(),
            "state_root": self.store.head.state_root.hex(),
            "highest_vote_round": s.highest_vote_round,
            "batches_held": len(self.batches),
            "evidence": len(self.evidence),
            "rejected": dict(self.rejected),
            "evidence_kinds": sorted({e.kind for e in self.evidence}),
            "peers": sorted(self.peers),
            "blocked": sorted(self.blocked),
            "strategy": self.strategy,
        }

    async def headers(self, from_height: int = 1) -> list[tuple[int, bytes, bytes]]:
        """(height, block hash, state root) of every stored block from ``from_height``."""
        headers = [self.store.get_header(h) for h in range(from_height, self.store.height + 1)]
        return [(h.height, h.hash, h.state_root) for h in headers]

    async def locate(self, tx_ids: list[bytes]) -> list[int | None]:
        """Height of each committed transaction id (``None`` if not committed here)."""
        out: list[int | None] = []
        for t in tx_ids:
            try:
                out.append(self.store.locate_tx(t).height)
            except LedgerError:
                out.append(None)
        return out

    async def committed_at(self, tx_ids: list[bytes]) -> float | None:
        """When the last of these transactions was committed here (wall clock), or ``None``
        while any of them is not."""
        latest = 0.0
        for t in tx_ids:
            try:
                height = self.store.locate_tx(t).height
            except LedgerError:
                return None
            latest = max(latest, self.commit_times.get(height, 0.0))
        return latest

    async def committed_ids(self) -> np.ndarray:
        return np.concatenate(
            [tx_ids_of(rows) for _, rows in self.store.iter_rows()] or [np.empty((0, 32), np.uint8)]
        )


def _send(handle: Any, sender: int, messages: list[Message]) -> None:
    handle.deliver.remote(sender, messages)
