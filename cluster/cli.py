"""The ``rayledger`` command: keys, genesis, store checks, the demo and benchmarks."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayledger.errors import LedgerError, NotFound
from rayledger.execution import Status

if TYPE_CHECKING:
    from rayledger.cluster.bench import Figure
    from rayledger.cluster.network import NetworkSpec

app = typer.Typer(
    help="rayledger: a permissioned BFT ledger for e-services, built on Ray.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(
    help="Ed25519 key files for validators and e-service clients.", no_args_is_help=True
)
genesis_app = typer.Typer(help="Create and inspect genesis files.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and verify a block store.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that report measured rates and ratios.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(genesis_app, name="genesis")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")

console = Console()
DEFAULT_CONFIG = Path("configs/local.toml")
# `bench e2e` and `bench rounds`: the direct streams between validators on or off
PeerStreamsOption = Annotated[
    bool,
    typer.Option(
        "--peer-streams/--ray-calls",
        help="consensus messages between validators and sealed batches from mempools to "
        "validators on direct streams (the default), or every one by Ray call",
    ),
]
# How `bench e2e` names the CPU rows that are not one kind of actor (the rest: "validators"...)
_ROLE_LABELS = {
    "load generator": "load generator",
    "driver": "driver (this command)",
    "ray": "Ray's own processes",
}


def _fail(exc: Exception) -> typer.Exit:
    # One line however long (a path, a list of choices): rich would fold it at the console's
    # width, 80 columns where the output is a pipe or a log, mid-word in a long path
    console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(2)


@keys_app.command("new")
def keys_new(path: Annotated[Path, typer.Argument(help="where to write the key (0600)")]) -> None:
    """Generate an Ed25519 key file; print its public key. Never overwrites."""
    from rayledger.crypto import generate_key, public_bytes, write_key_file

    if path.exists() or path.is_symlink():
        raise _fail(FileExistsError(f"{path} exists; a key file is never overwritten"))
    key = generate_key()
    try:
        write_key_file(path, key)
    except FileExistsError:
        # Something else where its folder should be (a file named as a parent folder)
        raise _fail(NotADirectoryError(f"cannot write {path}: a parent is not a folder")) from None
    except OSError as exc:
        raise _fail(OSError(f"cannot write {path}: {exc.strerror or exc}")) from None
    console.print(public_bytes(key).hex())


@keys_app.command("show")
def keys_show(path: Path) -> None:
    """Print the public key of a key file."""
    from rayledger.crypto import public_bytes, read_key_file

    try:
        console.print(public_bytes(read_key_file(path)).hex())
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None


@genesis_app.command("new")
def genesis_new(
    out: Annotated[Path, typer.Option(help="genesis file to write")],
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    keys_dir: Annotated[Path | None, typer.Option(help="write member keys here")] = None,
    dev: Annotated[bool, typer.Option(help="use the well-known development keys")] = False,
) -> None:
    """Create a genesis (chain id, validators, organisations, limits) from a network config."""
    from rayledger.cluster.network import load_network, make_genesis

    # Everything that can be refused is, before any file is written
    if out.exists() or out.is_symlink():
        raise _fail(FileExistsError(f"{out} exists"))
    if not out.parent.is_dir():
        raise _fail(NotADirectoryError(f"{out.parent} is not a directory: {out} cannot go there"))
    if keys_dir is None and not dev:
        # New keys that nobody keeps: a genesis whose validators can never sign
        raise _fail(ValueError("pass --keys-dir DIR to keep the new keys, or --dev"))
    if keys_dir is not None and keys_dir.exists() and not keys_dir.is_dir():
        raise _fail(NotADirectoryError(f"--keys-dir {keys_dir} is not a directory"))
    try:
        genesis, _ = make_genesis(
            load_network(config), int(time.time() * 1000), keys_dir=keys_dir, dev=dev
        )
        genesis.save(out)
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None
    console.print(f"chain {genesis.chain_name} id {genesis.chain_id.hex()} -> {out}")


@genesis_app.command("show")
def genesis_show(path: Path) -> None:
    """Print a genesis file's chain, validators and organisations."""
    from rayledger.config import load_genesis

    try:
        g = load_genesis(path)
    except LedgerError as exc:
        raise _fail(exc) from None
    vs = g.validators
    console.print(f"chain {g.chain_name} id {g.chain_id.hex()}  n={vs.n} f={vs.f} q={vs.quorum}")
    table = Table("validator", "org", "site", "public key")
    for v in vs.validators:
        table.add_row(v.name, v.org, v.site, v.public_key.hex())
    console.print(table)
    for o in g.organisations:
        console.print(f"organisation {o.name}: {len(o.members)} member keys")


