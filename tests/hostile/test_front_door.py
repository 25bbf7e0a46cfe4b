"""The frontend's front door against an attacker with a raw socket, on the real daemon.

Every smuggling shape of tests/hostile/test_differential_requests.py is sent to a running
daemon followed by a second, hidden request: the daemon answers the first with one refusal
and closes, and the hidden one never runs (its route's request count stays 0). The bounds:
a body trickled in past ``body_timeout`` is cut with 408, and bodies held open by many
clients cost at most ``max_buffered_bytes`` of the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot
from tests.hostile import test_hostile_clients
from tests.hostile.test_differential_requests import BAD
from tests.hostile.test_hostile_clients import metric

node = test_hostile_clients.node  # the same daemon fixture

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HIDDEN = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


async def talk(url: str, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, then read until the daemon closes it."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    got = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(wait):
            while part := await reader.read(65536):
                got += part
    writer.close()
    return got


def rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_no_smuggled_request_ever_runs(node: Any) -> None:
    n = await node(sim_slot("s", sim_args=FAST_SIM_ARGS))
    for name, data in BAD.items():
        got = await talk(n.url, data + HIDDEN)
        assert got[9:12] in (b"400", b"501", b"505"), (name, got[:300])
        assert b"HTTP/1.1 200 " not in got, (name, got[:300])
        assert b"Connection: close" in got.partition(b"\r\n\r\n")[0], name
    text = await n.metrics()
    ran = metric(text, "failover_supervisor_frontend_requests_total", route="/v1/models")
    assert ran == 0, "a hidden request ran"
    assert await n.complete() == 200  # and the door still opens for real clients


async def test_expect_100_continue_is_not_sent_to_an_http10_client(node: Any) -> None:
    n = await node(sim_slot("s", sim_args=FAST_SIM_ARGS))
    body = b'{"model": "sim-model", "prompt": "a", "max_tokens": 2}'
    head = b"POST /v1/completions HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    got = await talk(n.url, head % len(body) + body)
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert b"100 Continue" not in got


async def test_a_trickled_body_is_cut_at_body_timeout(node: Any) -> None:
    n = await node(sim_slot("s", sim_args=FAST_SIM_ARGS), frontend={"body_timeout": 1.0})
    host, port = n.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    got = b""
    with anyio.fail_after(10):  # a byte every 0.2 s, as a slow-body attacker sends
        while True:
            with contextlib.suppress(ConnectionError):
                writer.write(b" ")
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    part = await reader.read(65536)
                    got += part
                    if not part:
                        break
    writer.close()
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"body_timeout" in got


async def test_held_bodies_cost_at_most_the_buffered_bytes_cap(node: Any) -> None:
    # 30 clients each hold a body of 4 MiB - 1 open (one byte short). Unbounded, that
    # held 116 MiB more in the daemon; with an 8 MiB cap the connections that would pass it
    # get 503 and their bytes are dropped.
    cap = 8 * 1024 * 1024
    n = await node(sim_slot("s", sim_args=FAST_SIM_ARGS), frontend={"max_buffered_bytes": cap})
    pid = n.sup.proc.pid
    assert await n.complete() == 200
    before = rss(pid)
    host, port = n.url.removeprefix("http://").split(":")
    size = 4 * 1024 * 1024 - 1
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (size + 1)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    answers: list[bytes] = []
    try:
        for _ in range(30):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + b"x" * size)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            held.append((reader, writer))
        await anyio.sleep(1.0)  # the daemon reads what was sent
        peak = rss(pid)
        for reader, _ in held:
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(0.2):
                    answers.append(await reader.read(200))
        assert await n.complete() == 200  # a real client is still served meanwhile
    finally:
        for _, writer in held:
            writer.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) >= 25, answers
    # The cap, plus what growing a buffer may over-allocate: far below the 116 MiB that
    # the same clients held without it.
    assert peak - before < 4 * cap, (before, peak)
