"""Shadows for engines without a sleep mode, on any platform: ``suspend = "awake"`` keeps the
shadow loaded and ready but not routed to; a failover then costs no wake at all."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor
from tests.e2e.test_frontend import request_body, send

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def awake_slot() -> dict[str, object]:
    # Not paired: an awake standby holds a whole engine's memory, so it gets its own GPU.
    return sim_slot(
        "s",
        sim_args=(*FAST_SIM_ARGS, "--sim-itl", "0.01"),
        suspend="awake",
        placement="pooled",
        gpus=["0"],
        shadow_gpus=[["1"]],
        shadow_extra_args=[],
    )


async def test_an_awake_standby_takes_over_mid_stream(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sup = await start_supervisor(tmp_path, [awake_slot()], frontend={"migration_wait": 10})
    try:
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        shadow = next(e for e in st["engines"] if e["role"] == "shadow")
        active = next(e for e in st["engines"] if e["role"] == "active")
        assert shadow["state"] == "sleeping"
        assert "standing by awake" in shadow["reason"]
        # The standby really is awake: it would serve a request sent to it directly.
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        async with session.post(shadow["url"] + "/v1/completions", json=body) as r:
            assert r.status == 200
        unbroken = await send(
            session, sup.frontend_url, "completion", request_body("completion", True)
        )

        async def on_chunk(n: int) -> None:
            if n == 20:
                os.killpg(active["pid"], signal.SIGKILL)

        got = await send(
            session,
            sup.frontend_url,
            "completion",
            request_body("completion", True),
            on_chunk=on_chunk,
        )
        assert got["text"] == unbroken["text"]
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        rec = st["failovers"][0]
        assert rec["result"] == "promoted" and rec["promoted_engine"] == shadow["id"]
        assert rec["steps"]["wake"] < 1.0  # no wake call: only readiness is checked
        assert st["slots"][0]["active"] == shadow["id"]
        # And a new standby comes up on the freed GPU.
        for _ in range(200):
            async with session.get(sup.admin_url + "/status") as r:
                st = await r.json()
            if st["slots"][0]["shadows_asleep"] == 1:
                break
            await anyio.sleep(0.05)
        assert st["slots"][0]["shadows_asleep"] == 1
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]
