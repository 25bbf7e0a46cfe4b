"""The pure parts of coordination: the cluster view, leader choice, suspicion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from supervisor.config import parse, warnings
from supervisor.coordination.cluster import ClusterCoordinator, ClusterView, SlotRecord
from supervisor.coordination.etcd import Compare, KeyValue, prefix_end
from supervisor.coordination.nats import Heartbeats
from supervisor.metrics import Metrics


def kv(key: str, value: object, create: int = 1, mod: int = 1) -> KeyValue:
    return KeyValue(key.encode(), orjson.dumps(value), create, mod, 1, 0)


def test_prefix_end_covers_exactly_the_prefix() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # every key


def test_compare_serialises_like_the_gateway_wants() -> None:
    assert Compare(b"k", "MOD", "EQUAL", 7).as_json() == {
        "key": "aw==",
        "target": "MOD",
        "result": "EQUAL",
        "mod_revision": "7",
    }


def test_view_leader_is_lowest_create_revision_and_skips_the_dead() -> None:
    v = ClusterView()
    v.apply("election/b", kv("x", "b", create=5), False)
    v.apply("election/a", kv("x", "a", create=9), False)
    v.apply("election/c", kv("x", "c", create=7), False)
    assert v.leader() == "b"
    assert v.leader(excluding={"b"}) == "c"
    v.apply("election/b", kv("x", "b"), True)
    assert v.leader() == "c"


def test_view_tracks_slots_and_units() -> None:
    v = ClusterView()
    v.apply("slots/chat", kv("x", {"epoch": 3, "active": "g:lane1"}, mod=42), False)
    rec = v.slots["chat"]
    assert (rec.epoch, rec.active, rec.mod_revision) == (3, "g:lane1", 42)
    v.apply("engines/a.chat-1", kv("x", {"slot": "chat", "unit": "g:lane1", "node": "a"}), False)
    v.apply("engines/b.chat-1", kv("x", {"slot": "chat", "unit": "g:lane1", "node": "b"}), False)
    v.apply("engines/b.chat-0", kv("x", {"slot": "chat", "unit": "g:lane0", "node": "b"}), False)
    assert sorted(e["node"] for e in v.unit_members("chat", "g:lane1")) == ["a", "b"]
    v.apply("engines/a.chat-1", kv("x", {}), True)
    assert [e["node"] for e in v.unit_members("chat", "g:lane1")] == ["b"]
    assert SlotRecord.parse(kv("x", {"epoch": 1, "active": None})).active is None


def test_a_key_that_does_not_parse_is_left_out_not_fatal() -> None:
    v = ClusterView()
    v.apply("slots/chat", kv("x", {"epoch": 3, "active": "a.chat-0"}), False)
    bad = KeyValue(b"x", b"not json {", 1, 2, 1, 0)
    for rel, value in [
        ("slots/chat", bad),
        ("engines/a.chat-0", bad),
        ("nodes/a", kv("x", [1, 2])),
        ("slots/other", kv("x", "a string")),
        ("slots/third", kv("x", {"epoch": "three"})),
    ]:
        assert v.apply(rel, value, False) is not None, rel
    assert v.slots == {} and v.engines == {} and v.nodes == {}
    assert v.apply("unknown/kind", bad, False) is None  # not ours to read


def test_suspicion_needs_missed_beats_and_our_own_connection() -> None:
    changes: list[tuple[str, bool]] = []
    hb = Heartbeats(
        ["nats://x"],
        "c",
        "me",
        interval=0.25,
        suspect_after=3,
        snapshot=dict,
        on_change=lambda n, s: changes.append((n, s)),
    )
    hb.connected = True
    hb._connected_since = 0.0
    from supervisor.coordination.nats import PeerBeats

    hb.peers["p"] = PeerBeats("p", last_at=100.0, interval=0.25)
    hb.check(now=100.5)
    assert not hb.is_suspect("p")  # 2 beats missed: not yet
    hb.connected = False
    hb.check(now=101.0)
    assert not hb.is_suspect("p")  # we are the ones cut off: suspect nobody
    hb.connected = True
    hb._connected_since = 101.0
    hb.check(now=101.5)
    assert not hb.is_suspect("p")  # just reconnected: a full window first
    hb._own_last = 101.0  # our own beats stopped coming back: our link is the broken one
    hb.check(now=101.8)
    assert not hb.is_suspect("p")
    hb._own_last = 101.7  # they come back: the silence is the peer's
    hb.check(now=101.8)
    assert hb.is_suspect("p") and changes == [("p", True)]


def test_old_and_repeated_beats_say_nothing_but_a_restart_does() -> None:
    from types import SimpleNamespace

    import anyio

    hb = Heartbeats(["nats://x"], "c", "me", interval=0.25, suspect_after=3, snapshot=dict)
    hb.judge(["p"])

    def beat(run: str, seq: int) -> None:
        msg = SimpleNamespace(data=orjson.dumps({"node": "p", "run": run, "seq": seq}))
        anyio.run(hb._on_beat, msg)

    beat("r1", 5)
    first = hb.peers["p"].last_at
    beat("r1", 4)  # late (a backlog flushed out of order)
    beat("r1", 5)  # repeated
    assert hb.peers["p"].last_at == first and hb.peers["p"].seq == 5
    beat("r2", 1)  # it restarted: its count starts again
    assert hb.peers["p"].run == "r2" and hb.peers["p"].last_at > first


def coordinator(
    host: str = "127.0.0.1",
    listening: str = "",
    *,
    node: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    session: Any = None,
) -> ClusterCoordinator:
    """A coordinator that is never run: for its pure parts, or (given a ``session`` and
    a real etcd's endpoints in ``cluster``) for one call at a time against that etcd."""
    slot = {"name": "s", "model": "m", "backend": "vllm", "base_port": 9000, "simulate": True}
    cl = {"etcd_endpoints": ["http://127.0.0.1:2379"], "advertise_host": host, **(cluster or {})}
    cfg = parse(
        {
            "node": {"state_dir": "/tmp/x", **(node or {})},
            "admin": {"host": "127.0.0.1"},
            "cluster": cl,
            "slot": [slot],
        },
        base_dir=Path("/"),
    )
    return ClusterCoordinator(
        cfg,
        {},
        Metrics(cluster=True),
        session,
        admin_url=lambda: listening,
        on_view_change=lambda: None,
        on_peer_dead=print,
    )


def test_peers_are_told_the_advertised_admin_address() -> None:
    """A node listening on 0.0.0.0 (or loopback) must not publish that: a peer would probe
    itself. It publishes advertise_host with its admin port."""
    c = coordinator("10.0.0.11", "http://0.0.0.0:8470")
    record = orjson.loads(c.membership._records()[c.ctx.key("nodes", c.node)])
    assert record["admin"] == "http://10.0.0.11:8470"
    assert coordinator("fd00::11", "http://127.0.0.1:8470").membership.advertised_admin() == (
        "http://[fd00::11]:8470"
    )
    assert any("advertise_host" in w for w in warnings(c.cfg))


def test_dead_peers_and_old_epochs_are_forgotten() -> None:
    from supervisor.coordination.cluster import FORGET_AFTER

    c = coordinator()
    c.view.apply("slots/chat", kv("x", {"epoch": 5, "active": "a.chat-0"}), False)
    c.view.apply("nodes/back", kv("x", {"admin": ""}), False)
    c.peers.dead.update({"gone": 0.0, "recent": FORGET_AFTER, "back": 0.0})
    c.peers._known = {"gone", "recent", "back"}
    c.decisions._first_seen = {("chat", 3): 1.0, ("chat", 4): 2.0, ("chat", 5): 3.0}
    c.peers.forget_old(FORGET_AFTER + 10)
    assert set(c.dead) == {"recent", "back"}  # "back" has a lease again: kept till revived
    assert c.peers._known == {"recent", "back"}
    c.decisions.to_look_at(everything=False)  # each pass forgets the epochs gone by
    assert c.decisions._first_seen == {("chat", 5): 3.0}


def test_the_leader_keeps_a_lease_gone_node_while_it_beats_as_cut_off_from_etcd() -> None:
    """A peer whose lease is gone is dead at the leader, unless its beats come on the
    cut-off subject (it lost etcd, not its life: under keep-serving it keeps its slots), and
    not yet dead while the leader has led for less than one suspect window (such beats may
    not have reached it yet)."""
    import time

    c = coordinator(node={"name": "me"}, cluster={"nats_servers": ["nats://127.0.0.1:9"]})
    cfg = c.cfg
    assert c.beats is not None
    c.loaded.set()
    c.view.apply("nodes/me", kv("x", {"admin": ""}), False)
    c.beats.judge((), leading=True)
    assert c.peer_state("gone") == "suspect"  # just became leader: cannot rule it out yet
    c.beats._leading_since -= 10
    assert c.peer_state("gone") == "dead"
    c.beats.cut_off_heard["gone"] = (time.monotonic(), 0.25)
    assert c.peer_state("gone") == "alive"  # beats, cut off from etcd: its slots stay
    c.beats.cut_off_heard["gone"] = (time.monotonic() - 1.0, 0.25)
    assert c.peer_state("gone") == "dead"  # its beats stopped too
    # What makes a node beat on the cut-off subject: a lease whose keep-alives fail.
    m = c.membership
    assert not m.cut_off()  # no lease yet (joining)
    m.lease, m.etcd_ok, m.last_renewed = 7, True, time.monotonic()
    assert not m.cut_off()
    m.last_renewed -= cfg.cluster.lease_ttl / 2 + 0.1
    assert m.cut_off()  # a keep-alive is half a TTL late
    m.last_renewed, m.etcd_ok = time.monotonic(), False
    assert m.cut_off()
