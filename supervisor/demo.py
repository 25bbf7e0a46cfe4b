"""``failover-supervisor demo``: watch a failover on simulated engines, no servers needed.

An embedded single-node supervisor runs two slots of simulated vLLM engines, each an active
engine and a paired shadow asleep on the same (simulated) GPU. A client streams a long
completion; the demo SIGKILLs the active engine's process group mid-stream; the supervisor
detects it, waits for the GPU memory to be released, wakes the shadow and promotes it; the
client resumes its stream on the new engine from token ids (what the frontend will do for
every client), and the demo checks that no token was lost or repeated.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio

from supervisor import log
from supervisor.backends import EngineEndpoint, load_backend
from supervisor.config import Config, FrontendConfig, parse
from supervisor.daemon import Supervisor
from supervisor.requests import ClientRequest, Progress
from supervisor.testing.cluster import free_port, free_port_range
from supervisor.testing.conformance import stream_piece
from supervisor.testing.gpuledger import LEDGER_ENV, GpuLedger
from supervisor.testing.simtokenizer import SimTokenizer, generate

SIM_ARGS = ["--sim-load-time", "0.8", "--sim-wake-time", "0.3", "--sim-itl", "0.01"]
PROMPT = "the failover supervisor keeps the stream"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def demo_config(
    work: Path, port: int | None = None, admin_port: int | None = None
) -> dict[str, object]:
    def slot(name: str, gpu: str) -> dict[str, object]:
        return {
            "name": name,
            "model": "sim-model",
            "backend": "vllm",
            "base_port": free_port_range(2),
            "shadows": 1,
            "placement": "paired",
            "gpus": [gpu],
            "simulate": True,
            "sim_args": SIM_ARGS,
            "shadow_extra_args": ["--sim-start-asleep"],
        }

    return {
        "node": {"name": "demo-node", "state_dir": str(work)},
        "admin": {"host": "127.0.0.1", "port": admin_port or free_port()},
        "frontend": {"host": "127.0.0.1", "port": port or free_port()},
        "health": {"probe_interval": 0.2, "probe_timeout": 0.5},
        "failover": {"relaunch_backoff": 0.5, "stop_grace": 3},
        "slot": [slot("chat", "0"), slot("code", "1")],
    }


def expected_tokens(n: int) -> list[int]:
    """What the deterministic simulated model generates for the prompt, unbroken."""
    return generate(SimTokenizer().encode(PROMPT), n)


async def _demo(tokens: int, keep: bool, work: Path, port: int, admin_port: int) -> int:
    cfg = parse(demo_config(work, port, admin_port))
    sup = Supervisor(cfg)
    say(f"failover-supervisor demo — logs and engine output in {work}")
    say("starting: each slot's shadow loads and goes to sleep, then its active engine loads")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run, lambda line: say(f"  {line}"))
        with anyio.fail_after(60):
            await sup.ready.wait()
        ctl = sup.controllers["chat"]
        for c in sup.controllers.values():
            act = c.active_engine()
            sh = c.sleeping_shadows()
            say(
                f"  slot {c.slot.name}: active {act.id if act else '-'} "
                f"(pid {act.pid if act else '-'}), shadow {sh[0].id if sh else '-'} asleep"
            )
        usage = GpuLedger().usage()
        say(
            "  simulated GPU memory: "
            + ", ".join(
                f"GPU {g}: {u.used / 2**30:.0f}/{u.capacity / 2**30:.0f} GiB"
                for g, u in usage.items()
            )
        )
        code = await _stream_through_failover(sup, ctl, tokens)
        if keep and code == 0:
            say()
            say(f"frontend: {sup.frontend_url}")
            say(f"admin: {sup.admin_url}")
            for c in sup.controllers.values():
                act = c.active_engine()
                if act:
                    say(f"engine: {act.url}  (slot {c.slot.name}, active)")
            say(f"try: failover-supervisor status --admin {sup.admin_url}")
            say("running until Ctrl-C")
            await sup.stopping.wait()
        sup.stop()
    return code


async def _stream_through_failover(sup: Supervisor, ctl: object, tokens: int) -> int:
    from supervisor.slot.controller import SlotController

    assert isinstance(ctl, SlotController)
    backend = load_backend("vllm")
    req = ClientRequest(
        "completion",
        {"model": "sim-model", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0},
    )
    progress = Progress()
    victim = ctl.active_engine()
    assert victim is not None and victim.pid is not None
    kill_after = min(60, tokens // 3)
    say()
    say(
        f"client: streaming {tokens} tokens from slot chat ({victim.id}); "
        f"SIGKILL of its process group after {kill_after} tokens"
    )
    async with aiohttp.ClientSession() as session:
        ep = EngineEndpoint(victim.url, session)
        t_start = time.time()
        try:
            await stream_piece(
                backend,
                ep,
                backend.first_request(req, "demo-1"),
                progress,
                stop_after_tokens=kill_after,
            )
        except Exception as e:  # the demo reports whatever broke
            say(f"client: stream broke early: {e}")
        t_kill = time.time()
        os.killpg(victim.pid, signal.SIGKILL)
        say(f"  {progress.completion_tokens} tokens received: …{progress.text[-60:]}")
        say(f"  t+0 ms     SIGKILL sent to process group {victim.pid}")
        with anyio.fail_after(30):
            while not (sup.history and sup.history[0].result != "in_progress"):
                await anyio.sleep(0.005)
        rec = sup.history[0]
        if rec.result != "promoted":
            say(f"failover did not promote a shadow: {rec.result} ({rec.reason})")
            return 1
        new = ctl.engines[rec.promoted_engine or ""]

        def ms(t: float) -> str:
            return f"t+{(t - t_kill) * 1000:.0f} ms".ljust(10)

        say(f"  {ms(rec.detected_at)} detected: {rec.reason}")
        mem = rec.steps.get("memory_release", 0.0)
        say(f"  {ms(rec.detected_at + mem)} GPU memory of the dead engine released")
        woken = rec.detected_at + mem + rec.steps["wake"]
        say(
            f"  {ms(woken)} shadow {new.id} awake (wake took {rec.steps['wake'] * 1000:.0f} "
            f"ms) and promoted at epoch {rec.epoch}"
        )
        rest = backend.continuation(req, progress, "demo-1-resumed")
        before = progress.completion_tokens
        ep2 = EngineEndpoint(new.url, session)
        res = await stream_piece(backend, ep2, rest, progress, stop_after_tokens=1)
        first_token_at = time.time()
        say(
            f"  {ms(first_token_at)} first token from {new.id} "
            f"(client resumed from {before} token ids)"
        )
        res = await stream_piece(
            backend, ep2, backend.continuation(req, progress, "demo-1-resumed-2"), progress
        )
    say(f"  stream complete: {progress.completion_tokens} tokens, finish={res.finish_reason}")
    exact = progress.token_ids == expected_tokens(tokens)
    say("  token-exact with an unbroken run: " + ("yes" if exact else "NO"))
    say(f"  total time {time.time() - t_start:.2f}s")
    say()
    say("failover metrics:")
    from prometheus_client import generate_latest

    for line in generate_latest(sup.metrics.registry).decode().splitlines():
        if (
            line.startswith("failover_supervisor_")
            and not line.endswith(" 0.0")
            and ("_bucket" not in line)
            and "engine_state" not in line
        ):
            say(f"  {line}")
    return 0 if exact else 1


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port(chosen: int | None, default: int, what: str, flag: str) -> int | None:
    """The port for ``what``: the one chosen with ``flag`` (None and said in one line when
    it is taken), else ``default``, else, when that one is taken (by the README's own
    daemon, say), a free one, said in one line."""
    if chosen is not None:
        if _bindable(chosen):
            return chosen
        print(
            f"demo: port {chosen} ({what}) is in use; choose another with {flag}", file=sys.stderr
        )
        return None
    if _bindable(default):
        return default
    port = free_port()
    say(f"port {default} ({what}) is in use: the demo takes {port} instead (choose with {flag})")
    return port


def run_demo(ns: argparse.Namespace) -> int:
    port = _port(ns.port, FrontendConfig.port, "the frontend", "--port")
    admin_port = _port(ns.admin_port, Config.admin_port, "the admin API", "--admin-port")
    if port is None or admin_port is None:
        return 2
    work = Path(tempfile.mkdtemp(prefix="failover-demo-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    logfile = open(work / "supervisor.log", "a")  # noqa: SIM115 - open for the whole run
    log.configure("info", json=True, file=logfile)
    try:
        return anyio.run(_demo, ns.tokens, ns.keep, work, port, admin_port)
    except KeyboardInterrupt:
        return 130
    except (OSError, ExceptionGroup) as e:  # a port taken between the check and the bind
        leaves = e.exceptions if isinstance(e, ExceptionGroup) else (e,)
        if not all(isinstance(x, OSError) for x in leaves):
            raise
        for x in leaves:
            print(f"demo: cannot start: {x}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"demo: timed out; see the logs in {work}", file=sys.stderr)
        return 1
    finally:
        logfile.close()
