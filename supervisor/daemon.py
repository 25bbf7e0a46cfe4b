"""The daemon: composes engines, health, failover and the admin API under one task group.

Startup: admin API up (so ``/status`` shows progress), then per slot the shadows load and
sleep, then the active engine becomes ready; then the supervisor reports ready. SIGTERM or
SIGINT stops it cleanly: engines are stopped (``node.on_exit = "stop"``) or left running.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from supervisor import __version__, statefile
from supervisor import log as logging
from supervisor.admin import AdminApi
from supervisor.backends import Backend, load_backend
from supervisor.config import Config, read_secret, warnings
from supervisor.coordination.cluster import ClusterCoordinator
from supervisor.engines import EngineManager
from supervisor.failover import HISTORY, SlotController
from supervisor.frontend.app import Frontend
from supervisor.frontend.routing import Target
from supervisor.gpu import (
    GpuWatcher,
    JsonReadings,
    NvmlReader,
    NvmlUnavailable,
    follow_file,
    follow_journal,
    follow_kmsg,
)
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, FailoverRecord
from supervisor.netguard import (
    ConnectionGuard,
    GuardedSite,
    connection_cap,
    raise_open_file_limit,
)
from supervisor.sdnotify import Notifier
from supervisor.sessions import Sessions, open_sessions


def _readable(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


class DaemonDirectory:
    """The frontend's view of engines, answered from the slot controllers."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._changed = anyio.Event()

    def models(self) -> list[str]:
        # From the config: known before the slots' engines have started.
        local = {s.model_name for s in self.sup.cfg.slots if s.serve_requests}
        if self.sup.cluster is not None:
            local |= self.sup.cluster.models()
        return sorted(local)

    def candidates(self, model: str) -> list[Target]:
        out = []
        cluster = self.sup.cluster
        for c in self.sup.controllers.values():
            e = c.active_engine()
            if c.slot.model != model or e is None or e.state is not EngineState.ACTIVE:
                continue
            if not c.scfg.serve_requests:
                continue  # e.g. a prefill engine: its decode engines call it
            if c.grouped and (c.scfg.group_rank != 0 or cluster is None):
                continue  # a group serves through its rank-0 member
            if cluster is not None and c.grouped and cluster.chosen(c.slot.name) != e.unit:
                continue  # a group serves once the cluster has chosen it
            out.append(Target(e.id, e.url, c.backend))
        if cluster is not None:
            for r in cluster.remote_targets(model):
                out.append(Target(r["id"], r["url"], self.sup.backend_named(r["backend"])))
        return out

    async def changed(self) -> None:
        await self._changed.wait()

    def notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def report_failure(self, engine_id: str, kind: str, reason: str, request_id: str) -> None:
        # Judged in the slot's own task group: a failover must not run inside (and be
        # cancelled with) the client request that noticed the fault.
        found = self.sup.engine(engine_id)
        if found is None or self.sup.stopping.is_set():
            return
        ctl, engine = found
        if kind == "stall":
            ep = ctl.endpoint(engine)
            ctl.tg.start_soon(
                self.sup.judge.stream_stalled, engine, ctl.backend, ep, request_id, reason
            )
        else:
            ctl.tg.start_soon(self.sup.judge.declare_dead, engine, "stream", reason, time.time())


