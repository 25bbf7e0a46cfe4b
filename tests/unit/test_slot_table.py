"""The slot's phase table: the transitions the fixes rely on, and the docs drawn from it."""

from dataclasses import fields
from itertools import product
from pathlib import Path

from supervisor.slot.table import (
    TABLE,
    Decision,
    Degraded,
    Effect,
    Event,
    Facts,
    FailoverCause,
    Guard,
    Phase,
    decide,
    table_markdown,
)

QUIET = Facts()
PAUSED = Facts(pause="kernel upgrade")


def every_facts() -> list[Facts]:
    """Every snapshot the guards can tell apart."""
    values = {f.name: (["", "x"] if f.type == "str" else [False, True]) for f in fields(Facts)}
    return [Facts(**dict(zip(values, combo, strict=True))) for combo in product(*values.values())]


def go(phase: Phase, event: Event, facts: Facts = QUIET) -> Decision:
    d = decide(phase, event, facts, "why")
    assert d is not None, (phase, event, facts)
    return d


def test_a_stopped_slot_acts_on_nothing() -> None:
    # Shutdown: a relaunch waiting on its backoff, a shadow that finished loading, an engine
    # that died during the stop: none of them may launch or wake anything.
    for event, facts in product(Event, every_facts()):
        assert decide(Phase.STOPPED, event, facts, "why") is None, event


def test_the_failover_path() -> None:
    died = go(Phase.SERVING, Event.ACTIVE_DIED)
    assert (died.to, died.effect, died.row.degraded) == (
        Phase.FAILING_OVER,
        Effect.PROMOTE_SHADOW,
        Degraded.SET,
    )
    promoted = go(Phase.FAILING_OVER, Event.PROMOTED)
    assert (promoted.to, promoted.row.degraded) == (Phase.SERVING, Degraded.CLEAR)
    none_left = go(Phase.FAILING_OVER, Event.NO_SHADOW)
    assert (none_left.to, none_left.effect) == (Phase.DEGRADED, Effect.HAND_OVER)
    assert go(Phase.DEGRADED, Event.SHADOW_READY).effect is Effect.PROMOTE_SHADOW
    cold = go(Phase.DEGRADED, Event.COLD_START)
    assert (cold.to, cold.effect) == (Phase.COLD_STARTING, Effect.LAUNCH_COLD)


def test_an_active_engine_that_dies_while_paused_promotes_nothing() -> None:
    # A guard, not an event of its own: the pause is a fact of the slot when it dies.
    for phase in (Phase.STARTING, Phase.SERVING):
        d = go(phase, Event.ACTIVE_DIED, PAUSED)
        assert (d.to, d.effect, d.row.degraded) == (Phase.DEGRADED, Effect.NONE, Degraded.SET)
        assert "paused (kernel upgrade)" in d.sentence and "nothing is promoted" in d.sentence
    # ... and a shadow that becomes ready meanwhile is not promoted either.
    ready = go(Phase.DEGRADED, Event.SHADOW_READY, PAUSED)
    assert (ready.to, ready.effect) == (Phase.DEGRADED, Effect.NONE)


def test_a_slot_without_shadows_says_it_restarts_cold() -> None:
    d = go(Phase.FAILING_OVER, Event.NO_SHADOW, Facts(restarts_cold=True))
    assert "restarting the active engine cold" in d.sentence
    assert "cold" not in go(Phase.FAILING_OVER, Event.NO_SHADOW).sentence


def test_a_switchover_makes_before_it_breaks_where_it_can() -> None:
    live = go(Phase.SERVING, Event.SWITCHOVER, Facts(make_before_break=True))
    assert (live.effect, live.row.degraded) == (Effect.SWITCH_LIVE, Degraded.KEEP)
    shared = go(Phase.SERVING, Event.SWITCHOVER)
    assert (shared.effect, shared.row.degraded) == (Effect.STOP_THEN_PROMOTE, Degraded.SET)


def test_a_slot_that_is_failing_over_is_not_failed_over_again() -> None:
    # One promotion at a time: a switchover or a second death report while failing over is
    # not a second failover.
    for facts in every_facts():
        assert decide(Phase.FAILING_OVER, Event.SWITCHOVER, facts, "") is None
        assert decide(Phase.FAILING_OVER, Event.ACTIVE_DIED, facts, "") is None


def test_missing_shadows_are_replenished_in_every_live_phase() -> None:
    for phase in Phase:
        t = decide(phase, Event.SHADOWS_MISSING, QUIET, "")
        if phase is Phase.STOPPED:
            assert t is None
        else:
            assert t is not None and t.effect is Effect.LAUNCH_SHADOW, phase


def test_every_row_is_reachable() -> None:
    # No row is hidden behind an earlier one of the same phase and event.
    chosen = {
        d.row
        for phase, event, facts in product(Phase, Event, every_facts())
        if (d := decide(phase, event, facts, "")) is not None
    }
    assert chosen == set(TABLE), set(TABLE) - chosen


def test_every_phase_is_reachable_from_starting() -> None:
    seen, todo = {Phase.STARTING}, [Phase.STARTING]
    while todo:
        p = todo.pop()
        for row in TABLE:
            if row.phase is p and row.to not in seen:
                seen.add(row.to)
                todo.append(row.to)
    assert seen == set(Phase)


def test_every_effect_and_guard_is_used() -> None:
    assert {r.effect for r in TABLE} == set(Effect)
    assert {r.guard for r in TABLE} == set(Guard)


def test_the_failover_metric_keeps_its_labels() -> None:
    assert FailoverCause.of_death("exit") == "failover:exit"
    assert FailoverCause.of_plan("switchover") == "switchover:switchover"
    assert FailoverCause.RECOVERY == "recovery:recover"


def test_docs_show_the_table_as_the_code_has_it() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "failover.md").read_text()
    assert table_markdown() in doc
    for name in [*Effect, *Guard]:
        if name not in (Effect.NONE, Guard.ALWAYS):
            assert f"`{name}`" in doc.split("## The slot's phases")[1], name
