"""An in-memory network of consensus cores for unit tests: no Ray, no threads, no clock.

``Keyring`` holds the validator keys and builds hand-made, validly signed messages and
certificates; ``Net`` wires n ``Core`` objects together, queues what they Broadcast or Send,
delivers it when told to (in order, or in any order a test picks), fires timers only when told
to, records every Persist, Commit, Evidence, Rejected and FetchBatches per validator, and
rebuilds a validator from what its adapter stored, as after a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayledger.block import BlockHeader, QuorumCert, genesis_header, make_bitmap, vote_message
from rayledger.config import Validator, ValidatorSet
from rayledger.consensus import (
    Action,
    Broadcast,
    Commit,
    Core,
    CoreConfig,
    DigestBuilder,
    Evidence,
    FetchBatches,
    Message,
    Persist,
    Proposal,
    Rejected,
    SafetyState,
    Send,
    SetTimer,
    SyncRequest,
    TimeoutCert,
    TimeoutMsg,
    Vote,
)
from rayledger.consensus.messages import (
    proposal_message,
    sync_request_message,
    timeout_message,
)
from rayledger.consensus.sim import MacSigner, MacVerifier
from rayledger.consensus.wire import (
    decode_messages,
    decode_safety,
    encode_messages,
    encode_safety,
)
from rayledger.crypto import Ed25519Signer, Ed25519Verifier, Signer, Verifier, key_from_seed

GENESIS_MS = 1_000


def digest(label: str) -> bytes:
    """A batch digest named by a label."""
    return hashlib.sha256(f"batch/{label}".encode()).digest()


def flip(sig: bytes) -> bytes:
    """The same signature with its first byte corrupted."""
    return bytes([sig[0] ^ 0x01]) + sig[1:]


@dataclass
class Keyring:
    """Validator keys of one test chain, and constructors for signed consensus messages."""

    signers: list[Signer]
    verifier: Verifier
    validators: ValidatorSet
    genesis: BlockHeader
    config: CoreConfig = field(default_factory=CoreConfig)

    @classmethod
    def make(cls, n: int = 4, crypto: str = "ed25519", chain: str = "core-test") -> Keyring:
        signers: list[Signer]
        verifier: Verifier
        if crypto == "ed25519":
            signers = [
                Ed25519Signer(key_from_seed(hashlib.sha256(f"{chain}/key/{i}".encode()).digest()))
                for i in range(n)
            ]
            verifier = Ed25519Verifier("cpu")
        else:
            pubs = [hashlib.sha256(f"{chain}/pub/{i}".encode()).digest() for i in range(n)]
            secrets = [hashlib.sha256(f"{chain}/secret/{i}".encode()).digest() for i in range(n)]
            signers = [MacSigner(p, s) for p, s in zip(pubs, secrets, strict=True)]
            verifier = MacVerifier(dict(zip(pubs, secrets, strict=True)))
        vs = ValidatorSet(tuple(Validator(f"v{i}", s.public_key) for i, s in enumerate(signers)))
        chain_id = hashlib.sha256(f"{chain}/chain".encode()).digest()
        return cls(signers, verifier, vs, genesis_header(chain_id, GENESIS_MS))

    @property
    def n(self) -> int:
        return self.validators.n

    @property
    def chain_id(self) -> bytes:
        return self.genesis.chain_id

    @property
    def genesis_qc(self) -> QuorumCert:
        return QuorumCert.genesis(self.genesis.hash)

    def leader(self, round_: int) -> int:
        return round_ % self.n

    def core(
        self,
        index: int,
        persisted: SafetyState | None = None,
        committed_head: BlockHeader | None = None,
        known_blocks: Sequence[Proposal] = (),
        builder: Any = None,
    ) -> Core:
        return Core(
            validators=self.validators,
            index=index,
            signer=self.signers[index],
            verifier=self.verifier,
            genesis=self.genesis,
            builder=builder,
            config=self.config,
            persisted=persisted,
            committed_head=committed_head,
            known_blocks=known_blocks,
        )

    # ---- hand-made messages ------------------------------------------------------------------

    def block(
        self,
        parent: BlockHeader,
        round_: int,
        *,
        proposer: int | None = None,
        digests: Sequence[bytes] = (),
        timestamp_ms: int | None = None,
    ) -> BlockHeader:
        """The block ``DigestBuilder`` makes for the round's leader (or ``proposer``)."""
        who = self.leader(round_) if proposer is None else proposer
        ts = parent.timestamp_ms + round_ if timestamp_ms is None else timestamp_ms
        return DigestBuilder().build(
            parent, round_, self.signers[who].public_key, ts, tuple(digests)
        )

    def propose(
        self,
        block: BlockHeader,
        qc: QuorumCert,
        tc: TimeoutCert | None = None,
        *,
        signer: int | None = None,
    ) -> Proposal:
        """``block`` signed by its proposer (or by validator ``signer``)."""
        who = self.validators.index_of(block.proposer) if signer is None else signer
        sig = self.signers[who].sign(proposal_message(self.chain_id, block.hash))
        return Proposal(block, qc, tc, sig)

    def vote(self, voter: int, block_hash: bytes, round_: int) -> Vote:
        sig = self.signers[voter].sign(vote_message(self.chain_id, block_hash, round_))
        return Vote(block_hash, round_, voter, sig)

    def qc(self, block: BlockHeader, signers: Iterable[int] = (0, 1, 2)) -> QuorumCert:
        """A QC for ``block`` in its round, signed by ``signers``."""
        idx = sorted(signers)
        sigs = tuple(self.vote(i, block.hash, block.round).signature for i in idx)
        return QuorumCert(block.hash, block.round, make_bitmap(idx, self.n), sigs)

    def timeout(
        self,
        sender: int,
        round_: int,
        high_qc: QuorumCert,
        last_tc: TimeoutCert | None = None,
    ) -> TimeoutMsg:
        sig = self.signers[sender].sign(timeout_message(self.chain_id, round_, high_qc.round))
        return TimeoutMsg(round_, high_qc, sender, sig, last_tc)

    def sync_request(
        self, requester: int, block_hash: bytes, from_height: int, round_: int = 1, nonce: int = 1
    ) -> SyncRequest:
        message = sync_request_message(
            self.chain_id, block_hash, requester, from_height, round_, nonce
        )
        sig = self.signers[requester].sign(message)
        return SyncRequest(block_hash, requester, from_height, round_, nonce, sig)

    def tc(
        self, round_: int, high_qc_rounds: dict[int, int], high_qc: QuorumCert | None = None
    ) -> TimeoutCert:
        """A TC for ``round_``: validator i signed a timeout with high QC round
        ``high_qc_rounds[i]``; it carries ``high_qc`` (default: the QC of the block of the
        highest of those rounds on the chain ``chain`` builds, or genesis's)."""
        idx = sorted(high_qc_rounds)
        sigs = tuple(
            self.signers[i].sign(timeout_message(self.chain_id, round_, high_qc_rounds[i]))
            for i in idx
        )
        if high_qc is None:
            top = max(high_qc_rounds.values())
            high_qc = self.qc(self.chain(top)[-1].block) if top else self.genesis_qc
        rounds = tuple(high_qc_rounds[i] for i in idx)
        return TimeoutCert(round_, make_bitmap(idx, self.n), rounds, sigs, high_qc)

    def chain(
        self, rounds: int, digests: dict[int, Sequence[bytes]] | None = None
    ) -> list[Proposal]:
        """Proposals of rounds 1..rounds, each extending the previous one with its QC."""
        out: list[Proposal] = []
        parent, qc = self.genesis, self.genesis_qc
        for r in range(1, rounds + 1):
            block = self.block(parent, r, digests=(digests or {}).get(r, ()))
            out.append(self.propose(block, qc))
            parent, qc = block, self.qc(block)
        return out


