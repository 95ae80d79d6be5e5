"""The consensus state machine of one validator: two-chain HotStuff (Jolteon / DiemBFT v4).

This file owns the round state and is the only code that changes it. It does no I/O and
reads no clock: events come in through the ``on_*`` methods (and ``tick`` for the time used in
block timestamps), and each returns the actions the adapter must carry out, in order. A
``Persist`` action must be durable before any later action of the same list is executed: that
is how a vote or timeout never leaves before the safety state that guards it.

Contract of every entry point: it may be called with stale, duplicated, reordered or hostile
input; it verifies signatures (in one batch per call, through the ``Verifier``) before acting,
drops what is stale, reports what is invalid as ``Rejected``, and never raises on bad input.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rayledger.block import BlockHeader, QuorumCert, make_bitmap, vote_message
from rayledger.codec import var_bytes
from rayledger.config import ValidatorSet
from rayledger.consensus.messages import (
    Action,
    AskBacklog,
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
    SyncRequest,
    SyncResponse,
    TimeoutCert,
    TimeoutMsg,
    Vote,
    bitmap_indices,
    proposal_message,
    sync_request_message,
    timeout_message,
)
from rayledger.crypto import Signer, Verifier
from rayledger.errors import LedgerError
from rayledger.merkle import EMPTY_ROOT, merkle_root


class LeaderElection(Protocol):
    def leader(self, round_: int) -> int: ...


@dataclass(frozen=True)
class RoundRobin:
    n: int

    def leader(self, round_: int) -> int:
        return round_ % self.n


class BlockBuilder(Protocol):
    """Fills in a proposed block's payload fields, and checks them in others' proposals.

    Both must be deterministic functions of their arguments and the batches they name.
    """

    def build(
        self,
        parent: BlockHeader,
        round_: int,
        proposer: bytes,
        timestamp_ms: int,
        digests: tuple[bytes, ...],
        may_wait: Callable[[bytes, int], bool] | None = None,
    ) -> BlockHeader:
        """``may_wait`` (a leader's proposal only): a builder that knows a batch would fail
        for want of one not yet ordered may leave it out if ``may_wait(digest, found_ms)``
        says so, ``found_ms`` being when this builder first found what the batch lacks; the
        header names the batches taken."""
        ...

    def check(self, block: BlockHeader, parent: BlockHeader) -> str | None:
        """``None`` if the payload fields are right, else the reason they are not."""
        ...


class DigestBuilder:
    """Payload commitment by batch digests alone: ``tx_root`` is the RFC 6962 root over the
    digests and ``state_root`` chains them. Used where no executor is attached (simulation)."""

    def build(
        self,
        parent: BlockHeader,
        round_: int,
        proposer: bytes,
        timestamp_ms: int,
        digests: tuple[bytes, ...],
        may_wait: Callable[[bytes, int], bool] | None = None,
    ) -> BlockHeader:
        tx_root = merkle_root(list(digests))
        return BlockHeader(
            chain_id=parent.chain_id,
            height=parent.height + 1,
            round=round_,
            parent_hash=parent.hash,
            proposer=proposer,
            timestamp_ms=timestamp_ms,
            tx_count=len(digests),
            tx_root=tx_root,
            result_root=EMPTY_ROOT,
            state_root=hashlib.sha256(parent.state_root + tx_root).digest(),
            batch_digests=digests,
        )

    def check(self, block: BlockHeader, parent: BlockHeader) -> str | None:
        expected = self.build(
            parent, block.round, block.proposer, block.timestamp_ms, block.batch_digests
        )
        return None if expected == block else "payload fields do not match the batch digests"


@dataclass(frozen=True)
class CoreConfig:
    base_timeout_ms: int = 1000
    max_timeout_ms: int = 60_000
    timeout_backoff: float = 1.5
    max_batches_per_block: int = 64
    # Committed blocks kept in memory to serve peers that lag by less than this.
    committed_window: int = 4096
    sync_batch: int = 64
    # A sync request is answered with up to this many responses of ``sync_batch`` blocks
    # each, the lowest first, so that a validator far behind gets ``sync_batch`` x this many
    # blocks a round trip, and asks for the next ones as soon as the first response comes
    sync_responses: int = 8
    # Rounds of votes/timeouts/proposals remembered for equivocation evidence.
    evidence_window: int = 64
    # With nothing to order and nothing uncommitted to finish or to announce, a leader waits
    # this long for a batch before proposing an empty block (0: propose at once). Keep it well
    # below the round timeout. It turns an idle network's stream of empty blocks into a slow
    # heartbeat.
    idle_block_ms: int = 0
    # A leader leaves out a batch whose rows would fail for want of an earlier one not yet
    # ordered (a sender's later nonces ahead of its earlier ones: the batch before them was
    # cut off by a partition, or went through another mempool) for at most this long after
    # the batch became available here, and after the leader first found what it lacks (a
    # sender's missing nonce, waited for once, not for each batch behind it), so that the
    # earlier batch can be ordered first (0: never). Only a builder that executes can tell
    # (``BlockBuilder.build``'s ``may_wait``). A wait past a quarter of this asks the
    # batch's mempool to send its backlog again (``AskBacklog``).
    gap_wait_ms: int = 3000
    # Leader reputation (``Core.leader``): a validator that neither proposed a committed block
    # nor signed a certificate one carries, over the n rounds that end 3 rounds before a
    # round, is passed over as that round's leader. Without it, a crashed validator of four
    # costs two round timeouts in every four rounds for as long as it is down (its own round,
    # and the one before, whose votes go to it): in a 30 s `bench e2e --down 1` here, 1,367
    # committed tx/s and p50 2.4 s, against some 7,000 tx/s and 0.5 s with all four up.
    leader_reputation: bool = True
    # A leader holding a fresh QC waits at most this long (and at most a quarter of the base
    # round timeout) for the vote of a validator that leader reputation passes over, when that
    # validator's votes reached it lately, but after its QC was formed: a live validator
    # always the last to vote (a far site) is never in a QC, so once its own turn failed (a
    # restart, a blip) it would never lead again. Its vote in one committed QC brings it back.
    # A crashed validator sends no votes, so nobody waits for it. 0: never wait. A voter
    # later than this (a far site: its vote comes a round trip to it after the quorum's) is
    # waited for too, but at most once in ``leader_failure_cycles`` x n rounds per leader and
    # for at most half the base round timeout (``_await_straggler``).
    straggler_wait_ms: int = 150
    # Leader reputation also passes over, for this many times n rounds, a validator that
    # failed as a round's leader: no block of that round was committed. A validator that
    # votes but never proposes (a Byzantine one, or one whose proposals never get through)
    # is seen live, yet costs two round timeouts at each of its turns (its own round, and the
    # one before, whose QC only it holds): in `rayledger simulate --rounds 300 --byzantine 1
    # --strategy lazy-leader`, 150 of 300 rounds timed out. Now it fails once per window:
    # 12 seeds of that gave 1,800 round timeouts without, 216 with 8 cycles, 120 with 16, 72
    # with 32; with 5% of messages dropped (n = 4), 210 / 203 / 198 / 228, and with 10%
    # (n = 10), 765 / 913 / 828 / 828 (honest validators passed over after a failed turn).
    # 0: only validators not seen live are passed over.
    leader_failure_cycles: int = 16
    # A validator does not vote for a block stamped more than this far ahead of its own
    # clock (``tick``). The block still joins its tree, and is committed as any other once
    # others certified it (a clock behind theirs must not stall it). Before, a leader could
    # stamp its block a year ahead, and every block after it would carry its parent's time
    # plus 1 ms until the clocks caught up (a block's time must follow its parent's), so
    # receipts would show that year. This bounds how far ahead of real time a Byzantine
    # leader can stamp a block; it must exceed the clock skew between honest validators.
    max_clock_ahead_ms: int = 1000


@dataclass(frozen=True)
class CoreStatus:
    index: int
    round: int
    highest_vote_round: int
    highest_qc_round: int
    high_qc_round: int
    committed_height: int
    committed_hash: bytes
    leader: int
    # Rounds this core entered through a timeout certificate since it started: rounds whose
    # leader got no block certified in time (down, partitioned, slow, or Byzantine)
    rounds_by_timeout: int = 0


_Item = tuple[int, bytes, bytes]  # (validator index, 32-byte message, 64-byte signature)

# A sync request is served within this many rounds of its own; at most this many served
# requests of one requester are remembered (the oldest forgotten first)
SYNC_ROUNDS = 256
SYNC_SERVED_KEEP = 4096


class Core:
    """One validator's consensus state. Not thread-safe: one event at a time."""

    def __init__(
        self,
        *,
        validators: ValidatorSet,
        index: int,
        signer: Signer,
        verifier: Verifier,
        genesis: BlockHeader,
        builder: BlockBuilder | None = None,
        leaders: LeaderElection | None = None,
        config: CoreConfig | None = None,
        persisted: SafetyState | None = None,
        committed_head: BlockHeader | None = None,
        known_blocks: Sequence[Proposal] = (),
    ) -> None:
        """``persisted``, ``committed_head`` and ``known_blocks`` rebuild a restarted validator:
        its last persisted safety state, its last committed block, and the proposals it stored
        (recent committed ones, to serve lagging peers, and the uncommitted ones it voted for).
        """
        if signer.public_key != validators.validators[index].public_key:
            raise ValueError(f"signer key is not the key of validator {index}")
        self.vs = validators
        self.index = index
        self.chain_id = genesis.chain_id
        self.genesis = genesis
        self.signer = signer
        self.verifier = verifier
        self.builder = builder or DigestBuilder()
        self.leaders = leaders or RoundRobin(validators.n)
        self.cfg = config or CoreConfig()
        self.now_ms = genesis.timestamp_ms

        state = persisted or SafetyState()
        self.highest_vote_round = state.highest_vote_round
        self.highest_qc_round = state.highest_qc_round
        self.high_qc = state.high_qc or QuorumCert.genesis(genesis.hash)
        self.last_tc = state.last_tc
        self.round = 0
        self.timeouts_in_row = 0
        self.rounds_by_timeout = 0

        head = committed_head or genesis
        self.committed = head
        self.committed_log: dict[int, Proposal] = {}
        self.committed_hashes: dict[bytes, BlockHeader] = {head.hash: head}
        # Digests committed in the last ``committed_window`` heights -> height. Older repeats
        # are not refused here; execution gives their rows BAD_NONCE.
        self.committed_digests: dict[bytes, int] = {}
        self.tree: dict[bytes, Proposal] = {}
        self.qcs: dict[bytes, QuorumCert] = {}
        # Held batches in arrival order, with the time each became available: leaders propose
        # the oldest first (latency), sources taking turns (``_in_turn``: fairness), and let
        # one wait for a gap (``_may_wait``)
        self.available: dict[bytes, int] = {}
        # Where each came from (its mempool, for the adapter): sources take turns in a block
        self.sources: dict[bytes, int] = {}
        # When each mempool was last asked for its backlog (``_may_wait``)
        self.backlog_asked: dict[int, int] = {}
        self.waiting_batches: dict[bytes, Proposal] = {}
        self.waiting_parent: dict[bytes, list[Proposal]] = {}
        # (block, peer) asked for, and when: each peer is asked for a block once, and again
        # only ``base_timeout_ms`` later or after this validator's round timed out (a request
        # or its answer lost). Of each peer, not once in all: with one request a block, a
        # network losing 10% of its messages committed 9% fewer blocks in the simulator
        self.requested: dict[tuple[bytes, int], int] = {}
        # Each block waiting for its parent -> that parent (rebuilt at every ``on_messages``,
        # added to as blocks start waiting; an entry left after its block was taken is
        # harmless, see ``_missing_root``)
        self._waiting_up: dict[bytes, bytes] = {}
        self.propose_blocked = False
        self.idle_round = -1

        self.votes: dict[tuple[int, bytes], dict[int, bytes]] = {}
        self.vote_by: dict[tuple[int, int], Vote] = {}
        self.formed_qc_rounds: set[int] = set()
        # Each round's timeouts: the QC and signature of each sender's
        self.timeouts: dict[int, dict[int, tuple[QuorumCert, bytes]]] = {}
        self.formed_tc_rounds: set[int] = set()
        self.own_timeout: TimeoutMsg | None = None
        self.proposal_at: dict[tuple[int, int], Proposal] = {}
        # (round, proposer) -> the block of that round taken uncertified (``_accept``)
        self.taken_at: dict[tuple[int, int], bytes] = {}
        # Leader reputation: the committed window behind each round asked about, for the
        # current committed head (``_window``)
        self._windows: dict[int, tuple[bool, tuple[int, ...], int]] = {}
        self._seen_cache: dict[int, tuple[bool, int]] = {}
        # n rounds (each validator's turn, and the QCs of up to n blocks), ending 3 rounds
        # back: a block is committed 2 rounds after its own, in a round that went well (a
        # validator whose commits lag further cannot tell: see ``leader``). Tried in the
        # simulator against 2n rounds ending n + 2 back: with 1 of 4, 2 of 7 and 3 of 10
        # validators crashed, 8 / 18 / 21 round timeouts in 3 seeds against 18 / 36 / 54,
        # and the same with 5% of the messages dropped and none crashed.
        self._window_span = validators.n
        self._window_lag = 3
        self._failure_span = self.cfg.leader_failure_cycles * validators.n
        # Waiting for stragglers (``_await_straggler``): when each QC formed here was formed
        # (now_ms, signer bits), by round; each late voter's last late vote (round, ms after
        # its QC was formed); the round whose proposal waits and the voters it waits for; the
        # last round that waited, and the last that waited past ``straggler_wait_ms``
        self.qc_formed: dict[int, tuple[int, int]] = {}
        self.late_votes: dict[int, tuple[int, int]] = {}
        self.straggler_round = -1
        self.straggler_want = 0
        self.straggler_waited = -(1 << 62)
        # Waits held (short, long) and late votes joined to a QC while a proposal was held
        # (for a straggler, or idle), for the status
        self.straggler_counts = {"short": 0, "long": 0, "joined": 0}
        self.straggler_long_waited = -(1 << 62)
        # The last round whose proposal waited idle for a batch (late votes join its QC)
        self.idle_waited = -1
        # When this validator entered its current round, and the one before (now_ms)
        self.entered_ms = self.entered_before = 0
        self.evidence_seen: set[tuple[str, int, int]] = set()
        # Sync requests: this validator's last nonce, and those it served each requester
        # (nonce -> the request's round; see ``_serve_sync``)
        self.sync_nonce = 0
        self.served: dict[int, dict[int, int]] = {}
        # Blocks sent to each requester in this validator's current round: (round, blocks).
        # At most ``sync_batch`` x ``sync_responses`` a round, however many requests it signs
        self.sync_sent: dict[int, tuple[int, int]] = {}
        self.verified_certs: set[bytes] = set()
        self._out: list[Action] = []
        self._restored: list[Proposal] = []
        self._children: collections.deque[Proposal] = collections.deque()
        self._taking_children = False
        self._restore(known_blocks)

    def _restore(self, proposals: Sequence[Proposal]) -> None:
        """Reload stored proposals (they were verified before they were stored)."""
        for p in sorted(proposals, key=lambda p: p.block.height):
            b = p.block
            self.qcs.setdefault(b.parent_hash, p.qc)
            if b.height <= self.committed.height:
                self.committed_log[b.height] = p
                self.committed_hashes[b.hash] = b
                self.committed_digests.update(dict.fromkeys(b.batch_digests, b.height))
            else:
                # Voted for, not committed: taken again at start as a certified block would be
                # from a peer (its batches held, its payload checked by the builder), so that
                # an adapter's builder knows it before it may commit
                self._restored.append(p)
        self._windows.clear()
        self._seen_cache.clear()
        self._prune()

    # ---- public entry points ---------------------------------------------------------------

    def status(self) -> CoreStatus:
        return CoreStatus(
            self.index,
            self.round,
            self.highest_vote_round,
            self.highest_qc_round,
            self.high_qc.round,
            self.committed.height,
            self.committed.hash,
            self.leader(self.round),
            self.rounds_by_timeout,
        )

    def leader(self, round_: int) -> int:
        """The leader of ``round_``: the schedule's (``leaders``, round robin by default),
        unless leader reputation passes it over, when it is one of the validators that
        reputation keeps for the round (``_window``), in turn.

        Every validator whose committed chain has passed the window computes the same answer
        (the committed chain is the same everywhere). One whose commits lag behind it (after a
        restart, or after a round ended by timeout) cannot tell: it takes the schedule's
        leader for its own acts, but proposes where its best guess from the chain it holds
        names it (``_may_lead``), sends its votes to everyone, and accepts a proposal for the
        round from any validator (``_process_proposal``), so that it can catch up, and so
        that a leader that cannot tell it leads still leads. Safety never depends on who
        leads: only the voting rules do."""
        base = self.leaders.leader(round_)
        if not self.cfg.leader_reputation:
            return base
        final, live, _ = self._window(round_)
        return _turn(round_, base, live) if final else base

    def passed_over(self, round_: int | None = None) -> dict[str, object]:
        """Whom leader reputation passes over as ``round_``'s leader (the current round's by
        default), for operators: ``unseen``, not seen live in the window behind it (down,
        cut off, or always the last to vote); ``failed``, seen but failed as a leader lately;
        ``final``, whether this validator can tell (else a guess from the chain it holds)."""
        round_ = self.round if round_ is None else round_
        if not self.cfg.leader_reputation:
            return {"unseen": [], "failed": [], "final": True}
        final, live, seen = self._window(round_)
        kept = set(live)
        return {
            "unseen": [i for i in range(self.vs.n) if seen and not seen >> i & 1],
            "failed": [i for i in range(self.vs.n) if seen >> i & 1 and i not in kept],
            "final": final,
        }

    def _may_lead(self, round_: int) -> bool:
        """Does this validator propose in ``round_``? Where it can tell, if it leads; where it
        cannot, also if the window as far as its committed chain holds it names it."""
        base = self.leaders.leader(round_)
        if not self.cfg.leader_reputation:
            return base == self.index
        final, live, _ = self._window(round_)
        return _turn(round_, base, live) == self.index or (not final and base == self.index)

    def _may_propose(self, round_: int) -> tuple[int, ...]:
        """Whose proposals for ``round_`` this validator votes for: the leader, and the
        schedule's (a validator whose commits lag proposes in its scheduled rounds until it
        can tell). Where this validator cannot tell who leads, the guess from the chain it
        holds stands for the leader: the others that cannot tell hold the same chain, or one
        a few blocks apart, and guess alike. (It takes anyone's proposal then, to catch up
        from, but no longer votes for anyone's: a Byzantine validator racing a competing
        block to some of the voters in every such round, and each round after a timeout is
        one, split the votes round after round, and no block was certified again.)"""
        base = self.leaders.leader(round_)
        if not self.cfg.leader_reputation:
            return (base,)
        _, live, _ = self._window(round_)
        return (base, _turn(round_, base, live))

    def _leader_known(self, round_: int) -> bool:
        """Can this validator tell who leads ``round_`` (see ``leader``)?"""
        return not self.cfg.leader_reputation or self._window(round_)[0]

    def _window(self, round_: int) -> tuple[bool, tuple[int, ...], int]:
        """(final, live, seen) for ``round_``: ``seen``, the bits of the validators seen live
        in the committed window behind it (``_seen``); ``live``, those of them that did not
        fail as a leader lately (``_failed``), sorted (all seen ones, if every one failed);
        ``final``, whether this validator's committed chain holds all it takes to tell (where
        it does not, ``live`` is a guess from the part it holds)."""
        hit = self._windows.get(round_)
        if hit is not None:
            return hit
        final, seen = self._seen(round_)
        keep = seen
        if seen and self._failure_span:
            known, failed = self._failed(round_)
            final = final and known
            if seen & ~failed:
                keep = seen & ~failed
        out = (final, _members(keep), seen)
        if len(self._windows) >= 64:
            self._windows.clear()
        self._windows[round_] = out
        return out

    def _seen(self, round_: int) -> tuple[bool, int]:
        """(final, seen): the bits of the validators that proposed a committed block whose
        round lies in the window of ``n`` rounds ending 3 rounds before ``round_``, or signed
        the QC or TC it carries; ``final`` is whether this validator's committed chain holds
        all of that window's blocks (it reaches past the window's end, and its log reaches
        back to the window's start or to genesis). An empty window (a long stall), and the
        network's first rounds, whose window would reach back before genesis, pass nobody
        over."""
        hit = self._seen_cache.get(round_)
        if hit is not None:
            return hit
        end = round_ - self._window_lag
        start = end - self._window_span  # exclusive
        seen = 0  # bit i: validator i (the certificates' signer bitmaps, as integers)
        final = True  # the network's first rounds: no full window behind them yet
        if start >= 0:
            height = self.committed.height
            while True:
                if height == 0:  # genesis: nothing older
                    break
                p = self.committed_log.get(height)
                if p is None:  # older than this validator's log holds
                    final = False
                    break
                b = p.block
                if b.round <= start:
                    break
                if b.round <= end:
                    seen |= 1 << self.vs.index_of(b.proposer)
                    seen |= int.from_bytes(p.qc.signers, "little")
                    if p.tc is not None:
                        seen |= int.from_bytes(p.tc.signers, "little")
                height -= 1
            final = final and self.committed.round >= end
        out = (final, seen)
        if len(self._seen_cache) >= 2 * self._failure_span + 64:
            self._seen_cache.clear()
        self._seen_cache[round_] = out
        return out

    def _failed(self, round_: int) -> tuple[bool, int]:
        """(final, failed): the bits of the validators that led a round, of the
        ``leader_failure_cycles`` x n rounds ending 3 before ``round_``, of which no block was
        committed (its proposal never came, or never got a QC in time); ``final`` as in
        ``_seen`` (where it is not, the rounds past this validator's commits or older than its
        log are not counted). A failed round's leader is the one its seen window alone names
        (the schedule's, or the seen validator taking its turn): that needs no history further
        back, so every validator holding the window names the same one. It may differ from
        the round's real leader where that one was passed over for failing itself; then the
        failure counts against the validator passed over."""
        end = round_ - self._window_lag
        start = max(0, end - self._failure_span)  # exclusive
        final = self.committed.round >= end
        last = min(end, self.committed.round)
        committed: set[int] = set()
        height = self.committed.height
        while height > 0:
            p = self.committed_log.get(height)
            if p is None:  # older than this validator's log holds: count after what it holds
                final = False
                held = self.committed_log.get(height + 1)
                start = max(start, held.block.round if held is not None else last)
                break
            if p.block.round <= start:
                break
            committed.add(p.block.round)
            height -= 1
        failed = 0
        for x in range(start + 1, last + 1):
            if x in committed:
                continue
            known, seen = self._seen(x)
            final = final and known
            failed |= 1 << _turn(x, self.leaders.leader(x), _members(seen))
        return final, failed

    def safety_state(self) -> SafetyState:
        return SafetyState(
            self.highest_vote_round, self.highest_qc_round, self.high_qc, self.last_tc
        )

    def tick(self, now_ms: int) -> None:
        """The adapter's clock, used only for the timestamps of this validator's proposals."""
        self.now_ms = max(self.now_ms, now_ms)

    def start(self) -> list[Action]:
        """Enter the first round this validator may act in (after genesis or a restart). Its
        leader proposes at once, even an empty block: the others' timers for that round run
        from their own start, and with this leader's idle wait and then the next leader's
        the round would outlast its timeout (every network's first round did)."""
        # The blocks this validator voted for before a restart, first: after every validator
        # restarted at once, the block the highest QC certifies may be kept nowhere else
        restored, self._restored = self._restored, []
        for p in restored:
            self._process_proposal(p, certified=True)
        start = max(self.high_qc.round, self.last_tc.round if self.last_tc else 0) + 1
        via_tc = self.last_tc if self.last_tc and self.last_tc.round + 1 == start else None
        self._enter_round(start, via_tc, wait_if_idle=False)
        return self._flush()

    def on_proposal(self, proposal: Proposal) -> list[Action]:
        return self.on_messages([proposal])

    def on_vote(self, vote: Vote) -> list[Action]:
        return self.on_messages([vote])

    def on_timeout_msg(self, timeout: TimeoutMsg) -> list[Action]:
        return self.on_messages([timeout])

    def on_sync_request(self, request: SyncRequest) -> list[Action]:
        return self.on_messages([request])

    def on_sync_response(self, response: SyncResponse) -> list[Action]:
        return self.on_messages([response])

    def on_messages(self, messages: Sequence[Message]) -> list[Action]:
        """Verify every signature of every message in one batch, then handle the valid ones.
        Proposals of blocks already committed, held or waiting here are dropped unverified:
        they would change nothing, and this validator would otherwise verify the same blocks
        again and again (old proposals replayed, or, far behind, the same blocks in one sync
        response after another)."""
        self._waiting_up = {
            p.block.hash: p.block.parent_hash for ps in self.waiting_parent.values() for p in ps
        }
        waiting = self._waiting_up.keys()
        fresh: list[Message] = []
        seen: set[Message] = set()
        for message in messages:
            m = self._unheld(message, waiting)
            if m is None:
                continue
            try:  # a message repeated in one batch is checked once (8,192 copies of a vote)
                if m in seen:
                    continue
                seen.add(m)
            except TypeError:  # unhashable: a hostile object handed over in process
                pass
            fresh.append(m)
        messages = fresh
        checked = self._verify_all(messages)
        for message, ok in zip(messages, checked, strict=True):
            if ok:
                self._dispatch(message)
            else:
                self._reject("bad signature or certificate", self._sender(message))
        return self._flush()

    def _unheld(self, message: Message, waiting: Container[bytes]) -> Message | None:
        """``message`` without the proposals of blocks committed or held here, or waiting
        here for their parent or their batches (``None`` if nothing else is left). A block
        waiting for its parent is asked for again, as its proposal arriving again would have:
        a validator far behind is sent the same blocks in one sync response after another."""
        match message:
            case Proposal(block=b) if isinstance(b, BlockHeader) and self._holds(b, waiting):
                return None
            case Vote(round=r, voter=voter) if type(r) is int and type(voter) is int:
                # Votes that would change nothing once checked: of a round past the evidence
                # window (pruned), or by a voter whose vote for the round is held already (the
                # same one again, or another once its double vote was reported)
                if r < self.round - self.cfg.evidence_window:
                    return None
                first = self.vote_by.get((r, voter))
                if first is not None and (
                    first.block_hash == message.block_hash
                    or ("double_vote", voter, r) in self.evidence_seen
                ):
                    return None
            case SyncResponse(proposals=proposals) if (
                isinstance(proposals, tuple) and len(proposals) <= self.cfg.sync_batch
            ):
                fresh = tuple(
                    p
                    for p in proposals
                    if not (isinstance(p, Proposal) and isinstance(p.block, BlockHeader))
                    or not self._holds(p.block, waiting)
                )
                if not fresh:
                    return None
                if len(fresh) < len(proposals):
                    return SyncResponse(fresh, message.sender)
        return message

    def _holds(self, b: BlockHeader, waiting: Container[bytes]) -> bool:
        if b.height <= self.committed.height or b.hash in self.tree:
            return True
        if b.hash in self.waiting_batches:
            return True
        if b.hash in waiting:
            # (verified when it came first; its proposer is a validator of the set)
            self._request_sync(b.parent_hash, self.vs.index_of(b.proposer))
            return True
        return False

    def on_local_timeout(self, round_: int) -> list[Action]:
        """The timer of ``SetTimer(round_)`` fired."""
        # Drop timers of rounds already left
        if round_ == self.round:
            self._local_timeout()
        return self._flush()

    def on_propose_timer(self, round_: int) -> list[Action]:
        """The idle wait, or the wait for a straggler's vote, of ``SetTimer(round_,
        purpose="propose")`` ended: propose anyway."""
        if round_ == self.round and self.straggler_round == round_:
            self.straggler_round = -1
            self._propose()
        elif round_ == self.round and self.idle_round == round_:
            self.idle_round = -1
            self._propose(wait_if_idle=False)
        return self._flush()

    def on_batch_available(self, digest: bytes, source: int | None = None) -> list[Action]:
        """The batch ``digest`` is held locally and its digest checked by the adapter.
        ``source``: where it came from (the mempool that sealed it), if known: a leader's
        proposal takes batches from each source in turn (``_in_turn``)."""
        if self._is_ordered(digest, set()):
            return []
        self.available.setdefault(digest, self.now_ms)
        if source is not None:
            self.sources.setdefault(digest, source)
        if self.idle_round == self.round:
            # An idle leader was waiting for exactly this
            self.idle_round = -1
            self._propose(wait_if_idle=False)
        for block_hash, proposal in list(self.waiting_batches.items()):
            # (one admitted here may commit, and the commit drops others below its height)
            if block_hash in self.waiting_batches and all(
                d in self.available for d in proposal.block.batch_digests
            ):
                del self.waiting_batches[block_hash]
                parent = self._header(proposal.block.parent_hash)
                if parent is not None and block_hash not in self.tree:
                    self._admit(proposal, parent, self.vs.index_of(proposal.block.proposer))
        return self._flush()

    # ---- verification -------------------------------------------------------------------

    def _verify_all(self, messages: Sequence[Message]) -> list[bool]:
        """Structural checks, then one batched signature check for everything."""
        plans: list[list[_Item] | None] = [self._checked_items(m) for m in messages]
        flat = [item for plan in plans if plan for item in plan]
        if flat:
            keys = self.vs.public_keys[[i for i, _, _ in flat]]
            msgs = np.frombuffer(b"".join(m for _, m, _ in flat), np.uint8).reshape(-1, 32)
            sigs = np.frombuffer(b"".join(s for _, _, s in flat), np.uint8).reshape(-1, 64)
            ok = self.verifier.verify(keys, sigs, msgs)
        else:
            ok = np.zeros(0, np.bool_)
        results, pos = [], 0
        for message, plan in zip(messages, plans, strict=True):
            if plan is None:
                results.append(False)
                continue
            good = bool(ok[pos : pos + len(plan)].all())
            pos += len(plan)
            results.append(good)
            if good:
                self._remember_certs(message)
        return results

    def _remember_certs(self, message: Message) -> None:
        if len(self.verified_certs) > 100_000:
            self.verified_certs.clear()
        for cert in _certs_of(message):
            self.verified_certs.add(_cert_key(cert))

    def _checked_items(self, message: Message) -> list[_Item] | None:
        """``_items``, with any field of the wrong type or range making the message malformed
        (a Byzantine peer controls every field of what it sends)."""
        try:
            return self._items(message)
        except (struct.error, TypeError, ValueError, AttributeError, OverflowError):
            return None

    def _items(self, message: Message) -> list[_Item] | None:
        """Signatures a message depends on, or ``None`` if it is malformed."""
        n = self.vs.n
        items: list[_Item] = []
        match message:
            case Proposal(block=block, signature=sig):
                try:
                    proposer = self.vs.index_of(block.proposer)
                except LedgerError:
                    return None
                if len(sig) != 64:
                    return None
                items.append((proposer, proposal_message(self.chain_id, block.hash), sig))
            case Vote(voter=voter, signature=sig, block_hash=block_hash, round=round_):
                if not 0 <= voter < n or len(sig) != 64:
                    return None
                items.append((voter, vote_message(self.chain_id, block_hash, round_), sig))
            case TimeoutMsg(sender=sender, signature=sig, round=round_, high_qc=qc):
                # A timeout of round r carries a QC below r (the timeout rule)
                if not 0 <= sender < n or len(sig) != 64 or qc.round >= round_:
                    return None
                items.append((sender, timeout_message(self.chain_id, round_, qc.round), sig))
            case SyncRequest(requester=requester, signature=sig):
                if not 0 <= requester < n or len(sig) != 64:
                    return None
                m = sync_request_message(
                    self.chain_id,
                    message.block_hash,
                    requester,
                    message.from_height,
                    message.round,
                    message.nonce,
                )
                items.append((requester, m, sig))
            case SyncResponse(proposals=proposals):
                for p in proposals[: self.cfg.sync_batch]:
                    if not isinstance(p, Proposal):
                        return None
                    sub = self._items(p)
                    if sub is None:
                        return None
                    items.extend(sub)
                return items if len(proposals) <= self.cfg.sync_batch else None
            case _:
                return None
        for cert in _certs_of(message):
            sub = self._cert_items(cert)
            if sub is None:
                return None
            items.extend(sub)
        return items

    def _cert_items(self, cert: QuorumCert | TimeoutCert) -> list[_Item] | None:
        if isinstance(cert, QuorumCert) and cert.round == 0 and not cert.signers:
            # Verify the unsigned certificate is only ever the genesis one
            ok = cert.block_hash == self.genesis.hash and not cert.signatures
            return [] if ok else None
        # The shape is checked before the cache is asked, every time: a certificate that is
        # not well formed is refused even if its key were to match a verified one
        n = self.vs.n
        if len(cert.signers) != -(-n // 8):
            return None
        signers = bitmap_indices(cert.signers)
        # Verify a quorum of distinct, existing validators signed, one signature each
        if len(signers) < self.vs.quorum or signers[-1] >= n:
            return None
        if len(cert.signatures) != len(signers):
            return None
        if isinstance(cert, TimeoutCert) and (
            len(cert.high_qc_rounds) != len(signers)
            # A timeout of round r is only ever sent with a QC below r (the timeout rule)
            or any(hqr >= cert.round for hqr in cert.high_qc_rounds)
            # It carries the highest QC reported: no round without a QC behind it
            or not isinstance(cert.high_qc, QuorumCert)
            or cert.high_qc.round != max(cert.high_qc_rounds)
        ):
            return None
        if _cert_key(cert) in self.verified_certs:
            return []
        if isinstance(cert, QuorumCert):
            msg = vote_message(self.chain_id, cert.block_hash, cert.round)
            return [(i, msg, s) for i, s in zip(signers, cert.signatures, strict=True)]
        assert cert.high_qc is not None
        qc_items = self._cert_items(cert.high_qc)
        if qc_items is None:
            return None
        return qc_items + [
            (i, timeout_message(self.chain_id, cert.round, hqr), s)
            for i, hqr, s in zip(signers, cert.high_qc_rounds, cert.signatures, strict=True)
        ]

    # ---- dispatch ------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        match message:
            case Proposal():
                self._process_proposal(message)
            case Vote():
                self._process_vote(message)
            case TimeoutMsg():
                self._process_timeout(message)
            case SyncRequest():
                self._serve_sync(message)
            case SyncResponse():
                # Each block but the newest is certified by the QC its successor carries
                certified = {p.qc.block_hash for p in message.proposals}
                for p in message.proposals:
                    self._process_proposal(p, p.block.hash in certified)

    def _sender(self, message: Message) -> int | None:
        """Who a message claims to come from, for attributing its rejection."""
        try:
            match message:
                case Proposal(block=block):
                    return self.vs.index_of(block.proposer)
                case Vote(voter=sender) | TimeoutMsg(sender=sender) | SyncResponse(sender=sender):
                    return int(sender)
                case SyncRequest(requester=requester):
                    return int(requester)
        except (LedgerError, AttributeError, TypeError, ValueError):
            return None
        return None

    def _reject(self, reason: str, sender: int | None) -> None:
        self._out.append(Rejected(reason, sender))

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # ---- blocks --------------------------------------------------------------------------

    def _header(self, block_hash: bytes) -> BlockHeader | None:
        p = self.tree.get(block_hash)
        if p is not None:
            return p.block
        return self.committed_hashes.get(block_hash)

    def _process_proposal(self, p: Proposal, certified: bool = False) -> None:
        """``certified``: a QC for this block came with it (a sync response)."""
        b = p.block
        proposer = self.vs.index_of(b.proposer)
        # Verify the proposer leads this round: by leader reputation, or by the schedule (a
        # validator whose commits lag, after a restart say, proposes in its scheduled rounds
        # until it can tell), or anyone where this validator cannot tell (``leader``). A
        # certified block is sound whoever proposed it: validators that could not tell who
        # led voted for it, and one that syncs it later and can tell must take it all the same
        # (or never get past it). It gets no vote here: its round is over.
        if (
            not certified
            and b.hash not in self.qcs
            and proposer not in self._may_propose(b.round)
            and self._leader_known(b.round)
        ):
            return self._reject(f"proposal for round {b.round} not from its leader", proposer)
        # Verify the block is on this chain and its QC certifies its parent
        if b.chain_id != self.chain_id:
            return self._reject("proposal for another chain", proposer)
        if p.qc.block_hash != b.parent_hash or b.round <= p.qc.round:
            return self._reject("proposal QC does not certify its parent", proposer)
        # Verify a round after a gap is justified by a TC of the previous round
        if b.round != p.qc.round + 1 and (p.tc is None or p.tc.round + 1 != b.round):
            return self._reject("proposal skips rounds without a TC", proposer)
        if b.height <= self.committed.height or b.hash in self.tree:
            return None
        # Verify it names no more batches than a leader may (checked before anything is
        # fetched for it: a proposal may name 65,536 digests, each fetched from every peer)
        if len(b.batch_digests) > self.cfg.max_batches_per_block:
            return self._reject(
                f"proposal names {len(b.batch_digests)} batches, more than "
                f"{self.cfg.max_batches_per_block}",
                proposer,
            )
        self._check_equivocation(p, proposer)
        self._process_qc(p.qc)
        if p.tc is not None:
            self._process_tc(p.tc)
        if b.hash in self.tree or b.height <= self.committed.height:
            return None
        parent = self._header(b.parent_hash)
        if parent is None:
            waiting = self.waiting_parent.setdefault(b.parent_hash, [])
            # One block of a proposer's round waits, or a certified one: others are its
            # equivocations (reported above), and kept they grew the list without bound for a
            # parent this validator lacks (their claimed heights cannot be checked till then)
            same = [
                w for w in waiting if (w.block.round, w.block.proposer) == (b.round, b.proposer)
            ]
            if all(w.block.hash != b.hash for w in same) and (certified or not same):
                waiting.append(p)
                self._waiting_up[b.hash] = b.parent_hash
            self._request_sync(b.parent_hash, proposer)
            return None
        self._accept(p, parent, proposer, certified)
        return None

    def _accept(
        self, p: Proposal, parent: BlockHeader, proposer: int, certified: bool = False
    ) -> None:
        b = p.block
        # Verify the block extends its parent: height, round, time
        if b.height != parent.height + 1 or b.round <= parent.round:
            return self._reject("proposal height or round does not follow its parent", proposer)
        if b.timestamp_ms <= parent.timestamp_ms:
            return self._reject("proposal timestamp not after its parent's", proposer)
        # Verify no named batch was already ordered on this branch
        branch = self._branch_digests(parent)
        if len(set(b.batch_digests)) != len(b.batch_digests) or any(
            self._is_ordered(d, branch) for d in b.batch_digests
        ):
            return self._reject("proposal repeats an ordered batch", proposer)
        # One block of a proposer's round is taken uncertified; another (an equivocation,
        # reported) only once certified, which a sync then brings. It would get no vote
        # here, and each had its batches fetched: an equivocating leader's thousand blocks of
        # a round in one frame were a thousand fetches from every peer
        taken = self.taken_at.get((b.round, proposer))
        if taken not in (None, b.hash) and not certified and b.hash not in self.qcs:
            return None
        missing = tuple(d for d in b.batch_digests if d not in self.available)
        if missing:
            # The payload can only be checked (executed) once every named batch is held
            if b.hash not in self.waiting_batches:
                self.waiting_batches[b.hash] = p
                self.taken_at.setdefault((b.round, proposer), b.hash)
                self._out.append(FetchBatches(missing, proposer))
            return None
        self._admit(p, parent, proposer)
        return None

    def _admit(self, p: Proposal, parent: BlockHeader, proposer: int) -> None:
        """Check the payload against the held batches; then the block joins the tree."""
        b = p.block
        reason = self.builder.check(b, parent)
        if reason is not None:
            return self._reject(f"proposal payload: {reason}", proposer)
        self.taken_at.setdefault((b.round, proposer), b.hash)
        self.tree[b.hash] = p
        for peer in range(self.vs.n):
            self.requested.pop((b.hash, peer), None)
        self._try_vote(p)
        qc = self.qcs.get(b.hash)
        if qc is not None:
            self._try_commit(qc)
        self._take_children(self.waiting_parent.pop(b.hash, []))
        if self.propose_blocked and b.hash == self.high_qc.block_hash:
            self._propose()
        return None

    def _take_children(self, children: list[Proposal]) -> None:
        """Process proposals that waited for a parent just admitted. In a loop, not by
        recursion: a chain that waited block on block (a validator hundreds of blocks behind,
        its backward sync connecting) nested a call per block and raised RecursionError out of
        ``on_messages`` at about 330 blocks."""
        self._children.extend(children)
        if self._taking_children:
            return  # the loop below, further up this call, takes them
        self._taking_children = True
        try:
            while self._children:
                self._process_proposal(self._children.popleft())
        finally:
            self._taking_children = False

    def _is_ordered(self, digest: bytes, branch: set[bytes]) -> bool:
        """Was this batch ordered on the branch, or committed within the window? (The window is
        counted in heights from the committed head, so every validator draws the same line.)"""
        height = self.committed_digests.get(digest)
        recent = height is not None and height > self.committed.height - self.cfg.committed_window
        return recent or digest in branch

    def _branch_digests(self, parent: BlockHeader) -> set[bytes]:
        """Digests in the uncommitted ancestors of a block (``parent`` included)."""
        seen: set[bytes] = set()
        cursor = self.tree.get(parent.hash)
        while cursor is not None:
            seen.update(cursor.block.batch_digests)
            cursor = self.tree.get(cursor.block.parent_hash)
        return seen

    def _check_equivocation(self, p: Proposal, proposer: int) -> None:
        # Two proposals of one proposer for one round (keyed by proposer too: where the leader
        # is not known here, another validator's proposal for the round is not a second one)
        first = self.proposal_at.get((p.round, proposer))
        if first is None:
            self.proposal_at[(p.round, proposer)] = p
        elif first.block.hash != p.block.hash:
            self._evidence("equivocating_proposal", proposer, p.round, first, p)

    def _evidence(
        self, kind: str, offender: int, round_: int, a: Proposal | Vote, b: Proposal | Vote
    ) -> None:
        key = (kind, offender, round_)
        if key not in self.evidence_seen:
            self.evidence_seen.add(key)
            self._out.append(Evidence(kind, offender, round_, a, b))

    def _missing_root(self, block_hash: bytes) -> bytes | None:
        """The block to ask for so as to connect ``block_hash``: itself, or where it waits for
        its parent, the parent of the lowest block of the chain waiting below it (None: that
        one is held after all). A validator far behind holds a long chain of blocks waiting:
        each of them, and each new proposal above them, asked for its own parent, and every
        peer sent back its 64 blocks below that one, nearly all held already (the simulator,
        one validator of four down for 60 s: 1,336 requests and 82,457 blocks sent for the
        1,380 it lacked). Now they all ask for the one block that connects them."""
        passed: list[bytes] = []
        while block_hash in self._waiting_up and len(passed) <= len(self._waiting_up):
            passed.append(block_hash)
            block_hash = self._waiting_up[block_hash]
        # Each block passed now points at the root straight away: a long chain is walked
        # once, not once for each block that joins it
        for h in passed[:-1]:
            self._waiting_up[h] = block_hash
        return None if self._header(block_hash) is not None else block_hash

    def _request_sync(self, block_hash: bytes, peer: int) -> None:
        root = self._missing_root(block_hash)
        if root is None:
            return
        block_hash = root
        if peer == self.index:
            return
        asked = self.requested.get((block_hash, peer))
        if asked is not None and self.now_ms - asked < self.cfg.base_timeout_ms:
            return
        self.requested[(block_hash, peer)] = self.now_ms
        # A nonce never used before, by this process or an earlier one of this validator (as
        # long as its clock goes forward): the clock in its high bits
        self.sync_nonce = max(self.sync_nonce + 1, self.now_ms << 20)
        height = self.committed.height
        sig = self.signer.sign(
            sync_request_message(
                self.chain_id, block_hash, self.index, height, self.round, self.sync_nonce
            )
        )
        request = SyncRequest(block_hash, self.index, height, self.round, self.sync_nonce, sig)
        self._out.append(Send(peer, request))

    def _serve_sync(self, req: SyncRequest) -> None:
        """Serve a signed request once, and only while its round is recent (``served``): its
        requester alone can make this validator send it blocks, and a request replayed, or
        kept to be sent later, gets nothing."""
        # (dropped as stale messages are: a network may deliver one twice, or late)
        if req.round + SYNC_ROUNDS < self.round:
            return
        served = self.served.setdefault(req.requester, {})
        if req.nonce in served:
            return
        if len(served) >= SYNC_SERVED_KEEP:
            for nonce, round_ in list(served.items()):
                if round_ + SYNC_ROUNDS < self.round or len(served) >= SYNC_SERVED_KEEP:
                    del served[nonce]
        served[req.nonce] = req.round
        chain: list[Proposal] = []
        cursor = self._proposal(req.block_hash)
        at, sent = self.sync_sent.get(req.requester, (self.round, 0))
        if at != self.round:
            sent = 0
        most = self.cfg.sync_batch * max(1, self.cfg.sync_responses) - sent
        while most > 0 and cursor is not None and cursor.block.height > req.from_height:
            chain.append(cursor)
            if len(chain) >= most:
                break
            cursor = self._proposal(cursor.block.parent_hash)
        chain.reverse()
        self.sync_sent[req.requester] = (self.round, sent + len(chain))
        # The lowest first: the requester asks for what lies below them while the rest come
        # (asked for after the highest, what lies below would be on its way twice)
        for start in range(0, len(chain), self.cfg.sync_batch):
            part = tuple(chain[start : start + self.cfg.sync_batch])
            self._out.append(Send(req.requester, SyncResponse(part, self.index)))

    def _proposal(self, block_hash: bytes) -> Proposal | None:
        p = self.tree.get(block_hash)
        if p is not None:
            return p
        header = self.committed_hashes.get(block_hash)
        return self.committed_log.get(header.height) if header is not None else None

    # ---- certificates, rounds, commits -----------------------------------------------------

    def _process_qc(self, qc: QuorumCert) -> None:
        if qc.block_hash not in self.qcs:
            self.qcs[qc.block_hash] = qc
        if qc.round > self.high_qc.round:
            self.high_qc = qc
        self._try_commit(qc)
        if qc.round >= self.round:
            self._enter_round(qc.round + 1, None)

    def _process_tc(self, tc: TimeoutCert) -> None:
        if tc.high_qc is not None:
            # The QC that the vote rule after this TC asks a proposal to reach
            self._process_qc(tc.high_qc)
        if self.last_tc is None or tc.round > self.last_tc.round:
            self.last_tc = tc
        if tc.round >= self.round:
            self._enter_round(tc.round + 1, tc)

    def _try_commit(self, qc: QuorumCert) -> None:
        """Two-chain rule: a QC for B' whose parent B has round B'.round - 1 commits B."""
        child = self.tree.get(qc.block_hash)
        if child is None:
            return
        parent = self.tree.get(child.block.parent_hash)
        if parent is None or child.block.round != parent.block.round + 1:
            return
        chain: list[Proposal] = []
        cursor: Proposal | None = parent
        while cursor is not None and cursor.block.height > self.committed.height:
            chain.append(cursor)
            cursor = self.tree.get(cursor.block.parent_hash)
        if not chain or chain[-1].block.parent_hash != self.committed.hash:
            return
        chain.reverse()
        certifying = tuple(self.qcs[p.block.hash] for p in chain)
        self._out.append(Commit(tuple(chain), certifying, qc, child.block))
        for p in chain:
            self.committed_log[p.block.height] = p
            self.committed_hashes[p.block.hash] = p.block
            self.committed_digests.update(dict.fromkeys(p.block.batch_digests, p.block.height))
            for d in p.block.batch_digests:
                self.available.pop(d, None)
                self.sources.pop(d, None)
        self.committed = chain[-1].block
        # What a commit can change: only answers that were not final yet
        self._windows = {r: w for r, w in self._windows.items() if w[0]}
        self._seen_cache = {r: w for r, w in self._seen_cache.items() if w[0]}
        self._prune()

    def _prune(self) -> None:
        height = self.committed.height
        for block_hash in [h for h, p in self.tree.items() if p.block.height <= height]:
            del self.tree[block_hash]
        for block_hash in [h for h, p in self.waiting_batches.items() if p.block.height <= height]:
            del self.waiting_batches[block_hash]
        for block_hash in [
            h for h, ps in self.waiting_parent.items() if all(p.block.height <= height for p in ps)
        ]:
            del self.waiting_parent[block_hash]
        old = height - self.cfg.committed_window
        for h in [h for h in self.committed_log if h <= old]:
            del self.committed_hashes[self.committed_log.pop(h).block.hash]
        if (
            len(self.committed_digests)
            > 2 * self.cfg.committed_window * self.cfg.max_batches_per_block
        ):
            self.committed_digests = {d: h for d, h in self.committed_digests.items() if h > old}
        # (the parents waited for, gathered once: a validator far behind holds a proposal
        # waiting for its parent from each round since, and a QC of each)
        waited = {p.block.parent_hash for ps in self.waiting_parent.values() for p in ps}
        for block_hash in [
            h
            for h in self.qcs
            if self._header(h) is None and h not in waited and h != self.high_qc.block_hash
        ]:
            del self.qcs[block_hash]

    def _timeout_ms(self) -> int:
        delay = self.cfg.base_timeout_ms * self.cfg.timeout_backoff ** min(self.timeouts_in_row, 16)
        return int(min(delay, self.cfg.max_timeout_ms))

    def _enter_round(
        self, round_: int, tc: TimeoutCert | None, *, wait_if_idle: bool = True
    ) -> None:
        if round_ <= self.round:
            return
        self.round = round_
        self.entered_before, self.entered_ms = self.entered_ms, self.now_ms
        self.timeouts_in_row = self.timeouts_in_row + 1 if tc is not None else 0
        self.rounds_by_timeout += tc is not None
        self.own_timeout = None
        self.propose_blocked = False
        self.idle_round = -1
        self.straggler_round = -1
        keep = round_ - self.cfg.evidence_window
        for r in [r for r in self.qc_formed if r < keep]:
            del self.qc_formed[r]
        for key in [k for k in self.votes if k[0] < round_ - 1]:
            del self.votes[key]
        for key2 in [k for k in self.vote_by if k[0] < keep]:
            del self.vote_by[key2]
        for r in [r for r in self.timeouts if r < round_ - 1]:
            del self.timeouts[r]
        for at in [at for at in self.proposal_at if at[0] < keep]:
            del self.proposal_at[at]
        for at in [at for at in self.taken_at if at[0] < keep]:
            del self.taken_at[at]
        for seen in [e for e in self.evidence_seen if e[2] < keep]:
            self.evidence_seen.discard(seen)
        self.formed_qc_rounds = {r for r in self.formed_qc_rounds if r >= round_ - 1}
        self.formed_tc_rounds = {r for r in self.formed_tc_rounds if r >= round_ - 1}
        self._out.append(SetTimer(round_, self._timeout_ms()))
        if self._may_lead(round_):
            self._propose(wait_if_idle)

    # ---- acting: propose, vote, time out ---------------------------------------------------

    def _propose(self, wait_if_idle: bool = True) -> None:
        # A leader proposes once per round, and never after it voted or timed out in it
        if self.highest_vote_round >= self.round:
            return
        mine = self.proposal_at.get((self.round, self.index))
        if mine is not None:  # proposed before a restart: the same block again
            self._out.append(Broadcast(mine))
            return
        qc = self.high_qc
        tc = self.last_tc if self.last_tc and self.last_tc.round + 1 == self.round else None
        if qc.round + 1 != self.round and tc is None:
            return
        parent = self._header(qc.block_hash)
        if parent is None:
            self.propose_blocked = True
            signers = [i for i in bitmap_indices(qc.signers) if i != self.index]
            if signers:
                self._request_sync(qc.block_hash, signers[self.round % len(signers)])
            return
        self.propose_blocked = False
        if self._await_straggler(qc):
            return
        branch = self._branch_digests(parent)
        digests = tuple(d for d in self.available if not self._is_ordered(d, branch))
        # Counted from entering the round, whatever held the proposal since (a wait for a
        # straggler's vote, an idle wait already over): one wait after the other could
        # outlast the others' round timers
        idle_ms = self.cfg.idle_block_ms - (self.now_ms - self.entered_ms)
        idle = not digests and wait_if_idle and idle_ms > 0
        if idle and not self._uncommitted_payload(parent) and not self._announces_commit(parent):
            self.idle_round = self.idle_waited = self.round
            self._out.append(SetTimer(self.round, idle_ms, "propose"))
            return
        block = self.builder.build(
            parent,
            self.round,
            self.signer.public_key,
            max(parent.timestamp_ms + 1, self.now_ms),
            self._in_turn(digests)[: self.cfg.max_batches_per_block],
            self._may_wait if self.cfg.gap_wait_ms > 0 else None,
        )
        sig = self.signer.sign(proposal_message(self.chain_id, block.hash))
        proposal = Proposal(block, qc, tc, sig)
        # Our own vote (and the Persist guarding it) precedes the broadcast.
        self._process_proposal(proposal)
        if self.highest_vote_round < self.round:
            # Our own vote was refused (a parent stamped ahead of this clock, say): nothing
            # guards the round, so the proposal itself is kept first; after a restart it is
            # sent again (above), never a second block for the round (evidence against us)
            self._out.append(Persist(self.safety_state(), proposal))
        self._out.append(Broadcast(proposal))

    def _await_straggler(self, qc: QuorumCert) -> bool:
        """Hold this round's proposal for the votes of validators that leader reputation
        passes over, whose votes on QCs formed here arrived late, lately (``late_votes``): a
        live validator always the last to vote is never in a QC, so would never be seen live
        again. At most once in n rounds, for at most ``straggler_wait_ms`` (and a quarter of
        the base round timeout); and at most once in ``leader_failure_cycles`` x n rounds,
        for a voter later than that, for at most half the base round timeout: 1.5 times the
        slowest such validator's last lateness, plus 2 ms. True while waiting.

        The longer, rarer wait is for a far site: its vote comes a round trip to it after the
        quorum's, and in the simulator one 120 ms further than the others (a 1,000 ms base
        timeout) was passed over for good once it had restarted, though up. Either wait ends
        by three quarters of the base timeout after this validator entered the round before
        (the others entered it about then, and their timers run from there), and an idle
        wait after it only makes up the rest of ``idle_block_ms`` (``_propose``)."""
        if self.straggler_round == self.round:
            return True
        cap = min(self.cfg.straggler_wait_ms, self.cfg.base_timeout_ms // 4)
        n = self.vs.n
        short = self.straggler_waited <= self.round - n
        long = self.straggler_long_waited <= self.round - max(self._failure_span, n)
        if (
            cap <= 0
            or not self.late_votes
            or qc.round + 1 != self.round
            or not (short or long)
            or self.straggler_waited == self.round  # its timer ended: propose without them
            # Late votes that came during the idle wait joined the QC (``_join_late_vote``);
            # one that did not come in it would be waited for past the round's idle time
            or self.idle_waited == self.round
            or not self.cfg.leader_reputation
        ):
            return False
        final, live, seen = self._window(self.round)
        if not final or not live:
            return False
        # The others' timers for the round before run from about when this validator entered
        # it: the proposal must reach them, built and sent, well before they end
        budget = self.cfg.base_timeout_ms * 3 // 4 - (self.now_ms - self.entered_before)
        short_ms = min(cap, budget) if short else 0
        long_ms = min(max(cap, self.cfg.base_timeout_ms // 2), budget) if long else 0
        limit = max(short_ms, long_ms)
        signed = int.from_bytes(qc.signers, "little")
        want, late_ms = 0, 0
        for voter, (round_, late) in self.late_votes.items():
            if seen >> voter & 1 or signed >> voter & 1 or round_ < self.round - 2 * n - 4:
                continue
            if late < limit:
                want |= 1 << voter
                late_ms = max(late_ms, late)
        if not want:
            return False
        self.straggler_round = self.straggler_waited = self.round
        kind = "long" if late_ms >= short_ms else "short"
        if kind == "long":
            self.straggler_long_waited = self.round
        self.straggler_counts[kind] += 1
        self.straggler_want = want
        self._out.append(SetTimer(self.round, min(limit, late_ms * 3 // 2 + 2), "propose"))
        return True

    def _join_late_vote(self, v: Vote) -> None:
        """A late vote joins the QC of this round's held proposal: one it waits for
        (``_await_straggler``; with every one, the proposal goes), or, while it waits idle for
        a batch, one of a validator leader reputation passes over. Left out, the idle wait
        over, a wait for that vote began (it had come: the wait ran out and the round with
        it, and a restarted validator's first vote on an idle network cost a round timeout)."""
        qc = self.high_qc
        signed = int.from_bytes(qc.signers, "little")
        if v.round != qc.round or v.block_hash != qc.block_hash or signed >> v.voter & 1:
            return
        waiting = self.straggler_round == self.round
        if waiting:
            if not self.straggler_want >> v.voter & 1:
                return
        elif not self.cfg.leader_reputation or self._window(self.round)[2] >> v.voter & 1:
            return
        signed |= 1 << v.voter
        self.straggler_counts["joined"] += 1
        sigs = dict(zip(bitmap_indices(qc.signers), qc.signatures, strict=True))
        sigs[v.voter] = v.signature
        order = sorted(sigs)
        grown = QuorumCert(
            qc.block_hash, qc.round, make_bitmap(order, self.vs.n), tuple(sigs[i] for i in order)
        )
        self.verified_certs.add(_cert_key(grown))
        self.high_qc = grown
        self.qcs[qc.block_hash] = grown
        if waiting and signed & self.straggler_want == self.straggler_want:
            self.straggler_round = -1
            self._propose()

    def _in_turn(self, digests: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """``digests`` (in arrival order) with their sources taking turns: the first batch of
        each source (the one with the oldest first), then the second of each, and so on, each
        source's own in arrival order. A source with a backlog (a flooding or Byzantine
        mempool, or one far busier than the rest) then fills at most its share of a block
        while others have batches waiting, instead of holding them back for blocks on end."""
        limit = self.cfg.max_batches_per_block
        if len(digests) <= 1 or not self.sources:
            return digests
        queues: dict[int | None, list[bytes]] = {}
        for d in digests:
            queues.setdefault(self.sources.get(d), []).append(d)
        if len(queues) == 1:
            return digests
        out: list[bytes] = []
        for turn in range(max(len(q) for q in queues.values())):
            out.extend(q[turn] for q in queues.values() if turn < len(q))
            if len(out) >= limit:
                break
        return tuple(out)

    def _may_wait(self, digest: bytes, found_ms: int) -> bool:
        """May a batch whose rows would fail for want of an earlier one wait for it? Yes while
        both it and the gap (found at ``found_ms``) are younger than ``gap_wait_ms``.

        A wait that lasts a quarter of that asks the batch's mempool for its backlog
        (``AskBacklog``: an earlier batch may never have reached us), at most once per half
        of it per mempool: batches only out of order in transit come within milliseconds."""
        waited = self.now_ms - min(self.available.get(digest, self.now_ms), found_ms)
        if waited >= self.cfg.gap_wait_ms:
            return False
        source = self.sources.get(digest)
        if source is not None and waited >= self.cfg.gap_wait_ms // 4:
            asked = self.backlog_asked.get(source)
            if asked is None or self.now_ms - asked >= self.cfg.gap_wait_ms // 2:
                self.backlog_asked[source] = self.now_ms
                self._out.append(AskBacklog(source))
        return True

    def _announces_commit(self, parent: BlockHeader) -> bool:
        """Does the QC of ``parent``, which this proposal carries, commit a block with batches?
        Only its leader has seen that QC: the others learn of the commit from this proposal,
        so waiting idle here would hold every other validator's commit back."""
        grand = self.committed_log.get(parent.height - 1)
        return (
            grand is not None
            and grand.block.hash == parent.parent_hash
            and grand.block.round + 1 == parent.round
            and bool(grand.block.batch_digests)
        )

    def _uncommitted_payload(self, parent: BlockHeader) -> bool:
        """Does the branch up to ``parent`` hold batches that still need children to commit?"""
        cursor = self.tree.get(parent.hash)
        while cursor is not None:
            if cursor.block.batch_digests:
                return True
            cursor = self.tree.get(cursor.block.parent_hash)
        return False

    def _try_vote(self, p: Proposal) -> None:
        b, qc, tc = p.block, p.qc, p.tc
        if b.round != self.round or b.hash not in self.tree:
            return
        # Safety rule: vote once per round, above the certificate we vote on
        if b.round <= max(self.highest_vote_round, qc.round):
            return
        # Safety rule: extend the previous round's QC, or after a TC a QC at least as high as
        # every QC its signers reported
        if not (
            qc.round + 1 == b.round
            or (tc is not None and tc.round + 1 == b.round and qc.round >= tc.max_high_qc_round)
        ):
            return
        if self.vs.index_of(b.proposer) not in self._may_propose(b.round):
            return
        ahead = b.timestamp_ms - self.now_ms
        if ahead > self.cfg.max_clock_ahead_ms and b.hash not in self.qcs:
            proposer = self.vs.index_of(b.proposer)
            return self._reject(
                f"proposal timestamp {ahead} ms ahead of this validator's clock", proposer
            )
        self.highest_vote_round = b.round
        self.highest_qc_round = max(self.highest_qc_round, qc.round)
        self._out.append(Persist(self.safety_state(), p))
        sig = self.signer.sign(vote_message(self.chain_id, b.hash, b.round))
        vote = Vote(b.hash, b.round, self.index, sig)
        next_leader = self.leader(b.round + 1)
        if not self._leader_known(b.round + 1):
            # Where leader reputation may pass the schedule's leader over and this validator
            # cannot tell (its commits lag, after a timeout say), the vote goes to everyone:
            # sent to the schedule's leader alone, it would be lost where another leads
            self._out.append(Broadcast(vote))
            self._process_vote(vote)
        elif next_leader == self.index:
            self._process_vote(vote)
        else:
            self._out.append(Send(next_leader, vote))

    def _process_vote(self, v: Vote) -> None:
        # A vote on a QC formed here without it: how late it came (``_await_straggler``)
        formed = self.qc_formed.get(v.round)
        if formed is not None and not formed[1] >> v.voter & 1:
            last = self.late_votes.get(v.voter)
            if last is None or last[0] < v.round:
                self.late_votes[v.voter] = (v.round, max(0, self.now_ms - formed[0]))
        # Votes go to the leader of the next round; anyone else ignores them, but for the
        # schedule's leader and one that cannot tell who leads (``leader``): a voter whose
        # commits lag sends its vote there, and a QC is sound whoever formed it
        # Nor a vote of a round far ahead, that only its certificate could bring this
        # validator to: kept, votes for rounds a Byzantine validator picks (each one signature)
        # grew its memory without bound
        if (
            v.round + 1 < self.round
            or v.round > self.round + self.cfg.evidence_window
            or (
                self.index not in self._may_propose(v.round + 1) and self._leader_known(v.round + 1)
            )
        ):
            return
        first = self.vote_by.get((v.round, v.voter))
        if first is not None:
            if first.block_hash != v.block_hash:
                self._evidence("double_vote", v.voter, v.round, first, v)
            return
        self.vote_by[(v.round, v.voter)] = v
        bucket = self.votes.setdefault((v.round, v.block_hash), {})
        bucket[v.voter] = v.signature
        if self.round in (self.straggler_round, self.idle_round):
            self._join_late_vote(v)
        if len(bucket) >= self.vs.quorum and v.round not in self.formed_qc_rounds:
            self.formed_qc_rounds.add(v.round)
            signers = sorted(bucket)
            self.qc_formed[v.round] = (self.now_ms, sum(1 << i for i in signers))
            qc = QuorumCert(
                v.block_hash,
                v.round,
                make_bitmap(signers, self.vs.n),
                tuple(bucket[i] for i in signers),
            )
            self.verified_certs.add(_cert_key(qc))
            self._process_qc(qc)

    def _local_timeout(self) -> None:
        r = self.round
        # A sync request or its answer may have been lost: allow asking again
        self.requested.clear()
        if self.own_timeout is not None and self.own_timeout.round == r:
            # Retransmit: messages may have been lost; the signed content is unchanged
            self._out.append(Broadcast(self.own_timeout))
            self._out.append(SetTimer(r, self._timeout_ms()))
            return
        qc = self.high_qc
        tc_ok = self.last_tc is not None and self.last_tc.round + 1 == r
        # Safety rule for timeouts: never below our highest QC, never for a round we have left
        if not (
            qc.round >= self.highest_qc_round
            and r > max(self.highest_vote_round - 1, qc.round)
            and (qc.round + 1 == r or tc_ok)
        ):
            self._out.append(SetTimer(r, self._timeout_ms()))
            return
        self.highest_vote_round = max(self.highest_vote_round, r)
        self._out.append(Persist(self.safety_state()))
        sig = self.signer.sign(timeout_message(self.chain_id, r, qc.round))
        msg = TimeoutMsg(r, qc, self.index, sig, self.last_tc if tc_ok else None)
        self.own_timeout = msg
        self._out.append(Broadcast(msg))
        self._out.append(SetTimer(r, self._timeout_ms()))
        self._process_timeout(msg)

    def _process_timeout(self, t: TimeoutMsg) -> None:
        self._process_qc(t.high_qc)
        if t.last_tc is not None:
            self._process_tc(t.last_tc)
        # Its certificates are taken; its round is kept only near this validator's (see
        # ``_process_vote``)
        if t.round < self.round or t.round > self.round + self.cfg.evidence_window:
            return
        bucket = self.timeouts.setdefault(t.round, {})
        if t.sender in bucket:
            return
        bucket[t.sender] = (t.high_qc, t.signature)
        # f+1 timeouts include an honest one: join, so a round with a silent leader ends fast
        if (
            len(bucket) > self.vs.f
            and t.round == self.round
            and (self.own_timeout is None or self.own_timeout.round != t.round)
        ):
            self._local_timeout()
        if len(bucket) >= self.vs.quorum and t.round not in self.formed_tc_rounds:
            self.formed_tc_rounds.add(t.round)
            signers = sorted(bucket)
            tc = TimeoutCert(
                t.round,
                make_bitmap(signers, self.vs.n),
                tuple(bucket[i][0].round for i in signers),
                tuple(bucket[i][1] for i in signers),
                # The highest QC reported, the first to arrive of that round
                max((qc for qc, _ in bucket.values()), key=lambda qc: qc.round),
            )
            self.verified_certs.add(_cert_key(tc))
            self._process_tc(tc)


def _members(bits: int) -> tuple[int, ...]:
    """The validator indices whose bits are set, in order."""
    return tuple(i for i in range(bits.bit_length()) if bits >> i & 1)


def _turn(round_: int, base: int, live: tuple[int, ...]) -> int:
    """Who leads ``round_`` among ``live``: the schedule's leader ``base`` if it is one of
    them (or none are known), else theirs in turn."""
    return base if not live or base in live else live[round_ % len(live)]


def _certs_of(message: Message) -> list[QuorumCert | TimeoutCert]:
    match message:
        case Proposal(qc=qc, tc=tc):
            return [qc] if tc is None else [qc, tc]
        case TimeoutMsg(high_qc=qc, last_tc=tc):
            return [qc] if tc is None else [qc, tc]
    return []


def _cert_key(cert: QuorumCert | TimeoutCert) -> bytes:
    """The verified-certificate cache's key: every field and every list length prefixed, so
    that no two different certificates share one. (Without the prefixes, a TC whose high QC
    rounds were moved into its signer bitmap hashed like the genuine TC it was made from, and
    passed as verified with no high QC rounds: the vote rule after a timeout let a proposal
    on genesis through, and honest validators forked.)"""

    def num(value: int) -> bytes:  # any int: a certificate made in process need not fit u64
        return str(value).encode()

    if isinstance(cert, QuorumCert):
        parts = [b"qc", cert.block_hash, num(cert.round), cert.signers]
    else:
        parts = [b"tc", num(cert.round), cert.signers, num(len(cert.high_qc_rounds))]
        parts.extend(num(r) for r in cert.high_qc_rounds)
        parts.append(b"-" if cert.high_qc is None else _cert_key(cert.high_qc))
    parts.append(num(len(cert.signatures)))
    parts.extend(cert.signatures)
    return hashlib.sha256(b"".join(var_bytes(p) for p in parts)).digest()


__all__ = [
    "BlockBuilder",
    "Core",
    "CoreConfig",
    "CoreStatus",
    "DigestBuilder",
    "LeaderElection",
    "RoundRobin",
]
