"""Many concurrent streams through one node: the daemon's own traffic must not notice.

    .venv/bin/python -m bench.node_load [--streams 1000] [--tokens 30] [--itl 0.2] [--json FILE]

One supervisor with two simulated slots (active engine + paired shadow each, room for every
stream), then ``--streams`` streamed completions at once through its frontend. Reports:

- completed and failed requests (failed must be 0);
- failovers and engines declared dead during the load (must be 0: the probes go through
  their own connection pool, never queued behind client streams);
- health-probe latency p50/p99 during the load, from the daemon's own
  ``failover_supervisor_probe_seconds`` histogram (interpolated within its buckets);
- the daemon's RSS before and at the peak, and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor
from supervisor.testing.gpuledger import LEDGER_ENV

_BUCKET = re.compile(
    r'^failover_supervisor_probe_seconds_bucket\{le="([^"]+)",slot="[^"]+"\} (\S+)$'
)


def probe_buckets(metrics: str) -> dict[float, float]:
    """Cumulative probe counts by upper bound, summed over slots."""
    out: dict[float, float] = {}
    for line in metrics.splitlines():
        m = _BUCKET.match(line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of the probes observed between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, lo, prev = q * total, 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return lo
            return lo + (b - lo) * ((rank - prev) / max(c - prev, 1e-9))
        lo, prev = b, c
    return lo


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(streams: int, tokens: int, itl: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fsup-node-load-"))
    os.environ[LEDGER_ENV] = str(work / "ledger.json")
    per_slot = streams // 2 + 16
    sim = (*FAST_SIM_ARGS, "--sim-itl", str(itl), "--max-num-seqs", str(per_slot))
    sup = await start_supervisor(
        work,
        [sim_slot("a", sim_args=sim), sim_slot("b", sim_args=sim, gpus=["1"])],
        # Default health settings: what a user runs.
        health={"probe_interval": 0.5, "probe_timeout": 1.0, "failure_threshold": 3},
        frontend={"max_inflight_per_engine": per_slot, "max_queue": streams},
    )
    ok = failed = 0
    peak_rss = 0.0
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=600),
        ) as http:

            async def scrape() -> str:
                async with http.get(sup.admin_url + "/metrics") as r:
                    return await r.text()

            rss0 = rss_mib(sup.proc.pid)
            before = probe_buckets(await scrape())

            async def one(i: int) -> None:
                nonlocal ok, failed
                body = {"model": "sim-model", "prompt": f"client {i}", "max_tokens": tokens}
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
                try:
                    n, done = 0, False
                    async with http.post(sup.frontend_url + "/v1/completions", json=body) as r:
                        if r.status != 200:
                            failed += 1
                            return
                        async for line in r.content:
                            # Tokens from the usage chunk: a chunk may carry several (the
                            # bytes of one character), so chunks are not tokens.
                            if line.startswith(b"data: {") and b'"usage"' in line:
                                usage = json.loads(line[6:]).get("usage") or {}
                                n = int(usage.get("completion_tokens", 0))
                            done = done or line.startswith(b"data: [DONE]")
                    complete = done and n >= tokens
                    ok += complete
                    failed += not complete
                except aiohttp.ClientError:
                    failed += 1

            async def watch_rss(scope: anyio.CancelScope) -> None:
                nonlocal peak_rss
                while True:
                    peak_rss = max(peak_rss, rss_mib(sup.proc.pid))
                    done = ok + failed
                    print(f"\r  {done}/{streams} streams done", end="", file=sys.stderr)
                    await anyio.sleep(0.5)

            t0 = time.monotonic()
            async with anyio.create_task_group() as outer:
                outer.start_soon(watch_rss, outer.cancel_scope)
                async with anyio.create_task_group() as tg:
                    for i in range(streams):
                        tg.start_soon(one, i)
                outer.cancel_scope.cancel()
            wall = time.monotonic() - t0
            print(file=sys.stderr)
            after = probe_buckets(await scrape())
            async with http.get(sup.admin_url + "/status") as r:
                st = await r.json()
        dead = [ln for ln in sup.logs().splitlines() if "engine declared dead" in ln]
        return {
            "streams": streams,
            "tokens_per_stream": tokens,
            "itl_s": itl,
            "completed": ok,
            "failed": failed,
            "failovers": len(st["failovers"]),
            "engines_declared_dead": len(dead),
            "probes_during_load": int(after.get(float("inf"), 0) - before.get(float("inf"), 0)),
            "probe_p50_ms": round(quantile(before, after, 0.50) * 1000, 2),
            "probe_p99_ms": round(quantile(before, after, 0.99) * 1000, 2),
            "rss_mib_before": round(rss0, 1),
            "rss_mib_peak": round(peak_rss, 1),
            "wall_s": round(wall, 2),
        }
    finally:
        await anyio.to_thread.run_sync(sup.stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--itl", type=float, default=0.2, help="the engines' inter-token latency")
    p.add_argument("--json", type=Path, help="also write the result here")
    ns = p.parse_args()
    result = anyio.run(run, ns.streams, ns.tokens, ns.itl)
    print(json.dumps(result, indent=2))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
