"""``LoopWatch``: how late an actor's event loop runs, for its status (no Ray needed)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from rayledger.actors import loopwatch
from rayledger.actors.loopwatch import LoopWatch


def test_a_blocking_call_on_the_loop_is_measured_as_a_stall_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = LoopWatch("validator 7", probe_s=0.01, stall_ms=250, warn_ms=250)
    before: list[int] = []

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(watch.run())
        await asyncio.sleep(0.1)
        assert watch.probes >= 3
        before.append(watch.stalls)
        time.sleep(0.4)  # a call that blocks the loop
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger=loopwatch.__name__):
        asyncio.run(run())
    st = watch.status()
    assert st["stalls"] >= before[0] + 1 and 350 <= st["worst_ms"] < 5_000
    assert st["worst_ms_last_minute"] == st["worst_ms"]
    assert any(
        r.getMessage().startswith("validator 7: its event loop ran ") for r in caplog.records
    )


def test_the_last_minute_forgets_what_came_before_it() -> None:
    watch = LoopWatch("v", stall_ms=100)
    t = 1_000.0
    watch._window_start = t
    watch.note(500, now=t + 1)
    assert watch.status()["worst_ms_last_minute"] == 500
    watch.note(3, now=t + 61)  # the next window: the one before still counts
    assert watch.status()["worst_ms_last_minute"] == 500
    watch.note(4, now=t + 122)  # two windows on: it is gone
    assert watch.status() == {
        "worst_ms_last_minute": 4.0,
        "worst_ms": 500.0,
        "stalls": 1,
        "stall_ms": 100,
    }
    # A stall past two whole windows leaves nothing from before it, and counts itself
    watch.note(150_000, now=t + 400)
    assert watch.status()["worst_ms_last_minute"] == 150_000
    watch.note(-5, now=t + 401)  # (early wake-ups are not negative lateness)
    assert watch.probes == 5 and watch.stalls == 2
