"""SGLang backend (``python -m sglang.launch_server --model-path M``).

Completions go to the native ``/generate`` route, which takes ``input_ids`` and returns
``output_ids``: a completion whose prompt is token ids resumes token-exactly from prompt ids +
emitted ids; a text prompt resumes from prompt text + emitted text (SGLang returns no prompt
ids). Chat goes to the OpenAI route and resumes by text with ``continue_final_message``.
Every engine is launched with ``--incremental-streaming-output``, so ``/generate`` streams
carry only what is new in each event (SGLang's default, cumulative text, would be re-parsed
whole at every event and can shrink at a stop string). Requests carry our id as ``rid`` so
``/abort_request`` can cancel them.
"""

from __future__ import annotations

from typing import Any

from supervisor.backends import (
    Backend,
    BackendError,
    Dialect,
    EngineEndpoint,
    EngineReportedError,
    MalformedStream,
    MetricNames,
    StreamDecoder,
    loads_event,
)
from supervisor.model import Readiness
from supervisor.openai_shapes import (
    OpenAIStreamDecoder,
    remaining_budget,
    streamed_body,
    text_continuation,
)
from supervisor.requests import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ClientRequest,
    Piece,
    Progress,
    UpstreamRequest,
)

DIALECT = Dialect(
    name="sglang",
    program=("python", "-m", "sglang.launch_server"),
    default_port=30000,
    model_flag="--model-path",
    deep_health_path="/health_generate",
    sleep_flag="--enable-memory-saver",
    sleep_path="/release_memory_occupation",
    wake_path="/resume_memory_occupation",
    abort_path="/abort_request",
    metrics=MetricNames(
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        kv_usage="sglang:token_usage",
        extra=("sglang:prompt_tokens_total", "sglang:generation_tokens_total"),
    ),
    abort_log="Aborted request {rid}.",
    max_seqs_flag="--max-running-requests",
    request_id_field="rid",
    launch_flags=("--incremental-streaming-output",),
)

GENERATE_PATH = "/generate"
MEMORY_TAGS = ("weights", "kv_cache")
# OpenAI completion field -> SGLang sampling_params field.
_SAMPLING_MAP = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "skip_special_tokens": "skip_special_tokens",
}
OPENAI_DEFAULT_MAX_TOKENS = COMPLETIONS_DEFAULT_MAX_TOKENS  # SGLang's own /generate: 128


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    params = {sg: body[oa] for oa, sg in _SAMPLING_MAP.items() if body.get(oa) is not None}
    params.setdefault("max_new_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    return params


class SglangBackend(Backend):
    """SGLang with the memory saver (``/release_memory_occupation``, ``/resume_...``)."""

    dialect = DIALECT
    continuation_mode = "token_ids_or_text"

    def __init__(self) -> None:
        # SGLang has no route that says what is released; remember what we released.
        self._released: dict[str, tuple[str, ...]] = {}

    async def health(self, ep: EngineEndpoint) -> Readiness:
        state = await super().health(ep)
        if state is Readiness.UNHEALTHY:
            # /health answers 503 until the server has loaded and warmed up.
            return Readiness.LOADING
        if state is Readiness.READY and ep.url in self._released:
            return Readiness.SLEEPING
        return state

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level not in (1, 2):
            raise BackendError(f"sleep level must be 1 (KV cache) or 2 (all), not {level}")
        tags = ("kv_cache",) if level == 1 else MEMORY_TAGS
        await ep.call_ok(
            "POST", "/release_memory_occupation", json_body={"tags": list(tags)}, timeout_s=120
        )
        self._released[ep.url] = tags

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        released = self._released.get(ep.url, MEMORY_TAGS)
        for tag in tags:
            if tag not in MEMORY_TAGS:
                raise BackendError(f"SGLang memory tag must be one of {MEMORY_TAGS}, not {tag!r}")
        todo = tuple(t for t in (tags or released) if t in released)
        await ep.call_ok(
            "POST", "/resume_memory_occupation", json_body={"tags": list(todo)}, timeout_s=120
        )
        left = tuple(t for t in released if t not in todo)
        if left:
            self._released[ep.url] = left
        else:
            self._released.pop(ep.url, None)

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        return ep.url in self._released

    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        await ep.call_ok("POST", "/abort_request", json_body={"rid": request_id})
        return True

    def _generate(
        self, req: ClientRequest, request_id: str, prompt: str | list[int], max_new: int | None
    ) -> UpstreamRequest:
        params = sampling_params(req.body)
        if max_new is not None:
            params["max_new_tokens"] = max_new
        body: dict[str, Any] = {"sampling_params": params, "stream": True, "rid": request_id}
        body["input_ids" if isinstance(prompt, list) else "text"] = prompt
        return UpstreamRequest(GENERATE_PATH, body, request_id)

    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        if req.kind == "chat":
            body = streamed_body(req)
            body["rid"] = request_id
            return UpstreamRequest("/v1/chat/completions", body, request_id)
        prompt = req.body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise BackendError("SGLang /generate takes a string prompt or a list of token ids")
        return self._generate(req, request_id, prompt, None)

    def whole_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        return self.first_request(req, request_id).as_whole()

    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        if req.kind == "chat":
            return text_continuation(req, progress, request_id, rid_field=DIALECT.request_id_field)
        prompt = req.body.get("prompt")
        budget = remaining_budget(req, progress)  # a completion always has one
        if isinstance(prompt, list) and progress.token_ids is not None:
            return self._generate(req, request_id, prompt + progress.token_ids, budget)
        if isinstance(prompt, str):
            return self._generate(req, request_id, prompt + progress.text, budget)
        raise BackendError("cannot resume: neither the prompt's text nor all token ids known")

    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        if upstream.path == GENERATE_PATH:
            return GenerateStreamDecoder()
        return OpenAIStreamDecoder()


class GenerateStreamDecoder(StreamDecoder):
    """``/generate`` events with incremental output: each holds only its new text and
    ``output_ids`` (an event may hold several tokens: ``--stream-interval``)."""

    def __init__(self) -> None:
        self._n_ids = 0

    def feed(self, data: bytes) -> Piece | None:
        obj = loads_event(data)
        meta = obj.get("meta_info")
        text = obj.get("text")
        ids = obj.get("output_ids")
        if not isinstance(meta, dict) or not isinstance(text, str) or not isinstance(ids, list):
            raise MalformedStream(f"not a /generate stream event: {data[:80]!r}")
        total = meta.get("completion_tokens")
        if isinstance(total, int) and total != self._n_ids + len(ids):
            raise MalformedStream(
                f"/generate event holds {len(ids)} new ids after {self._n_ids}, but the engine "
                f"counts {total}: is the engine running without --incremental-streaming-output?"
            )
        self._n_ids += len(ids)
        piece = Piece(text=text, token_ids=list(ids))
        piece.prompt_tokens = meta.get("prompt_tokens")
        piece.completion_tokens = meta.get("completion_tokens")
        fr = meta.get("finish_reason")
        if isinstance(fr, dict):
            kind = fr.get("type")
            if kind == "abort":
                raise EngineReportedError(f"engine aborted the request: {fr.get('message', '')}")
            piece.finish_reason = "length" if kind == "length" else "stop"
        elif isinstance(fr, str):
            piece.finish_reason = fr
        return piece
