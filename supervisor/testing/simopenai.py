"""The OpenAI-compatible routes of a simulated engine: models, completions, chat, responses,
embeddings, tokenize and detokenize (vLLM's, SGLang's and ``trtllm-serve``'s alike)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import struct
import time
from typing import Any

from aiohttp import web

from supervisor.requests import COMPLETIONS_DEFAULT_MAX_TOKENS
from supervisor.testing.simchunks import OpenAIShape, embedding_of
from supervisor.testing.simengine import EngineCoreDead, RequestAborted, Token
from supervisor.testing.simrequest import ApiBase, ApiError
from supervisor.testing.simresponses import ResponsesShape, responses_messages


class OpenAIRoutes(ApiBase):
    """The OpenAI routes, in each dialect's shape (the facts in ``plugins/``)."""

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
        shape = OpenAIShape(sreq.request_id, self.opts.name, chat, with_ids, ids)
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
        ids = self.chat_prompt({"messages": responses_messages(body)})
        mt = body.get("max_output_tokens")
        sreq = self.sampling({**body, "max_tokens": mt}, ids, default_max=None)
        rid = body.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise ApiError(400, "request_id must be a string")
        sreq.request_id = f"resp_{rid or self.engine.new_request_id()}"
        shape = ResponsesShape(sreq.request_id, self.opts.name, body, sreq.max_tokens, len(ids))
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
