"""Faults one after another under steady load: every accepted transaction committed once,
with status OK, on every validator, and the validators agree.

Four clients submit their own signed rows (a transfer stream and three anchor streams), each
through its own institution's mempool in nonce order, while the network goes through a
partition of each kind of site, crashes of one and of two validators, a storage shard crash
and Byzantine strategies. A longer, random version of this (300 s, twice) is how the
ordering bug fixed with ``gap_wait_ms`` and the mempools' re-announcement was found: a
partition made one sender's later batch commit before its earlier one, and every later row of
that sender failed ``BAD_NONCE`` (40,600 rows in one run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rayledger.cluster.local import Network, NetworkOptions
from rayledger.cluster.network import load_network
from rayledger.cluster.soak import check_commits, client
from tests.actors.test_network import ray_instance  # noqa: F401 - one local Ray for the module

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"


def _faults(net: Network, caught: list[Any]) -> list[tuple[str, Callable[[], None], float]]:
    """(name, fault, seconds of load after it), in order; ``caught`` gets the evidence count
    once a validator has equivocated, then where the network stood then."""
    equivocator: list[int] = []

    def kill_two() -> None:
        net.kill(0)
        net.kill(2)

    def leading() -> int:
        """The leader of the round now, as a validator that can tell names it (one whose
        commits lag guesses from the schedule: once, a restarted one named itself, passed over
        by the others, so it never led)."""
        up = [s for s in net.status() if "round" in s]
        sure = [s for s in up if s["passed_over"]["final"]] or up
        return int(max(sure, key=lambda s: s["round"])["leader"])

    def equivocate_until_caught() -> None:
        # The validator leading now equivocates: an equivocator is caught only where it leads,
        # and leader reputation may pass a given one over for the whole wait (once, validator
        # 0, whose commits lagged 16 rounds behind on a loaded machine, so its votes came last
        # and it was in no QC: `passed_over` in its status shows such a one). Not caught
        # within 8n rounds (its turn may not come again: a failed turn passes it over for 16n
        # rounds, and its first equivocation may go uncaught, sent both blocks to the next
        # leader as its own lagging chain names it), the one leading then takes over. Waited
        # for in rounds, not seconds (64 rounds took 26 s on a slow machine), with a
        # wall-clock bound only against a stalled network. Counted now: a validator's count
        # starts again when it restarts
        equivocator.append(leading())
        net.set_strategy(equivocator[-1], "equivocating-leader")
        start = picked = max(s["round"] for s in net.status() if "round" in s)
        t0 = time.monotonic()
        while time.monotonic() < t0 + 240:
            status = net.status()
            evidence = sum(s.get("evidence", 0) for s in status)
            now = max(s.get("round", 0) for s in status)
            if evidence or now > start + 34 * net.n:
                break
            if now > picked + 8 * net.n and leading() != equivocator[-1]:
                net.set_strategy(equivocator[-1], "none")
                equivocator.append(leading())
                net.set_strategy(equivocator[-1], "equivocating-leader")
                picked = now
            time.sleep(0.5)
        caught.append(evidence)
        # Where it stood: how long it waited, and each validator's round, leader, whom
        # reputation passed over, rounds timed out and counts
        keys = ("round", "leader", "passed_over", "rounds_by_timeout", "evidence")
        caught.append(
            {
                "equivocators": equivocator,
                "waited_s": round(time.monotonic() - t0, 1),
                "from_round": start,
                "validators": [{k: s.get(k) for k in keys} for s in status],
            }
        )

    return [
        ("partition site 1", lambda: net.partition([[1]]), 4.0),
        ("heal", net.heal, 6.0),
        ("kill validator 3", lambda: net.kill(3), 4.0),
        ("restart validator 3", lambda: net.restart(3), 6.0),
        ("the leading validator equivocates", equivocate_until_caught, 2.0),
        ("it is honest again", lambda: net.set_strategy(equivocator[-1], "none"), 4.0),
        ("partition site 2", lambda: net.partition([[2]]), 6.0),
        ("heal", net.heal, 6.0),
        ("kill validators 0 and 2", kill_two, 3.0),
        ("restart validator 0", lambda: net.restart(0), 2.0),
        ("restart validator 2", lambda: net.restart(2), 6.0),
        ("crash shard 0 of validator 1", lambda: net.crash_shard(1, 0), 4.0),
        ("crash mempool of validator 2", lambda: net.crash_mempool(2), 6.0),
        ("validator 3 silent", lambda: net.set_strategy(3, "silent"), 4.0),
        ("validator 3 honest", lambda: net.set_strategy(3, "none"), 6.0),
    ]


def test_every_accepted_transaction_commits_once_and_ok_through_faults(tmp_path: Path) -> None:
    net = Network.create(
        load_network(CONFIG), tmp_path, NetworkOptions(name="chaos", batch_rows=500)
    )
    stop = threading.Event()
    accepted: list[list[bytes]] = [[] for _ in range(4)]
    clients = [
        threading.Thread(target=client, args=(net, k, stop, accepted[k]), daemon=True)
        for k in range(4)
    ]
    try:
        for t in clients:
            t.start()
        time.sleep(5)
        caught: list[Any] = []
        for name, fault, after in _faults(net, caught):
            logging.getLogger(__name__).info("chaos: %s", name)
            fault()
            time.sleep(after)
        stop.set()
        for t in clients:
            t.join(timeout=60)
            assert not t.is_alive()
        ids = [x for part in accepted for x in part]
        assert len(ids) >= 20_000  # the load went on through the faults
        r = check_commits(net, ids, settle_s=240)
        assert r["missing"] == [0] * 4, r  # every accepted transaction found on every one
        assert r["agreement"] is True
        # Each committed exactly once, all of them OK, and nothing else committed
        assert r["committed"] == [len(ids)] * 4 and r["duplicates"] == [0] * 4, r
        assert r["not_ok"] == [0] * 4, r
        # The equivocation was caught
        assert caught and caught[0] > 0, caught
    finally:
        stop.set()
        net.shutdown()
