"""Three supervisor nodes against real etcd and nats-server, with simulated engines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import orjson
import pytest

from supervisor.coordination.etcd import EtcdClient
from supervisor.engines import group_alive
from supervisor.testing.cluster import FAST_SIM_ARGS, ActiveWatch, EtcdCluster, NatsServer
from tests.cluster.conftest import (
    Node,
    assert_epochs_unique,
    engines_of,
    sim_slot,
    slot_history,
    slot_record,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def active_and_pooled_shadow(
    make_node: Callable[[str], Node],
    *,
    a_shadows: int = 0,
    sim_args: Any = None,
    policy: str = "keep-serving",
    lease_ttl: float = 2,
) -> tuple[Node, Node]:
    """node-a serves slot "chat"; node-b keeps a pooled shadow of it. Returns once the slot
    is claimed at epoch 1 and node-b hears node-a."""
    extra = {"sim_args": sim_args} if sim_args else {}
    a, b = make_node("node-a"), make_node("node-b")
    cluster = {"etcd_unreachable": policy, "lease_ttl": lease_ttl}
    await a.start([sim_slot("chat", shadows=a_shadows, **extra)], cluster=cluster)
    await b.start([sim_slot("chat", shadows=1, hosts="shadows", **extra)], cluster=cluster)
    await b.wait(
        lambda s: (
            slot_record(s, "chat").get("epoch") == 1
            and s["cluster"]["peers"].get("node-a") == "alive"
        ),
        what="slot claimed by node-a, node-a heard",
    )
    return a, b


async def test_node_loss_promotes_shadow_on_another_node(
    make_node: Callable[[str], Node],
) -> None:
    a, b, c = make_node("node-a"), make_node("node-b"), make_node("node-c")
    await a.start([sim_slot("chat", shadows=0)])
    await b.start([sim_slot("chat", shadows=1, hosts="shadows")])
    await c.start([sim_slot("chat", shadows=1, hosts="shadows")])
    st = await b.wait(
        lambda s: (
            slot_record(s, "chat").get("epoch") == 1
            and s["cluster"]["peers"] == {"node-a": "alive", "node-c": "alive"}
        ),
        what="slot claimed by node-a and peers seen",
    )
    assert slot_record(st, "chat")["active"].startswith("node-a.")
    a_st = await a.status()
    pids = [e["pid"] for e in engines_of(a_st)]
    a.kill(pids)
    st = await b.wait(
        lambda s: (
            slot_record(s, "chat").get("epoch") == 2
            and s["cluster"]["peers"].get("node-a") == "dead"
        ),
        what="slot promoted on another node",
    )
    new_active = slot_record(st, "chat")["active"]
    assert new_active.startswith(("node-b.", "node-c.")), new_active
    shown = await anyio.to_thread.run_sync(
        lambda: (
            subprocess.run(
                [sys.executable, "-m", "supervisor", "status", "--admin", b.admin],
                capture_output=True,
                text=True,
            ).stdout
        )
    )
    assert "node-a=dead" in shown and f"epoch 2, {new_active}" in shown, shown
    owner = b if new_active.startswith("node-b.") else c
    await owner.wait(
        lambda s: any(e["id"] == new_active and e["state"] == "active" for e in s["engines"]),
        what="the chosen shadow awake",
    )


async def _stream_text(session: Any, url: str, prompt: str, max_tokens: int) -> str:
    body = {
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
    }
    text = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text.append(chunk["choices"][0].get("text", ""))
    return "".join(text)


async def test_stream_migrates_across_nodes_when_its_node_dies(
    make_node: Callable[[str], Node], session: Any
) -> None:
    slow = ["--sim-load-time", "0.05", "--sim-itl", "0.01", "--sim-wake-time", "0.05"]
    a, b = await active_and_pooled_shadow(make_node, sim_args=slow)
    assert b.sup is not None
    # Through node-b's frontend, served by node-a's engine, which dies mid-stream.
    pids = [e["pid"] for e in engines_of(await a.status())]
    async with anyio.create_task_group() as tg:
        result: list[str] = []

        async def client() -> None:
            result.append(await _stream_text(session, b.sup.frontend_url, "tell me a story", 300))

        tg.start_soon(client)
        await anyio.sleep(0.8)
        a.kill(pids)
    st = await b.status()
    assert slot_record(st, "chat")["active"].startswith("node-b.")
    unbroken = await _stream_text(session, b.sup.frontend_url, "tell me a story", 300)
    assert result[0] == unbroken  # no token lost or repeated across the node loss
    metrics = await (await session.get(b.admin + "/metrics")).text()
    assert "failover_supervisor_migrations_total{" in metrics


async def test_whole_group_fails_over_as_one(
    make_node: Callable[[str], Node], session: Any
) -> None:
    a, b = make_node("node-a"), make_node("node-b")
    await a.start([sim_slot("big", shadows=1, group_size=2, group_rank=0)])
    await b.start([sim_slot("big", shadows=1, group_size=2, group_rank=1)])
    st = await a.wait(
        lambda s: slot_record(s, "big").get("epoch") == 1, what="group claimed by the leader"
    )
    group = slot_record(st, "big")["active"]
    assert group.startswith("big:lane")
    b_st = await b.status()
    member = next(e for e in b_st["engines"] if e["state"] == "active")
    assert member["group"] == group
    os.killpg(member["pid"], signal.SIGKILL)  # one member dies: the whole group must move
    st = await a.wait(
        lambda s: (
            slot_record(s, "big").get("epoch") == 2
            and any(e["state"] == "active" and e["group"] != group for e in s["engines"])
        ),
        what="the shadow group promoted on node-a",
    )
    new_group = slot_record(st, "big")["active"]
    assert new_group != group
    # node-a's member of the old group was stopped: a group is never half-served.
    assert not [e for e in st["engines"] if e["group"] == group and e["state"] == "active"]
    await b.wait(
        lambda s: any(e["state"] == "active" and e["group"] == new_group for e in s["engines"]),
        what="node-b's member of the new group awake",
    )
    assert b.sup is not None
    text = await _stream_text(session, b.sup.frontend_url, "hello group", 20)
    assert text
    assert_epochs_unique(await slot_history(a.etcd_endpoints, session))


async def test_nats_restart_causes_no_failover(
    make_node: Callable[[str], Node], nats: NatsServer
) -> None:
    a, b = await active_and_pooled_shadow(make_node)
    nats.stop()
    await anyio.sleep(1.5)  # far past the suspect window (3 x 0.1 s)
    nats.start()
    await b.wait(lambda s: s["cluster"]["nats_connected"] is True, what="NATS back on node-b")
    await anyio.sleep(1.0)  # heartbeats flow again
    for n in (a, b):
        st = await n.status()
        assert slot_record(st, "chat")["epoch"] == 1
        assert all(state == "alive" for state in st["cluster"]["peers"].values()), st["cluster"]
    assert "peer confirmed dead" not in (a.logs() + b.logs())


async def nats_link_fails(a: Node, b: Node, *, half_open: bool) -> None:
    """node-a's NATS link is cut (or goes half-open), until node-b suspects node-a."""
    assert a.nats_link is not None
    if half_open:
        a.nats_link.black_hole()
    else:
        a.nats_link.cut()
    await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "suspect", what="node-a suspect")


