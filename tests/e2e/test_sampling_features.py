"""Logprobs, several choices, echo and usage in every chunk, through the real daemon and
simulated engines, across a seam: an engine SIGKILLed mid-answer (its token-count fault), or
one choice's stream stalled. What the client sees must equal an unbroken run's: the same
logprob entries (a completion's ``text_offset`` going on from where the text stood), every
choice complete with one finish each, the prompt echoed once, counts that include the tokens
from before the seam. The simulated model's logprobs are a pure function of the sequence,
so the unbroken run's values are checked against the model too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, SupervisorProcess, sim_slot, start_supervisor
from supervisor.testing.simtokenizer import (
    SequenceState,
    SimTokenizer,
    TextStream,
    generate,
    token_logprobs,
)
from supervisor.upstream import iter_sse_data

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
TOK = SimTokenizer()
PROMPT = "the river and the stone"
MESSAGES = [{"role": "user", "content": "Tell me of the harbor."}]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SupervisorProcess]:
    """One daemon for the module: a vLLM slot of simulated engines (one shadow). A stalled
    stream is given up after half a second and may go back to the same engine."""
    sup = await start_supervisor(
        tmp_path_factory.mktemp("sampling"),
        [sim_slot("s", sim_args=FAST_SIM_ARGS)],
        health={"stall_timeout": 0.5},
        frontend={"migration_wait": 5.0},
    )
    try:
        yield sup
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def active_engine(http: aiohttp.ClientSession, sup: SupervisorProcess) -> dict[str, Any]:
    """The slot's active engine once it serves with its shadow standing by again."""
    with anyio.fail_after(30):
        while True:
            async with http.get(sup.admin_url + "/status") as r:
                st = await r.json()
            s = st["slots"][0]
            if s["active"] and s["phase"] == "serving" and s["shadows_asleep"] == 1:
                return next(e for e in st["engines"] if e["id"] == s["active"])  # type: ignore[no-any-return]
            await anyio.sleep(0.05)


async def fault(
    http: aiohttp.ClientSession, sup: SupervisorProcess, name: str, tokens: int
) -> None:
    engine = await active_engine(http, sup)
    async with http.post(engine["url"] + "/sim/faults", json={name: tokens}) as r:
        assert r.status == 200, await r.text()


