"""Every way out of a relayed request gives its engine place back, and a moving stream
never blocks new requests to an engine it cannot use. The relay runs against a real
simulated engine; the plugin is the real vLLM backend with one hook made to fail."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from plugins.vllm import VllmBackend
from supervisor.backends import StreamDecoder
from supervisor.config import FrontendConfig, HealthConfig
from supervisor.frontend.outcome import ClientGone, MigrationFailed
from supervisor.frontend.routing import (
    DEADLINE_GRAIN,
    Deadlines,
    EngineWait,
    Rejected,
    Router,
    Target,
)
from supervisor.frontend.shape import ClientShape
from supervisor.frontend.streams import RequestRelay
from supervisor.metrics import Metrics
from supervisor.model import EngineSpec
from supervisor.requests import ClientRequest, Piece, Progress, UpstreamRequest
from supervisor.sessions import Sessions, open_sessions
from supervisor.testing.cluster import FAST_SIM_ARGS, free_port, running_engine

pytestmark = pytest.mark.anyio


class Directory:
    """The frontend's view of engines: a fixed list (the daemon's is built from slots)."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.reports: list[tuple[str, str]] = []

    def models(self) -> list[str]:
        return ["sim-model"]

    def has_model(self, model: str) -> bool:
        return model == "sim-model"

    def candidates(self, model: str) -> list[Target]:
        return list(self.targets)

    async def changed(self) -> None:
        await anyio.sleep_forever()

    def report_failure(self, engine_id: str, kind: str, reason: str, request_id: str) -> None:
        self.reports.append((engine_id, kind))


class Faulty(VllmBackend):
    """The vLLM backend with one step made to raise."""

    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step

    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        if self.step == "first_request":
            raise RecursionError("maximum recursion depth exceeded")
        return super().first_request(req, request_id)

    def continuation(self, req: ClientRequest, progress: Progress, rid: str) -> UpstreamRequest:
        if self.step == "continuation":
            raise ValueError("plugin bug")
        return super().continuation(req, progress, rid)

    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        if self.step == "decoder":
            raise KeyError("plugin bug")
        inner = super().decoder(upstream)
        step = self.step

        class Decoder:
            n = 0

            def feed(self, data: bytes) -> Piece | None:
                Decoder.n += 1
                if step == "feed" and Decoder.n == 3:
                    raise TypeError("plugin bug mid-stream")
                return inner.feed(data)

        return Decoder()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[str, Sessions]]:
    backend = VllmBackend()
    spec = EngineSpec("e0", "sim-model", free_port())
    async with (
        open_sessions(8) as sessions,
        running_engine(backend, spec, tmp_path, sessions.probes),
    ):
        yield spec.url, sessions


def relay_for(
    router: Router,
    sessions: Sessions,
    emit: Any,
    *,
    cfg: FrontendConfig | None = None,
    body: dict[str, Any] | None = None,
    emit_now: Any = None,
) -> RequestRelay:
    body = body or {"model": "sim-model", "prompt": "the river", "max_tokens": 30, "stream": True}
    return RequestRelay(
        ClientRequest("completion", body),
        "r1",
        ClientShape("completion", "cmpl-r1", "sim-model", 0),
        router,
        sessions,
        cfg or FrontendConfig(migration_wait=0.2),
        HealthConfig(stall_timeout=5),
        Metrics(),
        emit,
        emit_now,
    )


@pytest.mark.parametrize(
    "step", ["first_request", "decoder", "feed", "continuation", "emit_gone", "emit_bug", "cancel"]
)
async def test_every_way_out_releases_the_engine_place(
    engine: tuple[str, Sessions], step: str
) -> None:
    url, sessions = engine
    backend = Faulty(step)
    directory = Directory([Target("e0", url, backend)])
    router = Router(FrontendConfig(), directory, Metrics())
    written: list[bytes] = []

    async def emit(data: bytes) -> None:
        written.append(data)
        if len(written) == 4 and step == "emit_gone":
            raise ClientGone("the client hung up")
        if len(written) == 4 and step == "emit_bug":
            raise RuntimeError("unexpected")
        if len(written) == 4 and step == "continuation":
            router.engine_failed("e0")  # the stream breaks: a continuation is built
        if len(written) == 4 and step == "cancel":
            raise anyio.get_cancelled_exc_class()()

    relay = relay_for(router, sessions, emit)
    with anyio.move_on_after(10) as scope:
        try:
            await relay.run()
        except (
            MigrationFailed,
            ClientGone,
            Rejected,
            RuntimeError,
            KeyError,
            TypeError,
            anyio.get_cancelled_exc_class(),
        ):
            pass
    assert not scope.cancelled_caught, "the relay hung"
    assert router.inflight.get("e0", 0) == 0, f"{step}: the engine place leaked"
    assert router.leases.get("e0", set()) == set()


