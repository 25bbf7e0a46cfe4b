"""The failover policy, one :class:`SlotController` per slot.

The slot's phases, the events that move it and the action each move takes are one table,
:mod:`supervisor.slotstates`; this module carries the actions out. On the death of a slot's
active engine: mark it failed; pick a sleeping shadow; for a shadow on the same GPUs, wait
until the dead engine's whole process group is gone (its GPU memory with it); wake the
shadow through its plugin, retrying an out-of-memory wake for a bounded time; check
readiness; promote it (epoch + 1). One replenishing task per slot then restores the
configured number of shadows, with backoff on consecutive failures. With no shadow the slot
is degraded (metric, log; the frontend answers 503) until a shadow is ready again, or, for a
slot configured without shadows, its active engine is restarted cold. Every decision is
logged as one sentence with its reason; every step is timed.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio
from anyio.abc import TaskGroup

from supervisor import log as logging
from supervisor.backends import Backend, BackendError, EngineEndpoint, EngineOutOfMemory
from supervisor.config import Config, SlotConfig
from supervisor.coordination.local import ClaimRefused, Coordinator, LocalCoordinator
from supervisor.engines import EngineManager, group_members, signal_group
from supervisor.flocklease import FLOCK, LOCK_ENV, FlockStandby
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import (
    AWAKE,
    Engine,
    EngineSpec,
    EngineState,
    FailoverRecord,
    Pause,
    Readiness,
    Role,
    RolloutProgress,
    ScheduledSwitchover,
    Slot,
)
from supervisor.procfs import read_stat
from supervisor.sessions import Sessions
from supervisor.slotstates import Event, Phase, decide

HISTORY = 50  # failover records kept for /status
RETIRED = 16  # gone engines kept for /status (the rest leave it, and the metrics)
_ENDED = (EngineState.FAILED, EngineState.STOPPED)


class SuspendStrategy(Protocol):
    """Puts an engine's processes to sleep from outside (e.g. cuda-checkpoint)."""

    name: str

    async def suspend(self, root_pid: int) -> list[int]: ...

    async def resume(self, root_pid: int) -> list[int]: ...


class AwakeStandby:
    """Shadows that never sleep: loaded, healthy and ready, just not routed to. For engines
    without a sleep mode on platforms without cuda-checkpoint (real vLLM on a CPU, say).
    Costs the memory of a second engine; saves the whole wake (only readiness is checked)."""

    name = AWAKE

    async def suspend(self, root_pid: int) -> list[int]:
        return []

    async def resume(self, root_pid: int) -> list[int]:
        return []


def _suspend_strategy(name: str, lock_path: Path) -> SuspendStrategy | None:
    if name == "engine":
        return None
    if name == AWAKE:
        return AwakeStandby()
    if name == FLOCK:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FlockStandby(lock_path)
    from plugins.cuda_checkpoint import CudaCheckpointStrategy

    try:
        return CudaCheckpointStrategy()
    except BackendError as e:
        raise FailoverError(f"suspend = {name!r} cannot work here: {e}") from e


class FailoverError(RuntimeError):
    pass


class Step:
    """Times one failover step into ``record.steps[name]`` (seconds)."""

    def __init__(self, record: FailoverRecord, name: str) -> None:
        self.record, self.name = record, name

    def __enter__(self) -> Step:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.record.steps[self.name] = round(time.monotonic() - self.t0, 6)


