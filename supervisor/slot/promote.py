"""Unplanned moves of a slot: a shadow promoted when the active engine died (or for a
degraded slot once a shadow is ready), and the cluster leader's orders (wake the shadow it
chose; step down when the slot is served elsewhere).

On the death of a slot's active engine: pick a sleeping shadow; for a shadow on the same
GPUs, wait until the dead engine's whole process group is gone (its GPU memory with it);
claim epoch + 1 (the cluster fences a stale claim); wake the shadow; promote it. A shadow
that fails to wake is retired and the next one tried. With no shadow left the slot is
degraded until one is ready, or, configured without shadows, restarts its engine cold.
Every step is timed into the failover record.
"""

from __future__ import annotations

import time
from dataclasses import replace

from supervisor.coordination.local import ClaimRefused
from supervisor.model import Engine, EngineState, FailoverRecord
from supervisor.slot.core import Move, SlotCore, Step
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Event, FailoverCause


class Promoter:
    """Carries out the slot's unplanned promotions (effects ``promote_shadow``,
    ``hand_over``, ``wake_assigned``, ``stop_active``), and the recovery of a degraded
    slot once a shadow is ready (:meth:`recover`)."""

    def __init__(self, ctl: SlotCore) -> None:
        self.ctl = ctl

    def promote(self, engine: Engine, epoch: int) -> None:
        """The slot's new active engine at ``epoch``: the one place an epoch is taken on
        promotion (see also ``SlotController.confirm_epoch`` and ``adopt``)."""
        ctl = self.ctl
        ctl.slot.epoch = epoch
        ctl.slot.active = engine.id
        engine.role = "active"
        engine.spec = replace(engine.spec, role="active")
        ctl.lifecycle.set_state(engine, EngineState.ACTIVE, f"promoted at epoch {epoch}")

    async def recover(self, why: str) -> None:
        """A degraded slot (or one whose active engine did not start) with a shadow ready:
        promote it."""
        ctl = self.ctl
        if ctl.slot.active is not None or ctl.coord.served_elsewhere(ctl.slot.name):
            return
        await ctl.handle(Event.SHADOW_READY, why)

    async def promote_shadow(self, move: Move, why: str) -> None:
        """Effect ``promote_shadow``: fail the slot over to a sleeping shadow."""
        ctl = self.ctl
        if move.record is None:  # a degraded slot whose shadow is ready
            move.record = FailoverRecord(
                ctl.slot.name, None, f"recover: {why}", kind="recovery", detected_at=time.time()
            )
        if move.in_background:
            ctl.spawn(self.failover, move, why=f"recover: {why}")
        else:
            await self.failover(move)

    async def failover(self, move: Move) -> None:
        ctl, record = self.ctl, move.record
        assert record is not None
        ctl.history.appendleft(record)
        t0 = time.monotonic()
        async with ctl.lock:
            try:
                await self._failover_locked(move, record)
            except FailoverError as e:
                record.result = "error"
                await ctl.handle(
                    Event.FAILOVER_FAILED, f"failover failed: {e}", reason=record.reason
                )
            finally:
                record.finished_at = record.finished_at or time.time()
                ctl.metrics.failovers.labels(ctl.slot.name, move.cause.value, record.result).inc()
                if record.result == "promoted":
                    seconds = time.monotonic() - t0
                    ctl.metrics.failover_seconds.labels(ctl.slot.name).observe(seconds)
        ctl.replenisher.kick()

    def _candidates(self, move: Move) -> list[Engine]:
        shadows = self.ctl.sleeping_shadows()
        if move.target in shadows:  # a switchover's chosen shadow goes first
            shadows.remove(move.target)
            shadows.insert(0, move.target)
        return shadows

    async def _failover_locked(self, move: Move, record: FailoverRecord) -> None:
        ctl, dead = self.ctl, move.dead
        if ctl.grouped:
            # One member cannot replace a group: the cluster leader promotes a whole group.
            record.result = "handed to cluster"
            why = f"group member failed; the cluster leader fails the group over ({record.reason})"
            await ctl.handle(Event.HANDED_TO_CLUSTER, why)
            return
        known = ctl.slot.epoch  # the epoch our next claim builds on
        while True:
            shadows = self._candidates(move)
            if not shadows:
                await self._no_shadow(record)
                return
            shadow = shadows[0]
            ctl.log.info(
                f"failing over to {shadow.id}: {record.reason}",
                failed=record.failed_engine,
                to=shadow.id,
                epoch=ctl.slot.epoch,
            )
            if dead is not None and set(dead.spec.gpus) & set(shadow.spec.gpus) and dead.pid:
                with Step(record, "memory_release"):
                    gone = await ctl.lifecycle.memory_released(dead)
                if not gone:
                    raise FailoverError(
                        f"engine {dead.id}'s processes still hold its GPUs after "
                        f"{ctl.cfg.failover.memory_release_timeout}s; not waking a paired "
                        "shadow into an OOM"
                    )
            try:
                with Step(record, "fence"):
                    epoch = await ctl.coord.claim(ctl.slot.name, shadow.unit, known, record.reason)
            except ClaimRefused as e:
                # Not fenced: undecided. The slot stays degraded (and says why) and is
                # promoted once etcd answers again (etcd_back).
                record.result, record.detail = "degraded", str(e)
                ctl.waiting_for_etcd = True
                await ctl.handle(Event.FAILOVER_FAILED, f"not promoting {shadow.id} yet: {e}")
                return
            if epoch is None:
                record.result = "fenced"
                why = f"the slot's epoch moved on in the cluster; not promoting {shadow.id}"
                await ctl.handle(Event.FENCED, why, epoch=ctl.slot.epoch)
                return
            known = epoch  # claimed: if this wake fails, the next claim goes on from here
            try:
                with Step(record, "wake"):
                    await ctl.lifecycle.wake(shadow)
            except FailoverError as e:
                ctl.log.error(f"shadow {shadow.id} failed to wake; trying the next", error=str(e))
                ctl.lifecycle.wake_failed(shadow, e)
                ctl.replenisher.failures += 1  # a shadow that cannot wake is a failed launch
                continue
            with Step(record, "promote"):
                self.promote(shadow, epoch)
            ctl.metrics.wake_seconds.labels(ctl.slot.name).observe(record.steps["wake"])
            record.promoted_engine, record.epoch, record.result = shadow.id, epoch, "promoted"
            await ctl.handle(
                Event.PROMOTED,
                f"promoted {shadow.id} at epoch {epoch}: {record.reason}; wake took "
                f"{record.steps['wake'] * 1000:.0f} ms",
                steps=record.steps,
                total_ms=round((time.time() - record.detected_at) * 1000, 1),
            )
            return

    async def _no_shadow(self, record: FailoverRecord) -> None:
        ctl = self.ctl
        if ctl.facts().restarts_cold:
            record.result = "cold-restarting"
            ctl.replenisher.cold_record = record
        else:
            record.result = "degraded"
        await ctl.handle(Event.NO_SHADOW, f"no sleeping shadow to promote: {record.reason}")

    async def hand_over(self, move: Move, why: str) -> None:
        """Effect ``hand_over``: the cluster hears that this node has no shadow left."""
        await self.ctl.coord.hand_over(self.ctl.slot.name, f"no shadow left on {self.ctl.cfg.node}")

    async def wake_assigned(self, move: Move, why: str) -> None:
        """Effect ``wake_assigned``: the cluster leader made ``move.target`` the slot's
        active engine at ``move.epoch``; a failed wake marks it failed (the leader moves on)."""
        ctl, engine, epoch = self.ctl, move.target, move.epoch
        assert engine is not None
        record = FailoverRecord(
            ctl.slot.name, None, f"cluster: {move.reason}", kind="cluster", detected_at=time.time()
        )
        ctl.history.appendleft(record)
        try:
            with Step(record, "wake"):
                await ctl.lifecycle.wake(engine)
        except FailoverError as e:
            record.result = "error"
            ctl.lifecycle.wake_failed(engine, e)
            await ctl.handle(
                Event.FAILOVER_FAILED, f"assigned shadow {engine.id} failed to wake: {e}"
            )
            return
        finally:
            record.finished_at = time.time()
        self.promote(engine, epoch)
        record.promoted_engine, record.epoch, record.result = engine.id, epoch, "promoted"
        await ctl.handle(Event.PROMOTED, f"promoted {engine.id} at epoch {epoch} for the cluster")
        ctl.metrics.failovers.labels(ctl.slot.name, FailoverCause.CLUSTER.value, "promoted").inc()

    async def stop_active(self, move: Move, why: str) -> None:
        """Effect ``stop_active``: the cluster serves the slot elsewhere: ours stops."""
        engine = move.dead
        assert engine is not None
        self.ctl.slot.active = None
        fenced = f"fenced at epoch {move.epoch}"
        await self.ctl.lifecycle.stop(engine, f"{fenced} by {move.by}", done=fenced)
