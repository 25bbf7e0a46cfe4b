"""Reading an engine's stream: splitting its SSE bytes into events' payloads, and decoding
one event (or whole answer) into its JSON object, or the error that says what was wrong
with it. Runs for every read and every token; compiled with the relay
(:mod:`supervisor.native`)."""

from __future__ import annotations

from typing import Any, Final

import orjson

from supervisor.stream_errors import EngineReportedError, MalformedStream


def loads_event(data: bytes) -> dict[str, Any]:
    """The event's JSON object; :class:`MalformedStream` if it is not one,
    :class:`EngineReportedError` if it is the engine's own error report."""
    try:
        obj = orjson.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedStream(f"stream event is not JSON: {data[:80]!r}") from e
    if not isinstance(obj, dict):
        raise MalformedStream(f"stream event is not a JSON object: {data[:80]!r}")
    if "error" in obj and "choices" not in obj:
        raise EngineReportedError(f"engine reported an error mid-stream: {str(obj['error'])[:200]}")
    return obj


DONE: Final = b"[DONE]"
# Bytes looked for as ints: ``b"\r" in data`` first tries the needle as an integer and
# formats (then drops) a TypeError for it, several times the cost of the search itself.
_CR: Final = 13
_LF: Final = 10
# Bytes of an unended event past which later reads are kept apart rather than joined to it
# at once: below it, a read costs a copy of at most this much; above it, an event is
# copied once, when it ends, however many reads it took.
_REJOIN: Final = 16 * 1024


class SseSplitter:
    """Splits an SSE byte stream, fed as it arrives, into each event's ``data`` payload.

    ``feed`` returns the payloads completed by one read (often several: a relay that
    handles them together writes once per read, not once per event) and stops at
    ``[DONE]`` (not returned; :attr:`done` says it came). A line that is not SSE ends the
    stream: the events before it are returned, and :attr:`error` holds the
    :class:`MalformedStream` for the caller to raise once it has handled them. So does an
    event that grows past ``limit`` bytes without ending (an engine that never ends its
    line would otherwise be held in memory without bound).
    """

    __slots__ = ("_buf", "_more", "_more_bytes", "done", "error", "limit")

    def __init__(self, limit: int) -> None:
        self._buf = b""  # the start of an event not yet ended
        # Later reads of a long one (see _REJOIN), none of which ends it: kept apart,
        # joined once when one does.
        self._more: list[bytes] = []
        self._more_bytes = 0
        self.limit = limit
        self.done = False
        self.error: MalformedStream | None = None

    @property
    def pending(self) -> bool:
        """Bytes of an event not yet ended are held (a read that left some made no
        progress of its own: a token is a whole event)."""
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buf:
            buf = chunk
        elif len(self._buf) < _REJOIN:  # (the usual event cut by a read: joined at once)
            buf = self._buf + chunk
        else:
            more = self._more
            last = more[-1] if more else self._buf
            if chunk.find(b"\n\n") < 0 and not (last[-1] == _LF and chunk[:1] == b"\n"):
                return self._hold(chunk)  # still inside the same long event
            more.insert(0, self._buf)
            more.append(chunk)
            buf = b"".join(more)
            more.clear()
            self._more_bytes = 0
        # The common stream: each event one "data: " line. Its events are split in one
        # call, and a count proves that nothing else is among them; anything else is read
        # event by event below.
        end = buf.rfind(b"\n\n")
        if end > 0 and buf.startswith(b"data: "):
            events = buf[:end]
            datas = events[6:].split(b"\n\ndata: ")
            # Every split took two newlines; any other newline (or CR) is another line. (One
            # event, the usual read of a slow stream, has none: no count needed.)
            if (
                _LF not in events if len(datas) == 1 else events.count(b"\n") == 2 * len(datas) - 2
            ) and _CR not in events:
                if DONE in datas:
                    self.done, self._buf = True, b""
                    return datas[: datas.index(DONE)]
                self._buf = buf[end + 2 :]
                if len(self._buf) > self.limit:
                    self._too_long()
                return datas
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start:end]
            start = end + 2
            # The common event is one "data: ..." line: no need to split it into lines.
            if event.startswith(b"data: ") and _LF not in event:
                data: bytes | None = event[6:].rstrip(b"\r")
            else:
                try:
                    data = _event_data(event)
                except MalformedStream as e:
                    self.error, self.done, self._buf = e, True, b""
                    return out
            if data is None:
                continue
            if data == DONE:
                self.done = True
                self._buf = b""
                return out
            out.append(data)
        self._buf = buf[start:]
        if len(self._buf) > self.limit:
            self._too_long()
        return out

    def _hold(self, chunk: bytes) -> list[bytes]:
        if chunk:
            self._more.append(chunk)
            self._more_bytes += len(chunk)
            if len(self._buf) + self._more_bytes > self.limit:
                self._too_long()
        return []

    def _too_long(self) -> None:
        self.error = MalformedStream(
            f"an event over {self.limit} bytes (max_event_bytes) with no end: {self._buf[:80]!r}"
        )
        self.done, self._buf = True, b""
        self._more.clear()
        self._more_bytes = 0


def _event_data(event: bytes) -> bytes | None:
    parts = []
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            # One space after the colon is not part of the value (the SSE rules); more are.
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line and not line.startswith((b":", b"event:", b"id:", b"retry:")):
            raise MalformedStream(f"not an SSE line: {line[:80]!r}")
    return b"\n".join(parts) if parts else None
