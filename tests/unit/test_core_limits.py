"""What an honest core keeps, and how deep it goes, whatever arrives (an adversarial audit of
2026-12-05; its scripts were in /tmp/s31/attack/):

- votes and timeouts of rounds far ahead: each is one valid signature by a Byzantine validator,
  and were kept until the core reached their round (never, for a round near 2^62), with the
  record of evidence already reported (never pruned): 1.3 KB a round, 25.6 MB for 20,000.
  Only rounds within ``evidence_window`` of the core's are kept now, and old evidence keys go.
- a validator hundreds of blocks behind whose backward sync connects: the blocks waiting on
  their parents were admitted by recursion, a call per block, and ``on_messages`` raised
  RecursionError at about 330 blocks (no Byzantine validator needed: a partition will do).
"""

from __future__ import annotations

from rayledger.consensus import Broadcast, Evidence, Persist
from tests.unit.consensus_harness import Keyring, Net


def test_votes_and_timeouts_of_far_rounds_are_not_kept() -> None:
    keys = Keyring.make(4)
    v1 = keys.core(1)
    v1.start()
    far = 1 << 62
    messages = []
    for k in range(2000):
        r = far + k
        messages.append(keys.timeout(0, r, keys.genesis_qc))
        messages.append(keys.vote(0, bytes(31) + b"\x01", r))
        messages.append(keys.vote(0, bytes(31) + b"\x02", r))  # a double vote too
    actions = v1.on_messages(messages)
    assert not [a for a in actions if isinstance(a, Evidence)]
    assert (len(v1.timeouts), len(v1.vote_by), len(v1.votes), len(v1.evidence_seen)) == (
        0,
        0,
        0,
        0,
    )
    # Near rounds are still taken: the double vote of the next round is evidence
    near = v1.round + 1
    near_votes = [keys.vote(0, bytes(31) + b"\x01", near), keys.vote(0, bytes(31) + b"\x02", near)]
    if v1.index in (v1.leader(near + 1), v1.leaders.leader(near + 1)) or not v1._leader_known(
        near + 1
    ):
        assert [a for a in v1.on_messages(near_votes) if isinstance(a, Evidence)]
    v1.on_messages([keys.timeout(0, near, keys.genesis_qc)])
    assert 0 in v1.timeouts.get(near, {})


def test_evidence_already_reported_is_forgotten_with_its_round() -> None:
    keys = Keyring.make(4)
    net = Net(keys)
    net.start()
    for c in net.cores:
        c.tick(10**12)
    v1 = net.cores[1]
    v1.evidence_seen.add(("double_vote", 0, 1))
    net.run(lambda: v1.round > 1 + v1.cfg.evidence_window + 1)
    assert ("double_vote", 0, 1) not in v1.evidence_seen


def test_a_validator_hundreds_of_blocks_behind_catches_up_without_recursion() -> None:
    keys = Keyring.make(4)
    net = Net(keys)
    net.isolated.add(0)
    net.start()
    for c in net.cores:
        c.tick(10**12)  # clocks well ahead of the blocks' timestamps
    net.run(lambda: min(net.heights()[1:]) >= 400, max_steps=2_000_000)
    net.isolated.clear()
    net.run(lambda: net.heights()[0] >= 400, max_steps=2_000_000)
    assert net.committed[0] == net.committed[1][: len(net.committed[0])]


def test_a_leader_whose_own_vote_was_refused_proposes_the_same_block_after_a_restart() -> None:
    """Its own vote refused (its parent stamped ahead of its clock), nothing guarded the round:
    after a restart it built another block for the round, and every peer reported it for
    equivocation. Now the proposal is persisted before it leaves, and sent again."""
    keys = Keyring.make(4)
    g = keys.genesis
    b1 = keys.block(g, 1, timestamp_ms=g.timestamp_ms + 10_000)  # v1's clock is 10 s ahead
    p1 = keys.propose(b1, keys.genesis_qc)
    v2 = keys.core(2)  # round 2's leader, its clock at genesis time
    v2.start()
    v2.on_messages([p1])
    votes = [keys.vote(i, b1.hash, 1) for i in (0, 1, 3)]
    actions = v2.on_messages(votes)  # QC(B1) formed here: v2 proposes B2, stamped after B1
    kinds = [type(a).__name__ for a in actions]
    [p2] = [a.message for a in actions if isinstance(a, Broadcast)]
    assert p2.round == 2 and v2.highest_vote_round < 2  # its own vote refused
    persisted = [a for a in actions if isinstance(a, Persist)]
    assert persisted and persisted[-1].proposal == p2
    assert kinds.index("Persist") < kinds.index("Broadcast")
    # Restarted from what it stored, with a batch to propose now: the same block, not a new one
    again = keys.core(2, persisted[-1].state, None, [p1, p2])
    again.on_batch_available(b"\x05" * 32)
    resent = [a.message for a in again.start() if isinstance(a, Broadcast)]
    assert resent == [p2]


def test_equivocations_waiting_for_an_unknown_parent_are_not_all_kept() -> None:
    """A Byzantine proposer's many blocks for one round on a parent this validator lacks
    (each a valid signature, each another hash) all waited for that parent: without bound."""
    keys = Keyring.make(4)
    chain = keys.chain(2)
    b1, b2 = chain[0].block, chain[1].block
    v0 = keys.core(0)
    v0.start()
    rivals = [
        keys.propose(keys.block(b2, 3, timestamp_ms=b2.timestamp_ms + 1 + k), keys.qc(b2))
        for k in range(50)
    ]
    v0.on_messages(rivals)
    assert len(v0.waiting_parent[b2.hash]) == 1
    # A certified block of that round still waits beside it (it is the one a child needs)
    certified = keys.propose(keys.block(b2, 3, digests=[b"\x07" * 32]), keys.qc(b2))
    v0._process_proposal(certified, certified=True)
    assert certified in v0.waiting_parent[b2.hash]
    assert b1.hash not in v0.tree  # v0 lacks the whole chain: all of this waits
