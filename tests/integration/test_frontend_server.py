"""The frontend's HTTP/1.1 server (supervisor/frontend/server.py) on a real loopback socket,
spoken to byte by byte the way clients, proxies and attackers do."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from supervisor.frontend.heads import Request
from supervisor.frontend.server import FrontendServer, Reply
from supervisor.frontend.validate import error_body
from supervisor.netguard import ConnectionGuard

pytestmark = pytest.mark.anyio


class Echo:
    """Answers with what it was sent; ``/stream`` streams three chunks; ``/hang`` waits
    until cancelled (and says so)."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.cancelled = asyncio.Event()

    async def __call__(self, request: Request, reply: Reply) -> None:
        self.seen.append(request)
        if request.path == "/stream":
            reply.start(200, [("Content-Type", "text/event-stream")], b"one\n")
            await reply.write(b"two\n")
            assert reply.write_now(b"three\n")
        elif request.path == "/hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        else:
            answer = {"method": request.method, "path": request.path, "body": request.body.decode()}
            reply.send(200, json.dumps(answer).encode())


@contextlib.asynccontextmanager
async def serving(
    *, max_connections: int = 100, header_timeout: float = 5.0, keepalive: float = 5.0
) -> AsyncIterator[tuple[FrontendServer, Echo]]:
    echo = Echo()
    guard = ConnectionGuard("test", max_connections, header_timeout)
    server = FrontendServer(
        echo,
        guard,
        max_body=1024,
        header_timeout=header_timeout,
        keepalive_timeout=keepalive,
        error_body=error_body,
    )
    await server.listen("127.0.0.1", 0)
    try:
        yield server, echo
    finally:
        await server.close()


