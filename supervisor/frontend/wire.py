"""The relay's HTTP/1.1 client to engines: lean, on asyncio's ``Protocol``.

A streamed answer is thousands of small reads. Through a general-purpose client each read
wakes a task, passes through a stream reader and an async iterator or two before the relay
sees it. Here the connection hands each read's body bytes to a plain callback (the relay
decodes them and writes to its client there and then), so a read costs no task switch.

Only what talking to an engine needs: a JSON body or none (the health probes' ``GET``), a
response framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's
end, keep-alive with a pool per engine (:mod:`supervisor.frontend.engine_pool`). Anything
else an engine sends is :class:`EngineProtocolError`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Final, cast

from supervisor.frontend.h1 import (
    COLON,
    CR,
    DIGIT_0,
    DIGIT_1,
    DIGIT_9,
    FIELD_LINES,
    LF,
    SP,
    TOKEN,
    ChunkedBody,
    ChunkError,
    content_length,
    is_chunked,
)
from supervisor.frontend.wire_errors import EngineConnectionError, EngineProtocolError

__all__ = ["EngineConnection", "EngineConnectionError", "EngineProtocolError"]

# Idle connections are kept for less than engines' own keep-alive timeout (uvicorn, under
# vLLM, SGLang and trtllm-serve, closes them after 5 s): reusing one the engine is closing
# would fail a request for nothing.
IDLE_FOR: Final = 2.0
MAX_HEAD: Final = 64 * 1024  # a response's status line and headers (and its trailers)
MAX_INTERIM: Final = 16  # interim (1xx) answers before one answer
# The status line, by RFC 9112's grammar (the reason phrase may be left out, as llhttp
# allows): version 1.0 or 1.1, a three-digit code, a reason without control bytes.
_STATUS_LINE: Final = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n"
)
# Each byte's class in a head: a token byte, another byte a field value may hold (space,
# tab, visible ASCII, obs-text), or neither (a control byte, DEL, CR, LF: 0).
_TOKEN_BYTE: Final = 1
_CLASS: Final = bytes(
    _TOKEN_BYTE if c in TOKEN else 2 if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80 else 0
    for c in range(256)
)
_ZEROS: Final = 111 * 0x30  # three ASCII digits' codes, less their values


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
        self._head_part = bytearray()  # a head cut across reads, gathered
        self._interim = 0  # interim (1xx) answers before this one
        self._bodiless = False  # an answer to HEAD: no body, whatever its fields say
        self._state = "idle"  # idle | head | body | done | closed
        self._held: list[bytes] = []  # body bytes that came before a sink
        self._chunks: ChunkedBody | None = None  # the body's chunks (chunked framing)
        self._left: int | None = None  # body bytes still to come (Content-Length framing)
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
        except (EngineProtocolError, ValueError, IndexError) as e:
            # (ValueError, IndexError: never expected from the checks above, but an engine's
            # bytes must end in a clear error, never in a traceback on the transport.)
            self._fail(e if isinstance(e, EngineProtocolError) else EngineProtocolError(repr(e)))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        if self._state == "body" and self._left is None and self._chunks is None:
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
        self._state, self.received_any = "head", False
        self._interim, self._bodiless = 0, method == "HEAD"
        if self._head_part:  # (only after an answer that failed mid-head)
            self._head_part.clear()
        self.status, self.reason, self.sink, self._held = 0, "", None, []
        self.content_type = ""
        self._chunks, self._left = None, None
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
        """Take a read while the head is awaited: the body bytes after the head, once it
        has come (interim answers before it skipped)."""
        part = self._head_part
        if part:  # the head came cut across reads: gathered, and searched only where new
            start = max(len(part) - 3, 0)
            part.extend(data)
            end = part.find(b"\r\n\r\n", start)
            if end < 0:
                _check_partial(part, start, 0)
                return b""
            buf = bytes(part)
            part.clear()
        else:
            buf, end = data, data.find(b"\r\n\r\n")
            if end < 0:
                _check_partial(data, 0, 0)
                part.extend(data)
                return b""
        pos = 0
        # Interim answers (100 Continue, 103 Early Hints) come before the answer: skipped in
        # a loop, a bounded number of them, each read where it lies (no copy of the rest).
        while self._take_status(buf, pos, end):
            pos = end + 4
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise EngineProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                _check_partial(buf, pos, pos)
                part.extend(memoryview(buf)[pos:])
                return b""
        self._state = "body"
        assert self._head_fut is not None
        if not self._head_fut.done():
            self._head_fut.set_result(None)
        rest = buf[end + 4 :] if end + 4 < len(buf) else b""
        if self._left == 0:
            self._finish()
            if rest:
                self._reusable = False  # bytes past the answer: not a clean connection
        return rest

    def _take_status(self, buf: bytes, pos: int, end: int) -> bool:
        """Read the head ``buf[pos:end]`` (its final blank line at ``end``) by RFC 9112's
        grammar; True if it is an interim (1xx) answer, to be skipped."""
        if end - pos > MAX_HEAD:
            raise EngineProtocolError(f"response headers over {MAX_HEAD} bytes")
        # Read a byte at a time against a table, compiled: this runs for every request,
        # and a regular expression's steps (or a method call on a built-in, about a
        # thousand instructions each) cost several times more. Every check below fails at
        # the latest on the CR at ``end``: no index goes past it.
        if not buf.startswith(b"HTTP/1.", pos):
            raise EngineProtocolError(_malformed_head(buf, pos))
        version = buf[pos + 7]
        d1, d2, d3 = buf[pos + 9], buf[pos + 10], buf[pos + 11]
        if (
            (version != DIGIT_0 and version != DIGIT_1)
            or buf[pos + 8] != SP
            or not DIGIT_1 <= d1 <= DIGIT_9
            or not DIGIT_0 <= d2 <= DIGIT_9
            or not DIGIT_0 <= d3 <= DIGIT_9
        ):
            raise EngineProtocolError(_malformed_head(buf, pos))
        i = pos + 12
        reason_at = i + 1
        if buf[i] == SP:
            i += 1
            while _CLASS[buf[i]]:  # the reason: any field-value byte
                i += 1
        if buf[i] != CR or buf[i + 1] != LF:
            raise EngineProtocolError(_malformed_head(buf, pos))
        status = d1 * 100 + d2 * 10 + d3 - _ZEROS
        if status < 200:
            if status == 101:  # a protocol switch: not one this client asked for
                raise EngineProtocolError("the engine switched protocols (101)")
            self._check_fields(buf, i + 2, end + 2)
            return True
        self.status = status
        self.reason = buf[reason_at:i].decode("latin-1") if reason_at < i else ""
        http10 = version == DIGIT_0
        length, chunked = self._check_fields(buf, i + 2, end + 2)
        if chunked and (length >= 0 or http10):
            # Both framings at once (or chunked from an HTTP/1.0 server, RFC 9112 6.1):
            # another hop could read either; the answer cannot be trusted.
            raise EngineProtocolError("Transfer-Encoding with Content-Length or HTTP/1.0")
        if http10:
            self._reusable = False  # not kept alive unless negotiated: never reused here
        if self._bodiless or status == 204 or status == 304:
            self._left = 0  # no body, whatever the fields say (RFC 9112 6.3)
        elif chunked:
            self._chunks = ChunkedBody(MAX_HEAD)
        elif length >= 0:
            self._left = length
        else:
            self._reusable = False  # framed by the connection's end
        return False

    def _check_fields(self, buf: bytes, i: int, stop: int) -> tuple[int, bool]:
        """Check the field lines from ``i`` to ``stop`` (where the empty line is), each
        ``token ":" value CRLF``; the Content-Length (-1: none) and whether the answer is
        chunked. A ``Connection: close`` makes the connection non-reusable."""
        length = -1
        chunked = False
        while i < stop:
            start = i
            while _CLASS[buf[i]] == _TOKEN_BYTE:
                i += 1
            colon = i
            if colon == start or buf[colon] != COLON:
                raise EngineProtocolError(f"malformed header line: {_bad_line(buf, start)!r}")
            i += 1
            while _CLASS[buf[i]]:
                i += 1
            if buf[i] != CR or buf[i + 1] != LF:
                raise EngineProtocolError(f"malformed header line: {_bad_line(buf, start)!r}")
            eol = i
            i += 2
            size = colon - start  # only four fields are read here; their lengths differ
            if size != 14 and size != 17 and size != 10 and size != 12:
                continue
            name = buf[start:colon].lower()
            value = buf[colon + 1 : eol].strip(b" \t")
            if name == b"transfer-encoding":
                if chunked or not (value == b"chunked" or is_chunked(value)):
                    raise EngineProtocolError(
                        f"repeated or unsupported Transfer-Encoding: {value[:40]!r}"
                    )
                chunked = True
            elif name == b"content-length":
                if length >= 0:
                    raise EngineProtocolError("two Content-Length fields")
                length = content_length(value)
                if length < 0:
                    raise EngineProtocolError(f"bad Content-Length: {value[:40]!r}")
            elif name == b"connection" and _lists_close(value):
                self._reusable = False
            elif name == b"content-type":  # passed on to the client by forwarded routes
                self.content_type = value.decode("latin-1")
        return length, chunked

    def _deliver(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            self._held.append(data)

    def _take_body(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is None:
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
        out: list[bytes] = []
        try:
            whole = chunks.feed(data, out)
        except ChunkError as e:
            raise EngineProtocolError(str(e)) from e
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))
        if whole:
            if chunks.rest:
                self._reusable = False  # more than the answer: not a clean connection
            self._finish()

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


def _check_partial(buf: bytes | bytearray, start: int, head_at: int) -> None:
    """A head not yet whole (it starts at ``head_at``, ``start`` is where the bytes not
    yet looked at begin): too long already, or a line ended by a bare LF, which no CRLF
    would ever end (refused now rather than waited on)."""
    if len(buf) - head_at > MAX_HEAD:
        raise EngineProtocolError(f"response headers over {MAX_HEAD} bytes")
    lf = buf.find(b"\n", start)
    while lf >= 0:
        if lf == head_at or buf[lf - 1] != CR:
            raise EngineProtocolError("a response head line ended by a bare LF")
        lf = buf.find(b"\n", lf + 1)


def _malformed_head(buf: bytes, pos: int) -> str:
    """What is wrong with the head at ``pos``, which did not match (for the error)."""
    m = _STATUS_LINE.match(buf, pos)
    if m is None:
        line = buf[pos : buf.find(b"\r\n", pos)]
        return f"not an HTTP/1.1 status line: {line[:80]!r}"
    return f"malformed header line: {_bad_line(buf, m.end())!r}"


def _bad_line(buf: bytes, at: int) -> bytes:
    """The first of the field lines from ``at`` that is not one (for the error)."""
    m = FIELD_LINES.match(buf, at)
    start = m.end() if m is not None else at
    return buf[start : buf.find(b"\r\n", start)][:80]


def _lists_close(value: bytes) -> bool:
    """Whether a ``Connection`` value lists ``close`` (ASCII, any case)."""
    return any(part.strip(b" \t").lower() == b"close" for part in value.split(b","))
