"""Multi-node coordination: membership, leader election and epoch fencing in etcd, with
heartbeats over NATS for fast suspicion.

Keys, under ``<etcd_prefix>/<cluster name>/``:

- ``nodes/<node>``      this node's admin URL; on its lease (gone = node gone)
- ``engines/<id>``      each engine's slot, role, state, URL and group; on the lease
- ``election/<node>``   on the lease; the lowest create revision is the leader
- ``slots/<slot>``      ``{"epoch", "active", ...}``: who serves a slot; not on a lease.
  Every promotion anywhere is a transaction on this key conditioned on its last revision,
  so two promotions can never both take one epoch.

Who decides:

- A node fails over its own slots to its own shadows (fast, no peer involved), but claims
  the epoch in etcd first; a claim that finds the slot moved on is refused (fenced).
- The leader promotes across nodes: when a slot's active engine lives on a node confirmed
  dead, when the owner has no shadow left, and always for groups (a group spans nodes).
  It writes the new epoch naming a sleeping shadow (or a whole sleeping group); the node
  that hosts it sees the key change and wakes it.
- A node that sees its slot at a newer epoch naming someone else stops its own active
  engine (it was partitioned, or its group was replaced).

A peer is *suspect* after ``suspect_after`` missed heartbeats and *dead* once that is
confirmed: its lease expired, or its admin API does not answer a direct probe. A node cut
off from etcd but still heard on NATS is not dead, so it is not failed over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import orjson

from supervisor import log as logging
from supervisor.config import Config
from supervisor.coordination.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseExpired,
    WatchCompacted,
    delete_op,
    prefix_end,
    put_op,
)
from supervisor.coordination.local import ClaimRefused
from supervisor.coordination.nats import Heartbeats
from supervisor.metrics import Metrics
from supervisor.model import EngineState

if TYPE_CHECKING:
    from supervisor.failover import SlotController


FORGET_AFTER = 600.0  # seconds a dead peer is remembered (it may come back meanwhile)


@dataclass
class SlotRecord:
    """``slots/<slot>`` in etcd: which unit serves the slot, at which epoch."""

    epoch: int
    active: str | None
    nodes: list[str]
    by: str
    reason: str
    mod_revision: int = 0

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "epoch": self.epoch,
                "active": self.active,
                "nodes": self.nodes,
                "by": self.by,
                "reason": self.reason,
                "at": time.time(),
            }
        )

    @classmethod
    def parse(cls, kv: KeyValue) -> SlotRecord:
        d = orjson.loads(kv.value)
        if not isinstance(d, dict):
            raise ValueError(f"a JSON object was expected, got {type(d).__name__}")
        return cls(
            int(d.get("epoch", 0)),
            d.get("active"),
            list(d.get("nodes") or []),
            str(d.get("by", "")),
            str(d.get("reason", "")),
            kv.mod_revision,
        )


@dataclass
class ClusterView:
    """This node's copy of the cluster's keys, kept current by one etcd watch."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    election: dict[str, int] = field(default_factory=dict)  # node -> create revision
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> its pauses
    revision: int = 0

    def apply(self, rel: str, kv: KeyValue, deleted: bool) -> str | None:
        """Take one key's change into the view. A value that does not parse (another
        program's key under our prefix, a half-written one) is left out and the reason
        returned: one bad key must not stop every node."""
        kind, _, name = rel.partition("/")
        tables: dict[str, dict[str, Any]] = {
            "nodes": self.nodes,
            "engines": self.engines,
            "paused": self.paused,
            "slots": self.slots,
            "election": self.election,
        }
        table = tables.get(kind)
        if table is None:
            return None
        if deleted:
            table.pop(name, None)
            return None
        try:
            if kind == "slots":
                held = self.slots.get(name)
                if held is not None and held.mod_revision > kv.mod_revision:
                    return None  # older than what we hold (our own write, read back first)
                self.slots[name] = SlotRecord.parse(kv)
            elif kind == "election":
                self.election[name] = kv.create_revision
            else:
                value = orjson.loads(kv.value)
                if not isinstance(value, dict):
                    raise ValueError(f"a JSON object was expected, got {type(value).__name__}")
                table[name] = value
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            table.pop(name, None)
            return f"{rel}: {e}"
        return None

    def is_paused(self, node: str, slot: str, now: float) -> bool:
        """Whether ``node`` is in maintenance mode for ``slot`` (the whole node, or the
        slot alone), by the pause it published."""
        rec = self.paused.get(node) or {}
        for p in (rec.get("node"), (rec.get("slots") or {}).get(slot)):
            if isinstance(p, dict) and (p.get("until") is None or now < float(p["until"])):
                return True
        return False

    def leader(self, excluding: Collection[str] = ()) -> str | None:
        """The candidate with the lowest create revision, passing over ``excluding``."""
        live = {n: r for n, r in self.election.items() if n not in excluding}
        return min(live, key=lambda n: live[n]) if live else None

    def unit_members(self, slot: str, unit: str) -> list[dict[str, Any]]:
        return [
            e for e in self.engines.values() if e.get("slot") == slot and (e.get("unit") == unit)
        ]


