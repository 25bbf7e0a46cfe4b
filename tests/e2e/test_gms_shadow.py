"""Seeds 000 and 003: GPU Memory Service shadow failover with Dynamo workers (simulated).

The shadow starts asleep on the active engine's GPU (vLLM worker: ``--gms-mode shadow``),
the active engine is killed, and the supervisor wakes the shadow through the worker's
``/engine/...`` routes only after the dead engine's memory is free.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import sim_slot, start_supervisor
from supervisor.testing.gpuledger import GIB, GpuLedger

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SHADOW_FLAGS = {"vllm-gms": ["--gms-mode", "shadow"], "sglang-gms": ["--sim-start-asleep"]}


async def status(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["vllm-gms", "sglang-gms"])
async def test_gms_shadow_engine_failover(
    tmp_path: Path, session: aiohttp.ClientSession, own_gpu_ledger: Path, backend: str
) -> None:
    slot = sim_slot("s", dialect=backend, shadow_extra_args=SHADOW_FLAGS[backend])
    sup = await start_supervisor(tmp_path, [slot])
    try:
        st = await status(session, sup.admin_url)
        active = next(e for e in st["engines"] if e["state"] == "active")
        shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
        # The shadow holds only its weights: active 16 + 48 GiB, shadow 16 GiB.
        assert GpuLedger(own_gpu_ledger).usage()["0"].used == (64 + 16) * GIB
        os.killpg(active["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = await status(session, sup.admin_url)
            if st["slots"][0]["epoch"] == 2:
                break
            await anyio.sleep(0.05)
        assert st["slots"][0]["active"] == shadow["id"], st
        rec = st["failovers"][0]
        assert rec["result"] == "promoted" and "memory_release" in rec["steps"]
        log = (tmp_path / "state" / "logs" / f"{shadow['id']}.log").read_text()
        assert "starting asleep" in log and "resumed GPU memory" in log
        body = {"model": "sim-model", "prompt": "after failover", "max_tokens": 5}
        async with session.post(sup.frontend_url + "/v1/completions", json=body) as r:
            assert r.status == 200
    finally:
        await anyio.to_thread.run_sync(sup.stop)
