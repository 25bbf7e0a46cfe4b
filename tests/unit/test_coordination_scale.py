"""What a node pays for the size of its cluster: a request's work, the leader's pass and
what a single change makes it look at, on views of hundreds of synthetic nodes (no
servers: the view is filled the way the watch fills it)."""

from __future__ import annotations

import sys
import time
from types import FrameType
from typing import Any

import anyio
import orjson
import pytest

from supervisor.coordination.cluster import ClusterCoordinator
from supervisor.coordination.etcd import KeyValue
from tests.unit.test_coordination import coordinator

ENGINES = 8  # per node, as on an 8-GPU host


def put(c: ClusterCoordinator, rel: str, value: object, rev: int) -> None:
    kv = KeyValue(rel.encode(), orjson.dumps(value), rev, rev, 1, 0)
    assert c.view.apply(rel, kv, False) is None


def fleet(c: ClusterCoordinator, nodes: int, model: str = "other", alive: bool = True) -> None:
    """``nodes`` virtual nodes of ``ENGINES`` slots each, every slot served by its node's
    engine (the view as a node of such a cluster holds it)."""
    rev = len(c.view.engines) + len(c.view.slots) + 10
    for n in range(nodes):
        node = f"v{n:04d}-{model}"
        if alive:
            put(c, f"nodes/{node}", {"admin": ""}, rev)
        for i in range(ENGINES):
            eid, slot = f"{node}.s{i}-0", f"{node}-s{i}"
            engine = {"node": node, "slot": slot, "model": model, "backend": "vllm"}
            engine |= {"role": "active", "state": "active", "unit": eid, "url": "http://x"}
            put(c, f"engines/{eid}", engine, rev)
            put(c, f"slots/{slot}", {"epoch": 1, "active": eid, "nodes": [node]}, rev)
            rev += 1


def calls_made(fn: Any, times: int) -> int:
    """Python and C function calls made by ``times`` calls of ``fn``: the work, counted
    rather than timed (a timing would depend on the machine's load)."""
    count = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        for _ in range(times):
            fn()
    finally:
        sys.setprofile(None)
    return count


def request_path(c: ClusterCoordinator) -> Any:
    def one() -> None:
        assert "m" in c.models()
        assert len(c.remote_targets("m")) == ENGINES  # the one peer serving "m"

    return one


def test_a_request_costs_the_same_beside_300_nodes_as_beside_one() -> None:
    """What the directory asks the coordinator for every request (the model's serving
    engines on other nodes, whether the cluster knows the model) does not grow with the
    nodes serving other models: within 1.2x of a cluster of one peer."""
    lone = coordinator()
    fleet(lone, 1, "m")
    big = coordinator()
    fleet(big, 1, "m")
    fleet(big, 300)
    lone_calls = calls_made(request_path(lone), 3)
    big_calls = calls_made(request_path(big), 3)
    assert big_calls <= 1.2 * lone_calls, (lone_calls, big_calls)


def as_leader(c: ClusterCoordinator) -> None:
    c.membership.etcd_ok = True
    put(c, f"election/{c.node}", c.node, 1)


@pytest.mark.anyio
async def test_a_leader_pass_over_1000_nodes_never_holds_the_loop_50ms() -> None:
    """A whole pass (leadership just won: every slot) over 1,000 nodes of 8 slots each,
    100 of them dead with no shadow anywhere. An invariant about blocking (keep-alives,
    beats and requests share this loop), not a speed: a 5 ms ticker measures the CPU time
    this thread spent between two of its ticks, which is what held the loop (wall time
    would also count the machine's other processes taking the core, which no code here
    can prevent). The 50 ms bound is ten times the slice the leader works in; one pass
    without a yield takes seconds."""
    c = coordinator()
    as_leader(c)
    fleet(c, 900)
    fleet(c, 100, "lost", alive=False)  # their leases are gone, their slot records stay
    for n in range(100):
        for i in range(ENGINES):
            c.view.apply(f"engines/v{n:04d}-lost.s{i}-0", KeyValue(b"", b"", 1, 1, 1, 0), True)
    c.loaded.set()
    slots = len(c.view.slots)
    worst = 0.0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.thread_time()
            await anyio.sleep(0.005)
            worst = max(worst, time.thread_time() - before)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.02)
        with anyio.fail_after(120):
            await c.decisions.lead_each(c.decisions.to_look_at(everything=True))
        done.set()
    assert slots == 8000 and len(c.decisions._said) == slots  # every slot was decided on
    assert sum("cannot fail over" in d for d in c.decisions._said.values()) == 800
    assert worst < 0.05, f"the loop was held {worst * 1000:.0f} ms"


