"""Planned moves of a slot: switchover (now or scheduled) and drain.

A switchover moves the slot to a shadow with its streams (token-exact, as on a failure,
but with no detection and no error). Where the shadow can wake while the old engine serves
(other GPUs, or standing by awake), it does: make before break, effect ``switch_live``.
Otherwise the streams move at once and wait while the old engine stops and the shadow
wakes: effect ``stop_then_promote``. Refused, touching nothing, when no shadow could take
the slot. A drain of the active engine is a switchover; of a shadow, a stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from supervisor.coordination.local import ClaimRefused
from supervisor.model import Engine, EngineState, FailoverRecord, ScheduledSwitchover
from supervisor.slot.core import Move, SlotCore, Step
from supervisor.slot.placement import FailoverError
from supervisor.slot.table import Effect, Event, FailoverCause, Phase


class Planned:
    """A slot's planned moves and its one scheduled switchover."""

    def __init__(
        self,
        ctl: SlotCore,
        move_streams: Callable[[str], int] = lambda engine_id: 0,
        streams_on: Callable[[str], int] = lambda engine_id: 0,
    ) -> None:
        self.ctl = ctl
        # The frontend's: take every stream off an engine now (they resume where the slot
        # is served), and how many it relays through an engine now.
        self.move_streams, self.streams_on = move_streams, streams_on
        self.scheduled: ScheduledSwitchover | None = None
        self._scheduled_scope: anyio.CancelScope | None = None

    def check_target(self, to: str | None) -> Engine:
        """The shadow a switchover moves the slot to; FailoverError (nothing touched) when
        there is none."""
        ctl = self.ctl
        if to is not None:
            target = ctl.engines.get(to)
            if target is None or target.state is not EngineState.SLEEPING:
                raise FailoverError(f"{to!r} is not a sleeping shadow of slot {ctl.slot.name}")
            return target
        shadows = ctl.sleeping_shadows()
        if not shadows:
            raise FailoverError(
                f"slot {ctl.slot.name} has no sleeping shadow to switch over to "
                f"({ctl.replenisher.shortfall or 'none ready'}); the active engine keeps serving"
            )
        # A rollout's new engines go first: a plain switchover must not undo one.
        return max(shadows, key=lambda e: e.generation)

    def make_before_break(self, old: Engine, new: Engine) -> bool:
        """Whether ``new`` can wake while ``old`` still serves: on other GPUs, or standing
        by awake already. On shared GPUs the old engine must let go of its memory first;
        a self-promoting shadow (flock) wakes only when the old one's lock is free."""
        if self.ctl.lifecycle.flock or self.ctl.grouped:
            return False
        return new.standing_by_awake or not set(old.spec.gpus) & set(new.spec.gpus)

    async def switchover(
        self, to: str | None, kind: str = "switchover", drain_for: float | None = None
    ) -> FailoverRecord:
        """Move the slot to shadow ``to`` (None: the best one asleep). ``drain_for``: how
        long the old engine may finish its streams before the rest move (default
        ``failover.drain_limit``; only where the new engine already serves)."""
        ctl = self.ctl
        if drain_for is None:
            drain_for = ctl.cfg.failover.drain_limit
        target = self.check_target(to)
        old = ctl.active_engine()
        if old is not None and ctl.phase is not Phase.SERVING:
            raise FailoverError(f"slot {ctl.slot.name} is {ctl.phase}; try again once serving")
        record = FailoverRecord(
            ctl.slot.name,
            old.id if old else None,
            f"{kind}: requested",
            kind=kind,
            detected_at=time.time(),
        )
        move = Move(record, FailoverCause.of_plan(kind), old, target, drain_for=drain_for)
        if old is None:
            why = f"{kind} requested on a slot with no active"
            d = await ctl.handle(Event.SWITCHOVER, why, move=move)
            if d is None or d.effect is not Effect.PROMOTE_SHADOW:
                raise FailoverError(f"slot {ctl.slot.name} is {ctl.phase}")
            return record
        live = self.make_before_break(old, target)
        why = (
            f"{kind}: {target.id} wakes while {old.id} serves"
            if live
            else f"{kind} of {old.id} requested"
        )
        if await ctl.handle(Event.SWITCHOVER, why, move=move, make_before_break=live) is None:
            raise FailoverError(f"slot {ctl.slot.name} is {ctl.phase}")
        return record

    async def stop_then_promote(self, move: Move, why: str) -> None:
        """Effect ``stop_then_promote``: the streams leave now and wait for the shadow (it
        shares the old engine's GPUs: cutting them at the end of the old engine's drain
        would stall them more); the old engine stops, then the shadow is promoted."""
        ctl, old, record = self.ctl, move.dead, move.record
        assert old is not None and record is not None
        ctl.slot.active = None
        ctl.lifecycle.set_state(old, EngineState.DRAINING, f"{record.kind} requested")
        record.moved_streams = self.move_streams(old.id)
        with Step(record, "drain"):
            await ctl.lifecycle.stop(old, f"{record.kind} requested", done=record.kind)
        await ctl.promoter.failover(move)

    async def switch_live(self, move: Move, why: str) -> None:
        """Effect ``switch_live``, make before break: wake the target while the old engine
        serves, switch the slot to it at epoch + 1 (new requests go there), let the old one
        finish its streams for ``drain_for`` seconds, move the rest, then stop it. A failed
        wake leaves the old engine serving."""
        ctl, old, new, record = self.ctl, move.dead, move.target, move.record
        assert old is not None and new is not None and record is not None
        ctl.history.appendleft(record)
        t0 = time.monotonic()
        try:
            async with ctl.lock:
                epoch = await self._wake_and_claim(record, old, new)
                if epoch is None:
                    return
                with Step(record, "promote"):
                    # One step for routing: the old engine stops being a candidate as the
                    # new one becomes the active engine.
                    ctl.lifecycle.set_state(
                        old, EngineState.DRAINING, f"{record.kind}: {new.id} serves"
                    )
                    ctl.promoter.promote(new, epoch)
                ctl.metrics.wake_seconds.labels(ctl.slot.name).observe(record.steps["wake"])
                record.promoted_engine, record.epoch, record.result = new.id, epoch, "promoted"
                await ctl.handle(
                    Event.PROMOTED,
                    f"{record.kind}: {new.id} serves at epoch {epoch}; {old.id} drains",
                    steps=record.steps,
                )
                ctl.metrics.failover_seconds.labels(ctl.slot.name).observe(time.monotonic() - t0)
            await self._drain_old(record, old, new, move.drain_for)
        finally:
            record.finished_at = time.time()
            result = record.result if record.result in ("promoted", "error") else "degraded"
            ctl.metrics.failovers.labels(ctl.slot.name, move.cause.value, result).inc()
            ctl.replenisher.kick()

    async def _wake_and_claim(self, record: FailoverRecord, old: Engine, new: Engine) -> int | None:
        """Wake ``new`` and claim the next epoch for it; None: the switch is off (the old
        engine serves on, or the cluster fenced us), and the slot has been told."""
        ctl = self.ctl
        try:
            with Step(record, "wake"):
                await ctl.lifecycle.wake(new)
        except FailoverError as e:
            record.result, record.detail = "error", f"{new.id} failed to wake: {e}"
            ctl.lifecycle.wake_failed(new, e)
            await ctl.handle(Event.SWITCHOVER_ABORTED, f"{record.detail}; {old.id} serves on")
            return None
        put_back = "woken for a switch that did not happen"
        try:
            with Step(record, "fence"):
                return await self._claim(record, new)
        except ClaimRefused as e:
            record.result, record.detail = "error", f"not switching now: {e}"
            await ctl.lifecycle.stop(new, put_back)  # the replenisher starts a fresh one
            await ctl.handle(Event.SWITCHOVER_ABORTED, f"{record.detail}; {old.id} serves on")
            return None
        except _Fenced:
            record.result = "fenced"
            record.detail = "the slot's epoch moved on in the cluster"
            await ctl.lifecycle.stop(new, put_back)
            await ctl.handle(Event.FENCED, f"{record.detail}; not switching to {new.id}")
            return None

    async def _claim(self, record: FailoverRecord, new: Engine) -> int:
        ctl = self.ctl
        epoch = await ctl.coord.claim(ctl.slot.name, new.unit, ctl.slot.epoch, record.reason)
        if epoch is None:
            raise _Fenced
        return epoch

    async def _drain_old(
        self, record: FailoverRecord, old: Engine, new: Engine, drain_for: float
    ) -> None:
        ctl = self.ctl
        with Step(record, "drain"):
            # The old engine's streams may finish where they are (no re-prefill) ...
            with anyio.move_on_after(drain_for):
                while self.streams_on(old.id):
                    await anyio.sleep(0.05)
        # ... and past the limit they move instead of being cut by its stop.
        record.moved_streams = self.move_streams(old.id)
        if record.moved_streams:
            ctl.log.info(
                f"{record.moved_streams} stream(s) moved off {old.id} to {new.id}",
                drained_for=record.steps["drain"],
            )
        with Step(record, "stop_old"):
            await ctl.lifecycle.stop(old, f"{record.kind}: {new.id} serves", done=record.kind)

    # -- a scheduled switchover ----------------------------------------------------------
    def schedule(self, at: float, to: str | None) -> ScheduledSwitchover:
        """A switchover at wall time ``at`` (replacing one already scheduled); the target
        is checked now and again when it fires."""
        ctl = self.ctl
        self.check_target(to)
        self.cancel("replaced by a new schedule")
        plan = ScheduledSwitchover(at, to, time.time())
        if not ctl.spawn(self._fire, plan, why="a scheduled switchover"):
            raise FailoverError("the supervisor is shutting down")
        self.scheduled = plan
        ctl.log.info(
            f"switchover scheduled for {time.strftime('%H:%M:%S', time.localtime(at))}",
            to=to,
            in_s=round(at - time.time(), 3),
        )
        ctl.on_change()
        return plan

    def cancel(self, why: str = "cancelled") -> ScheduledSwitchover | None:
        plan, self.scheduled = self.scheduled, None
        if self._scheduled_scope is not None:
            self._scheduled_scope.cancel()
            self._scheduled_scope = None
        if plan is not None:
            self.ctl.log.info(f"scheduled switchover {why}", at=plan.at)
            self.ctl.on_change()
        return plan

    async def _fire(self, plan: ScheduledSwitchover) -> None:
        ctl = self.ctl
        with anyio.CancelScope() as scope:
            self._scheduled_scope = scope
            await anyio.sleep(max(0.0, plan.at - time.time()))
            self.scheduled, self._scheduled_scope = None, None
            ctl.on_change()
            ctl.log.info("scheduled switchover fires", to=plan.to)
            try:
                record = await self.switchover(plan.to)
            except FailoverError as e:
                ctl.log.error("scheduled switchover refused", error=str(e))
                now = time.time()
                ctl.history.appendleft(
                    FailoverRecord(
                        ctl.slot.name,
                        ctl.slot.active,
                        "switchover: scheduled",
                        kind="switchover",
                        detected_at=now,
                        result="error",
                        detail=str(e),
                        finished_at=now,
                    )
                )
                return
            ctl.log.info("scheduled switchover done", result=record.result)

    # -- drain ---------------------------------------------------------------------------
    async def drain(self, engine_id: str, limit: float | None = None) -> None:
        """Stop an engine gracefully; an active one hands the slot to a shadow first and
        its streams finish there or, past ``limit``, move (see :meth:`switchover`)."""
        ctl = self.ctl
        engine = ctl.engines.get(engine_id)
        if engine is None:
            raise FailoverError(f"no engine {engine_id!r} in slot {ctl.slot.name}")
        if engine.id == ctl.slot.active:
            await self.switchover(None, kind="drain", drain_for=limit)
            return
        await ctl.lifecycle.stop(engine, "drain requested", done="drained")


class _Fenced(Exception):
    """The cluster's epoch moved on: the claim was refused for good."""