# ---- action helpers -----------------------------------------------------------------------


def of_type(actions: Iterable[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: Iterable[Action], kind: type) -> list[tuple[int | None, Any]]:
    """``(to, message)`` of every Send (``to``) and Broadcast (``None``) of a ``kind`` message."""
    out: list[tuple[int | None, Any]] = []
    for a in actions:
        if isinstance(a, Send) and isinstance(a.message, kind):
            out.append((a.to, a.message))
        elif isinstance(a, Broadcast) and isinstance(a.message, kind):
            out.append((None, a.message))
    return out


def persist_guard_violations(trace: Sequence[tuple[int, Sequence[Action]]]) -> list[str]:
    """Check the write-ahead rule over a trace of ``(validator, action list)``.

    A Vote must follow a Persist of the same action list whose highest_vote_round is the
    vote's round and whose proposal is the block voted for. The first sending of a TimeoutMsg
    must follow a Persist of the same list whose highest_vote_round is its round and whose
    high_qc is the one it carries; a TimeoutMsg sent again without one must be identical to one
    that validator sent before (a retransmission).
    """
    problems: list[str] = []
    sent_before: dict[int, set[TimeoutMsg]] = {}
    for node, actions in trace:
        persist: Persist | None = None
        for pos, a in enumerate(actions):
            if isinstance(a, Persist):
                persist = a
                continue
            msg = a.message if isinstance(a, Send | Broadcast) else None
            if not isinstance(msg, Vote | TimeoutMsg):
                continue
            seen = sent_before.setdefault(node, set())
            if isinstance(msg, TimeoutMsg) and msg in seen:
                continue
            where = f"v{node} action {pos}: {type(msg).__name__} of round {msg.round}"
            if persist is None or persist.state.highest_vote_round != msg.round:
                problems.append(f"{where} after {persist}")
            elif isinstance(msg, Vote) and (
                persist.proposal is None or persist.proposal.block.hash != msg.block_hash
            ):
                problems.append(f"{where}: the block voted for was not persisted")
            elif isinstance(msg, TimeoutMsg):
                if persist.state.high_qc != msg.high_qc:
                    problems.append(f"{where}: its high_qc was not persisted")
                seen.add(msg)
    return problems


# ---- the network --------------------------------------------------------------------------


@dataclass
class Envelope:
    src: int
    dst: int
    message: Message


class Net:
    """n cores and the messages between them. Nothing moves unless a test says so."""

    def __init__(self, keys: Keyring, cores: list[Core] | None = None) -> None:
        self.keys = keys
        self.cores = cores or [keys.core(i) for i in range(keys.n)]
        n = len(self.cores)
        self.queue: list[Envelope] = []
        self.isolated: set[int] = set()
        self.persisted: list[SafetyState | None] = [None] * n
        # What each validator's adapter keeps on disk: voted and committed proposals
        self.stored: list[dict[bytes, Proposal]] = [{} for _ in range(n)]
        self.committed: list[list[Proposal]] = [[] for _ in range(n)]
        self.commits: list[list[Commit]] = [[] for _ in range(n)]
        self.evidence: list[list[Evidence]] = [[] for _ in range(n)]
        self.rejected: list[list[Rejected]] = [[] for _ in range(n)]
        self.fetches: list[list[FetchBatches]] = [[] for _ in range(n)]
        self._fetches_taken = [0] * n
        self.known_batches: set[bytes] = set()
        self.late: list[tuple[int, bytes]] = []  # batches some validator still waits for
        self.timers: list[set[int]] = [set() for _ in range(n)]
        self.trace: list[tuple[int, list[Action]]] = []
        self.delivered: list[Envelope] = []
        self.proposals: dict[bytes, Proposal] = {}

    # ---- executing a core's actions ----------------------------------------------------------

    def execute(self, i: int, actions: list[Action]) -> list[Action]:
        self.trace.append((i, actions))
        for a in actions:
            match a:
                case Persist(state=state, proposal=proposal):
                    assert decode_safety(encode_safety(state)) == state
                    self.persisted[i] = state
                    if proposal is not None:
                        self.stored[i][proposal.block.hash] = proposal
                case Broadcast(message=msg):
                    for dst in range(len(self.cores)):
                        if dst != i:
                            self._post(i, dst, msg)
                case Send(to=to, message=msg):
                    self._post(i, to, msg)
                case SetTimer(round=r):
                    self.timers[i].add(r)
                case Commit(blocks=blocks, child=child, commit_qc=cqc):
                    # The commit proof a receipt carries: the child in the next round, certified
                    top = blocks[-1].block
                    assert child.parent_hash == top.hash and child.round == top.round + 1
                    assert cqc.block_hash == child.hash and cqc.round == child.round
                    self.commits[i].append(a)
                    self.committed[i].extend(blocks)
                    self.stored[i].update((p.block.hash, p) for p in blocks)
                case Evidence():
                    self.evidence[i].append(a)
                case Rejected():
                    self.rejected[i].append(a)
                case FetchBatches():
                    self.fetches[i].append(a)
            if isinstance(a, Broadcast | Send) and isinstance(a.message, Proposal):
                self.proposals[a.message.block.hash] = a.message
        return actions

    def _post(self, src: int, dst: int, msg: Message) -> None:
        if src in self.isolated or dst in self.isolated:
            return
        # Every message crosses the canonical wire form, as between real validators
        wired = decode_messages(encode_messages([msg]))
        assert wired == [msg], f"wire form changed {type(msg).__name__}"
        self.queue.append(Envelope(src, dst, wired[0]))

    # ---- driving -----------------------------------------------------------------------------

    def start(self, nodes: Iterable[int] | None = None) -> None:
        for i in range(len(self.cores)) if nodes is None else nodes:
            self.execute(i, self.cores[i].start())

    def restart(self, i: int) -> list[Action]:
        """Rebuild validator i from what its adapter stored (the last persisted safety state,
        the committed head, the voted and committed proposals) and start it."""
        head = self.committed[i][-1].block if self.committed[i] else None
        self.cores[i] = self.keys.core(i, self.persisted[i], head, list(self.stored[i].values()))
        self.timers[i].clear()
        return self.execute(i, self.cores[i].start())

    def deliver(self, env: Envelope) -> list[Action]:
        self.delivered.append(env)
        return self.execute(env.dst, self.cores[env.dst].on_messages([env.message]))

    def fire(self, i: int, round_: int | None = None) -> list[Action]:
        """Fire validator i's timer for ``round_`` (default: its current round)."""
        r = self.cores[i].round if round_ is None else round_
        self.timers[i].discard(r)
        return self.execute(i, self.cores[i].on_local_timeout(r))

    def batch(self, d: bytes, nodes: Iterable[int] | None = None) -> None:
        """Batch ``d`` becomes available at ``nodes`` (default: every validator)."""
        self.known_batches.add(d)
        for i in range(len(self.cores)) if nodes is None else nodes:
            self.execute(i, self.cores[i].on_batch_available(d))

    def take_fetches(self) -> list[tuple[int, bytes]]:
        """``(validator, digest)`` of every FetchBatches not taken before."""
        out: list[tuple[int, bytes]] = []
        for i, fetches in enumerate(self.fetches):
            out += [(i, d) for f in fetches[self._fetches_taken[i] :] for d in f.digests]
            self._fetches_taken[i] = len(fetches)
        return out

    def serve_fetches(self) -> bool:
        """Hand every requested batch that exists to its requester; ``True`` if any."""
        wanted = [(i, d) for i, d in self.take_fetches() if d in self.known_batches]
        for i, d in wanted:
            self.execute(i, self.cores[i].on_batch_available(d))
        return bool(wanted)

    def run(
        self,
        until: Callable[[], bool],
        *,
        max_steps: int = 5_000,
        timeouts: bool = True,
        select: Callable[[Envelope], bool] | None = None,
    ) -> None:
        """Deliver queued messages in order (and fetched batches) until ``until()``; when
        nothing is left to deliver, fire the current-round timer of every connected validator."""
        for _ in range(max_steps):
            if until():
                return
            if self.queue:
                env = self.queue.pop(0)
                cut = env.src in self.isolated or env.dst in self.isolated
                if not cut and (select is None or select(env)):
                    self.deliver(env)
            elif self.serve_fetches():
                continue
            elif timeouts:
                for i in range(len(self.cores)):
                    if i not in self.isolated:
                        self.fire(i)
            else:
                break
        assert until(), "the network stopped before the condition held"

    def heights(self) -> list[int]:
        return [c.committed.height for c in self.cores]


# Configuration, and caches of what was already checked (certificates, proposals kept as
# evidence): a rejected input may leave traces there.
_NOT_STATE = frozenset(
    {"vs", "signer", "verifier", "builder", "leaders", "cfg", "genesis", "_out"}
    | {"verified_certs", "qcs", "proposal_at", "_windows", "_seen_cache"}
)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def snapshot(core: Core) -> dict[str, Any]:
    """Everything a core holds except its configuration and its caches: what a rejected or
    stale input must leave untouched."""
    return {k: _copy(v) for k, v in vars(core).items() if k not in _NOT_STATE}


__all__ = [
    "GENESIS_MS",
    "Envelope",
    "Keyring",
    "Net",
    "digest",
    "flip",
    "of_type",
    "persist_guard_violations",
    "sent",
    "snapshot",
]
