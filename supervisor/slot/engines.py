"""A slot's engines from launch to reap: :class:`EngineLifecycle`.

Launch and health waits, putting a shadow to sleep (the engine's own sleep or a suspend
strategy), waking one (an out-of-memory wake is retried for a bounded time; a flock shadow
wakes itself), adopting engines an earlier supervisor left running, and the one way an
engine is stopped (:meth:`EngineLifecycle.stop`) and leaves the slot
(:meth:`EngineLifecycle.retire`). It never moves the slot's phase: that is the controller's.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio

from supervisor.backends import Backend, BackendError, EngineEndpoint, EngineOutOfMemory
from supervisor.engines import EngineManager, group_members, signal_group
from supervisor.flocklease import FLOCK, FlockStandby
from supervisor.health import HealthJudge
from supervisor.model import AWAKE, Engine, EngineSpec, EngineState, Readiness, Role
from supervisor.procfs import read_stat
from supervisor.sessions import Sessions
from supervisor.slot.core import SlotCore
from supervisor.slot.placement import (
    FailoverError,
    Held,
    choose_gpus,
    engine_spec,
    free_port,
    group_of,
    held,
    next_number,
)

ENDED = (EngineState.FAILED, EngineState.STOPPED)


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


def suspend_strategy(name: str, lock_path: Path) -> SuspendStrategy | None:
    """The strategy a slot's ``suspend`` setting names (None: the engine's own sleep)."""
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


class EngineLifecycle:
    """Launches, watches, sleeps, wakes, stops and reaps the engines of one slot."""

    def __init__(
        self,
        ctl: SlotCore,
        backend: Backend,
        manager: EngineManager,
        judge: HealthJudge,
        sessions: Sessions,
    ) -> None:
        self.ctl = ctl
        # The engines' own tools: no other part of the slot talks to an engine's processes,
        # its plugin or its probes (the slot's callers may, through the controller).
        self.backend, self.manager, self.judge, self.sessions = backend, manager, judge, sessions
        self.lock_path = ctl.cfg.state_dir / "locks" / f"{ctl.scfg.name}.lock"
        # With suspend = "flock", the slot's engines share this lock: its holder serves.
        self.suspender = suspend_strategy(ctl.scfg.suspend, self.lock_path)
        # Engine ids: in a cluster they name their node, so they are unique cluster-wide.
        self.id_prefix = f"{ctl.cfg.node}." if ctl.cfg.cluster.enabled else ""
        self.ids = itertools.count()  # past the adopted ones (see adopt)

    @property
    def flock(self) -> bool:
        """Self-promoting shadows: the first engine to take the lock serves."""
        return isinstance(self.suspender, FlockStandby)

    def endpoint(self, engine: Engine, timeout: float | None = None) -> EngineEndpoint:
        """For probes and readiness checks (their own connection pool)."""
        s = self.sessions
        timeout = timeout or self.ctl.cfg.health.probe_timeout
        return EngineEndpoint(engine.url, s.probes, timeout, pool=s.probe_pool)

    def control(self, engine: Engine) -> EngineEndpoint:
        """For sleep and wake (their own pool, never queued behind probes or clients)."""
        return EngineEndpoint(engine.url, self.sessions.control, self.ctl.cfg.failover.wake_timeout)

    def spec(self, engine_id: str, role: Role, port: int, gpus: tuple[str, ...]) -> EngineSpec:
        ctl = self.ctl
        return engine_spec(
            ctl.scfg,
            engine_id,
            role,
            port,
            gpus,
            host=ctl.cfg.engine_host,
            lock_path=self.lock_path,
        )

    def set_state(self, engine: Engine, state: EngineState, reason: str = "") -> None:
        """An engine's new state, logged with its reason; the metrics and routing follow."""
        ctl = self.ctl
        if engine.state is not state:
            ctl.log.info(
                "engine state",
                engine=engine.id,
                epoch=ctl.slot.epoch,
                **{"from": engine.state.value, "to": state.value},
                reason=reason or None,
            )
        engine.state = state
        engine.reason = reason
        if engine.id in ctl.engines:
            ctl.metrics.set_engine_state(engine.slot, engine.id, state)
        self.update_gauges()
        ctl.on_change()

    def update_gauges(self) -> None:
        """The slot's shadow and epoch gauges, as the slot is now."""
        ctl = self.ctl
        ctl.metrics.shadows_available.labels(ctl.slot.name).set(len(ctl.sleeping_shadows()))
        ctl.metrics.shadows_missing.labels(ctl.slot.name).set(ctl.missing_shadows())
        ctl.metrics.slot_epoch.labels(ctl.slot.name).set(ctl.slot.epoch)

    def plugin_failed(self, engine: Engine, hook: str, e: BaseException) -> None:
        if isinstance(e, Exception) and not isinstance(e, (BackendError, FailoverError)):
            self.ctl.metrics.plugin_errors.labels(self.backend.name, hook).inc()
            self.ctl.log.error(
                f"backend {hook} hook raised", engine=engine.id, error=repr(e), exc_info=e
            )

    # -- place and launch ----------------------------------------------------------------
    def held(self) -> Held:
        # An engine's port and GPUs stay taken until its process group is gone.
        engines = self.ctl.engines.values()
        running = self.manager.running
        return held(
            (e.spec.port, e.spec.gpus) for e in engines if e.state not in ENDED or running(e)
        )

    def free_port(self) -> int | None:
        old = self.ctl.rollouts.old  # during a rollout the old spec's ports count too
        return free_port(self.held(), self.ctl.scfg, *([old] if old else []))

    async def wait_for_place(self) -> None:
        """Until a port (and with it GPUs) of the slot is free: a stopped engine holds its
        place until its exit is read. FailoverError if that takes past the stop grace."""
        with anyio.move_on_after(self.ctl.cfg.failover.stop_grace + 10):
            while self.free_port() is None:
                await anyio.sleep(0.05)
            return
        raise FailoverError("no free place in the slot's port range (an engine still runs)")

    def new_engine(self, role: Role) -> Engine:
        """A new engine of the slot, placed (port, GPUs) and launching; not started yet."""
        ctl = self.ctl
        if ctl.stopped:
            raise FailoverError("the supervisor is shutting down; not launching")
        taken = self.held()
        port = self.free_port()
        if port is None:
            raise FailoverError("no free port in the slot's range (an engine still runs)")
        gpus = choose_gpus(ctl.scfg, role, taken, ctl.gpu_broken)
        eid = f"{self.id_prefix}{ctl.slot.name}-{next(self.ids)}"
        engine = Engine(
            eid,
            ctl.slot.name,
            role,
            self.spec(eid, role, port, gpus),
            ctl.scfg.backend,
            group=group_of(ctl.scfg, port),
            generation=ctl.rollouts.generation,
        )
        ctl.engines[eid] = engine
        self.set_state(engine, EngineState.LAUNCHING)
        return engine

    async def launch(self, engine: Engine) -> None:
        ctl = self.ctl
        cmd = self.manager.command(engine, self.backend, ctl.scfg.simulate, ctl.scfg.sim_args)
        for gpu in engine.spec.gpus:
            ctl.metrics.engine_gpu.labels(engine.slot, engine.id, gpu).set(1)
        if ctl.stopped:  # (nothing starts while the slot stops, see spawn)
            raise FailoverError(f"engine {engine.id} not started: the supervisor is shutting down")
        try:
            await self.manager.launch(ctl.watchers(), engine, cmd)
        except OSError as e:
            self.set_state(engine, EngineState.FAILED, f"cannot start {cmd.argv[0]}: {e}")
            ctl.spawn(self.retire, engine, why=f"retire {engine.id}, which did not start")
            raise FailoverError(
                f"cannot start engine {engine.id} ({cmd.argv[0]}): {e.strerror or e}"
            ) from e
        self.set_state(engine, EngineState.LOADING)
        self.start_probes(engine)

    def start_probes(self, engine: Engine) -> None:
        """The health judge's probes of ``engine``, in the slot's task group."""
        ctl = self.ctl
        ep = self.endpoint(engine)
        ctl.spawn(self.judge.probe_loop, engine, self.backend, ep, why=f"probe {engine.id}")

    async def wait_health(self, engine: Engine, want: set[Readiness], timeout: float) -> Readiness:
        ctl = self.ctl
        ep = self.endpoint(engine)
        deadline = time.monotonic() + timeout
        last = Readiness.DOWN
        while time.monotonic() < deadline:
            if engine.state in ENDED:
                raise FailoverError(f"engine {engine.id} failed: {engine.reason}")
            try:
                last = await self.backend.health(ep)
            except Exception as e:  # plugin bug: contained, counted, retried
                ctl.metrics.plugin_errors.labels(self.backend.name, "health").inc()
                ctl.log.error("backend health hook raised", engine=engine.id, error=repr(e))
            if last in want:
                return last
            await anyio.sleep(0.01)
        raise FailoverError(
            f"engine {engine.id} not {'/'.join(want)} after {timeout}s (last: {last})"
        )

    async def ready(self, engine: Engine) -> None:
        """Launch ``engine`` and wait until it is ready (an active engine loading cold)."""
        await self.launch(engine)
        await self.wait_health(engine, {Readiness.READY}, self.ctl.cfg.health.load_timeout)

    async def load_and_sleep(self, engine: Engine) -> None:
        """Launch a shadow, wait until it loaded, put it to sleep and check that it sleeps."""
        await self.launch(engine)
        f = self.ctl.cfg.failover
        want = {Readiness.READY} if self.suspender is not None else set()
        state = await self.wait_health(
            engine, want or {Readiness.READY, Readiness.SLEEPING}, self.ctl.cfg.health.load_timeout
        )
        if self.suspender is not None:
            await self._suspend(engine)
            return
        if state is Readiness.READY:
            try:
                with anyio.fail_after(f.wake_timeout):
                    await self.backend.sleep(self.control(engine), f.shadow_sleep_level)
            except Exception as e:
                self.plugin_failed(engine, "sleep", e)
                raise FailoverError(f"could not put shadow {engine.id} to sleep: {e!r}") from e
        await self.wait_health(engine, {Readiness.SLEEPING}, f.wake_timeout)
        why = f"loaded and asleep (level {f.shadow_sleep_level})"
        self.set_state(engine, EngineState.SLEEPING, why)

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
        elif self.flock:
            how = f"loaded and parked on the failover lock {self.lock_path}"
        else:
            how = f"suspended by {self.suspender.name} (pids {pids})"
        self.set_state(engine, EngineState.SLEEPING, how)

    def failed_to_start(self, engine: Engine, why: str) -> None:
        """An engine that did not come up: failed, killed, its place freed."""
        if engine.state not in ENDED:
            self.set_state(engine, EngineState.FAILED, why)
            self.manager.kill_now(engine)
        self.ctl.spawn(self.retire, engine, why=f"retire {engine.id}")

    # -- wake ----------------------------------------------------------------------------
    async def wake(self, shadow: Engine) -> None:
        """Wake through the plugin; an OOM is retried for ``wake_oom_retry`` seconds."""
        ctl = self.ctl
        f = ctl.cfg.failover
        self.set_state(shadow, EngineState.WAKING, "chosen for promotion")
        if self.suspender is not None and shadow.suspended_by:
            await self._resume(shadow)
            return
        ep = self.control(shadow)
        deadline = time.monotonic() + f.wake_oom_retry
        while True:
            try:
                with anyio.fail_after(f.wake_timeout):
                    await self.backend.wake(ep)
                break
            except EngineOutOfMemory as e:
                if time.monotonic() >= deadline:
                    raise FailoverError(f"wake kept hitting OOM: {e}") from e
                ctl.log.warning("wake hit OOM; retrying", engine=shadow.id, error=str(e))
                await anyio.sleep(0.05)
            except TimeoutError as e:
                raise FailoverError(f"wake took over {f.wake_timeout}s") from e
            except (BackendError, aiohttp.ClientError) as e:
                raise FailoverError(f"wake failed: {e}") from e
            except Exception as e:
                self.plugin_failed(shadow, "wake", e)
                raise FailoverError(f"backend wake hook raised: {e!r}") from e
        await self.wait_health(shadow, {Readiness.READY}, f.wake_timeout)

    async def _resume(self, shadow: Engine) -> None:
        """Wake a shadow its suspend strategy holds; a flock shadow promotes itself."""
        assert self.suspender is not None
        ctl, timeout = self.ctl, self.ctl.cfg.failover.wake_timeout
        try:
            with anyio.fail_after(timeout):
                pids = await self.suspender.resume(shadow.pid or 0)
        except TimeoutError as e:
            if self.flock:
                raise FailoverError(
                    f"{shadow.id} did not take the failover lock within "
                    f"{timeout}s (is its holder still alive?)"
                ) from e
            raise FailoverError(f"resume took over {timeout}s") from e
        except BackendError as e:
            raise FailoverError(f"{self.suspender.name} resume failed: {e}") from e
        if self.flock:  # it wakes itself: waking it too would wake it twice
            ctl.log.info(
                f"{shadow.id} took the failover lock and is promoting itself",
                engine=shadow.id,
                pids=pids,
            )
            # Its health route said ready all along; it serves once it generates.
            ep = self.endpoint(shadow)
            with anyio.move_on_after(timeout) as waited:
                while not await self.judge.generates(shadow, self.backend, ep):
                    await anyio.sleep(0.05)
            if waited.cancelled_caught:
                raise FailoverError(
                    f"{shadow.id} took the lock but generated nothing within {timeout}s"
                )
        shadow.suspended_by = ""
        await self.wait_health(shadow, {Readiness.READY}, timeout)

    def wake_failed(self, shadow: Engine, e: Exception) -> None:
        """A shadow that did not wake is of no use: failed, killed, its place freed."""
        self.set_state(shadow, EngineState.FAILED, f"wake failed: {e}")
        self.manager.kill_now(shadow)
        self.ctl.spawn(self.retire, shadow, why=f"retire {shadow.id}, which did not wake")

    async def memory_released(self, dead: Engine) -> bool:
        """Whether the dead engine's whole process group (its GPU memory with it) is gone
        within ``memory_release_timeout``; one that is not is killed."""
        assert dead.pid is not None
        m = self.manager
        gone = await m.wait_group_gone(dead.pid, self.ctl.cfg.failover.memory_release_timeout)
        if not gone:
            m.kill_now(dead)
        return gone

    # -- stop and reap -------------------------------------------------------------------
    async def stop(self, engine: Engine, why: str, *, done: str = "", wait: bool = False) -> None:
        """The one way an engine is stopped on purpose: draining (``why``), stopped within
        the stop grace (``done``, default ``why``), then retired: in the background, or
        with ``wait`` until its place (port, GPUs) is free."""
        ctl = self.ctl
        self.set_state(engine, EngineState.DRAINING, why)
        await self.manager.stop(engine, ctl.cfg.failover.stop_grace)
        self.set_state(engine, EngineState.STOPPED, done or why)
        if wait:
            await self.retire(engine)
        else:
            ctl.spawn(self.retire, engine, why=f"retire {engine.id}")

    async def retire(self, engine: Engine) -> None:
        """Once a failed or stopped engine's processes are gone, it leaves the slot's
        engines (kept in a short history for ``/status``) and the metrics; the replenisher
        is told, as its port and GPUs are free now."""
        ctl = self.ctl
        if engine.pid is not None and not await self._group_gone(engine):
            return
        if ctl.engines.get(engine.id) is engine and engine.state in ENDED:
            if self.manager.running(engine) and engine.pid is not None:
                # Its processes are gone but its exit is not read yet (the leader is a
                # zombie until reaped): returning here held its place, and its port, forever.
                with anyio.move_on_after(10):
                    while self.manager.running(engine):
                        await anyio.sleep(0.05)
                if self.manager.running(engine):
                    ctl.log.warning(f"{engine.id}'s exit was not seen", engine=engine.id)
                    return
            if ctl.engines.get(engine.id) is engine:  # (not retired meanwhile)
                self.forget(engine)
        ctl.replenisher.kick()

    def forget(self, engine: Engine) -> None:
        """A retired engine leaves the slot (kept in a short history) and the metrics."""
        ctl = self.ctl
        del ctl.engines[engine.id]
        ctl.retired.appendleft(engine)
        ctl.metrics.forget_engine(engine.slot, engine.id, engine.spec.gpus)
        self.judge.forget(engine.id)
        ctl.on_change()

    async def _group_gone(self, engine: Engine) -> bool:
        """Until the engine's process group is gone; False: the slot stopped meanwhile."""
        assert engine.pid is not None
        ctl = self.ctl
        wait = ctl.cfg.failover.stop_grace + 10
        while not await self.manager.wait_group_gone(engine.pid, wait):
            # Something of it outlives SIGKILL (a process in uninterruptible sleep, say):
            # say what, kill again, keep waiting; giving up would hold its place forever.
            members = group_members(engine.pid)
            states = {pid: st.state for pid in members if (st := read_stat(pid))}
            ctl.replenisher.shortfall = f"waiting for {engine.id}'s processes to exit: {states}"
            ctl.log.warning(
                f"{engine.id}'s processes outlive SIGKILL; killing them again",
                engine=engine.id,
                processes=states,
            )
            signal_group(engine.pid, signal.SIGCONT)
            self.manager.kill_now(engine)
            if ctl.stopped:
                return False
        return True

    async def stop_all(self) -> None:
        """Stop every engine of the slot still running (the daemon is stopping)."""
        ctl = self.ctl
        for engine in ctl.live():
            self.set_state(engine, EngineState.STOPPED, "supervisor shutting down")
        async with anyio.create_task_group() as tg:
            for engine in list(ctl.engines.values()):
                if self.manager.running(engine) or (
                    engine.pid is not None and self.manager.group_alive(engine.pid)
                ):
                    tg.start_soon(self.manager.stop, engine, ctl.cfg.failover.stop_grace)

    # -- adopt ---------------------------------------------------------------------------
    async def adopt(self, rec: dict[str, Any]) -> Engine | None:
        """The engine an earlier supervisor saved as ``rec``, if it is still the same
        process and answers as it did (else it is left, or killed when ours but unusable)."""
        ctl = self.ctl
        state = EngineState(rec.get("state", "failed"))
        if state not in (EngineState.ACTIVE, EngineState.SLEEPING):
            return None
        st = read_stat(int(rec["pid"]))
        if st is None or st.gone or st.start_time != rec.get("start_time"):
            ctl.log.warning(
                "stale state: engine process gone or pid reused; not adopting",
                engine=rec["id"],
                pid=rec["pid"],
            )
            return None
        role: Role = "active" if state is EngineState.ACTIVE else "shadow"
        port = int(rec["port"])
        engine = Engine(
            rec["id"],
            ctl.slot.name,
            role,
            self.spec(rec["id"], role, port, tuple(rec["gpus"])),
            ctl.scfg.backend,
            pid=int(rec["pid"]),
            start_ticks=st.start_time,
            group=group_of(ctl.scfg, port),
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
            self.plugin_failed(engine, "health", e)
        if answer is not want:
            ctl.log.warning(
                "not adopting: the engine answers differently than saved",
                engine=engine.id,
                saved=state.value,
                answer=answer.value,
            )
            signal_group(engine.pid or 0, signal.SIGKILL)  # ours, but not usable
            return None
        ctl.engines[engine.id] = engine
        self.ids = itertools.count(next_number(ctl.engines))  # new engines number on
        self.manager.adopt(ctl.watchers(), engine)
        self.set_state(engine, state, "adopted from an earlier supervisor")
        self.start_probes(engine)
        return engine
