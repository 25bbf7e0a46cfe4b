"""The frontend's relay next to the Rust routers, one engine behind every path, in one run.

    .venv/bin/python -m bench.peers [--rounds 3] [--quick] [--json FILE] [--plot FILE]
        [--no-routers]

Paths: ``direct`` (the client talks to the engine), ``frontend`` (this daemon's relay),
``vllm-router`` and ``sglang-router`` (PyPI, pinned below; installed by this benchmark
into a venv of their own under ``~/.cache/failover-supervisor/bench-routers``, or
``$FSUP_BENCH_ROUTERS``; a router that cannot be installed is left out, saying why). The
engines are simulated vLLM engines started by one supervisor; each router gets one
process per engine, so no router chooses between engines.

The paths take turns within each round (the order rotates every round), so a slow moment
of the machine falls on all of them. Per path:

- throughput ratio to direct: ITL 0 at 4 and 16 streams, ITL 10 ms at 64 streams;
- proxy CPU per token: the proxy's user + system time (all its threads) over the tokens
  it carried, from ``/proc``;
- added inter-token gap (p50 / p99) and time to first token at ITL 10 ms: 32 streams
  through the path and 32 straight to the engine at the same time, the path's gaps minus
  the direct ones' (so the engine's and the client's hiccups fall on both; the difference
  between the separate 64-stream phases, dominated by those hiccups, is kept in the JSON);
- non-streaming: added latency p50 / p99 and proxy CPU per request (sequential requests,
  after ten uncounted ones; each round's 500 in five turns of 100 per path);
- the most concurrent streams (of 250 / 500 / 1,000 at ITL 20 ms) completed with 0 errors.

Tokens are counted from each stream's usage chunk. On a 2-core machine the engine, the
proxy and this client share the cores: ratios are comparable within a run, not to others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.failover import pct
from bench.frontend import stream
from supervisor.config import HealthConfig
from supervisor.procfs import process_tree, read_stat
from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    SupervisorProcess,
    free_port,
    sim_slot,
    start_supervisor,
)
from supervisor.testing.gpuledger import LEDGER_ENV

ROUTERS = {"vllm-router": "vllm-router==0.1.17", "sglang-router": "sglang-router==0.3.2"}
ENGINES = {  # model (served name) -> simulator timing
    "itl0": ("--sim-itl", "0", "--sim-ttft", "0"),
    "itl10": ("--sim-itl", "0.01", "--sim-ttft", "0.02"),
    "itl20": ("--sim-itl", "0.02", "--sim-ttft", "0.02", "--max-num-seqs", "2048"),
}
NS_SLICES = 5  # non-streaming requests per round: this many turns of each path (100 each)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the routers ---------------------------------------------------------------------------
def router_venv() -> Path:
    default = Path.home() / ".cache" / "failover-supervisor" / "bench-routers"
    return Path(os.environ.get("FSUP_BENCH_ROUTERS", str(default)))


def install_routers() -> dict[str, str]:
    """Each router's executable, or why it is missing (as ``"skipped: ..."``)."""
    venv = router_venv()
    found: dict[str, str] = {}
    missing = [n for n in ROUTERS if not (venv / "bin" / n).exists()]
    if missing:
        progress(f"installing {', '.join(ROUTERS[n] for n in missing)} into {venv} ...")
        try:
            if not (venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", *(ROUTERS[n] for n in missing)],
                check=True,
                timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            progress(f"  router install failed: {e}")
    for name, pin in ROUTERS.items():
        exe = venv / "bin" / name
        found[name] = str(exe) if exe.exists() else f"skipped: {pin} could not be installed"
    return found


def router_argv(name: str, exe: str, port: int, worker: str, level: str) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker]
    # Each process its own metrics port (both default to one fixed port).
    common += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    if name == "vllm-router":
        return [exe, *common, "--policy", "round_robin", "--log-level", level]
    return [exe, "launch", *common, "--policy", "round_robin", "--log-level", level[:4]]


