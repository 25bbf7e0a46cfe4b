"""One slot: its facts, its lock, and the one way in (:meth:`SlotController.handle`).

Every event a slot sees goes through :func:`supervisor.slot.table.decide`, which picks the
row for the slot's phase, the event and the facts now; ``handle`` moves the phase, logs the
decision's sentence, sets or clears the degraded reason as the row says, and runs the
row's effect through ``EFFECTS``. The work itself lives next door: engines in
:mod:`~supervisor.slot.engines`, unplanned promotions in :mod:`~supervisor.slot.promote`,
switchovers and drains in :mod:`~supervisor.slot.planned`, rollouts in
:mod:`~supervisor.slot.rollout`, relaunches in :mod:`~supervisor.slot.replenish`. Each
part is handed the controller as a :class:`~supervisor.slot.core.SlotCore`, the list of
what a part may touch on its slot; the parts import that module, never this one.

Who may change the slot's epoch: a promotion (``Promoter.promote``, after the cluster
granted the claim), the cluster confirming our active (:meth:`SlotController.confirm_epoch`),
and the state file at adoption (:meth:`SlotController.adopt`). Nothing outside
``supervisor/slot/`` assigns a slot's fields.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from supervisor import log as logging
from supervisor.backends import Backend
from supervisor.config import Config, SlotConfig
from supervisor.coordination.local import Coordinator, LocalCoordinator
from supervisor.engines import EngineManager
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import (
    Engine,
    EngineState,
    FailoverRecord,
    Pause,
    RolloutProgress,
    ScheduledSwitchover,
    Slot,
)
from supervisor.sessions import Sessions
from supervisor.slot.core import Move, SlotCore
from supervisor.slot.engines import ENDED, EngineLifecycle
from supervisor.slot.planned import Planned
from supervisor.slot.promote import Promoter
from supervisor.slot.replenish import Replenisher
from supervisor.slot.rollout import Rollout
from supervisor.slot.startup import Startup
from supervisor.slot.table import (
    Decision,
    Degraded,
    Effect,
    Event,
    Facts,
    FailoverCause,
    Guard,
    Phase,
    decide,
)

HISTORY = 50  # failover records kept for /status
RETIRED = 16  # gone engines kept for /status (the rest leave it, and the metrics)

EffectHandler = Callable[["SlotController", Move, str], Awaitable[None]]
# EngineLifecycle, or a stand-in for it (the unit tests' engines that are records).
LifecycleFactory = Callable[
    [SlotCore, Backend, EngineManager, HealthJudge, Sessions], EngineLifecycle
]


async def _nothing() -> None:
    return None


# Each effect of the table, and who carries it out (a test checks that none is missing).
EFFECTS: dict[Effect, EffectHandler] = {
    Effect.NONE: lambda ctl, move, why: _nothing(),
    Effect.PROMOTE_SHADOW: lambda ctl, move, why: ctl.promoter.promote_shadow(move, why),
    Effect.SWITCH_LIVE: lambda ctl, move, why: ctl.planned.switch_live(move, why),
    Effect.STOP_THEN_PROMOTE: lambda ctl, move, why: ctl.planned.stop_then_promote(move, why),
    Effect.HAND_OVER: lambda ctl, move, why: ctl.promoter.hand_over(move, why),
    Effect.LAUNCH_SHADOW: lambda ctl, move, why: ctl.replenisher.launch_shadow(),
    Effect.LAUNCH_COLD: lambda ctl, move, why: ctl.replenisher.launch_cold(),
    Effect.WAKE_ASSIGNED: lambda ctl, move, why: ctl.promoter.wake_assigned(move, why),
    Effect.STOP_ACTIVE: lambda ctl, move, why: ctl.promoter.stop_active(move, why),
}


class SlotController:
    """Owns one slot's engines: startup, failover, shadow restoration, manual actions.

    Its background work (probes, exit watchers, the replenisher, relaunches) runs in its own
    task group (:meth:`run`), so that :meth:`close` ends all of it before engines are
    stopped: nothing scheduled can launch an engine once the daemon is shutting down.
    Implements :class:`supervisor.coordination.local.SlotHandle` for the cluster's orders.
    """

    def __init__(
        self,
        cfg: Config,
        slot_cfg: SlotConfig,
        backend: Backend,
        manager: EngineManager,
        judge: HealthJudge,
        metrics: Metrics,
        sessions: Sessions,
        history: deque[FailoverRecord],
        on_change: Callable[[], None] = lambda: None,
        gpu_broken: Callable[[str], bool] = lambda gpu: False,
        coordinator: Coordinator | None = None,
        node_pause: Callable[[], Pause | None] = lambda: None,
        move_streams: Callable[[str], int] = lambda engine_id: 0,
        streams_on: Callable[[str], int] = lambda engine_id: 0,
        lifecycle: LifecycleFactory = EngineLifecycle,
    ) -> None:
        self.cfg, self.scfg, self.backend = cfg, slot_cfg, backend
        self.manager, self.judge, self.metrics = manager, judge, metrics
        self.sessions, self.history = sessions, history
        self.on_change = on_change  # routing follows every state change
        self.gpu_broken = gpu_broken  # GPUs a fatal XID (or NVML) marked broken
        self.coord: Coordinator = coordinator or LocalCoordinator()
        self.node_pause = node_pause  # the whole node's maintenance mode, if any
        self.pause: Pause | None = None  # this slot's own maintenance mode
        self.waiting_for_etcd = False  # a promotion refused while etcd was unreachable
        self.slot = Slot(slot_cfg.name, slot_cfg.model_name)
        self.phase = Phase.STARTING
        self.engines: dict[str, Engine] = {}
        self.retired: deque[Engine] = deque(maxlen=RETIRED)
        self.lock = anyio.Lock()  # one promotion at a time per slot
        self._closed = anyio.Event()
        self._tg: TaskGroup | None = None
        self.log = logging.get(node=cfg.node, slot=slot_cfg.name)
        self.ready = anyio.Event()
        # The slot's parts, each with one job (their modules say which); each sees the
        # slot only as a SlotCore (supervisor.slot.core: what a part may touch).
        self.lifecycle: EngineLifecycle = lifecycle(self, backend, manager, judge, sessions)
        self.replenisher: Replenisher = Replenisher(self)
        self.promoter: Promoter = Promoter(self)
        self.planned: Planned = Planned(self, move_streams, streams_on)
        self.rollouts: Rollout = Rollout(self)
        self.startup: Startup = Startup(self)
        self.slot.degraded_reason = "starting"  # until the table says otherwise
        metrics.slot_degraded.labels(self.slot.name).set(1)
        metrics.set_slot_phase(self.slot.name, self.phase.value)
        metrics.init_slot(self.slot.name, backend.name)

    # -- the slot's background work ------------------------------------------------------
    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: object, why: str) -> bool:
        """Start ``fn(*args)`` in the slot's background work (:meth:`run`): every task of
        the slot starts here, whoever asks (a cluster decision, a request, a timer).

        Once the slot stops (:meth:`begin_stop`), nothing starts: refused, logged, False.
        By then :meth:`close` ends that work, and what a refused task was for is done by
        the stop itself: :meth:`stop_all` stops every engine still running (a failed one
        too), and nothing is relaunched, woken or promoted any more."""
        if self.stopped:
            self.log.info(f"not started, the slot is stopping: {why}")
            return False
        assert self._tg is not None, "SlotController.run() has not started"
        self._tg.start_soon(fn, *args)
        return True

    def watchers(self) -> TaskGroup:
        """Where the engine manager watches the slot's processes: the slot's background
        work, open until :meth:`close` (nothing is launched or adopted once it stops)."""
        assert self._tg is not None and not self.stopped
        return self._tg

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The slot's background work, until :meth:`close`."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.replenisher.loop)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._closed.set()

    def begin_stop(self) -> None:
        """The supervisor is shutting down: from now on nothing is launched, relaunched or
        woken (a relaunch waiting on its backoff launches nothing); engines are still
        watched while in-flight requests drain. (``stop`` has no effect to run, so this
        one caller needs only the first half of :meth:`handle`.)"""
        if self.phase is not Phase.STOPPED:
            self._enter(Event.STOP, "the supervisor is shutting down", self.facts(), {})

    async def close(self) -> None:
        """Stop everything scheduled (relaunches, shadow starts, probes, wakes); the
        engines themselves are left as they are (see :meth:`stop_all`)."""
        self.begin_stop()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._closed.wait()

    async def stop_all(self) -> None:
        """Stop every engine of the slot still running (after :meth:`close`)."""
        await self.lifecycle.stop_all()

    # -- the state machine ---------------------------------------------------------------
    def facts(self, *, make_before_break: bool = False) -> Facts:
        """The slot as the table's guards see it, now."""
        p = self.paused()
        return Facts(
            pause=(p.reason or "paused") if p is not None else "",
            restarts_cold=self.scfg.shadows == 0 and self.scfg.hosts == "active",
            make_before_break=make_before_break,
        )

    async def handle(
        self,
        event: Event,
        why: str,
        *,
        move: Move | None = None,
        make_before_break: bool = False,
        **log: Any,
    ) -> Decision | None:
        """The one way in: apply ``event`` (see :mod:`supervisor.slot.table`), then carry
        out the row's effect on ``move``. None: the table refuses the event here."""
        d = self._enter(event, why, self.facts(make_before_break=make_before_break), log)
        if d is not None:
            await EFFECTS[d.effect](self, move or Move(), d.sentence)
        return d

    def _enter(self, event: Event, why: str, facts: Facts, log: dict[str, Any]) -> Decision | None:
        d = decide(self.phase, event, facts, why)
        if d is None:
            self.log.info(f"{event} ignored while {self.phase}: {why}", on=event.value, **log)
            return None
        before, effect = self.phase, None if d.effect is Effect.NONE else d.effect.value
        if d.to is not before:
            self.phase = d.to
            self.metrics.set_slot_phase(self.slot.name, self.phase.value)
            self.log.info(
                f"{before} -> {self.phase} on {event}: {d.sentence}",
                on=event.value,
                effect=effect,
                **log,
            )
        elif effect or d.row.guard is not Guard.ALWAYS:
            did = effect or "nothing"
            self.log.info(f"{event} while {before}: {did}: {d.sentence}", on=event.value, **log)
        if d.row.degraded is not Degraded.KEEP:
            reason = d.sentence if d.row.degraded is Degraded.SET else ""
            self.slot.degraded_reason = reason
            self.metrics.slot_degraded.labels(self.slot.name).set(1 if reason else 0)
        return d

    # -- the slot's engines ------------------------------------------------------------
    def live(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.state not in ENDED]

    def sleeping_shadows(self) -> list[Engine]:
        """Shadows that may be woken: asleep, and not on a GPU known to be broken."""
        return [
            e
            for e in self.engines.values()
            if e.role == "shadow"
            and e.state is EngineState.SLEEPING
            and not any(self.gpu_broken(g) for g in e.spec.gpus)
        ]

    def missing_shadows(self) -> int:
        """Shadows the slot should have and does not (launching or asleep ones count)."""
        return max(0, self.scfg.shadows - len([e for e in self.live() if e.role == "shadow"]))

    @property
    def stopped(self) -> bool:
        """The supervisor is shutting down: nothing is launched or woken any more."""
        return self.phase is Phase.STOPPED

    @property
    def grouped(self) -> bool:
        """A multi-node group: failover is the cluster leader's, for the whole group."""
        return self.scfg.group_size > 1

    def active_engine(self) -> Engine | None:
        return self.engines.get(self.slot.active) if self.slot.active else None

    def status(self) -> dict[str, Any]:
        """The slot in ``/status``: its record, phase, and why shadows are missing."""
        r = self.rollouts
        return {
            **self.slot.as_dict(),
            "phase": self.phase.value,
            "shadows_configured": self.scfg.shadows,
            "shadows_asleep": len(self.sleeping_shadows()),
            "shadows_missing": self.missing_shadows(),
            "shadow_shortfall": self.replenisher.shortfall or None,
            "paused": p.as_dict() if (p := self.paused()) is not None else None,
            "scheduled_switchover": s.as_dict() if (s := self.planned.scheduled) else None,
            "generation": r.generation,
            "rollout_pending": r.pending_changes or None,
            "rollout": r.progress.as_dict() if r.progress else None,
        }

    def reconfigure(self, cfg: Config) -> None:
        """A reload's settings (timeouts, backoffs, ...); the slot's own spec changes only
        through a rollout."""
        self.cfg = cfg

    # -- what coordination reads and orders (coordination.local.SlotHandle) --------------
    @property
    def model(self) -> str:
        return self.slot.model

    @property
    def epoch(self) -> int:
        return self.slot.epoch

    @property
    def group_rank(self) -> int:
        return self.scfg.group_rank

    @property
    def group_size(self) -> int:
        return self.scfg.group_size

    @property
    def serves_requests(self) -> bool:
        return self.scfg.serve_requests

    def confirm_epoch(self, epoch: int) -> None:
        """The cluster recorded our active at ``epoch`` (a claim made during an etcd
        outage, or the leader claiming our started group): the slot takes that epoch."""
        if epoch != self.slot.epoch:
            self.log.info("the cluster confirms our active", epoch=epoch, was=self.slot.epoch)
            self.slot.epoch = epoch
            self.lifecycle.update_gauges()

    async def promote_assigned(self, engine_id: str, epoch: int, reason: str) -> None:
        """The cluster (its leader, in etcd) made this node's shadow the slot's active one
        at ``epoch``: wake it and serve. A failed wake marks it failed; the leader moves on."""
        async with self.lock:
            engine = self.engines.get(engine_id)
            if engine is None or engine.state is not EngineState.SLEEPING:
                self.log.warning(
                    "cluster chose an engine that is not a sleeping shadow here",
                    engine=engine_id,
                    state=engine.state.value if engine else None,
                )
                return
            move = Move(cause=FailoverCause.CLUSTER, target=engine, epoch=epoch, reason=reason)
            await self.handle(
                Event.ASSIGNED, f"the cluster promotes {engine_id}: {reason}", move=move
            )

    async def step_down(self, epoch: int, by: str) -> None:
        """The cluster moved the slot to ``by`` at ``epoch`` while this node still serves it
        (we were partitioned, or our group was replaced): stop our active engine."""
        async with self.lock:
            engine = self.active_engine()
            if engine is not None:
                why = f"fenced at epoch {epoch}: {by} serves the slot"
                await self.handle(Event.STEP_DOWN, why, move=Move(dead=engine, epoch=epoch, by=by))

    def etcd_back(self) -> None:
        """etcd answers again: a promotion it refused meanwhile is tried now."""
        if self.waiting_for_etcd and self._tg is not None and not self.stopped:
            self.waiting_for_etcd = False
            self.spawn(
                self.promoter.recover, "etcd is reachable again", why="recover: etcd is back"
            )
            self.replenisher.kick()  # a slot without shadows restarts its engine cold

    # -- start-up (the work is in startup.py) -------------------------------------------
    def saved(self) -> dict[str, Any]:
        """This slot's part of the state file."""
        return self.startup.saved()

    async def adopt(self, saved: dict[str, Any]) -> int:
        """Take over the engines an earlier supervisor left running (see
        :meth:`Startup.adopt`); returns how many were adopted."""
        return await self.startup.adopt(saved)

    async def start(self) -> None:
        """Start what the slot lacks: shadows, then its active engine (see
        :meth:`Startup.start`)."""
        await self.startup.start()

    # -- failure -------------------------------------------------------------------------
    async def on_engine_dead(
        self, engine: Engine, source: str, reason: str, detected_at: float
    ) -> None:
        """Health declared ``engine`` dead. A shadow is replaced; the active engine's death
        is the ``active_died`` event: a shadow is promoted, unless the slot (or its node)
        is paused, where the table leaves the slot degraded until resumed."""
        was_active = self.slot.active == engine.id
        self.lifecycle.set_state(engine, EngineState.FAILED, f"{source}: {reason}")
        if source != "exit" or self.cfg.failover.kill_dead_group:
            self.manager.kill_now(engine)  # a hung or stopped engine must not linger
        if not self.stopped:  # (stop_all stops what is left of it)
            self.spawn(self.lifecycle.retire, engine, why=f"retire {engine.id}, which failed")
        if not was_active:
            self.replenisher.kick()
            return
        self.slot.active = None
        record = FailoverRecord(
            self.slot.name, engine.id, f"{source}: {reason}", detected_at=detected_at
        )
        move = Move(record, FailoverCause.of_death(source), dead=engine)
        why = f"active engine {engine.id} failed ({source}: {reason})"
        await self.handle(Event.ACTIVE_DIED, why, move=move)

    # -- replenishing --------------------------------------------------------------------
    def restore_shadows(self) -> int:
        """Launch the shadows the slot is missing (e.g. after a broken GPU was cleared)."""
        return self.replenisher.restore()

    # -- maintenance mode ----------------------------------------------------------------
    def paused(self) -> Pause | None:
        """The pause in force for this slot (its own, else its node's), unless expired."""
        now = time.time()
        for p in (self.pause, self.node_pause()):
            if p is not None and not p.expired(now):
                return p
        return None

    def set_pause(self, pause: Pause | None, *, restored: bool = False) -> None:
        """Pause (or, with None, resume) this slot; see :meth:`pause_changed`. ``restored``:
        a pause read back from the state file at start (nothing to tell yet)."""
        self.pause = pause
        if restored:
            self.metrics.slot_paused.labels(self.slot.name).set(1 if self.paused() else 0)
        else:
            self.pause_changed()

    def pause_changed(self) -> None:
        """The slot's or its node's pause began, ended or expired. Paused: no automatic
        failover, no relaunch (health is still watched, and a lost active engine leaves the
        slot down). Resumed: what was held back happens now."""
        p = self.paused()
        self.metrics.slot_paused.labels(self.slot.name).set(1 if p else 0)
        if p is not None:
            until = (
                f" until {time.strftime('%H:%M:%S', time.localtime(p.until))}" if p.until else ""
            )
            self.log.info(f"paused{until}: no automatic failover or relaunch", reason=p.reason)
        else:
            self.log.info("resumed: automatic failover and relaunch are on again")
            if self.slot.active is None and self.phase is Phase.DEGRADED and self.ready.is_set():
                why = "resumed with the active engine lost"
                self.spawn(self.promoter.recover, why, why=f"recover: {why}")
            self.replenisher.kick()
        self.on_change()

    # -- planned moves and rollouts (the work is in planned.py and rollout.py) -----------
    async def switchover(
        self, to: str | None, kind: str = "switchover", drain_for: float | None = None
    ) -> FailoverRecord:
        """Planned move of the slot to a shadow, its streams with it: see
        :mod:`supervisor.slot.planned`. Refused (nothing touched) when no shadow could
        take the slot."""
        return await self.planned.switchover(to, kind, drain_for)

    def schedule_switchover(self, at: float, to: str | None) -> ScheduledSwitchover:
        return self.planned.schedule(at, to)

    def cancel_scheduled(self, why: str = "cancelled") -> ScheduledSwitchover | None:
        return self.planned.cancel(why)

    async def drain(self, engine_id: str, limit: float | None = None) -> None:
        await self.planned.drain(engine_id, limit)

    @property
    def rolling_out(self) -> bool:
        return self.rollouts.in_progress

    @property
    def pending(self) -> SlotConfig | None:
        """A reloaded spec waiting for its rollout."""
        return self.rollouts.pending

    @property
    def rollout(self) -> RolloutProgress | None:
        return self.rollouts.progress
