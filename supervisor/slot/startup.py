"""A slot's start: the engines an earlier supervisor left running are adopted, then what
is missing starts. Shadows load and sleep first (so an active engine on the same GPUs
fits), then the active engine loads cold and is claimed; the state file records the rest.
Also the two launches the replenisher repeats later: a shadow, and a cold active engine.
"""

from __future__ import annotations

from typing import Any

import anyio

from supervisor.coordination.local import ClaimRefused
from supervisor.model import Engine, EngineState
from supervisor.slot.core import Move, SlotCore
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Event


class Startup:
    """Adopts and starts the slot's engines."""

    def __init__(self, ctl: SlotCore) -> None:
        self.ctl = ctl

    def saved(self) -> dict[str, Any]:
        """This slot's part of the state file."""
        ctl = self.ctl
        return {
            "epoch": ctl.slot.epoch,
            "active": ctl.slot.active,
            "pause": ctl.pause.as_dict() if ctl.pause else None,
            "engines": [
                {
                    "id": e.id,
                    "role": e.role,
                    "state": e.state.value,
                    "pid": e.pid,
                    "start_time": e.start_ticks,
                    "port": e.spec.port,
                    "gpus": list(e.spec.gpus),
                }
                for e in ctl.live()
                if e.pid is not None
            ],
        }

    async def adopt(self, saved: dict[str, Any]) -> int:
        """Take over the engines an earlier supervisor left running, where they are still
        the same processes and answer as they did; returns how many were adopted."""
        ctl = self.ctl
        ctl.slot.epoch = int(saved.get("epoch", 0))
        adopted = 0
        for rec in saved.get("engines", []):
            engine = await ctl.lifecycle.adopt(rec)
            if engine is None:
                continue
            if engine.state is EngineState.ACTIVE:
                ctl.slot.active = engine.id
            adopted += 1
        return adopted

    async def start(self) -> None:
        """Shadows load and sleep first (so an active on the same GPUs fits), then the
        active engine becomes ready. Adopted engines count: only what is missing starts.
        Self-promoting shadows (``suspend = "flock"``) start after the active engine: the
        first engine up takes the lock and serves."""
        ctl = self.ctl
        flock = ctl.lifecycle.flock
        if ctl.slot.active is not None:
            await ctl.handle(Event.ACTIVE_READY, f"adopted active engine {ctl.slot.active}")
        if not flock:
            await self.start_shadows()
        elsewhere = ctl.coord.served_elsewhere(ctl.slot.name)
        if ctl.slot.active is not None:
            pass  # adopted, and serving already
        elif ctl.scfg.hosts != "active" or elsewhere:
            why = f"served by {elsewhere}" if elsewhere else "this node keeps shadows only"
            await ctl.handle(Event.SERVED_ELSEWHERE, why)
        else:
            await self.start_active()
            if ctl.slot.active is None and ctl.sleeping_shadows():
                # The active engine did not come up, but a shadow is ready: serve with it.
                await ctl.promoter.recover("the active engine did not come up at start")
        if flock:
            await self.start_shadows()
        ctl.ready.set()
        ctl.replenisher.kick()

    async def start_shadows(self) -> None:
        ctl = self.ctl

        async def one() -> None:
            try:
                await self.start_shadow()
            except FailoverError as e:
                ctl.log.error("shadow did not come up", error=str(e))

        async with anyio.create_task_group() as tg:
            for _ in range(ctl.missing_shadows()):
                tg.start_soon(one)

    async def start_active(self) -> bool:
        """Launch an active engine cold and promote it once ready (startup, or a slot with
        no shadows that lost its active engine); whether it serves now."""
        ctl = self.ctl
        async with ctl.lock:
            try:
                engine = ctl.lifecycle.new_engine("active")
            except FailoverError as e:
                await ctl.handle(
                    Event.ACTIVE_FAILED_TO_START, f"cannot launch an active engine: {e}"
                )
                return False
            try:
                await ctl.lifecycle.ready(engine)
            except FailoverError as e:
                why = f"active engine did not come up: {e}"
                await ctl.handle(Event.ACTIVE_FAILED_TO_START, why, engine=engine.id)
                ctl.lifecycle.failed_to_start(engine, f"did not come up: {e}")
                return False
            try:
                epoch = await self._claim_cold(engine)
            except ClaimRefused as e:
                ctl.waiting_for_etcd = True
                why = f"the active engine cannot be claimed yet: {e}"
                await ctl.handle(Event.ACTIVE_FAILED_TO_START, why, engine=engine.id)
                await ctl.lifecycle.stop(engine, "not claimed: etcd unreachable")
                return False
            if epoch is None:
                why = f"another node serves the slot; {engine.id} stops"
                await ctl.handle(Event.SERVED_ELSEWHERE, why)
                await ctl.lifecycle.stop(engine, "fenced: slot served elsewhere")
                return False
            ctl.promoter.promote(engine, epoch)
            await ctl.handle(Event.ACTIVE_READY, f"{engine.id} loaded and ready", epoch=epoch)
            return True

    async def _claim_cold(self, engine: Engine) -> int | None:
        ctl = self.ctl
        if ctl.grouped:
            # A group is claimed by the cluster leader once every member is up.
            return ctl.slot.epoch
        return await ctl.coord.claim(ctl.slot.name, engine.unit, ctl.slot.epoch, "started cold")

    async def start_shadow(self) -> Engine:
        """Launch one shadow, wait until loaded, put it to sleep, verify it sleeps. A shadow
        that does not make it is killed (its retirement frees its place). A degraded slot
        promotes it (in the background), unless paused."""
        ctl = self.ctl
        engine = ctl.lifecycle.new_engine("shadow")
        try:
            await ctl.lifecycle.load_and_sleep(engine)
        except BaseException as e:
            ctl.lifecycle.failed_to_start(engine, f"did not come up as a shadow: {e}")
            raise
        move = Move(in_background=True)
        await ctl.handle(Event.SHADOW_READY, f"{engine.id} loaded and asleep", move=move)
        return engine
