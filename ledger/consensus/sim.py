"""A deterministic discrete-event simulator that runs n consensus cores and attacks them.

One seeded random generator drives everything: per-link delays, drops, duplicates (and so
reordering), partitions that heal, crashes and restarts (a restarted core reloads only what it
persisted: its safety state and committed chain), and Byzantine validators. A global checker
records every honest commit and reports a violation if two honest validators commit different
blocks at one height. Time is simulated milliseconds; nothing here reads a clock.

Byzantine strategies (the last ``byzantine`` validators run them):

- ``equivocate``: each runs two honest personas with the same key, one talking to each half of
  the honest validators; every proposal, vote and timeout is doubled. With more than f of them
  this can fork the chain, which is how the tests show that the checker catches violations.
- ``equivocating-leader``: honest, except that as leader it signs two different blocks and
  sends one to each half (both to the next leader).
- ``double-voter``: honest, but every vote is followed by a signed vote for another block.
- ``silent``: sends nothing.
- ``invalid-signature``: honest, but every signature it sends is corrupted.
- ``stale-replayer``: honest, and it also replays old proposals, votes and timeouts.
- ``vote-withholder``: honest, but it never sends a vote.
- ``lazy-leader``: honest, but it never sends a proposal: it votes, forms QCs and times out,
  so it is seen live, and its rounds fail.
- ``fast-clock``: honest, but its clock is an hour ahead, so its blocks are stamped an hour
  ahead of the others' clocks (as a Byzantine leader could stamp them).
- ``slow-leader``: honest, but its proposals leave three quarters of the base round timeout
  late: as late as they can without its round timing out.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayledger.block import BlockHeader, genesis_header
from rayledger.config import Validator, ValidatorSet
from rayledger.consensus.byzantine import conflicting_proposal, corrupt_signature, double_vote
from rayledger.consensus.core import Core, CoreConfig
from rayledger.consensus.messages import (
    Action,
    Broadcast,
    Commit,
    Evidence,
    FetchBatches,
    Message,
    Persist,
    Proposal,
    Rejected,
    SafetyState,
    Send,
    SetTimer,
    TimeoutMsg,
    Vote,
)
from rayledger.crypto import Ed25519Signer, Ed25519Verifier, Signer, Verifier, key_from_seed

STRATEGIES = (
    "none",
    "equivocate",
    "equivocating-leader",
    "double-voter",
    "silent",
    "invalid-signature",
    "stale-replayer",
    "vote-withholder",
    "lazy-leader",
    "fast-clock",
    "slow-leader",
)

# How far ahead the clock of a ``fast-clock`` validator is
FAST_CLOCK_MS = 3_600_000


# ---- a fast stand-in signature scheme for large simulations ------------------------------


class MacSigner:
    """HMAC-SHA512 "signatures": unforgeable without the secret, 100x cheaper than Ed25519.

    Only for simulation, where every verifier is given every secret.
    """

    def __init__(self, public_key: bytes, secret: bytes) -> None:
        self._public = public_key
        self._secret = secret

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha512).digest()


class MacVerifier:
    def __init__(self, secrets: dict[bytes, bytes]) -> None:
        self._secrets = secrets

    def verify(
        self, public_keys: np.ndarray, signatures: np.ndarray, messages: np.ndarray
    ) -> np.ndarray:
        out = np.zeros(len(public_keys), np.bool_)
        for i in range(len(public_keys)):
            secret = self._secrets.get(public_keys[i].tobytes())
            if secret is not None:
                want = hmac.new(secret, messages[i].tobytes(), hashlib.sha512).digest()
                out[i] = hmac.compare_digest(want, signatures[i].tobytes())
        return out


# ---- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """Between ``start_ms`` and ``end_ms`` only validators of the same group can talk."""

    start_ms: int
    end_ms: int
    groups: tuple[frozenset[int], ...]

    @classmethod
    def parse(cls, spec: str) -> Partition:
        """``START-END:0,1|2,3`` (validators not listed form one more group)."""
        try:
            span, groups = spec.split(":")
            start, end = (int(x) for x in span.split("-"))
            parts = tuple(frozenset(int(i) for i in g.split(",") if i) for g in groups.split("|"))
        except ValueError as exc:
            raise ValueError(f"bad partition {spec!r}; expected START-END:0,1|2,3") from exc
        # A window that ends before it starts cuts no link, so the run would silently be
        # fault-free; an empty group is a typo; a validator in two groups would silently count
        # in the first only (see separates).
        if end <= start:
            raise ValueError(f"partition {spec!r}: its end {end} ms must come after its start")
        if not all(parts):
            raise ValueError(f"partition {spec!r}: a group names no validator")
        seen: set[int] = set()
        for group in parts:
            if seen & group:
                twice = ", ".join(map(str, sorted(seen & group)))
                raise ValueError(f"partition {spec!r}: in more than one group: {twice}")
            seen |= group
        return cls(start, end, parts)

    def separates(self, a: int, b: int, now: float) -> bool:
        if not self.start_ms <= now < self.end_ms:
            return False
        ga = next((i for i, g in enumerate(self.groups) if a in g), -1)
        gb = next((i for i, g in enumerate(self.groups) if b in g), -1)
        return ga != gb


@dataclass(frozen=True)
class Crash:
    """Validator ``node`` stops at ``at_ms`` and, if ``restart_ms`` is set, comes back then."""

    node: int
    at_ms: int
    restart_ms: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Crash:
        """``NODE@AT`` or ``NODE@AT-RESTART`` (milliseconds)."""
        try:
            node, times = spec.split("@")
            if "-" in times:
                at, back = times.split("-")
                crash = cls(int(node), int(at), int(back))
            else:
                crash = cls(int(node), int(times))
        except ValueError as exc:
            raise ValueError(f"bad crash {spec!r}; expected NODE@AT[-RESTART]") from exc
        # A restart before the crash runs first and leaves the validator down for good, the
        # opposite of what was asked for; one at the same moment is no crash at all.
        if crash.restart_ms is not None and crash.restart_ms <= crash.at_ms:
            raise ValueError(f"crash {spec!r}: the restart must come after the crash")
        return crash


@dataclass(frozen=True)
class SimConfig:
    validators: int = 4
    byzantine: int = 0
    strategy: str = "none"
    seed: int = 0
    rounds: int = 50
    drop: float = 0.0
    duplicate: float = 0.0
    delay_ms: float = 20.0
    jitter_ms: float = 10.0
    partitions: tuple[Partition, ...] = ()
    crashes: tuple[Crash, ...] = ()
    base_timeout_ms: int = 400
    idle_block_ms: int = 0
    batch_interval_ms: float = 25.0
    crypto: str = "ed25519"
    max_time_ms: float = 600_000.0
    # Simulated time after the last fault during which commits must resume.
    stabilise_ms: float = 0.0
    # Restart crashed validators without their persisted safety state (a lost disk): shows
    # what the Persist-before-send rule prevents.
    lose_disk_on_restart: bool = False
    # Pass over validators not seen live lately as leaders (CoreConfig.leader_reputation)
    leader_reputation: bool = True
    # (validator, ms): every message to or from the validator takes this much longer (a far
    # site: its votes come last, so it is never in a QC)
    far: tuple[tuple[int, float], ...] = ()
    # CoreConfig.straggler_wait_ms and CoreConfig.leader_failure_cycles
    straggler_wait_ms: int = CoreConfig.straggler_wait_ms
    leader_failure_cycles: int = CoreConfig.leader_failure_cycles

    def __post_init__(self) -> None:
        if self.validators < 1:
            raise ValueError("need at least one validator")
        if not 0 <= self.byzantine <= self.validators:
            raise ValueError("byzantine must be between 0 and the number of validators")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        if self.crypto not in ("ed25519", "mac"):
            raise ValueError("crypto must be ed25519 or mac")
        if not (0 <= self.drop < 1 and 0 <= self.duplicate < 1):
            raise ValueError("drop and duplicate are probabilities below 1")
        n = self.validators
        for node, ms in self.far:
            if not 0 <= node < n:
                raise ValueError(f"far: validator {node} with {ms} ms is not one of these")
            if not (math.isfinite(ms) and ms >= 0):
                raise ValueError(
                    f"far: validator {node} with {ms} ms: the extra delay must be a finite "
                    "number of ms >= 0"
                )
        # A fault on a validator that does not exist would be ignored (or, for a negative
        # index, land on another one), so the run would not test what was asked for.
        for c in self.crashes:
            if not 0 <= c.node < n:
                raise ValueError(
                    f"crash {c.node}@{c.at_ms}: validator {c.node} is not one of the {n} "
                    f"validators 0..{n - 1}"
                )
            if c.at_ms < 0:
                raise ValueError(f"crash {c.node}@{c.at_ms}: the crash time must be >= 0 ms")
        for p in self.partitions:
            unknown = sorted(i for g in p.groups for i in g if not 0 <= i < n)
            if unknown:
                raise ValueError(
                    f"partition {p.start_ms}-{p.end_ms}: not among the {n} validators "
                    f"0..{n - 1}: {', '.join(map(str, unknown))}"
                )


# ---- results -----------------------------------------------------------------------------


@dataclass
class Checker:
    """Agreement across honest validators, and commit progress and latency."""

    honest: frozenset[int]
    by_height: dict[int, bytes] = field(default_factory=dict)
    heights: dict[int, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    last_commit_ms: float = 0.0
    # (time, validator, height) of every honest commit
    log: list[tuple[float, int, int]] = field(default_factory=list)
    # The proposer's key of each committed height
    proposers: dict[int, bytes] = field(default_factory=dict)
    # The most a committed block's timestamp was ahead of the (simulated) time it committed
    stamp_ahead_ms: float = 0.0

    def record(
        self, node: int, block: BlockHeader, now: float, created: dict[bytes, float]
    ) -> None:
        if node not in self.honest:
            return
        expected = self.heights.get(node, 0) + 1
        if block.height != expected:
            self.violations.append(
                f"validator {node} committed height {block.height} after {expected - 1}"
            )
        self.heights[node] = block.height
        self.log.append((now, node, block.height))
        self.stamp_ahead_ms = max(self.stamp_ahead_ms, block.timestamp_ms - now)
        first = self.by_height.setdefault(block.height, block.hash)
        self.proposers.setdefault(block.height, block.proposer)
        if first != block.hash:
            self.violations.append(
                f"fork at height {block.height}: validator {node} committed "
                f"{block.hash.hex()[:12]}, another honest validator {first.hex()[:12]}"
            )
        for d in block.batch_digests:
            if d in created:
                self.latencies.append(now - created[d])
        self.last_commit_ms = now


@dataclass
class SimResult:
    safety: str
    committed_height: int
    max_committed_height: int
    rounds: int
    timeouts: int
    evidence: int
    evidence_kinds: dict[str, int]
    rejected: int
    p50_commit_ms: float | None
    p99_commit_ms: float | None
    messages: int
    sim_time_ms: float
    violations: list[str]
    progress_after_faults: bool
    # Committed blocks each validator proposed, in the last half of the committed heights
    # (who leads once faults are past)
    proposed_late: list[int] = field(default_factory=list)
    # The most a committed block's timestamp was ahead of the time it committed
    stamp_ahead_ms: float = 0.0

    def as_json(self) -> str:
        return json.dumps(self.__dict__)


# ---- the simulation ----------------------------------------------------------------------


@dataclass
class _Node:
    index: int
    personas: list[Core]
    up: bool = True
    epoch: int = 0
    persisted: list[SafetyState] = field(default_factory=list)
    voted: list[Proposal] = field(default_factory=list)
    committed: list[Proposal] = field(default_factory=list)
    seen: list[Message] = field(default_factory=list)


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    node: int = field(compare=False)
    data: Any = field(compare=False, default=None)


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        n = cfg.validators
        self.byzantine = (
            frozenset(range(n - cfg.byzantine, n)) if cfg.strategy != "none" else frozenset()
        )
        self.honest = frozenset(range(n)) - self.byzantine
        honest_sorted = sorted(self.honest)
        half = len(honest_sorted) // 2
        self.group = {i: (0 if k < half else 1) for k, i in enumerate(honest_sorted)}
        self.signers, self.verifier = self._crypto()
        self.validators = ValidatorSet(
            tuple(Validator(f"v{i}", self.signers[i].public_key) for i in range(n))
        )
        self.genesis = genesis_header(hashlib.sha256(f"sim/{cfg.seed}".encode()).digest(), 1)
        self.core_cfg = CoreConfig(
            base_timeout_ms=cfg.base_timeout_ms,
            idle_block_ms=cfg.idle_block_ms,
            leader_reputation=cfg.leader_reputation,
            straggler_wait_ms=cfg.straggler_wait_ms,
            leader_failure_cycles=cfg.leader_failure_cycles,
        )
        self.far = dict(cfg.far)
        personas = 2 if cfg.strategy == "equivocate" else 1
        self.nodes = [
            _Node(
                i,
                [self._core(i) for _ in range(personas if i in self.byzantine else 1)],
            )
            for i in range(n)
        ]
        self.queue: list[_Event] = []
        self.seq = 0
        self.now = 0.0
        self.checker = Checker(self.honest)
        self.created: dict[bytes, float] = {}
        self.batches = 0
        self.evidence: list[Evidence] = []
        self.rejected = 0
        self.messages = 0
        self.timeout_rounds: set[int] = set()

    def _crypto(self) -> tuple[list[Signer], Verifier]:
        n = self.cfg.validators
        if self.cfg.crypto == "ed25519":
            keys = [
                key_from_seed(hashlib.sha256(f"sim-key/{self.cfg.seed}/{i}".encode()).digest())
                for i in range(n)
            ]
            return [Ed25519Signer(k) for k in keys], Ed25519Verifier()
        pubs = [hashlib.sha256(f"sim-pub/{i}".encode()).digest() for i in range(n)]
        secrets = [
            hashlib.sha256(f"sim-secret/{self.cfg.seed}/{i}".encode()).digest() for i in range(n)
        ]
        signers: list[Signer] = [MacSigner(p, s) for p, s in zip(pubs, secrets, strict=True)]
        return signers, MacVerifier(dict(zip(pubs, secrets, strict=True)))

    def _core(
        self,
        i: int,
        persisted: SafetyState | None = None,
        head: BlockHeader | None = None,
        known: list[Proposal] | None = None,
    ) -> Core:
        return Core(
            known_blocks=known or (),
            validators=self.validators,
            index=i,
            signer=self.signers[i],
            verifier=self.verifier,
            genesis=self.genesis,
            config=self.core_cfg,
            persisted=persisted,
            committed_head=head,
        )

    # ---- scheduling --------------------------------------------------------------------

    def _at(self, time: float, kind: str, node: int, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.queue, _Event(time, self.seq, kind, node, data))

    def _delay(self) -> float:
        return max(0.5, self.rng.gauss(self.cfg.delay_ms, self.cfg.jitter_ms))

    def _send(self, src: int, dst: int, msg: Message, persona: int, late_ms: float = 0.0) -> None:
        if src == dst:
            return
        if any(p.separates(src, dst, self.now) for p in self.cfg.partitions):
            return
        if self.rng.random() < self.cfg.drop:
            return
        self.messages += 1
        copies = 2 if self.rng.random() < self.cfg.duplicate else 1
        far = self.far.get(src, 0.0) + self.far.get(dst, 0.0) if self.far else 0.0
        for _ in range(copies):
            self._at(self.now + self._delay() + far + late_ms, "deliver", dst, (msg, src, persona))

    # ---- running -----------------------------------------------------------------------

    def run(self) -> SimResult:
        for node in self.nodes:
            for p, core in enumerate(node.personas):
                core.tick(self._clock(node, 0))
                self._execute(node, p, core.start())
        for crash in self.cfg.crashes:
            self._at(crash.at_ms, "crash", crash.node)
            if crash.restart_ms is not None:
                self._at(crash.restart_ms, "restart", crash.node)
        self._at(0.0, "batch", 0)
        last_fault = max(
            [p.end_ms for p in self.cfg.partitions]
            + [c.restart_ms or c.at_ms for c in self.cfg.crashes]
            + [0.0]
        )
        while self.queue:
            ev = heapq.heappop(self.queue)
            if ev.time > self.cfg.max_time_ms:
                break
            self.now = ev.time
            self._handle(ev)
            if self._done(last_fault):
                break
        return self._result(last_fault)

    def _max_round(self) -> int:
        return max(
            (n.personas[0].round for n in self.nodes if n.index in self.honest and n.up), default=0
        )

    def _done(self, last_fault: float) -> bool:
        if self._max_round() < self.cfg.rounds:
            return False
        return self.now >= last_fault + self.cfg.stabilise_ms

    def _handle(self, ev: _Event) -> None:
        node = self.nodes[ev.node]
        match ev.kind:
            case "batch":
                self._new_batch()
            case "batch_ready":
                digest, epoch = ev.data
                if node.up and node.epoch == epoch:
                    for p, core in enumerate(node.personas):
                        self._execute(node, p, core.on_batch_available(digest))
            case "deliver":
                msg, src, src_persona = ev.data
                if not node.up:
                    return
                if ev.node in self.byzantine and self.cfg.strategy == "stale-replayer":
                    node.seen.append(msg)
                for p in self._route(node, src, src_persona):
                    core = node.personas[p]
                    core.tick(self._clock(node, p))
                    self._execute(node, p, core.on_messages([msg]))
            case "timer":
                round_, epoch, p, purpose = ev.data
                if node.up and node.epoch == epoch:
                    core = node.personas[p]
                    core.tick(self._clock(node, p))
                    fire = core.on_propose_timer if purpose == "propose" else core.on_local_timeout
                    self._execute(node, p, fire(round_))
                    if ev.node in self.byzantine and self.cfg.strategy == "stale-replayer":
                        self._replay(node)
            case "crash":
                node.up = False
                node.epoch += 1
            case "restart":
                self._restart(node)

    def _clock(self, node: _Node, persona: int) -> int:
        """A validator's clock: the simulated time (plus the persona's index, so that an
        equivocator's personas stamp different blocks), an hour ahead for a fast clock."""
        fast = node.index in self.byzantine and self.cfg.strategy == "fast-clock"
        return int(self.now) + persona + (FAST_CLOCK_MS if fast else 0)

    def _route(self, node: _Node, src: int, src_persona: int) -> list[int]:
        """Which personas of ``node`` hear a message from ``src``: an equivocator's personas
        hear every honest validator, and only their own side of their accomplices."""
        if len(node.personas) == 1:
            return [0]
        return [src_persona] if src in self.byzantine else list(range(len(node.personas)))

    def _new_batch(self) -> None:
        self.batches += 1
        digest = hashlib.sha256(f"batch/{self.cfg.seed}/{self.batches}".encode()).digest()
        self.created[digest] = self.now
        origin = self.rng.randrange(self.cfg.validators)
        for node in self.nodes:
            delay = 0.0 if node.index == origin else self._delay()
            self._at(self.now + delay, "batch_ready", node.index, (digest, node.epoch))
        self._at(self.now + self.cfg.batch_interval_ms, "batch", 0)

    def _restart(self, node: _Node) -> None:
        node.up = True
        node.epoch += 1
        if self.cfg.lose_disk_on_restart:
            node.persisted.clear()
            node.voted.clear()
            node.committed.clear()
            self.checker.heights.pop(node.index, None)
        persisted = node.persisted[-1] if node.persisted else None
        head = node.committed[-1].block if node.committed else None
        known = node.committed[-self.core_cfg.committed_window :] + node.voted
        node.personas = [self._core(node.index, persisted, head, known) for _ in node.personas]
        # Its mempool survived on disk: it re-announces the batches it has not seen committed.
        done = {d for p in node.committed for d in p.block.batch_digests}
        pending = [d for d in self.created if d not in done]
        for p, core in enumerate(node.personas):
            core.tick(self._clock(node, 0))
            self._execute(node, p, core.start())
            for digest in pending:
                self._execute(node, p, core.on_batch_available(digest))

    def _replay(self, node: _Node) -> None:
        for msg in self.rng.sample(node.seen, min(3, len(node.seen))):
            for dst in range(self.cfg.validators):
                self._send(node.index, dst, msg, 0)

    # ---- actions -----------------------------------------------------------------------

    def _execute(self, node: _Node, persona: int, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Persist(state=state, proposal=proposal):
                    node.persisted.append(state)
                    del node.persisted[:-1]
                    if proposal is not None:
                        node.voted.append(proposal)
                case Broadcast(message=msg):
                    for dst in range(self.cfg.validators):
                        self._emit(node, persona, dst, msg, broadcast=True)
                case Send(to=to, message=msg):
                    self._emit(node, persona, to, msg, broadcast=False)
                case SetTimer(round=round_, delay_ms=delay, purpose=purpose):
                    self._at(
                        self.now + delay,
                        "timer",
                        node.index,
                        (round_, node.epoch, persona, purpose),
                    )
                case Commit(blocks=blocks):
                    if persona == 0:
                        node.committed.extend(blocks)
                        top = blocks[-1].block.height
                        node.voted = [p for p in node.voted if p.block.height > top]
                        for p in blocks:
                            self.checker.record(node.index, p.block, self.now, self.created)
                case FetchBatches(digests=digests):
                    for d in digests:
                        if d in self.created:
                            self._at(
                                self.now + 2 * self._delay(),
                                "batch_ready",
                                node.index,
                                (d, node.epoch),
                            )
                case Evidence():
                    if node.index in self.honest:
                        self.evidence.append(action)
                case Rejected():
                    if node.index in self.honest:
                        self.rejected += 1

    def _emit(self, node: _Node, persona: int, dst: int, msg: Message, broadcast: bool) -> None:
        """Send one message, applying the node's Byzantine strategy if it has one."""
        if isinstance(msg, TimeoutMsg) and node.index in self.honest:
            self.timeout_rounds.add(msg.round)
        if node.index not in self.byzantine:
            self._send(node.index, dst, msg, persona)
            return
        strategy = self.cfg.strategy
        if strategy == "silent":
            return
        if strategy == "vote-withholder" and isinstance(msg, Vote):
            return
        if strategy == "lazy-leader" and isinstance(msg, Proposal):
            return
        if strategy == "slow-leader" and isinstance(msg, Proposal):
            self._send(node.index, dst, msg, persona, late_ms=0.75 * self.cfg.base_timeout_ms)
            return
        if strategy == "invalid-signature":
            msg = corrupt_signature(msg)
        next_leader = -1
        if isinstance(msg, Proposal):
            next_leader = node.personas[persona].leader(msg.round + 1)
        # Each persona shows its face to one half; its proposals also reach the next leader
        if (
            strategy == "equivocate"
            and broadcast
            and dst in self.honest
            and self.group[dst] != persona
            and dst != next_leader
        ):
            return
        if (
            strategy == "equivocating-leader"
            and isinstance(msg, Proposal)
            and broadcast
            and (dst == next_leader or (dst in self.honest and self.group[dst] == 1))
        ):
            self._send(node.index, dst, conflicting_proposal(node.personas[0], msg), persona)
            if dst != next_leader:
                return
        self._send(node.index, dst, msg, persona)
        if strategy == "double-voter" and isinstance(msg, Vote):
            self._send(node.index, dst, double_vote(node.personas[persona], msg), persona)

    def _result(self, last_fault: float) -> SimResult:
        live = [n for n in self.nodes if n.index in self.honest and n.up]
        heights = [len(n.committed) for n in live] or [0]
        lat = sorted(self.checker.latencies)

        def pct(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)], 1)

        proposed = [0] * self.cfg.validators
        top = max(self.checker.proposers, default=0)
        for height, key in self.checker.proposers.items():
            if height > top // 2:
                proposed[self.validators.index_of(key)] += 1
        kinds: dict[str, int] = {}
        for e in self.evidence:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return SimResult(
            safety="violated" if self.checker.violations else "ok",
            committed_height=min(heights),
            max_committed_height=max(heights),
            rounds=self._max_round(),
            timeouts=len(self.timeout_rounds),
            evidence=len(self.evidence),
            evidence_kinds=kinds,
            rejected=self.rejected,
            p50_commit_ms=pct(0.5),
            p99_commit_ms=pct(0.99),
            messages=self.messages,
            sim_time_ms=round(self.now, 1),
            violations=self.checker.violations[:10],
            progress_after_faults=self.checker.last_commit_ms > last_fault,
            proposed_late=proposed,
            stamp_ahead_ms=round(self.checker.stamp_ahead_ms, 1),
        )


def simulate(cfg: SimConfig) -> SimResult:
    return Simulation(cfg).run()
