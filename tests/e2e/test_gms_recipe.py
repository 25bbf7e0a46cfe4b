"""Dynamo's standalone GPU Memory Service recipe (seed 003), simulated: its control routes
(``/engine/control/sleep``, ``/engine/control/wake_up``) and its autonomous shadow mode,
where primary and shadow share a ``flock`` (``FAILOVER_LOCK_PATH``) and the shadow promotes
itself when the kernel hands it the lock. The supervisor watches the lock and never wakes a
shadow a second time."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.flocklease import lock_holders
from supervisor.procfs import process_tree
from supervisor.testing.cluster import SupervisorProcess, sim_slot, start_supervisor
from supervisor.upstream import iter_sse_data

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
SHADOW = ["--gms-mode", "shadow"]


async def status(http: aiohttp.ClientSession, sup: SupervisorProcess) -> dict[str, Any]:
    async with http.get(sup.admin_url + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def sim_state(http: aiohttp.ClientSession, engine: dict[str, Any]) -> dict[str, Any]:
    async with http.get(engine["url"] + "/sim/state") as r:
        return await r.json()  # type: ignore[no-any-return]


async def full_strength(http: aiohttp.ClientSession, sup: SupervisorProcess, epoch: int) -> Any:
    with anyio.fail_after(30):
        while True:
            st = await status(http, sup)
            s = st["slots"][0]
            if s["epoch"] >= epoch and s["phase"] == "serving" and s["shadows_asleep"] == 1:
                return st
            await anyio.sleep(0.05)


async def stream_through_kill(
    http: aiohttp.ClientSession, sup: SupervisorProcess, pid: int | None
) -> tuple[str, int]:
    """A stream during which the active engine's process group is SIGKILLed (unless ``pid``
    is None); its text and token count as the client saw them."""
    body = {"model": "sim-model", "prompt": "the harbor", "max_tokens": 120, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with anyio.fail_after(30):
        return await _read(http, sup, body, pid)


async def _read(
    http: aiohttp.ClientSession, sup: SupervisorProcess, body: dict[str, Any], pid: int | None
) -> tuple[str, int]:
    text, tokens, chunks = "", 0, 0
    async with http.post(sup.frontend_url + "/v1/completions", json=body) as r:
        assert r.status == 200
        async for data in iter_sse_data(r):
            obj = json.loads(data)
            assert "error" not in obj, obj
            text += "".join(ch["text"] for ch in obj["choices"])
            tokens = (obj.get("usage") or {}).get("completion_tokens", tokens)
            chunks += 1
            if chunks == 10 and pid is not None:
                os.killpg(pid, signal.SIGKILL)
    return text, tokens


async def test_the_standalone_recipes_control_routes(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # The recipe's worker serves only /engine/control/{sleep,wake_up}: the plugin finds them.
    slot = sim_slot("s", dialect="vllm-gms", shadow_extra_args=SHADOW)
    slot["sim_args"] = [*slot["sim_args"], "--sim-gms-control-routes"]  # type: ignore[list-item]
    slot["sim_args"] = [*slot["sim_args"], "--sim-itl", "0.01"]  # type: ignore[list-item]
    sup = await start_supervisor(tmp_path, [slot])
    try:
        st = await full_strength(session, sup, 1)
        active = next(e for e in st["engines"] if e["state"] == "active")
        shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
        unbroken = await stream_through_kill(session, sup, None)
        assert await stream_through_kill(session, sup, active["pid"]) == unbroken
        st = await full_strength(session, sup, 2)
        assert st["slots"][0]["active"] == shadow["id"]
        assert (await sim_state(session, shadow))["wakes_by_route"] == 1
        assert "POST /engine/control/wake_up" not in sup.logs()  # no error naming it
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]


async def test_a_shadow_on_the_failover_lock_promotes_itself_and_is_never_woken(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    slot = sim_slot("s", dialect="vllm-gms", shadow_extra_args=SHADOW, suspend="flock")
    slot["sim_args"] = [*slot["sim_args"], "--sim-itl", "0.01"]  # type: ignore[list-item]
    sup = await start_supervisor(tmp_path, [slot])
    lock = sup.config_path.parent / "state" / "locks" / "s.lock"
    try:
        st = await full_strength(session, sup, 1)
        active = next(e for e in st["engines"] if e["state"] == "active")
        shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
        assert "parked on the failover lock" in shadow["reason"]
        # The kernel's word: the active engine, and only it, holds the lock.
        assert lock_holders(lock) and lock_holders(lock) <= set(process_tree(active["pid"]))
        # SIGKILL the primary's group mid-stream: the lock is released, the shadow takes it.
        unbroken = await stream_through_kill(session, sup, None)
        assert await stream_through_kill(session, sup, active["pid"]) == unbroken
        st = await full_strength(session, sup, 2)
        assert st["slots"][0]["active"] == shadow["id"]
        state = await sim_state(session, shadow)
        assert state["self_promotions"] == 1 and state["wakes_by_route"] == 0
        assert f"{shadow['id']} took the failover lock and is promoting itself" in sup.logs()
        # At most one engine serves: the lock's holder is the active engine; the new shadow
        # is parked on it.
        assert lock_holders(lock) <= set(process_tree(shadow["pid"]))
        new_shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
        assert "parked on the failover lock" in new_shadow["reason"]
        assert not lock_holders(lock) & set(process_tree(new_shadow["pid"]))
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]
