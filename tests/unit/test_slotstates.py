"""The slot's phase table: the transitions the fixes rely on, and the docs drawn from it."""

from pathlib import Path

from supervisor.slotstates import TABLE, Event, Phase, decide, table_markdown


def test_a_stopped_slot_acts_on_nothing() -> None:
    # Shutdown: a relaunch waiting on its backoff, a shadow that finished loading, an engine
    # that died during the stop: none of them may launch or wake anything.
    for event in Event:
        assert decide(Phase.STOPPED, event) is None, event


def test_the_failover_path() -> None:
    assert decide(Phase.SERVING, Event.ACTIVE_DIED).action == "promote_shadow"  # type: ignore[union-attr]
    promoted = decide(Phase.FAILING_OVER, Event.PROMOTED)
    assert promoted is not None and promoted.to is Phase.SERVING
    none_left = decide(Phase.FAILING_OVER, Event.NO_SHADOW)
    assert none_left is not None and (none_left.to, none_left.action) == (
        Phase.DEGRADED,
        "hand_over",
    )
    ready = decide(Phase.DEGRADED, Event.SHADOW_READY)
    assert ready is not None and ready.action == "promote_shadow"
    cold = decide(Phase.DEGRADED, Event.COLD_START)
    assert cold is not None and cold.to is Phase.COLD_STARTING


def test_a_slot_that_is_failing_over_is_not_failed_over_again() -> None:
    # One promotion at a time: a switchover or a second death report while failing over is
    # not a second failover.
    assert decide(Phase.FAILING_OVER, Event.SWITCHOVER) is None
    assert decide(Phase.FAILING_OVER, Event.ACTIVE_DIED) is None


def test_missing_shadows_are_replenished_in_every_live_phase() -> None:
    for phase in Phase:
        t = decide(phase, Event.SHADOWS_MISSING)
        if phase is Phase.STOPPED:
            assert t is None
        else:
            assert t is not None and t.action == "replenish", phase


def test_every_phase_is_reachable_from_starting() -> None:
    seen, todo = {Phase.STARTING}, [Phase.STARTING]
    while todo:
        p = todo.pop()
        for (src, _), t in TABLE.items():
            if src is p and t.to is not None and t.to not in seen:
                seen.add(t.to)
                todo.append(t.to)
    assert seen == set(Phase)


def test_docs_show_the_table_as_the_code_has_it() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "failover.md").read_text()
    assert table_markdown() in doc
