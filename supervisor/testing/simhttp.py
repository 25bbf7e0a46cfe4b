"""The simulated engines' HTTP APIs (aiohttp), one route table per dialect.

Shapes follow ``shared/ENGINES.md``: vLLM's OpenAI server and sleep routes, SGLang's native
``/generate`` and memory-saver routes plus its OpenAI routes, ``trtllm-serve``'s OpenAI routes.
Bad input gets the engine's own kind of 4xx (FastAPI-style ``{"detail": ...}`` for unknown
routes and for SGLang's native routes' validation errors; each engine's OpenAI error shape
otherwise), never a crash.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from supervisor.model import COMPLETIONS_DEFAULT_MAX_TOKENS
from supervisor.testing.simengine import (
    EngineCoreDead,
    EngineSleeping,
    RequestAborted,
    SamplingRequest,
    SimEngine,
    SimLog,
    SimOptions,
    SimulatedOOM,
    Token,
    dialect_facts,
)
from supervisor.testing.simtokenizer import (
    ChatMessage,
    SimTokenizer,
    apply_chat_template,
    prompt_contexts,
    token_logprobs,
)

MAX_BODY = 32 * 1024 * 1024
EMBEDDING_SIZE = 32  # the simulated embedding model's hidden size
REASONING_TOKENS = 4  # a chat answer's reasoning, where a reasoning parser is on
SYSTEM_FINGERPRINT = "simulated"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request error rendered in the dialect's shape: OpenAI-style or FastAPI ``detail``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        detail: bool = False,
        native: bool = False,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault, where the engine names one
        self.detail = detail  # FastAPI validation shape: {"detail": [...]}, 422
        self.native = native  # SGLang native routes: {"error": {"message": ...}}


_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestEntityTooLarge",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class Api:
    """Request parsing and response shapes shared by the three dialects."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.opts: SimOptions = engine.opts
        self.facts = dialect_facts(self.opts.dialect)
        self.draining = False

    # -- helpers ---------------------------------------------------------------------
    def error(self, status: int, message: str, param: str | None = None) -> web.Response:
        etype = _ERROR_TYPES.get(status, "Error")
        if self.facts.openai_error_shape == "wrapped":
            body: dict[str, Any] = {
                "error": {"message": message, "type": etype, "param": param, "code": status}
            }
        else:
            body = {
                "object": "error",
                "message": message,
                "type": etype,
                "param": param,
                "code": status,
            }
        return web.json_response(body, status=status)

    async def read_json(self, request: web.Request, *, detail: bool = False) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise ApiError(413, "request body too large", detail=detail) from e
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", detail=detail) from e
        if not isinstance(obj, dict):
            raise ApiError(400, "request body must be a JSON object", detail=detail)
        return obj

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.opts.name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. Valid aliases: {self.opts.name}.",
                param="model",
            )

    def check_serving(self) -> None:
        if self.opts.faults.error_500:
            raise ApiError(500, "simulated internal server error")
        if self.engine.sleeping:
            raise ApiError(503, "The engine is sleeping; call /wake_up first.")

    def sampling(
        self, body: dict[str, Any], prompt_ids: list[int], *, default_max: int | None
    ) -> SamplingRequest:
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        if mt is None:  # absent or null alike, as the real servers read it
            mt = default_max
        room = self.opts.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ApiError(
                400,
                f"prompt has {len(prompt_ids)} tokens; the maximum context "
                f"length is {self.opts.max_model_len}",
            )
        if mt is None:
            mt = room
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise ApiError(400, "max_tokens must be a positive integer")
        if mt > self.opts.max_model_len:  # vLLM's own words for it
            raise ApiError(
                400,
                f"max_tokens={mt} cannot be greater than max_model_len="
                f"{self.opts.max_model_len}. Please request fewer output tokens. "
                f"(parameter=max_tokens, value={mt})",
                param="max_tokens",
            )
        if mt > room:
            raise ApiError(
                400,
                f"max_tokens {mt} is too large: prompt has {len(prompt_ids)} "
                f"tokens, context length is {self.opts.max_model_len}",
                param="max_tokens",
            )
        temperature = body.get("temperature", 1.0)
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or temperature < 0
        ):
            raise ApiError(400, "temperature must be a number >= 0")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "seed must be an integer")
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise ApiError(400, "stop must be a string or a list of strings")
        n = body.get("n", 1)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ApiError(400, "n must be at least 1, got " + repr(n), param="n")
        min_tokens = body.get("min_tokens") or 0
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ApiError(400, "min_tokens must be an integer >= 0")
        if min_tokens > mt:
            # As vLLM's SamplingParams refuse it.
            raise ApiError(
                400, f"min_tokens must be less than or equal to max_tokens={mt}, got {min_tokens}."
            )
        return SamplingRequest(
            request_id="",
            prompt_ids=prompt_ids,
            max_tokens=mt,
            temperature=float(temperature),
            seed=seed,
            stop=tuple(stop),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )

    def prompt_ids(self, prompt: Any) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            if any(not 0 <= t < tok.vocab_size for t in prompt):
                raise ApiError(400, f"token id out of vocabulary (size {tok.vocab_size})")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "the simulator serves one prompt per request")
        raise ApiError(400, "prompt must be a string, a list of token ids, or a batch of one")

    def chat_prompt(self, body: dict[str, Any]) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list")
        parsed: list[ChatMessage] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role")
            content = m.get("content", "")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (
                        isinstance(part, dict)
                        and part.get("type") == "text"
                        and isinstance(part.get("text"), str)
                    ):
                        raise ApiError(400, f"messages[{i}].content: only text parts are served")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or text parts")
            parsed.append(ChatMessage(m["role"], content))
        cont = bool(body.get("continue_final_message", False))
        add_gen = bool(body.get("add_generation_prompt", True))
        if cont and add_gen and "add_generation_prompt" in body:
            raise ApiError(
                400, "continue_final_message and add_generation_prompt cannot both be true"
            )
        if cont and parsed[-1].role != "assistant":
            raise ApiError(400, "continue_final_message needs an assistant message last")
        text = apply_chat_template(
            parsed, add_generation_prompt=add_gen and not cont, continue_final_message=cont
        )
        return self.engine.tokenizer.encode(text)

    def request_id(self, request: web.Request, body: dict[str, Any]) -> str:
        field = self.facts.request_id_field
        rid = body.get(field) if field else None
        if rid is not None and not isinstance(rid, str):
            raise ApiError(400, f"{field} must be a string")
        return rid or request.headers.get("X-Request-Id") or self.engine.new_request_id()

    # -- OpenAI routes ---------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.opts.name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": self.opts.dialect,
                        "root": self.opts.model,
                        "parent": None,
                        "max_model_len": self.opts.max_model_len,
                        "permission": [
                            {
                                "id": f"modelperm-{self.engine.new_request_id()[:16]}",
                                "object": "model_permission",
                                "created": int(time.time()),
                                "allow_create_engine": False,
                                "allow_sampling": True,
                                "allow_logprobs": True,
                                "allow_search_indices": False,
                                "allow_view": True,
                                "allow_fine_tuning": False,
                                "organization": "*",
                                "group": None,
                                "is_blocking": False,
                            }
                        ],
                    }
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    def check_fields(self, path: str, body: dict[str, Any]) -> None:
        """Engines whose request models forbid unknown fields (trtllm-serve) answer 400."""
        known = self.facts.request_fields.get(path)
        if known is None:
            return
        extra = sorted(set(body) - known)
        so = body.get("stream_options")
        if isinstance(so, dict):
            allowed = self.facts.request_fields.get("stream_options", frozenset())
            extra += [f"stream_options.{k}" for k in sorted(set(so) - allowed)]
        if extra:
            raise ApiError(400, f"{extra[0]}: Extra inputs are not permitted")

    def check_logprobs(self, body: dict[str, Any], *, chat: bool) -> None:
        """vLLM's checks of the logprob fields, in its words."""
        fields = ("prompt_logprobs", "top_logprobs") if chat else ("prompt_logprobs", "logprobs")
        for name in fields:
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ApiError(400, f"`{name}` must be an integer.", param=name)
            if value is not None and value < 0 and value != -1:
                raise ApiError(400, f"`{name}` must be a positive value or -1.", param=name)
        pl = body.get("prompt_logprobs")
        if pl is not None and body.get("stream") and (pl > 0 or pl == -1):
            raise ApiError(
                400,
                "`prompt_logprobs` are not available when `stream=True`. "
                "(parameter=prompt_logprobs)",
                param="prompt_logprobs",
            )
        if chat:
            top = body.get("top_logprobs")
            if top is not None and (top == -1 or top > 0) and not body.get("logprobs"):
                raise ApiError(
                    400,
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                    param="top_logprobs",
                )
        elif body.get("suffix") is not None:
            # The simulated model has no fill-in-the-middle rendering (nor has the tiny
            # model the real vLLM is checked with).
            raise ApiError(
                400,
                "suffix is only supported for models with FIM completion rendering",
                param="suffix",
            )

    async def _openai(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self.read_json(request)
        self.check_fields(request.path, body)
        self.check_model(body)
        self.check_serving()
        self.check_logprobs(body, chat=chat)
        if chat:
            ids = self.chat_prompt(body)
            sreq = self.sampling(body, ids, default_max=None)
        else:
            if "prompt" not in body:
                raise ApiError(400, "prompt is required")
            ids = self.prompt_ids(body["prompt"])
            sreq = self.sampling(body, ids, default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
            sreq.prompt_is_ids = isinstance(body["prompt"], list)
        rid = self.request_id(request, body)
        sreq.request_id = ("chatcmpl-" if chat else "cmpl-") + rid
        with_ids = self.facts.openai_token_ids and bool(body.get("return_token_ids"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false")
        shape = _OpenAIShape(sreq.request_id, self.opts.name, chat, with_ids, ids)
        shape.sampling_extras(body, self.engine.tokenizer)
        if chat:
            shape.answer_mode(body, self.opts)
        # n > 1: each choice a request of its own (vLLM's child requests), seeded seed + i.
        n = body.get("n") or 1
        sreqs = [sreq]
        for i in range(1, n):
            seed = None if sreq.seed is None else sreq.seed + i
            sreqs.append(dataclasses.replace(sreq, request_id=f"{i}_{sreq.request_id}",
                                             seed=seed, abort_event=asyncio.Event()))  # fmt: skip
        if n > 1:
            sreq.request_id = f"0_{sreq.request_id}"
        if not stream:
            answers = [[t async for t in self.engine.generate(r)] for r in sreqs]
            return web.json_response(shape.full_choices(answers))
        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        shape.include_usage = include_usage
        # Usage in every chunk: the running count of tokens (vLLM's extension).
        shape.continuous = isinstance(opts, dict) and bool(opts.get("continuous_usage_stats"))
        resp = await self._sse_start(request)
        total = 0
        try:
            if chat:
                for i in range(n):
                    await self._send(resp, shape.role_chunk(i))
                if shape.echo:
                    for i in range(n):
                        await self._send(resp, shape.echo_chunk(i))
            async with contextlib.AsyncExitStack() as stack:
                # The choices advance together, a token each in turn (as vLLM's child
                # requests, batched, do).
                gens = [
                    await stack.enter_async_context(contextlib.aclosing(self.engine.generate(r)))
                    for r in sreqs
                ]
                counts = [0] * n
                batches: list[list[Token]] = [[] for _ in range(n)]  # (--stream-interval)
                running = list(range(n))
                while running:
                    for i in list(running):
                        try:
                            tok = await anext(gens[i])
                        except StopAsyncIteration:
                            running.remove(i)
                            continue
                        if self.engine.malformed_due():
                            await resp.write(b'data: {"id": "garbage", "choices": [{"tex\n\n')
                            return resp
                        if self.engine.endless_due():
                            await self._endless_event(resp, b'data: {"choices": [{"text": "')
                            return resp
                        counts[i] += 1
                        batches[i].append(tok)
                        if len(batches[i]) >= self.opts.stream_interval or tok.finish_reason:
                            await self._send(resp, shape.chunk(batches[i], counts[i], i))
                            batches[i] = []
                total = sum(counts)
            if include_usage:
                await self._send(resp, shape.usage_chunk(total))
            await resp.write(b"data: [DONE]\n\n")
        except EngineCoreDead as e:
            # vLLM's API server outlives its engine core: the stream gets the error in-band.
            with contextlib.suppress(ConnectionResetError):
                err = {"error": {"message": str(e), "type": "InternalServerError", "code": 500}}
                await self._send(resp, err)
                await resp.write(b"data: [DONE]\n\n")
        except RequestAborted:
            # Aborted by the engine itself (a /sleep in mode "abort"): vLLM ends the stream
            # properly, with finish_reason "abort" and [DONE].
            with contextlib.suppress(ConnectionResetError):
                await self._send(resp, shape.abort_chunk())
                await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client went away; the generator logged the abort
        return resp

    async def _sse_start(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        return resp

    async def _endless_event(self, resp: web.StreamResponse, start: bytes) -> None:
        """An event line that never ends (the endless_event faults): its start, then bytes
        as fast as the client takes them, or 1 KiB per ``endless_event_pace`` seconds,
        until it hangs up (or 1 GiB has gone, to end somewhere)."""
        pace = self.opts.faults.endless_event_pace
        piece = b"x" * (1024 if pace else 65536)
        with contextlib.suppress(ConnectionError):
            await resp.write(start)
            for _ in range((1 << 30) // len(piece)):
                await resp.write(piece)
                if pace:
                    await asyncio.sleep(pace)

    async def _send(self, resp: web.StreamResponse, obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    # -- vLLM dev routes ---------------------------------------------------------------
    async def vllm_sleep(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return self.error(400, f"level must be 1 or 2, not {level!r}")
        # What becomes of requests in flight: "abort" (vLLM's default) ends them with
        # finish_reason "abort"; "wait" lets them finish first; "keep" pauses them until the
        # wake, when they go on.
        mode = request.query.get("mode", "abort")
        if mode not in ("abort", "wait", "keep"):
            return self.error(400, f"mode must be abort, wait or keep, not {mode!r}")
        if mode == "abort":
            for r in list(self.engine.active.values()):
                r.abort_event.set()
        if mode == "keep":
            self.engine.unpaused.clear()
        else:
            await self.engine.idle.wait()
        if not self.engine.sleeping:
            tags = ("kv_cache",) if level == "1" else ("weights", "kv_cache")
            await self.engine.release(tags)
        return web.Response(status=200)

    async def vllm_wake(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        tags = request.query.getall("tags", [])
        bad = [t for t in tags if t not in ("weights", "kv_cache")]
        if bad:
            return self.error(400, f"unknown tags {bad}; use weights or kv_cache")
        todo = [t for t in (tags or ["weights", "kv_cache"]) if t in self.engine.released]
        try:
            await self.engine.resume(todo)
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        self.engine.wakes_by_route += 1
        return web.Response(status=200)

    # -- Dynamo GMS worker (vLLM-based) -------------------------------------------------
    async def gms_sleep(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        body = await self.read_json(request) if request.can_read_body else {}
        level = body.get("level", 1)
        if level not in (1, 2):
            return self.error(400, f"level must be 1 or 2, not {level!r}")
        if not self.engine.sleeping:
            await self.engine.release(("kv_cache",) if level == 1 else ("weights", "kv_cache"))
        return web.json_response({"status": "ok", "message": f"sleeping (level {level})"})

    async def gms_wake(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        body = await self.read_json(request) if request.can_read_body else {}
        tags = body.get("tags") or ["weights", "kv_cache"]
        if not isinstance(tags, list) or any(t not in ("weights", "kv_cache") for t in tags):
            return self.error(400, "tags must be a list of 'weights' and 'kv_cache'")
        try:
            await self.engine.resume([t for t in tags if t in self.engine.released])
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        self.engine.wakes_by_route += 1
        return web.json_response({"status": "ok", "message": "awake"})

    async def vllm_is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.engine.sleeping})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        if "messages" in body:
            ids = self.chat_prompt(body)
        elif "prompt" in body:
            ids = self.prompt_ids(body["prompt"])
        else:
            raise ApiError(400, "give prompt or messages")
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.opts.max_model_len,
                "tokens": ids,
                "token_strs": None,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        toks = body.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise ApiError(400, "tokens must be a list of integers")
        try:
            return web.json_response({"prompt": self.engine.tokenizer.decode(toks)})
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    async def embeddings(self, request: web.Request) -> web.Response:
        """vLLM's ``/v1/embeddings``: one normalised vector per input, the same for the
        same tokens on every engine (a function of the ids alone), in vLLM's shape."""
        body = await self.read_json(request)
        self.check_model(body)
        self.check_serving()
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "input must be a string, a list of strings or of token ids")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'")
        if body.get("dimensions") is not None:
            # As vLLM answers for a model without Matryoshka representations.
            raise ApiError(
                400,
                f'Model "{self.opts.name}" does not support matryoshka representation, '
                "changing output dimensions will lead to poor results.",
            )
        data: list[dict[str, Any]] = []
        total = 0
        for i, one in enumerate(inputs):
            ids = self.prompt_ids(one)
            if len(ids) > self.opts.max_model_len:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {self.opts.max_model_len} "
                    f"tokens. However, you requested {len(ids)} tokens in the input for "
                    "embedding generation. Please reduce the length of the input.",
                )
            total += len(ids)
            vec = embedding_of(ids)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                if fmt == "base64"
                else vec
            )
            data.append({"index": i, "object": "embedding", "embedding": encoded})
        return web.json_response(
            {
                "id": f"embd-{self.engine.new_request_id()}",
                "object": "list",
                "created": int(time.time()),
                "model": self.opts.name,
                "data": data,
                "usage": {
                    "prompt_tokens": total,
                    "total_tokens": total,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``/v1/responses`` (the Responses API) for a plain text answer: whole, or
        streamed as typed events (``event: <type>`` and ``data:`` lines, numbered by
        ``sequence_number``, no ``[DONE]``), as vLLM's simple (non-harmony) path sends it."""
        body = await self.read_json(request)
        self.check_model(body)
        self.check_serving()
        ids = self.chat_prompt({"messages": _responses_messages(body)})
        mt = body.get("max_output_tokens")
        sreq = self.sampling({**body, "max_tokens": mt}, ids, default_max=None)
        rid = body.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise ApiError(400, "request_id must be a string")
        sreq.request_id = f"resp_{rid or self.engine.new_request_id()}"
        shape = _ResponsesShape(sreq.request_id, self.opts.name, body, sreq.max_tokens, len(ids))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false")
        if not stream:
            whole = [t async for t in self.engine.generate(sreq)]
            return web.json_response(shape.response(whole, final=True))
        resp = await self._sse_start(request)
        toks: list[Token] = []
        try:
            async with contextlib.aclosing(self.engine.generate(sreq)) as gen:
                for event in shape.opening():
                    await self._send_typed(resp, event)
                async for tok in gen:
                    toks.append(tok)
                    if tok.text:
                        await self._send_typed(resp, shape.delta(tok.text))
            for event in shape.closing(toks):
                await self._send_typed(resp, event)
        except EngineCoreDead as e:
            with contextlib.suppress(ConnectionResetError):
                await self._send_typed(resp, shape.error(str(e)))
        except ConnectionResetError:
            pass
        return resp

    async def _send_typed(self, resp: web.StreamResponse, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":"))
        await resp.write(f"event: {event['type']}\ndata: {data}\n\n".encode())

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    # -- health and metrics ------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.opts.faults.gpu_lost:
            await asyncio.Event().wait()  # the health check's CUDA call never returns
        if self.opts.faults.slow_health:
            await asyncio.sleep(self.opts.faults.slow_health)
        if self.engine.core_dead.is_set():
            return web.Response(status=503)
        if self.opts.faults.fail_health or not self.engine.loaded.is_set():
            return web.Response(status=503)
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.opts.faults.fail_health or not self.engine.loaded.is_set():
            return web.Response(status=503)
        if self.engine.sleeping:
            return web.Response(status=503, text="memory released")
        sreq = SamplingRequest(f"HEALTH_CHECK_{self.engine.new_request_id()}", [1], 1, 0.0)
        async for _ in self.engine.generate(sreq):  # hangs, like the real one, when wedged
            pass
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.facts.metrics_format == "json":
            return web.json_response(
                [
                    {
                        "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
                        "iter": self.engine.counters["generation_tokens"],
                        "numActiveRequests": self.engine.running,
                        "numQueuedRequests": self.engine.waiting,
                        "gpuMemUsage": 0
                        if self.engine.sleeping
                        else int((self.opts.weights_gib + self.opts.kv_gib) * 1024**3),
                    }
                ]
            )
        if not self.opts.metrics_enabled:
            raise web.HTTPNotFound()
        m = self.facts.metrics
        assert m is not None
        e = self.engine
        lbl = f'model_name="{self.opts.name}"'
        prefix = m.running.split(":")[0]
        c = e.counters
        lines = [
            f"# TYPE {m.running} gauge",
            f"{m.running}{{{lbl}}} {float(e.running)}",
            f"# TYPE {m.waiting} gauge",
            f"{m.waiting}{{{lbl}}} {float(e.waiting)}",
        ]
        if m.kv_usage:
            lines += [f"# TYPE {m.kv_usage} gauge", f"{m.kv_usage}{{{lbl}}} {e.kv_usage()}"]
        lines += [
            f"# TYPE {prefix}:prompt_tokens_total counter",
            f"{prefix}:prompt_tokens_total{{{lbl}}} {float(c['prompt_tokens'])}",
            f"# TYPE {prefix}:generation_tokens_total counter",
            f"{prefix}:generation_tokens_total{{{lbl}}} {float(c['generation_tokens'])}",
        ]
        if prefix == "vllm":
            lines.append("# TYPE vllm:request_success_total counter")
            for reason in ("stop", "length", "abort"):
                lines.append(
                    f'vllm:request_success_total{{finished_reason="{reason}",{lbl}}} '
                    f"{float(c['finished_' + reason])}"
                )
        else:
            lines += [
                f"# TYPE {prefix}:num_aborted_requests_total counter",
                f"{prefix}:num_aborted_requests_total{{{lbl}}} {float(c['finished_abort'])}",
            ]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "simulated"})

    # -- SGLang native routes ----------------------------------------------------------
    async def sglang_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request, detail=True)
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise ApiError(
                400, "Either text or input_ids should be provided, not both.", native=True
            )
        if text is not None and not isinstance(text, str):
            raise ApiError(422, "text: Input should be a valid string", detail=True)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise ApiError(422, "sampling_params: Input should be a valid dictionary", detail=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "stream: Input should be a valid boolean", detail=True)
        self.check_serving()
        ids = self.prompt_ids(text if text is not None else input_ids)
        params = {
            "max_tokens": sp.get("max_new_tokens", 128),
            **{k: sp[k] for k in ("temperature", "stop", "ignore_eos") if k in sp},
        }
        if "sampling_seed" in sp:
            params["seed"] = sp["sampling_seed"]
        sreq = self.sampling(params, ids, default_max=128)
        sreq.prompt_is_ids = input_ids is not None
        rid = body.get("rid") or self.engine.new_request_id()
        if not isinstance(rid, str):
            raise ApiError(422, "rid: Input should be a valid string", detail=True)
        if any(r.request_id == rid for r in self.engine.active.values()):
            raise ApiError(400, f"Duplicate request ID detected: {rid}", native=True)
        sreq.request_id = rid
        shape = _GenerateShape(rid, len(ids), incremental=self.opts.incremental_stream)
        if not stream:
            async for tok in self.engine.generate(sreq):
                shape.add(tok)
            return web.json_response(shape.event(final=True))
        resp = await self._sse_start(request)
        try:
            async with contextlib.aclosing(self.engine.generate(sreq)) as gen:
                async for tok in gen:
                    if self.engine.malformed_due():
                        await resp.write(b'data: {"text": "garb\n\n')
                        return resp
                    if self.engine.endless_due():
                        await self._endless_event(resp, b'data: {"text": "')
                        return resp
                    shape.add(tok)
                    if len(shape.new_ids) >= self.opts.stream_interval or tok.finish_reason:
                        await self._send(resp, shape.event())
        except RequestAborted:
            shape.fin = {"type": "abort", "message": f"Abort request {rid}"}
            with contextlib.suppress(ConnectionResetError):
                await self._send(resp, shape.event())
        except ConnectionResetError:
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def sglang_abort(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, detail=True)
        if body.get("abort_all"):
            targets = list(self.engine.active.values())
        else:
            rid = body.get("rid")
            if not isinstance(rid, str):
                raise ApiError(422, "rid: Input should be a valid string", detail=True)
            targets = [r for r in self.engine.active.values() if r.request_id == rid]
        for r in targets:
            r.abort_event.set()
        return web.Response(status=200)

    async def sglang_release(self, request: web.Request) -> web.Response:
        tags = await self._sglang_tags(request)
        # Releasing what is already released is a no-op (unconfirmed against SGLang).
        todo = [t for t in tags if t not in self.engine.released]
        if todo:
            await self.engine.release(todo)
        return web.json_response({"success": True, "message": "released"})

    async def sglang_resume(self, request: web.Request) -> web.Response:
        tags = await self._sglang_tags(request)
        missing = [t for t in tags if t not in self.engine.released]
        if missing:
            return self.error(400, f"cannot resume tags {missing}: they were not released")
        try:
            await self.engine.resume(tags)
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        return web.json_response({"success": True, "message": "resumed"})

    async def _sglang_tags(self, request: web.Request) -> list[str]:
        if not self.opts.sleep_enabled:
            raise ApiError(400, "memory saver is not enabled; start with --enable-memory-saver")
        body = await self.read_json(request) if request.can_read_body else {}
        tags = body.get("tags") or ["weights", "kv_cache"]
        if not isinstance(tags, list) or any(t not in ("weights", "kv_cache") for t in tags):
            raise ApiError(400, "tags must be a list of 'weights' and 'kv_cache'")
        return list(dict.fromkeys(tags))

    async def sglang_server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.opts.model,
                "served_model_name": self.opts.name,
                "max_running_requests": self.opts.max_num_seqs,
                "context_length": self.opts.max_model_len,
                "enable_memory_saver": self.opts.sleep_enabled,
                "incremental_streaming_output": self.opts.incremental_stream,
                "version": "simulated",
            }
        )

    async def sglang_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.opts.model, "is_generation": True})

    # -- simulator control (not part of any engine's API) ------------------------------
    async def sim_prefill(self, request: web.Request) -> web.Response:
        """A decode engine's remote prefill (the KV transfer is simulated by the reply)."""
        body = await self.read_json(request)
        rid, n = body.get("request_id"), body.get("prompt_tokens")
        if not isinstance(rid, str) or not isinstance(n, int) or n < 0:
            return self.error(400, "request_id (string) and prompt_tokens (int >= 0) required")
        await self.engine.prefill(rid, n)
        return web.json_response({"request_id": rid, "prefilled_tokens": n})

    async def sim_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.state())

    async def sim_faults(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        try:
            self.engine.set_faults(body)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        return web.json_response(self.engine.state()["faults"])


class _GenerateShape:
    """SGLang ``/generate`` events: cumulative text and ids unless incremental output is on."""

    def __init__(self, rid: str, prompt_tokens: int, *, incremental: bool) -> None:
        self.rid, self.prompt_tokens, self.incremental = rid, prompt_tokens, incremental
        self.ids: list[int] = []
        self.text = ""
        self.new_ids: list[int] = []
        self.new_text = ""
        self.fin: dict[str, Any] | None = None

    def add(self, tok: Token) -> None:
        self.ids.append(tok.id)
        self.text += tok.text
        if tok.answer_length is not None:
            self.text = self.text[: tok.answer_length]  # trimmed at the stop string
        self.new_ids.append(tok.id)
        self.new_text += tok.text
        if tok.finish_reason == "length":
            self.fin = {"type": "length", "length": len(self.ids)}
        elif tok.finish_reason == "stop":
            self.fin = {"type": "stop", "matched": tok.stop_reason or tok.id}

    def event(self, *, final: bool = False) -> dict[str, Any]:
        """The event for what was added since the last one (all of it when cumulative)."""
        incr = self.incremental and not final
        new_ids, new_text = self.new_ids, self.new_text
        self.new_ids, self.new_text = [], ""
        return {
            "text": new_text if incr else self.text,
            "output_ids": new_ids if incr else list(self.ids),
            "meta_info": {
                "id": self.rid,
                "finish_reason": self.fin,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.ids),
                "cached_tokens": 0,
            },
            "index": 0,
        }


