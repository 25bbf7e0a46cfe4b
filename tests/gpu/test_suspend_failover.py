"""A whole failover with the cuda-checkpoint suspend strategy, on a real GPU.

An engine without a sleep mode (simulated TRT-LLM) gets a paired shadow through
``suspend = "cuda-checkpoint"``. Each engine's worker holds real GPU memory with a known
pattern (``--sim-cuda-gib``). The shadow loads, is checkpointed (its device memory goes to
host memory: NVML shows 0), the active engine starts, is SIGKILLed, and the shadow is
restored (its memory back, the pattern intact) and serves.

Needs what tests/gpu/test_cuda_checkpoint.py needs, plus this package installed (for the
backend entry points).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.anyio, pytest.mark.e2e]
torch = pytest.importorskip("torch", reason="needs torch with CUDA")
pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor  # noqa: E402

GIB = 2**30


def used_by(pid: int) -> int:
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum(
        p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == pid
    )


def worker_pid(log: str) -> int:
    m = re.search(r"worker (\d+) holds", log)
    assert m, log
    return int(m.group(1))


async def status(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def test_cuda_checkpoint_shadow_fails_over(tmp_path: Path) -> None:
    sim = [*FAST_SIM_ARGS, "--sim-weights-gib", "1", "--sim-kv-gib", "1", "--sim-cuda-gib", "2"]
    slot = sim_slot("s", dialect="trtllm", sim_args=sim, suspend="cuda-checkpoint")
    slot.pop("shadow_extra_args", None)  # trtllm-serve has no start-asleep mode
    logs = tmp_path / "state" / "logs"
    t0 = time.monotonic()
    sup = await start_supervisor(
        tmp_path,
        [slot],
        health={"load_timeout": 120},
        failover={"wake_timeout": 120},
        ready_timeout=180,
    )
    try:
        async with aiohttp.ClientSession() as session:
            st = await status(session, sup.admin_url)
            shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
            active = next(e for e in st["engines"] if e["state"] == "active")
            shadow_worker = worker_pid((logs / f"{shadow['id']}.log").read_text())
            active_worker = worker_pid((logs / f"{active['id']}.log").read_text())
            print(f"started in {time.monotonic() - t0:.1f}s; {shadow['reason']}")
            assert used_by(shadow_worker) == 0  # checkpointed: its device memory is on the host
            assert used_by(active_worker) >= 2 * GIB
            os.killpg(active["pid"], signal.SIGKILL)
            t = time.monotonic()
            while time.monotonic() - t < 120:
                st = await status(session, sup.admin_url)
                if st["slots"][0]["epoch"] == 2:
                    break
                await anyio.sleep(0.1)
            rec = st["failovers"][0]
            print(f"failover: {rec['result']} steps {rec['steps']}")
            assert st["slots"][0]["active"] == shadow["id"] and rec["result"] == "promoted"
            assert used_by(shadow_worker) >= 2 * GIB  # restored
            os.kill(shadow_worker, signal.SIGUSR1)
            log = logs / f"{shadow['id']}.log"
            t = time.monotonic()
            while "cuda check" not in log.read_text() and time.monotonic() - t < 30:
                await anyio.sleep(0.1)
            assert "cuda check ok" in log.read_text()
            body = {"model": "sim-model", "prompt": "after restore", "max_tokens": 5}
            async with session.post(sup.frontend_url + "/v1/completions", json=body) as r:
                assert r.status == 200
    finally:
        await anyio.to_thread.run_sync(sup.stop)
