"""The OpenAI Responses API (``/v1/responses``) as a simulated vLLM answers it: the input
as chat messages, and the response object and its typed stream events."""

from __future__ import annotations

import time
from typing import Any

from supervisor.testing.simengine import Token
from supervisor.testing.simrequest import ApiError


def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses API request stands for: its ``instructions`` as a
    system message, then its ``input`` (a string, or messages whose content is a string or
    ``input_text`` parts)."""
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*out, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise ApiError(400, "input must be a string or a non-empty list of messages")
    for i, m in enumerate(given):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"input[{i}] must be a message with a role")
        content = m.get("content")
        if isinstance(content, list):
            texts = [
                p.get("text")
                for p in content
                if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
            ]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"input[{i}].content: only text parts are served")
            content = "".join(texts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise ApiError(400, f"input[{i}].content must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


class ResponsesShape:
    """One Responses API answer: the response object and its stream's typed events."""

    def __init__(
        self, rid: str, model: str, body: dict[str, Any], max_tokens: int, prompt_tokens: int
    ) -> None:
        self.rid, self.model, self.body = rid, model, body
        self.max_tokens, self.prompt_tokens = max_tokens, prompt_tokens
        self.created = int(time.time())
        self.item_id = f"msg_{rid[5:]}"
        self.seq = -1
        self.text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]
            if status == "completed"
            else []
        )
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def response(self, toks: list[Token] | None, *, final: bool) -> dict[str, Any]:
        b = self.body
        status = "in_progress"
        output: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        if final and toks is not None:
            last = toks[-1].finish_reason if toks else "length"
            status = "incomplete" if last == "length" else "completed"
            text = "".join(t.text for t in toks)
            output = [self._message(text, "completed")]
            usage = {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": 0,
                    "cache_write_tokens": 0,
                    "input_tokens_per_turn": [],
                    "cached_tokens_per_turn": [],
                },
                "output_tokens": len(toks),
                "output_tokens_details": {
                    "reasoning_tokens": 0,
                    "tool_output_tokens": 0,
                    "output_tokens_per_turn": [],
                    "tool_output_tokens_per_turn": [],
                },
                "total_tokens": self.prompt_tokens + len(toks),
            }
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.rid,
            "created_at": self.created,
            "incomplete_details": incomplete,
            "instructions": b.get("instructions"),
            "metadata": b.get("metadata"),
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "temperature": float(b.get("temperature", 1.0)),
            "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools") or [],
            "top_p": float(b.get("top_p", 1.0)),
            "background": False,
            "max_output_tokens": self.max_tokens,
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": b.get("top_logprobs", 0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "presence_penalty": float(b.get("presence_penalty", 0.0)),
            "frequency_penalty": float(b.get("frequency_penalty", 0.0)),
        }

    def opening(self) -> list[dict[str, Any]]:
        initial = self.response(None, final=False)
        return [
            self._event("response.created", response=initial),
            self._event("response.in_progress", response=initial),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("", "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                output_index=0,
                item_id=self.item_id,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def delta(self, text: str) -> dict[str, Any]:
        self.text += text
        return self._event(
            "response.output_text.delta",
            content_index=0,
            output_index=0,
            item_id=self.item_id,
            delta=text,
            logprobs=[],
        )

    def closing(self, toks: list[Token]) -> list[dict[str, Any]]:
        text = "".join(t.text for t in toks)
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        return [
            self._event(
                "response.output_text.done",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
            self._event(
                "response.output_item.done",
                output_index=0,
                item=self._message(text, "completed"),
            ),
            self._event("response.completed", response=self.response(toks, final=True)),
        ]

    def error(self, message: str) -> dict[str, Any]:
        return self._event("error", code="InternalServerError", message=message, param=None)
