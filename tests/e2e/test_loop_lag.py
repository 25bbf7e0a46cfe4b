"""The real daemon exports its event loop's lag, and a loop held still shows in it: the
daemon is stopped (SIGSTOP) for longer than the histogram's 0.5 s bucket, as a starved or
frozen process would be, and its next scrape has a wake past that bucket and its log a
warning."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.testing.cluster import sim_slot, start_supervisor

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

LAG = "failover_supervisor_event_loop_lag_seconds"


async def lag_histogram(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """The histogram's cumulative bucket counts by upper edge, and ``count``."""
    async with session.get(admin_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out[s.labels["le"]] = s.value
                elif s.name.endswith("_count"):
                    out["count"] = s.value
    return out


async def test_a_stopped_daemon_reports_its_late_wake(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sup = await start_supervisor(tmp_path / "sup", [sim_slot("s")])
    try:
        before = await lag_histogram(session, sup.admin_url)
        assert "0.001" in before and "1.0" in before, before  # exported, 1 ms .. 1 s
        os.kill(sup.proc.pid, signal.SIGSTOP)
        try:
            await anyio.sleep(0.8)
        finally:
            os.kill(sup.proc.pid, signal.SIGCONT)
        await anyio.sleep(0.3)  # the ticker's late wake, then more on time
        after = await lag_histogram(session, sup.admin_url)
        late = (after["count"] - after["0.5"]) - (before["count"] - before["0.5"])
        assert late >= 1, (before, after)
        assert after["count"] > before["count"] + 1  # and it ticks on
        warnings = [
            line
            for line in map(orjson.loads, sup.logs().splitlines())
            if line.get("event", "").startswith("event loop blocked")
        ]
        assert warnings and warnings[-1]["lag_s"] >= 0.5, sup.logs()[-3000:]
    finally:
        await anyio.to_thread.run_sync(sup.stop)
