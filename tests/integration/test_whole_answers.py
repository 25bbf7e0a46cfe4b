"""A short non-streaming request is asked of the engine whole (``Backend.whole_request``)
and its answer body decoded as one event. That a whole answer says what the stream says is
a conformance check (supervisor/testing/conformance.py), run for every built-in backend;
here: a whole chat message's parts, garbage, and an answer too large to hold."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from supervisor.backends import MalformedStream
from supervisor.frontend.engine_pool import EnginePool
from supervisor.frontend.wire import EngineProtocolError
from supervisor.openai_shapes import OpenAIStreamDecoder
from supervisor.requests import Progress

pytestmark = pytest.mark.anyio


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