class Supervisor:
    """One node's supervisor."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics(cluster=cfg.cluster.enabled)
        self.history: deque[FailoverRecord] = deque(maxlen=HISTORY)
        self.judge = HealthJudge(cfg.health, self.metrics, self._on_dead)
        self.manager = EngineManager(
            cfg.log_dir, self.judge.process_exited, sim_ledger=cfg.state_dir / "sim-gpus.json"
        )
        self.controllers: dict[str, SlotController] = {}
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
        self.log = logging.get(node=cfg.node)
        self.gpu = self._gpu_watcher()
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

    def _gpu_watcher(self) -> GpuWatcher:
        g = self.cfg.gpu
        lines: Any = None
        if g.xid_source == "kmsg" or (g.xid_source == "auto" and _readable("/dev/kmsg")):
            lines = follow_kmsg
        elif g.xid_source == "journal":
            lines = follow_journal
        elif g.xid_source not in ("auto", "none"):
            path = Path(g.xid_source)
            lines = lambda: follow_file(path)  # noqa: E731
        readings: Any = None
        if g.nvml in ("auto", "on"):
            try:
                readings = NvmlReader()
            except NvmlUnavailable as e:
                if g.nvml == "on":
                    raise
                self.log.info("NVML readings off", reason=str(e))
        elif g.nvml != "off":
            readings = JsonReadings(Path(g.nvml))
        return GpuWatcher(
            self.metrics,
            self._gpu_fatal,
            pci_map=g.pci,
            lines=lines,
            readings=readings,
            poll_interval=g.poll_interval,
            gpus=sorted(
                {gpu for s in self.cfg.slots for gpu in (*s.gpus, *sum(s.shadow_gpus, ()))}
            ),
        )

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

    def status(self) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "version": __version__,
            "ready": self.ready.is_set(),
            "stopping": self.stopping.is_set(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "frontend": self.frontend_url or None,
            "slots": [c.status() for c in self.controllers.values()],
            "engines": [e.as_dict() for c in self.controllers.values() for e in c.engines.values()],
            "retired_engines": [e.as_dict() for c in self.controllers.values() for e in c.retired],
            "failovers": [r.as_dict() for r in self.history],
            "gpus": self.gpu.snapshot(),
            "cluster": self.cluster.status() if self.cluster is not None else None,
        }

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, announce: Callable[[str], None] = print) -> None:
        """Run until :meth:`stop` or SIGTERM/SIGINT."""
        self.log.info(
            "starting",
            version=__version__,
            slots=[s.name for s in self.cfg.slots],
            state_dir=str(self.cfg.state_dir),
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
            tg.start_soon(self._signals)
            tg.start_soon(self.notify.watchdog)
            tg.start_soon(self._save_state_loop)
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
            fe_runner = await self._start_frontend(sessions, announce, fd_limit)
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
                    load=self._inflight,
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
                )
                self.controllers[scfg.name] = ctl
                await tg.start(ctl.run)
            saved = statefile.load(self.state_path)
            if saved is not None and saved.get("node") == self.cfg.node:
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
                if fe_runner is not None:
                    await fe_runner.cleanup()
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
    ) -> web.AppRunner | None:
        fcfg = self.cfg.frontend
        if not fcfg.enabled:
            return None
        self.frontend = Frontend(self.cfg, self.directory, self.metrics, sessions, self.api_key)
        # handler_cancellation: a client that goes away cancels its handler at once, so the
        # upstream request is aborted without waiting for the next token to fail to write.
        runner = web.AppRunner(
            self.frontend.app(),
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=fcfg.keepalive_timeout,
        )
        await runner.setup()
        refused = self.metrics.client_connections_refused
        guard = ConnectionGuard(
            "frontend",
            connection_cap(fcfg.max_connections, fd_limit),
            fcfg.header_timeout,
            on_event=lambda reason: refused.labels(reason).inc(),
        )
        self.metrics.client_connections.set_function(lambda: guard.open)
        site = GuardedSite(runner, fcfg.host, fcfg.port, guard, reuse_address=True)
        await site.start()
        self.frontend_url = f"http://{self.cfg.frontend.host}:{runner.addresses[0][1]}"
        announce(f"frontend: {self.frontend_url}")
        self.log.info("frontend listening", url=self.frontend_url)
        return runner

    async def _all_started(self) -> None:
        for ctl in self.controllers.values():
            await ctl.ready.wait()

    async def _abort_start_on_stop(self, scope: anyio.CancelScope) -> None:
        await self.stopping.wait()
        scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                self.log.info("signal received; shutting down", signal=signal.Signals(sig).name)
                self.stop()
                return
