"""Keeping this node's copy of the cluster's keys current: one etcd watch, and a guard
that finds the watch silent (open but saying nothing) by a quorum read and replaces it."""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel

from supervisor.coordination.etcd import (
    EtcdError,
    WatchCompacted,
    WatchOverflow,
)
from supervisor.coordination.state import ClusterState
from supervisor.coordination.view import ClusterView

# Keys or events taken into the view between two yields to the loop (about 2 ms of work).
YIELD_EVERY = 200


class ViewSync(ClusterState):
    """The etcd watch that keeps the view current, and its guard."""

    async def _watch_loop(self) -> None:
        start = 0
        while True:
            try:
                if start == 0:
                    kvs, rev = await self.etcd.get_prefix(self.root)
                    view = ClusterView(revision=rev)
                    for i, kv in enumerate(kvs):
                        rel = kv.key[len(self.root) :].decode(errors="replace")
                        self._bad_key(view.apply(rel, kv, False))
                        if i % YIELD_EVERY == YIELD_EVERY - 1:
                            await anyio.lowlevel.checkpoint()  # not yet in use: safe
                    self.view = view
                    self._judging = None  # whose beats to hear: worked out afresh
                    start = rev + 1
                    self._after_view_change()
                    self.loaded.set()
                with anyio.CancelScope() as scope:  # the guard restarts a silent watch
                    self._watch_scope = scope
                    async for rev, events in self.etcd.watch_prefix(self.root, start):
                        since_yield, last_rev = 0, 0
                        for ev in events:
                            if since_yield >= YIELD_EVERY and ev.kv.mod_revision != last_rev:
                                # A backlog of thousands of events: let the loop run, between
                                # two revisions (never inside one, e.g. a lease's expiry).
                                await anyio.lowlevel.checkpoint()
                                since_yield = 0
                            since_yield += 1
                            last_rev = ev.kv.mod_revision
                            rel = ev.kv.key[len(self.root) :].decode(errors="replace")
                            self._bad_key(self.view.apply(rel, ev.kv, ev.kind == "delete"))
                            if rel.startswith("nodes/") and ev.kind == "put":
                                self._revive(rel.split("/", 1)[1])
                            start = max(start, ev.kv.mod_revision + 1)
                        self.view.revision = max(self.view.revision, rev)
                        if events:
                            self._after_view_change()
            except (WatchCompacted, WatchOverflow) as e:
                self.log.warning("the watch cannot resume; reading the keys afresh", reason=str(e))
                start = 0
            except EtcdError as e:
                self._etcd_down(str(e))
                await anyio.sleep(0.2)

    async def _watch_guard(self) -> None:
        """A watch can stay open and say nothing (its member cut off from the others, a
        half-open link) while other calls reach etcd through another member. Twice per
        TTL a one-key read (the newest ``mod_revision`` under the cluster's prefix, keys
        only) says when the cluster's keys last changed: the same few bytes in a cluster
        of any size. If the watch has not delivered that revision a TTL later, the slot
        records are read and taken at once (a node whose slot moved steps down) and the
        watch is restarted."""
        behind: tuple[float, int] | None = None  # (since, the newest revision then)
        while True:
            await anyio.sleep(self.cl.lease_ttl / 2)
            if not self.loaded.is_set():
                continue
            try:
                newest, _ = await self.etcd.newest(self.root)
            except EtcdError:
                continue
            if behind is not None and self.view.revision >= behind[1]:
                behind = None  # it caught up
            if newest <= self.view.revision:
                continue
            if behind is None:
                behind = (time.monotonic(), newest)
                continue
            if time.monotonic() - behind[0] < self.cl.lease_ttl:
                continue
            self.log.warning(
                "the watch is silent: etcd has changes it has not delivered; "
                "taking the slots from a direct read and restarting it",
                etcd_revision=newest,
                watched_revision=self.view.revision,
            )
            try:
                kvs, _ = await self.etcd.get_prefix(self.key("slots", ""))
            except EtcdError:
                kvs = []
            for kv in kvs:
                rel = kv.key[len(self.root) :].decode(errors="replace")
                self._bad_key(self.view.apply(rel, kv, False))
            self._after_view_change()
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            behind = None
