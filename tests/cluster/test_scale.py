"""The scale bench in small (N = 50 virtual nodes of 8 engines beside two full daemons,
real etcd and nats-server): beats are not delivered all-to-all, etcd's load per node does
not grow with the fleet, a lost node's slots are promoted (a lost leader replaced) within
the lease's bound, a cold start of the 50 ends in views that agree, and the daemons' loop
lag is reported.
The full sweep is ``python -m bench.scale``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.scale import ENGINES, one_size
from supervisor.config import ClusterConfig
from supervisor.coordination.nats import WATCHERS

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_fleet_of_50_virtual_nodes(tmp_path: Path) -> None:
    args = argparse.Namespace(seconds=3.0, requests=100, losses=2, per_process=50)
    r = await one_size(50, args, tmp_path)
    print(r)
    # Otherwise the machine could not keep the virtual nodes' leases (too loaded to judge).
    assert r["leases_lost"] == 0, r
    # Each beat reaches its ring watchers and its sender: never all 52 nodes, and the leader
    # is handed no more than a follower (two peers' beats and its own, a few reports):
    # nothing like the 50 nodes' 200 beats a second.
    assert r["deliveries_per_message"] <= WATCHERS + 1, r
    assert r["leader_msgs_per_s"] <= 3 * 4 + 10, r
    assert r["slow_consumers"] == 0
    # Per node and second: a third-TTL keep-alive, and nothing else at rest (each watch
    # hears the leader's clock; a node reads only when its watch is silent); the daemons'
    # own few calls. A read of the prefix per node would be hundreds of keys.
    ttl = ClusterConfig().lease_ttl
    assert r["etcd_requests_per_s"] <= 50 * 3 / ttl + 20, r
    assert r["etcd_bytes_out_per_s"] <= 50 * 1000, r
    # A lost node's slots move once its lease is gone: TTL after its last keep-alive, plus
    # the leader's decision. The bound has a second of slack for a loaded test machine
    # (it is the lease that decides, not speed); a missed promotion is infinite.
    loss = r["node_loss_s"]
    assert loss["n"] == 2 * ENGINES and loss["max"] <= ttl + 1.5, loss
    # The leader's loss: the next election key leads once its lease is gone.
    assert r["leader_loss_s"] <= ttl + 1.5, r
    # A cold start of the 50: every node joined, then both daemons saw all of them alive,
    # all their slots, and one leader (within the bench's own deadline, or it raised).
    cold = r["cold_start_s"]
    assert 0 < cold["joined"] <= cold["agreed"] == r["cold_start_agreed_s"], cold
    # Loop lag, read from each daemon's histogram over each period: the ticker woke through
    # it, and p99 and max are a reading and a bucket's edge above it. What they are is the
    # machine's as much as the daemons' (other tests' load here took the leader's p99 at
    # rest from a few ms in one run to 70 ms in another), so the only bound held is one no
    # loop doing its work comes near: no wake at rest a second late.
    for phase in ("rest", "requests"):
        for name in ("node-a", "node-b"):
            lag = r["loop_lag"][phase][name]
            assert lag["wakes"] > 0 and 0 < lag["p99_ms"] <= lag["max_ms"], (phase, name, lag)
    for name in ("node-a", "node-b"):
        assert r["loop_lag"]["rest"][name]["max_ms"] <= 1000, r["loop_lag"]
    assert r["lag_p99_ms_leader_rest"] == r["loop_lag"]["rest"]["node-a"]["p99_ms"]
