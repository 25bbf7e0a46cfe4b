"""OpenAI-compatible request and stream shapes, shared by plugins of OpenAI-speaking engines.

Only what tracking and continuation need is parsed; everything else passes through untouched.
"""

from __future__ import annotations

from typing import Any

from mypy_extensions import mypyc_attr

from supervisor.backends import StreamDecoder
from supervisor.events import loads_event
from supervisor.requests import ClientRequest, Piece, Progress, UpstreamRequest
from supervisor.stream_errors import BackendError, EngineReportedError, MalformedStream

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"

# Sampling fields that mean the same on /v1/completions as on /v1/chat/completions. Stop
# strings are not among them: the relay matches those itself (supervisor.frontend.stops).
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "skip_special_tokens",
    "bad_words",
)
# Constrained decoding: the survivor's grammar would start again at the seam, mid-answer.
_GRAMMAR_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs")  # fmt: skip
# Chat delta fields passed through to the client besides role and content.
DELTA_EXTRAS = ("tool_calls", "reasoning_content", "reasoning", "function_call")


def inexact_fields(req: ClientRequest) -> list[str]:
    """The client's parameters a continuation cannot honour exactly, by name.

    A seeded sample continues with a fresh random state; presence and frequency penalties
    count only the continuation's own tokens (what came before is now prompt); a grammar
    (``response_format``, ``guided_*``) would restart at the seam, so it is left out.
    """
    body = req.body
    out: list[str] = []
    temperature = body.get("temperature", 1.0)
    if body.get("seed") is not None and temperature not in (0, 0.0):
        out.append("seed")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            out.append(key)
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        out.append("response_format")
    out += [k for k in _GRAMMAR_KEYS if body.get(k) is not None]
    return out


def _continuation_limits(body: dict[str, Any], req: ClientRequest, progress: Progress) -> None:
    """What carries over into a continuation's body changed by what was already sent. The
    prompt was echoed, and its logprobs sent, by the first engine: a continuation's prompt
    holds the answer so far, so it asks for neither (the answer's logprobs it asks for as
    the client did). A suffix is part of the prompt's ids already."""
    for key in ("response_format", *_GRAMMAR_KEYS, "echo", "prompt_logprobs", "suffix"):
        body.pop(key, None)
    min_tokens = req.body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > 0:
        # vLLM answers 400 when min_tokens exceeds max_tokens: count what was sent.
        left = max(min_tokens - progress.completion_tokens, 0)
        if left:
            body["min_tokens"] = left
        else:
            body.pop("min_tokens", None)


def path_for(req: ClientRequest) -> str:
    return CHAT_PATH if req.kind == "chat" else COMPLETIONS_PATH


# Usage in every chunk (vLLM, SGLang and trtllm-serve all take it): the engine's own count
# of tokens so far, which says how many tokens a chunk held when it carries no ids.
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


def streamed_body(req: ClientRequest, *, include_usage: bool = True) -> dict[str, Any]:
    """The client's body, streamed (internally we always stream, so any request can migrate).

    Its top two levels are copies (a continuation replaces ``prompt`` or ``messages``, and
    a plugin may edit a message in place) but not deeper: a deep copy of a 100k-id prompt
    took milliseconds on the event loop."""
    body = {
        k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        for k, v in req.body.items()
    }
    body["stream"] = True
    if include_usage:
        body["stream_options"] = dict(STREAM_OPTIONS)
    return body


def remaining_budget(req: ClientRequest, progress: Progress) -> int | None:
    """Tokens the continuation may still generate: what the client asked for (or the
    completions route's default of 16) minus what was sent; None for "until the context
    ends" (a chat request without a limit)."""
    mt = req.token_budget
    return None if mt is None else max(mt - progress.completion_tokens, 0)


def text_continuation(
    req: ClientRequest, progress: Progress, request_id: str, *, rid_field: str | None
) -> UpstreamRequest:
    """Resume from text: prompt string + emitted text, or the partial assistant message with
    ``continue_final_message``. Exact only where re-tokenizing the seam gives the same ids."""
    body = streamed_body(req)
    _continuation_limits(body, req, progress)
    budget = remaining_budget(req, progress)
    if budget is not None:
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = budget
    if rid_field:
        body[rid_field] = request_id
    inexact = (*inexact_fields(req), "retokenized") if progress.text else ()
    if req.kind == "chat":
        if progress.text:
            body["messages"] = [
                *req.body["messages"],
                {"role": "assistant", "content": progress.text},
            ]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return UpstreamRequest(CHAT_PATH, body, request_id, inexact=inexact)
    prompt = req.body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt + progress.text
    elif progress.text:
        raise BackendError(
            "cannot resume a token-id prompt from text: this engine returned no token ids"
        )
    return UpstreamRequest(COMPLETIONS_PATH, body, request_id, inexact=inexact)


