"""How much sooner a GPU-fault failover happens through the kernel log than through probes.

    .venv/bin/python -m bench.gpu [--rounds 5] [--json FILE]

Each round the active engine's GPU "falls off the bus": the simulated engine hangs, its
/health included, as a real one does. With the XID path the driver's line
``NVRM: Xid (...): 79`` is appended to the log the supervisor follows; with the probe path
nothing is logged and the default probes (every 0.5 s, 1 s timeout, 3 failures) must notice.
Reported: time from the fault to the shadow promoted, per path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.failover import pct
from supervisor.testing.cluster import sim_slot, start_supervisor
from supervisor.testing.gpuledger import LEDGER_ENV

PCI = {"0": "0000:3b:00", "1": "0000:86:00"}


async def run(rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    kern = work / "kern.log"
    sup = await start_supervisor(
        work,
        [sim_slot("s", placement="pooled", gpus=["0"], shadow_gpus=[["1"]])],
        gpu={"xid_source": str(kern), "nvml": "off", "pci": PCI},
        # The defaults from supervisor/config.py, written out: this is what is compared.
        health={
            "probe_interval": 0.5,
            "probe_timeout": 1.0,
            "failure_threshold": 3,
            "stall_timeout": 10.0,
        },
        failover={"relaunch_backoff": 0.01},
    )
    times: dict[str, list[float]] = {"xid": [], "probe": []}
    try:
        async with aiohttp.ClientSession() as http:

            async def status() -> dict[str, Any]:
                async with http.get(sup.admin_url + "/status") as r:
                    return await r.json()  # type: ignore[no-any-return]

            for i in range(rounds * 2):
                path = "xid" if i % 2 == 0 else "probe"
                while True:  # an active engine and a sleeping shadow
                    st = await status()
                    slot = st["slots"][0]
                    if slot["active"] and any(e["state"] == "sleeping" for e in st["engines"]):
                        break
                    await anyio.sleep(0.01)
                victim = next(e for e in st["engines"] if e["id"] == slot["active"])
                t0 = time.time()
                async with http.post(victim["url"] + "/sim/faults", json={"gpu_lost": True}):
                    pass
                gpu = victim["gpus"][0]
                if path == "xid":
                    with kern.open("a") as f:
                        f.write(
                            f"NVRM: Xid (PCI:{PCI[gpu]}): 79, pid=1, GPU has fallen off the bus.\n"
                        )
                while True:
                    st = await status()
                    recs = [r for r in st["failovers"] if r["failed_engine"] == victim["id"]]
                    if recs and recs[0]["result"] != "in_progress":
                        break
                    await anyio.sleep(0.005)
                times[path].append(recs[0]["finished_at"] - t0)
                if st["gpus"]["broken"]:
                    async with http.post(sup.admin_url + "/gpu/clear", json={"gpu": gpu}):
                        pass
                print(f"\rround {i + 1}/{rounds * 2}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        await anyio.to_thread.run_sync(sup.stop)
    res: dict[str, Any] = {
        p: {
            "n": len(v),
            "p50_ms": round(pct(v, 50) * 1000, 1),
            "p99_ms": round(pct(v, 99) * 1000, 1),
        }
        for p, v in times.items()
    }
    res["speedup_p50"] = round(pct(times["probe"], 50) / pct(times["xid"], 50), 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    out = anyio.run(run, ns.rounds)
    print(
        f"fault -> promoted, XID 79 path:   p50 {out['xid']['p50_ms']} ms, "
        f"p99 {out['xid']['p99_ms']} ms (n={out['xid']['n']})"
    )
    print(
        f"fault -> promoted, probe path:    p50 {out['probe']['p50_ms']} ms, "
        f"p99 {out['probe']['p99_ms']} ms (n={out['probe']['n']})"
    )
    print(f"the XID path is {out['speedup_p50']}x sooner (p50)")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
