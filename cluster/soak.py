"""``rayledger soak``: a local network under steady load through random faults, for as long as
asked, then what must hold is checked: every accepted transaction committed exactly once, with
status OK, on every validator; the validators agree on every block; no row of an impostor's
forged batches committed.

The faults, drawn from a seeded generator one after another with quiet spells between them:
a partition cutting one site off, a crash of one validator or of two at once (f + 1 of 4:
commits stop until one is back), a Byzantine strategy on one validator, a storage shard crash,
a mempool crash (what it accepted comes back from its journal).
Each is undone after a few seconds. Four clients, one per mempool, submit their own signed
rows in nonce order (client 0 transfers, the others anchor records), each chunk resent until a
mempool takes it. Long runs of this are how several ordering and restart bugs were found (see
the README); this command keeps the way to run them in the project.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rayledger.execution import Status
from rayledger.tx import TxKind, make_batch, tx_ids_of, validate_batch

FAULTS = ("partition", "kill", "kill-two", "byzantine", "crash-shard", "crash-mempool", "quiet")
# Every Byzantine strategy a validator actor plays (ACTOR_STRATEGIES) but "none"
STRATEGIES = (
    "equivocating-leader",
    "silent",
    "double-voter",
    "invalid-signature",
    "lazy-leader",
    "fast-clock",
    "equivocate",
    "vote-withholder",
    "slow-leader",
    "stale-replayer",
)
CHUNK = 200


@dataclass
class SoakResult:
    seed: int
    duration_s: float
    faults: list[str]
    accepted: int
    # Per validator: transactions committed, of them committed more than once, accepted ones
    # not found, and committed with a status other than OK
    committed: list[int]
    duplicates: list[int]
    missing: list[int]
    not_ok: list[int]
    agreement: bool
    heights: list[int]
    forged_batches: int = 0
    # Validator 0's committed transactions by status name, those not OK only (the validators
    # agree on them: execution is deterministic)
    not_ok_by_status: dict[str, int] = field(default_factory=dict)
    # Per validator: rows its proposals put in ahead of their senders' earlier nonces, which
    # failed (the wait for the gap ran out), batches it held back for such a gap, and the
    # mempools it asked for their backlog while it waited
    gap_rows_proposed: list[int] = field(default_factory=list)
    batches_deferred: list[int] = field(default_factory=list)
    backlog_asked: list[int] = field(default_factory=list)
    # Over the live validators at the end (counts restart with a validator)
    evidence: int = 0
    settle_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.agreement
            and self.accepted > 0
            and not any(self.duplicates)
            and not any(self.missing)
            and not any(self.not_ok)
            and all(c == self.accepted for c in self.committed)
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def client(
    net: Any, k: int, stop: threading.Event, accepted: list[bytes], chunk: int = CHUNK
) -> None:
    """Client ``k``: chunks of rows in nonce order to mempool ``k``, each offered again until
    taken (busy: after the mempool's hint; a failed call, to a mempool restarting: a second
    later). The ids of the rows taken go to ``accepted``."""
    import ray

    key = net.client_key(net.clients[k])
    to = net.genesis.accounts[1].public_key
    nonce = 0
    while not stop.is_set():
        nonces = range(nonce, nonce + chunk)
        if k == 0:
            batch = make_batch(
                key, TxKind.TRANSFER, nonces, [to + struct.pack(">Q", 1)] * chunk, net.chain_id
            )
        else:
            payloads = [os.urandom(32) + b'{"n":%d}' % i for i in nonces]
            batch = make_batch(key, TxKind.ANCHOR, nonces, payloads, net.chain_id)
        while not stop.is_set():
            try:
                res = net.submit(batch, mempool=k)
            except ray.exceptions.RayError:
                time.sleep(1.0)
                continue
            if res.busy:
                time.sleep(max(0.01, res.retry_after_ms / 1000))
                continue
            # Taken whole, or (a resend of a chunk whose first answer was lost) as duplicates
            if res.accepted != chunk and set(res.rejected) != {"duplicate"}:
                raise AssertionError(f"client {k}: chunk at nonce {nonce} refused: {res}")
            accepted.extend(r.tobytes() for r in tx_ids_of(batch))
            nonce += chunk
            break
        time.sleep(0.05)


class Forger:
    """An impostor in the cluster: batches of ``rows`` rows whose every signature is forged
    (one batch signed by ``key``; each announcement gets new payloads, so new ids and a new
    digest under the old signatures), announced to every validator by reference (one that is
    down misses it)."""

    def __init__(self, net: Any, rows: int, key: Any) -> None:
        self.net, self.rows = net, rows
        self.base = make_batch(key, TxKind.ANCHOR, range(rows), [bytes(32)] * rows, net.chain_id)
        self.payload = self.base.schema.get_field_index("payload")
        self.offsets = pa.py_buffer(np.arange(0, 32 * (rows + 1), 32, dtype=np.int32))

    def announce(self) -> None:
        import ray

        from rayledger.chain import batch_digest

        fresh = pa.Array.from_buffers(
            pa.binary(), self.rows, [None, self.offsets, pa.py_buffer(os.urandom(32 * self.rows))]
        )
        forged = self.base.set_column(self.payload, self.base.schema.field(self.payload), fresh)
        limit = self.net.genesis.limits.max_payload_bytes
        batch = validate_batch(forged, chain_id=self.net.chain_id, max_payload=limit)
        digest = batch_digest(batch)
        ref = ray.put(batch)
        for i in range(self.net.n):
            with contextlib.suppress(Exception):  # a validator down: it misses this one
                self.net.validator(i).batch_ready.remote(digest, [ref])


def forger(net: Any, stop: threading.Event, rows: int, sent: list[int]) -> None:
    """A ``Forger`` announcing a batch of ``rows`` forged rows once a second; ``sent[0]``
    counts them."""
    impostor = Forger(net, rows, net.client_key(net.clients[-1]))
    while not stop.wait(1.0):
        impostor.announce()
        sent[0] += 1


def run_faults(
    net: Any, rng: random.Random, until: float, log: list[str], say: Callable[[str], None]
) -> None:
    """Random faults, each undone after a few seconds, with quiet spells between them, until
    ``until`` (``time.monotonic()``)."""
    n = net.n
    while time.monotonic() < until:
        kind = rng.choice(FAULTS)
        if kind == "partition":
            i = rng.randrange(n)
            entry, undo, hold = f"partition site of validator {i}", net.heal, rng.uniform(2, 8)
            net.partition([[i]])
        elif kind == "kill":
            i = rng.randrange(n)
            entry, hold = f"kill validator {i}", rng.uniform(2, 8)
            net.kill(i)

            def undo(i: int = i) -> None:
                net.restart(i)

        elif kind == "kill-two":
            a, b = rng.sample(range(n), 2)
            entry, hold = f"kill validators {a} and {b}", rng.uniform(1, 4)
            net.kill(a)
            net.kill(b)

            def undo(a: int = a, b: int = b) -> None:
                net.restart(a)
                time.sleep(1.0)
                net.restart(b)

        elif kind == "byzantine":
            i, strategy = rng.randrange(n), rng.choice(STRATEGIES)
            entry, hold = f"validator {i} {strategy}", rng.uniform(2, 6)
            net.set_strategy(i, strategy)

            def undo(i: int = i) -> None:
                net.set_strategy(i, "none")

        elif kind == "crash-shard":
            i = rng.randrange(n)
            entry, hold = f"crash storage shard 0 of validator {i}", 0.0
            net.crash_shard(i, 0)

            def undo() -> None:
                return None

        elif kind == "crash-mempool":
            i = rng.randrange(n)
            entry, hold = f"crash mempool of validator {i}", 0.0
            net.crash_mempool(i)

            def undo() -> None:
                return None

        else:
            entry, hold = "quiet", rng.uniform(2, 6)

            def undo() -> None:
                return None

        log.append(entry)
        say(f"{time.strftime('%H:%M:%S')} {entry}")
        time.sleep(hold)
        undo()
        time.sleep(rng.uniform(3, 8))


def check_commits(net: Any, ids: list[bytes], settle_s: float) -> dict[str, Any]:
    """What must hold once the load stopped, as ``SoakResult`` fields: every id in ``ids``
    located on every validator (waiting up to ``settle_s`` for the last commits), and per
    validator the transactions committed, those committed more than once, those not found,
    and those not OK (a status other than OK, or committed but never accepted), validator
    0's rows not OK by status; whether the validators agree on every block they share, and
    their heights; from the validators' status, each one's gap waits and their evidence."""
    import ray

    settled = time.monotonic()
    while True:
        located = [ray.get(net.validator(i).locate.remote(ids), timeout=120) for i in range(net.n)]
        missing = [sum(h is None for h in hs) for hs in located]
        if not any(missing) or time.monotonic() > settled + settle_s:
            break
        time.sleep(2.0)
    chains = [net.headers(i) for i in range(net.n)]
    common = min(len(c) for c in chains)
    committed, duplicates, not_ok = [], [], []
    accepted = set(ids)
    by_status: dict[str, int] = {}
    for i in range(net.n):
        rows = [r.tobytes() for r in ray.get(net.validator(i).committed_ids.remote())]
        committed.append(len(rows))
        duplicates.append(len(rows) - len(set(rows)))
        counts = ray.get(net.validator(i).status_counts.remote())
        # Committed but never accepted (a forged row, say): counted as not OK
        not_ok.append(sum(v for s, v in counts.items() if s != 0) + len(set(rows) - accepted))
        if i == 0:
            by_status = {Status(s).name: v for s, v in sorted(counts.items()) if s != 0}
    statuses = net.status()
    return {
        "gap_rows_proposed": [int(st.get("gap_rows_proposed", 0)) for st in statuses],
        "batches_deferred": [int(st.get("batches_deferred", 0)) for st in statuses],
        "backlog_asked": [int(st.get("backlog_asked", 0)) for st in statuses],
        "evidence": sum(int(st.get("evidence", 0)) for st in statuses),
        "committed": committed,
        "duplicates": duplicates,
        "missing": missing,
        "not_ok": not_ok,
        "not_ok_by_status": by_status,
        "agreement": all(c[:common] == chains[0][:common] for c in chains),
        "heights": [len(c) for c in chains],
        "settle_s": round(time.monotonic() - settled, 1),
    }


def soak(
    config: Path,
    duration_s: float,
    seed: int,
    *,
    forged_rows: int = 0,
    settle_s: float = 300.0,
    keep: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> SoakResult:
    """Run the soak on a local Ray instance it starts and stops itself (see the module).
    ``keep``: the network's data directory (new or empty), left in place afterwards for a
    post-mortem (``rayledger store verify``, or ``rayledger up --data-dir``); else a
    temporary one, removed."""
    import ray

    from rayledger.cluster.local import Network, NetworkOptions, init_local_ray
    from rayledger.cluster.network import load_network

    spec = load_network(config)
    rng = random.Random(seed)
    if keep is not None:
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise ValueError(f"{keep} is not a new or empty directory")
        keep.mkdir(parents=True, exist_ok=True)
    place = (
        contextlib.nullcontext(str(keep))
        if keep is not None
        else tempfile.TemporaryDirectory(prefix="rayledger-soak-")
    )
    with place as tmp:
        init_local_ray(spec)
        net = Network.create(spec, Path(tmp), NetworkOptions(name="soak", batch_rows=500))
        stop = threading.Event()
        accepted: list[list[bytes]] = [[] for _ in range(len(net.clients))]
        threads = [
            threading.Thread(target=client, args=(net, k, stop, accepted[k]), daemon=True)
            for k in range(min(len(net.clients), net.n))
        ]
        sent = [0]
        if forged_rows:
            threads.append(
                threading.Thread(target=forger, args=(net, stop, forged_rows, sent), daemon=True)
            )
        faults: list[str] = []
        try:
            for t in threads:
                t.start()
            run_faults(net, rng, time.monotonic() + duration_s, faults, say)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            ids = [x for part in accepted for x in part]
            say(f"{len(ids):,} transactions accepted; waiting for them on every validator")
            checked = check_commits(net, ids, settle_s)
            return SoakResult(
                seed=seed,
                duration_s=duration_s,
                faults=faults,
                accepted=len(ids),
                forged_batches=sent[0],
                **checked,
            )
        finally:
            stop.set()
            net.shutdown()
            ray.shutdown()
