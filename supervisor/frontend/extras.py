"""What a request asks for beyond text and usage at the end, rendered by the relay itself:
logprobs, usage in every chunk, an echo, prompt_logprobs."""

from __future__ import annotations

from typing import Any

from supervisor.requests import ClientRequest
from supervisor.stream_errors import MalformedStream


class Extras:
    """What a request asked for beyond text and usage at the end — logprobs, usage in
    every chunk, an echo, prompt_logprobs — rendered for the client here, so that requests
    without them pass one check per token and nothing more.

    Logprobs come in the engine's shape of each attempt's route: a chat answer's first
    engine sends chat entries (``content``), a continuation on /v1/completions sends
    columns (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), which are
    turned into chat entries as vLLM's chat route builds them (the first ``top`` of the
    alternatives, ``bytes`` from the token's UTF-8). A completion's ``text_offset`` counts
    from where the answer stood when the attempt began, as an unbroken run's does."""

    __slots__ = (
        "chat",
        "continuous",
        "echo",
        "echo_sent",
        "logprobs",
        "offset",
        "prompt_logprobs",
        "shift",
        "top",
        "whole",
    )

    def __init__(self, req: ClientRequest) -> None:
        self.chat = req.kind == "chat"
        self.top = req.logprobs  # None: no logprobs asked
        self.logprobs = self.top is not None
        so = req.body.get("stream_options")
        self.continuous = (
            bool(req.stream) and isinstance(so, dict) and bool(so.get("continuous_usage_stats"))
        )
        self.echo = req.echo_text
        # A completion's echo goes before its first text; a chat answer's is a chunk of
        # its own, after the role (sent with it).
        self.echo_sent = self.chat or not self.echo
        self.offset = 0  # completions: the text_offset of the next entry
        self.shift = 0  # added to this attempt's offsets (they start at 0 in each)
        self.whole: dict[str, Any] | None = None  # all of them, for a whole answer
        self.prompt_logprobs: list[Any] | None = None

    @staticmethod
    def wanted(req: ClientRequest) -> bool:
        """Whether ``req`` asks for any of them (its ``features`` said it may)."""
        body = req.body
        so = body.get("stream_options")
        return (
            req.logprobs is not None
            or bool(req.echo_text)
            or body.get("prompt_logprobs") is not None
            or (isinstance(so, dict) and bool(so.get("continuous_usage_stats")))
        )

    def new_attempt(self) -> None:
        self.shift = self.offset

    def render(self, raws: list[dict[str, Any]]) -> dict[str, Any]:
        """The client's logprobs object for one chunk's entries."""
        if self.chat:
            content: list[Any] = []
            for raw in raws:
                entries = raw.get("content")
                if isinstance(entries, list):
                    content += entries
                else:
                    content += self._as_chat(raw)
            return {"content": content}
        out: dict[str, list[Any]] = {
            "text_offset": [],
            "token_logprobs": [],
            "tokens": [],
            "top_logprobs": [],
        }
        shift = self.shift
        for raw in raws:
            try:
                out["text_offset"] += [o + shift for o in raw["text_offset"]]
                out["token_logprobs"] += raw["token_logprobs"]
                out["tokens"] += raw["tokens"]
                out["top_logprobs"] += raw["top_logprobs"]
            except (KeyError, TypeError) as e:
                raise MalformedStream(f"logprobs not in the completions shape: {raw!r:.80}") from e
        if out["tokens"]:
            self.offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def _as_chat(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Completions columns as chat entries."""
        out: list[dict[str, Any]] = []
        try:
            columns = zip(raw["tokens"], raw["token_logprobs"], raw["top_logprobs"], strict=True)
            for token, logprob, alternatives in columns:
                entry: dict[str, Any] = {"token": token}
                if logprob is not None:
                    entry["logprob"] = logprob
                entry["bytes"] = list(token.encode("utf-8", "replace"))
                if isinstance(alternatives, dict):
                    picked = list(alternatives.items())
                    if self.top is not None and self.top >= 0:
                        picked = picked[: self.top]
                    entry["top_logprobs"] = [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                        for t, v in picked
                    ]
                out.append(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MalformedStream(f"logprobs not in the completions shape: {raw!r:.80}") from e
        return out

    def keep(self, rendered: dict[str, Any]) -> None:
        """Add one piece's logprobs to those of a whole answer."""
        if self.whole is None:
            self.whole = rendered
            return
        for key, values in rendered.items():
            self.whole[key] += values
