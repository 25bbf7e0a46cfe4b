"""TensorRT-LLM backend (``trtllm-serve MODEL``).

``trtllm-serve`` has no HTTP sleep mode that we could confirm, so its shadows need a suspend
strategy (cuda-checkpoint). It returns no token ids, so continuation is by text: the prompt
string plus the emitted text on ``/v1/completions``; for chat, the partial assistant message
with ``continue_final_message``. Cancellation is by closing the connection.
"""

from __future__ import annotations

import json

from supervisor.backends import (
    Backend,
    BackendError,
    Dialect,
    EngineEndpoint,
    StreamDecoder,
)
from supervisor.model import ClientRequest, EngineLoad, Progress, UpstreamRequest
from supervisor.openai_shapes import (
    OpenAIStreamDecoder,
    path_for,
    streamed_body,
    text_continuation,
)

DIALECT = Dialect(
    name="trtllm",
    program=("trtllm-serve",),
    default_port=8000,
    model_flag=None,
    metrics=None,
    metrics_format="json",
    abort_log="Aborted request {rid}.",
    max_seqs_flag="--max_batch_size",
)


class TrtllmBackend(Backend):
    """``trtllm-serve``'s OpenAI routes; no sleep mode (use a suspend strategy)."""

    dialect = DIALECT
    continuation_mode = "text"
    resumes_token_prompts = False  # it returns no token ids to append to the prompt's

    def _no_sleep(self) -> BackendError:
        return BackendError(
            "trtllm-serve has no sleep routes; give TRT-LLM shadows the cuda-checkpoint "
            "suspend strategy"
        )

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        raise self._no_sleep()

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        raise self._no_sleep()

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        return False

    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        return False

    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        return UpstreamRequest(path_for(req), streamed_body(req), request_id)

    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        return text_continuation(req, progress, request_id, rid_field=None)

    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        return OpenAIStreamDecoder()

    async def load(self, ep: EngineEndpoint) -> EngineLoad:
        # /metrics is a JSON list of per-iteration statistics; the newest entry is last.
        body = await ep.call_ok("GET", "/metrics")
        try:
            stats = json.loads(body)
            last = stats[-1] if stats else {}
            return EngineLoad(
                running=int(last.get("numActiveRequests", 0)),
                waiting=int(last.get("numQueuedRequests", 0)),
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise BackendError(f"trtllm /metrics is not its JSON stats: {body[:100]!r}") from e
