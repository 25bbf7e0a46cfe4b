"""Every route besides completions and chat, through the real daemon and simulated vLLM
engines, with the ``openai`` client where it has the route: embeddings, tokenizing, the
Responses API (whole and streamed), unknown ``/v1/`` routes, and which engine served
(``X-Failover-Engine``), also across a failure."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import FAST_SIM_ARGS, sim_slot, start_supervisor
from supervisor.upstream import iter_sse_data
from tests.e2e.test_frontend import Cluster

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

openai = pytest.importorskip("openai")
SIM = (*FAST_SIM_ARGS, "--sim-drain-timeout", "0.1")
ASK = {"model": "sim-model", "input": "Tell me of the river.", "temperature": 0}


@pytest.fixture
async def cluster(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    sup = await start_supervisor(
        tmp_path,
        [sim_slot("s", sim_args=SIM)],
        health={"stall_timeout": 1.0},
        frontend={"migration_wait": 10, "engine_header": True},
    )
    try:
        yield Cluster(sup, session)
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]


def client(cluster: Cluster) -> Any:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


async def test_embeddings_and_tokenizing_pass_through(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """The engine's own answers, through the frontend, with the engine named; counted
    under the route's label, and named in the access log."""
    active = await cluster.active()

    def embed() -> Any:
        return client(cluster).embeddings.with_raw_response.create(
            model="sim-model", input=["the river", "the harbor"]
        )

    raw = await anyio.to_thread.run_sync(embed)
    assert raw.headers["X-Failover-Engine"] == active["id"]
    got = raw.parse()
    assert [d.index for d in got.data] == [0, 1] and len(got.data[0].embedding) > 8
    async with session.post(
        active["url"] + "/v1/embeddings", json={"model": "sim-model", "input": ["the river"]}
    ) as r:
        direct = await r.json()
    assert got.data[0].embedding == pytest.approx(direct["data"][0]["embedding"])
    async with session.post(
        cluster.url + "/tokenize", json={"model": "sim-model", "prompt": "the river"}
    ) as r:
        assert r.status == 200 and r.headers["X-Failover-Engine"] == active["id"]
        tokens = (await r.json())["tokens"]
    async with session.post(cluster.url + "/detokenize", json={"tokens": tokens}) as r:
        assert r.status == 200, await r.text()  # no model: any engine
        assert (await r.json())["prompt"] == "the river"
    metrics = await cluster.metrics()
    assert 'route="/v1/embeddings",status="200"' in metrics, metrics
    assert 'route="/detokenize",status="200"' in metrics
    assert f'"engine": "{active["id"]}"' in cluster.sup.logs()


async def test_responses_whole_and_streamed(cluster: Cluster) -> None:
    """The Responses API through the openai client: the streamed events add up to the
    whole answer's text, numbered in order, ending with ``response.completed``."""

    def ask() -> tuple[Any, list[Any]]:
        c = client(cluster)
        whole = c.responses.create(**ASK, max_output_tokens=12)
        events = list(c.responses.create(**ASK, max_output_tokens=12, stream=True))
        return whole, events

    whole, events = await anyio.to_thread.run_sync(ask)
    assert whole.status == "incomplete" and whole.usage.output_tokens == 12
    assert whole.output_text
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text == events[-1].response.output_text


