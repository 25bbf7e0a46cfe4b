"""The test kit's front door: supervisor nodes of a test cluster (:class:`ClusterNode`), the
checks made on them from outside (:class:`ActiveWatch`, :func:`slot_history`), and every
helper of the kit, re-exported so ``from supervisor.testing.cluster import X`` keeps working.

The helpers live by kind: engine processes and free ports in
:mod:`supervisor.testing.engineproc`, supervisor processes in
:mod:`supervisor.testing.supervisors`, etcd and NATS in :mod:`supervisor.testing.coordservers`,
the partitioning proxy in :mod:`supervisor.testing.faultproxy`. Used by the test suite, the
demo and plugin authors' own tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from supervisor.testing.admin import AdminClient, AdminError
from supervisor.testing.coordservers import EtcdCluster, EtcdMember, NatsServer
from supervisor.testing.engineproc import (
    FAST_SIM_ARGS,
    EngineProcess,
    free_port,
    free_port_range,
    launch,
    running_engine,
    sim_program,
    simulated,
    stop,
    wait_for,
)
from supervisor.testing.faultproxy import FaultProxy
from supervisor.testing.gpuledger import LEDGER_ENV
from supervisor.testing.netns import NetworkNamespace
from supervisor.testing.supervisors import (
    SupervisorProcess,
    _announced,
    render_config,
    sim_slot,
    spawn_supervisor,
    start_prometheus,
    start_supervisor,
)


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

    @property
    def client(self) -> AdminClient:
        """A client of the node's admin API as it runs now (a restart moves nothing, but
        the process, and so its logs, are new)."""
        assert self.sup is not None
        return AdminClient(self.admin, self.session, logs=self.sup.logs)

    async def status(self) -> dict[str, Any]:
        return await self.client.status()

    async def wait(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20, what: str = "condition"
    ) -> dict[str, Any]:
        """The first status ``pred`` accepts; the node may be down meanwhile."""
        return await self.client.wait(
            pred, timeout, f"{self.name}: {what}", while_down=True, interval=0.05
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
                return await AdminClient(node.admin, self.session).status()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AdminError):
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


# The test kit's whole surface stays importable from here, as tests and plugins import it.
__all__ = [
    "FAST_SIM_ARGS",
    "ActiveWatch",
    "ClusterNode",
    "EngineProcess",
    "EtcdCluster",
    "EtcdMember",
    "FaultProxy",
    "NatsServer",
    "SupervisorProcess",
    "_announced",  # the fuzz test polls a supervisor it spawned itself
    "assert_epochs_unique",
    "free_port",
    "free_port_range",
    "launch",
    "render_config",
    "running_engine",
    "sim_program",
    "sim_slot",
    "simulated",
    "slot_history",
    "spawn_supervisor",
    "start_prometheus",
    "start_supervisor",
    "stop",
    "wait_for",
]
