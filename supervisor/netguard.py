"""Client connections that cannot take the daemon down: a cap and a request-head deadline.

aiohttp reads request heads with no deadline of its own, so a client sending a header a
byte a second (slowloris) holds a descriptor forever; enough of them exhaust the open-file
limit and then every accept fails. :class:`GuardedSite` wraps aiohttp's protocol (the admin
API's) with :class:`_Guarded`, which

- refuses a connection over ``max_connections`` with a complete ``503`` and closes it, so
  the process never runs out of descriptors (its own probes and engine links need some);
- closes a connection whose first request head is not complete ``header_timeout`` seconds
  after it was accepted (``408``). Later requests on a kept-alive connection are bounded by
  aiohttp's keep-alive timeout.

The frontend's own server (:mod:`supervisor.frontend.server`) keeps the same limits with a
:class:`ConnectionGuard` of its own.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from supervisor import log as logging

REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 118\r\n\r\n"
    b'{"error": {"message": "too many connections to the supervisor", "type": '
    b'"service_unavailable", "code": "unavailable"}}'
)
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
assert REFUSED.endswith(b"}}") and len(REFUSED.split(b"\r\n\r\n", 1)[1]) == 118


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the new soft
    limit (a daemon relaying N streams holds about 2N descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def connection_cap(configured: int, fd_limit: int) -> int:
    """``configured``, or (when 0) half of what the descriptors allow after a reserve: each
    client connection may hold one link to an engine besides its own."""
    if configured:
        return configured
    return max(16, (fd_limit - 256) // 2)


class ConnectionGuard:
    """Counts one listener's connections and says what it refused (rate-limited log)."""

    def __init__(
        self,
        name: str,
        max_connections: int,
        header_timeout: float,
        on_event: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.name = name
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._on_event = on_event  # "max_connections" or "header_timeout"
        self._last_log = 0.0
        self._unlogged = 0
        self.log = logging.get(component=name)

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection in; over the cap, answer it a complete 503, close it and
        say False."""
        if self.open >= self.max_connections:
            transport.write(REFUSED)
            transport.close()
            self.note("refused")
            return False
        self.open += 1
        return True

    def time_out(self, transport: asyncio.Transport) -> None:
        """A connection sent no whole request head in time: 408, and it is closed."""
        if not transport.is_closing():
            self.note("timeout")
            transport.write(TIMED_OUT)
            transport.close()

    def note(self, what: str) -> None:
        if what == "refused":
            self.refused += 1
            self._on_event("max_connections")
        else:
            self.timed_out += 1
            self._on_event("header_timeout")
        # One line per 10 s at most, however hard the listener is hammered.
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= 10:
            self.log.warning(
                "client connections refused or timed out",
                refused_total=self.refused,
                header_timeouts_total=self.timed_out,
                since_last_report=self._unlogged,
                open=self.open,
                max_connections=self.max_connections,
            )
            self._last_log, self._unlogged = now, 0


class _Guarded(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol; forwards everything."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner, self.guard = inner, guard
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        if not self.guard.admit(self.transport):
            return
        self.counted = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.header_timeout, self._head_too_slow)
        self.inner.connection_made(transport)

    def _head_too_slow(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.guard.time_out(self.transport)

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.timer is not None:
            # Only the first head is timed here; look for its end across reads.
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self.counted:
            return None
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        if self.counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.counted:
            return
        self.counted = False
        self.guard.open -= 1
        self.inner.connection_lost(exc)


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a :class:`ConnectionGuard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, **kw: Any
    ) -> None:
        super().__init__(runner, host, port, **kw)
        self.guard = guard

    async def start(self) -> None:
        # TCPSite.start with the protocol factory wrapped; BaseSite.start registers the site.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard = self.guard
        self._server = await loop.create_server(
            lambda: _Guarded(server(), guard),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
