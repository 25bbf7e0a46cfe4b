"""Request-body parsing limits (supervisor/jsonbody.py)."""

from __future__ import annotations

import json

import pytest

from supervisor.jsonbody import BadJson, parse


def nested(levels: int) -> bytes:
    return ("[" * levels + "]" * levels).encode()


def test_nesting_past_the_limit_is_refused_and_at_it_accepted() -> None:
    assert parse(nested(8), max_depth=8) is not None
    with pytest.raises(BadJson, match="deeper than 8"):
        parse(nested(9), max_depth=8)
    deep_dict = b'{"a":' * 9 + b"1" + b"}" * 9
    with pytest.raises(BadJson):
        parse(deep_dict, max_depth=8)


def test_brackets_inside_strings_do_not_make_a_body_deep() -> None:
    # More brackets in the text than levels allowed: the value is walked, and passes.
    body = json.dumps({"prompt": "[{" * 500, "stop": ["]"]}).encode()
    assert parse(body, max_depth=8)["prompt"] == "[{" * 500


def test_a_long_token_id_prompt_parses_whole() -> None:
    ids = list(range(100_000))
    body = json.dumps({"model": "m", "prompt": ids}).encode()
    assert parse(body, max_depth=8)["prompt"] == ids


@pytest.mark.parametrize(
    ("raw", "why"),
    [(b'{"a": "\\ud800"}', "Unicode"), (b"\xff\xfe", "Unicode"), (b"{", "not valid JSON")],
)
def test_bad_bodies_say_why(raw: bytes, why: str) -> None:
    with pytest.raises(BadJson, match=why):
        parse(raw)
