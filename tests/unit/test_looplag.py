"""The event-loop lag ticker, in-process: a loop held by a blocking call shows up in the
histogram as a wake at least that late, and in one warning line however many such wakes
come within the rate limit."""

from __future__ import annotations

import time

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from supervisor import log as logging
from supervisor.looplag import LoopLagTicker
from supervisor.metrics import Metrics

pytestmark = pytest.mark.anyio


def wakes(metrics: Metrics, later_than: float = -1.0) -> float:
    """Wakes observed (those later than a bucket's upper edge, if given), read from the
    exported text as a scrape would."""
    count = within = 0.0
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name != "failover_supervisor_event_loop_lag_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_bucket") and float(s.labels["le"]) == later_than:
                within = s.value
    return count - within


def hold_the_loop(seconds: float) -> None:
    """Called from the loop's thread: holds it as a long synchronous pass would."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_recorded_and_logged_once() -> None:
    metrics = Metrics()
    # A finer tick than the daemon's: the holds below are seen to within 10 ms.
    ticker = LoopLagTicker(metrics.event_loop_lag, logging.get(node="t"), tick=0.01, warn_every=60)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            # Its first wake was due 4 ticks before this sleep ends: it has ticked.
            await anyio.sleep(ticker.tick * 5)
            assert wakes(metrics) >= 1
            before = wakes(metrics, later_than=0.25)
            for _ in range(2):
                hold_the_loop(0.3)
                await anyio.sleep(ticker.tick * 3)  # the ticker wakes, late, and records it
            tg.cancel_scope.cancel()
    # Each hold made one wake at least 0.3 - tick late: past the 0.25 s bucket.
    assert wakes(metrics, later_than=0.25) - before >= 2
    lines = [x for x in logs if x["event"].startswith("event loop blocked")]
    # Two late wakes within warn_every: the first is logged, the second held back.
    assert len(lines) == 1, logs
    assert lines[0]["log_level"] == "warning" and lines[0]["lag_s"] >= 0.3 - ticker.tick


async def test_the_warning_after_the_rate_limit_counts_those_held_back() -> None:
    metrics = Metrics()
    ticker = LoopLagTicker(metrics.event_loop_lag, logging.get(), tick=0.01, warn_every=0.5)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            for hold in (0.15, 0.2, 0.55):  # the third comes after warn_every has passed
                await anyio.sleep(ticker.tick * 3)
                hold_the_loop(hold)
            await anyio.sleep(ticker.tick * 3)
            tg.cancel_scope.cancel()
    lines = [x for x in logs if x["event"].startswith("event loop blocked")]
    assert len(lines) == 2, logs
    assert lines[1]["more_late_wakes"] == 1 and lines[1]["worst_of_those_s"] >= 0.2 - 0.02
