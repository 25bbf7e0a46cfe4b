"""The frontend server's request framing, judged against llhttp's (Node's and uvicorn's
parser, through ``httptools``) on the same bytes.

The property, for every input of the corpus and of the fuzzer: the requests the server
hands to its handler are a prefix of the messages llhttp reads from the same bytes, each
with the same method, path, query and body. So wherever the server takes a request, llhttp
takes the same one, and where llhttp refuses, the server has refused already (or still
waits for bytes): a hop in front of the daemon that reads requests as llhttp does can never
see one request where the daemon sees two. The server may refuse more than llhttp does
(stricter), never less.

The server runs in-process over a fake transport, so each input is judged deterministically,
split at the fuzzer's points into separate reads.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.frontend.heads import Request
from supervisor.frontend.server import FrontendServer, Reply, _Connection
from supervisor.frontend.validate import error_body
from supervisor.netguard import ConnectionGuard

# (method, path, query, body)
Message = tuple[str, str, str, bytes]


class FakeTransport:
    """Enough of an asyncio transport for one server connection: what is written is kept."""

    def __init__(self, protocol: _Connection) -> None:
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def pieces(data: bytes, splits: list[int]) -> list[bytes]:
    cuts = sorted({s % (len(data) + 1) for s in splits} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a] or [b""]


async def served(data: bytes, splits: list[int]) -> tuple[list[Message], bytes]:
    """The requests the server hands its handler for ``data`` (read in pieces), and what
    it wrote back."""
    seen: list[Message] = []

    async def handler(request: Request, reply: Reply) -> None:
        seen.append((request.method, request.path, request.query, request.body))
        reply.send(200, b"{}")

    server = FrontendServer(
        handler,
        ConnectionGuard("differential", 10, 5.0),
        max_body=1 << 20,
        header_timeout=5.0,
        keepalive_timeout=5.0,
        error_body=error_body,
    )
    server.loop = asyncio.get_running_loop()
    conn = _Connection(server)
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces(data, splits):
        if transport.closing:
            break
        conn.data_received(piece)
        for _ in range(50):  # let the handler task take what is whole
            await asyncio.sleep(0)
            if not conn.busy:
                break
    transport.close()
    await asyncio.sleep(0)
    await server.close()
    assert server.buffered == 0  # whatever was held is counted out again
    return seen, bytes(transport.out)


def llhttp(data: bytes, splits: list[int]) -> tuple[list[Message], bool]:
    """The messages llhttp reads from ``data`` (fed in the same pieces), and whether it
    found an error."""
    messages: list[Message] = []
    current: dict[str, bytes] = {}

    class Callbacks:
        def on_message_begin(self) -> None:
            current.clear()
            current["url"], current["body"] = b"", b""

        def on_url(self, url: bytes) -> None:
            current["url"] += url

        def on_body(self, body: bytes) -> None:
            current["body"] += body

        def on_message_complete(self) -> None:
            path, _, query = current["url"].partition(b"?")
            method = parser.get_method().decode("ascii")
            messages.append(
                (method, path.decode("latin-1"), query.decode("latin-1"), current["body"])
            )

    parser = httptools.HttpRequestParser(Callbacks())
    try:
        for piece in pieces(data, splits):
            parser.feed_data(piece)
    except httptools.HttpParserError:
        return messages, True
    return messages, False


def judge(data: bytes, splits: list[int] | None = None) -> tuple[list[Message], bytes]:
    splits = splits or []
    mine, answer = asyncio.run(served(data, splits))
    reference, _ = llhttp(data, splits)
    assert mine == reference[: len(mine)], (data, mine, reference)
    return mine, answer


# -- the corpus: each smuggling shape, then a request that must never run -----------------
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def post(*fields: bytes, body: bytes = b"") -> bytes:
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(fields) + b"\r\n" + body


BAD = {
    "content-length: arabic-indic five": post(b"Content-Length: \xd9\xa5\r\n", body=b"AAAAA"),
    "content-length: fullwidth five": post(b"Content-Length: \xef\xbc\x95\r\n", body=b"AAAAA"),
    "content-length: VT then 5": post(b"Content-Length: \x0b5\r\n", body=b"AAAAA"),
    "content-length: superscript two": post(b"Content-Length: \xc2\xb2\r\n", body=b"AA"),
    "content-length: a list": post(b"Content-Length: 5, 5\r\n", body=b"AAAAA"),
    "content-length: twice, equal": post(
        b"Content-Length: 5\r\nContent-Length: 5\r\n", body=b"AAAAA"
    ),
    "content-length: sign": post(b"Content-Length: +5\r\n", body=b"AAAAA"),
    "content-length and transfer-encoding": post(
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", body=b"0\r\n\r\n"
    ),
    "transfer-encoding: kelvin sign": post(
        b"Transfer-Encoding: chun\xe2\x84\xaaed\r\n", body=b"0\r\n\r\n"
    ),
    "transfer-encoding: VT": post(b"Transfer-Encoding: \x0bchunked\r\n", body=b"0\r\n\r\n"),
    "transfer-encoding: xchunked": post(b"Transfer-Encoding: xchunked\r\n", body=b"0\r\n\r\n"),
    "transfer-encoding: gzip, chunked": post(
        b"Transfer-Encoding: gzip, chunked\r\n", body=b"0\r\n\r\n"
    ),
    "chunk extension: bare LF": post(
        b"Transfer-Encoding: chunked\r\n", body=b"2;\nX\r\nAA\r\n0\r\n\r\n"
    ),
    "chunk extension: CR": post(
        b"Transfer-Encoding: chunked\r\n", body=b"2;a\rb\r\nAA\r\n0\r\n\r\n"
    ),
    "chunk extension: NUL": post(
        b"Transfer-Encoding: chunked\r\n", body=b"2;a\x00\r\nAA\r\n0\r\n\r\n"
    ),
    "chunk size: leading spaces": post(
        b"Transfer-Encoding: chunked\r\n", body=b"  2\r\nAA\r\n0\r\n\r\n"
    ),
    "chunk size: 0x": post(b"Transfer-Encoding: chunked\r\n", body=b"0x2\r\nAA\r\n0\r\n\r\n"),
    "chunk size: underscore": post(
        b"Transfer-Encoding: chunked\r\n", body=b"1_0\r\n" + b"A" * 16 + b"\r\n0\r\n\r\n"
    ),
    "chunk size: sign": post(b"Transfer-Encoding: chunked\r\n", body=b"+2\r\nAA\r\n0\r\n\r\n"),
    "trailer: bare LF swallows a request": post(b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\n"),
    "trailer: not a field": post(
        b"Transfer-Encoding: chunked\r\n", body=b"0\r\nnot a field\r\n\r\n"
    ),
    "header value: NUL": post(b"X-A: a\x00b\r\nContent-Length: 0\r\n"),
    "header value: DEL": post(b"X-A: a\x7fb\r\nContent-Length: 0\r\n"),
    "header value: VT": post(b"X-A: a\x0bb\r\nContent-Length: 0\r\n"),
    "header value: bare CR": post(b"X-A: a\rb\r\nContent-Length: 0\r\n"),
    "header name: space before colon": post(b"Content-Length : 0\r\n"),
    "folded header line": post(b"X-A: a\r\n b\r\nContent-Length: 0\r\n"),
    "no Host": b"POST /v1/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "two Hosts": post(b"Host: y\r\nContent-Length: 0\r\n"),
    "HTTP/1.0 with Transfer-Encoding": (
        b"POST /v1/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "absolute-form target": b"GET http://x/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown method": b"SMUGGLE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare LF line ends": b"GET /v1/models HTTP/1.1\nHost: x\n\n",
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_smuggling_shape_is_refused_and_the_next_request_never_runs(name: str) -> None:
    mine, answer = judge(BAD[name] + SMUGGLED)
    assert not any(m[1] == "/smuggled" for m in mine), name
    assert mine == [], name  # refused whole: nothing of it ran
    status = answer[9:12]
    assert answer.startswith(b"HTTP/1.1 ") and status in (b"400", b"501", b"505"), answer[:80]
    assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]


GOOD = [
    post(b"Content-Length: 5\r\n", body=b"hello"),
    post(b"content-LENGTH:   5  \r\n", body=b"hello"),
    post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\n\r\n"),
    post(b"Transfer-Encoding: CHUNKED\r\n", body=b'5;a=b;c="d e"\r\nhello\r\n0\r\nX-T: 1\r\n\r\n'),
    post(b"Content-Length: 0\r\n") + post(b"Content-Length: 2\r\n", body=b"hi"),
    b"GET /v1/models?x=1&y=%20 HTTP/1.1\r\nHost: x\r\nX-Unicode: caf\xc3\xa9\r\n\r\n",
    b"GET /v1/models HTTP/1.0\r\n\r\n",
    b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + SMUGGLED,
]


@pytest.mark.parametrize("data", GOOD)
def test_well_formed_requests_are_read_as_llhttp_reads_them(data: bytes) -> None:
    mine, _ = judge(data)
    for split in range(0, len(data), 7):  # and in pieces
        assert judge(data, [split, split + 3])[0] == mine
    assert mine and all(m[0] in ("GET", "POST") for m in mine)


# -- the fuzzer ------------------------------------------------------------------------------
NASTY = [b"\r", b"\n", b" ", b"\t", b"\x00", b"\x0b", b"\x7f", b"\xc2\xb2", b"0", b";", b":", b","]
FIELDS = st.sampled_from(
    [
        b"Host: x\r\n",
        b"Host: y\r\n",
        b"Content-Type: application/json\r\n",
        b"Connection: close\r\n",
        b"Connection: keep-alive\r\n",
        b"Expect: 100-continue\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 03\r\n",
        b"X-A: \xff\r\n",
        b"X-B:\r\n",
    ]
)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=5), max_size=3)):
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b';a="x y"', b"; a", b";a=\x01"]))
        out += b"%x%b\r\n%b\r\n" % (len(data), ext, data)
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"bad\r\n", b"\n"]))
    return out + b"0\r\n" + trailer + b"\r\n"


@st.composite
def message(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PURGE", b"get"]))
    target = draw(st.sampled_from([b"/v1/completions", b"/a?b=c", b"*", b"/x#y", b"/\xc3\xa9"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"]))
    fields = b"".join(draw(st.lists(FIELDS, max_size=4)))
    body = draw(st.one_of(st.just(b""), st.just(b"abc"), chunked_body()))
    return method + b" " + target + b" " + version + b"\r\n" + fields + b"\r\n" + body


@st.composite
def stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(message(), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(0, 2))):  # a byte or two changed or inserted anywhere
        at = draw(st.integers(0, len(data)))
        nasty = draw(st.sampled_from(NASTY))
        keep = draw(st.booleans())
        data = data[:at] + nasty + data[at + (0 if keep else len(nasty)) :]
    splits = draw(st.lists(st.integers(0, len(data)), max_size=3))
    return data, splits


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream())
def test_fuzzed_requests_are_read_as_llhttp_reads_them_or_refused(
    case: tuple[bytes, list[int]],
) -> None:
    judge(*case)
