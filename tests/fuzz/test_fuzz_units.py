"""Fuzzing (hypothesis) of what reads untrusted input without a server: config files,
engines' stream events and clients' request heads. Anything may come in; only our own
errors may come out."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.backends import BackendError, load_backend
from supervisor.config import ConfigError, load, parse
from supervisor.frontend.heads import HeadError, parse_head
from supervisor.requests import UpstreamRequest

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

CONFIG_KEYS = {
    "node": ["name", "state_dir", "on_exit", "engine_host"],
    "admin": ["host", "port", "token_file"],
    "health": ["probe_interval", "probe_timeout", "failure_threshold", "load_timeout"],
    "failover": ["wake_timeout", "shadow_sleep_level", "stop_grace", "kill_dead_group"],
    "frontend": ["enabled", "port", "max_queue", "migration_limit", "max_body_bytes"],
    "gpu": ["xid_source", "nvml", "pci"],
    "cluster": ["etcd_endpoints", "nats_servers", "lease_ttl", "heartbeat_interval", "name"],
}
SLOT_KEYS = [
    "name", "model", "backend", "base_port", "shadows", "placement", "gpus", "shadow_gpus",
    "simulate", "hosts", "group_size", "group_rank", "suspend", "serve_requests", "env",
]  # fmt: skip
GOOD_SLOT = {"name": "a", "model": "m", "backend": "vllm", "base_port": 9000, "simulate": True}


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    """Mostly-valid configs with a few keys set to anything (the likely mistakes)."""
    data: dict[str, Any] = {}
    for table in draw(st.lists(st.sampled_from(sorted(CONFIG_KEYS)), max_size=4, unique=True)):
        data[table] = {
            k: draw(json_values)
            for k in draw(st.lists(st.sampled_from(CONFIG_KEYS[table]), max_size=3, unique=True))
        }
    slots = []
    for _ in range(draw(st.integers(0, 2))):
        slot = dict(GOOD_SLOT)
        for k in draw(st.lists(st.sampled_from(SLOT_KEYS), max_size=3, unique=True)):
            slot[k] = draw(json_values)
        slots.append(slot)
    data["slot"] = draw(st.sampled_from([slots, draw(json_values)]))
    return data


@FAST
@given(configs())
def test_any_config_parses_or_is_a_config_error(data: dict[str, Any]) -> None:
    try:
        parse(data)
    except ConfigError as e:
        assert all(isinstance(p, str) and p for p in e.problems)


@FAST
@given(st.binary(max_size=300))
def test_any_config_file_loads_or_is_a_config_error(raw: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_bytes(raw)
        try:
            load(path, env={})
        except ConfigError:
            pass
        except tomllib.TOMLDecodeError:  # pragma: no cover - load must wrap this
            pytest.fail("a TOML syntax error escaped as TOMLDecodeError")


def _events() -> st.SearchStrategy[bytes]:
    chunk = st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "object": st.sampled_from(["text_completion", "chat.completion.chunk", "x"]),
            "choices": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "index": json_values,
                        "text": json_values,
                        "delta": json_values,
                        "finish_reason": json_values,
                        "token_ids": json_values,
                        "prompt_token_ids": json_values,
                    },
                ),
                max_size=2,
            )
            | json_values,
            "usage": json_values,
            "text": json_values,
            "output_ids": json_values,
            "meta_info": json_values,
            "error": json_values,
        },
    )
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(orjson.dumps),
        chunk.map(lambda d: orjson.dumps(d, option=orjson.OPT_NON_STR_KEYS)),
    )


@pytest.mark.parametrize("backend_name", ["vllm", "sglang", "trtllm", "vllm-gms", "sglang-gms"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
@FAST
@given(events=st.lists(_events(), min_size=1, max_size=6))
def test_engine_garbage_is_a_backend_error_never_a_crash(
    backend_name: str, path: str, events: list[bytes]
) -> None:
    backend = load_backend(backend_name)
    body: dict[str, Any] = (
        {"stream": True, "text": "x"} if path == "/generate" else {"stream": True}
    )
    decoder = backend.decoder(UpstreamRequest(path, body, "rid"))
    for data in events:
        try:
            decoder.feed(data)
        except BackendError:
            return  # MalformedStream / EngineReportedError: handled as an engine failure


# -- the frontend's request heads -----------------------------------------------------------
head_lines = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"Host: x", b"Content-Length: 3", b"Transfer-Encoding: chunked", b"X: \xff\xfe"]
        ),
    ),
    max_size=6,
)
request_lines = st.one_of(
    st.binary(max_size=60),
    st.builds(
        lambda m, t, v: b" ".join([m, t, v]),
        st.sampled_from([b"GET", b"POST", b"", b"G\x00T", b"HEAD"]),
        st.one_of(st.just(b"/v1/completions?x=1"), st.binary(max_size=20)),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1\x00", b""]),
    ),
)


@FAST
@given(request_lines, head_lines)
def test_any_request_head_parses_or_says_why(first: bytes, fields: list[bytes]) -> None:
    try:
        method, path, _, version, headers, length, *_ = parse_head(b"\r\n".join([first, *fields]))
    except HeadError as e:
        assert e.status in (400, 431, 501, 505) and str(e)
        return
    assert method and path.startswith("/") and version in ("1.0", "1.1")
    assert all(k == k.lower() for k in headers) and length >= 0
