"""``rayledger demo``: a whole chain on one machine, from keys to a verified receipt proof.

Validators and e-service clients get keys, clients sign transactions into one TxBatch,
every row is admitted (schema, limits, signature), blocks certified by real quorum
certificates are stored durably, the store is reopened and re-verified, and one
transaction's Merkle inclusion proof and commit certificate are checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from rayledger.actors.storage import BlockStore, TxLocation
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
from rayledger.execution import Status
from rayledger.merkle import inclusion_proof, verify_inclusion
from rayledger.tx import TxKind, make_batch, tx_ids_of, validate_batch, verify_signatures

_CLIENT_KINDS = (TxKind.ANCHOR,)  # records anchored (the kinds executed: tx.EXECUTED_KINDS)


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


def check_receipt(
    console: Console,
    store: BlockStore,
    genesis: Genesis,
    tx_id: bytes,
    head_qc: QuorumCert | None = None,
    height: int | None = None,
) -> tuple[bool, bool, bool]:
    """Check one transaction the way an auditor holding only the validator keys would: its
    signature, its inclusion proof against the block's tx root, and the QC certifying the
    block (the next block's parent QC, or ``head_qc`` for the last block).

    Returns (signature and proof verify, a forged id is refused, the QC is valid for it)."""
    vs = genesis.validators
    if height is None:
        loc, row = store.get_tx(tx_id)
        block = store.get_block(loc.height)
    else:  # a store without a transaction index (its shards keep it): the height is known
        block = store.get_block(height)
        ids = tx_ids_of(block.txs)
        index = int(np.flatnonzero((ids == np.frombuffer(tx_id, np.uint8)).all(axis=1))[0])
        loc, row = TxLocation(height, index), block.rows().slice(index, 1)
    proof = inclusion_proof(tx_ids_of(block.txs), loc.index)
    proof_ok = verify_inclusion(
        tx_id, loc.index, block.header.tx_count, proof, block.header.tx_root
    )
    forged = bytes([tx_id[0] ^ 1]) + tx_id[1:]
    tamper_rejected = not verify_inclusion(
        forged, loc.index, block.header.tx_count, proof, block.header.tx_root
    )
    cert = store.get_block(loc.height + 1).parent_qc if loc.height < store.height else head_qc
    qc_ok = False
    if cert is not None:
        verify_qc(cert, vs.public_keys, vs.quorum, genesis.chain_id, genesis.header.hash)
        qc_ok = cert.block_hash == block.hash
    sig_ok = bool(verify_signatures(row, genesis.chain_id)[0])
    status = Status(int(row.column("status")[0].as_py())).name
    console.print(
        f"[bold]receipt[/] tx {tx_id.hex()[:16]}… at height {loc.height} index {loc.index} "
        f"(status {status}): signature {'valid' if sig_ok else 'INVALID'}, inclusion proof of "
        f"{len(proof)} hashes {'verifies' if proof_ok else 'FAILS'} against tx_root "
        f"{block.header.tx_root.hex()[:16]}…, a forged tx id is "
        f"{'rejected' if tamper_rejected else 'ACCEPTED'}, block certified by "
        + (
            f"{len(cert.signer_indices())}/{vs.n} validators "
            f"{'(QC verified)' if qc_ok else '(QC MISMATCH)'}"
            if cert
            else "no QC yet"
        )
    )
    return proof_ok and sig_ok, tamper_rejected, qc_ok


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
            # Not executed here (this demo builds blocks by hand): status 0, no output.
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
        receipt = check_receipt(console, store, genesis, tx_id, commit_qc)
        console.print(
            f"stored {len(blocks)} blocks ({admitted.num_rows:,} transactions) durably in "
            f"{t_store:.2f} s"
        )
        return DemoResult(store.height, admitted.num_rows, *receipt)


def run_network_demo(console: Console, config: Path, txs: int = 20_000) -> DemoResult:
    """The network on Ray: submit from every client, watch commits, kill a validator, keep
    committing, restart it, watch it catch up, stop, and audit a receipt from the disk."""

    import ray

    from rayledger.cluster.local import Network, NetworkOptions, init_local_ray
    from rayledger.tx import TxKind, make_batch

    spec = load_network(config)
    with tempfile.TemporaryDirectory(prefix="rayledger-demo-") as tmp:
        t_start = time.perf_counter()
        init_local_ray(spec)
        try:
            net = Network.create(
                spec, Path(tmp), NetworkOptions(name="demo", base_timeout_ms=500, batch_rows=2_500)
            )
            vs = net.genesis.validators
            console.print(
                f"[bold]network[/] {net.genesis.chain_name}: {vs.n} validators on sites "
                f"{', '.join(net.settings['sites'])} (n={vs.n}, f={vs.f}), emulated WAN "
                f"{max(max(r) for r in net.settings['latency_ms']):.0f} ms max, up in "
                f"{time.perf_counter() - t_start:.1f} s"
            )

            def wave(label: str, first_nonce: int, count: int, mempools: list[int]) -> list:
                per = count // len(net.clients)
                batches = []
                to = net.genesis.accounts[0].public_key
                for k, name in enumerate(net.clients):
                    key = net.client_key(name)
                    nonces = range(first_nonce, first_nonce + per)
                    if k == 1:  # one client pays another; the rest anchor records
                        payloads = [to + (1).to_bytes(8, "big")] * per
                        batches.append(
                            make_batch(key, TxKind.TRANSFER, nonces, payloads, net.chain_id)
                        )
                    else:
                        payloads = [
                            hashlib.sha256(f"{name}/{i}".encode()).digest() + b'{"doc":"record"}'
                            for i in nonces
                        ]
                        batches.append(
                            make_batch(key, TxKind.ANCHOR, nonces, payloads, net.chain_id)
                        )
                t0 = time.perf_counter()
                for k, b in enumerate(batches):
                    for start in range(0, b.num_rows, 2_500):
                        net.submit(b.slice(start, 2_500), mempool=mempools[k % len(mempools)])
                for b in batches:
                    net.wait_committed(b, timeout_s=300)
                took = time.perf_counter() - t0
                heights = {i: net.height(i) for i in net.live()}
                console.print(
                    f"{label}: {count:,} transactions from {len(batches)} e-service clients "
                    f"committed on every live validator in {took:.1f} s ({count / took:,.0f} tx/s);"
                    f" heights {heights}"
                )
                return batches

            quarter = max(4, txs // 4)
            per_client = quarter // len(net.clients)  # nonces each client uses per quarter
            wave("all four validators up", 0, quarter * 2, [0, 1, 2, 3])
            net.kill(3)
            console.print("[yellow]validator 3 killed[/] (its disk stays)")
            last = wave("three of four (f = 1 crashed)", 2 * per_client, quarter, [0, 1, 2])
            net.restart(3)
            top = net.height(0)
            t0 = time.perf_counter()
            while net.height(3) < top:
                time.sleep(0.2)
            console.print(
                f"[green]validator 3 restarted[/]: rebuilt from its own disk and caught up to "
                f"height {top} from its peers in {time.perf_counter() - t0:.1f} s"
            )
            wave("all four again", 3 * per_client, quarter, [0, 1, 2, 3])
            chains = [net.headers(i) for i in range(vs.n)]
            common = min(len(c) for c in chains)
            agree = all(c[:common] == chains[0][:common] for c in chains)
            console.print(
                f"all validators hold identical block hashes and state roots up to height "
                f"{common}: {'yes' if agree else 'NO'}"
            )
            tx_id = tx_ids_of(last[2])[7].tobytes()
            receipt_ok = show_receipt(console, net, tx_id)
        finally:
            ray.shutdown()
        console.print("network stopped; auditing validator 0's store from disk")
        with BlockStore(Path(tmp) / "validator-0" / "store", net.genesis.header) as store:
            proof_ok, tamper_rejected, qc_ok = check_receipt(
                console, store, net.genesis, tx_id, height=receipt_ok
            )
            return DemoResult(
                store.height, txs, proof_ok and agree and bool(receipt_ok), tamper_rejected, qc_ok
            )


def show_receipt(console: Console, net: Any, tx_id: bytes) -> int:
    """Fetch a receipt from a storage shard (not through any validator), verify it with the
    validator keys alone, and show that a forged one is refused. Returns its height."""
    from rayledger.cluster.client import Client
    from rayledger.errors import InvalidReceipt
    from rayledger.receipt import verify_receipt

    client = Client(net.dir, validator=2)
    receipt = client.receipt(tx_id)  # verified, or it raises
    c = receipt.commit
    console.print(
        f"[bold]receipt[/] from validator 2's storage shards: tx {tx_id.hex()[:16]}… at height "
        f"{receipt.height} index {receipt.index}, status {Status(receipt.status).name}; audit "
        f"paths of {len(receipt.tx_proof)} and {len(receipt.result_proof)} hashes; committed "
        f"through block {c.header.height} (round {c.header.round}) and its child in round "
        f"{c.child.round}, certified by {len(c.qc.signer_indices())} and "
        f"{len(c.child_qc.signer_indices())} of {net.n} validators: verified with the validator "
        "keys alone"
    )
    forged = dataclasses.replace(receipt, status=Status.INSUFFICIENT_FUNDS)
    try:
        verify_receipt(forged, net.genesis.validators, net.chain_id, net.genesis.header.hash)
        console.print("[red]a forged receipt was ACCEPTED[/]")
        return 0
    except InvalidReceipt as exc:
        console.print(f"a receipt with a forged status is refused: {exc.message}")
    return receipt.height
