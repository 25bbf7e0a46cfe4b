"""A slot's life as one table: phases, the events that move it, and what each move does.

Pure data (no I/O), read the way h11 reads a connection's states. Each row is
``(phase, event, guard) -> (next phase, effect, degraded)``. A guard reads one frozen
snapshot of the slot's facts (:class:`Facts`), taken when the event comes, as Patroni reads
one Cluster per cycle: "the active engine died while the node is paused" is the row
``(serving, active_died, paused)``, not an event of its own. Rows of one phase and event are
tried in order; the first whose guard holds decides. An event no row lists for the current
phase is refused (and logged): once ``stopped``, a relaunch that was waiting on its backoff
launches nothing.

:func:`decide` returns a :class:`Decision` whose :attr:`~Decision.sentence` is at once the
log line, the slot's degraded reason in ``/status`` (where the row sets one) and the reason
``/status`` shows. :class:`supervisor.slot.controller.SlotController` is the only caller:
its ``handle(event, why)`` applies the decision and runs the effect's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"  # engines of a fresh supervisor are loading
    SERVING = "serving"  # a ready active engine serves the slot
    FAILING_OVER = "failing_over"  # the active engine is gone (or leaving); one is promoted
    COLD_STARTING = "cold_starting"  # no shadow to promote: an active engine loads cold
    DEGRADED = "degraded"  # nothing serves and nothing can yet; waits for a shadow
    STANDBY = "standby"  # another node serves the slot (or its group); shadows only here
    STOPPED = "stopped"  # the supervisor is shutting down: nothing is launched or woken


class Event(StrEnum):
    ACTIVE_READY = "active_ready"  # an active engine came up (start or cold start)
    ACTIVE_FAILED_TO_START = "active_failed_to_start"
    SERVED_ELSEWHERE = "served_elsewhere"  # the cluster says another node serves it
    ACTIVE_DIED = "active_died"  # health declared the active engine dead
    SWITCHOVER = "switchover"  # an operator (drain, rollout, schedule) moves the slot
    PROMOTED = "promoted"  # a shadow woke and serves at epoch + 1
    NO_SHADOW = "no_shadow"  # failing over found no sleeping shadow
    FAILOVER_FAILED = "failover_failed"  # e.g. the dead engine never let go of its GPUs
    COLD_START = "cold_start"  # a slot without shadows launches its active engine anew
    FENCED = "fenced"  # the slot's epoch moved on in the cluster: not ours to promote
    HANDED_TO_CLUSTER = "handed_to_cluster"  # a group's member failed: the leader decides
    SHADOW_READY = "shadow_ready"  # a shadow is asleep and could be woken
    ASSIGNED = "assigned"  # the cluster leader chose our shadow for the slot
    STEP_DOWN = "step_down"  # the cluster serves the slot elsewhere now: stop ours
    SHADOWS_MISSING = "shadows_missing"  # fewer shadows than configured (one died, ...)
    SWITCHOVER_ABORTED = "switchover_aborted"  # its new engine failed: the old one serves on
    STOP = "stop"


class Effect(StrEnum):
    """What the controller does once the phase moved (``EFFECTS`` maps each to a method)."""

    NONE = "none"
    PROMOTE_SHADOW = "promote_shadow"  # wake a sleeping shadow, claim epoch + 1, serve
    SWITCH_LIVE = "switch_live"  # wake the target while the old engine serves, then move
    STOP_THEN_PROMOTE = "stop_then_promote"  # stop the old engine, then promote the target
    HAND_OVER = "hand_over"  # tell the cluster this node has no shadow left
    LAUNCH_SHADOW = "launch_shadow"  # the replenisher launches one missing shadow
    LAUNCH_COLD = "launch_cold"  # launch an active engine cold (a slot without shadows)
    WAKE_ASSIGNED = "wake_assigned"  # wake the shadow the cluster leader chose
    STOP_ACTIVE = "stop_active"  # a fenced node stops the active engine it still runs


class Degraded(StrEnum):
    """What the move does to the slot's degraded reason."""

    KEEP = "keep"
    SET = "set"  # the decision's sentence becomes the reason
    CLEAR = "clear"  # something serves (here or elsewhere): not degraded


@dataclass(frozen=True)
class Facts:
    """The slot as one snapshot, taken when an event comes; the guards read only this."""

    pause: str = ""  # the reason of the pause in force (the slot's or its node's); "" none
    restarts_cold: bool = False  # no shadows configured, and this node hosts the active
    make_before_break: bool = False  # a switchover's target can wake while the old serves


class Guard(StrEnum):
    ALWAYS = "always"
    PAUSED = "paused"
    RESTARTS_COLD = "restarts_cold"
    MAKE_BEFORE_BREAK = "make_before_break"


