"""Certificates forged from genuine ones, and the verified-certificate cache.

A core remembers the certificates it has verified (``Core.verified_certs``) so that a QC or TC
seen again is not checked again. Its key used to hash a TC's fields with no lengths between
them: a TC whose high QC rounds were moved into its signer bitmap (and that so claimed no high
QC round at all) had the genuine TC's key, passed as verified, and made ``max(high_qc_rounds)``
0, which opens the vote rule after a timeout to a proposal on any certified block. With one
Byzantine validator of four that forked two honest validators from a third (the scenario
below, found in an audit of the rules on 2026-12-05). Now the key prefixes every field and
length, the shape of a certificate is checked before the cache is asked, and the wire form
refuses a TC whose counts do not match its bitmap.
"""

from __future__ import annotations

import pytest

from rayledger.block import QuorumCert
from rayledger.codec import u64
from rayledger.consensus import Proposal, Rejected, TimeoutCert, Vote
from rayledger.consensus.core import _cert_key
from rayledger.consensus.wire import decode_messages, encode_messages
from rayledger.errors import DecodeError
from tests.unit.consensus_harness import Keyring, Net, sent


def _forged(tc: TimeoutCert) -> TimeoutCert:
    """``tc`` with its high QC rounds moved into the signer bitmap's bytes."""
    moved = b"".join(u64(r) for r in tc.high_qc_rounds)
    return TimeoutCert(tc.round, tc.signers + moved, (), tc.signatures, tc.high_qc)


def _votes(actions: list) -> list[Vote]:
    return [m for _, m in sent(actions, Vote)]


@pytest.fixture(scope="module")
def keys() -> Keyring:
    return Keyring.make()


def test_cache_keys_of_a_tc_and_its_forgery_differ(keys: Keyring) -> None:
    tc = keys.tc(2, {0: 1, 2: 1, 3: 0})
    assert _cert_key(_forged(tc)) != _cert_key(tc)
    # Any other shuffle of bytes between fields, too
    shifted = TimeoutCert(tc.round, tc.signers + u64(tc.high_qc_rounds[0]), tc.high_qc_rounds[1:],
                          tc.signatures, tc.high_qc)  # fmt: skip
    assert _cert_key(shifted) != _cert_key(tc)
    qc = keys.qc(keys.block(keys.genesis, 1))
    sig_into_bitmap = QuorumCert(qc.block_hash, qc.round, qc.signers + qc.signatures[0],
                                 qc.signatures[1:])  # fmt: skip
    assert _cert_key(sig_into_bitmap) != _cert_key(qc)
    assert _cert_key(tc) == _cert_key(keys.tc(2, {0: 1, 2: 1, 3: 0}))


def test_a_forged_tc_gets_no_vote_after_the_genuine_one_was_verified(keys: Keyring) -> None:
    v1 = keys.core(1)
    v1.start()
    tc2 = keys.tc(2, {0: 1, 2: 1, 3: 0})  # two signers hold QC(1)
    v1.on_messages([keys.timeout(0, 3, keys.genesis_qc, tc2)])  # verified, and cached
    on_genesis = keys.block(keys.genesis, 3)
    # With the genuine TC, the vote rule refuses a block below the reported QC round 1
    assert not _votes(v1.on_messages([keys.propose(on_genesis, keys.genesis_qc, tc2)]))
    v1 = keys.core(1)
    v1.start()
    v1.on_messages([keys.timeout(0, 3, keys.genesis_qc, tc2)])
    voted = v1.highest_vote_round
    assert not _votes(v1.on_messages([keys.propose(on_genesis, keys.genesis_qc, _forged(tc2))]))
    assert v1.highest_vote_round == voted < 3


def test_the_wire_form_refuses_a_tc_whose_counts_do_not_match_its_bitmap(keys: Keyring) -> None:
    tc = keys.tc(2, {0: 1, 2: 1, 3: 0})
    block = keys.block(keys.genesis, 3)
    good = keys.propose(block, keys.genesis_qc, tc)
    assert decode_messages(encode_messages([good])) == [good]
    for bad in (
        _forged(tc),
        TimeoutCert(2, tc.signers, tc.high_qc_rounds[:2], tc.signatures, tc.high_qc),
        TimeoutCert(2, tc.signers, tc.high_qc_rounds, tc.signatures[:2], tc.high_qc),
        TimeoutCert(
            2,
            tc.signers,
            (*tc.high_qc_rounds, 0),
            (*tc.signatures, tc.signatures[0]),
            tc.high_qc,
        ),
    ):
        data = encode_messages([Proposal(block, keys.genesis_qc, bad, good.signature)])
        with pytest.raises(DecodeError, match=r"timeout certificate: \d signers"):
            decode_messages(data)


