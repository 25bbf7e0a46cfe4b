"""Where a slot's next engine goes: ports, GPU sets, specs (pure, no process)."""

from pathlib import Path

import pytest

from supervisor.config import SlotConfig
from supervisor.slot.placement import (
    FailoverError,
    choose_gpus,
    engine_spec,
    free_port,
    gpu_sets,
    group_of,
    held,
    next_number,
)


def slot(**kw: object) -> SlotConfig:
    base: dict[str, object] = {"name": "s", "model": "m", "backend": "vllm", "base_port": 9000}
    return SlotConfig(**(base | kw))  # type: ignore[arg-type]


def never(gpu: str) -> bool:
    return False


def test_ports_are_the_slot_range_and_taken_ones_are_skipped() -> None:
    cfg = slot(shadows=2)
    assert free_port(held([]), cfg) == 9000
    assert free_port(held([(9000, ("0",)), (9001, ("0",))]), cfg) == 9002
    assert free_port(held([(p, ("0",)) for p in (9000, 9001, 9002)]), cfg) is None


def test_during_a_rollout_the_old_specs_ports_count_too() -> None:
    old, new = slot(shadows=2), slot(shadows=1)
    taken = held([(9000, ("0",)), (9001, ("0",))])
    assert free_port(taken, new) is None
    assert free_port(taken, new, old) == 9002


def test_paired_engines_share_the_slots_gpus() -> None:
    cfg = slot(gpus=("0", "1"))
    taken = held([(9000, ("0", "1"))])
    assert gpu_sets(cfg) == [("0", "1")]
    assert choose_gpus(cfg, "shadow", taken, never) == ("0", "1")
    assert choose_gpus(cfg, "active", taken, never) == ("0", "1")


def test_pooled_shadows_prefer_their_own_gpus_and_need_a_free_set() -> None:
    cfg = slot(placement="pooled", gpus=("0",), shadow_gpus=(("1",), ("2",)), shadows=2)
    assert choose_gpus(cfg, "shadow", held([]), never) == ("1",)
    assert choose_gpus(cfg, "active", held([]), never) == ("0",)
    busy = held([(9000, ("0",)), (9001, ("1",))])
    assert choose_gpus(cfg, "shadow", busy, never) == ("2",)
    with pytest.raises(FailoverError, match="no free healthy GPU set"):
        choose_gpus(cfg, "shadow", held([(9000, ("0",)), (9001, ("1",)), (9002, ("2",))]), never)


def test_broken_gpus_are_not_placed_on() -> None:
    cfg = slot(placement="pooled", gpus=("0",), shadow_gpus=(("1",),))
    assert choose_gpus(cfg, "shadow", held([]), lambda g: g == "1") == ("0",)
    with pytest.raises(FailoverError, match="every GPU of the slot is marked broken"):
        choose_gpus(slot(gpus=("0",)), "active", held([]), lambda g: True)


def test_a_groups_members_share_their_lane() -> None:
    assert group_of(slot(), 9001) == ""
    assert group_of(slot(group_size=2), 9001) == "s:lane1"


def test_a_shadows_spec_has_its_extra_args_and_flock_its_lock() -> None:
    cfg = slot(extra_args=("--a",), shadow_extra_args=("--asleep",), suspend="flock")
    lock = Path("/tmp/s.lock")
    shadow = engine_spec(cfg, "s-1", "shadow", 9001, ("0",), host="h", lock_path=lock)
    active = engine_spec(cfg, "s-0", "active", 9000, ("0",), host="h", lock_path=lock)
    assert shadow.extra_args == ("--a", "--asleep") and active.extra_args == ("--a",)
    assert str(lock) in shadow.env.values()
    assert (shadow.port, shadow.host, shadow.options) == (9001, "h", {"suspend": "flock"})


def test_engine_numbers_go_on_past_adopted_ones() -> None:
    assert next_number([]) == 0
    assert next_number(["s-0", "node.s-7", "odd"]) == 8
