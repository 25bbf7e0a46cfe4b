"""The etcd client and the heartbeats against real etcd and nats-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from supervisor.coordination import etcd as etcd_module
from supervisor.coordination.etcd import (
    Compare,
    EtcdClient,
    EtcdUnavailable,
    LeaseExpired,
    WatchOverflow,
    prefix_end,
    put_op,
)
from supervisor.coordination.nats import WATCHERS, Heartbeats, ring_predecessors
from supervisor.testing.cluster import EtcdCluster, NatsServer, free_port
from tests.unit.test_coordination import coordinator

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd").start()
    yield c
    c.stop()


async def test_kv_txn_and_fencing(etcd: EtcdCluster, session: aiohttp.ClientSession) -> None:
    c = EtcdClient(etcd.endpoints, session)
    rev = await c.put(b"/t/slot", b"1")
    kv = await c.get(b"/t/slot")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev
    # Conditioned on the revision we read: the first writer wins, the second is fenced.
    first = await c.txn([Compare(b"/t/slot", "MOD", "EQUAL", rev)], [put_op(b"/t/slot", b"2")])
    second = await c.txn([Compare(b"/t/slot", "MOD", "EQUAL", rev)], [put_op(b"/t/slot", b"3")])
    assert first.succeeded and not second.succeeded
    kvs, _ = await c.get_prefix(b"/t/")
    assert [k.value for k in kvs] == [b"2"]
    created = await c.txn([Compare(b"/t/new", "VERSION", "EQUAL", 0)], [put_op(b"/t/new", b"x")])
    assert created.succeeded


async def test_lease_expiry_removes_keys(etcd: EtcdCluster, session: aiohttp.ClientSession) -> None:
    c = EtcdClient(etcd.endpoints, session)
    lease = await c.grant(2)
    await c.put(b"/t/node", b"up", lease=lease)
    assert await c.keepalive(lease) >= 1
    await anyio.sleep(3.2)
    assert await c.get(b"/t/node") is None
    with pytest.raises(LeaseExpired):
        await c.keepalive(lease)


async def test_watch_resumes_after_an_etcd_restart(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    c = EtcdClient(etcd.endpoints, session, timeout=1)
    _, rev = await c.get_prefix(b"/w/")
    seen: list[bytes] = []
    broke = 0

    async def watch() -> None:
        nonlocal broke
        start = rev + 1
        while len(seen) < 2:
            try:
                async for _, events in c.watch_prefix(b"/w/", start):
                    for ev in events:
                        seen.append(ev.kv.value)
                        start = ev.kv.mod_revision + 1
            except EtcdUnavailable:
                broke += 1
                await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.sleep(0.3)
        await c.put(b"/w/a", b"before")
        await anyio.sleep(0.3)
        etcd.stop()
        etcd.start()
        await c.put(b"/w/a", b"after")  # the client retries until etcd answers
        with anyio.fail_after(10):
            while len(seen) < 2:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert seen == [b"before", b"after"] and broke >= 1


async def test_calls_end_at_their_deadline_when_etcd_is_gone(
    session: aiohttp.ClientSession,
) -> None:
    c = EtcdClient([f"http://127.0.0.1:{free_port()}"], session, timeout=0.5)
    t = time.monotonic()
    with pytest.raises(EtcdUnavailable, match=r"no answer within 0\.5s"):
        await c.put(b"k", b"v")
    assert time.monotonic() - t < 2


async def test_a_dead_endpoint_is_skipped(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    c = EtcdClient([dead, *etcd.endpoints], session, timeout=2)
    for _ in range(4):  # whichever endpoint it starts at, calls succeed
        await c.put(b"k", b"v")


async def test_heartbeats_see_peers_and_a_silent_one_becomes_suspect(tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    changes: list[tuple[str, bool]] = []
    try:
        a = Heartbeats(
            [server.url], "t", "a", interval=0.05, suspect_after=3,
            snapshot=lambda: {"admin": "http://127.0.0.1:8470"},
            on_change=lambda n, s: changes.append((n, s)),
        )  # fmt: skip
        b = Heartbeats([server.url], "t", "b", interval=0.05, suspect_after=3, snapshot=dict)
        a.judge(["b"])
        b.judge(["a"])
        async with anyio.create_task_group() as outer:
            outer.start_soon(a.run)
            async with anyio.create_task_group() as inner:
                inner.start_soon(b.run)
                with anyio.fail_after(5):
                    while not (a.heard_recently("b") and b.heard_recently("a")):
                        await anyio.sleep(0.02)
                assert b.peers["a"].admin == "http://127.0.0.1:8470"
                inner.cancel_scope.cancel()  # b goes silent
            with anyio.fail_after(5):
                while not a.is_suspect("b"):
                    await anyio.sleep(0.02)
            assert changes == [("b", True)]
            outer.cancel_scope.cancel()
    finally:
        server.stop()


async def test_each_beat_reaches_its_watchers_only_and_the_leader_hears_their_reports(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Twelve nodes, each judging its ring predecessors, the leader as well: the server (its
    own /varz) delivers each beat at most WATCHERS + 1 times (the watchers, the sender's
    own copy), to the leader no more than to any node. A node that stops is suspected by
    its watchers, and by the leader from their reports; heard again, it is cleared at the
    leader too."""
    server = NatsServer(tmp_path).start()
    names = [f"n{i:02d}" for i in range(12)]
    beats = {
        n: Heartbeats([server.url], "t", n, interval=0.05, suspect_after=3, snapshot=dict)
        for n in names
    }
    for n in names:
        beats[n].judge(ring_predecessors(names, n), leading=n == "n00")
    leader = beats["n00"]

    async def varz() -> tuple[int, int]:
        async with session.get(server.varz_url) as r:
            d = await r.json()
        return int(d["in_msgs"]), int(d["out_msgs"])

    try:
        async with anyio.create_task_group() as outer:
            for n in names:
                if n != "n05":
                    outer.start_soon(beats[n].run)
            async with anyio.create_task_group() as inner:
                inner.start_soon(beats["n05"].run)
                with anyio.fail_after(10):
                    while not (leader.heard_recently("n11") and beats["n07"].heard_recently("n05")):
                        await anyio.sleep(0.02)
                in0, out0 = await varz()
                await anyio.sleep(1.0)
                in1, out1 = await varz()
                inner.cancel_scope.cancel()  # n05 stops
            assert in1 - in0 > 100  # 12 nodes x 20 beats a second
            assert (out1 - out0) / (in1 - in0) <= WATCHERS + 1, (in1 - in0, out1 - out0)
            assert set(leader.peers) == {"n10", "n11"}  # the leader hears two nodes' beats
            assert set(beats["n09"].peers) == {"n07", "n08"}
            with anyio.fail_after(5):
                while not all(beats[n].is_suspect("n05") for n in ("n00", "n06", "n07")):
                    await anyio.sleep(0.02)
            assert "n05" not in beats["n09"].peers  # not one of its judges
            assert set(leader.reports["n05"]) == {"n06", "n07"}  # both watchers said so
            assert 0 < leader.last_heard("n05") < time.monotonic() - 0.15
            assert leader.suspects == {"n05"}
            async with anyio.create_task_group() as again:
                again.start_soon(beats["n05"].run)  # n05 is back
                with anyio.fail_after(5):
                    while leader.is_suspect("n05"):
                        await anyio.sleep(0.02)
                again.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        server.stop()


