"""Reading an engine's SSE stream: ``data:`` payloads, one per event."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from supervisor.backends import MalformedStream
from supervisor.config import FrontendConfig

# (The splitter lives in a compiled module: it runs for every read of a relayed stream.)
from supervisor.events import SseSplitter


async def iter_sse_data(
    resp: aiohttp.ClientResponse, max_event_bytes: int = FrontendConfig.max_event_bytes
) -> AsyncIterator[bytes]:
    """Yield each event's ``data`` payload until ``[DONE]`` (which is not yielded).

    Raises :class:`MalformedStream` when the stream ends without ``[DONE]``, carries a line
    that is not SSE, or an event longer than ``max_event_bytes``; connection errors
    propagate as aiohttp raises them.
    """
    sse = SseSplitter(max_event_bytes)
    async for chunk in resp.content.iter_any():
        for data in sse.feed(chunk):
            yield data
        if sse.error is not None:
            raise sse.error
        if sse.done:
            return
    raise MalformedStream("stream ended without [DONE]")
