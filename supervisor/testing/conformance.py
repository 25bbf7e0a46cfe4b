"""The checks a backend plugin must pass, run against the simulator of its dialect.

A plugin author subclasses :class:`BackendConformance` in their own tests::

    from supervisor.testing.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        backend_name = "mybackend"   # the entry-point name
        real_engine = True           # run the engine's own program (on the PATH) ...
        # sim_dialect = "vllm"       # ... or a simulated dialect that speaks like it
        model = "my-tiny-model"      # what the engine loads

and runs pytest (``pip install 'failover-supervisor[kit]'``; the ``anyio`` plugin comes with
anyio). The checks: launch flags, health states, sleep -> is_sleeping -> wake at each level
the backend declares, abort reaching the engine, and continuation (a stream broken at token
*k* and resumed on a second engine with the plugin's continuation equals an unbroken run),
and, for a backend with ``whole_request``, a whole answer that says what the stream says.
The backend's declared capabilities decide what is tested: ``serves_chat``,
``serves_token_prompts``, ``sleep_levels``, a ``sleep_flag`` at all,
``resumes_token_prompts``, ``resumes_chat``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import aiohttp
import anyio
import pytest

from supervisor.backends import Backend, BackendError, EngineEndpoint, load_backend
from supervisor.model import EngineSpec, Readiness, Role
from supervisor.requests import ClientRequest, Progress, TextlessTokens, UpstreamRequest
from supervisor.testing.cluster import EngineProcess, free_port, running_engine, simulated
from supervisor.testing.gpuledger import LEDGER_ENV
from supervisor.upstream import iter_sse_data

PROMPT_TEXT = "the river and the stone under the bridge"
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a quiet lantern."},
    {"role": "user", "content": "Tell me of the harbor."},
]
MAX_TOKENS = 24


@dataclass
class PieceResult:
    progress: Progress
    finish_reason: str | None = None
    events: int = 0
    ids: list[int] = field(default_factory=list)


async def stream_piece(
    backend: Backend,
    ep: EngineEndpoint,
    up: UpstreamRequest,
    progress: Progress,
    *,
    stop_after_tokens: int | None = None,
) -> PieceResult:
    """Send ``up`` and read its stream into ``progress``; stop (close) after N tokens.

    As the relay does, tokens whose text has not come yet (part of a character) count only
    with their text."""
    decoder = backend.decoder(up)
    textless = TextlessTokens()
    result = PieceResult(progress)
    start_tokens = progress.completion_tokens
    timeout = aiohttp.ClientTimeout(total=30)
    async with ep.session.post(
        ep.url + up.path, json=up.body, headers=up.headers, timeout=timeout
    ) as resp:
        if resp.status != 200:
            body = await resp.text()
            raise BackendError(f"POST {up.path} -> {resp.status}: {body[:300]}")
        async for data in iter_sse_data(resp):
            fed = decoder.feed(data)
            if fed is not None and fed.prompt_token_ids and progress.prompt_token_ids is None:
                progress.prompt_token_ids = fed.prompt_token_ids
            piece = textless.admit(fed) if fed is not None else None
            if piece is None:
                continue
            result.events += 1
            progress.add(piece)
            if piece.finish_reason:
                result.finish_reason = piece.finish_reason
            done = progress.completion_tokens - start_tokens
            if stop_after_tokens is not None and done >= stop_after_tokens:
                resp.close()  # break the stream, as a dying engine would
                break
    return result


def completion(
    prompt: str | list[int], max_tokens: int = MAX_TOKENS, model: str = "sim-model"
) -> ClientRequest:
    return ClientRequest(
        "completion",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )


def chat(max_tokens: int = MAX_TOKENS, model: str = "sim-model") -> ClientRequest:
    return ClientRequest(
        "chat",
        {
            "model": model,
            "messages": CHAT_MESSAGES,
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )


class BackendConformance:
    """Conformance tests for one backend; subclass and set :attr:`backend_name`."""

    backend_name: ClassVar[str]
    sim_dialect: ClassVar[str | None] = None  # a simulated dialect stands in for the engine
    real_engine: ClassVar[bool] = False  # run the engine's own program, found on the PATH
    model: ClassVar[str] = "sim-model"  # what the engine loads (and requests name)
    load_timeout: ClassVar[float] = 60.0  # seconds an engine may take to become ready
    pytestmark = [pytest.mark.anyio]

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def backend(self) -> Backend:
        return load_backend(self.backend_name)

    @pytest.fixture(autouse=True)
    def _own_gpu_ledger(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(LEDGER_ENV, str(tmp_path / "gpu-ledger.json"))

    @pytest.fixture
    async def session(self) -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession() as s:
            yield s

    def dialect_name(self, backend: Backend) -> str:
        return self.sim_dialect or backend.dialect.name

    def spec(self, engine_id: str, *, role: Role = "active", gpu: str = "0") -> EngineSpec:
        return EngineSpec(
            engine_id=engine_id, model=self.model, port=free_port(), role=role, gpus=(gpu,)
        )

    def engine(
        self, backend: Backend, spec: EngineSpec, log_dir: Path, session: aiohttp.ClientSession
    ) -> AbstractAsyncContextManager[tuple[EngineProcess, EngineEndpoint]]:
        """The engine as ``backend`` launches it: its real program, or the simulator of this
        kit's dialect in its place."""
        return running_engine(
            backend,
            spec,
            log_dir,
            session,
            sim_dialect=self.dialect_name(backend),
            simulate=not self.real_engine,
            load_timeout=self.load_timeout,
        )

    def can_sleep(self, backend: Backend) -> bool:
        return backend.dialect.sleep_flag is not None

    def needs_chat(self, backend: Backend) -> None:
        if not backend.serves_chat:
            pytest.skip(f"{backend.name} declares serves_chat = False")

    # -- launching -------------------------------------------------------------------
    def test_registered_through_entry_point(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert backend.name == backend.dialect.name

    def test_command_carries_port_model_and_gpus(self, backend: Backend) -> None:
        spec = self.spec("e1", gpu="3")
        cmd = backend.command(spec)
        assert str(spec.port) in cmd.args
        assert self.model in cmd.args
        assert cmd.env.get("CUDA_VISIBLE_DEVICES") == "3"
        if not self.real_engine:
            sim = simulated(cmd, self.dialect_name(backend))
            assert sim.args[: len(cmd.args)] == cmd.args  # the simulator takes the same flags

    def test_shadow_command_enables_sleep_or_refuses(self, backend: Backend) -> None:
        spec = self.spec("s1", role="shadow")
        if not self.can_sleep(backend):
            with pytest.raises(BackendError):
                backend.command(spec)
            return
        cmd = backend.command(spec)
        assert backend.dialect.sleep_flag in cmd.args

    # -- health, sleep, wake ---------------------------------------------------------
    @pytest.mark.parametrize("level", [1, 2])
    async def test_health_sleep_wake(
        self, backend: Backend, tmp_path: Path, session: aiohttp.ClientSession, level: int
    ) -> None:
        if self.can_sleep(backend) and level not in backend.sleep_levels:
            pytest.skip(f"{backend.name} declares sleep_levels = {backend.sleep_levels}")
        role: Role = "shadow" if self.can_sleep(backend) else "active"
        spec = self.spec("hs", role=role)
        async with self.engine(backend, spec, tmp_path, session) as (_, ep):
            assert await backend.health(ep) is Readiness.READY
            if not self.can_sleep(backend):
                with pytest.raises(BackendError):
                    await backend.sleep(ep, level)
                return
            assert await backend.is_sleeping(ep) is False
            await backend.sleep(ep, level)
            assert await backend.is_sleeping(ep) is True
            assert await backend.health(ep) is Readiness.SLEEPING
            with pytest.raises(BackendError):  # a sleeping engine refuses inference
                await stream_piece(
                    backend,
                    ep,
                    backend.first_request(completion(PROMPT_TEXT, model=self.model), "asleep"),
                    Progress(),
                )
            await backend.wake(ep)
            assert await backend.is_sleeping(ep) is False
            assert await backend.health(ep) is Readiness.READY
            res = await stream_piece(
                backend,
                ep,
                backend.first_request(completion(PROMPT_TEXT, 4, self.model), "after-wake"),
                Progress(),
            )
            assert res.progress.completion_tokens == 4

    async def test_health_down_after_kill(
        self, backend: Backend, tmp_path: Path, session: aiohttp.ClientSession
    ) -> None:
        import signal

        async with self.engine(backend, self.spec("hk"), tmp_path, session) as (proc, ep):
            proc.signal_group(signal.SIGKILL)
            await anyio.to_thread.run_sync(proc.proc.wait)
            assert await backend.health(ep) is Readiness.DOWN

    # -- cancellation -----------------------------------------------------------------
    @pytest.mark.parametrize("kind", ["completion", "chat"])
    async def test_abort_reaches_engine(
        self, backend: Backend, tmp_path: Path, session: aiohttp.ClientSession, kind: str
    ) -> None:
        if kind == "chat":
            self.needs_chat(backend)
        rid = f"conf-abort-{kind}-{time.monotonic_ns()}"
        req = (
            completion(PROMPT_TEXT, 3000, self.model)
            if kind == "completion"
            else chat(3000, self.model)
        )
        async with self.engine(backend, self.spec("ab"), tmp_path, session) as (proc, ep):
            up = backend.first_request(req, rid)
            # Explicit abort where the engine has one, while the stream is still open.
            async with anyio.create_task_group() as tg:
                opened = anyio.Event()

                async def reader() -> None:
                    decoder = backend.decoder(up)
                    async with session.post(
                        ep.url + up.path, json=up.body, headers=up.headers
                    ) as resp:
                        n = 0
                        async for data in iter_sse_data(resp):
                            if decoder.feed(data) is not None:
                                n += 1
                            if n == 5:
                                opened.set()
                                with anyio.move_on_after(1.0):
                                    # wait for the engine to end it (explicit abort) or close
                                    async for _ in iter_sse_data(resp):
                                        pass
                                return

                tg.start_soon(reader)
                await opened.wait()
                if not await backend.abort(ep, rid):
                    tg.cancel_scope.cancel()  # closing the connection is the abort
            # Where the engine takes our request id its log names it (the dialect's
            # abort_log); otherwise (trtllm-serve) it logs its own id, and one abort line is
            # all we can ask for.
            prefix = backend.dialect.abort_log.split("{")[0]
            by_id = rid if backend.dialect.request_id_field else ""

            def aborted() -> bool:
                return any(prefix in ln and by_id in ln for ln in proc.log_text().splitlines())

            with anyio.fail_after(1.0):
                while not aborted():
                    await anyio.sleep(0.02)

    # -- whole answers -----------------------------------------------------------------
    @pytest.mark.parametrize("kind", ["completion", "chat"])
    async def test_whole_answer_says_what_the_stream_says(
        self, backend: Backend, tmp_path: Path, session: aiohttp.ClientSession, kind: str
    ) -> None:
        """``whole_request`` (if the backend has one): the answer body, decoded as one
        event, gives the text, tokens and finish of the streamed answer to the same
        request."""
        if kind == "chat":
            self.needs_chat(backend)
        req = (
            chat(model=self.model) if kind == "chat" else completion(PROMPT_TEXT, model=self.model)
        )
        up = backend.whole_request(req, "whole-1")
        if up is None:
            pytest.skip(f"{backend.name} has no whole_request: every request is streamed")
        assert up.whole, "whole_request must return an UpstreamRequest with whole=True"
        async with self.engine(backend, self.spec("wa"), tmp_path, session) as (_, ep):
            streamed = await stream_piece(
                backend, ep, backend.first_request(req, "s-1"), Progress()
            )
            timeout = aiohttp.ClientTimeout(total=30)
            async with ep.session.post(
                ep.url + up.path, json=up.body, headers=up.headers, timeout=timeout
            ) as resp:
                body = await resp.read()
                assert resp.status == 200, body[:300]
        piece = backend.decoder(up).feed(body)
        assert piece is not None, f"the decoder made nothing of the whole answer {body[:200]!r}"
        progress = Progress()
        progress.add(piece)
        assert progress.text == streamed.progress.text
        assert progress.completion_tokens == streamed.progress.completion_tokens == MAX_TOKENS
        if progress.token_ids is not None and streamed.progress.token_ids is not None:
            assert progress.token_ids == streamed.progress.token_ids
        assert piece.finish_reason == streamed.finish_reason == "length"

    # -- continuation ------------------------------------------------------------------
    @pytest.mark.parametrize("break_at", [1, 9, MAX_TOKENS - 1])
    @pytest.mark.parametrize("kind", ["completion", "completion-ids", "chat"])
    async def test_continuation_is_token_exact(
        self,
        backend: Backend,
        tmp_path: Path,
        session: aiohttp.ClientSession,
        kind: str,
        break_at: int,
    ) -> None:
        if kind == "chat":
            self.needs_chat(backend)
            req = chat(model=self.model)
        elif kind == "completion-ids":
            if not backend.serves_token_prompts:
                pytest.skip(f"{backend.name} declares serves_token_prompts = False")
            ids = list(range(300, 330))
            req = completion(ids, model=self.model)
        else:
            req = completion(PROMPT_TEXT, model=self.model)
        a_spec, b_spec = self.spec("ca", gpu="0"), self.spec("cb", gpu="1")
        async with (
            self.engine(backend, a_spec, tmp_path, session) as (_, a),
            self.engine(backend, b_spec, tmp_path, session) as (_, b),
        ):
            whole = await stream_piece(backend, a, backend.first_request(req, "whole"), Progress())
            assert whole.progress.completion_tokens == MAX_TOKENS
            assert whole.finish_reason == "length"

            progress = Progress()
            first = await stream_piece(
                backend,
                a,
                backend.first_request(req, "broken"),
                progress,
                stop_after_tokens=break_at,
            )
            # At break_at or a little after: a character's tokens count only when whole.
            assert break_at <= progress.completion_tokens < break_at + 8, first
            cannot = (kind == "completion-ids" and not backend.resumes_token_prompts) or (
                kind == "chat" and not backend.resumes_chat
            )
            if cannot:
                with pytest.raises(BackendError):
                    backend.continuation(req, progress, "broken-2")
                return
            rest = backend.continuation(req, progress, "broken-2")
            done = await stream_piece(backend, b, rest, progress)
            assert progress.text == whole.progress.text
            assert progress.completion_tokens == MAX_TOKENS
            if progress.token_ids is not None and whole.progress.token_ids is not None:
                assert progress.token_ids == whole.progress.token_ids
            assert done.finish_reason == "length"
