"""The relay's HTTP/1.1 client (supervisor/frontend/wire.py): against a real simulated
engine, and against servers that misbehave the ways engines and networks do."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from plugins.vllm import VllmBackend
from supervisor.backends import EngineAnswerGarbled, EngineEndpoint, EngineUnreachable
from supervisor.config import FrontendConfig
from supervisor.events import SseSplitter
from supervisor.frontend.engine_pool import EnginePool
from supervisor.frontend.wire import EngineConnection, EngineConnectionError, EngineProtocolError
from supervisor.model import EngineSpec, Readiness
from supervisor.testing.cluster import free_port, running_engine

pytestmark = pytest.mark.anyio

BODY = orjson.dumps({"model": "sim-model", "prompt": "the river", "max_tokens": 20, "stream": True})


@pytest.fixture
async def engine_url(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[str]:
    spec = EngineSpec("e0", "sim-model", free_port())
    async with running_engine(VllmBackend(), spec, tmp_path, session):
        yield spec.url


async def stream_text(pool: EnginePool, url: str) -> tuple[list[bytes], EngineConnection]:
    conn = await pool.request(url, "/v1/completions", {}, BODY)
    assert conn.status == 200
    events: list[bytes] = []
    sse = SseSplitter(FrontendConfig.max_event_bytes)
    conn.set_sink(lambda b: events.extend(sse.feed(b)))
    await conn.ended()
    assert sse.done
    return events, conn


async def test_a_stream_is_read_whole_and_its_connection_reused(engine_url: str) -> None:
    pool = EnginePool()
    for _ in range(5):
        events, conn = await stream_text(pool, engine_url)
        tokens = sum(len(orjson.loads(e)["choices"][0].get("token_ids") or []) for e in events)
        assert tokens == 20 or len(events) >= 20
        pool.release(conn)
    assert pool.opened == 1  # one connection for five answers
    pool.close()


async def test_a_connection_left_mid_answer_is_not_reused(engine_url: str) -> None:
    """Leaving mid-stream (a client gone, a stop string) closes the connection: that is
    the abort the engine sees. The next request gets a new one."""
    pool = EnginePool()
    conn = await pool.request(engine_url, "/v1/completions", {}, BODY)
    got = asyncio.Event()
    conn.set_sink(lambda b: got.set())
    await got.wait()
    pool.release(conn)
    assert conn.transport is not None and conn.transport.is_closing()
    _, conn2 = await stream_text(pool, engine_url)
    assert conn2 is not conn and pool.opened == 2
    pool.close()


# -- servers that misbehave ------------------------------------------------------------------
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await r.readexactly(length)


def answering(*answers: bytes, hold: float = 0.0) -> Handler:
    """A server that answers each request in turn with the given bytes, then keeps the
    connection open ``hold`` seconds and closes it."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(r)
            w.write(answer)
            await w.drain()
        await asyncio.sleep(hold)
        w.close()

    return handler


def chunked(payload: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for n in sizes:
        out += b"%x\r\n%b\r\n" % (n, payload[pos : pos + n])
        pos += n
    return out + b"0\r\n\r\n"


async def test_chunked_framing_split_anywhere_gives_the_same_body() -> None:
    """The answer arrives cut at random places (as TCP may deliver it), chunk sizes random
    too: the body handed on is exactly the payload, and the connection stays usable."""
    rng = random.Random(7)
    payload = b"".join(b'data: {"n": %d}\n\n' % i for i in range(200))
    sizes: list[int] = []
    left = len(payload)
    while left:
        sizes.append(min(left, rng.randint(1, 90)))
        left -= sizes[-1]
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(payload, sizes)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_request(r)
            pos = 0
            while pos < len(wire):
                n = rng.randint(1, 40)
                w.write(wire[pos : pos + n])
                await w.drain()
                await asyncio.sleep(0)
                pos += n
        w.close()

    server, url = await serve(handler)
    pool = EnginePool()
    try:
        for _ in range(3):
            conn = await pool.request(url, "/v1/completions", {}, b"{}")
            got: list[bytes] = []
            conn.set_sink(got.append)
            await conn.ended()
            assert b"".join(got) == payload
            pool.release(conn)
        assert pool.opened == 1
    finally:
        pool.close()
        server.close()


async def test_a_large_error_body_is_read_to_its_end_but_only_its_start_kept() -> None:
    big = b"e" * (4 * 1024 * 1024)
    server, url = await serve(
        answering(
            b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
    )
    pool = EnginePool()
    try:
        conn = await pool.request(url, "/x", {}, b"{}")
        assert await conn.read_all(2000) == big[:2000]
        assert not conn._held  # the 4 MiB went by; nothing of it waits in the connection
        pool.release(conn)
        conn = await pool.request(url, "/x", {}, b"{}")  # the same connection, read whole
        assert pool.opened == 1 and await conn.read_all() == b"ok"
        pool.release(conn)
    finally:
        pool.close()
        server.close()


async def test_content_length_and_connection_close_framing() -> None:
    server, url = await serve(
        answering(
            b"HTTP/1.1 503 Busy\r\nContent-Length: 11\r\n\r\nhello world",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        )
    )
    pool = EnginePool()
    try:
        conn = await pool.request(url, "/x", {}, b"{}")
        assert (conn.status, conn.reason) == (503, "Busy")
        assert await conn.read_all() == b"hello world"
        pool.release(conn)
        conn = await pool.request(url, "/x", {}, b"{}")
        assert pool.opened == 1  # the 503's connection was kept
        assert await conn.read_all() == b"until the end"
        pool.release(conn)
        assert conn.transport is not None and conn.transport.is_closing()  # not reusable
    finally:
        pool.close()
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    ],
)
async def test_garbage_from_an_engine_is_an_error_not_a_hang(answer: bytes) -> None:
    # The connection stays open: only parsing can end this.
    server, url = await serve(answering(answer, hold=5))
    pool = EnginePool()
    try:
        with pytest.raises(EngineProtocolError):
            async with asyncio.timeout(2):
                conn = await pool.request(url, "/x", {}, b"{}")
                conn.set_sink(lambda b: None)
                await conn.ended()
    finally:
        pool.close()
        server.close()


