"""A real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): four nodes
labelled with sites; every actor lands on its own site's node; removing a node crashes its
validator and the other three keep committing; a node of that site joining again (the machine
rebooted) brings the validator back there, from its disk, and it catches up."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from rayledger.cluster.local import Network, NetworkOptions
from rayledger.cluster.network import load_network
from rayledger.tx import TxKind, make_batch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "multisite.toml"
SITES = ["site-a", "site-b", "site-c", "site-d"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, dict[str, object]]]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {s: c.add_node(num_cpus=1, labels={"site": s}) for s in SITES}
    ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_actors_on_their_sites_and_node_loss_is_a_crash(
    cluster: tuple[Cluster, dict[str, object]], tmp_path: Path
) -> None:
    c, nodes = cluster
    spec = load_network(CONFIG)
    net = Network.create(spec, tmp_path, NetworkOptions(name="multi", base_timeout_ms=500))
    try:
        placed = {w["index"]: w for w in net.placement()}
        for i, site in enumerate(net.settings["sites"]):
            assert placed[i]["labels"].get("site") == site
            assert placed[i]["node_id"] == nodes[site].node_id  # type: ignore[attr-defined]
        key = net.client_key(net.clients[1])
        first = make_batch(
            key, TxKind.ANCHOR, range(300), [os.urandom(40) for _ in range(300)], net.chain_id
        )
        net.submit(first, mempool=0)
        net.wait_committed(first, timeout_s=120)
        c.remove_node(nodes["site-d"])  # type: ignore[arg-type]
        second = make_batch(
            key, TxKind.ANCHOR, range(300, 600), [os.urandom(40) for _ in range(300)], net.chain_id
        )
        net.submit(second, mempool=0)
        net.wait_committed(second, validators=[0, 1, 2], timeout_s=180)
        chains = [net.headers(i) for i in (0, 1, 2)]
        common = min(len(ch) for ch in chains)
        assert all(ch[:common] == chains[0][:common] for ch in chains)
        # The site's machine comes back: Ray restarts its actors on the new node (their
        # label selector names the site), and validator 3 catches up from its disk and peers
        nodes["site-d"] = c.add_node(num_cpus=1, labels={"site": "site-d"})
        deadline = time.monotonic() + 120
        while True:
            try:
                if net.height(3) >= net.height(0) - 1:
                    break
            except ray.exceptions.RayError:  # restarting
                pass
            assert time.monotonic() < deadline, "validator 3 did not come back with its site"
            time.sleep(1)
        third = make_batch(
            key, TxKind.ANCHOR, range(600, 900), [os.urandom(40) for _ in range(300)], net.chain_id
        )
        net.submit(third, mempool=3)
        net.wait_committed(third, timeout_s=120)
        placed = {w["index"]: w for w in net.placement()}
        assert placed[3]["node_id"] == nodes["site-d"].node_id  # type: ignore[attr-defined]
        chains = [net.headers(i) for i in range(4)]
        common = min(len(ch) for ch in chains)
        assert common >= 3 and all(ch[:common] == chains[0][:common] for ch in chains)
    finally:
        net.shutdown()
