"""The canonical wire form of consensus messages and of the persisted safety state.

Validators of different institutions exchange bytes, never language objects: a peer's message
is parsed here, and every malformation raises a ``DecodeError`` naming the field, before the
core sees anything (the core then checks signatures and semantics). The same encodings are
what a validator persists (its safety state, the proposals it keeps), so the files do not
depend on Python's object serialization either.

Layout (big-endian integers; ``var`` is a u32 length followed by the bytes)::

    messages     u32 count | count x var(message)
    message      u8 tag | body
    1 Proposal   var(header) | var(qc) | u8 has_tc | [var(tc)] | signature 64
    2 Vote       block_hash 32 | u64 round | u32 voter | signature 64
    3 Timeout    u64 round | var(high_qc) | u32 sender | signature 64 | u8 has_tc | [var(tc)]
    4 SyncReq    block_hash 32 | u32 requester | u64 from_height | u64 round | u64 nonce
                 | signature 64
    5 SyncResp   u32 sender | u32 count | count x var(proposal body)
    tc           u64 round | u16 bitmap_len | bitmap | u16 count | count x u64 high_qc_round
                 | u16 count | count x signature 64 | var(qc: the highest reported)
    safety       u8 version | u64 highest_vote_round | u64 highest_qc_round
                 | u8 has_qc | [var(qc)] | u8 has_tc | [var(tc)]
"""

from __future__ import annotations

from collections.abc import Sequence

from rayledger.block import BlockHeader, QuorumCert
from rayledger.codec import Reader, u8, u16, u32, u64, var_bytes
from rayledger.consensus.messages import (
    Message,
    Proposal,
    SafetyState,
    SyncRequest,
    SyncResponse,
    TimeoutCert,
    TimeoutMsg,
    Vote,
    bitmap_count,
)
from rayledger.errors import DecodeError, UnknownVersion, WrongLength

_PROPOSAL, _VOTE, _TIMEOUT, _SYNC_REQUEST, _SYNC_RESPONSE = 1, 2, 3, 4, 5
SAFETY_VERSION = 2
# Bounds checked before anything is allocated
MAX_MESSAGES = 1 << 16
MAX_SYNC_PROPOSALS = 1 << 12
MAX_MESSAGE_BYTES = 1 << 26
_MAX_PART = 1 << 24


class UnknownMessage(DecodeError):
    code = "unknown_message"


def _tc(tc: TimeoutCert) -> bytes:
    if tc.high_qc is None:
        raise ValueError("a timeout certificate carries the highest QC its signers reported")
    return b"".join(
        [
            u64(tc.round),
            u16(len(tc.signers)),
            tc.signers,
            u16(len(tc.high_qc_rounds)),
            *(u64(r) for r in tc.high_qc_rounds),
            u16(len(tc.signatures)),
            *tc.signatures,
            var_bytes(tc.high_qc.encode()),
        ]
    )


def _read_tc(r: Reader, *, with_qc: bool = True) -> TimeoutCert:
    """``with_qc``: False for a version 1 safety state, written before TCs carried their QC."""
    inner = Reader(r.var_bytes("timeout certificate", _MAX_PART), "timeout certificate")
    round_ = inner.u64("round")
    signers = inner.fixed(inner.u16("bitmap length"), "signer bitmap")
    rounds = tuple(inner.u64("high qc round") for _ in range(inner.u16("high qc rounds")))
    sigs = tuple(inner.fixed(64, "signature") for _ in range(inner.u16("signatures")))
    high_qc = QuorumCert.decode(inner.var_bytes("tc high qc", _MAX_PART)) if with_qc else None
    inner.finish()
    # One high QC round and one signature per signer, as a QC's signatures are tied to its
    # bitmap: the counts are separate fields only for the reader's sake
    count = bitmap_count(signers)
    if len(rounds) != count or len(sigs) != count:
        raise DecodeError(
            f"timeout certificate: {count} signers, {len(rounds)} high qc rounds,"
            f" {len(sigs)} signatures"
        )
    return TimeoutCert(round_, signers, rounds, sigs, high_qc)


def _optional_tc(tc: TimeoutCert | None) -> bytes:
    return u8(0) if tc is None else u8(1) + var_bytes(_tc(tc))


def _read_optional_tc(r: Reader, *, with_qc: bool = True) -> TimeoutCert | None:
    flag = r.u8("has tc")
    if flag > 1:
        raise DecodeError(f"has tc flag {flag}")
    return _read_tc(r, with_qc=with_qc) if flag else None


def _proposal(p: Proposal) -> bytes:
    return b"".join(
        [var_bytes(p.block.encode()), var_bytes(p.qc.encode()), _optional_tc(p.tc), p.signature]
    )


def _read_proposal(r: Reader) -> Proposal:
    block = BlockHeader.decode(r.var_bytes("block header", _MAX_PART))
    qc = QuorumCert.decode(r.var_bytes("qc", _MAX_PART))
    tc = _read_optional_tc(r)
    return Proposal(block, qc, tc, r.fixed(64, "signature"))


