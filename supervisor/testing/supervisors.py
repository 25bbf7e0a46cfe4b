"""``failover-supervisor run`` as a real process for tests: its config rendered from
dicts, a simulated slot's table, start and stop; and a real Prometheus beside it.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from supervisor.testing.engineproc import FAST_SIM_ARGS, free_port, free_port_range


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
