"""What the decoders say about a stream: an engine's own error for one request is not the
same as garbage (which means the engine is broken)."""

import pytest

from plugins.sglang import GenerateStreamDecoder
from supervisor.backends import EngineReportedError, MalformedStream
from supervisor.openai_shapes import OpenAIStreamDecoder


def test_an_error_event_is_the_engines_word_about_one_request() -> None:
    with pytest.raises(EngineReportedError):
        OpenAIStreamDecoder().feed(b'{"error": {"message": "boom", "code": 500}}')


def test_an_sglang_abort_is_the_engines_word_about_one_request() -> None:
    event = (
        b'{"text": "", "output_ids": [], "meta_info": {"id": "r", "completion_tokens": 0,'
        b' "finish_reason": {"type": "abort", "message": "Abort request r"}}}'
    )
    with pytest.raises(EngineReportedError):
        GenerateStreamDecoder().feed(event)


@pytest.mark.parametrize("data", [b"{not json", b"[1]", b'{"choices": 3}'])
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedStream):
        OpenAIStreamDecoder().feed(data)