@store_app.command("verify")
def store_verify(
    path: Path, genesis: Annotated[Path, typer.Option(help="the chain's genesis file")]
) -> None:
    """Verify a block store: every frame, the hash chain and the roots. PATH is the store, or
    a validator's directory (its ``store`` inside). Read only: nothing is created, marked,
    indexed or set aside; what its next open would recover is listed."""
    from rayledger.actors.storage import BlockStore
    from rayledger.config import load_genesis

    if not BlockStore.exists(path) and BlockStore.exists(path / "store"):
        path = path / "store"
    if not BlockStore.exists(path):
        raise _fail(NotFound(f"no block store in {path} (index.sqlite and segments/)"))
    try:
        t0 = time.perf_counter()
        with BlockStore(path, load_genesis(genesis).header, read_only=True) as store:
            for line in store.recovery:
                console.print(f"[yellow]found:[/] {escape(line)}", soft_wrap=True)
            console.print(
                f"ok: {store.height} blocks verified in {time.perf_counter() - t0:.2f} s, "
                f"head {store.head.hash.hex()}"
            )
    except LedgerError as exc:
        raise _fail(exc) from None


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    data_dir: Annotated[Path | None, typer.Option(help="keep keys and store here")] = None,
    txs: Annotated[int, typer.Option(min=8)] = 20_000,
    block_size: Annotated[int, typer.Option(min=1, help="--offline only")] = 2_500,
    offline: Annotated[
        bool, typer.Option(help="no Ray: build and store a certified chain in this process")
    ] = False,
) -> None:
    """Run the network on Ray on this machine: clients submit, validators commit, one crashes
    and comes back; then audit a receipt from disk. --offline does the chain without Ray."""
    from rayledger.cluster.demo import run_demo, run_network_demo

    try:
        if offline:
            result = run_demo(console, config, data_dir, txs, block_size)
        else:
            result = run_network_demo(console, config, txs)
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None
    if not (result.proof_ok and result.tamper_rejected and result.qc_ok):
        raise typer.Exit(1)


DEFAULT_DATA = Path(".rayledger")


@app.command()
def up(
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    data_dir: Annotated[Path, typer.Option(help="the network's data directory")] = DEFAULT_DATA,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster (or 'auto')")] = None,
    name: Annotated[str, typer.Option(help="actor name prefix")] = "rayledger",
    timeout_ms: Annotated[int, typer.Option(min=50, help="base round timeout")] = 1000,
    max_clock_ahead_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="validators vote for no block stamped further ahead of their clocks: more "
            "than the clock skew between the sites' machines",
        ),
    ] = 1000,
    seconds: Annotated[float | None, typer.Option(help="stop after this long")] = None,
) -> None:
    """Start or join Ray, deploy (or resume) the network, and run until interrupted."""
    from rayledger.cluster.local import NetworkOptions
    from rayledger.cluster.ops import up as run_up

    try:
        run_up(
            console,
            config,
            data_dir,
            address,
            NetworkOptions(
                name=name, base_timeout_ms=timeout_ms, max_clock_ahead_ms=max_clock_ahead_ms
            ),
            seconds,
        )
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None


@app.command()
def status(
    data_dir: Annotated[Path, typer.Option(help="the network's data directory")] = DEFAULT_DATA,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="every validator's whole status as JSON (for scripts), not the table"
        ),
    ] = False,
) -> None:
    """Height, round, leader, mempool depth and peers of every validator."""
    from rayledger.cluster.ops import connect, status_table

    try:
        net = connect(data_dir)
        if as_json:
            print(json.dumps(net.status(), indent=2, default=_json_default))
            return
        # Piped into a log or a narrow CI console, rich would squeeze the 13 columns into 80
        out = console if console.is_terminal else Console(width=max(console.width, 360))
        out.print(status_table(net))
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None


def _json_default(value: object) -> object:
    """What ``json`` cannot write itself in a status: bytes as hex, the rest as text."""
    return value.hex() if isinstance(value, bytes) else str(value)


