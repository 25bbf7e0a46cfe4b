"""The engine client's framing against llhttp's (Node's parser, through ``httptools``): for
every answer in a corpus (the hostile cases, and well-formed answers of every framing) and
for answers a fuzzer makes by mutating well-formed ones, the client either refuses the
answer or reads exactly what llhttp reads: the same status, the same body bytes, the same
end of the message. Where llhttp refuses, the client refuses too; the client may refuse
more (it is stricter on purpose), never less.

Each answer is fed to a real :class:`EngineConnection` (on a stand-in transport: no socket
is needed to judge bytes) twice: cut where the fuzzer says, and a byte at a time (which also
tells where the message ended); both must decide alike.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.frontend.wire import EngineConnection


@dataclass(frozen=True)
class Reading:
    """What one parser made of an answer; ``status`` 0: refused (or cut short)."""

    status: int = 0
    body: bytes = b""
    # The read after which the answer was whole (None: at the connection's end); with a
    # byte a read, where it ended.
    end: int | None = None
    reusable: bool = False  # the connection could carry another request


class _Transport:
    """Stands in for a socket: the client only writes its request and may close."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_RUNNER: list[asyncio.Runner] = []


@pytest.fixture(scope="module", autouse=True)
def _one_loop() -> Iterator[None]:
    """One event loop for every reading (a loop made and closed per reading took most of
    this file's time)."""
    with asyncio.Runner() as runner:
        _RUNNER.append(runner)
        yield
        _RUNNER.clear()


def ours(data: bytes, cuts: list[int]) -> Reading:
    """The engine client's reading of ``data`` arriving in reads cut at ``cuts``."""

    async def read() -> Reading:
        conn = EngineConnection(("127.0.0.1", 1))
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        conn.send("/v1/completions", {}, b"{}")
        body: list[bytes] = []
        conn.set_sink(body.append)
        end: int | None = None
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        for a, b in itertools.pairwise(bounds):
            conn.data_received(data[a:b])
            if conn.error is not None:
                return Reading()
            if conn.done and end is None:
                end = b
        if not conn.done:  # the engine closes: the end of an answer framed by it
            conn.eof_received()
        if conn.error is not None or not conn.done:
            return Reading()
        return Reading(conn.status, b"".join(body), end, conn.ready_again())

    return _RUNNER[0].run(read())


