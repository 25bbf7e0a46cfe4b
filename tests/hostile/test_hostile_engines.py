"""Engines that answer with hostile bytes, against the relay's engine client
(supervisor/frontend/wire.py) and the SSE splitter: each fake engine is a raw socket server
on loopback that reads the request and sends what a buggy or hijacked engine might.

What must hold, whatever comes: the answer is refused as :class:`EngineProtocolError` (the
relay then takes the engine's stream as malformed: the request migrates, the engine is
reported as giving garbage), promptly, with bounded memory and without blocking the event
loop; and a connection with bytes past its answer is never used again. Each case here was
taken (or waited on for ever) by the client before it judged bytes by RFC 9112's grammar;
test_differential_responses.py holds them all, with those refused all along.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest

from supervisor.events import SseSplitter
from supervisor.frontend.engine_pool import EnginePool
from supervisor.frontend.wire import EngineConnection, EngineProtocolError
from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor
from supervisor.upstream import iter_sse_data

pytestmark = pytest.mark.anyio


async def read_request(r: asyncio.StreamReader) -> None:
    head = await r.readuntil(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await r.readexactly(int(line.split(b":")[1]))


@asynccontextmanager
async def fake_engine(
    *answers: Sequence[bytes], gap: float = 0.02, hold: float = 10.0
) -> AsyncIterator[str]:
    """A server that answers the n-th request it gets (on whichever connection) with
    ``answers[n]``, written one piece at a time (``gap`` seconds apart, so each piece is
    its own read), and keeps each connection open ``hold`` seconds after its last answer:
    only parsing can end the client's wait."""
    left = list(answers)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while left:
                await read_request(r)
                for i, piece in enumerate(left.pop(0)):
                    if i:
                        await asyncio.sleep(gap)
                    w.write(piece)
                    await w.drain()
            await asyncio.sleep(hold)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def answer_of(pool: EnginePool, url: str, within: float = 3.0) -> tuple[int, bytes]:
    """One request's status and whole body, or the error that ended it (in ``within``)."""
    async with asyncio.timeout(within):
        conn = await pool.request(url, "/v1/completions", {}, b"{}")
        try:
            return conn.status, await conn.read_all(1 << 20)
        finally:
            pool.release(conn)


async def refused(*pieces: bytes) -> EngineProtocolError:
    """The error an answer made of ``pieces`` (one read each) is refused with."""
    async with fake_engine(pieces) as url:
        pool = EnginePool()
        try:
            with pytest.raises(EngineProtocolError) as caught:
                await answer_of(pool, url)
        finally:
            pool.close()
    return caught.value


OK = b"HTTP/1.1 200 OK\r\n"


# -- interim answers ---------------------------------------------------------------------------
async def test_a_flood_of_interim_answers_is_refused_without_blocking_the_loop() -> None:
    """17,470 ``100`` heads in one 256 KB write: compiled, the old recursion took 2.26 GB
    and blocked the loop 8.9 s. Now the 17th interim answer ends it, at once."""
    flood = b"HTTP/1.1 100\r\n\r\n" * 17_470 + OK + b"Content-Length: 2\r\n\r\nok"
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - before - 0.005)

    tick = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        err = await refused(flood)
        assert "interim" in str(err)
        assert time.monotonic() - started < 2.0
    finally:
        tick.cancel()
    assert max(lags, default=0.0) < 0.5  # (generous: the machine is shared; the flood took seconds)


async def test_interim_answers_whose_lines_come_in_separate_reads() -> None:
    """A ``100 Continue`` cut into reads (its blank line last), then an Early Hints head
    and the answer, a byte at a time: the client waited for ever for a head it had read."""
    async with fake_engine(
        [b"HTTP/1.1 100 Continue\r\n", b"\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"]
        + [bytes([b]) for b in b"\r\n" + OK + b"Content-Length: 2\r\n\r\nok"],
        gap=0.002,
    ) as url:
        pool = EnginePool()
        try:
            assert await answer_of(pool, url) == (200, b"ok")
        finally:
            pool.close()


async def test_interim_answers_up_to_the_limit_are_skipped() -> None:
    heads = b"HTTP/1.1 100 Continue\r\n\r\n" * 16
    async with fake_engine([heads + OK + b"Content-Length: 2\r\n\r\nok"]) as url:
        pool = EnginePool()
        try:
            assert await answer_of(pool, url) == (200, b"ok")
        finally:
            pool.close()
    await refused(heads + b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 0\r\n\r\n")


async def test_switching_protocols_is_refused() -> None:
    await refused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK + b"\r\n")