def start_logged(argv: list[str], logfile: Path) -> subprocess.Popen[bytes]:
    with open(logfile, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each, then SIGKILL to any still running ``grace`` seconds later."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(session: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, OSError):
            pass
        await anyio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")


# -- the daemon -----------------------------------------------------------------------------
def engine_slot(model: str, gpu: int) -> dict[str, object]:
    """A slot of one simulated engine (no shadow) serving ``model``, with its timing from
    :data:`ENGINES`."""
    return sim_slot(
        model,
        gpus=[str(gpu)],
        sim_args=(*FAST_SIM_ARGS, *ENGINES[model]),
        served_model_name=model,
        shadows=0,
    )


async def start_relay_daemon(
    work: Path, slots: list[dict[str, object]], *, log_level: str, **kw: Any
) -> SupervisorProcess:
    """The daemon as the benchmarks relay through it (``kw`` goes to
    :func:`start_supervisor`)."""
    cap = 4096  # no admission limit of ours below the others'
    return await start_supervisor(
        work,
        slots,
        # The daemon's own probing (the tests' faster probes time out after 0.25 s, which
        # a simulated engine carrying 1,000 streams on two cores can take to answer).
        health={
            "probe_interval": HealthConfig.probe_interval,
            "probe_timeout": HealthConfig.probe_timeout,
        },
        frontend={"max_inflight_per_engine": cap, "max_queue": cap},
        log_level=log_level,
        **kw,
    )


async def relay_and_engines(
    session: aiohttp.ClientSession, sup: SupervisorProcess
) -> tuple[str | None, dict[str, str]]:
    """How the daemon's relay runs (compiled or pure Python, from its status) and each
    slot's active engine's URL, by slot name."""
    async with session.get(sup.admin_url + "/status") as r:
        st = await r.json()
    engines = {
        s["name"]: next(e["url"] for e in st["engines"] if e["id"] == s["active"])
        for s in st["slots"]
    }
    return st.get("relay"), engines


# -- CPU accounting ------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _task_ns(pid: int) -> int | None:
    """CPU time of every live thread of ``pid`` in ns (``schedstat``: exact, where the
    tick counts of ``stat`` move in steps of 10 ms)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total


def cpu_seconds(pid: int, tree: bool) -> float:
    """User + system time of ``pid`` (all its threads), and of its descendants if ``tree``."""
    total = 0.0
    for p in process_tree(pid) if tree else {pid}:
        ns = _task_ns(p)
        if ns is not None:
            total += ns / 1e9
        else:
            st = read_stat(p)
            total += (st.utime + st.stime) / _TICK if st is not None else 0.0
    return total


@dataclass
class ProxyPath:
    """One way to reach an engine: a URL per model, and the process that relays."""

    name: str
    urls: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)  # model -> its relaying process
    tree: bool = False  # count the process's descendants too (a launcher that forks)

    def cpu(self, model: str) -> float:
        pid = self.pids.get(model)
        return cpu_seconds(pid, self.tree) if pid else 0.0  # direct: nothing in between


# -- the client ----------------------------------------------------------------------------
@dataclass
class Tally:
    tokens: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    gaps: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0

    def absorb(self, other: Tally) -> None:
        """Add ``other``'s counts and samples to this tally."""
        self.tokens += other.tokens
        self.errors += other.errors
        self.wall += other.wall
        self.cpu += other.cpu
        self.requests += other.requests
        self.gaps += other.gaps
        self.ttfts += other.ttfts
        self.latencies += other.latencies


async def one_stream(
    session: aiohttp.ClientSession, url: str, model: str, tokens: int, t: Tally, keep: bool
) -> None:
    """One stream into the tally: its tokens, or an error (with ``keep``, its gaps too)."""
    try:
        n = await stream(
            session,
            url,
            model,
            tokens,
            t.gaps if keep else None,
            t.ttfts if keep else None,
            ignore_eos=True,
        )
    except (aiohttp.ClientError, OSError, ValueError):
        t.errors += 1
        return
    if n != tokens:
        t.errors += 1
    t.tokens += n


async def streams(
    session: aiohttp.ClientSession, path: ProxyPath, model: str, n: int, tokens: int
) -> Tally:
    t = Tally()
    c0, t0 = path.cpu(model), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one_stream, session, path.urls[model], model, tokens, t, True)
    t.wall, t.cpu = time.perf_counter() - t0, path.cpu(model) - c0
    return t


