"""tinyserve: a tiny inference engine of its own, not modelled on any real one.

    tinyserve MODEL [--host H] [--port P] [--enable-pause]

- ``GET /healthz``: 200 once loaded.
- ``POST /admin/pause`` and ``POST /admin/resume`` (only with ``--enable-pause``): let go of
  and take back its (imaginary) accelerator memory; ``GET /admin/state`` says which.
- ``POST /v1/completions``: OpenAI-shaped, string prompts only, streamed or not. Its "model"
  writes one word per token, chosen from the text so far, so the same text always goes on
  the same way (a continuation from prompt + emitted text is exact).
- A request whose client goes away is aborted and logged as ``Aborted request <id>.`` (the
  id from ``X-Request-Id``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid

from aiohttp import web

WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet",
         "juniper", "kestrel", "lagoon", "maple", "nectar", "orchid", "pebble")  # fmt: skip
TOKEN_SECONDS = 0.01


def next_word(text: str) -> str:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return " " + WORDS[int.from_bytes(digest, "big") % len(WORDS)]


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} tinyserve: {message}\n")
    sys.stderr.flush()


class Engine:
    def __init__(self, model: str, can_pause: bool) -> None:
        self.model, self.can_pause = model, can_pause
        self.paused = False

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response({"paused": self.paused})

    async def pause(self, request: web.Request) -> web.Response:
        if not self.can_pause:
            return web.json_response({"error": "start with --enable-pause"}, status=400)
        self.paused = True
        log("paused: accelerator memory released")
        return web.json_response({"paused": True})

    async def resume(self, request: web.Request) -> web.Response:
        self.paused = False
        log("resumed")
        return web.json_response({"paused": False})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens") or 16
        if not isinstance(prompt, str):
            return web.json_response({"error": "prompt must be a string"}, status=400)
        if body.get("model") not in (None, self.model):
            return web.json_response({"error": f"no model {body.get('model')!r}"}, status=404)
        if self.paused:
            return web.json_response({"error": "paused"}, status=503)
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        log(f"Added request {rid}.")
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}  # fmt: skip
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": max_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + max_tokens
        if not body.get("stream"):
            text = prompt
            for _ in range(max_tokens):
                text += next_word(text)
            choice = {"index": 0, "text": text[len(prompt) :], "finish_reason": "length"}
            return web.json_response({**head, "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        text = prompt
        try:
            for i in range(max_tokens):
                await asyncio.sleep(TOKEN_SECONDS)
                word = next_word(text)
                text += word
                last = i == max_tokens - 1
                choice = {"index": 0, "text": word, "finish_reason": "length" if last else None}
                event = {**head, "choices": [choice]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                event = {**head, "choices": [], "usage": usage}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            log(f"Aborted request {rid}.")
            raise
        return resp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinyserve")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--enable-pause", action="store_true")
    ns = p.parse_args(argv)
    engine = Engine(ns.model, ns.enable_pause)
    app = web.Application()
    app.router.add_get("/healthz", engine.healthz)
    app.router.add_post("/v1/completions", engine.completions)
    if ns.enable_pause:
        app.router.add_get("/admin/state", engine.state)
        app.router.add_post("/admin/pause", engine.pause)
        app.router.add_post("/admin/resume", engine.resume)
    log(f"serving {ns.model} on {ns.host}:{ns.port}")
    web.run_app(app, host=ns.host, port=ns.port, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
