"""The relay's own rendering of logprobs, echo and what engines are asked (no I/O)."""

from __future__ import annotations

from typing import Any

from supervisor.frontend.extras import Extras
from supervisor.openai_shapes import token_continuation
from supervisor.requests import ClientRequest, Progress

MESSAGES = [{"role": "user", "content": "hi"}]


def columns(tokens: list[str], offsets: list[int]) -> dict[str, Any]:
    return {
        "text_offset": offsets,
        "token_logprobs": [-1.0 - i for i in range(len(tokens))],
        "tokens": tokens,
        "top_logprobs": [{t: -1.0 - i, "x": -5.0, "y": -6.0} for i, t in enumerate(tokens)],
    }


def test_a_completions_continuation_goes_on_from_where_the_text_stood() -> None:
    extras = Extras(ClientRequest("completion", {"prompt": "p", "logprobs": 2}))
    first = extras.render([columns([" the", " river"], [0, 4])])
    assert first["text_offset"] == [0, 4]
    extras.new_attempt()  # a seam: the next engine's offsets start at 0 again
    after = extras.render([columns([" and"], [0]), columns([" stone"], [4])])
    assert after["text_offset"] == [10, 14] and after["tokens"] == [" and", " stone"]


def test_completions_columns_become_chat_entries_as_vllm_builds_them() -> None:
    body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    extras = Extras(ClientRequest("chat", body))
    out = extras.render([columns(["é"], [0])])
    (entry,) = out["content"]
    assert entry["token"] == "é" and entry["logprob"] == -1.0
    assert entry["bytes"] == [0xC3, 0xA9]
    # the first top_logprobs of the alternatives, in the engine's order
    assert [a["token"] for a in entry["top_logprobs"]] == ["é", "x"]
    # chat entries from a chat engine pass as they are
    native = {"content": [{"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}]}
    assert extras.render([native]) == native


def test_what_engines_are_asked() -> None:
    chat = ClientRequest(
        "chat", {"messages": [*MESSAGES, {"role": "assistant", "content": "Th"}], "echo": True,
                 "add_generation_prompt": False, "logprobs": True, "top_logprobs": 3}
    )  # fmt: skip
    assert chat.echo_text == "Th" and chat.logprobs == 3
    assert "echo" not in chat.for_engines().body  # the relay echoes, once
    comp = ClientRequest("completion", {"prompt": "the", "echo": True, "logprobs": 1})
    assert comp.echo_text == "the"
    assert comp.for_engines().body["echo"] is True  # the prompt's logprobs come with it
    assert ClientRequest("completion", {"prompt": "the", "echo": True}).for_engines().body == {
        "prompt": "the"
    }
    ids = ClientRequest("completion", {"prompt": "the", "echo": True, "return_token_ids": True})
    assert ids.echo_text == ""  # vLLM echoes only the ids then
    # A continuation asks for the answer's logprobs on /v1/completions, nothing of the prompt.
    chat_asked = ClientRequest("chat", {**chat.body, "model": "m", "prompt_logprobs": 1,
                                        "max_tokens": 9})  # fmt: skip
    up = token_continuation(chat_asked, Progress([7], [1, 2]), "r", rid_field=None)
    assert up is not None
    assert up.body["logprobs"] == 3 and "top_logprobs" not in up.body
    assert not {"echo", "prompt_logprobs", "suffix"} & set(up.body)
