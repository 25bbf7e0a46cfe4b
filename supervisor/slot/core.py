"""What a part of the slot may touch: :class:`SlotCore`, and the words the parts share.

The slot is one :class:`~supervisor.slot.controller.SlotController` (its facts, its lock,
the one way in) and parts that each do one job: :mod:`~supervisor.slot.engines`,
:mod:`~supervisor.slot.startup`, :mod:`~supervisor.slot.promote`,
:mod:`~supervisor.slot.planned`, :mod:`~supervisor.slot.rollout`,
:mod:`~supervisor.slot.replenish`. The controller builds the parts and hands each one
itself; a part sees it only as a :class:`SlotCore`, so a newcomer reads here, in one
place, everything a part may read, change or call on its slot. The parts import this
module and never the controller or one another: the controller imports them, and an
import graph without circles is what lets each be read (and tested) on its own.

A part that asks another part for something goes through the slot (``ctl.lifecycle``,
``ctl.replenisher``, ...) and sees only the few calls it makes, in the small protocols
below; mypy checks that the controller and the parts it holds fit them (the controller
passes ``self`` to each part).

Also here, since every part speaks them: :class:`Move`, what an effect of the table acts
on, and :class:`Step`, the timer of a failover record's steps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from supervisor.config import Config, SlotConfig
from supervisor.coordination.local import Coordinator
from supervisor.metrics import Metrics
from supervisor.model import (
    Engine,
    EngineState,
    FailoverRecord,
    Pause,
    Role,
    ScheduledSwitchover,
    Slot,
)
from supervisor.slot.table import Decision, Event, Facts, FailoverCause, Phase


@dataclass
class Move:
    """What an effect acts on, handed to ``handle`` by whoever brought the event."""

    record: FailoverRecord | None = None  # the move's record in /status (history)
    cause: FailoverCause = FailoverCause.RECOVERY  # its metric label
    dead: Engine | None = None  # the engine that served (or still does)
    target: Engine | None = None  # the shadow to promote (else the first asleep)
    epoch: int = 0  # an epoch the cluster gave (an assignment, a step down)
    by: str = ""  # who the cluster gave the slot to (a step down)
    reason: str = ""  # the cluster's reason (an assignment)
    drain_for: float = 0.0  # a planned move: how long the old engine may finish streams
    in_background: bool = False  # promote in the slot's task group; the caller goes on


class Step:
    """Times one failover step into ``record.steps[name]`` (seconds)."""

    def __init__(self, record: FailoverRecord, name: str) -> None:
        self.record, self.name = record, name

    def __enter__(self) -> Step:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.record.steps[self.name] = round(time.monotonic() - self.t0, 6)


# -- what the parts ask of one another (each through the slot) -------------------------
class Lifecycle(Protocol):
    """What the other parts ask of the slot's engines: the one place an engine is placed,
    launched, woken and stopped (:class:`~supervisor.slot.engines.EngineLifecycle`)."""

    @property
    def flock(self) -> bool:
        """Self-promoting shadows (``suspend = "flock"``): the lock's holder serves."""
        ...

    def set_state(self, engine: Engine, state: EngineState, reason: str = "") -> None: ...

    def update_gauges(self) -> None: ...

    def free_port(self) -> int | None:
        """A place (port, GPUs) for one more engine, if one is free now."""
        ...

    async def wait_for_place(self) -> None: ...

    def new_engine(self, role: Role) -> Engine: ...

    async def ready(self, engine: Engine) -> None: ...

    async def load_and_sleep(self, engine: Engine) -> None: ...

    def failed_to_start(self, engine: Engine, why: str) -> None: ...

    async def wake(self, shadow: Engine) -> None: ...

    def wake_failed(self, shadow: Engine, e: Exception) -> None: ...

    async def memory_released(self, dead: Engine) -> bool: ...

    async def stop(
        self, engine: Engine, why: str, *, done: str = "", wait: bool = False
    ) -> None: ...

    async def adopt(self, rec: dict[str, Any]) -> Engine | None: ...


class Replenishing(Protocol):
    """The slot's relaunches (:class:`~supervisor.slot.replenish.Replenisher`): told when
    the slot may be short, and told of launches that went wrong elsewhere."""

    # Consecutive failed launches (its backoff): a shadow that cannot wake counts as one.
    failures: int
    # Why the slot has fewer shadows than configured (in /status); a stop that hangs says so.
    shortfall: str
    # A failover that found no shadow: the next cold start of the active engine completes it.
    cold_record: FailoverRecord | None

    def kick(self) -> None:
        """Something changed that may leave the slot short: look again."""
        ...


class Starting(Protocol):
    """The two launches others repeat (:class:`~supervisor.slot.startup.Startup`)."""

    async def start_shadow(self) -> Engine: ...

    async def start_active(self) -> bool: ...


