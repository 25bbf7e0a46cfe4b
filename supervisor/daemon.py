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
from supervisor.engines import EngineManager
from supervisor.frontend.app import Frontend
from supervisor.frontend.routing import KeptTargets, Target
from supervisor.frontend.server import FrontendServer
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
from supervisor.looplag import LoopLagTicker
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, FailoverRecord, Pause, RolloutProgress, Slot
from supervisor.netguard import (
    ConnectionGuard,
    GuardedSite,
    connection_cap,
    raise_open_file_limit,
)
from supervisor.sdnotify import Notifier
from supervisor.sessions import Sessions, open_sessions
from supervisor.slot.controller import HISTORY, SlotController
from supervisor.slot.placement import FailoverError


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
        self._served: tuple[object, set[str]] = (None, set())
        self._targets: dict[str, Target] = {}  # by engine id, see _target
        self._kept: dict[str, KeptTargets] = {}  # per model
        self._kept_generation = -1  # the cluster view's generation they were worked out at

    def models(self) -> list[str]:
        # From the config: known before the slots' engines have started.
        local = {s.model_name for s in self.sup.cfg.slots if s.serve_requests}
        if self.sup.cluster is not None:
            local |= self.sup.cluster.models()
        return sorted(local)

    def has_model(self, model: str) -> bool:
        cfg = self.sup.cfg
        if self._served[0] is not cfg:  # the local models, again after a reload
            self._served = (cfg, {s.model_name for s in cfg.slots if s.serve_requests})
        if model in self._served[1]:
            return True
        cluster = self.sup.cluster
        return cluster is not None and cluster.has_model(model)

    def candidates(self, model: str) -> list[Target]:
        # Asked for every request. Each model's answer is kept until an engine changes
        # state (notify), the config is reloaded or (in a cluster) the coordinator's view
        # moves on, and checked on every use that each local engine in it is still its
        # slot's active one: one that stopped is never handed out, even before its change
        # is heard of. So a request costs the same in a cluster of any size.
        cluster = self.sup.cluster
        if cluster is not None and cluster.generation != self._kept_generation:
            self._kept.clear()
            self._kept_generation = cluster.generation
        kept = self._kept.get(model)
        if kept is not None and kept.still_valid(self.sup.cfg):
            return kept.targets
        out, serving = self._candidates(model)
        self._kept[model] = KeptTargets(self.sup.cfg, serving, out)
        return out

    def _candidates(self, model: str) -> tuple[list[Target], list[tuple[Slot, Engine]]]:
        out = []
        serving = []
        cluster = self.sup.cluster
        demoted = cluster is not None and cluster.demoted
        for c in self.sup.controllers.values():
            e = c.active_engine()
            if c.slot.model != model or e is None or e.state is not EngineState.ACTIVE:
                continue
            if demoted:
                continue  # its lease is unrenewed: a peer may serve the slot soon
            if not c.scfg.serve_requests:
                continue  # e.g. a prefill engine: its decode engines call it
            if c.grouped and (c.scfg.group_rank != 0 or cluster is None):
                continue  # a group serves through its rank-0 member
            if cluster is not None and c.grouped and cluster.chosen(c.slot.name) != e.unit:
                continue  # a group serves once the cluster has chosen it
            t = self._targets.get(e.id)
            if t is None or t.backend is not c.backend:  # (an engine's url never changes)
                t = self._target(e.id, e.url, c.backend, self._node)
            out.append(t)
            serving.append((c.slot, e))
        if cluster is not None:
            for r in cluster.remote_targets(model):
                backend = self.sup.backend_named(r["backend"])
                t = self._targets.get(r["id"])
                if t is None or t.url != r["url"] or t.backend is not backend:
                    t = self._target(r["id"], r["url"], backend, str(r.get("node", "")))
                out.append(t)
        return out, serving

    @property
    def _node(self) -> str:
        cfg = self.sup.cfg
        return cfg.node if cfg.cluster.enabled else ""

    def _target(self, engine_id: str, url: str, backend: Backend, node: str) -> Target:
        # Targets are kept and handed out again: candidates() runs for every request.
        if len(self._targets) >= 1024:
            self._targets.clear()  # engines come and go: this keeps only recent ones
        t = self._targets[engine_id] = Target(engine_id, url, backend, node)
        return t

    async def changed(self) -> None:
        await self._changed.wait()

    def notify(self) -> None:
        self._kept.clear()
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
            ep = ctl.lifecycle.endpoint(engine)
            judge = self.sup.judge.stream_stalled
            ctl.spawn(judge, engine, ctl.backend, ep, request_id, reason, why=f"judge {engine.id}")
        else:
            dead = self.sup.judge.declare_dead
            ctl.spawn(dead, engine, "stream", reason, time.time(), why=f"judge {engine.id}")


