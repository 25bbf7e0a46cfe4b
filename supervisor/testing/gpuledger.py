"""Simulated GPU memory, shared by every simulated engine on this machine.

A JSON file guarded by ``flock`` records, per GPU, its capacity and who holds how much. An
allocation belongs to a set of processes (an engine's API server and its worker): it stays
held until *all* of them are gone, as GPU memory does on real hardware when a process tree is
killed leader-first. Allocating beyond capacity raises :class:`SimulatedOOM`, whose message
reads like CUDA's.

Process identity is (pid, start time) so a reused pid never keeps dead memory alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.procfs import read_stat

GIB = 1024**3
DEFAULT_CAPACITY_GIB = 80.0
LEDGER_ENV = "FAILOVER_SIM_LEDGER"


class SimulatedOOM(RuntimeError):
    """Raised when an allocation does not fit: the simulator's CUDA out-of-memory error."""


def default_ledger_path() -> Path:
    env = os.environ.get(LEDGER_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"failover-sim-gpus-{os.getuid()}.json"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it does not exist."""
    st = read_stat(pid)
    return None if st is None or st.gone else st.start_time  # a zombie holds no memory


def process_ref(pid: int) -> list[int]:
    start = process_start_time(pid)
    if start is None:
        raise ProcessLookupError(pid)
    return [pid, start]


def _alive(ref: Sequence[int]) -> bool:
    return process_start_time(ref[0]) == ref[1]


@dataclass(frozen=True)
class GpuUsage:
    gpu: str
    capacity: int
    used: int

    @property
    def free(self) -> int:
        return self.capacity - self.used


class GpuLedger:
    """The ledger file. Every method takes the lock, so calls are atomic across processes."""

    def __init__(self, path: Path | None = None, capacity_gib: float = DEFAULT_CAPACITY_GIB):
        self.path = path or default_ledger_path()
        self.capacity = int(capacity_gib * GIB)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    data = json.loads(self.path.read_text() or "{}")
                except (FileNotFoundError, json.JSONDecodeError):
                    data = {}
                data.setdefault("gpus", {})
                data.setdefault("allocations", [])
                # Reap allocations whose processes are all gone.
                data["allocations"] = [
                    a for a in data["allocations"] if any(_alive(r) for r in a["procs"])
                ]
                yield data
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _capacity(self, data: dict[str, Any], gpu: str) -> int:
        return int(data["gpus"].setdefault(gpu, {"capacity": self.capacity})["capacity"])

    def allocate(
        self, owner: str, tag: str, gpus: Sequence[str], nbytes: int, procs: Sequence[list[int]]
    ) -> None:
        """Hold ``nbytes`` on each of ``gpus`` for ``owner``/``tag`` or raise SimulatedOOM."""
        with self._locked() as data:
            allocs = data["allocations"]
            allocs[:] = [a for a in allocs if not (a["owner"] == owner and a["tag"] == tag)]
            for gpu in gpus:
                cap = self._capacity(data, gpu)
                used = sum(a["bytes"] for a in allocs if a["gpu"] == gpu)
                if used + nbytes > cap:
                    raise SimulatedOOM(
                        f"CUDA out of memory. Tried to allocate {nbytes / GIB:.2f} GiB. "
                        f"GPU {gpu} has a total capacity of {cap / GIB:.2f} GiB of which "
                        f"{(cap - used) / GIB:.2f} GiB is free."
                    )
            for gpu in gpus:
                allocs.append(
                    {"owner": owner, "tag": tag, "gpu": gpu, "bytes": nbytes, "procs": list(procs)}
                )

    def free(self, owner: str, tag: str | None = None) -> None:
        with self._locked() as data:
            data["allocations"] = [
                a
                for a in data["allocations"]
                if not (a["owner"] == owner and (tag is None or a["tag"] == tag))
            ]

    def add_process(self, owner: str, proc: list[int]) -> None:
        """Record another process (e.g. a worker) as holding ``owner``'s memory."""
        with self._locked() as data:
            for a in data["allocations"]:
                if a["owner"] == owner and proc not in a["procs"]:
                    a["procs"].append(proc)

    def usage(self) -> dict[str, GpuUsage]:
        with self._locked() as data:
            gpus = set(data["gpus"]) | {a["gpu"] for a in data["allocations"]}
            return {
                g: GpuUsage(
                    g,
                    self._capacity(data, g),
                    sum(a["bytes"] for a in data["allocations"] if a["gpu"] == g),
                )
                for g in sorted(gpus)
            }

    def held_by(self, owner: str) -> dict[str, int]:
        """Bytes per tag that ``owner`` still holds (summed over its GPUs)."""
        with self._locked() as data:
            out: dict[str, int] = {}
            for a in data["allocations"]:
                if a["owner"] == owner:
                    out[a["tag"]] = out.get(a["tag"], 0) + a["bytes"]
            return out
