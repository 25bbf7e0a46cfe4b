"""Rolling engine upgrade of one slot: engines of a new spec take over with no stream lost.

The steps (:meth:`Rollout.run`), each logged with its reason and shown in ``/status`` under
the slot's ``rollout``:

1. **New shadow.** One sleeping shadow of the old spec is stopped and a shadow of the new
   spec starts in its place (its port and GPUs), loads and goes to sleep. If it does not
   come up (a bad flag, a model that does not load, a failed health check) the rollout is
   rolled back: the new engine is stopped, the old spec is restored and the slot's old
   shadow relaunched. The active engine never stopped serving.
2. **Switch.** A planned switchover to the new shadow at epoch + 1 (see
   :mod:`supervisor.slot.planned`). A wake that fails rolls back as in step 1.
3. **Rebuild.** The remaining old shadows are stopped and the slot's shadows are relaunched
   from the new spec, up to its shadow count.

A slot without shadows cannot be rolled without a gap (there is no engine to hand it to):
the rollout is refused with the reason.
"""

from __future__ import annotations

import time

from supervisor.config import SlotConfig
from supervisor.model import EngineState, RolloutProgress
from supervisor.slot.core import SlotCore
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Phase


class RolloutFailed(Exception):
    """A step failed before the new spec served: the rollout rolls back."""


