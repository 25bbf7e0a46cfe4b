"""The slot controller driven by its table, with engines that are records, not processes:
a fake EngineLifecycle launches, wakes and stops instantly (or fails where told)."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from supervisor.backends import Backend
from supervisor.config import Config, parse
from supervisor.engines import EngineManager
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, FailoverRecord, Pause
from supervisor.sessions import Sessions
from supervisor.slot.controller import EFFECTS, SlotController
from supervisor.slot.core import SlotCore
from supervisor.slot.engines import EngineLifecycle
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Effect, Phase

pytestmark = pytest.mark.anyio


class FakeManager:
    """What the lifecycle would ask of processes: nothing runs, so nothing holds a place."""

    def running(self, engine: Engine) -> bool:
        return False

    def kill_now(self, engine: Engine) -> None:
        pass


class FakeJudge:
    def forget(self, engine_id: str) -> None:
        pass


class FakeBackend:
    name = "fake"


class FakeLifecycle(EngineLifecycle):
    """Engines come up, sleep, wake and stop at once; ``fail_wake`` names engines whose
    wake fails, ``fail_launch`` makes every launch fail."""

    def __init__(self, ctl: SlotCore, *tools: Any) -> None:
        super().__init__(ctl, *tools)
        self.fail_wake: set[str] = set()
        self.fail_launch = False
        self.woken: list[str] = []

    async def launch(self, engine: Engine) -> None:
        if self.fail_launch:
            raise FailoverError(f"cannot start engine {engine.id}: told to fail")
        engine.pid = 4242
        self.ctl.lifecycle.set_state(engine, EngineState.LOADING)

    async def ready(self, engine: Engine) -> None:
        await self.launch(engine)

    async def load_and_sleep(self, engine: Engine) -> None:
        await self.launch(engine)
        self.ctl.lifecycle.set_state(engine, EngineState.SLEEPING, "loaded and asleep")

    async def wake(self, shadow: Engine) -> None:
        self.ctl.lifecycle.set_state(shadow, EngineState.WAKING, "chosen for promotion")
        if shadow.id in self.fail_wake:
            raise FailoverError("wake failed: told to fail")
        self.woken.append(shadow.id)

    async def memory_released(self, dead: Engine) -> bool:
        return True

    async def stop(self, engine: Engine, why: str, *, done: str = "", wait: bool = False) -> None:
        self.ctl.lifecycle.set_state(engine, EngineState.DRAINING, why)
        self.ctl.lifecycle.set_state(engine, EngineState.STOPPED, done or why)
        await self.retire(engine)

    async def retire(self, engine: Engine) -> None:
        if self.ctl.engines.get(engine.id) is engine:
            self.forget(engine)
        self.ctl.replenisher.kick()


def config(tmp_path: Path, **slot: Any) -> Config:
    base = {"name": "s", "model": "m", "backend": "vllm", "base_port": 9000, "simulate": True}
    cfg = parse(
        {
            "failover": {"relaunch_backoff": 0.01, "relaunch_backoff_max": 0.02},
            "slot": [base | slot],
        }
    )
    return replace(cfg, state_dir=tmp_path)


@asynccontextmanager
async def slot_of(
    cfg: Config, *, pause: Callable[[], Pause | None] = lambda: None
) -> AsyncIterator[tuple[SlotController, FakeLifecycle]]:
    metrics = Metrics()
    ctl = SlotController(
        cfg,
        cfg.slots[0],
        cast(Backend, FakeBackend()),
        cast(EngineManager, FakeManager()),
        cast(HealthJudge, FakeJudge()),
        metrics,
        cast(Sessions, None),
        deque(maxlen=50),
        node_pause=pause,
        lifecycle=FakeLifecycle,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(ctl.run)
        yield ctl, cast(FakeLifecycle, ctl.lifecycle)
        await ctl.close()


async def until(pred: Callable[[], bool], timeout: float = 3) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


def failovers(ctl: SlotController, reason: str, result: str) -> float:
    v = ctl.metrics.registry.get_sample_value(
        "failover_supervisor_failovers_total",
        {"slot": "s", "reason": reason, "result": result},
    )
    return v or 0.0


def test_every_effect_has_a_handler() -> None:
    assert set(EFFECTS) == set(Effect)


async def test_start_serves_with_a_shadow_asleep(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, _):
        assert ctl.status()["degraded_reason"] == "starting"
        await ctl.start()
        assert ctl.phase is Phase.SERVING and ctl.slot.active == "s-1"
        assert [e.id for e in ctl.sleeping_shadows()] == ["s-0"]
        assert ctl.status()["degraded"] is False and ctl.ready.is_set()


async def test_an_active_engines_death_promotes_its_shadow(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, life):
        await ctl.start()
        dead, epoch = ctl.active_engine(), ctl.epoch
        assert dead is not None
        await ctl.on_engine_dead(dead, "exit", "process killed by signal 9", 0.0)
        assert ctl.phase is Phase.SERVING and ctl.slot.active == "s-0"
        assert (ctl.slot.epoch, life.woken) == (epoch + 1, ["s-0"])
        record: FailoverRecord = ctl.history[0]
        assert (record.result, record.failed_engine) == ("promoted", dead.id)
        assert failovers(ctl, "failover:exit", "promoted") == 1  # from the cause, not prose
        await until(lambda: len(ctl.sleeping_shadows()) == 1)  # replenished


@asynccontextmanager
async def down_while_paused(
    tmp_path: Path,
) -> AsyncIterator[tuple[SlotController, FakeLifecycle, list[Pause]]]:
    """A started slot whose active engine died while its node was paused (the pause is
    the list's one item: clear it to resume)."""
    node_pause: list[Pause] = []
    async with slot_of(config(tmp_path), pause=lambda: next(iter(node_pause), None)) as (
        ctl,
        life,
    ):
        await ctl.start()
        node_pause.append(Pause("kernel upgrade", 0.0))
        dead = ctl.active_engine()
        assert dead is not None
        await ctl.on_engine_dead(dead, "probe", "3 failed probes", 0.0)
        yield ctl, life, node_pause


async def test_an_active_engine_that_dies_while_paused_leaves_the_slot_down(
    tmp_path: Path,
) -> None:
    async with down_while_paused(tmp_path) as (ctl, life, node_pause):
        assert ctl.phase is Phase.DEGRADED and ctl.slot.active is None
        assert "paused (kernel upgrade)" in ctl.slot.degraded_reason
        assert life.woken == []
        node_pause.clear()
        ctl.pause_changed()  # resumed: the shadow is promoted now
        await until(lambda: ctl.phase is Phase.SERVING)
        assert ctl.slot.active == "s-0" and not ctl.slot.degraded_reason
        assert ctl.history[0].kind == "recovery"
        assert failovers(ctl, "recovery:recover", "promoted") == 1


async def test_a_switchover_asked_while_paused_serves_a_degraded_slot(tmp_path: Path) -> None:
    # A pause holds off automatic promotion, not what an operator asks for.
    async with down_while_paused(tmp_path) as (ctl, life, _):
        assert ctl.phase is Phase.DEGRADED and life.woken == []
        record = await ctl.switchover(None)
        assert ctl.phase is Phase.SERVING and ctl.slot.active == "s-0"
        assert record.result == "promoted" and life.woken == ["s-0"]
        assert failovers(ctl, "switchover:switchover", "promoted") == 1


async def test_a_shadow_that_fails_to_wake_gives_way_to_the_next(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path, shadows=2)) as (ctl, life):
        await ctl.start()
        first = ctl.sleeping_shadows()[0].id
        life.fail_wake.add(first)
        dead = ctl.active_engine()
        assert dead is not None
        await ctl.on_engine_dead(dead, "exit", "gone", 0.0)
        assert ctl.phase is Phase.SERVING and ctl.slot.active not in (first, dead.id)