async def nats_link_heals(a: Node, b: Node) -> None:
    assert a.nats_link is not None
    a.nats_link.heal()
    await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "alive", what="heard again")


async def test_partition_from_nats_only_makes_suspect_not_dead(
    make_node: Callable[[str], Node],
) -> None:
    a, b = await active_and_pooled_shadow(make_node)
    await nats_link_fails(a, b, half_open=False)
    await anyio.sleep(1.5)
    st = await b.status()
    assert st["cluster"]["peers"]["node-a"] == "suspect"  # its lease and admin API say alive
    assert slot_record(st, "chat")["epoch"] == 1
    await nats_link_heals(a, b)


async def test_partition_from_etcd_no_split_brain_and_rejoin(
    make_node: Callable[[str], Node], session: Any
) -> None:
    a, b = await active_and_pooled_shadow(make_node)
    for link in a.etcd_links:
        link.cut()
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="node-a cut off")
    await anyio.sleep(3.5)  # node-a's lease (2 s) expires meanwhile
    st = await b.status()
    assert "node-a" not in st["cluster"]["peers"] or st["cluster"]["peers"]["node-a"] != "dead"
    assert slot_record(st, "chat")["epoch"] == 1  # no promotion: node-a is heard on NATS
    assert any(e["state"] == "sleeping" for e in st["engines"])
    assert a.sup is not None
    assert await _stream_text(session, a.sup.frontend_url, "still serving", 5)
    for link in a.etcd_links:
        link.heal()
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is True, what="node-a back")
    await b.wait(
        lambda s: s["cluster"]["peers"].get("node-a") == "alive", what="node-a registered again"
    )
    st = await a.status()
    assert slot_record(st, "chat")["epoch"] == 1
    assert any(e["state"] == "active" for e in st["engines"])
    assert_epochs_unique(await slot_history(a.etcd_endpoints, session))


