"""Heartbeats over NATS: each node says it is alive a few times a second, and notices
peers that go quiet.

A node hears only the peers it judges (:meth:`Heartbeats.judge`): its few predecessors on
a ring of the nodes' names, and its own beats (they tell it whether its own link works).
So the server delivers each beat a bounded number of times, however large the cluster, and
no node, the leader included, hears a number of beats that grows with it. The leader
hears two things more, both rare: the *reports* of the watchers (a peer became suspect, or
was heard again, and again every second while it stays suspect), and the beats of nodes
*cut off from etcd* (a node whose keep-alives fail also beats on a second subject): it
needs those to tell, when such a node's lease expires, that it still serves.

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
    """Where ``node`` beats (and its watchers listen)."""
    return f"failover-supervisor.{cluster}.heartbeat.{node}"


def cutoff_subject(cluster: str, node: str = "*") -> str:
    """Where a node cut off from etcd beats as well (and the leader listens)."""
    return f"failover-supervisor.{cluster}.cutoff.{node}"


def report_subject(cluster: str, node: str = "*") -> str:
    """Where watchers report a peer's suspicion (and the leader listens)."""
    return f"failover-supervisor.{cluster}.suspect.{node}"


# A watcher says again every REPORT_EVERY seconds that a peer is still suspect (a report
# may be lost, and a new leader must learn it); the leader forgets a report not renewed
# within REPORT_TTL.
REPORT_EVERY = 1.0
REPORT_TTL = 3.0


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
    peer becomes suspect or is heard again (by this node, or, when it leads, as a watcher
    reports); while ``cut_off()`` says this node's etcd link fails, each beat also goes
    where the leader hears it.
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
        cut_off: Callable[[], bool] = lambda: False,
    ) -> None:
        self.servers = list(servers)
        self.cluster, self.node = cluster, node
        self.interval, self.suspect_after = interval, suspect_after
        self.snapshot, self.on_change, self.cut_off = snapshot, on_change, cut_off
        self.peers: dict[str, PeerBeats] = {}
        self._suspected: set[str] = set()  # judged peers now suspect (kept with their flags)
        # Peers judged suspect and heard again, to be reported: node -> suspect; and when
        # each suspect was last reported.
        self._to_report: dict[str, bool] = {}
        self._reported_at: dict[str, float] = {}
        self._report_wake = anyio.Event()
        # Leading: watchers' reports (node -> watcher -> when received), the silence the
        # first report said (node -> monotonic time of the last beat, as reported), the
        # cut-off nodes' beats (node -> when heard, its interval), and since when all of
        # these have been listened to (0: not leading).
        self.reports: dict[str, dict[str, float]] = {}
        self._silent_since: dict[str, float] = {}
        self.cut_off_heard: dict[str, tuple[float, float]] = {}
        self._leading = False
        self._leading_since = 0.0
        self.connected = False
        self._connected_since = 0.0
        self._seq = 0
        self._run = secrets.token_hex(4)
        # Our own beats come back to us through the server: when they stop, our link is
        # the broken one (a half-open connection looks connected for seconds).
        self._own_last = 0.0
        self._own_silent = False
        self._nc: NatsClient | None = None
        # The peers this node judges, and the subscriptions that bring their beats (one per
        # peer; and, leading, the reports' and the cut-off beats' wildcards).
        self._judged: frozenset[str] = frozenset()
        self._judged_changed = anyio.Event()
        self._subs: dict[str, Any] = {}
        self.sent = 0
        self.received = 0
        self.log = logging.get(node=node, component="heartbeats")

    @property
    def suspects(self) -> set[str]:
        """The peers now suspect: judged so here, or (leading) reported so by a watcher."""
        return self._suspected | self.reports.keys() if self.reports else self._suspected

    def is_suspect(self, node: str) -> bool:
        p = self.peers.get(node)
        return (p is not None and p.suspect) or node in self.reports

    def heard_recently(self, node: str) -> bool:
        """Whether ``node`` beats: one judged here and not suspect, or (leading) one whose
        beats as a node cut off from etcd came within its suspect window."""
        p = self.peers.get(node)
        if p is not None and not p.suspect and p.last_at > 0:
            return True
        heard = self.cut_off_heard.get(node)
        return heard is not None and time.monotonic() - heard[0] <= heard[1] * self.suspect_after

    def may_be_cut_off(self) -> bool:
        """Leading for less than a suspect window: a node cut off from etcd may beat yet
        unheard, so a lease gone is not yet a death (the new leader must not promote the
        slots of a node that still serves)."""
        if not self._leading:
            return False
        start = max(self._leading_since, self._connected_since)
        return time.monotonic() - start <= self.interval * (self.suspect_after + 1)

    def last_heard(self, node: str) -> float:
        """When ``node``'s last beat came (monotonic), as heard here or as its watchers
        reported; 0 if unknown."""
        p = self.peers.get(node)
        if p is not None and p.last_at:
            return p.last_at
        return self._silent_since.get(node, 0.0)

    def judge(self, nodes: Collection[str], *, leading: bool = False) -> None:
        """Hear (and suspect) only ``nodes`` from now on, and, ``leading``, the watchers'
        reports and the cut-off nodes' beats. Beats of a peer no longer judged are
        forgotten, so it is never suspected for the silence."""
        judged = frozenset(nodes) - {self.node}
        if judged == self._judged and leading == self._leading:
            return
        self._judged = judged
        for node in [n for n in self.peers if n not in judged]:
            self._drop(node)
        if leading != self._leading:
            self._leading = leading
            self._leading_since = time.monotonic()
            for node in list(self.reports):
                self._unreport(node)
            self.cut_off_heard.clear()
        changed, self._judged_changed = self._judged_changed, anyio.Event()
        changed.set()

    def subjects(self) -> set[str]:
        """The subjects this node subscribes to: its own, its judged peers', and, leading,
        the reports' and the cut-off beats'."""
        out = {subject(self.cluster, n) for n in self._judged | {self.node}}
        if self._leading:
            out |= {report_subject(self.cluster), cutoff_subject(self.cluster)}
        return out

    async def _subscribe(self, nc: NatsClient) -> None:
        """Bring the subscriptions to what :meth:`judge` last asked (new ones first, so
        our own beats keep coming back throughout)."""
        want = self.subjects()
        callbacks = {
            report_subject(self.cluster): self._on_report,
            cutoff_subject(self.cluster): self._on_cut_off_beat,
        }
        for subj in sorted(want - set(self._subs)):
            self._subs[subj] = await nc.subscribe(subj, cb=callbacks.get(subj, self._on_beat))
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
                    tg.start_soon(self._report_loop, nc)
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
        cut_subj = cutoff_subject(self.cluster, self.node)
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
                    data = orjson.dumps(beat)
                    await nc.publish(subj, data)
                    if self.cut_off():  # the leader must hear we still serve
                        await nc.publish(cut_subj, data)
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
        if node not in self._judged:
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
            self._suspected.discard(node)
            self.log.info("peer heard again", peer=node)
            self._report(node, False)
            self.on_change(node, False)

    async def _on_cut_off_beat(self, msg: Msg) -> None:
        """Leading: a beat of a node that says its etcd link fails."""
        try:
            beat = orjson.loads(msg.data)
            node = str(beat["node"])
            interval = float(beat.get("interval", self.interval))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.log.warning("malformed heartbeat ignored", subject=msg.subject)
            return
        if node != self.node and self._leading:
            first = node not in self.cut_off_heard
            self.cut_off_heard[node] = (time.monotonic(), interval)
            if first:
                self.log.info("peer beats cut off from etcd", peer=node)
                self.on_change(node, False)

    async def _on_report(self, msg: Msg) -> None:
        """Leading: a watcher says a peer became (or is still) suspect, or was heard again."""
        try:
            r = orjson.loads(msg.data)
            node, by = str(r["node"]), str(r["by"])
            suspect = r["suspect"] is True
            silent = float(r.get("silent_s", 0.0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.log.warning("malformed suspicion report ignored", subject=msg.subject)
            return
        if not self._leading or self.node in (node, by):
            return  # (what this node judges itself, it knows first-hand)
        now = time.monotonic()
        if suspect:
            by_watcher = self.reports.get(node)
            if by_watcher is None:
                by_watcher = self.reports[node] = {}
                self._silent_since[node] = now - max(0.0, silent)
                self.log.warning(
                    "peer suspect: its watcher misses its heartbeats",
                    peer=node,
                    watcher=by,
                    silent_s=round(silent, 3),
                )
                self.on_change(node, True)
            by_watcher[by] = now
        elif node in self.reports:
            self.reports[node].pop(by, None)
            if not self.reports[node]:
                self._unreport(node, f"heard again by {by}")

    def _unreport(self, node: str, why: str = "") -> None:
        self.reports.pop(node, None)
        self._silent_since.pop(node, None)
        if why:
            self.log.info("peer no longer suspect", peer=node, why=why)
            self.on_change(node, False)

    def _report(self, node: str, suspect: bool) -> None:
        """Tell the leader soon that a judged peer became suspect or was heard again."""
        self._to_report[node] = suspect
        self._report_wake.set()

    async def _report_loop(self, nc: NatsClient) -> None:
        """Send the reports due: each change at once, each suspect again every
        REPORT_EVERY."""
        while True:
            with anyio.move_on_after(REPORT_EVERY / 2):
                await self._report_wake.wait()
            self._report_wake = anyio.Event()
            now = time.monotonic()
            for node in self._suspected:
                if (
                    node not in self._to_report
                    and now - self._reported_at.get(node, 0) >= REPORT_EVERY
                ):
                    self._to_report[node] = True
            due, self._to_report = self._to_report, {}
            for node, suspect in due.items():
                if suspect and node not in self._suspected:
                    continue  # heard again meanwhile (and that is due too)
                p = self.peers.get(node)
                report = {"node": node, "by": self.node, "suspect": suspect}
                if suspect:
                    self._reported_at[node] = now
                    report["silent_s"] = round(now - p.last_at, 3) if p and p.last_at else 0.0
                else:
                    self._reported_at.pop(node, None)
                if not nc.is_connected:
                    continue  # a later repeat says it (the leader forgets stale ones)
                try:
                    await nc.publish(report_subject(self.cluster, node), orjson.dumps(report))
                except Exception as e:  # the connection just broke: repeated later
                    self.log.debug("suspicion report not sent", error=str(e) or repr(e))

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
                self._suspected.add(p.node)
                self.log.warning(
                    "peer suspect: heartbeats missed",
                    peer=p.node,
                    silent_s=round(now - p.last_at, 3),
                    missed=self.suspect_after,
                )
                self._report(p.node, True)
                self.on_change(p.node, True)
        for node, by_watcher in list(self.reports.items()):
            for by, at in list(by_watcher.items()):
                if now - at > REPORT_TTL:
                    del by_watcher[by]
            if not by_watcher:
                self._unreport(node, "its watchers' reports stopped")
        for node, (at, interval) in list(self.cut_off_heard.items()):
            if now - at > max(interval * self.suspect_after, REPORT_TTL):
                del self.cut_off_heard[node]

    def _drop(self, node: str) -> None:
        """No longer judged here: forget its beats; the leader hears no more of it from us."""
        if node in self._suspected:
            self._report(node, False)
        self.peers.pop(node, None)
        self._suspected.discard(node)
        self._reported_at.pop(node, None)

    def forget(self, node: str) -> None:
        """A peer gone for good: nothing about it is kept."""
        self._drop(node)
        self.cut_off_heard.pop(node, None)
        self._unreport(node)
