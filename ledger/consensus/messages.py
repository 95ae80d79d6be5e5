"""Consensus messages, certificates and actions: frozen values, signed over canonical digests.

A validator is named by its index in the validator set. What each signature covers:

- a proposal: ``SHA-256("rayledger/proposal/v1" | chain_id | block_hash)`` by the block's proposer;
- a vote: ``vote_message(chain_id, block_hash, round)`` (``rayledger.block``), so that 2f+1 votes
  form a ``QuorumCert`` that anyone can check with the validator keys alone;
- a timeout: ``SHA-256("rayledger/timeout/v1" | chain_id | round | high_qc_round)``, so that 2f+1
  timeouts form a ``TimeoutCert`` carrying every signer's highest QC round;
- a sync request: ``sync_request_message`` (its block hash, requester, from height, round and
  nonce) by the requester, so that nobody else can make a peer send it blocks, and a request
  replayed is served once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from rayledger.block import BlockHeader, QuorumCert
from rayledger.codec import u64

_PROPOSAL_DOMAIN = b"rayledger/proposal/v1"
_TIMEOUT_DOMAIN = b"rayledger/timeout/v1"
_SYNC_DOMAIN = b"rayledger/sync-request/v1"


def proposal_message(chain_id: bytes, block_hash: bytes) -> bytes:
    return hashlib.sha256(_PROPOSAL_DOMAIN + chain_id + block_hash).digest()


def timeout_message(chain_id: bytes, round_: int, high_qc_round: int) -> bytes:
    return hashlib.sha256(_TIMEOUT_DOMAIN + chain_id + u64(round_) + u64(high_qc_round)).digest()


def sync_request_message(
    chain_id: bytes, block_hash: bytes, requester: int, from_height: int, round_: int, nonce: int
) -> bytes:
    return hashlib.sha256(
        _SYNC_DOMAIN
        + chain_id
        + block_hash
        + u64(requester)
        + u64(from_height)
        + u64(round_)
        + u64(nonce)
    ).digest()


def bitmap_indices(bitmap: bytes) -> list[int]:
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return [int(i) for i in np.flatnonzero(bits)]


def bitmap_count(bitmap: bytes) -> int:
    """How many bits are set (without a Python int per bit: a 64 KiB bitmap is 524,288)."""
    return int(np.count_nonzero(np.unpackbits(np.frombuffer(bitmap, np.uint8))))


@dataclass(frozen=True)
class TimeoutCert:
    """2f+1 signed timeouts for one round; ``high_qc_rounds[i]`` belongs to the i-th signer.
    ``high_qc`` is the highest of the QCs the signers' timeouts carried: its round is the
    largest of ``high_qc_rounds`` (as in Aptos's two-chain timeout certificates). Without it,
    a Byzantine signer could report a QC round nobody holds a QC for, and no leader could
    then meet the vote rule after the timeout: the chain stopped for good."""

    round: int
    signers: bytes
    high_qc_rounds: tuple[int, ...]
    signatures: tuple[bytes, ...]
    high_qc: QuorumCert | None = None

    def signer_indices(self) -> list[int]:
        return bitmap_indices(self.signers)

    @property
    def max_high_qc_round(self) -> int:
        return max(self.high_qc_rounds, default=0)


@dataclass(frozen=True)
class Proposal:
    """A leader's block for its round, with the QC of the block's parent and, when the round
    was entered by a timeout, the TC of the previous round."""

    block: BlockHeader
    qc: QuorumCert
    tc: TimeoutCert | None
    signature: bytes

    @property
    def round(self) -> int:
        return self.block.round


@dataclass(frozen=True)
class Vote:
    block_hash: bytes
    round: int
    voter: int
    signature: bytes


@dataclass(frozen=True)
class TimeoutMsg:
    """A validator gives up on ``round``; it carries its highest QC and, so that laggards can
    catch up, the TC that ended the previous round if it has one."""

    round: int
    high_qc: QuorumCert
    sender: int
    signature: bytes
    last_tc: TimeoutCert | None = None


@dataclass(frozen=True)
class SyncRequest:
    """Ask a peer for the certified chain ending at ``block_hash`` (down to ``from_height``),
    signed by the requester in its round ``round`` with a ``nonce`` it never used before: a
    peer serves each request once, and only while its round is recent."""

    block_hash: bytes
    requester: int
    from_height: int
    round: int = 0
    nonce: int = 0
    signature: bytes = b""


@dataclass(frozen=True)
class SyncResponse:
    """Proposals from older to newer; each is checked like a fresh proposal (signature, QC)."""

    proposals: tuple[Proposal, ...]
    sender: int


Message = Proposal | Vote | TimeoutMsg | SyncRequest | SyncResponse


# ---- actions: what the adapter must do, in list order --------------------------------------


@dataclass(frozen=True)
class SafetyState:
    """What must be on disk before any vote or timeout that depends on it leaves the node."""

    highest_vote_round: int = 0
    highest_qc_round: int = 0
    high_qc: QuorumCert | None = None
    last_tc: TimeoutCert | None = None


@dataclass(frozen=True)
class Persist:
    """Durably store ``state`` (and ``proposal``, the block about to be voted for) before
    executing any later action of the same list. Keeping voted blocks means a certified block
    survives even if every validator restarts before it is committed."""

    state: SafetyState
    proposal: Proposal | None = None


@dataclass(frozen=True)
class Broadcast:
    """Send ``message`` to every other validator."""

    message: Message


@dataclass(frozen=True)
class Send:
    to: int
    message: Message


@dataclass(frozen=True)
class SetTimer:
    """After ``delay_ms``, call ``on_local_timeout(round)`` (purpose ``"round"``) or
    ``on_propose_timer(round)`` (purpose ``"propose"``); the core drops it if the round has
    moved on."""

    round: int
    delay_ms: int
    purpose: str = "round"


@dataclass(frozen=True)
class Commit:
    """Blocks committed, oldest first, each with the QC that certifies it. The last block's
    commit is proven by ``child`` (its child in the next round) and ``commit_qc`` (a QC for
    that child): with them a receipt proves the commit to anyone holding the validator keys."""

    blocks: tuple[Proposal, ...]
    certifying_qcs: tuple[QuorumCert, ...]
    commit_qc: QuorumCert
    child: BlockHeader


@dataclass(frozen=True)
class FetchBatches:
    """Obtain the named batches (from ``source`` if it has them), then call
    ``on_batch_available`` for each."""

    digests: tuple[bytes, ...]
    source: int


@dataclass(frozen=True)
class AskBacklog:
    """A proposal of ours keeps holding back a batch of mempool ``source`` for its senders'
    earlier nonces: ask that mempool to send again every batch it holds in flight. The
    earlier batch may never have reached us (dropped with our intake full, unreadable when
    it came, refused), and would otherwise come only when the mempool finds it stale."""

    source: int


@dataclass(frozen=True)
class Evidence:
    """Two conflicting signed messages from one validator for one round."""

    kind: str
    offender: int
    round: int
    first: Proposal | Vote
    second: Proposal | Vote


@dataclass(frozen=True)
class Rejected:
    """An input that failed a check; reported so adapters can count it by ``reason``."""

    reason: str
    sender: int | None = field(default=None)


Action = (
    Persist | Broadcast | Send | SetTimer | Commit | FetchBatches | AskBacklog | Evidence | Rejected
)
