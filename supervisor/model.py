"""The control plane's records: engines, slots, failovers, pauses, rollouts. No I/O here.

Plain Python, never compiled (an edit here leaves the relay's native build current); the
request types the relay carries are in :mod:`supervisor.requests`.
"""

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


# Label values known in advance (metrics exist at 0 for each from the start).
DEATH_SOURCES = ("exit", "probe", "stream", "gpu", "admin")  # who declared an engine dead
FAILOVER_RESULTS = ("promoted", "degraded", "error")

Role = Literal["active", "shadow"]
AWAKE = "awake"  # the suspend strategy that does not suspend: shadows stand by loaded
FLOCK = "flock"  # shadows park on a lock file and promote themselves when they get it


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
