"""Byzantine and fault scenarios of the consensus core, run in the deterministic simulator.

Scenarios (n validators; f = (n - 1) // 3; the last k validators run the strategy):
- happy path, n = 4, 7, 10 with Ed25519: every round commits, no timeout, no evidence.
- each Byzantine strategy with f Byzantine, n = 4, 7, 10, several seeds, 5% drops: agreement
  holds and commits resume after the attackers' rounds; equivocation and double votes are
  reported as evidence against the attackers only.
- leader crash (validator 1 stops for good): agreement, commits continue.
- leader reputation: crashed validators (1 of 4, 2 of 7) are passed over as leaders once the
  committed window behind a round no longer shows them, so their rounds stop timing out (with
  round robin, half the rounds time out for as long as one of four is down); a restarted one
  leads again; honest validators that can tell who leads a round agree on it; a far
  validator (its vote always the last, so in no QC) that was down leads again once back,
  because a leader waits for its vote once (and never leads again without that wait); f
  validators that vote but never propose are passed over after a failed turn, for 16n
  rounds, so they cost few round timeouts (against close to half the rounds, without).
- partition of f+1 validators: nothing new commits while it lasts, commits resume after heal.
- restart mid-round, many seeds: the restarted validator never votes or proposes twice in a
  round (no evidence against any honest validator); the same crashes with lost disks do
  produce such evidence, so the check can fail.
- the checker can fail: f+1 equivocators (n = 7, 3 Byzantine) fork the chain for some seed.
- random schedules (hypothesis): drops, duplicates, delays, crashes, partitions and <= f
  Byzantine validators with any strategy never violate agreement.
- `rayledger simulate` prints one JSON line last and exits non-zero on a violation.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rayledger.consensus.core import CoreConfig
from rayledger.consensus.sim import STRATEGIES, Crash, Partition, SimConfig, Simulation, simulate

ATTACKS = STRATEGIES[1:]


@pytest.mark.parametrize("n", [4, 7, 10])
def test_happy_path(n: int) -> None:
    r = simulate(SimConfig(validators=n, rounds=40, seed=n))
    assert r.safety == "ok"
    assert r.timeouts == 0 and r.evidence == 0 and r.rejected == 0
    # Two-chain commit: every round's block is committed once its child is certified.
    assert r.committed_height >= r.rounds - 3
    assert r.p50_commit_ms is not None and r.p50_commit_ms < 10 * 20 * 2


@pytest.mark.parametrize("strategy", ATTACKS)
@pytest.mark.parametrize("n", [4, 7, 10])
def test_f_byzantine_keep_agreement_and_progress(strategy: str, n: int) -> None:
    """Six seeds on a lossy network (5% drops: with exactly 2f+1 honest validators every honest
    vote counts, so progress there is slow and uneven, but safety must hold) and two on a
    reliable one, where commits must keep coming despite the attackers."""
    f = (n - 1) // 3
    for seed, drop in [(s, 0.05) for s in range(6)] + [(s, 0.0) for s in (6, 7)]:
        sim = Simulation(
            SimConfig(
                validators=n,
                byzantine=f,
                strategy=strategy,
                seed=seed,
                rounds=40,
                drop=drop,
                crypto="mac",
                stabilise_ms=5_000,
            )
        )
        r = sim.run()
        assert r.safety == "ok", r.violations
        assert r.progress_after_faults
        if drop == 0.0:
            assert r.committed_height >= 8, (seed, r)
        offenders = {e.offender for e in sim.evidence}
        assert offenders <= sim.byzantine, f"evidence against honest validators: {offenders}"
        # On a reliable network the attack is reported. (An equivocating leader is passed
        # over once its round fails, so with drops its few turns may go unseen.)
        if strategy in ("equivocating-leader", "double-voter") and drop == 0.0:
            assert r.evidence > 0
        if strategy == "invalid-signature":
            assert r.rejected > 0


def test_leader_crash_commits_continue() -> None:
    sim = Simulation(SimConfig(validators=4, rounds=60, seed=3, crashes=(Crash(1, 500),)))
    r = sim.run()
    assert r.safety == "ok"
    after = {h for t, node, h in sim.checker.log if t > 2_000}
    assert len(after) >= 10


@pytest.mark.parametrize(
    ("n", "crashes"), [(4, (Crash(3, 500),)), (7, (Crash(6, 500), Crash(2, 900)))]
)
def test_crashed_validators_are_passed_over_as_leaders(n: int, crashes: tuple[Crash, ...]) -> None:
    def run(reputation: bool) -> tuple[Simulation, list[int]]:
        sim = Simulation(
            SimConfig(
                validators=n,
                rounds=200,
                seed=2,
                crashes=crashes,
                crypto="mac",
                leader_reputation=reputation,
            )
        )
        r = sim.run()
        assert r.safety == "ok" and r.progress_after_faults
        return sim, sorted(sim.timeout_rounds)

    sim, timeouts = run(True)
    # Only the rounds until the window behind a round (n + 3 rounds) stops showing a crashed
    # validator end by timeout, the last crash's included
    assert timeouts and timeouts[-1] - timeouts[0] <= 4 * n, timeouts
    down = {c.node for c in crashes}
    idx = sim.validators.index_of
    proposers = {
        idx(p.block.proposer) for p in sim.nodes[0].committed if p.block.round > timeouts[-1]
    }
    assert proposers == set(range(n)) - down
    # Round robin: the crashed validators' rounds, and those before them, time out for good
    _, round_robin = run(False)
    assert len(round_robin) > 8 * len(timeouts) and round_robin[-1] > 190, round_robin


def test_a_restarted_validator_leads_again() -> None:
    sim = Simulation(
        SimConfig(validators=4, rounds=300, seed=2, crashes=(Crash(3, 500, 6_000),), crypto="mac")
    )
    r = sim.run()
    assert r.safety == "ok" and r.progress_after_faults
    idx = sim.validators.index_of
    late = [p for p in sim.nodes[3].committed if p.block.round > 200]
    assert {idx(p.block.proposer) for p in late} == {0, 1, 2, 3}
    # Once it was passed over, neither its going nor its return cost a round timeout
    assert max(sim.timeout_rounds) < 60, sorted(sim.timeout_rounds)


@pytest.mark.parametrize(
    ("seed", "far_ms", "timeout_ms"), [(0, 60.0, 400), (1, 60.0, 400), (0, 200.0, 1000)]
)
def test_a_far_validator_leads_again_after_a_restart(
    seed: int, far_ms: float, timeout_ms: int
) -> None:
    """Validator 3's links are ``far_ms`` longer, so its vote is always the last: it is in no
    QC. While down it is passed over; back, it is seen live only once a leader waits for its
    vote (``straggler_wait_ms``), and then takes its turns again. Without the wait it never
    leads again: passed over for good, though up. 200 ms further (its vote some 400 ms after
    the quorum's) is past ``straggler_wait_ms``: it needs the rarer wait of up to half the
    base timeout (before it, passed over for good)."""

    def run(wait: int) -> tuple[list[int], int, int]:
        sim = Simulation(
            SimConfig(
                validators=4,
                rounds=600,
                seed=seed,
                crypto="mac",
                crashes=(Crash(3, 3_000, 6_000),),
                far=((3, far_ms),),
                base_timeout_ms=timeout_ms,
                straggler_wait_ms=wait,
            )
        )
        r = sim.run()
        assert r.safety == "ok" and r.progress_after_faults
        long = sum(c.straggler_counts["long"] for node in sim.nodes for c in node.personas)
        return r.proposed_late, r.timeouts, long

    proposed, timeouts, long = run(150)
    assert proposed[3] >= 0.8 * min(proposed[:3]), proposed
    assert timeouts <= 4
    if far_ms > 100:  # its votes come past straggler_wait_ms: only the longer wait helps
        assert long >= 1
    never, _, _ = run(0)
    assert never[3] == 0 and min(never[:3]) > 90, never


@pytest.mark.parametrize("n", [4, 7])
def test_leaders_that_never_propose_are_passed_over(n: int) -> None:
    """f validators vote, form QCs and time out like honest ones (so they are seen live), but
    never propose: each of their turns costs two round timeouts (theirs, and the one before,
    whose QC only they hold). Passed over for 16n rounds after each failed turn, they cost a
    few; without that, close to half the rounds of n = 4 time out."""

    def run(cycles: int) -> tuple[int, float, list[int]]:
        r = simulate(
            SimConfig(
                validators=n,
                byzantine=(n - 1) // 3,
                strategy="lazy-leader",
                rounds=300,
                seed=n,
                crypto="mac",
                leader_failure_cycles=cycles,
            )
        )
        assert r.safety == "ok" and r.p50_commit_ms is not None
        return r.timeouts, r.p50_commit_ms, r.proposed_late

    timeouts, p50, proposed = run(16)
    assert timeouts <= 30, timeouts
    assert min(proposed[: n - (n - 1) // 3]) > 0
    before, p50_before, _ = run(0)
    assert before > 4 * timeouts and before > 80, (before, timeouts)
    assert p50 * 2 < p50_before


@pytest.mark.parametrize("n", [4, 7])
def test_blocks_stamped_an_hour_ahead_get_no_votes(n: int) -> None:
    """f validators' clocks are an hour ahead: honest validators refuse to vote for their
    blocks, so no committed block is stamped further ahead than the bound; their failed
    turns pass them over, and the others commit as usual."""
    r = simulate(
        SimConfig(
            validators=n,
            byzantine=(n - 1) // 3,
            strategy="fast-clock",
            rounds=200,
            seed=n,
            crypto="mac",
        )
    )
    assert r.safety == "ok" and r.committed_height > 180
    assert 0 <= r.stamp_ahead_ms <= CoreConfig.max_clock_ahead_ms
    assert r.rejected > 0 and r.timeouts <= 12, (r.rejected, r.timeouts)


def test_far_must_name_a_validator() -> None:
    with pytest.raises(ValueError, match="far: validator 4"):
        SimConfig(validators=4, far=((4, 10.0),))
    with pytest.raises(ValueError, match="far: validator 1 with -1"):
        SimConfig(validators=4, far=((1, -1.0),))


@pytest.mark.parametrize("seed", range(4))
def test_validators_that_can_tell_who_leads_a_round_agree(seed: int) -> None:
    sim = Simulation(
        SimConfig(
            validators=7,
            rounds=120,
            seed=seed,
            drop=0.05,
            crypto="mac",
            crashes=(Crash(seed % 7, 300 + 100 * seed, 2_500), Crash((seed + 3) % 7, 800)),
        )
    )
    assert sim.run().safety == "ok"
    cores = [node.personas[0] for node in sim.nodes if node.up]
    told = 0
    for round_ in range(1, max(c.round for c in cores) + 3):
        views = {c.leader(round_) for c in cores if c._leader_known(round_)}
        assert len(views) <= 1, (round_, views)
        told += len(views)
    assert told > 100


@pytest.mark.parametrize("seed", [0, 1])
def test_a_validator_far_behind_is_sent_each_block_it_lacks_a_few_times(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validator down for 20 s comes back some 440 blocks behind. Its blocks waiting for
    their parents all ask for the one block that connects them (of each peer once), and a
    peer answers a request with up to 8 responses of 64 blocks, the lowest first: it is sent
    each block it lacks a few times. Before, each waiting block and each new proposal asked
    for its own parent, and every answer was the 64 blocks below it: with seed 0, 425
    requests and 22,775 blocks sent for the 442 it lacked, caught up in 167 simulated ms
    (now 9 requests, 575 blocks, 80 ms)."""
    from rayledger.consensus.messages import SyncRequest, SyncResponse

    sent = {"requests": 0, "blocks": 0}
    start: list[int] = []  # its committed height when it came back
    caught: list[tuple[float, int]] = []  # (ms after coming back, the height it reached)
    real_send, real_handle = Simulation._send, Simulation._handle

    def send(self: Simulation, src: int, dst: int, msg: object, *rest: object) -> None:
        if not caught and isinstance(msg, SyncRequest) and src == 3:
            sent["requests"] += 1
        if not caught and isinstance(msg, SyncResponse) and dst == 3:
            sent["blocks"] += len(msg.proposals)
        real_send(self, src, dst, msg, *rest)  # type: ignore[arg-type]

    def handle(self: Simulation, ev: object) -> None:
        real_handle(self, ev)  # type: ignore[arg-type]
        back = self.nodes[3]
        if not back.up or self.now < 21_000 or caught:
            return
        height = back.personas[0].committed.height
        if not start:
            start.append(height)
        if height >= max(n.personas[0].committed.height for n in self.nodes[:3]) - 2:
            caught.append((self.now - 21_000, height))

    monkeypatch.setattr(Simulation, "_send", send)
    monkeypatch.setattr(Simulation, "_handle", handle)
    cfg = SimConfig(
        crypto="mac",
        seed=seed,
        rounds=10**9,
        crashes=(Crash(3, 1_000, 21_000),),
        max_time_ms=26_000,
    )
    assert Simulation(cfg).run().safety == "ok"
    assert caught, "the validator never caught up"
    took_ms, reached = caught[0]
    lacked = reached - start[0]
    assert lacked > 300 and took_ms < 500
    assert sent["blocks"] <= 6 * lacked, (sent, lacked)
    assert sent["requests"] <= 3 * (lacked // 64 + 4), (sent, lacked)


def test_partition_of_f_plus_one_then_heal() -> None:
    sim = Simulation(
        SimConfig(
            validators=4,
            rounds=60,
            seed=5,
            crypto="mac",
            partitions=(Partition.parse("500-4000:0,1|2,3"),),
            stabilise_ms=3_000,
        )
    )
    r = sim.run()
    assert r.safety == "ok"
    # Messages in flight at the cut may still finish a commit; after that nothing new.
    during = {h for t, _, h in sim.checker.log if 1_000 <= t < 4_000}
    before = max((h for t, _, h in sim.checker.log if t < 1_000), default=0)
    assert all(h <= before for h in during)
    after = {h for t, _, h in sim.checker.log if t >= 4_000}
    assert len(after) >= 10
    assert r.progress_after_faults


def _staggered_crashes(seed: int, n: int) -> tuple[Crash, ...]:
    return tuple(Crash(i, 300 + 37 * seed + 211 * i, 400 + 37 * seed + 211 * i) for i in range(n))


@pytest.mark.parametrize("seed", range(8))
def test_restart_mid_round_never_votes_twice(seed: int) -> None:
    sim = Simulation(
        SimConfig(
            validators=4,
            seed=seed,
            rounds=40,
            crypto="mac",
            delay_ms=30,
            jitter_ms=20,
            crashes=_staggered_crashes(seed, 4),
            stabilise_ms=2_000,
        )
    )
    r = sim.run()
    assert r.safety == "ok"
    assert r.evidence == 0
    assert r.progress_after_faults and r.committed_height >= 20


def test_lost_disk_restarts_do_equivocate() -> None:
    """The control for the test above: without the persisted state, restarted validators
    propose or vote a second time in a round, and the peers catch it."""
    found = []
    for seed in range(8):
        sim = Simulation(
            SimConfig(
                validators=4,
                seed=seed,
                rounds=40,
                crypto="mac",
                delay_ms=30,
                jitter_ms=20,
                crashes=_staggered_crashes(seed, 4),
                stabilise_ms=2_000,
                lose_disk_on_restart=True,
                max_time_ms=60_000,
            )
        )
        sim.run()
        found.extend(e for e in sim.evidence if e.offender in sim.honest)
    assert found


def test_checker_detects_fork_with_f_plus_one_equivocators() -> None:
    results = [
        simulate(
            SimConfig(
                validators=7, byzantine=3, strategy="equivocate", seed=s, rounds=30, crypto="mac"
            )
        )
        for s in range(5)
    ]
    assert any(r.safety == "violated" for r in results)
    assert all("fork at height" in v for r in results for v in r.violations)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.sampled_from([4, 5, 7]),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 10_000),
    drop=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.3),
    delay=st.floats(1, 80),
    jitter=st.floats(0, 60),
    crash_at=st.one_of(st.none(), st.integers(0, 3_000)),
    part=st.one_of(st.none(), st.tuples(st.integers(0, 2_000), st.integers(100, 3_000))),
)
def test_random_schedules_keep_agreement(
    n: int,
    strategy: str,
    seed: int,
    drop: float,
    duplicate: float,
    delay: float,
    jitter: float,
    crash_at: int | None,
    part: tuple[int, int] | None,
) -> None:
    f = (n - 1) // 3
    byz = f if strategy != "none" else 0
    honest_faults = f - byz  # crashes count against the same budget of f
    crashes = (
        (Crash(0, crash_at, crash_at + 1_500),) if crash_at is not None and honest_faults else ()
    )
    partitions = ()
    if part is not None:
        start, length = part
        partitions = (Partition(start, start + length, (frozenset(range(n // 2)),)),)
    r = simulate(
        SimConfig(
            validators=n,
            byzantine=byz,
            strategy=strategy,
            seed=seed,
            rounds=25,
            drop=drop,
            duplicate=duplicate,
            delay_ms=delay,
            jitter_ms=jitter,
            crashes=crashes,
            partitions=partitions,
            crypto="mac",
            max_time_ms=120_000,
        )
    )
    assert r.safety == "ok", r.violations


def test_cli_simulate_json_and_exit_codes() -> None:
    from rayledger.cluster.cli import app

    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "simulate",
            "--validators",
            "4",
            "--rounds",
            "20",
            "--crash",
            "1@300-900",
            "--drop",
            "0.05",
        ],
    )
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output.strip().splitlines()[-1])
    for key in (
        "safety",
        "committed_height",
        "rounds",
        "timeouts",
        "evidence",
        "p50_commit_ms",
        "p99_commit_ms",
    ):
        assert key in report
    assert report["safety"] == "ok"
    forked = [
        runner.invoke(
            app,
            [
                "simulate",
                "--validators",
                "7",
                "--byzantine",
                "3",
                "--strategy",
                "equivocate",
                "--crypto",
                "mac",
                "--rounds",
                "30",
                "--seed",
                str(s),
            ],
        )
        for s in range(3)
    ]
    assert any(
        r.exit_code == 1 and json.loads(r.output.strip().splitlines()[-1])["safety"] == "violated"
        for r in forked
    )
    bad = runner.invoke(app, ["simulate", "--byzantine", "1"])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["simulate", "--partition", "nonsense"])
    assert bad.exit_code == 2
    for spec in ("3", "x:5", "3:fast", "9:5"):
        bad = runner.invoke(app, ["simulate", "--far", spec])
        assert bad.exit_code == 2, (spec, bad.output)
    far = runner.invoke(
        app, ["simulate", "--rounds", "20", "--crypto", "mac", "--far", "1:30", "--far", "2:5"]
    )
    assert far.exit_code == 0, far.output
    assert sum(json.loads(far.output.strip().splitlines()[-1])["proposed_late"]) >= 9


def test_idle_leaders_wait_for_batches_instead_of_streaming_empty_blocks() -> None:
    """With batches every 500 ms, leaders that wait up to 100 ms for one propose far fewer
    empty blocks, and every batch still commits promptly."""

    def run(idle_ms: int) -> Simulation:
        sim = Simulation(
            SimConfig(
                validators=4,
                rounds=10**6,
                seed=2,
                crypto="mac",
                batch_interval_ms=500,
                idle_block_ms=idle_ms,
                max_time_ms=6_000,
            )
        )
        sim.run()
        return sim

    eager, idle = run(0), run(100)
    for sim in (eager, idle):
        assert not sim.checker.violations
    eager_blocks = max(eager.checker.heights.values())
    idle_blocks = max(idle.checker.heights.values())
    assert idle_blocks * 2 < eager_blocks
    lat = sorted(idle.checker.latencies)
    assert len(lat) >= 8 and lat[len(lat) // 2] < 400
