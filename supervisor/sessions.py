"""The daemon's HTTP client sessions, one per kind of traffic, each with its own pool.

Client streams can hold hundreds of connections for minutes; if health probes, wake calls or
etcd shared their pool, a burst of clients would queue a probe behind the streams, the probe
would time out and a healthy engine would be declared dead. So nothing the clients do can
delay the daemon's own calls: each kind of traffic has its own connector and limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp

from supervisor.frontend.engine_pool import EnginePool


@dataclass(frozen=True)
class Sessions:
    relay: EnginePool  # client requests relayed to engines (streams)
    probes: aiohttp.ClientSession  # health probes and readiness checks
    control: aiohttp.ClientSession  # sleep, wake, abort: the plugins' control calls
    cluster: aiohttp.ClientSession  # etcd and peer supervisors' admin APIs
    # The health probes' GETs, through the relay's lean client but a pool of their own.
    probe_pool: EnginePool


@asynccontextmanager
async def open_sessions(max_inflight_per_engine: int) -> AsyncIterator[Sessions]:
    """The relay's pool and the three sessions. The relay keeps connections alive and may
    hold as many per engine as the router lets through (``max_inflight_per_engine``);
    admission is the router's job, so the relay pool has no global cap that could starve
    some engines."""
    async with AsyncExitStack() as stack:

        async def session(limit: int, per_host: int, keepalive: float) -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=limit, limit_per_host=per_host, keepalive_timeout=keepalive
            )
            return await stack.enter_async_context(aiohttp.ClientSession(connector=connector))

        relay = EnginePool(max_idle_per_engine=max_inflight_per_engine)
        stack.callback(relay.close)
        probe_pool = EnginePool(max_idle_per_engine=8)
        stack.callback(probe_pool.close)
        yield Sessions(
            relay=relay,
            probes=await session(0, 8, 30.0),
            control=await session(0, 32, 15.0),
            cluster=await session(0, 16, 30.0),
            probe_pool=probe_pool,
        )
