"""Keeping this node's copy of the cluster's keys current: one etcd watch, and a guard
that finds the watch silent (open but saying nothing) and replaces it.

The guard listens for the *clock*: the leader writes one small key, ``<prefix>clock``,
twice per lease TTL, and every live watch delivers it. A node reads anything from etcd
only when its watch has said nothing for longer than that, and then one key (the clock),
which costs etcd the same in a cluster of any size. (A read of the newest revision under
the whole prefix, sorted by etcd, costs it every key of the prefix: N such reads a period
made etcd's CPU grow as N² and ran out of a core near 300 nodes of 8 engines.)"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import orjson

from supervisor.coordination.context import ClusterContext
from supervisor.coordination.etcd import (
    EtcdError,
    WatchCompacted,
    WatchOverflow,
)
from supervisor.coordination.view import ClusterView

# Keys or events taken into the view between two yields to the loop (about 2 ms of work).
YIELD_EVERY = 200
# The clock's key under the cluster's prefix (no slash: no view table takes it).
CLOCK = "clock"


class ViewSync:
    """The etcd watch that keeps the view current, and its guard.

    ``is_leader`` says whether this node writes the clock; ``etcd_down`` hears of a failed
    call; ``revive`` of a node whose key came back; ``on_reload`` of a view read afresh
    (whose beats to hear is worked out again); ``on_view_change`` of every change."""

    def __init__(
        self,
        ctx: ClusterContext,
        *,
        is_leader: Callable[[], bool],
        etcd_down: Callable[[str], None],
        revive: Callable[[str], None],
        on_reload: Callable[[], None],
        on_view_change: Callable[[], None],
    ) -> None:
        self.ctx = ctx
        self.etcd = ctx.etcd
        self.log = ctx.log
        self.cl = ctx.cl
        self.is_leader = is_leader
        self.etcd_down = etcd_down
        self.revive = revive
        self.on_reload = on_reload
        self.on_view_change = on_view_change
        self._watch_scope: anyio.CancelScope | None = None
        self.watch_heard = 0.0  # monotonic: when the watch last delivered anything

    def _after_view_change(self) -> None:
        self.ctx.metrics.cluster_leader.set(1 if self.is_leader() else 0)
        self.on_view_change()
        self.ctx.kick()

    async def watch_loop(self) -> None:
        start = 0
        skip = len(self.ctx.root)  # a key's prefix, cut off each event's key
        while True:
            try:
                if start == 0:
                    kvs, rev = await self.etcd.get_prefix(self.ctx.root)
                    view = ClusterView(revision=rev)
                    for i, kv in enumerate(kvs):
                        self.ctx.bad_key(
                            view.apply(kv.key[skip:].decode(errors="replace"), kv, False)
                        )
                        if i % YIELD_EVERY == YIELD_EVERY - 1:
                            await anyio.lowlevel.checkpoint()  # not yet in use: safe
                    self.ctx.view = view
                    self.on_reload()
                    start = rev + 1
                    self._after_view_change()
                    self.ctx.loaded.set()
                with anyio.CancelScope() as scope:  # the guard restarts a silent watch
                    self._watch_scope = scope
                    async for rev, events in self.etcd.watch_prefix(self.ctx.root, start):
                        self.watch_heard = time.monotonic()
                        since_yield, last_rev, changed = 0, 0, False
                        for ev in events:
                            if since_yield >= YIELD_EVERY and ev.kv.mod_revision != last_rev:
                                # A backlog of thousands of events: let the loop run, between
                                # two revisions (never inside one, e.g. a lease's expiry).
                                await anyio.lowlevel.checkpoint()
                                since_yield = 0
                            since_yield += 1
                            last_rev = ev.kv.mod_revision
                            start = max(start, ev.kv.mod_revision + 1)
                            rel = ev.kv.key[skip:].decode(errors="replace")
                            if rel == CLOCK:
                                continue  # the watch lives; nothing in the view changed
                            changed = True
                            self.ctx.bad_key(self.ctx.view.apply(rel, ev.kv, ev.kind == "delete"))
                            if rel.startswith("nodes/") and ev.kind == "put":
                                self.revive(rel.split("/", 1)[1])
                        self.ctx.view.revision = max(self.ctx.view.revision, rev)
                        if changed:
                            self._after_view_change()
            except (WatchCompacted, WatchOverflow) as e:
                self.log.warning("the watch cannot resume; reading the keys afresh", reason=str(e))
                start = 0
            except EtcdError as e:
                self.etcd_down(str(e))
                await anyio.sleep(0.2)

    async def watch_guard(self) -> None:
        """A watch can stay open and say nothing (its member cut off from the others, a
        half-open link) while other calls reach etcd through another member. Twice per
        TTL: the leader writes the clock; a node whose watch has said nothing for three
        quarters of a TTL (a live one delivers the clock every half TTL) reads the clock's
        key. If etcd holds a clock the watch has not delivered, and still has not at the
        next look, the slot records are read and taken at once (a node whose slot moved
        steps down) and the watch is restarted. With no leader nobody writes the clock:
        every node then reads that one key twice per TTL, and finds nothing amiss."""
        period = self.cl.lease_ttl / 2
        behind = 0  # the clock's revision the watch was found not to have delivered
        while True:
            await anyio.sleep(period)
            if not self.ctx.loaded.is_set():
                continue
            if self.is_leader():
                try:
                    value = orjson.dumps({"leader": self.ctx.node, "at": round(time.time(), 3)})
                    await self.etcd.put(self.ctx.key(CLOCK), value)
                except EtcdError:
                    pass  # the lease loop says what is wrong with etcd
            if time.monotonic() - self.watch_heard <= 1.5 * period:
                behind = 0
                continue
            try:
                kv = await self.etcd.get(self.ctx.key(CLOCK))
            except EtcdError:
                continue
            clock = kv.mod_revision if kv is not None else 0
            if clock <= self.ctx.view.revision:
                behind = 0  # nothing written that the watch should have said
                continue
            if not behind or self.ctx.view.revision >= behind:
                behind = clock  # maybe on its way: looked at again next time
                continue
            self.log.warning(
                "the watch is silent: etcd has changes it has not delivered; "
                "taking the slots from a direct read and restarting it",
                etcd_revision=clock,
                watched_revision=self.ctx.view.revision,
            )
            try:
                kvs, _ = await self.etcd.get_prefix(self.ctx.key("slots", ""))
            except EtcdError:
                kvs = []
            for kv in kvs:
                self.ctx.take(kv)
            self._after_view_change()
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            behind = 0