def test_a_change_makes_the_leader_look_at_what_it_touches_only() -> None:
    c = coordinator()
    as_leader(c)
    fleet(c, 200)
    c.loaded.set()
    assert len(c.decisions.to_look_at(everything=True)) == 1600
    assert c.decisions.to_look_at(everything=False) == set()  # nothing changed since
    engine = dict(c.view.engines["v0007-other.s3-0"], state="failed")
    put(c, "engines/v0007-other.s3-0", engine, 99_999)
    assert c.decisions.to_look_at(everything=False) == {"v0007-other-s3"}
    # A node's lease expires: its node key goes, then its engines (one revision).
    c.view.apply("nodes/v0042-other", KeyValue(b"", b"", 1, 1, 1, 0), True)
    assert c.decisions.to_look_at(everything=False) == {f"v0042-other-s{i}" for i in range(ENGINES)}
    c.peers.peer_changed("v0100-other")  # suspect, dead, or heard again
    assert c.decisions.to_look_at(everything=False) == {f"v0100-other-s{i}" for i in range(ENGINES)}


def test_the_indexes_follow_engines_and_slots_through_every_change() -> None:
    c = coordinator()
    fleet(c, 3, "m")
    v = c.view
    assert set(v.serving["m"]) == {f"v{n:04d}-m.s{i}-0" for n in range(3) for i in range(8)}
    # The slot moves to a sleeping shadow on another node: served by it once it is active.
    shadow = dict(v.engines["v0001-m.s0-0"], slot="v0000-m-s0", unit="sh", state="sleeping")
    put(c, "engines/sh", shadow, 500)
    put(c, "slots/v0000-m-s0", {"epoch": 2, "active": "sh", "nodes": ["v0001-m"]}, 501)
    assert "v0000-m.s0-0" not in v.serving["m"] and "sh" not in v.serving["m"]
    put(c, "engines/sh", dict(shadow, state="active"), 502)
    assert "sh" in v.serving["m"] and v.active_on["v0001-m"] == 9
    assert v.slots_of("v0001-m") == {f"v0001-m-s{i}" for i in range(8)} | {"v0000-m-s0"}
    v.apply("engines/sh", KeyValue(b"", b"", 1, 1, 1, 0), True)
    v.drop_slot("v0002-m-s1")
    assert "sh" not in v.serving["m"] and "v0002-m.s1-0" not in v.serving["m"]
    assert v.active_on["v0001-m"] == 8 and v.models == {"m": 24}
    v.drop_slot("v0000-m-s0")
    assert v.named["v0001-m"] == {f"v0001-m-s{i}" for i in range(8)}


def test_status_of_a_fleet_is_summarised_unless_asked_whole() -> None:
    """Past STATUS_DETAIL slots, /status's cluster section has counts and the slots and
    peers worth a look (unserved slots, peers not alive); ``?cluster=full`` has them all."""
    from supervisor.coordination.cluster import STATUS_DETAIL

    c = coordinator()
    fleet(c, 3)
    assert len(c.status()["slots"]) == 24 and "summary" not in c.status()  # a few nodes
    fleet(c, STATUS_DETAIL // ENGINES + 1, "m")
    put(c, "slots/v0001-other-s2", {"epoch": 2, "active": None, "nodes": []}, 90_000)
    c.view.apply("nodes/v0002-other", KeyValue(b"", b"", 1, 1, 1, 0), True)
    c.peers.dead["v0002-other"] = 0.0  # its lease gone, confirmed dead
    c.loaded.set()
    st = c.status()
    assert list(st["slots"]) == ["v0001-other-s2"] and st["peers"] == {"v0002-other": "dead"}
    assert st["summary"]["slots"] == len(c.view.slots) > STATUS_DETAIL
    assert st["summary"]["slots_served"] == len(c.view.slots) - 1
    whole = c.status(full=True)
    assert len(whole["slots"]) == len(c.view.slots) and "summary" not in whole
    assert len(orjson.dumps(st)) < len(orjson.dumps(whole)) / 20