async def test_the_leader_hears_a_node_cut_off_from_etcd_and_only_such_a_node(
    tmp_path: Path,
) -> None:
    """A node whose etcd link fails beats where the leader listens: the leader, which
    judges neither node, hears that one (so its lease's expiry is not taken for its death)
    and not the other; and for its first moments as leader it cannot yet rule it out."""
    server = NatsServer(tmp_path).start()
    cut = {"b": True}
    leader = Heartbeats([server.url], "t", "a", interval=0.05, suspect_after=3, snapshot=dict)
    nodes = {
        n: Heartbeats(
            [server.url],
            "t",
            n,
            interval=0.05,
            suspect_after=3,
            snapshot=dict,
            cut_off=lambda n=n: cut.get(n, False),
        )
        for n in ("b", "c")
    }
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(leader.run)
            with anyio.fail_after(5):
                while not leader.connected:
                    await anyio.sleep(0.01)
            leader.judge((), leading=True)
            assert leader.may_be_cut_off()  # just became leader: it may not have heard yet
            for hb in nodes.values():
                tg.start_soon(hb.run)
            with anyio.fail_after(5):
                while not leader.heard_recently("b"):
                    await anyio.sleep(0.02)
            await anyio.sleep(0.5)
            assert not leader.may_be_cut_off()
            assert not leader.heard_recently("c")  # its etcd link works: it is not heard
            assert leader.peers == {}
            cut["b"] = False  # its link works again: no longer heard once its window passes
            with anyio.fail_after(5):
                while leader.heard_recently("b"):
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    finally:
        server.stop()