async def exchange(port: int, data: bytes, *, wait: float = 2.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``wait`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(wait):
            while part := await reader.read(65536):
                got += part
    writer.close()
    return got


async def closed(server: FrontendServer) -> None:
    """Wait (a second at most) until the server holds no connection."""
    async with asyncio.timeout(1):
        while server.guard.open:
            await asyncio.sleep(0.01)


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_answers_pipelined_requests_in_order() -> None:
    async with serving() as (server, _):
        got = await exchange(
            server.port, post("/a", b"1") + post("/b", b"22") + post("/c", b"333"), wait=0.5
        )
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in got.split(b"HTTP/1.1 ")[1:]]
    assert [(b["path"], b["body"]) for b in bodies] == [("/a", "1"), ("/b", "22"), ("/c", "333")]


async def test_a_request_split_at_every_byte_is_the_same_request() -> None:
    data = post("/split", b'{"x": 1}', "X-Thing: a")
    async with serving() as (server, echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()
    assert echo.seen[0].body == b'{"x": 1}' and echo.seen[0].headers["x-thing"] == "a"


async def test_a_reused_head_is_read_afresh_for_each_request() -> None:
    """Parsed heads are kept and reused: a handler that changes its request's headers
    changes nothing for the next request with the same head, a head refused once is refused
    again, and many different heads keep a bounded number."""

    class Meddler(Echo):
        async def __call__(self, request: Request, reply: Reply) -> None:
            request.headers["x-thing"] = "changed"
            request.headers.pop("host")
            await super().__call__(request, reply)

    same = post("/same", b"abc", "X-Thing: a")
    async with serving() as (server, echo):
        server.handler = meddler = Meddler()
        got = await exchange(server.port, same * 3 + post("/same", b"abcd", "X-Thing: a"))
        assert got.count(b"HTTP/1.1 200 OK") == 4
        assert [r.headers.get("x-thing") for r in meddler.seen] == ["changed"] * 4
        server.handler = echo
        await exchange(server.port, same, wait=0.3)
        assert echo.seen[-1].headers["x-thing"] == "a" and echo.seen[-1].headers["host"] == "x"
        assert [r.body for r in meddler.seen] == [b"abc"] * 3 + [b"abcd"]
        for _ in range(2):
            refused = await exchange(server.port, post("/big", b"x" * 2000))
            assert refused.startswith(b"HTTP/1.1 413 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(1000):
            writer.write(post("/many", b"", f"X-N: {i}"))
            await reader.readuntil(b"\r\n\r\n")
            await reader.readuntil(b"}")
        writer.close()
        assert 0 < len(server.heads) <= 256


async def test_a_connection_has_one_handler_task_and_it_ends_with_the_connection() -> None:
    async with serving() as (server, echo):
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for i in range(3):
            for reader, writer in conns:
                writer.write(post(f"/r{i}", b"x"))
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
                await reader.readuntil(b"}")
        assert len(server.tasks) == 2  # one per connection, waiting for its next request
        for _, writer in conns:
            writer.close()
        await closed(server)
        async with asyncio.timeout(1):
            while server.tasks:
                await asyncio.sleep(0.01)
    assert [r.path for r in echo.seen] == ["/r0", "/r0", "/r1", "/r1", "/r2", "/r2"]


async def test_chunked_bodies_and_expect_continue() -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
        b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nTrailer: t\r\n\r\n"
    )
    async with serving() as (server, echo):
        got = await exchange(server.port, chunked, wait=0.5)
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert echo.seen[0].body == b"wikipedia"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nbad name: x\r\n\r\n", 400),
        (
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            ),
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, 413),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
            + b"x" * 2048,
            413,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000, 431),
    ],
)
async def test_unreadable_requests_get_a_clear_status_and_a_closed_connection(
    data: bytes, status: int
) -> None:
    async with serving() as (server, echo):
        got = await exchange(server.port, data)
        await closed(server)  # (after reading what was sent)
    assert got.startswith(f"HTTP/1.1 {status} ".encode()), got[:200]
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["message"]
    assert echo.seen == []


async def test_a_large_refused_body_still_gets_its_answer() -> None:
    # The 413 comes before the body is read; the body is read and dropped after it, so the
    # client sees the answer instead of a reset.
    async with serving() as (server, _), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/big"
        async with http.post(url, data=b"x" * (3 * 1024 * 1024)) as r:
            assert r.status == 413
            assert "1024 bytes" in (await r.json())["error"]["message"]


async def test_http10_streams_end_with_the_connection_and_head_has_no_body() -> None:
    async with serving() as (server, _):
        got = await exchange(server.port, b"GET /stream HTTP/1.0\r\n\r\n")
        head = await exchange(
            server.port, b"HEAD /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert got.endswith(b"\r\n\r\none\ntwo\nthree\n")  # no chunk framing for HTTP/1.0
    assert b"Transfer-Encoding" not in got
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: " in head


async def test_an_http10_client_asking_keep_alive_is_told_so() -> None:
    async with serving() as (server, _):
        got = await exchange(
            server.port,
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        )
    first, second = got.split(b"HTTP/1.1 200 OK")[1:]
    assert b"Connection: keep-alive" in first and b"Connection: close" in second


async def test_a_stream_is_chunked_and_ends_with_the_last_chunk() -> None:
    async with (
        serving() as (server, _),
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/stream") as r,
    ):
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert await r.read() == b"one\ntwo\nthree\n"


async def test_a_client_that_hangs_up_cancels_its_handler() -> None:
    async with serving() as (server, echo):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/hang", b""))
        await asyncio.sleep(0.2)
        writer.close()
        async with asyncio.timeout(2):
            await echo.cancelled.wait()
            while server.tasks:
                await asyncio.sleep(0.01)


async def test_slow_heads_and_idle_connections_are_closed() -> None:
    async with serving(header_timeout=0.3, keepalive=0.3) as (server, _):
        # A first head that never completes: 408.
        slow = await exchange(server.port, b"GET / HTTP/1.1\r\n", wait=2)
        assert slow.startswith(b"HTTP/1.1 408")
        # A kept-alive connection: the next head has the same deadline from its first byte.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/a", b"") + b"GET / HTTP/1.1\r\n")
        got = b""
        async with asyncio.timeout(2):
            while part := await reader.read(65536):
                got += part
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got
        # An idle one is closed without a word.
        idle = await exchange(server.port, post("/a", b""), wait=2)
        assert idle.count(b"HTTP/1.1") == 1
        await closed(server)


async def test_connections_over_the_cap_get_a_complete_503() -> None:
    async with serving(max_connections=2) as (server, _):
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        got = await exchange(server.port, post("/a", b""))
        for _, w in held:
            w.close()
    assert got.startswith(b"HTTP/1.1 503") and got.endswith(b"}}")
    assert server.guard.refused == 1


async def test_a_handler_bug_is_a_500_and_the_server_lives_on() -> None:
    async def broken(request: Request, reply: Reply) -> None:
        raise RuntimeError("bug")

    guard = ConnectionGuard("test", 10, 5)
    server = FrontendServer(
        broken, guard, max_body=10, header_timeout=5, keepalive_timeout=5, error_body=error_body
    )
    await server.listen("127.0.0.1", 0)
    try:
        first: Any = await exchange(server.port, post("/", b""))
        second: Any = await exchange(server.port, post("/", b""))
    finally:
        await server.close()
    assert first.startswith(b"HTTP/1.1 500") and second.startswith(b"HTTP/1.1 500")
