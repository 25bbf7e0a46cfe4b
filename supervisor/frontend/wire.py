"""The relay's HTTP/1.1 client to engines: lean, on asyncio's ``Protocol``.

A streamed answer is thousands of small reads. Through a general-purpose client each read
wakes a task, passes through a stream reader and an async iterator or two before the relay
sees it. Here the connection hands each read's body bytes to a plain callback (the relay
decodes them and writes to its client there and then), so a read costs no task switch.

Only what talking to an engine needs: a JSON body or none (the health probes' ``GET``), a
response framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's
end, keep-alive with a pool per engine. Anything else an engine sends is
:class:`EngineProtocolError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlsplit

from supervisor.frontend.wire_errors import EngineConnectionError, EngineProtocolError

__all__ = ["EngineConnection", "EngineConnectionError", "EnginePool", "EngineProtocolError"]

# Idle connections are kept for less than engines' own keep-alive timeout (uvicorn, under
# vLLM, SGLang and trtllm-serve, closes them after 5 s): reusing one the engine is closing
# would fail a request for nothing.
IDLE_FOR: Final = 2.0
MAX_HEAD: Final = 64 * 1024  # a response's status line and headers


Sink = Callable[[bytes], None]


class EngineConnection(asyncio.Protocol):
    """One connection to one engine, reading one response at a time.

    ``head()`` waits for the status and headers; body bytes then go to :attr:`sink` as
    they arrive (or are kept for :meth:`read_all` while there is none); ``ended()`` waits
    for the body's end. Errors (the connection lost, garbage) end both waits."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        # Made inside the loop (the protocol factory runs there), and asked of it once:
        # get_running_loop() costs a getpid() system call per request.
        self._loop = asyncio.get_running_loop()
        self._host_line = f"Host: {key[0]}:{key[1]}\r\n"
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.reason = ""
        self.content_type = ""  # the answer's, as the engine sent it
        self.sink: Sink | None = None
        self.on_end: Callable[[], None] | None = None  # told when the answer ends or fails
        self.received_any = False  # any byte of the current response
        self.idle_since = 0.0
        self._reusable = True
        self._head_buf = b""
        self._state = "idle"  # idle | head | body | done | closed
        self._held: list[bytes] = []  # body bytes that came before a sink
        self._chunked = False
        self._left: int | None = None  # body bytes still to come (Content-Length framing)
        self._need = 0  # chunked: bytes of the current chunk still to come; -1: its CRLF
        self._trailer = False
        self._cbuf = b""
        self._head_fut: asyncio.Future[None] | None = None
        self._end_fut: asyncio.Future[None] | None = None
        self.error: Exception | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            if self._state == "head":
                data = self._take_head(data)
                if self._state != "body" or not data:
                    return
            if self._state == "body":
                self._take_body(data)
            elif self._state in ("idle", "done"):
                # Bytes nobody asked for: the connection cannot be trusted with another.
                self._reusable = False
        except (EngineProtocolError, ValueError) as e:
            self._fail(e if isinstance(e, EngineProtocolError) else EngineProtocolError(str(e)))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        if self._state == "body" and self._left is None and not self._chunked:
            self._finish()  # framed by the connection's end
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state not in ("done", "idle"):
            why = f": {exc}" if exc else ""
            self._fail(EngineConnectionError(f"the engine closed the connection{why}"))
        self._state = "closed"

    # -- the request -------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return (
            self._state == "idle"
            and self._reusable
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def send(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        method: str = "POST",
        content_type: str = "application/json",
    ) -> None:
        """Send a request: ``body`` is JSON unless ``content_type`` says otherwise (None: a
        request without a body)."""
        assert self.transport is not None and self._state == "idle"
        loop = self._loop
        self._head_fut, self._end_fut = loop.create_future(), loop.create_future()
        self._state, self._head_buf, self.received_any = "head", b"", False
        self.status, self.reason, self.sink, self._held = 0, "", None, []
        self.content_type = ""
        self._chunked, self._left, self._need = False, None, 0
        self._trailer, self._cbuf = False, b""
        fields = "".join(
            [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "content-type"]
        )
        content = (
            ""
            if body is None
            else f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        )
        head = f"{method} {path} HTTP/1.1\r\n{self._host_line}{content}{fields}\r\n"
        data = head.encode("latin-1")
        self.transport.write(data if body is None else data + body)

    async def head(self) -> int:
        assert self._head_fut is not None
        await self._head_fut
        return self.status

    async def ended(self) -> None:
        assert self._end_fut is not None
        await self._end_fut

    async def read_all(self, limit: int = 64 * 1024) -> bytes:
        """The body's first ``limit`` bytes (for an error answer), once it has all come;
        the rest is read and dropped, never held."""
        kept: list[bytes] = []
        room = limit

        def keep(part: bytes) -> None:
            nonlocal room
            if room > 0:
                kept.append(part[:room])
                room -= len(kept[-1])

        self.set_sink(keep)
        await self.ended()
        return b"".join(kept)

    async def read_whole(self, limit: int) -> bytes:
        """The whole body, once it has all come; :class:`EngineProtocolError` if it is
        larger than ``limit`` (what came is dropped as it comes, never held)."""
        parts: list[bytes] = []
        size = 0

        def keep(part: bytes) -> None:
            nonlocal size
            size += len(part)
            if size <= limit:
                parts.append(part)
            elif parts:
                parts.clear()

        self.set_sink(keep)
        await self.ended()
        if size > limit:
            raise EngineProtocolError(f"the engine's answer is over {limit} bytes")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def set_sink(self, sink: Sink) -> None:
        """Body bytes from now on go to ``sink`` (those that came before, at once)."""
        self.sink = sink
        held, self._held = self._held, []
        for part in held:
            sink(part)

    @property
    def done(self) -> bool:
        """The answer's body was read whole."""
        return self._state == "done"

    def ready_again(self) -> bool:
        """After an answer read whole: ready for the next request (False: close it)."""
        self.sink = self.on_end = None
        if self._state == "done" and self._reusable:
            self._state = "idle"
        return self.usable

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.close()

    # -- parsing -----------------------------------------------------------------------------
    def _take_head(self, data: bytes) -> bytes:
        buf = self._head_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise EngineProtocolError(f"response headers over {MAX_HEAD} bytes")
            self._head_buf = buf
            return b""
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise EngineProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            return self._take_head(buf[end + 4 :]) if len(buf) > end + 4 else b""
        self.status, self.reason = status, parts[2] if len(parts) > 2 else ""
        length: int | None = None
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise EngineProtocolError(f"not a header line: {line[:80]!r}")
            if name[:1] not in "tTcC":  # none of the three fields read here: skip it
                continue
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding":
                self._chunked = value.lower().endswith("chunked")
            elif name == "content-length":
                if not value.isdigit():
                    raise EngineProtocolError(f"bad Content-Length: {value[:40]!r}")
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                self._reusable = False
            elif name == "content-type":
                self.content_type = value
        if not self._chunked:
            self._left = length
            if length is None:
                self._reusable = False  # framed by the connection's end
        self._state, self._head_buf = "body", b""
        assert self._head_fut is not None
        if not self._head_fut.done():
            self._head_fut.set_result(None)
        rest = buf[end + 4 :]
        if self._left == 0:
            self._finish()
        return rest

    def _deliver(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            self._held.append(data)

    def _take_body(self, data: bytes) -> None:
        if not self._chunked:
            if self._left is None:
                self._deliver(data)
                return
            piece = data[: self._left]
            self._left -= len(piece)
            if len(data) > len(piece):
                self._reusable = False  # more than the answer: not a clean connection
            if piece:
                self._deliver(piece)
            if self._left == 0:
                self._finish()
            return
        buf = self._cbuf + data if self._cbuf else data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        while pos < n:
            if self._need > 0:
                piece = buf[pos : pos + self._need]
                out.append(piece)
                self._need -= len(piece)
                pos += len(piece)
                if self._need:
                    break
                self._need = -1
            if self._need == -1:  # the CRLF after a chunk's data
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise EngineProtocolError("chunk not followed by CRLF")
                pos += 2
                self._need = 0
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > 1024:
                    raise EngineProtocolError("chunk size line too long")
                break
            line = buf[pos:end]
            pos = end + 2
            if self._trailer:
                if not line:  # the empty line that ends the trailers: the body is whole
                    self._cbuf = b""
                    if out:
                        self._deliver(b"".join(out))
                    if pos < n:
                        self._reusable = False
                    self._finish()
                    return
                continue  # a trailer field: not needed
            size = _chunk_size(line)
            if size == 0:
                self._trailer = True
                continue
            stop = pos + size
            if stop + 2 > n:
                self._need = size  # the rest of this chunk comes with later reads
                continue
            # The whole chunk is here (the common case: an engine writes each event as one
            # chunk): taken at once, with no state kept between its size, data and CRLF.
            if buf[stop : stop + 2] != b"\r\n":
                raise EngineProtocolError("chunk not followed by CRLF")
            out.append(buf[pos:stop])
            pos = stop + 2
        self._cbuf = buf[pos:]
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))

    def _finish(self) -> None:
        self._state = "done"
        for fut in (self._head_fut, self._end_fut):
            if fut is not None and not fut.done():
                fut.set_result(None)
        if self.on_end is not None:
            self.on_end()

    def _fail(self, e: Exception) -> None:
        self.error = self.error or e
        self._reusable = False
        self._state = "closed"
        for fut in (self._head_fut, self._end_fut):
            if fut is not None and not fut.done():
                fut.set_exception(e)
                fut.exception()  # retrieved here: a waiter may have gone (cancelled)
        if self.on_end is not None:
            self.on_end()


def _chunk_size(line: bytes) -> int:
    """A chunk's size from its size line (extensions ignored)."""
    try:
        size = int(line, 16)
    except ValueError:  # an extension (";name=value"), or garbage: ValueError again
        size = int(line.split(b";", 1)[0].strip(), 16)
    if size < 0:
        raise EngineProtocolError("negative chunk size")
    return size


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
