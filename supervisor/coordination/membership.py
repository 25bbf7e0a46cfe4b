"""This node's membership: its lease (kept alive, and under policy ``demote`` the reason
it stops serving in time), the keys it publishes on that lease (node, engines, election),
its pauses (kept without a lease), and what it does when etcd comes and goes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson

from supervisor.coordination.context import ClusterContext
from supervisor.coordination.etcd import (
    EtcdError,
    EtcdUnavailable,
    LeaseExpired,
)
from supervisor.coordination.local import SlotHandle
from supervisor.model import EngineState


class Membership:
    """This node's lease, keys and pauses in etcd, and whether etcd answers it.

    ``flush_pending`` records the claims made while etcd was unreachable (fencing's): the
    publish loop calls it once etcd answers again."""

    def __init__(
        self,
        ctx: ClusterContext,
        controllers: Mapping[str, SlotHandle],
        *,
        admin_url: Callable[[], str],
        pauses: Callable[[], dict[str, Any] | None],
        on_demote: Callable[[bool], None],
        flush_pending: Callable[[], Awaitable[None]],
    ) -> None:
        self.ctx = ctx
        self.etcd = ctx.etcd
        self.log = ctx.log
        self.metrics = ctx.metrics
        self.cl = ctx.cl
        self.node = ctx.node
        self.controllers = controllers
        self.admin_url = admin_url
        # This node's pauses, kept in etcd without a lease: a paused node that goes down
        # stays paused for the leader (its slots are not moved) until resumed or expired.
        self.pauses = pauses
        # Policy demote: this node stops serving (True) before its lease can have expired,
        # and serves again (False) once etcd says its slots are still its own.
        self.on_demote = on_demote
        self.flush_pending = flush_pending
        self.demoted = False
        self.lease = 0
        self.etcd_ok = False
        self.last_renewed = 0.0  # monotonic: when the last keep-alive that worked was sent
        self._published: dict[bytes, bytes] = {}
        self._published_pause: bytes | None = b"(never published)"
        self._publish_lock = anyio.Lock()  # the lease loop and the publish loop both publish
        self._dirty = anyio.Event()  # wakes the publish loop

    def advertised_admin(self) -> str:
        """This node's admin API as peers reach it: ``advertise_host`` and the admin port.
        The address it listens on may be a wildcard (0.0.0.0) or loopback, which a peer
        would take for itself."""
        url = self.admin_url()
        if not url:
            return ""
        port = url.rsplit(":", 1)[1]
        host = self.cl.advertise_host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def pauses_changed(self) -> None:
        self._dirty.set()

    async def _publish_pause(self) -> None:
        rec = self.pauses()
        value = orjson.dumps(rec) if rec else None
        if value == self._published_pause:
            return
        key = self.ctx.key("paused", self.node)
        if value is None:
            await self.etcd.delete(key)
        else:
            await self.etcd.put(key, value)
        self._published_pause = value

    def local_changed(self) -> None:
        """Called on every local engine state change: publish it (and beat it) soon."""
        self._dirty.set()

    def _records(self) -> dict[bytes, bytes]:
        adv = self.cl.advertise_host
        out = {
            self.ctx.key("nodes", self.node): orjson.dumps({"admin": self.advertised_admin()}),
        }
        for ctl in self.controllers.values():
            for e in ctl.engines.values():
                if e.state is EngineState.STOPPED:
                    continue
                out[self.ctx.key("engines", e.id)] = orjson.dumps(
                    {
                        "node": self.node,
                        "slot": e.slot,
                        "model": ctl.model,
                        "backend": e.backend,
                        "role": e.role,
                        "state": e.state.value,
                        "url": f"http://{adv}:{e.spec.port}",
                        "unit": e.unit,
                        "rank": ctl.group_rank,
                        "group_size": ctl.group_size,
                        "serves": ctl.serves_requests,
                    }
                )
        return out

    def cut_off(self) -> bool:
        """Our etcd link fails (a keep-alive failed, or is half a TTL late): our lease may
        expire while we serve, and the leader must hear our beats to know that we do."""
        if not self.lease:
            return False
        return not self.etcd_ok or time.monotonic() - self.last_renewed > self.cl.lease_ttl / 2

    def beat(self) -> dict[str, Any]:
        # A beat says "alive" and nothing else: engines' states travel through etcd.
        return {"admin": self.advertised_admin()}

    async def lease_loop(self) -> None:
        while True:
            try:
                sent = time.monotonic()
                self.lease = await self.etcd.grant(self.cl.lease_ttl)
                self.last_renewed = sent
                await self._register()
            except EtcdError as e:
                self.etcd_down(str(e))
                await anyio.sleep(0.25)
                continue
            self._etcd_up()
            self.log.info("joined the cluster", lease=f"{self.lease:x}", ttl=self.cl.lease_ttl)
            if self.demoted:
                await self._serve_again()
            lost_at: float | None = None
            while True:
                # After a failed keep-alive the next one goes at once: waiting the usual
                # third of the TTL again would put it at the lease's expiry.
                await anyio.sleep(0.1 if lost_at is not None else self.cl.lease_ttl / 3)
                try:
                    sent = time.monotonic()
                    await self.etcd.keepalive(self.lease, timeout=self.cl.lease_ttl / 3)
                    self.last_renewed = sent
                except LeaseExpired:
                    self.log.warning("our lease expired; joining again")
                    break
                except EtcdUnavailable as e:
                    lost_at = lost_at or time.monotonic()
                    self.etcd_down(str(e))
                    continue  # the lease may live yet; if not, the grant above comes back
                lost_at = None
                self._etcd_up()
                if self.demoted:
                    await self._serve_again()

    async def fence_loop(self) -> None:
        """Policy demote: stop serving once the lease has gone unrenewed for two thirds of
        its TTL. etcd counts the TTL from when it received the last keep-alive, which was
        after we sent it: the lease cannot have expired yet, so no peer can have promoted.
        """
        margin = self.cl.lease_ttl / 3
        while True:
            await anyio.sleep(0.02)
            silent = time.monotonic() - self.last_renewed
            if self.demoted or not self.last_renewed or silent < self.cl.lease_ttl - margin:
                continue
            self.demoted = True
            self.log.warning(
                "demoting: our lease went unrenewed for "
                f"{silent:.2f}s of its {self.cl.lease_ttl:g}s; this node serves nothing until "
                "etcd confirms its slots (policy demote)",
            )
            self.on_demote(True)
            self.ctx.kick()

    async def _serve_again(self) -> None:
        """After a demotion: read the slots afresh from etcd (a quorum read), step down
        where another unit took a slot meanwhile, then serve again."""
        try:
            kvs, _ = await self.etcd.get_prefix(self.ctx.key("slots", ""))
        except EtcdError as e:
            self.log.warning("still demoted: cannot read the slots yet", error=str(e))
            return
        for kv in kvs:
            self.ctx.take(kv)
        for name, ctl in self.controllers.items():
            rec = self.ctx.view.slots.get(name)
            active = ctl.active_engine()
            if active is not None and rec is not None and rec.active not in (None, active.unit):
                await ctl.step_down(rec.epoch, rec.active)
        self.demoted = False
        self.log.info("serving again: etcd confirmed this node's slots")
        self.on_demote(False)
        self.ctx.kick()

    def etcd_down(self, why: str) -> None:
        if self.etcd_ok:
            self.log.warning(
                "etcd unreachable; engines keep serving",
                error=why,
                policy=self.cl.etcd_unreachable,
            )
        self.etcd_ok = False
        self.metrics.etcd_reachable.set(0)

    def _etcd_up(self) -> None:
        if not self.etcd_ok:
            self.log.info("etcd reachable")
            self._dirty.set()
            for ctl in self.controllers.values():
                ctl.etcd_back()
        self.etcd_ok = True
        self.metrics.etcd_reachable.set(1)

    async def _register(self) -> None:
        """Node, engines and election keys on a fresh lease (after a grant)."""
        self._published.clear()
        await self._publish()
        ek = self.ctx.key("election", self.node)
        # A fresh key, so a fresh create revision: a restart within the TTL must not
        # inherit the seniority of the key its previous run left (a put would keep it).
        await self.etcd.delete(ek)
        await self.etcd.put(ek, self.node.encode(), lease=self.lease)

    async def _publish(self) -> None:
        async with self._publish_lock:
            await self._publish_locked()

    async def _publish_locked(self) -> None:
        want = self._records()
        for k, v in want.items():
            if self._published.get(k) != v:
                await self.etcd.put(k, v, lease=self.lease)
                self._published[k] = v
        for k in [k for k in self._published if k not in want]:
            await self.etcd.delete(k)
            del self._published[k]

    async def publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if not self.lease:
                continue
            try:
                await self._publish()
                await self._publish_pause()
                await self.flush_pending()
            except LeaseExpired:
                pass  # the lease loop re-registers
            except EtcdError as e:
                self.etcd_down(str(e))
                self._dirty.set()
                await anyio.sleep(0.2)

    async def leave(self) -> None:
        """On shutdown: drop our keys at once (revoking the lease) so peers need not wait."""
        if self.lease:
            with anyio.move_on_after(1):
                await self.etcd.revoke(self.lease)