@app.command()
def receipt(
    tx_id: Annotated[str, typer.Argument(help="the transaction id, hex")],
    data_dir: Annotated[Path, typer.Option(help="the network's data directory")] = DEFAULT_DATA,
    validator: Annotated[int, typer.Option(min=0, help="whose storage shards to ask")] = 0,
) -> None:
    """Fetch a committed transaction's receipt from a storage shard and verify it with the
    validator keys alone; prints it as JSON (exit 2 if not committed or not valid)."""
    import ray

    from rayledger.cluster.client import Client
    from rayledger.cluster.ops import connect

    try:
        raw = bytes.fromhex(tx_id)
    except ValueError:
        raise _fail(ValueError(f"a transaction id is 64 hex digits, not {tx_id!r}")) from None
    if len(raw) != 32:
        raise _fail(ValueError(f"a transaction id is 64 hex digits, not {len(tx_id)}"))
    try:
        net = connect(data_dir)
        r = Client(net.dir, validator=validator).receipt(raw)
    except (LedgerError, OSError, ValueError, ray.exceptions.RayError) as exc:
        raise _fail(exc) from None
    c = r.commit
    print(
        json.dumps(
            {
                "tx_id": r.tx_id.hex(),
                "height": r.height,
                "index": r.index,
                "status": Status(r.status).name,
                "result": r.result.hex(),
                "sender": r.tx.sender.hex(),
                "nonce": r.tx.nonce,
                "kind": r.tx.kind,
                "block_hash": r.header.hash.hex(),
                "tx_root": r.header.tx_root.hex(),
                "committed_by": {
                    "height": c.header.height,
                    "round": c.header.round,
                    "child_round": c.child.round,
                    "signers": c.qc.signer_indices(),
                    "child_signers": c.child_qc.signer_indices(),
                },
                "verified": True,
                "receipt": r.encode().hex(),
            },
            indent=2,
        )
    )


@app.command()
def down(
    data_dir: Annotated[Path, typer.Option(help="the network's data directory")] = DEFAULT_DATA,
) -> None:
    """Stop the network cleanly (its data stays for the next `up`)."""
    from rayledger.cluster.ops import down as run_down

    try:
        console.print(run_down(data_dir))
    except (LedgerError, OSError) as exc:
        raise _fail(exc) from None


@app.command()
def chaos(
    action: Annotated[
        str,
        typer.Argument(
            help="kill | restart | partition | heal | byzantine | crash-shard | crash-mempool"
        ),
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="N, groups '0,1|2,3', N STRATEGY, or N K")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="the network's data directory")] = DEFAULT_DATA,
) -> None:
    """Inject faults into a running network."""
    from rayledger.cluster.ops import chaos as run_chaos

    try:
        console.print(run_chaos(data_dir, action, args or []))
    except (LedgerError, OSError, ValueError) as exc:
        raise _fail(exc) from None


@app.command()
def soak(
    duration: Annotated[float, typer.Option(min=1, help="seconds of faults under load")] = 300.0,
    seed: Annotated[int, typer.Option(help="the fault sequence's seed")] = 1,
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    forged_rows: Annotated[
        int,
        typer.Option(
            min=0, help="an impostor announces a batch of this many forged rows every second"
        ),
    ] = 0,
    settle: Annotated[
        float, typer.Option(min=1, help="seconds allowed after the load for the last commits")
    ] = 300.0,
    keep: Annotated[
        Path | None,
        typer.Option(
            help="keep the network's data in this new or empty directory (else a temporary "
            "one, removed)"
        ),
    ] = None,
) -> None:
    """A local network under load through random faults (partitions, crashes of one and two
    validators, Byzantine strategies, storage shard and mempool crashes), then checked: every
    accepted transaction committed once, OK, on every validator, and the validators agree.
    The last line is JSON; the exit code is 0 only when everything holds."""
    from rayledger.cluster.soak import soak as run_soak

    try:
        r = run_soak(
            config,
            duration,
            seed,
            forged_rows=forged_rows,
            settle_s=settle,
            keep=keep,
            say=console.print,
        )
    except ValueError as exc:
        raise _fail(exc) from None
    table = Table("figure", "value", title=f"rayledger soak (seed {seed}, {duration:g} s)")
    table.add_row("faults", f"{len(r.faults)}: " + ", ".join(r.faults))
    table.add_row("transactions accepted", f"{r.accepted:,}")
    table.add_row("committed per validator", ", ".join(f"{c:,}" for c in r.committed))
    table.add_row(
        "committed twice / missing / not OK", f"{r.duplicates} / {r.missing} / {r.not_ok}"
    )
    table.add_row(
        "gap waits per validator",
        f"batches held back {r.batches_deferred}; backlogs asked for {r.backlog_asked}; "
        f"rows proposed ahead of a missing nonce {r.gap_rows_proposed}",
    )
    if r.not_ok_by_status:
        table.add_row(
            "not OK by status (validator 0)",
            ", ".join(f"{name} {n:,}" for name, n in r.not_ok_by_status.items()),
        )
    table.add_row("validators agree", f"{'yes' if r.agreement else 'NO'} (heights {r.heights})")
    if forged_rows:
        table.add_row("impostor's forged batches", f"{r.forged_batches:,} announced")
    table.add_row("evidence of misbehaviour", f"{r.evidence:,}")
    table.add_row("verdict", "OK" if r.ok else "FAILED")
    console.print(table)
    print(json.dumps({"soak": True, **r.as_dict()}))
    if not r.ok:
        raise typer.Exit(1)


