"""What every part of a node's cluster coordination shares: its settings, its connection
to etcd, its view of the cluster's keys, the events that wake its loops, and its log. The
parts (``membership``, ``peers``, ``fencing``, ``leader``, ``viewsync``) each add one job;
:class:`supervisor.coordination.cluster.ClusterCoordinator` is all of them together."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import anyio

from supervisor import log as logging
from supervisor.config import Config
from supervisor.coordination.etcd import EtcdClient
from supervisor.coordination.local import SlotHandle
from supervisor.coordination.nats import Heartbeats
from supervisor.coordination.view import ClusterView, SlotRecord
from supervisor.metrics import Metrics


class ClusterState:
    """The state the coordinator's parts share, and the few helpers they all use."""

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
        load: Callable[[str], int] = lambda engine_id: 0,
        pauses: Callable[[], dict[str, Any] | None] = lambda: None,
        on_demote: Callable[[bool], None] = lambda demoted: None,
    ) -> None:
        self.cfg = cfg
        # Policy demote: this node stops serving (True) before its lease can have expired,
        # and serves again (False) once etcd says its slots are still its own.
        self.on_demote = on_demote
        self.demoted = False
        self.last_renewed = 0.0  # monotonic: when the last keep-alive that worked was sent
        self._watch_scope: anyio.CancelScope | None = None
        self.watch_heard = 0.0  # monotonic: when the watch last delivered anything
        # This node's pauses, kept in etcd without a lease: a paused node that goes down
        # stays paused for the leader (its slots are not moved) until resumed or expired.
        self.pauses = pauses
        self._published_pause: bytes | None = b"(never published)"
        self.cl = cfg.cluster
        self.node = cfg.node
        self.controllers = controllers
        self.metrics = metrics
        self.session = session
        self.admin_url = admin_url
        self.on_view_change = on_view_change
        self.on_peer_dead = on_peer_dead
        self.load = load  # requests in flight to an engine through this node's frontend
        self.etcd = EtcdClient(self.cl.etcd_endpoints, session, self.cl.etcd_timeout)
        self.root = f"{self.cl.etcd_prefix.rstrip('/')}/{self.cl.name}/".encode()
        self.view = ClusterView()
        self.lease = 0
        self.etcd_ok = False
        self.loaded = anyio.Event()  # the first full read of the cluster is in
        self.dead: dict[str, float] = {}  # peers confirmed dead -> when
        self._probe_failures: dict[str, int] = {}
        self._published: dict[bytes, bytes] = {}
        self._dirty = anyio.Event()
        self._changed = anyio.Event()
        self.generation = 0  # counts changes to the view and to peers' states
        self._pending: dict[str, SlotRecord] = {}  # claims made while etcd was unreachable
        # ... and the slot's record as it was before the first of them: the deferred claim
        # is written only if nobody wrote the slot since (compare-and-set on it).
        self._pending_base: dict[str, SlotRecord | None] = {}
        self._pending_handover: dict[str, str] = {}  # slots handed over while etcd was down
        self._first_seen: dict[tuple[str, int], float] = {}  # (slot, epoch) -> monotonic
        self._said: dict[str, str] = {}  # slot -> the leader's last logged decision
        self._acting: set[str] = set()  # slots with a promotion / step-down under way
        self._promotions: tuple[Any, Any] | None = None  # (task group, limit) of a pass
        self._lead_later: set[str] = set()  # slots the leader skipped while they acted
        self._revisit: dict[str, float] = {}  # slot -> when the leader looks again (monotonic)
        self._judging: tuple[int, bool] | None = None  # see PeerView._judge_peers
        self._known: set[str] = set()  # every peer seen (forgotten FORGET_AFTER after death)
        self._publish_lock = anyio.Lock()  # the lease loop and the publish loop both publish
        self.log = logging.get(node=self.node, component="cluster")
        self.beats: Heartbeats | None = None
        if self.cl.nats_servers:
            self.beats = Heartbeats(
                self.cl.nats_servers,
                self.cl.name,
                self.node,
                interval=self.cl.heartbeat_interval,
                suspect_after=self.cl.suspect_after,
                snapshot=self._beat,
                on_change=lambda node, suspect: self._peer_changed(node),
                cut_off=self._cut_off,
            )
            self.beats.judge(())  # nobody until the view says who (see _judge_peers)

    def _cut_off(self) -> bool:
        """Our etcd link fails (a keep-alive failed, or is half a TTL late): our lease may
        expire while we serve, and the leader must hear our beats to know that we do."""
        if not self.lease:
            return False
        return not self.etcd_ok or time.monotonic() - self.last_renewed > self.cl.lease_ttl / 2

    def key(self, *parts: str) -> bytes:
        return self.root + "/".join(parts).encode()

    def _kick(self) -> None:
        # Whatever wakes the leader may change who serves what: the directory's kept
        # answers are worked out again at the next request.
        self.generation += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _peer_changed(self, node: str) -> None:
        """A peer's liveness changed: the leader looks at its slots again."""
        self.view.touched_nodes.add(node)
        self._kick()

    def _bad_key(self, problem: str | None) -> None:
        if problem is not None:
            self.log.error(
                "ignoring a key under the cluster's prefix that does not parse",
                problem=problem[:300],
            )

    def _after_view_change(self) -> None:
        self.metrics.cluster_leader.set(1 if self.is_leader else 0)
        self.on_view_change()
        self._kick()

    # -- provided by the parts (see each module); declared here so each part can call them
    def _beat(self) -> dict[str, Any]:
        raise NotImplementedError  # membership

    def _etcd_down(self, why: str) -> None:
        raise NotImplementedError  # membership

    async def _flush_pending(self) -> None:
        raise NotImplementedError  # fencing

    async def _read_slot(self, slot: str) -> SlotRecord | None:
        raise NotImplementedError  # fencing

    def _reconcile(self, tg: Any) -> None:
        raise NotImplementedError  # fencing

    async def _write_slot(
        self, slot: str, seen: SlotRecord | None, new: SlotRecord, leader_check: bool = False
    ) -> bool | None:
        raise NotImplementedError  # fencing

    async def _write_slots(
        self, writes: list[tuple[str, SlotRecord | None, SlotRecord]], leader_check: bool = False
    ) -> bool | None:
        raise NotImplementedError  # fencing

    def _revive(self, node: str) -> None:
        raise NotImplementedError  # peers

    def _judge_peers(self) -> None:
        raise NotImplementedError  # peers

    def _unit_serving(self, slot: str, unit: str) -> bool:
        raise NotImplementedError  # peers

    def peer_state(self, node: str) -> str:
        raise NotImplementedError  # peers

    @property
    def is_leader(self) -> bool:
        raise NotImplementedError  # leader
