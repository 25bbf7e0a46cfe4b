"""Rolling engine upgrade of one slot: engines of a new spec take over with no stream lost.

The steps, each logged with its reason and shown in ``/status`` under the slot's
``rollout``:

1. **New shadow.** One sleeping shadow of the old spec is stopped and a shadow of the new
   spec starts in its place (its port and GPUs), loads and goes to sleep. If it does not
   come up (a bad flag, a model that does not load, a failed health check) the rollout is
   rolled back: the new engine is stopped, the old spec is restored and the slot's old
   shadow relaunched. The active engine never stopped serving.
2. **Switch.** A planned switchover to the new shadow at epoch + 1 (see
   :meth:`SlotController.switchover`): where it can wake while the old engine serves, it
   does, and every in-flight stream moves to it with the same token-exact continuation
   as on a failure; on shared GPUs the streams move at once and wait while the old engine
   stops and the new one wakes. A wake that fails rolls back as in step 1.
3. **Rebuild.** The remaining old shadows are stopped and the slot's shadows are relaunched
   from the new spec, up to its shadow count.

A slot without shadows cannot be rolled without a gap (there is no engine to hand it to):
the rollout is refused with the reason.
"""

from __future__ import annotations

import time

from supervisor.config import SlotConfig
from supervisor.failover import FailoverError, SlotController
from supervisor.model import EngineState, RolloutProgress
from supervisor.slotstates import Phase


class RolloutFailed(Exception):
    """A step failed before the new spec served: the rollout rolls back."""


def begin(ctl: SlotController, new: SlotConfig, changes: list[str]) -> RolloutProgress:
    """Check that ``ctl``'s slot can be rolled to ``new`` now and mark it as rolling;
    FailoverError (nothing touched) says why not. :func:`run` does the work."""
    name = ctl.slot.name
    if ctl.rolling_out:
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
    if ctl.scheduled is not None:
        ctl.cancel_scheduled("cancelled: a rollout switches the slot over itself")
    progress = RolloutProgress(
        name, list(changes), ctl.generation, ctl.generation + 1, started_at=time.time()
    )
    ctl.rollout = progress
    ctl.rollout_from = ctl.scfg
    ctl.scfg = new
    ctl.generation = progress.to_generation
    ctl.on_change()
    return progress


async def run(ctl: SlotController, progress: RolloutProgress) -> None:
    """Carry out a rollout :func:`begin` marked; never raises (the result is recorded)."""
    old_cfg = ctl.rollout_from
    assert old_cfg is not None
    new_gen = progress.to_generation
    log = ctl.log.bind(rollout=new_gen)

    def step(what: str) -> None:
        progress.to(what)
        log.info(f"rollout: {what}")
        ctl.on_change()

    switched = False
    try:
        old_shadows = [e for e in ctl.live() if e.role == "shadow" and e.generation != new_gen]
        asleep = [e for e in old_shadows if e.state is EngineState.SLEEPING]
        if old_shadows:  # (one may have died since the rollout began: its place is free)
            first = (asleep or old_shadows)[0]
            step(f"replacing shadow {first.id} with an engine of the new spec")
            await ctl.retire_now(first, "rollout: replaced by an engine of the new spec")
        else:
            step("starting a shadow of the new spec")
        try:
            await ctl.wait_for_place()
            fresh = await ctl.start_shadow()
        except FailoverError as e:
            raise RolloutFailed(f"the new engine did not come up: {e}") from e
        old_active = ctl.active_engine()
        step(f"switching over from {old_active.id if old_active else '-'} to {fresh.id}")
        try:
            record = await ctl.switchover(fresh.id, kind="rollout", drain_for=0)
        except FailoverError as e:
            raise RolloutFailed(f"the switchover was refused: {e}") from e
        progress.migrated_streams = record.moved_streams
        now = ctl.active_engine()
        if record.result != "promoted" or now is None or now.generation != new_gen:
            why = record.detail or f"the switchover ended {record.result}"
            raise RolloutFailed(f"the new engine did not take the slot: {why}")
        switched = True
        for old in [e for e in ctl.live() if e.role == "shadow" and e.generation != new_gen]:
            step(f"stopping old shadow {old.id}")
            await ctl.retire_now(old, "rollout: the slot runs the new spec")
        while ctl.missing_shadows():
            step(f"starting shadows of the new spec ({ctl.missing_shadows()} to go)")
            await ctl.wait_for_place()  # the old active's place, once its exit is read
            await ctl.start_shadow()
        progress.result = "done"
        step(f"done: the slot serves on {now.id} with the new spec")
    except RolloutFailed as e:
        progress.reason = str(e)
        step(f"rolling back: {e}")
        ctl.scfg, ctl.generation = old_cfg, progress.from_generation
        for e2 in [e2 for e2 in ctl.live() if e2.generation == new_gen]:
            await ctl.retire_now(e2, "rollout rolled back")
        progress.result = "rolled_back"
        step("rolled back: the old spec serves; its shadows are relaunched")
    except FailoverError as e:  # after the switch: the new spec serves, its shadows did not
        progress.result, progress.reason = "error", str(e)
        step(f"the new spec serves, but rebuilding its shadows failed: {e} (relaunches go on)")
    except Exception as e:  # a bug: recorded and logged, never the daemon's end
        progress.result, progress.reason = "error", f"internal error: {e!r}"
        log.error("rollout failed inside the supervisor", exc_info=e)
        step(f"stopped by an internal error ({e!r}); see the log")
    finally:
        if progress.result == "in_progress":  # cancelled: the daemon is stopping
            progress.result, progress.reason = "error", "interrupted (the supervisor stopped)"
        progress.finished_at = time.time()
        ctl.rollout_from = None
        if (switched or progress.result == "done") and ctl.pending == ctl.scfg:
            ctl.pending, ctl.pending_changes = None, []
        ctl.metrics.rollout_pending.labels(ctl.slot.name).set(1 if ctl.pending else 0)
        ctl.metrics.rollouts.labels(ctl.slot.name, progress.result).inc()
        ctl.kick_replenish()
        ctl.on_change()
