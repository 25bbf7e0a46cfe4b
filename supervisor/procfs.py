"""Reading processes from /proc: the one parser of ``/proc/<pid>/stat``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R, S, D, T, Z, X, ...
    ppid: int
    pgrp: int
    start_time: int  # clock ticks since boot: with the pid, a process's identity
    utime: int = 0  # clock ticks run in user mode, all threads
    stime: int = 0  # and in the kernel

    @property
    def gone(self) -> bool:
        """Exited (a zombie or dead task holds no memory and runs nothing)."""
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """``pid``'s stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        pid,
        fields[0].decode(),
        int(fields[1]),
        int(fields[2]),
        int(fields[19]),
        int(fields[11]),
        int(fields[12]),
    )


def all_processes() -> Iterator[ProcStat]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st is not None:
                yield st


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (read from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for proc in all_processes():
        children.setdefault(proc.ppid, []).append(proc.pid)
    out, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:  # a pid reused while /proc was read could make a cycle
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return out
