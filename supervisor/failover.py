"""The failover policy, one :class:`SlotController` per slot.

On the death of a slot's active engine: mark it failed; pick a sleeping shadow; for a
shadow on the same GPUs, wait until the dead engine's whole process group is gone (its GPU
memory with it); wake the shadow through its plugin, retrying an out-of-memory wake for a
bounded time; check readiness; promote it (epoch + 1). Then restore the configured number
of shadows. With no shadow the slot is degraded (metric, log; the frontend answers 503)
until a shadow is ready again. Every decision is logged with its reason; every step is timed.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import aiohttp
import anyio
from anyio.abc import TaskGroup

from supervisor import log as logging
from supervisor.backends import Backend, BackendError, EngineEndpoint, EngineOutOfMemory
from supervisor.config import Config, SlotConfig
from supervisor.coordination.local import Coordinator, LocalCoordinator
from supervisor.engines import EngineManager, signal_group
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import (
    Engine,
    EngineSpec,
    EngineState,
    FailoverRecord,
    Readiness,
    Role,
    Slot,
)
from supervisor.procfs import read_stat

HISTORY = 50  # failover records kept for /status


class SuspendStrategy(Protocol):
    """Puts an engine's processes to sleep from outside (e.g. cuda-checkpoint)."""

    name: str

    async def suspend(self, root_pid: int) -> list[int]: ...

    async def resume(self, root_pid: int) -> list[int]: ...


