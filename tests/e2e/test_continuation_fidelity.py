"""Migration stays correct where real engines are harsh: a seam inside a character, a stop
string across the seam, several tokens per event, engine-core death, tool calls and
reasoning, parameters a continuation cannot honour, engines that refuse unknown fields, and
clients that reuse request ids. Each engine breaks exactly where the test wants it, by the
simulator's token-count faults; the expected answer comes from the simulated model itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, SupervisorProcess, sim_slot, start_supervisor
from supervisor.testing.simtokenizer import (
    ChatMessage,
    SimTokenizer,
    TextStream,
    apply_chat_template,
    generate,
)
from supervisor.upstream import iter_sse_data

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
TOK = SimTokenizer()
Node = Callable[..., Awaitable[SupervisorProcess]]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """Starts one supervisor with one slot of the given dialect; stopped at the end."""
    started: list[SupervisorProcess] = []

    async def start(dialect: str, *sim_args: str, **slot: Any) -> SupervisorProcess:
        spec = sim_slot("s", dialect=dialect, sim_args=(*FAST_SIM_ARGS, *sim_args), **slot)
        sup = await start_supervisor(tmp_path / f"n{len(started)}", [spec])
        started.append(sup)
        return sup

    yield start
    for sup in started:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]


async def active_engine(http: aiohttp.ClientSession, sup: SupervisorProcess) -> dict[str, Any]:
    with anyio.fail_after(30):
        while True:
            async with http.get(sup.admin_url + "/status") as r:
                st = await r.json()
            s = st["slots"][0]
            if s["active"] and s["phase"] == "serving":
                return next(e for e in st["engines"] if e["id"] == s["active"])  # type: ignore[no-any-return]
            await anyio.sleep(0.05)


async def break_after(
    http: aiohttp.ClientSession, sup: SupervisorProcess, tokens: int, fault: str
) -> None:
    """The active engine fails while making its token number ``tokens`` + 1: the client
    has been sent (at most) the first ``tokens``."""
    engine = await active_engine(http, sup)
    async with http.post(engine["url"] + "/sim/faults", json={fault: tokens + 1}) as r:
        assert r.status == 200, await r.text()


async def ask(
    http: aiohttp.ClientSession, sup: SupervisorProcess, kind: str, body: dict[str, Any]
) -> dict[str, Any]:
    """One request; what the client saw: text, reasoning, tool-call arguments, finishes,
    usage, the failover report and any in-band error."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    out: dict[str, Any] = {"text": "", "reasoning": "", "args": "", "finishes": [], "error": None}
    out["usage"] = out["failover"] = None
    async with http.post(sup.frontend_url + path, json=body) as r:
        assert r.status == 200, await r.text()
        out["headers"] = dict(r.headers)
        if not body.get("stream"):
            obj = await r.json()
            ch = obj["choices"][0]
            msg = ch.get("message") or {}
            out["text"] = (msg.get("content") if kind == "chat" else ch["text"]) or ""
            out["reasoning"] = msg.get("reasoning_content") or ""
            out["args"] = "".join(c["function"]["arguments"] for c in msg.get("tool_calls") or [])
            out["finishes"] = [ch["finish_reason"]]
            out["usage"], out["failover"] = obj["usage"], obj.get("failover")
            return out
        async for data in iter_sse_data(r):
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                continue
            out["usage"] = obj.get("usage") or out["usage"]
            out["failover"] = obj.get("failover") or out["failover"]
            for ch in obj["choices"]:
                if kind == "chat":
                    d = ch["delta"]
                    out["text"] += d.get("content") or ""
                    out["reasoning"] += d.get("reasoning_content") or ""
                    for call in d.get("tool_calls") or []:
                        out["args"] += call["function"].get("arguments") or ""
                else:
                    out["text"] += ch["text"]
                if ch["finish_reason"]:
                    out["finishes"].append(ch["finish_reason"])
    return out


def generated(prompt_ids: list[int], n: int) -> tuple[list[int], list[str]]:
    """The simulated model's greedy tokens for ``prompt_ids``, and each one's streamed text."""
    ids, texts = generate(prompt_ids, n), TextStream(TOK, prompt_ids)
    return ids, [texts.step(t) for t in ids]


def chat_ids(content: str) -> list[int]:
    return TOK.encode(apply_chat_template([ChatMessage("user", content)]))


# -- a seam inside a character -------------------------------------------------------------
@pytest.mark.parametrize(("kind", "stream"), [("completion", True), ("chat", True),
                                              ("completion", False)])  # fmt: skip