class Promoting(Protocol):
    """Promotion (:class:`~supervisor.slot.promote.Promoter`): the one place an epoch is
    taken on promotion, and the failover others finish with."""

    def promote(self, engine: Engine, epoch: int) -> None: ...

    async def failover(self, move: Move) -> None: ...

    async def recover(self, why: str) -> None: ...


class Planning(Protocol):
    """What a rollout asks of planned moves (:class:`~supervisor.slot.planned.Planned`)."""

    @property
    def scheduled(self) -> ScheduledSwitchover | None: ...

    def cancel(self, why: str = "cancelled") -> ScheduledSwitchover | None: ...

    async def switchover(
        self, to: str | None, kind: str = "switchover", drain_for: float | None = None
    ) -> FailoverRecord: ...


class Generations(Protocol):
    """The slot's spec generations (:class:`~supervisor.slot.rollout.Rollout`), as engines
    are placed and relaunched."""

    @property
    def generation(self) -> int:
        """The generation new engines launch from."""
        ...

    @property
    def old(self) -> SlotConfig | None:
        """The spec a rollout in progress leaves (its places are still taken)."""
        ...

    @property
    def in_progress(self) -> bool:
        """A rollout launches what the slot needs itself: nothing is relaunched meanwhile."""
        ...


# -- the slot, as a part sees it ---------------------------------------------------------
class SlotCore(Protocol):
    """Everything a part of the slot may read, change or call on its slot.

    Read-only (properties) unless a part changes it: ``scfg`` (a rollout moves the slot to
    its new spec, or back) and ``waiting_for_etcd`` (a claim etcd refused). The slot's
    record (``slot``), its engines and histories are objects the parts update in place;
    ``phase`` moves only through :meth:`handle`.
    """

    # The settings and the node's tools. (An engine's processes, plugin and probes are
    # the lifecycle's alone: it is handed the backend, manager, judge and sessions.)
    @property
    def cfg(self) -> Config: ...

    scfg: SlotConfig  # the slot's spec engines launch from (a rollout changes it)

    @property
    def metrics(self) -> Metrics: ...

    @property
    def coord(self) -> Coordinator: ...

    @property
    def log(self) -> Any: ...

    def on_change(self) -> None:
        """Routing (and /status) follow: call after any change they show."""
        ...

    def gpu_broken(self, gpu: str) -> bool:
        """A GPU a fatal XID (or NVML) marked broken: nothing is placed or woken there."""
        ...

    # The slot's facts.
    @property
    def slot(self) -> Slot:
        """The slot's record: its active engine, epoch, degraded reason."""
        ...

    @property
    def phase(self) -> Phase: ...

    @property
    def engines(self) -> dict[str, Engine]:
        """The slot's engines by id, until retired (stopped and failed ones too)."""
        ...

    @property
    def retired(self) -> deque[Engine]: ...

    @property
    def history(self) -> deque[FailoverRecord]:
        """The node's failover records, newest first (a move adds its own)."""
        ...

    @property
    def lock(self) -> anyio.Lock:
        """One promotion at a time per slot."""
        ...

    @property
    def ready(self) -> anyio.Event:
        """Set once start-up launched what the slot needs (relaunches wait for it)."""
        ...

    @property
    def pause(self) -> Pause | None:
        """The slot's own maintenance mode (the state file keeps it)."""
        ...

    waiting_for_etcd: bool  # a promotion etcd refused: tried again once it answers

    @property
    def stopped(self) -> bool:
        """The supervisor is shutting down: nothing is launched or woken any more."""
        ...

    @property
    def grouped(self) -> bool:
        """A multi-node group: failover is the cluster leader's, for the whole group."""
        ...

    def live(self) -> list[Engine]: ...

    def sleeping_shadows(self) -> list[Engine]: ...

    def missing_shadows(self) -> int: ...

    def active_engine(self) -> Engine | None: ...

    def paused(self) -> Pause | None:
        """The pause in force (the slot's own, else its node's), unless expired."""
        ...

    def facts(self, *, make_before_break: bool = False) -> Facts: ...

    # The slot's work: background tasks, and the one way its phase moves.
    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: object, why: str) -> bool:
        """Start ``fn(*args)`` in the slot's background work; False once it stops."""
        ...

    def watchers(self) -> TaskGroup:
        """Where the engine manager watches the slot's processes."""
        ...

    async def handle(
        self,
        event: Event,
        why: str,
        *,
        move: Move | None = None,
        make_before_break: bool = False,
        **log: Any,
    ) -> Decision | None:
        """The one way in: the table decides, the slot moves, the row's effect runs."""
        ...

    # The other parts, each through the little a part asks of it.
    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def replenisher(self) -> Replenishing: ...

    @property
    def startup(self) -> Starting: ...

    @property
    def promoter(self) -> Promoting: ...

    @property
    def planned(self) -> Planning: ...

    @property
    def rollouts(self) -> Generations: ...