GUARDS: dict[Guard, Callable[[Facts], bool]] = {
    Guard.ALWAYS: lambda f: True,
    Guard.PAUSED: lambda f: bool(f.pause),
    Guard.RESTARTS_COLD: lambda f: f.restarts_cold,
    Guard.MAKE_BEFORE_BREAK: lambda f: f.make_before_break,
}


@dataclass(frozen=True)
class Row:
    phase: Phase
    event: Event
    guard: Guard
    to: Phase
    effect: Effect = Effect.NONE
    degraded: Degraded = Degraded.KEEP
    says: str = "{why}"  # the sentence; {why} is the caller's reason, {pause} the pause's


@dataclass(frozen=True)
class Decision:
    """One row applied to one event: where the slot goes, what it does, and why."""

    row: Row
    sentence: str

    @property
    def to(self) -> Phase:
        return self.row.to

    @property
    def effect(self) -> Effect:
        return self.row.effect


P, E, G, X, D = Phase, Event, Guard, Effect, Degraded
_LIVE = (P.STARTING, P.SERVING, P.FAILING_OVER, P.COLD_STARTING, P.DEGRADED, P.STANDBY)
_PAUSED_DEATH = "{why} while paused ({pause}); nothing is promoted until resumed"


def _rows() -> list[Row]:
    rows = [
        # Start-up, and an active engine that loads cold.
        Row(P.STARTING, E.ACTIVE_READY, G.ALWAYS, P.SERVING, degraded=D.CLEAR),
        Row(P.STARTING, E.ACTIVE_FAILED_TO_START, G.ALWAYS, P.DEGRADED, degraded=D.SET),
        Row(P.STARTING, E.SERVED_ELSEWHERE, G.ALWAYS, P.STANDBY, degraded=D.CLEAR),
        Row(P.COLD_STARTING, E.ACTIVE_READY, G.ALWAYS, P.SERVING, degraded=D.CLEAR),
        Row(P.COLD_STARTING, E.ACTIVE_FAILED_TO_START, G.ALWAYS, P.DEGRADED, degraded=D.SET),
        Row(P.COLD_STARTING, E.SERVED_ELSEWHERE, G.ALWAYS, P.STANDBY, degraded=D.CLEAR),
        Row(P.DEGRADED, E.ACTIVE_READY, G.ALWAYS, P.SERVING, degraded=D.CLEAR),
        Row(P.DEGRADED, E.SERVED_ELSEWHERE, G.ALWAYS, P.STANDBY, degraded=D.CLEAR),
        Row(P.DEGRADED, E.COLD_START, G.ALWAYS, P.COLD_STARTING, X.LAUNCH_COLD),
        Row(P.STANDBY, E.ACTIVE_READY, G.ALWAYS, P.SERVING, degraded=D.CLEAR),
        # The active engine dies: paused, nothing is promoted; else a shadow is.
        Row(P.STARTING, E.ACTIVE_DIED, G.PAUSED, P.DEGRADED, degraded=D.SET, says=_PAUSED_DEATH),
        Row(P.STARTING, E.ACTIVE_DIED, G.ALWAYS, P.FAILING_OVER, X.PROMOTE_SHADOW, D.SET),
        Row(P.SERVING, E.ACTIVE_DIED, G.PAUSED, P.DEGRADED, degraded=D.SET, says=_PAUSED_DEATH),
        Row(P.SERVING, E.ACTIVE_DIED, G.ALWAYS, P.FAILING_OVER, X.PROMOTE_SHADOW, D.SET),
        Row(P.DEGRADED, E.ACTIVE_DIED, G.ALWAYS, P.DEGRADED, degraded=D.SET),
        Row(P.STANDBY, E.ACTIVE_DIED, G.ALWAYS, P.STANDBY, degraded=D.SET),
        # Failing over: a group is the leader's; otherwise it ends served, degraded or fenced.
        Row(P.FAILING_OVER, E.HANDED_TO_CLUSTER, G.ALWAYS, P.STANDBY, degraded=D.SET),
        Row(P.FAILING_OVER, E.PROMOTED, G.ALWAYS, P.SERVING, degraded=D.CLEAR),
        Row(
            P.FAILING_OVER,
            E.NO_SHADOW,
            G.RESTARTS_COLD,
            P.DEGRADED,
            X.HAND_OVER,
            D.SET,
            "{why}; no shadows configured: restarting the active engine cold",
        ),
        Row(P.FAILING_OVER, E.NO_SHADOW, G.ALWAYS, P.DEGRADED, X.HAND_OVER, D.SET),
        Row(P.FAILING_OVER, E.FAILOVER_FAILED, G.ALWAYS, P.DEGRADED, degraded=D.SET),
        Row(P.FAILING_OVER, E.FENCED, G.ALWAYS, P.STANDBY, degraded=D.CLEAR),
        Row(P.FAILING_OVER, E.STEP_DOWN, G.ALWAYS, P.STANDBY, degraded=D.CLEAR),
        Row(P.FAILING_OVER, E.SWITCHOVER_ABORTED, G.ALWAYS, P.SERVING),
        Row(P.STANDBY, E.NO_SHADOW, G.ALWAYS, P.STANDBY, X.HAND_OVER),
        # Planned moves: where the target can wake while the old engine serves, it does.
        Row(P.SERVING, E.SWITCHOVER, G.MAKE_BEFORE_BREAK, P.FAILING_OVER, X.SWITCH_LIVE),
        Row(P.SERVING, E.SWITCHOVER, G.ALWAYS, P.FAILING_OVER, X.STOP_THEN_PROMOTE, D.SET),
        Row(P.SERVING, E.STEP_DOWN, G.ALWAYS, P.STANDBY, X.STOP_ACTIVE, D.CLEAR),
        # An operator's switchover of a slot that nothing serves promotes a shadow, paused
        # or not (a pause holds off what is automatic, never what is asked for).
        Row(P.DEGRADED, E.SWITCHOVER, G.ALWAYS, P.FAILING_OVER, X.PROMOTE_SHADOW),
        # A shadow is ready: a degraded slot is served again, unless paused.
        Row(P.DEGRADED, E.SHADOW_READY, G.PAUSED, P.DEGRADED, says="{why}; paused ({pause})"),
        Row(P.DEGRADED, E.SHADOW_READY, G.ALWAYS, P.FAILING_OVER, X.PROMOTE_SHADOW),
        # The cluster leader's orders.
        Row(P.DEGRADED, E.ASSIGNED, G.ALWAYS, P.FAILING_OVER, X.WAKE_ASSIGNED),
        Row(P.STANDBY, E.ASSIGNED, G.ALWAYS, P.FAILING_OVER, X.WAKE_ASSIGNED),
    ]
    for phase in _LIVE:
        rows.append(Row(phase, E.SHADOWS_MISSING, G.ALWAYS, phase, X.LAUNCH_SHADOW))
        if phase is not P.DEGRADED:
            rows.append(Row(phase, E.SHADOW_READY, G.ALWAYS, phase))
        rows.append(Row(phase, E.STOP, G.ALWAYS, P.STOPPED))
    return rows