@pytest.mark.etcd_ha
@pytest.mark.parametrize("etcd", [3], indirect=True)
async def test_etcd_member_loss_causes_no_failover(
    make_node: Callable[[str], Node], etcd: EtcdCluster, session: Any
) -> None:
    a, b = await active_and_pooled_shadow(make_node)
    assert a.sup is not None
    leader = etcd.leader()
    assert leader is not None
    leader.kill()  # a new etcd leader is elected among the other two
    await anyio.sleep(1.5)
    assert await _stream_text(session, a.sup.frontend_url, "during an election", 5)
    follower = next(m for m in etcd.members if m.running and m is not etcd.leader())
    follower.kill()  # one member of three left: no quorum, etcd cannot answer at all
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="quorum lost")
    await anyio.sleep(2.5)  # longer than the lease TTL
    assert await _stream_text(session, a.sup.frontend_url, "without quorum", 5)
    etcd.start_member(leader)
    etcd.start_member(follower)
    await anyio.to_thread.run_sync(etcd.wait_healthy)
    for n in (a, b):
        await n.wait(lambda s: s["cluster"]["etcd_reachable"] is True, what="etcd back")
    await anyio.sleep(1.0)
    for n in (a, b):
        st = await n.status()
        assert slot_record(st, "chat")["epoch"] == 1, st["cluster"]
        assert all(v == "alive" for v in st["cluster"]["peers"].values()), st["cluster"]
    assert "peer confirmed dead" not in a.logs() + b.logs()
    assert "leader: promoting" not in a.logs() + b.logs()
    history = await slot_history(etcd.endpoints, session)
    assert [h[2] for h in history] == [1]
    assert_epochs_unique(history)


@pytest.mark.parametrize("policy", ["keep-serving", "demote"])
async def test_full_partition_fails_over_and_old_owner_steps_down_on_rejoin(
    make_node: Callable[[str], Node], session: Any, policy: str
) -> None:
    """node-a is cut off from etcd and NATS long enough for its lease to expire; node-b
    promotes its shadow. An outside watch samples both nodes throughout: under demote, node-a
    stopped serving before node-b started, so no moment has two engines serving the slot;
    under keep-serving, node-a serves on until it rejoins and steps down."""
    a, b = await active_and_pooled_shadow(make_node, policy=policy)
    assert a.nats_link is not None
    watch = ActiveWatch([a, b], session)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        for link in [*a.etcd_links, a.nats_link]:
            link.cut()  # node-a is alone: no etcd, no NATS
        if policy == "demote":
            await a.wait(lambda s: s["cluster"]["demoted"], what="node-a demoted")
        st = await b.wait(
            lambda s: slot_record(s, "chat").get("epoch") == 2,
            timeout=15,
            what="node-b promoted after node-a's lease expired",
        )
        assert slot_record(st, "chat")["active"].startswith("node-b.")
        a_st = await a.status()
        assert slot_record(a_st, "chat")["epoch"] == 1  # node-a cannot know yet
        await anyio.sleep(0.5)
        for link in [*a.etcd_links, a.nats_link]:
            link.heal()
        healed = time.monotonic()
        a_st = await a.wait(
            lambda s: (
                not [e for e in s["engines"] if e["state"] == "active"]
                and slot_record(s, "chat").get("epoch") == 2
                and not s["cluster"]["demoted"]
            ),
            what="node-a stepped down after rejoining",
        )
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert "on step_down: fenced at epoch 2" in a.logs()
    assert_epochs_unique(await slot_history(a.etcd_endpoints, session))
    windows = watch.windows()
    print(f"{policy}: longest double-active window {watch.longest() * 1000:.0f} ms")
    if policy == "demote":
        assert windows == [], windows
        assert "demoting: our lease went unrenewed" in a.logs()
    else:
        assert windows, "keep-serving: node-a serves on while node-b serves too"
        assert all(end - healed < 5 for _, end, _ in windows), (windows, healed)


