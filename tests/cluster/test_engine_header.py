"""Which engine served, in a cluster: ``X-Failover-Node`` names the node whose engine
answered, through another node's frontend (real etcd and nats-server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.cluster.conftest import Node, engines_of, sim_slot, slot_record

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_the_engine_header_names_the_node_that_served(
    make_node: Callable[[str], Node], session: Any
) -> None:
    a, b = make_node("node-a"), make_node("node-b")
    fe = {"engine_header": True}
    await a.start([sim_slot("chat", shadows=0)], frontend=fe)
    await b.start([sim_slot("chat", shadows=1, hosts="shadows")], frontend=fe)
    await b.wait(
        lambda s: (
            slot_record(s, "chat").get("epoch") == 1
            and s["cluster"]["peers"].get("node-a") == "alive"
        ),
        what="slot claimed by node-a, node-a heard",
    )
    assert b.sup is not None
    served_by = [e["id"] for e in engines_of(await a.status()) if e["state"] == "active"]
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 3, "temperature": 0}
    for path, ask in (("/v1/completions", body), ("/tokenize", {"model": "sim-model"})):
        if path == "/tokenize":
            ask = {**ask, "prompt": "the river"}
        async with session.post(b.sup.frontend_url + path, json=ask) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Failover-Node"] == "node-a", path
            assert [r.headers["X-Failover-Engine"]] == served_by, path
    assert '"node": "node-a"' in b.sup.logs()