# The largest --validators simulate takes. Every message goes to every validator, so a round
# costs n^2 deliveries: at 100 (over the 64 of `bench consensus`) the default 100 rounds take
# about a minute (10 s with --crypto mac), while a mistyped huge n would run silently for hours.
_SIM_MAX_VALIDATORS = 100


def _far(spec: str) -> tuple[int, float]:
    node, sep, ms = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(node), float(ms)
    except ValueError:
        raise ValueError(f"--far {spec!r}: expected NODE:MS, e.g. 3:60") from None


@app.command()
def simulate(
    validators: Annotated[int, typer.Option(min=1, max=_SIM_MAX_VALIDATORS, help="n")] = 4,
    byzantine: Annotated[int, typer.Option(min=0, help="how many run the strategy")] = 0,
    strategy: Annotated[str, typer.Option(help="Byzantine strategy")] = "none",
    seed: Annotated[int, typer.Option()] = 0,
    rounds: Annotated[int, typer.Option(min=1, help="stop once a validator reaches it")] = 100,
    drop: Annotated[float, typer.Option(help="message drop probability")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="message duplication probability")] = 0.0,
    partition: Annotated[
        list[str] | None, typer.Option(help="START-END:0,1|2,3 (repeatable)")
    ] = None,
    crash: Annotated[list[str] | None, typer.Option(help="NODE@AT[-RESTART] (repeatable)")] = None,
    delay_ms: Annotated[float, typer.Option(help="mean link delay")] = 20.0,
    jitter_ms: Annotated[float, typer.Option(help="link delay deviation")] = 10.0,
    timeout_ms: Annotated[int, typer.Option(min=1, help="base round timeout")] = 400,
    crypto: Annotated[str, typer.Option(help="ed25519, or mac for fast large runs")] = "ed25519",
    max_time_ms: Annotated[float, typer.Option(help="simulated time limit")] = 600_000.0,
    leader_reputation: Annotated[
        bool,
        typer.Option(
            help="pass over validators not seen live lately as leaders (off: round robin, "
            "a crashed validator's rounds time out for as long as it is down)"
        ),
    ] = True,
    far: Annotated[
        list[str] | None,
        typer.Option(help="NODE:MS: every message to or from NODE takes MS longer (repeatable)"),
    ] = None,
    straggler_wait_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="a leader waits at most this long for a late voter that leader reputation "
            "passes over (0: never)",
        ),
    ] = 150,
    leader_failure_cycles: Annotated[
        int,
        typer.Option(
            min=0,
            help="pass over a validator that failed as a round's leader for this many times n "
            "rounds (0: only those not seen live)",
        ),
    ] = 16,
) -> None:
    """Run n consensus cores in a seeded, simulated network under faults and attacks.

    The last line is a JSON summary; the exit code is 0 only when safety holds."""
    from rayledger.consensus.sim import STRATEGIES, Crash, Partition, SimConfig
    from rayledger.consensus.sim import simulate as run_sim

    if byzantine and strategy == "none":
        raise _fail(ValueError(f"--byzantine needs a --strategy: {', '.join(STRATEGIES[1:])}"))
    if strategy in STRATEGIES[1:] and not byzantine:
        # With no Byzantine validators the strategy would go unused: an honest run that looks
        # like an attack was tested.
        raise _fail(ValueError(f"--strategy {strategy} needs --byzantine 1 or more"))
    # The run stops at the first event past --max-time-ms: inf or nan (nothing compares
    # greater) never stops a run that cannot reach --rounds, and 0 or less simulates nothing.
    if not (math.isfinite(max_time_ms) and max_time_ms > 0):
        raise _fail(ValueError(f"--max-time-ms {max_time_ms}: must be a finite number > 0"))
    # A delay of 0 is allowed: the simulator floors each delivery at 0.5 ms.
    for option, value in (("--delay-ms", delay_ms), ("--jitter-ms", jitter_ms)):
        if not (math.isfinite(value) and value >= 0):
            raise _fail(ValueError(f"{option} {value}: must be a finite number >= 0"))
    try:
        cfg = SimConfig(
            validators=validators,
            byzantine=byzantine,
            strategy=strategy,
            seed=seed,
            rounds=rounds,
            drop=drop,
            duplicate=duplicate,
            delay_ms=delay_ms,
            jitter_ms=jitter_ms,
            partitions=tuple(Partition.parse(p) for p in partition or ()),
            crashes=tuple(Crash.parse(c) for c in crash or ()),
            base_timeout_ms=timeout_ms,
            crypto=crypto,
            max_time_ms=max_time_ms,
            leader_reputation=leader_reputation,
            far=tuple(_far(f) for f in far or ()),
            straggler_wait_ms=straggler_wait_ms,
            leader_failure_cycles=leader_failure_cycles,
        )
    except ValueError as exc:
        raise _fail(exc) from None
    t0 = time.perf_counter()
    result = run_sim(cfg)
    wall = time.perf_counter() - t0
    colour = "green" if result.safety == "ok" else "red"
    console.print(
        f"[{colour}]safety {result.safety}[/]  committed height {result.committed_height} "
        f"(max {result.max_committed_height})  rounds {result.rounds}  timeouts "
        f"{result.timeouts}  evidence {result.evidence}  commit p50 {result.p50_commit_ms} ms "
        f"p99 {result.p99_commit_ms} ms  ({result.sim_time_ms / 1000:.1f} s simulated in "
        f"{wall:.2f} s)  committed blocks by proposer, last half of the heights: "
        f"{result.proposed_late}; blocks stamped up to {result.stamp_ahead_ms:.0f} ms ahead "
        "of their commit"
    )
    for line in result.violations:
        console.print(f"[red]{escape(line)}[/]")
    print(result.as_json())
    if result.safety != "ok":
        raise typer.Exit(1)