class _OpenAIShape:
    """Builds one request's OpenAI chunks and full responses (every choice of it)."""

    def __init__(self, rid: str, model: str, chat: bool, with_ids: bool, prompt: list[int]):
        self.rid, self.model, self.chat, self.with_ids = rid, model, chat, with_ids
        self.prompt = prompt
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.started: set[int] = set()  # the choices whose first chunk went
        self.continuous = False  # usage in every chunk
        self.include_usage = False  # a usage chunk at the end
        self.reasoning = 0  # tokens of reasoning_content each answer opens with
        self.reasoning_left = 0  # tokens still to go to reasoning_content
        self.tool: str | None = None  # the tool this answer calls
        self.tool_started = False
        self.choice = 0  # the choice being streamed
        # Logprobs: completions' ``logprobs`` or chat's ``top_logprobs`` (None: not asked);
        # prompt logprobs; an echo (text, and whether a completion echoes its ids).
        self.logprobs: int | None = None
        self.prompt_logprobs: int | None = None
        self.echo = ""
        self.echo_prompt = False
        self.offsets: dict[int, int] = {}  # completions: each choice's next text_offset
        self.tok: SimTokenizer | None = None

    def sampling_extras(self, body: dict[str, Any], tok: SimTokenizer) -> None:
        """Logprobs, prompt logprobs and echo, as vLLM reads them."""
        self.tok = tok
        if self.chat:
            if body.get("logprobs"):
                self.logprobs = body.get("top_logprobs") or 0
        elif body.get("logprobs") is not None:
            self.logprobs = body["logprobs"]
        self.prompt_logprobs = body.get("prompt_logprobs")
        if not body.get("echo"):
            return
        if self.chat:
            # vLLM: an echo asks the prompt's logprobs as top_logprobs (a whole answer
            # returns them), and echoes the last message when its role is the answer's.
            if self.prompt_logprobs is None:
                self.prompt_logprobs = body.get("top_logprobs")
            msgs = body["messages"]
            role = "assistant" if body.get("add_generation_prompt", True) else msgs[-1]["role"]
            if msgs[-1].get("role") == role:
                content = msgs[-1].get("content") or ""
                if isinstance(content, list):
                    content = "\n".join(p.get("text", "") for p in content)
                self.echo = content
            return
        if self.prompt_logprobs is None:
            self.prompt_logprobs = self.logprobs
        self.echo_prompt = True
        # With token ids asked, vLLM echoes the ids and no text.
        self.echo = "" if body.get("return_token_ids") else tok.decode(self.prompt)

    def answer_mode(self, body: dict[str, Any], opts: SimOptions) -> None:
        """Reasoning first (a reasoning parser is on), or a tool call (tools were given,
        a tool parser is on, and tool_choice is not "none")."""
        if opts.reasoning_parser:
            self.reasoning = self.reasoning_left = REASONING_TOKENS
        tools = body.get("tools")
        if (
            opts.tool_parser
            and isinstance(tools, list)
            and tools
            and body.get("tool_choice") != "none"
        ):
            fn = tools[0].get("function") if isinstance(tools[0], dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                self.tool = fn["name"]

    # -- logprobs --------------------------------------------------------------------
    def _piece(self, tid: int) -> str:
        assert self.tok is not None
        return self.tok.piece(tid) or self.tok.decode([tid])

    def _positions(self, toks: list[Token]) -> list[tuple[str, float | None, list[Any]]]:
        """Each token's text, logprob and alternatives (the chosen token first)."""
        k = self.logprobs or 0
        out: list[tuple[str, float | None, list[Any]]] = []
        for t in toks:
            alts = token_logprobs(t.context, t.id, max(k, 1))
            # (the chosen token named as its entry is: a byte's text may be "" so far)
            named = [(t.piece, alts[0][1])] + [(self._piece(a), v) for a, v in alts[1:]]
            out.append((t.piece, alts[0][1], named))
        return out

    def _prompt_positions(self) -> list[tuple[str, float | None, list[Any]]]:
        """The prompt's tokens as logprob positions (the first has no logprob)."""
        k = self.prompt_logprobs if self.prompt_logprobs is not None else (self.logprobs or 0)
        out: list[tuple[str, float | None, list[Any]]] = []
        for i, (tid, ctx) in enumerate(zip(self.prompt, prompt_contexts(self.prompt), strict=True)):
            if i == 0:
                out.append((self._piece(tid), None, []))
                continue
            alts = token_logprobs(ctx, tid, k + 1)
            out.append((self._piece(tid), alts[0][1], [(self._piece(a), v) for a, v in alts]))
        return out

    def _completion_logprobs(
        self, positions: list[tuple[str, float | None, list[Any]]], index: int
    ) -> dict[str, Any]:
        k = self.logprobs or 0
        offset = self.offsets.get(index, 0)
        out: dict[str, list[Any]] = {
            "text_offset": [],
            "token_logprobs": [],
            "tokens": [],
            "top_logprobs": [],
        }
        for token, logprob, alts in positions:
            out["text_offset"].append(offset)
            out["token_logprobs"].append(logprob)
            out["tokens"].append(token)
            # (vLLM keeps alternatives up to index k, in a map by their text)
            out["top_logprobs"].append(dict(alts[: k + 1]) if logprob is not None else None)
            offset += len(token)
        self.offsets[index] = offset
        return out

    def _chat_logprobs(self, positions: list[tuple[str, float | None, list[Any]]]) -> Any:
        k = self.logprobs or 0
        content = []
        for token, logprob, alts in positions:
            content.append(
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode("utf-8", "replace")),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                        for t, v in alts[:k]
                    ],
                }
            )
        return {"content": content}

    def _prompt_logprobs_field(self) -> list[Any] | None:
        """vLLM's ``prompt_logprobs`` of a whole answer: per prompt token, a map from token
        ids to their logprob, rank and text (the prompt's own token first)."""
        if self.prompt_logprobs is None:
            return None
        k = self.prompt_logprobs
        out: list[Any] = [None]
        contexts = prompt_contexts(self.prompt)
        for tid, ctx in list(zip(self.prompt, contexts, strict=True))[1:]:
            alts = token_logprobs(ctx, tid, k + 1)
            entry = {}
            for rank, (a, v) in enumerate(alts):
                r = 1 + ctx % 4000 if rank == 0 else rank
                entry[str(a)] = {"logprob": v, "rank": r, "decoded_token": self._piece(a)}
            out.append(entry)
        return out

    # -- chunks ----------------------------------------------------------------------
    def _delta(self, text: str, n_toks: int, last: bool) -> dict[str, Any]:
        if self.reasoning_left > 0:
            self.reasoning_left -= n_toks
            return {"reasoning_content": text}
        if self.tool is None:
            return {"content": text}
        call: dict[str, Any] = {"index": 0}
        args = json.dumps(text)[1:-1]
        if not self.tool_started:
            self.tool_started = True
            call.update(id=f"chatcmpl-tool-{self.rid[-8:]}", type="function")
            call["function"] = {"name": self.tool, "arguments": '{"text": "' + args}
        else:
            call["function"] = {"arguments": args}
        if last:
            call["function"]["arguments"] += '"}'
        return {"tool_calls": [call]}

    def _head(self) -> dict[str, Any]:
        return {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model}

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        d = self._head()
        d["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        if self.with_ids:
            d["prompt_token_ids"] = self.prompt
            self.started.add(index)
        if self.continuous:
            d["usage"] = self.usage(0)
        return d

    def echo_chunk(self, index: int = 0) -> dict[str, Any]:
        """A chat answer's echo of the last message (after the role chunks)."""
        d = self._head()
        d["choices"] = [
            {"index": index, "delta": {"content": self.echo}, "logprobs": None,
             "finish_reason": None}
        ]  # fmt: skip
        if self.continuous:
            d["usage"] = self.usage(0)
        return d

    def chunk(self, toks: list[Token], n: int, index: int = 0) -> dict[str, Any]:
        """One event for ``toks`` (one token, or several with a stream interval) of choice
        ``index``; ``n``: the tokens that choice generated so far."""
        if index != self.choice:  # the next choice begins: its own answer mode
            self.choice, self.reasoning_left, self.tool_started = index, self.reasoning, False
        d = self._head()
        ch: dict[str, Any] = {"index": index}
        text = "".join(t.text for t in toks)
        finish = toks[-1].finish_reason
        first = index not in self.started
        positions = self._positions(toks) if self.logprobs is not None else []
        if self.chat:
            ch["delta"] = self._delta(text, len(toks), finish is not None)
            if finish and self.tool is not None and finish != "abort":
                finish = "tool_calls"
        else:
            if first and self.echo_prompt:
                text = self.echo + text
                positions = self._prompt_positions() + positions if positions else []
            ch["text"] = text
        if self.logprobs is None or finish == "abort":
            ch["logprobs"] = None
        elif self.chat:
            ch["logprobs"] = self._chat_logprobs(positions)
        else:
            ch["logprobs"] = self._completion_logprobs(positions, index)
        ch["finish_reason"] = finish
        ch["stop_reason"] = toks[-1].stop_reason
        if not self.chat and first and (self.with_ids or self.echo_prompt):
            ch["prompt_token_ids"] = self.prompt  # (vLLM: with an echo, asked or not)
        if self.with_ids:
            ch["token_ids"] = [t.id for t in toks]
            if first and self.chat:
                ch["prompt_token_ids"] = self.prompt
        self.started.add(index)
        d["choices"] = [ch]
        if self.continuous:
            d["usage"] = self.usage(n)
        if finish and not self.include_usage:  # (vLLM: else on the usage chunk)
            d["system_fingerprint"] = SYSTEM_FINGERPRINT
        return d

    def abort_chunk(self) -> dict[str, Any]:
        """The last chunk of a request the engine aborted: no text, no token."""
        d = self.chunk([Token(0, "", "abort")], 0, self.choice)
        d.pop("usage", None)
        if self.with_ids:
            d["choices"][0]["token_ids"] = []
        return d

    def usage(self, n: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.prompt) + n,
        }

    def usage_chunk(self, n: int) -> dict[str, Any]:
        d = self._head()
        d["choices"] = []
        d["usage"] = self.usage(n)
        d["system_fingerprint"] = SYSTEM_FINGERPRINT
        return d

    def full(self, toks: list[Token]) -> dict[str, Any]:
        return self.full_choices([toks])

    def _choice(self, toks: list[Token], index: int) -> dict[str, Any]:
        self.reasoning_left = self.reasoning
        last = toks[-1] if toks else None
        reasoning = "".join(t.text for t in toks[: self.reasoning_left])
        text = "".join(t.text for t in toks[self.reasoning_left :])
        ch: dict[str, Any] = {
            "index": index,
            "logprobs": None,
            "finish_reason": last.finish_reason if last else "length",
            "stop_reason": last.stop_reason if last else None,
        }
        positions = self._positions(toks) if self.logprobs is not None else []
        if self.chat:
            ch["message"] = {"role": "assistant", "content": self.echo + text}
            if self.reasoning_left:
                ch["message"]["reasoning_content"] = reasoning
            if self.tool is not None:
                ch["message"]["content"] = None
                ch["message"]["tool_calls"] = [
                    {
                        "id": f"chatcmpl-tool-{self.rid[-8:]}",
                        "type": "function",
                        "function": {"name": self.tool, "arguments": json.dumps({"text": text})},
                    }
                ]
                ch["finish_reason"] = "tool_calls"
            if self.logprobs is not None:
                ch["logprobs"] = self._chat_logprobs(positions)
        else:
            ch["text"] = self.echo + text
            if self.logprobs is not None:
                if self.echo_prompt:
                    positions = self._prompt_positions() + positions
                ch["logprobs"] = self._completion_logprobs(positions, index)
            ch["prompt_logprobs"] = self._prompt_logprobs_field()
        if self.with_ids:
            ch["token_ids"] = [t.id for t in toks]
            if not self.chat:
                ch["prompt_token_ids"] = self.prompt
        return ch

    def full_choices(self, answers: list[list[Token]]) -> dict[str, Any]:
        """The whole answer: one choice per generated list of tokens."""
        d: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(toks, i) for i, toks in enumerate(answers)],
            "usage": self.usage(sum(len(toks) for toks in answers)),
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if self.chat:
            d["prompt_logprobs"] = self._prompt_logprobs_field()
            if self.with_ids:
                d["prompt_token_ids"] = self.prompt
        return d


