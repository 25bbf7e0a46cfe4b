"""The chunks of a simulated engine's answers: OpenAI completion and chat bodies (streamed
or whole, with logprobs), SGLang's native ``/generate`` events, and embeddings."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from supervisor.testing.simengine import Token
from supervisor.testing.simoptions import SimOptions
from supervisor.testing.simtokenizer import SimTokenizer, prompt_contexts, token_logprobs

EMBEDDING_SIZE = 32  # the simulated embedding model's hidden size
REASONING_TOKENS = 4  # a chat answer's reasoning, where a reasoning parser is on
SYSTEM_FINGERPRINT = "simulated"


class GenerateShape:
    """SGLang ``/generate`` events: cumulative text and ids unless incremental output is on."""

    def __init__(self, rid: str, prompt_tokens: int, *, incremental: bool) -> None:
        self.rid, self.prompt_tokens, self.incremental = rid, prompt_tokens, incremental
        self.ids: list[int] = []
        self.text = ""
        self.new_ids: list[int] = []
        self.new_text = ""
        self.fin: dict[str, Any] | None = None

    def add(self, tok: Token) -> None:
        self.ids.append(tok.id)
        self.text += tok.text
        if tok.answer_length is not None:
            self.text = self.text[: tok.answer_length]  # trimmed at the stop string
        self.new_ids.append(tok.id)
        self.new_text += tok.text
        if tok.finish_reason == "length":
            self.fin = {"type": "length", "length": len(self.ids)}
        elif tok.finish_reason == "stop":
            self.fin = {"type": "stop", "matched": tok.stop_reason or tok.id}

    def event(self, *, final: bool = False) -> dict[str, Any]:
        """The event for what was added since the last one (all of it when cumulative)."""
        incr = self.incremental and not final
        new_ids, new_text = self.new_ids, self.new_text
        self.new_ids, self.new_text = [], ""
        return {
            "text": new_text if incr else self.text,
            "output_ids": new_ids if incr else list(self.ids),
            "meta_info": {
                "id": self.rid,
                "finish_reason": self.fin,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.ids),
                "cached_tokens": 0,
            },
            "index": 0,
        }


class OpenAIShape:
    """Builds one request's OpenAI chunks and full responses (every choice of it)."""

    def __init__(self, rid: str, model: str, chat: bool, with_ids: bool, prompt: list[int]):
        self.rid, self.model, self.chat, self.with_ids = rid, model, chat, with_ids
        self.prompt = prompt
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.started: set[int] = set()  # the choices whose first chunk went
        self.continuous = False  # usage in every chunk
        self.include_usage = False  # a usage chunk at the end
        self.reasoning = 0  # tokens of reasoning_content each answer opens with
        self.reasoning_left = 0  # tokens still to go to reasoning_content
        self.tool: str | None = None  # the tool this answer calls
        self.tool_started = False
        self.choice = 0  # the choice being streamed
        # Logprobs: completions' ``logprobs`` or chat's ``top_logprobs`` (None: not asked);
        # prompt logprobs; an echo (text, and whether a completion echoes its ids).
        self.logprobs: int | None = None
        self.prompt_logprobs: int | None = None
        self.echo = ""
        self.echo_prompt = False
        self.offsets: dict[int, int] = {}  # completions: each choice's next text_offset
        self.tok: SimTokenizer | None = None

    def sampling_extras(self, body: dict[str, Any], tok: SimTokenizer) -> None:
        """Logprobs, prompt logprobs and echo, as vLLM reads them."""
        self.tok = tok
        if self.chat:
            if body.get("logprobs"):
                self.logprobs = body.get("top_logprobs") or 0
        elif body.get("logprobs") is not None:
            self.logprobs = body["logprobs"]
        self.prompt_logprobs = body.get("prompt_logprobs")
        if not body.get("echo"):
            return
        if self.chat:
            # vLLM: an echo asks the prompt's logprobs as top_logprobs (a whole answer
            # returns them), and echoes the last message when its role is the answer's.
            if self.prompt_logprobs is None:
                self.prompt_logprobs = body.get("top_logprobs")
            msgs = body["messages"]
            role = "assistant" if body.get("add_generation_prompt", True) else msgs[-1]["role"]
            if msgs[-1].get("role") == role:
                content = msgs[-1].get("content") or ""
                if isinstance(content, list):
                    content = "\n".join(p.get("text", "") for p in content)
                self.echo = content
            return
        if self.prompt_logprobs is None:
            self.prompt_logprobs = self.logprobs
        self.echo_prompt = True
        # With token ids asked, vLLM echoes the ids and no text.
        self.echo = "" if body.get("return_token_ids") else tok.decode(self.prompt)

    def answer_mode(self, body: dict[str, Any], opts: SimOptions) -> None:
        """Reasoning first (a reasoning parser is on), or a tool call (tools were given,
        a tool parser is on, and tool_choice is not "none")."""
        if opts.reasoning_parser:
            self.reasoning = self.reasoning_left = REASONING_TOKENS
        tools = body.get("tools")
        if (
            opts.tool_parser
            and isinstance(tools, list)
            and tools
            and body.get("tool_choice") != "none"
        ):
            fn = tools[0].get("function") if isinstance(tools[0], dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                self.tool = fn["name"]

    # -- logprobs --------------------------------------------------------------------
    def _piece(self, tid: int) -> str:
        assert self.tok is not None
        return self.tok.piece(tid) or self.tok.decode([tid])

    def _positions(self, toks: list[Token]) -> list[tuple[str, float | None, list[Any]]]:
        """Each token's text, logprob and alternatives (the chosen token first)."""
        k = self.logprobs or 0
        out: list[tuple[str, float | None, list[Any]]] = []
        for t in toks:
            alts = token_logprobs(t.context, t.id, max(k, 1))
            # (the chosen token named as its entry is: a byte's text may be "" so far)
            named = [(t.piece, alts[0][1])] + [(self._piece(a), v) for a, v in alts[1:]]
            out.append((t.piece, alts[0][1], named))
        return out

    def _prompt_positions(self) -> list[tuple[str, float | None, list[Any]]]:
        """The prompt's tokens as logprob positions (the first has no logprob)."""
        k = self.prompt_logprobs if self.prompt_logprobs is not None else (self.logprobs or 0)
        out: list[tuple[str, float | None, list[Any]]] = []
        for i, (tid, ctx) in enumerate(zip(self.prompt, prompt_contexts(self.prompt), strict=True)):
            if i == 0:
                out.append((self._piece(tid), None, []))
                continue
            alts = token_logprobs(ctx, tid, k + 1)
            out.append((self._piece(tid), alts[0][1], [(self._piece(a), v) for a, v in alts]))
        return out

    def _completion_logprobs(
        self, positions: list[tuple[str, float | None, list[Any]]], index: int
    ) -> dict[str, Any]:
        k = self.logprobs or 0
        offset = self.offsets.get(index, 0)
        out: dict[str, list[Any]] = {
            "text_offset": [],
            "token_logprobs": [],
            "tokens": [],
            "top_logprobs": [],
        }
        for token, logprob, alts in positions:
            out["text_offset"].append(offset)
            out["token_logprobs"].append(logprob)
            out["tokens"].append(token)
            # (vLLM keeps alternatives up to index k, in a map by their text)
            out["top_logprobs"].append(dict(alts[: k + 1]) if logprob is not None else None)
            offset += len(token)
        self.offsets[index] = offset
        return out

    def _chat_logprobs(self, positions: list[tuple[str, float | None, list[Any]]]) -> Any:
        k = self.logprobs or 0
        content = []
        for token, logprob, alts in positions:
            content.append(
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode("utf-8", "replace")),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                        for t, v in alts[:k]
                    ],
                }
            )
        return {"content": content}

    def _prompt_logprobs_field(self) -> list[Any] | None:
        """vLLM's ``prompt_logprobs`` of a whole answer: per prompt token, a map from token
        ids to their logprob, rank and text (the prompt's own token first)."""
        if self.prompt_logprobs is None:
            return None
        k = self.prompt_logprobs
        out: list[Any] = [None]
        contexts = prompt_contexts(self.prompt)
        for tid, ctx in list(zip(self.prompt, contexts, strict=True))[1:]:
            alts = token_logprobs(ctx, tid, k + 1)
            entry = {}
            for rank, (a, v) in enumerate(alts):
                r = 1 + ctx % 4000 if rank == 0 else rank
                entry[str(a)] = {"logprob": v, "rank": r, "decoded_token": self._piece(a)}
            out.append(entry)
        return out

    # -- chunks ----------------------------------------------------------------------
    def _delta(self, text: str, n_toks: int, last: bool) -> dict[str, Any]:
        if self.reasoning_left > 0:
            self.reasoning_left -= n_toks
            return {"reasoning_content": text}
        if self.tool is None:
            return {"content": text}
        call: dict[str, Any] = {"index": 0}
        args = json.dumps(text)[1:-1]
        if not self.tool_started:
            self.tool_started = True
            call.update(id=f"chatcmpl-tool-{self.rid[-8:]}", type="function")
            call["function"] = {"name": self.tool, "arguments": '{"text": "' + args}
        else:
            call["function"] = {"arguments": args}
        if last:
            call["function"]["arguments"] += '"}'
        return {"tool_calls": [call]}

    def _head(self) -> dict[str, Any]:
        return {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model}

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        d = self._head()
        d["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        if self.with_ids:
            d["prompt_token_ids"] = self.prompt
            self.started.add(index)
        if self.continuous:
            d["usage"] = self.usage(0)
        return d

    def echo_chunk(self, index: int = 0) -> dict[str, Any]:
        """A chat answer's echo of the last message (after the role chunks)."""
        d = self._head()
        d["choices"] = [
            {"index": index, "delta": {"content": self.echo}, "logprobs": None,
             "finish_reason": None}
        ]  # fmt: skip
        if self.continuous:
            d["usage"] = self.usage(0)
        return d

    def chunk(self, toks: list[Token], n: int, index: int = 0) -> dict[str, Any]:
        """One event for ``toks`` (one token, or several with a stream interval) of choice
        ``index``; ``n``: the tokens that choice generated so far."""
        if index != self.choice:  # the next choice begins: its own answer mode
            self.choice, self.reasoning_left, self.tool_started = index, self.reasoning, False
        d = self._head()
        ch: dict[str, Any] = {"index": index}
        text = "".join(t.text for t in toks)
        finish = toks[-1].finish_reason
        first = index not in self.started
        positions = self._positions(toks) if self.logprobs is not None else []
        if self.chat:
            ch["delta"] = self._delta(text, len(toks), finish is not None)
            if finish and self.tool is not None and finish != "abort":
                finish = "tool_calls"
        else:
            if first and self.echo_prompt:
                text = self.echo + text
                positions = self._prompt_positions() + positions if positions else []
            ch["text"] = text
        if self.logprobs is None or finish == "abort":
            ch["logprobs"] = None
        elif self.chat:
            ch["logprobs"] = self._chat_logprobs(positions)
        else:
            ch["logprobs"] = self._completion_logprobs(positions, index)
        ch["finish_reason"] = finish
        ch["stop_reason"] = toks[-1].stop_reason
        if not self.chat and first and (self.with_ids or self.echo_prompt):
            ch["prompt_token_ids"] = self.prompt  # (vLLM: with an echo, asked or not)
        if self.with_ids:
            ch["token_ids"] = [t.id for t in toks]
            if first and self.chat:
                ch["prompt_token_ids"] = self.prompt
        self.started.add(index)
        d["choices"] = [ch]
        if self.continuous:
            d["usage"] = self.usage(n)
        if finish and not self.include_usage:  # (vLLM: else on the usage chunk)
            d["system_fingerprint"] = SYSTEM_FINGERPRINT
        return d

    def abort_chunk(self) -> dict[str, Any]:
        """The last chunk of a request the engine aborted: no text, no token."""
        d = self.chunk([Token(0, "", "abort")], 0, self.choice)
        d.pop("usage", None)
        if self.with_ids:
            d["choices"][0]["token_ids"] = []
        return d

    def usage(self, n: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.prompt) + n,
        }

    def usage_chunk(self, n: int) -> dict[str, Any]:
        d = self._head()
        d["choices"] = []
        d["usage"] = self.usage(n)
        d["system_fingerprint"] = SYSTEM_FINGERPRINT
        return d

    def full(self, toks: list[Token]) -> dict[str, Any]:
        return self.full_choices([toks])

    def _choice(self, toks: list[Token], index: int) -> dict[str, Any]:
        self.reasoning_left = self.reasoning
        last = toks[-1] if toks else None
        reasoning = "".join(t.text for t in toks[: self.reasoning_left])
        text = "".join(t.text for t in toks[self.reasoning_left :])
        ch: dict[str, Any] = {
            "index": index,
            "logprobs": None,
            "finish_reason": last.finish_reason if last else "length",
            "stop_reason": last.stop_reason if last else None,
        }
        positions = self._positions(toks) if self.logprobs is not None else []
        if self.chat:
            ch["message"] = {"role": "assistant", "content": self.echo + text}
            if self.reasoning_left:
                ch["message"]["reasoning_content"] = reasoning
            if self.tool is not None:
                ch["message"]["content"] = None
                ch["message"]["tool_calls"] = [
                    {
                        "id": f"chatcmpl-tool-{self.rid[-8:]}",
                        "type": "function",
                        "function": {"name": self.tool, "arguments": json.dumps({"text": text})},
                    }
                ]
                ch["finish_reason"] = "tool_calls"
            if self.logprobs is not None:
                ch["logprobs"] = self._chat_logprobs(positions)
        else:
            ch["text"] = self.echo + text
            if self.logprobs is not None:
                if self.echo_prompt:
                    positions = self._prompt_positions() + positions
                ch["logprobs"] = self._completion_logprobs(positions, index)
            ch["prompt_logprobs"] = self._prompt_logprobs_field()
        if self.with_ids:
            ch["token_ids"] = [t.id for t in toks]
            if not self.chat:
                ch["prompt_token_ids"] = self.prompt
        return ch

    def full_choices(self, answers: list[list[Token]]) -> dict[str, Any]:
        """The whole answer: one choice per generated list of tokens."""
        d: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(toks, i) for i, toks in enumerate(answers)],
            "usage": self.usage(sum(len(toks) for toks in answers)),
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if self.chat:
            d["prompt_logprobs"] = self._prompt_logprobs_field()
            if self.with_ids:
                d["prompt_token_ids"] = self.prompt
        return d


def embedding_of(ids: list[int]) -> list[float]:
    """A unit vector that depends on the token ids alone (so every engine agrees)."""
    vec = [0.0] * EMBEDDING_SIZE
    for pos, tok in enumerate(ids):
        for j in range(EMBEDDING_SIZE):
            vec[j] += math.sin((tok + 1) * (j + 1) * 0.618 + pos * 0.1)
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
