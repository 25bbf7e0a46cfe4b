"""Instructions per request and per token, counted by callgrind, for the frontend's relay
next to the Rust routers.

    .venv/bin/python -m bench.instructions [--requests 400] [--tokens 2000] [--no-routers]
        [--json F]

CPU time per request on a small shared machine moves by 15 % or more from one run to the
next, with the machine's other tenants and with what the client and the engine evict from
the caches between two requests. The instructions a proxy executes for the same work do
not: counted by valgrind's callgrind they repeat to within about 1 %, so a change of a few
percent to the relay shows in one run (``bench.ab`` needs many rounds for it). They are
user-space instructions only: the kernel's share of a request (its reads, writes and
wakeups, about the same for every proxy) is not in them, and neither are cache misses, so
they are a measure of the work a proxy's own code does, not of its CPU time.

Each proxy runs under ``valgrind --tool=callgrind --instr-atstart=no`` in front of the same
simulated vLLM engine (ITL 0). After a warm-up it is switched on (``callgrind_control``),
takes ``--requests`` sequential non-streaming requests (8 tokens each), dumps its counts,
carries ``--tokens`` streamed tokens (4 streams), and dumps again. Proxies: the
frontend's daemon, and vllm-router and sglang-router where ``bench.peers`` can install them.
Needs valgrind (``apt-get install valgrind``); without it, says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.peers import (
    ROUTERS,
    ProxyPath,
    engine_slot,
    install_routers,
    non_streaming,
    progress,
    relay_and_engines,
    router_argv,
    start_logged,
    start_relay_daemon,
    stop_processes,
    streams,
    wait_http,
)
from supervisor.procfs import process_tree
from supervisor.testing.cluster import free_port
from supervisor.testing.gpuledger import LEDGER_ENV

MODEL = "itl0"
STREAMS = 4


def missing_tools() -> str | None:
    """Why this benchmark cannot run here, or None."""
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} (Debian: apt-get install valgrind)"
    return None


def callgrind(out: Path) -> list[str]:
    """The command line prefix that runs a proxy under callgrind, counting nothing yet
    (its children, the daemon's engines, run as they are)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def totals(path: Path) -> int:
    """The instructions counted in one callgrind dump (its ``totals:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")) and line.split()[1] != "0":
            return int(line.split()[1])
    return 0


async def dump(pid: int, out: Path, label: str) -> int:
    """Dump the counts since the last dump (callgrind writes ``out.1``, ``out.2``, ...),
    and return them."""
    before = set(out.parent.glob(out.name + ".*"))
    control(pid, f"--dump={label}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(out.parent.glob(out.name + ".*")) - before
        if new:
            await anyio.sleep(0.5)  # (let the writer finish the file)
            return sum(totals(p) for p in new)
        await anyio.sleep(0.2)
    raise TimeoutError(f"callgrind wrote no dump {label!r} within 60 s")


async def count(
    session: aiohttp.ClientSession, path: ProxyPath, out: Path, requests: int, tokens: int
) -> dict[str, Any]:
    """One proxy's instructions per non-streaming request and per streamed token."""
    await non_streaming(session, path, MODEL, 100)  # warm: connections, caches, code paths
    await streams(session, path, MODEL, STREAMS, 100)
    pid = path.pids[MODEL]
    control(pid, "--instr=on")
    await dump(pid, out, "warm")  # (whatever ran before this point is not the load)
    ns = await non_streaming(session, path, MODEL, requests)
    ns_ir = await dump(pid, out, "nonstream")
    st = await streams(session, path, MODEL, STREAMS, tokens // STREAMS)
    st_ir = await dump(pid, out, "stream")
    control(pid, "--instr=off")
    return {
        "per_request": round(ns_ir / max(ns.requests, 1)),
        "per_token": round(st_ir / max(st.tokens, 1)),
        "requests": ns.requests,
        "tokens": st.tokens,
        "errors": ns.errors + st.errors,
    }


async def run(requests: int, tokens: int, with_routers: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    routers = install_routers() if with_routers else {n: "skipped: --no-routers" for n in ROUTERS}
    out: dict[str, Any] = {"requests": requests, "tokens": tokens, "paths": {}, "routers": {}}
    frontend_out = work / "frontend.cg"
    progress("starting the daemon under callgrind (about half a minute) ...")
    sup = await start_relay_daemon(
        work,
        [engine_slot(MODEL, 0)],
        log_level="warning",
        wrap=lambda argv: [*callgrind(frontend_out), *argv],
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
        ) as session:
            out["relay"], engines = await relay_and_engines(session, sup)
            engine = engines[MODEL]
            path = ProxyPath("frontend", {MODEL: sup.frontend_url}, {MODEL: sup.proc.pid})
            progress("frontend: counting ...")
            out["paths"]["frontend"] = await count(session, path, frontend_out, requests, tokens)
            progress(f"frontend: {out['paths']['frontend']}")
            for name, exe in routers.items():
                if exe.startswith("skipped"):
                    out["routers"][name] = exe
                    progress(f"{name}: {exe}")
                    continue
                port = free_port()
                cg_out = work / f"{name}.cg"
                argv = [*callgrind(cg_out), *router_argv(name, exe, port, engine, "warning")]
                proc = await anyio.to_thread.run_sync(start_logged, argv, work / f"{name}.log")
                procs.append(proc)
                url = f"http://127.0.0.1:{port}"
                try:
                    await wait_http(session, url + "/v1/models", timeout=180)
                except TimeoutError as e:
                    out["routers"][name] = f"skipped: did not start under valgrind ({e})"
                    progress(f"{name}: {out['routers'][name]}")
                    continue
                out["routers"][name] = ROUTERS[name]
                progress(f"{name}: counting ...")
                path = ProxyPath(name, {MODEL: url}, {MODEL: proc.pid})
                out["paths"][name] = await count(session, path, cg_out, requests, tokens)
                if len(process_tree(proc.pid)) > 1:  # work in a child would not be counted
                    out["paths"][name]["note"] = "has child processes, not counted"
                progress(f"{name}: {out['paths'][name]}")
    finally:
        stop_processes(procs, 30)  # (under valgrind a router takes a while to exit)
        await anyio.to_thread.run_sync(sup.stop)
        shutil.rmtree(work, ignore_errors=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    rows = [
        "| path | instructions per non-streaming request | instructions per streamed token |",
        "|---|---|---|",
    ]
    for name, p in r["paths"].items():
        bad = f" ({p['errors']} errors)" if p["errors"] else ""
        note = f" ({p['note']})" if p.get("note") else ""
        rows.append(f"| {name}{bad}{note} | {p['per_request']:,} | {p['per_token']:,} |")
    lines = ["\n".join(rows), ""]
    front = r["paths"].get("frontend")
    others = {n: p for n, p in r["paths"].items() if n != "frontend"}
    if front and others:
        ratios = "; ".join(
            f"{n} {front['per_request'] / p['per_request']:.2f}x per request, "
            f"{front['per_token'] / p['per_token']:.2f}x per token"
            for n, p in others.items()
            if p["per_request"] and p["per_token"]
        )
        lines.append(f"The frontend's instructions over each router's: {ratios}.")
    for name, why in r["routers"].items():
        if why.startswith("skipped"):
            lines.append(f"{name}: {why}.")
    lines.append(
        f"{r['requests']} requests of 8 tokens and {r['tokens']} streamed tokens "
        f"({STREAMS} streams, ITL 0) per path; user-space instructions only (callgrind)."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=400, help="non-streaming (default 400)")
    ap.add_argument("--tokens", type=int, default=2000, help="streamed (default 2000)")
    ap.add_argument("--no-routers", action="store_true", help="the frontend only")
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        print(
            f"bench.instructions needs {' and '.join(missing)} (Debian: apt-get install valgrind)",
            file=sys.stderr,
        )
        return 2
    if ns.requests < 1 or ns.tokens < STREAMS:
        print(f"--requests must be ≥ 1 and --tokens ≥ {STREAMS}", file=sys.stderr)
        return 2
    out = anyio.run(run, ns.requests, ns.tokens, not ns.no_routers)
    print(markdown(out))
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
