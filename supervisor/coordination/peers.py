"""How this node sees its peers: alive, suspect (heartbeats missed) or dead (lease gone).
A node's lease decides its death; heartbeats and direct probes only make it suspect
sooner. Dead peers gone from etcd are forgotten after a while."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import anyio

from supervisor.coordination.context import ClusterContext
from supervisor.coordination.nats import ring_predecessors
from supervisor.model import EngineState

FORGET_AFTER = 600.0  # seconds a dead peer is remembered (it may come back meanwhile)


class PeerView:
    """Peers' liveness, decided by their leases; who leads among the live; whose beats
    this node hears.

    ``etcd_ok`` says whether etcd answers this node (a lease gone is a death only then);
    ``on_peer_dead`` gets the engines of a peer confirmed dead."""

    def __init__(
        self,
        ctx: ClusterContext,
        session: aiohttp.ClientSession,
        *,
        etcd_ok: Callable[[], bool],
        on_peer_dead: Callable[[list[str]], None],
    ) -> None:
        self.ctx = ctx
        self.session = session  # for probes of suspects' admin APIs
        self.log = ctx.log
        self.metrics = ctx.metrics
        self.beats = ctx.beats
        self.loaded = ctx.loaded  # the first full read of the cluster is in
        self.cl = ctx.cl
        self.node = ctx.node
        self.etcd_ok = etcd_ok
        self.on_peer_dead = on_peer_dead
        self.dead: dict[str, float] = {}  # peers confirmed dead -> when
        self._probe_failures: dict[str, int] = {}
        self._known: set[str] = set()  # every peer seen (forgotten FORGET_AFTER after death)
        self._judging: tuple[int, bool] | None = None  # see judge_peers

    def leader(self) -> str | None:
        """The lowest election key of a node not confirmed dead. A leader confirmed dead is
        passed over at once instead of waiting for its lease to expire; if it was only
        partitioned, the fencing transaction still stops it."""
        return self.ctx.view.leader(excluding=self.dead)

    def peer_state(self, node: str) -> str:
        """``self``, ``alive``, ``suspect`` (heartbeats missed) or ``dead``. The node's
        lease decides: a node whose key is gone is dead, heard on NATS or not (after a
        whole-cluster restart without it, say), and a node whose lease lives is never dead,
        however silent (a stalled loop, a partition between nodes only)."""
        if node == self.node:
            return "self"
        if node in self.dead:
            return "dead"
        if node not in self.ctx.view.nodes and self.loaded.is_set():
            if self._cut_off_but_serving(node):
                return "alive"
            return "suspect" if self._may_be_cut_off() else "dead"
        if self.beats is not None and self.beats.is_suspect(node):
            return "suspect"
        return "alive"

    def _cut_off_but_serving(self, node: str) -> bool:
        """A peer whose lease is gone but whose heartbeats still come: it lost etcd, not
        its life, and (policy keep-serving) goes on serving its slots; promoting them
        elsewhere would make two actives."""
        if self.cl.etcd_unreachable == "demote":
            return False  # it demoted itself before its lease expired
        return self.beats is not None and self.beats.heard_recently(node)

    def _may_be_cut_off(self) -> bool:
        """Too soon (leading only since moments ago) to say that a peer whose lease is
        gone does not beat as a node cut off from etcd."""
        return (
            self.cl.etcd_unreachable != "demote"
            and self.beats is not None
            and self.beats.may_be_cut_off()
        )

    def unit_serving(self, slot: str, unit: str) -> bool:
        members = self.ctx.view.unit_members(slot, unit)
        if not members:
            return False
        size = int(members[0].get("group_size", 1))
        return len(members) >= size and all(
            m.get("state") == EngineState.ACTIVE.value
            and self.peer_state(str(m.get("node"))) in ("self", "alive", "suspect")
            for m in members
        )

    async def probe_loop(self) -> None:
        """Confirm the death of peers whose lease is gone; probe suspects' admin APIs (for
        the log: a live lease keeps a silent peer alive however its probe ends)."""
        gauged = 0.0
        while True:
            await anyio.sleep(self.cl.heartbeat_interval / 2)
            self._known |= set(self.ctx.view.nodes)
            if self.beats is not None:
                self._known |= set(self.beats.peers)
            self.forget_old(time.monotonic())
            # Only the peers with something to look at: lease gone, suspect, or failing
            # probes (set operations, not a Python loop over every peer of a large fleet).
            look = self._known - self.ctx.view.nodes.keys() - self.dead.keys()
            if self.beats is not None:
                look |= self.beats.suspects
            look |= self._probe_failures.keys()
            for node in sorted(look - {self.node}):
                if node in self.dead:
                    continue
                lease_gone = (
                    node not in self.ctx.view.nodes and self.loaded.is_set() and self.etcd_ok()
                )
                if lease_gone and not self._cut_off_but_serving(node):
                    if self._may_be_cut_off():
                        continue  # looked at again in a moment
                    heard = self.beats is not None and self.beats.last_heard(node) > 0
                    why = "heartbeats missed and its lease expired" if heard else "lease expired"
                    self._confirm_dead(node, why)
                    continue
                if not (self.beats is not None and self.beats.is_suspect(node)):
                    self._probe_failures.pop(node, None)
                    continue
                url = str((self.ctx.view.nodes.get(node) or {}).get("admin", ""))
                if url and not await self._probe(url):
                    n = self._probe_failures[node] = self._probe_failures.get(node, 0) + 1
                    if n == 2:
                        self.log.warning(
                            "peer silent: heartbeats missed and its admin API does not answer; "
                            "its lease lives, so it is not declared dead",
                            peer=node,
                        )
                else:
                    self._probe_failures.pop(node, None)
            if time.monotonic() - gauged >= 1.0:  # every peer's state: once a second is enough
                gauged = time.monotonic()
                self._update_peer_gauges()

    def forget_old(self, now: float) -> None:
        """What is kept per peer must not grow for ever: a node dead for FORGET_AFTER and
        gone from etcd is forgotten."""
        for node, since in list(self.dead.items()):
            if now - since > FORGET_AFTER and node not in self.ctx.view.nodes:
                del self.dead[node]
                self._known.discard(node)
                self._probe_failures.pop(node, None)
                if self.beats is not None:
                    self.beats.forget(node)

    async def _probe(self, url: str) -> bool:
        try:
            with anyio.fail_after(self.cl.probe_timeout):
                async with self.session.get(url + "/status") as r:
                    return r.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def _confirm_dead(self, node: str, why: str) -> None:
        self.dead[node] = time.monotonic()
        last = self.beats.last_heard(node) if self.beats else 0
        if last:
            self.metrics.node_loss_seconds.observe(time.monotonic() - last)
        self.log.warning(
            "peer confirmed dead",
            peer=node,
            why=why,
            silent_s=round(time.monotonic() - last, 3) if last else None,
        )
        gone = sorted(self.ctx.view.by_node.get(node, ()))
        self.on_peer_dead(gone)
        self.peer_changed(node)

    def judge_peers(self) -> None:
        """Hear the peers this node judges, its ring predecessors, and, when it leads, the
        watchers' reports and the beats of nodes cut off from etcd (worked out again only
        when the membership or the leader changes)."""
        if self.beats is None:
            return
        leading = self.leader() == self.node
        key = (self.ctx.view.membership, leading)
        if key == self._judging or not self.loaded.is_set():
            return
        self._judging = key
        self.beats.judge(ring_predecessors(self.ctx.view.nodes, self.node), leading=leading)

    def rejudge(self) -> None:
        """The view was read afresh: whose beats to hear is worked out again."""
        self._judging = None

    def peer_changed(self, node: str) -> None:
        """A peer's liveness changed: the leader looks at its slots again."""
        self.ctx.view.touched_nodes.add(node)
        self.ctx.kick()

    def revive(self, node: str) -> None:
        if self.dead.pop(node, None) is not None:
            self.log.info("peer back", peer=node)
            self.peer_changed(node)

    def _update_peer_gauges(self) -> None:
        counts = {"alive": 0, "suspect": 0, "dead": 0}
        for node in set(self.ctx.view.nodes) | set(self.dead):
            if node != self.node:
                counts[self.peer_state(node) if node in self.ctx.view.nodes else "dead"] += 1
        for state, n in counts.items():
            self.metrics.cluster_peers.labels(state).set(n)

    async def nats_gauge(self) -> None:
        assert self.beats is not None
        while True:
            self.metrics.nats_connected.set(1 if self.beats.connected else 0)
            for node in list(self.dead):
                if self.beats.heard_recently(node):
                    self.revive(node)
            await anyio.sleep(0.5)
