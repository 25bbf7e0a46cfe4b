"""The chaos soak (bench/soak.py) as a test: a short one in every run, a long one `slow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import Soak

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def run_soak(tmp_path: Path, seconds: float, seed: int) -> dict[str, object]:
    report = await Soak(tmp_path, seed, seconds * 0.5, seconds * 0.25, seconds * 0.25).run()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    return report


INVARIANTS = {
    "no_failed_request",
    "no_lost_or_repeated_token",
    "no_slot_promoted_twice_for_one_epoch",
    "no_leaked_engine_process",
    "double_active_within_bound",
    "no_traceback_in_node_logs",
    "every_node_stopped_cleanly",
}


def check(report: dict, min_faults: int) -> None:  # type: ignore[type-arg]
    shown = json.dumps({k: v for k, v in report.items() if k != "fault_log"}, indent=1)
    assert set(report["invariants"]) == INVARIANTS, shown  # none dropped, none unchecked
    assert all(report["invariants"].values()), shown
    assert sum(report["faults"].values()) >= min_faults, shown
    assert report["phases"]["STANDARD"]["succeeded"] > 0, shown
    assert report["phases"]["RECOVERY"]["success_rate"] == 1.0, shown


async def test_short_chaos_soak(tmp_path: Path) -> None:
    check(await run_soak(tmp_path, 60, seed=3), min_faults=5)


@pytest.mark.slow
async def test_fifteen_minute_chaos_soak(tmp_path: Path) -> None:
    check(await run_soak(tmp_path, 15 * 60, seed=7), min_faults=100)