class ClusterCoordinator:
    """One node's part of the cluster (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        controllers: Mapping[str, SlotController],
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
        self._pending: dict[str, SlotRecord] = {}  # claims made while etcd was unreachable
        # ... and the slot's record as it was before the first of them: the deferred claim
        # is written only if nobody wrote the slot since (compare-and-set on it).
        self._pending_base: dict[str, SlotRecord | None] = {}
        self._first_seen: dict[tuple[str, int], float] = {}  # (slot, epoch) -> monotonic
        self._said: dict[str, str] = {}  # slot -> the leader's last logged decision
        self._acting: set[str] = set()  # slots with a promotion / step-down under way
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
                on_change=lambda node, suspect: self._kick(),
            )

    # -- keys ------------------------------------------------------------------------------
    def key(self, *parts: str) -> bytes:
        return self.root + "/".join(parts).encode()

    def _kick(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

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
        key = self.key("paused", self.node)
        if value is None:
            await self.etcd.delete(key)
        else:
            await self.etcd.put(key, value)
        self._published_pause = value

    def local_changed(self) -> None:
        """Called on every local engine state change: publish it (and beat it) soon."""
        self._dirty.set()

    # -- the Coordinator interface used by slot controllers -----------------------------------
    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        if self.demoted:
            self.metrics.cluster_promotions.labels(slot, "fenced").inc()
            raise ClaimRefused("this node is demoted (its lease is unrenewed; policy demote)")
        rec = self.view.slots.get(slot)
        if self._moved_past(slot, unit, epoch, rec, "claim refused: the slot is at a newer epoch"):
            return None
        current = rec.epoch if rec else 0
        new = SlotRecord(max(current, epoch) + 1, unit, [self.node], self.node, reason)
        for _ in range(3):
            ok = await self._write_slot(slot, rec, new)
            if ok is None:  # etcd unreachable
                if self.cl.etcd_unreachable == "keep-serving":  # (demote: refused above)
                    self._pending_base.setdefault(slot, rec)
                    self._pending[slot] = new
                    self.metrics.cluster_promotions.labels(slot, "deferred").inc()
                    self.log.warning(
                        "etcd unreachable: promoting on this node now, recording the epoch "
                        "when etcd is back (policy keep-serving)",
                        slot=slot,
                        unit=unit,
                        epoch=new.epoch,
                    )
                    return new.epoch
                self.metrics.cluster_promotions.labels(slot, "fenced").inc()
                raise ClaimRefused(
                    f"etcd is unreachable (policy {self.cl.etcd_unreachable}): "
                    "promoting once it is back"
                )
            if ok:
                return new.epoch
            # Our copy was stale. Re-read: go on only if the slot has not moved past us.
            rec = await self._read_slot(slot)
            if self._moved_past(slot, unit, epoch, rec, "claim fenced: another promotion won"):
                return None
            new.epoch = (rec.epoch if rec else 0) + 1
        return None

    def _moved_past(
        self, slot: str, unit: str, epoch: int, rec: SlotRecord | None, why: str
    ) -> bool:
        """Whether the slot is already at a later epoch naming someone else (then we are
        fenced: counted and logged)."""
        if rec is None or rec.epoch <= epoch or rec.active == unit:
            return False
        self.metrics.cluster_promotions.labels(slot, "fenced").inc()
        self.log.warning(
            why, slot=slot, unit=unit, ours=epoch, cluster=rec.epoch, active=rec.active, by=rec.by
        )
        return True

    def served_elsewhere(self, slot: str) -> str | None:
        rec = self.view.slots.get(slot)
        if rec is None or rec.active is None:
            return None
        members = self.view.unit_members(slot, rec.active)
        if not members or all(m.get("node") == self.node for m in members):
            return None
        if self._unit_serving(slot, rec.active):
            return rec.active
        return None

    async def _write_slot(
        self, slot: str, seen: SlotRecord | None, new: SlotRecord, leader_check: bool = False
    ) -> bool | None:
        """The fencing transaction. True: written; False: the key moved; None: no etcd."""
        key = self.key("slots", slot)
        cmp = [
            Compare(key, "MOD", "EQUAL", seen.mod_revision)
            if seen is not None
            else Compare(key, "VERSION", "EQUAL", 0)
        ]
        if leader_check:
            # A deposed leader (its election key gone) cannot promote, nor can a node that
            # only believes it leads: every election key must be as young as ours or younger.
            ours = self.view.election.get(self.node, 0)
            prefix = self.key("election", "")
            cmp += [
                Compare(self.key("election", self.node), "LEASE", "EQUAL", self.lease),
                Compare(prefix, "CREATE", "GREATER", ours - 1, range_end=prefix_end(prefix)),
            ]
        try:
            res = await self.etcd.txn(cmp, [put_op(key, new.as_json())])
        except EtcdUnavailable:
            return None
        except EtcdError as e:
            self.log.error("fencing transaction failed", slot=slot, error=str(e))
            return False
        if res.succeeded:
            new.mod_revision = res.revision
            self.view.slots[slot] = new
            self.metrics.cluster_promotions.labels(slot, "committed").inc()
            self.log.info(
                "epoch committed in etcd",
                slot=slot,
                epoch=new.epoch,
                active=new.active,
                revision=res.revision,
                reason=new.reason,
            )
        return res.succeeded

    async def _read_slot(self, slot: str) -> SlotRecord | None:
        try:
            kv = await self.etcd.get(self.key("slots", slot))
        except EtcdError:
            return self.view.slots.get(slot)
        if kv is None:
            self.view.slots.pop(slot, None)
            return None
        try:
            rec = SlotRecord.parse(kv)
        except (ValueError, TypeError, AttributeError) as e:
            # Writes conditioned on an absent key fail while it is there: nothing is
            # promoted over a key nobody can read. It needs fixing by hand.
            self._bad_key(f"slots/{slot}: {e}")
            self.view.slots.pop(slot, None)
            return None
        self.view.slots[slot] = rec
        return rec

    # -- liveness ------------------------------------------------------------------------
    def peer_state(self, node: str) -> str:
        """``self``, ``alive``, ``suspect`` (heartbeats missed) or ``dead``. The node's
        lease decides: a node whose key is gone is dead, heard on NATS or not (after a
        whole-cluster restart without it, say), and a node whose lease lives is never dead,
        however silent (a stalled loop, a partition between nodes only)."""
        if node == self.node:
            return "self"
        if node in self.dead:
            return "dead"
        if node not in self.view.nodes and self.loaded.is_set():
            return "alive" if self._cut_off_but_serving(node) else "dead"
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

    def _unit_serving(self, slot: str, unit: str) -> bool:
        members = self.view.unit_members(slot, unit)
        if not members:
            return False
        size = int(members[0].get("group_size", 1))
        return len(members) >= size and all(
            m.get("state") == EngineState.ACTIVE.value
            and self.peer_state(str(m.get("node"))) in ("self", "alive", "suspect")
            for m in members
        )

    async def _probe_loop(self) -> None:
        """Confirm the death of peers whose lease is gone; probe suspects' admin APIs (for
        the log: a live lease keeps a silent peer alive however its probe ends)."""
        while True:
            await anyio.sleep(self.cl.heartbeat_interval / 2)
            self._known |= set(self.view.nodes)
            if self.beats is not None:
                self._known |= set(self.beats.peers)
            self._forget_old(time.monotonic())
            for node in sorted(self._known - {self.node}):
                if node in self.dead:
                    continue
                lease_gone = node not in self.view.nodes and self.loaded.is_set() and self.etcd_ok
                if lease_gone and not self._cut_off_but_serving(node):
                    heard = self.beats is not None and node in self.beats.peers
                    why = "heartbeats missed and its lease expired" if heard else "lease expired"
                    self._confirm_dead(node, why)
                    continue
                if not (self.beats is not None and self.beats.is_suspect(node)):
                    self._probe_failures.pop(node, None)
                    continue
                url = str((self.view.nodes.get(node) or {}).get("admin", ""))
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
            self._update_peer_gauges()

    def _forget_old(self, now: float) -> None:
        """What is kept per peer and per epoch must not grow for ever: a node dead for
        FORGET_AFTER and gone from etcd is forgotten, and only current epochs are timed."""
        for node, since in list(self.dead.items()):
            if now - since > FORGET_AFTER and node not in self.view.nodes:
                del self.dead[node]
                self._known.discard(node)
                self._probe_failures.pop(node, None)
                if self.beats is not None:
                    self.beats.forget(node)
        current = {(name, rec.epoch) for name, rec in self.view.slots.items()}
        for key in [k for k in self._first_seen if k not in current]:
            del self._first_seen[key]

    async def _probe(self, url: str) -> bool:
        try:
            with anyio.fail_after(self.cl.probe_timeout):
                async with self.session.get(url + "/status") as r:
                    return r.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def _confirm_dead(self, node: str, why: str) -> None:
        self.dead[node] = time.monotonic()
        last = self.beats.peers[node].last_at if self.beats and node in self.beats.peers else 0
        if last:
            self.metrics.node_loss_seconds.observe(time.monotonic() - last)
        self.log.warning(
            "peer confirmed dead",
            peer=node,
            why=why,
            silent_s=round(time.monotonic() - last, 3) if last else None,
        )
        gone = [eid for eid, e in self.view.engines.items() if e.get("node") == node]
        self.on_peer_dead(gone)
        self._kick()

    def _revive(self, node: str) -> None:
        if self.dead.pop(node, None) is not None:
            self.log.info("peer back", peer=node)
            self._kick()

    def _update_peer_gauges(self) -> None:
        counts = {"alive": 0, "suspect": 0, "dead": 0}
        for node in set(self.view.nodes) | set(self.dead):
            if node != self.node:
                counts[self.peer_state(node) if node in self.view.nodes else "dead"] += 1
        for state, n in counts.items():
            self.metrics.cluster_peers.labels(state).set(n)

    # -- membership: lease, registration, watch --------------------------------------------
    def _records(self) -> dict[bytes, bytes]:
        adv = self.cl.advertise_host
        out = {
            self.key("nodes", self.node): orjson.dumps({"admin": self.advertised_admin()}),
        }
        for ctl in self.controllers.values():
            for e in ctl.engines.values():
                if e.state is EngineState.STOPPED:
                    continue
                out[self.key("engines", e.id)] = orjson.dumps(
                    {
                        "node": self.node,
                        "slot": e.slot,
                        "model": ctl.slot.model,
                        "backend": e.backend,
                        "role": e.role,
                        "state": e.state.value,
                        "url": f"http://{adv}:{e.spec.port}",
                        "unit": e.unit,
                        "rank": ctl.scfg.group_rank,
                        "group_size": ctl.scfg.group_size,
                        "serves": ctl.scfg.serve_requests,
                    }
                )
        return out

    def _beat(self) -> dict[str, Any]:
        # A beat says "alive" and nothing else: engines' states travel through etcd.
        return {"admin": self.advertised_admin()}

    async def _lease_loop(self) -> None:
        while True:
            try:
                sent = time.monotonic()
                self.lease = await self.etcd.grant(self.cl.lease_ttl)
                self.last_renewed = sent
                await self._register()
            except EtcdError as e:
                self._etcd_down(str(e))
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
                    self._etcd_down(str(e))
                    continue  # the lease may live yet; if not, the grant above comes back
                lost_at = None
                self._etcd_up()
                if self.demoted:
                    await self._serve_again()

    async def _fence_loop(self) -> None:
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
            self._kick()

    async def _serve_again(self) -> None:
        """After a demotion: read the slots afresh from etcd (a quorum read), step down
        where another unit took a slot meanwhile, then serve again."""
        try:
            kvs, _ = await self.etcd.get_prefix(self.key("slots", ""))
        except EtcdError as e:
            self.log.warning("still demoted: cannot read the slots yet", error=str(e))
            return
        for kv in kvs:
            self._bad_key(
                self.view.apply(kv.key[len(self.root) :].decode(errors="replace"), kv, False)
            )
        for name, ctl in self.controllers.items():
            rec = self.view.slots.get(name)
            active = ctl.active_engine()
            if active is not None and rec is not None and rec.active not in (None, active.unit):
                await ctl.step_down(rec.epoch, rec.active)
        self.demoted = False
        self.log.info("serving again: etcd confirmed this node's slots")
        self.on_demote(False)
        self._kick()

    def _etcd_down(self, why: str) -> None:
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
        ek = self.key("election", self.node)
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

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if not self.lease:
                continue
            try:
                await self._publish()
                await self._publish_pause()
                await self._flush_pending()
            except LeaseExpired:
                pass  # the lease loop re-registers
            except EtcdError as e:
                self._etcd_down(str(e))
                self._dirty.set()
                await anyio.sleep(0.2)

    async def _flush_pending(self) -> None:
        """Record claims made while etcd was unreachable, each conditioned on the slot's
        record being what it was before them: if another node took the slot meanwhile
        (the leader promoted it elsewhere), our claim loses, whatever its epoch, and the
        reconcile loop steps our engine down."""
        for slot, new in list(self._pending.items()):
            base = self._pending_base.get(slot)
            ok = await self._write_slot(slot, base, new)
            if ok is None:
                return  # still unreachable: the next flush tries again
            if ok:
                ctl = self.controllers.get(slot)
                if ctl is not None:
                    ctl.slot.epoch = new.epoch
            elif (rec := await self._read_slot(slot)) is not None and rec.active == new.active:
                # A claim whose answer timed out may have been written after all.
                self.log.info("our promotion during the etcd outage is recorded", slot=slot)
            else:
                self.log.warning(
                    "our promotion during the etcd outage lost: the slot moved on",
                    slot=slot,
                    ours=new.active,
                    cluster=rec.active if rec else None,
                    epoch=rec.epoch if rec else None,
                )
            self._pending.pop(slot, None)
            self._pending_base.pop(slot, None)
        self._kick()

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
            except WatchCompacted:
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

    # -- decisions -------------------------------------------------------------------------
    @property
    def leader(self) -> str | None:
        # A leader confirmed dead is passed over at once instead of waiting for its lease
        # to expire; if it was only partitioned, the fencing transaction still stops it.
        return self.view.leader(excluding=self.dead)

    @property
    def is_leader(self) -> bool:
        return self.etcd_ok and self.leader == self.node

    async def _decide_loop(self, tg: Any) -> None:
        while True:
            with anyio.move_on_after(self.cl.heartbeat_interval):
                await self._changed.wait()
            self.metrics.cluster_leader.set(1 if self.is_leader else 0)
            self._reconcile(tg)
            if self.is_leader:
                for slot in sorted(self._slots()):
                    if slot not in self._acting:
                        await self._lead(slot)

    def _slots(self) -> set[str]:
        return set(self.view.slots) | {str(e.get("slot")) for e in self.view.engines.values()}

    def _say(self, slot: str, decision: str, **kw: Any) -> None:
        """Log a leader decision once per change (the loop runs several times a second)."""
        if self._said.get(slot) != decision:
            self._said[slot] = decision
            self.log.info("leader: " + decision, slot=slot, **kw)

    async def _lead(self, slot: str) -> None:
        rec = self.view.slots.get(slot)
        if rec is not None and rec.active is not None:
            if self._unit_serving(slot, rec.active):
                self._say(slot, "serving", active=rec.active, epoch=rec.epoch)
                return
            members = self.view.unit_members(slot, rec.active)
            grouped = bool(members) and int(members[0].get("group_size", 1)) > 1
            owners = {str(m.get("node")) for m in members} | set(rec.nodes)
            owner_dead = any(self.peer_state(n) == "dead" for n in owners)
            failed = any(m.get("state") == EngineState.FAILED.value for m in members)
            in_progress = any(
                m.get("state") in (EngineState.SLEEPING.value, EngineState.WAKING.value)
                for m in members
            )
            seen = self._first_seen.setdefault((slot, rec.epoch), time.monotonic())
            waking = in_progress and not failed and not owner_dead
            if waking and time.monotonic() - seen < self.cfg.failover.wake_timeout:
                self._say(slot, "waiting for the chosen unit to wake", unit=rec.active)
                return
            paused = sorted(n for n in owners if self.view.is_paused(n, slot, time.time()))
            if paused:
                self._say(slot, "not moving the slot: its node is paused", nodes=paused)
                return
            if not grouped and not owner_dead:
                # The owner fails over to its own shadows; it hands over by clearing active.
                self._say(slot, "owner handles its own failover", owner=sorted(owners))
                return
            why = (
                f"{rec.active} on dead node(s) {sorted(owners)}"
                if owner_dead
                else f"group {rec.active} lost a member"
            )
        elif rec is not None:
            why = f"{rec.by} asked for a shadow elsewhere ({rec.reason})"
        else:
            # Never claimed. Single engines are claimed by their node; a group by the leader
            # once all its members are up.
            unit = self._complete_unit(slot, EngineState.ACTIVE)
            if unit is None:
                return
            await self._promote(slot, None, unit, "group started: every member is up")
            return
        unit = self._complete_unit(slot, EngineState.SLEEPING, exclude=rec.active)
        if unit is None:
            self._say(slot, "cannot fail over: no sleeping shadow on a live node", why=why)
            return
        await self._promote(slot, rec, unit, why)

    def _complete_unit(
        self, slot: str, state: EngineState, exclude: str | None = None
    ) -> str | None:
        """A unit of ``slot`` whose members are all in ``state`` on live nodes; the least
        busy node first."""
        units: dict[str, list[dict[str, Any]]] = {}
        for e in self.view.engines.values():
            if e.get("slot") == slot and e.get("unit") != exclude:
                units.setdefault(str(e.get("unit")), []).append(e)
        busy: dict[str, int] = {}
        for e in self.view.engines.values():
            if e.get("state") == EngineState.ACTIVE.value:
                busy[str(e.get("node"))] = busy.get(str(e.get("node")), 0) + 1
        ok = [
            (sum(busy.get(str(m.get("node")), 0) for m in ms), u)
            for u, ms in units.items()
            if len(ms) >= int(ms[0].get("group_size", 1))
            and all(
                m.get("state") == state.value
                and self.peer_state(str(m.get("node"))) in ("self", "alive")
                for m in ms
            )
        ]
        return min(ok)[1] if ok else None

    async def _promote(self, slot: str, rec: SlotRecord | None, unit: str, why: str) -> None:
        members = self.view.unit_members(slot, unit)
        new = SlotRecord(
            (rec.epoch if rec else 0) + 1,
            unit,
            sorted({str(m.get("node")) for m in members}),
            self.node,
            why,
        )
        self.log.info(
            "leader: promoting", slot=slot, unit=unit, nodes=new.nodes, epoch=new.epoch, why=why
        )
        ok = await self._write_slot(slot, rec, new, leader_check=True)
        if ok:
            self._said.pop(slot, None)
        elif ok is False:
            self.metrics.cluster_promotions.labels(slot, "fenced").inc()
            self.log.warning("leader: promotion fenced (the slot changed first)", slot=slot)
            await self._read_slot(slot)

    def _reconcile(self, tg: Any) -> None:
        """Follow the cluster's word on our slots: wake what it chose here, step down where
        it chose someone else."""
        for name, ctl in self.controllers.items():
            rec = self.view.slots.get(name)
            if rec is None or rec.active is None or name in self._acting:
                continue
            ours = [e for e in ctl.engines.values() if e.unit == rec.active]
            active = ctl.active_engine()
            if active is not None and active.unit != rec.active:
                if name in self._pending:
                    continue  # our own claim, not yet recorded
                # etcd names another unit: step down, whatever epoch we hold (one restored
                # from the state file may be higher than etcd's without being real).
                self._acting.add(name)
                tg.start_soon(self._act, name, ctl.step_down(rec.epoch, rec.active))
                continue
            if rec.epoch < ctl.slot.epoch:
                continue
            sleeping = [e for e in ours if e.state is EngineState.SLEEPING]
            if sleeping and active is None:
                self._acting.add(name)
                tg.start_soon(
                    self._act, name, ctl.promote_assigned(sleeping[0].id, rec.epoch, rec.reason)
                )
            elif rec.epoch > ctl.slot.epoch and active is not None and active.unit == rec.active:
                ctl.slot.epoch = rec.epoch  # e.g. the leader claimed our started group
                ctl._update_gauges()

    async def _act(self, slot: str, action: Any) -> None:
        try:
            await action
        finally:
            self._acting.discard(slot)
            self._kick()

    def remote_targets(self, model: str) -> list[dict[str, Any]]:
        """Engines on other nodes that serve ``model`` now: each slot's chosen unit (its
        rank-0 member for a group), active, on a node not known dead."""
        out = []
        for slot, rec in self.view.slots.items():
            if rec.active is None:
                continue
            for eid, e in self.view.engines.items():
                if (
                    e.get("unit") == rec.active
                    and e.get("slot") == slot
                    and e.get("model") == model
                    and e.get("node") != self.node
                    and int(e.get("rank", 0)) == 0
                    and e.get("serves", True)
                    and e.get("state") == EngineState.ACTIVE.value
                    and self.peer_state(str(e.get("node"))) != "dead"
                ):
                    out.append({"id": eid, **e})
        return out

    def models(self) -> set[str]:
        return {str(e.get("model")) for e in self.view.engines.values()}

    def chosen(self, slot: str) -> str | None:
        rec = self.view.slots.get(slot)
        return rec.active if rec else None

    async def hand_over(self, slot: str, reason: str) -> None:
        """The owner has no shadow left: clear the slot's active so the leader promotes a
        shadow on another node."""
        rec = self.view.slots.get(slot)
        ctl = self.controllers.get(slot)
        if rec is None or ctl is None:
            return
        if rec.active is not None and rec.active not in {e.unit for e in ctl.engines.values()}:
            return  # not ours to hand over
        new = SlotRecord(rec.epoch, None, [], self.node, reason)
        self.log.info("no shadow left here: handing the slot to the cluster", slot=slot)
        await self._write_slot(slot, rec, new)

    # -- service -------------------------------------------------------------------------
    async def run(self) -> None:
        self.metrics.cluster_info.labels(self.cl.name, "yes" if self.beats else "no").set(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_loop)
            tg.start_soon(self._watch_guard)
            tg.start_soon(self._lease_loop)
            tg.start_soon(self._publish_loop)
            tg.start_soon(self._probe_loop)
            tg.start_soon(self._decide_loop, tg)
            if self.cl.etcd_unreachable == "demote":
                tg.start_soon(self._fence_loop)
            if self.beats is not None:
                tg.start_soon(self.beats.run)
                tg.start_soon(self._nats_gauge)

    async def _nats_gauge(self) -> None:
        assert self.beats is not None
        while True:
            self.metrics.nats_connected.set(1 if self.beats.connected else 0)
            for node in list(self.dead):
                if self.beats.heard_recently(node):
                    self._revive(node)
            await anyio.sleep(0.5)

    async def leave(self) -> None:
        """On shutdown: drop our keys at once (revoking the lease) so peers need not wait."""
        if self.lease:
            with anyio.move_on_after(1):
                await self.etcd.revoke(self.lease)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.cl.name,
            "leader": self.leader,
            "is_leader": self.is_leader,
            "etcd_reachable": self.etcd_ok,
            "nats_connected": self.beats.connected if self.beats else None,
            "lease": f"{self.lease:x}" if self.lease else None,
            "peers": {
                n: self.peer_state(n)
                for n in sorted(set(self.view.nodes) | set(self.dead))
                if n != self.node
            },
            "slots": {
                s: {"epoch": r.epoch, "active": r.active, "by": r.by, "reason": r.reason}
                for s, r in sorted(self.view.slots.items())
            },
            "pending_claims": sorted(self._pending),
            "policy": self.cl.etcd_unreachable,
            "demoted": self.demoted,
            "paused": dict(self.view.paused),
        }


__all__ = ["ClusterCoordinator", "ClusterView", "SlotRecord", "delete_op"]