async def paired(
    session: aiohttp.ClientSession,
    path: ProxyPath,
    direct: ProxyPath,
    model: str,
    n: int,
    tokens: int,
) -> tuple[Tally, Tally]:
    """``n`` streams through ``path`` and ``n`` straight to the engine, at the same time.
    Both halves see the same hiccups of the engine and of this client, so their gaps differ
    by what the path adds; gaps measured in separate phases differ by those hiccups too,
    which at 64 streams on two cores are larger than anything a proxy adds."""
    through, straight = Tally(), Tally()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one_stream, session, path.urls[model], model, tokens, through, True)
            tg.start_soon(one_stream, session, direct.urls[model], model, tokens, straight, True)
    return through, straight


async def non_streaming(
    session: aiohttp.ClientSession, path: ProxyPath, model: str, count: int
) -> Tally:
    t = Tally()
    body = {"model": model, "prompt": "the river", "max_tokens": 8, "ignore_eos": True}
    c0 = path.cpu(model)
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            async with session.post(path.urls[model] + "/v1/completions", json=body) as r:
                data = await r.json()
                ok = r.status == 200 and data["usage"]["completion_tokens"] == 8
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
            ok = False
        t.latencies.append(time.perf_counter() - t0)
        t.errors += not ok
        t.requests += 1
    t.cpu = path.cpu(model) - c0
    return t


async def capacity(
    session: aiohttp.ClientSession, path: ProxyPath, levels: list[int], tokens: int
) -> dict[str, Any]:
    best, tried = 0, []
    url = path.urls["itl20"]
    for n in levels:
        t = Tally()
        t0 = time.perf_counter()
        with anyio.move_on_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one_stream, session, url, "itl20", tokens, t, False)
        done = t.tokens // tokens
        tried.append({"streams": n, "errors": n - done, "s": round(time.perf_counter() - t0, 2)})
        if done < n:
            break
        best = n
    return {"most_with_0_errors": best, "tried": tried}


# -- the run -------------------------------------------------------------------------------
PHASES: list[tuple[str, str, int, int]] = [  # (name, model, streams, tokens per stream)
    ("itl0_4", "itl0", 4, 1000),
    ("itl0_16", "itl0", 16, 250),
    ("itl10_64", "itl10", 64, 200),
]
# The added gaps and TTFT: half the ITL 10 ms phase's streams through a path, half direct,
# at once (model, streams each way, tokens per stream).
PAIRED = ("itl10", 32, 200)