def embedding_of(ids: list[int]) -> list[float]:
    """A unit vector that depends on the token ids alone (so every engine agrees)."""
    vec = [0.0] * EMBEDDING_SIZE
    for pos, tok in enumerate(ids):
        for j in range(EMBEDDING_SIZE):
            vec[j] += math.sin((tok + 1) * (j + 1) * 0.618 + pos * 0.1)
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses API request stands for: its ``instructions`` as a
    system message, then its ``input`` (a string, or messages whose content is a string or
    ``input_text`` parts)."""
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*out, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise ApiError(400, "input must be a string or a non-empty list of messages")
    for i, m in enumerate(given):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"input[{i}] must be a message with a role")
        content = m.get("content")
        if isinstance(content, list):
            texts = [
                p.get("text")
                for p in content
                if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
            ]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"input[{i}].content: only text parts are served")
            content = "".join(texts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise ApiError(400, f"input[{i}].content must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


class _ResponsesShape:
    """One Responses API answer: the response object and its stream's typed events."""

    def __init__(
        self, rid: str, model: str, body: dict[str, Any], max_tokens: int, prompt_tokens: int
    ) -> None:
        self.rid, self.model, self.body = rid, model, body
        self.max_tokens, self.prompt_tokens = max_tokens, prompt_tokens
        self.created = int(time.time())
        self.item_id = f"msg_{rid[5:]}"
        self.seq = -1
        self.text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]
            if status == "completed"
            else []
        )
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def response(self, toks: list[Token] | None, *, final: bool) -> dict[str, Any]:
        b = self.body
        status = "in_progress"
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        if final and toks is not None:
            last = toks[-1].finish_reason if toks else "length"
            status = "incomplete" if last == "length" else "completed"
            text = "".join(t.text for t in toks)
            output = [self._message(text, "completed")]
            usage = {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": 0,
                    "cache_write_tokens": 0,
                    "input_tokens_per_turn": [],
                    "cached_tokens_per_turn": [],
                },
                "output_tokens": len(toks),
                "output_tokens_details": {
                    "reasoning_tokens": 0,
                    "tool_output_tokens": 0,
                    "output_tokens_per_turn": [],
                    "tool_output_tokens_per_turn": [],
                },
                "total_tokens": self.prompt_tokens + len(toks),
            }
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.rid,
            "created_at": self.created,
            "incomplete_details": incomplete,
            "instructions": b.get("instructions"),
            "metadata": b.get("metadata"),
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "temperature": float(b.get("temperature", 1.0)),
            "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools") or [],
            "top_p": float(b.get("top_p", 1.0)),
            "background": False,
            "max_output_tokens": self.max_tokens,
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": b.get("top_logprobs", 0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "presence_penalty": float(b.get("presence_penalty", 0.0)),
            "frequency_penalty": float(b.get("frequency_penalty", 0.0)),
        }

    def opening(self) -> list[dict[str, Any]]:
        initial = self.response(None, final=False)
        return [
            self._event("response.created", response=initial),
            self._event("response.in_progress", response=initial),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("", "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                output_index=0,
                item_id=self.item_id,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def delta(self, text: str) -> dict[str, Any]:
        self.text += text
        return self._event(
            "response.output_text.delta",
            content_index=0,
            output_index=0,
            item_id=self.item_id,
            delta=text,
            logprobs=[],
        )

    def closing(self, toks: list[Token]) -> list[dict[str, Any]]:
        text = "".join(t.text for t in toks)
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        return [
            self._event(
                "response.output_text.done",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
            self._event(
                "response.output_item.done",
                output_index=0,
                item=self._message(text, "completed"),
            ),
            self._event("response.completed", response=self.response(toks, final=True)),
        ]

    def error(self, message: str) -> dict[str, Any]:
        return self._event("error", code="InternalServerError", message=message, param=None)


def build_app(api: Api) -> web.Application:
    facts = api.facts
    d = facts.base

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api.draining:
            return api.error(503, "server is shutting down")
        try:
            return await handler(request)
        except ApiError as e:
            if e.detail:
                return web.json_response(
                    {"detail": [{"type": "value_error", "loc": ["body"], "msg": e.message}]},
                    status=422 if e.status == 400 else e.status,
                )
            if e.native:
                return web.json_response({"error": {"message": e.message}}, status=e.status)
            return api.error(e.status, e.message, e.param)
        except EngineSleeping as e:
            return api.error(503, str(e))
        except EngineCoreDead as e:
            return api.error(500, str(e))
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        except (ConnectionResetError, RequestAborted):
            raise web.HTTPBadRequest() from None  # the client is gone; nothing to answer

    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    r = app.router
    r.add_get(facts.health_path, api.health)
    r.add_get("/v1/models", api.models)
    r.add_post("/v1/completions", api.completions)
    r.add_post("/v1/chat/completions", api.chat)
    r.add_get("/metrics", api.metrics)
    r.add_get("/sim/state", api.sim_state)
    r.add_post("/sim/faults", api.sim_faults)
    if api.opts.disagg == "prefill":
        r.add_post("/sim/prefill", api.sim_prefill)
    if d == "vllm":
        served = {
            "/tokenize": api.tokenize,
            "/detokenize": api.detokenize,
            "/v1/embeddings": api.embeddings,
            "/v1/responses": api.responses,
        }
        for path in facts.other_routes:  # the dialect's own list (plugins/vllm.py)
            if path in served:
                r.add_post(path, served[path])
        r.add_get("/version", api.version)
        if facts.family and api.opts.gms_control_routes:  # the standalone GMS recipe
            r.add_post("/engine/control/sleep", api.gms_sleep)
            r.add_post("/engine/control/wake_up", api.gms_wake)
        elif facts.family:  # a Dynamo worker: control routes under /engine/, JSON bodies
            r.add_post(facts.sleep_path or "/engine/sleep", api.gms_sleep)
            r.add_post(facts.wake_path or "/engine/wake_up", api.gms_wake)
            r.add_post("/engine/wake", api.gms_wake)  # the route's older name
        for env, val in facts.sleep_env.items():
            # vLLM mounts its sleep and cache routes only in development mode.
            if os.environ.get(env) == val:
                r.add_post(facts.sleep_path or "/sleep", api.vllm_sleep)
                r.add_post(facts.wake_path or "/wake_up", api.vllm_wake)
                r.add_get(facts.is_sleeping_path or "/is_sleeping", api.vllm_is_sleeping)
                r.add_post("/reset_prefix_cache", api.ok)
    elif d == "sglang":
        r.add_get(facts.deep_health_path or "/health_generate", api.health_generate)
        r.add_post("/generate", api.sglang_generate)
        r.add_post(facts.abort_path or "/abort_request", api.sglang_abort)
        r.add_post(facts.sleep_path or "/release_memory_occupation", api.sglang_release)
        r.add_post(facts.wake_path or "/resume_memory_occupation", api.sglang_resume)
        r.add_get("/get_server_info", api.sglang_server_info)
        r.add_get("/server_info", api.sglang_server_info)
        r.add_get("/get_model_info", api.sglang_model_info)
        r.add_post("/flush_cache", api.ok)
    else:
        r.add_get("/version", api.version)
    return app


async def serve(opts: SimOptions) -> int:
    """Run one simulated engine until SIGTERM/SIGINT; returns the exit status."""
    log = SimLog(opts.dialect)
    engine = SimEngine(opts, log)
    api = Api(engine)
    runner = web.AppRunner(
        build_app(api), handler_cancellation=True, shutdown_timeout=1.0, access_log=None
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    site = web.TCPSite(runner, opts.host, opts.port, reuse_address=True)
    # SGLang answers /health (503) while it loads; vLLM and trtllm-serve listen once loaded.
    early = dialect_facts(opts.dialect).base == "sglang"
    try:
        if early:
            await site.start()
            log.info(f"listening on http://{opts.host}:{opts.port} (loading)")
        load = asyncio.ensure_future(engine.load())
        done, _ = await asyncio.wait(
            [load, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if load not in done:
            load.cancel()
            return 0
        load.result()
        if not early:
            await site.start()
        log.info(f"Uvicorn running on http://{opts.host}:{opts.port}")
        await stop.wait()
        log.info("shutting down: no new requests; draining in-flight ones")
        api.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.idle.wait(), opts.drain_timeout)
        return 0
    except SimulatedOOM as e:
        log.error(f"{e} (while loading)")
        return 1
    except OSError as e:
        log.error(f"cannot listen on {opts.host}:{opts.port}: {e}")
        return 1
    finally:
        await runner.cleanup()
        await engine.shutdown()