TABLE: tuple[Row, ...] = tuple(_rows())


def decide(phase: Phase, event: Event, facts: Facts, why: str) -> Decision | None:
    """What ``event`` does to a slot in ``phase`` given ``facts``; None: refused there."""
    for row in TABLE:
        if row.phase is phase and row.event is event and GUARDS[row.guard](facts):
            return Decision(row, row.says.format(why=why, pause=facts.pause))
    return None


def table_markdown() -> str:
    """The table as docs/failover.md shows it (kept in step by a test)."""
    order = list(P)
    rows = sorted(TABLE, key=lambda r: (order.index(r.phase), r.event))  # stable: guards keep order
    lines = [
        f"| `{r.phase}` | `{r.event}` | {'—' if r.guard is G.ALWAYS else f'`{r.guard}`'} "
        f"| `{r.to}` | {'—' if r.effect is X.NONE else f'`{r.effect}`'} "
        f"| {'—' if r.degraded is D.KEEP else r.degraded} |"
        for r in rows
    ]
    head = "| phase | event | guard | next phase | effect | degraded |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(lines) + "\n"


class FailoverCause(StrEnum):
    """What started a failover or a planned move: the ``reason`` label of
    ``failover_supervisor_failovers_total`` (never drawn from a record's prose reason)."""

    EXIT = "failover:exit"
    PROBE = "failover:probe"
    STREAM = "failover:stream"
    GPU = "failover:gpu"
    ADMIN = "failover:admin"
    SWITCHOVER = "switchover:switchover"
    DRAIN = "drain:drain"
    ROLLOUT = "rollout:rollout"
    RECOVERY = "recovery:recover"
    CLUSTER = "cluster"

    @classmethod
    def of_death(cls, source: str) -> FailoverCause:
        """The cause for an engine declared dead by ``source`` (see ``DEATH_SOURCES``)."""
        return cls(f"failover:{source}")

    @classmethod
    def of_plan(cls, kind: str) -> FailoverCause:
        """The cause for a planned move of ``kind`` (switchover, drain, rollout)."""
        return cls(f"{kind}:{kind}")
