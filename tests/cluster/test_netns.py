"""A node in a network namespace of its own: its loopback and wildcard addresses are not
its peers', as on separate hosts. Skipped where namespaces cannot be made (not root)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.testing.cluster import ClusterNode, EtcdCluster, NatsServer
from supervisor.testing.netns import NetworkNamespace, namespace_unavailable
from tests.cluster.conftest import sim_slot, slot_record

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

_WHY_NOT = namespace_unavailable()


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    if _WHY_NOT:
        pytest.skip(f"no network namespace here: {_WHY_NOT}")
    with NetworkNamespace() as ns:
        yield ns


async def test_peers_probe_a_wildcard_admin_api_at_the_advertised_address(
    tmp_path: Path, etcd: EtcdCluster, nats: NatsServer, session: Any, netns: NetworkNamespace
) -> None:
    """node-a runs in its own namespace with its admin API on 0.0.0.0 (as on a real host)
    and advertises its address. When its heartbeats stop (its NATS link cut), node-b
    probes the admin API it was told of, and gets an answer: 0.0.0.0 or 127.0.0.1 would
    be node-b's own machine, where nothing answers."""
    a = ClusterNode("node-a", tmp_path / "node-a", etcd, nats, session, netns=netns)
    b = ClusterNode("node-b", tmp_path / "node-b", etcd, nats, session, "127.0.0.3")
    try:
        token = tmp_path / "admin-token"
        token.write_text("s3cret-for-the-test\n")
        token.chmod(0o600)
        await a.start(
            [sim_slot("chat", shadows=0)], admin={"host": "0.0.0.0", "token_file": str(token)}
        )
        await b.start([sim_slot("chat", shadows=1, hosts="shadows")])
        st = await b.wait(
            lambda s: (
                slot_record(s, "chat").get("epoch") == 1
                and s["cluster"]["peers"].get("node-a") == "alive"
            ),
            what="slot claimed by node-a, node-a heard",
        )
        assert slot_record(st, "chat")["active"].startswith("node-a.")
        assert a.nats_link is not None
        a.nats_link.black_hole()
        await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "suspect", what="suspect")
        await anyio.sleep(1.5)  # many probes, each answered or not
        assert "its admin API does not answer" not in b.logs(), b.logs()[-3000:]
        st = await b.status()
        assert st["cluster"]["peers"].get("node-a") == "suspect"  # silent, but not dead
        assert slot_record(st, "chat")["epoch"] == 1
    finally:
        for n in (a, b):
            await anyio.to_thread.run_sync(n.close)