@bench_app.command("core")
def bench_core_cmd(
    rows: Annotated[int, typer.Option(min=1000)] = 100_000,
    sign_rows: Annotated[int, typer.Option(min=100)] = 20_000,
    leaves: Annotated[int, typer.Option(min=1)] = 1_000_000,
    block_rows: Annotated[int, typer.Option(min=1)] = 10_000,
) -> None:
    """Rows/s of signing, tx ids, signature checks, Merkle roots and the block store."""
    from rayledger.cluster.bench import bench_core

    _print_figures("rayledger bench core", bench_core(rows, sign_rows, leaves, block_rows))


def _print_figures(title: str, figures: list[Figure]) -> None:
    table = Table("operation", "items", "seconds", "rate /s", "baseline", "ratio", title=title)
    for f in figures:
        table.add_row(
            f.operation,
            f"{f.items:,} {f.unit}",
            f"{f.seconds:.3f}",
            f"{f.rate:,.0f}",
            f"{f.baseline} {f.baseline_rate:,.0f}/s" if f.baseline else "",
            "" if f.ratio is None else f"{f.ratio:.2f}x",
        )
    console.print(table)
    print(json.dumps({"bench": title, "figures": [f.as_dict() for f in figures]}))


@bench_app.command("shard")
def bench_shard_cmd(
    transactions: Annotated[int, typer.Option(min=100)] = 500_000,
    block_rows: Annotated[int, typer.Option(min=1)] = 500,
    window: Annotated[int, typer.Option(min=1, help="transactions per figure")] = 100_000,
) -> None:
    """CPU per transaction of one storage shard as its index grows (runs of many blocks vs a
    run per block)."""
    from rayledger.cluster.bench import bench_shard

    _print_figures("rayledger bench shard", bench_shard(transactions, block_rows, window))


@bench_app.command("consensus")
def bench_consensus_cmd(
    rounds_small: Annotated[int, typer.Option(min=10, help="rounds for n=4")] = 400,
    rounds_large: Annotated[int, typer.Option(min=5, help="rounds for n=64")] = 40,
) -> None:
    """Simulated rounds per wall second (n=4, n=64) and the core's CPU cost per vote."""
    from rayledger.cluster.bench import bench_consensus

    _print_figures("rayledger bench consensus", bench_consensus(rounds_small, rounds_large))


