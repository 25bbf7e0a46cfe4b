"""The frontend's view of engines: which targets serve a model, answered from this node's
slot controllers and, in a cluster, the coordinator's index of remote engines.

:class:`DaemonDirectory` is the :class:`supervisor.frontend.routing.EngineDirectory` the
daemon hands its frontend. It reads the node through :class:`NodeView`, never the daemon's
class, so the frontend's path does not import the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import anyio

from supervisor.backends import Backend
from supervisor.config import Config
from supervisor.coordination.cluster import ClusterCoordinator
from supervisor.frontend.routing import KeptTargets, Target
from supervisor.health import HealthJudge
from supervisor.model import Engine, EngineState, Slot
from supervisor.slot.controller import SlotController


class NodeView(Protocol):
    """What the directory reads of the node (the daemon's :class:`Supervisor` is one).

    Plain attributes, read on every request: the config changes on a reload and the
    cluster appears once the daemon has joined it."""

    @property
    def cfg(self) -> Config: ...

    @property
    def cluster(self) -> ClusterCoordinator | None: ...

    @property
    def controllers(self) -> Mapping[str, SlotController]: ...

    @property
    def judge(self) -> HealthJudge: ...

    @property
    def stopping(self) -> anyio.Event: ...

    def backend_named(self, name: str) -> Backend:
        """A backend for a peer's engine, by the backend's name."""
        ...

    def engine(self, engine_id: str) -> tuple[SlotController, Engine] | None:
        """This node's engine of that id and its slot, if there is one."""
        ...


class DaemonDirectory:
    """The frontend's view of engines, answered from the slot controllers."""

    def __init__(self, node: NodeView) -> None:
        self.sup = node
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
