"""A short non-streaming request is asked of the engine whole (``Backend.whole_request``)
and its answer body decoded as one event: for every built-in backend, against its
simulated engine, that must say exactly what the streamed answer to the same request says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from plugins.sglang import SglangBackend
from plugins.trtllm import TrtllmBackend
from plugins.vllm import VllmBackend
from supervisor.backends import Backend, MalformedStream
from supervisor.frontend.wire import EnginePool, EngineProtocolError
from supervisor.model import ClientRequest, EngineSpec, Progress, UpstreamRequest
from supervisor.openai_shapes import OpenAIStreamDecoder
from supervisor.testing.cluster import free_port, running_engine
from supervisor.upstream import SseSplitter

pytestmark = pytest.mark.anyio


def client_request(kind: str) -> ClientRequest:
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": 9, "temperature": 0}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "Tell me of the river."}]
    else:
        body["prompt"] = "the lantern over the harbor"
    return ClientRequest(kind, body)  # type: ignore[arg-type]


async def answer(
    pool: EnginePool, url: str, backend: Backend, up: UpstreamRequest
) -> tuple[Progress, str | None, int | None]:
    """What the decoder makes of the engine's answer: progress, finish, prompt tokens."""
    conn = await pool.request(url, up.path, up.headers, orjson.dumps(up.body))
    assert conn.status == 200, await conn.read_all()
    decoder = backend.decoder(up)
    if up.whole:
        events = [await conn.read_whole(1 << 20)]
    else:
        sse = SseSplitter()
        events = []
        conn.set_sink(lambda b: events.extend(sse.feed(b)))
        await conn.ended()
        assert sse.done
    pool.release(conn)
    progress, finish, prompt = Progress(), None, None
    for data in events:
        piece = decoder.feed(data)
        if piece is None:
            continue
        progress.add(piece)
        finish = finish or piece.finish_reason
        prompt = piece.prompt_tokens if piece.prompt_tokens is not None else prompt
    return progress, finish, prompt


@pytest.mark.parametrize("backend_cls", [VllmBackend, SglangBackend, TrtllmBackend])
async def test_a_whole_answer_says_what_the_stream_says(
    backend_cls: type[Backend], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    backend = backend_cls()
    spec = EngineSpec("e0", "sim-model", free_port())
    pool = EnginePool()
    async with running_engine(backend, spec, tmp_path, session):
        try:
            for kind in ("completion", "chat"):
                req = client_request(kind)
                whole = backend.whole_request(req, f"w-{kind}")
                assert whole is not None and whole.whole and whole.body["stream"] is False
                assert "stream_options" not in whole.body
                streamed = backend.first_request(req, f"s-{kind}")
                got, finish, prompt = await answer(pool, spec.url, backend, whole)
                want, want_finish, want_prompt = await answer(pool, spec.url, backend, streamed)
                assert got.text == want.text and got.text, (kind, got.text, want.text)
                assert got.completion_tokens == want.completion_tokens == 9, kind
                assert got.token_ids == want.token_ids, kind
                assert finish == want_finish == "length", kind
                assert prompt == want_prompt, kind
        finally:
            pool.close()


def call(cid: str, name: str, args: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_a_whole_chat_message_keeps_its_tool_calls_in_order() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "the user wants two lookups",
                    "tool_calls": [call("a", "f", "1"), call("b", "g", "2")],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    piece = OpenAIStreamDecoder().feed(orjson.dumps(body))
    assert piece is not None
    progress = Progress()
    progress.add(piece)
    extras = progress.message_extras()
    assert [c["id"] for c in extras["tool_calls"]] == ["a", "b"]
    assert [c["function"]["arguments"] for c in extras["tool_calls"]] == ["1", "2"]
    assert extras["reasoning_content"] == "the user wants two lookups"
    assert piece.finish_reason == "tool_calls" and progress.completion_tokens == 7


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b'{"choices": [{"message": 3}]}', b'{"object": "x"}'],
)
def test_a_whole_answer_that_is_not_one_is_garbage(body: bytes) -> None:
    with pytest.raises(MalformedStream):
        OpenAIStreamDecoder().feed(body)


async def test_a_whole_answer_over_the_limit_is_an_error_and_is_not_held() -> None:
    big = b"x" * (3 * 1024 * 1024)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big))
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = EnginePool()
    try:
        conn = await pool.request(url, "/v1/completions", {}, b"{}")
        with pytest.raises(EngineProtocolError, match="over 1048576 bytes"):
            await conn.read_whole(1 << 20)
        assert not conn._held
    finally:
        pool.close()
        server.close()