async def run(
    rounds: int, quick: bool, with_routers: bool = True, log_level: str = "warning"
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    routers = install_routers() if with_routers else {n: "skipped: --no-routers" for n in ROUTERS}
    slots = [engine_slot(m, i) for i, m in enumerate(ENGINES)]
    sup = await start_relay_daemon(work, slots, log_level=log_level)
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"rounds": rounds, "log_level": log_level, "routers": {}, "paths": {}}
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
        ) as session:
            out["relay"], engine = await relay_and_engines(session, sup)
            paths = [
                ProxyPath("direct", dict(engine)),
                ProxyPath(
                    "frontend",
                    {m: sup.frontend_url for m in ENGINES},
                    {m: sup.proc.pid for m in ENGINES},
                ),
            ]
            for name, exe in routers.items():
                if exe.startswith("skipped"):
                    out["routers"][name] = exe
                    progress(f"{name}: {exe}")
                    continue
                urls, pids = {}, {}
                for m, worker in engine.items():
                    port = free_port()
                    argv = router_argv(name, exe, port, worker, log_level)
                    logfile = work / f"{name}-{m}.log"
                    proc = await anyio.to_thread.run_sync(start_logged, argv, logfile)
                    procs.append(proc)
                    pids[m] = proc.pid
                    urls[m] = f"http://127.0.0.1:{port}"
                try:
                    for u in urls.values():
                        await wait_http(session, u + "/v1/models")
                except TimeoutError as e:
                    out["routers"][name] = f"skipped: did not start ({e})"
                    progress(f"{name}: {out['routers'][name]}")
                    continue
                out["routers"][name] = ROUTERS[name]
                # One router process per engine: each phase counts the one it used.
                paths.append(ProxyPath(name, urls, pids, tree=True))

            per: dict[str, dict[str, list[Tally]]] = {p.name: {} for p in paths}
            scale = 0.4 if quick else 1.0
            for rnd in range(rounds):
                order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
                for phase, model, n, tokens in PHASES:
                    rates = []
                    for p in order:
                        t = await streams(session, p, model, n, round(tokens * scale))
                        per[p.name].setdefault(phase, []).append(t)
                        rates.append(f"{p.name} {t.tokens / t.wall:.0f}")
                    progress(f"round {rnd + 1}/{rounds}, {phase} (tok/s): {', '.join(rates)}")
                for p in order:
                    if p is not paths[0]:  # (direct against itself adds nothing)
                        model, n, tokens = PAIRED
                        through, straight = await paired(
                            session, p, paths[0], model, n, round(tokens * scale)
                        )
                        per[p.name].setdefault("paired", []).append(through)
                        per[p.name].setdefault("paired_direct", []).append(straight)
                progress(f"round {rnd + 1}/{rounds}: paired streams done")
                for p in order:
                    # A few first, uncounted (connections opened again after the streams
                    # phases), so the count is of requests, not of one path's warm-up.
                    await non_streaming(session, p, "itl0", 10)
                # In slices that take turns (the order rotating each slice): a slow spell of
                # the machine, often longer than one path's turn, falls on all the paths.
                tallies = {p.name: Tally() for p in order}
                for i in range(NS_SLICES):
                    for p in order[i % len(order) :] + order[: i % len(order)]:
                        t = await non_streaming(session, p, "itl0", 20 if quick else 100)
                        tallies[p.name].absorb(t)
                for p in order:
                    per[p.name].setdefault("nonstream", []).append(tallies[p.name])
                progress(f"round {rnd + 1}/{rounds}: non-streaming done")
            levels = [250, 500, 1000]
            caps = {}
            for p in paths:
                caps[p.name] = await capacity(session, p, levels, 40)
                progress(f"capacity {p.name}: {caps[p.name]['most_with_0_errors']} streams")
            async with session.get(sup.admin_url + "/status") as r:
                st = await r.json()
            out["frontend_failovers"] = len(st.get("failovers") or [])
            out["paths"] = summarize(per, caps)
    finally:
        stop_processes(procs, 10)
        await anyio.to_thread.run_sync(sup.stop)
    return out