def test_a_tc_or_timeout_reporting_a_qc_not_below_its_round_is_refused(keys: Keyring) -> None:
    # The timeout rule only ever signs a timeout of round r with a QC below r
    b2 = keys.block(keys.genesis, 2)
    qc2 = keys.qc(b2)
    v1 = keys.core(1)
    v1.start()
    v1.on_messages([keys.timeout(0, 2, qc2)])
    assert v1.timeouts.get(2, {}) == {}
    tc = keys.tc(2, {0: 2, 2: 1, 3: 0})
    v1 = keys.core(1)
    v1.start()
    actions = v1.on_messages([keys.timeout(0, 3, keys.genesis_qc, tc)])
    assert v1.last_tc is None
    assert not v1.timeouts.get(3)
    assert actions


def test_one_byzantine_validator_cannot_fork_the_honest_ones_with_a_forged_tc(
    keys: Keyring,
) -> None:
    net = Net(keys)
    net.isolated = {0}  # v0 is Byzantine: its messages are made by hand
    net.start([1, 2, 3])

    def pump(drop: object = None) -> None:
        while net.queue:
            env = net.queue.pop(0)
            if env.dst != 0 and not (callable(drop) and drop(env)):
                net.deliver(env)

    def inject(dst: int, msg: object) -> None:
        net.execute(dst, net.cores[dst].on_messages([msg]))

    def cut_v3(env: object) -> bool:
        return env.dst == 3 or env.src == 3  # type: ignore[attr-defined]

    # Rounds 1 and 2 go well and v3 commits B1; round 3's proposal (v3's) is lost
    p1 = next(iter(net.proposals.values()))
    inject(2, keys.vote(0, p1.block.hash, 1))
    pump(lambda e: isinstance(e.message, Proposal) and e.message.round == 3)
    assert [p.block.hash for p in net.committed[3]] == [p1.block.hash]
    # v1 and v2 time out in rounds 2 and 3 with v0, cut off from v3: TC3 reports QC(1)
    for r in (2, 3):
        for i in (1, 2):
            if net.cores[i].round == r:
                net.fire(i)
        for i in (1, 2):
            inject(i, keys.timeout(0, r, keys.genesis_qc))
        pump(cut_v3)
    tc3 = net.cores[1].last_tc
    assert tc3 is not None and tc3.round == 3 and max(tc3.high_qc_rounds) >= 1
    # v0 leads round 4: X at height 1 on genesis, carrying TC3 forged, then votes for it
    x = keys.block(keys.genesis, 4, proposer=0)
    for i in (1, 2):
        inject(i, keys.propose(x, keys.genesis_qc, _forged(tc3)))
    inject(1, keys.vote(0, x.hash, 4))
    pump(cut_v3)
    for p in [p for p in net.proposals.values() if p.round == 5]:
        inject(2, keys.vote(0, p.block.hash, 5))
        pump(cut_v3)
    assert all(net.cores[i].highest_vote_round < 4 for i in (1, 2))
    first = {net.committed[i][0].block.hash for i in (1, 2, 3) if net.committed[i]}
    assert first == {p1.block.hash}


def test_a_tc_without_its_qc_or_with_a_lower_one_is_refused(keys: Keyring) -> None:
    """A TC carries the QC of its highest reported round: without it, or with one below that
    round, any round could be claimed without a QC behind it."""
    tc = keys.tc(2, {0: 1, 2: 1, 3: 0})
    block = keys.block(keys.chain(1)[0].block, 3)
    for bad in (
        TimeoutCert(2, tc.signers, tc.high_qc_rounds, tc.signatures, None),
        TimeoutCert(2, tc.signers, tc.high_qc_rounds, tc.signatures, keys.genesis_qc),
    ):
        v1 = keys.core(1)
        v1.start()
        p3 = keys.propose(block, keys.qc(keys.chain(1)[0].block), bad)
        assert v1.on_messages([p3]) == [Rejected("bad signature or certificate", 3)]
    v1 = keys.core(1)
    v1.start()
    good = keys.propose(block, keys.qc(keys.chain(1)[0].block), tc)
    assert _votes(v1.on_messages([good]))
