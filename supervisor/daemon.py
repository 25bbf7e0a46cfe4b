"""The daemon: composes engines, health, failover and the admin API under one task group.

Startup: admin API up (so ``/status`` shows progress), then per slot the shadows load and
sleep, then the active engine becomes ready; then the supervisor reports ready. SIGTERM or
SIGINT stops it cleanly: engines are stopped (``node.on_exit = "stop"``) or left running.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from prometheus_client import generate_latest

from supervisor import __version__, confdiff, native, statefile
from supervisor import log as logging
from supervisor.admin import AdminApi
from supervisor.admintarget import Described
from supervisor.backends import Backend, load_backend
from supervisor.config import Config, ConfigError, read_secret, warnings
from supervisor.config import load as load_config
from supervisor.coordination.cluster import ClusterCoordinator
from supervisor.directory import DaemonDirectory
from supervisor.engines import EngineManager
from supervisor.frontend.app import Frontend
from supervisor.frontend.server import FrontendServer
from supervisor.gpu import watcher_for
from supervisor.health import HealthJudge
from supervisor.looplag import LoopLagTicker
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, FailoverRecord, Pause, RolloutProgress
from supervisor.netguard import (
    ConnectionGuard,
    GuardedSite,
    connection_cap,
    raise_open_file_limit,
)
from supervisor.pauses import Pauses
from supervisor.rollouts import Rollouts
from supervisor.sdnotify import Notifier
from supervisor.sessions import Sessions, open_sessions
from supervisor.slot.controller import HISTORY, SlotController
from supervisor.slot.placement import FailoverError


class Supervisor:
    """One node's supervisor."""

    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path  # read again on reload (SIGHUP, POST /reload)
        self.log = logging.get(node=cfg.node)
        self._tg: Any = None
        self.metrics = Metrics(cluster=cfg.cluster.enabled)
        self.history: deque[FailoverRecord] = deque(maxlen=HISTORY)
        self.judge = HealthJudge(cfg.health, self.metrics, self._on_dead)
        self.manager = EngineManager(
            cfg.log_dir, self.judge.process_exited, sim_ledger=cfg.state_dir / "sim-gpus.json"
        )
        self.controllers: dict[str, SlotController] = {}
        self.pauses = Pauses(self.controllers, self.log, self._pauses_changed)
        self.rollouts = Rollouts(self.controllers, self.log)
        self.backends = {s.name: load_backend(s.backend) for s in cfg.slots}
        self._backends_by_name: dict[str, Backend] = {}
        self.cluster: ClusterCoordinator | None = None
        self.ready = anyio.Event()
        self.stopping = anyio.Event()
        self.admin_url = ""
        self.frontend_url = ""
        self.directory = DaemonDirectory(self)
        self.frontend: Frontend | None = None
        self.started_at = time.time()
        self.gpu = watcher_for(
            cfg.gpu,
            sorted({gpu for s in cfg.slots for gpu in (*s.gpus, *sum(s.shadow_gpus, ()))}),
            self.metrics,
            self._gpu_fatal,
            self.log,
        )
        self.notify = Notifier()
        self._state_dirty = anyio.Event()
        self._save_lock = anyio.Lock()
        # Secrets: read once at start (ConfigError if a named file is missing); never logged.
        self.admin_token = read_secret(cfg.admin_token_file, "admin-token")
        self.api_key = read_secret(cfg.frontend.api_key_file, "frontend-api-key")

    def backend_named(self, name: str) -> Backend:
        """A backend for a peer's engine (loaded once per name)."""
        if name not in self._backends_by_name:
            self._backends_by_name[name] = load_backend(name)
        return self._backends_by_name[name]

    def _on_demote(self, demoted: bool) -> None:
        """Policy demote: this node's engines leave (or rejoin) the frontends' routing.
        Their streams move (to the slot's new home once a peer promotes one, or back here
        when etcd confirms the slot is still ours)."""
        if demoted and self.frontend is not None:
            for ctl in self.controllers.values():
                if (e := ctl.active_engine()) is not None:
                    self.frontend.router.move_off(e.id, may_return=True)
        self._engines_changed()

    def _move_streams(self, engine_id: str) -> int:
        return self.frontend.router.move_off(engine_id) if self.frontend is not None else 0

    # -- maintenance mode (supervisor.pauses) --------------------------------------------
    def pause(self, slot: str | None, reason: str, until: float | None) -> Pause:
        """Pause a slot, or (``slot`` None) the whole node (see :class:`Pauses`)."""
        return self.pauses.pause(slot, reason, until)

    def resume(self, slot: str | None) -> bool:
        """End a pause; whether there was one."""
        return self.pauses.resume(slot)

    def _pauses_changed(self) -> None:
        if self.cluster is not None:
            self.cluster.pauses_changed()
        self._engines_changed()

    # -- reload and rollout ------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Read the config file again. A file that does not validate changes nothing;
        otherwise what can change at once does, changed slots are marked for rollout, and
        what needs a restart is named."""
        if self.config_path is None:
            return {"ok": False, "problems": ["the supervisor was started without a file"]}
        path = self.config_path

        def read() -> tuple[Config, str | None, str | None]:
            new = load_config(path)
            return (
                new,
                read_secret(new.admin_token_file, "admin-token"),
                read_secret(new.frontend.api_key_file, "frontend-api-key"),
            )

        try:  # off the loop: validation loads backends and looks programs up
            new, admin_token, api_key = await anyio.to_thread.run_sync(read)
        except ConfigError as e:
            self.log.error(
                "reload refused: the config file is invalid; nothing changed",
                path=str(path),
                problems=e.problems,
            )
            return {"ok": False, "problems": e.problems}
        running = replace(self.cfg, slots=tuple(c.scfg for c in self.controllers.values()))
        changes = confdiff.diff(running, new)
        self._apply(confdiff.applied(running, new))
        self.admin_token, self.api_key = admin_token, api_key
        if self.frontend is not None:
            self.frontend.api_key = api_key
        specs = confdiff.slot_specs(running, new)
        for name, ctl in self.controllers.items():
            if ctl.rolling_out:
                continue  # its target is fixed; a later reload marks what differs then
            ctl.rollouts.mark_pending(*specs.get(name, (None, [])))
        for c in changes:
            self.log.info(
                f"reload: {c.key} {c.effect}", old=c.as_dict()["old"], new=c.as_dict()["new"]
            )
        self.log.info(
            "config reloaded",
            applied=sum(c.effect == confdiff.APPLIED for c in changes),
            rollout_pending=sorted(specs),
            restart_needed=[c.key for c in changes if c.effect == confdiff.RESTART],
        )
        self._engines_changed()
        return {
            "ok": True,
            "changes": [c.as_dict() for c in changes],
            "rollout_pending": sorted(n for n, c in self.controllers.items() if c.pending),
            "restart_needed": [c.key for c in changes if c.effect == confdiff.RESTART],
        }

    def _apply(self, cfg: Config) -> None:
        """Hand the settings a reload applies to everything that reads them."""
        self.cfg = cfg
        self.judge.cfg = cfg.health
        for ctl in self.controllers.values():
            ctl.reconfigure(cfg)
        if self.frontend is not None:
            self.frontend.cfg, self.frontend.fcfg = cfg, cfg.frontend
            self.frontend.router.cfg = cfg.frontend

    def _inflight(self, engine_id: str) -> int:
        return self.frontend.router.inflight.get(engine_id, 0) if self.frontend else 0

    def _peer_engines_dead(self, engine_ids: list[str]) -> None:
        if self.frontend is not None:
            for eid in engine_ids:
                self.frontend.router.engine_failed(eid)  # their streams migrate at once

    async def _on_dead(self, engine: Engine, source: str, reason: str, at: float) -> None:
        if self.frontend is not None:
            self.frontend.router.engine_failed(engine.id)  # its streams migrate at once
        await self.controllers[engine.slot].on_engine_dead(engine, source, reason, at)

    @property
    def state_path(self) -> Path:
        return self.cfg.state_dir / "engines.json"

    def _engines_changed(self) -> None:
        self.directory.notify()
        if self.frontend is not None:
            live = {eid for c in self.controllers.values() for eid in c.engines}
            self.frontend.router.forget_gone(live)
        if self.cluster is not None:
            self.cluster.local_changed()
        self._state_dirty.set()  # saved by _save_state_loop, off the failover's path
        if self.notify.enabled and self.ready.is_set() and not self.stopping.is_set():
            self.notify.status(self.summary())

    def _state(self) -> dict[str, Any]:
        """What a restarted supervisor needs to adopt the engines instead of launching new
        ones. Built on the event loop: the controllers' dicts change only there."""
        return {
            "node": self.cfg.node,
            "pause": self.pauses.node.as_dict() if self.pauses.node else None,
            "slots": {name: c.saved() for name, c in self.controllers.items()},
        }

    async def _save_state_loop(self) -> None:
        while True:
            await self._state_dirty.wait()
            self._state_dirty = anyio.Event()  # changes from here on wait for the next save
            await self._save_state_async()

    async def _save_state_async(self) -> None:
        # The snapshot here, the file (a small local write, replaced atomically) in a
        # thread, off the failover's path; one save at a time, so the newest always wins.
        async with self._save_lock:
            await anyio.to_thread.run_sync(statefile.save, self.state_path, self._state())

    def summary(self) -> str:
        """One line for ``systemctl status``."""
        slots = list(self.controllers.values())
        serving = [c for c in slots if c.slot.active is not None]
        shadows = sum(len(c.sleeping_shadows()) for c in slots)
        line = f"serving {len(serving)}/{len(slots)} slots, {shadows} shadows asleep"
        if (node_pause := self.pauses.in_force()) is not None:
            line = f"PAUSED ({node_pause.reason}): {line}"
        paused = [c.slot.name for c in slots if c.pause and not c.pause.expired(time.time())]
        if paused:
            line += f"; paused: {', '.join(paused)}"
        rolling = [c.slot.name for c in slots if c.rolling_out]
        if rolling:
            line += f"; rolling out: {', '.join(rolling)}"
        degraded = [c.slot.name for c in slots if c.slot.degraded_reason]
        if degraded:
            line += f"; degraded: {', '.join(degraded)}"
        if self.history:
            last = self.history[0]
            line += (
                f"; last failover: slot {last.slot} {last.result} "
                f"{time.strftime('%H:%M:%S', time.localtime(last.detected_at))}"
            )
        return line

    async def _gpu_fatal(self, gpu: str, reason: str, at: float) -> None:
        """A broken GPU: every engine on it is dead; active engines first, so their slots
        fail over (to shadows on other GPUs) before anything else."""
        on_gpu = [e for c in self.controllers.values() for e in c.live() if gpu in e.spec.gpus]
        on_gpu.sort(key=lambda e: e.state is not EngineState.ACTIVE)
        for engine in on_gpu:
            await self.judge.declare_dead(engine, "gpu", reason, at)

    def engine(self, engine_id: str) -> tuple[SlotController, Engine] | None:
        for c in self.controllers.values():
            if engine_id in c.engines:
                return c, c.engines[engine_id]
        return None

    def status(self, full_cluster: bool = False) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "version": __version__,
            "relay": native.STATUS,
            "ready": self.ready.is_set(),
            "stopping": self.stopping.is_set(),
            "paused": (p.as_dict() if (p := self.pauses.in_force()) else None),
            "uptime_s": round(time.time() - self.started_at, 3),
            "frontend": self.frontend_url or None,
            "slots": [c.status() for c in self.controllers.values()],
            "engines": [e.as_dict() for c in self.controllers.values() for e in c.engines.values()],
            "retired_engines": [e.as_dict() for c in self.controllers.values() for e in c.retired],
            "failovers": [r.as_dict() for r in self.history],
            "gpus": self.gpu.snapshot(),
            "cluster": self.cluster.status(full_cluster) if self.cluster is not None else None,
        }

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, announce: Callable[[str], None] = print) -> None:
        """Run until :meth:`stop` or SIGTERM/SIGINT."""
        self.log.info(
            "starting",
            version=__version__,
            relay=native.STATUS,  # compiled or pure Python, and why
            slots=[s.name for s in self.cfg.slots],
            state_dir=str(self.cfg.state_dir),
        )
        if native.STALE:
            self.log.warning(
                "the relay's compiled build does not fit this checkout or this Python: "
                "running its sources as pure Python (slower); scripts/build_native.py builds "
                "it again",
                relay=native.STATUS,
            )
        for warning in warnings(self.cfg):
            self.log.warning("risky setting", detail=warning)
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        fd_limit = raise_open_file_limit()
        self._quiet_loop_errors()
        async with (
            open_sessions(self.cfg.frontend.max_inflight_per_engine) as sessions,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            tg.start_soon(self._signals)
            tg.start_soon(self.pauses.expiry_loop)
            tg.start_soon(self.notify.watchdog)
            tg.start_soon(self._save_state_loop)
            # Before the servers, the cluster and the engines: a slow start is seen too.
            tg.start_soon(LoopLagTicker(self.metrics.event_loop_lag, self.log).run)
            self.notify.status("starting: shadows load and sleep, then active engines load")
            runner = web.AppRunner(AdminApi(self).app(), access_log=None)
            await runner.setup()
            admin_guard = ConnectionGuard("admin", 256, self.cfg.frontend.header_timeout)
            site = GuardedSite(runner, self.cfg.admin_host, self.cfg.admin_port, admin_guard)
            await site.start()
            port = runner.addresses[0][1]
            self.admin_url = f"http://{self.cfg.admin_host}:{port}"
            announce(f"admin: {self.admin_url}")
            self.log.info("admin API listening", url=self.admin_url)
            fe_server = await self._start_frontend(sessions, announce, fd_limit)
            tg.start_soon(self.gpu.run)
            if self.cfg.cluster.enabled:
                self.cluster = ClusterCoordinator(
                    self.cfg,
                    self.controllers,
                    self.metrics,
                    sessions.cluster,
                    admin_url=lambda: self.admin_url,
                    on_view_change=self.directory.notify,
                    on_peer_dead=self._peer_engines_dead,
                    pauses=self.pauses.record,
                    on_demote=self._on_demote,
                )
                tg.start_soon(self.cluster.run)
                # Whether a slot is already served elsewhere decides what starts here.
                with anyio.move_on_after(max(self.cfg.cluster.lease_ttl, 2)):
                    await self.cluster.loaded.wait()
                if not self.cluster.loaded.is_set():
                    self.log.warning("etcd not reachable at start; starting engines anyway")
                announce(f"cluster: {self.cfg.cluster.name}")
            for scfg in self.cfg.slots:
                ctl = SlotController(
                    self.cfg,
                    scfg,
                    self.backends[scfg.name],
                    self.manager,
                    self.judge,
                    self.metrics,
                    sessions,
                    self.history,
                    on_change=self._engines_changed,
                    gpu_broken=lambda gpu: gpu in self.gpu.broken,
                    coordinator=self.cluster,
                    node_pause=lambda: self.pauses.node,
                    move_streams=self._move_streams,
                    streams_on=self._inflight,
                )
                self.controllers[scfg.name] = ctl
                await tg.start(ctl.run)
            saved = statefile.load(self.state_path)
            if saved is not None and saved.get("node") == self.cfg.node:
                self.pauses.restore(saved)
                for name, ctl in self.controllers.items():
                    if name in saved.get("slots", {}):
                        n = await ctl.adopt(saved["slots"][name])
                        if n:
                            announce(f"adopted {n} running engine(s) of slot {name}")
            async with anyio.create_task_group() as starting:
                for ctl in self.controllers.values():
                    starting.start_soon(ctl.start)
                starting.start_soon(self._abort_start_on_stop, starting.cancel_scope)
                await self._all_started()
                starting.cancel_scope.cancel()
            if not self.stopping.is_set():
                self.ready.set()
                if self.frontend is not None:
                    self.frontend.ready = True
                degraded = [
                    c.slot.name for c in self.controllers.values() if c.slot.degraded_reason
                ]
                self.log.info("supervisor ready", degraded_slots=degraded)
                await self.notify.ready(self.summary())
                announce("ready" + (f" (degraded: {', '.join(degraded)})" if degraded else ""))
            await self.stopping.wait()
            self.log.info("stopping", on_exit=self.cfg.on_exit)
            await self.notify.stopping(
                f"stopping: draining requests, then engines ({self.cfg.on_exit})"
            )
            with anyio.CancelScope(shield=True):
                for ctl in self.controllers.values():
                    ctl.begin_stop()
                # A cancelled rollout may be half-way through launching an engine (the
                # spawn is shielded): the slots' task groups, where its exit is watched,
                # stay open until it is over.
                await self.rollouts.cancel_all(self.cfg.failover.stop_grace + 10)
                if self.frontend is not None:
                    await self.frontend.drain()
                # Nothing scheduled (a relaunch waiting on its backoff, a shadow loading)
                # may launch an engine from here on; then the engines stop.
                async with anyio.create_task_group() as closing:
                    for ctl in self.controllers.values():
                        closing.start_soon(ctl.close)
                if self.cfg.on_exit == "stop":
                    async with anyio.create_task_group() as stops:
                        for ctl in self.controllers.values():
                            stops.start_soon(ctl.stop_all)
                if self.cluster is not None:
                    await self.cluster.leave()
                await runner.cleanup()
                if fe_server is not None:
                    await fe_server.close()
                await self._save_state_async()  # the final word: stopped or left running
            tg.cancel_scope.cancel()
        self.log.info("stopped")

    def _quiet_loop_errors(self) -> None:
        """asyncio's own errors (e.g. an accept failing with "too many open files") are
        logged once per kind per 10 s with a count, not once per occurrence."""
        import asyncio

        loop = asyncio.get_running_loop()
        last: dict[str, tuple[float, int]] = {}

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            message = str(context.get("message", "asyncio error"))
            exc = context.get("exception")
            key = f"{message}:{type(exc).__name__}"
            now = time.monotonic()
            t, n = last.get(key, (0.0, 0))
            if now - t < 10:
                last[key] = (t, n + 1)
                return
            last[key] = (now, 0)
            self.log.error("event loop error", message=message, error=repr(exc), repeated=n)

        loop.set_exception_handler(handler)

    async def _start_frontend(
        self, sessions: Sessions, announce: Callable[[str], None], fd_limit: int
    ) -> FrontendServer | None:
        fcfg = self.cfg.frontend
        if not fcfg.enabled:
            return None
        self.frontend = Frontend(self.cfg, self.directory, self.metrics, sessions, self.api_key)
        # An engine whose answers keep reaching clients is busy, not dead, when it is too
        # slow to answer a probe.
        answered = self.frontend.router.answered_at
        self.judge.answered_at = lambda engine_id: answered.get(engine_id, 0.0)
        refused = self.metrics.client_connections_refused
        guard = ConnectionGuard(
            "frontend",
            connection_cap(fcfg.max_connections, fd_limit),
            fcfg.header_timeout,
            on_event=lambda reason: refused.labels(reason).inc(),
        )
        self.metrics.client_connections.set_function(lambda: guard.open)
        server = self.frontend.server(guard)
        await server.listen(fcfg.host, fcfg.port)
        self.frontend_url = f"http://{self.cfg.frontend.host}:{server.port}"
        announce(f"frontend: {self.frontend_url}")
        self.log.info("frontend listening", url=self.frontend_url)
        return server

    async def _all_started(self) -> None:
        for ctl in self.controllers.values():
            await ctl.ready.wait()

    async def _abort_start_on_stop(self, scope: anyio.CancelScope) -> None:
        await self.stopping.wait()
        scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    self.log.info("SIGHUP: reloading the config", path=str(self.config_path))
                    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                    self.notify.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
                    await self.reload()
                    self.notify.send("READY=1", f"STATUS={self.summary()}")
                    continue
                self.log.info("signal received; shutting down", signal=signal.Signals(sig).name)
                self.stop()
                return

    # -- the admin API's view of this node (supervisor.admintarget.AdminTarget) --------
    # Everything POST and GET on the admin API do goes through these methods, so the API
    # never reaches into the slot controllers, the judge or the GPU watcher itself.
    @property
    def node_name(self) -> str:
        return self.cfg.node

    def has_slot(self, slot: str) -> bool:
        return slot in self.controllers

    def has_engine(self, engine_id: str) -> bool:
        return self.engine(engine_id) is not None

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this node's metrics."""
        return generate_latest(self.metrics.registry)

    async def fail_engine(self, engine_id: str, reason: str) -> None:
        """Declare an engine dead now, as if it had failed (its slot fails over)."""
        found = self.engine(engine_id)
        if found is None:
            raise FailoverError(f"no engine {engine_id!r}")
        await self.judge.declare_dead(found[1], "admin", reason, time.time())

    async def switchover(self, slot: str, to: str | None) -> FailoverRecord:
        return await self.controllers[slot].switchover(to)

    def schedule_switchover(self, slot: str, at: float, to: str | None) -> Described:
        return self.controllers[slot].schedule_switchover(at, to)

    def cancel_switchover(self, slot: str) -> Described | None:
        return self.controllers[slot].cancel_scheduled()

    async def rollout(self, slots: list[str], wait: bool) -> list[RolloutProgress]:
        """Start a rollout (:class:`Rollouts`); with ``wait``, the slots' records once
        every one of them is done, else the first slot's as it starts."""
        names = slots or [n for n, c in self.controllers.items() if c.pending]
        started = self.rollouts.start(slots, self._tg, self.stopping)
        return await self.rollouts.wait(names) if wait else started

    def clear_gpu(self, gpu: str) -> int | None:
        """A GPU marked broken was reset or replaced: how many shadows launch again (None:
        the GPU was not marked broken)."""
        if not self.gpu.clear(gpu):
            return None
        return sum(c.restore_shadows() for c in self.controllers.values())

    async def drain(self, engine_id: str, limit: float | None) -> None:
        found = self.engine(engine_id)
        if found is None:
            raise FailoverError(f"no engine {engine_id!r}")
        await found[0].drain(engine_id, limit)
