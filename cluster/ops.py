"""``rayledger up | status | down | chaos``: run a network and operate it from other processes.

``up`` starts (or joins) Ray, deploys the network described by a config (or resumes the one in
the data directory), prints where every validator runs, and keeps running, printing progress,
until interrupted; then it stops the network. It records the Ray address and its own pid in
the data directory, which is how the other commands find the network.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from rayledger.actors.storage.lock import hold_lock, release_lock
from rayledger.cluster.client import join_cluster
from rayledger.cluster.local import NAMESPACE, Network, NetworkOptions, init_local_ray
from rayledger.cluster.network import load_network


def connect(data_dir: Path) -> Network:
    """Join the Ray cluster that ``up`` recorded and return the network's handles."""
    address_file = data_dir / "ray_address"
    if not address_file.exists():
        raise FileNotFoundError(f"no running network recorded in {data_dir} (start `rayledger up`)")
    if not ray.is_initialized():
        join_cluster(address_file.read_text().strip(), data_dir)
    return Network(data_dir)


def status_table(net: Network) -> Table:
    table = Table(
        "validator",
        "site",
        "height",
        "round (by timeout)",
        "leader",
        "head",
        "mempool rows/limit",
        "peers (streams up)",
        "shards at",
        "state on disk at / held",
        "checks on",
        "clock",
        "loop late",
        "evidence",
        "rejected",
        title=f"network {net.name} ({net.genesis.chain_name})",
    )
    for st in net.status():
        if "down" in st:
            table.add_row(
                str(st["index"]), st["site"], "-", "-", "-", f"down ({st['down']})", *["-"] * 9
            )
            continue
        mp = st["mempool"]
        table.add_row(
            str(st["index"]),
            st["site"],
            str(st["height"]),
            # Rounds entered through a timeout certificate since this validator started
            f"{st['round']} ({st.get('rounds_by_timeout', '?')})",
            _leader(st),
            st["head"][:16],
            # Pending + sealed but uncommitted, against the learnt limit (busy beyond it), and
            # the rows parked ahead of their sender's sequence, if any
            f"{mp['pending_rows']}+{mp['in_flight_rows']}/{mp['limit_rows']}"
            + (f" ({mp['parked_rows']} parked)" if mp.get("parked_rows") else ""),
            _peers(st),
            # Height each storage shard has applied ("?" while it is being reached)
            " ".join("?" if h is None else str(h) for h in st.get("shards", {}).values()) or "-",
            # The committed state: the height checkpointed to the validator's disk, and the
            # entries written since, held in memory
            f"{st['state_checkpoint']} / {st['state_held_entries']:,}"
            if "state_checkpoint" in st
            else "-",
            # Where this institution's batch signatures are checked: its verifier's kernels
            # backend (cuda on a GPU), or the validator's own process
            st.get("verifier", {}).get("backend", "validator"),
            _clock(st),
            _loop(st),
            str(st["evidence"]),
            str(sum(st["rejected"].values())),
        )
    return table


def _leader(st: dict[str, Any]) -> str:
    """The round's leader, and those leader reputation passes over (down or always the last
    to vote: unseen; failed as a leader lately: failed)."""
    out = str(st["leader"])
    over = st.get("passed_over") or {}
    why = [
        f"{kind} {','.join(map(str, over[kind]))}"
        for kind in ("unseen", "failed")
        if over.get(kind)
    ]
    return f"{out} (passes over: {'; '.join(why)})" if why else out


def _clock(st: dict[str, Any]) -> str:
    """How far a validator's clock is ahead of this machine's (behind: negative)."""
    offset = st.get("clock_offset_ms")
    if offset is None:
        return "?"
    return f"{offset / 1000:+.3f} s"


def _loop(st: dict[str, Any]) -> str:
    """How late the validator's event loop ran at worst in the last minute, and its stalls
    since it started (a stalled loop delays timers and messages: rounds can end by timeout)."""
    loop = st.get("loop")
    if not loop:
        return "?"
    stalls = f", {loop['stalls']} stalls" if loop["stalls"] else ""
    return f"{loop['worst_ms_last_minute']:.0f} ms{stalls}"


def _peers(st: dict[str, Any]) -> str:
    """The peers a validator knows, and those it has a direct stream up to ("ray": every
    consensus message by Ray call)."""
    peers = ",".join(str(p) for p in st["peers"])
    streams = st.get("streams")
    if not streams:
        return peers
    if not streams["enabled"]:
        return f"{peers} (ray)"
    return f"{peers} ({','.join(str(p) for p in streams['connected']) or 'none'})"