class BrokenDirectory(Directory):
    """A directory with a bug that shows once ``broken`` is set (the router is compiled
    in production, and a compiled class takes no subclass: the bug comes from here)."""

    broken = False

    def candidates(self, model: str) -> list[Target]:
        if self.broken:
            raise ValueError("list.remove(x): x not in list")
        return super().candidates(model)


async def test_a_bug_routing_a_moving_stream_ends_it_as_a_failed_migration(
    engine: tuple[str, Sessions],
) -> None:
    # The client's answer has begun: it gets a clean migration failure (the frontend sends
    # it as an error event), not the 500 of an unexpected exception.
    url, sessions = engine
    directory = BrokenDirectory([Target("e0", url, VllmBackend())])
    router = Router(FrontendConfig(), directory, Metrics())
    written: list[bytes] = []

    async def emit(data: bytes) -> None:
        written.append(data)
        if len(written) == 4:
            directory.broken = True
            router.engine_failed("e0")  # the stream breaks: it moves, into the bug

    relay = relay_for(router, sessions, emit)
    with anyio.fail_after(10), pytest.raises(MigrationFailed, match="internal error"):
        await relay.run()
    assert relay.attempt == 1
    assert router.inflight["e0"] == 0
    counted = [
        (sample.labels["result"], sample.value)
        for family in relay.metrics.migrations.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    ]
    assert counted == [("failed", 1.0)]


async def test_a_failed_client_write_ends_the_request_and_is_never_a_migration(
    engine: tuple[str, Sessions],
) -> None:
    # aiohttp raises ClientConnectionResetError (a ClientConnectionError, like an upstream
    # reset) when writing to a client that hung up: the request must end, not migrate.
    url, sessions = engine
    directory = Directory([Target("e0", url, VllmBackend())])
    router = Router(FrontendConfig(), directory, Metrics())
    written: list[bytes] = []

    async def emit(data: bytes) -> None:
        written.append(data)
        if len(written) == 3:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    relay = relay_for(router, sessions, emit)
    with pytest.raises(ClientGone):
        await relay.run()
    assert relay.attempt == 0  # no second engine was asked
    assert directory.reports == []  # and the engine was not blamed
    assert router.inflight["e0"] == 0


async def test_a_waiting_migration_does_not_block_new_requests_elsewhere() -> None:
    # A moving stream that may not go back to engine a waits for another engine; meanwhile
    # new requests are served by a, which has room.
    backend = VllmBackend()
    directory = Directory([Target("a", "http://127.0.0.1:1", backend)])
    router = Router(FrontendConfig(max_inflight_per_engine=4), directory, Metrics())
    async with anyio.create_task_group() as tg:

        async def moving() -> None:
            with pytest.raises(Rejected):
                await router.acquire("sim-model", exclude={"a"}, wait=2)

        tg.start_soon(moving)
        await anyio.sleep(0.1)
        assert router.migrations_waiting == 1
        with anyio.fail_after(0.5):
            lease = await router.acquire("sim-model")
        assert lease.target.engine_id == "a"
        router.release(lease)


