"""What a reload changes: each key's effect, what is applied, what waits for a rollout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from supervisor import confdiff
from supervisor.config import Config, parse


def config(**tables: dict[str, object]) -> Config:
    slot = {
        "name": "s",
        "model": "m",
        "backend": "vllm",
        "base_port": 9000,
        "simulate": True,
        **tables.pop("slot", {}),
    }
    return parse({"node": {"state_dir": "/tmp/x"}, **tables, "slot": [slot]}, base_dir=Path("/"))


def test_no_change_is_no_change() -> None:
    assert confdiff.diff(config(), config()) == []


def test_each_key_gets_its_effect() -> None:
    old = config()
    new = config(
        health={"stall_timeout": 3.0},
        failover={"drain_limit": 0},
        frontend={"port": 9999, "queue_timeout": 2.0},
        admin={"port": 9471},
        cluster={"etcd_endpoints": ["http://127.0.0.1:2379"]},
        slot={"extra_args": ["--x"], "shadows": 2, "hosts": "shadows"},
    )
    effects = {c.key: c.effect for c in confdiff.diff(old, new)}
    assert effects["health.stall_timeout"] == "applied"
    assert effects["failover.drain_limit"] == "applied"
    assert effects["frontend.queue_timeout"] == "applied"
    assert effects["frontend.port"] == "restart"
    assert effects["admin_port"] == "restart"
    assert effects["cluster.etcd_endpoints"] == "restart"
    assert effects["slot[s].extra_args"] == "rollout"
    assert effects["slot[s].shadows"] == "rollout"
    assert effects["slot[s].hosts"] == "restart"


def test_added_and_removed_slots_need_a_restart() -> None:
    old = config()
    two = dataclasses.replace(old, slots=(*old.slots, dataclasses.replace(old.slots[0], name="t")))
    assert {c.key: c.effect for c in confdiff.diff(old, two)} == {"slot[t]": "restart"}
    assert {c.key: c.new for c in confdiff.diff(two, old)} == {"slot[t]": "removed"}


def test_applied_takes_only_what_applies_at_once() -> None:
    old = config()
    new = config(health={"stall_timeout": 3.0}, frontend={"port": 9999}, slot={"shadows": 2})
    got = confdiff.applied(old, new)
    assert got.health.stall_timeout == 3.0
    assert got.frontend.port == old.frontend.port  # needs a restart
    assert got.slots == old.slots  # needs a rollout


CLUSTER = {"etcd_endpoints": ["http://127.0.0.1:2379"]}


def test_slot_specs_keep_the_cluster_keys_as_they_run() -> None:
    old = config(cluster=CLUSTER)
    new = config(cluster=CLUSTER, slot={"env": {"A": "1"}, "hosts": "shadows", "shadows": 1})
    specs = confdiff.slot_specs(old, new)
    spec, keys = specs["s"]
    assert keys == ["env"]
    assert spec.env == {"A": "1"} and spec.hosts == "active"
    only_hosts = config(cluster=CLUSTER, slot={"hosts": "shadows", "shadows": 1})
    assert confdiff.slot_specs(old, only_hosts) == {}


def test_lines_read_as_check_config_prints_them() -> None:
    (change,) = confdiff.diff(config(), config(slot={"extra_args": ["--a", "1"]}))
    assert change.line() == "rollout  slot[s].extra_args: [] -> ['--a', '1']"
    assert change.as_dict()["new"] == ["--a", "1"]