async def test_local_failover_while_etcd_is_unreachable_is_recorded_later(
    make_node: Callable[[str], Node], session: Any
) -> None:
    a, b = await active_and_pooled_shadow(make_node, a_shadows=1)  # + a paired shadow on a
    st = await a.status()
    active = next(e for e in st["engines"] if e["state"] == "active")
    for link in a.etcd_links:
        link.cut()
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="node-a cut off")
    os.killpg(active["pid"], signal.SIGKILL)
    st = await a.wait(
        lambda s: any(e["state"] == "active" and e["id"] != active["id"] for e in s["engines"]),
        what="local failover without etcd (policy keep-serving)",
    )
    assert st["cluster"]["pending_claims"] == ["chat"]
    promoted = next(e["id"] for e in st["engines"] if e["state"] == "active")
    for link in a.etcd_links:
        link.heal()
    st = await b.wait(
        lambda s: (
            slot_record(s, "chat") == {**slot_record(s, "chat"), "epoch": 2, "active": promoted}
        ),
        what="the deferred epoch recorded in etcd",
    )
    assert "etcd unreachable: promoting on this node now" in a.logs()
    assert_epochs_unique(await slot_history(a.etcd_endpoints, session))


async def test_leader_does_not_move_a_paused_nodes_slot(
    make_node: Callable[[str], Node], session: Any
) -> None:
    """Maintenance on node-a (paused for 6 s, then it goes down, as for a reboot): the
    leader leaves its slot alone while the pause lasts, and moves it once the pause ends."""
    a, b = await active_and_pooled_shadow(make_node)
    async with session.post(a.admin + "/pause", json={"reason": "reboot", "for": 6}) as r:
        assert r.status == 200, await r.text()
    st = await b.wait(
        lambda s: "node-a" in (s["cluster"].get("paused") or {}), what="node-a's pause seen"
    )
    a.kill([e["pid"] for e in engines_of(await a.status())])
    st = await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "dead", what="node-a dead")
    await anyio.sleep(1.0)  # the leader would have promoted by now
    st = await b.status()
    assert slot_record(st, "chat")["epoch"] == 1, slot_record(st, "chat")
    assert "its node is paused" in b.logs()
    st = await b.wait(
        lambda s: slot_record(s, "chat").get("epoch") == 2, what="promotion after the pause"
    )
    assert slot_record(st, "chat")["active"].startswith("node-b.")


async def test_malformed_keys_under_the_prefix_stop_no_node(
    make_node: Callable[[str], Node], etcd: EtcdCluster, session: Any
) -> None:
    """Another program's (or a half-written) value under the cluster's prefix is named in
    the log and left out; the nodes keep serving and failing over."""
    a, b = await active_and_pooled_shadow(make_node, a_shadows=1)
    client = EtcdClient(etcd.endpoints, session)
    for key, value in [
        ("engines/bogus", b"not json {"),
        ("nodes/bogus", b"[1, 2]"),
        ("slots/other", b'"a string"'),
        ("paused/bogus", b"\xff\xfe"),
    ]:
        await client.put(f"/failover-supervisor/test/{key}".encode(), value)
    await anyio.sleep(0.5)
    for n in (a, b):
        assert n.sup is not None and n.sup.proc.poll() is None, n.logs()[-2000:]
        assert "does not parse" in n.logs()
    st = await a.status()
    active = next(e for e in engines_of(st) if e["state"] == "active")
    os.killpg(active["pid"], signal.SIGKILL)  # the node still fails over
    await a.wait(lambda s: slot_record(s, "chat").get("epoch") == 2, what="a local failover")


