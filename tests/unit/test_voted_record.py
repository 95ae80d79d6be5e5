"""A validator's safety record keeps the proposals it voted for above its committed head, with
their batches (``Validator._safety_record``): after every validator restarted at once, the
block the highest QC certifies may be kept nowhere else (tests/actors/test_network.py kills
all four). Here, without Ray: the record's round trip, what it keeps and drops, and that the
record of the form before (the safety state alone) is still read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rayledger.actors.validator import SAFETY_WITH_VOTES, VOTED_KEEP, Validator
from rayledger.consensus import SafetyState
from rayledger.consensus.wire import decode_safety, encode_safety
from rayledger.crypto import key_from_seed
from rayledger.errors import DecodeError
from rayledger.tx import make_batch, validate_batch
from tests.unit.consensus_harness import Keyring

KEYS = Keyring.make()


def _bare(committed_height: int = 0) -> Validator:
    v = Validator.__new__(Validator)
    v.voted, v.voted_ipc, v.voted_batches, v.batches = {}, {}, {}, {}
    head = SimpleNamespace(height=committed_height)
    v.core = SimpleNamespace(committed=head)  # type: ignore[assignment]
    return v


def _batch(seed: int) -> object:
    key = key_from_seed(bytes([seed]) * 32)
    batch = make_batch(key, 2, range(3), [b"x" * seed] * 3, KEYS.chain_id)
    return validate_batch(batch, chain_id=KEYS.chain_id)


def test_voted_proposals_and_their_batches_survive_the_record() -> None:
    d1, d2, d3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    chain = KEYS.chain(3, {1: [d1], 2: [d2, d3]})
    v = _bare()
    v.batches = {d1: _batch(1), d2: _batch(2)}  # d3 is not held: peers must serve it
    state = SafetyState(2, 1, KEYS.qc(chain[0].block), None)
    v._safety_record(state, chain[0])
    record = v._safety_record(state, chain[1])
    assert record.startswith(SAFETY_WITH_VOTES)
    back = _bare()
    assert back._read_safety_record(record) == state
    assert list(back.voted) == [chain[0].block.hash, chain[1].block.hash]
    assert back.voted[chain[1].block.hash] == chain[1]
    assert set(back.voted_batches) == {d1, d2}
    assert back.voted_batches[d2].equals(v.batches[d2])
    # A timeout's record (no proposal) keeps them; one after a commit drops those below it
    v.core.committed.height = 1
    back = _bare()
    back._read_safety_record(v._safety_record(state, None))
    assert list(back.voted) == [chain[1].block.hash]
    assert set(back.voted_batches) == {d2}


def test_at_most_the_newest_few_are_kept() -> None:
    chain = KEYS.chain(VOTED_KEEP + 3)
    v = _bare()
    state = SafetyState(1, 0, None, None)
    for p in chain:
        record = v._safety_record(state, p)
    back = _bare()
    back._read_safety_record(record)
    assert list(back.voted) == [p.block.hash for p in chain[-VOTED_KEEP:]]


def test_the_record_of_the_form_before_is_the_state_alone() -> None:
    state = SafetyState(4, 3, KEYS.qc(KEYS.chain(1)[0].block), None)
    assert decode_safety(encode_safety(state)) == state
    assert not encode_safety(state).startswith(SAFETY_WITH_VOTES)


def test_a_torn_record_is_refused() -> None:
    v = _bare()
    record = v._safety_record(SafetyState(1, 0, None, None), KEYS.chain(1)[0])
    with pytest.raises(DecodeError):
        _bare()._read_safety_record(record[:-3])
