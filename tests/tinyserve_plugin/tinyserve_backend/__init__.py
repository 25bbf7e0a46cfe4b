"""The failover-supervisor backend for tinyserve (``tinyserve_backend.server``).

tinyserve serves completions only (``serves_chat = False``), has one pause level
(``sleep_levels = (1,)``), returns no token ids (text continuation) and aborts a request
when its connection closes.
"""

from __future__ import annotations

import json

from supervisor.backends import Backend, BackendError, Dialect, EngineEndpoint, StreamDecoder
from supervisor.openai_shapes import (
    COMPLETIONS_PATH,
    OpenAIStreamDecoder,
    streamed_body,
    text_continuation,
)
from supervisor.requests import ClientRequest, Progress, UpstreamRequest

DIALECT = Dialect(
    name="tinyserve",
    program=("tinyserve",),
    default_port=8300,
    model_flag=None,  # the model is positional
    health_path="/healthz",
    sleep_flag="--enable-pause",
    sleep_path="/admin/pause",
    wake_path="/admin/resume",
    is_sleeping_path="/admin/state",
    abort_log="Aborted request {rid}.",
)


class TinyserveBackend(Backend):
    """tinyserve: pause/resume as sleep and wake; completions only; text continuation."""

    dialect = DIALECT
    continuation_mode = "text"
    serves_token_prompts = False  # string prompts only
    resumes_token_prompts = False
    serves_chat = False
    sleep_levels = (1,)

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level != 1:
            raise BackendError(f"tinyserve has one pause level, not {level}")
        await ep.call_ok("POST", "/admin/pause")

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        await ep.call_ok("POST", "/admin/resume")

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        body = await ep.call_ok("GET", "/admin/state")
        try:
            return bool(json.loads(body)["paused"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"/admin/state answered {body[:100]!r}") from e

    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        return False  # closing the connection aborts

    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        if req.kind == "chat":
            raise BackendError("tinyserve serves completions only")
        if not isinstance(req.body.get("prompt"), str):
            raise BackendError("tinyserve takes string prompts only")
        body = streamed_body(req)
        body.pop("stream_options", None)  # it counts its own tokens: one event per token
        return UpstreamRequest(COMPLETIONS_PATH, body, request_id, {"X-Request-Id": request_id})

    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        up = text_continuation(req, progress, request_id, rid_field=None)
        up.body.pop("stream_options", None)
        up.headers["X-Request-Id"] = request_id
        return up

    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        return OpenAIStreamDecoder()
