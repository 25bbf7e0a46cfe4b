"""HTTP/1.1 framing judged by the bytes of RFC 9112's ASCII grammar, for both ends of the
relay: the frontend's server (requests from clients) and the engine client (answers from
engines).

Why bytes and not text: a header decoded to ``str`` and read with ``str.isdigit``,
``int()`` or ``str.lower()`` follows Unicode's rules, not HTTP's: ``"\\u0665".isdigit()``
(ARABIC-INDIC DIGIT FIVE) is true and ``int()`` reads it as 5; ``"chun\\u212aed".lower()``
(a KELVIN SIGN) is ``"chunked"``; ``int(" +0x_2 ", 16)`` reads what no other hop reads.
Each such difference between two hops is a way to smuggle a request past one of them.
Every rule here is the narrow one: what it accepts, llhttp (Node's and uvicorn's parser)
reads the same way, and much of what llhttp tolerates is refused (the differential tests
in tests/hostile/ check both ends against llhttp, through ``httptools``).
"""

from __future__ import annotations

import re
from typing import Final, NoReturn

TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS: Final = b"0123456789"
HEXDIGITS: Final = b"0123456789abcdefABCDEF"
_TOKEN_CLASS: Final = b"[" + re.escape(TOKEN) + b"]"
# A field value's bytes: visible ASCII, obs-text, space and tab; never a control byte
# (CR, LF, NUL, VT, ...) or DEL.
_VALUE_CLASS: Final = rb"[\t\x20-\x7e\x80-\xff]"
# Field lines, each ``token ":" value CRLF`` (no space before the colon, no line folding).
FIELD_LINES: Final = re.compile(b"(?:" + _TOKEN_CLASS + b"+:" + _VALUE_CLASS + rb"*\r\n)*")
# One field line, already checked by FIELD_LINES: its name and its value without the
# optional whitespace around it.
FIELD: Final = re.compile(b"(" + _TOKEN_CLASS + rb"+):[ \t]*(" + _VALUE_CLASS + rb"*?)[ \t]*\r\n")
_QUOTED: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# Chunk extensions, without the optional whitespace RFC 9112 allows around ";" and "="
# (no client or engine sends any; llhttp reads them the same way either way).
_CHUNK_EXT: Final = re.compile(
    b"(?:;" + _TOKEN_CLASS + b"+(?:=" + _TOKEN_CLASS + b"+|=" + _QUOTED + b")?)+"
)
MAX_SIZE_DIGITS: Final = 15  # a chunk size of up to 2**60 - 1: far past any body limit
# Bytes as the ints that indexing ``bytes`` gives, for both ends' parsers (compiled, a
# comparison with one of these is a comparison of two C ints).
DIGIT_0: Final = 0x30
DIGIT_1: Final = 0x31
DIGIT_9: Final = 0x39
LOWER_A: Final = 0x61
LOWER_F: Final = 0x66
UPPER_A: Final = 0x41
UPPER_F: Final = 0x46
SEMICOLON: Final = 0x3B
COLON: Final = 0x3A
SP: Final = 0x20
CR: Final = 0x0D
LF: Final = 0x0A


def content_length(value: bytes) -> int:
    """The length a ``Content-Length`` value (without surrounding whitespace) gives:
    ``1*DIGIT`` in ASCII, at most 18 digits; -1 if it is anything else (a list such as
    ``5, 5`` included)."""
    if not value or len(value) > 18:
        return -1
    # Read digit by digit: compiled, a loop over a few bytes costs less than one method
    # call (bytes.translate) or int() on bytes.
    n = 0
    for c in value:
        if c < DIGIT_0 or c > DIGIT_9:
            return -1
        n = n * 10 + c - DIGIT_0
    return n


def chunk_size(line: bytes) -> int:
    """The size a chunk's size line (without its CRLF) gives: ``1*HEXDIG`` then optional
    well-formed extensions, which are ignored; -1 if malformed (spaces, a sign, ``0x``,
    ``_``, a bare CR or LF, a control byte in an extension...)."""
    n = 0
    digits = 0
    for c in line:  # (runs for every chunk, so every token: a loop, no call)
        if DIGIT_0 <= c <= DIGIT_9:
            n = n * 16 + c - DIGIT_0
        elif LOWER_A <= c <= LOWER_F:
            n = n * 16 + c - LOWER_A + 10
        elif UPPER_A <= c <= UPPER_F:
            n = n * 16 + c - UPPER_A + 10
        else:
            break
        digits += 1
        if digits > MAX_SIZE_DIGITS:
            return -1
    if digits == len(line):  # the usual line: digits only
        return n if digits else -1
    if not digits or line[digits] != SEMICOLON or _CHUNK_EXT.fullmatch(line, digits) is None:
        return -1
    return n


def is_chunked(value: bytes) -> bool:
    """Whether a ``Transfer-Encoding`` value is exactly ``chunked`` (ASCII letters in any
    case): the only transfer coding either end takes."""
    return len(value) == 7 and value.lower() == b"chunked"


def is_token_list(value: bytes) -> bool:
    """A comma-separated list of tokens (e.g. transfer codings): well-formed, if not
    necessarily one this code knows."""
    for part in value.split(b","):
        item = part.strip(b" \t")
        if not item or item.translate(None, TOKEN):
            return False
    return True