@bench_app.command("kernels")
def bench_kernels_cmd(
    batch_size: Annotated[int, typer.Option(min=1)] = 200_000,
    merkle_leaves: Annotated[int, typer.Option(min=1)] = 1 << 20,
    ed25519_batch_size: Annotated[int, typer.Option(min=1)] = 20_000,
) -> None:
    """Hash, Merkle and Ed25519 kernels on every backend here, with GPU/CPU and raw-loop ratios."""
    from rayledger.kernels.bench import bench_kernels

    rows = bench_kernels(
        batch_size=batch_size,
        merkle_leaves=merkle_leaves,
        ed25519_batch_size=ed25519_batch_size,
    )
    table = Table(
        "operation",
        "backend",
        "message",
        "batch",
        "rate /s",
        "GPU/CPU",
        "vs 1-core loop",
        title="rayledger bench kernels",
    )
    for r in rows:
        gpu = r.get("ratio_gpu_cpu")
        loop_ratio = r.get("ratio_to_raw_loop")
        table.add_row(
            str(r["operation"]),
            str(r["backend"]),
            str(r["message_size"]),
            f"{r['batch_size']:,}",
            f"{r['rate_per_s']:,.0f}",
            "" if gpu is None else f"{gpu:.1f}x",
            "" if loop_ratio is None else f"{loop_ratio:.2f}x",
        )
    console.print(table)
    print(json.dumps({"bench": "kernels", "rows": rows}))


# A benchmark's measured time at most (a day): a longer one is a typo, and 1e10 s went past
# the checks to overflow a sleep once Ray was up, or to pre-sign load beyond any memory
BENCH_MAX_S = 86_400.0


def _bench_network(config: Path) -> NetworkSpec:
    """The network ``config`` describes, read before a benchmark starts Ray: one that cannot be
    read is an error (exit 2) that costs nothing."""
    from rayledger.cluster.network import load_network

    try:
        return load_network(config)
    except LedgerError as exc:  # ConfigError: it names the file
        raise _fail(exc) from None
    except (OSError, ValueError) as exc:  # ValueError: UnicodeDecodeError, a file not text
        raise _fail(ValueError(f"cannot read network config {config}: {exc}")) from None


def _require_finite(option: str, value: float | None, unit: str) -> None:
    # The options' min bounds refuse nan and -inf but let inf through, and an endless run
    # fails only later: pre-signing its load overflows, or a sleep does once Ray is up
    if value is not None and not math.isfinite(value):
        raise _fail(ValueError(f"{option} must be a finite number of {unit}, not {value}"))


@bench_app.command("rounds")
def bench_rounds_cmd(
    duration: Annotated[
        float, typer.Option(min=1, max=BENCH_MAX_S, help="seconds measured")
    ] = 20.0,
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    idle_block_ms: Annotated[
        int, typer.Option(min=1, help="a leader's wait before its empty block")
    ] = 10,
    wan: Annotated[bool, typer.Option(help="emulate the config's WAN latencies")] = False,
    peer_streams: PeerStreamsOption = True,
) -> None:
    """CPU per consensus round of the running network with no load: empty blocks back to
    back, so each round costs what any round costs whatever it carries."""
    from rayledger.cluster.bench import bench_rounds

    _bench_network(config)  # bench_rounds reads it again; here a bad one is an error
    r = bench_rounds(config, duration, idle_block_ms, wan, peer_streams)
    table = Table("figure", "value", title=f"rayledger bench rounds ({r.validators} validators)")
    table.add_row(
        "rounds committed (empty blocks)",
        f"{r.rounds:,} in {r.duration_s:.1f} s: {r.rounds_per_s:,.1f}/s",
    )
    table.add_row(
        "CPU per round (all processes)",
        ", ".join(
            f"{_ROLE_LABELS.get(role, role + 's')} {ms:,.2f} ms"
            for role, ms in r.cpu_ms_per_round.items()
        )
        or "- (no round committed)",
    )
    if r.machine_ms_per_round is not None and r.machine_busy is not None:
        table.add_row(
            "whole machine per round",
            f"{r.machine_ms_per_round:,.2f} ms of CPU ({r.machine_busy:.0%} of all cores busy)",
        )
    table.add_row(
        "consensus messages",
        "on direct streams between validators" if r.peer_streams else "by Ray call (--ray-calls)",
    )
    console.print(table)
    print(json.dumps({"bench": "rounds", **r.as_dict()}))