async def test_a_watch_backlog_of_2000_large_puts_stops_no_node(
    make_node: Callable[[str], Node], etcd: EtcdCluster, session: Any
) -> None:
    """node-b is cut off from etcd while 2,000 engine-sized values are written under the
    prefix (about 1.5 MiB). On heal its watch resumes and gets them as one message: it
    reads them, stays up, and sees what changed after them (node-a paused)."""
    a, b = await active_and_pooled_shadow(make_node, lease_ttl=10)
    for link in b.etcd_links:
        link.cut()
    await b.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="node-b cut off")
    client = EtcdClient(etcd.endpoints, session, timeout=5)
    value = orjson.dumps({"node": "node-z", "slot": "pad", "pad": "p" * 600})
    for i in range(2000):
        await client.put(f"/failover-supervisor/test/engines/node-z.pad{i % 20}".encode(), value)
    async with session.post(a.admin + "/pause", json={"reason": "backlog test"}) as r:
        assert r.status == 200, await r.text()
    for link in b.etcd_links:
        link.heal()
    await b.wait(
        lambda s: "node-a" in (s["cluster"].get("paused") or {}),
        what="node-b's watch past the backlog",
        timeout=30,
    )
    assert b.sup is not None and b.sup.proc.poll() is None, b.logs()[-2000:]
    assert "Traceback" not in b.logs()


async def test_whole_cluster_restart_without_one_node_moves_its_slot(
    make_node: Callable[[str], Node],
) -> None:
    """Both nodes go down; only node-b comes back. node-a was never heard on NATS by the
    new node-b, but its lease is gone: it is dead, and its slot moves to node-b."""
    a, b = await active_and_pooled_shadow(make_node)
    for n in (a, b):
        n.kill([e["pid"] for e in engines_of(await n.status())])
    await anyio.sleep(3.0)  # every lease (2 s) has expired
    await b.start([sim_slot("chat", shadows=1, hosts="shadows")])
    st = await b.wait(
        lambda s: slot_record(s, "chat").get("epoch") == 2, what="node-a's slot moved"
    )
    assert slot_record(st, "chat")["active"].startswith("node-b.")
    assert st["cluster"]["peers"].get("node-a") in (None, "dead")


async def test_a_stalled_leader_whose_lease_lives_is_not_declared_dead(
    make_node: Callable[[str], Node],
) -> None:
    """node-a (the leader, serving the slot) stalls for 1.5 s (SIGSTOP): its heartbeats stop
    and its admin API does not answer, but its lease (3 s) lives, so nobody declares it
    dead or moves its slot (which would leave two actives once it wakes)."""
    a, b = await active_and_pooled_shadow(make_node, lease_ttl=3)
    await b.wait(lambda s: s["cluster"]["leader"] == "node-a", what="node-a leads")
    assert a.sup is not None
    a.sup.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "suspect", what="suspect")
        await anyio.sleep(max(0.0, 1.5 - (time.monotonic() - stopped)))
    finally:
        a.sup.proc.send_signal(signal.SIGCONT)
    await b.wait(lambda s: s["cluster"]["peers"].get("node-a") == "alive", what="heard again")
    st = await b.status()
    assert slot_record(st, "chat")["epoch"] == 1
    assert st["cluster"]["leader"] == "node-a"
    assert "peer confirmed dead" not in b.logs()
    assert not engines_of(st, "active")  # node-b's shadow was not woken