# -- heads -------------------------------------------------------------------------------------
async def test_a_head_over_the_limit_is_refused_even_in_one_read() -> None:
    """The 64 KiB limit held only while the head was incomplete: one read with all of it
    (and its end) was parsed whatever its size."""
    big = OK + b"X-Pad: " + b"p" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    assert "over" in str(await refused(big))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 O\x00K\r\n",  # a control byte in the reason
        b"HTTP/1.1 200 O\x0bK\r\n",
        b"HTTP/1.1 200 O\rK\r\n",
        b"HTTP/1.10 200 OK\r\n",
        b"HTTP/1.1 0200 OK\r\n",
    ],
)
async def test_malformed_status_lines_are_refused(head: bytes) -> None:
    await refused(head + b"Content-Length: 2\r\n\r\nok")


@pytest.mark.parametrize(
    "field",
    [
        b"X-A : b",  # whitespace before the colon
        b"X-A: b\x00c",  # control bytes and DEL in a value
        b"X-A: b\x7fc",
        b"X-A: b\x0bc",
        b"X-A: b\rc",
        b"X@A: b",  # not a token
        b"\xc3\xa9: b",
    ],
)
async def test_malformed_field_lines_are_refused(field: bytes) -> None:
    await refused(OK + field + b"\r\nContent-Length: 2\r\n\r\nok")


async def test_a_head_of_bare_lfs_is_refused_not_waited_on() -> None:
    """Lines ended by LF alone: no CRLF CRLF will ever end that head."""
    await refused(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")


# -- framing -----------------------------------------------------------------------------------
CHUNKED_OK = b"2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "fields",
    [
        # Both framings at once: a hop that reads the other one reads another answer.
        b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 13\r\n",
        # Codings other than exactly "chunked".
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chun\xe2\x84\xaaed\r\n",  # a KELVIN SIGN lower-cases to "k"
        b"Transfer-Encoding: \x0bchunked\r\n",
    ],
)
async def test_ambiguous_transfer_codings_are_refused(fields: bytes) -> None:
    await refused(OK + fields + b"\r\n" + CHUNKED_OK)


async def test_chunked_from_an_http10_engine_is_refused() -> None:
    await refused(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_OK)


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 2\r\nContent-Length: 2\r\n",  # equal: still two
        b"Content-Length: 2\r\nContent-Length: 5\r\n",
        b"Content-Length: \x0b2\r\n",
    ],
)
async def test_bad_or_repeated_content_lengths_are_refused(fields: bytes) -> None:
    await refused(OK + fields + b"\r\nok")


@pytest.mark.parametrize(
    "size_line",
    [
        b"0x2",  # int(line, 16) read all of these as 2
        b"1_0",
        b" +2 ",
        b" 2",
        b"2 ",
        b"+2",
        b"2;",  # extensions: an empty one, a bare LF or NUL in one, spaces
        b"2;\nx",
        b"2;a=\x00",
        b"2 ;a=b",
        b"2;a b",
    ],
)
async def test_malformed_chunk_sizes_are_refused(size_line: bytes) -> None:
    body = size_line + b"\r\nok\r\n0\r\n\r\n"
    await refused(OK + b"Transfer-Encoding: chunked\r\n\r\n" + body)


@pytest.mark.parametrize(
    "trailer",
    [
        b"not a field\r\n",
        b": no name\r\n",
        b"X-T: a\x00b\r\n",
        b"X-T : b\r\n",
        # An answer taken for trailer lines, and one ended by a bare LF.
        b"HTTP/1.1 200 OK\r\n",
        b"\n",
    ],
)
async def test_malformed_trailers_are_refused(trailer: bytes) -> None:
    body = b"2\r\nok\r\n0\r\n" + trailer + b"\r\n"
    await refused(OK + b"Transfer-Encoding: chunked\r\n\r\n" + body)


async def test_well_formed_extensions_and_trailers_are_read() -> None:
    body = b'2;a=b;c="d e"\r\nok\r\n1;x\r\n!\r\n0;end=1\r\nX-T: 1\r\nX-U: two\r\n\r\n'
    async with fake_engine([OK + b"Transfer-Encoding: Chunked\r\n\r\n" + body]) as url:
        pool = EnginePool()
        try:
            assert await answer_of(pool, url) == (200, b"ok!")
        finally:
            pool.close()


# -- bytes past the answer ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer",
    [
        OK + b"Content-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
    ],
)
async def test_bytes_past_an_answer_make_its_connection_unusable(answer: bytes) -> None:
    """The bytes after a complete answer are not the next answer: the next request gets a
    new connection (it was sent on the old one, and read the forged answer)."""
    second = OK + b"Content-Length: 4\r\n\r\nreal"
    async with fake_engine([answer], [second]) as url:
        pool = EnginePool()
        try:
            status, _ = await answer_of(pool, url)
            assert status in (200, 204)
            assert await answer_of(pool, url) == (200, b"real")
            assert pool.opened == 2
        finally:
            pool.close()


