"""Named types for protocol quantities, so signatures say what an int or bytes means."""

from __future__ import annotations

from typing import NewType

Height = NewType("Height", int)
Round = NewType("Round", int)
ChainId = NewType("ChainId", bytes)
TxId = NewType("TxId", bytes)
BlockHash = NewType("BlockHash", bytes)
PublicKey = NewType("PublicKey", bytes)

HASH_SIZE = 32
KEY_SIZE = 32
SIGNATURE_SIZE = 64
