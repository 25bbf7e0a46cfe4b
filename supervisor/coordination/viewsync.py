"""Keeping this node's copy of the cluster's keys current: one etcd watch, and a guard
that finds the watch silent (open but saying nothing) by a quorum read and replaces it."""

from __future__ import annotations

import time

import anyio

from supervisor.coordination.etcd import (
    EtcdError,
    WatchCompacted,
    WatchOverflow,
)
from supervisor.coordination.state import ClusterState
from supervisor.coordination.view import ClusterView


class ViewSync(ClusterState):
    """The etcd watch that keeps the view current, and its guard."""

    async def _watch_loop(self) -> None:
        start = 0
        while True:
            try:
                if start == 0:
                    kvs, rev = await self.etcd.get_prefix(self.root)
                    view = ClusterView(revision=rev)
                    for kv in kvs:
                        rel = kv.key[len(self.root) :].decode(errors="replace")
                        self._bad_key(view.apply(rel, kv, False))
                    self.view = view
                    start = rev + 1
                    self._after_view_change()
                    self.loaded.set()
                with anyio.CancelScope() as scope:  # the guard restarts a silent watch
                    self._watch_scope = scope
                    async for rev, events in self.etcd.watch_prefix(self.root, start):
                        for ev in events:
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
        TTL a quorum read of the slots says how far etcd is: if the watch has not caught up
        with that revision a TTL later, the read's slot records are taken at once (a node
        whose slot moved steps down) and the watch is restarted."""
        behind: tuple[float, int] | None = None  # (since, etcd's revision then)
        while True:
            await anyio.sleep(self.cl.lease_ttl / 2)
            if not self.loaded.is_set():
                continue
            try:
                kvs, rev = await self.etcd.get_prefix(self.key("slots", ""))
            except EtcdError:
                continue
            if behind is not None and self.view.revision >= behind[1]:
                behind = None  # it caught up
            if rev <= self.view.revision:
                continue
            if behind is None:
                behind = (time.monotonic(), rev)
                continue
            if time.monotonic() - behind[0] < self.cl.lease_ttl:
                continue
            self.log.warning(
                "the watch is silent: etcd is at a revision it has not delivered; "
                "taking the slots from a direct read and restarting it",
                etcd_revision=rev,
                watched_revision=self.view.revision,
            )
            for kv in kvs:
                rel = kv.key[len(self.root) :].decode(errors="replace")
                self._bad_key(self.view.apply(rel, kv, False))
            self._after_view_change()
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            behind = None
