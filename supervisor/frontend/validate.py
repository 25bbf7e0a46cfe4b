"""What the frontend checks of a completions or chat request before relaying it, and the
errors it answers in OpenAI's shape.

Only the fields the relay reads itself are checked, for the types it reads them as (their
ranges are the engine's to judge); a bad one is a 400 naming it.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, Final

import orjson

from supervisor.jsonbody import has_any_key
from supervisor.requests import RequestKind

# Fields the relay reads and renders itself (checked and handled only where one is there).
_FEATURE_FIELDS: Final = (
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "prompt_logprobs",
    "stream_options",
)
# The most choices one request may ask for (n): each is a stream of its own to the engines.
MAX_CHOICES: Final = 128

_RID_OK: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids need to be unique, not secret (nothing is authorised by one): a generator
# seeded from the system's randomness, not a getrandom() call per request.
_RID_BITS: Final = random.Random(os.urandom(32)).getrandbits
# (A bound format, called from C: mypyc makes an f-string with a format spec into three
# method calls.)
_HEX128: Final = "{:032x}".format


class BadRequest(Exception):
    """A request the frontend refuses: ``status`` (400 unless said) with OpenAI's error
    shape, naming the ``param`` at fault."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_body(
    status: int,
    message: str,
    *,
    etype: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """An error in OpenAI's shape."""
    etype = etype or {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        431: "invalid_request_error",
        503: "service_unavailable",
    }.get(status, "server_error")
    err = {"message": message, "type": etype, "param": param, "code": code}
    return orjson.dumps({"error": err})


def check_fields(body: dict[str, Any], kind: RequestKind) -> bool:
    """Check a request's fields (its model is the caller's to check); whether it uses a
    field the relay renders itself (logprobs, several choices, an echo, usage in every
    chunk). A batch of one prompt becomes that prompt."""
    if kind == "chat":
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body.get("prompt"))
        if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], (str, list)):
            body["prompt"] = body["prompt"][0]  # a batch of one is that one prompt
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise BadRequest(f"'{key}' must be a positive integer", param=key)
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop))
    ):
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    features = has_any_key(body, _FEATURE_FIELDS)  # (mostly none of them is there)
    if features:
        _check_sampling(body, kind)
    return features


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sampling(body: dict[str, Any], kind: RequestKind) -> None:
    """The fields the relay reads itself must have the types it reads them as (their
    ranges are the engine's to judge)."""
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_CHOICES):
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_CHOICES}", param="n")
    logprobs = body.get("logprobs")
    if kind == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest("'logprobs' must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None and not _is_int(top):
            raise BadRequest("'top_logprobs' must be an integer", param="top_logprobs")
    elif logprobs is not None and not _is_int(logprobs):
        raise BadRequest("'logprobs' must be an integer", param="logprobs")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None and not _is_int(prompt_logprobs):
        raise BadRequest("'prompt_logprobs' must be an integer", param="prompt_logprobs")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise BadRequest("'echo' must be true or false", param="echo")
    if (
        echo
        and kind == "completion"
        and not isinstance(body["prompt"], str)
        and not body.get("return_token_ids")
    ):
        # vLLM echoes a token prompt as its text: the frontend has no tokenizer.
        raise BadRequest(
            "'echo' of a prompt given as token ids is not supported through the "
            "failover frontend (it has no tokenizer to render the prompt's text); "
            "send the prompt as text, or ask for return_token_ids",
            param="echo",
            code="unsupported_parameter",
        )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return
        if len(prompt) == 1 and (
            isinstance(prompt[0], str)
            or (
                isinstance(prompt[0], list)
                and prompt[0]
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt[0])
            )
        ):
            return
        raise BadRequest(
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            param="prompt",
        )
    raise BadRequest("'prompt' (a string or a list of token ids) is required", param="prompt")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(
                f"messages[{i}] must be an object with a 'role' string", param=f"messages[{i}]"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(
                f"messages[{i}].content must be a string or a list of parts",
                param=f"messages[{i}].content",
            )


def request_id(given: str) -> str:
    """A request's id: the client's ``X-Request-Id`` where it is a well-formed one, else
    128 random bits in hex (as many as a uuid4's, without a system call)."""
    if given and _RID_OK.match(given):
        return given
    return _HEX128(_RID_BITS(128))