async def test_a_keepalive_lost_on_a_dead_connection_does_not_cost_the_lease(
    make_node: Callable[[str], Node],
) -> None:
    """Every connection node-a has open to etcd goes silent at once, as when a NAT or
    conntrack entry is lost; new connections work. The keep-alive on a dead connection
    times out a third of the TTL after it was sent. The next one must go at once, on a
    connection that works: a retry a third of the TTL later lands at the lease's expiry,
    and one on another dead pooled connection times out too. Either way node-a would drop
    out of the cluster while nothing is wrong with it."""
    a, b = await active_and_pooled_shadow(make_node)
    try:
        for link in a.etcd_links:
            link.black_hole(existing_only=True)
        await anyio.sleep(4.0)  # two TTLs
        assert "our lease expired" not in a.logs()
        st = await b.status()
        assert st["cluster"]["peers"].get("node-a") == "alive"
        assert slot_record(st, "chat")["epoch"] == 1
    finally:
        for link in a.etcd_links:
            link.heal()


async def test_a_promotion_refused_without_etcd_is_made_once_etcd_is_back(
    make_node: Callable[[str], Node],
) -> None:
    """Policy stop-promoting: node-a's active engine dies while etcd is unreachable. The
    slot is degraded, saying why (not quietly on standby), and its shadow is promoted as
    soon as etcd answers again."""
    a, _ = await active_and_pooled_shadow(make_node, a_shadows=1, policy="stop-promoting")
    st = await a.status()
    active = next(e for e in st["engines"] if e["state"] == "active")
    for link in a.etcd_links:
        link.cut()
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="node-a cut off")
    os.killpg(active["pid"], signal.SIGKILL)
    st = await a.wait(
        lambda s: s["slots"][0]["degraded"] and "etcd" in s["slots"][0]["degraded_reason"],
        what="the slot degraded, waiting for etcd",
    )
    assert st["slots"][0]["phase"] == "degraded"
    for link in a.etcd_links:
        link.heal()
    st = await a.wait(
        lambda s: (
            any(e["state"] == "active" for e in s["engines"])
            and slot_record(s, "chat").get("epoch") == 2
        ),
        what="the shadow promoted once etcd is back",
    )
    assert slot_record(st, "chat")["active"].startswith("node-a.")


async def test_a_silent_watch_does_not_keep_a_moved_slot_served(
    make_node: Callable[[str], Node], etcd: EtcdCluster, session: Any
) -> None:
    """node-a's open connections to etcd go silent (its watch among them) while new ones
    work, so its keep-alives go on and its lease lives. The slot moves to node-b's shadow
    meanwhile (written to etcd as a promotion node-a never hears of). node-a notices from
    a direct read and steps down: two engines serve the slot only for a bounded time."""
    a, b = await active_and_pooled_shadow(make_node)
    shadow = next(e["id"] for e in engines_of(await b.status(), "sleeping"))
    watch = ActiveWatch([a, b], session)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        for link in a.etcd_links:
            link.black_hole(existing_only=True)
        client = EtcdClient(etcd.endpoints, session)
        key = b"/failover-supervisor/test/slots/chat"
        record = {"epoch": 2, "active": shadow, "nodes": ["node-b"], "by": "test", "reason": "t"}
        await client.put(key, json.dumps(record).encode())
        await b.wait(lambda s: bool(engines_of(s, "active")), what="node-b serving")
        st = await a.wait(
            lambda s: not engines_of(s, "active"), timeout=15, what="node-a stepped down"
        )
        assert st["cluster"]["etcd_reachable"]  # its lease lived all along
        tg.cancel_scope.cancel()
    assert "the watch is silent" in a.logs()
    print(f"silent watch: longest double-active window {watch.longest() * 1000:.0f} ms")
    assert watch.longest() < 3 * 2, watch.windows()  # within a few lease TTLs (2 s)
    for link in a.etcd_links:
        link.heal()


