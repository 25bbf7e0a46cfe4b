"""How late the daemon's event loop runs what is due: a ticker that sleeps a fixed interval
and records by how much it overslept.

Everything the daemon does (keep-alives, beats, probes, the relay) waits its turn on one
thread; a piece of work that holds it delays all of them alike, and this ticker with them.
So its lateness is the delay any callback due at that moment saw.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from prometheus_client import Histogram

# 50 ms: each wake costs the process 150-250 µs of CPU on this project's 2-core test VM,
# most of it the kernel waking an idle process (a bare timer callback costs 120-180 µs; a
# sleep's timer and one histogram observation the rest), so a 10 ms ticker would take 2 %
# of a core on every node (an idle leader spends about 3 % on all else), and 50 ms 0.4 %.
# The price is resolution: a stall of D shows as a wake at least D - 50 ms late, so any
# stall over 100 ms lands past the 50 ms bucket and any over 150 ms is logged. p99 is not
# biased by the interval (the wakes fall at times that owe nothing to the loop's work),
# only sampled less often: 1,200 wakes a minute.
TICK = 0.050
# A wake this late is logged: twice the bench's bound on the loop's longest stall (50 ms),
# and well past anything a request's own work takes, so the line means something held the
# loop (a long synchronous pass, a GC of a large heap, the process stopped or starved).
WARN_AFTER = 0.100
# At most one warning line per this many seconds; the ones held back are counted in the next.
WARN_EVERY = 10.0


class LoopLagTicker:
    """A task that wakes every :data:`TICK` seconds and observes how late each wake is
    into ``histogram``; a wake later than :data:`WARN_AFTER` is logged (rate-limited)."""

    def __init__(
        self,
        histogram: Histogram,
        log: Any,
        tick: float = TICK,
        warn_after: float = WARN_AFTER,
        warn_every: float = WARN_EVERY,
    ) -> None:
        self.histogram = histogram
        self.log = log
        self.tick = tick
        self.warn_after = warn_after
        self.warn_every = warn_every
        self._warned_at = -float("inf")
        self._held_back = 0  # late wakes not logged since the last line
        self._held_worst = 0.0

    async def run(self) -> None:
        observe = self.histogram.observe
        while True:
            due = time.monotonic() + self.tick
            await anyio.sleep(self.tick)
            now = time.monotonic()
            # uvloop rounds a timer to whole milliseconds, so a wake can come a little early.
            lag = max(now - due, 0.0)
            observe(lag)
            if lag > self.warn_after:
                self._late(lag, now)

    def _late(self, lag: float, now: float) -> None:
        if now - self._warned_at < self.warn_every:
            self._held_back += 1
            self._held_worst = max(self._held_worst, lag)
            return
        self.log.warning(
            "event loop blocked: a timer ran late",
            lag_s=round(lag, 3),
            tick_s=self.tick,
            # Since the last such line, when more than one came within warn_every.
            more_late_wakes=self._held_back,
            worst_of_those_s=round(self._held_worst, 3),
        )
        self._warned_at = now
        self._held_back = 0
        self._held_worst = 0.0