async def test_a_watch_backlog_of_2000_large_puts_is_read_whole(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    """A watch resumed from an old revision gets its whole backlog as one message (here
    about 1.5 MiB): it is read, not refused as a line too long."""
    c = EtcdClient(etcd.endpoints, session, timeout=5)
    first = await c.put(b"/t/start", b"x")
    value = b'{"node": "node-a", "state": "active", "pad": "' + b"p" * 600 + b'"}'
    async with anyio.create_task_group() as tg:
        for i in range(2000):
            tg.start_soon(c.put, f"/t/engines/e{i}".encode(), value)
    seen = 0
    with anyio.fail_after(30):
        async for _, events in c.watch_prefix(b"/t/engines/", first):
            seen += len(events)
            if seen >= 2000:
                break
    assert seen == 2000


async def test_a_watch_message_past_the_limit_asks_for_a_re_read(
    etcd: EtcdCluster, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the message limit the watch ends with WatchOverflow, not EtcdUnavailable:
    resuming from the same revision would fetch the same backlog again, for ever."""
    monkeypatch.setattr(etcd_module, "MAX_WATCH_MESSAGE", 64 * 1024)
    c = EtcdClient(etcd.endpoints, session, timeout=5)
    first = await c.put(b"/o/start", b"x")
    for i in range(200):
        await c.put(f"/o/engines/e{i}".encode(), b"p" * 700)
    with anyio.fail_after(10), pytest.raises(WatchOverflow):
        async for _ in c.watch_prefix(b"/o/engines/", first):
            pass


async def test_only_the_lowest_election_key_passes_the_leader_check(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    """The leader check in a promotion: every election key is as young as ours or younger
    (a range compare), so of two nodes that both think they lead, only one writes."""
    c = EtcdClient(etcd.endpoints, session)
    prefix = b"/t/election/"
    old = await c.put(prefix + b"a", b"a")
    young = await c.put(prefix + b"b", b"b")

    async def promote_as(create: int, value: bytes) -> bool:
        check = Compare(prefix, "CREATE", "GREATER", create - 1, range_end=prefix_end(prefix))
        res = await c.txn([check], [put_op(b"/t/slots/chat", value)])
        return bool(res.succeeded)

    assert not await promote_as(young, b"b")
    assert await promote_as(old, b"a")
    kv = await c.get(b"/t/slots/chat")
    assert kv is not None and kv.value == b"a"


async def test_two_publishers_at_once_do_not_trip_over_each_other(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    """The lease loop (re-registering) and the publish loop both publish this node's keys;
    run together, each deleting the keys that are no longer wanted, neither may fail."""
    c = coordinator(
        listening="http://127.0.0.1:8470",
        cluster={"etcd_endpoints": etcd.endpoints},
        session=session,
    )
    m = c.membership
    for round_ in range(20):
        stale = {c.ctx.key("engines", f"old-{round_}-{i}"): b"{}" for i in range(5)}
        for k, v in stale.items():
            await c.ctx.etcd.put(k, v)
        m._published.update(stale)
        async with anyio.create_task_group() as tg:
            tg.start_soon(m._publish)
            tg.start_soon(m._publish)
        assert not any(k in m._published for k in stale)


async def test_a_passes_promotions_go_in_one_transaction_and_a_fenced_one_holds_up_no_other(
    etcd: EtcdCluster, session: aiohttp.ClientSession
) -> None:
    """The leader writes a lost node's promotions together: one transaction, one revision
    for all of them. When one slot moved meanwhile, the batch is refused whole and each is
    tried alone: the others are promoted, the moved one is left as it now is."""
    from supervisor.coordination.view import SlotRecord

    cluster = {"etcd_endpoints": etcd.endpoints, "name": "t"}
    c = coordinator(node={"name": "lead"}, cluster=cluster, session=session)
    etcd_client, key = c.ctx.etcd, c.ctx.key
    c.membership.lease = await etcd_client.grant(10)
    rev = await etcd_client.put(key("election", "lead"), b"lead", lease=c.lease)
    c.view.election["lead"] = rev
    c.membership.etcd_ok = True
    seen: dict[str, SlotRecord] = {}
    for i in range(4):
        name = f"x{i}"
        rec = SlotRecord(1, f"gone.{name}-0", ["gone"], "gone", "start")
        rec.mod_revision = await etcd_client.put(key("slots", name), rec.as_json())
        seen[name] = rec
    for i in range(4):  # each slot's sleeping shadow on node b
        shadow = {"node": "b", "slot": f"x{i}", "unit": f"b.x{i}", "state": "sleeping"}
        c.view._set_engine(f"b.x{i}", shadow)

    async def records() -> dict[str, tuple[int, str, int]]:
        kvs, _ = await etcd_client.get_prefix(key("slots", ""))
        out = {}
        for kv in kvs:
            r = SlotRecord.parse(kv)
            out[kv.key.decode().rsplit("/", 1)[1]] = (r.epoch, str(r.active), kv.mod_revision)
        return out

    limit = anyio.CapacityLimiter(4)
    batch = [(f"x{i}", seen[f"x{i}"], f"b.x{i}", "gone is dead") for i in (0, 1)]
    await c.decisions._promote_together(batch, limit)
    after = await records()
    assert after["x0"][:2] == (2, "b.x0") and after["x1"][:2] == (2, "b.x1")
    assert after["x0"][2] == after["x1"][2]  # one transaction: one revision
    # x3 is moved by someone else first: the batch is refused; x2 is promoted alone.
    moved = SlotRecord(2, "other.x3-0", ["other"], "other", "handover")
    await etcd_client.put(key("slots", "x3"), moved.as_json())
    batch = [(f"x{i}", seen[f"x{i}"], f"b.x{i}", "gone is dead") for i in (2, 3)]
    await c.decisions._promote_together(batch, limit)
    after = await records()
    assert after["x2"][:2] == (2, "b.x2")
    assert after["x3"][:2] == (2, "other.x3-0")  # left as the other writer made it
    assert not c.fencing.acting
