"""Ray actors of a rayledger network: validators, mempools, storage shards, verifiers."""