def _suspend_strategy(name: str) -> SuspendStrategy | None:
    if name == "engine":
        return None
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
    """Owns one slot's engines: startup, failover, shadow restoration, manual actions."""

    def __init__(
        self,
        cfg: Config,
        slot_cfg: SlotConfig,
        backend: Backend,
        manager: EngineManager,
        judge: HealthJudge,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        history: deque[FailoverRecord],
        tg: TaskGroup,
        on_change: Callable[[], None] = lambda: None,
        gpu_broken: Callable[[str], bool] = lambda gpu: False,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.cfg, self.scfg, self.backend = cfg, slot_cfg, backend
        self.manager, self.judge, self.metrics = manager, judge, metrics
        self.session, self.history, self.tg = session, history, tg
        self.on_change = on_change  # routing follows every state change
        self.gpu_broken = gpu_broken  # GPUs a fatal XID (or NVML) marked broken
        self.coord: Coordinator = coordinator or LocalCoordinator()
        self.suspender = _suspend_strategy(slot_cfg.suspend)
        # In a cluster, engine ids name their node: they are unique cluster-wide.
        self._id_prefix = f"{cfg.node}." if cfg.cluster.enabled else ""
        self.slot = Slot(slot_cfg.name, slot_cfg.model_name)
        self.engines: dict[str, Engine] = {}
        self.lock = anyio.Lock()  # one promotion at a time per slot
        self._ids: Iterator[int] = itertools.count()
        self._relaunch_failures = 0
        self.log = logging.get(node=cfg.node, slot=slot_cfg.name)
        self.ready = anyio.Event()
        self._set_degraded("starting")

    # -- bookkeeping -------------------------------------------------------------------
    def endpoint(self, engine: Engine, timeout: float | None = None) -> EngineEndpoint:
        return EngineEndpoint(engine.url, self.session, timeout or self.cfg.health.probe_timeout)

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
        self.metrics.set_engine_state(engine.slot, engine.id, state)
        self._update_gauges()
        self.on_change()

    def _update_gauges(self) -> None:
        self.metrics.shadows_available.labels(self.slot.name).set(len(self.sleeping_shadows()))
        self.metrics.slot_epoch.labels(self.slot.name).set(self.slot.epoch)

    def _set_degraded(self, reason: str) -> None:
        self.slot.degraded_reason = reason
        self.metrics.slot_degraded.labels(self.slot.name).set(1 if reason else 0)

    def live(self) -> list[Engine]:
        return [
            e
            for e in self.engines.values()
            if e.state not in (EngineState.FAILED, EngineState.STOPPED)
        ]

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

    def _gpu_sets(self) -> list[tuple[str, ...]]:
        if self.scfg.placement == "paired":
            return [self.scfg.gpus]
        return [self.scfg.gpus, *self.scfg.shadow_gpus]

    def _occupied(self) -> tuple[set[int], list[tuple[str, ...]]]:
        # An engine's port and GPUs stay taken until its process group is gone.
        held = [
            e
            for e in self.engines.values()
            if e.state not in (EngineState.STOPPED, EngineState.FAILED) or self.manager.running(e)
        ]
        return {e.spec.port for e in held}, [e.spec.gpus for e in held]

    def _new_engine(self, role: Role) -> Engine:
        ports, gpu_sets = self._occupied()
        port = next(
            (
                p
                for p in range(self.scfg.base_port, self.scfg.base_port + self.scfg.shadows + 1)
                if p not in ports
            ),
            None,
        )
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
            env=dict(self.scfg.env),
            options={"suspend": self.scfg.suspend},
        )

    async def _launch(self, engine: Engine) -> None:
        cmd = self.manager.command(engine, self.backend, self.scfg.simulate, self.scfg.sim_args)
        for gpu in engine.spec.gpus:
            self.metrics.engine_gpu.labels(engine.slot, engine.id, gpu).set(1)
        try:
            await self.manager.launch(self.tg, engine, cmd)
        except OSError as e:
            self.set_state(engine, EngineState.FAILED, f"cannot start {cmd.argv[0]}: {e}")
            raise FailoverError(
                f"cannot start engine {engine.id} ({cmd.argv[0]}): {e.strerror or e}"
            ) from e
        self.set_state(engine, EngineState.LOADING)
        self.tg.start_soon(self.judge.probe_loop, engine, self.backend, self.endpoint(engine))

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
            if engine.state is EngineState.FAILED:
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

    # -- startup -------------------------------------------------------------------------
    def saved(self) -> dict[str, Any]:
        """This slot's part of the state file."""
        return {
            "epoch": self.slot.epoch,
            "active": self.slot.active,
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
            want = Readiness.READY if state is EngineState.ACTIVE else Readiness.SLEEPING
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
            self.manager.adopt(self.tg, engine)
            self.set_state(engine, state, "adopted from an earlier supervisor")
            if state is EngineState.ACTIVE:
                self.slot.active = engine.id
                self._set_degraded("")
            self.tg.start_soon(self.judge.probe_loop, engine, self.backend, self.endpoint(engine))
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
        active engine becomes ready. Adopted engines count: only what is missing starts."""
        async with anyio.create_task_group() as tg:
            for _ in range(self.missing_shadows()):
                tg.start_soon(self._start_shadow_logged)
        elsewhere = self.coord.served_elsewhere(self.slot.name)
        if self.slot.active is not None or not self.hosts_active or elsewhere:
            if elsewhere and self.slot.active is None:
                self.log.info("slot served by another node; keeping shadows only", by=elsewhere)
            self._set_degraded("")
            self.ready.set()
            return
        await self.start_active()
        if self.slot.active is None and self.sleeping_shadows():
            # The active engine did not come up, but a shadow is ready: serve with it.
            await self.recover("the active engine did not come up at start")
        self.ready.set()

    async def start_active(self) -> None:
        """Launch an active engine cold and promote it once ready (startup, or a slot with
        no shadows that lost its active engine)."""
        async with self.lock:
            try:
                engine = self._new_engine("active")
            except FailoverError as e:
                self.log.error("cannot launch an active engine", error=str(e))
                self._set_degraded(str(e))
                return
            try:
                await self._launch(engine)
                await self._wait_health(engine, {Readiness.READY}, self.cfg.health.load_timeout)
            except FailoverError as e:
                self.log.error("active engine did not come up", engine=engine.id, error=str(e))
                self._set_degraded(f"active engine did not come up: {e}")
                return
            epoch = await self._claim_cold(engine)
            if epoch is None:
                self.log.info(
                    "another node serves the slot: stopping the engine started cold",
                    engine=engine.id,
                )
                self.set_state(engine, EngineState.DRAINING, "fenced: slot served elsewhere")
                await self.manager.stop(engine, self.cfg.failover.stop_grace)
                self.set_state(engine, EngineState.STOPPED, "fenced: slot served elsewhere")
                self._set_degraded("")
                return
            self._promote_state(engine, epoch)

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
        self.log.info("slot serving", engine=engine.id, epoch=self.slot.epoch)

    async def _start_shadow_logged(self) -> None:
        try:
            await self.start_shadow()
        except FailoverError as e:
            self.log.error("shadow did not come up", error=str(e))

    async def start_shadow(self) -> Engine:
        """Launch one shadow, wait until loaded, put it to sleep, verify it sleeps."""
        engine = self._new_engine("shadow")
        await self._launch(engine)
        state = await self._wait_health(
            engine, {Readiness.READY, Readiness.SLEEPING}, self.cfg.health.load_timeout
        )
        ep = self.endpoint(engine, timeout=self.cfg.failover.wake_timeout)
        if self.suspender is not None:
            await self._suspend(engine)
            self._relaunch_failures = 0
            return engine
        if state is Readiness.READY:
            try:
                await self.backend.sleep(ep, self.cfg.failover.shadow_sleep_level)
            except Exception as e:
                self._plugin_failed(engine, "sleep", e)
                raise FailoverError(f"could not put shadow {engine.id} to sleep: {e}") from e
        await self._wait_health(engine, {Readiness.SLEEPING}, self.cfg.failover.wake_timeout)
        self.set_state(
            engine,
            EngineState.SLEEPING,
            f"loaded and asleep (level {self.cfg.failover.shadow_sleep_level})",
        )
        self._relaunch_failures = 0
        if self.slot.active is None and not self.lock.locked() and self.ready.is_set():
            self.tg.start_soon(self.recover, "a shadow is ready for a degraded slot")
        return engine

    async def _suspend(self, engine: Engine) -> None:
        """Shadow asleep through the suspend strategy (cuda-checkpoint), not the engine."""
        assert self.suspender is not None and engine.pid is not None
        try:
            pids = await self.suspender.suspend(engine.pid)
        except BackendError as e:
            raise FailoverError(f"could not suspend shadow {engine.id}: {e}") from e
        engine.suspended_by = self.suspender.name
        self.set_state(
            engine, EngineState.SLEEPING, f"suspended by {self.suspender.name} (pids {pids})"
        )
        if self.slot.active is None and not self.lock.locked() and self.ready.is_set():
            self.tg.start_soon(self.recover, "a shadow is ready for a degraded slot")

    def _plugin_failed(self, engine: Engine, hook: str, e: Exception) -> None:
        if not isinstance(e, BackendError):
            self.metrics.plugin_errors.labels(self.backend.name, hook).inc()
            self.log.error(f"backend {hook} hook raised", engine=engine.id, error=repr(e))

    # -- failure -------------------------------------------------------------------------
    async def on_engine_dead(
        self, engine: Engine, source: str, reason: str, detected_at: float
    ) -> None:
        was_active = self.slot.active == engine.id
        self.set_state(engine, EngineState.FAILED, f"{source}: {reason}")
        if source != "exit" or self.cfg.failover.kill_dead_group:
            self.manager.kill_now(engine)  # a hung or stopped engine must not linger
        if was_active:
            record = FailoverRecord(
                self.slot.name, engine.id, f"{source}: {reason}", detected_at=detected_at
            )
            self.slot.active = None
            self._set_degraded(f"active engine {engine.id} failed")
            await self.failover(record, dead=engine)
        self.tg.start_soon(self.relaunch_after, engine)

    async def failover(self, record: FailoverRecord, dead: Engine | None) -> None:
        self.history.appendleft(record)
        t0 = time.monotonic()
        async with self.lock:
            try:
                await self._failover_locked(record, dead)
            except FailoverError as e:
                record.result = "error"
                self._set_degraded(str(e))
                self.log.error("failover failed; slot degraded", reason=record.reason, error=str(e))
            finally:
                record.finished_at = time.time()
                self.metrics.failovers.labels(
                    self.slot.name, record.kind + ":" + record.reason.split(":")[0], record.result
                ).inc()
                if record.result == "promoted":
                    self.metrics.failover_seconds.labels(self.slot.name).observe(
                        time.monotonic() - t0
                    )

    async def _failover_locked(self, record: FailoverRecord, dead: Engine | None) -> None:
        if self.grouped:
            # One member cannot replace a group: the cluster leader promotes a whole group.
            record.result = "handed to cluster"
            self._set_degraded("group member failed; the cluster leader fails the group over")
            self.log.info("group slot: failover is the cluster leader's", reason=record.reason)
            return
        known = self.slot.epoch  # the epoch our next claim builds on
        while True:
            shadows = self.sleeping_shadows()
            if not shadows:
                record.result = "degraded"
                self._set_degraded("no shadow available")
                self.log.error("slot degraded: no sleeping shadow to promote", reason=record.reason)
                await self.coord.hand_over(self.slot.name, f"no shadow left on {self.cfg.node}")
                return
            shadow = shadows[0]
            self.log.info(
                "failing over",
                failed=record.failed_engine,
                to=shadow.id,
                reason=record.reason,
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
            with Step(record, "fence"):
                epoch = await self.coord.claim(self.slot.name, shadow.unit, known, record.reason)
            if epoch is None:
                record.result = "fenced"
                self._set_degraded("")
                self.log.warning(
                    "not promoting: the slot's epoch moved on in the cluster (fenced)",
                    shadow=shadow.id,
                    epoch=self.slot.epoch,
                )
                return
            known = epoch  # claimed: if this wake fails, the next claim goes on from here
            try:
                with Step(record, "wake"):
                    await self._wake(shadow)
            except FailoverError as e:
                self.log.error(
                    "shadow failed to wake; trying the next", engine=shadow.id, error=str(e)
                )
                self.set_state(shadow, EngineState.FAILED, f"wake failed: {e}")
                self.manager.kill_now(shadow)
                self.tg.start_soon(self.relaunch_after, shadow)
                continue
            with Step(record, "promote"):
                self._promote_state(shadow, epoch)
            self.metrics.wake_seconds.labels(self.slot.name).observe(record.steps["wake"])
            record.promoted_engine, record.epoch, record.result = (
                shadow.id,
                self.slot.epoch,
                "promoted",
            )
            self.log.info(
                "failover done",
                promoted=shadow.id,
                epoch=self.slot.epoch,
                steps=record.steps,
                total_ms=round((time.time() - record.detected_at) * 1000, 1),
            )
            return

    async def _wake(self, shadow: Engine) -> None:
        """Wake through the plugin; an OOM is retried for ``wake_oom_retry`` seconds."""
        self.set_state(shadow, EngineState.WAKING, "chosen for promotion")
        ep = self.endpoint(shadow, timeout=self.cfg.failover.wake_timeout)
        if self.suspender is not None and shadow.suspended_by:
            try:
                with anyio.fail_after(self.cfg.failover.wake_timeout):
                    await self.suspender.resume(shadow.pid or 0)
            except TimeoutError as e:
                raise FailoverError(f"resume took over {self.cfg.failover.wake_timeout}s") from e
            except BackendError as e:
                raise FailoverError(f"{self.suspender.name} resume failed: {e}") from e
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
        if self.slot.active is not None or self.coord.served_elsewhere(self.slot.name):
            return
        record = FailoverRecord(
            self.slot.name, None, f"recover: {why}", kind="recovery", detected_at=time.time()
        )
        await self.failover(record, dead=None)

    async def relaunch_after(self, engine: Engine) -> None:
        """Replace a failed engine with a new shadow, with exponential backoff."""
        if engine.pid is not None:
            await self.manager.wait_group_gone(engine.pid, self.cfg.failover.stop_grace + 10)
        cold = self.needs_cold_start()
        if not self.missing_shadows() and not cold:
            return
        self._relaunch_failures += 1
        f = self.cfg.failover
        delay = min(f.relaunch_backoff * 2 ** (self._relaunch_failures - 1), f.relaunch_backoff_max)
        self.log.info("relaunching as a new shadow", replaces=engine.id, delay=delay)
        await anyio.sleep(delay)
        self.metrics.engine_relaunches.labels(self.slot.name).inc()
        if cold:
            self.log.info("no shadows configured: restarting the active engine cold")
            await self.start_active()
            return
        try:
            new = await self.start_shadow()
            new.relaunches = engine.relaunches + 1
        except FailoverError as e:
            self.log.error("relaunched shadow did not come up", error=str(e))

    def restore_shadows(self) -> int:
        """Launch the shadows the slot is missing (e.g. after a broken GPU was cleared)."""
        missing = self.missing_shadows()
        for _ in range(missing):
            self.tg.start_soon(self._start_shadow_logged)
        if self.needs_cold_start():
            self.tg.start_soon(self.start_active)
        return missing

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
            record = FailoverRecord(
                self.slot.name, None, f"cluster: {reason}", kind="cluster", detected_at=time.time()
            )
            self.history.appendleft(record)
            self.log.info("cluster promotes our shadow", engine=engine_id, epoch=epoch, why=reason)
            try:
                with Step(record, "wake"):
                    await self._wake(engine)
            except FailoverError as e:
                record.result = "error"
                self.log.error("assigned shadow failed to wake", engine=engine_id, error=str(e))
                self.set_state(engine, EngineState.FAILED, f"wake failed: {e}")
                self.manager.kill_now(engine)
                self.tg.start_soon(self.relaunch_after, engine)
                return
            finally:
                record.finished_at = time.time()
            self._promote_state(engine, epoch)
            record.promoted_engine, record.epoch, record.result = engine_id, epoch, "promoted"
            self.metrics.failovers.labels(self.slot.name, "cluster", "promoted").inc()

    async def step_down(self, epoch: int, by: str) -> None:
        """The cluster moved the slot to ``by`` at ``epoch`` while this node still serves it
        (we were partitioned, or our group was replaced): stop our active engine."""
        async with self.lock:
            engine = self.active_engine()
            if engine is None:
                return
            self.log.warning(
                "fenced: the cluster serves this slot elsewhere; stopping our active engine",
                engine=engine.id,
                epoch=epoch,
                now_served_by=by,
            )
            self.slot.active = None
            self.set_state(engine, EngineState.DRAINING, f"fenced at epoch {epoch} by {by}")
            await self.manager.stop(engine, self.cfg.failover.stop_grace)
            self.set_state(engine, EngineState.STOPPED, f"fenced at epoch {epoch}")
            self._set_degraded("")
        self.tg.start_soon(self.relaunch_after, engine)

    # -- manual actions ----------------------------------------------------------------
    async def switchover(self, to: str | None, kind: str = "switchover") -> FailoverRecord:
        """Planned move of the slot to a shadow; the old active is stopped gracefully."""
        old = self.active_engine()
        if to is not None:
            target = self.engines.get(to)
            if target is None or target.state is not EngineState.SLEEPING:
                raise FailoverError(f"{to!r} is not a sleeping shadow of slot {self.slot.name}")
        record = FailoverRecord(
            self.slot.name,
            old.id if old else None,
            f"{kind}: requested",
            kind=kind,
            detected_at=time.time(),
        )
        if old is not None:
            self.slot.active = None
            self._set_degraded(f"{kind} in progress")
            self.set_state(old, EngineState.DRAINING, f"{kind} requested")
            with Step(record, "drain"):
                await self.manager.stop(old, self.cfg.failover.stop_grace)
            self.set_state(old, EngineState.STOPPED, kind)
        if to is not None:  # put the chosen shadow first
            target = self.engines[to]
            self.engines = {to: target, **{k: v for k, v in self.engines.items() if k != to}}
        await self.failover(record, dead=old)
        if old is not None:
            self.tg.start_soon(self.relaunch_after, old)
        return record

    async def drain(self, engine_id: str) -> None:
        engine = self.engines.get(engine_id)
        if engine is None:
            raise FailoverError(f"no engine {engine_id!r} in slot {self.slot.name}")
        if engine.id == self.slot.active:
            await self.switchover(None, kind="drain")
            return
        self.set_state(engine, EngineState.DRAINING, "drain requested")
        await self.manager.stop(engine, self.cfg.failover.stop_grace)
        self.set_state(engine, EngineState.STOPPED, "drained")
        self.tg.start_soon(self.relaunch_after, engine)

    async def stop_all(self) -> None:
        for engine in self.live():
            self.set_state(engine, EngineState.STOPPED, "supervisor shutting down")
        async with anyio.create_task_group() as tg:
            for engine in list(self.engines.values()):
                if self.manager.running(engine):
                    tg.start_soon(self.manager.stop, engine, self.cfg.failover.stop_grace)