def up(
    console: Console,
    config: Path,
    data_dir: Path,
    address: str | None,
    options: NetworkOptions,
    seconds: float | None = None,
) -> None:
    spec = load_network(config)
    # One `up` per data directory (a second would deploy the same validators again): the
    # lock is this process's until it exits
    lock = hold_lock(data_dir / "up.lock", f"the network in {data_dir} (rayledger up)", wait_s=0)
    if address:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR)
    else:
        init_local_ray(spec, quiet=False)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "ray_address").write_text(ray.get_runtime_context().gcs_address)
    (data_dir / "up.pid").write_text(str(os.getpid()))
    stopping = {"now": False}

    def stop(*_: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if (data_dir / "network.json").exists():
            net = Network.resume(data_dir)
            console.print(f"resumed network {net.name} from {data_dir}")
        else:
            net = Network.create(spec, data_dir, options)
            console.print(f"created network {net.name} in {data_dir}")
        where = Table("validator", "site", "node", "node labels", title="placement")
        for w in net.placement():
            where.add_row(
                str(w["index"]),
                net.settings["sites"][w["index"]],
                w["node_id"][:16],
                str(w["labels"]),
            )
        console.print(where)
        console.print(
            f"ray address {ray.get_runtime_context().gcs_address}; "
            f"`rayledger status --data-dir {data_dir}` from another shell"
        )
        t0 = time.monotonic()
        while not stopping["now"] and (seconds is None or time.monotonic() - t0 < seconds):
            time.sleep(0.5)
            if int(time.monotonic() - t0) % 5 == 0:
                heights = {st["index"]: st.get("height", "down") for st in net.status()}
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] heights {heights}")
                time.sleep(0.5)
        console.print("stopping the network")
        net.shutdown()
    finally:
        (data_dir / "up.pid").unlink(missing_ok=True)
        (data_dir / "ray_address").unlink(missing_ok=True)
        ray.shutdown()
        release_lock(lock)


def down(data_dir: Path) -> str:
    net = connect(data_dir)
    net.shutdown()
    pid_file = data_dir / "up.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
    return f"network {net.name} stopped"


CHAOS_USAGE = (
    "chaos: kill N | restart N | partition 0,1|2,3 | heal | byzantine N STRATEGY | crash-shard N K"
    " | crash-mempool N"
)


def chaos(data_dir: Path, action: str, args: list[str]) -> str:
    """One fault (or its undoing) on the running network. ``ValueError``, with nothing
    changed, for a command that does not parse (checked before the network is reached), and
    for a validator, shard, strategy or partition the network does not have."""

    def number(text: str, what: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"chaos {action}: {what} is a number, not {text!r}") from None

    op: Callable[[Network], str]
    match action, args:
        case "kill", [i]:
            v = number(i, "the validator")

            def op(net: Network) -> str:
                net.kill(v)
                return f"validator {v} killed"

        case "restart", [i]:
            v = number(i, "the validator")

            def op(net: Network) -> str:
                if not net.restart(v):
                    return f"validator {v} is up: nothing to restart"
                return f"validator {v} restarted from its disk"

        case "partition", [spec]:
            groups = [
                [number(x, "each validator") for x in g.split(",") if x.strip()]
                for g in spec.split("|")
            ]

            def op(net: Network) -> str:
                net.partition(groups)
                return f"partitioned {groups}"

        case "heal", []:

            def op(net: Network) -> str:
                net.heal()
                return "partition healed"

        case "byzantine", [i, strategy]:
            v = number(i, "the validator")

            def op(net: Network) -> str:
                net.set_strategy(v, strategy)
                return f"validator {v} now runs {strategy}"

        case "crash-shard", [i, k]:
            v, shard = number(i, "the validator"), number(k, "the shard")

            def op(net: Network) -> str:
                net.crash_shard(v, shard)
                return (
                    f"storage shard {shard} of validator {v} crashed; Ray restarts it from its disk"
                )

        case "crash-mempool", [i]:
            v = number(i, "the validator")

            def op(net: Network) -> str:
                net.crash_mempool(v)
                return (
                    f"mempool of validator {v} crashed; Ray restarts it, and it admits again "
                    "what its journal holds"
                )

        case _:
            raise ValueError(CHAOS_USAGE)
    return op(connect(data_dir))
