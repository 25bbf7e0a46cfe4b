"""The frontend's HTTP/1.1 server: one small asyncio protocol, in place of aiohttp's.

Why its own: per request, aiohttp's server (request and response objects, middleware,
routing, a stream reader, a writer) cost about as much CPU as the relay itself, which put
a non-streaming request at twice the Rust routers' cost. The frontend needs little of HTTP:
a request head, a body of known length or chunked, one response (whole, or a chunked
stream), keep-alive. Everything the OpenAI clients send is covered; what is not is refused
with a clear status, never a stack trace:

- a head over 64 KiB or with more than 128 fields: ``431``; a malformed head: ``400``;
  a version other than HTTP/1.0 or 1.1: ``505``; a method other than the usual seven:
  ``501``;
- a body over ``max_body_bytes`` (declared or counted): ``413``, then the rest of it is
  read and dropped for a few seconds so the client sees the answer instead of a reset;
- ``Content-Length`` with ``Transfer-Encoding``, two ``Content-Length`` fields, a length
  that is not ASCII digits, ``Transfer-Encoding`` in an HTTP/1.0 request, a malformed
  chunk size, extension or trailer line: ``400``; a transfer coding other than
  ``chunked``: ``501`` (the ambiguities request smuggling lives on: every rule is judged
  on the bytes, by :mod:`supervisor.frontend.h1`, and is llhttp's or stricter);
- an HTTP/1.1 request without ``Host``, or any request with two: ``400`` (RFC 9112 3.2);
- ``Expect: 100-continue`` gets its ``100 Continue`` once the head is accepted (HTTP/1.1
  only: an HTTP/1.0 client would take it for the answer).

The guard's limits live here too (see :mod:`supervisor.netguard`): connections over the cap
get a complete ``503`` and are closed; the first request head must be complete
``header_timeout`` seconds after the connection was accepted (``408``), a later head
within ``header_timeout`` of its first byte, and a body within ``body_timeout`` of its
head (``408``); a kept-alive connection idle for ``keepalive_timeout`` is closed. The
bytes of unfinished requests held for all connections together are capped
(``max_buffered``): the connection that would pass the cap gets ``503`` and is closed. A
client that goes away cancels its handler at once.

One request per connection is handled at a time; a pipelined next request waits (and
reading pauses once 256 KiB are waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

from supervisor import log as logging
from supervisor.frontend import h1
from supervisor.frontend.heads import HeadError, ParsedHead, Request, parse_head, render_head
from supervisor.netguard import ConnectionGuard

_MAX_HEAD: Final = 64 * 1024
_PIPELINE_LIMIT: Final = 256 * 1024
_KNOWN_HEADS: Final = 256  # parsed request heads kept for reuse (each under _MAX_HEAD)
_LINGER: Final = 5.0  # seconds an unwanted body is read and dropped after a 413/400
_MAX_TRAILER: Final = 8 * 1024  # a chunked body's trailer section


class Reply:
    """How a handler answers: :meth:`send` a whole response, or :meth:`start` a chunked
    stream, :meth:`write` (waits while the client's buffer is full) or :meth:`write_now`
    (writes only if it can at once), and let the handler's return end it."""

    __slots__ = ("_conn", "_head_only", "keep_alive", "status", "streaming", "write_now")

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        # write_now(data) -> bool: write a chunk if the client's buffer has room now; False
        # if it has not (or the client is gone), and the caller waits on write() instead.
        # The connection's own method: it runs once per upstream read.
        self.write_now: Callable[[bytes], bool] = conn.write_now
        self._head_only = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        self.status = 0
        self.streaming = False

    @property
    def started(self) -> bool:
        return self.status != 0

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """The whole response, at once."""
        if self.status:
            raise RuntimeError("a response was already started")
        self.status = status
        fields = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if headers:
            fields.extend(headers)
        if not self.keep_alive:
            fields.append(("Connection", "close"))
        elif self._conn.http10:
            fields.append(("Connection", "keep-alive"))  # HTTP/1.0 closes unless told
        head = render_head(status, fields)
        self._conn.write(head if self._head_only else head + body)

    def start(self, status: int, headers: list[tuple[str, str]], first: bytes = b"") -> None:
        """Begin a streamed response (chunked on HTTP/1.1), with ``first`` as its first
        chunk if given."""
        if self.status:
            raise RuntimeError("a response was already started")
        self.status, self.streaming = status, True
        if self._conn.http10:
            self.keep_alive = False  # the body ends where the connection does
            fields = [*headers, ("Connection", "close")]
        else:
            fields = [*headers, ("Transfer-Encoding", "chunked")]
            if not self.keep_alive:
                fields.append(("Connection", "close"))
        self._conn.write(render_head(status, fields) + (self._conn.frame(first) if first else b""))

    async def write(self, data: bytes) -> None:
        """Write a chunk, then wait while the client's buffer is over the limit;
        ``ConnectionResetError`` if the client is gone."""
        await self._conn.write_waiting(data)


@dataclass(slots=True, init=False)
class _Head:
    """A request head whose body is still arriving."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    length: int
    chunked: bool
    keep_alive: bool
    chunks: h1.ChunkedBody | None  # chunked: the body's decoder
    parts: list[bytes]  # chunked: the data of its chunks so far

    # (Written: a generated __init__ is interpreted even in a compiled class.)
    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        version: str,
        headers: dict[str, str],
        length: int,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.method, self.path, self.query, self.version = method, path, query, version
        self.headers, self.length, self.chunked = headers, length, chunked
        self.keep_alive = keep_alive
        self.chunks, self.parts = None, []


Handler = Callable[[Request, Reply], Awaitable[None]]


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs the handler for one at a time."""

    def __init__(self, server: FrontendServer) -> None:
        self.server = server
        self.loop = server.loop
        self.guard = server.guard
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # when the timer fires (loop time)
        self.deadline = 0.0
        self.deadline_kind: str | None = None  # "head", "idle", "linger", or none
        # The connection's handler task, from its first request on: it handles one request
        # at a time and waits on ``wakeup`` for the next (waking a task costs a request
        # less than making one, and a task is made per connection instead).
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a request is being handled
        self.queued: Request | None = None  # read whole, for the handler task to take
        self.wakeup: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writable: asyncio.Event | None = None  # set while the client's buffer has room
        # Between pause_writing and resume_writing (the transport's own flow control, its
        # high-water mark the client buffer): read per write, where asking the transport
        # for its buffer's size would be a method call per token.
        self.write_paused = False
        self.closed = False
        self.lingering = False
        self.http10 = False
        self.head: _Head | None = None  # a parsed head waiting for its body
        self.head_timed = True  # a head deadline is armed (the first one from the accept)
        self.held = 0  # bytes of unfinished requests counted in the server's buffered

    # -- transport callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are stream transports without subclassing asyncio.Transport.
        self.transport = t = cast(asyncio.Transport, transport)
        if not self.guard.admit(t):
            self.closed = True
            return
        self.counted = True
        self.server.connections.add(self)
        t.set_write_buffer_limits(high=self.server.client_buffer)
        self._expect("head", self.server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering:
            return
        self.buf += data
        if self.busy:  # a pipelined request waits for the current one
            if len(self.buf) > _PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True
        else:
            self._next()
        if self.held or self.buf:  # (a whole request per read leaves nothing held)
            self._account()

    def _account(self) -> None:
        """Count what this connection holds of unfinished requests in the server's total;
        past the server's cap, refuse it (503) and drop what it held."""
        head = self.head
        held = len(self.buf)
        if head is not None and head.chunks is not None:  # (its decoder holds the rest)
            held += head.chunks.kept + len(head.chunks.pending)
        server = self.server
        server.buffered += held - self.held
        self.held = held
        if held and server.buffered > server.max_buffered and not self.lingering:
            self._refuse(503, "the server holds too many unfinished requests; try again")
            self.head = None
            server.buffered -= self.held
            self.held = 0

    def eof_received(self) -> bool | None:
        # The client will send nothing more. HTTP clients do not half-close while they
        # wait for an answer, so this is a hang-up: the transport closes and a running
        # handler is cancelled (connection_lost).
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None:
            self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if self.held:
            self.server.buffered -= self.held
            self.held = 0
        self.buf.clear()
        self.head = None
        if self.writable is not None:
            self.writable.set()  # a writer waiting on the client learns it is gone
        if not self.counted:
            return
        self.counted = False
        self.guard.open -= 1
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client went away: its request ends now

    # -- deadlines ----------------------------------------------------------------------
    # One deadline at a time (the head's, the idle connection's, the linger's), kept by one
    # timer that is moved only when a deadline comes sooner: a request on a kept-alive
    # connection costs no timer of its own.
    def _expect(self, kind: str | None, delay: float = 0.0) -> None:
        self.deadline_kind = kind
        if kind is None:
            return
        loop = self.loop
        self.deadline = when = loop.time() + delay
        if self.timer is None or self.timer_at > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_at = loop.call_at(when, self._deadline_passed), when

    def _deadline_passed(self) -> None:
        self.timer = None
        kind = self.deadline_kind
        if kind is None or self.closed:
            return
        loop = self.loop
        if loop.time() < self.deadline:  # moved later since the timer was set
            self.timer = loop.call_at(self.deadline, self._deadline_passed)
            self.timer_at = self.deadline
        elif kind == "head":
            self._head_too_slow()
        elif kind == "idle":
            self._idle_too_long()
        elif kind == "body":
            if not self.busy and self.head is not None:
                self._refuse(408, "the request body did not arrive within body_timeout")
                self.head = None
                self._account()
        else:
            self.close()

    def _disarm(self) -> None:
        self.deadline_kind = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_too_slow(self) -> None:
        if not self.closed and not self.busy and self.transport is not None:
            self._disarm()
            self.guard.time_out(self.transport)

    def _idle_too_long(self) -> None:
        if not self.closed and not self.busy and not self.buf:
            self.close()

    # -- parsing ------------------------------------------------------------------------
    def _next(self) -> None:
        """Take the next whole request off the buffer and start its handler, if there is
        one; else wait for more bytes."""
        buf = self.buf
        head = self.head
        if head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._refuse(431, "request head over 64 KiB")
                elif buf and not self.head_timed:
                    # A next request began on a kept-alive connection: its head has the
                    # same deadline as the first one's.
                    self.head_timed = True
                    self._expect("head", self.server.header_timeout)
                return
            if end > _MAX_HEAD:
                self._refuse(431, "request head over 64 KiB")
                return
            raw = bytes(buf[:end])
            known = self.server.heads.get(raw)
            if known is None:
                try:
                    known = self._read_head(raw)
                except HeadError as e:
                    self._refuse(e.status, str(e))
                    return
            method, path, query, version, fields, length, chunked, keep_alive, expect = known
            headers = dict(fields)  # the handler's own: the parsed one is shared
            del buf[: end + 4]
            if expect:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not chunked and len(buf) >= length:  # the body came with it (the usual case)
                self.deadline_kind = None  # the head is in: its deadline no longer applies
                body = bytes(buf[:length])
                del buf[:length]
                self._start(method, path, query, version, headers, body, keep_alive)
                return
            head = self.head = _Head(
                method, path, query, version, headers, length, chunked, keep_alive
            )
            self._expect("body", self.server.body_timeout)
        if head.chunked:
            try:
                whole = self._dechunk(head)
            except HeadError as e:
                self._refuse(e.status, str(e))
                self.head = None
                return
            if whole is None:
                return
            body = whole
        else:
            if len(buf) < head.length:
                return
            body = bytes(buf[: head.length])
            del buf[: head.length]
        self.head = None
        self.deadline_kind = None
        self._start(
            head.method, head.path, head.query, head.version, head.headers, body, head.keep_alive
        )

    def _read_head(self, raw: bytes) -> ParsedHead:
        """Parse and check a head, and keep it: a client sends the same head again and
        again on a kept-alive connection (only a body's length varies), and a look-up costs
        a tenth of a parse."""
        parsed = parse_head(raw)
        if parsed[5] > self.server.max_body:
            raise HeadError(413, f"request body over {self.server.max_body} bytes")
        heads = self.server.heads
        if len(heads) >= _KNOWN_HEADS:
            heads.clear()  # many different heads: keeping them would only cost memory
        heads[raw] = parsed
        return parsed

    def _start(
        self,
        method: str,
        path: str,
        query: str,
        version: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        """Run the handler for a request read whole."""
        self.http10 = version == "1.0"
        self.busy = True
        self.queued = Request(method, path, query, version, headers, body, keep_alive)
        if self.task is None:
            self.task = self.server.spawn(self._serve())
        elif self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)
        # (Else the handler task read this request itself, after its last one: it takes it.)

    def _dechunk(self, head: _Head) -> bytes | None:
        """Take the chunks that arrived off the buffer; the whole body once its last chunk
        (and trailer) is in, else None. :class:`HeadError` if malformed or too large (see
        :class:`supervisor.frontend.h1.ChunkedBody`)."""
        chunks = head.chunks
        if chunks is None:
            chunks = head.chunks = h1.ChunkedBody(_MAX_TRAILER, self.server.max_body)
        buf = self.buf
        data = bytes(buf)
        buf.clear()
        try:
            whole = chunks.feed(data, head.parts)
        except h1.ChunkError as e:
            raise HeadError(e.status, str(e)) from e
        if not whole:
            return None
        buf += chunks.rest  # (a request pipelined after this one)
        return b"".join(head.parts)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be read, then read and drop what the client still
        sends for a while (closing at once could reset the connection before the client
        reads the answer)."""
        body = self.server.error_body(status, message)
        head = render_head(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        self.server.count_refused(status)
        self.write(head + body)
        self.buf.clear()
        self.lingering = True
        self._expect("linger", _LINGER)
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    # -- the handler --------------------------------------------------------------------
    async def _serve(self) -> None:
        """The connection's handler task: each request in turn, while the connection lives
        (it is cancelled when the connection ends, waiting or not)."""
        while not self.closed:
            request = self.queued
            if request is None:
                self.wakeup = self.loop.create_future()
                try:
                    await self.wakeup
                finally:
                    self.wakeup = None
                continue
            self.queued = None
            await self._handle(request)

    async def _handle(self, request: Request) -> None:
        reply = Reply(self, request)
        try:
            await self.server.handler(request, reply)
        except asyncio.CancelledError:
            if not self.closed:
                raise  # the server is stopping
            return  # the client went away
        except Exception as e:  # a bug in the handler: contained, logged
            self.server.log.error("frontend handler failed", exc_info=e)
            if not reply.started:
                reply.keep_alive = False
                reply.send(500, self.server.error_body(500, "internal error in the supervisor"))
        finally:
            self.busy = False
        if reply.streaming and not self.http10 and not self.closed:
            self.write(b"0\r\n\r\n")
        if not reply.started:  # a handler that answered nothing: the client is gone
            self.close()
            return
        if not reply.keep_alive or self.closed:
            self.close()
            return
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        self.head_timed = False
        self._expect("idle", self.server.keepalive_timeout)
        self._next()

    # -- writing ------------------------------------------------------------------------
    def frame(self, data: bytes) -> bytes:
        return data if self.http10 else b"%x\r\n%b\r\n" % (len(data), data)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_now(self, data: bytes) -> bool:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        if self.write_paused:  # more than the client buffer waits for the client
            return False
        if data:
            t.write(self.frame(data))
        return True

    async def write_waiting(self, data: bytes) -> None:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        if data:
            t.write(self.frame(data))
        writable = self.writable
        while writable is not None and not writable.is_set():
            await writable.wait()
        if self.closed:
            raise ConnectionResetError("the client's connection is closed")

    def close(self) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class FrontendServer:
    """Listens for clients and hands each request to ``handler``; owns every handler task
    (:meth:`close` cancels and awaits what is left)."""

    def __init__(
        self,
        handler: Handler,
        guard: ConnectionGuard,
        *,
        max_body: int,
        header_timeout: float,
        keepalive_timeout: float,
        error_body: Callable[[int, str], bytes],
        count_refused: Callable[[int], None] = lambda status: None,
        client_buffer: int = 64 * 1024,
        body_timeout: float = 60.0,
        max_buffered: int = 256 * 1024 * 1024,
    ) -> None:
        self.handler, self.guard = handler, guard
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.max_buffered = max_buffered
        self.buffered = 0  # bytes of unfinished requests held for all connections
        self.header_timeout, self.keepalive_timeout = header_timeout, keepalive_timeout
        self.error_body, self.count_refused = error_body, count_refused
        self.client_buffer = client_buffer
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.heads: dict[bytes, ParsedHead] = {}  # see _Connection._read_head
        self.port = 0
        # Set by listen() and kept: asyncio.get_running_loop() makes a getpid() system
        # call on Python 3.11, and deadlines and tasks need the loop on every request.
        self.loop: asyncio.AbstractEventLoop
        self._server: asyncio.AbstractServer | None = None
        self.log = logging.get(component="frontend")

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._server = server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True
        )
        # (Read untyped: uvloop's sockets are a list where the stubs say tuple, and the
        # compiled module checks what the stubs say.)
        self.port = cast(Any, server).sockets[0].getsockname()[1]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """Stop listening, close every connection, and wait for the handlers to end."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(list(self.tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)
