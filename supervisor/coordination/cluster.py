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

The parts, each a module that reads alone: :mod:`~supervisor.coordination.membership` (the
lease, this node's keys and pauses, demotion), :mod:`~supervisor.coordination.peers`
(liveness), :mod:`~supervisor.coordination.fencing` (slot records, claims, following the
cluster's word), :mod:`~supervisor.coordination.leader` (the leader's decisions),
:mod:`~supervisor.coordination.viewsync` (the watch and its guard), over the shared
:mod:`~supervisor.coordination.state` and the pure :mod:`~supervisor.coordination.view`.
"""

from __future__ import annotations

from typing import Any

import anyio

from supervisor.coordination.fencing import SlotFencing
from supervisor.coordination.leader import LeaderDecisions
from supervisor.coordination.membership import Membership
from supervisor.coordination.peers import FORGET_AFTER, PeerView
from supervisor.coordination.view import ClusterView, SlotRecord
from supervisor.coordination.viewsync import ViewSync

# Slots past which /status summarises the cluster unless asked for it whole.
STATUS_DETAIL = 256


class ClusterCoordinator(Membership, PeerView, SlotFencing, LeaderDecisions, ViewSync):
    """One node's part of the cluster (see the module docstring): its membership, its view
    of its peers, slot records and fencing, the leader's decisions, and the watch."""

    async def run(self) -> None:
        self.metrics.cluster_info.labels(self.cl.name, "yes" if self.beats else "no").set(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_loop)
            tg.start_soon(self._watch_guard)
            tg.start_soon(self._lease_loop)
            tg.start_soon(self._publish_loop)
            tg.start_soon(self._probe_loop)
            tg.start_soon(self._decide_loop, tg)
            if self.cl.etcd_unreachable == "demote":
                tg.start_soon(self._fence_loop)
            if self.beats is not None:
                tg.start_soon(self.beats.run)
                tg.start_soon(self._nats_gauge)

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
            "pending_claims": sorted(self._pending),
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
        for eid, e in self.view.serving.get(model, {}).items():
            node = str(e.get("node"))
            if node != self.node and self.peer_state(node) != "dead":
                out.append({"id": eid, **e})
        return out

    def models(self) -> set[str]:
        return set(self.view.models)

    def has_model(self, model: str) -> bool:
        return model in self.view.models

    def chosen(self, slot: str) -> str | None:
        rec = self.view.slots.get(slot)
        return rec.active if rec else None


__all__ = ["FORGET_AFTER", "ClusterCoordinator", "ClusterView", "SlotRecord"]
