"""The seeds' scenarios, one test each, on the simulator (docs/seeds.md maps every seed).

Names follow the seeds' own tests: seed 000 (GPU Memory Service shadow failover, sleep and
wake), seed 001 (request migration on worker failure and graceful shutdown; request
cancellation in aggregated and disaggregated modes). Seeds 002, 003 and 004 are proven in
tests/cluster/ and tests/gpu/ (see docs/seeds.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.backends import load_backend
from supervisor.model import EngineSpec, Readiness
from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    SupervisorProcess,
    free_port,
    free_port_range,
    running_engine,
    sim_slot,
    start_supervisor,
)
from supervisor.testing.gpuledger import GIB, GpuLedger
from supervisor.upstream import iter_sse_data
from tests.e2e.test_frontend import request_body

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


# -- seed 000: GPU Memory Service shadows (Dynamo workers, simulated) ------------------------

SHADOW_FLAGS = {"vllm-gms": ["--gms-mode", "shadow"], "sglang-gms": ["--sim-start-asleep"]}


async def admin_status(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["vllm-gms", "sglang-gms"], ids=["vllm", "sglang"])
async def test_gpu_memory_service_shadow_engine_failover(
    tmp_path: Path, session: aiohttp.ClientSession, own_gpu_ledger: Path, backend: str
) -> None:
    slot = sim_slot("s", dialect=backend, shadow_extra_args=SHADOW_FLAGS[backend])
    sup = await start_supervisor(tmp_path, [slot])
    try:
        st = await admin_status(session, sup.admin_url)
        active = next(e for e in st["engines"] if e["state"] == "active")
        shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
        # The shadow holds only its weights: active 16 + 48 GiB, shadow 16 GiB.
        assert GpuLedger(own_gpu_ledger).usage()["0"].used == (64 + 16) * GIB
        os.killpg(active["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = await admin_status(session, sup.admin_url)
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


@pytest.mark.parametrize("backend", ["vllm-gms", "sglang-gms"], ids=["vllm", "sglang"])
async def test_gpu_memory_service_basic_sleep_wake(
    tmp_path: Path, session: aiohttp.ClientSession, own_gpu_ledger: Path, backend: str
) -> None:
    """Start a worker, infer, sleep it (its GPU memory goes), wake it, infer again."""
    b = load_backend(backend)
    spec = EngineSpec("gms-0", "sim-model", free_port(), options={"sleep_mode": True})
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 5}

    async def infer() -> int:
        async with session.post(spec.url + "/v1/completions", json=body) as r:
            return r.status

    async with running_engine(b, spec, tmp_path, session) as (_, ep):
        assert await infer() == 200
        await b.sleep(ep, 2)
        assert await b.health(ep) is Readiness.SLEEPING
        assert GpuLedger(own_gpu_ledger).usage()["0"].used == 0
        assert await infer() == 503
        await b.wake(ep)
        assert await b.health(ep) is Readiness.READY
        assert GpuLedger(own_gpu_ledger).usage()["0"].used == 64 * GIB
        assert await infer() == 200


# -- seed 001: migration with two workers, and cancellation --------------------------------
@pytest.fixture
async def two_workers(tmp_path: Path, dialect: str) -> AsyncIterator[SupervisorProcess]:
    """Two engines of one model (two shadowless slots), as in seed 001."""
    sim = (*FAST_SIM_ARGS, "--sim-itl", "0.001", "--sim-drain-timeout", "0.5")
    sup = await start_supervisor(
        tmp_path,
        [
            sim_slot("w0", shadows=0, gpus=["0"], dialect=dialect, sim_args=sim),
            sim_slot("w1", shadows=0, gpus=["1"], dialect=dialect, sim_args=sim),
        ],
    )
    try:
        yield sup
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0


async def engine_holding(
    sup: SupervisorProcess, session: aiohttp.ClientSession, rid: str
) -> dict[str, Any]:
    """Poll both engines' logs for the request id, as the seed's test polls worker logs."""
    logs = sup.config_path.parent / "state" / "logs"
    with anyio.fail_after(5):
        while True:
            async with session.get(sup.admin_url + "/status") as r:
                st = await r.json()
            for e in st["engines"]:
                log = logs / f"{e['id']}.log"
                if (
                    e["state"] == "active"
                    and log.exists()
                    and any(
                        line.startswith("INFO") and "Added request" in line and rid in line
                        for line in log.read_text().splitlines()
                    )
                ):
                    return e  # type: ignore[no-any-return]
            await anyio.sleep(0.01)


def engine_request_id(sup: SupervisorProcess, engine_id: str, rid: str) -> str:
    """The engine-side id of the client's request ``rid``: the supervisor makes it unique
    (``rid`` plus a suffix), since clients may reuse an X-Request-Id."""
    log = (sup.config_path.parent / "state" / "logs" / f"{engine_id}.log").read_text()
    found = re.search(rf"Added request (\S*{re.escape(rid)}\S*)\.\n", log)
    assert found, f"no request {rid} in {engine_id}'s log"
    return found.group(1)


@pytest.mark.parametrize("dialect", ["vllm", "vllm-gms"])
@pytest.mark.parametrize(
    "sig",
    [
        pytest.param("SIGKILL", id="worker_failure"),
        pytest.param("SIGTERM", id="graceful_shutdown"),
    ],
)
async def test_request_migration(
    two_workers: SupervisorProcess, session: aiohttp.ClientSession, sig: str
) -> None:
    """Seed 001: a long request (3000 tokens); the worker holding it is killed (SIGKILL) or
    shut down (SIGTERM); the request still completes, and the frontend logged the migration."""
    sup = two_workers
    rid = f"seed001-{sig}"
    result: dict[str, Any] = {}

    async def client() -> None:
        async with session.post(
            sup.frontend_url + "/v1/completions",
            json={
                "model": "sim-model",
                "prompt": "x",
                "max_tokens": 3000,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers={"X-Request-Id": rid},
        ) as r:
            async for data in iter_sse_data(r):
                obj = json.loads(data)
                if obj.get("usage"):
                    result["tokens"] = obj["usage"]["completion_tokens"]
                result["finish"] = (
                    obj["choices"][0]["finish_reason"] if obj["choices"] else result.get("finish")
                )

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        engine = await engine_holding(sup, session, rid)
        await anyio.sleep(0.3)
        os.killpg(engine["pid"], getattr(signal, sig))
    assert result["tokens"] == 3000 and result["finish"] == "length"
    assert "recreating stream" in sup.logs()


# TRT-LLM is left out: it picks its own request id, so its log cannot be matched to ours.
@pytest.mark.parametrize("dialect", ["vllm", "sglang", "vllm-gms", "sglang-gms"])
@pytest.mark.parametrize("mode", ["completion", "chat", "chat_stream"])
async def test_request_cancellation_aggregated(
    two_workers: SupervisorProcess, session: aiohttp.ClientSession, mode: str, dialect: str
) -> None:
    """Seed 001: a client cancels (a completion, a non-streaming chat, a streaming chat
    after 5 chunks); the engine logs the abort of that request id within 1 s."""
    sup = two_workers
    rid = f"cancel-{mode}-{dialect}"
    kind = "completion" if mode == "completion" else "chat"
    body = request_body(kind, mode == "chat_stream", max_tokens=3000)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"

    async def client() -> None:
        async with session.post(
            sup.frontend_url + path, json=body, headers={"X-Request-Id": rid}
        ) as r:
            if mode == "chat_stream":
                n = 0
                async for _ in iter_sse_data(r):
                    n += 1
                    if n == 5:
                        return  # leaving the block closes the connection: a cancel
            else:
                await r.read()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        engine = await engine_holding(sup, session, rid)
        if mode != "chat_stream":
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    t0 = time.monotonic()
    log = sup.config_path.parent / "state" / "logs" / f"{engine['id']}.log"
    with anyio.fail_after(1.0):
        while not any(
            "Aborted request" in line and rid in line for line in log.read_text().splitlines()
        ):
            await anyio.sleep(0.01)
    assert time.monotonic() - t0 < 1.0
    async with session.get(sup.admin_url + "/metrics") as r:
        assert "failover_supervisor_cancellations_total" in await r.text()


@pytest.mark.parametrize("dialect", ["sglang"])
async def test_an_engine_side_abort_migrates_and_keeps_the_engine(
    two_workers: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    """SGLang ends an aborted request with finish_reason "abort": the request moves to the
    other engine, and the engine that aborted it is not declared dead."""
    sup = two_workers
    rid = "aborted-engine-side"
    body = {**request_body("completion", True, 2000), "stream_options": {"include_usage": True}}
    got: dict[str, Any] = {"tokens": 0, "finish": None}

    async def client() -> None:
        async with session.post(
            sup.frontend_url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
        ) as r:
            assert r.status == 200
            async for data in iter_sse_data(r):
                obj = json.loads(data)
                assert "error" not in obj, obj
                if obj.get("usage"):
                    got["tokens"] = obj["usage"]["completion_tokens"]
                for ch in obj["choices"]:
                    got["finish"] = ch["finish_reason"] or got["finish"]

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        engine = await engine_holding(sup, session, rid)
        await anyio.sleep(0.1)
        engine_rid = engine_request_id(sup, engine["id"], rid)
        async with session.post(engine["url"] + "/abort_request", json={"rid": engine_rid}) as r:
            assert r.status == 200
    assert got == {"tokens": 2000, "finish": "length"}
    assert "recreating stream" in sup.logs()
    async with session.get(sup.admin_url + "/status") as r:
        st = await r.json()
    assert not st["failovers"]  # nobody called the aborting engine broken
    assert {e["state"] for e in st["engines"]} == {"active"}


# -- seed 001, disaggregated: a prefill engine and decode engines ---------------------------


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


async def test_request_cancellation_vllm_decode_cancel(
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
    engine_rid = engine_request_id(sup, e["decode"]["id"], rid)
    assert engine_rid.startswith(f"chatcmpl-{rid}-")  # vLLM's id for a chat request
    await wait_log(sup, e["decode"]["id"], f"Aborted request {engine_rid}.")
    assert time.monotonic() - t < 1
    assert f"Added request {engine_rid}." in log_of(sup, e["prefill"]["id"])
    assert f"Remote prefill of request {engine_rid} done." in log_of(sup, e["decode"]["id"])
    assert f"Aborted request {engine_rid}." not in log_of(sup, e["prefill"]["id"])


async def test_request_cancellation_vllm_remote_prefill_cancel(
    disagg: SupervisorProcess, session: aiohttp.ClientSession
) -> None:
    sup = disagg
    e = await engines(sup, session)
    rid = "disagg-prefill-cancel"
    long_prompt = " ".join(["river"] * 2000)  # about 4 s of prefill at 2 ms a token
    body = {"model": "sim-model", "prompt": long_prompt, "max_tokens": 50, "stream": True}

    async def client() -> None:
        async with session.post(
            sup.frontend_url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
        ) as r:
            await r.read()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await wait_log(sup, e["prefill"]["id"], f"Added request cmpl-{rid}-")
        engine_rid = engine_request_id(sup, e["prefill"]["id"], rid)
        tg.cancel_scope.cancel()  # the client goes away during the remote prefill
    t = time.monotonic()
    await wait_log(sup, e["prefill"]["id"], f"Aborted request {engine_rid}.")
    await wait_log(sup, e["decode"]["id"], f"Aborted Remote Request ID {engine_rid}.")
    assert time.monotonic() - t < 1
    assert f"Remote prefill of request {engine_rid} done." not in log_of(sup, e["decode"]["id"])


async def test_migration_on_worker_failure_disaggregated(
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
