"""Simulated engines as real processes on free loopback ports, for tests, the demo and
plugin authors' own tests.

Every engine gets its own process group so a test can SIGKILL / SIGTERM / SIGSTOP the whole
engine as a failure would.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import anyio

from supervisor.backends import Backend, EngineEndpoint
from supervisor.model import EngineSpec, LaunchCommand, Readiness

# Fast timings for tests: engines load in 50 ms and stream a token every 2 ms.
FAST_SIM_ARGS: tuple[str, ...] = (
    "--sim-load-time", "0.05", "--sim-ttft", "0.005", "--sim-itl", "0.002",
    "--sim-sleep-time", "0.01", "--sim-wake-time", "0.02", "--sim-release-delay", "0.05",
)  # fmt: skip


def _non_ephemeral_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range, which outgoing connections never take (a
    port chosen inside it can be grabbed by a client socket before the server binds it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, max(10001, low - 1)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    return free_port_range(1, host)


def sim_program(dialect: str) -> tuple[str, ...]:
    """The command that stands in for a real engine's program: the simulator of ``dialect``."""
    return (sys.executable, "-m", "supervisor", "sim-engine", "--dialect", dialect)


def simulated(cmd: LaunchCommand, dialect: str, sim_args: Sequence[str] = ()) -> LaunchCommand:
    """``cmd`` with the real engine's program swapped for the simulator; flags unchanged."""
    return replace(cmd, program=sim_program(dialect), args=(*cmd.args, *sim_args))


@dataclass
class EngineProcess:
    """A launched engine: its process, endpoint and log file."""

    spec: EngineSpec
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def launch(
    backend: Backend,
    spec: EngineSpec,
    log_dir: Path,
    *,
    simulate: bool = True,
    sim_args: Sequence[str] = FAST_SIM_ARGS,
    sim_dialect: str | None = None,
) -> EngineProcess:
    """Start the engine for ``spec`` in its own process group, output to a log file.

    With ``simulate``, the simulator of ``sim_dialect`` (default: the backend's own dialect
    name) stands in for the engine's program.
    """
    cmd = backend.command(spec)
    if simulate:
        cmd = simulated(cmd, sim_dialect or backend.dialect.name, sim_args)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.engine_id}.log"
    env = {**os.environ, **cmd.env}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd.argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    return EngineProcess(spec, proc, log_path)


async def wait_for(
    backend: Backend,
    ep: EngineEndpoint,
    states: set[Readiness],
    *,
    timeout: float = 20.0,
    proc: EngineProcess | None = None,
) -> Readiness:
    """Poll the engine's health until it is in one of ``states``; raise on timeout or exit."""
    deadline = time.monotonic() + timeout
    last = Readiness.DOWN
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"engine {proc.spec.engine_id} exited with {proc.proc.returncode}:\n"
                + proc.log_text()[-2000:]
            )
        last = await backend.health(ep)
        if last in states:
            return last
        await anyio.sleep(0.02)
    raise TimeoutError(f"engine at {ep.url} stayed {last} for {timeout}s, wanted {states}")


def stop(proc: EngineProcess, *, grace: float = 3.0) -> None:
    """SIGTERM the whole group, then SIGKILL it after ``grace`` seconds; reap the leader."""
    if proc.alive():
        proc.signal_group(signal.SIGCONT)
        proc.signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(timeout=grace)
    proc.signal_group(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.proc.wait(timeout=5)


@contextlib.asynccontextmanager
async def running_engine(
    backend: Backend,
    spec: EngineSpec,
    log_dir: Path,
    session: aiohttp.ClientSession,
    *,
    sim_args: Sequence[str] = FAST_SIM_ARGS,
    ready: set[Readiness] | None = None,
    sim_dialect: str | None = None,
    simulate: bool = True,
    load_timeout: float = 20,
) -> AsyncIterator[tuple[EngineProcess, EngineEndpoint]]:
    """Launch an engine (simulated, or the real program with ``simulate=False``), wait
    until ready, yield it, stop it (whole group)."""
    proc = launch(
        backend, spec, log_dir, simulate=simulate, sim_args=sim_args, sim_dialect=sim_dialect
    )
    ep = EngineEndpoint(spec.url, session)
    try:
        await wait_for(backend, ep, ready or {Readiness.READY}, proc=proc, timeout=load_timeout)
        yield proc, ep
    finally:
        await anyio.to_thread.run_sync(stop, proc)


# Ports this process handed out lately. A port is chosen free but bound only later (by a
# daemon that starts after more ports were chosen), so "free right now" alone can give one
# port twice: a node's admin port, chosen first, and then a slot's engine range.
_HANDED_OUT: deque[int] = deque(maxlen=4096)


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """A base port such that ``base .. base + n - 1`` are all free right now and none was
    handed out lately by this process, chosen at random below the ephemeral range."""
    lo, hi = _non_ephemeral_range()
    recent = set(_HANDED_OUT)
    for _ in range(500):
        base = random.randint(lo, hi - n)
        ports = range(base, base + n)
        if recent.isdisjoint(ports) and all(_bindable(host, p) for p in ports):
            _HANDED_OUT.extend(ports)
            return base
    raise RuntimeError(f"no range of {n} free ports found in {lo}-{hi}")