def encode_message(msg: Message) -> bytes:
    match msg:
        case Proposal():
            return u8(_PROPOSAL) + _proposal(msg)
        case Vote():
            return b"".join(
                [u8(_VOTE), msg.block_hash, u64(msg.round), u32(msg.voter), msg.signature]
            )
        case TimeoutMsg():
            return b"".join(
                [
                    u8(_TIMEOUT),
                    u64(msg.round),
                    var_bytes(msg.high_qc.encode()),
                    u32(msg.sender),
                    msg.signature,
                    _optional_tc(msg.last_tc),
                ]
            )
        case SyncRequest():
            return b"".join(
                [
                    u8(_SYNC_REQUEST),
                    msg.block_hash,
                    u32(msg.requester),
                    u64(msg.from_height),
                    u64(msg.round),
                    u64(msg.nonce),
                    msg.signature,
                ]
            )
        case SyncResponse():
            return b"".join(
                [
                    u8(_SYNC_RESPONSE),
                    u32(msg.sender),
                    u32(len(msg.proposals)),
                    *(var_bytes(_proposal(p)) for p in msg.proposals),
                ]
            )
    raise TypeError(f"not a consensus message: {type(msg).__name__}")


def decode_message(data: bytes | memoryview) -> Message:
    """One message; any malformation raises a ``DecodeError`` naming what is wrong."""
    r = Reader(data, "consensus message")
    tag = r.u8("tag")
    msg: Message
    if tag == _PROPOSAL:
        msg = _read_proposal(r)
    elif tag == _VOTE:
        msg = Vote(r.fixed(32, "block hash"), r.u64("round"), r.u32("voter"), r.fixed(64, "sig"))
    elif tag == _TIMEOUT:
        round_ = r.u64("round")
        high_qc = QuorumCert.decode(r.var_bytes("high qc", _MAX_PART))
        sender = r.u32("sender")
        signature = r.fixed(64, "signature")
        msg = TimeoutMsg(round_, high_qc, sender, signature, _read_optional_tc(r))
    elif tag == _SYNC_REQUEST:
        msg = SyncRequest(
            r.fixed(32, "block hash"),
            r.u32("requester"),
            r.u64("from height"),
            r.u64("round"),
            r.u64("nonce"),
            r.fixed(64, "signature"),
        )
    elif tag == _SYNC_RESPONSE:
        sender = r.u32("sender")
        count = r.u32("proposal count")
        if count > MAX_SYNC_PROPOSALS:
            raise WrongLength(f"sync response of {count} proposals exceeds {MAX_SYNC_PROPOSALS}")
        proposals = []
        for _ in range(count):
            inner = Reader(r.var_bytes("proposal", _MAX_PART), "proposal")
            proposals.append(_read_proposal(inner))
            inner.finish()
        msg = SyncResponse(tuple(proposals), sender)
    else:
        raise UnknownMessage(f"message tag {tag}")
    r.finish()
    return msg


def encode_messages(messages: Sequence[Message]) -> bytes:
    return u32(len(messages)) + b"".join(var_bytes(encode_message(m)) for m in messages)


def decode_messages(data: bytes | memoryview) -> list[Message]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise WrongLength(f"{len(data)} bytes of messages exceed {MAX_MESSAGE_BYTES}")
    r = Reader(data, "consensus messages")
    count = r.u32("count")
    if count > MAX_MESSAGES:
        raise WrongLength(f"{count} messages exceed {MAX_MESSAGES}")
    out = [decode_message(r.var_bytes("message", MAX_MESSAGE_BYTES)) for _ in range(count)]
    r.finish()
    return out


def encode_proposal(p: Proposal) -> bytes:
    return _proposal(p)


def decode_proposal(data: bytes | memoryview) -> Proposal:
    r = Reader(data, "proposal")
    p = _read_proposal(r)
    r.finish()
    return p


def encode_safety(state: SafetyState) -> bytes:
    return b"".join(
        [
            u8(SAFETY_VERSION),
            u64(state.highest_vote_round),
            u64(state.highest_qc_round),
            u8(0) if state.high_qc is None else u8(1) + var_bytes(state.high_qc.encode()),
            _optional_tc(state.last_tc),
        ]
    )


def decode_safety(data: bytes | memoryview) -> SafetyState:
    r = Reader(data, "safety state")
    version = r.u8("version")
    if version not in (1, SAFETY_VERSION):
        raise UnknownVersion(f"safety state version {version} (supported: 1, {SAFETY_VERSION})")
    hvr, hqr = r.u64("highest vote round"), r.u64("highest qc round")
    flag = r.u8("has qc")
    if flag > 1:
        raise DecodeError(f"has qc flag {flag}")
    high_qc = QuorumCert.decode(r.var_bytes("high qc", _MAX_PART)) if flag else None
    last_tc = _read_optional_tc(r, with_qc=version > 1)
    r.finish()
    # Version 1's TC lacks its QC, and peers refuse such a TC: a validator restarted from it
    # enters the round after its high QC and times out again, its votes still guarded
    return SafetyState(hvr, hqr, high_qc, last_tc if version > 1 else None)