async def test_a_waiting_migration_goes_before_new_requests_where_it_can_go() -> None:
    backend = VllmBackend()
    directory = Directory([Target("a", "http://127.0.0.1:1", backend)])
    router = Router(FrontendConfig(max_inflight_per_engine=1), directory, Metrics())
    held = await router.acquire("sim-model")  # a is full
    got: list[str] = []
    async with anyio.create_task_group() as tg:

        async def moving() -> None:
            lease = await router.acquire("sim-model", exclude={"b"}, wait=5)
            got.append("moving")
            router.release(lease)

        tg.start_soon(moving)
        await anyio.sleep(0.05)
        router.release(held)  # the freed place is the moving stream's, not a new request's
        with anyio.fail_after(2):
            new = await router.acquire("sim-model")
        assert got == ["moving"]
        router.release(new)


@contextlib.asynccontextmanager
async def engine_at(itl: str, tmp_path: Path) -> AsyncIterator[tuple[str, Sessions]]:
    """A simulated engine that streams a token every ``itl`` seconds."""
    spec = EngineSpec("e0", "sim-model", free_port())
    sim = (*FAST_SIM_ARGS, "--sim-itl", itl, "--sim-ttft", "0")
    async with (
        open_sessions(8) as sessions,
        running_engine(VllmBackend(), spec, tmp_path, sessions.probes, sim_args=sim),
    ):
        yield spec.url, sessions


@pytest.fixture
async def fast_engine(tmp_path: Path) -> AsyncIterator[tuple[str, Sessions]]:
    """An engine that streams as fast as it can: reads come back to back."""
    async with engine_at("0", tmp_path) as engine:
        yield engine


@pytest.fixture
async def steady_engine(tmp_path: Path) -> AsyncIterator[tuple[str, Sessions]]:
    """An engine that streams a token every 4 ms."""
    async with engine_at("0.004", tmp_path) as engine:
        yield engine


@dataclass
class Answer:
    text: str  # what the client got
    waits: int  # writes that waited for the client
    at_once: int  # writes that went at once
    held_windows: int  # coalescing windows the relay's reads waited for


async def relayed_answer(
    url: str,
    sessions: Sessions,
    cfg: FrontendConfig,
    emit_now: Any,
    slow: float,
    tokens: int = 2000,
) -> Answer:
    """A greedy answer from the engine at ``url`` through a relay."""
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": tokens, "stream": True}
    body["temperature"] = 0  # the simulator's greedy answer: the same every time
    written: list[bytes] = []
    waits = at_once = 0

    async def emit(data: bytes) -> None:
        nonlocal waits
        waits += 1
        await anyio.sleep(slow)
        written.append(data)

    def now(data: bytes) -> bool:
        nonlocal at_once
        if not emit_now():
            return False
        at_once += 1
        written.append(data)
        return True

    router = Router(FrontendConfig(), Directory([Target("e0", url, VllmBackend())]), Metrics())
    relay = relay_for(router, sessions, emit, cfg=cfg, body=body, emit_now=now)
    with anyio.fail_after(30):
        await relay.run()
    text = ""
    for chunk in written:
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: "):
                text += orjson.loads(event[6:])["choices"][0]["text"]
    assert relay.progress.completion_tokens == tokens
    return Answer(text, waits, at_once, relay.held_windows)


@pytest.mark.parametrize("window", [0.0, 0.001, 0.005])
async def test_a_client_that_falls_behind_gets_every_token_in_order(
    fast_engine: tuple[str, Sessions], window: float
) -> None:
    """The relay writes to the client at once while it keeps up (``emit_now``) and waits
    for it when it cannot (``emit``, the engine's connection paused meanwhile). With the
    client's buffer full at random moments, every wait slow and the engine as fast as it
    can go, the client still gets the answer whole, in order, nothing twice: the same
    text as a relay that always waited. Reads held for a coalescing window (paused too)
    mix with those waits and change nothing of it."""
    url, sessions = fast_engine
    cfg = FrontendConfig(coalesce_window=window)
    want = await relayed_answer(url, sessions, cfg, lambda: False, 0.0)  # every write waited
    rng = random.Random(3)
    got = await relayed_answer(url, sessions, cfg, lambda: rng.random() > 0.5, 0.002)
    assert got.waits > 5  # the client fell behind many times
    assert got.text == want.text