def summarize(
    per: dict[str, dict[str, list[Tally]]], caps: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    direct = per["direct"]

    def ratio(path: str, phase: str) -> float:
        rs = [
            (t.tokens / t.wall) / (d.tokens / d.wall)
            for t, d in zip(per[path][phase], direct[phase], strict=True)
        ]
        return round(statistics.fmean(rs), 3)

    def pooled(path: str, phase: str, get: Callable[[Tally], list[float]]) -> list[float]:
        return [x for t in per[path][phase] for x in get(t)]

    out: dict[str, Any] = {}
    for path, phases in per.items():
        row: dict[str, Any] = {"errors": sum(t.errors for ts in phases.values() for t in ts)}
        for phase, _, _, _ in PHASES:
            ts = phases[phase]
            tokens = sum(t.tokens for t in ts)
            row[phase] = {
                "tok_s": round(tokens / sum(t.wall for t in ts)),
                "ratio": ratio(path, phase),
                "cpu_us_per_token": round(sum(t.cpu for t in ts) / max(tokens, 1) * 1e6, 2),
                # Round by round: how much the figure moves on this machine.
                "cpu_rounds": [round(t.cpu / max(t.tokens, 1) * 1e6, 2) for t in ts],
            }
        # Added gaps: from the paired phase (this path's streams against direct ones running
        # at the same time); the separate phases' difference is kept for comparison.
        both = "paired" in phases
        gaps, dgaps = (
            pooled(path, "paired", lambda t: t.gaps) if both else [0.0],
            pooled(path, "paired_direct", lambda t: t.gaps) if both else [0.0],
        )
        ttft, dttft = (
            pooled(path, "paired", lambda t: t.ttfts) if both else [0.0],
            pooled(path, "paired_direct", lambda t: t.ttfts) if both else [0.0],
        )
        row["added_itl_ms"] = {
            "p50": round((pct(gaps, 50) - pct(dgaps, 50)) * 1000, 3),
            "p99": round((pct(gaps, 99) - pct(dgaps, 99)) * 1000, 3),
        }
        row["added_ttft_ms_p50"] = round((pct(ttft, 50) - pct(dttft, 50)) * 1000, 2)
        sgaps, sdgaps = (
            pooled(path, "itl10_64", lambda t: t.gaps),
            pooled("direct", "itl10_64", lambda t: t.gaps),
        )
        row["added_itl_ms_separate_phases"] = {
            "p50": round((pct(sgaps, 50) - pct(sdgaps, 50)) * 1000, 3),
            "p99": round((pct(sgaps, 99) - pct(sdgaps, 99)) * 1000, 3),
        }

        lat, dlat = (
            pooled(path, "nonstream", lambda t: t.latencies),
            pooled("direct", "nonstream", lambda t: t.latencies),
        )
        ns = phases["nonstream"]
        row["nonstream"] = {
            "added_ms_p50": round((pct(lat, 50) - pct(dlat, 50)) * 1000, 3),
            "added_ms_p99": round((pct(lat, 99) - pct(dlat, 99)) * 1000, 3),
            "cpu_us_per_request": round(
                sum(t.cpu for t in ns) / max(sum(t.requests for t in ns), 1) * 1e6, 1
            ),
            "cpu_rounds": [round(t.cpu / max(t.requests, 1) * 1e6, 1) for t in ns],
        }
        row["capacity"] = caps[path]
        out[path] = row
    return out


def markdown(r: dict[str, Any]) -> str:
    head = (
        "| path | ratio to direct, ITL 0, 4 / 16 streams | CPU µs/token, ITL 0, 4 / 16 "
        "| ITL 10 ms, 64 streams: ratio, CPU µs/token | added ITL p50 / p99 (ms, paired) "
        "| added TTFT p50 (ms) | non-stream: added p50 / p99 (ms), CPU µs/request "
        "| most streams with 0 errors (ITL 20 ms) |"
    )
    rows = [head, "|" + "---|" * 8]
    for name, x in r["paths"].items():
        a, b, c = x["itl0_4"], x["itl0_16"], x["itl10_64"]
        ns = x["nonstream"]
        rows.append(
            f"| {name} | {a['ratio']:.2f} / {b['ratio']:.2f} "
            f"| {a['cpu_us_per_token']} / {b['cpu_us_per_token']} "
            f"| {c['ratio']:.2f}, {c['cpu_us_per_token']} "
            f"| {x['added_itl_ms']['p50']:+.3f} / {x['added_itl_ms']['p99']:+.3f} "
            f"| {x['added_ttft_ms_p50']:+.2f} "
            f"| {ns['added_ms_p50']:+.3f} / {ns['added_ms_p99']:+.3f}, {ns['cpu_us_per_request']} "
            f"| {x['capacity']['most_with_0_errors']} |"
        )
    for name, why in r["routers"].items():
        if why.startswith("skipped"):
            rows.append(f"| {name} | {why} |" + " |" * 6)
    rows.append("")
    rows.append(
        f"Routers: {', '.join(v for v in r['routers'].values() if not v.startswith('skipped'))}"
        f". Failovers in the frontend during the run: {r.get('frontend_failovers', '?')}."
        f" The frontend's relay: {r.get('relay', 'not reported')}."
    )
    separate = [
        f"{name} {x['added_itl_ms_separate_phases']['p50']:+.3f} / "
        f"{x['added_itl_ms_separate_phases']['p99']:+.3f}"
        for name, x in r["paths"].items()
        if name != "direct" and "added_itl_ms_separate_phases" in x
    ]
    if separate:
        rows.append("")
        rows.append(
            "Added ITL p50 / p99 (ms) from the separate 64-stream phases instead (each path's "
            "gaps against direct's from another moment): " + "; ".join(separate) + "."
        )
    spread = [
        f"{name} {' / '.join(str(v) for v in x['itl0_16'].get('cpu_rounds', []))} µs/token, "
        f"{' / '.join(str(v) for v in x['nonstream'].get('cpu_rounds', []))} µs/request"
        for name, x in r["paths"].items()
        if name != "direct"
    ]
    if spread:
        rows.append("")
        rows.append(
            "Round by round (ITL 0 with 16 streams; non-streaming): " + "; ".join(spread) + "."
        )
    versus = against_cheapest_router(r)
    if versus:
        rows.append("")
        rows.append(
            "The frontend's CPU over the cheaper router's, measure by measure: per token at "
            f"ITL 0, 4 / 16 streams {versus['itl0_4']:.2f}x / {versus['itl0_16']:.2f}x; "
            f"at ITL 10 ms {versus['itl10_64']:.2f}x; per non-streaming request "
            f"{versus['nonstream']:.2f}x (below 1: the frontend spends less)."
        )
    return "\n".join(rows) + "\n"


def against_cheapest_router(r: dict[str, Any]) -> dict[str, float]:
    """The frontend's CPU over the cheapest router's, per measure (empty without routers)."""
    paths = r["paths"]
    routers = [n for n in paths if n not in ("direct", "frontend")]
    if "frontend" not in paths or not routers:
        return {}

    def cpu(name: str, measure: str) -> float:
        x = paths[name][measure]
        return float(x["cpu_us_per_request" if measure == "nonstream" else "cpu_us_per_token"])

    return {
        m: cpu("frontend", m) / max(min(cpu(n, m) for n in routers), 1e-9)
        for m in ("itl0_4", "itl0_16", "itl10_64", "nonstream")
    }


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in r["paths"] if n != "direct"]
    phases = [
        ("itl0_4", "ITL 0, 4 streams"),
        ("itl0_16", "ITL 0, 16"),
        ("itl10_64", "ITL 10 ms, 64"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(phases))]
        ax.bar(xs, [r["paths"][n][p]["cpu_us_per_token"] for p, _ in phases], width, label=n)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(phases))])
    ax.set_xticklabels([label for _, label in phases])
    ax.set_ylabel("proxy CPU per token (µs)")
    ax.set_title("Relay CPU per token, same engine, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="shorter streams, fewer requests")
    ap.add_argument("--no-routers", action="store_true", help="direct and frontend only")
    ap.add_argument(
        "--log-level",
        default="warning",
        choices=("info", "warning"),
        help="every proxy's (default warning: none logs each request)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ns = ap.parse_args()
    out = anyio.run(run, ns.rounds, ns.quick, not ns.no_routers, ns.log_level)
    print(markdown(out))
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=1))
    if ns.plot:
        print(f"plot: {plot(out, ns.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
