"""Fixtures for multi-node tests: real etcd and nats-server, supervisors as processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import (
    EtcdCluster,
    FaultProxy,
    NatsServer,
    SupervisorProcess,
    sim_slot,
    start_supervisor,
)
from supervisor.testing.gpuledger import LEDGER_ENV


class Node:
    """One supervisor 'node' of a test cluster, with its links to etcd and NATS."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        etcd: EtcdCluster,
        nats: NatsServer | None,
        session: aiohttp.ClientSession,
    ) -> None:
        self.name, self.workdir, self.session = name, workdir, session
        # Each node reaches etcd and NATS through its own proxies, so a test can cut one
        # node off (a partition) while the others stay connected.
        self.etcd_links = [FaultProxy(m.client_port) for m in etcd.members]
        self.nats_link = FaultProxy(nats.port) if nats else None
        self.sup: SupervisorProcess | None = None

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p.target_port}" for p in self.etcd_links]

    def logs(self) -> str:
        return self.sup.logs() if self.sup else ""

    @property
    def admin(self) -> str:
        assert self.sup is not None
        return self.sup.admin_url

    def cluster_cfg(self, **kw: object) -> dict[str, object]:
        cfg: dict[str, object] = {
            "name": "test",
            "etcd_endpoints": [p.url for p in self.etcd_links],
            "lease_ttl": 2,
            "heartbeat_interval": 0.1,
            "suspect_after": 3,
            "probe_timeout": 0.2,
            "etcd_timeout": 0.5,
        }
        if self.nats_link is not None:
            cfg["nats_servers"] = [self.nats_link.nats_url]
        cfg.update(kw)
        return cfg

    async def start(self, slots: list[dict[str, object]], **kw: Any) -> Node:
        cluster = self.cluster_cfg(**kw.pop("cluster", {}))
        self.sup = await start_supervisor(
            self.workdir,
            slots,
            node={"name": self.name, "state_dir": str(self.workdir / "state")},
            cluster=cluster,
            env={LEDGER_ENV: str(self.workdir / "gpu-ledger.json")},
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


def slot_record(st: dict[str, Any], slot: str) -> dict[str, Any]:
    return st["cluster"]["slots"].get(slot) or {}


def engines_of(st: dict[str, Any], state: str | None = None) -> list[dict[str, Any]]:
    return [e for e in st["engines"] if state is None or e["state"] == state]


@pytest.fixture
def etcd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A real etcd: one member, or as many as ``parametrize("etcd", [3], indirect=True)``."""
    c = EtcdCluster(tmp_path / "etcd", size=getattr(request, "param", 1)).start()
    yield c
    c.stop()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    n = NatsServer(tmp_path).start()
    yield n
    n.stop()


@pytest.fixture
async def make_node(
    tmp_path: Path, etcd: EtcdCluster, nats: NatsServer, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[[str], Node]]:
    nodes: list[Node] = []

    def make(name: str, *, with_nats: bool = True) -> Node:
        n = Node(name, tmp_path / name, etcd, nats if with_nats else None, session)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        await anyio.to_thread.run_sync(n.close)


__all__ = ["Node", "engines_of", "sim_slot", "slot_record"]


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
