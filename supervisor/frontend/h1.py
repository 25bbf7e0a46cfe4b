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
from typing import Final

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
_0: Final = 0x30  # the bytes b"0", b"9", b"a", b"f", b"A", b"F" and b";", as ints
_9: Final = 0x39
_a: Final = 0x61
_f: Final = 0x66
_A: Final = 0x41
_F: Final = 0x46
_SEMICOLON: Final = 0x3B


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
        if c < _0 or c > _9:
            return -1
        n = n * 10 + c - _0
    return n


def chunk_size(line: bytes) -> int:
    """The size a chunk's size line (without its CRLF) gives: ``1*HEXDIG`` then optional
    well-formed extensions, which are ignored; -1 if malformed (spaces, a sign, ``0x``,
    ``_``, a bare CR or LF, a control byte in an extension...)."""
    n = 0
    digits = 0
    for c in line:  # (runs for every chunk, so every token: a loop, no call)
        if _0 <= c <= _9:
            n = n * 16 + c - _0
        elif _a <= c <= _f:
            n = n * 16 + c - _a + 10
        elif _A <= c <= _F:
            n = n * 16 + c - _A + 10
        else:
            break
        digits += 1
        if digits > MAX_SIZE_DIGITS:
            return -1
    if digits == len(line):  # the usual line: digits only
        return n if digits else -1
    if not digits or line[digits] != _SEMICOLON or _CHUNK_EXT.fullmatch(line, digits) is None:
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
