"""How late an actor's event loop runs: the health signal behind a round that timed out.

An async actor does everything on one event loop: consensus messages, timers, commits. A
call that blocks it (a disk read, a large execution, a synchronous Ray call) delays every
timer and message behind it, and on a network with a one-second round timeout a stall of half
a second can end rounds by timeout with nothing wrong in the protocol. ``LoopWatch`` wakes
every ``probe_s`` and measures how late it woke: the worst lateness in the last minute, the
worst since the start, and the stalls past ``stall_ms``, for the actor's status.

Without it, telling a stalled loop from a protocol fault took a session of temporary
instrumentation (2026-12-05: two round timeouts at every validator restart turned out to be
the protocol's, the loops never more than 100 ms late).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

PROBE_S = 0.1
STALL_MS = 250.0
WINDOW_S = 60.0


class LoopWatch:
    """Measures the lateness of the running event loop (``run``, as a task of that loop)."""

    def __init__(
        self,
        what: str,
        *,
        probe_s: float = PROBE_S,
        stall_ms: float = STALL_MS,
        warn_ms: float | None = None,
    ) -> None:
        self.what = what
        self.probe_s = probe_s
        self.stall_ms = stall_ms
        # A stall this long is logged too (one that can end a round: half its timeout)
        self.warn_ms = warn_ms
        self.worst_ms = 0.0
        self.stalls = 0
        self.probes = 0
        # The worst lateness of this window and of the one before (``WINDOW_S`` each)
        self._window_start = time.monotonic()
        self._window_worst = 0.0
        self._previous_worst = 0.0

    def note(self, late_ms: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._window_start >= WINDOW_S:
            # A window with no probe in it (the loop stalled past it) leaves nothing before
            gap = now - self._window_start >= 2 * WINDOW_S
            self._previous_worst = 0.0 if gap else self._window_worst
            self._window_start, self._window_worst = now, 0.0
        late_ms = max(0.0, late_ms)
        self.probes += 1
        self._window_worst = max(self._window_worst, late_ms)
        self.worst_ms = max(self.worst_ms, late_ms)
        if late_ms >= self.stall_ms:
            self.stalls += 1
        if self.warn_ms is not None and late_ms >= self.warn_ms:
            log.warning(
                "%s: its event loop ran %.0f ms late (timers and messages waited behind it)",
                self.what,
                late_ms,
            )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.probe_s)
            self.note((loop.time() - start - self.probe_s) * 1000)

    def status(self) -> dict[str, Any]:
        """Milliseconds: the worst lateness in the last minute or so (this window and the
        one before), the worst since the start; and the stalls past ``stall_ms``."""
        return {
            "worst_ms_last_minute": round(max(self._window_worst, self._previous_worst), 1),
            "worst_ms": round(self.worst_ms, 1),
            "stalls": self.stalls,
            "stall_ms": self.stall_ms,
        }
