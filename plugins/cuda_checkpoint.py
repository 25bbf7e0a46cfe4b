"""cuda-checkpoint suspend strategy: shadows for engines that have no sleep mode.

Sleep = find the engine's process tree, keep the processes that hold CUDA state (an open
``/dev/nvidia*``), checkpoint each (its device memory is copied to host memory and the GPU
released), then verify each reports ``checkpointed`` with a bounded retry loop. A
checkpointed process closes its ``/dev/nvidia*`` files, so the strategy remembers what it
checkpointed, and otherwise (after a supervisor restart) asks the driver about each process
of the tree. Wake = restore each (memory copied back to the same virtual addresses) and
verify ``running``.

Two ways to reach the driver, the first that works is used:
- the ``cuda-checkpoint`` binary (NVIDIA/cuda-checkpoint) on PATH, or named by
  ``$CUDA_CHECKPOINT_BIN``;
- the driver API itself, ``cuCheckpointProcess*`` in libcuda (driver r570 or newer), through
  ctypes.
Needs the driver >= 550 (binary) / >= 570 (API), the right to ptrace the engine (root or
CAP_SYS_PTRACE) and, for multi-GPU engines, NCCL without P2P/SHM transports
(``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1``), as NVIDIA's recipe says.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol

import anyio

from supervisor.backends import BackendError
from supervisor.procfs import process_tree


class CudaState(StrEnum):
    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"


class CheckpointError(BackendError):
    pass


def holds_cuda(pid: int) -> bool:
    """Whether ``pid`` has an NVIDIA device open (every CUDA process does)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def cuda_processes(root: int) -> list[int]:
    return [p for p in process_tree(root) if holds_cuda(p)]


class Driver(Protocol):
    name: str

    def state(self, pid: int) -> CudaState: ...
    def suspend(self, pid: int, timeout_ms: int) -> None: ...
    def resume(self, pid: int) -> None: ...


class BinaryDriver:
    """The ``cuda-checkpoint`` command line tool."""

    name = "binary"

    def __init__(self, path: str) -> None:
        self.path = path

    def _run(self, *args: str) -> str:
        out = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise CheckpointError(
                f"cuda-checkpoint {' '.join(args)} failed: {(out.stderr or out.stdout).strip()}"
            )
        return out.stdout.strip()

    def state(self, pid: int) -> CudaState:
        return CudaState(self._run("--get-state", "--pid", str(pid)))

    def suspend(self, pid: int, timeout_ms: int) -> None:
        self._run("--action", "lock", "--pid", str(pid), "--timeout", str(timeout_ms))
        self._run("--action", "checkpoint", "--pid", str(pid))

    def resume(self, pid: int) -> None:
        self._run("--action", "restore", "--pid", str(pid))
        self._run("--action", "unlock", "--pid", str(pid))


class _LockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class ApiDriver:
    """``cuCheckpointProcess*`` from libcuda (driver r570+), through ctypes."""

    name = "driver-api"
    _STATES = {
        0: CudaState.RUNNING,
        1: CudaState.LOCKED,
        2: CudaState.CHECKPOINTED,
        3: CudaState.FAILED,
    }

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CheckpointError(f"libcuda.so.1 not found: {e}") from e
        for fn in (
            "cuCheckpointProcessGetState",
            "cuCheckpointProcessLock",
            "cuCheckpointProcessCheckpoint",
            "cuCheckpointProcessRestore",
            "cuCheckpointProcessUnlock",
        ):
            if not hasattr(self.lib, fn):
                raise CheckpointError(f"libcuda has no {fn}: the driver is older than r570")
        self._check("cuInit", self.lib.cuInit(0))

    def _check(self, what: str, rc: int) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"error {rc}"
            raise CheckpointError(f"{what} failed: {text} ({rc})")

    def state(self, pid: int) -> CudaState:
        st = ctypes.c_int()
        self._check(
            "cuCheckpointProcessGetState",
            self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(st)),
        )
        return self._STATES.get(st.value, CudaState.FAILED)

    def suspend(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        self._check("lock", self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)))
        self._check("checkpoint", self.lib.cuCheckpointProcessCheckpoint(pid, None))

    def resume(self, pid: int) -> None:
        self._check("restore", self.lib.cuCheckpointProcessRestore(pid, None))
        self._check("unlock", self.lib.cuCheckpointProcessUnlock(pid, None))


