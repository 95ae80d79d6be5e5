"""rayledger: a permissioned Byzantine-fault-tolerant ledger for e-services, built on Ray.

This package is the pure core (codec, transactions, blocks, Merkle trees, configuration); it
does no I/O of its own and knows nothing of Ray, HTTP or GPUs.
"""

from rayledger.errors import LedgerError

__version__ = "0.1.0"
__all__ = ["LedgerError", "__version__"]
