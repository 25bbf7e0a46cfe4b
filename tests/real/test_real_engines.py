"""The shadow failover and migration scenarios against real engines with a small model.

    FAILOVER_TEST_MODEL=Qwen/Qwen3-0.6B .venv/bin/python -m pytest -m gpu tests/real -v

Each test is skipped, with the reason, where its engine or a GPU is missing (docs/real-engines.md
says how to run them on a GPU machine). They run the real daemon against the real engine:
a paired shadow loads and sleeps through the engine's own sleep mode, the active engine is
SIGKILLed, the shadow is woken and serves; a stream through the frontend survives the kill.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import free_port_range, start_supervisor
from supervisor.upstream import iter_sse_data

MODEL = os.environ.get("FAILOVER_TEST_MODEL", "Qwen/Qwen3-0.6B")


def _gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")


def _needs(engine: str, present: bool) -> list[pytest.MarkDecorator]:
    reasons = []
    if not _gpu():
        reasons.append("no NVIDIA GPU (nvidia-smi, /dev/nvidiactl)")
    if not present:
        reasons.append(f"{engine} is not installed")
    return [
        pytest.mark.gpu,
        getattr(pytest.mark, engine),
        pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "-"),
    ]


ENGINES: dict[str, dict[str, Any]] = {
    "vllm": {
        "present": importlib.util.find_spec("vllm") is not None,
        # Two engines share the GPU: the shadow loads first, then sleeps (vLLM's level 1
        # moves its weights to host memory and drops its KV cache), then the active loads.
        "extra_args": [
            "--gpu-memory-utilization", "0.35", "--enforce-eager", "--max-model-len", "4096",
        ],
    },
    "sglang": {
        "present": importlib.util.find_spec("sglang") is not None,
        "extra_args": ["--mem-fraction-static", "0.35", "--context-length", "4096"],
    },
}  # fmt: skip

CASES = [pytest.param(name, marks=_needs(name, e["present"])) for name, e in ENGINES.items()]
# trtllm-serve has no sleep mode over HTTP: its shadows need the cuda-checkpoint strategy.
CASES.append(
    pytest.param("trtllm", marks=_needs("trtllm", shutil.which("trtllm-serve") is not None))
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def real_slot(engine: str) -> dict[str, Any]:
    slot: dict[str, Any] = {
        "name": "real",
        "model": MODEL,
        "backend": engine,
        "base_port": free_port_range(2),
        "shadows": 1,
        "placement": "paired",
        "gpus": ["0"],
        "extra_args": ENGINES.get(engine, {}).get("extra_args", []),
    }
    if engine == "trtllm":
        slot["suspend"] = "cuda-checkpoint"
    return slot


async def _status(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def _stream(session: aiohttp.ClientSession, url: str, kill: int | None = None) -> str:
    body = {"model": MODEL, "prompt": "Count from one to fifty:", "max_tokens": 200,
            "temperature": 0, "stream": True}  # fmt: skip
    out = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for data in iter_sse_data(r):
            out += [c["text"] for c in json.loads(data)["choices"]]
            if kill is not None and len(out) == 20:
                os.killpg(kill, signal.SIGKILL)
    return "".join(out)


@pytest.mark.parametrize("engine", CASES)
async def test_shadow_failover_and_migration_on_a_real_engine(
    tmp_path: Path, session: aiohttp.ClientSession, engine: str
) -> None:
    sup = await start_supervisor(
        tmp_path,
        [real_slot(engine)],
        health={"probe_interval": 0.5, "probe_timeout": 2.0, "load_timeout": 900},
        failover={"wake_timeout": 300, "stop_grace": 30},
        ready_timeout=1200,
    )
    try:
        st = await _status(session, sup.admin_url)
        active = next(e for e in st["engines"] if e["state"] == "active")
        assert any(e["state"] == "sleeping" for e in st["engines"])
        unbroken = await _stream(session, sup.frontend_url)
        migrated = await _stream(session, sup.frontend_url, kill=active["pid"])
        # vLLM and SGLang resume from token ids: the same text; others by text continuation.
        if engine in ("vllm", "sglang"):
            assert migrated == unbroken
        else:
            assert migrated.startswith(unbroken[:10])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = await _status(session, sup.admin_url)
            if st["slots"][0]["epoch"] == 2:
                break
            await anyio.sleep(0.5)
        assert st["slots"][0]["epoch"] == 2 and st["failovers"][0]["result"] == "promoted"
    finally:
        await anyio.to_thread.run_sync(sup.stop)
