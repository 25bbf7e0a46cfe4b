"""The client's answer in the shape it asked for: ``text_completion`` or
``chat.completion.chunk`` chunks of a stream, or one whole ``text_completion`` or
``chat.completion``, as vLLM renders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from supervisor.frontend.extras import Extras
from supervisor.requests import Piece, Progress


@dataclass(init=False)
class ClientShape:
    """Renders pieces in the shape the client asked for."""

    kind: str
    rid: str
    model: str
    created: int
    with_ids: bool = False
    # The choice this shape renders (n > 1: one shape per choice), kept as an object: a
    # native int would be boxed again for every chunk.
    index: Any = 0
    # Every chunk of a stream starts alike: that part is rendered once, on first use.
    _head: bytes | None = field(default=None, repr=False, compare=False)

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one is built per request.)
    def __init__(
        self,
        kind: str,
        rid: str,
        model: str,
        created: int,
        with_ids: bool = False,
        index: int = 0,
    ) -> None:
        self.kind = kind
        self.rid = rid
        self.model = model
        self.created = created
        self.with_ids = with_ids
        self.index = index
        self._head = None

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(
        self,
        choice: dict[str, Any],
        failover: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        if failover or usage:
            obj: dict[str, Any] = {
                "id": self.rid,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
            if usage:  # (continuous_usage_stats: the counts so far, in every chunk)
                obj["usage"] = usage
            if failover:
                obj["failover"] = failover
            return b"data: " + orjson.dumps(obj) + b"\n\n"
        if self._head is None:
            head = orjson.dumps(
                {
                    "id": self.rid,
                    "object": self.object,
                    "created": self.created,
                    "model": self.model,
                }
            )
            self._head = b"data: " + head[:-1] + b',"choices":['
        return self._head + orjson.dumps(choice) + b"]}\n\n"

    def role_chunk(self, usage: dict[str, int] | None = None) -> bytes:
        return self._chunk(
            {
                "index": self.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            },
            None,
            usage,
        )

    def echo_chunk(self, text: str, usage: dict[str, int] | None = None) -> bytes:
        """A chat answer's echo of the last message, after the role, as vLLM sends it."""
        choice = {"index": self.index, "delta": {"content": text}, "logprobs": None}
        choice["finish_reason"] = None
        return self._chunk(choice, None, usage)

    def piece_chunk(
        self,
        text: str,
        piece: Piece,
        finish: str | None,
        stop: str | None = None,
        failover: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if piece.delta:
                delta.update(piece.delta)
            choice: dict[str, Any] = {
                "index": self.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": self.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        if stop is not None:
            choice["stop_reason"] = stop
        if self.with_ids and piece.token_ids is not None:
            choice["token_ids"] = piece.token_ids
        return self._chunk(choice, failover, usage)

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        obj = {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def full(
        self,
        progress: Progress,
        finish: str | None,
        usage: dict[str, int],
        failover: dict[str, Any] | None = None,
        extras: Extras | None = None,
    ) -> dict[str, Any]:
        logprobs = None if extras is None else extras.whole
        echo = "" if extras is None else extras.echo
        choice: dict[str, Any] = {
            "index": self.index,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        if self.kind == "chat":
            choice["message"] = {
                "role": "assistant",
                "content": echo + progress.text,
                **progress.message_extras(),
            }
            obj = "chat.completion"
        else:
            choice["text"] = echo + progress.text
            obj = "text_completion"
            if extras is not None and extras.prompt_logprobs is not None:
                choice["prompt_logprobs"] = extras.prompt_logprobs  # (vLLM: in the choice)
        if self.with_ids and progress.token_ids is not None:
            choice["token_ids"] = progress.token_ids
        out = {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }
        if extras is not None and extras.prompt_logprobs is not None and self.kind == "chat":
            out["prompt_logprobs"] = extras.prompt_logprobs  # (vLLM: beside the choices)
        if failover:
            out["failover"] = failover
        return out
