"""How the health judge weighs stalled streams, against a real simulated engine: one stall
only makes the engine suspect; stalls of several streams, or a stall plus a test generation
that gets nothing, make it dead."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.vllm import VllmBackend
from supervisor.config import HealthConfig
from supervisor.health import HealthJudge
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineSpec, EngineState
from supervisor.sessions import open_sessions
from supervisor.testing.cluster import free_port, running_engine

pytestmark = pytest.mark.anyio


async def test_stalled_streams_and_the_test_generation(tmp_path: Path) -> None:
    backend = VllmBackend()
    spec = EngineSpec("e0", "sim-model", free_port())
    engine = Engine("e0", "s", "active", spec, "vllm", state=EngineState.ACTIVE)
    dead: list[str] = []

    async def on_dead(e: Engine, source: str, reason: str, at: float) -> None:
        dead.append(reason)

    judge = HealthJudge(HealthConfig(stall_timeout=1.0, stall_reports=2), Metrics(), on_dead)
    async with (
        open_sessions(8) as sessions,
        running_engine(backend, spec, tmp_path, sessions.probes) as (_, ep),
    ):
        await judge.stream_stalled(engine, backend, ep, "r1", "no token for 1s")
        assert dead == [] and "e0" in judge.suspects  # it still generates: suspect only
        await judge.stream_stalled(engine, backend, ep, "r1", "no token for 1s")
        assert dead == []  # the same request again is not a second witness
        await judge.stream_stalled(engine, backend, ep, "r2", "no token for 1s")
        assert len(dead) == 1 and "2 streams stalled on it" in dead[0]

        judge.forget("e0")
        dead.clear()
        async with sessions.probes.post(ep.url + "/sim/faults", json={"gpu_lost": True}) as r:
            assert r.status == 200
        await judge.stream_stalled(engine, backend, ep, "r3", "no token for 1s")
        assert len(dead) == 1 and "test generation got no token" in dead[0]
