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

from rayledger.consensus import Evidence
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