def _body(kind: str, stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim-model", "temperature": 0, "stream": stream}
    if kind == "chat":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = PROMPT
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return {**body, **extra}


async def ask(
    http: aiohttp.ClientSession, sup: SupervisorProcess, kind: str, body: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """What the client saw, per choice index: text, logprob entries (chat's as they are,
    a completion's as (token, logprob, alternatives, offset) rows), finish reasons, the
    chunks' usage, failover reports; under -1, the request's final usage."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    out: dict[int, dict[str, Any]] = {}

    def choice(i: int) -> dict[str, Any]:
        return out.setdefault(
            i, {"text": "", "logprobs": [], "finishes": [], "usage": [], "failover": []}
        )

    def take_logprobs(into: dict[str, Any], lp: dict[str, Any] | None) -> None:
        if lp is None:
            return
        if kind == "chat":
            into["logprobs"] += lp["content"]
        else:
            columns = (lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"])
            into["logprobs"] += [list(row) for row in zip(*columns, strict=True)]

    async with http.post(sup.frontend_url + path, json=body) as r:
        assert r.status == 200, await r.text()
        if not body.get("stream"):
            obj = await r.json()
            for ch in obj["choices"]:
                c = choice(ch["index"])
                c["text"] = ch["message"]["content"] if kind == "chat" else ch["text"]
                take_logprobs(c, ch["logprobs"])
                c["finishes"].append(ch["finish_reason"])
            out[-1] = {"usage": obj["usage"], "failover": obj.get("failover")}
            return out
        async for data in iter_sse_data(r):
            obj = json.loads(data)
            assert "error" not in obj, obj
            if not obj["choices"]:
                out[-1] = {"usage": obj["usage"]}
                continue
            for ch in obj["choices"]:
                c = choice(ch["index"])
                c["text"] += (ch["delta"].get("content") if kind == "chat" else ch["text"]) or ""
                take_logprobs(c, ch["logprobs"])
                if ch["finish_reason"]:
                    c["finishes"].append(ch["finish_reason"])
                if "usage" in obj:
                    c["usage"].append(obj["usage"])
                if "failover" in obj:
                    c["failover"].append(obj["failover"])
    return out


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("text", "logprobs", "finishes"):
        assert a[key] == b[key], f"{key}:\nunbroken: {a[key]!r}\nmigrated: {b[key]!r}"


@pytest.mark.parametrize(
    ("kind", "stream"),
    [("completion", True), ("completion", False), ("chat", True), ("chat", False)],
)
async def test_logprobs_and_usage_splice_exactly_across_a_seam(
    node: SupervisorProcess, http: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    # 24 tokens: more than a whole upstream answer may hold, so the seam falls mid-answer
    # whether or not the client streams.
    lp: dict[str, Any] = (
        {"logprobs": True, "top_logprobs": 2} if kind == "chat" else {"logprobs": 2}
    )
    body = _body(kind, stream, max_tokens=24, **lp)
    unbroken = await ask(http, node, kind, body)
    await fault(http, node, "kill_after_tokens", 8)
    migrated = await ask(http, node, kind, body)
    same_answer(unbroken[0], migrated[0])
    assert migrated[-1]["usage"] == unbroken[-1]["usage"]
    assert unbroken[-1]["usage"]["completion_tokens"] == 24
    assert len(migrated[0]["logprobs"]) == 24
    if stream:
        assert migrated[0]["failover"] and migrated[0]["failover"][0]["migrations"] == 1
        # usage in every chunk: the prompt as the client sent it, the tokens so far
        # (those of both engines), as vLLM counts them.
        prompt = unbroken[-1]["usage"]["prompt_tokens"]
        counts = [u["completion_tokens"] for u in migrated[0]["usage"]]
        assert {u["prompt_tokens"] for u in migrated[0]["usage"]} == {prompt}
        assert counts == sorted(counts) and counts[-1] == 24, counts
    else:
        assert migrated[-1]["failover"]["migrations"] == 1
    if kind == "completion":
        # The values are the simulated model's, and offsets count the text so far.
        prompt_ids = TOK.encode(PROMPT)
        ids = generate(prompt_ids, 24)
        state, texts = SequenceState(prompt_ids), TextStream(TOK, prompt_ids)
        offset = 0
        for tid, (token, logprob, top, text_offset) in zip(
            ids, unbroken[0]["logprobs"], strict=True
        ):
            assert logprob == token_logprobs(state.context, tid, 2)[0][1]
            assert token == texts.step(tid) and text_offset == offset and len(top) == 2
            state.append(tid)
            offset += len(token)


async def test_n_choices_migrate_each_on_its_own(tmp_path: Path) -> None:
    # Two engines of the model; on one, the first stream to reach 4 tokens stalls. The
    # choice it belongs to, and only that one, resumes on the other engine from its own
    # tokens; the other two go on undisturbed.
    slots = [sim_slot(name, shadows=0, gpus=[gpu]) for name, gpu in (("a", "0"), ("b", "1"))]
    sup = await start_supervisor(tmp_path, slots, health={"stall_timeout": 0.5})
    try:
        async with aiohttp.ClientSession() as http:
            with anyio.fail_after(30):
                while True:
                    async with http.get(sup.admin_url + "/status") as r:
                        st = await r.json()
                    if all(s["phase"] == "serving" for s in st["slots"]):
                        break
                    await anyio.sleep(0.05)
            engine = next(e for e in st["engines"] if e["id"] == st["slots"][0]["active"])
            body = _body("completion", True, max_tokens=12, logprobs=1)
            single = (await ask(http, sup, "completion", body))[0]
            async with http.post(
                engine["url"] + "/sim/faults", json={"stall_one_request_after": 4}
            ) as r:
                assert r.status == 200
            got = await ask(http, sup, "completion", {**body, "n": 3})
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]
    assert sorted(i for i in got if i >= 0) == [0, 1, 2]
    for i in range(3):
        same_answer(single, got[i])
        assert got[i]["finishes"] == ["length"]
        assert got[i]["usage"][-1]["completion_tokens"] == 12  # each choice's own count
    assert sorted(bool(got[i]["failover"]) for i in range(3)) == [False, False, True]
    assert got[-1]["usage"]["completion_tokens"] == 36
    assert got[-1]["usage"]["prompt_tokens"] == len(TOK.encode(PROMPT))  # once


async def test_n_choices_through_a_sigkill_whole_and_seeded(
    node: SupervisorProcess, http: aiohttp.ClientSession
) -> None:
    # A whole chat answer of three choices through a SIGKILL: every choice complete.
    body = _body("chat", False, max_tokens=24)
    single = (await ask(http, node, "chat", body))[0]
    await fault(http, node, "kill_after_tokens", 30)
    got = await ask(http, node, "chat", {**body, "n": 3})
    for i in range(3):
        same_answer(single, got[i])
    assert got[-1]["usage"]["completion_tokens"] == 72
    assert got[-1]["failover"]["migrations"] >= 1
    # Sampled with a seed, choice i is the sample of seed + i (vLLM seeds its choices so).
    seeded = _body("chat", False, max_tokens=8, temperature=0.9, seed=11)
    many = await ask(http, node, "chat", {**seeded, "n": 3})
    for i in range(3):
        alone = await ask(http, node, "chat", {**seeded, "seed": 11 + i})
        same_answer(alone[0], many[i])
    assert len({many[i]["text"] for i in range(3)}) == 3


@pytest.mark.parametrize(
    ("kind", "stream", "logprobs"),
    [("completion", True, True), ("completion", False, False), ("chat", True, False)],
)
async def test_an_echo_is_not_repeated_by_a_continuation(
    node: SupervisorProcess, http: aiohttp.ClientSession, kind: str, stream: bool, logprobs: bool
) -> None:
    extra: dict[str, Any] = {"echo": True, "max_tokens": 24}
    if logprobs:
        extra["logprobs"] = 1
    if kind == "chat":  # vLLM echoes the last message when its role is the answer's
        extra["messages"] = [*MESSAGES, {"role": "assistant", "content": "The harbor"}]
        extra["add_generation_prompt"] = False
        extra["continue_final_message"] = True
    body = _body(kind, stream, **extra)
    unbroken = await ask(http, node, kind, body)
    await fault(http, node, "kill_after_tokens", 8)
    migrated = await ask(http, node, kind, body)
    same_answer(unbroken[0], migrated[0])
    echoed = "The harbor" if kind == "chat" else PROMPT
    assert migrated[0]["text"].startswith(echoed)
    assert migrated[0]["text"].count(echoed) == 1
    if logprobs:  # the prompt's entries first (the first without a logprob), then 24
        prompt = TOK.encode(PROMPT)
        assert len(migrated[0]["logprobs"]) == len(prompt) + 24
        assert migrated[0]["logprobs"][0][1] is None
        rows = migrated[0]["logprobs"]
        assert [r[3] for r in rows] == [sum(len(x[0]) for x in rows[:i]) for i in range(len(rows))]


async def test_the_openai_client_reads_every_feature(
    node: SupervisorProcess, http: aiohttp.ClientSession
) -> None:
    # As a client would use them, with an engine SIGKILLed under the streamed answer.
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=node.frontend_url + "/v1", api_key="unused", max_retries=0)
    await fault(http, node, "kill_after_tokens", 10)

    def use_client() -> None:
        stream = client.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            n=2,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )
        text: dict[int, str] = {0: "", 1: ""}
        entries: dict[int, list[Any]] = {0: [], 1: []}
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                text[ch.index] += ch.delta.content or ""
                if ch.logprobs and ch.logprobs.content:
                    entries[ch.index] += ch.logprobs.content
        assert text[0] == text[1] and len(entries[0]) == len(entries[1]) == 20
        bad = [
            e for e in entries[0] if len(e.top_logprobs) != 3 or e.top_logprobs[0].token != e.token
        ]
        assert not bad, bad
        assert usage is not None and usage.completion_tokens == 40
        whole = client.completions.create(
            model="sim-model",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            logprobs=2,
            echo=True,
            extra_body={"prompt_logprobs": 1},
        )
        choice = whole.choices[0]
        assert choice.text.startswith(PROMPT) and choice.text.count(PROMPT) == 1
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert len(choice.logprobs.tokens) == len(TOK.encode(PROMPT)) + 6
        extra = choice.model_extra or {}
        assert len(extra["prompt_logprobs"]) == len(TOK.encode(PROMPT)), extra
        chat = client.chat.completions.create(
            model="sim-model", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True
        )
        content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 4 and content[0].top_logprobs == []

    await anyio.to_thread.run_sync(use_client)