async def test_a_seam_inside_a_character_loses_and_repeats_nothing(
    node: Node, session: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    # The model spells multi-byte words out a byte per token; vLLM sends no text for a token
    # that leaves a character incomplete. Resumed from ids that end inside the character,
    # vLLM's detokenizer starts with the whole prompt's text (seen on real vLLM): the relay
    # counts such tokens as sent only with their text, so the seam is never there.
    sup = await node("vllm")
    for i in range(200):
        content = f"Tell me of the harbor {i}"
        prompt_ids = chat_ids(content) if kind == "chat" else TOK.encode(content)
        _, steps = generated(prompt_ids, 60)
        inside = [k for k, s in enumerate(steps[:40]) if s == "" and k >= 3]
        if inside:
            break
    seam = inside[0] + 1  # tokens 0..inside[0] made: the last one is half a character
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": 60, "temperature": 0}
    body.update(stream=stream, stream_options={"include_usage": True} if stream else None)
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = content
    body = {k: v for k, v in body.items() if v is not None}
    unbroken = await ask(session, sup, kind, body)
    assert unbroken["text"] == "".join(steps)
    await break_after(session, sup, seam, "kill_after_tokens")
    got = await ask(session, sup, kind, body)
    assert got["text"] == unbroken["text"]
    assert got["usage"]["completion_tokens"] == 60
    assert got["finishes"] == ["length"]
    assert got["failover"] == {"migrations": 1, "inexact": []}


# -- stop strings ----------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
async def test_a_stop_string_across_the_seam_still_ends_the_answer(
    node: Node, session: aiohttp.ClientSession, dialect: str
) -> None:
    # Engines hold text back while a stop string may be completing, and each engine sees
    # only its own output: a stop string whose first word came from the engine that died
    # used to be matched by neither, and the answer ran on to max_tokens.
    sup = await node(dialect)
    prompt = "the lantern over the harbor"
    ids, steps = generated(TOK.encode(prompt), 40)
    whole = [k for k, t in enumerate(ids) if TOK.byte_of(t) is None]
    text = "".join(steps)
    k = next(
        k
        for k in range(6, 30)
        if k in whole
        and k + 1 in whole
        and text.find(steps[k] + steps[k + 1]) == len("".join(steps[:k]))
    )
    stop = steps[k] + steps[k + 1]  # two words: the seam falls between them
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "stream": True, "stop": [stop, "never matched at all"]}  # fmt: skip
    await break_after(session, sup, k + 1, "kill_after_tokens")
    got = await ask(session, sup, "completion", body)
    assert got["text"] == text[: text.find(stop)]
    assert got["finishes"] == ["stop"]
    assert got["failover"]["migrations"] == 1
    # include_stop_str_in_output, unbroken: the stop string ends the answer, included.
    body["include_stop_str_in_output"] = True
    got = await ask(session, sup, "completion", body)
    assert got["text"] == text[: text.find(stop) + len(stop)] and got["finishes"] == ["stop"]


