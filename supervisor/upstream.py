"""Reading an engine's SSE stream: ``data:`` payloads, one per event."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from supervisor.backends import MalformedStream

DONE = b"[DONE]"


async def iter_sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Yield each event's ``data`` payload until ``[DONE]`` (which is not yielded).

    Raises :class:`MalformedStream` when the stream ends without ``[DONE]`` or carries a line
    that is not SSE; connection errors propagate as aiohttp raises them.
    """
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2 :]
            data = _event_data(event)
            if data is None:
                continue
            if data == DONE:
                return
            yield data
    raise MalformedStream("stream ended without [DONE]")


def _event_data(event: bytes) -> bytes | None:
    parts = []
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            parts.append(line[5:].lstrip(b" "))
        elif line and not line.startswith((b":", b"event:", b"id:", b"retry:")):
            raise MalformedStream(f"not an SSE line: {line[:80]!r}")
    return b"\n".join(parts) if parts else None
