"""The simulated engines as real processes: dialect shapes, sleep/wake, faults, bad input."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.backends import EngineEndpoint, load_backend
from supervisor.model import EngineSpec, Readiness
from supervisor.testing.cluster import EngineProcess, free_port, launch, stop
from supervisor.testing.gpuledger import GIB, GpuLedger, process_start_time
from supervisor.upstream import iter_sse_data

pytestmark = pytest.mark.anyio

Sim = Callable[..., AbstractAsyncContextManager[tuple[EngineProcess, str]]]


@pytest.fixture
def sim(tmp_path: Path, session: aiohttp.ClientSession) -> Sim:
    """Start a simulated engine the way its plugin launches the real one."""

    @asynccontextmanager
    async def start(
        dialect: str,
        *extra: str,
        role: str = "active",
        gpu: str = "0",
        wait: bool = True,
    ) -> AsyncIterator[tuple[EngineProcess, str]]:
        backend = load_backend(dialect)
        spec = EngineSpec(
            f"{dialect}-{free_port()}",
            "sim-model",
            free_port(),
            role=role,
            gpus=(gpu,),
            extra_args=tuple(extra),
        )  # type: ignore[arg-type]
        proc = launch(backend, spec, tmp_path)
        try:
            if wait:
                ep = EngineEndpoint(spec.url, session)
                deadline = time.monotonic() + 20
                while await backend.health(ep) is not Readiness.READY:
                    assert proc.alive(), proc.log_text()
                    assert time.monotonic() < deadline
                    await anyio.sleep(0.02)
            yield proc, spec.url
        finally:
            await anyio.to_thread.run_sync(stop, proc)

    return start


async def post(
    session: aiohttp.ClientSession, url: str, body: Any = None, *, raw: bytes | None = None
) -> tuple[int, Any]:
    kw: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
    async with session.post(url, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text) if text else None
        except ValueError:
            return r.status, text


async def sse(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return [json.loads(d) async for d in iter_sse_data(r)]


# -- vLLM -------------------------------------------------------------------------------
async def test_vllm_stream_shape_and_token_ids(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("vllm") as (_, url):
        chunks = await sse(
            session,
            url + "/v1/completions",
            {
                "model": "sim-model",
                "prompt": "the river",
                "max_tokens": 5,
                "stream": True,
                "return_token_ids": True,
                "stream_options": {"include_usage": True},
                "temperature": 0,
                "request_id": "abc",
            },
        )
    content, usage = chunks[:-1], chunks[-1]
    assert len(content) == 5
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-abc" for c in chunks)
    assert content[0]["choices"][0]["prompt_token_ids"]
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_vllm_chat_stream_starts_with_role(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("vllm") as (_, url):
        chunks = await sse(
            session,
            url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_vllm_sleep_refuses_inference_and_wake_restores(
    sim: Sim, session: aiohttp.ClientSession, own_gpu_ledger: Path
) -> None:
    ledger = GpuLedger(own_gpu_ledger)
    async with sim("vllm", role="shadow") as (_, url):
        assert ledger.usage()["0"].used == 64 * GIB
        assert (await post(session, url + "/sleep?level=1"))[0] == 200
        async with session.get(url + "/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": True}
        assert ledger.usage()["0"].used == 16 * GIB  # level 1: KV freed, weights kept
        status, body = await post(session, url + "/v1/completions", {"prompt": "x"})
        assert status == 503 and "sleeping" in body["error"]["message"]
        assert (await post(session, url + "/wake_up?tags=weights"))[0] == 200
        assert (await post(session, url + "/wake_up"))[0] == 200
        async with session.get(url + "/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": False}
        assert (await post(session, url + "/v1/completions", {"prompt": "x"}))[0] == 200
        assert (await post(session, url + "/sleep?level=2"))[0] == 200
        assert ledger.usage()["0"].used == 0  # level 2: everything freed


async def test_vllm_sleep_routes_need_dev_mode_and_the_flag(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("vllm") as (_, url):  # active role: no --enable-sleep-mode, no dev mode
        status, body = await post(session, url + "/sleep?level=1")
        assert status == 404 and body == {"detail": "Not Found"}
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    try:
        async with sim("vllm") as (_, url):
            status, body = await post(session, url + "/sleep?level=1")
            assert status == 400 and "--enable-sleep-mode" in body["error"]["message"]
    finally:
        del os.environ["VLLM_SERVER_DEV_MODE"]


async def test_wake_into_occupied_gpu_fails_like_cuda_oom(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("vllm", role="shadow") as (_, shadow):
        await post(session, shadow + "/sleep?level=1")  # 16 GiB left held
        async with sim("vllm") as (_, _active):  # 64 GiB: GPU 0 is now full (80)
            status, body = await post(session, shadow + "/wake_up")
            assert status == 500 and "CUDA out of memory" in body["error"]["message"]
            async with session.get(shadow + "/is_sleeping") as r:
                assert (await r.json())["is_sleeping"] is True


async def test_loading_beyond_capacity_exits_with_oom(sim: Sim) -> None:
    async with sim("vllm") as _, sim("vllm", wait=False) as (proc, _):
        code = await anyio.to_thread.run_sync(proc.proc.wait)
        assert code == 1
        assert "CUDA out of memory" in proc.log_text()


async def test_sigkill_of_api_server_frees_memory_only_when_worker_is_gone(
    sim: Sim, session: aiohttp.ClientSession, own_gpu_ledger: Path
) -> None:
    ledger = GpuLedger(own_gpu_ledger)
    async with sim("vllm", "--sim-release-delay", "0.5") as (proc, url):
        async with session.get(url + "/sim/state") as r:
            worker = (await r.json())["worker_pid"]
        os.kill(proc.pid, signal.SIGKILL)  # the leader only, as a crash would
        await anyio.to_thread.run_sync(proc.proc.wait)
        assert ledger.usage()["0"].used == 64 * GIB  # the worker still holds it
        with anyio.fail_after(5):
            while ledger.usage()["0"].used:
                await anyio.sleep(0.02)
        assert process_start_time(worker) is None  # gone (or a zombie awaiting its reaper)


# -- SGLang -----------------------------------------------------------------------------
async def test_sglang_generate_incremental_and_stream_interval(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    body = {
        "text": "the river",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "stream": True,
        "rid": "r1",
    }
    # The plugin launches SGLang with --incremental-streaming-output: each event is new.
    async with sim("sglang") as (_, url):
        inc = await sse(session, url + "/generate", body)
        whole = await post(session, url + "/generate", {**body, "stream": False})
    async with sim("sglang", "--stream-interval", "3") as (_, url):
        batched = await sse(session, url + "/generate", body)
    assert [len(e["output_ids"]) for e in inc] == [1, 1, 1, 1]
    assert [len(e["output_ids"]) for e in batched] == [3, 1]  # the last event at the finish
    assert [e["meta_info"]["completion_tokens"] for e in batched] == [3, 4]
    assert whole[1]["text"] == "".join(e["text"] for e in inc)
    assert inc[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert inc[-1]["meta_info"]["id"] == "r1"


async def test_sglang_release_resume_rules(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("sglang", role="shadow") as (_, url):
        status, _ = await post(session, url + "/resume_memory_occupation", {"tags": ["weights"]})
        assert status == 400  # resuming what was not released is an error
        assert (await post(session, url + "/release_memory_occupation", {"tags": ["kv_cache"]}))[
            0
        ] == 200
        status, _ = await post(session, url + "/generate", {"text": "x"})
        assert status == 503
        assert (await post(session, url + "/resume_memory_occupation", {"tags": ["kv_cache"]}))[
            0
        ] == 200
        assert (await post(session, url + "/generate", {"text": "x"}))[0] == 200
    async with sim("sglang") as (_, url):  # no --enable-memory-saver
        status, _ = await post(session, url + "/release_memory_occupation", {})
        assert status == 400


async def test_sglang_abort_request_ends_the_stream(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("sglang") as (proc, url):
        events = []
        async with session.post(
            url + "/generate",
            json={
                "text": "x",
                "sampling_params": {"max_new_tokens": 3000},
                "stream": True,
                "rid": "to-abort",
            },
        ) as r:
            assert r.status == 200, await r.text()
            async for data in iter_sse_data(r):
                events.append(json.loads(data))
                if len(events) == 3:
                    assert (await post(session, url + "/abort_request", {"rid": "to-abort"}))[
                        0
                    ] == 200
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert "Aborted request to-abort." in proc.log_text()


async def test_sglang_health_is_503_while_loading(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("sglang", "--sim-load-time", "1.5", wait=False) as (_, url):
        with anyio.fail_after(5):
            while True:
                try:
                    async with session.get(url + "/health") as r:
                        status = r.status
                        break
                except aiohttp.ClientConnectionError:
                    await anyio.sleep(0.02)
        assert status == 503
        with anyio.fail_after(5):
            while status != 200:
                async with session.get(url + "/health") as r:
                    status = r.status
                await anyio.sleep(0.02)


async def test_sglang_metrics_only_with_enable_metrics(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("sglang") as (_, url), session.get(url + "/metrics") as r:
        assert r.status == 404
    async with sim("sglang", "--enable-metrics") as (_, url):
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"):
            assert name in text


# -- TRT-LLM ----------------------------------------------------------------------------
async def test_trtllm_routes(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("trtllm") as (_, url):
        async with session.get(url + "/metrics") as r:
            stats = await r.json()
        assert isinstance(stats, list) and "numActiveRequests" in stats[-1]
        async with session.get(url + "/version") as r:
            assert "version" in await r.json()
        chunks = await sse(
            session,
            url + "/v1/completions",
            {"prompt": "x", "max_tokens": 2, "stream": True},
        )
        assert "token_ids" not in chunks[0]["choices"][0]  # trtllm-serve returns no ids
        # Its request models forbid unknown fields: vLLM's extensions get a 400.
        for path, extra in (
            ("/v1/completions", {"prompt": "x", "return_token_ids": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "continue_final_message": True}),
            ("/v1/completions", {"prompt": "x", "stream": True,
                                 "stream_options": {"include_usage": True, "bogus": 1}}),
        ):  # fmt: skip
            status, err = await post(session, url + path, extra)
            assert status == 400 and "Extra inputs are not permitted" in err["message"], err
        status, _ = await post(session, url + "/sleep?level=1")
        assert status == 404


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["vllm", "sglang", "trtllm"])
async def test_bad_input_gets_the_engines_own_4xx(
    dialect: str, sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim(dialect) as (proc, url):
        cases: list[tuple[str, Any, bytes | None, int]] = [
            ("/v1/completions", None, b"{not json", 400),
            ("/v1/completions", None, b"[1, 2]", 400),
            ("/v1/completions", {"prompt": 5}, None, 400),
            ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, None, 400),
            ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, None, 400),
            ("/v1/completions", {"prompt": [10**9]}, None, 400),
            ("/v1/completions", {"prompt": "x", "model": "other"}, None, 404),
            ("/v1/chat/completions", {"messages": "hi"}, None, 400),
            ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, None, 400),
            ("/v1/completions", {"prompt": "x", "stream": "yes"}, None, 400),
        ]
        for path, body, raw, want in cases:
            status, answer = await post(session, url + path, body, raw=raw)
            assert status == want, (path, body, raw, answer)
            err = answer.get("error", answer)
            assert "message" in err, answer
        status, answer = await post(session, url + "/no/such/route", {})
        assert (status, answer) == (404, {"detail": "Not Found"})
        async with session.get(url + "/v1/completions") as r:
            assert r.status == 405
        status, _ = await post(session, url + "/v1/completions", raw=b"x" * (40 * 2**20))
        assert status == 413
        if dialect == "sglang":
            status, answer = await post(session, url + "/generate", raw=b"{oops")
            assert status == 422 and "detail" in answer
            status, answer = await post(session, url + "/generate", {"text": 3})
            assert status == 422
            status, answer = await post(session, url + "/generate", {})
            assert status == 400 and "input_ids" in answer["error"]["message"]
        assert proc.alive()
        status, _ = await post(session, url + "/v1/completions", {"prompt": "x"})
        assert status == 200  # still serving


# -- faults -----------------------------------------------------------------------------
async def test_fault_kill_after_tokens(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("vllm", "--sim-kill-after-tokens", "7") as (proc, url):
        with pytest.raises((aiohttp.ClientError, Exception)):
            await sse(
                session, url + "/v1/completions", {"prompt": "x", "max_tokens": 50, "stream": True}
            )
        assert await anyio.to_thread.run_sync(proc.proc.wait) == -signal.SIGKILL


async def test_fault_exit_after_tokens(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("vllm", "--sim-exit-after-tokens", "3") as (proc, url):
        with pytest.raises(Exception):  # noqa: B017 - the stream breaks however it breaks
            await sse(
                session, url + "/v1/completions", {"prompt": "x", "max_tokens": 50, "stream": True}
            )
        assert await anyio.to_thread.run_sync(proc.proc.wait) == 1


async def test_fault_hang_keeps_health_green(sim: Sim, session: aiohttp.ClientSession) -> None:
    async with sim("sglang") as (proc, url):
        await post(session, url + "/sim/faults", {"hang_after_tokens": 2})
        got = []
        with anyio.move_on_after(1.0):
            async with session.post(
                url + "/generate",
                json={"text": "x", "sampling_params": {"max_new_tokens": 50}, "stream": True},
            ) as r:
                async for d in iter_sse_data(r):
                    got.append(d)
        assert len(got) == 2
        async with session.get(url + "/health") as r:
            assert r.status == 200  # a wedged engine still says it is healthy
        with pytest.raises(TimeoutError):
            async with session.get(
                url + "/health_generate", timeout=aiohttp.ClientTimeout(total=0.5)
            ) as r:
                pass
        assert proc.alive()


async def test_fault_malformed_sse_and_500_and_health(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("vllm") as (_, url):
        await post(session, url + "/sim/faults", {"malformed_after_tokens": 2})
        async with session.post(
            url + "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True}
        ) as r:
            raw = await r.read()
        assert b"[DONE]" not in raw and b'"tex\n' in raw
        await post(
            session,
            url + "/sim/faults",
            {"malformed_after_tokens": None, "error_500": True, "fail_health": True},
        )
        assert (await post(session, url + "/v1/completions", {"prompt": "x"}))[0] == 500
        async with session.get(url + "/health") as r:
            assert r.status == 503
        status, body = await post(session, url + "/sim/faults", {"explode": True})
        assert status == 400 and "unknown fault" in body["error"]["message"]
        status, body = await post(session, url + "/sim/faults", {"slow_health": "soon"})
        assert status == 400 and "seconds" in body["error"]["message"]
        await post(session, url + "/sim/faults", {"fail_health": False, "slow_health": 0.3})
        t0 = time.monotonic()
        async with session.get(url + "/health") as r:
            assert r.status == 200 and time.monotonic() - t0 >= 0.3


async def test_sigterm_drains_in_flight_then_exits_zero(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("vllm") as (proc, url):
        async with anyio.create_task_group() as tg:
            result: list[Any] = []

            async def client() -> None:
                result.extend(
                    await sse(
                        session,
                        url + "/v1/completions",
                        {"prompt": "x", "max_tokens": 100, "stream": True},
                    )
                )

            tg.start_soon(client)
            await anyio.sleep(0.05)
            os.kill(proc.pid, signal.SIGTERM)
        assert len(result) == 100
        assert await anyio.to_thread.run_sync(proc.proc.wait) == 0


async def test_client_disconnect_aborts_non_streaming_request(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    async with sim("vllm") as (proc, url):
        with anyio.move_on_after(0.3):
            await post(
                session,
                url + "/v1/completions",
                {"prompt": "x", "max_tokens": 3000, "request_id": "gone"},
            )
        with anyio.fail_after(1.0):
            while "Aborted request cmpl-gone." not in proc.log_text():
                await anyio.sleep(0.02)
        async with session.get(url + "/metrics") as r:
            assert (
                'vllm:request_success_total{finished_reason="abort",model_name="sim-model"} 1.0'
                in await r.text()
            )


def test_cli_sim_engine_help_and_bad_flags() -> None:
    run = [sys.executable, "-m", "supervisor", "sim-engine"]
    out = subprocess.run([*run, "--dialect", "vllm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--enable-sleep-mode" in out.stdout
    out = subprocess.run([*run, "--dialect", "sglang", "--help"], capture_output=True, text=True)
    assert "--enable-memory-saver" in out.stdout and "--model-path" in out.stdout
    out = subprocess.run([*run, "--dialect", "vllm", "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 2 and "--dialect is required" in out.stderr


# -- as harsh as the real engines ---------------------------------------------------------
async def test_vllm_holds_text_back_while_a_stop_string_may_complete(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 12, "temperature": 0,
            "stream": True, "return_token_ids": True}  # fmt: skip
    async with sim("vllm") as (_, url):
        plain = await sse(session, url + "/v1/completions", body)
        text = "".join(c["choices"][0]["text"] for c in plain)
        stop = "zz never matched"  # held back: up to len(stop) - 1 characters
        held = await sse(session, url + "/v1/completions", {**body, "stop": [stop]})
    # Every chunk still carries its token id, but the text lags until the finish.
    assert [c["choices"][0]["token_ids"] for c in held] == [
        c["choices"][0]["token_ids"] for c in plain
    ]
    seen = ""
    for c in held[:-1]:
        seen += c["choices"][0]["text"]
        assert len(seen) <= max(len(text) - (len(stop) - 1), 0)
    assert seen + held[-1]["choices"][0]["text"] == text


async def test_vllm_sleep_keep_pauses_requests_until_the_wake(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    try:
        async with sim("vllm", "--sim-itl", "0.01", role="shadow") as (_, url):
            body = {"model": "sim-model", "prompt": "x", "max_tokens": 40, "stream": True}
            got: list[Any] = []

            async def client() -> None:
                got.extend(await sse(session, url + "/v1/completions", body))

            async with anyio.create_task_group() as tg:
                tg.start_soon(client)
                await anyio.sleep(0.1)
                assert (await post(session, url + "/sleep?level=1&mode=keep"))[0] == 200
                n = len(got)
                await anyio.sleep(0.3)
                assert len(got) == n  # paused: nothing while asleep
                assert (await post(session, url + "/wake_up"))[0] == 200
    finally:
        del os.environ["VLLM_SERVER_DEV_MODE"]
    assert got[-1]["choices"][0]["finish_reason"] == "length"  # then it went on to its end


async def test_sglang_cumulative_text_shrinks_at_a_stop_string(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # Without --incremental-streaming-output (SGLang's default; the plugin always sets it),
    # the stop string's beginning shows in the growing text, and the finish cuts it off.
    port = free_port()
    cmd = [sys.executable, "-m", "supervisor", "sim-engine", "--dialect", "sglang",
           "--port", str(port), "--sim-load-time", "0.05"]  # fmt: skip
    async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL) as proc:
        try:
            url = f"http://127.0.0.1:{port}"
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await post(session, url + "/generate", {"text": "x"}))[0] == 200:
                            break
                    except aiohttp.ClientConnectionError:
                        pass
                    await anyio.sleep(0.05)
            body = {"text": "the river", "sampling_params": {"max_new_tokens": 30,
                    "temperature": 0}, "stream": True}  # fmt: skip
            plain = (await sse(session, url + "/generate", body))[-1]["text"]
            words = plain.split(" ")
            k = next(i for i in range(3, len(words) - 1) if (words[i] + words[i + 1]).isascii())
            stop = " " + words[k] + " " + words[k + 1]  # two generated words
            body["sampling_params"]["stop"] = [stop]  # type: ignore[index]
            events = await sse(session, url + "/generate", body)
            texts = [e["text"] for e in events]
            assert texts[-1] == plain[: plain.index(stop)]
            assert any(stop.split(" ")[1] in t for t in texts[:-1])  # shown, then cut
            assert len(texts[-1]) < len(texts[-2])
        finally:
            proc.terminate()
            await proc.wait()


async def test_engine_core_death_is_reported_in_band(
    sim: Sim, session: aiohttp.ClientSession
) -> None:
    body = {"model": "sim-model", "prompt": "x", "max_tokens": 30, "stream": True}
    async with sim("vllm", "--sim-core-dead-after-tokens", "5") as (_, url):
        events = await sse(session, url + "/v1/completions", body)  # ends with [DONE]
        assert "EngineCore" in events[-1]["error"]["message"]
        async with session.get(url + "/health") as r:
            assert r.status == 503
        status, err = await post(session, url + "/v1/completions", {**body, "stream": False})
        assert status == 500 and "EngineCore" in err["error"]["message"]


async def test_vllm_embeddings_and_responses(sim: Sim, session: aiohttp.ClientSession) -> None:
    """Embeddings are unit vectors of the token ids alone (float or base64 alike), as vLLM
    shapes them; a Responses answer streams vLLM's typed events, numbered, ending with the
    same response the whole answer gives; SGLang's dialect serves neither."""
    async with sim("vllm") as (_, url):
        ask = {"model": "sim-model", "input": ["the river", [5, 6, 7]]}
        async with session.post(url + "/v1/embeddings", json=ask) as r:
            assert r.status == 200
            got = await r.json()
        assert got["object"] == "list" and got["id"].startswith("embd-")
        assert [d["object"] for d in got["data"]] == ["embedding", "embedding"]
        vec = got["data"][0]["embedding"]
        assert abs(sum(v * v for v in vec) - 1.0) < 1e-9
        assert got["usage"]["completion_tokens"] == 0 and got["usage"]["prompt_tokens"] == 5
        async with session.post(
            url + "/v1/embeddings", json={**ask, "encoding_format": "base64"}
        ) as r:
            packed = base64.b64decode((await r.json())["data"][0]["embedding"])
        assert list(struct.unpack(f"<{len(vec)}f", packed)) == [
            struct.unpack("<f", struct.pack("<f", v))[0] for v in vec
        ]
        async with session.post(url + "/v1/embeddings", json={**ask, "dimensions": 8}) as r:
            assert r.status == 400 and "matryoshka" in (await r.json())["error"]["message"]
        body = {"model": "sim-model", "input": "hi", "max_output_tokens": 4, "temperature": 0}
        async with session.post(url + "/v1/responses", json=body) as r:
            whole = await r.json()
        assert whole["object"] == "response" and whole["status"] == "incomplete"
        assert whole["usage"]["output_tokens"] == 4
        async with session.post(url + "/v1/responses", json={**body, "stream": True}) as r:
            raw = await r.read()
        blocks = [b for b in raw.decode().split("\n\n") if b]
        kinds = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
        events = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
        assert [e["type"] for e in events] == kinds
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        final = events[-1]["response"]
        assert final["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    async with sim("sglang") as (_, url), session.post(url + "/v1/embeddings", json=ask) as r:
        assert r.status == 404
