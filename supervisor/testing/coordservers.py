"""Real coordination servers for cluster tests: an ``etcd`` cluster and a ``nats-server``,
each on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.testing.engineproc import free_port


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