async def test_a_kept_connection_the_engine_dropped_is_replaced_once() -> None:
    """The engine closes a kept connection just as a request goes out on it (its idle
    timeout): the request is sent again on a new connection, not failed. A connection
    that fails after part of an answer is an error for the relay to handle."""
    served = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(r)
        served += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        # A second request on this connection is dropped unanswered.
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(r)
        w.close()

    server, url = await serve(handler)
    pool = EnginePool()
    try:
        conn = await pool.request(url, "/x", {}, b"{}")
        assert await conn.read_all() == b"ok"
        pool.release(conn)
        conn = await pool.request(url, "/x", {}, b"{}")  # the kept one fails; a new one
        assert await conn.read_all() == b"ok"
        assert served == 2 and pool.opened == 2
    finally:
        pool.close()
        server.close()

    server, url = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
    pool = EnginePool()
    try:
        conn = await pool.request(url, "/x", {}, b"{}")
        with pytest.raises(EngineConnectionError):
            await conn.read_all()
    finally:
        pool.close()
        server.close()


async def test_no_engine_listening_is_a_connection_error() -> None:
    pool = EnginePool(connect_timeout=1)
    with pytest.raises(EngineConnectionError, match="cannot connect"):
        await pool.request(f"http://127.0.0.1:{free_port()}", "/x", {}, b"{}")


# -- the health probes' calls (EngineEndpoint with a pool) ------------------------------------
async def test_a_lean_endpoint_answers_as_the_aiohttp_one_does(
    engine_url: str, session: aiohttp.ClientSession
) -> None:
    pool = EnginePool()
    lean = EngineEndpoint(engine_url, session, 5.0, pool=pool)
    plain = EngineEndpoint(engine_url, session, 5.0)
    backend = VllmBackend()
    try:
        for path in ("/health", "/v1/models", "/is_sleeping", "/no/such/route"):
            status, body = await lean.call("GET", path)
            status2, body2 = await plain.call("GET", path)
            assert status == status2, path
            if status == 200 and path != "/health":
                assert orjson.loads(body).keys() == orjson.loads(body2).keys(), path
        ask = {"model": "sim-model", "prompt": "the river", "max_tokens": 3}
        status, body = await lean.call("POST", "/v1/completions", json_body=ask)
        assert status == 200 and orjson.loads(body)["usage"]["completion_tokens"] == 3
        assert await backend.health(lean) == await backend.health(plain) == Readiness.READY
        assert pool.opened == 1  # every call above on one kept connection
    finally:
        pool.close()


@contextlib.asynccontextmanager
async def lean_endpoint(handler: Handler, timeout: float = 2.0) -> AsyncIterator[EngineEndpoint]:
    """An endpoint whose calls take the lean client, to a server running ``handler``."""
    server, url = await serve(handler)
    pool = EnginePool(connect_timeout=1)
    async with aiohttp.ClientSession() as session:
        try:
            yield EngineEndpoint(url, session, timeout, pool=pool)
        finally:
            pool.close()
            server.close()


async def test_a_lean_get_carries_its_query_and_no_body() -> None:
    heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        heads.append(await r.readuntil(b"\r\n\r\n"))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()

    async with lean_endpoint(handler) as ep:
        assert await ep.call("GET", "/sleep", params={"level": "2", "x": "a b"}) == (200, b"ok")
    assert heads[0].startswith(b"GET /sleep?level=2&x=a+b HTTP/1.1\r\n")
    assert b"content-length" not in heads[0].lower()


async def test_lean_endpoint_failures_are_the_contract_errors_plugins_catch() -> None:
    pool = EnginePool(connect_timeout=1)
    async with aiohttp.ClientSession() as session:
        try:
            nobody = EngineEndpoint(f"http://127.0.0.1:{free_port()}", session, 2.0, pool=pool)
            with pytest.raises(EngineUnreachable):
                await nobody.call("GET", "/health")
            assert await VllmBackend().health(nobody) == Readiness.DOWN
        finally:
            pool.close()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await asyncio.sleep(5)  # open: only parsing can end the call
        w.close()

    async with lean_endpoint(garbage) as ep:
        with pytest.raises(EngineAnswerGarbled):
            await ep.call("GET", "/health")


async def test_a_lean_call_to_a_black_hole_times_out_and_drops_the_connection() -> None:
    dropped = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        await r.read()  # never answers; returns once the client gives up and closes
        dropped.set()
        w.close()

    async with lean_endpoint(handler, timeout=0.5) as ep:
        with pytest.raises(TimeoutError):
            await ep.call("GET", "/health")
        async with asyncio.timeout(5):
            await dropped.wait()
        assert await VllmBackend().health(ep) == Readiness.DOWN
