"""Parsing untrusted JSON request bodies (frontend and admin API) with limits.

orjson refuses invalid UTF-8 and lone surrogates (``"\\ud800"``), which no engine can take
either, and nests at most 1,024 levels; on top of that a body may nest only ``max_depth``
levels, so that nothing downstream (copying, re-serialising, an engine's own parser) can hit
a recursion limit on a client's input.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 64  # an OpenAI request nests ~6 levels (tools with JSON schemas a few more)


class BadJson(ValueError):
    """The body is not acceptable JSON; the message says why, for the client."""


def depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep (iterative, so a
    deep value cannot exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in v)
    return False


def parse(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in ``raw``, or :class:`BadJson` with a reason fit for the client."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        msg = str(e)
        if "surrogate" in msg or "UTF-8" in msg or "utf-8" in msg:
            raise BadJson(f"request body is not valid Unicode JSON: {msg}") from e
        if "depth" in msg or "recursion" in msg:
            raise BadJson(f"request body nests deeper than {max_depth} levels") from e
        raise BadJson(f"request body is not valid JSON: {msg}") from e
    # Nesting needs an opening bracket per level: with few in the whole text (the usual
    # case, token-id prompts included) the value need not be walked.
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth_over(value, max_depth):
        raise BadJson(f"request body nests deeper than {max_depth} levels")
    return value


def has_any_key(body: dict[str, Any], keys: tuple[str, ...]) -> bool:
    """Whether ``body`` holds any of ``keys`` (look-ups in a loop: compiled, a fraction of
    what ``frozenset.isdisjoint`` costs, a method call that walks the whole body)."""
    return any(key in body for key in keys)