async def test_a_fast_stream_is_read_in_windows_and_loses_nothing(
    fast_engine: tuple[str, Sessions],
) -> None:
    """An engine streaming as fast as it can is read once per coalescing window, not once
    per token or two: far fewer writes reach the client, with the same text."""
    url, sessions = fast_engine
    plain = await relayed_answer(url, sessions, FrontendConfig(coalesce_window=0), lambda: True, 0)
    held = await relayed_answer(
        url, sessions, FrontendConfig(coalesce_window=0.02), lambda: True, 0
    )
    assert held.text == plain.text
    assert plain.held_windows == 0 and held.held_windows > 0
    # Read as it comes, 2,000 tokens take hundreds of reads (a few tokens each); in 20 ms
    # windows the simulator's whole answer takes a few dozen at most.
    assert held.at_once * 4 < plain.at_once, (held.at_once, plain.at_once)


async def test_a_stream_slower_than_half_a_window_is_never_held(
    steady_engine: tuple[str, Sessions],
) -> None:
    """A token every 4 ms, windows of 5 ms: the stream's reads come further apart than half
    a window, so none waits for one, and every token reaches the client as it came."""
    url, sessions = steady_engine
    cfg = FrontendConfig(coalesce_window=0.005)
    got = await relayed_answer(url, sessions, cfg, lambda: True, 0, tokens=80)
    assert got.held_windows == 0
    assert got.at_once >= 70  # (a late timer in the engine may put two tokens in one read)


async def test_what_is_kept_per_engine_goes_with_the_engine() -> None:
    # Engines come and go over a daemon's life (failovers, rollouts; ids are never reused):
    # the router's per-engine counts, answer times and gauges go with them, once none of
    # their requests is still held.
    backend = VllmBackend()
    targets = [Target(eid, "http://127.0.0.1:1", backend) for eid in ("a", "b", "c")]
    router = Router(FrontendConfig(max_inflight_per_engine=1), Directory(targets), Metrics())
    leases = [await router.acquire("sim-model") for _ in targets]
    for lease in leases:
        router.answered_at[lease.target.engine_id] = 1.0
    router.release(leases[0])  # a: gone, nothing held
    router.release(leases[1])  # b: live
    router.forget_gone({"b"})  # c: gone, but a request is still on it
    assert set(router.inflight) == set(router.answered_at) == {"b", "c"}
    router.release(leases[2])
    router.forget_gone({"b"})
    for kept in (router.inflight, router.answered_at, router.leases, router._gauges):
        assert set(kept) <= {"b"}, kept
    assert set(router.inflight) == {"b"}


async def test_a_deadline_ends_its_wait_never_early_and_an_ended_wait_leaves_it(
    engine: tuple[str, Sessions],
) -> None:
    """Whole answers wait under a deadline kept in shared buckets: the deadline ends the
    wait no sooner than asked, and a wait that ends otherwise (the answer came) leaves
    nothing behind."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()

    async def wait(seconds: float, *, answered_after: float | None = None) -> float | None:
        task = asyncio.current_task()
        assert task is not None
        asked_at = loop.time()
        waiting = EngineWait(task)
        deadlines.add(loop, waiting, asked_at + seconds)
        try:
            await asyncio.sleep(60 if answered_after is None else answered_after)
            return None
        except asyncio.CancelledError:
            assert waiting.ended_it()
            return loop.time() - asked_at
        finally:
            waiting.close()

    ended = await asyncio.gather(
        wait(0.3), wait(0.55), *(wait(0.4, answered_after=0.05) for _ in range(50))
    )
    assert ended[2:] == [None] * 50, "a wait that ended in time was ended by its deadline"
    assert 0.3 <= ended[0] < 0.3 + DEADLINE_GRAIN + 2, ended[0]
    assert 0.55 <= ended[1] < 0.55 + DEADLINE_GRAIN + 2, ended[1]
    assert len(deadlines) == 0

    # Through the relay: a short non-streaming request is asked whole, under a deadline.
    url, sessions = engine
    router = Router(FrontendConfig(), Directory([Target("e0", url, VllmBackend())]), Metrics())
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 4}
    for _ in range(3):
        relay = relay_for(router, sessions, None, cfg=FrontendConfig(), body=body)
        await relay.run()
        assert relay.whole and relay.progress.completion_tokens == 4
    assert len(router.deadlines) == 0
