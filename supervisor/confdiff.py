"""What a config reload changes: every key that differs between two configs, with its effect.

Pure functions, no I/O. Three effects:

- ``applied``: takes effect at once on reload (health, failover, most frontend settings,
  the admin token, ``on_exit``).
- ``rollout``: a slot's engine spec (model, args, env, shadow count, ...). The running
  engines are never restarted behind the user's back: the slot is marked, and
  ``failover-supervisor rollout SLOT`` (``POST /rollout``) moves it to the new spec.
- ``restart``: needs the daemon restarted (listening addresses, the node's name and state
  directory, GPU and cluster settings, slots added, removed, or moved between nodes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.config import Config, SlotConfig

APPLIED, ROLLOUT, RESTART = "applied", "rollout", "restart"

# Settings fixed when a listener or a connection pool is built, or that name the node.
_RESTART_KEYS = {
    "node",
    "state_dir",
    "admin_host",
    "admin_port",
    "engine_host",
    "frontend.enabled",
    "frontend.host",
    "frontend.port",
    "frontend.max_inflight_per_engine",  # the relay's connection pool is sized by it
    "frontend.max_body_bytes",
    "frontend.max_connections",
    "frontend.header_timeout",
    "frontend.keepalive_timeout",
}
_RESTART_TABLES = ("gpu", "cluster")
# A slot's place in a cluster is part of what the cluster agreed on: restart.
_RESTART_SLOT_KEYS = ("hosts", "group_size", "group_rank")


@dataclass(frozen=True)
class Change:
    key: str  # e.g. "health.stall_timeout", "slot[s1].extra_args"
    old: Any
    new: Any
    effect: str  # applied | rollout | restart

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "old": _plain(self.old),
            "new": _plain(self.new),
            "effect": self.effect,
        }

    def line(self) -> str:
        return f"{self.effect:8} {self.key}: {_plain(self.old)!r} -> {_plain(self.new)!r}"


def _plain(v: Any) -> Any:
    """A value as JSON shows it (tuples as lists, paths as strings)."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def slot_changes(old: SlotConfig, new: SlotConfig) -> list[str]:
    """The spec keys of a slot that differ."""
    return [
        f.name
        for f in dataclasses.fields(SlotConfig)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def diff(old: Config, new: Config) -> list[Change]:
    out: list[Change] = []
    for f in dataclasses.fields(Config):
        if f.name == "slots":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            for g in dataclasses.fields(a):
                key = f"{f.name}.{g.name}"
                x, y = getattr(a, g.name), getattr(b, g.name)
                if x != y:
                    restart = f.name in _RESTART_TABLES or key in _RESTART_KEYS
                    out.append(Change(key, x, y, RESTART if restart else APPLIED))
        elif a != b:
            out.append(Change(f.name, a, b, RESTART if f.name in _RESTART_KEYS else APPLIED))
    before = {s.name: s for s in old.slots}
    after = {s.name: s for s in new.slots}
    for name in before.keys() - after.keys():
        out.append(Change(f"slot[{name}]", "present", "removed", RESTART))
    for name in after.keys() - before.keys():
        out.append(Change(f"slot[{name}]", "absent", "added", RESTART))
    for name in before.keys() & after.keys():
        for key in slot_changes(before[name], after[name]):
            effect = RESTART if key in _RESTART_SLOT_KEYS else ROLLOUT
            x, y = getattr(before[name], key), getattr(after[name], key)
            out.append(Change(f"slot[{name}].{key}", x, y, effect))
    return sorted(out, key=lambda c: c.key)


def applied(old: Config, new: Config) -> Config:
    """``old`` with what a reload applies at once taken from ``new``; everything that needs
    a rollout or a restart stays as it runs."""
    changes = {c.key: c for c in diff(old, new) if c.effect == APPLIED}
    tables: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name == "slots":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            keep = {
                g.name: getattr(b if f"{f.name}.{g.name}" in changes else a, g.name)
                for g in dataclasses.fields(a)
            }
            tables[f.name] = dataclasses.replace(a, **keep)  # type: ignore[type-var]
        elif f.name in changes:
            tables[f.name] = b
    return dataclasses.replace(old, **tables)


def slot_specs(old: Config, new: Config) -> dict[str, tuple[SlotConfig, list[str]]]:
    """Per slot of both configs whose spec differs: the new spec and the keys that need a
    rollout (none of the restart-only keys)."""
    before = {s.name: s for s in old.slots}
    out = {}
    for s in new.slots:
        if s.name in before:
            keys = [k for k in slot_changes(before[s.name], s) if k not in _RESTART_SLOT_KEYS]
            if keys:
                keep = {k: getattr(before[s.name], k) for k in _RESTART_SLOT_KEYS}
                out[s.name] = (dataclasses.replace(s, **keep), keys)
    return out
