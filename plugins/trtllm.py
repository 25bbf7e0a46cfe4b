"""TensorRT-LLM backend (``trtllm-serve MODEL``).

``trtllm-serve`` has no HTTP sleep mode that we could confirm, so its shadows need a suspend
strategy (cuda-checkpoint). It returns no token ids, so continuation is by text: the prompt
string plus the emitted text on ``/v1/completions``. Its request models refuse unknown fields
(400), and its chat route has no ``continue_final_message``: a chat answer that broke after
its first token cannot be resumed there (the request fails with a clear error; one that broke
before any token is re-issued whole). Cancellation is by closing the connection.
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
from supervisor.model import EngineLoad
from supervisor.openai_shapes import (
    OpenAIStreamDecoder,
    path_for,
    streamed_body,
    text_continuation,
)
from supervisor.requests import ClientRequest, Progress, UpstreamRequest

# trtllm-serve's request models forbid unknown fields (pydantic extra="forbid"): these are
# the fields its OpenAI routes take (tensorrt_llm/serve/openai_protocol.py).
_SHARED_FIELDS = (
    "model frequency_penalty logit_bias logprobs n presence_penalty seed stop stream "
    "stream_options temperature top_p user lora_request prompt_ignore_length best_of "
    "use_beam_search top_k top_p_min min_p repetition_penalty length_penalty early_stopping "
    "stop_token_ids include_stop_str_in_output ignore_eos min_tokens skip_special_tokens "
    "spaces_between_special_tokens truncate_prompt_tokens add_special_tokens response_format "
    "disaggregated_params priority conversation_params thinking_token_budget"
).split()
COMPLETION_FIELDS = frozenset(
    [*_SHARED_FIELDS, "prompt", "echo", "max_tokens", "suffix", "return_context_logits",
     "detokenize"]
)  # fmt: skip
CHAT_FIELDS = frozenset(
    [*_SHARED_FIELDS, "messages", "max_tokens", "max_completion_tokens", "top_logprobs",
     "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "thinking", "echo",
     "add_generation_prompt", "documents", "chat_template", "chat_template_kwargs",
     "injected_chat_template_kwargs", "media_io_kwargs", "cache_salt", "agent_hierarchy",
     "mm_processor_kwargs"]
)  # fmt: skip
STREAM_OPTION_FIELDS = frozenset(["include_usage", "continuous_usage_stats"])

DIALECT = Dialect(
    name="trtllm",
    program=("trtllm-serve",),
    default_port=8000,
    model_flag=None,
    metrics=None,
    metrics_format="json",
    abort_log="Aborted request {rid}.",
    max_seqs_flag="--max_batch_size",
    request_fields={
        "/v1/completions": COMPLETION_FIELDS,
        "/v1/chat/completions": CHAT_FIELDS,
        "stream_options": STREAM_OPTION_FIELDS,
    },
)


class TrtllmBackend(Backend):
    """``trtllm-serve``'s OpenAI routes; no sleep mode (use a suspend strategy)."""

    dialect = DIALECT
    continuation_mode = "text"
    resumes_token_prompts = False  # it returns no token ids to append to the prompt's
    resumes_chat = False  # its chat route has no continue_final_message (and forbids it)

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

    def whole_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        return self.first_request(req, request_id).as_whole()

    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        if req.kind == "chat" and progress.completion_tokens:
            raise BackendError(
                "trtllm-serve cannot continue a partial chat answer (its chat route has no "
                "continue_final_message)"
            )
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
