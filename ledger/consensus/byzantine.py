"""Byzantine message forgeries, shared by the simulator and by validator actors under test.

Each function takes the attacker's own honest core and one message it was about to send,
and returns the hostile message it sends instead or in addition. Only the attacker's own key
is used: these are the attacks a real faulty validator can mount.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from rayledger.block import vote_message
from rayledger.consensus.core import Core
from rayledger.consensus.messages import Message, Proposal, TimeoutMsg, Vote, proposal_message


def conflicting_proposal(core: Core, proposal: Proposal) -> Proposal:
    """Another block for the same round and parent (no batches), validly signed."""
    parent = core._header(proposal.block.parent_hash)
    if parent is None:
        raise ValueError("the leader no longer holds the parent of its proposal")
    other = core.builder.build(
        parent, proposal.round, proposal.block.proposer, proposal.block.timestamp_ms + 1, ()
    )
    sig = core.signer.sign(proposal_message(core.chain_id, other.hash))
    return replace(proposal, block=other, signature=sig)


def double_vote(core: Core, vote: Vote) -> Vote:
    """A validly signed vote for a made-up block in the same round."""
    fake = hashlib.sha256(b"double" + vote.block_hash).digest()
    sig = core.signer.sign(vote_message(core.chain_id, fake, vote.round))
    return Vote(fake, vote.round, vote.voter, sig)


def corrupt_signature(message: Message) -> Message:
    """The same message with its signature's first byte flipped."""
    if isinstance(message, Proposal | Vote | TimeoutMsg):
        sig = message.signature
        return replace(message, signature=bytes([sig[0] ^ 0xFF]) + sig[1:])
    return message
