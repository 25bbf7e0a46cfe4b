"""What every part of a node's cluster coordination truly shares: its settings, its etcd
client, its view of the cluster's keys, its heartbeats, its log and the events that wake
its loops. Anything one part owns stays in that part; what a part needs of another comes
to it as a callback, wired by :class:`supervisor.coordination.cluster.ClusterCoordinator`.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import anyio

from supervisor import log as logging
from supervisor.config import Config
from supervisor.coordination.etcd import EtcdClient, KeyValue
from supervisor.coordination.nats import Heartbeats
from supervisor.coordination.view import ClusterView
from supervisor.metrics import Metrics


class ClusterContext:
    """One node's settings, etcd client, view, heartbeats, log and wake events."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        beats: Heartbeats | None,
        *,
        on_kick: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.cl = cfg.cluster
        self.node = cfg.node
        self.metrics = metrics
        self.etcd = EtcdClient(self.cl.etcd_endpoints, session, self.cl.etcd_timeout)
        self.root = f"{self.cl.etcd_prefix.rstrip('/')}/{self.cl.name}/".encode()
        self.view = ClusterView()  # replaced whole when the keys are read afresh
        self.loaded = anyio.Event()  # the first full read of the cluster is in
        self.changed = anyio.Event()  # wakes the decide loop; replaced at each kick
        self._on_kick = on_kick
        self.log = logging.get(node=self.node, component="cluster")
        self.beats = beats  # None without NATS

    def key(self, *parts: str) -> bytes:
        return self.root + "/".join(parts).encode()

    def take(self, kv: KeyValue) -> None:
        """Take one key read from etcd into the view."""
        rel = kv.key[len(self.root) :].decode(errors="replace")
        self.bad_key(self.view.apply(rel, kv, False))

    def bad_key(self, problem: str | None) -> None:
        if problem is not None:
            self.log.error(
                "ignoring a key under the cluster's prefix that does not parse",
                problem=problem[:300],
            )

    def kick(self) -> None:
        """Wake the decide loop: whatever wakes the leader may change who serves what, so
        the directory's kept answers are worked out again at the next request too."""
        self._on_kick()
        changed, self.changed = self.changed, anyio.Event()
        changed.set()