async def test_claims_made_in_a_partition_do_not_overwrite_the_leaders_promotion(
    make_node: Callable[[str], Node], session: Any
) -> None:
    """node-a, cut off from etcd and NATS, fails over twice on its own (claims at epochs 2
    and 3, kept until etcd is back) while the leader promotes node-b's shadow at epoch 2.
    On healing, node-a's claims lose (the slot was written since they were made), node-a
    steps down, and node-b keeps the slot."""
    a, b = await active_and_pooled_shadow(make_node, a_shadows=2)
    assert a.nats_link is not None
    for link in [*a.etcd_links, a.nats_link]:
        link.cut()
    st = await b.wait(
        lambda s: slot_record(s, "chat").get("epoch") == 2, timeout=15, what="node-b promoted"
    )
    b_unit = slot_record(st, "chat")["active"]
    for _ in range(2):  # two local failovers on node-a, without etcd
        st = await a.status()
        victim = next(e for e in engines_of(st, "active"))
        os.killpg(victim["pid"], signal.SIGKILL)
        await a.wait(
            lambda s, v=victim["id"]: any(e["id"] != v for e in engines_of(s, "active")),
            what="a local failover on node-a",
        )
    assert (await a.status())["cluster"]["pending_claims"] == ["chat"]
    for link in [*a.etcd_links, a.nats_link]:
        link.heal()
    await a.wait(lambda s: not engines_of(s, "active"), what="node-a stepped down")
    st = await b.status()
    assert slot_record(st, "chat")["active"] == b_unit
    assert engines_of(st, "active")
    assert "our promotion during the etcd outage lost" in a.logs()
    assert_epochs_unique(await slot_history(a.etcd_endpoints, session))


async def test_a_node_restarted_within_its_ttl_does_not_keep_its_seniority(
    make_node: Callable[[str], Node],
) -> None:
    """node-a (the leader: it joined first) restarts within its lease's TTL. Its new run
    campaigns afresh: its election key is younger than node-b's now, so node-b leads."""
    a, b = await active_and_pooled_shadow(make_node)
    await b.wait(lambda s: s["cluster"]["leader"] == "node-a", what="node-a leads")
    assert a.sup is not None
    a.sup.proc.kill()  # its engines run on; the next run adopts them
    a.sup.proc.wait()
    await a.start([sim_slot("chat", shadows=0)], cluster={"etcd_unreachable": "keep-serving"})
    st = await b.wait(lambda s: s["cluster"]["leader"] == "node-b", what="node-b leads")
    assert slot_record(st, "chat")["epoch"] == 1  # nothing moved meanwhile


async def test_a_half_open_nats_link_makes_its_own_node_suspect_nobody(
    make_node: Callable[[str], Node],
) -> None:
    """node-a's NATS connection goes half-open (open, nothing forwarded): its client thinks
    it is connected for seconds. Its own beats stop coming back, so node-a knows the fault
    is its own and suspects nobody; node-b suspects node-a, but its lease lives: nothing
    moves."""
    a, b = await active_and_pooled_shadow(make_node)
    await nats_link_fails(a, b, half_open=True)
    await anyio.sleep(1.0)
    st = await a.status()
    assert st["cluster"]["peers"].get("node-b") == "alive", st["cluster"]
    assert "our own beats do not come back" in a.logs()
    assert slot_record(await b.status(), "chat")["epoch"] == 1
    await nats_link_heals(a, b)


async def test_demote_under_a_one_way_link_keeps_one_active(
    make_node: Callable[[str], Node], session: Any
) -> None:
    """Policy demote, node-a's link to etcd one-way: its keep-alives reach etcd (the lease
    lives) but the answers are lost. node-a cannot know its lease lives, so it demotes; no
    peer promotes (the lease lives). Once healed, a fresh read shows the slot still its own
    and it serves again. At no moment do two engines serve the slot."""
    a, b = await active_and_pooled_shadow(make_node, policy="demote")
    watch = ActiveWatch([a, b], session)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        for link in a.etcd_links:
            link.one_way("from_target")
        await a.wait(lambda s: s["cluster"]["demoted"], what="node-a demoted")
        await anyio.sleep(2.0)
        assert slot_record(await b.status(), "chat")["epoch"] == 1  # nobody promoted
        for link in a.etcd_links:
            link.heal()
        await a.wait(
            lambda s: not s["cluster"]["demoted"] and bool(engines_of(s, "active")),
            what="node-a serving again",
        )
        tg.cancel_scope.cancel()
    assert watch.windows() == []
    assert "serving again: etcd confirmed this node's slots" in a.logs()


