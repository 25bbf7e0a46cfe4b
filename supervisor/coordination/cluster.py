"""Multi-node coordination: membership, leader election and epoch fencing in etcd, with
heartbeats over NATS for fast suspicion.

Keys, under ``<etcd_prefix>/<cluster name>/``:

- ``nodes/<node>``      this node's admin URL; on its lease (gone = node gone)
- ``engines/<id>``      each engine's slot, role, state, URL and group; on the lease
- ``election/<node>``   on the lease; the lowest create revision is the leader
- ``slots/<slot>``      ``{"epoch", "active", ...}``: who serves a slot; not on a lease.
  Every promotion anywhere is a transaction on this key conditioned on its last revision,
  so two promotions can never both take one epoch.

Who decides:

- A node fails over its own slots to its own shadows (fast, no peer involved), but claims
  the epoch in etcd first; a claim that finds the slot moved on is refused (fenced).
- The leader promotes across nodes: when a slot's active engine lives on a node confirmed
  dead, when the owner has no shadow left, and always for groups (a group spans nodes).
  It writes the new epoch naming a sleeping shadow (or a whole sleeping group); the node
  that hosts it sees the key change and wakes it.
- A node that sees its slot at a newer epoch naming someone else stops its own active
  engine (it was partitioned, or its group was replaced).

A peer is *suspect* after ``suspect_after`` missed heartbeats and *dead* once its lease is
gone; a live lease keeps it alive however silent it is. Policy ``keep-serving``: a node cut
off from etcd but still heard on NATS is not dead, so it is not failed over; policy
``demote``: it stops serving before its lease can expire.

The parts, each an object with one job and a module of its own: :class:`Membership` (the
lease, this node's keys and pauses, demotion), :class:`PeerView` (liveness, who leads),
:class:`SlotFencing` (slot records, claims, following the cluster's word),
:class:`LeaderDecisions` (the leader's decisions), :class:`ViewSync` (the watch and its
guard). They share only a :class:`~supervisor.coordination.context.ClusterContext`
(settings, etcd client, view, heartbeats, log, wake events); what one needs of another
it gets as a callback, wired here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import anyio
from anyio.abc import TaskGroup

from supervisor.config import Config
from supervisor.coordination.context import ClusterContext
from supervisor.coordination.fencing import SlotFencing
from supervisor.coordination.leader import LeaderDecisions
from supervisor.coordination.local import SlotHandle
from supervisor.coordination.membership import Membership
from supervisor.coordination.nats import Heartbeats
from supervisor.coordination.peers import FORGET_AFTER, PeerView
from supervisor.coordination.view import ClusterView, SlotRecord
from supervisor.coordination.viewsync import ViewSync
from supervisor.metrics import Metrics

# Slots past which /status summarises the cluster unless asked for it whole.
STATUS_DETAIL = 256


class ClusterCoordinator:
    """One node's part of the cluster (see the module docstring): the parts, wired, and
    what the daemon asks of them (the slots' :class:`~supervisor.coordination.local.
    Coordinator`, the frontend's remote targets, ``/status``)."""

    def __init__(
        self,
        cfg: Config,
        controllers: Mapping[str, SlotHandle],
        metrics: Metrics,
        session: aiohttp.ClientSession,
        *,
        admin_url: Callable[[], str],
        on_view_change: Callable[[], None],
        on_peer_dead: Callable[[list[str]], None],
        pauses: Callable[[], dict[str, Any] | None] = lambda: None,
        on_demote: Callable[[bool], None] = lambda demoted: None,
    ) -> None:
        self.cfg = cfg
        self.cl = cfg.cluster
        self.node = cfg.node
        # The slots, filled by the daemon after this is made: the parts read it as it is.
        self.controllers = controllers
        self.metrics = metrics
        # Counts changes to the view and to peers' states: the frontend's directory reads
        # it on every request, so it is a plain attribute, counted by each kick.
        self.generation = 0
        self.beats: Heartbeats | None = None
        if self.cl.nats_servers:
            # Its calls come once it runs: by then the parts below exist to answer them.
            self.beats = Heartbeats(
                self.cl.nats_servers,
                self.cl.name,
                self.node,
                interval=self.cl.heartbeat_interval,
                suspect_after=self.cl.suspect_after,
                snapshot=lambda: self.membership.beat(),
                on_change=lambda node, suspect: self.peers.peer_changed(node),
                cut_off=lambda: self.membership.cut_off(),
            )
            self.beats.judge(())  # nobody until the view says who (see PeerView.judge_peers)
        self.ctx = ctx = ClusterContext(
            cfg, metrics, session, self.beats, on_kick=self._count_change
        )
        self.loaded = ctx.loaded
        self.peers = PeerView(
            ctx, session, etcd_ok=lambda: self.membership.etcd_ok, on_peer_dead=on_peer_dead
        )
        self.fencing = SlotFencing(
            ctx,
            controllers,
            demoted=lambda: self.membership.demoted,
            lease=lambda: self.membership.lease,
            unit_serving=self.peers.unit_serving,
        )
        self.membership = Membership(
            ctx,
            controllers,
            admin_url=admin_url,
            pauses=pauses,
            on_demote=on_demote,
            flush_pending=self.fencing.flush_pending,
        )
        self.decisions = LeaderDecisions(
            ctx, slots=self.fencing, peers=self.peers, etcd_ok=lambda: self.membership.etcd_ok
        )
        self.viewsync = ViewSync(
            ctx,
            is_leader=lambda: self.decisions.is_leader,
            etcd_down=self.membership.etcd_down,
            revive=self.peers.revive,
            on_reload=self.peers.rejudge,
            on_view_change=on_view_change,
        )

    def _count_change(self) -> None:
        self.generation += 1

    async def run(self) -> None:
        self.metrics.cluster_info.labels(self.cl.name, "yes" if self.beats else "no").set(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.viewsync.watch_loop)
            tg.start_soon(self.viewsync.watch_guard)
            tg.start_soon(self.membership.lease_loop)
            tg.start_soon(self.membership.publish_loop)
            tg.start_soon(self.peers.probe_loop)
            tg.start_soon(self._decide_loop, tg)
            if self.cl.etcd_unreachable == "demote":
                tg.start_soon(self.membership.fence_loop)
            if self.beats is not None:
                tg.start_soon(self.beats.run)
                tg.start_soon(self.peers.nats_gauge)

    async def _decide_loop(self, tg: TaskGroup) -> None:
        """At every change (or heartbeat interval): whose beats to hear, the cluster's word
        on this node's slots, and, when this node leads, the leader's pass."""
        leading = False
        while True:
            with anyio.move_on_after(self.cl.heartbeat_interval):
                await self.ctx.changed.wait()
            self.metrics.cluster_leader.set(1 if self.decisions.is_leader else 0)
            self.peers.judge_peers()
            self.fencing.reconcile(tg)
            todo = self.decisions.to_look_at(everything=not leading)
            leading = self.decisions.is_leader
            if leading:
                await self.decisions.lead_each(todo)

    # -- what the slots ask (supervisor.coordination.local.Coordinator)
    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        return await self.fencing.claim(slot, unit, epoch, reason)

    def served_elsewhere(self, slot: str) -> str | None:
        return self.fencing.served_elsewhere(slot)

    async def hand_over(self, slot: str, reason: str) -> None:
        await self.fencing.hand_over(slot, reason)

    # -- what the daemon tells
    def pauses_changed(self) -> None:
        self.membership.pauses_changed()

    def local_changed(self) -> None:
        """Called on every local engine state change: publish it (and beat it) soon."""
        self.membership.local_changed()

    async def leave(self) -> None:
        """On shutdown: drop our keys at once (revoking the lease) so peers need not wait."""
        await self.membership.leave()

    # -- what the daemon, its frontend and /status read
    @property
    def view(self) -> ClusterView:
        return self.ctx.view

    @property
    def etcd_ok(self) -> bool:
        return self.membership.etcd_ok

    @property
    def lease(self) -> int:
        return self.membership.lease

    @property
    def demoted(self) -> bool:
        return self.membership.demoted

    @property
    def dead(self) -> dict[str, float]:
        return self.peers.dead

    @property
    def leader(self) -> str | None:
        return self.decisions.leader

    @property
    def is_leader(self) -> bool:
        return self.decisions.is_leader

    def peer_state(self, node: str) -> str:
        return self.peers.peer_state(node)

    def status(self, full: bool = False) -> dict[str, Any]:
        """The cluster as this node sees it. Past STATUS_DETAIL slots (a fleet) it is
        summarised unless ``full``: counts, and in detail only the peers not alive and
        the slots that are this node's or unserved (every slot of 1,000 nodes would be
        a megabyte per call)."""
        nodes = set(self.view.nodes) | set(self.dead)
        peers = {n: self.peer_state(n) for n in sorted(nodes) if n != self.node}
        slots = self.view.slots
        summarise = not full and len(slots) > STATUS_DETAIL
        shown = sorted(slots)
        if summarise:
            shown = sorted(
                {s for s in self.controllers if s in slots}
                | {s for s, r in slots.items() if r.active is None}
            )
        out: dict[str, Any] = {
            "name": self.cl.name,
            "leader": self.leader,
            "is_leader": self.is_leader,
            "etcd_reachable": self.etcd_ok,
            "nats_connected": self.beats.connected if self.beats else None,
            "lease": f"{self.lease:x}" if self.lease else None,
            "peers": {n: st for n, st in peers.items() if not summarise or st != "alive"},
            "slots": {
                s: {
                    "epoch": slots[s].epoch,
                    "active": slots[s].active,
                    "by": slots[s].by,
                    "reason": slots[s].reason,
                }
                for s in shown
            },
            "pending_claims": sorted(self.fencing.pending),
            "policy": self.cl.etcd_unreachable,
            "demoted": self.demoted,
            "paused": dict(self.view.paused),
        }
        if summarise:
            states = list(peers.values())
            out["summary"] = {
                "slots": len(slots),
                "slots_served": sum(1 for r in slots.values() if r.active is not None),
                "peers": {st: states.count(st) for st in ("alive", "suspect", "dead")},
                "detail": "GET /status?cluster=full for every peer and slot",
            }
        return out

    def remote_targets(self, model: str) -> list[dict[str, Any]]:
        """Engines on other nodes that serve ``model`` now: each slot's chosen unit (its
        rank-0 member for a group), active, on a node not known dead. Read from the view's
        index of serving engines: the cost is in the answer's size, not the cluster's."""
        out = []
        peer_state = self.peers.peer_state
        for eid, e in self.ctx.view.serving.get(model, {}).items():
            node = str(e.get("node"))
            if node != self.node and peer_state(node) != "dead":
                out.append({"id": eid, **e})
        return out

    def models(self) -> set[str]:
        return set(self.ctx.view.models)

    def has_model(self, model: str) -> bool:
        return model in self.ctx.view.models

    def chosen(self, slot: str) -> str | None:
        rec = self.ctx.view.slots.get(slot)
        return rec.active if rec else None


__all__ = ["FORGET_AFTER", "ClusterCoordinator", "ClusterView", "SlotRecord"]