def trailer_line_ok(line: bytes) -> bool:
    """Whether ``line`` (without its CRLF) is a well-formed field line, as each trailer
    line after a chunked body must be."""
    return FIELD_LINES.fullmatch(line + b"\r\n") is not None and line != b""


MAX_LINE: Final = 1024  # a chunk size line, or one trailer line, at the most
_CRLF: Final = b"\r\n"
# Why a chunked body cannot be read, as the server answers it.
MALFORMED: Final = 400
BODY_TOO_LARGE: Final = 413
TRAILER_TOO_LARGE: Final = 431


class ChunkError(Exception):
    """A chunked body that cannot be read; ``status`` says why (:data:`MALFORMED`,
    :data:`BODY_TOO_LARGE`, :data:`TRAILER_TOO_LARGE`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChunkedBody:
    """A chunked body (RFC 9112 7.1) decoded as its bytes arrive, for both ends of the
    relay: a request's from a client, an answer's from an engine.

    Each line must end in CRLF (a bare LF is refused as soon as it is seen: no CRLF will
    end that line), a size line must be ``1*HEXDIG`` with well-formed extensions
    (:func:`chunk_size`), and each trailer line a field line; a line is at most
    :data:`MAX_LINE` bytes, the trailer section at most ``max_trailer``, the data at most
    ``max_body`` (-1: no limit)."""

    def __init__(self, max_trailer: int, max_body: int = -1) -> None:
        self.max_trailer = max_trailer
        self.max_body = max_body
        # >0: bytes of a chunk's data still to come; -1: the CRLF after it; 0: a line.
        self.need = 0
        self.trailer = -1  # bytes of trailer lines so far; -1: not in the trailer yet
        self.received = 0  # the sizes of the chunks so far
        self.kept = 0  # bytes of data handed out
        self.pending = b""  # the start of a line (or a CRLF) not yet whole
        self.rest = b""  # what came after the body's end
        self.done = False

    def feed(self, data: bytes, out: list[bytes]) -> bool:
        """Append the data of the chunks that ``data`` completes to ``out``; True once the
        body is whole (what came after it is then in :attr:`rest`). :class:`ChunkError`
        if it is malformed or too large."""
        buf = self.pending + data if self.pending else data
        pos, n = 0, len(buf)
        while pos < n:
            need = self.need
            if need > 0:
                piece = buf[pos : pos + need]
                out.append(piece)
                self.kept += len(piece)
                self.need = need = need - len(piece)
                pos += len(piece)
                if need:
                    break
                self.need = -1
            if self.need == -1:  # the CRLF after a chunk's data
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != _CRLF:
                    raise ChunkError(MALFORMED, "chunk not followed by CRLF")
                pos += 2
                self.need = 0
                continue
            end = buf.find(_CRLF, pos)
            if end < 0 or end - pos > MAX_LINE:
                if n - pos > MAX_LINE:
                    self._line_too_long()
                if buf.find(b"\n", pos) >= 0:  # a bare LF: no CRLF will end this line
                    raise ChunkError(MALFORMED, "chunk size or trailer line ended by a bare LF")
                if self.trailer >= 0 and self.trailer + n - pos > self.max_trailer:
                    self._trailer_too_large()
                break
            line = buf[pos:end]
            pos = end + 2
            if self.trailer >= 0:
                if not line:  # the empty line that ends the trailers: the body is whole
                    self.pending = b""
                    self.rest = buf[pos:]
                    self.done = True
                    return True
                # A trailer field: not needed, but it must be one (a request or an answer
                # taken for trailer lines is how a hop is fooled), and they are bounded.
                self.trailer += len(line) + 2
                if self.trailer > self.max_trailer:
                    self._trailer_too_large()
                if not trailer_line_ok(line):
                    raise ChunkError(MALFORMED, f"malformed trailer: {line[:80]!r}")
                continue
            size = chunk_size(line)
            if size < 0:
                raise ChunkError(MALFORMED, f"malformed chunk size line: {line[:80]!r}")
            if size == 0:
                self.trailer = 0
                continue
            self.received += size
            if 0 <= self.max_body < self.received:
                raise ChunkError(BODY_TOO_LARGE, f"request body over {self.max_body} bytes")
            stop = pos + size
            if stop + 2 > n:
                self.need = size  # the rest of this chunk comes with later reads
                continue
            # The whole chunk is here (the common case: an engine writes each event as one
            # chunk): taken at once, with no state kept between its size, data and CRLF.
            if buf[stop : stop + 2] != _CRLF:
                raise ChunkError(MALFORMED, "chunk not followed by CRLF")
            out.append(buf[pos:stop])
            self.kept += size
            pos = stop + 2
        self.pending = buf[pos:]
        return False

    def _line_too_long(self) -> NoReturn:
        if self.trailer >= 0:
            self._trailer_too_large()
        raise ChunkError(MALFORMED, "chunk size line too long")

    def _trailer_too_large(self) -> NoReturn:
        raise ChunkError(TRAILER_TOO_LARGE, f"chunked trailer over {self.max_trailer // 1024} KiB")