async def test_a_clean_answer_keeps_its_connection() -> None:
    """(The other side of the test above: without the extra bytes, one connection.)"""
    answers = [[OK + b"Content-Length: 0\r\n\r\n"], [OK + b"Content-Length: 4\r\n\r\nreal"]]
    async with fake_engine(*answers) as url:
        pool = EnginePool()
        try:
            assert await answer_of(pool, url) == (200, b"")
            assert await answer_of(pool, url) == (200, b"real")
            assert pool.opened == 1
        finally:
            pool.close()


# -- an endless event --------------------------------------------------------------------------
async def test_an_endless_event_line_ends_the_stream_at_the_bound() -> None:
    """An engine streams one event line that never ends, as fast as it is read: the
    splitter fed by the client refuses it at its bound (here 1 MiB), having held no more
    than the bound and a read; the connection is then closed (the engine goes on writing
    into a closed socket, which ends it)."""
    limit = 1 << 20
    piece = b"x" * 65536

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await read_request(r)
            w.write(OK + b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
            for _ in range(32 * 16):  # 32 MiB, unless the client hangs up first
                w.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = EnginePool()
    received = 0
    sse = SseSplitter(limit)
    conn: EngineConnection | None = None

    def sink(data: bytes) -> None:
        nonlocal received
        received += len(data)
        sse.feed(data)
        if sse.error is not None and conn is not None:
            conn.close()

    try:
        async with asyncio.timeout(10):
            conn = await pool.request(url, "/v1/completions", {}, b"{}")
            conn.set_sink(sink)
            with pytest.raises(ConnectionError):
                await conn.ended()
        assert sse.error is not None and "max_event_bytes" in str(sse.error)
        assert received <= limit + 256 * 1024  # the bound, and one read at most
    finally:
        pool.close()
        server.close()


# -- through the real daemon -------------------------------------------------------------------
async def stream_text(session: aiohttp.ClientSession, url: str) -> str:
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 40, "stream": True}
    body["temperature"] = 0
    text = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for data in iter_sse_data(r):
            text.append(json.loads(data)["choices"][0]["text"])
    return "".join(text)


@pytest.mark.e2e
async def test_an_endless_event_line_migrates_the_request(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The active engine streams a few tokens, then one event line that never ends, as fast
    as the relay reads it. The relay holds at most ``max_event_bytes`` of it (64 KiB
    here), takes the stream as garbage (the engine is declared dead, as for any garbage)
    and the request finishes on the shadow, its text whole. Before, the relay read on for
    ever, each read copying all that came before."""
    sup = await start_supervisor(
        tmp_path,
        [sim_slot("s", sim_args=FAST_SIM_ARGS)],
        health={"stall_timeout": 1.0},
        frontend={"max_event_bytes": 65536, "migration_wait": 10},
    )
    try:
        unbroken = await stream_text(session, sup.frontend_url)
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        victim = next(e for e in st["engines"] if e["id"] == st["slots"][0]["active"])
        async with session.post(
            victim["url"] + "/sim/faults", json={"endless_event_after_tokens": 7}
        ) as r:
            assert r.status == 200
        async with asyncio.timeout(20):
            assert await stream_text(session, sup.frontend_url) == unbroken
        async with session.get(sup.admin_url + "/status") as r:
            failover = (await r.json())["failovers"][0]
        assert failover["failed_engine"] == victim["id"]
        assert "max_event_bytes" in failover["reason"], failover["reason"]
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]


@pytest.mark.e2e
async def test_an_event_line_that_grows_slowly_is_a_stall(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The same line, 1 KiB every 20 ms: far under the bound for as long as the test runs,
    but no whole event, so no token, for ``stall_timeout``. The stream is stalled (every
    read used to count as progress, so the request never ended); the judge's own test
    generation gets the same line, the engine is declared dead, the shadow finishes."""
    sup = await start_supervisor(
        tmp_path,
        [sim_slot("s", sim_args=FAST_SIM_ARGS)],
        health={"stall_timeout": 1.0},
        frontend={"migration_wait": 10},
    )
    try:
        unbroken = await stream_text(session, sup.frontend_url)
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        victim = next(e for e in st["engines"] if e["id"] == st["slots"][0]["active"])
        fault = {"endless_event_after_tokens": 7, "endless_event_pace": 0.02}
        async with session.post(victim["url"] + "/sim/faults", json=fault) as r:
            assert r.status == 200
        async with asyncio.timeout(20):
            assert await stream_text(session, sup.frontend_url) == unbroken
        async with session.get(sup.admin_url + "/status") as r:
            failover = (await r.json())["failovers"][0]
        assert failover["failed_engine"] == victim["id"]
        assert "stalled" in failover["reason"], failover["reason"]
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]
