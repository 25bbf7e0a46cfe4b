"""Every benchmark in one run: JSON, a markdown table and PNG plots.

    .venv/bin/python -m bench [--quick] [--out bench-report]

Runs, one after another on this machine: failover detection after SIGKILL and SIGSTOP
(bench.failover), the frontend against direct access (bench.frontend), GPU fault signals
(bench.gpu), node loss and heartbeat CPU (bench.cluster), the stall of a rolling upgrade
next to a failover's (bench.operations), the relay next to vllm-router and sglang-router
(bench.peers, its own table and plot), and the instructions each of those proxies executes
per request and per token (bench.instructions, under valgrind; left out, saying why, where
valgrind is missing). Every figure is a ratio, a count or a distribution measured within
the run. ``--quick`` takes fewer samples (a few minutes);
the default takes about 15 minutes on 2 cores. Writes ``<out>/report.json``,
``<out>/report.md``, ``<out>/detection.png``, ``<out>/heartbeat_cpu.png`` and
``<out>/peers_cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from bench import (
    cluster,
    failover,
    frontend,
    gpu,
    instructions,
    node_load,
    operations,
    peers,
    scale,
)


def _bar(i: int, n: int, name: str, started: float) -> None:
    done = int(30 * i / n)
    print(
        f"[{'#' * done}{'.' * (30 - done)}] {i}/{n} {name}  ({time.monotonic() - started:.0f}s)",
        file=sys.stderr,
        flush=True,
    )


async def _instructions() -> dict[str, Any]:
    why = instructions.missing_tools()
    if why:
        return {"skipped": why}
    return await instructions.run(400, 2000, True)


async def run_all(quick: bool) -> dict[str, Any]:
    kills, trials = (10, 5) if quick else (50, 20)
    stages: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("failover, SIGKILL", lambda: failover.run(kills, 0.05, signal.SIGKILL)),
        ("failover, SIGSTOP", lambda: failover.run(kills // 2, 0.05, signal.SIGSTOP)),
        ("frontend", lambda: frontend.run(*((16, 100, 5) if quick else (32, 300, 20)))),
        ("gpu faults", lambda: gpu.run(2 if quick else 5)),
        ("node load", lambda: node_load.run(300 if quick else 1000, 30, 0.2)),
        ("operations", lambda: operations.run(1 if quick else 3, 20)),
        # At full length even with --quick (about a minute): its ratios are the noisiest.
        ("peers", lambda: peers.run(3, False)),
        ("instructions", _instructions),
        ("cluster", lambda: cluster.main(argparse.Namespace(
            trials=trials, engines="100,1000,5000", seconds=3.0 if quick else 10.0))),
        ("scale", lambda: scale.main(argparse.Namespace(
            nodes="10,30,100" if quick else "10,30,100,300,1000", seconds=3.0 if quick else 5.0,
            requests=200 if quick else 400, losses=1 if quick else 3, per_process=100))),
    ]  # fmt: skip
    out: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.monotonic()
    for i, (name, stage) in enumerate(stages):
        _bar(i, len(stages), name, t0)
        out[name] = await stage()
    _bar(len(stages), len(stages), "done", t0)
    return out


def _row(name: str, value: str, target: str) -> str:
    return f"| {name} | {value} | {target} |"


def markdown(r: dict[str, Any]) -> str:
    rows = ["| measure | result | target |", "|---|---|---|"]
    for sig in ("SIGKILL", "SIGSTOP"):
        f = r[f"failover, {sig}"]
        det = f["results"][0]
        rows.append(
            _row(
                f"detection after {sig}, p50 / p99 (n={det['n']})",
                f"{det['p50_ms']:.1f} / {det['p99_ms']:.1f} ms",
                "≤ 20 ms p99" if sig == "SIGKILL" else "probe interval x threshold",
            )
        )
    over = r["failover, SIGKILL"]["results"][2]
    rows.append(
        _row(
            "failover total - engine wake time, p50 / p99",
            f"{over['p50_ms']:.1f} / {over['p99_ms']:.1f} ms",
            "≤ 100 ms p99",
        )
    )
    rows.append(
        _row(
            "supervisor RSS (1 slot, after the kills)",
            f"{r['failover, SIGKILL']['supervisor_rss_mib']} MiB",
            "—",
        )
    )
    for x in r["frontend"]["results"]:
        if "ratio" in x:
            rows.append(_row(x["name"], f"{x['ratio']:.2f}", "≥ 0.9"))
        elif "p50_ms" in x:
            rows.append(_row(x["name"], f"{x['p50_ms']} / {x['p99_ms']} ms (p50 / p99)", "—"))
    g = r["gpu faults"]
    rows.append(
        _row(
            "GPU fault → promoted: XID line vs probes, p50",
            f"{g['xid']['p50_ms']} ms vs {g['probe']['p50_ms']} ms ({g['speedup_p50']}x)",
            "—",
        )
    )
    load = r.get("node load")
    if load is not None:
        rows.append(
            _row(
                f"{load['streams']} concurrent streams through one node: failed / failovers",
                f"{load['failed']} / {load['failovers']} "
                f"(probe p99 {load['probe_p99_ms']} ms, RSS {load['rss_mib_peak']} MiB)",
                "0 / 0",
            )
        )
    ops = r.get("operations")
    if ops is not None:
        itl, planned, unplanned = ops["results"]
        rows.append(
            _row(
                f"client stall, rollout vs SIGKILL failover, p50 / p99 (n={planned['n']})",
                f"{planned['p50_ms']:.0f} / {planned['p99_ms']:.0f} ms vs "
                f"{unplanned['p50_ms']:.0f} / {unplanned['p99_ms']:.0f} ms "
                f"(ITL {itl['p50_ms']:.0f} ms)",
                "rollout: the continuation's prefill",
            )
        )
    nl = r["cluster"]["node_loss"]
    rows.append(
        _row(
            f"node loss → confirmed dead, p50 / p99 (n={nl['n']}, nodes on distinct addresses)",
            f"{nl['p50_ms']:.0f} / {nl['p99_ms']:.0f} ms",
            "≤ lease_ttl (3 s): the lease decides",
        )
    )
    for h in r["cluster"]["heartbeat_cpu"]:
        rows.append(
            _row(
                f"heartbeat CPU, {h['engines']} engines",
                f"{h['cpu_percent_of_core']} % of a core",
                "< 10 % at 1,000",
            )
        )
    out = "\n".join(rows) + "\n"
    if "scale" in r:
        out += "\n### A fleet: N virtual nodes of 8 engines (bench.scale)\n\n" + scale.markdown(
            r["scale"]
        )
    if "peers" in r:
        p = r["peers"]
        out += (
            f"\n### The relay next to the Rust routers ({p['rounds']} interleaved rounds, "
            f"log level {p['log_level']})\n\n" + peers.markdown(p)
        )
    ins = r.get("instructions")
    if ins is not None:
        out += "\n### Instructions per request and per token (callgrind)\n\n" + (
            f"Skipped: bench.instructions {ins['skipped']}.\n"
            if "skipped" in ins
            else instructions.markdown(ins) + "\n"
        )
    return out


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [
        ("SIGKILL → declared dead", r["failover, SIGKILL"]["results"][0]["samples_ms"]),
        ("SIGSTOP → declared dead", r["failover, SIGSTOP"]["results"][0]["samples_ms"]),
        ("node loss → confirmed dead", r["cluster"]["node_loss"]["samples_ms"]),
    ]
    for label, xs in series:
        xs = sorted(xs)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("detection latency (ms, log scale)")
    ax.set_ylabel("fraction of failures")
    ax.set_title("How soon failures are detected")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "detection.png"
    fig.savefig(path, dpi=110)
    made.append(path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    hb = r["cluster"]["heartbeat_cpu"]
    ax.bar([str(h["engines"]) for h in hb], [h["cpu_percent_of_core"] for h in hb])
    ax.axhline(10, color="red", linestyle="--", label="target at 1,000: 10 %")
    ax.set_xlabel("engines whose heartbeats one node receives")
    ax.set_ylabel("% of one core")
    ax.set_title("Heartbeat CPU cost")
    ax.legend()
    fig.tight_layout()
    path = out / "heartbeat_cpu.png"
    fig.savefig(path, dpi=110)
    made.append(path)
    plt.close(fig)
    if "peers" in r:
        made.append(peers.plot(r["peers"], out / "peers_cpu.png"))
    if "scale" in r:
        made.append(scale.plot(r["scale"], out / "scale.png"))
    return made


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples (a few minutes)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: a new temp)")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="bench-report-"))
    out.mkdir(parents=True, exist_ok=True)
    r = anyio.run(run_all, a.quick)
    (out / "report.json").write_text(json.dumps(r, indent=1))
    md = markdown(r)
    (out / "report.md").write_text(md)
    made = plots(r, out)
    print(md)
    print(f"report: {out / 'report.md'}; plots: {', '.join(str(m) for m in made)}")


if __name__ == "__main__":
    cli()
