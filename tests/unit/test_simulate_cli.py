"""``rayledger simulate`` refuses bad input with exit code 2 and a message naming the problem.

Scenarios:
- a crash on a validator that does not exist (too large or negative), or one whose restart
  comes at or before it;
- a simulated time limit that is not a finite number above 0 (inf and nan used to hang);
- a link delay or jitter that is negative or not finite;
- a partition that ends before it starts, names validators that do not exist, puts one
  validator in two groups, or has an empty group;
- a far validator with a negative or non-finite extra delay;
- a Byzantine strategy with no Byzantine validators to run it;
- more validators than the simulator runs in reasonable time;
- a crash time below 0 given to SimConfig directly (the command line cannot spell one);
- and a command using every one of these options, with sound values, still runs.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rayledger.cluster.cli import app
from rayledger.consensus.sim import Crash, SimConfig

runner = CliRunner()


def _simulate(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["simulate", *args], terminal_width=200)
    # rich wraps and boxes long lines: compare with whitespace collapsed and box edges gone
    text = " ".join(result.output.replace("│", " ").split())
    return result.exit_code, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--crash", "9@100"], "crash 9@100: validator 9 is not one of the 4 validators 0..3"),
        (["--crash", "-1@100"], "crash -1@100: validator -1 is not one of the 4 validators"),
        (["--crash", "0@500-100"], "crash '0@500-100': the restart must come after the crash"),
        (["--crash", "0@500-500"], "crash '0@500-500': the restart must come after the crash"),
        (["--max-time-ms", "inf"], "--max-time-ms inf: must be a finite number > 0"),
        (["--max-time-ms", "nan"], "--max-time-ms nan: must be a finite number > 0"),
        (["--max-time-ms", "-1"], "--max-time-ms -1.0: must be a finite number > 0"),
        (["--max-time-ms", "0"], "--max-time-ms 0.0: must be a finite number > 0"),
        (["--delay-ms", "-100"], "--delay-ms -100.0: must be a finite number >= 0"),
        (["--delay-ms", "nan"], "--delay-ms nan: must be a finite number >= 0"),
        (["--delay-ms", "inf"], "--delay-ms inf: must be a finite number >= 0"),
        (["--jitter-ms", "-50"], "--jitter-ms -50.0: must be a finite number >= 0"),
        (["--jitter-ms", "nan"], "--jitter-ms nan: must be a finite number >= 0"),
        (
            ["--partition", "100-50:0,1|2,3"],
            "partition '100-50:0,1|2,3': its end 50 ms must come after its start",
        ),
        (
            ["--partition", "100-100:0,1|2,3"],
            "partition '100-100:0,1|2,3': its end 100 ms must come after its start",
        ),
        (
            ["--partition", "0-1000:7,8|9"],
            "partition 0-1000: not among the 4 validators 0..3: 7, 8, 9",
        ),
        (["--partition", "0-1000:0,-1"], "partition 0-1000: not among the 4 validators 0..3: -1"),
        (
            ["--partition", "0-1000:0,1|0,2"],
            "partition '0-1000:0,1|0,2': in more than one group: 0",
        ),
        (["--partition", "0-1000:"], "partition '0-1000:': a group names no validator"),
        (["--partition", "0-1000:0,1||2"], "partition '0-1000:0,1||2': a group names no validator"),
        (
            ["--far", "0:-5"],
            "far: validator 0 with -5.0 ms: the extra delay must be a finite number of ms >= 0",
        ),
        (
            ["--far", "0:inf"],
            "far: validator 0 with inf ms: the extra delay must be a finite number of ms >= 0",
        ),
        (
            ["--far", "0:nan"],
            "far: validator 0 with nan ms: the extra delay must be a finite number of ms >= 0",
        ),
        (["--strategy", "equivocate"], "--strategy equivocate needs --byzantine 1 or more"),
        (
            ["--strategy", "silent", "--byzantine", "0"],
            "--strategy silent needs --byzantine 1 or more",
        ),
        (["--validators", "99999999999999999999"], "Invalid value for '--validators'"),
        (["--validators", "101"], "Invalid value for '--validators'"),
    ],
)
def test_simulate_refuses(args: list[str], message: str) -> None:
    # --rounds 3: should a check go missing, the run it lets through ends quickly and fails
    code, text = _simulate("--rounds", "3", *args)
    assert code == 2, text
    assert message in text, text
    assert "Traceback" not in text


def test_validators_bound_names_the_limit() -> None:
    code, text = _simulate("--validators", "101")
    assert code == 2 and "100" in text.replace("101", ""), text


def test_sim_config_refuses_a_negative_crash_time() -> None:
    with pytest.raises(ValueError, match="crash 0@-5: the crash time must be >= 0 ms"):
        SimConfig(validators=4, crashes=(Crash(0, -5),))


def test_simulate_with_every_checked_option_runs() -> None:
    code, text = _simulate(
        "--rounds",
        "5",
        "--crypto",
        "mac",
        "--validators",
        "4",
        "--byzantine",
        "1",
        "--strategy",
        "equivocate",
        "--crash",
        "0@100-300",
        "--partition",
        "50-200:0|1,2",
        "--far",
        "1:10",
        "--delay-ms",
        "0",
        "--jitter-ms",
        "0",
        "--max-time-ms",
        "60000",
    )
    assert code == 0, text
    assert '"safety": "ok"' in text
