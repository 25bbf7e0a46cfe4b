"""The relay's pool of kept-alive connections to engines (:mod:`supervisor.frontend.wire`'s
connections), and the whole exchanges that the plugin contract's lean calls make on it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final
from urllib.parse import urlsplit

from supervisor.backend_errors import EngineAnswerGarbled, EngineUnreachable
from supervisor.frontend.wire import IDLE_FOR, EngineConnection
from supervisor.frontend.wire_errors import EngineConnectionError, EngineProtocolError

# The largest answer a lean call reads (an engine's /metrics page is the largest expected).
_ANSWER_LIMIT: Final = 64 * 1024 * 1024


class EnginePool:
    """Kept-alive connections to engines, by host and port: the relay's upstream."""

    def __init__(self, connect_timeout: float = 5.0, max_idle_per_engine: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_engine
        self._idle: dict[tuple[str, int], list[EngineConnection]] = {}
        self.opened = 0  # connections made, for tests and metrics
        self._keys: dict[str, tuple[str, int]] = {}  # engine URL -> (host, port), parsed once

    def key(self, url: str) -> tuple[str, int]:
        key = self._keys.get(url)
        if key is None:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise EngineConnectionError(f"cannot relay to {url!r}: only http:// engines")
            key = self._keys[url] = (u.hostname, u.port or 80)
        return key

    async def request(
        self,
        url: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        method: str = "POST",
        content_type: str = "application/json",
    ) -> EngineConnection:
        """A connection with the request sent; its answer is read through it. A kept
        connection that turns out closed before any answer is replaced once by a new one."""
        key = self.key(url)
        conn = self._reused(key)
        if conn is not None:
            conn.send(path, headers, body, method, content_type)
            try:
                await conn.head()
                return conn
            except EngineConnectionError:
                if conn.received_any:
                    raise
                conn.close()  # closed by the engine while idle: try once on a new one
            except BaseException:  # cancelled while waiting: the request is abandoned
                conn.close()
                raise
        conn = await self._open(key)
        conn.send(path, headers, body, method, content_type)
        try:
            await conn.head()
        except BaseException:
            conn.close()
            raise
        return conn

    def _reused(self, key: tuple[str, int]) -> EngineConnection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < IDLE_FOR:
                return conn
            conn.close()
        return None

    async def _open(self, key: tuple[str, int]) -> EngineConnection:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(lambda: EngineConnection(key), host, port)
        except TimeoutError as e:
            raise EngineConnectionError(
                f"no connection to {host}:{port} within {self.connect_timeout:g}s"
            ) from e
        except OSError as err:
            raise EngineConnectionError(f"cannot connect to {host}:{port}: {err}") from err
        self.opened += 1
        return proto

    async def fetch(
        self, url: str, method: str, target: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        """One whole exchange (status and body), within ``timeout``, for
        :class:`supervisor.backends.EngineEndpoint`: its failures are the plugin contract's
        errors, not this client's."""
        try:
            async with asyncio.timeout(timeout):
                conn = await self.request(url, target, {}, body, method)
                try:
                    return conn.status, await conn.read_whole(_ANSWER_LIMIT)
                finally:
                    self.release(conn)  # kept if read whole, else closed
        except EngineConnectionError as gone:
            raise EngineUnreachable(str(gone)) from gone
        except EngineProtocolError as garbage:
            path = target.partition("?")[0]
            raise EngineAnswerGarbled(f"{method} {path}: {garbage}") from garbage

    def release(self, conn: EngineConnection) -> None:
        """Back to the pool if its answer was read whole and it may be reused; else closed."""
        if not conn.ready_again():
            conn.close()
            return
        conn.resume()
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