class _Events:
    """llhttp's callbacks: what the message being read said (asked of the parser when its
    head is complete: llhttp forgets it once the message is)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.completed = 0
        self.status = 0
        self.keep_alive = False
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.body = []

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.completed += 1


def llhttp(data: bytes) -> Reading:
    """llhttp's reading of the first final (not 1xx) answer in ``data``, fed a byte at a
    time so that where it ends is known."""
    events = _Events()
    for i in range(len(data)):
        before = events.completed
        try:
            events.parser.feed_data(data[i : i + 1])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return Reading()
        if events.completed > before and not 100 <= events.status < 200:
            return Reading(events.status, b"".join(events.body), i + 1, events.keep_alive)
    if not events.status or events.keep_alive:  # cut short: more was to come
        return Reading()
    return Reading(events.status, b"".join(events.body), None, False)  # ended by the close


def check(data: bytes, cuts: list[int]) -> Reading:
    cut = ours(data, cuts)
    mine = ours(data, list(range(len(data))))  # a byte a read: where the answer ended
    assert replace(cut, end=None) == replace(mine, end=None), "decided otherwise when cut"
    if mine.status:
        theirs = llhttp(data)
        assert (mine.status, mine.body, mine.end) == (theirs.status, theirs.body, theirs.end)
        if mine.reusable:  # kept for another request: nothing may follow the answer
            assert mine.end == len(data) and theirs.reusable
    return mine


OK = b"HTTP/1.1 200 OK\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
CHUNKED = b"2\r\nok\r\n0\r\n\r\n"

WELL_FORMED = [
    OK + b"Content-Length: 2\r\n\r\nok",
    OK + b"content-length:   2 \t\r\nX-A: \t b c \r\n\r\nok",
    OK + b"Content-Length: 0\r\n\r\n",
    OK + b"Content-Length: 007\r\n\r\n1234567",
    OK + TE + b"\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: CHUNKED\r\n\r\n" + CHUNKED,
    OK + TE + b'\r\n2;a=b;c="d \\" e"\r\nok\r\nA;x\r\n0123456789\r\n0;end\r\nX-T: 1\r\n\r\n',
    OK + TE + b"\r\n0000\r\nA: b\r\nC-D: e f\r\n\r\n",
    OK + b"\r\nclose-delimited",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 599 Whatever \x80\xff\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
    OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
    OK + b"Connection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    + OK
    + TE
    + b"\r\n"
    + CHUNKED,
    # Bytes past the answer (pipelined, or garbage): read, and the connection not kept.
    OK + b"Content-Length: 0\r\n\r\n" + OK + b"Content-Length: 6\r\n\r\nforged",
    OK + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
    OK + TE + b"\r\n" + CHUNKED + b"garbage",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok",
]

BAD_SIZES = [b"0x2", b"1_0", b" +2 ", b" 2", b"2 ", b"+2", b"-2", b"\xd9\xa2", b"2;", b"2\x00"]
BAD_SIZES += [b"2;\nx", b"2;a=\x00", b"2 ;a=b", b"2;a b", b'2;a="b', b"2\r"]
BAD_TRAILERS = [b"not a field\r\n", b": no name\r\n", b"X-T: a\x00b\r\n", b"X-T : b\r\n"]
BAD_TRAILERS += [b"HTTP/1.1 200 OK\r\n", b"\n", b"X-T: b\n"]
HOSTILE = [
    b"HTTP/1.1 100\r\n\r\n" * 20 + OK + b"Content-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK + b"\r\n",
    OK + b"X-Pad: " + b"p" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 \xd9\xa500 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 +20 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok",
    OK + b"X-A : b\r\nContent-Length: 2\r\n\r\nok",
    OK + b"X-A: b\x7fc\r\nContent-Length: 2\r\n\r\nok",
    OK + b"X-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
    OK + b"Content-Length: 2\r\n" + TE + b"\r\n" + CHUNKED,
    OK + TE + b"Content-Length: 13\r\n\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: xchunked\r\n\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED,
    OK + TE + TE + b"\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: chun\xe2\x84\xaaed\r\n\r\n" + CHUNKED,
    OK + b"Transfer-Encoding: \x0bchunked\r\n\r\n" + CHUNKED,
    b"HTTP/1.0 200 OK\r\n" + TE + b"\r\n" + CHUNKED,
    OK + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    OK + b"Content-Length: 2\r\nContent-Length: 5\r\n\r\nok",
    OK + b"Content-Length: 2, 2\r\n\r\nok",
    OK + b"Content-Length: \xd9\xa2\r\n\r\nok",
    OK + b"Content-Length: \xef\xbc\x92\r\n\r\nok",
    OK + b"Content-Length: \xc2\xb2\r\n\r\nok",
    OK + b"Content-Length: \x0b2\r\n\r\nok",
    OK + b"Content-Length: +2\r\n\r\nok",
    OK + b"Content-Length: -2\r\n\r\nok",
    OK + b"Content-Length: 0x2\r\n\r\nok",
    *[OK + TE + b"\r\n" + size + b"\r\nok\r\n0\r\n\r\n" for size in BAD_SIZES],
    *[OK + TE + b"\r\n2\r\nok\r\n0\r\n" + trailer + b"\r\n" for trailer in BAD_TRAILERS],
    OK + TE + b"\r\n2\r\nokXY0\r\n\r\n",
    OK + b"Content-Length: 5\r\n\r\nok",  # cut short
    OK + TE + b"\r\n" + CHUNKED[:-2],
]


@pytest.mark.parametrize("data", WELL_FORMED)
def test_well_formed_answers_read_as_llhttp_reads_them(data: bytes) -> None:
    assert check(data, [len(data) // 3, len(data) // 2]).status


@pytest.mark.parametrize("data", HOSTILE)
def test_hostile_answers_are_refused_as_llhttp_refuses_them_or_more(data: bytes) -> None:
    check(data, [len(data) // 2])


# -- the fuzzer --------------------------------------------------------------------------------
def _mixed_case(draw: st.DrawFn, name: bytes) -> bytes:
    return bytes(c ^ 0x20 if 65 <= (c & 0xDF) <= 90 and draw(st.booleans()) else c for c in name)


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """A well-formed answer (interim answers first, any framing, perhaps bytes after it)."""
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    status = draw(st.sampled_from([200, 200, 204, 304, 404, 500, 599]))
    # (No chunked answer from HTTP/1.0: refused, as RFC 9112 says its framing is faulty.)
    version = b"1.1" if framing == "chunked" else draw(st.sampled_from([b"1.1", b"1.0"]))
    head = b"HTTP/%b %d %b\r\n" % (version, status, draw(st.sampled_from([b"OK", b"", b"x y"])))
    fields = [b"X-Other: %b" % draw(st.sampled_from([b"v", b"", b"a, b", b'"q"']))]
    if framing == "length":
        fields.append(_mixed_case(draw, b"Content-Length") + b": %d" % len(body))
        payload = body
    elif framing == "chunked":
        fields.append(_mixed_case(draw, b"Transfer-Encoding") + b": chunked")
        payload = b""
        rest = body
        while rest:
            n = draw(st.integers(1, len(rest)))
            ext = draw(st.sampled_from([b"", b";a", b";a=b", b';a="b c"']))
            payload += b"%x%b\r\n%b\r\n" % (n, ext, rest[:n])
            rest = rest[n:]
        payload += b"0\r\n" + draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n"
    else:
        payload = body
    if draw(st.booleans()):
        fields.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive"])))
    order = draw(st.permutations(fields))
    interim = draw(st.lists(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n"]), max_size=2))
    tail = b"" if framing == "close" else draw(st.sampled_from([b"", b"", b"HTTP/1.1 2"]))
    fields_text = b"".join(f + b"\r\n" for f in order)
    return b"".join(interim) + head + fields_text + b"\r\n" + payload + tail


# Bytes that parsers have read differently: whitespace and controls, signs and separators,
# and the UTF-8 of characters that Unicode takes for digits or letters.
ODD = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x0b", b"\x7f", b",", b";", b"=", b"+"]
ODD += [b"-", b"_", b"0x", b"0", b"\xd9\xa5", b"\xef\xbc\x95", b"\xc2\xb2", b"\xe2\x84\xaa"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(answers())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["insert", "delete", "case", "repeat-line"]))
        if what == "insert":
            data = data[:at] + draw(st.sampled_from(ODD)) + data[at:]
        elif what == "delete" and at < len(data):
            data = data[:at] + data[at + 1 :]
        elif what == "case" and at < len(data):
            data = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :]
        elif what == "repeat-line":
            start = data.rfind(b"\r\n", 0, at) + 2
            end = data.find(b"\r\n", at)
            if 2 <= start < end:
                data = data[:end] + b"\r\n" + data[start:end] + data[end:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.lists(st.integers(min_value=0), max_size=5))
def test_mutated_answers_are_read_as_llhttp_reads_them_or_refused(
    data: bytes, cuts: list[int]
) -> None:
    check(data, cuts)


@settings(max_examples=100, deadline=None)
@given(answers(), st.lists(st.integers(min_value=0), max_size=5))
def test_well_formed_answers_are_never_refused(data: bytes, cuts: list[int]) -> None:
    assert check(data, cuts).status