class Supervisor:
    """One node's supervisor."""

    def __init__(self, cfg: Config, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path  # read again on reload (SIGHUP, POST /reload)
        self.node_pause: Pause | None = None  # the whole node's maintenance mode
        self._rollouts: set[anyio.CancelScope] = set()  # rollouts end with the daemon
        self._tg: Any = None
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

    # -- maintenance mode --------------------------------------------------------------
    def pause(self, slot: str | None, reason: str, until: float | None) -> Pause:
        """Pause a slot, or (``slot`` None) the whole node: no automatic failover or
        relaunch until resumed or ``until``."""
        p = Pause(reason, time.time(), until)
        if slot is None:
            self.node_pause = p
            self.log.info("node paused", reason=reason, until=until)
            for c in self.controllers.values():
                c.pause_changed()
        else:
            self.controllers[slot].set_pause(p)
        self._pauses_changed()
        return p

    def resume(self, slot: str | None) -> bool:
        """End a pause; whether there was one."""
        if slot is None:
            was, self.node_pause = self.node_pause, None
            if was is not None:
                self.log.info("node resumed", reason=was.reason)
                for c in self.controllers.values():
                    c.pause_changed()
        else:
            ctl = self.controllers[slot]
            was = ctl.pause
            if was is not None:
                ctl.set_pause(None)
        self._pauses_changed()
        return was is not None

    def _pause_record(self) -> dict[str, Any] | None:
        """This node's pauses as the cluster sees them (None: nothing paused)."""
        slots = {n: c.pause.as_dict() for n, c in self.controllers.items() if c.pause}
        if self.node_pause is None and not slots:
            return None
        return {"node": self.node_pause.as_dict() if self.node_pause else None, "slots": slots}

    def _pauses_changed(self) -> None:
        if self.cluster is not None:
            self.cluster.pauses_changed()
        self._engines_changed()

    async def _pause_expiry_loop(self) -> None:
        """A pause with an end runs out by itself (a forgotten one must not hold failover
        off for good)."""
        while True:
            await anyio.sleep(0.25)
            now = time.time()
            if self.node_pause is not None and self.node_pause.expired(now):
                self.log.info("node pause expired; resuming", reason=self.node_pause.reason)
                self.resume(None)
            for name, c in self.controllers.items():
                if c.pause is not None and c.pause.expired(now):
                    c.log.info("pause expired; resuming", reason=c.pause.reason)
                    self.resume(name)

    def _restore_pauses(self, saved: dict[str, Any]) -> None:
        """Pauses survive a restart of the daemon (maintenance often includes one)."""
        now = time.time()

        def read(raw: Any) -> Pause | None:
            try:
                until = None if raw.get("until") is None else float(raw["until"])
                p = Pause(str(raw["reason"]), float(raw["since"]), until)
            except (TypeError, KeyError, ValueError, AttributeError):
                if raw is not None:
                    self.log.warning("unreadable pause in the state file; ignored", saved=raw)
                return None
            return None if p.expired(now) else p

        self.node_pause = read(saved.get("pause"))
        if self.node_pause is not None:
            self.log.info("node paused since before the restart", reason=self.node_pause.reason)
        for name, ctl in self.controllers.items():
            ctl.set_pause(
                read((saved.get("slots", {}).get(name) or {}).get("pause")), restored=True
            )

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

    def start_rollout(self, slots: list[str]) -> list[RolloutProgress]:
        """Roll ``slots`` (none: every slot a reload marked) to their new spec, one at a
        time, in the background. The first is checked now (FailoverError says why not)."""
        names = slots or [n for n, c in self.controllers.items() if c.pending]
        if not names:
            raise FailoverError(
                "nothing to roll out: every slot runs its config's spec (edit the file, "
                "then reload)"
            )
        for n in names:
            if n not in self.controllers:
                raise FailoverError(f"no slot {n!r}")
            if self.controllers[n].pending is None:
                raise FailoverError(
                    f"slot {n} already runs its config's spec; change it and reload first"
                )
        if self.stopping.is_set():
            raise FailoverError("the supervisor is shutting down")
        first = self.controllers[names[0]]
        progress = first.rollouts.begin()
        # Known to the shutdown from now, not once the task runs: a stop that comes in
        # between cancels it before it launches anything.
        scope = anyio.CancelScope()
        self._rollouts.add(scope)
        self._tg.start_soon(self._roll_slots, names, progress, scope)
        return [progress]

    async def _roll_slots(
        self, names: list[str], first: RolloutProgress, scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                await self._roll_each(names, first)
            finally:
                self._rollouts.discard(scope)

    async def _roll_each(self, names: list[str], first: RolloutProgress) -> None:
        for i, name in enumerate(names):
            ctl = self.controllers[name]
            progress = first
            if i:
                if ctl.pending is None:
                    continue
                try:
                    progress = ctl.rollouts.begin()
                except FailoverError as e:
                    self.log.error("rollout stops: a slot cannot roll", slot=name, error=str(e))
                    return
            await ctl.rollouts.run()
            if progress.result != "done":
                rest = names[i + 1 :]
                if rest:
                    self.log.warning(
                        "rollout stops: the slot did not roll out; later slots untouched",
                        slot=name,
                        result=progress.result,
                        untouched=rest,
                    )
                return

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
            "pause": self.node_pause.as_dict() if self.node_pause else None,
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
        if self.node_pause is not None and not self.node_pause.expired(time.time()):
            line = f"PAUSED ({self.node_pause.reason}): {line}"
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

    def _gpu_watcher(self) -> GpuWatcher:
        g = self.cfg.gpu
        lines: Any = None
        if g.xid_source == "kmsg" or (g.xid_source == "auto" and _readable("/dev/kmsg")):
            lines = follow_kmsg
        elif g.xid_source == "journal":
            lines = follow_journal
        elif g.xid_source not in ("auto", "none", "off"):
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

    def status(self, full_cluster: bool = False) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "version": __version__,
            "relay": native.STATUS,
            "ready": self.ready.is_set(),
            "stopping": self.stopping.is_set(),
            "paused": (
                self.node_pause.as_dict()
                if self.node_pause and not self.node_pause.expired(time.time())
                else None
            ),
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
            tg.start_soon(self._pause_expiry_loop)
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
                    load=self._inflight,
                    pauses=self._pause_record,
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
                    node_pause=lambda: self.node_pause,
                    move_streams=self._move_streams,
                    streams_on=self._inflight,
                )
                self.controllers[scfg.name] = ctl
                await tg.start(ctl.run)
            saved = statefile.load(self.state_path)
            if saved is not None and saved.get("node") == self.cfg.node:
                self._restore_pauses(saved)
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
                for scope in self._rollouts:
                    scope.cancel()
                for ctl in self.controllers.values():
                    ctl.begin_stop()
                # A cancelled rollout may be half-way through launching an engine (the
                # spawn is shielded): the slots' task groups, where its exit is watched,
                # stay open until it is over.
                with anyio.move_on_after(self.cfg.failover.stop_grace + 10):
                    while self._rollouts:
                        await anyio.sleep(0.05)
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
        """Start a rollout (see ``start_rollout``); with ``wait``, the slots' records once
        every one of them is done, else the first slot's as it starts."""
        names = slots or [n for n, c in self.controllers.items() if c.pending]
        started = self.start_rollout(slots)
        if not wait:
            return started
        while any(c.rolling_out for n, c in self.controllers.items() if n in names):
            await anyio.sleep(0.1)
        return [c.rollout for n, c in self.controllers.items() if n in names and c.rollout]

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
