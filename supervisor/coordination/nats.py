"""Heartbeats over NATS: each node publishes its engines' state a few times a second, and
notices peers that go quiet.

A node hears only the peers it judges (:meth:`Heartbeats.judge`): the leader hears every
node, every other node its few predecessors on a ring of the nodes' names, and each node
its own beats (they tell it whether its own link works). So the server delivers each beat
a bounded number of times, however large the cluster.

A missed beat only makes a peer *suspect*; the coordinator confirms death another way (lease
expiry, direct probe). While this node itself is cut off from NATS nobody is suspected, so a
NATS outage never causes a failover on its own. Connection is retried forever with backoff.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from supervisor import log as logging


def subject(cluster: str, node: str = "*") -> str:
    return f"failover-supervisor.{cluster}.heartbeat.{node}"


# How many nodes judge each node besides the leader: its successors on the ring.
WATCHERS = 2


def ring_predecessors(nodes: Collection[str], node: str, count: int = WATCHERS) -> set[str]:
    """The ``count`` nodes before ``node`` on the ring of ``nodes``' names (sorted, wrapping
    round): the peers ``node`` judges. Every node is so judged by its ``count`` successors,
    and all of them agree on who those are from the same membership."""
    ring = sorted(set(nodes) | {node})
    i = ring.index(node)
    n = len(ring)
    return {ring[(i - j) % n] for j in range(1, min(count, n - 1) + 1)}


@dataclass
class PeerBeats:
    """What this node has heard from one peer."""

    node: str
    last_at: float = 0.0  # monotonic time of the last beat
    seq: int = -1
    run: str = ""  # the peer's run (its seq starts again when it restarts)
    interval: float = 0.25
    admin: str = ""
    suspect: bool = False


class Heartbeats:
    """Publishes this node's beat every ``interval`` and tracks peers' beats.

    ``snapshot()`` gives what goes into a beat; ``on_change(node, suspect)`` is called when a
    peer becomes suspect or is heard again.
    """

    def __init__(
        self,
        servers: Sequence[str],
        cluster: str,
        node: str,
        *,
        interval: float,
        suspect_after: int,
        snapshot: Callable[[], dict[str, Any]],
        on_change: Callable[[str, bool], None] = lambda node, suspect: None,
    ) -> None:
        self.servers = list(servers)
        self.cluster, self.node = cluster, node
        self.interval, self.suspect_after = interval, suspect_after
        self.snapshot, self.on_change = snapshot, on_change
        self.peers: dict[str, PeerBeats] = {}
        self.suspects: set[str] = set()  # the peers now suspect (kept with their flags)
        self.connected = False
        self._connected_since = 0.0
        self._seq = 0
        self._run = secrets.token_hex(4)
        # Our own beats come back to us through the server: when they stop, our link is
        # the broken one (a half-open connection looks connected for seconds).
        self._own_last = 0.0
        self._own_silent = False
        self._nc: NatsClient | None = None
        # The peers this node judges (None: every one, as the leader does), and the
        # subscriptions that bring their beats (one per peer, or one wildcard).
        self._judged: frozenset[str] | None = None
        self._judged_changed = anyio.Event()
        self._subs: dict[str, Any] = {}
        self.sent = 0
        self.received = 0
        self.log = logging.get(node=node, component="heartbeats")

    def is_suspect(self, node: str) -> bool:
        p = self.peers.get(node)
        return p is not None and p.suspect

    def heard_recently(self, node: str) -> bool:
        p = self.peers.get(node)
        return p is not None and not p.suspect and p.last_at > 0

    def judge(self, nodes: Collection[str] | None) -> None:
        """Hear (and suspect) only ``nodes`` from now on; None: every node. Beats of a
        peer no longer judged are forgotten, so it is never suspected for the silence."""
        judged = None if nodes is None else frozenset(nodes) - {self.node}
        if judged == self._judged:
            return
        self._judged = judged
        if judged is not None:
            for node in [n for n in self.peers if n not in judged]:
                self.forget(node)
        changed, self._judged_changed = self._judged_changed, anyio.Event()
        changed.set()

    def subjects(self) -> set[str]:
        """The subjects this node subscribes to: its own, and its judged peers'."""
        if self._judged is None:
            return {subject(self.cluster)}
        return {subject(self.cluster, n) for n in self._judged | {self.node}}

    async def _subscribe(self, nc: NatsClient) -> None:
        """Bring the subscriptions to what :meth:`judge` last asked (new ones first, so
        our own beats keep coming back throughout)."""
        want = self.subjects()
        for subj in sorted(want - set(self._subs)):
            self._subs[subj] = await nc.subscribe(subj, cb=self._on_beat)
        for subj in sorted(set(self._subs) - want):
            try:
                await self._subs.pop(subj).unsubscribe()
            except Exception as e:  # the connection broke: it is made again anyway
                self.log.debug("unsubscribe failed", error=str(e) or repr(e))

    async def _follow_judged(self, nc: NatsClient) -> None:
        while True:
            changed = self._judged_changed
            await self._subscribe(nc)
            await changed.wait()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            nc: NatsClient | None = None
            try:
                nc = await nats.connect(
                    servers=self.servers,
                    name=f"failover-supervisor {self.node}",
                    connect_timeout=2,
                    reconnect_time_wait=0.25,
                    max_reconnect_attempts=-1,
                    ping_interval=1,
                    max_outstanding_pings=3,
                    allow_reconnect=True,
                    # Beats are never kept to be sent later: a late beat would say a node
                    # is alive at a time it may not have been.
                    pending_size=0,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                )
            except Exception as e:  # nats-py raises several kinds; all mean "try again"
                self.log.warning("NATS not reachable; retrying", error=str(e) or repr(e))
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            await self._reconnected()
            try:
                self._subs = {}  # a fresh connection has none
                await self._subscribe(nc)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._follow_judged, nc)
                    tg.start_soon(self._publish_loop, nc)
                    tg.start_soon(self._suspect_loop)
                    await self._wait_closed(nc)
                    tg.cancel_scope.cancel()
            finally:
                self.connected = False
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(1):
                            await nc.close()
                    except Exception:
                        pass

    async def _wait_closed(self, nc: NatsClient) -> None:
        while not nc.is_closed:
            await anyio.sleep(0.5)
        self.log.warning("NATS connection closed; connecting again")

    async def _disconnected(self) -> None:
        self.connected = False
        self.log.warning("NATS disconnected; peers are not suspected until it is back")

    async def _reconnected(self) -> None:
        self.connected = True
        self._connected_since = time.monotonic()
        self.log.info("NATS connected")

    async def _error(self, e: Exception) -> None:
        self.log.debug("NATS client error", error=str(e) or repr(e))

    async def _publish_loop(self, nc: NatsClient) -> None:
        subj = subject(self.cluster, self.node)
        while True:
            self._seq += 1
            beat = {
                "node": self.node,
                "run": self._run,
                "seq": self._seq,
                "interval": self.interval,
            }
            beat.update(self.snapshot())
            if nc.is_connected:  # while reconnecting a beat would be buffered: drop it
                try:
                    await nc.publish(subj, orjson.dumps(beat))
                    self.sent += 1
                except Exception as e:  # the connection just broke: the next beat tries
                    self.log.debug("heartbeat not sent", error=str(e) or repr(e))
            await anyio.sleep(self.interval)

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = orjson.loads(msg.data)
            node = str(beat["node"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.log.warning("malformed heartbeat ignored", subject=msg.subject)
            return
        if node == self.node:
            self._own_last = time.monotonic()
            if self._own_silent:
                self._own_silent = False
                self.log.info("our own beats come back again: our NATS link works")
            return
        if self._judged is not None and node not in self._judged:
            return  # a subscription on its way out
        self.received += 1
        p = self.peers.get(node)
        if p is None:
            p = self.peers[node] = PeerBeats(node)
        try:
            seq = int(beat.get("seq", -1))
            interval = float(beat.get("interval", self.interval))
        except (TypeError, ValueError):
            self.log.warning("malformed heartbeat ignored", peer=node)
            return
        run = str(beat.get("run", ""))
        if run == p.run and 0 <= seq <= p.seq:
            return  # a duplicate, or one overtaken by a newer beat: it says nothing new
        p.last_at = time.monotonic()
        p.seq, p.run = seq, run
        p.interval = interval
        p.admin = str(beat.get("admin", ""))
        if p.suspect:
            p.suspect = False
            self.suspects.discard(node)
            self.log.info("peer heard again", peer=node)
            self.on_change(node, False)

    async def _suspect_loop(self) -> None:
        while True:
            await anyio.sleep(self.interval / 2)
            self.check()

    def check(self, now: float | None = None) -> None:
        """Mark peers suspect whose beats stopped, unless we are the one cut off."""
        now = now if now is not None else time.monotonic()
        if not self.connected:
            return
        # Our own beats come back every interval; missing for one and a half means our link
        # is broken. Sooner than a peer's window (with suspect_after >= 2, intervals after its
        # last beat, which came no later than ours), so we never suspect a peer for it.
        if now - max(self._own_last, self._connected_since) > 1.5 * self.interval:
            # Our own beats do not come back: it is our link that is broken, not theirs.
            if not self._own_silent:
                self._own_silent = True
                self.log.warning(
                    "our own beats do not come back: our NATS link is broken; "
                    "suspecting nobody until they do"
                )
            return
        for p in self.peers.values():
            limit = p.interval * self.suspect_after
            # Just (re)connected: give every peer a full window before suspecting it.
            since = max(p.last_at, self._connected_since)
            if not p.suspect and now - since > limit:
                p.suspect = True
                self.suspects.add(p.node)
                self.log.warning(
                    "peer suspect: heartbeats missed",
                    peer=p.node,
                    silent_s=round(now - p.last_at, 3),
                    missed=self.suspect_after,
                )
                self.on_change(p.node, True)

    def forget(self, node: str) -> None:
        self.peers.pop(node, None)
        self.suspects.discard(node)
