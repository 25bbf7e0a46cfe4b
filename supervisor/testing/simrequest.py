"""The simulated engines' request side, shared by every route: body parsing, validation,
sampling parameters, errors in the dialect's own shape, and the event-stream writers.

Route handlers build on :class:`ApiBase` (:mod:`supervisor.testing.simopenai`,
:mod:`supervisor.testing.simnative`); :mod:`supervisor.testing.simhttp` mounts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from supervisor.testing.simengine import SamplingRequest, SimEngine
from supervisor.testing.simoptions import SimOptions, dialect_facts
from supervisor.testing.simtokenizer import ChatMessage, apply_chat_template

MAX_BODY = 32 * 1024 * 1024


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


class ApiBase:
    """What every route of a simulated engine reads: the engine, its options and dialect
    facts, and the request helpers."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.opts: SimOptions = engine.opts
        self.facts = dialect_facts(self.opts.dialect)
        self.draining = False

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

    async def _send_typed(self, resp: web.StreamResponse, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":"))
        await resp.write(f"event: {event['type']}\ndata: {data}\n\n".encode())
