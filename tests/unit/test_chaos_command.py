"""`rayledger chaos` refuses what it cannot do, with a message that names the problem and
nothing changed: a command that does not parse (before the network is reached), and a
validator, storage shard, strategy or partition the network does not have (before any actor
is touched). Found by trying them on a running network: `chaos restart 9` ended in an
IndexError traceback, `chaos partition 0,9` cut validator 0 off from the others, and
`chaos kill 7` printed Ray's lookup error. (No Ray here: the checks come first.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rayledger.cluster import ops
from rayledger.cluster.cli import app
from rayledger.cluster.client import Client
from rayledger.cluster.local import Network
from rayledger.cluster.network import load_network, make_genesis

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


class Untouchable(Network):
    """The network's description only: any actor lookup fails the test."""

    def _actor(self, role: str) -> None:
        raise AssertionError(f"reached the network for {role} before refusing")


@pytest.fixture
def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Untouchable:
    genesis, _ = make_genesis(load_network(CONFIG), 1_700_000_000_000, dev=True)
    genesis.save(tmp_path / "genesis.toml")
    (tmp_path / "network.json").write_text(json.dumps({"name": "t", "storage_shards": 2}))
    network = Untouchable(tmp_path)
    monkeypatch.setattr(ops, "connect", lambda data_dir: network)
    return network


def chaos(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["chaos", *args], terminal_width=200)
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("kill", "x"), "chaos kill: the validator is a number, not 'x'"),
        (("restart", "1.5"), "chaos restart: the validator is a number, not '1.5'"),
        (("partition", "0,a|1"), "chaos partition: each validator is a number, not 'a'"),
        (("crash-shard", "0", "k"), "chaos crash-shard: the shard is a number, not 'k'"),
        (("crash-mempool", "m"), "chaos crash-mempool: the validator is a number, not 'm'"),
        (("crash-mempool",), "chaos: kill N | restart N"),
        (("byzantine", "v1", "silent"), "chaos byzantine: the validator is a number, not 'v1'"),
        (("explode", "1"), "chaos: kill N | restart N"),
        (("kill",), "chaos: kill N | restart N"),
        (("heal", "now"), "chaos: kill N | restart N"),
        (("byzantine", "1"), "chaos: kill N | restart N"),
    ],
)
def test_a_command_that_does_not_parse_is_refused_before_the_network_is_reached(
    args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(data_dir: Path) -> None:
        raise AssertionError("connected before the command parsed")

    monkeypatch.setattr(ops, "connect", unreachable)
    code, out = chaos(*args)
    assert code == 2 and f"error: {message}" in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("kill", "4"), "no validator 4: the network has 4 (0 to 3)"),
        (("kill", "--", "-1"), "no validator -1: the network has 4 (0 to 3)"),
        (("restart", "9"), "no validator 9"),
        (("byzantine", "7", "silent"), "no validator 7"),
        (("byzantine", "1", "nonsense"), "unknown strategy 'nonsense'; known: none, silent"),
        (("crash-shard", "8", "0"), "no validator 8"),
        (("crash-shard", "0", "2"), "no storage shard 2: validator 0 has 2 (0 to 1)"),
        (("crash-shard", "0", "--", "-1"), "no storage shard -1"),
        (("crash-mempool", "4"), "no validator 4: the network has 4 (0 to 3)"),
        (("partition", "0,9"), "no validator 9"),
        (("partition", "|"), "a partition's groups must not be empty: [[], []]"),
        (("partition", "0,1|"), "a partition's groups must not be empty: [[0, 1], []]"),
        (("partition", "0,1|1"), "validators listed more than once: [1]"),
        (("partition", "2,2"), "validators listed more than once: [2]"),
        (("partition", "0,1,2,3"), "[[0, 1, 2, 3]] cuts nothing"),
    ],
)
def test_what_the_network_does_not_have_is_refused_before_any_actor_is_touched(
    net: Untouchable, args: tuple[str, ...], message: str
) -> None:
    code, out = chaos(*args)
    assert code == 2 and f"error: {message}" in out, out


def test_a_shardless_network_says_it_has_none(net: Untouchable) -> None:
    net.shards = 0
    assert chaos("crash-shard", "0", "0") == (
        2,
        "error: no storage shard 0: validator 0 has 0",
    )


def test_a_receipt_from_a_validator_the_network_lacks_is_refused(net: Untouchable) -> None:
    """`rayledger receipt --validator 9` (and ``Client``): named, not Ray's lookup error."""
    result = CliRunner().invoke(app, ["receipt", "ab" * 32, "--validator", "9"], terminal_width=200)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "error: no validator 9: the network has 4 (0 to 3)" in out
    client = Client(net.dir, validator=3)
    with pytest.raises(ValueError, match="no validator 4: the network has 4"):
        client.locate(np.zeros((1, 32), np.uint8), validator=4)
    with pytest.raises(ValueError, match="no validator -1"):
        Client(net.dir, validator=-1)


@pytest.mark.parametrize(
    ("tx_id", "message"),
    [
        ("ab", "a transaction id is 64 hex digits, not 2"),
        ("", "a transaction id is 64 hex digits, not 0"),
        ("ab" * 33, "a transaction id is 64 hex digits, not 66"),
        ("0x" + "ab" * 31, "a transaction id is 64 hex digits, not '0x"),
        ("zz" * 32, "a transaction id is 64 hex digits, not 'zzzz"),
    ],
)
def test_a_receipt_for_a_malformed_id_is_refused_before_the_network_is_reached(
    tx_id: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(data_dir: Path) -> None:
        raise AssertionError("connected before the id was checked")

    monkeypatch.setattr(ops, "connect", unreachable)
    result = CliRunner().invoke(app, ["receipt", tx_id], terminal_width=300)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and f"error: {message}" in out, out


def test_validator_actors_play_every_strategy_of_the_simulator_and_the_soak_draws_them_all() -> (
    None
):
    from rayledger.actors.validator import ACTOR_STRATEGIES
    from rayledger.cluster.soak import STRATEGIES as SOAK_STRATEGIES
    from rayledger.consensus.sim import STRATEGIES

    assert sorted(ACTOR_STRATEGIES) == sorted(STRATEGIES)
    assert sorted(SOAK_STRATEGIES) == sorted(set(STRATEGIES) - {"none"})
