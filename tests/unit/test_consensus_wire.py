"""The canonical wire form of consensus messages and of the safety state: every message kind
round-trips exactly, and malformed bytes from a peer are a ``DecodeError`` naming the problem,
never an exception of another kind and never a message. (The core tests also send every
message they exchange through this wire form, see ``consensus_harness.Net._post``.)"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.codec import var_bytes
from rayledger.consensus import Message, SafetyState, SyncResponse
from rayledger.consensus.wire import (
    MAX_MESSAGE_BYTES,
    UnknownMessage,
    decode_message,
    decode_messages,
    decode_proposal,
    decode_safety,
    encode_message,
    encode_messages,
    encode_proposal,
    encode_safety,
)
from rayledger.consensus.wire import (
    _tc as _tc_bytes,
)
from rayledger.errors import DecodeError, TrailingBytes, TruncatedInput, UnknownVersion, WrongLength

from .consensus_harness import Keyring

KEYS = Keyring.make(4)


def samples() -> list[Message]:
    chain = KEYS.chain(3, digests={2: [bytes([7]) * 32, bytes([8]) * 32]})
    qc2 = KEYS.qc(chain[1].block)
    tc = KEYS.tc(4, {0: 2, 1: 3, 3: 2})
    after_tc = KEYS.propose(KEYS.block(chain[2].block, 5), qc2, tc)
    return [
        *chain,
        after_tc,
        KEYS.vote(2, chain[0].block.hash, 1),
        KEYS.timeout(1, 4, qc2),
        KEYS.timeout(3, 5, qc2, tc),
        KEYS.sync_request(3, chain[2].block.hash, 1, round_=7, nonce=(1 << 60) + 5),
        SyncResponse(tuple(chain), 0),
        SyncResponse((), 2),
    ]


def test_every_message_kind_round_trips() -> None:
    msgs = samples()
    assert decode_messages(encode_messages(msgs)) == msgs
    for m in msgs:
        assert decode_message(encode_message(m)) == m
    assert decode_proposal(encode_proposal(msgs[3])) == msgs[3]
    assert decode_messages(encode_messages([])) == []


def test_safety_state_round_trips() -> None:
    chain = KEYS.chain(2)
    tc = KEYS.tc(3, {0: 1, 1: 1, 2: 2})
    for state in (
        SafetyState(),
        SafetyState(5, 4, KEYS.qc(chain[1].block), None),
        SafetyState(9, 4, KEYS.qc(chain[1].block), tc),
    ):
        assert decode_safety(encode_safety(state)) == state
    with pytest.raises(UnknownVersion):
        decode_safety(b"\x03" + encode_safety(SafetyState())[1:])
    # Version 1 (before a TC carried its QC) is read, its TC dropped: peers would refuse it
    old_tc = encode_safety(SafetyState(9, 4, KEYS.qc(chain[1].block), tc))
    qc_part = len(var_bytes(tc.high_qc.encode()))  # type: ignore[union-attr]
    tc_len = int.from_bytes(old_tc[-len(_tc_bytes(tc)) - 4 : -len(_tc_bytes(tc))], "big")
    v1 = b"\x01" + old_tc[1 : -len(_tc_bytes(tc)) - 4]
    v1 += (tc_len - qc_part).to_bytes(4, "big") + _tc_bytes(tc)[:-qc_part]
    assert decode_safety(v1) == SafetyState(9, 4, KEYS.qc(chain[1].block), None)
    # version | highest vote round | highest QC round | has QC (0 or 1)
    raw = bytearray(encode_safety(SafetyState()))
    raw[17] = 2
    with pytest.raises(DecodeError, match="has qc flag 2"):
        decode_safety(bytes(raw))


def test_every_truncation_and_trailing_byte_is_a_decode_error() -> None:
    raw = encode_messages(samples())
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            decode_messages(raw[:cut])
    with pytest.raises(TrailingBytes):
        decode_messages(raw + b"\x00")
    one = encode_message(samples()[4])
    with pytest.raises(TrailingBytes):
        decode_message(one + b"\x00")
    with pytest.raises(TruncatedInput):
        decode_message(one[:-1])


def test_hostile_values_are_named() -> None:
    with pytest.raises(UnknownMessage, match="tag 9"):
        decode_message(b"\x09")
    proposal = encode_message(samples()[3])  # carries a TC: flip its has-tc flag to 2
    body = bytearray(proposal)
    # tag | var(header) | var(qc) | has_tc
    pos = 1
    for _ in range(2):
        pos += 4 + int.from_bytes(body[pos : pos + 4], "big")
    assert body[pos] == 1
    body[pos] = 2
    with pytest.raises(DecodeError, match="has tc flag 2"):
        decode_message(bytes(body))
    with pytest.raises(WrongLength, match="exceed"):
        decode_messages((1 << 20).to_bytes(4, "big"))
    huge_sync = b"\x05" + (0).to_bytes(4, "big") + (1 << 20).to_bytes(4, "big")
    with pytest.raises(WrongLength, match="sync response"):
        decode_message(huge_sync)
    with pytest.raises(TypeError):
        encode_message("not a message")  # type: ignore[arg-type]
    with pytest.raises(WrongLength, match="bytes of messages exceed"):
        decode_messages(bytes(MAX_MESSAGE_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 5))
def test_random_bytes_never_escape_as_another_error(data: bytes, tag: int) -> None:
    for raw in (data, bytes([tag]) + data):
        with contextlib.suppress(DecodeError):
            decode_message(raw)
