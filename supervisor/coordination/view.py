"""This node's copy of the cluster's keys in etcd (pure data, no I/O)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import orjson

from supervisor.coordination.etcd import KeyValue


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


ACTIVE = "active"  # EngineState.ACTIVE's value (model.py imports nothing from here)


@dataclass
class ClusterView:
    """This node's copy of the cluster's keys, kept current by one etcd watch.

    Besides the tables it keeps indexes, updated by each change for the keys it touches
    only, so that what runs per request or per event costs the same in a cluster of three
    nodes as in one of a thousand: the engines of each slot and of each node, the slots
    whose record names each node, each model's serving engines (the chosen unit's rank-0
    member, active, serving requests), and the slots touched since the leader last looked.
    Change the tables through :meth:`apply`, :meth:`set_slot` and :meth:`drop_slot` only.
    """

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    election: dict[str, int] = field(default_factory=dict)  # node -> create revision
    candidates: list[tuple[int, str]] = field(default_factory=list)  # (create rev, node), sorted
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> its pauses
    revision: int = 0
    by_slot: dict[str, set[str]] = field(default_factory=dict)  # slot -> engine ids
    by_node: dict[str, set[str]] = field(default_factory=dict)  # node -> engine ids
    named: dict[str, set[str]] = field(default_factory=dict)  # node -> slots naming it
    models: dict[str, int] = field(default_factory=dict)  # model -> engines of it
    serving: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # model -> id
    active_on: dict[str, int] = field(default_factory=dict)  # node -> its active engines
    # What changed since the leader last looked: slots, and nodes (whose slots it re-reads).
    touched_slots: set[str] = field(default_factory=set)
    touched_nodes: set[str] = field(default_factory=set)
    all_touched: bool = True  # a fresh view: every slot is new to the leader
    membership: int = 0  # counts nodes joining and leaving (not their keys' updates)

    def apply(self, rel: str, kv: KeyValue, deleted: bool) -> str | None:
        """Take one key's change into the view. A value that does not parse (another
        program's key under our prefix, a half-written one) is left out and the reason
        returned: one bad key must not stop every node."""
        kind, _, name = rel.partition("/")
        if kind == "slots":
            if deleted:
                self.drop_slot(name)
                return None
            held = self.slots.get(name)
            if held is not None and held.mod_revision > kv.mod_revision:
                return None  # older than what we hold (our own write, read back first)
            try:
                rec = SlotRecord.parse(kv)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                self.drop_slot(name)
                return f"{rel}: {e}"
            self.set_slot(name, rec)
            return None
        if kind == "engines":
            value: Any = None
            problem = None
            if not deleted:
                try:
                    value = _object(kv.value)
                except (ValueError, TypeError) as e:
                    problem = f"{rel}: {e}"
            self._set_engine(name, value)
            return problem
        if kind == "election":
            old_rev = self.election.pop(name, None)
            if old_rev is not None:
                self.candidates.remove((old_rev, name))
            if not deleted:
                self.election[name] = kv.create_revision
                bisect.insort(self.candidates, (kv.create_revision, name))
            self.all_touched = True  # the leader may be another node now
            return None
        table = {"nodes": self.nodes, "paused": self.paused}.get(kind)
        if table is None:
            return None
        self.touched_nodes.add(name)
        had = name in table
        problem = None
        if deleted:
            table.pop(name, None)
        else:
            try:
                table[name] = _object(kv.value)
            except (ValueError, TypeError) as e:
                table.pop(name, None)
                problem = f"{rel}: {e}"
        if kind == "nodes" and had != (name in table):
            self.membership += 1
        return problem

    def set_slot(self, name: str, rec: SlotRecord) -> None:
        """The slot's record is ``rec`` now (read, watched, or our own write)."""
        old = self.slots.get(name)
        if old is not None:
            for n in old.nodes:
                _discard(self.named, n, name)
        self.slots[name] = rec
        for n in rec.nodes:
            self.named.setdefault(n, set()).add(name)
        self._reindex_slot(name)

    def drop_slot(self, name: str) -> None:
        old = self.slots.pop(name, None)
        if old is not None:
            for n in old.nodes:
                _discard(self.named, n, name)
        self._reindex_slot(name)

    def _set_engine(self, eid: str, e: dict[str, Any] | None) -> None:
        old = self.engines.pop(eid, None)
        if old is not None:
            slot, node, model = str(old.get("slot")), str(old.get("node")), str(old.get("model"))
            _discard(self.by_slot, slot, eid)
            _discard(self.by_node, node, eid)
            self.models[model] -= 1
            if not self.models[model]:
                del self.models[model]
            if old.get("state") == ACTIVE:
                self.active_on[node] -= 1
                if not self.active_on[node]:
                    del self.active_on[node]
            _discard(self.serving, model, eid)
            self.touched_slots.add(slot)
        if e is None:
            return
        slot, node, model = str(e.get("slot")), str(e.get("node")), str(e.get("model"))
        self.engines[eid] = e
        self.by_slot.setdefault(slot, set()).add(eid)
        self.by_node.setdefault(node, set()).add(eid)
        self.models[model] = self.models.get(model, 0) + 1
        if e.get("state") == ACTIVE:
            self.active_on[node] = self.active_on.get(node, 0) + 1
        if self._serves(slot, e):
            self.serving.setdefault(model, {})[eid] = e
        self.touched_slots.add(slot)

    def _serves(self, slot: str, e: dict[str, Any]) -> bool:
        rec = self.slots.get(slot)
        return (
            rec is not None
            and rec.active is not None
            and e.get("unit") == rec.active
            and int(e.get("rank", 0)) == 0
            and bool(e.get("serves", True))
            and e.get("state") == ACTIVE
        )

    def _reindex_slot(self, slot: str) -> None:
        """The slot's record changed: which of its engines serve (its engines only)."""
        for eid in self.by_slot.get(slot, ()):
            e = self.engines[eid]
            model = str(e.get("model"))
            if self._serves(slot, e):
                self.serving.setdefault(model, {})[eid] = e
            else:
                _discard(self.serving, model, eid)
        self.touched_slots.add(slot)

    def slots_of(self, node: str) -> set[str]:
        """The slots a node has engines in or is named by."""
        out = {str(self.engines[eid].get("slot")) for eid in self.by_node.get(node, ())}
        return out | self.named.get(node, set())

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
        for _, node in self.candidates:
            if node not in excluding:
                return node
        return None

    def slot_engines(self, slot: str) -> list[dict[str, Any]]:
        return [self.engines[eid] for eid in self.by_slot.get(slot, ())]

    def unit_members(self, slot: str, unit: str) -> list[dict[str, Any]]:
        return [e for e in self.slot_engines(slot) if e.get("unit") == unit]


def _object(raw: bytes) -> dict[str, Any]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object was expected, got {type(value).__name__}")
    return value


def _discard(index: dict[str, Any], key: str, member: str) -> None:
    """Take ``member`` out of ``index[key]`` (a set or a dict), and the key once empty."""
    held = index.get(key)
    if held is None:
        return
    if isinstance(held, set):
        held.discard(member)
    else:
        held.pop(member, None)
    if not held:
        del index[key]