class SlotController:
    """Owns one slot's engines: startup, failover, shadow restoration, manual actions.

    Its background work (probes, exit watchers, the replenisher, relaunches) runs in its own
    task group (:meth:`run`), so that :meth:`close` ends all of it before engines are
    stopped: nothing scheduled can launch an engine once the daemon is shutting down.
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
    ) -> None:
        self.cfg, self.scfg, self.backend = cfg, slot_cfg, backend
        self.manager, self.judge, self.metrics = manager, judge, metrics
        self.sessions, self.history = sessions, history
        self.on_change = on_change  # routing follows every state change
        self.gpu_broken = gpu_broken  # GPUs a fatal XID (or NVML) marked broken
        self.coord: Coordinator = coordinator or LocalCoordinator()
        self.node_pause = node_pause  # the whole node's maintenance mode, if any
        # Takes every stream off an engine now; they resume where the slot is served.
        self.move_streams = move_streams
        self.streams_on = streams_on  # streams the frontend relays through an engine now
        self.pause: Pause | None = None  # this slot's own maintenance mode
        self.scheduled: ScheduledSwitchover | None = None
        self._scheduled_scope: anyio.CancelScope | None = None
        self.generation = 0  # the spec engines launch from now (a rollout moves it on)
        self.pending: SlotConfig | None = None  # a reloaded spec waiting for its rollout
        self.pending_changes: list[str] = []
        self.rollout: RolloutProgress | None = None
        self.rollout_from: SlotConfig | None = None  # the spec a rollout in progress leaves
        self._waiting_for_etcd = False  # a promotion refused while etcd was unreachable
        # With suspend = "flock", the slot's engines share this lock: its holder serves.
        self.lock_path = cfg.state_dir / "locks" / f"{slot_cfg.name}.lock"
        self.suspender = _suspend_strategy(slot_cfg.suspend, self.lock_path)
        # In a cluster, engine ids name their node: they are unique cluster-wide.
        self._id_prefix = f"{cfg.node}." if cfg.cluster.enabled else ""
        self.slot = Slot(slot_cfg.name, slot_cfg.model_name)
        self.phase = Phase.STARTING
        self.engines: dict[str, Engine] = {}
        self.retired: deque[Engine] = deque(maxlen=RETIRED)
        self.lock = anyio.Lock()  # one promotion at a time per slot
        self._ids: Iterator[int] = itertools.count()
        self._launch_failures = 0  # consecutive; the replenisher's backoff grows with it
        self.shadow_shortfall = ""  # why the slot has fewer shadows than configured
        self._cold_record: FailoverRecord | None = None  # a failover a cold start completes
        self._kick = anyio.Event()
        self._closed = anyio.Event()
        self._tg: TaskGroup | None = None
        self.log = logging.get(node=cfg.node, slot=slot_cfg.name)
        self.ready = anyio.Event()
        self._set_degraded("starting")
        metrics.set_slot_phase(self.slot.name, self.phase.value)
        metrics.init_slot(self.slot.name, backend.name)

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

    def _watchers(self) -> TaskGroup:
        """Where the engine manager watches the slot's processes: the slot's background
        work, open until :meth:`close` (nothing is launched or adopted once it stops)."""
        assert self._tg is not None and not self.stopped
        return self._tg

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The slot's background work, until :meth:`close`."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._replenish_loop)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._closed.set()

    def begin_stop(self) -> None:
        """The supervisor is shutting down: from now on nothing is launched, relaunched or
        woken (a relaunch waiting on its backoff launches nothing); engines are still
        watched while in-flight requests drain."""
        if self.phase is not Phase.STOPPED:
            self._go(Event.STOP, "the supervisor is shutting down")

    async def close(self) -> None:
        """Stop everything scheduled (relaunches, shadow starts, probes, wakes); the
        engines themselves are left as they are (see :meth:`stop_all`)."""
        self.begin_stop()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._closed.wait()

    # -- the state machine ---------------------------------------------------------------
    def _go(self, event: Event, why: str, **facts: Any) -> str | None:
        """Apply ``event`` to the slot's phase (see :mod:`supervisor.slotstates`), log the
        decision as one sentence, and return the action to carry out (None: refused)."""
        t = decide(self.phase, event)
        if t is None:
            self.log.info(f"{event} ignored while {self.phase}: {why}", on=event.value, **facts)
            return None
        before = self.phase
        if t.to is not None and t.to is not before:
            self.phase = t.to
            self.metrics.set_slot_phase(self.slot.name, self.phase.value)
            self.log.info(
                f"{before} -> {self.phase} on {event}: {why}",
                on=event.value,
                action=t.action or None,
                **facts,
            )
        elif t.action:
            self.log.info(f"{event} while {before}: {t.action}: {why}", on=event.value, **facts)
        return t.action

    # -- bookkeeping -------------------------------------------------------------------
    def endpoint(self, engine: Engine, timeout: float | None = None) -> EngineEndpoint:
        """For probes and readiness checks (their own connection pool)."""
        return EngineEndpoint(
            engine.url,
            self.sessions.probes,
            timeout or self.cfg.health.probe_timeout,
            pool=self.sessions.probe_pool,
        )

    def control(self, engine: Engine) -> EngineEndpoint:
        """For sleep and wake (their own pool, never queued behind probes or clients)."""
        return EngineEndpoint(engine.url, self.sessions.control, self.cfg.failover.wake_timeout)

    def set_state(self, engine: Engine, state: EngineState, reason: str = "") -> None:
        if engine.state is not state:
            self.log.info(
                "engine state",
                engine=engine.id,
                epoch=self.slot.epoch,
                **{"from": engine.state.value, "to": state.value},
                reason=reason or None,
            )
        engine.state = state
        engine.reason = reason
        if engine.id in self.engines:
            self.metrics.set_engine_state(engine.slot, engine.id, state)
        self._update_gauges()
        self.on_change()

    def _update_gauges(self) -> None:
        self.metrics.shadows_available.labels(self.slot.name).set(len(self.sleeping_shadows()))
        self.metrics.shadows_missing.labels(self.slot.name).set(self.missing_shadows())
        self.metrics.slot_epoch.labels(self.slot.name).set(self.slot.epoch)

    def _set_degraded(self, reason: str) -> None:
        self.slot.degraded_reason = reason
        self.metrics.slot_degraded.labels(self.slot.name).set(1 if reason else 0)

    def live(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.state not in _ENDED]

    def _on_broken_gpu(self, e: Engine) -> bool:
        return any(self.gpu_broken(g) for g in e.spec.gpus)

    def sleeping_shadows(self) -> list[Engine]:
        """Shadows that may be woken: asleep, and not on a GPU known to be broken."""
        return [
            e
            for e in self.engines.values()
            if e.role == "shadow" and e.state is EngineState.SLEEPING and not self._on_broken_gpu(e)
        ]

    def missing_shadows(self) -> int:
        """Shadows the slot should have and does not (launching or asleep ones count)."""
        return max(0, self.scfg.shadows - len([e for e in self.live() if e.role == "shadow"]))

    def needs_cold_start(self) -> bool:
        """A slot without shadows that has lost its engine can only restart one cold."""
        return (
            self.scfg.shadows == 0
            and self.slot.active is None
            and not self.live()
            and self.hosts_active
            and self.coord.served_elsewhere(self.slot.name) is None
        )

    @property
    def stopped(self) -> bool:
        """The supervisor is shutting down: nothing is launched or woken any more."""
        return self.phase is Phase.STOPPED

    @property
    def hosts_active(self) -> bool:
        """Whether this node starts the slot's active engine (else it only keeps shadows)."""
        return self.scfg.hosts == "active"

    @property
    def grouped(self) -> bool:
        """A multi-node group: failover is the cluster leader's, for the whole group."""
        return self.scfg.group_size > 1

    def group_of(self, port: int) -> str:
        # Members of one group share their lane: the same offset in each node's port range.
        return f"{self.slot.name}:lane{port - self.scfg.base_port}" if self.grouped else ""

    def active_engine(self) -> Engine | None:
        return self.engines.get(self.slot.active) if self.slot.active else None

    # What coordination reads (coordination.local.SlotHandle).
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
            self._update_gauges()

    def status(self) -> dict[str, Any]:
        """The slot in ``/status``: its record, phase, and why shadows are missing."""
        return {
            **self.slot.as_dict(),
            "phase": self.phase.value,
            "shadows_configured": self.scfg.shadows,
            "shadows_asleep": len(self.sleeping_shadows()),
            "shadows_missing": self.missing_shadows(),
            "shadow_shortfall": self.shadow_shortfall or None,
            "paused": p.as_dict() if (p := self.paused()) is not None else None,
            "scheduled_switchover": self.scheduled.as_dict() if self.scheduled else None,
            "generation": self.generation,
            "rollout_pending": self.pending_changes or None,
            "rollout": self.rollout.as_dict() if self.rollout else None,
        }

    def _gpu_sets(self) -> list[tuple[str, ...]]:
        if self.scfg.placement == "paired":
            return [self.scfg.gpus]
        return [self.scfg.gpus, *self.scfg.shadow_gpus]

    def _occupied(self) -> tuple[set[int], list[tuple[str, ...]]]:
        # An engine's port and GPUs stay taken until its process group is gone.
        held = [
            e for e in self.engines.values() if e.state not in _ENDED or self.manager.running(e)
        ]
        return {e.spec.port for e in held}, [e.spec.gpus for e in held]

    def _free_port(self) -> int | None:
        taken, _ = self._occupied()
        # During a rollout the old spec's ports count too: its engines still hold some.
        specs = [self.scfg, *([self.rollout_from] if self.rollout_from else [])]
        ports = sorted({p for c in specs for p in range(c.base_port, c.base_port + c.shadows + 1)})
        return next((p for p in ports if p not in taken), None)

    def _new_engine(self, role: Role) -> Engine:
        if self.phase is Phase.STOPPED:
            raise FailoverError("the supervisor is shutting down; not launching")
        _, gpu_sets = self._occupied()
        port = self._free_port()
        if port is None:
            raise FailoverError("no free port in the slot's range (an engine still runs)")
        sets = self._gpu_sets()
        if role == "shadow":  # pooled: shadows prefer shadow_gpus, the active its gpus
            sets = [*sets[1:], *sets[:1]]
        healthy = [g for g in sets if not any(self.gpu_broken(x) for x in g)]
        if not healthy:
            raise FailoverError(
                "every GPU of the slot is marked broken; not launching "
                "engines there (clear it with POST /gpu/clear once reset)"
            )
        if self.scfg.placement == "paired":
            gpus = healthy[0]
        else:
            free = [g for g in healthy if g not in gpu_sets]
            if not free:
                raise FailoverError("no free healthy GPU set for a new engine")
            gpus = free[0]
        eid = f"{self._id_prefix}{self.slot.name}-{next(self._ids)}"
        engine = Engine(
            eid,
            self.slot.name,
            role,
            self._spec(eid, role, port, gpus),
            self.scfg.backend,
            group=self.group_of(port),
            generation=self.generation,
        )
        self.engines[eid] = engine
        self.set_state(engine, EngineState.LAUNCHING)
        return engine

    def _spec(self, eid: str, role: Role, port: int, gpus: tuple[str, ...]) -> EngineSpec:
        """How this slot launches an engine of ``role`` on ``port`` and ``gpus``."""
        extra = self.scfg.extra_args + (self.scfg.shadow_extra_args if role == "shadow" else ())
        return EngineSpec(
            engine_id=eid,
            model=self.scfg.model,
            port=port,
            host=self.cfg.engine_host,
            served_model_name=self.scfg.served_model_name,
            role=role,
            gpus=gpus,
            extra_args=extra,
            env=dict(self.scfg.env)
            | ({LOCK_ENV: str(self.lock_path)} if self.scfg.suspend == FLOCK else {}),
            options={"suspend": self.scfg.suspend},
        )

    async def _launch(self, engine: Engine) -> None:
        cmd = self.manager.command(engine, self.backend, self.scfg.simulate, self.scfg.sim_args)
        for gpu in engine.spec.gpus:
            self.metrics.engine_gpu.labels(engine.slot, engine.id, gpu).set(1)
        if self.stopped:  # (nothing starts while the slot stops, see spawn)
            raise FailoverError(f"engine {engine.id} not started: the supervisor is shutting down")
        try:
            await self.manager.launch(self._watchers(), engine, cmd)
        except OSError as e:
            self.set_state(engine, EngineState.FAILED, f"cannot start {cmd.argv[0]}: {e}")
            self.spawn(self._retire, engine, why=f"retire {engine.id}, which did not start")
            raise FailoverError(
                f"cannot start engine {engine.id} ({cmd.argv[0]}): {e.strerror or e}"
            ) from e
        self.set_state(engine, EngineState.LOADING)
        self._start_probes(engine)

    def _start_probes(self, engine: Engine) -> None:
        """The health judge's probes of ``engine``, in the slot's task group."""
        self.spawn(
            self.judge.probe_loop,
            engine,
            self.backend,
            self.endpoint(engine),
            why=f"probe {engine.id}",
        )

    async def _wait_health(
        self,
        engine: Engine,
        want: set[Readiness],
        timeout: float,
    ) -> Readiness:
        ep = self.endpoint(engine)
        deadline = time.monotonic() + timeout
        last = Readiness.DOWN
        while time.monotonic() < deadline:
            if engine.state in _ENDED:
                raise FailoverError(f"engine {engine.id} failed: {engine.reason}")
            try:
                last = await self.backend.health(ep)
            except Exception as e:  # plugin bug: contained, counted, retried
                self.metrics.plugin_errors.labels(self.backend.name, "health").inc()
                self.log.error("backend health hook raised", engine=engine.id, error=repr(e))
            if last in want:
                return last
            await anyio.sleep(0.01)
        raise FailoverError(
            f"engine {engine.id} not {'/'.join(want)} after {timeout}s (last: {last})"
        )

    async def _retire(self, engine: Engine) -> None:
        """Once a failed or stopped engine's processes are gone, it leaves the slot's
        engines (kept in a short history for ``/status``) and the metrics; the replenisher
        is told, as its port and GPUs are free now."""
        if engine.pid is not None:
            wait = self.cfg.failover.stop_grace + 10
            while not await self.manager.wait_group_gone(engine.pid, wait):
                # Something of it outlives SIGKILL (a process in uninterruptible sleep, say):
                # say what, kill again, keep waiting; giving up would hold its place forever.
                members = group_members(engine.pid)
                states = {pid: st.state for pid in members if (st := read_stat(pid))}
                self.shadow_shortfall = f"waiting for {engine.id}'s processes to exit: {states}"
                self.log.warning(
                    f"{engine.id}'s processes outlive SIGKILL; killing them again",
                    engine=engine.id,
                    processes=states,
                )
                signal_group(engine.pid, signal.SIGCONT)
                self.manager.kill_now(engine)
                if self.stopped:
                    return
        if self.engines.get(engine.id) is engine and engine.state in _ENDED:
            if self.manager.running(engine) and engine.pid is not None:
                # Its processes are gone but its exit is not read yet (the leader is a
                # zombie until reaped): returning here held its place, and its port, forever.
                with anyio.move_on_after(10):
                    while self.manager.running(engine):
                        await anyio.sleep(0.05)
                if self.manager.running(engine):
                    self.log.warning(f"{engine.id}'s exit was not seen", engine=engine.id)
                    return
            if self.engines.get(engine.id) is not engine:  # retired meanwhile
                self.kick_replenish()
                return
            del self.engines[engine.id]
            self.retired.appendleft(engine)
            self.metrics.forget_engine(engine.slot, engine.id, engine.spec.gpus)
            self.judge.forget(engine.id)
            self.on_change()
        self.kick_replenish()

    # -- startup -------------------------------------------------------------------------
    def saved(self) -> dict[str, Any]:
        """This slot's part of the state file."""
        return {
            "epoch": self.slot.epoch,
            "active": self.slot.active,
            "pause": self.pause.as_dict() if self.pause else None,
            "engines": [
                {
                    "id": e.id,
                    "role": e.role,
                    "state": e.state.value,
                    "pid": e.pid,
                    "start_time": e.start_ticks,
                    "port": e.spec.port,
                    "gpus": list(e.spec.gpus),
                }
                for e in self.live()
                if e.pid is not None
            ],
        }

    async def adopt(self, saved: dict[str, Any]) -> int:
        """Take over the engines an earlier supervisor left running, where they are still
        the same processes and answer as they did; returns how many were adopted."""
        self.slot.epoch = int(saved.get("epoch", 0))
        adopted = 0
        for rec in saved.get("engines", []):
            state = EngineState(rec.get("state", "failed"))
            if state not in (EngineState.ACTIVE, EngineState.SLEEPING):
                continue
            st = read_stat(int(rec["pid"]))
            if st is None or st.gone or st.start_time != rec.get("start_time"):
                self.log.warning(
                    "stale state: engine process gone or pid reused; not adopting",
                    engine=rec["id"],
                    pid=rec["pid"],
                )
                continue
            role: Role = "active" if state is EngineState.ACTIVE else "shadow"
            spec = self._spec(rec["id"], role, rec["port"], tuple(rec["gpus"]))
            engine = Engine(
                rec["id"],
                self.slot.name,
                role,
                spec,
                self.scfg.backend,
                pid=int(rec["pid"]),
                start_ticks=st.start_time,
                group=self.group_of(int(rec["port"])),
            )
            awake = state is EngineState.SLEEPING and isinstance(
                self.suspender, (AwakeStandby, FlockStandby)
            )
            if awake:
                assert self.suspender is not None
                engine.suspended_by = self.suspender.name
            want = Readiness.READY if state is EngineState.ACTIVE or awake else Readiness.SLEEPING
            try:
                answer = await self.backend.health(self.endpoint(engine))
            except Exception as e:
                answer = Readiness.DOWN
                self._plugin_failed(engine, "health", e)
            if answer is not want:
                self.log.warning(
                    "not adopting: the engine answers differently than saved",
                    engine=engine.id,
                    saved=state.value,
                    answer=answer.value,
                )
                signal_group(engine.pid or 0, signal.SIGKILL)  # ours, but not usable
                continue
            self.engines[engine.id] = engine
            self.manager.adopt(self._watchers(), engine)
            self.set_state(engine, state, "adopted from an earlier supervisor")
            if state is EngineState.ACTIVE:
                self.slot.active = engine.id
                self._set_degraded("")
            self._start_probes(engine)
            adopted += 1
        numbers = [
            int(e.id.rsplit("-", 1)[1])
            for e in self.engines.values()
            if e.id.rsplit("-", 1)[1].isdigit()
        ]
        self._ids = itertools.count(max(numbers, default=-1) + 1)
        return adopted

    async def start(self) -> None:
        """Shadows load and sleep first (so an active on the same GPUs fits), then the
        active engine becomes ready. Adopted engines count: only what is missing starts.
        Self-promoting shadows (``suspend = "flock"``) start after the active engine: the
        first engine up takes the lock and serves."""
        flock = isinstance(self.suspender, FlockStandby)
        if not flock:
            await self._start_shadows()
        elsewhere = self.coord.served_elsewhere(self.slot.name)
        if self.slot.active is not None:
            self._go(Event.ACTIVE_READY, f"adopted active engine {self.slot.active}")
        elif not self.hosts_active or elsewhere:
            why = f"served by {elsewhere}" if elsewhere else "this node keeps shadows only"
            self._go(Event.SERVED_ELSEWHERE, why)
        else:
            await self.start_active()
            if self.slot.active is None and self.sleeping_shadows():
                # The active engine did not come up, but a shadow is ready: serve with it.
                await self.recover("the active engine did not come up at start")
        if flock:
            await self._start_shadows()
        if self.slot.active is not None or self.phase is Phase.STANDBY:
            self._set_degraded("")
        self.ready.set()
        self.kick_replenish()

    async def _start_shadows(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.missing_shadows()):
                tg.start_soon(self._start_shadow_logged)

    async def start_active(self) -> bool:
        """Launch an active engine cold and promote it once ready (startup, or a slot with
        no shadows that lost its active engine); whether it serves now."""
        async with self.lock:
            try:
                engine = self._new_engine("active")
            except FailoverError as e:
                self._go(Event.ACTIVE_FAILED_TO_START, f"cannot launch an active engine: {e}")
                self._set_degraded(str(e))
                return False
            try:
                await self._launch(engine)
                await self._wait_health(engine, {Readiness.READY}, self.cfg.health.load_timeout)
            except FailoverError as e:
                self._go(Event.ACTIVE_FAILED_TO_START, f"{engine.id} did not come up: {e}")
                self._set_degraded(f"active engine did not come up: {e}")
                if engine.state not in _ENDED:
                    self.set_state(engine, EngineState.FAILED, f"did not come up: {e}")
                    self.manager.kill_now(engine)
                self.spawn(self._retire, engine, why=f"retire {engine.id}")
                return False
            try:
                epoch = await self._claim_cold(engine)
            except ClaimRefused as e:
                self._waiting_for_etcd = True
                self._go(Event.ACTIVE_FAILED_TO_START, f"{engine.id} cannot be claimed now: {e}")
                self._set_degraded(f"the active engine cannot be claimed yet: {e}")
                self.set_state(engine, EngineState.DRAINING, "not claimed: etcd unreachable")
                await self.manager.stop(engine, self.cfg.failover.stop_grace)
                self.set_state(engine, EngineState.STOPPED, "not claimed: etcd unreachable")
                self.spawn(self._retire, engine, why=f"retire {engine.id}")
                return False
            if epoch is None:
                self._go(Event.SERVED_ELSEWHERE, f"another node serves the slot; {engine.id} stops")
                self.set_state(engine, EngineState.DRAINING, "fenced: slot served elsewhere")
                await self.manager.stop(engine, self.cfg.failover.stop_grace)
                self.set_state(engine, EngineState.STOPPED, "fenced: slot served elsewhere")
                self._set_degraded("")
                self.spawn(self._retire, engine, why=f"retire {engine.id}")
                return False
            self._promote_state(engine, epoch)
            self._go(Event.ACTIVE_READY, f"{engine.id} loaded and ready", epoch=epoch)
            return True

    async def _claim_cold(self, engine: Engine) -> int | None:
        if self.grouped:
            # A group is claimed by the cluster leader once every member is up.
            return self.slot.epoch
        return await self.coord.claim(self.slot.name, engine.unit, self.slot.epoch, "started cold")

    def _promote_state(self, engine: Engine, epoch: int) -> None:
        self.slot.epoch = epoch
        self.slot.active = engine.id
        engine.role = "active"
        engine.spec = replace(engine.spec, role="active")
        self.set_state(engine, EngineState.ACTIVE, f"promoted at epoch {self.slot.epoch}")
        self._set_degraded("")

    async def _start_shadow_logged(self) -> None:
        try:
            await self.start_shadow()
        except FailoverError as e:
            self.log.error("shadow did not come up", error=str(e))

    async def start_shadow(self) -> Engine:
        """Launch one shadow, wait until loaded, put it to sleep, verify it sleeps. A shadow
        that does not make it is killed (its retirement frees its place)."""
        engine = self._new_engine("shadow")
        try:
            await self._launch(engine)
            await self._load_and_sleep(engine)
        except BaseException as e:
            if engine.state not in _ENDED:
                self.set_state(engine, EngineState.FAILED, f"did not come up as a shadow: {e}")
                self.manager.kill_now(engine)
            self.spawn(self._retire, engine, why=f"retire {engine.id}")
            raise
        if (p := self.paused()) is not None:
            self.log.info(
                f"{engine.id} loaded and asleep; paused, so nothing is promoted: {p.reason}"
            )
        elif self._go(Event.SHADOW_READY, f"{engine.id} loaded and asleep") == "promote_shadow":
            why = "a shadow is ready for a degraded slot"
            self.spawn(self._recover_locked, why, why=f"recover: {why}")
        return engine

    async def _load_and_sleep(self, engine: Engine) -> None:
        want = {Readiness.READY} if self.suspender is not None else set()
        state = await self._wait_health(
            engine, want or {Readiness.READY, Readiness.SLEEPING}, self.cfg.health.load_timeout
        )
        if self.suspender is not None:
            await self._suspend(engine)
            return
        if state is Readiness.READY:
            try:
                with anyio.fail_after(self.cfg.failover.wake_timeout):
                    await self.backend.sleep(
                        self.control(engine), self.cfg.failover.shadow_sleep_level
                    )
            except Exception as e:
                self._plugin_failed(engine, "sleep", e)
                raise FailoverError(f"could not put shadow {engine.id} to sleep: {e!r}") from e
        await self._wait_health(engine, {Readiness.SLEEPING}, self.cfg.failover.wake_timeout)
        self.set_state(
            engine,
            EngineState.SLEEPING,
            f"loaded and asleep (level {self.cfg.failover.shadow_sleep_level})",
        )

    async def _suspend(self, engine: Engine) -> None:
        """Shadow asleep through the suspend strategy (cuda-checkpoint), not the engine."""
        assert self.suspender is not None and engine.pid is not None
        try:
            pids = await self.suspender.suspend(engine.pid)
        except BackendError as e:
            raise FailoverError(f"could not suspend shadow {engine.id}: {e}") from e
        engine.suspended_by = self.suspender.name
        if engine.standing_by_awake:
            how = "loaded and standing by awake (not routed to)"
        elif isinstance(self.suspender, FlockStandby):
            how = f"loaded and parked on the failover lock {self.lock_path}"
        else:
            how = f"suspended by {self.suspender.name} (pids {pids})"
        self.set_state(engine, EngineState.SLEEPING, how)

    def _plugin_failed(self, engine: Engine, hook: str, e: BaseException) -> None:
        if isinstance(e, Exception) and not isinstance(e, (BackendError, FailoverError)):
            self.metrics.plugin_errors.labels(self.backend.name, hook).inc()
            self.log.error(
                f"backend {hook} hook raised", engine=engine.id, error=repr(e), exc_info=e
            )

    # -- shadows: one replenishing task per slot -----------------------------------------
    def kick_replenish(self) -> None:
        """Something changed that may leave the slot short of shadows (or, without shadows,
        of its active engine): the replenisher looks again."""
        self._kick.set()

    def _backoff(self) -> float:
        f = self.cfg.failover
        return float(min(f.relaunch_backoff * 2**self._launch_failures, f.relaunch_backoff_max))

    async def _replenish_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            if not self.ready.is_set():
                continue  # start() launches what the slot needs first, then kicks
            await self._replenish()

    async def _replenish(self) -> None:
        """Launch, one at a time, what the slot lacks. Consecutive failures back off
        exponentially (``relaunch_backoff`` doubling to ``relaunch_backoff_max``); a success
        resets it, so an engine that served between two failures starts from the bottom."""
        while not self.stopped:
            cold = self.needs_cold_start()
            missing = self.missing_shadows()
            if not cold and not missing:
                self.shadow_shortfall = ""
                self._update_gauges()
                return
            if self.rolling_out:
                return  # the rollout launches what the slot needs itself, then kicks
            if (p := self.paused()) is not None:
                self.shadow_shortfall = f"paused ({p.reason}): nothing is relaunched until resumed"
                self._update_gauges()
                return
            if self._free_port() is None:
                # A dead engine still holds its place; its retirement kicks us again.
                self.shadow_shortfall = "waiting for a stopped engine's processes to exit"
                return
            delay = self._backoff()
            action = "the active engine cold" if cold else f"1 of {missing} missing shadow(s)"
            self.log.info(
                f"relaunching {action} in {delay:g}s",
                consecutive_failures=self._launch_failures,
            )
            await anyio.sleep(delay)
            if self.stopped or self.paused() is not None or self.rolling_out:
                continue  # looked at again from the top
            if cold:
                if self._go(Event.COLD_START, "the slot has no shadow to promote") is None:
                    return
                self.metrics.engine_relaunches.labels(self.slot.name).inc()
                ok = await self._cold_start()
            else:
                if self._go(Event.SHADOWS_MISSING, f"{missing} shadow(s) missing") is None:
                    return
                self.metrics.engine_relaunches.labels(self.slot.name).inc()
                try:
                    await self.start_shadow()
                    ok = True
                except FailoverError as e:
                    ok = False
                    self.shadow_shortfall = f"relaunched shadow did not come up: {e}"
                    self.log.error("relaunched shadow did not come up", error=str(e))
            # A success starts the backoff from the bottom again only once an engine serves:
            # a shadow that loads fine but is promoted at once into a failing wake (a plugin
            # bug, a broken GPU) must not make every relaunch immediate.
            if ok and (cold or self.slot.active is not None):
                self._launch_failures = 0
            elif not ok:
                self._launch_failures += 1
                self._update_gauges()

    async def _cold_start(self) -> bool:
        ok = await self.start_active()
        record, self._cold_record = self._cold_record, None
        if record is not None:
            if ok:
                record.result = "cold-restarted"
                record.promoted_engine, record.epoch = self.slot.active, self.slot.epoch
                record.finished_at = time.time()
            else:
                self._cold_record = record  # the next cold start may complete it
        return ok

    def restore_shadows(self) -> int:
        """Launch the shadows the slot is missing (e.g. after a broken GPU was cleared)."""
        self._launch_failures = 0
        self.kick_replenish()
        return self.missing_shadows() + (1 if self.needs_cold_start() else 0)

    # -- failure -------------------------------------------------------------------------
    async def on_engine_dead(
        self, engine: Engine, source: str, reason: str, detected_at: float
    ) -> None:
        was_active = self.slot.active == engine.id
        self.set_state(engine, EngineState.FAILED, f"{source}: {reason}")
        if source != "exit" or self.cfg.failover.kill_dead_group:
            self.manager.kill_now(engine)  # a hung or stopped engine must not linger
        if self.phase is not Phase.STOPPED:  # (stop_all stops what is left of it)
            self.spawn(self._retire, engine, why=f"retire {engine.id}, which failed")
        if not was_active:
            self.kick_replenish()
            return
        self.slot.active = None
        self._set_degraded(f"active engine {engine.id} failed")
        why = f"{engine.id} failed ({source}: {reason})"
        if (p := self.paused()) is not None:
            self._set_degraded(
                f"active engine {engine.id} failed while paused ({p.reason}); "
                "nothing is promoted until resumed"
            )
            self._go(Event.ACTIVE_DIED_PAUSED, f"{why}; paused: {p.reason}")
            return
        if self._go(Event.ACTIVE_DIED, why) == "promote_shadow":
            record = FailoverRecord(
                self.slot.name, engine.id, f"{source}: {reason}", detected_at=detected_at
            )
            await self.failover(record, dead=engine)

    async def failover(self, record: FailoverRecord, dead: Engine | None) -> None:
        self.history.appendleft(record)
        t0 = time.monotonic()
        async with self.lock:
            try:
                await self._failover_locked(record, dead)
            except FailoverError as e:
                record.result = "error"
                self._set_degraded(str(e))
                self._go(Event.FAILOVER_FAILED, f"failover failed: {e}", reason=record.reason)
            finally:
                record.finished_at = record.finished_at or time.time()
                self.metrics.failovers.labels(
                    self.slot.name, record.kind + ":" + record.reason.split(":")[0], record.result
                ).inc()
                if record.result == "promoted":
                    self.metrics.failover_seconds.labels(self.slot.name).observe(
                        time.monotonic() - t0
                    )
        self.kick_replenish()

    async def _failover_locked(self, record: FailoverRecord, dead: Engine | None) -> None:
        if self.grouped:
            # One member cannot replace a group: the cluster leader promotes a whole group.
            record.result = "handed to cluster"
            self._set_degraded("group member failed; the cluster leader fails the group over")
            self._go(Event.HANDED_TO_CLUSTER, f"group slot: {record.reason}")
            return
        known = self.slot.epoch  # the epoch our next claim builds on
        while True:
            shadows = self.sleeping_shadows()
            if not shadows:
                await self._no_shadow(record)
                return
            shadow = shadows[0]
            self.log.info(
                f"failing over to {shadow.id}: {record.reason}",
                failed=record.failed_engine,
                to=shadow.id,
                epoch=self.slot.epoch,
            )
            if (
                dead is not None
                and set(dead.spec.gpus) & set(shadow.spec.gpus)
                and dead.pid is not None
            ):
                with Step(record, "memory_release"):
                    gone = await self.manager.wait_group_gone(
                        dead.pid, self.cfg.failover.memory_release_timeout
                    )
                if not gone:
                    self.manager.kill_now(dead)
                    raise FailoverError(
                        f"engine {dead.id}'s processes still hold its GPUs after "
                        f"{self.cfg.failover.memory_release_timeout}s; not waking a paired "
                        "shadow into an OOM"
                    )
            try:
                with Step(record, "fence"):
                    epoch = await self.coord.claim(
                        self.slot.name, shadow.unit, known, record.reason
                    )
            except ClaimRefused as e:
                # Not fenced: undecided. The slot stays degraded (and says why) and is
                # promoted once etcd answers again (etcd_back).
                record.result, record.detail = "degraded", str(e)
                self._set_degraded(f"not promoting {shadow.id} yet: {e}")
                self._go(Event.FAILOVER_FAILED, f"claim refused for now: {e}")
                self._waiting_for_etcd = True
                return
            if epoch is None:
                record.result = "fenced"
                self._set_degraded("")
                self._go(
                    Event.FENCED,
                    f"the slot's epoch moved on in the cluster; not promoting {shadow.id}",
                    epoch=self.slot.epoch,
                )
                return
            known = epoch  # claimed: if this wake fails, the next claim goes on from here
            try:
                with Step(record, "wake"):
                    await self._wake(shadow)
            except FailoverError as e:
                self.log.error(f"shadow {shadow.id} failed to wake; trying the next", error=str(e))
                self._wake_failed(shadow, e)
                self._launch_failures += 1  # a shadow that cannot wake is a failed launch
                continue
            with Step(record, "promote"):
                self._promote_state(shadow, epoch)
            self.metrics.wake_seconds.labels(self.slot.name).observe(record.steps["wake"])
            record.promoted_engine, record.epoch, record.result = shadow.id, epoch, "promoted"
            self._go(
                Event.PROMOTED,
                f"promoted {shadow.id} at epoch {epoch}: {record.reason}; wake took "
                f"{record.steps['wake'] * 1000:.0f} ms",
                steps=record.steps,
                total_ms=round((time.time() - record.detected_at) * 1000, 1),
            )
            return

    async def _no_shadow(self, record: FailoverRecord) -> None:
        if self.scfg.shadows == 0 and self.hosts_active:
            record.result = "cold-restarting"
            self._cold_record = record
            self._set_degraded("no shadows configured: restarting the active engine cold")
        else:
            record.result = "degraded"
            self._set_degraded("no shadow available")
        if self._go(Event.NO_SHADOW, f"no sleeping shadow to promote: {record.reason}"):
            await self.coord.hand_over(self.slot.name, f"no shadow left on {self.cfg.node}")

    def _wake_failed(self, shadow: Engine, e: Exception) -> None:
        """A shadow that did not wake is of no use: failed, killed, its place freed."""
        self.set_state(shadow, EngineState.FAILED, f"wake failed: {e}")
        self.manager.kill_now(shadow)
        self.spawn(self._retire, shadow, why=f"retire {shadow.id}, which did not wake")

    async def _wake(self, shadow: Engine) -> None:
        """Wake through the plugin; an OOM is retried for ``wake_oom_retry`` seconds."""
        self.set_state(shadow, EngineState.WAKING, "chosen for promotion")
        ep = self.control(shadow)
        if self.suspender is not None and shadow.suspended_by:
            flock = isinstance(self.suspender, FlockStandby)
            try:
                with anyio.fail_after(self.cfg.failover.wake_timeout):
                    pids = await self.suspender.resume(shadow.pid or 0)
            except TimeoutError as e:
                if flock:
                    raise FailoverError(
                        f"{shadow.id} did not take the failover lock within "
                        f"{self.cfg.failover.wake_timeout}s (is its holder still alive?)"
                    ) from e
                raise FailoverError(f"resume took over {self.cfg.failover.wake_timeout}s") from e
            except BackendError as e:
                raise FailoverError(f"{self.suspender.name} resume failed: {e}") from e
            if flock:  # it wakes itself: waking it too would wake it twice
                self.log.info(
                    f"{shadow.id} took the failover lock and is promoting itself",
                    engine=shadow.id,
                    pids=pids,
                )
                # Its health route said ready all along; it serves once it generates.
                ep = self.endpoint(shadow)
                with anyio.move_on_after(self.cfg.failover.wake_timeout) as waited:
                    while not await self.judge.generates(shadow, self.backend, ep):
                        await anyio.sleep(0.05)
                if waited.cancelled_caught:
                    raise FailoverError(
                        f"{shadow.id} took the lock but generated nothing within "
                        f"{self.cfg.failover.wake_timeout}s"
                    )
            shadow.suspended_by = ""
            await self._wait_health(shadow, {Readiness.READY}, self.cfg.failover.wake_timeout)
            return
        deadline = time.monotonic() + self.cfg.failover.wake_oom_retry
        while True:
            try:
                with anyio.fail_after(self.cfg.failover.wake_timeout):
                    await self.backend.wake(ep)
                break
            except EngineOutOfMemory as e:
                if time.monotonic() >= deadline:
                    raise FailoverError(f"wake kept hitting OOM: {e}") from e
                self.log.warning("wake hit OOM; retrying", engine=shadow.id, error=str(e))
                await anyio.sleep(0.05)
            except TimeoutError as e:
                raise FailoverError(f"wake took over {self.cfg.failover.wake_timeout}s") from e
            except (BackendError, aiohttp.ClientError) as e:
                raise FailoverError(f"wake failed: {e}") from e
            except Exception as e:
                self._plugin_failed(shadow, "wake", e)
                raise FailoverError(f"backend wake hook raised: {e!r}") from e
        await self._wait_health(shadow, {Readiness.READY}, self.cfg.failover.wake_timeout)

    async def recover(self, why: str) -> None:
        """A degraded slot (or one whose active engine did not start) with a shadow ready:
        promote it."""
        if self.slot.active is not None or self.coord.served_elsewhere(self.slot.name):
            return
        if self.paused() is not None:
            return
        if self._go(Event.SHADOW_READY, why) == "promote_shadow":
            await self._recover_locked(why)

    async def _recover_locked(self, why: str) -> None:
        record = FailoverRecord(
            self.slot.name, None, f"recover: {why}", kind="recovery", detected_at=time.time()
        )
        await self.failover(record, dead=None)

    def etcd_back(self) -> None:
        """etcd answers again: a promotion it refused meanwhile is tried now."""
        if self._waiting_for_etcd and self._tg is not None and not self.stopped:
            self._waiting_for_etcd = False
            self.spawn(self.recover, "etcd is reachable again", why="recover: etcd is back")
            self.kick_replenish()  # a slot without shadows restarts its engine cold

    # -- cluster decisions ---------------------------------------------------------------
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
            if self._go(Event.ASSIGNED, f"the cluster promotes {engine_id}: {reason}") is None:
                return
            record = FailoverRecord(
                self.slot.name, None, f"cluster: {reason}", kind="cluster", detected_at=time.time()
            )
            self.history.appendleft(record)
            try:
                with Step(record, "wake"):
                    await self._wake(engine)
            except FailoverError as e:
                record.result = "error"
                self._wake_failed(engine, e)
                self._go(Event.FAILOVER_FAILED, f"assigned shadow {engine_id} failed to wake: {e}")
                return
            finally:
                record.finished_at = time.time()
            self._promote_state(engine, epoch)
            record.promoted_engine, record.epoch, record.result = engine_id, epoch, "promoted"
            self._go(Event.PROMOTED, f"promoted {engine_id} at epoch {epoch} for the cluster")
            self.metrics.failovers.labels(self.slot.name, "cluster", "promoted").inc()

    async def step_down(self, epoch: int, by: str) -> None:
        """The cluster moved the slot to ``by`` at ``epoch`` while this node still serves it
        (we were partitioned, or our group was replaced): stop our active engine."""
        async with self.lock:
            engine = self.active_engine()
            if engine is None:
                return
            if self._go(Event.STEP_DOWN, f"fenced at epoch {epoch}: {by} serves the slot") is None:
                return
            self.slot.active = None
            self.set_state(engine, EngineState.DRAINING, f"fenced at epoch {epoch} by {by}")
            await self.manager.stop(engine, self.cfg.failover.stop_grace)
            self.set_state(engine, EngineState.STOPPED, f"fenced at epoch {epoch}")
            self._set_degraded("")
        self.spawn(self._retire, engine, why=f"retire {engine.id}")

    # -- maintenance mode ----------------------------------------------------------------
    def paused(self) -> Pause | None:
        """The pause in force for this slot (its own, else its node's), unless expired."""
        now = time.time()
        for p in (self.pause, self.node_pause()):
            if p is not None and not p.expired(now):
                return p
        return None

    def set_pause(self, pause: Pause | None) -> None:
        """Pause (or, with None, resume) this slot; see :meth:`pause_changed`."""
        self.pause = pause
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
                self.spawn(self.recover, why, why=f"recover: {why}")
            self.kick_replenish()
        self.on_change()

    @property
    def rolling_out(self) -> bool:
        return self.rollout is not None and self.rollout.result == "in_progress"

    # -- manual actions ----------------------------------------------------------------
    def _check_target(self, to: str | None) -> Engine:
        """The shadow a switchover moves the slot to; FailoverError (nothing touched) when
        there is none."""
        if to is not None:
            target = self.engines.get(to)
            if target is None or target.state is not EngineState.SLEEPING:
                raise FailoverError(f"{to!r} is not a sleeping shadow of slot {self.slot.name}")
            return target
        shadows = self.sleeping_shadows()
        if not shadows:
            raise FailoverError(
                f"slot {self.slot.name} has no sleeping shadow to switch over to "
                f"({self.shadow_shortfall or 'none ready'}); the active engine keeps serving"
            )
        # A rollout's new engines go first: a plain switchover must not undo one.
        return max(shadows, key=lambda e: e.generation)

    def _make_before_break(self, old: Engine, new: Engine) -> bool:
        """Whether ``new`` can wake while ``old`` still serves: on other GPUs, or standing
        by awake already. On shared GPUs the old engine must let go of its memory first;
        a self-promoting shadow (flock) wakes only when the old one's lock is free."""
        if isinstance(self.suspender, FlockStandby) or self.grouped:
            return False
        return new.standing_by_awake or not set(old.spec.gpus) & set(new.spec.gpus)

    async def switchover(
        self, to: str | None, kind: str = "switchover", drain_for: float | None = None
    ) -> FailoverRecord:
        """Planned move of the slot to a shadow, its streams with it (token-exact, as on a
        failure, but with no detection and no error). Where the shadow can wake while the
        old engine serves, it does, and the streams move once it serves: their stall is the
        continuation's prefill. Otherwise the streams move at once and wait while the old
        engine stops and the shadow wakes. Refused (nothing touched) when no shadow could
        take the slot. ``drain_for``: how long the old engine may finish its streams before
        the rest move (default ``failover.drain_limit``; only where the new engine already
        serves, i.e. make before break)."""
        if drain_for is None:
            drain_for = self.cfg.failover.drain_limit
        target = self._check_target(to)
        old = self.active_engine()
        if old is not None and self.phase is not Phase.SERVING:
            raise FailoverError(f"slot {self.slot.name} is {self.phase}; try again once serving")
        record = FailoverRecord(
            self.slot.name,
            old.id if old else None,
            f"{kind}: requested",
            kind=kind,
            detected_at=time.time(),
        )
        if old is None:
            if self._go(Event.SHADOW_READY, f"{kind} requested on a slot with no active") is None:
                raise FailoverError(f"slot {self.slot.name} is {self.phase}")
        elif self._make_before_break(old, target):
            if (
                self._go(Event.SWITCHOVER, f"{kind}: {target.id} wakes while {old.id} serves")
                is None
            ):
                raise FailoverError(f"slot {self.slot.name} is {self.phase}")
            await self._switch_live(record, old, target, drain_for)
            return record
        else:
            if self._go(Event.SWITCHOVER, f"{kind} of {old.id} requested") is None:
                raise FailoverError(f"slot {self.slot.name} is {self.phase}")
            self.slot.active = None
            self._set_degraded(f"{kind} in progress")
            self.set_state(old, EngineState.DRAINING, f"{kind} requested")
            # The streams leave now and wait for the shadow (it shares the old engine's
            # GPUs): cutting them at the end of the old engine's drain would stall them more.
            record.moved_streams = self.move_streams(old.id)
            with Step(record, "drain"):
                await self.manager.stop(old, self.cfg.failover.stop_grace)
            self.set_state(old, EngineState.STOPPED, kind)
            self.spawn(self._retire, old, why=f"retire {old.id}")
        # put the chosen shadow first
        self.engines = {
            target.id: target,
            **{k: v for k, v in self.engines.items() if k != target.id},
        }
        await self.failover(record, dead=old)
        return record

    async def _switch_live(
        self, record: FailoverRecord, old: Engine, new: Engine, drain_for: float
    ) -> None:
        """Make before break: wake ``new`` while ``old`` serves, switch the slot to it at
        epoch + 1 (new requests go there), let ``old`` finish its streams for ``drain_for``
        seconds, move the rest, then stop ``old``. A failed wake leaves ``old`` serving."""
        self.history.appendleft(record)
        t0 = time.monotonic()
        label = record.kind + ":" + record.kind
        try:
            async with self.lock:
                try:
                    with Step(record, "wake"):
                        await self._wake(new)
                except FailoverError as e:
                    record.result, record.detail = "error", f"{new.id} failed to wake: {e}"
                    self._wake_failed(new, e)
                    self._go(Event.SWITCHOVER_ABORTED, f"{record.detail}; {old.id} serves on")
                    return
                try:
                    with Step(record, "fence"):
                        epoch = await self.coord.claim(
                            self.slot.name, new.unit, self.slot.epoch, record.reason
                        )
                except ClaimRefused as e:
                    record.result, record.detail = "error", f"not switching now: {e}"
                    await self._put_back(new)
                    self._go(Event.SWITCHOVER_ABORTED, f"{record.detail}; {old.id} serves on")
                    return
                if epoch is None:
                    record.result = "fenced"
                    record.detail = "the slot's epoch moved on in the cluster"
                    await self._put_back(new)
                    self._go(Event.FENCED, f"{record.detail}; not switching to {new.id}")
                    return
                with Step(record, "promote"):
                    # One step for routing: the old engine stops being a candidate as the
                    # new one becomes the active engine.
                    self.set_state(old, EngineState.DRAINING, f"{record.kind}: {new.id} serves")
                    self._promote_state(new, epoch)
                self.metrics.wake_seconds.labels(self.slot.name).observe(record.steps["wake"])
                record.promoted_engine, record.epoch, record.result = new.id, epoch, "promoted"
                self._go(
                    Event.PROMOTED,
                    f"{record.kind}: {new.id} serves at epoch {epoch}; {old.id} drains",
                    steps=record.steps,
                )
                self.metrics.failover_seconds.labels(self.slot.name).observe(time.monotonic() - t0)
            with Step(record, "drain"):
                # The old engine's streams may finish where they are (no re-prefill) ...
                with anyio.move_on_after(drain_for):
                    while self.streams_on(old.id):
                        await anyio.sleep(0.05)
            # ... and past the limit they move instead of being cut by its stop.
            record.moved_streams = self.move_streams(old.id)
            if record.moved_streams:
                self.log.info(
                    f"{record.moved_streams} stream(s) moved off {old.id} to {new.id}",
                    drained_for=record.steps["drain"],
                )
            with Step(record, "stop_old"):
                await self.manager.stop(old, self.cfg.failover.stop_grace)
            self.set_state(old, EngineState.STOPPED, record.kind)
            self.spawn(self._retire, old, why=f"retire {old.id}")
        finally:
            record.finished_at = time.time()
            result = record.result if record.result in ("promoted", "error") else "degraded"
            self.metrics.failovers.labels(self.slot.name, label, result).inc()
            self.kick_replenish()

    async def _put_back(self, engine: Engine) -> None:
        """A woken shadow that is not to serve after all: it is stopped (the replenisher
        starts a fresh one asleep)."""
        self.set_state(engine, EngineState.DRAINING, "woken for a switch that did not happen")
        await self.manager.stop(engine, self.cfg.failover.stop_grace)
        self.set_state(engine, EngineState.STOPPED, "woken for a switch that did not happen")
        self.spawn(self._retire, engine, why=f"retire {engine.id}")

    def schedule_switchover(self, at: float, to: str | None) -> ScheduledSwitchover:
        """A switchover at wall time ``at`` (replacing one already scheduled); the target
        is checked now and again when it fires."""
        self._check_target(to)
        self.cancel_scheduled("replaced by a new schedule")
        plan = ScheduledSwitchover(at, to, time.time())
        if not self.spawn(self._scheduled_switchover, plan, why="a scheduled switchover"):
            raise FailoverError("the supervisor is shutting down")
        self.scheduled = plan
        self.log.info(
            f"switchover scheduled for {time.strftime('%H:%M:%S', time.localtime(at))}",
            to=to,
            in_s=round(at - time.time(), 3),
        )
        self.on_change()
        return plan

    def cancel_scheduled(self, why: str = "cancelled") -> ScheduledSwitchover | None:
        plan, self.scheduled = self.scheduled, None
        if self._scheduled_scope is not None:
            self._scheduled_scope.cancel()
            self._scheduled_scope = None
        if plan is not None:
            self.log.info(f"scheduled switchover {why}", at=plan.at)
            self.on_change()
        return plan

    async def _scheduled_switchover(self, plan: ScheduledSwitchover) -> None:
        with anyio.CancelScope() as scope:
            self._scheduled_scope = scope
            await anyio.sleep(max(0.0, plan.at - time.time()))
            self.scheduled, self._scheduled_scope = None, None
            self.on_change()
            self.log.info("scheduled switchover fires", to=plan.to)
            try:
                record = await self.switchover(plan.to)
            except FailoverError as e:
                self.log.error("scheduled switchover refused", error=str(e))
                self.history.appendleft(
                    FailoverRecord(
                        self.slot.name,
                        self.slot.active,
                        "switchover: scheduled",
                        kind="switchover",
                        detected_at=time.time(),
                        result="error",
                        detail=str(e),
                        finished_at=time.time(),
                    )
                )
                return
            self.log.info("scheduled switchover done", result=record.result)

    async def wait_for_place(self) -> None:
        """Until a port (and with it GPUs) of the slot is free: a stopped engine holds its
        place until its exit is read. FailoverError if that takes past the stop grace."""
        with anyio.move_on_after(self.cfg.failover.stop_grace + 10):
            while self._free_port() is None:
                await anyio.sleep(0.05)
            return
        raise FailoverError("no free place in the slot's port range (an engine still runs)")

    async def retire_now(self, engine: Engine, why: str) -> None:
        """Stop an engine that serves nothing (a shadow) and wait until its place (port,
        GPUs) is free."""
        self.set_state(engine, EngineState.DRAINING, why)
        await self.manager.stop(engine, self.cfg.failover.stop_grace)
        self.set_state(engine, EngineState.STOPPED, why)
        await self._retire(engine)

    async def drain(self, engine_id: str, limit: float | None = None) -> None:
        """Stop an engine gracefully; an active one hands the slot to a shadow first and
        its streams finish there or, past ``limit``, move (see :meth:`switchover`)."""
        engine = self.engines.get(engine_id)
        if engine is None:
            raise FailoverError(f"no engine {engine_id!r} in slot {self.slot.name}")
        if engine.id == self.slot.active:
            await self.switchover(None, kind="drain", drain_for=limit)
            return
        self.set_state(engine, EngineState.DRAINING, "drain requested")
        await self.manager.stop(engine, self.cfg.failover.stop_grace)
        self.set_state(engine, EngineState.STOPPED, "drained")
        self.spawn(self._retire, engine, why=f"retire {engine.id}")

    async def stop_all(self) -> None:
        """Stop every engine of the slot still running (after :meth:`close`)."""
        for engine in self.live():
            self.set_state(engine, EngineState.STOPPED, "supervisor shutting down")
        async with anyio.create_task_group() as tg:
            for engine in list(self.engines.values()):
                if self.manager.running(engine) or (
                    engine.pid is not None and self.manager.group_alive(engine.pid)
                ):
                    tg.start_soon(self.manager.stop, engine, self.cfg.failover.stop_grace)
