"""The Python client: submit TxBatches to a running network and read what it committed.

A client needs a Ray connection to the cluster and the network's public description (its data
directory's ``genesis.toml`` and ``network.json``; no private key but the client's own). It

- submits whole Arrow batches to the mempools, spreading them round-robin and waiting out a
  "busy" answer with backoff (the mempool kept nothing), never dropping rows silently;
- waits for commits and reads transactions, receipts and state from one validator's storage
  shards, each read going straight to the shard that owns the key, not through the validator;
- verifies every receipt it hands out against the genesis validator set's keys, so a lying
  node cannot make it accept a transaction that was not committed.

Usage::

    client = Client.connect("/path/to/network")      # joins the cluster `rayledger up` recorded
    client.submit(batch)
    client.wait_committed(batch)
    receipt = client.receipt(tx_id)                  # verified
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# Ray reads its authentication mode when it is imported: a program whose first Ray import
# comes through this module talks to clusters the way `rayledger up` starts them (token
# authentication where ~/.ray/auth_token exists), unless RAY_AUTH_MODE says otherwise.
if "ray" not in sys.modules and (Path.home() / ".ray" / "auth_token").exists():
    os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402

from rayledger.actors.storage import read_parts, rows_by_shard, shard_of_keys, shard_of_tx_ids
from rayledger.config import Genesis, load_genesis
from rayledger.errors import DecodeError, InvalidReceipt, LedgerError, NotFound, StoreError
from rayledger.execution import Status, anchor_key, balance_key, nonce_key
from rayledger.receipt import Receipt, verify_receipt
from rayledger.tx import compact_batch, fixed_rows, tx_ids_of

NAMESPACE = "rayledger"
log = logging.getLogger(__name__)


class SubmitError(LedgerError):
    """A mempool refused a batch outright (schema, chain, limits) or stayed busy too long."""

    code = "submit_failed"


@dataclass
class SubmitResult:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    busy_retries: int = 0
    # Chunks offered again because their mempool's process died before it answered
    crash_retries: int = 0


def join_cluster(address: str, recorded_in: Path | None = None) -> None:
    """Join the running Ray cluster at ``address`` (its GCS's ``host:port``, as ``rayledger
    up`` records it in ``recorded_in``). One that is gone (``up`` killed, the machine
    restarted) fails at once with ``ConnectionError``: Ray itself retries for minutes, and
    `rayledger status` on a stale record hung for more than five. ``auto`` and ``ray://``
    addresses go to Ray as they are."""
    if address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        if not (host and port.isdigit()):
            where = f" (recorded in {recorded_in / 'ray_address'})" if recorded_in else ""
            raise ConnectionError(f"{address!r} is not a Ray address HOST:PORT{where}")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            where = f"the network recorded in {recorded_in}" if recorded_in else "the network"
            raise ConnectionError(
                f"{where} is not running: no Ray cluster answers at {address} "
                f"({exc.strerror or type(exc).__name__}); start it with `rayledger up`"
            ) from None
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)


def check_validator(i: int, n: int) -> int:
    """``i`` where it names one of a network's ``n`` validators, else ``ValueError``."""
    if not 0 <= i < n:
        raise ValueError(f"no validator {i}: the network has {n} (0 to {n - 1})")
    return i


