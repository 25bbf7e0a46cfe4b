"""Fuzzing (hypothesis) of the real daemon's HTTP APIs: any request body to the frontend and
any call to the admin API gets an answer (never a 500 or a hang), and the daemon and its
engines are fine afterwards."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    SupervisorProcess,
    _announced,
    sim_slot,
    spawn_supervisor,
)
from supervisor.testing.gpuledger import LEDGER_ENV
from tests.fuzz.test_fuzz_units import json_values

pytestmark = pytest.mark.e2e
EXAMPLES = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    sim = (*FAST_SIM_ARGS, "--sim-itl", "0.0005")
    sup = spawn_supervisor(
        work,
        [sim_slot("s", sim_args=sim)],
        env={LEDGER_ENV: str(work / "ledger.json")},
        frontend={"queue_timeout": 2},
    )
    deadline = time.monotonic() + 60
    while not _announced(sup):
        assert sup.proc.poll() is None and time.monotonic() < deadline, sup.logs()[-3000:]
        time.sleep(0.05)
    yield sup
    assert sup.stop() == 0
    assert "Traceback" not in sup.logs()


JSON = {"Content-Type": "application/json"}


def call(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status(sup: SupervisorProcess) -> dict[str, Any]:
    with urllib.request.urlopen(sup.admin_url + "/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


MESSAGES = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "assistant", "system", "tool", "nobody"])
            | json_values,
            "content": st.text(max_size=30) | json_values,
        },
    ),
    max_size=3,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["sim-model", "other"]) | json_values,
        "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=8) | json_values,
        "messages": MESSAGES | json_values,
        "max_tokens": st.integers(-3, 40) | json_values,
        "stream": st.booleans() | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "n": st.integers(0, 3),
        "stop": st.text(max_size=3) | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
        "logprobs": json_values,
    },
)


def check_alive(sup: SupervisorProcess) -> None:
    st_ = status(sup)
    assert st_["slots"][0]["active"] is not None, st_
    assert sup.proc.poll() is None


@EXAMPLES
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=BODIES,
    raw=st.one_of(st.none(), st.binary(max_size=60)),
)
def test_frontend_answers_any_body_without_a_500(
    daemon: SupervisorProcess, path: str, body: dict[str, Any], raw: bytes | None
) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    code, answer = call(daemon.frontend_url + path, data, {"Content-Type": "application/json"})
    assert code in (200, 400, 404, 413, 422, 503), (code, answer[:300], body)
    if code != 200:
        err = json.loads(answer)
        assert err["error"]["message"], err
    else:
        assert answer  # a complete answer, streamed or not


@EXAMPLES
@given(
    path=st.sampled_from(
        [
            *("/failover", "/switchover", "/switchover/cancel", "/drain", "/gpu/clear"),
            *("/pause", "/resume", "/reload", "/rollout", "/nope"),
        ]
    ),
    body=st.one_of(
        st.binary(max_size=40),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "slot": st.sampled_from(["s", "x"]) | json_values,
                "engine": st.sampled_from(["s-0", "s-9"]) | json_values,
                "to": json_values,
                "gpu": st.sampled_from(["0", "7"]) | json_values,
                "at": st.floats() | st.text(max_size=40) | json_values,
                "after": st.floats(max_value=5) | json_values,
                "for": st.floats(max_value=2) | json_values,
                "until": st.floats() | st.text(max_size=40) | json_values,
                "limit": st.floats(max_value=0.5) | json_values,
                "reason": json_values,
                "slots": st.lists(st.sampled_from(["s", "x"])) | json_values,
                "wait": json_values,
            },
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_admin_answers_any_call_without_a_500(
    daemon: SupervisorProcess, path: str, body: bytes
) -> None:
    code, answer = call(daemon.admin_url + path, body, JSON)
    assert code < 500 or code == 503, (code, answer[:300])


def test_after_fuzzing_the_daemon_still_serves(daemon: SupervisorProcess) -> None:
    for body in (b"{}", b'{"slot": "s"}'):  # a fuzzed pause may still hold failover off
        call(daemon.admin_url + "/resume", body, JSON)
    deadline = time.monotonic() + 30
    while True:  # a fuzzed switchover may be under way: the slot serves again soon
        try:
            check_alive(daemon)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    body = json.dumps({"model": "sim-model", "prompt": "still here", "max_tokens": 3}).encode()
    code, _ = call(daemon.frontend_url + "/v1/completions", body)
    assert code == 200
