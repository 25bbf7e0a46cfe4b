"""A complete failover-supervisor backend in one file, for an imaginary engine, "exampled".

exampled speaks the OpenAI API, returns token ids when asked (``return_token_ids``), and has
sleep routes behind a flag (``POST /sleep?level=N``, ``POST /wake_up``, ``GET /is_sleeping``).
Those happen to be vLLM's shapes, so the simulator's ``vllm`` dialect stands in for it in
tests. See docs/plugin-authoring.md for a walk through every part.
"""

from __future__ import annotations

import json

from supervisor.backends import (
    Backend,
    BackendError,
    Dialect,
    EngineEndpoint,
    MetricNames,
    StreamDecoder,
)
from supervisor.openai_shapes import (
    OpenAIStreamDecoder,
    path_for,
    streamed_body,
    text_continuation,
    token_continuation,
)
from supervisor.requests import ClientRequest, Progress, UpstreamRequest

# 1. The engine's facts: how it is launched and what its HTTP API looks like.
DIALECT = Dialect(
    name="example",
    program=("exampled", "serve"),
    default_port=8000,
    model_flag=None,  # the model is the first positional argument
    sleep_flag="--enable-sleep-mode",
    sleep_env={"VLLM_SERVER_DEV_MODE": "1"},
    sleep_path="/sleep",
    wake_path="/wake_up",
    is_sleeping_path="/is_sleeping",
    metrics=MetricNames(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_usage="vllm:kv_cache_usage_perc",
    ),
    request_id_field="request_id",
    openai_token_ids=True,
    openai_error_shape="wrapped",
)


class ExampleBackend(Backend):
    """Backend for exampled."""

    dialect = DIALECT
    continuation_mode = "token_ids"

    # 2. Sleep and wake: release GPU memory while staying loaded, and take it back.
    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level not in (1, 2):
            raise BackendError(f"exampled sleep level must be 1 or 2, not {level}")
        await ep.call_ok("POST", "/sleep", params={"level": str(level)}, timeout_s=120)

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        # call_ok raises EngineOutOfMemory on a 5xx that says "out of memory": the
        # supervisor retries those for a bounded time.
        await ep.call_ok("POST", "/wake_up", timeout_s=120)

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        body = await ep.call_ok("GET", "/is_sleeping")
        try:
            return bool(json.loads(body)["is_sleeping"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"/is_sleeping answered {body[:100]!r}") from e

    # 3. Cancellation: exampled aborts a request when its connection closes.
    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        return False

    # 4. Requests: the first piece asks for token ids and carries our request id ...
    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        body = streamed_body(req)
        body["return_token_ids"] = True
        body["request_id"] = request_id
        return UpstreamRequest(path_for(req), body, request_id)

    # ... a short non-streaming one may be asked for whole (optional: None streams it) ...
    def whole_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        return self.first_request(req, request_id).as_whole()

    # ... and a broken stream resumes from prompt ids + emitted ids (exact), or text.
    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        up = token_continuation(req, progress, request_id, rid_field="request_id")
        if up is None:
            up = text_continuation(req, progress, request_id, rid_field="request_id")
        up.body["return_token_ids"] = True
        return up

    # 5. Stream parsing: OpenAI chunks, with token_ids read where present.
    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        return OpenAIStreamDecoder()
