"""Start simulated engines (and, later, etcd / nats-server / supervisors) on free loopback ports.

Used by the test suite, the demo and plugin authors' own tests. Every process gets its own
process group so a test can SIGKILL / SIGTERM / SIGSTOP the whole engine as a failure would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from supervisor.backends import Backend, EngineEndpoint
from supervisor.model import EngineSpec, LaunchCommand, Readiness
from supervisor.testing.gpuledger import LEDGER_ENV
from supervisor.testing.netns import NetworkNamespace

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


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def render_config(cfg: dict[str, object]) -> str:
    """A small TOML writer for the configs tests and the demo generate (tables + [[slot]])."""
    lines: list[str] = []
    for table, values in cfg.items():
        if table == "slot":
            continue
        assert isinstance(values, dict)
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for slot in cfg.get("slot", []):  # type: ignore[attr-defined]
        lines.append("[[slot]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in slot.items()]
        lines.append("")
    return "\n".join(lines)


def sim_slot(
    name: str,
    *,
    shadows: int = 1,
    gpus: Sequence[str] = ("0",),
    dialect: str = "vllm",
    sim_args: Sequence[str] = FAST_SIM_ARGS,
    **extra: object,
) -> dict[str, object]:
    """A [[slot]] of simulated engines on free ports; paired shadows start asleep."""
    slot: dict[str, object] = {
        "name": name,
        "model": "sim-model",
        "backend": dialect,
        "base_port": free_port_range(shadows + 1),
        "shadows": shadows,
        "placement": "paired",
        "gpus": list(gpus),
        "simulate": True,
        "sim_args": list(sim_args),
    }
    if shadows:
        slot["shadow_extra_args"] = ["--sim-start-asleep"]
    slot.update(extra)
    return slot


@dataclass
class SupervisorProcess:
    """A ``failover-supervisor run`` process started by :func:`start_supervisor`."""

    proc: subprocess.Popen[bytes]
    admin_url: str
    frontend_url: str
    config_path: Path
    stderr_path: Path
    stdout_path: Path

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def spawn_supervisor(
    workdir: Path,
    slots: Sequence[dict[str, object]],
    *,
    health: dict[str, object] | None = None,
    failover: dict[str, object] | None = None,
    frontend: dict[str, object] | None = None,
    gpu: dict[str, object] | None = None,
    node: dict[str, object] | None = None,
    admin: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    cluster: dict[str, object] | None = None,
    unset_env: Sequence[str] = (),
    max_open_files: int | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
    log_level: str = "info",
    source: Path | None = None,
) -> SupervisorProcess:
    """Write a config for ``slots`` and start the real daemon on it (not waiting).
    ``max_open_files`` caps its open-file limit (soft and hard), as a small host would;
    ``wrap`` rewrites the command line (e.g. to run it in a network namespace);
    ``source`` runs the daemon from another checkout of the project (its own code, with
    this interpreter and its packages)."""
    workdir.mkdir(parents=True, exist_ok=True)
    # The slots' ranges are chosen free but not yet bound: keep our own ports out of them.
    taken = {
        int(s["base_port"]) + i  # type: ignore[call-overload]
        for s in slots
        for i in range(int(s.get("shadows", 1)) + 1)  # type: ignore[call-overload]
    }

    def port() -> int:
        while True:
            p = free_port()
            if p not in taken:
                taken.add(p)
                return p

    cfg: dict[str, object] = {
        "node": {"name": "test-node", "state_dir": str(workdir / "state"), **(node or {})},
        "admin": {"host": "127.0.0.1", "port": port(), **(admin or {})},
        "health": {
            "probe_interval": 0.05,
            "probe_timeout": 0.25,
            "failure_threshold": 3,
            "load_timeout": 30,
            **(health or {}),
        },
        "failover": {
            "relaunch_backoff": 0.05,
            "stop_grace": 3,
            "wake_timeout": 10,
            **(failover or {}),
        },
        "frontend": {"port": port(), **(frontend or {})},
        # No kernel log or NVML in tests unless asked: the machine's own are not ours.
        "gpu": {"xid_source": "none", "nvml": "off", **(gpu or {})},
        "slot": list(slots),
    }
    if cluster is not None:
        cfg["cluster"] = cluster
    path = workdir / "supervisor.toml"
    path.write_text(render_config(cfg))
    out, err = workdir / "supervisor.out", workdir / "supervisor.err"
    child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset_env}
    if source is not None:
        # ``python -m`` looks in its working directory first: there, before the install.
        child_env["PYTHONPATH"] = str(source)

    def limit_files() -> None:
        if max_open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

    with open(out, "wb") as o, open(err, "wb") as e:
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(path)]
        argv += ["--log-level", log_level]
        proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=source,
            preexec_fn=limit_files if max_open_files is not None else None,
        )
    return SupervisorProcess(proc, "", "", path, err, out)


def _announced(sup: SupervisorProcess) -> bool:
    lines = sup.stdout_path.read_text().splitlines()
    for line in lines:
        if line.startswith("admin: "):
            sup.admin_url = line.split(" ", 1)[1].strip()
        if line.startswith("frontend: "):
            sup.frontend_url = line.split(" ", 1)[1].strip()
    return any(line.startswith("ready") for line in lines)


async def start_supervisor(
    workdir: Path,
    slots: Sequence[dict[str, object]],
    *,
    ready_timeout: float = 60,
    **kw: Any,
) -> SupervisorProcess:
    """:func:`spawn_supervisor`, then wait until the daemon reports ready."""
    sup = await anyio.to_thread.run_sync(lambda: spawn_supervisor(workdir, slots, **kw))
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if await anyio.to_thread.run_sync(_announced, sup):
            return sup
        if sup.proc.poll() is not None:
            raise RuntimeError(
                f"supervisor exited with {sup.proc.returncode}:\n{sup.logs()[-3000:]}"
            )
        await anyio.sleep(0.05)
    await anyio.to_thread.run_sync(sup.stop)
    raise TimeoutError(f"supervisor not ready after {ready_timeout}s:\n{sup.logs()[-3000:]}")


def start_prometheus(config: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """A real ``prometheus`` server (Debian package ``prometheus``) on 127.0.0.1:port."""
    with open(workdir / "prometheus.log", "wb") as log:
        return subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )


# -- cluster servers: etcd, nats-server, and a fault proxy ----------------------------------
def _wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class EtcdMember:
    """One ``etcd`` process of an :class:`EtcdCluster`."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class EtcdCluster:
    """A real etcd cluster of ``size`` members (1 or 3) on free loopback ports.

    Members can be killed and started again (their data kept) to test leader loss.
    """

    def __init__(self, workdir: Path, size: int = 1, token: str = "fsup-test") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.members = [
            EtcdMember(
                f"etcd{i}",
                free_port(),
                free_port(),
                workdir / f"etcd{i}",
                workdir / f"etcd{i}.log",
            )
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def start_member(self, m: EtcdMember) -> None:
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(
                [
                    "etcd",
                    "--name", m.name,
                    "--data-dir", str(m.data_dir),
                    "--listen-client-urls", m.url,
                    "--advertise-client-urls", m.url,
                    "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                    "--initial-cluster", self._initial_cluster(),
                    "--initial-cluster-token", self.token,
                    "--initial-cluster-state", "new",
                    # Fast elections on loopback (defaults: 100 ms heartbeat, 1 s election).
                    "--heartbeat-interval", "50",
                    "--election-timeout", "500",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def start(self, timeout: float = 20) -> EtcdCluster:
        for m in self.members:
            if not m.running:
                self.start_member(m)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        """Until a leader is elected and every running member answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.leader() is not None and all(
                self._status(m) is not None for m in self.members if m.running
            ):
                return
            time.sleep(0.05)
        logs = "\n".join(m.log_path.read_text(errors="replace")[-1500:] for m in self.members)
        raise TimeoutError(f"etcd cluster not healthy after {timeout}s:\n{logs}")

    @staticmethod
    def _status(m: EtcdMember) -> dict[str, Any] | None:
        import json
        import urllib.request

        if not m.running:
            return None
        try:
            req = urllib.request.Request(m.url + "/v3/maintenance/status", data=b"{}")
            with urllib.request.urlopen(req, timeout=0.5) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def leader(self) -> EtcdMember | None:
        for m in self.members:
            st = self._status(m)
            if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                return m
        return None

    def stop(self) -> None:
        for m in self.members:
            m.kill()


class NatsServer:
    """A real ``nats-server`` on a free loopback port; restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.monitor_port = free_port()  # /varz: messages in and out, slow consumers
        self.log_path = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def varz_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}/varz"

    def start(self) -> NatsServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "nats-server",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-m",
                    str(self.monitor_port),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class FaultProxy:
    """A TCP proxy on loopback, in a thread of its own, that a test can cut and heal.

    ``cut()`` closes every open connection and leaves new ones hanging unanswered (a
    partition, as a dropped network looks: timeouts, not refusals); ``black_hole()`` keeps
    every connection open but forwards nothing either way (a half-open link: nobody is told
    anything); ``delay(s)`` holds every chunk ``s`` seconds each way; ``one_way(...)`` drops
    what flows in one direction only (requests arrive, answers are lost, or the reverse);
    ``heal()`` forwards again (connections held or black-holed meanwhile are reset).
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.host = host  # where it listens (the target is on 127.0.0.1)
        self.port = free_port(host)
        self.cut_now = False
        self.holed = False  # black hole: bytes are read and dropped, connections stay open
        self._holed_conns: set[Any] = set()  # connections black-holed one by one
        self._live: set[Any] = set()  # forwarding connections, by their client side
        self.latency = 0.0  # seconds each chunk is held, each way
        self.dropping = ""  # "to_target" or "from_target": that direction is lost
        self._conns: set[Any] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _serve(self) -> None:
        import asyncio

        async def pipe(
            r: asyncio.StreamReader,
            w: asyncio.StreamWriter,
            pair: asyncio.StreamWriter,
            direction: str,
        ) -> None:
            try:
                while not self.cut_now:
                    data = await r.read(65536)
                    if not data or self.cut_now:
                        break
                    if self.holed or pair in self._holed_conns or self.dropping == direction:
                        continue  # lost on the way
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            if self.cut_now or self.holed:
                self._conns.add(cw)  # held open, never answered: a black hole
                return
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                cw.close()
                return
            self._conns.update((cw, uw))
            self._live.add(cw)
            await asyncio.gather(pipe(cr, uw, cw, "to_target"), pipe(ur, cw, cw, "from_target"))
            self._conns.discard(cw)
            self._conns.discard(uw)
            self._live.discard(cw)

        async def main() -> None:
            server = await asyncio.start_server(handle, self.host, self.port)
            self._ready.set()
            async with server:
                await server.serve_forever()

        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):  # closed
            self._loop.run_until_complete(main())
        # The connections' tasks, cancelled by close(), finish before the thread ends.
        rest = asyncio.all_tasks(self._loop)
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            self._loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))

    def cut(self) -> None:
        def close_all() -> None:
            self.cut_now = True
            for w in list(self._conns):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._conns.clear()

        self._loop.call_soon_threadsafe(close_all)

    def black_hole(self, *, existing_only: bool = False) -> None:
        """Forward nothing, keep connections open. ``existing_only``: just the connections
        open now go silent (a long-lived stream, a pooled connection); new ones work (as
        after a NAT or conntrack entry is lost)."""

        def hole() -> None:
            if existing_only:
                self._holed_conns |= self._live
            else:
                self.holed = True

        self._loop.call_soon_threadsafe(hole)

    def delay(self, seconds: float) -> None:
        def slow() -> None:
            self.latency = seconds

        self._loop.call_soon_threadsafe(slow)

    def one_way(self, lost: str) -> None:
        """Lose what flows ``lost`` ("to_target": requests; "from_target": answers)."""
        assert lost in ("to_target", "from_target")

        def drop() -> None:
            self.dropping = lost

        self._loop.call_soon_threadsafe(drop)

    def heal(self) -> None:
        def reopen() -> None:
            if self.cut_now or self.holed:  # connections held meanwhile: drop them now
                for w in list(self._conns):
                    with contextlib.suppress(Exception):
                        w.transport.abort()
                self._conns.clear()
            if self.dropping:  # half of those streams is lost: they cannot go on
                self._holed_conns |= self._live
            for w in self._holed_conns:
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._holed_conns.clear()
            self.cut_now = self.holed = False
            self.latency, self.dropping = 0.0, ""

        self._loop.call_soon_threadsafe(reopen)

    def close(self) -> None:
        import asyncio

        def shutdown() -> None:
            # Every task ends (the server's first), so none is left unfinished.
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(5)


# -- supervisor "nodes" of a test cluster --------------------------------------------------
class ClusterNode:
    """One supervisor 'node' of a test cluster, with its links to etcd and NATS."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        etcd: EtcdCluster,
        nats: NatsServer | None,
        session: aiohttp.ClientSession,
        host: str = "127.0.0.1",
        netns: NetworkNamespace | None = None,
    ) -> None:
        self.name, self.workdir, self.session = name, workdir, session
        # Nodes on distinct loopback addresses (127.0.0.2, .3, ...) listen, advertise and
        # run engines there, as hosts do: an address mixed up between nodes shows. A node
        # in a network namespace has a loopback of its own, as a separate host has.
        self.netns = netns
        self.host = netns.ns_ip if netns else host
        link_host = netns.host_ip if netns else "127.0.0.1"
        # Each node reaches etcd and NATS through its own proxies, so a test can cut one
        # node off (a partition) while the others stay connected.
        self.etcd_links = [FaultProxy(m.client_port, link_host) for m in etcd.members]
        self.nats_link = FaultProxy(nats.port, link_host) if nats else None
        self.sup: SupervisorProcess | None = None
        # A node restarted after a loss comes back on its own ports, as a real one does.
        # (Inside a fresh namespace every port is free; its address is not bindable here.)
        port_host = "127.0.0.1" if netns else host
        self.admin_port, self.frontend_port = free_port(port_host), free_port(port_host)

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p.target_port}" for p in self.etcd_links]

    def logs(self) -> str:
        return self.sup.logs() if self.sup else ""

    @property
    def admin(self) -> str:
        """The admin API as the test (and peers) reach it: on a wildcard listener, the
        node's own address."""
        assert self.sup is not None
        return self.sup.admin_url.replace("//0.0.0.0:", f"//{self.host}:")

    def cluster_cfg(self, **kw: object) -> dict[str, object]:
        cfg: dict[str, object] = {
            "name": "test",
            "etcd_endpoints": [p.url for p in self.etcd_links],
            "lease_ttl": 2,
            "heartbeat_interval": 0.1,
            "suspect_after": 3,
            "probe_timeout": 0.2,
            "etcd_timeout": 0.5,
            "advertise_host": self.host,
        }
        if self.nats_link is not None:
            cfg["nats_servers"] = [self.nats_link.nats_url]
        cfg.update(kw)
        return cfg

    async def start(self, slots: Sequence[dict[str, object]], **kw: Any) -> ClusterNode:
        cluster = self.cluster_cfg(**kw.pop("cluster", {}))
        kw["admin"] = {"host": self.host, "port": self.admin_port, **kw.get("admin", {})}
        kw["frontend"] = {"host": self.host, "port": self.frontend_port, **kw.get("frontend", {})}
        self.sup = await start_supervisor(
            self.workdir,
            slots,
            node={
                "name": self.name,
                "state_dir": str(self.workdir / "state"),
                "engine_host": self.host,
            },
            cluster=cluster,
            env={LEDGER_ENV: str(self.workdir / "gpu-ledger.json")},
            wrap=self.netns.command if self.netns else None,
            **kw,
        )
        return self

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self.admin + "/status") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def wait(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20, what: str = "condition"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = await self.status()
                if pred(st):
                    return st
            except (aiohttp.ClientError, OSError):
                pass
            await anyio.sleep(0.05)
        assert self.sup is not None
        raise AssertionError(
            f"{self.name}: timed out waiting for {what}; status:\n"
            f"{json.dumps(st, indent=1)[-4000:]}\nlogs:\n{self.sup.logs()[-6000:]}"
        )

    def kill(self, engines: list[int]) -> None:
        """SIGKILL the supervisor and the given engine process groups: the node is gone."""
        assert self.sup is not None
        self.sup.proc.kill()
        for pid in engines:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.sup.proc.wait()

    def close(self) -> None:
        if self.sup is not None:
            self.sup.stop()
        for p in self.etcd_links:
            p.close()
        if self.nats_link:
            self.nats_link.close()


async def slot_history(
    endpoints: list[str], session: aiohttp.ClientSession, cluster: str = "test"
) -> list[tuple[int, str, int, str | None]]:
    """Every write of every ``slots/`` key in etcd's history: (revision, slot, epoch, active)."""
    import orjson

    from supervisor.coordination.etcd import EtcdClient

    client = EtcdClient(endpoints, session, timeout=3)
    prefix = f"/failover-supervisor/{cluster}/slots/".encode()
    kvs, _ = await client.get_prefix(prefix)
    out: list[tuple[int, str, int, str | None]] = []
    if not kvs:
        return out
    last = max(kv.mod_revision for kv in kvs)
    with anyio.fail_after(10):
        async for _, events in client.watch_prefix(prefix, 1):
            for ev in events:
                if ev.kind == "put":
                    d = orjson.loads(ev.kv.value)
                    slot = ev.kv.key[len(prefix) :].decode()
                    out.append((ev.kv.mod_revision, slot, int(d["epoch"]), d.get("active")))
            if out and out[-1][0] >= last:
                break
    return out


def assert_epochs_unique(history: list[tuple[int, str, int, str | None]]) -> None:
    """No slot promoted twice for one epoch: each (slot, epoch) names one unit, and epochs
    only grow."""
    seen: dict[tuple[str, int], str | None] = {}
    last: dict[str, int] = {}
    for _, slot, epoch, active in history:
        if active is None:
            continue  # a hand-over clears the active unit without a new epoch
        assert seen.setdefault((slot, epoch), active) == active, (slot, epoch, history)
        assert epoch >= last.get(slot, 0), (slot, epoch, history)
        last[slot] = epoch


class ActiveWatch:
    """The invariant that matters, checked from outside: samples every node's ``/status``
    and records each moment at which more than one engine *serves* one slot (active, on a
    node that is not demoted). Run it in a task group through a test; then read
    :meth:`windows`."""

    def __init__(
        self, nodes: Sequence[ClusterNode], session: aiohttp.ClientSession, interval: float = 0.02
    ) -> None:
        self.nodes, self.session, self.interval = nodes, session, interval
        self.samples: list[tuple[float, dict[str, list[str]]]] = []  # (monotonic, slot -> who)

    async def _status(self, node: ClusterNode) -> dict[str, Any] | None:
        try:
            with anyio.fail_after(1.0):
                async with self.session.get(node.admin + "/status") as r:
                    return await r.json()  # type: ignore[no-any-return]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None  # down: it serves nothing

    async def run(self) -> None:
        while True:
            serving: dict[str, list[str]] = {}
            for node in self.nodes:
                st = await self._status(node)
                if st is None or (st.get("cluster") or {}).get("demoted"):
                    continue
                for e in st["engines"]:
                    if e["state"] == "active":
                        serving.setdefault(e["slot"], []).append(e["id"])
            self.samples.append((time.monotonic(), serving))
            await anyio.sleep(self.interval)

    def windows(self) -> list[tuple[float, float, list[str]]]:
        """Every stretch of samples in which a slot had two or more serving engines:
        (start, end, engines), monotonic seconds."""
        out: list[tuple[float, float, list[str]]] = []
        start: float | None = None
        who: list[str] = []
        for t, serving in self.samples:
            double = [ids for ids in serving.values() if len(ids) > 1]
            if double and start is None:
                start, who = t, double[0]
            elif not double and start is not None:
                out.append((start, t, who))
                start = None
        if start is not None:
            out.append((start, self.samples[-1][0], who))
        return out

    def longest(self) -> float:
        return max((end - start for start, end, _ in self.windows()), default=0.0)