async def test_no_shadow_left_degrades_then_a_ready_shadow_serves(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, life):
        await ctl.start()
        life.fail_wake.add("s-0")
        life.fail_launch = True  # no relaunched shadow comes up for now
        dead = ctl.active_engine()
        assert dead is not None
        await ctl.on_engine_dead(dead, "exit", "gone", 0.0)
        assert ctl.phase is Phase.DEGRADED and ctl.history[0].result == "degraded"
        assert "no sleeping shadow" in ctl.slot.degraded_reason
        life.fail_launch = False  # the replenisher's next shadow is promoted at once
        await until(lambda: ctl.phase is Phase.SERVING)
        assert ctl.history[0].kind == "recovery"


async def test_a_slot_without_shadows_restarts_its_engine_cold(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path, shadows=0)) as (ctl, _):
        await ctl.start()
        dead = ctl.active_engine()
        assert dead is not None
        await ctl.on_engine_dead(dead, "exit", "gone", 0.0)
        assert "restarting the active engine cold" in ctl.slot.degraded_reason
        await until(lambda: ctl.phase is Phase.SERVING)
        assert ctl.history[0].result == "cold-restarted" and ctl.slot.active == "s-1"


async def test_a_switchover_on_shared_gpus_stops_the_old_engine_first(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, _):
        await ctl.start()
        old = ctl.active_engine()
        assert old is not None
        record = await ctl.switchover(None)
        assert (record.result, record.promoted_engine) == ("promoted", "s-0")
        assert old.state is EngineState.STOPPED and ctl.phase is Phase.SERVING
        assert failovers(ctl, "switchover:switchover", "promoted") == 1


