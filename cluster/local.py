"""Deployment of a network on Ray, and the operations on a running one.

A network lives in a data directory: ``genesis.toml``, ``network.json`` (name, placement,
timing and transport settings), ``keys/`` and one ``validator-<i>/`` per validator. Its actors
are named ``<name>-validator-<i>`` and ``<name>-mempool-<i>`` in the Ray namespace
``rayledger``, so any process connected to the cluster (``rayledger status``, ``chaos``,
``down``, a test) can find them, and can restart a validator from the data directory alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from rayledger.actors.mempool import Admission, Mempool
from rayledger.actors.storage.shard import StorageShard
from rayledger.actors.validator import ACTOR_STRATEGIES, Validator
from rayledger.actors.verifier import Verifier
from rayledger.cluster.client import check_validator
from rayledger.cluster.network import NetworkSpec, make_genesis
from rayledger.config import Genesis, load_genesis
from rayledger.consensus import CoreConfig
from rayledger.crypto import SigningKey, read_key_file
from rayledger.tx import compact_batch, tx_ids_of

NAMESPACE = "rayledger"


@dataclass
class NetworkOptions:
    name: str = "rayledger"
    base_timeout_ms: int = 1000
    batch_rows: int = 2_000
    batch_interval_ms: float = 50.0
    # The most rows a mempool holds uncommitted (a memory bound; within it, the limit follows
    # the commit latency of its batches: see actors.mempool.InflightLimit)
    mempool_capacity: int = 200_000
    # And the most bytes of rows (their Arrow buffers) it holds so: without it, rows of the
    # largest payload allowed made the row capacity 13 GB (see actors.mempool.CAPACITY_BYTES)
    mempool_capacity_bytes: int = 1 << 30
    # The commit latency a mempool's limit aims at (None: twice the lowest measured, 1 s at least)
    mempool_target_latency_ms: float | None = None
    # A sealed batch whose commit a mempool never hears of stops counting against its limit
    # after this long (its validator crashed before telling it; the batch was refused)
    mempool_inflight_expiry_s: float = 120.0
    # Rows ahead of their sender's sequence (a nonce before them neither committed nor
    # admitted) wait in their mempool this long for it, then are sealed in batches of their
    # own; at most this many such rows per sender, and in all (more are refused)
    mempool_gap_hold_ms: int = 5000
    mempool_park_per_sender: int = 4_096
    mempool_park_rows: int = 65_536
    # A mempool answers "accepted" once the rows are fsynced in its journal
    # (``<data>/mempool-<i>/journal``), and a mempool started again (after a crash, or
    # ``down`` then ``up``) admits again those not committed; off: a crash loses the rows it
    # held unsealed or whose batches no validator holds
    mempool_journal: bool = True
    mempool_journal_segment_mb: int = 64
    max_batches_per_block: int = 64
    # A validator checks at most this many announced batches at once; the rest wait in a
    # queue per mempool, served fairly by rows, of at most this many batches and rows each
    # (None: twice ``mempool_capacity``, 262,144 at least); more are dropped, and announced
    # again by an honest mempool while uncommitted
    validator_checks_at_once: int = 2
    validator_intake_batches: int = 1024
    validator_intake_rows: int | None = None
    # And at most this many bytes of batches (None: twice ``mempool_capacity_bytes``, 1 GiB at
    # least)
    validator_intake_bytes: int | None = None
    # An idle leader's wait for a batch before an empty block (None: a tenth of the timeout)
    idle_block_ms: int | None = None
    # A leader's wait for the vote of a validator that leader reputation passes over but
    # whose votes come late (a far site), so that it is seen live and leads again (0: never;
    # see CoreConfig.straggler_wait_ms)
    straggler_wait_ms: int = CoreConfig.straggler_wait_ms
    # A validator that failed as a round's leader (no block of its round committed) is passed
    # over as a leader for this many times n rounds (0: only those not seen live; see
    # CoreConfig.leader_failure_cycles)
    leader_failure_cycles: int = CoreConfig.leader_failure_cycles
    # A validator does not vote for a block stamped more than this far ahead of its clock
    # (see CoreConfig.max_clock_ahead_ms): more than the clock skew between the sites
    max_clock_ahead_ms: int = CoreConfig.max_clock_ahead_ms
    # None: the network description's latency matrix
    latency_ms: list[list[float]] | None = None
    verifier_backend: str = "auto"
    # Each validator checkpoints its committed state to its state.db every this many blocks,
    # or sooner once it holds ``state_memory_entries`` written since the last checkpoint
    # (about 320 bytes each), ``state_lag_blocks`` behind its head: a restart re-executes only
    # the blocks after the last checkpoint (which gives lagging storage shards their writes),
    # and the writes of the blocks since it are all a validator holds of the state in memory
    snapshot_every_blocks: int = 1000
    state_memory_entries: int = 1_000_000
    state_lag_blocks: int = 64
    # Committed blocks a validator holds for a storage shard that does not acknowledge them;
    # a shard further behind is rebuilt from the validator's block store
    shard_pending_blocks: int = 1024
    # Storage shards per validator: the committed ledger partitioned by key hash, serving
    # receipts, transactions and state without going through the validator (0: none; None:
    # 2, or 1 on a cluster of at most 4 CPUs, where every extra actor process costs about 2%
    # of a core even idle, measured here)
    storage_shards: int | None = None
    # Logical CPUs per actor: an institution's three actors fit in 0.45 of a core, so four
    # institutions fit a 2-core machine (a site node needs at least half a core).
    validator_cpus: float = 0.2
    mempool_cpus: float = 0.05
    verifier_cpus: float = 0.2
    shard_cpus: float = 0.01
    # A fraction of a GPU per verifier where the cluster has GPUs (kernels pick CUDA then)
    verifier_gpus: float = 0.0
    # Verifier actors (None: where the cluster has a GPU or more than 4 CPUs; on a small
    # machine the extra processes cost more than the free event loop saves, measured with
    # `rayledger bench e2e`)
    verifier_actors: bool | None = None
    # Consensus messages between validators, and sealed batches from mempools to validators,
    # on direct TCP streams (actors.streams), with Ray calls while a stream is not up; False:
    # every one by Ray call (about 9 times the CPU per message, 4-6 times per batch, measured
    # on 2 cores)
    peer_streams: bool = True
    # How long start-up waits for every actor to be placed before it gives up with an error
    place_timeout_s: float = 120.0


def site_resources(spec: NetworkSpec) -> dict[str, float]:
    """Custom resources that make one machine hold every virtual site of ``spec``."""
    return {f"site:{s}": 1000.0 for s in spec.sites}


def init_local_ray(
    spec: NetworkSpec, *, quiet: bool = True, runtime_env: dict[str, Any] | None = None
) -> None:
    """Start a Ray instance on this machine holding every virtual site of ``spec``."""
    ray.init(
        namespace=NAMESPACE,
        resources=site_resources(spec),
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=not quiet,
        runtime_env=runtime_env,
    )


class Network:
    """Handles to a network's actors, created here or found by name."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.settings: dict[str, Any] = json.loads((self.dir / "network.json").read_text())
        self.name: str = self.settings["name"]
        self.genesis: Genesis = load_genesis(self.dir / "genesis.toml")
        self.n = self.genesis.validators.n
        self._validator_cls = ray.remote(Validator)
        self._mempool_cls = ray.remote(Mempool)
        self._verifier_cls = ray.remote(Verifier)
        self._shard_cls = ray.remote(StorageShard)
        self.shards = int(self.settings.get("storage_shards", 0))
        # Handles of actors this process created (a name is visible to lookups a moment later)
        self._handles: dict[str, Any] = {}

    # ---- creation ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        spec: NetworkSpec,
        data_dir: Path,
        options: NetworkOptions | None = None,
        *,
        genesis_time_ms: int | None = None,
    ) -> Network:
        """Write a new network's genesis, keys and settings, start its actors, and start it."""
        opts = options or NetworkOptions()
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        genesis, _ = make_genesis(
            spec, genesis_time_ms or int(time.time() * 1000), keys_dir=data_dir / "keys"
        )
        genesis.save(data_dir / "genesis.toml")
        settings = asdict(opts)
        settings["latency_ms"] = opts.latency_ms or spec.latency_matrix()
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if opts.verifier_actors is None:
            settings["verifier_actors"] = bool(gpus) or ray.cluster_resources().get("CPU", 0) > 4
        if not opts.verifier_gpus and gpus:
            # Share the cluster's GPUs among the verifiers (kernels then run on CUDA)
            settings["verifier_gpus"] = min(1.0, gpus / len(spec.validators))
        if opts.storage_shards is None:
            settings["storage_shards"] = 2 if ray.cluster_resources().get("CPU", 0) > 4 else 1
        if opts.idle_block_ms is None:
            # An idle network's heartbeat: half the round timeout leaves two one-way WAN
            # delays of margin at 1 s; busy rounds never wait for it (measured idle on 2 cores:
            # 7 blocks/s and 59% of a core at a tenth of the timeout, 1.9 and 29% at half)
            settings["idle_block_ms"] = opts.base_timeout_ms // 2
        settings["placement"] = spec.placement
        settings["sites"] = [v.site for v in spec.validators]
        settings["clients"] = [c.name for c in spec.clients]
        (data_dir / "network.json").write_text(json.dumps(settings, indent=2))
        return cls.resume(data_dir)

    @classmethod
    def resume(cls, data_dir: Path) -> Network:
        """Start every actor of a network from its data directory (new or existing)."""
        net = cls(data_dir)
        for i in range(net.n):
            net._start_mempool(i)
            if net.settings.get("verifier_actors", True):
                net._start_verifier(i)
            for k in range(net.shards):
                net._start_shard(i, k)
        for i in range(net.n):
            net._start_validator(i)
        net._wait_placed(float(net.settings.get("place_timeout_s", 120.0)))
        ray.get([net.validator(i).start.remote() for i in range(net.n)])
        return net

    def _wait_placed(self, timeout_s: float) -> None:
        """Every actor is running, or a clear error: an actor that cannot be placed (no node
        of its site, too few resources) would otherwise wait for ever without a word."""
        kinds = (
            ("mempool", "verifier", "validator")
            if self.settings.get("verifier_actors", True)
            else ("mempool", "validator")
        )
        roles = [f"{r}-{i}" for i in range(self.n) for r in kinds]
        roles += [f"shard-{i}-{k}" for i in range(self.n) for k in range(self.shards)]
        refs = {self._actor(role).status.remote(): role for role in roles}
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if waiting:
            names = ", ".join(sorted(refs[r] for r in waiting))
            self.shutdown()
            raise RuntimeError(
                f"could not place {names} within {timeout_s:.0f} s: check that every site has a "
                "node (placement labels) and enough CPUs for the actors' fractions"
            )
        ray.get(ready)

    def _placement(self, i: int) -> dict[str, Any]:
        site = self.settings["sites"][i]
        if not site or self.settings["placement"] == "none":
            return {}
        if self.settings["placement"] == "labels":
            return {"label_selector": {"site": site}}
        resource = f"site:{site}"
        if resource in ray.cluster_resources():
            return {"resources": {resource: 0.001}}
        return {}

    def _start(self, cls: Any, role: str, i: int, *args: Any, **options: Any) -> Any:
        """Start ``role`` (an actor of institution ``i``, on its site) by name. Detached: it
        outlives the process that started it (`rayledger chaos restart` exits at once);
        `down` and `shutdown` stop it."""
        handle = cls.options(
            name=f"{self.name}-{role}",
            namespace=NAMESPACE,
            lifetime="detached",
            **options,
            **self._placement(i),
        ).remote(str(self.dir), i, *args)
        self._handles[role] = handle
        return handle

    def _start_validator(self, i: int) -> Any:
        return self._start(
            self._validator_cls,
            f"validator-{i}",
            i,
            num_cpus=self.settings["validator_cpus"],
            max_concurrency=1000,
            # A validator whose process dies (a crash, its node lost) comes back from its own
            # disk, however often: a quorum that loses members to crashes one at a time heals
            # itself. `kill` (`rayledger chaos kill`) stops one for good, until `restart`.
            max_restarts=-1,
        )

    def _start_verifier(self, i: int) -> Any:
        return self._start(
            self._verifier_cls,
            f"verifier-{i}",
            i,
            num_cpus=self.settings.get("verifier_cpus", 0.2),
            num_gpus=self.settings.get("verifier_gpus", 0.0),
            # Stateless: a crashed verifier comes back at once, however often (its callers
            # check signatures themselves meanwhile)
            max_restarts=-1,
            max_concurrency=4,
        )

    def _start_shard(self, i: int, k: int) -> Any:
        return self._start(
            self._shard_cls,
            f"shard-{i}-{k}",
            i,
            k,
            num_cpus=self.settings.get("shard_cpus", 0.01),
            # A crashed shard comes back from its own disk, however often it crashes over the
            # network's life (a bounded count would leave it dead for good after a few
            # crashes, months apart); its validator resends the rest
            max_restarts=-1,
            max_concurrency=16,
        )

    def _start_mempool(self, i: int) -> Any:
        return self._start(
            self._mempool_cls,
            f"mempool-{i}",
            i,
            num_cpus=self.settings["mempool_cpus"],
            # A crashed mempool comes back and asks the validators for their handles again
            # (the rows it held unsealed are lost with it)
            max_restarts=-1,
        )

    # ---- handles -------------------------------------------------------------------------------

    def _actor(self, role: str) -> Any:
        handle = self._handles.get(role)
        if handle is None:
            handle = ray.get_actor(f"{self.name}-{role}", namespace=NAMESPACE)
        return handle

    def validator(self, i: int) -> Any:
        """Validator ``i``'s handle; ``ValueError`` if it is down."""
        return self._actor(f"validator-{i}")

    def mempool(self, i: int) -> Any:
        return self._actor(f"mempool-{i}")

    def shard(self, i: int, k: int) -> Any:
        """Storage shard ``k`` of validator ``i``."""
        return self._actor(f"shard-{i}-{k}")

    def live(self) -> list[int]:
        out = []
        for i in range(self.n):
            try:
                self.validator(i)
            except ValueError:
                continue
            out.append(i)
        return out

    # ---- operations ----------------------------------------------------------------------------

    @property
    def chain_id(self) -> bytes:
        return self.genesis.chain_id

    def client_key(self, name: str) -> SigningKey:
        return read_key_file(self.dir / "keys" / f"{name}.key")

    @property
    def clients(self) -> list[str]:
        return list(self.settings["clients"])

    def submit(self, batch: pa.RecordBatch, mempool: int = 0) -> Admission:
        # A slice is sent in buffers of its own, not with the batch it was cut from
        return ray.get(self.mempool(mempool).submit.remote(compact_batch(batch)))

    def status(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(self.n):
            try:
                try:
                    st = self._status_of(i)
                except ray.exceptions.RayActorError:
                    # A handle this process made, for an actor that died since: one restarted
                    # elsewhere (`rayledger chaos restart`) is found by its name instead
                    self._handles.pop(f"validator-{i}", None)
                    self._handles.pop(f"mempool-{i}", None)
                    st = self._status_of(i)
                out.append(st)
            except (ValueError, ray.exceptions.RayError, TimeoutError) as exc:
                out.append({"index": i, "site": self.settings["sites"][i], "down": _why_down(exc)})
        return out

    def _status_of(self, i: int) -> dict[str, Any]:
        asked = time.time()
        st: dict[str, Any] = ray.get(self.validator(i).status.remote(), timeout=10)
        answered = time.time()
        if "clock_ms" in st:
            # How far the validator's clock is ahead of this process's, give or take half the
            # round trip: blocks stamped more than its max_clock_ahead_ms ahead of a
            # validator's clock get no vote from it
            st["clock_offset_ms"] = round(st["clock_ms"] - (asked + answered) * 500)
            st["clock_offset_uncertainty_ms"] = round((answered - asked) * 500)
        st["mempool"] = ray.get(self.mempool(i).status.remote(), timeout=10)
        st["site"] = self.settings["sites"][i]
        if self.settings.get("verifier_actors"):
            st["verifier"] = self._verifier_status(i)
        return st

    def _verifier_status(self, i: int) -> dict[str, Any]:
        """Institution ``i``'s verifier (where its batch checks run), or why it cannot say."""
        try:
            return ray.get(self._actor(f"verifier-{i}").status.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError, TimeoutError) as exc:
            return {"backend": f"down ({type(exc).__name__})"}

    def placement(self) -> list[dict[str, Any]]:
        return [ray.get(self.validator(i).where.remote()) for i in self.live()]

    def headers(self, i: int) -> list[tuple[int, bytes, bytes]]:
        return ray.get(self.validator(i).headers.remote())

    def height(self, i: int) -> int:
        return int(ray.get(self.validator(i).status.remote())["height"])

    def wait_committed(
        self, batch: pa.RecordBatch, timeout_s: float = 120.0, validators: list[int] | None = None
    ) -> float:
        """Wait until every row of ``batch`` is committed on the given validators (default:
        every live one); return the seconds waited."""
        ids = [r.tobytes() for r in tx_ids_of(batch)]
        t0 = time.monotonic()
        while True:
            targets = validators if validators is not None else self.live()
            heights = [ray.get(self.validator(i).locate.remote(ids), timeout=30) for i in targets]
            if all(h is not None for hs in heights for h in hs):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"transactions not committed within {timeout_s} s")
            time.sleep(0.2)

    # ---- faults (``rayledger chaos``): each checks its arguments before it changes anything ----

    def _check_validator(self, i: int) -> None:
        check_validator(i, self.n)

    def kill(self, i: int) -> None:
        """Crash validator ``i``: its process dies, its disk stays."""
        self._check_validator(i)
        try:
            handle = self.validator(i)
        except ValueError:
            raise ValueError(f"validator {i} is down already") from None
        ray.kill(handle, no_restart=True)
        self._handles.pop(f"validator-{i}", None)
        deadline = time.monotonic() + 10
        while i in self.live() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, i: int) -> bool:
        """Start validator ``i`` again from its own disk; it finds its peers and catches up.
        One that Ray is bringing back already (its process died: see ``_start_validator``)
        is only waited for. False if it was up all along (nothing to do)."""
        self._check_validator(i)
        try:
            handle = self.validator(i)
        except ValueError:  # killed for good
            handle = self._start_validator(i)
        try:
            return bool(ray.get(handle.start.remote(), timeout=120))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"validator {i} did not start within 120 s: has its site a node with room for it?"
            ) from None

    def crash_mempool(self, i: int) -> None:
        """Crash validator ``i``'s mempool: Ray restarts its process, which admits again what
        its journal holds and asks the validators for their handles."""
        self._check_validator(i)
        ray.kill(self.mempool(i), no_restart=False)

    def crash_shard(self, i: int, k: int) -> None:
        """Crash storage shard ``k`` of validator ``i``: Ray restarts its process, which
        reopens its disk; the validator then sends it what it missed."""
        self._check_validator(i)
        if not 0 <= k < self.shards:
            raise ValueError(
                f"no storage shard {k}: validator {i} has {self.shards}"
                + (f" (0 to {self.shards - 1})" if self.shards else "")
            )
        ray.kill(self.shard(i, k), no_restart=False)

    def partition(self, groups: list[list[int]]) -> None:
        """Cut traffic between the groups (validators not listed form one more group).
        ``ValueError``, and nothing cut, for an empty group, a validator that does not exist
        or is listed twice, or groups that cut nothing (all the validators in one)."""
        listed = [i for g in groups for i in g]
        for i in listed:
            self._check_validator(i)
        if any(not g for g in groups):
            raise ValueError(f"a partition's groups must not be empty: {groups}")
        twice = sorted({i for i in listed if listed.count(i) > 1})
        if twice:
            raise ValueError(f"validators listed more than once: {twice}")
        rest = [i for i in range(self.n) if i not in listed]
        groups = [*groups, rest] if rest else list(groups)
        if len(groups) < 2:
            raise ValueError(f"{groups} cuts nothing: name the groups to cut apart")
        for g in groups:
            others = [j for j in range(self.n) if j not in g]
            for i in g:
                if i in self.live():
                    ray.get(self.validator(i).set_blocked.remote(others))

    def heal(self) -> None:
        for i in self.live():
            ray.get(self.validator(i).set_blocked.remote([]))

    def set_strategy(self, i: int, strategy: str) -> None:
        self._check_validator(i)
        if strategy not in ACTOR_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(ACTOR_STRATEGIES)}")
        try:
            handle = self.validator(i)
        except ValueError:
            raise ValueError(f"validator {i} is down") from None
        ray.get(handle.set_strategy.remote(strategy))

    def shutdown(self) -> None:
        for i in range(self.n):
            roles = [f"validator-{i}", f"mempool-{i}", f"verifier-{i}"]
            roles += [f"shard-{i}-{k}" for k in range(self.shards)]
            for role in roles:
                try:
                    ray.kill(self._actor(role), no_restart=True)
                except ValueError:  # already gone
                    continue
        self._handles.clear()


def _why_down(exc: Exception) -> str:
    """A validator's status call failed: why, in words an operator can act on."""
    if isinstance(exc, TimeoutError):  # ray.exceptions.GetTimeoutError is one
        return "no answer in 10 s"
    if isinstance(exc, ValueError):  # ray.get_actor: no live actor by that name
        return "no actor (killed, or not started)"
    if isinstance(exc, ray.exceptions.RayActorError):
        return "actor died"
    return type(exc).__name__