def token_continuation(
    req: ClientRequest, progress: Progress, request_id: str, *, rid_field: str | None
) -> UpstreamRequest | None:
    """Resume on /v1/completions from prompt ids + emitted ids, or None when ids are unknown."""
    if progress.prompt_token_ids is None or progress.token_ids is None:
        return None
    body: dict[str, Any] = {k: req.body[k] for k in SAMPLING_KEYS if k in req.body}
    _continuation_limits(body, req, progress)
    if req.logprobs is not None:  # on /v1/completions, chat's top_logprobs is logprobs
        body.pop("top_logprobs", None)
        body["logprobs"] = req.logprobs
    body["model"] = req.body.get("model")
    body["prompt"] = progress.prompt_token_ids + progress.token_ids
    budget = remaining_budget(req, progress)
    if budget is not None:
        body["max_tokens"] = budget
    elif progress.context_length is not None:
        # A chat request without a limit runs until the context ends, but /v1/completions
        # would stop at 16: the limit is what is left of the engine's context.
        body["max_tokens"] = max(progress.context_length - len(body["prompt"]), 1)
    else:
        raise BackendError(
            "cannot resume an unlimited chat request on /v1/completions: the engine's "
            "context length is unknown (its /v1/models gave no max_model_len)"
        )
    body["stream"] = True
    body["stream_options"] = dict(STREAM_OPTIONS)
    if rid_field:
        body[rid_field] = request_id
    inexact = tuple(inexact_fields(req)) if progress.token_ids else ()
    return UpstreamRequest(COMPLETIONS_PATH, body, request_id, inexact=inexact)


# Compiled where a build is present (supervisor.native); plugins subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class OpenAIStreamDecoder(StreamDecoder):
    """Decodes ``text_completion`` and ``chat.completion.chunk`` events, and a whole
    ``text_completion`` or ``chat.completion`` answer as one event (vLLM extensions
    ``token_ids`` / ``prompt_token_ids`` read where present). Without ids, a chunk's tokens
    are the growth of the engine's running ``completion_tokens`` (continuous usage stats),
    or one per chunk with text where the engine reports no running count."""

    def __init__(self) -> None:
        self._counted = 0  # the engine's running completion_tokens at the last chunk
        # Set by the relay where the client asked for logprobs (or prompt_logprobs): only
        # then are they read, so other streams pay nothing for them.
        self.keep_logprobs = False
        self.prompt_logprobs: list[Any] | None = None  # a whole answer's, when kept

    def feed(self, data: bytes) -> Piece | None:
        # (Read into locals and built once at the end: this runs for every token.)
        obj = loads_event(data)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise MalformedStream(f"stream event has no choices list: {data[:80]!r}")
        usage = obj.get("usage")
        prompt_tokens = running = None
        if isinstance(usage, dict):
            prompt_tokens = usage.get("prompt_tokens")
            running = usage.get("completion_tokens")  # the engine's count so far
            # (type(), not isinstance: a JSON true is no count.)
            if (prompt_tokens is not None and type(prompt_tokens) is not int) or (
                running is not None and type(running) is not int
            ):
                raise MalformedStream(f"stream usage counts are not integers: {data[:80]!r}")
        top_prompt_ids = obj.get("prompt_token_ids")
        prompt_ids = top_prompt_ids if isinstance(top_prompt_ids, list) else None
        if not choices:
            if usage or top_prompt_ids:
                return Piece(
                    prompt_token_ids=prompt_ids,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=running,
                )
            return None
        ch = choices[0]
        if not isinstance(ch, dict):
            raise MalformedStream(f"stream choice is not an object: {data[:80]!r}")
        extras = None
        if "delta" in ch or "message" in ch:  # a chunk, or a whole (non-streamed) answer
            delta = ch["delta"] if "delta" in ch else ch["message"]
            if not isinstance(delta, dict):
                raise MalformedStream(f"stream delta is not an object: {data[:80]!r}")
            text = delta.get("content")
            found = {k: delta[k] for k in DELTA_EXTRAS if delta.get(k) is not None}
            calls = found.get("tool_calls")
            if "message" in ch and isinstance(calls, list):
                # A whole message's calls have no index: their order is it.
                found["tool_calls"] = [
                    {"index": i, **c} if isinstance(c, dict) else c for i, c in enumerate(calls)
                ]
            extras = found or None
        else:
            text = ch.get("text")
        if text is not None and not isinstance(text, str):
            raise MalformedStream(f"stream text is not a string: {data[:80]!r}")
        text = text or ""
        ids = ch.get("token_ids")
        n_tokens = 0
        if isinstance(ids, list):
            token_ids: list[int] | None = ids
        else:
            token_ids = None
            if isinstance(running, int) and running >= self._counted:
                n_tokens = running - self._counted
            elif text or extras:
                n_tokens = 1  # one event per token when the engine does not say otherwise
        if isinstance(running, int) and running > self._counted:
            self._counted = running
        choice_prompt_ids = ch.get("prompt_token_ids")
        if isinstance(choice_prompt_ids, list):
            prompt_ids = choice_prompt_ids
        finish = ch.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise MalformedStream(f"stream finish_reason is not a string: {data[:80]!r}")
        if finish == "abort":
            # The engine gave up on the request (e.g. vLLM's /sleep in mode "abort"): not an
            # answer the client asked for; the relay resumes it elsewhere.
            raise EngineReportedError("the engine aborted the request (finish_reason abort)")
        piece = Piece(text, token_ids, n_tokens, finish, prompt_ids, prompt_tokens, running, extras)
        if self.keep_logprobs:
            logprobs = ch.get("logprobs")
            if isinstance(logprobs, dict):
                piece.logprobs = [logprobs]
            # (completions: in the choice; chat: beside the choices)
            prompt_logprobs = ch.get("prompt_logprobs", obj.get("prompt_logprobs"))
            if isinstance(prompt_logprobs, list):
                self.prompt_logprobs = prompt_logprobs
        return piece
