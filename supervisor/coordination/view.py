"""This node's copy of the cluster's keys in etcd (pure data, no I/O)."""

from __future__ import annotations

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