async def test_a_slow_link_to_etcd_changes_nothing(make_node: Callable[[str], Node]) -> None:
    """250 ms each way on node-a's etcd link (slower than etcd ever is, within the call
    deadline): its lease is kept, nothing is failed over, it stays the slot's owner."""
    a, b = await active_and_pooled_shadow(make_node)
    for link in a.etcd_links:
        link.delay(0.25)
    await anyio.sleep(4.0)  # two TTLs
    for link in a.etcd_links:
        link.heal()
    assert "our lease expired" not in a.logs()
    st = await b.status()
    assert slot_record(st, "chat")["epoch"] == 1 and st["cluster"]["peers"]["node-a"] == "alive"


async def test_a_hand_over_made_without_etcd_reaches_the_leader_later(
    make_node: Callable[[str], Node],
) -> None:
    """node-a's shadows cannot start (a bad flag), so when its active engine dies while etcd
    is unreachable it has nothing to promote and hands the slot over. The hand-over waits
    for etcd; once it is back, the leader promotes node-b's shadow."""
    a, b = make_node("node-a"), make_node("node-b")
    await a.start([sim_slot("chat", shadows=1, shadow_extra_args=["--sim-no-such-flag"])])
    await b.start([sim_slot("chat", shadows=1, hosts="shadows")])
    await b.wait(
        lambda s: slot_record(s, "chat").get("epoch") == 1 and bool(engines_of(s, "sleeping")),
        what="node-a serving, node-b's shadow asleep",
    )
    for link in a.etcd_links:
        link.cut()
    await a.wait(lambda s: s["cluster"]["etcd_reachable"] is False, what="node-a cut off")
    active = engines_of(await a.status(), "active")[0]
    os.killpg(active["pid"], signal.SIGKILL)
    await a.wait(lambda s: "made once it is back" in a.logs(), what="the deferred hand-over")
    for link in a.etcd_links:
        link.heal()
    st = await b.wait(
        lambda s: slot_record(s, "chat").get("epoch") == 2 and bool(engines_of(s, "active")),
        what="node-b's shadow promoted by the leader",
    )
    assert slot_record(st, "chat")["active"].startswith("node-b.")


async def test_sigterm_while_a_cluster_ordered_promotion_wakes_stops_cleanly(
    make_node: Callable[[str], Node],
) -> None:
    # The leader makes node-b's shadow the slot's active engine; node-b is told to stop
    # while that shadow still wakes (5 s). Its stop ends the wake: the daemon must stop as
    # on any other day (exit 0, no traceback), stop the slot once, and leave no engine.
    slow_wake = [*FAST_SIM_ARGS, "--sim-wake-time", "5"]
    a, b = await active_and_pooled_shadow(make_node, sim_args=slow_wake)
    assert b.sup is not None
    a.kill([e["pid"] for e in engines_of(await a.status())])
    st = await b.wait(
        lambda s: any(e["state"] == "waking" for e in engines_of(s)),
        what="node-b's shadow waking for the cluster",
    )
    pids = [e["pid"] for e in engines_of(st) if e["pid"]]
    assert pids
    b.sup.proc.send_signal(signal.SIGTERM)
    rc = await anyio.to_thread.run_sync(lambda: b.sup.proc.wait(timeout=40) if b.sup else None)
    logs = b.logs()
    assert rc == 0, logs[-6000:]
    assert "Traceback" not in logs, logs[-6000:]
    assert "promotes" in logs and "the supervisor is shutting down" in logs, logs[-6000:]
    assert len([ln for ln in logs.splitlines() if "-> stopped on stop" in ln]) == 1, logs[-6000:]
    assert [p for p in pids if group_alive(p)] == [], logs[-6000:]
