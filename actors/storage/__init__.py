"""Durable block storage: the block store engine and (later) the StorageShard actor around it."""

from rayledger.actors.storage.engine import BlockStore, TxLocation

__all__ = ["BlockStore", "TxLocation"]