def find_driver(prefer: str | None = None) -> Driver:
    """The binary when available (or asked for), else the driver API."""
    binary = os.environ.get("CUDA_CHECKPOINT_BIN") or shutil.which("cuda-checkpoint")
    if prefer in (None, "binary") and binary:
        return BinaryDriver(binary)
    if prefer == "binary":
        raise CheckpointError("no cuda-checkpoint binary (PATH or $CUDA_CHECKPOINT_BIN)")
    return ApiDriver()


class CudaCheckpointStrategy:
    """Suspend and resume an engine's whole process tree with cuda-checkpoint."""

    name = "cuda-checkpoint"

    def __init__(
        self,
        driver: Driver | None = None,
        *,
        lock_timeout_ms: int = 10_000,
        verify_timeout: float = 30.0,
    ) -> None:
        self.driver = driver or find_driver()
        self.lock_timeout_ms = lock_timeout_ms
        self.verify_timeout = verify_timeout
        self._suspended: dict[int, list[int]] = {}

    async def suspend(self, root_pid: int) -> list[int]:
        """Checkpoint every CUDA process of the tree; returns their pids."""
        pids = await anyio.to_thread.run_sync(cuda_processes, root_pid)
        if not pids:
            raise CheckpointError(f"no process of {root_pid}'s tree holds CUDA state")
        for pid in pids:
            if await self._state(pid) is CudaState.RUNNING:
                await anyio.to_thread.run_sync(self.driver.suspend, pid, self.lock_timeout_ms)
        # A checkpointed process closes its /dev/nvidia* files, so it can no longer be found
        # by them: remember which processes were checkpointed.
        self._suspended[root_pid] = pids
        await self._verify(pids, CudaState.CHECKPOINTED)
        return pids

    async def resume(self, root_pid: int) -> list[int]:
        pids = self._suspended.pop(root_pid, None) or await self._checkpointed_in(root_pid)
        # Children were checkpointed after their parents; restore in the reverse order.
        for pid in reversed(pids):
            if await self._state(pid) is CudaState.CHECKPOINTED:
                await anyio.to_thread.run_sync(self.driver.resume, pid)
        await self._verify(pids, CudaState.RUNNING)
        return pids

    async def is_suspended(self, root_pid: int) -> bool:
        pids = self._suspended.get(root_pid) or await self._checkpointed_in(root_pid)
        return bool(pids) and all([await self._state(p) is CudaState.CHECKPOINTED for p in pids])

    async def _checkpointed_in(self, root_pid: int) -> list[int]:
        """Checkpointed processes of the tree, asked of the driver one by one (after a
        supervisor restart there is no memory of what was checkpointed)."""
        out = []
        for pid in await anyio.to_thread.run_sync(process_tree, root_pid):
            try:
                if await self._state(pid) is CudaState.CHECKPOINTED:
                    out.append(pid)
            except CheckpointError:
                continue  # not a CUDA process
        return out

    async def _state(self, pid: int) -> CudaState:
        return await anyio.to_thread.run_sync(self.driver.state, pid)

    async def _verify(self, pids: Iterable[int], want: CudaState) -> None:
        deadline = time.monotonic() + self.verify_timeout
        pending = list(pids)
        while pending:
            states = {p: await self._state(p) for p in pending}
            failed = [p for p, s in states.items() if s is CudaState.FAILED]
            if failed:
                raise CheckpointError(f"cuda-checkpoint left process(es) {failed} failed")
            pending = [p for p, s in states.items() if s is not want]
            if pending and time.monotonic() > deadline:
                raise CheckpointError(
                    f"process(es) {pending} not {want} after {self.verify_timeout}s: {states}"
                )
            if pending:
                await anyio.sleep(0.05)
