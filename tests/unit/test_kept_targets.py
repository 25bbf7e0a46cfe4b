"""The candidates a directory keeps per model are handed out again only while each of
their engines is still its slot's active engine and the config is the same one."""

from plugins.vllm import VllmBackend
from supervisor.frontend.routing import KeptTargets, Target
from supervisor.model import Engine, EngineSpec, EngineState, Slot


def kept() -> tuple[KeptTargets, Slot, Engine, object]:
    spec = EngineSpec("e0", "m", 8000)
    engine = Engine("e0", "chat", "active", spec, "vllm", state=EngineState.ACTIVE)
    slot = Slot("chat", "m", active="e0")
    cfg = object()
    target = Target("e0", spec.url, VllmBackend())
    return KeptTargets(cfg, [(slot, engine)], [target]), slot, engine, cfg


def test_kept_while_the_engine_is_its_slots_active_one() -> None:
    k, _, _, cfg = kept()
    assert k.still_valid(cfg)
    assert not k.still_valid(object())  # a reloaded config


def test_not_kept_once_the_engine_leaves_active() -> None:
    for state in (EngineState.DRAINING, EngineState.FAILED, EngineState.STOPPED):
        k, _, engine, cfg = kept()
        engine.state = state  # changed, not yet heard of by the directory
        assert not k.still_valid(cfg)


def test_not_kept_once_the_slot_has_another_active_engine() -> None:
    k, slot, _, cfg = kept()
    slot.active = "e1"
    assert not k.still_valid(cfg)
