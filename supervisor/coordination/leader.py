"""The leader's decisions: the lowest election key leads; it promotes across nodes when
a slot's owner is dead (not merely silent: its lease is gone), when the owner handed the
slot over, and always for groups. It leaves a paused node's slots alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from supervisor.coordination.context import ClusterContext
from supervisor.coordination.view import SlotRecord
from supervisor.model import EngineState

# A promotion decided in a pass: the slot, its record as seen, the unit, why.
Promotion = tuple[str, SlotRecord | None, str, str]
# The longest the leader works through slots before letting the loop run other tasks.
LEAD_SLICE = 0.005
# How often a slot left alone for its node's pause is looked at again (the pause may end).
PAUSE_RECHECK = 1.0
# Promotions the leader has in flight at once (a lost node's slots, each its own key).
PROMOTIONS_AT_ONCE = 16
# The most promotions of one pass written in one transaction (etcd's --max-txn-ops is 128
# by default; each takes a compare and a put, plus the leader's two compares).
PROMOTIONS_PER_TXN = 32


class SlotWrites(Protocol):
    """The slot records as the leader reads and writes them (fencing's)."""

    acting: set[str]  # slots with an action under way: left alone until it is over

    async def read_slot(self, slot: str) -> SlotRecord | None: ...

    async def write_slot(
        self, slot: str, seen: SlotRecord | None, new: SlotRecord, leader_check: bool = False
    ) -> bool | None: ...

    async def write_slots(
        self, writes: list[tuple[str, SlotRecord | None, SlotRecord]], leader_check: bool = False
    ) -> bool | None: ...


class Liveness(Protocol):
    """Who leads among the live nodes, and what lives (the peers')."""

    def leader(self) -> str | None: ...

    def peer_state(self, node: str) -> str: ...

    def unit_serving(self, slot: str, unit: str) -> bool: ...


class LeaderDecisions:
    """What the leader decides, slot by slot: each pass looks at the slots a change
    touched, and writes the promotions it decides together at its end.

    ``slots`` reads and writes the slot records, ``peers`` says who lives and leads,
    ``etcd_ok`` whether etcd answers this node (no leader without it)."""

    def __init__(
        self,
        ctx: ClusterContext,
        *,
        slots: SlotWrites,
        peers: Liveness,
        etcd_ok: Callable[[], bool],
    ) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.metrics = ctx.metrics
        self.node = ctx.node
        self.slots = slots
        self.peers = peers
        self.etcd_ok = etcd_ok
        self._first_seen: dict[tuple[str, int], float] = {}  # (slot, epoch) -> monotonic
        self._said: dict[str, str] = {}  # slot -> the leader's last logged decision
        self._promotions: tuple[list[Promotion], anyio.CapacityLimiter] | None = None  # a pass
        self._lead_later: set[str] = set()  # slots the leader skipped while they acted
        self._revisit: dict[str, float] = {}  # slot -> when the leader looks again (monotonic)

    @property
    def leader(self) -> str | None:
        return self.peers.leader()

    @property
    def is_leader(self) -> bool:
        return self.etcd_ok() and self.peers.leader() == self.node

    def to_look_at(self, everything: bool) -> set[str]:
        """The slots to decide on in this pass: those a change touched since the last one
        (a slot's key or its engines; a node's key, pause or liveness touches the slots
        its engines are in), those whose wait is due, and those skipped while an action
        ran. Every slot when leadership is new or the view was read afresh."""
        self._forget_old_epochs()
        view = self.ctx.view
        if everything or view.all_touched:
            todo = set(view.slots) | set(view.by_slot)
        else:
            todo = set(view.touched_slots)
            for node in view.touched_nodes:
                todo |= view.slots_of(node)
            now = time.monotonic()
            for slot in [s for s, due in self._revisit.items() if due <= now]:
                del self._revisit[slot]
                todo.add(slot)
            todo |= self._lead_later
        view.all_touched = False
        view.touched_slots.clear()
        view.touched_nodes.clear()
        self._lead_later.clear()
        return todo

    def _forget_old_epochs(self) -> None:
        """Only current epochs are timed (a walk over the few timed, not every slot)."""
        slots = self.ctx.view.slots
        for key in list(self._first_seen):
            rec = slots.get(key[0])
            if rec is None or rec.epoch != key[1]:
                del self._first_seen[key]

    async def lead_each(self, todo: set[str]) -> None:
        """Decide on each slot in ``todo``, yielding to the loop every few milliseconds so
        that keep-alives, beats and requests never wait on a long pass. The pass's
        promotions are written together at its end, up to PROMOTIONS_PER_TXN in one
        transaction: a lost node's slots move in one etcd round trip, one raft entry and
        one message on each node's watch, not one of each per slot."""
        began = time.perf_counter()
        limit = anyio.CapacityLimiter(PROMOTIONS_AT_ONCE)
        batch: list[Promotion] = []
        async with anyio.create_task_group() as tg:
            self._promotions = (batch, limit)
            try:
                for slot in sorted(todo):
                    if slot in self.slots.acting:
                        self._lead_later.add(slot)  # looked at again once the action is over
                    else:
                        await self._lead(slot)
                    if time.perf_counter() - began > LEAD_SLICE:
                        await anyio.lowlevel.checkpoint()
                        began = time.perf_counter()
                        if not self.is_leader:
                            break  # deposed meanwhile
            finally:
                self._promotions = None
                for i in range(0, len(batch), PROMOTIONS_PER_TXN):
                    tg.start_soon(self._promote_together, batch[i : i + PROMOTIONS_PER_TXN], limit)

    async def _promote_soon(self, slot: str, rec: SlotRecord | None, unit: str, why: str) -> None:
        """Promote with the pass's other promotions, at its end, or at once outside a pass."""
        if self._promotions is None:
            await self._promote(slot, rec, unit, why)
            return
        batch, _ = self._promotions
        self.slots.acting.add(slot)
        batch.append((slot, rec, unit, why))

    async def _promote_together(self, batch: list[Promotion], limit: anyio.CapacityLimiter) -> None:
        """One transaction for the batch; if any of its slots moved meanwhile (or this node
        no longer leads), each is tried alone, so that one fenced slot holds up no other."""
        try:
            async with limit:
                if len(batch) == 1:
                    await self._promote(*batch[0])
                    return
                writes = [
                    (slot, rec, self._record(slot, rec, unit, why))
                    for slot, rec, unit, why in batch
                ]
                ok = await self.slots.write_slots(writes, leader_check=True)
                if ok:
                    for slot, _, _, _ in batch:
                        self._said.pop(slot, None)
                elif ok is False:
                    self.log.info(
                        "leader: a batch of promotions was fenced; trying each alone",
                        slots=[p[0] for p in batch],
                    )
                    for p in batch:
                        await self._promote(*p)
        finally:
            for slot, _, _, _ in batch:
                self.slots.acting.discard(slot)
                self.ctx.view.touched_slots.add(slot)  # looked at again in the next pass

    def _say(self, slot: str, decision: str, **kw: Any) -> None:
        """Log a leader decision once per change (the loop runs several times a second)."""
        if self._said.get(slot) != decision:
            self._said[slot] = decision
            self.log.info("leader: " + decision, slot=slot, **kw)

    async def _lead(self, slot: str) -> None:
        rec = self.ctx.view.slots.get(slot)
        if rec is not None and rec.active is not None:
            if self.peers.unit_serving(slot, rec.active):
                self._say(slot, "serving", active=rec.active, epoch=rec.epoch)
                return
            members = self.ctx.view.unit_members(slot, rec.active)
            grouped = bool(members) and int(members[0].get("group_size", 1)) > 1
            owners = {str(m.get("node")) for m in members} | set(rec.nodes)
            owner_dead = any(self.peers.peer_state(n) == "dead" for n in owners)
            failed = any(m.get("state") == EngineState.FAILED.value for m in members)
            in_progress = any(
                m.get("state") in (EngineState.SLEEPING.value, EngineState.WAKING.value)
                for m in members
            )
            seen = self._first_seen.setdefault((slot, rec.epoch), time.monotonic())
            waking = in_progress and not failed and not owner_dead
            if waking and time.monotonic() - seen < self.ctx.cfg.failover.wake_timeout:
                self._revisit[slot] = seen + self.ctx.cfg.failover.wake_timeout
                self._say(slot, "waiting for the chosen unit to wake", unit=rec.active)
                return
            paused = sorted(n for n in owners if self.ctx.view.is_paused(n, slot, time.time()))
            if paused:
                # A pause ends by its own clock, not by a change in etcd: look again.
                self._revisit[slot] = time.monotonic() + PAUSE_RECHECK
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
            await self._promote_soon(slot, None, unit, "group started: every member is up")
            return
        unit = self._complete_unit(slot, EngineState.SLEEPING, exclude=rec.active)
        if unit is None:
            self._say(slot, "cannot fail over: no sleeping shadow on a live node", why=why)
            return
        await self._promote_soon(slot, rec, unit, why)

    def _complete_unit(
        self, slot: str, state: EngineState, exclude: str | None = None
    ) -> str | None:
        """A unit of ``slot`` whose members are all in ``state`` on live nodes; the least
        busy node first."""
        units: dict[str, list[dict[str, Any]]] = {}
        for e in self.ctx.view.slot_engines(slot):
            if e.get("unit") != exclude:
                units.setdefault(str(e.get("unit")), []).append(e)
        busy = self.ctx.view.active_on
        ok = [
            (sum(busy.get(str(m.get("node")), 0) for m in ms), u)
            for u, ms in units.items()
            if len(ms) >= int(ms[0].get("group_size", 1))
            and all(
                m.get("state") == state.value
                and self.peers.peer_state(str(m.get("node"))) in ("self", "alive")
                for m in ms
            )
        ]
        return min(ok)[1] if ok else None

    def _record(self, slot: str, rec: SlotRecord | None, unit: str, why: str) -> SlotRecord:
        """The slot's record once ``unit`` is promoted (the next epoch), said in the log."""
        members = self.ctx.view.unit_members(slot, unit)
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
        return new

    async def _promote(self, slot: str, rec: SlotRecord | None, unit: str, why: str) -> None:
        new = self._record(slot, rec, unit, why)
        ok = await self.slots.write_slot(slot, rec, new, leader_check=True)
        if ok:
            self._said.pop(slot, None)
        elif ok is False:
            self.metrics.cluster_promotions.labels(slot, "fenced").inc()
            self.log.warning("leader: promotion fenced (the slot changed first)", slot=slot)
            await self.slots.read_slot(slot)
