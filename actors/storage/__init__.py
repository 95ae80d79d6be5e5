"""Durable storage: the block store engine, and the storage shards (partitioned committed
ledger: transactions, state and proofs by key hash) that serve reads."""

from rayledger.actors.storage.engine import BlockStore, TxLocation
from rayledger.actors.storage.partition import (
    CommittedBlock,
    ShardStore,
    read_parts,
    rows_by_shard,
    shard_of_height,
    shard_of_keys,
    shard_of_tx_ids,
    writes_batch,
)

__all__ = [
    "BlockStore",
    "CommittedBlock",
    "ShardStore",
    "TxLocation",
    "read_parts",
    "rows_by_shard",
    "shard_of_height",
    "shard_of_keys",
    "shard_of_tx_ids",
    "writes_batch",
]
