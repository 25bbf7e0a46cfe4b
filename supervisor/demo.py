"""``failover-supervisor demo``: a simulated engine, watched as it streams, sleeps and wakes."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio

from supervisor.backends import load_backend
from supervisor.model import EngineSpec, Progress, Readiness
from supervisor.testing.cluster import free_port, running_engine
from supervisor.testing.conformance import completion, stream_piece
from supervisor.testing.gpuledger import GpuLedger

DEMO_SIM_ARGS = ("--sim-load-time", "0.5", "--sim-itl", "0.04", "--sim-wake-time", "0.3")


def say(msg: str) -> None:
    print(msg, flush=True)


async def _demo(dialect: str, tokens: int) -> int:
    backend = load_backend(dialect)
    work = Path(tempfile.mkdtemp(prefix="failover-demo-"))
    ledger = GpuLedger(work / "gpus.json")
    import os

    os.environ["FAILOVER_SIM_LEDGER"] = str(ledger.path)
    spec = EngineSpec("demo-0", "sim-model", free_port(), role="shadow", gpus=("0",))
    say(f"starting a simulated {dialect} engine on {spec.url} (logs in {work})")
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        running_engine(backend, spec, work, session, sim_args=DEMO_SIM_ARGS) as (proc, ep),
    ):
        say(f"  ready after {time.monotonic() - t0:.2f}s (pid {proc.pid})")
        gpu = ledger.usage()["0"]
        say(f"  simulated GPU 0: {gpu.used / 2**30:.0f} of {gpu.capacity / 2**30:.0f} GiB used")
        say(f"streaming {tokens} tokens:")
        req = completion("the river and the stone", tokens)
        progress = Progress()
        up = backend.first_request(req, "demo-1")
        decoder = backend.decoder(up)
        from supervisor.upstream import iter_sse_data

        async with session.post(ep.url + up.path, json=up.body, headers=up.headers) as resp:
            async for data in iter_sse_data(resp):
                piece = decoder.feed(data)
                if piece:
                    progress.add(piece)
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
        say(f"\n  {progress.completion_tokens} tokens")
        if backend.dialect.sleep_flag:
            await backend.sleep(ep, 1)
            gpu = ledger.usage()["0"]
            say(
                f"asleep (level 1): GPU 0 now {gpu.used / 2**30:.0f} GiB used; "
                f"health says {await backend.health(ep)}"
            )
            t1 = time.monotonic()
            await backend.wake(ep)
            say(f"awake after {time.monotonic() - t1:.2f}s; health says {await backend.health(ep)}")
            again = await stream_piece(
                backend, ep, backend.first_request(req, "demo-2"), Progress()
            )
            same = again.progress.text == progress.text
            say(
                f"same prompt again -> {'identical' if same else 'DIFFERENT'} output "
                "(the simulator is deterministic)"
            )
            if not same or await backend.health(ep) is not Readiness.READY:
                return 1
    say("done")
    return 0


def run_demo(ns: argparse.Namespace) -> int:
    return anyio.run(_demo, ns.dialect, ns.tokens)
