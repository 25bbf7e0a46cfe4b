"""A migrated request keeps the length the client asked for, including when it asked for
none: the completions route's default of 16 tokens, and a chat request's "until the context
ends" (real vLLM reads a missing or null max_tokens on /v1/completions as 16, and so does the
simulator; a continuation that sent null used to cut a chat answer at 16 more tokens)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, SupervisorProcess, sim_slot, start_supervisor
from tests.e2e.test_frontend import send, signal_after

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SIM = (*FAST_SIM_ARGS, "--sim-itl", "0.01", "--max-model-len", "160", "--sim-drain-timeout", "0.1")


@pytest.fixture
async def sup(tmp_path: Path) -> AsyncIterator[SupervisorProcess]:
    s = await start_supervisor(tmp_path, [sim_slot("s", sim_args=SIM)])
    try:
        yield s
    finally:
        assert await anyio.to_thread.run_sync(s.stop) == 0, s.logs()[-3000:]


async def active_pid(session: aiohttp.ClientSession, sup: SupervisorProcess) -> int:
    async with session.get(sup.admin_url + "/status") as r:
        st = await r.json()
    return next(e["pid"] for e in st["engines"] if e["id"] == st["slots"][0]["active"])


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_a_request_without_max_tokens_keeps_its_length_across_a_migration(
    sup: SupervisorProcess, session: aiohttp.ClientSession, kind: str
) -> None:
    body: dict[str, Any] = {"model": "sim-model", "temperature": 0, "stream": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "Tell me of the river."}]
    else:
        body["prompt"] = "the lantern over the harbor"
    body["stream_options"] = {"include_usage": True}
    unbroken = await send(session, sup.frontend_url, kind, body)
    expected = 16 if kind == "completion" else None
    if expected is not None:
        assert unbroken["usage"]["completion_tokens"] == expected
    else:
        assert unbroken["usage"]["completion_tokens"] > 60  # to the end of the context
    pid = await active_pid(session, sup)
    got = await send(session, sup.frontend_url, kind, body, signal_after(pid, signal.SIGKILL, 8))
    assert got["text"] == unbroken["text"]
    assert got["usage"]["completion_tokens"] == unbroken["usage"]["completion_tokens"]
    assert got["finishes"] == unbroken["finishes"]


async def test_a_request_the_engine_aborts_is_resumed_not_ended(
    sup: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    # vLLM's /sleep (mode "abort", its default) ends requests in flight with finish_reason
    # "abort" and [DONE]: that is no answer to give the client; the stream resumes elsewhere.
    body: dict[str, Any] = {
        "model": "sim-model",
        "prompt": "the lantern over the harbor",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
    }
    unbroken = await send(session, sup.frontend_url, "completion", body)
    # Serve from a former shadow: launched with sleep mode, so its /sleep works.
    os.killpg(await active_pid(session, sup), signal.SIGKILL)
    await full_strength(session, sup, epoch=2)
    async with session.get(sup.admin_url + "/status") as r:
        st = await r.json()
    active = next(e for e in st["engines"] if e["id"] == st["slots"][0]["active"])

    async def put_to_sleep(n: int) -> None:
        if n == 10:
            async with session.post(active["url"] + "/sleep", params={"level": "1"}) as r:
                assert r.status == 200

    got = await send(session, sup.frontend_url, "completion", body, put_to_sleep)
    assert got["text"] == unbroken["text"]
    assert got["finishes"] == ["length"]


async def full_strength(session: aiohttp.ClientSession, sup: SupervisorProcess, epoch: int) -> None:
    for _ in range(400):
        async with session.get(sup.admin_url + "/status") as r:
            s = (await r.json())["slots"][0]
        if s["epoch"] == epoch and s["shadows_asleep"] == 1 and s["phase"] == "serving":
            return
        await anyio.sleep(0.05)
    raise AssertionError("not at full strength again")


@pytest.mark.parametrize("dialect", ["sglang", "trtllm"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_usage_counts_the_prompt_on_every_engine(
    tmp_path: Path, session: aiohttp.ClientSession, dialect: str, kind: str
) -> None:
    # The prompt's size comes in the engine's usage chunk, after the finish: the relay must
    # read on to it (it used to stop at the finish and answer prompt_tokens 0).
    slot = sim_slot("s", dialect=dialect, shadows=0, sim_args=FAST_SIM_ARGS)
    s = await start_supervisor(tmp_path, [slot])
    try:
        body: dict[str, Any] = {"model": "sim-model", "max_tokens": 5, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "Tell me of the river."}]
        else:
            body["prompt"] = "the lantern over the harbor"
        streamed = await send(session, s.frontend_url, kind, body)
        whole = await send(session, s.frontend_url, kind, {**body, "stream": False})
        for got in (streamed, whole):
            assert got["usage"]["prompt_tokens"] > 0, got["usage"]
            assert got["usage"]["completion_tokens"] == 5
    finally:
        assert await anyio.to_thread.run_sync(s.stop) == 0, s.logs()[-3000:]
