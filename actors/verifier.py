"""The verifier actor: one institution's batch checks (ids, digest, every Ed25519 signature)
off its validator's event loop, and its mempool's admission signature checks, through
``rayledger.kernels`` with ``backend="auto"`` (the GPU where the actor holds one, else the
CPU)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rayledger.chain import admit_batch
from rayledger.config import parse_genesis
from rayledger.errors import LedgerError
from rayledger.kernels import cpu_verify_work, prepare
from rayledger.kernels._backend import ENV_VAR, forced_backend
from rayledger.tx import verify_signatures

log = logging.getLogger(__name__)


class Verifier:
    def __init__(self, data_dir: str, index: int) -> None:
        os.environ.setdefault("RAYLEDGER_CPU_WORKERS", "0")
        root = Path(data_dir)
        self.genesis = parse_genesis((root / "genesis.toml").read_text())
        self.settings = json.loads((root / "network.json").read_text())
        self.index = index
        self.checked = 0
        self.admission_rows = 0
        self.refused: dict[str, int] = {}
        # On a GPU, compile the kernels now: a cold compile takes seconds that would otherwise
        # fall on the first batch, with consensus waiting for its check.
        try:
            self.backend = prepare()
        except Exception as exc:
            if forced_backend() == "cuda":
                raise  # asked for the GPU explicitly: no quiet fallback
            # A GPU that cannot serve (driver, compiler) must not stop the institution from
            # checking batches: check them on the CPU, and say so in the status and the log.
            log.error("verifier %d: the GPU cannot serve, checking on the CPU: %s", index, exc)
            os.environ[ENV_VAR] = "cpu"
            self.backend = f"cpu (cuda failed: {type(exc).__name__}: {exc})"

    async def check(self, digest: bytes, refs: list[Any]) -> str | None:
        """``None`` if the batch behind ``refs[0]`` is sound, else the error code."""
        batch = await refs[0]
        try:
            admit_batch(
                batch,
                digest,
                chain_id=self.genesis.chain_id,
                max_payload=self.genesis.limits.max_payload_bytes,
            )
        except LedgerError as exc:
            self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
            return exc.code
        self.checked += batch.num_rows
        return None

    async def verify_rows(self, batch: pa.RecordBatch) -> np.ndarray:
        """The mempool's admission check: which rows' signatures verify (and by keys that are
        not of small order) over their recomputed ids."""
        self.admission_rows += batch.num_rows
        return verify_signatures(batch, self.genesis.chain_id)

    async def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "backend": self.backend,
            "checked_rows": self.checked,
            "admission_rows": self.admission_rows,
            "refused": self.refused,
            "cpu_s": round(time.process_time(), 3),
            # Signatures checked on this process's CPU, and their checking threads' CPU time
            "signature_checks": cpu_verify_work(),
        }
