"""The client-visible stall of a planned move next to an unplanned failover's, in one run.

    .venv/bin/python -m bench.operations [--rounds 3] [--streams 20] [--json FILE]

One daemon, one slot of simulated vLLM engines (10 ms between tokens, a pooled shadow on a
GPU of its own, 0.5 ms of prefill per prompt token). Each round runs ``--streams`` streams
of 400 tokens twice: once through a rolling upgrade of the slot (a new spec, its streams
moved by plan), once through a SIGKILL of the active engine (detected, failed over, its
streams migrated). Per stream, the stall is the largest gap between two chunks the client
received; every stream must also come out token-exact. Both kinds alternate within the run,
so they share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.failover import print_table, summary
from bench.load import expected_text
from supervisor.testing.cluster import render_config, sim_slot, start_supervisor
from supervisor.testing.gpuledger import LEDGER_ENV
from supervisor.testing.simtokenizer import WORDS, SimTokenizer
from supervisor.upstream import iter_sse_data

# 10 ms between tokens: a 400-token stream runs for 4 s, long enough to move it mid-way.
SIM_ARGS = (
    "--sim-load-time", "0.05", "--sim-ttft", "0.005", "--sim-itl", "0.01",
    "--sim-sleep-time", "0.01", "--sim-wake-time", "0.05", "--sim-release-delay", "0.05",
)  # fmt: skip
TOKENS = 400
_TOKENIZER = SimTokenizer()


def prompt_of(i: int) -> str:
    return f"the lantern over the harbor {WORDS[i % len(WORDS)]} {WORDS[(7 * i) % len(WORDS)]}"


def want(prompt: str, max_tokens: int) -> str:
    """The simulator's answer to ``prompt``, as an unbroken run streams it."""
    return expected_text(_TOKENIZER.encode(prompt), max_tokens)


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    prompt: str,
    max_tokens: int,
    on_chunk: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """One streamed completion as its client sees it: text, finish reasons, usage, the
    ``failover`` reports, and the arrival time of every chunk. An error event raises."""
    body = {
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out: dict[str, Any] = {"text": "", "finishes": [], "usage": None, "failover": [], "at": []}
    out["done"] = False
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for data in iter_sse_data(r):
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error event: {obj['error']}")
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            if obj.get("failover"):
                out["failover"].append(obj["failover"])
            for ch in obj["choices"]:
                out["text"] += ch["text"]
                if ch["finish_reason"]:
                    out["finishes"].append(ch["finish_reason"])
                out["at"].append(time.monotonic())
            on_chunk()
        out["done"] = True  # iter_sse_data returns only after [DONE]
    return out


def largest_gap(arrivals: list[float]) -> float:
    """The longest wait between two chunks (seconds): the stream's stall."""
    return max((b - a for a, b in pairwise(arrivals)), default=0.0)


class Streams:
    """Streams started together; :meth:`check` says whether each came out whole."""

    def __init__(self, session: aiohttp.ClientSession, url: str, sizes: list[int]) -> None:
        self.session, self.url, self.sizes = session, url, sizes
        self.results: dict[int, dict[str, Any] | BaseException] = {}
        self.chunks = [0] * len(sizes)

    def under_way(self, n: int) -> Callable[[], Any]:
        """An awaitable check: has every stream had ``n`` chunks?"""

        async def check() -> bool:
            return min(self.chunks) >= n

        return check

    async def _one(self, i: int) -> None:
        def seen() -> None:
            self.chunks[i] += 1

        try:
            self.results[i] = await stream(
                self.session, self.url, prompt_of(i), self.sizes[i], seen
            )
        except Exception as e:  # reported by check()
            self.results[i] = e

    def start(self, tg: Any) -> None:
        for i in range(len(self.sizes)):
            tg.start_soon(self._one, i)

    def check(self) -> list[dict[str, Any]]:
        """Every stream complete, token-exact, one finish, [DONE], usage right."""
        out = []
        for i, n in enumerate(self.sizes):
            got = self.results[i]
            assert not isinstance(got, BaseException), f"stream {i}: {got!r}"
            assert got["text"] == want(prompt_of(i), n), f"stream {i} differs from an unbroken run"
            assert got["finishes"] == ["length"], (i, got["finishes"])
            assert got["done"] and got["usage"]["completion_tokens"] == n, (i, got["usage"])
            out.append(got)
        return out


async def until(pred: Callable[[], Any], timeout: float = 30, what: str = "condition") -> None:
    """Wait for the awaitable check ``pred()`` to hold (TimeoutError naming ``what``)."""
    try:
        with anyio.fail_after(timeout):
            while not await pred():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}") from None


async def run(rounds: int, n_streams: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-operations-"))
    os.environ[LEDGER_ENV] = str(work / "gpu-ledger.json")
    slot = sim_slot("s", placement="pooled", gpus=["0"], shadow_gpus=[["1"]], sim_args=SIM_ARGS)
    sup = await start_supervisor(work, [slot], failover={"relaunch_backoff": 0.01})
    stalls: dict[str, list[float]] = {"rollout": [], "failover": []}
    itl: list[float] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def status() -> dict[str, Any]:
                async with http.get(sup.admin_url + "/status") as r:
                    return await r.json()  # type: ignore[no-any-return]

            async def full_strength() -> bool:
                st = await status()
                states = [e["state"] for e in st["engines"]]
                return states.count("active") == 1 and states.count("sleeping") == 1

            async def rollout(i: int) -> None:
                cfg = tomllib.loads(sup.config_path.read_text())
                cfg["slot"][0]["env"] = {"ROLLOUT_MARK": str(i)}
                sup.config_path.write_text(render_config(cfg))
                async with http.post(sup.admin_url + "/reload", json={}) as r:
                    assert r.status == 200, await r.text()
                async with http.post(sup.admin_url + "/rollout", json={"wait": True}) as r:
                    assert r.status == 200, await r.text()

            async def kill(i: int) -> None:
                st = await status()
                active = next(e for e in st["engines"] if e["id"] == st["slots"][0]["active"])
                os.killpg(active["pid"], signal.SIGKILL)

            for i in range(rounds):
                for kind, act in (("rollout", rollout), ("failover", kill)):
                    await until(full_strength)
                    streams = Streams(http, sup.frontend_url, [TOKENS] * n_streams)
                    async with anyio.create_task_group() as tg:
                        streams.start(tg)
                        await until(streams.under_way(50))
                        await act(i)
                    for got in streams.check():
                        stalls[kind].append(largest_gap(got["at"]))
                        gaps = sorted(b - a for a, b in pairwise(got["at"]))
                        itl.append(gaps[len(gaps) // 2])
                    print(f"\rround {i + 1}/{rounds}: {kind}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        await anyio.to_thread.run_sync(sup.stop)
    return {
        "rounds": rounds,
        "streams": n_streams,
        "tokens": TOKENS,
        "results": [
            summary("inter-token gap, median per stream", itl),
            summary("stall, rollout (planned move)", stalls["rollout"]),
            summary("stall, SIGKILL (unplanned failover)", stalls["failover"]),
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    out = anyio.run(run, ns.rounds, ns.streams)
    print_table(out["results"])
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
