"""Shadows that promote themselves: the failover lock of Dynamo's GPU Memory Service recipe.

With ``suspend = "flock"`` every engine of a slot gets ``FAILOVER_LOCK_PATH``, one lock file
per slot. The engine that holds the ``flock`` on it serves; a shadow loads (its weights
mapped from the memory service), parks on the lock, polling it every 100 ms, and when the
kernel hands the lock over (the holder's processes are gone) it wakes *itself* and serves.
At most one engine per slot serves, by the kernel's word.

The supervisor must not fight it: it never calls a shadow's wake route. It watches the lock
instead: who holds it (``/proc/locks``) says which engine promoted itself, and a failover
waits for that and for the engine to answer as ready.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from supervisor.backends import BackendError
from supervisor.model import FLOCK
from supervisor.procfs import process_tree

__all__ = ["FLOCK", "LOCK_ENV", "FlockStandby", "lock_holders"]
LOCK_ENV = "FAILOVER_LOCK_PATH"


def lock_holders(path: Path) -> set[int]:
    """The pids holding a ``flock`` on ``path``, from ``/proc/locks`` (empty if none)."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return set()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF" (blocked waiters have "->")
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and "->" not in parts and parts[5] == dev:
            try:
                holders.add(int(parts[4]))
            except ValueError:
                continue
    return holders


class FlockStandby:
    """The suspend strategy for self-promoting shadows (``suspend = "flock"``)."""

    name = FLOCK

    def __init__(self, lock_path: Path, poll: float = 0.05) -> None:
        self.lock_path = lock_path
        self.poll = poll

    def holds_lock(self, root_pid: int) -> bool:
        return bool(lock_holders(self.lock_path) & set(process_tree(root_pid)))

    async def suspend(self, root_pid: int) -> list[int]:
        """Nothing to do: the shadow parks itself on the lock. It must not hold it."""
        if await anyio.to_thread.run_sync(self.holds_lock, root_pid):
            raise BackendError(
                f"the shadow (pid {root_pid}) holds the failover lock {self.lock_path}: "
                "two engines of the slot would serve"
            )
        return []

    async def resume(self, root_pid: int) -> list[int]:
        """Wait for the shadow to take the lock (never wake it: it wakes itself). The
        caller bounds the wait and then waits for the engine to answer as ready."""
        while True:
            holders = await anyio.to_thread.run_sync(lock_holders, self.lock_path)
            mine = holders & set(await anyio.to_thread.run_sync(process_tree, root_pid))
            if mine:
                return sorted(mine)
            await anyio.sleep(self.poll)