class Client:
    def __init__(self, data_dir: Path, *, validator: int = 0) -> None:
        """``validator``: whose storage shards answer reads (any one; receipts are verified
        against the whole validator set, so trusting it is not needed)."""
        self.dir = Path(data_dir)
        settings: dict[str, Any] = json.loads((self.dir / "network.json").read_text())
        self.name: str = settings["name"]
        self.genesis: Genesis = load_genesis(self.dir / "genesis.toml")
        self.n = self.genesis.validators.n
        self.shards = int(settings.get("storage_shards", 0))
        if self.shards < 1:
            raise ValueError("this network has no storage shards to read from")
        self.validator = check_validator(validator, self.n)
        self._next_mempool = itertools.cycle(range(self.n))

    @classmethod
    def connect(
        cls, data_dir: Path | str, *, validator: int = 0, address: str | None = None
    ) -> Client:
        """A client of the network in ``data_dir``, joining its Ray cluster first unless this
        process already has: at ``address``, or the one ``rayledger up`` recorded there."""
        data_dir = Path(data_dir)
        if not ray.is_initialized():
            if address is None:
                recorded = data_dir / "ray_address"
                if not recorded.exists():
                    raise FileNotFoundError(
                        f"no running network recorded in {data_dir}: pass the Ray address"
                    )
                join_cluster(recorded.read_text().strip(), data_dir)
            else:
                join_cluster(address)
        return cls(data_dir, validator=validator)

    @property
    def chain_id(self) -> bytes:
        return self.genesis.chain_id

    def _actor(self, role: str) -> Any:
        return ray.get_actor(f"{self.name}-{role}", namespace=NAMESPACE)

    def _shard(self, k: int, validator: int | None = None) -> Any:
        v = self.validator if validator is None else check_validator(validator, self.n)
        return self._actor(f"shard-{v}-{k}")

    # ---- writing -----------------------------------------------------------------------------

    def submit(
        self,
        batch: pa.RecordBatch,
        *,
        mempool: int | None = None,
        chunk_rows: int = 5_000,
        busy_timeout_s: float = 60.0,
    ) -> SubmitResult:
        """Submit ``batch`` in chunks to ``mempool``, or by default each sender's rows to one
        mempool chosen by its key (so one sender's nonces reach the ordering in sequence,
        while different senders spread over all mempools). Rows refused (bad signature,
        duplicate) are counted in the result; a chunk refused whole raises ``SubmitError``; a
        mempool still busy after ``busy_timeout_s`` raises.

        A mempool whose process dies before it answers (Ray restarts it) is offered the chunk
        again once it is back, for up to ``busy_timeout_s``: what it had accepted of it is in
        its journal, and comes back as ``duplicate`` (it holds those rows), the rest is
        accepted then."""
        out = SubmitResult()
        # Chunks for one mempool go one after another (an async actor does not keep the order
        # of concurrent calls, and one sender's nonces must arrive in order); different
        # mempools take theirs in parallel.
        queues = [
            # Each chunk in buffers of its own: a slice would travel with all of ``part``
            (
                target,
                [
                    compact_batch(part.slice(s, chunk_rows))
                    for s in range(0, part.num_rows, chunk_rows)
                ],
            )
            for target, part in self._route(batch, mempool)
        ]
        while any(chunks for _, chunks in queues):
            round_ = [(target, chunks.pop(0)) for target, chunks in queues if chunks]
            refs = [(t, c, self._actor(f"mempool-{t}").submit.remote(c)) for t, c in round_]
            for target, chunk, ref in refs:
                self._settle(out, target, chunk, ref, busy_timeout_s)
        return out

    def _settle(
        self, out: SubmitResult, target: int, chunk: pa.RecordBatch, ref: Any, timeout: float
    ) -> None:
        delay, deadline = 0.05, time.monotonic() + timeout
        admission = self._answer(out, target, chunk, ref, deadline)
        offer: Any = None
        while admission.busy:
            if time.monotonic() > deadline:
                raise SubmitError(f"mempool {target} stayed busy for {timeout} s")
            out.busy_retries += 1
            # The mempool's hint of when it has room, else a doubling wait
            hint = admission.retry_after_ms / 1000
            time.sleep(min(hint, 1.0) if hint > 0 else delay)
            delay = min(delay * 2, 1.0)
            if offer is None:  # serialized once: every further offer is by reference
                offer = ray.put(chunk)
            ref = self._actor(f"mempool-{target}").submit.remote(offer)
            admission = self._answer(out, target, offer, ref, deadline)
        if admission.error is not None:
            raise SubmitError(f"mempool {target}: {admission.error}")
        out.accepted += admission.accepted
        for reason, count in admission.rejected.items():
            out.rejected[reason] = out.rejected.get(reason, 0) + count

    def _answer(self, out: SubmitResult, target: int, offer: Any, ref: Any, deadline: float) -> Any:
        """Mempool ``target``'s answer to ``offer`` (``ref``: the call made), offering it again
        while the mempool's process died or is restarting, until ``deadline``."""
        pause = 0.1
        while True:
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # died, or unavailable (restarting)
                if time.monotonic() > deadline:
                    raise SubmitError(f"mempool {target} did not come back: {exc}") from None
                out.crash_retries += 1
                log.warning("mempool %d went down before answering; offering again", target)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                ref = self._actor(f"mempool-{target}").submit.remote(offer)

    def _route(
        self, batch: pa.RecordBatch, mempool: int | None
    ) -> list[tuple[int, pa.RecordBatch]]:
        if mempool is not None:
            if not 0 <= mempool < self.n:
                raise ValueError(f"mempool {mempool} of {self.n}")
            return [(mempool, batch)]
        if batch.num_rows == 0 or "sender" not in batch.schema.names:
            return [(next(self._next_mempool), batch)]
        targets = shard_of_tx_ids(fixed_rows(batch.column("sender"), 32), self.n)
        return [(int(t), batch.filter(pa.array(targets == t))) for t in np.unique(targets).tolist()]

    # ---- reading -----------------------------------------------------------------------------

    def locate(
        self, tx_ids: np.ndarray | pa.RecordBatch, validator: int | None = None
    ) -> list[int | None]:
        """The committed height of each transaction (``None`` where not committed yet)."""
        ids = tx_ids_of(tx_ids) if isinstance(tx_ids, pa.RecordBatch) else np.asarray(tx_ids)
        ids = ids.reshape(-1, 32)
        out: list[int | None] = [None] * len(ids)
        groups = rows_by_shard(shard_of_tx_ids(ids, self.shards))
        asked = [
            (part, self._shard(k, validator).locate.remote([ids[i].tobytes() for i in part]))
            for k, rows in groups.items()
            for part in read_parts(rows)  # a shard answers at most READ_MAX_KEYS at a time
        ]
        for part, ref in asked:
            try:
                heights = ray.get(ref)
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
                # A shard restarting from its disk: its rows read as not yet committed
                continue
            for i, h in zip(part, heights, strict=True):
                out[i] = h
        return out

    def wait_committed(
        self,
        tx_ids: np.ndarray | pa.RecordBatch,
        *,
        timeout_s: float = 120.0,
        validators: list[int] | None = None,
        poll_s: float = 0.1,
    ) -> float:
        """Wait until every transaction is committed and readable on the given validators'
        shards (default: the client's validator); return the seconds waited."""
        ids = tx_ids_of(tx_ids) if isinstance(tx_ids, pa.RecordBatch) else np.asarray(tx_ids)
        targets = [self.validator] if validators is None else validators
        t0 = time.monotonic()
        remaining = {v: ids.reshape(-1, 32) for v in targets}
        while remaining:
            for v in list(remaining):
                heights = self.locate(remaining[v], validator=v)
                missing = np.array([h is None for h in heights], np.bool_)
                remaining[v] = remaining[v][missing]
                if not missing.any():
                    del remaining[v]
            if not remaining:
                break
            if time.monotonic() - t0 > timeout_s:
                left = sum(len(r) for r in remaining.values())
                raise TimeoutError(f"{left} transactions not committed within {timeout_s} s")
            time.sleep(poll_s)
        return time.monotonic() - t0

    def transaction(self, tx_id: bytes) -> dict[str, Any]:
        """The committed row of a transaction (unverified; use ``receipt`` for proof)."""
        k = int(shard_of_tx_ids(np.frombuffer(tx_id, np.uint8), self.shards)[0])
        return ray.get(self._shard(k).get_tx.remote(tx_id))

    def receipt(self, tx_id: bytes, *, verify: bool = True) -> Receipt:
        """The receipt of a committed transaction, checked against the validator keys
        (``InvalidReceipt`` if it does not prove the commit, ``NotFound`` if not committed).

        Asked of this client's validator's shard first; if that shard is down, reports its
        rows damaged (``StoreError``) or serves bytes that are not a receipt of ``tx_id`` that
        verifies, of the other validators' in turn: a verified receipt needs no trust in
        whoever served it. When no shard serves one, the first specific refusal is raised (a
        ``ConnectionError`` if none answered at all).

        A receipt of a row that did not execute (``BAD_NONCE``) is not the answer while
        another may be: the same transaction can be ordered more than once (anyone can replay
        a signed transaction, and a first try ahead of its sender's nonce gap fails), and only
        the row that consumed its nonce, at most one, says what became of it. An honest shard
        serves that row; the others are asked for it, and the ``BAD_NONCE`` receipt is the
        answer only where none serves another (a shard that answers "not committed" then is
        passed over)."""
        if len(tx_id) != 32:
            raise ValueError("a transaction id is 32 bytes")
        k = int(shard_of_tx_ids(np.frombuffer(tx_id, np.uint8), self.shards)[0])
        order = [self.validator] + [v for v in range(self.n) if v != self.validator]
        unavailable: Exception | None = None
        refused: LedgerError | None = None
        not_executed: Receipt | None = None
        for v in order:
            try:
                raw = ray.get(self._shard(k, v).receipt.remote(tx_id))
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, NotFound):
                    if not_executed is not None:  # behind the others, or hiding the row
                        continue
                    raise exc.cause from None
                if not isinstance(exc.cause, StoreError):
                    raise
                refused = refused or exc.cause
                continue
            except (ValueError, ray.exceptions.RayActorError) as exc:  # gone or restarting
                unavailable = exc
                continue
            try:
                receipt = Receipt.decode(raw, max_payload=self.genesis.limits.max_payload_bytes)
                if receipt.tx_id != tx_id:
                    raise InvalidReceipt(
                        f"validator {v}'s shard {k} answered with another transaction's receipt"
                    )
                if verify:
                    verify_receipt(
                        receipt, self.genesis.validators, self.chain_id, self.genesis.header.hash
                    )
            except (DecodeError, InvalidReceipt) as exc:
                refused = refused or exc
                continue
            if receipt.status != Status.BAD_NONCE:
                return receipt
            not_executed = not_executed or receipt
        if not_executed is not None:
            return not_executed
        if refused is not None:
            raise refused
        raise ConnectionError(f"no validator's storage shard {k} answers: {unavailable}")

    def state(self, key: bytes) -> tuple[bytes, int] | None:
        """(value, height that last wrote it) of a state key, or ``None``."""
        k = int(shard_of_keys([key], self.shards)[0])
        return ray.get(self._shard(k).get_state.remote(key))

    def _u64(self, key: bytes) -> int:
        got = self.state(key)
        return int.from_bytes(got[0], "big") if got else 0

    def balance(self, account: bytes) -> int:
        return self._u64(balance_key(account))

    def next_nonce(self, account: bytes) -> int:
        """The nonce the account's next transaction must carry."""
        return self._u64(nonce_key(account))

    def anchor(self, digest: bytes) -> bytes | None:
        """What the ledger recorded for an anchored digest, or ``None``."""
        got = self.state(anchor_key(digest))
        return got[0] if got else None
