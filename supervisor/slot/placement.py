"""Where a slot's next engine goes: its port, its GPUs, the spec it launches from.

Pure functions of the slot's config and the places its engines hold (no I/O), so that
placement is unit-tested without a process: see tests/unit/test_placement.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import SlotConfig
from supervisor.flocklease import FLOCK, LOCK_ENV
from supervisor.model import EngineSpec, Role

GpuSet = tuple[str, ...]


class FailoverError(RuntimeError):
    """A slot action that cannot be done now; its message says why (and reaches the API)."""


@dataclass(frozen=True)
class Held:
    """The places engines of the slot hold: an engine's port and GPUs stay taken until its
    process group is gone, whatever its state says."""

    ports: frozenset[int]
    gpu_sets: tuple[GpuSet, ...]


def held(places: Iterable[tuple[int, GpuSet]]) -> Held:
    """``places``: (port, gpus) of every engine still running or not yet ended."""
    listed = list(places)
    return Held(frozenset(p for p, _ in listed), tuple(g for _, g in listed))


def gpu_sets(scfg: SlotConfig) -> list[GpuSet]:
    """The GPU sets engines of the slot may run on: paired, one set shared by all;
    pooled, the active's set first, then one per shadow."""
    if scfg.placement == "paired":
        return [scfg.gpus]
    return [scfg.gpus, *scfg.shadow_gpus]


def slot_ports(*specs: SlotConfig) -> list[int]:
    """Every port of the slot's range under each spec (during a rollout the old spec's
    count too: its engines still hold some)."""
    return sorted({p for c in specs for p in range(c.base_port, c.base_port + c.shadows + 1)})


def free_port(taken: Held, *specs: SlotConfig) -> int | None:
    return next((p for p in slot_ports(*specs) if p not in taken.ports), None)


def choose_gpus(scfg: SlotConfig, role: Role, taken: Held, broken: Callable[[str], bool]) -> GpuSet:
    """The GPUs a new engine of ``role`` runs on; FailoverError when there are none."""
    sets = gpu_sets(scfg)
    if role == "shadow":  # pooled: shadows prefer shadow_gpus, the active its gpus
        sets = [*sets[1:], *sets[:1]]
    healthy = [g for g in sets if not any(broken(x) for x in g)]
    if not healthy:
        raise FailoverError(
            "every GPU of the slot is marked broken; not launching "
            "engines there (clear it with POST /gpu/clear once reset)"
        )
    if scfg.placement == "paired":
        return healthy[0]
    free = [g for g in healthy if g not in taken.gpu_sets]
    if not free:
        raise FailoverError("no free healthy GPU set for a new engine")
    return free[0]


def group_of(scfg: SlotConfig, port: int) -> str:
    """A multi-node group's id: members of one group share their lane, the same offset in
    each node's port range. "" for a slot of one node."""
    if scfg.group_size <= 1:
        return ""
    return f"{scfg.name}:lane{port - scfg.base_port}"


def engine_spec(
    scfg: SlotConfig,
    engine_id: str,
    role: Role,
    port: int,
    gpus: GpuSet,
    *,
    host: str,
    lock_path: Path,
) -> EngineSpec:
    """How the slot launches an engine of ``role`` on ``port`` and ``gpus``."""
    extra = scfg.extra_args + (scfg.shadow_extra_args if role == "shadow" else ())
    return EngineSpec(
        engine_id=engine_id,
        model=scfg.model,
        port=port,
        host=host,
        served_model_name=scfg.served_model_name,
        role=role,
        gpus=gpus,
        extra_args=extra,
        env=dict(scfg.env) | ({LOCK_ENV: str(lock_path)} if scfg.suspend == FLOCK else {}),
        options={"suspend": scfg.suspend},
    )


def next_number(engine_ids: Iterable[str]) -> int:
    """The number the next engine id takes: past every ``<slot>-<n>`` already in use."""
    numbers = [int(tail) for e in engine_ids if (tail := e.rsplit("-", 1)[-1]).isdigit()]
    return max(numbers, default=-1) + 1