class Rollout:
    """A slot's spec generations: the one engines launch from, one a reload marked as
    pending, and the rollout in progress between them."""

    def __init__(self, ctl: SlotCore) -> None:
        self.ctl = ctl
        self.generation = 0  # the spec engines launch from now (a rollout moves it on)
        self.pending: SlotConfig | None = None  # a reloaded spec waiting for its rollout
        self.pending_changes: list[str] = []
        self.progress: RolloutProgress | None = None
        self.old: SlotConfig | None = None  # the spec a rollout in progress leaves
        self._switched = False  # the rollout in progress switched the slot to the new spec

    @property
    def in_progress(self) -> bool:
        return self.progress is not None and self.progress.result == "in_progress"

    def mark_pending(self, spec: SlotConfig | None, changes: list[str]) -> None:
        """A reload found ``spec`` for this slot (None: the slot runs its file's spec)."""
        self.pending, self.pending_changes = spec, list(changes)
        self.ctl.metrics.rollout_pending.labels(self.ctl.slot.name).set(1 if spec else 0)

    def begin(self) -> RolloutProgress:
        """Check that the slot can be rolled to its pending spec now and mark it as rolling;
        FailoverError (nothing touched) says why not. :meth:`run` does the work."""
        ctl = self.ctl
        name, new = ctl.slot.name, self.pending
        if new is None:
            raise FailoverError(
                f"slot {name} already runs its config's spec; change it and reload first"
            )
        if self.in_progress:
            raise FailoverError(f"slot {name} is already being rolled out")
        if (p := ctl.paused()) is not None:
            raise FailoverError(
                f"slot {name} is paused ({p.reason}); resume it first: a rollout relaunches engines"
            )
        if ctl.phase is not Phase.SERVING or ctl.active_engine() is None:
            raise FailoverError(f"slot {name} is {ctl.phase}; roll it out once it serves")
        if not [e for e in ctl.live() if e.role == "shadow"]:
            raise FailoverError(
                f"slot {name} has no shadow to hand over to, so a rollout would stop serving; "
                "give it shadows = 1 (a reload and a restart), or accept the gap and restart"
            )
        if ctl.planned.scheduled is not None:
            ctl.planned.cancel("cancelled: a rollout switches the slot over itself")
        progress = RolloutProgress(
            name,
            list(self.pending_changes),
            self.generation,
            self.generation + 1,
            started_at=time.time(),
        )
        self.progress, self.old = progress, ctl.scfg
        ctl.scfg, self.generation = new, progress.to_generation
        ctl.on_change()
        return progress

    def _step(self, what: str) -> None:
        assert self.progress is not None
        self.progress.to(what)
        self.ctl.log.info(f"rollout: {what}", rollout=self.progress.to_generation)
        self.ctl.on_change()

    async def run(self) -> None:
        """Carry out the rollout :meth:`begin` marked; never raises (the result is recorded)."""
        ctl, progress, old_cfg = self.ctl, self.progress, self.old
        assert progress is not None and old_cfg is not None
        self._switched = False
        try:
            await self._steps(progress.to_generation)
        except RolloutFailed as e:
            progress.reason = str(e)
            self._step(f"rolling back: {e}")
            ctl.scfg, self.generation = old_cfg, progress.from_generation
            for e2 in [e2 for e2 in ctl.live() if e2.generation == progress.to_generation]:
                await ctl.lifecycle.stop(e2, "rollout rolled back", wait=True)
            progress.result = "rolled_back"
            self._step("rolled back: the old spec serves; its shadows are relaunched")
        except FailoverError as e:  # after the switch: the new spec serves, its shadows did not
            progress.result, progress.reason = "error", str(e)
            self._step(
                f"the new spec serves, but rebuilding its shadows failed: {e} (relaunches go on)"
            )
        except Exception as e:  # a bug: recorded and logged, never the daemon's end
            progress.result, progress.reason = "error", f"internal error: {e!r}"
            ctl.log.error("rollout failed inside the supervisor", exc_info=e)
            self._step(f"stopped by an internal error ({e!r}); see the log")
        finally:
            if progress.result == "in_progress":  # cancelled: the daemon is stopping
                progress.result, progress.reason = "error", "interrupted (the supervisor stopped)"
            progress.finished_at = time.time()
            self.old = None
            if (self._switched or progress.result == "done") and self.pending == ctl.scfg:
                self.pending, self.pending_changes = None, []
            ctl.metrics.rollout_pending.labels(ctl.slot.name).set(1 if self.pending else 0)
            ctl.metrics.rollouts.labels(ctl.slot.name, progress.result).inc()
            ctl.replenisher.kick()
            ctl.on_change()

    async def _steps(self, new_gen: int) -> None:
        """The three steps (``_switched`` once the new spec serves)."""
        ctl, progress = self.ctl, self.progress
        assert progress is not None
        old_shadows = [e for e in ctl.live() if e.role == "shadow" and e.generation != new_gen]
        asleep = [e for e in old_shadows if e.state is EngineState.SLEEPING]
        if old_shadows:  # (one may have died since the rollout began: its place is free)
            first = (asleep or old_shadows)[0]
            self._step(f"replacing shadow {first.id} with an engine of the new spec")
            await ctl.lifecycle.stop(
                first, "rollout: replaced by an engine of the new spec", wait=True
            )
        else:
            self._step("starting a shadow of the new spec")
        try:
            await ctl.lifecycle.wait_for_place()
            fresh = await ctl.startup.start_shadow()
        except FailoverError as e:
            raise RolloutFailed(f"the new engine did not come up: {e}") from e
        old_active = ctl.active_engine()
        self._step(f"switching over from {old_active.id if old_active else '-'} to {fresh.id}")
        try:
            record = await ctl.planned.switchover(fresh.id, kind="rollout", drain_for=0)
        except FailoverError as e:
            raise RolloutFailed(f"the switchover was refused: {e}") from e
        progress.migrated_streams = record.moved_streams
        now = ctl.active_engine()
        if record.result != "promoted" or now is None or now.generation != new_gen:
            why = record.detail or f"the switchover ended {record.result}"
            raise RolloutFailed(f"the new engine did not take the slot: {why}")
        self._switched = True
        for old in [e for e in ctl.live() if e.role == "shadow" and e.generation != new_gen]:
            self._step(f"stopping old shadow {old.id}")
            await ctl.lifecycle.stop(old, "rollout: the slot runs the new spec", wait=True)
        while ctl.missing_shadows():
            self._step(f"starting shadows of the new spec ({ctl.missing_shadows()} to go)")
            await ctl.lifecycle.wait_for_place()  # the old active's place, once its exit is read
            await ctl.startup.start_shadow()
        progress.result = "done"
        self._step(f"done: the slot serves on {now.id} with the new spec")
