"""One replenishing task per slot: it restores the configured number of shadows (and, for
a slot without shadows, its active engine), one launch at a time, with backoff.

Consecutive failures back off exponentially (``relaunch_backoff`` doubling up to
``relaunch_backoff_max``); an engine that serves resets it. Nothing is relaunched while the
slot is paused or rolling out (the rollout launches what it needs itself), or once it stops.
"""

from __future__ import annotations

import time

import anyio

from supervisor.model import FailoverRecord
from supervisor.slot.core import SlotCore
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Event


class Replenisher:
    """The slot's shadow count (and cold restarts), restored in the background."""

    def __init__(self, ctl: SlotCore) -> None:
        self.ctl = ctl
        self.failures = 0  # consecutive failed launches; the backoff grows with them
        self.shortfall = ""  # why the slot has fewer shadows than configured
        self.cold_record: FailoverRecord | None = None  # a failover a cold start completes
        self._kick = anyio.Event()
        self._launched = False  # how the last launch the table ordered went

    def kick(self) -> None:
        """Something changed that may leave the slot short of shadows (or, without shadows,
        of its active engine): look again."""
        self._kick.set()

    def needs_cold_start(self) -> bool:
        """A slot without shadows that has lost its engine can only restart one cold."""
        ctl = self.ctl
        return (
            ctl.scfg.shadows == 0
            and ctl.slot.active is None
            and not ctl.live()
            and ctl.scfg.hosts == "active"
            and ctl.coord.served_elsewhere(ctl.slot.name) is None
        )

    def backoff(self) -> float:
        f = self.ctl.cfg.failover
        return float(min(f.relaunch_backoff * 2**self.failures, f.relaunch_backoff_max))

    def restore(self) -> int:
        """Launch what the slot is missing now (e.g. after a broken GPU was cleared)."""
        self.failures = 0
        self.kick()
        return self.ctl.missing_shadows() + (1 if self.needs_cold_start() else 0)

    async def loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            if not self.ctl.ready.is_set():
                continue  # start() launches what the slot needs first, then kicks
            await self.replenish()

    def _held_back(self) -> bool:
        """Whether nothing may be launched now (the reason is the shortfall)."""
        ctl = self.ctl
        if ctl.rollouts.in_progress:
            return True  # the rollout launches what the slot needs itself, then kicks
        if (p := ctl.paused()) is not None:
            self.shortfall = f"paused ({p.reason}): nothing is relaunched until resumed"
            ctl.lifecycle.update_gauges()
            return True
        if ctl.lifecycle.free_port() is None:
            # A dead engine still holds its place; its retirement kicks us again.
            self.shortfall = "waiting for a stopped engine's processes to exit"
            return True
        return False

    async def replenish(self) -> None:
        """Launch, one at a time, what the slot lacks, each after its backoff."""
        ctl = self.ctl
        while not ctl.stopped:
            cold = self.needs_cold_start()
            missing = ctl.missing_shadows()
            if not cold and not missing:
                self.shortfall = ""
                ctl.lifecycle.update_gauges()
                return
            if self._held_back():
                return
            delay = self.backoff()
            what = "the active engine cold" if cold else f"1 of {missing} missing shadow(s)"
            ctl.log.info(f"relaunching {what} in {delay:g}s", consecutive_failures=self.failures)
            await anyio.sleep(delay)
            if ctl.stopped or ctl.paused() is not None or ctl.rollouts.in_progress:
                continue  # looked at again from the top
            self._launched = False
            if cold:
                d = await ctl.handle(Event.COLD_START, "the slot has no shadow to promote")
            else:
                d = await ctl.handle(Event.SHADOWS_MISSING, f"{missing} shadow(s) missing")
            if d is None:
                return
            ok = self._launched
            # A success starts the backoff from the bottom again only once an engine serves:
            # a shadow that loads fine but is promoted at once into a failing wake (a plugin
            # bug, a broken GPU) must not make every relaunch immediate.
            if ok and (cold or ctl.slot.active is not None):
                self.failures = 0
            elif not ok:
                self.failures += 1
                ctl.lifecycle.update_gauges()

    # -- the effects the table orders ----------------------------------------------------
    async def launch_shadow(self) -> None:
        """Effect ``launch_shadow``: one relaunched shadow."""
        self.ctl.metrics.engine_relaunches.labels(self.ctl.slot.name).inc()
        try:
            await self.ctl.startup.start_shadow()
            self._launched = True
        except FailoverError as e:
            self.shortfall = f"relaunched shadow did not come up: {e}"
            self.ctl.log.error("relaunched shadow did not come up", error=str(e))

    async def launch_cold(self) -> None:
        """Effect ``launch_cold``: the active engine of a slot without shadows, anew; it
        completes the failover that found no shadow (its record)."""
        ctl = self.ctl
        ctl.metrics.engine_relaunches.labels(ctl.slot.name).inc()
        ok = await ctl.startup.start_active()
        record, self.cold_record = self.cold_record, None
        if record is not None:
            if ok:
                record.result = "cold-restarted"
                record.promoted_engine, record.epoch = ctl.slot.active, ctl.slot.epoch
                record.finished_at = time.time()
            else:
                self.cold_record = record  # the next cold start may complete it
        self._launched = ok
