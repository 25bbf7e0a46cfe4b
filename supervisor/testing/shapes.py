"""Shapes of engine answers: structure and value types, never values.

``scripts/record_vllm_shapes.py`` records a real vLLM's answers to :data:`REQUESTS` as
shapes; the simulator's fidelity test asks the simulator the same and compares.
"""

from __future__ import annotations

import json
from typing import Any

_CHAT = [{"role": "user", "content": "Tell me of the harbor."}]
# name -> (method, path, body); "model" is replaced by the served model's name.
REQUESTS: dict[str, tuple[str, str, Any]] = {
    "models": ("GET", "/v1/models", None),
    "completion": ("POST", "/v1/completions",
                   {"model": "m", "prompt": "the river", "max_tokens": 5, "temperature": 0}),
    "completion_ids": ("POST", "/v1/completions",
                       {"model": "m", "prompt": "the river", "max_tokens": 5, "temperature": 0,
                        "return_token_ids": True}),
    "completion_stream": ("POST", "/v1/completions",
                          {"model": "m", "prompt": "the river", "max_tokens": 5,
                           "temperature": 0, "stream": True, "return_token_ids": True,
                           "stream_options": {"include_usage": True,
                                              "continuous_usage_stats": True}}),
    "chat": ("POST", "/v1/chat/completions",
             {"model": "m", "messages": _CHAT, "max_tokens": 5, "temperature": 0}),
    "chat_stream": ("POST", "/v1/chat/completions",
                    {"model": "m", "messages": _CHAT, "max_tokens": 5, "temperature": 0,
                     "stream": True, "return_token_ids": True,
                     "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    "chat_continue": ("POST", "/v1/chat/completions",
                      {"model": "m", "messages": [*_CHAT, {"role": "assistant", "content": "The"}],
                       "continue_final_message": True, "add_generation_prompt": False,
                       "max_tokens": 5, "temperature": 0}),
    "token_prompt": ("POST", "/v1/completions",
                     {"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0}),
    "unknown_model": ("POST", "/v1/completions",
                      {"model": "no-such-model", "prompt": "x", "max_tokens": 2}),
    "too_long": ("POST", "/v1/completions",
                 {"model": "m", "prompt": "the river", "max_tokens": 100000}),
    "min_over_max": ("POST", "/v1/completions",
                     {"model": "m", "prompt": "the river", "max_tokens": 2, "min_tokens": 5}),
    "tokenize": ("POST", "/tokenize", {"model": "m", "prompt": "the river"}),
    "detokenize": ("POST", "/detokenize", {"model": "m", "tokens": [5, 6, 7]}),
    # Real vLLM serves embeddings only from a pooling model (--runner pooling, or
    # --convert embed): record this one from such a server.
    "embeddings": ("POST", "/v1/embeddings", {"model": "m", "input": ["the river", "x"]}),
    "responses": ("POST", "/v1/responses",
                  {"model": "m", "input": "Tell me of the harbor.", "max_output_tokens": 5,
                   "temperature": 0}),
    "responses_stream": ("POST", "/v1/responses",
                         {"model": "m", "input": "Tell me of the harbor.",
                          "max_output_tokens": 5, "temperature": 0, "stream": True}),
    "unknown_route": ("GET", "/no/such/route", None),
    # Logprobs, several choices, echo, suffix, usage in every chunk.
    "completion_logprobs": ("POST", "/v1/completions",
                            {"model": "m", "prompt": "the river", "max_tokens": 4,
                             "temperature": 0, "logprobs": 2, "prompt_logprobs": 1}),
    "completion_logprobs_stream": ("POST", "/v1/completions",
                                   {"model": "m", "prompt": "the river", "max_tokens": 4,
                                    "temperature": 0, "logprobs": 2, "stream": True,
                                    "return_token_ids": True,
                                    "stream_options": {"include_usage": True,
                                                       "continuous_usage_stats": True}}),
    "chat_logprobs": ("POST", "/v1/chat/completions",
                      {"model": "m", "messages": _CHAT, "max_tokens": 4, "temperature": 0,
                       "logprobs": True, "top_logprobs": 2, "prompt_logprobs": 1}),
    "chat_logprobs_stream": ("POST", "/v1/chat/completions",
                             {"model": "m", "messages": _CHAT, "max_tokens": 4,
                              "temperature": 0, "logprobs": True, "top_logprobs": 2,
                              "stream": True,
                              "stream_options": {"include_usage": True,
                                                 "continuous_usage_stats": True}}),
    "completion_n": ("POST", "/v1/completions",
                     {"model": "m", "prompt": "the river", "max_tokens": 3, "n": 2,
                      "temperature": 1, "seed": 7}),
    # (Six tokens each: the choices' chunks interleave as they come, and the stream's middle
    # event must not be a finishing one whichever comes first.)
    "completion_n_stream": ("POST", "/v1/completions",
                            {"model": "m", "prompt": "the river", "max_tokens": 6, "n": 2,
                             "temperature": 1, "seed": 7, "stream": True,
                             "stream_options": {"include_usage": True,
                                                "continuous_usage_stats": True}}),
    "chat_n_stream": ("POST", "/v1/chat/completions",
                      {"model": "m", "messages": _CHAT, "max_tokens": 6, "n": 2,
                       "temperature": 1, "seed": 7, "stream": True,
                       "stream_options": {"include_usage": True}}),
    "completion_echo": ("POST", "/v1/completions",
                        {"model": "m", "prompt": "the river", "max_tokens": 3,
                         "temperature": 0, "echo": True, "logprobs": 1}),
    "completion_echo_stream": ("POST", "/v1/completions",
                               {"model": "m", "prompt": "the river", "max_tokens": 3,
                                "temperature": 0, "echo": True, "logprobs": 1,
                                "stream": True}),
    "chat_echo_stream": ("POST", "/v1/chat/completions",
                         {"model": "m",
                          "messages": [*_CHAT, {"role": "assistant", "content": "The"}],
                          "add_generation_prompt": False, "continue_final_message": True,
                          "echo": True, "max_tokens": 3, "temperature": 0, "stream": True}),
    "prompt_logprobs_stream": ("POST", "/v1/completions",
                               {"model": "m", "prompt": "the river", "max_tokens": 3,
                                "prompt_logprobs": 1, "stream": True}),
    "suffix": ("POST", "/v1/completions",
               {"model": "m", "prompt": "the river", "suffix": "end", "max_tokens": 3}),
    "best_of": ("POST", "/v1/completions",
                {"model": "m", "prompt": "the river", "max_tokens": 3, "best_of": 2}),
}  # fmt: skip


def request_for(name: str, model: str) -> tuple[str, str, Any]:
    """:data:`REQUESTS`' ``name`` for a server whose model is ``model``."""
    method, path, body = REQUESTS[name]
    if isinstance(body, dict) and body.get("model") == "m":
        body = {**body, "model": model}
    return method, path, body


def answer_shape(body: Any, status: int, raw: bytes) -> dict[str, Any]:
    """The recorded form of one answer to ``body``: its status and its body's (or event
    stream's) shape."""
    entry: dict[str, Any] = {"status": status}
    if isinstance(body, dict) and body.get("stream") and status == 200:
        entry["stream"] = shape_of_stream(raw)
    elif raw.strip():
        try:
            entry["body"] = shape_of(json.loads(raw))
        except ValueError:
            entry["body"] = "text"
    return entry


# Lists whose objects may be maps keyed by data (a token's text or id), not by field names:
# completions' top_logprobs ({" river": -9.1}) and prompt_logprobs ({"3121": {...}}).
_MAP_LISTS = ("top_logprobs", "prompt_logprobs")


def shape_of(value: Any, within: str = "") -> Any:
    """The shape of a JSON value: objects keep their keys, lists the shape of their first
    item, scalars become their type's name. A map keyed by data (in ``top_logprobs`` or
    ``prompt_logprobs``; chat's entries, which name a ``token``, are objects) keeps one key,
    ``*``, with its first value's shape."""
    if isinstance(value, dict):
        if within in _MAP_LISTS and "token" not in value:
            return {"*": shape_of(next(iter(value.values())))} if value else {}
        return {k: shape_of(v, k) for k, v in value.items()}
    if isinstance(value, list):
        if not value:
            return []
        # (prompt_logprobs begin with null: the first prompt token has none)
        first = next((v for v in value if v is not None), None) if within in _MAP_LISTS else None
        return [shape_of(first if first is not None else value[0], within)]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "str"


def shape_of_stream(raw: bytes) -> dict[str, Any]:
    """A server-sent event stream's shape: its first, middle and finishing events, its usage
    event (no choices), and whether it ends with ``[DONE]``."""
    events = [line[len(b"data: ") :] for line in raw.splitlines() if line.startswith(b"data: ")]
    done = bool(events) and events[-1].strip() == b"[DONE]"
    objs = [json.loads(e) for e in events if e.strip() != b"[DONE]"]
    if objs and all(isinstance(o, dict) and "type" in o for o in objs):
        # Typed events (the Responses API): each type's last event, and the types in order.
        by_type = {o["type"]: shape_of(o) for o in objs}
        order = " > ".join(dict.fromkeys(o["type"] for o in objs))
        return {"types": order, "by_type": by_type, "done": done}
    with_choices = [o for o in objs if o.get("choices")]
    finishing = [o for o in with_choices if o["choices"][0].get("finish_reason")]
    usage_only = [o for o in objs if not o.get("choices") and o.get("usage")]
    pick = {
        "first": with_choices[0] if with_choices else None,
        "middle": with_choices[len(with_choices) // 2] if with_choices else None,
        "finish": finishing[-1] if finishing else None,
        "usage": usage_only[-1] if usage_only else None,
    }
    return {"events": {k: shape_of(v) for k, v in pick.items()}, "done": done}


def differences(real: Any, sim: Any, where: str = "") -> list[str]:
    """Where ``sim`` lacks what ``real`` has, or has it with another type. A real ``null``
    matches anything, absence included (a field not in use there); extra keys in ``sim``
    are allowed."""
    if real == "null":
        return []
    if isinstance(real, dict):
        if not isinstance(sim, dict):
            return [f"{where or '.'}: object in the real engine, {sim!r} in the simulator"]
        out = []
        for key, value in real.items():
            if key not in sim and value != "null":
                out.append(f"{where}.{key}: missing in the simulator")
            elif key in sim:
                out += differences(value, sim[key], f"{where}.{key}")
        return out
    if isinstance(real, list):
        if not isinstance(sim, list):
            return [f"{where}: list in the real engine, {sim!r} in the simulator"]
        if real and sim:
            return differences(real[0], sim[0], f"{where}[0]")
        return []
    if real != sim and sim != "null":
        return [f"{where}: {real} in the real engine, {sim} in the simulator"]
    if real != sim:
        return [f"{where}: {real} in the real engine, null in the simulator"]
    return []
