"""HTTP/1.1 request heads, read by RFC 9112's grammar on their bytes, and response heads,
rendered: the frontend server's framing (see :mod:`supervisor.frontend.server`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from supervisor.frontend import h1

_MAX_FIELDS: Final = 128
_VER: Final = b"0123456789."
# An origin-form target's bytes (RFC 3986's pchar, "/" and "?"): no space, no control byte,
# none of the characters a URL must escape (llhttp refuses some of them).
_TARGET: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/?"
)
# The methods served (405/404 come from the routes); any other token is 501, as RFC 9110
# says of a method the server does not know.
_METHODS: Final = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"))
REASONS: Final = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    403: "Forbidden",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclass(slots=True, init=False)
class Request:
    """One parsed request. Header names are lower-case; a repeated field's values are
    joined with ``", "``; values are decoded as UTF-8 with undecodable bytes kept as
    surrogates (so a bad byte compares unequal instead of raising)."""

    method: str
    path: str
    query: str
    version: str  # "1.1" or "1.0"
    headers: dict[str, str]
    body: bytes
    keep_alive: bool

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one is built per request.)
    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        version: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


# (method, path, query, version, headers, body length, chunked, keep-alive, expects 100)
ParsedHead = tuple[str, str, str, str, dict[str, str], int, bool, bool, bool]


class HeadError(Exception):
    """A request that cannot be read: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> ParsedHead:
    """A request head (without the blank line that ends it) read by RFC 9112's grammar on
    its bytes: ``(method, path, query, version, headers, body length, chunked, keep-alive,
    expects 100-continue)``, or :class:`HeadError`. Header names come lower-case and a
    repeated field's values joined with ``", "``; values are decoded as UTF-8 with
    undecodable bytes kept as surrogates (a bad byte compares unequal instead of
    raising). The framing is judged on the bytes alone."""
    eol = head.find(b"\r\n")
    first, block = (head, b"") if eol < 0 else (head[:eol], head[eol + 2 :] + b"\r\n")
    parts = first.split(b" ")
    # (x.translate(None, allowed) keeps only the bytes not allowed: b"" when all are.)
    if len(parts) != 3 or not parts[0] or parts[0].translate(None, h1.TOKEN):
        raise HeadError(400, "malformed request line")
    method, target, proto = parts
    if proto == b"HTTP/1.1":
        http11 = True
    elif proto == b"HTTP/1.0":
        http11 = False
    elif (
        len(proto) == 8
        and proto.startswith(b"HTTP/")
        and not proto[5:].translate(None, b"0123456789.")
    ):
        raise HeadError(505, "only HTTP/1.1 and HTTP/1.0 are spoken here")
    else:
        raise HeadError(400, "malformed request line")
    if not target.startswith(b"/") or target.translate(None, _TARGET):
        raise HeadError(400, "malformed request target")
    if method not in _METHODS:
        raise HeadError(501, "method not implemented")
    headers: dict[str, str] = {}
    hosts = 0
    lengths: list[bytes] = []
    codings: list[bytes] = []
    keep_alive = http11
    expect_continue = False
    if block:
        if block.count(b"\n") > _MAX_FIELDS:
            raise HeadError(431, f"more than {_MAX_FIELDS} header fields")
        # Every field checked at once (in C): a token, a colon, a value without control
        # bytes; no space before the colon, no folded line.
        if h1.FIELD_LINES.fullmatch(block) is None:
            raise HeadError(400, "malformed header field")
        for name, value in h1.FIELD.findall(block):
            key = name.lower()  # (bytes: ASCII letters only, as HTTP means)
            if key == b"host":
                hosts += 1
            elif key == b"content-length":
                lengths.append(value)
            elif key == b"transfer-encoding":
                codings.append(value)
            elif key == b"connection":
                tokens = {t.strip(b" \t") for t in value.lower().split(b",")}
                keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
            elif key == b"expect":
                expect_continue = http11 and value.lower() == b"100-continue"
            text = value.decode("utf-8", "surrogateescape")
            k = key.decode("ascii")
            headers[k] = f"{headers[k]}, {text}" if k in headers else text
    if hosts > 1 or (http11 and not hosts):
        raise HeadError(400, "an HTTP/1.1 request needs exactly one Host field")
    length, chunked = _framing(http11, lengths, codings)
    path, _, query = target.decode("ascii").partition("?")
    version = "1.1" if http11 else "1.0"
    return (
        method.decode("ascii"),
        path,
        query,
        version,
        headers,
        length,
        chunked,
        keep_alive,
        expect_continue,
    )


def _framing(http11: bool, lengths: list[bytes], codings: list[bytes]) -> tuple[int, bool]:
    """The body's length and whether it is chunked, from the head's framing fields."""
    if codings:
        if not http11:  # RFC 9112 6.1: its framing is faulty
            raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise HeadError(400, "both Content-Length and Transfer-Encoding")
        if len(codings) == 1 and h1.is_chunked(codings[0]):
            return 0, True
        if all(h1.is_token_list(c) for c in codings):
            raise HeadError(501, "only the chunked transfer coding is accepted")
        raise HeadError(400, "malformed Transfer-Encoding")
    if not lengths:
        return 0, False
    if len(lengths) > 1:
        raise HeadError(400, "more than one Content-Length")
    length = h1.content_length(lengths[0])
    if length < 0:
        raise HeadError(400, "malformed Content-Length")
    return length, False


def render_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    fields = "".join([f"{k}: {v}\r\n" for k, v in headers])
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n{fields}\r\n"
    return head.encode("utf-8", "surrogateescape")
