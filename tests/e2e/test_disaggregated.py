"""Seed 001, disaggregated: a prefill engine and decode engines (simulated, as real processes).

Every request's prefill runs on the prefill engine (a slot the frontend never routes to);
decode engines stream the tokens. Cancellation reaches both engines; a decode engine's death
migrates the stream to the decode shadow, whose prefill again goes to the prefill engine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    SupervisorProcess,
    free_port_range,
    sim_slot,
    start_supervisor,
)
from supervisor.upstream import iter_sse_data

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
async def disagg(tmp_path: Path) -> AsyncIterator[SupervisorProcess]:
    prefill_port = free_port_range(1)
    sim = (*FAST_SIM_ARGS, "--sim-itl", "0.01")
    sup = await start_supervisor(
        tmp_path,
        [
            sim_slot(
                "prefill",
                shadows=0,
                gpus=["0"],
                base_port=prefill_port,
                serve_requests=False,
                sim_args=[*sim, "--sim-disagg", "prefill", "--sim-prefill-per-token", "0.002"],
            ),
            sim_slot(
                "decode",
                shadows=1,
                gpus=["1"],
                sim_args=[
                    *sim,
                    "--sim-disagg",
                    "decode",
                    "--sim-prefill-url",
                    f"http://127.0.0.1:{prefill_port}",
                ],
            ),
        ],
    )
    try:
        yield sup
    finally:
        await anyio.to_thread.run_sync(sup.stop)


def log_of(sup: SupervisorProcess, engine_id: str) -> str:
    path = sup.config_path.parent / "state" / "logs" / f"{engine_id}.log"
    return path.read_text() if path.exists() else ""


async def engines(sup: SupervisorProcess, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(sup.admin_url + "/status") as r:
        st = await r.json()
    return {
        "prefill": next(e for e in st["engines"] if e["slot"] == "prefill"),
        "decode": next(
            e for e in st["engines"] if e["slot"] == "decode" and e["state"] == "active"
        ),
    }


async def wait_log(sup: SupervisorProcess, engine_id: str, line: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while line not in log_of(sup, engine_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} not in {engine_id}'s log:\n{log_of(sup, engine_id)}")
        await anyio.sleep(0.01)


async def test_decode_cancel_reaches_decode_and_the_request_reached_prefill(
    disagg: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    sup = disagg
    e = await engines(sup, session)
    rid = "disagg-decode-cancel"
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 3000,
        "stream": True,
    }
    async with session.post(
        sup.frontend_url + "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}
    ) as r:
        n = 0
        async for _ in iter_sse_data(r):
            n += 1
            if n == 5:
                break  # the client goes away during decode
    t = time.monotonic()
    engine_rid = f"chatcmpl-{rid}"  # vLLM's id for a chat request
    await wait_log(sup, e["decode"]["id"], f"Aborted request {engine_rid}.")
    assert time.monotonic() - t < 1
    assert f"Added request {engine_rid}." in log_of(sup, e["prefill"]["id"])
    assert f"Remote prefill of request {engine_rid} done." in log_of(sup, e["decode"]["id"])
    assert f"Aborted request {engine_rid}." not in log_of(sup, e["prefill"]["id"])


async def test_remote_prefill_cancel_reaches_both(
    disagg: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    sup = disagg
    e = await engines(sup, session)
    rid = "disagg-prefill-cancel"
    engine_rid = f"cmpl-{rid}"  # vLLM's id for a completion request
    long_prompt = " ".join(["river"] * 2000)  # about 4 s of prefill at 2 ms a token
    body = {"model": "sim-model", "prompt": long_prompt, "max_tokens": 50, "stream": True}

    async def client() -> None:
        async with session.post(
            sup.frontend_url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
        ) as r:
            await r.read()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await wait_log(sup, e["prefill"]["id"], f"Added request {engine_rid}.")
        tg.cancel_scope.cancel()  # the client goes away during the remote prefill
    t = time.monotonic()
    await wait_log(sup, e["prefill"]["id"], f"Aborted request {engine_rid}.")
    await wait_log(sup, e["decode"]["id"], f"Aborted Remote Request ID {engine_rid}.")
    assert time.monotonic() - t < 1
    assert f"Remote prefill of request {engine_rid} done." not in log_of(sup, e["decode"]["id"])


async def test_decode_death_migrates_the_stream(
    disagg: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    sup = disagg
    e = await engines(sup, session)
    body = {
        "model": "sim-model",
        "prompt": "tell me a story",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }

    async def stream(rid: str, kill_after: int | None = None) -> str:
        text = []
        async with session.post(
            sup.frontend_url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
        ) as r:
            async for data in iter_sse_data(r):
                obj = json.loads(data)
                text += [c["text"] for c in obj["choices"]]
                if kill_after is not None and len(text) == kill_after:
                    os.killpg(e["decode"]["pid"], signal.SIGKILL)
        return "".join(text)

    migrated = await stream("disagg-migrate", kill_after=50)
    unbroken = await stream("disagg-unbroken")
    assert migrated == unbroken  # no token lost or repeated
    # The continuation went through the prefill engine again, on the promoted decode engine.
    assert log_of(sup, e["prefill"]["id"]).count("Added request cmpl-disagg-migrate") >= 2
    after = await engines(sup, session)
    assert after["decode"]["id"] != e["decode"]["id"]
