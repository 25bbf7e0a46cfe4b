"""Heartbeats over NATS: each node publishes its engines' state a few times a second, and
notices peers that go quiet.

A missed beat only makes a peer *suspect*; the coordinator confirms death another way (lease
expiry, direct probe). While this node itself is cut off from NATS nobody is suspected, so a
NATS outage never causes a failover on its own. Connection is retried forever with backoff.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
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
        self.connected = False
        self._connected_since = 0.0
        self._seq = 0
        self._run = secrets.token_hex(4)
        # Our own beats come back to us through the server: when they stop, our link is
        # the broken one (a half-open connection looks connected for seconds).
        self._own_last = 0.0
        self._own_silent = False
        self._nc: NatsClient | None = None
        self.sent = 0
        self.received = 0
        self.log = logging.get(node=node, component="heartbeats")

    def is_suspect(self, node: str) -> bool:
        p = self.peers.get(node)
        return p is not None and p.suspect

    def heard_recently(self, node: str) -> bool:
        p = self.peers.get(node)
        return p is not None and not p.suspect and p.last_at > 0

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
                await nc.subscribe(subject(self.cluster), cb=self._on_beat)
                async with anyio.create_task_group() as tg:
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
                self.log.warning(
                    "peer suspect: heartbeats missed",
                    peer=p.node,
                    silent_s=round(now - p.last_at, 3),
                    missed=self.suspect_after,
                )
                self.on_change(p.node, True)

    def forget(self, node: str) -> None:
        self.peers.pop(node, None)
