"""A slot's life as one table: its phases, the events that move it, and what each move does.

Pure data (no I/O). :class:`supervisor.failover.SlotController` feeds every event through
:func:`decide`, logs the decision as one sentence with its reason, and runs the named
action. An event the table does not list for the current phase is refused and logged: that
is how, for example, a relaunch that was already scheduled when the daemon began to stop
launches nothing (``stopped`` takes no ``shadows_missing``).

Shadows are kept apart from the phase: whatever the phase, a lost or missing shadow is an
event (``shadows_missing``) whose action is ``replenish`` — one replenishing task per slot,
with backoff — except once the slot is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"  # engines of a fresh supervisor are loading
    SERVING = "serving"  # a ready active engine serves the slot
    FAILING_OVER = "failing_over"  # the active engine is gone; a shadow is being promoted
    COLD_STARTING = "cold_starting"  # no shadow to promote: an active engine loads cold
    DEGRADED = "degraded"  # nothing serves and nothing can yet; waits for a shadow
    STANDBY = "standby"  # another node serves the slot (or its group); shadows only here
    STOPPED = "stopped"  # the supervisor is shutting down: nothing is launched or woken


class Event(StrEnum):
    ACTIVE_READY = "active_ready"  # an active engine came up (start or cold start)
    ACTIVE_FAILED_TO_START = "active_failed_to_start"
    SERVED_ELSEWHERE = "served_elsewhere"  # the cluster says another node serves it
    ACTIVE_DIED = "active_died"  # health declared the active engine dead
    SWITCHOVER = "switchover"  # an operator asked to move the slot to a shadow
    PROMOTED = "promoted"  # a shadow woke and serves at epoch + 1
    NO_SHADOW = "no_shadow"  # failing over found no sleeping shadow
    FAILOVER_FAILED = "failover_failed"  # e.g. the dead engine never let go of its GPUs
    COLD_START = "cold_start"  # a slot without shadows launches its active engine anew
    FENCED = "fenced"  # the slot's epoch moved on in the cluster: not ours to promote
    HANDED_TO_CLUSTER = "handed_to_cluster"  # a group's member failed: the leader decides
    SHADOW_READY = "shadow_ready"  # a shadow fell asleep, ready to be woken
    ASSIGNED = "assigned"  # the cluster leader chose our shadow for the slot
    STEP_DOWN = "step_down"  # the cluster serves the slot elsewhere now: stop ours
    SHADOWS_MISSING = "shadows_missing"  # fewer shadows than configured (one died, ...)
    # The active engine died while the slot (or node) is paused: nothing is promoted.
    ACTIVE_DIED_PAUSED = "active_died_paused"
    # A planned switchover whose new engine failed to wake: the old one never stopped.
    SWITCHOVER_ABORTED = "switchover_aborted"
    STOP = "stop"


@dataclass(frozen=True)
class Transition:
    to: Phase | None  # None: the phase stays as it is
    action: str  # the SlotController method that carries it out ("" for none)


P, E, T = Phase, Event, Transition
_LIVE = (P.STARTING, P.SERVING, P.FAILING_OVER, P.COLD_STARTING, P.DEGRADED, P.STANDBY)

TABLE: dict[tuple[Phase, Event], Transition] = {
    (P.STARTING, E.ACTIVE_READY): T(P.SERVING, ""),
    (P.STARTING, E.ACTIVE_FAILED_TO_START): T(P.DEGRADED, ""),
    (P.STARTING, E.SERVED_ELSEWHERE): T(P.STANDBY, ""),
    (P.STARTING, E.ACTIVE_DIED): T(P.FAILING_OVER, "promote_shadow"),
    (P.SERVING, E.ACTIVE_DIED): T(P.FAILING_OVER, "promote_shadow"),
    (P.SERVING, E.SWITCHOVER): T(P.FAILING_OVER, "promote_shadow"),
    (P.SERVING, E.STEP_DOWN): T(P.STANDBY, "stop_active"),
    (P.SERVING, E.ACTIVE_DIED_PAUSED): T(P.DEGRADED, ""),
    (P.STARTING, E.ACTIVE_DIED_PAUSED): T(P.DEGRADED, ""),
    (P.FAILING_OVER, E.SWITCHOVER_ABORTED): T(P.SERVING, ""),
    (P.FAILING_OVER, E.PROMOTED): T(P.SERVING, ""),
    (P.FAILING_OVER, E.NO_SHADOW): T(P.DEGRADED, "hand_over"),
    (P.FAILING_OVER, E.FENCED): T(P.STANDBY, ""),
    (P.FAILING_OVER, E.HANDED_TO_CLUSTER): T(P.STANDBY, ""),
    (P.FAILING_OVER, E.STEP_DOWN): T(P.STANDBY, ""),
    (P.DEGRADED, E.SHADOW_READY): T(P.FAILING_OVER, "promote_shadow"),
    (P.FAILING_OVER, E.FAILOVER_FAILED): T(P.DEGRADED, ""),
    (P.DEGRADED, E.COLD_START): T(P.COLD_STARTING, "launch_cold"),
    (P.DEGRADED, E.ACTIVE_DIED): T(None, ""),
    (P.DEGRADED, E.SERVED_ELSEWHERE): T(P.STANDBY, ""),
    (P.DEGRADED, E.ASSIGNED): T(P.FAILING_OVER, "wake_assigned"),
    (P.DEGRADED, E.ACTIVE_READY): T(P.SERVING, ""),
    (P.COLD_STARTING, E.ACTIVE_READY): T(P.SERVING, ""),
    (P.COLD_STARTING, E.ACTIVE_FAILED_TO_START): T(P.DEGRADED, "replenish"),
    (P.COLD_STARTING, E.SERVED_ELSEWHERE): T(P.STANDBY, ""),
    (P.STANDBY, E.ASSIGNED): T(P.FAILING_OVER, "wake_assigned"),
    (P.STANDBY, E.ACTIVE_READY): T(P.SERVING, ""),
    (P.STANDBY, E.SHADOW_READY): T(None, ""),
    (P.STANDBY, E.ACTIVE_DIED): T(None, ""),
    (P.STANDBY, E.NO_SHADOW): T(None, "hand_over"),
}
for _phase in _LIVE:
    TABLE.setdefault((_phase, E.SHADOWS_MISSING), T(None, "replenish"))
    TABLE.setdefault((_phase, E.SHADOW_READY), T(None, ""))
    TABLE.setdefault((_phase, E.STOP), T(P.STOPPED, "cancel_background"))
# (DEGRADED, SHADOW_READY) promotes; the default above must not hide it.
TABLE[(P.DEGRADED, E.SHADOW_READY)] = T(P.FAILING_OVER, "promote_shadow")


def decide(phase: Phase, event: Event) -> Transition | None:
    """What ``event`` does to a slot in ``phase``; None: the event is refused there."""
    return TABLE.get((phase, event))


def table_markdown() -> str:
    """The table as docs/failover.md shows it (kept in step by a test)."""
    rows = [
        f"| `{p}` | `{e}` | `{t.to or p}` | {('`' + t.action + '`') if t.action else '—'} |"
        for (p, e), t in sorted(TABLE.items(), key=lambda kv: (list(P).index(kv[0][0]), kv[0][1]))
    ]
    return "| phase | event | next phase | action |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
