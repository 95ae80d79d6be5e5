"""``rayledger demo``: a whole chain on one machine, from keys to a verified receipt proof.

Validators and e-service clients get keys, clients sign transactions into one TxBatch,
every row is admitted (schema, limits, signature), blocks certified by real quorum
certificates are stored durably, the store is reopened and re-verified, and one
transaction's Merkle inclusion proof and commit certificate are checked.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from rayledger.actors.storage import BlockStore
from rayledger.block import (
    Block,
    BlockHeader,
    QuorumCert,
    build_block,
    make_bitmap,
    make_results,
    verify_qc,
    vote_message,
)
from rayledger.cluster.network import load_network, make_genesis
from rayledger.config import Genesis, load_genesis
from rayledger.crypto import SigningKey
from rayledger.merkle import inclusion_proof, verify_inclusion
from rayledger.tx import TxKind, make_batch, tx_ids_of, validate_batch, verify_signatures

_CLIENT_KINDS = (TxKind.ANCHOR, TxKind.PROVENANCE, TxKind.IDENTITY, TxKind.VOTE)


@dataclass(frozen=True)
class DemoResult:
    height: int
    transactions: int
    proof_ok: bool
    tamper_rejected: bool
    qc_ok: bool


def certify(
    genesis: Genesis, keys: dict[str, SigningKey], header: BlockHeader, skip: int
) -> QuorumCert:
    """A quorum certificate for ``header``: every validator but ``skip`` signs its vote."""
    vs = genesis.validators
    signers = [i for i in range(vs.n) if i != skip % vs.n][: vs.quorum]
    msg = vote_message(genesis.chain_id, header.hash, header.round)
    sigs = tuple(keys[vs.validators[i].name].sign(msg) for i in signers)
    return QuorumCert(header.hash, header.round, make_bitmap(signers, vs.n), sigs)


def client_batch(
    genesis: Genesis, clients: list[tuple[str, SigningKey]], count: int
) -> pa.RecordBatch:
    """``count`` signed e-service transactions, round-robin over the clients."""
    signers = [clients[i % len(clients)][1] for i in range(count)]
    kinds = [_CLIENT_KINDS[i % len(clients) % len(_CLIENT_KINDS)] for i in range(count)]
    nonces = [i // len(clients) for i in range(count)]
    payloads = [
        hashlib.sha256(f"{clients[i % len(clients)][0]} record {i}".encode()).digest()
        + f'{{"seq":{i},"doc":"record-{i}.pdf"}}'.encode()
        for i in range(count)
    ]
    return make_batch(signers, kinds, nonces, payloads, genesis.chain_id)


def run_demo(
    console: Console,
    config: Path,
    data_dir: Path | None = None,
    txs: int = 10_000,
    block_size: int = 2_500,
) -> DemoResult:
    with tempfile.TemporaryDirectory(prefix="rayledger-demo-") as tmp:
        return _run(console, config, data_dir or Path(tmp), txs, block_size)


def _run(console: Console, config: Path, data: Path, txs: int, block_size: int) -> DemoResult:
    spec = load_network(config)
    data.mkdir(parents=True, exist_ok=True)
    genesis, keys = make_genesis(spec, int(time.time() * 1000), keys_dir=data / "keys")
    genesis.save(data / "genesis.toml")
    genesis = load_genesis(data / "genesis.toml")
    vs = genesis.validators
    console.print(
        f"[bold]chain[/] {genesis.chain_name} {genesis.chain_id.hex()[:16]}…  "
        f"validators n={vs.n} f={vs.f} quorum={vs.quorum}  keys in {data / 'keys'}"
    )

    t0 = time.perf_counter()
    clients = [(c.name, keys[c.name]) for c in spec.clients]
    batch = client_batch(genesis, clients, txs)
    t_sign = time.perf_counter() - t0
    t0 = time.perf_counter()
    admitted = validate_batch(
        batch, chain_id=genesis.chain_id, max_payload=genesis.limits.max_payload_bytes
    )
    ok = verify_signatures(admitted, genesis.chain_id)
    admitted = admitted.filter(pa.array(ok))
    t_verify = time.perf_counter() - t0
    console.print(
        f"{len(clients)} e-service clients signed {txs:,} transactions in {t_sign:.2f} s; "
        f"{admitted.num_rows:,} admitted after schema, limit and signature checks in "
        f"{t_verify:.2f} s"
    )

    store_dir = data / "store"
    t0 = time.perf_counter()
    parent = genesis.header
    qc = QuorumCert.genesis(parent.hash)
    blocks: list[Block] = []
    with BlockStore(store_dir, genesis.header) as store:
        for start in range(0, admitted.num_rows, block_size):
            body = admitted.slice(start, block_size)
            height = parent.height + 1
            proposer = vs.validators[height % vs.n]
            # No executor yet: every admitted row is recorded with status 0 and no output.
            results = make_results(np.zeros(body.num_rows, np.uint8), [b""] * body.num_rows)
            block = build_block(
                parent,
                body,
                results,
                round_=height,
                proposer=proposer.public_key,
                timestamp_ms=genesis.genesis_time_ms + height,
                parent_qc=qc,
            )
            verify_qc(
                block.parent_qc, vs.public_keys, vs.quorum, genesis.chain_id, genesis.header.hash
            )
            store.append(block)
            blocks.append(block)
            parent = block.header
            qc = certify(genesis, keys, parent, skip=height)
    t_store = time.perf_counter() - t0
    commit_qc = qc

    t0 = time.perf_counter()
    with BlockStore(store_dir, genesis.header) as store:
        t_reopen = time.perf_counter() - t0
        table = Table(title=f"blocks in {store_dir} (reopened and verified in {t_reopen:.2f} s)")
        for col in ("height", "round", "proposer", "txs", "tx_root", "block hash", "parent QC"):
            table.add_column(col, justify="right" if col in ("height", "round", "txs") else "left")
        names = {v.public_key: v.name for v in vs.validators}
        for h in range(1, store.height + 1):
            b = store.get_block(h)
            signers = b.parent_qc.signer_indices()
            table.add_row(
                str(h),
                str(b.header.round),
                names[b.header.proposer],
                f"{b.header.tx_count:,}",
                b.header.tx_root.hex()[:16],
                b.hash.hex()[:16],
                "genesis" if not signers else ",".join(vs.validators[i].name for i in signers),
            )
        console.print(table)

        tx_id = tx_ids_of(admitted)[admitted.num_rows * 2 // 3].tobytes()
        loc, row = store.get_tx(tx_id)
        block = store.get_block(loc.height)
        proof = inclusion_proof(tx_ids_of(block.txs), loc.index)
        proof_ok = verify_inclusion(
            tx_id, loc.index, block.header.tx_count, proof, block.header.tx_root
        )
        forged = bytearray(tx_id)
        forged[0] ^= 1
        tamper_rejected = not verify_inclusion(
            bytes(forged), loc.index, block.header.tx_count, proof, block.header.tx_root
        )
        cert = store.get_block(loc.height + 1).parent_qc if loc.height < store.height else commit_qc
        verify_qc(cert, vs.public_keys, vs.quorum, genesis.chain_id, genesis.header.hash)
        qc_ok = cert.block_hash == block.hash
        sig_ok = bool(verify_signatures(row, genesis.chain_id)[0])
        console.print(
            f"[bold]receipt[/] tx {tx_id.hex()[:16]}… at height {loc.height} index {loc.index}: "
            f"signature {'valid' if sig_ok else 'INVALID'}, inclusion proof of {len(proof)} "
            f"hashes {'verifies' if proof_ok else 'FAILS'} against tx_root "
            f"{block.header.tx_root.hex()[:16]}…, a forged tx id is "
            f"{'rejected' if tamper_rejected else 'ACCEPTED'}, block certified by "
            f"{len(cert.signer_indices())}/{vs.n} validators "
            f"{'(QC verified)' if qc_ok else '(QC MISMATCH)'}"
        )
        console.print(
            f"stored {len(blocks)} blocks ({admitted.num_rows:,} transactions) durably in "
            f"{t_store:.2f} s"
        )
        return DemoResult(
            store.height, admitted.num_rows, proof_ok and sig_ok, tamper_rejected, qc_ok
        )
