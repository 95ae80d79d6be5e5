"""Bring-up of a network on Ray: one validator and one mempool actor per institution, placed
on its site, wired together; plus the operations the CLI, the demo and the tests use (submit,
wait for commits, status, kill, restart, shutdown)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from cryptography.hazmat.primitives import serialization

from rayledger.actors.mempool import Admission, Mempool
from rayledger.actors.validator import Validator
from rayledger.cluster.network import NetworkSpec, make_genesis
from rayledger.crypto import SigningKey
from rayledger.tx import tx_ids_of


@dataclass
class NetworkOptions:
    base_timeout_ms: int = 1000
    batch_rows: int = 2_000
    batch_interval_ms: float = 50.0
    mempool_capacity: int = 200_000
    # latency_ms[a][b]: one-way delay from site of validator a to site of validator b
    latency_ms: list[list[float]] | None = None
    validator_cpus: float = 0.25
    mempool_cpus: float = 0.1
    name: str = "rayledger"
    extra: dict[str, Any] = field(default_factory=dict)


def _pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class LocalNetwork:
    """A running network. ``ray.init`` must have been called (the caller owns Ray)."""

    def __init__(
        self,
        spec: NetworkSpec,
        data_dir: Path,
        options: NetworkOptions | None = None,
        *,
        genesis_time_ms: int | None = None,
    ) -> None:
        self.spec = spec
        self.dir = Path(data_dir)
        self.opts = options or NetworkOptions()
        self.genesis, self.keys = make_genesis(
            spec, genesis_time_ms or int(time.time() * 1000), keys_dir=self.dir / "keys"
        )
        self.genesis.save(self.dir / "genesis.toml")
        self.genesis_toml = self.genesis.to_toml()
        n = self.genesis.validators.n
        self.validators: dict[int, Any] = {}
        self.mempools: dict[int, Any] = {}
        self.down: set[int] = set()
        self._validator_cls = ray.remote(Validator)
        self._mempool_cls = ray.remote(Mempool)
        for i in range(n):
            self.mempools[i] = self._mempool_cls.options(
                num_cpus=self.opts.mempool_cpus, name=f"{self.opts.name}-mempool-{i}"
            ).remote(
                self.genesis_toml,
                i,
                capacity_rows=self.opts.mempool_capacity,
                batch_rows=self.opts.batch_rows,
                batch_interval_ms=self.opts.batch_interval_ms,
            )
            self.validators[i] = self._new_validator(i)
        self.down.discard(i)
        self._wire()
        ray.get([v.start.remote() for v in self.validators.values()])

    def _new_validator(self, i: int) -> Any:
        v = self.genesis.validators.validators[i]
        latency = self.opts.latency_ms[i] if self.opts.latency_ms else None
        return self._validator_cls.options(
            num_cpus=self.opts.validator_cpus,
            name=f"{self.opts.name}-validator-{i}",
            max_concurrency=1000,
        ).remote(
            self.genesis_toml,
            i,
            _pem(self.keys[v.name]),
            str(self.dir / f"validator-{i}"),
            base_timeout_ms=self.opts.base_timeout_ms,
            latency_ms=latency,
        )

    def _wire(self) -> None:
        live = {i: v for i, v in self.validators.items() if i not in self.down}
        ray.get([v.set_peers.remote(live, self.mempools[i]) for i, v in live.items()])
        ray.get([m.set_validators.remote(list(live.values())) for m in self.mempools.values()])

    # ---- operations ----------------------------------------------------------------------------

    @property
    def chain_id(self) -> bytes:
        return self.genesis.chain_id

    def client_key(self, name: str) -> SigningKey:
        return self.keys[name]

    def submit(self, batch: pa.RecordBatch, mempool: int = 0) -> Admission:
        return ray.get(self.mempools[mempool].submit.remote(batch))

    def status(self) -> list[dict[str, Any] | str]:
        out: list[dict[str, Any] | str] = []
        for i, v in self.validators.items():
            if i in self.down:
                out.append(f"validator {i}: down")
                continue
            try:
                st = ray.get(v.status.remote(), timeout=10)
                st["mempool"] = ray.get(self.mempools[i].status.remote(), timeout=10)
                out.append(st)
            except Exception as exc:  # a crashed validator is reported, not raised
                out.append(f"validator {i}: {type(exc).__name__}")
        return out

    def wait_committed(
        self, batch: pa.RecordBatch, timeout_s: float = 120.0, validators: list[int] | None = None
    ) -> float:
        """Wait until every row of ``batch`` is committed on the given validators (default:
        all live ones); return the seconds waited."""
        ids = [r.tobytes() for r in tx_ids_of(batch)]
        targets = validators if validators is not None else self.live()
        t0 = time.monotonic()
        while True:
            done = True
            for i in targets:
                heights = ray.get(self.validators[i].locate.remote(ids), timeout=30)
                if any(h is None for h in heights):
                    done = False
                    break
            if done:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"transactions not committed within {timeout_s} s")
            time.sleep(0.2)

    def live(self) -> list[int]:
        return [i for i in self.validators if i not in self.down]

    def heights(self) -> dict[int, int]:
        return {i: ray.get(self.validators[i].status.remote())["height"] for i in self.live()}

    def kill(self, i: int) -> None:
        """Crash validator ``i`` (its process dies; its disk stays)."""
        ray.kill(self.validators[i], no_restart=True)
        self.down.add(i)

    def restart(self, i: int) -> None:
        """Start validator ``i`` again from its own disk and tell everyone where it is."""
        self.validators[i] = self._new_validator(i)
        self.down.discard(i)
        self._wire()
        ray.get(self.validators[i].start.remote())

    def shutdown(self) -> None:
        for handle in [*self.validators.values(), *self.mempools.values()]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                continue
