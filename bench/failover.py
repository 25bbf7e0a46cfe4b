"""SIGKILL an active engine N times and measure the supervisor's part of each failover.

    .venv/bin/python -m bench.failover [--kills 50] [--wake-time 0.05] [--json FILE]

Per kill: detection latency (SIGKILL sent -> engine declared dead) and the failover's
overhead beyond the engine's own wake (SIGKILL -> promoted, minus the wake step; and minus
the simulated engine's configured wake time, which also counts the wake call's HTTP and the
readiness check). Targets (issue 4): detection <= 20 ms p99, overhead <= 100 ms p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor
from supervisor.testing.gpuledger import LEDGER_ENV


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(name: str, values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {
        "name": name,
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "samples_ms": [round(v, 3) for v in ms],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """Summaries (see :func:`summary`) as a table on stdout."""
    print(f"{'metric':40} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in results:
        print(
            f"{r['name']:40} {r['n']:>4} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f}"
        )


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def run(kills: int, wake_time: float, sig: int = signal.SIGKILL) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    sim_args = (*FAST_SIM_ARGS, "--sim-wake-time", str(wake_time))
    sup = await start_supervisor(
        work, [sim_slot("s", sim_args=sim_args)], failover={"relaunch_backoff": 0.01}
    )
    detection, beyond_wake_step, beyond_engine_wake = [], [], []
    try:
        async with aiohttp.ClientSession() as http:

            async def status() -> dict[str, Any]:
                async with http.get(sup.admin_url + "/status") as r:
                    return await r.json()  # type: ignore[no-any-return]

            for i in range(kills):
                while True:  # full strength: an active and a sleeping shadow
                    st = await status()
                    slot = st["slots"][0]
                    sleeping = [e for e in st["engines"] if e["state"] == "sleeping"]
                    if slot["active"] and sleeping:
                        break
                    await anyio.sleep(0.01)
                victim = next(e for e in st["engines"] if e["id"] == slot["active"])
                t_kill = time.time()
                os.killpg(victim["pid"], sig)
                while True:
                    st = await status()
                    recs = [r for r in st["failovers"] if r["failed_engine"] == victim["id"]]
                    if recs and recs[0]["result"] != "in_progress":
                        break
                    await anyio.sleep(0.002)
                rec = recs[0]
                if rec["result"] != "promoted":
                    raise RuntimeError(f"kill {i}: failover {rec['result']}: {rec}")
                total = rec["finished_at"] - t_kill
                detection.append(rec["detected_at"] - t_kill)
                beyond_wake_step.append(total - rec["steps"]["wake"])
                beyond_engine_wake.append(total - wake_time)
                print(f"\rkill {i + 1}/{kills}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        rss = rss_mib(sup.proc.pid)
    finally:
        await anyio.to_thread.run_sync(sup.stop)
    name = signal.Signals(sig).name
    return {
        "kills": kills,
        "signal": name,
        "engine_wake_time_s": wake_time,
        "supervisor_rss_mib": rss,
        "results": [
            summary(f"detection ({name} -> declared dead)", detection),
            summary("failover total - wake step", beyond_wake_step),
            summary("failover total - engine wake time", beyond_engine_wake),
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--wake-time", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    out = anyio.run(run, ns.kills, ns.wake_time)
    print_table(out["results"])
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