# -- several tokens per event --------------------------------------------------------------
async def test_tokens_are_counted_as_tokens_when_events_hold_several(
    node: Node, session: aiohttp.ClientSession
) -> None:
    # SGLang's --stream-interval 3: three tokens per event. Counted per event, usage said a
    # third of the truth, and after a migration the rest of the budget overshot.
    sup = await node("sglang", "--stream-interval", "3")
    for i in range(200):  # an answer with no multi-byte word: text continuation is exact
        content = f"Tell me of the river {i}"
        _, steps = generated(chat_ids(content), 30)
        if all(s for s in steps):
            break
    body = {"model": "sim-model", "messages": [{"role": "user", "content": content}],
            "max_tokens": 30, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    unbroken = await ask(session, sup, "chat", body)
    assert unbroken["usage"]["completion_tokens"] == 30
    assert unbroken["text"] == "".join(steps)
    await break_after(session, sup, 13, "kill_after_tokens")
    got = await ask(session, sup, "chat", body)
    assert got["text"] == unbroken["text"]
    assert got["usage"]["completion_tokens"] == 30
    assert got["failover"] == {"migrations": 1, "inexact": ["retokenized"]}


# -- engine-core death -----------------------------------------------------------------------
async def test_engine_core_death_mid_stream_migrates_and_fails_the_engine_over(
    node: Node, session: aiohttp.ClientSession
) -> None:
    # vLLM's API server outlives a dead engine core: the stream gets an error event and
    # [DONE], /health answers 503. The request resumes; the engine is failed over.
    sup = await node("vllm")
    body = {"model": "sim-model", "prompt": "the quiet signal", "max_tokens": 50,
            "temperature": 0, "stream": True}  # fmt: skip
    unbroken = await ask(session, sup, "completion", body)
    victim = await active_engine(session, sup)
    await break_after(session, sup, 20, "core_dead_after_tokens")
    got = await ask(session, sup, "completion", body)
    assert got["error"] is None and got["text"] == unbroken["text"]
    with anyio.fail_after(20):
        while (await active_engine(session, sup))["id"] == victim["id"]:
            await anyio.sleep(0.05)


# -- tool calls and reasoning ----------------------------------------------------------------
async def test_tool_calls_and_reasoning_reach_the_client(
    node: Node, session: aiohttp.ClientSession
) -> None:
    # The relay used to read only delta.content: tool calls and reasoning were dropped from
    # every answer, migrated or not.
    sup = await node(
        "vllm",
        extra_args=["--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice",
                    "--tool-call-parser", "hermes"],
    )  # fmt: skip
    ask_body = {"model": "sim-model", "messages": [{"role": "user", "content": "weather?"}],
                "max_tokens": 12, "temperature": 0}  # fmt: skip
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    for stream in (True, False):
        plain = await ask(session, sup, "chat", {**ask_body, "stream": stream})
        assert plain["reasoning"] and plain["text"] and plain["finishes"] == ["length"]
        called = await ask(session, sup, "chat", {**ask_body, "stream": stream, "tools": [tool]})
        assert called["reasoning"] == plain["reasoning"]
        args = json.loads(called["args"])  # whole JSON arguments, streamed in pieces or not
        assert args["text"] and called["text"] == ""
        assert called["finishes"] == ["tool_calls"]
    # A continuation cannot carry reasoning or a half-made tool call (the next engine's
    # parsers would start mid-answer): the request fails cleanly, it is not garbled.
    await break_after(session, sup, 8, "kill_after_tokens")
    broken = await ask(session, sup, "chat", {**ask_body, "stream": True, "tools": [tool]})
    assert broken["error"] is not None and "tool calls or reasoning" in broken["error"]["message"]


# -- what a continuation cannot honour -------------------------------------------------------
async def test_a_continuation_says_what_it_could_not_honour(
    node: Node, session: aiohttp.ClientSession
) -> None:
    sup = await node("vllm")
    body = {"model": "sim-model", "prompt": "the ember and the willow", "max_tokens": 40,
            "min_tokens": 35, "temperature": 0.8, "seed": 7, "presence_penalty": 0.5,
            "stream": True}  # fmt: skip
    await break_after(session, sup, 20, "kill_after_tokens")
    got = await ask(session, sup, "completion", body)
    # min_tokens counted what was sent (vLLM refuses min_tokens > max_tokens)...
    assert got["error"] is None and got["finishes"] == ["length"]
    # ...and the seeded sample and the penalty could not go on as one run: the client is told.
    assert got["failover"] == {"migrations": 1, "inexact": ["seed", "presence_penalty"]}
    await active_engine(session, sup)
    await break_after(session, sup, 20, "kill_after_tokens")
    got = await ask(session, sup, "completion", {**body, "stream": False})
    assert got["headers"]["X-Failover-Migrations"] == "1"
    assert got["headers"]["X-Failover-Inexact"] == "seed,presence_penalty"
    assert got["failover"] == {"migrations": 1, "inexact": ["seed", "presence_penalty"]}


# -- engines that refuse unknown fields --------------------------------------------------------
async def test_trtllm_resumes_completions_and_refuses_mid_answer_chat_cleanly(
    node: Node, session: aiohttp.ClientSession
) -> None:
    # trtllm-serve forbids unknown fields and has no continue_final_message: its chat
    # continuation used to get a 400 and the client an error without [DONE].
    sup = await node(
        "trtllm",
        suspend="awake",
        placement="pooled",
        gpus=["0"],
        shadow_gpus=[["1"]],
        shadow_extra_args=[],
    )
    body = {"model": "sim-model", "prompt": "the cobalt prism", "max_tokens": 30,
            "temperature": 0, "stream": True}  # fmt: skip
    unbroken = await ask(session, sup, "completion", body)
    await break_after(session, sup, 12, "kill_after_tokens")
    got = await ask(session, sup, "completion", body)
    assert got["text"] == unbroken["text"] and got["error"] is None
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 30, "temperature": 0, "stream": True}  # fmt: skip
    await active_engine(session, sup)
    await break_after(session, sup, 12, "kill_after_tokens")
    path = "/v1/chat/completions"
    async with session.post(sup.frontend_url + path, json=chat) as r:
        events = [json.loads(d) async for d in iter_sse_data(r)]  # returns only on [DONE]
    assert "continue_final_message" in events[-1]["error"]["message"]


# -- request ids ---------------------------------------------------------------------------------
async def test_clients_reusing_a_request_id_do_not_collide(
    node: Node, session: aiohttp.ClientSession
) -> None:
    # SGLang refuses a second request with an id in flight; the client's X-Request-Id used
    # to become the engine's id verbatim.
    sup = await node("sglang", "--sim-itl", "0.01")
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    results: list[dict[str, Any]] = []

    async def one() -> None:
        async with session.post(
            sup.frontend_url + "/v1/completions", json=body, headers={"X-Request-Id": "same"}
        ) as r:
            assert r.status == 200, await r.text()
            events = [json.loads(d) async for d in iter_sse_data(r)]
            results.append(events[-1])

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert [e["usage"]["completion_tokens"] for e in results] == [30, 30, 30]
