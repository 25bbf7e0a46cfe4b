"""Every way out of a relayed request gives its engine place back, and a moving stream
never blocks new requests to an engine it cannot use. The relay runs against a real
simulated engine; the plugin is the real vLLM backend with one hook made to fail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from plugins.vllm import VllmBackend
from supervisor.backends import StreamDecoder
from supervisor.config import FrontendConfig, HealthConfig
from supervisor.frontend.routing import Rejected, Router, Target
from supervisor.frontend.streams import ClientGone, ClientShape, MigrationFailed, RequestRelay
from supervisor.metrics import Metrics
from supervisor.model import ClientRequest, EngineSpec, Piece, Progress, UpstreamRequest
from supervisor.sessions import Sessions, open_sessions
from supervisor.testing.cluster import free_port, running_engine

pytestmark = pytest.mark.anyio


class Directory:
    """The frontend's view of engines: a fixed list (the daemon's is built from slots)."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.reports: list[tuple[str, str]] = []

    def models(self) -> list[str]:
        return ["sim-model"]

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
    router: Router, sessions: Sessions, emit: Any, *, cfg: FrontendConfig | None = None
) -> RequestRelay:
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 30, "stream": True}
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
