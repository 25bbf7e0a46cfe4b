"""SseSplitter, fed a stream in pieces cut anywhere, gives exactly the payloads that the SSE
rules give for the whole stream (the one-``data:``-line-per-event fast path included)."""

from __future__ import annotations

import itertools
import random
import re
import time

from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.backends import MalformedStream
from supervisor.config import FrontendConfig
from supervisor.events import DONE, SseSplitter, _event_data

LIMIT = FrontendConfig.max_event_bytes


def reference(stream: bytes) -> tuple[list[bytes], bool, bool]:
    """Payloads up to [DONE], whether [DONE] came, whether a line was not SSE: the whole
    stream cut at its blank lines, each event read by the line-by-line rules."""
    out: list[bytes] = []
    for event in stream.split(b"\n\n")[:-1]:  # the last part is not a complete event
        try:
            data = _event_data(event)
        except MalformedStream:
            return out, False, True
        if data is None:
            continue
        if data == DONE:
            return out, True, False
        out.append(data)
    return out, False, False


def split(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bool, bool]:
    sse = SseSplitter(LIMIT)
    out: list[bytes] = []
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        out.extend(sse.feed(stream[a:b]))
        if sse.done:
            break
    return out, sse.done, isinstance(sse.error, MalformedStream)


payload = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
event = st.one_of(
    payload.map(lambda p: b"data: " + p + b"\n\n"),  # the common event
    payload.map(lambda p: b"data:" + p + b"\n\n"),
    payload.map(lambda p: b"data: " + p + b"\r\n\r\n"),
    payload.map(lambda p: b"data: " + p + b"\r\n\n"),  # CRLF, then LF
    st.tuples(payload, payload).map(lambda t: b"data: " + t[0] + b"\ndata: " + t[1] + b"\n\n"),
    payload.map(lambda p: b"event: message\ndata: " + p + b"\n\n"),
    st.just(b": keep-alive\n\n"),
    st.just(b"\n"),  # a blank line more
    st.just(b"data: [DONE]\n\n"),
    st.just(b"garbage line\n\n"),
)


@settings(max_examples=400, deadline=None)
@example(events=[b"data:  \n\n"], cuts=[])  # one space goes, the second is the value
@example(events=[b"data:  x\n\n", b"data: \n\n"], cuts=[3])
@given(st.lists(event, max_size=12), st.lists(st.integers(min_value=0), max_size=6))
def test_a_stream_cut_anywhere_splits_as_the_rules_say(
    events: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(events)
    got, done, malformed = split(stream, cuts)
    want, want_done, want_malformed = reference(stream)
    assert got == want
    assert malformed == want_malformed
    assert done == (want_done or want_malformed)  # a line that is not SSE ends the stream


def test_the_common_stream_in_one_read() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    sse = SseSplitter(LIMIT)
    assert sse.feed(stream) == [b'{"a": 1}', b'{"b": 2}'] and sse.done


def test_long_events_cut_anywhere_split_as_the_rules_say() -> None:
    """Events far longer than one read (a prompt's logprobs), cut at random places: past
    a few KiB the splitter keeps the reads apart and joins them once the event ends, and
    each read gives the events it ends (no later), blank lines that straddle two reads
    included."""
    rng = random.Random(3)
    stream = b"".join(
        b"data: " + bytes([97 + i]) * rng.randint(1, 100_000) + b"\n\n" for i in range(12)
    )
    stream += b": a comment\n\ndata: [DONE]\n\n"
    want = reference(stream)
    blanks = [m.start() + 1 for m in re.finditer(b"\n\n", stream)]
    for _ in range(10):
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(1, 60))]
        # Cut between the two newlines of some blank lines, too.
        cuts += rng.sample(blanks, 4)
        assert split(stream, cuts) == want
        sse, got = SseSplitter(LIMIT), []
        for a, b in itertools.pairwise(sorted({0, len(stream), *cuts})):
            got += sse.feed(stream[a:b])
            assert got == reference(stream[:b])[0]


def test_an_event_that_never_ends_is_malformed_past_the_bound() -> None:
    """An engine that sends one endless line: the events before it are given, then the
    stream is malformed once the line passes the bound, with no more than one read held
    beyond it; and its bytes are not copied again on every read (time linear in them)."""
    limit = 1024 * 1024
    sse = SseSplitter(limit)
    assert sse.feed(b"data: 1\n\ndata: 2") == [b"1"]
    fed = 7
    piece = b"x" * 65536
    started = time.process_time()
    while not sse.done and fed <= limit + len(piece):
        assert sse.feed(piece) == []
        fed += len(piece)
    assert sse.done and fed <= limit + len(piece)
    assert isinstance(sse.error, MalformedStream) and "max_event_bytes" in str(sse.error)
    assert not sse.pending  # nothing kept
    # 32 MiB of one line under a bound above it: linear (it took 25 s of CPU when every
    # read copied and searched what had come before).
    sse = SseSplitter(64 * 1024 * 1024)
    for _ in range(512):
        sse.feed(piece)
    assert sse.feed(b"\n\n") == [] and isinstance(sse.error, MalformedStream)  # no "data:"
    assert time.process_time() - started < 5.0
