"""Fixtures for multi-node tests: real etcd and nats-server, supervisors as processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import (
    ClusterNode,
    EtcdCluster,
    NatsServer,
    assert_epochs_unique,
    sim_slot,
    slot_history,
)

Node = ClusterNode  # the tests' name for it


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
        # Each node on an address of its own: 127.0.0.2, 127.0.0.3, ...
        host = f"127.0.0.{len(nodes) + 2}"
        n = Node(name, tmp_path / name, etcd, nats if with_nats else None, session, host)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        await anyio.to_thread.run_sync(n.close)


__all__ = [
    "Node",
    "assert_epochs_unique",
    "engines_of",
    "sim_slot",
    "slot_history",
    "slot_record",
]
