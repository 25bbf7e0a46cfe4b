"""A load client for the frontend, with a token-exactness check against the simulator.

    .venv/bin/python -m bench.load --url http://127.0.0.1:8080 [--clients 16] [--requests 20]
                         [--max-tokens 64] [--seed 1] [--json FILE]

Each client sends its requests one after another, a seeded mix of completion and chat,
streaming and not, at temperature 0. Every answer is compared with what the deterministic
simulator must produce for that prompt (computed here, from the simulator's own tokenizer
and sequence rule): a stream that migrated mid-way must still match token for token.
A 503 is a *rejection* (admission control said no), not a failure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import anyio

from supervisor.testing.simtokenizer import (
    EOS_ID,
    WORDS,
    ChatMessage,
    SequenceState,
    SimTokenizer,
    TextStream,
    apply_chat_template,
)
from supervisor.upstream import iter_sse_data

MODEL = "sim-model"
_TOKENIZER = SimTokenizer()


def expected_text(prompt_ids: Sequence[int], max_tokens: int, eos_every: int = 0) -> str:
    """What the simulator generates for ``prompt_ids`` at temperature 0."""
    state = SequenceState(prompt_ids, eos_every=eos_every)
    out = []
    for _ in range(max_tokens):
        tid = state.next_token()
        state.append(tid)
        if tid == EOS_ID:
            break
        out.append(tid)
    # As engines stream it: a character cut off by max_tokens is not shown.
    texts = TextStream(_TOKENIZER, prompt_ids)
    return "".join(texts.step(t) for t in out)


@dataclass
class RequestResult:
    client: int
    kind: str  # completion | chat
    stream: bool
    status: int
    ok: bool  # 200, complete, and exact
    rejected: bool  # 503: admission control
    exact: bool | None
    tokens: int
    latency_s: float
    started_at: float
    error: str = ""
    # The frontend the request went through died with it (its node was lost): the relay
    # was on that node, so nothing could carry the stream on. Reported apart.
    frontend_lost: bool = False


@dataclass
class LoadSpec:
    clients: int = 8
    requests_per_client: int = 10
    max_tokens: int = 64
    seed: int = 1
    timeout_s: float = 180.0  # one request, migrations and waits for a shadow included


def _request(rng: random.Random, max_tokens: int) -> tuple[str, bool, dict[str, Any], str]:
    kind = rng.choice(["completion", "chat"])
    stream = rng.random() < 0.7
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if kind == "completion":
        body["prompt"] = words
        ids = _TOKENIZER.encode(words)
        path = "/v1/completions"
    else:
        body["messages"] = [{"role": "user", "content": words}]
        ids = _TOKENIZER.encode(apply_chat_template([ChatMessage("user", words)]))
        path = "/v1/chat/completions"
    return kind, stream, body, expected_text(ids, max_tokens) + "\0" + path


def _text_of(obj: dict[str, Any], chat: bool) -> str:
    out = []
    for ch in obj.get("choices") or []:
        if chat:
            part = ch.get("delta") or ch.get("message") or {}
            out.append(part.get("content") or "")
        else:
            out.append(ch.get("text") or "")
    return "".join(out)


async def _frontend_up(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        with anyio.fail_after(2):
            async with session.get(url + "/health") as r:
                return r.status < 500 or r.status == 503
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def one_request(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    client: int,
    rng: random.Random,
    spec: LoadSpec,
) -> RequestResult:
    """One request through the first frontend of ``urls`` that accepts a connection (as a
    load balancer would skip a frontend that is down)."""
    kind, stream, body, packed = _request(rng, spec.max_tokens)
    want, path = packed.split("\0")
    t0 = time.monotonic()
    started = time.time()
    status, text, error = 0, "", ""
    url = urls[0]
    connected = False
    try:
        with anyio.fail_after(spec.timeout_s):
            for url in urls:
                try:
                    r = await session.post(url + path, json=body)
                    connected = True
                    break
                except aiohttp.ClientConnectorError:
                    continue  # that frontend is down: the next one
                except Exception:
                    connected = True  # it reached the frontend, which then went away
                    raise
            else:
                raise ConnectionError("no frontend accepts connections")
            async with r:
                status = r.status
                if status == 200 and stream:
                    async for data in iter_sse_data(r):
                        text += _text_of(json.loads(data), kind == "chat")
                elif status == 200:
                    text = _text_of(await r.json(), kind == "chat")
                else:
                    error = (await r.text())[:200]
    except TimeoutError:
        error = f"no complete answer within {spec.timeout_s}s"
    except Exception as e:  # a broken stream, a reset: the client saw a failure
        where = f" ({url}, status {status or 'none'}, after {time.monotonic() - t0:.2f}s)"
        error = f"{type(e).__name__}: {e}"[:200] + where
    lost = bool(error) and connected and not await _frontend_up(session, url)
    exact = (text == want) if status == 200 and not error else None
    return RequestResult(
        client=client,
        kind=kind,
        stream=stream,
        status=status,
        ok=status == 200 and not error and bool(exact),
        rejected=status == 503,
        exact=exact,
        tokens=len(_TOKENIZER.encode(text)) if text else 0,
        latency_s=time.monotonic() - t0,
        started_at=started,
        error=error or ("" if exact in (True, None) else "text differs from the simulator's"),
        frontend_lost=lost,
    )


async def run_load(
    urls: Sequence[str], spec: LoadSpec, *, stop: anyio.Event | None = None
) -> list[RequestResult]:
    """``spec.clients`` concurrent clients over ``urls`` (round-robin by client)."""
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(i: int) -> None:
            rng = random.Random(spec.seed * 100_003 + i)
            order = [*urls[i % len(urls) :], *urls[: i % len(urls)]]  # round-robin by client
            for _ in range(spec.requests_per_client):
                if stop is not None and stop.is_set():
                    return
                res = await one_request(session, order, i, rng, spec)
                results.append(res)
                if res.error:
                    await anyio.sleep(0.05)  # no tight loop while something is down

        async with anyio.create_task_group() as tg:
            for i in range(spec.clients):
                tg.start_soon(client, i)
    return results


def summarize(results: Sequence[RequestResult]) -> dict[str, Any]:
    done = [r for r in results if not r.rejected and not r.frontend_lost]
    ok = [r for r in done if r.ok]
    lat = sorted(r.latency_s for r in ok)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

    return {
        "requests": len(results),
        "rejected_503": sum(1 for r in results if r.rejected),
        "frontend_lost": sum(1 for r in results if r.frontend_lost),
        "succeeded": len(ok),
        "failed": len(done) - len(ok),
        "success_rate": round(len(ok) / len(done), 5) if done else None,
        "inexact": sum(1 for r in done if r.exact is False),
        "tokens": sum(r.tokens for r in ok),
        "latency_p50_ms": pct(0.5),
        "latency_p99_ms": pct(0.99),
        "latency_mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
        "errors": sorted({r.error for r in done if r.error})[:10],
    }


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", action="append", required=True, help="a frontend (repeatable)")
    p.add_argument("--clients", type=int, default=LoadSpec.clients)
    p.add_argument("--requests", type=int, default=LoadSpec.requests_per_client)
    p.add_argument("--max-tokens", type=int, default=LoadSpec.max_tokens)
    p.add_argument("--seed", type=int, default=LoadSpec.seed)
    p.add_argument("--json", help="write every request's result here")
    a = p.parse_args()
    spec = LoadSpec(a.clients, a.requests, a.max_tokens, a.seed)
    results = anyio.run(run_load, a.url, spec)
    print(json.dumps(summarize(results), indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f)
    if any(not r.ok and not r.rejected for r in results):
        sys.exit(1)


if __name__ == "__main__":
    cli()
