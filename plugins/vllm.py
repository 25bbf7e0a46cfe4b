"""vLLM backend (``vllm serve MODEL``).

Continuation is token-exact: every piece asks for ``return_token_ids`` (vLLM >= 0.10.2), which
puts ``prompt_token_ids`` in the first chunk and the generated ``token_ids`` in every chunk; a
stream resumes on ``/v1/completions`` with ``prompt`` = prompt ids + emitted ids. Chat prompts
resume the same way (the ids already include the chat template). Without ids (an older vLLM)
it falls back to text continuation.
"""

from __future__ import annotations

import json

from mypy_extensions import mypyc_attr

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

DIALECT = Dialect(
    name="vllm",
    program=("vllm", "serve"),
    default_port=8000,
    model_flag=None,
    sleep_flag="--enable-sleep-mode",
    # The sleep routes are development routes: vLLM mounts them only in dev mode.
    sleep_env={"VLLM_SERVER_DEV_MODE": "1"},
    sleep_path="/sleep",
    wake_path="/wake_up",
    is_sleeping_path="/is_sleeping",
    metrics=MetricNames(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_usage="vllm:kv_cache_usage_perc",
        extra=(
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:request_success_total",
        ),
    ),
    abort_log="Aborted request {rid}.",
    max_seqs_flag="--max-num-seqs",
    request_id_field="request_id",
    openai_token_ids=True,
    openai_error_shape="wrapped",
    # Served by vLLM's OpenAI server as well (embeddings and the other pooling routes only
    # from a pooling model; /tokenize and /detokenize even while asleep).
    other_routes=("/tokenize", "/detokenize", "/v1/embeddings", "/v1/responses"),
)

WAKE_TAGS = ("weights", "kv_cache")


# Compiled where a build is present (supervisor.native); other backends subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class VllmBackend(Backend):
    """vLLM's OpenAI server with sleep mode (``/sleep``, ``/wake_up``, ``/is_sleeping``)."""

    dialect = DIALECT
    continuation_mode = "token_ids"

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level not in (1, 2):
            raise BackendError(f"vLLM sleep level must be 1 or 2, not {level}")
        await ep.call_ok("POST", "/sleep", params={"level": str(level)}, timeout_s=120)

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        for tag in tags:
            if tag not in WAKE_TAGS:
                raise BackendError(f"vLLM wake tag must be one of {WAKE_TAGS}, not {tag!r}")
        if not tags:
            await ep.call_ok("POST", "/wake_up", timeout_s=120)
        for tag in tags:  # staged: weights first, then KV, as vLLM recommends against OOM
            await ep.call_ok("POST", "/wake_up", params={"tags": tag}, timeout_s=120)

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        body = await ep.call_ok("GET", "/is_sleeping")
        try:
            return bool(json.loads(body)["is_sleeping"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"/is_sleeping answered {body[:100]!r}") from e

    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        return False  # vLLM aborts a request when its HTTP connection closes

    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        body = streamed_body(req)
        body["return_token_ids"] = True
        body["request_id"] = request_id
        return UpstreamRequest(path_for(req), body, request_id, {"X-Request-Id": request_id})

    def whole_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        return self.first_request(req, request_id).as_whole()

    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        up = token_continuation(req, progress, request_id, rid_field=DIALECT.request_id_field)
        if up is None:
            up = text_continuation(req, progress, request_id, rid_field=DIALECT.request_id_field)
        up.body["return_token_ids"] = True
        up.headers["X-Request-Id"] = request_id
        return up

    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        return OpenAIStreamDecoder()
