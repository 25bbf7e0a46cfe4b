"""A supervisor restart keeps engines serving: the new one adopts them (pid + start time +
health) instead of launching new ones, and rejects stale state."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import SupervisorProcess, sim_slot, start_supervisor

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def status(session: aiohttp.ClientSession, sup: SupervisorProcess) -> dict[str, Any]:
    async with session.get(sup.admin_url + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


def launches(workdir: Path) -> int:
    logs = workdir / "state" / "logs"
    return sum(p.read_text().count("--- ") for p in logs.glob("*.log"))


async def test_sigkilled_supervisor_is_replaced_and_adopts_its_engines(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    slot = sim_slot("s")
    first = await start_supervisor(tmp_path, [slot], node={"on_exit": "leave"})
    before = await status(session, first)
    pids = {e["id"]: e["pid"] for e in before["engines"]}
    first.proc.kill()  # no cleanup at all
    await anyio.to_thread.run_sync(first.proc.wait)
    second = await start_supervisor(tmp_path, [slot], node={"on_exit": "stop"})
    try:
        after = await status(session, second)
        assert {e["id"]: e["pid"] for e in after["engines"]} == pids  # the same processes
        assert launches(tmp_path) == 2  # nothing was launched again
        assert "adopted 2 running engine(s) of slot s" in second.stdout_path.read_text()
        assert after["slots"][0]["epoch"] == before["slots"][0]["epoch"]
        active = next(e for e in after["engines"] if e["state"] == "active")
        async with session.post(
            active["url"] + "/v1/completions", json={"prompt": "x", "max_tokens": 3}
        ) as r:
            assert r.status == 200
        # Failover still works on adopted engines (exit seen through a pidfd).
        os.killpg(active["pid"], signal.SIGKILL)
        with anyio.fail_after(15):
            while (await status(session, second))["slots"][0]["epoch"] != 2:
                await anyio.sleep(0.02)
        st = await status(session, second)
        assert st["failovers"][0]["reason"].startswith("exit: process exited (adopted")
    finally:
        assert await anyio.to_thread.run_sync(second.stop) == 0


async def test_stale_state_is_rejected(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    slot = sim_slot("s", shadows=0)
    state = tmp_path / "state"
    state.mkdir(parents=True)
    # A saved engine whose pid now belongs to another process (this test's own).
    (state / "engines.json").write_text(
        json.dumps(
            {
                "version": 1,
                "node": "test-node",
                "slots": {
                    "s": {
                        "epoch": 5,
                        "active": "s-0",
                        "engines": [
                            {
                                "id": "s-0",
                                "role": "active",
                                "state": "active",
                                "pid": os.getpid(),
                                "start_time": 1,
                                "port": slot["base_port"],
                                "gpus": ["0"],
                            }
                        ],
                    }
                },
            }
        )
    )
    sup = await start_supervisor(tmp_path, [slot])
    try:
        st = await status(session, sup)
        assert st["engines"][0]["pid"] != os.getpid()  # a new engine, not the stale one
        assert "stale state" in sup.logs()
        assert st["slots"][0]["active"] is not None
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0
