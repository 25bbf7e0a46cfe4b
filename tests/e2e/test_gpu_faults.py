"""GPU faults through the real daemon: kernel-log XIDs in real format, appended to the file
the daemon follows (in production, /dev/kmsg or the journal)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import SupervisorProcess, sim_slot, start_supervisor

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

PCI = {"0": "0000:3b:00", "1": "0000:86:00"}


def xid_line(gpu: str, xid: int, text: str) -> str:
    return f"6,4242,{int(time.time())},-;NVRM: Xid (PCI:{PCI[gpu]}): {xid}, pid=77, {text}\n"


async def start(tmp_path: Path, slot: dict[str, Any]) -> tuple[SupervisorProcess, Path]:
    kern = tmp_path / "kern.log"
    # Default health settings: the probe path alone would need ~3.5 s to notice a hang.
    sup = await start_supervisor(
        tmp_path,
        [slot],
        gpu={"xid_source": str(kern), "nvml": "off", "pci": PCI},
        health={
            "probe_interval": 0.5,
            "probe_timeout": 1.0,
            "failure_threshold": 3,
            "stall_timeout": 30,
        },
    )
    return sup, kern


async def status(session: aiohttp.ClientSession, sup: SupervisorProcess) -> dict[str, Any]:
    async with session.get(sup.admin_url + "/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def wait(
    session: aiohttp.ClientSession, sup: SupervisorProcess, pred: Any, timeout: float = 15
) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            st = await status(session, sup)
            if pred(st):
                return st
            await anyio.sleep(0.02)


async def test_xid_79_fails_over_to_a_shadow_on_a_healthy_gpu(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    slot = sim_slot("s", placement="pooled", gpus=["0"], shadow_gpus=[["1"]])
    sup, kern = await start(tmp_path, slot)
    try:
        st = await status(session, sup)
        active = next(e for e in st["engines"] if e["state"] == "active")
        assert active["gpus"] == ["0"]
        # The GPU falls off the bus: the engine hangs (its /health too), the driver logs it.
        async with session.post(active["url"] + "/sim/faults", json={"gpu_lost": True}):
            pass
        with kern.open("a") as f:
            f.write(xid_line("0", 79, "name=python3, GPU has fallen off the bus."))
        st = await wait(session, sup, lambda s: s["slots"][0]["epoch"] == 2)
        rec = st["failovers"][0]
        # The GPU path won: the probes (hung /health) would have given a "probe:" reason.
        assert rec["reason"].startswith("gpu: XID 79 (GPU has fallen off the bus) on GPU 0")
        promoted = next(e for e in st["engines"] if e["id"] == rec["promoted_engine"])
        assert promoted["gpus"] == ["1"]
        assert st["gpus"]["broken"].keys() == {"0"}
        async with session.get(sup.admin_url + "/metrics") as r:
            text = await r.text()
        assert 'failover_supervisor_gpu_healthy{gpu="0"} 0.0' in text
        assert (
            'failover_supervisor_gpu_xid_events_total{action="failover",gpu="0",xid="79"}' in text
        )
        await anyio.sleep(0.5)  # no replacement shadow is launched on the broken GPU
        st = await status(session, sup)
        assert not [e for e in st["engines"] if e["state"] in ("loading", "sleeping")]
        async with session.post(sup.admin_url + "/gpu/clear", json={"gpu": "0"}) as r:
            assert r.status == 200
        st = await wait(
            session,
            sup,
            lambda s: any(e["state"] == "sleeping" and e["gpus"] == ["0"] for e in s["engines"]),
        )
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0


async def test_xid_43_is_counted_not_failed_over(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sup, kern = await start(tmp_path, sim_slot("s", gpus=["0"]))
    try:
        with kern.open("a") as f:
            f.write(xid_line("0", 43, "name=python3, Ch 00000008"))
        with anyio.fail_after(5):
            while True:
                async with session.get(sup.admin_url + "/metrics") as r:
                    if (
                        'gpu_xid_events_total{action="watch",gpu="0",xid="43"} 1.0'
                        in await r.text()
                    ):
                        break
                await anyio.sleep(0.02)
        st = await status(session, sup)
        assert st["slots"][0]["epoch"] == 1 and not st["failovers"]
        assert not st["gpus"]["broken"]
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0


async def test_paired_shadow_on_the_broken_gpu_is_not_woken(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sup, kern = await start(tmp_path, sim_slot("s", gpus=["0"]))
    try:
        with kern.open("a") as f:
            f.write(xid_line("0", 95, "Uncontained: FBHUB. RST: Yes, D-RST: No"))
        st = await wait(
            session,
            sup,
            lambda s: bool(s["failovers"]) and s["failovers"][0]["result"] != "in_progress",
        )
        assert st["failovers"][0]["result"] == "degraded"
        assert st["slots"][0]["degraded"]
        # The shadow failed too (both are retired once their processes are gone).
        assert {e["state"] for e in st["engines"] + st["retired_engines"]} == {"failed"}
        assert "wake" not in st["failovers"][0]["steps"]
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0
