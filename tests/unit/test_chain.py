"""The executing block builder: two validators agree on every header field; a proposal whose
payload fields disagree with re-execution is refused with the field named; commits fold state.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pyarrow as pa
import pytest

from rayledger import block as block_module
from rayledger import chain
from rayledger.block import QuorumCert, check_block, genesis_header, result_leaf_hashes
from rayledger.chain import LedgerBuilder, batch_digest
from rayledger.crypto import key_from_seed, public_bytes
from rayledger.execution import Account, balance_key, genesis_state
from rayledger.merkle import merkle_root, merkle_root_of_leaf_hashes
from rayledger.tx import TxKind, make_batch, tx_ids_of

CHAIN = bytes(range(32))
A, B = key_from_seed(b"\x01" * 32), key_from_seed(b"\x02" * 32)
PA, PB = public_bytes(A), public_bytes(B)
PROPOSER = public_bytes(key_from_seed(b"\x09" * 32))


def setup() -> tuple[dict[bytes, object], object, list[bytes]]:
    base, root = genesis_state([Account(PA, 1000)])
    genesis = genesis_header(CHAIN, 1, root)
    b1 = make_batch(A, TxKind.TRANSFER, range(0, 5), [PB + struct.pack(">Q", 10)] * 5, CHAIN)
    b2 = make_batch(A, TxKind.ANCHOR, range(5, 8), [bytes([i]) * 32 for i in range(3)], CHAIN)
    batches = {batch_digest(b): b for b in (b1, b2)}
    return batches, genesis, list(batches)


def fresh(batches, genesis) -> LedgerBuilder:
    base, _ = genesis_state([Account(PA, 1000)])
    return LedgerBuilder(batches, genesis, base)


def test_batch_digest_is_merkle_root_of_ids() -> None:
    batches, _, digests = setup()
    assert digests[0] == merkle_root(tx_ids_of(batches[digests[0]]))


def test_two_validators_agree_and_block_is_storable() -> None:
    batches, genesis, digests = setup()
    leader, voter = fresh(batches, genesis), fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    assert header.tx_count == 8
    assert voter.check(header, genesis) is None
    block = voter.commit(header.hash, QuorumCert.genesis(genesis.hash))
    check_block(block, genesis)
    assert block.results.column("status").to_pylist() == [0] * 8
    assert voter.base.get_u64(balance_key(PB)) == 50


def test_check_refuses_a_header_differing_elsewhere_and_build_needs_an_executed_parent() -> None:
    batches, genesis, digests = setup()
    leader, voter = fresh(batches, genesis), fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    forged = dataclasses.replace(header, height=5)
    assert voter.check(forged, genesis) == "header differs from this validator's execution"
    assert voter.check(header, genesis) is None
    with pytest.raises(KeyError, match="parent block has not been executed here"):
        voter.build(forged, 2, PROPOSER, 3, ())


@pytest.mark.parametrize("field", ["tx_root", "result_root", "state_root", "tx_count"])
def test_check_names_the_field_that_differs(field: str) -> None:
    batches, genesis, digests = setup()
    leader, voter = fresh(batches, genesis), fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    value = 99 if field == "tx_count" else b"\x00" * 32
    forged = dataclasses.replace(header, **{field: value})
    assert voter.check(forged, genesis) == f"{field} differs from this validator's execution"
    # The refused execution left nothing behind.
    assert voter.check(header, genesis) is None


def test_a_header_built_here_is_not_executed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    batches, genesis, digests = setup()
    leader = fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    forged = dataclasses.replace(header, state_root=b"\x00" * 32)
    other = leader.build(genesis, 7, PROPOSER, 5, ())
    runs = []
    real = chain.execute_block

    def counted(*args: object) -> object:
        runs.append(1)
        return real(*args)

    monkeypatch.setattr(chain, "execute_block", counted)
    # The leader checking its own proposal: the execution that built it stands
    assert leader.check(header, genesis) is None
    assert runs == []
    # Any other header is executed, even one differing from it in a single field
    assert leader.check(forged, genesis) == "state_root differs from this validator's execution"
    assert runs == [1]
    # and the refused one is not remembered as built
    assert leader.check(forged, genesis) == "state_root differs from this validator's execution"
    assert runs == [1, 1]
    # Known, but checked as the child of another block: executed, and refused
    refused = leader.check(header, other)
    assert refused is not None and refused.endswith("differs from this validator's execution")
    assert runs == [1, 1, 1]
    block = leader.commit(header.hash, QuorumCert.genesis(genesis.hash))
    check_block(block, genesis)


def test_a_refused_header_does_not_forget_the_accepted_one() -> None:
    # A Byzantine leader's second proposal repeats the accepted one but for one root: its
    # check re-derives the accepted header, and refusing it must keep that execution
    batches, genesis, digests = setup()
    leader, voter = fresh(batches, genesis), fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    assert voter.check(header, genesis) is None
    forged = dataclasses.replace(header, result_root=b"\x01" * 32)
    assert voter.check(forged, genesis) == "result_root differs from this validator's execution"
    child = leader.build(header, 2, PROPOSER, 3, ())
    assert voter.check(child, header) is None
    block = voter.commit(header.hash, QuorumCert.genesis(genesis.hash))
    check_block(block, genesis)


def test_result_leaves_of_a_built_block_are_those_of_its_result_root() -> None:
    batches, genesis, digests = setup()
    leader = fresh(batches, genesis)
    header = leader.build(genesis, 1, PROPOSER, 2, tuple(digests))
    leaves = leader.result_leaves_of(header.hash)
    block = leader.commit(header.hash, QuorumCert.genesis(genesis.hash))
    assert leaves.shape == (8, 32)
    assert np.array_equal(leaves, result_leaf_hashes(tx_ids_of(block.txs), block.results))
    assert merkle_root_of_leaf_hashes(leaves) == header.result_root


@pytest.mark.parametrize("which", [(0,), (1,), (0, 1), ()])
def test_the_tx_root_is_the_root_of_the_ids_and_one_batch_is_not_hashed_again(
    which: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches, genesis, digests = setup()
    named = tuple(digests[i] for i in which)
    ids = [tx_ids_of(batches[d]) for d in named]
    expected = merkle_root(np.concatenate(ids) if ids else np.empty((0, 32), np.uint8))
    hashed: list[int] = []

    def counting(ids: np.ndarray) -> bytes:
        hashed.append(len(ids))
        return block_module.kernel_merkle_root(np.asarray(ids, np.uint8).reshape(-1, 32))

    monkeypatch.setattr(block_module, "compute_tx_root", counting)
    header = fresh(batches, genesis).build(genesis, 1, PROPOSER, 2, named)
    assert header.tx_root == expected
    # A block of exactly one batch takes its digest (the root of its ids) as its tx root
    assert hashed == ([] if len(named) == 1 else [header.tx_count])


def test_check_refuses_unknown_parent_and_missing_batch() -> None:
    batches, genesis, digests = setup()
    leader = fresh(batches, genesis)
    h1 = leader.build(genesis, 1, PROPOSER, 2, (digests[0],))
    h2 = leader.build(h1, 2, PROPOSER, 3, (digests[1],))
    assert fresh(batches, genesis).check(h2, h1) == "parent state unknown"
    partial = fresh({digests[0]: batches[digests[0]]}, genesis)
    assert partial.check(leader.build(genesis, 1, PROPOSER, 2, (digests[1],)), genesis) == (
        "a named batch is not held"
    )


def test_speculative_branches_then_commit_in_order() -> None:
    batches, genesis, digests = setup()
    v = fresh(batches, genesis)
    h1 = v.build(genesis, 1, PROPOSER, 2, (digests[0],))
    fork = v.build(genesis, 2, PROPOSER, 3, (digests[1],))
    h2 = v.build(h1, 2, PROPOSER, 3, (digests[1],))
    assert h2.state_root != fork.state_root
    with pytest.raises(ValueError):
        v.commit(h2.hash, QuorumCert.genesis(genesis.hash))
    v.commit(h1.hash, QuorumCert.genesis(genesis.hash))
    v.commit(h2.hash, QuorumCert(h1.hash, 1, b"\x07", (bytes(64),) * 3))
    assert v.head == h2
    assert v.base.get_u64(balance_key(PA)) == 950
    with pytest.raises(KeyError):
        v.commit(fork.hash, QuorumCert.genesis(genesis.hash))


def test_admit_batch_accepts_a_sound_batch_and_names_each_problem() -> None:
    from rayledger.chain import admit_batch
    from rayledger.errors import InvalidBatch, InvalidSignature, SchemaMismatch

    batches, _, digests = setup()
    good = batches[digests[0]]
    kw = {"chain_id": CHAIN, "max_payload": 1024}
    assert admit_batch(good, digests[0], **kw).equals(good)
    with pytest.raises(InvalidBatch, match="digest"):
        admit_batch(good, digests[1], **kw)
    ids = good.column("tx_id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    swapped = good.set_column(5, "tx_id", pa.array(ids, pa.binary(32)))
    with pytest.raises(InvalidBatch, match="tx_id column"):
        admit_batch(swapped, digests[0], **kw)
    sigs = good.column("signature").to_pylist()
    sigs[2] = bytes([sigs[2][0] ^ 1]) + sigs[2][1:]
    forged = good.set_column(4, "signature", pa.array(sigs, pa.binary(64)))
    with pytest.raises(InvalidSignature, match="row 2"):
        admit_batch(forged, digests[0], **kw)
    with pytest.raises(SchemaMismatch):
        admit_batch(good.drop_columns(["nonce"]), digests[0], **kw)


def test_a_large_batch_of_forged_rows_is_refused_on_a_sample_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch is refused whole for one bad signature: in a large batch, a random sample is
    verified first, then the other rows, so a flood of forged rows costs its samples (a forged
    row costs about three sound ones to verify) and a sound batch each row once; one bad row
    the sample misses is still found, and named."""
    from rayledger.chain import SPOT_MIN_ROWS, SPOT_ROWS, admit_batch
    from rayledger.errors import InvalidSignature

    n = SPOT_MIN_ROWS + 88
    good = make_batch(A, TxKind.ANCHOR, range(n), [bytes([i % 256]) * 32 for i in range(n)], CHAIN)
    digest = batch_digest(good)
    checked: list[int] = []
    verify = chain.verify_signatures

    def counting(batch, chain_id, *, ids, rows=None):  # type: ignore[no-untyped-def]
        checked.append(batch.num_rows if rows is None else len(rows))
        return verify(batch, chain_id, ids=ids, rows=rows)

    monkeypatch.setattr(chain, "verify_signatures", counting)
    kw = {"chain_id": CHAIN, "max_payload": 1024}

    def forge(rows: range | list[int]) -> pa.RecordBatch:
        sigs = np.frombuffer(good.column("signature").buffers()[1], np.uint8).reshape(n, 64).copy()
        sigs[list(rows), 7] ^= 1
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(64), n, [None, pa.py_buffer(sigs)])
        return good.set_column(good.schema.get_field_index("signature"), "signature", column)

    assert admit_batch(good, digest, **kw).equals(good)
    assert checked == [SPOT_ROWS, n - SPOT_ROWS]  # a sound batch: its sample, then the rest
    checked.clear()
    with pytest.raises(InvalidSignature, match=r"row \d+ of the batch"):
        admit_batch(forge(range(n)), digest, **kw)
    assert checked == [SPOT_ROWS]  # every row forged: the sample finds it
    for bad in (0, 1, n // 2, n - 1, n - 1):  # one forged row: the sample or the rest finds it
        checked.clear()
        with pytest.raises(InvalidSignature, match=f"row {bad} of the batch"):
            admit_batch(forge([bad]), digest, **kw)
        assert checked in ([SPOT_ROWS], [SPOT_ROWS, n - SPOT_ROWS])
    # Two: the one in the sample, or the first where the sample holds neither
    monkeypatch.setattr(chain, "_spot_rng", np.random.default_rng(5))
    spot = set(np.random.default_rng(5).choice(n, SPOT_ROWS, replace=False).tolist())
    first, second = sorted(set(range(n)) - spot)[:: n // 3][1:3]
    for forged, named in (([first, second], first), ([first, min(spot)], min(spot))):
        monkeypatch.setattr(chain, "_spot_rng", np.random.default_rng(5))
        with pytest.raises(InvalidSignature, match=f"row {named} of the batch"):
            admit_batch(forge(forged), digest, **kw)
    # Below SPOT_MIN_ROWS rows: one check of every row
    small = good.slice(0, SPOT_MIN_ROWS - 1)
    checked.clear()
    assert admit_batch(small, batch_digest(small), **kw).num_rows == SPOT_MIN_ROWS - 1
    assert checked == [SPOT_MIN_ROWS - 1]