async def test_unknown_routes_and_models(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Any other /v1/ route reaches an engine, whose own answer comes back; a model no
    engine serves is the frontend's 404 in OpenAI's shape; other paths stay unrouted."""
    async with session.post(cluster.url + "/v1/no/such/route", json={"model": "sim-model"}) as r:
        assert r.status == 404
        assert await r.json() == {"detail": "Not Found"}  # the engine's own words
        assert "X-Failover-Engine" in r.headers

    def unknown_model() -> Any:
        with pytest.raises(openai.NotFoundError) as e:
            client(cluster).embeddings.create(model="no-such-model", input="x")
        return e.value

    err = await anyio.to_thread.run_sync(unknown_model)
    assert err.code == "model_not_found" and err.body["param"] == "model"
    async with session.post(cluster.url + "/not/v1", json={}) as r:
        assert r.status == 404 and "X-Failover-Engine" not in r.headers
    async with session.get(cluster.url + "/v1/embeddings") as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    json_type = {"Content-Type": "application/json"}
    async with session.post(cluster.url + "/v1/embeddings", data=b"{nope", headers=json_type) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    for model, status in (("no-such-model", 404), ("sim-model", 404)):
        # An audio upload names its model in the form: the frontend's 404 for a model no
        # engine serves; the engine's own 404 for the route (the simulator has no audio).
        form = aiohttp.FormData()
        form.add_field("model", model)
        form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
        async with session.post(cluster.url + "/v1/audio/transcriptions", data=form) as r:
            answer = await r.json()
            assert r.status == status
            if model == "sim-model":
                assert answer == {"detail": "Not Found"} and "X-Failover-Engine" in r.headers
            else:
                assert answer["error"]["code"] == "model_not_found"
    metrics = await cluster.metrics()
    assert 'route="/v1/*",status="404"' in metrics
    assert 'route="/v1/audio/transcriptions",status="404"' in metrics


async def test_a_whole_answer_is_asked_again_when_its_engine_dies(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """The engine is SIGKILLed before its whole answer comes: the request goes once more,
    to the slot's woken shadow, and the client gets one answer, with both engines named."""
    body = {**ASK, "max_output_tokens": 12}
    async with session.post(cluster.url + "/v1/responses", json=body) as r:
        unbroken = await r.json()
    await cluster.full_strength()
    victim = await cluster.active()
    await cluster.faults(victim, kill_after_tokens=4)
    async with session.post(cluster.url + "/v1/responses", json=body) as r:
        assert r.status == 200, await r.text()
        engines = r.headers["X-Failover-Engine"].split(",")
        got = await r.json()
    assert got["output"][0]["content"][0]["text"] == unbroken["output"][0]["content"][0]["text"]
    assert len(engines) == 2 and engines[0] == victim["id"] and engines[1] != victim["id"]
    assert engines[1] == (await cluster.active())["id"]
    assert "engine failed before answering; asking another" in cluster.sup.logs()


async def test_a_broken_responses_stream_ends_with_an_error_event(cluster: Cluster) -> None:
    """A streamed Responses answer whose engine is SIGKILLed mid-answer ends cleanly: the
    events sent, then one ``error`` event numbered after them (never half an event)."""
    await cluster.full_strength()
    victim = await cluster.active()
    await cluster.faults(victim, kill_after_tokens=5)

    def ask() -> list[Any]:
        return list(client(cluster).responses.create(**ASK, max_output_tokens=30, stream=True))

    events = await anyio.to_thread.run_sync(ask)
    assert events[-1].type == "error" and "cannot be resumed" in events[-1].message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.completed" not in [e.type for e in events]
    assert any(e.type == "response.output_text.delta" for e in events)


async def test_the_engine_header_names_every_engine_of_a_migrated_completion(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    """A completion stream SIGKILLed mid-way: the head names the first engine, and the
    chunk after the seam names both, in order; a whole answer's header names both."""
    body = {
        "model": "sim-model",
        "prompt": "the lantern",
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    for stream in (True, False):
        await cluster.full_strength()
        victim = await cluster.active()
        await cluster.faults(victim, kill_after_tokens=10)
        async with session.post(
            cluster.url + "/v1/completions", json={**body, "stream": stream}
        ) as r:
            assert r.status == 200, await r.text()
            header = r.headers["X-Failover-Engine"]
            if stream:
                reports = [
                    json.loads(data)["failover"]
                    async for data in iter_sse_data(r)
                    if b'"failover"' in data
                ]
            else:
                reports = [(await r.json())["failover"]]
        survivor = (await cluster.active())["id"]
        assert survivor != victim["id"]
        assert reports[0]["engines"] == [victim["id"], survivor], reports
        if stream:
            assert header == victim["id"]
        else:
            assert header == f"{victim['id']},{survivor}"


async def test_forwarded_routes_share_auth_and_admission(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The API key guards every forwarded route; an engine busy with a forwarded stream is
    full for everyone (503 with Retry-After at once, with no queue); the engine header is
    off by default."""
    key = tmp_path / "api-key"
    key.write_text("client-secret\n")
    sup = await start_supervisor(
        tmp_path,
        [sim_slot("s", shadows=0, sim_args=(*FAST_SIM_ARGS, "--sim-itl", "0.05"))],
        frontend={"api_key_file": str(key), "max_inflight_per_engine": 1, "max_queue": 0},
    )
    auth = {"Authorization": "Bearer client-secret"}
    try:
        url = sup.frontend_url
        async with session.post(url + "/tokenize", json={"prompt": "the river"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        async with session.post(url + "/tokenize", json={"prompt": "x"}, headers=auth) as r:
            assert r.status == 200 and "X-Failover-Engine" not in r.headers
        body = {**ASK, "max_output_tokens": 40, "stream": True}
        async with session.post(url + "/v1/responses", json=body, headers=auth) as stream:
            assert stream.status == 200
            await stream.content.readline()  # the stream is under way: the engine is full
            emb = {"model": "sim-model", "input": "x"}
            async with session.post(url + "/v1/embeddings", json=emb, headers=auth) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "unavailable"
            rest = await stream.read()
        assert b"response.completed" in rest
        async with session.post(url + "/v1/embeddings", json=emb, headers=auth) as r:
            assert r.status == 200
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0, sup.logs()[-3000:]
