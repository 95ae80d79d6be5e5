"""The ``StorageShard`` actor: one partition of a validator's committed ledger, served to readers
directly (see ``partition.py`` for what a shard keeps).

The validator pushes every committed block to each of its shards, in order, as one object in
the object store shared by all of them; the shard keeps its part. Readers (the client, the
edge) go to the shard that owns the key: a receipt to the shard of its transaction id (which
asks the shard of the block's height for the audit paths), state to the shard of the key.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import ray

from rayledger.actors.storage.lock import hold_lock, is_disk_failure, stop_on_disk_failure
from rayledger.actors.storage.partition import (
    CommittedBlock,
    ShardStore,
    assemble_receipt,
    shard_of_height,
)
from rayledger.config import parse_genesis
from rayledger.errors import (
    InvalidBlock,
    LedgerError,
    NotFound,
    NotYetAvailable,
    StoreCorruption,
)
from rayledger.execution import genesis_state

NAMESPACE = "rayledger"
log = logging.getLogger(__name__)


def shard_name(network: str, validator: int, shard: int) -> str:
    return f"{network}-shard-{validator}-{shard}"


class StorageShard:
    def __init__(self, data_dir: str, validator: int, shard: int) -> None:
        """A start that cannot write to its disk ends the process, which Ray starts again
        (as ``Validator``'s)."""
        try:
            self._open(data_dir, validator, shard)
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_failure(exc):
                raise
            stop_on_disk_failure(f"storage shard {validator}-{shard}, starting,", exc)

    def _open(self, data_dir: str, validator: int, shard: int) -> None:
        root = Path(data_dir)
        settings = json.loads((root / "network.json").read_text())
        genesis = parse_genesis((root / "genesis.toml").read_text())
        os.environ.setdefault("RAYLEDGER_CPU_WORKERS", "0")
        self.network = settings["name"]
        self.validator, self.shard = validator, shard
        self.shards = int(settings.get("storage_shards", 1))
        self.chain_id = genesis.chain_id
        folder = root / f"validator-{validator}" / f"shard-{shard}"
        # Beside the folder, which may be set aside (see actors.storage.lock)
        self._lock = hold_lock(
            folder.with_name(f"shard-{shard}.lock"), f"storage shard {validator}-{shard}"
        )
        seed = genesis_state(genesis.accounts)[0].writes
        # Where damaged files were moved before this shard started afresh (None: never)
        self.set_aside: str | None = None
        try:
            self.store = ShardStore(folder, shard, self.shards, genesis.header, seed)
        except StoreCorruption as exc:
            # A shard is derived data: set the damaged files aside (never delete them) and
            # start empty; the validator then rebuilds this shard from its block store.
            aside = folder.with_name(f"{folder.name}.damaged-{int(time.time())}")
            folder.rename(aside)
            self.set_aside = str(aside)
            log.error(
                "storage shard %d-%d: %s; moved to %s, rebuilding", validator, shard, exc, aside
            )
            self.store = ShardStore(folder, shard, self.shards, genesis.header, seed)
        self.rejected = 0

    # ---- the validator's side ----------------------------------------------------------------

    async def apply(self, blocks: list[CommittedBlock]) -> int:
        """Apply committed blocks (``CommittedBlock``, in height order) and return the height
        applied. A gap raises; the validator then resends from ``height``."""
        try:
            if not isinstance(blocks, list) or not all(
                isinstance(b, CommittedBlock) for b in blocks
            ):
                raise InvalidBlock("a shard applies a list of committed blocks")
            return self.store.apply(blocks)
        except LedgerError:
            self.rejected += 1
            raise
        except (OSError, sqlite3.Error) as exc:
            stop_on_disk_failure(f"storage shard {self.validator}-{self.shard}", exc)
            raise  # not reached

    async def height(self) -> int:
        return self.store.height

    # ---- readers -----------------------------------------------------------------------------

    async def locate(self, tx_ids: list[bytes]) -> list[int | None]:
        return self.store.locate(tx_ids)

    async def get_tx(self, tx_id: bytes) -> dict[str, Any]:
        return self.store.get_tx(tx_id)

    async def get_state(self, key: bytes) -> tuple[bytes, int] | None:
        return self.store.get_state(key)

    async def get_states(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.get_states(keys)

    async def header(self, height: int) -> bytes:
        return self.store.header(height).encode()

    async def proofs(self, height: int, index: int) -> tuple[list[bytes], list[bytes]]:
        return self.store.proofs(height, index)

    async def receipt(self, tx_id: bytes) -> bytes:
        """The encoded ``Receipt`` of a committed transaction owned by this shard (``NotFound``
        if it is not committed here yet; ``NotYetAvailable`` if it is, but its block's commit
        proof or audit paths are not stored at this validator yet)."""
        row = self.store.get_tx(tx_id)  # NotFound: not committed (as far as this shard knows)
        height = row["height"]
        # Committed: what else the receipt needs is written by the validator to each shard on
        # its own, and one may be behind (restarted, catching up) or down. That is not "not
        # committed" (a client believes that at once): it asks another validator
        try:
            headers, commit = self.store.commit_proof(height)
            owner = shard_of_height(height, self.shards)
            if owner == self.shard:
                proofs = self.store.proofs(height, row["index"])
            else:
                sibling = ray.get_actor(
                    shard_name(self.network, self.validator, owner), namespace=NAMESPACE
                )
                proofs = await sibling.proofs.remote(height, row["index"])
        except (NotFound, ValueError, ray.exceptions.RayError) as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(cause, NotFound):
                raise
            raise NotYetAvailable(
                f"transaction {tx_id.hex()[:16]}… committed at height {height}, its receipt not"
                f" complete at this validator yet: {cause}"
            ) from None
        return assemble_receipt(row, headers, commit, proofs, self.chain_id).encode()

    async def status(self) -> dict[str, Any]:
        return {
            "validator": self.validator,
            "shard": self.shard,
            "shards": self.shards,
            "height": self.store.height,
            "rejected": self.rejected,
            "buffered_rows": self.store.buffered_rows,
            "index_runs": self.store.index_runs,
            "wal_checkpoints": self.store.wal_checkpoints,
            "set_aside": self.set_aside,
            "cpu_s": round(time.process_time(), 3),
        }