@bench_app.command("e2e")
def bench_e2e_cmd(
    validators: Annotated[
        int, typer.Option(min=1, help="must equal the number of validators in --config")
    ] = 4,
    duration: Annotated[float, typer.Option(min=1, max=BENCH_MAX_S, help="seconds of load")] = 30.0,
    config: Annotated[Path, typer.Option(help="network description")] = DEFAULT_CONFIG,
    batch_rows: Annotated[int, typer.Option(min=100)] = 1_000,
    wan: Annotated[bool, typer.Option(help="emulate the config's WAN latencies")] = True,
    inflight: Annotated[int, typer.Option(min=1, help="batches in flight per mempool")] = 1,
    shards: Annotated[
        int | None,
        typer.Option(min=0, help="storage shards per validator (default: by cluster size)"),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=1, help="open loop: offered tx/s in total (default: closed loop)"),
    ] = None,
    ceiling: Annotated[
        bool,
        typer.Option(
            help="the pipeline's own limit: skip the Ed25519 curve math of batch checks in "
            "this run's workers, as if a GPU checked signatures for free"
        ),
    ] = False,
    verifier_actors: Annotated[
        bool | None,
        typer.Option(
            "--verifier-actors/--no-verifier-actors",
            help="signature checks in verifier actors (default: with a GPU or over 4 CPUs)",
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="validators write their state to disk every N blocks (default: the "
            "network's 1,000, past a short run): the steady state's cost in a short run",
        ),
    ] = None,
    peer_streams: PeerStreamsOption = True,
    gap_client: Annotated[
        bool,
        typer.Option(
            help="add a broken client that skipped its nonce 0 (all its rows fail), sending 5 "
            "rows every 0.5 s through mempool 0: what it costs the others"
        ),
    ] = False,
    forged_rate: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="an impostor announces batches of forged rows to every validator at this many "
            "rows/s: what refusing them costs the others",
        ),
    ] = None,
    down: Annotated[
        int,
        typer.Option(
            min=0,
            help="crash this many validators (the last ones, at most f) before the load and "
            "keep them down: the rounds they would lead end by timeout",
        ),
    ] = 0,
    journal: Annotated[
        bool,
        typer.Option(
            "--journal/--no-journal",
            help="mempools answer once accepted rows are fsynced in their journals (the "
            "default), or at once, a crash losing the rows they hold: what durability costs",
        ),
    ] = True,
) -> None:
    """Committed TPS, commit latency, and efficiency against this machine's raw crypto limit."""
    from rayledger.cluster.bench import bench_e2e, check_e2e

    _require_finite("--rate", rate, "tx/s")
    _require_finite("--forged-rate", forged_rate, "rows/s")
    # bench_e2e makes the same checks, but only after a costly probe of the CPU's signature rate
    try:
        check_e2e(config, _bench_network(config), validators, down)
    except ValueError as exc:
        raise _fail(exc) from None
    r = bench_e2e(
        config,
        validators,
        duration,
        batch_rows,
        wan,
        inflight,
        shards,
        rate,
        ceiling,
        verifier_actors,
        checkpoint_every,
        peer_streams,
        gap_client,
        forged_rate,
        down,
        journal,
    )
    title = f"rayledger bench e2e ({validators} validators)"
    if down:
        title += f", {down} of them DOWN from the start"
    if ceiling:
        title += " CEILING RUN: signature curve math skipped"
    table = Table("figure", "value", title=title)
    before, after = r.one_core_verify_before_after
    if r.offered_tps is not None:
        table.add_row("offered TPS (open loop)", f"{r.offered_tps:,.0f}")
    table.add_row("committed TPS", f"{r.committed_tps:,.0f}")
    table.add_row("committed with an error status (not counted)", f"{r.failed:,}")
    table.add_row(
        "commit latency p50 / p95 / p99", f"{r.p50_ms:,.0f} / {r.p95_ms:,.0f} / {r.p99_ms:,.0f} ms"
    )
    table.add_row(
        "raw limit",
        f"{r.raw_limit_tps:,.0f} tx/s = {r.one_core_verify_per_s:,.0f} "
        f"verifications/s/core x {r.cores} cores / {r.verifications_per_tx} per tx "
        f"(one core: {before:,.0f} before the run, {after:,.0f} after; "
        f"OpenSSL alone: {r.one_core_openssl_per_s:,.0f}/s/core)",
    )
    if r.signatures_checked:
        table.add_row(
            "efficiency (committed / raw limit)",
            f"{r.efficiency:.0%} (against OpenSSL's rate: {r.efficiency_openssl:.0%})",
        )
    else:
        table.add_row("committed / raw limit (signatures NOT checked)", f"{r.efficiency:.0%}")
    if r.signatures_checked and r.check_us_in_network is not None:
        against = (
            ""
            if r.efficiency_in_situ is None
            else f"; the efficiency against that speed: {r.efficiency_in_situ:.0%}"
        )
        table.add_row(
            "signature checks in the network",
            f"{r.check_us_in_network:,.1f} µs of CPU each in the load window (the quiet "
            f"probe's: {1e6 / r.one_core_verify_per_s:,.1f} µs){against}",
        )
    table.add_row("busy answers", str(r.busy_answers))
    table.add_row(
        "CPU per committed tx (all processes)",
        ", ".join(
            f"{_ROLE_LABELS.get(role, role + 's')} {us:,.0f} µs"
            for role, us in r.cpu_us_per_tx.items()
        )
        or "- (nothing committed in the window)",
    )
    table.add_row(
        "blocks committed", f"{r.blocks_per_s:,.1f}/s, {r.txs_per_block:,.0f} transactions each"
    )
    if r.machine_busy is not None and r.machine_steal is not None:
        idle = max(0.0, 1 - r.machine_busy - r.machine_steal)
        split = (
            f" = {r.efficiency:.0%} the committed transactions' signature checks (the "
            f"efficiency) + {max(0.0, r.machine_busy - r.efficiency):.0%} everything else"
            if r.signatures_checked
            else ""
        )
        table.add_row(
            "whole machine in the load window",
            f"{r.machine_busy:.0%} of all cores busy{split}; {idle:.0%} idle; "
            f"{r.machine_steal:.0%} taken by the hypervisor",
        )
    table.add_row("storage shards per validator", str(r.storage_shards))
    table.add_row(
        "state checkpoints",
        f"every {r.checkpoint_every_blocks:,} blocks; validator 0's at height "
        f"{r.state_checkpoint_height:,} when the window closed",
    )
    table.add_row(
        "validator 0's consensus messages",
        f"{r.stream_frames:,} on direct streams, {r.ray_sends:,} by Ray call"
        + ("" if r.peer_streams else " (--ray-calls)"),
    )
    table.add_row(
        "mempool 0's sealed batches",
        f"{r.batch_frames:,} to validators on direct streams, {r.batch_ray_sends:,} by Ray call",
    )
    table.add_row(
        "mempools' journals",
        "off (--no-journal): a crashed mempool loses the rows it holds"
        if r.journal_fsyncs is None
        else f"accepted rows fsynced before the answer; mempool 0: {r.journal_fsyncs:,} fsyncs",
    )
    table.add_row(
        "validator 0's rounds",
        f"{r.rounds:,}, {r.rounds_by_timeout:,} of them entered by a timeout certificate",
    )
    table.add_row(
        "validators' event loops",
        f"at worst {r.loop_worst_ms:,.0f} ms late; {r.loop_stalls:,} stalls past 250 ms",
    )
    if r.gap_client_rows is not None:
        table.add_row(
            "broken client (nonce 0 skipped)",
            f"{r.gap_client_rows:,} rows admitted, each to fail; mempool 0 parked "
            f"{r.rows_parked:,} rows and sealed {r.rows_sealed_apart:,} apart after the hold; "
            f"leaders held batches back {r.batches_deferred:,} times for a missing nonce and "
            f"proposed {r.gap_rows_proposed:,} rows that failed for one",
        )
    if r.forged_rows is not None:
        table.add_row(
            "impostor's forged batches",
            f"{r.forged_rows:,} rows announced to every validator; each validator refused "
            f"{r.forged_batches_refused:,.0f} batches",
        )
    if r.clients_out_of_work:
        table.add_row(
            "clients out of work",
            f"{r.clients_out_of_work} ran out of pre-signed transactions before the window "
            "closed: the committed rate is a floor",
        )
    table.add_row("validators agree", "yes" if r.agreement else "NO")
    console.print(table)
    print(json.dumps({"bench": "e2e", **r.as_dict()}))


def main() -> None:
    # Before anything imports Ray (see use_token_auth); kept free of Ray imports itself.
    if (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    app()