async def test_a_switchover_to_its_own_gpus_wakes_before_the_old_engine_stops(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, placement="pooled", gpus=["0"], shadow_gpus=[["1"]])
    async with slot_of(cfg) as (ctl, _):
        await ctl.start()
        old = ctl.active_engine()
        assert old is not None
        record = await ctl.drain(old.id, limit=0) or ctl.history[0]
        assert (record.kind, record.result) == ("drain", "promoted")
        assert "drain" in record.steps and "stop_old" in record.steps  # make before break
        assert failovers(ctl, "drain:drain", "promoted") == 1


async def test_a_switchover_with_no_shadow_is_refused_and_touches_nothing(
    tmp_path: Path,
) -> None:
    async with slot_of(config(tmp_path, shadows=0)) as (ctl, _):
        await ctl.start()
        with pytest.raises(FailoverError, match="no sleeping shadow"):
            await ctl.switchover(None)
        assert ctl.phase is Phase.SERVING and ctl.slot.active is not None


async def test_the_clusters_orders_go_through_the_table(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, _):
        await ctl.start()
        await ctl.step_down(5, "node-2")
        assert ctl.phase is Phase.STANDBY and ctl.slot.active is None
        assert not ctl.slot.degraded_reason
        shadow = ctl.sleeping_shadows()[0]
        await ctl.promote_assigned(shadow.id, 6, "node-2 is gone")
        assert (ctl.phase, ctl.slot.active, ctl.epoch) == (Phase.SERVING, shadow.id, 6)
        assert failovers(ctl, "cluster", "promoted") == 1
        ctl.confirm_epoch(7)
        assert ctl.epoch == 7


async def test_a_stopped_slot_starts_nothing(tmp_path: Path) -> None:
    async with slot_of(config(tmp_path)) as (ctl, _):
        await ctl.start()
        ctl.begin_stop()
        assert ctl.phase is Phase.STOPPED
        assert ctl.spawn(anyio.sleep, 0, why="a late relaunch") is False
        dead = ctl.active_engine()
        assert dead is not None
        await ctl.on_engine_dead(dead, "exit", "gone", 0.0)  # refused: nothing promoted
        assert ctl.phase is Phase.STOPPED and ctl.sleeping_shadows()


async def test_a_reload_reconfigures_the_slot(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with slot_of(cfg) as (ctl, _):
        new = replace(cfg, failover=replace(cfg.failover, drain_limit=1.5))
        ctl.reconfigure(new)
        assert ctl.cfg.failover.drain_limit == 1.5
        ctl.rollouts.mark_pending(replace(cfg.slots[0], extra_args=("--x",)), ["extra_args"])
        assert ctl.pending is not None and ctl.status()["rollout_pending"] == ["extra_args"]
