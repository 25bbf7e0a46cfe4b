"""Local engine processes: launch each in its own process group, watch its exit, stop it.

An engine's exit is noticed by awaiting the child (no polling). "Gone" means more than the
leader's exit: a paired shadow may only wake once *every* process of the dead engine's
group is gone, since any of them may still hold GPU memory; :func:`group_alive` checks that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup

from supervisor import log as logging
from supervisor.backends import Backend
from supervisor.model import Engine, LaunchCommand
from supervisor.procfs import all_processes, read_stat
from supervisor.testing.cluster import simulated
from supervisor.testing.gpuledger import LEDGER_ENV

ExitCallback = Callable[[Engine, int, float], Awaitable[None]]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from /proc."""
    return [p.pid for p in all_processes() if p.pgrp == pgid and not p.gone]


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class EngineManager:
    """Starts, watches and stops engine processes; one log file per engine."""

    def __init__(
        self, log_dir: Path, on_exit: ExitCallback, sim_ledger: Path | None = None
    ) -> None:
        self.log_dir = log_dir
        # Simulated engines account GPU memory in this daemon's own ledger (under its
        # state_dir), unless the environment names one: never a machine-wide file that
        # another daemon's (or a test's) engines share.
        self.sim_ledger = sim_ledger
        self.on_exit = on_exit
        self.procs: dict[str, Process] = {}
        self.adopted: set[str] = set()  # engines started by an earlier supervisor
        self.log = logging.get(component="engines")

    def command(
        self, engine: Engine, backend: Backend, simulate: bool, sim_args: tuple[str, ...]
    ) -> LaunchCommand:
        cmd = backend.command(engine.spec)
        if simulate:
            cmd = simulated(cmd, backend.dialect.name, sim_args)
            if self.sim_ledger is not None and not os.environ.get(LEDGER_ENV):
                cmd = replace(cmd, env={**cmd.env, LEDGER_ENV: str(self.sim_ledger)})
        return cmd

    async def launch(self, tg: TaskGroup, engine: Engine, cmd: LaunchCommand) -> None:
        """Start ``engine`` in a new session (its own process group) and watch it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{engine.id}.log"
        env = {**os.environ, **cmd.env}
        header = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} launch: {' '.join(cmd.argv)}\n"
        out = await anyio.to_thread.run_sync(open, log_path, "ab")
        try:
            await anyio.to_thread.run_sync(out.write, header.encode())
            await anyio.to_thread.run_sync(out.flush)
            # Shielded: a spawn cancelled half-way could leave a child nobody knows of.
            with anyio.CancelScope(shield=True):
                proc = await anyio.open_process(
                    cmd.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        finally:
            out.close()  # the child keeps its own descriptor
        engine.pid = proc.pid
        st = read_stat(proc.pid)
        engine.start_ticks = st.start_time if st is not None else None
        self.procs[engine.id] = proc
        self.log.info(
            "engine launched",
            engine=engine.id,
            slot=engine.slot,
            pid=proc.pid,
            log=str(log_path),
            argv=cmd.argv,
        )
        tg.start_soon(self._watch, engine, proc)

    async def _watch(self, engine: Engine, proc: Process) -> None:
        code = await proc.wait()
        at = time.time()
        if self.procs.get(engine.id) is proc:
            del self.procs[engine.id]
        await self.on_exit(engine, code, at)

    def group_alive(self, pgid: int) -> bool:
        return group_alive(pgid)

    def running(self, engine: Engine) -> bool:
        return engine.id in self.procs or engine.id in self.adopted

    def adopt(self, tg: TaskGroup, engine: Engine) -> None:
        """Watch an engine an earlier supervisor started: not our child, so its exit is
        read from a pidfd (readable once the process has exited)."""
        assert engine.pid is not None
        fd = os.pidfd_open(engine.pid)
        self.adopted.add(engine.id)
        self.log.info("engine adopted", engine=engine.id, slot=engine.slot, pid=engine.pid)
        tg.start_soon(self._watch_adopted, engine, fd)

    async def _watch_adopted(self, engine: Engine, fd: int) -> None:
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)
        self.adopted.discard(engine.id)
        # Not our child: its exit status belongs to its parent. -1 says "unknown".
        await self.on_exit(engine, -1, time.time())

    async def wait_group_gone(self, pgid: int, timeout: float) -> bool:
        """Wait until no process of ``pgid`` is left; False if still there at the timeout."""
        with anyio.move_on_after(timeout):
            while await anyio.to_thread.run_sync(group_alive, pgid):
                await anyio.sleep(0.005)
            return True
        return False

    async def stop(self, engine: Engine, grace: float) -> None:
        """SIGTERM the engine's group, SIGKILL it after ``grace``; return once it is gone."""
        if engine.pid is None:
            return
        pgid = engine.pid  # leader of its own session: pgid == pid
        signal_group(pgid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        signal_group(pgid, signal.SIGTERM)
        if not await self.wait_group_gone(pgid, grace):
            self.log.warning(
                "engine ignored SIGTERM; killing its group", engine=engine.id, grace=grace
            )
            signal_group(pgid, signal.SIGKILL)
            await self.wait_group_gone(pgid, 10)

    def kill_now(self, engine: Engine) -> None:
        if engine.pid is not None:
            signal_group(engine.pid, signal.SIGKILL)
