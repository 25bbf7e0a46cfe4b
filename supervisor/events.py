"""Decoding one engine stream event (or whole answer): the JSON object, or the error that
says what was wrong with it. Runs for every token; compiled with the relay
(:mod:`supervisor.native`)."""

from __future__ import annotations

from typing import Any

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
