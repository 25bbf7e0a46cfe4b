"""Health: the one place that decides an engine is dead, and says why.

Signs come from the process exit watcher (instant), HTTP probes (interval, timeout,
consecutive-failure threshold; a SIGSTOPped or wedged engine shows up as probe timeouts)
and the frontend's streams. :meth:`HealthJudge.declare_dead` is idempotent: the first sign
wins and is logged with its reason.

A stalled stream is weak evidence: a slow client, a long prefill or the engine's own queue
can all look like one. So a stall only makes its engine *suspect* (:meth:`stream_stalled`):
the engine is probed at once (its health route, and a one-token test generation of our own,
read promptly), and it is declared dead only if a probe fails too, or if ``stall_reports``
different streams stalled on it within ``2 x stall_timeout``. One client can never take an
engine out of service; an engine whose health route says "fine" while it generates nothing
is still caught.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import anyio

from supervisor import log as logging
from supervisor.backend_errors import EngineCallError
from supervisor.backends import Backend, EngineEndpoint, MalformedStream
from supervisor.config import HealthConfig
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, Readiness
from supervisor.requests import ClientRequest
from supervisor.upstream import iter_sse_data

DeadCallback = Callable[[Engine, str, str, float], Awaitable[None]]

_TIMED_OUT = "timeout"  # how a probe's answer begins when the engine did not answer in time
# What a probe should see for an engine in each judged state.
_EXPECTED = {
    EngineState.ACTIVE: {Readiness.READY},
    EngineState.SLEEPING: {Readiness.SLEEPING},
}


class HealthJudge:
    """Collects signs of failure and declares engines dead exactly once."""

    def __init__(self, cfg: HealthConfig, metrics: Metrics, on_dead: DeadCallback) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.on_dead = on_dead
        self.dead: set[str] = set()
        # Suspects: engine id -> {request id: when its stream stalled}.
        self.suspects: dict[str, dict[str, float]] = {}
        self._probe_now: dict[str, anyio.Event] = {}
        # When an engine's answers last reached the frontend's relay (monotonic; 0: never).
        # Set by the daemon when it runs a frontend.
        self.answered_at: Callable[[str], float] = lambda engine_id: 0.0
        self.log = logging.get(component="health")  # engine and slot bound per event

    def _suspicion(self, engine_id: str) -> dict[str, float]:
        window = 2 * self.cfg.stall_timeout
        now = time.monotonic()
        reports = {
            rid: t for rid, t in self.suspects.get(engine_id, {}).items() if now - t <= window
        }
        if reports:
            self.suspects[engine_id] = reports
        else:
            self.suspects.pop(engine_id, None)
        return reports

    async def stream_stalled(
        self, engine: Engine, backend: Backend, ep: EngineEndpoint, request_id: str, reason: str
    ) -> None:
        """A stream on ``engine`` stalled: suspect it, probe it now, and declare it dead only
        when the evidence agrees (see the module's docstring)."""
        first_sign = time.time()
        self.metrics.stream_suspicions.labels(engine.slot).inc()
        reports = self._suspicion(engine.id)
        reports[request_id] = time.monotonic()
        self.suspects[engine.id] = reports
        self.log.warning(
            "engine suspect: a stream stalled on it",
            engine=engine.id,
            slot=engine.slot,
            request_id=request_id,
            reason=reason,
            stalled_streams=len(reports),
            needed=self.cfg.stall_reports,
        )
        if len(reports) >= self.cfg.stall_reports:
            await self.declare_dead(
                engine,
                "stream",
                f"{len(reports)} streams stalled on it within "
                f"{2 * self.cfg.stall_timeout:g}s (last: {reason})",
                time.time(),
            )
            return
        wake = self._probe_now.get(engine.id)
        if wake is not None:
            wake.set()
        if engine.id in self.dead or await self.generates(engine, backend, ep):
            return
        await self.declare_dead(
            engine,
            "stream",
            f"a stream stalled on it ({reason}) and a one-token test generation got no token "
            f"within {self.cfg.stall_timeout:g}s either",
            first_sign,
        )

    async def generates(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> bool:
        """Whether the engine still generates: one token for a tiny prompt of our own within
        ``stall_timeout``. Only silence, a dropped connection or a 5xx say no; a refusal
        (4xx, e.g. "too busy") or a plugin bug say nothing against the engine."""
        body = {"model": engine.spec.name, "prompt": "ping", "max_tokens": 1, "temperature": 0}
        try:
            up = backend.first_request(
                ClientRequest("completion", {**body, "stream": True}), f"probe-{engine.id}"
            )
            decoder = backend.decoder(up)
        except Exception:
            return True
        with anyio.move_on_after(self.cfg.stall_timeout):
            try:
                async with ep.session.post(
                    ep.url + up.path, json=up.body, headers=up.headers
                ) as resp:
                    if resp.status != 200:
                        return resp.status < 500
                    async for data in iter_sse_data(resp):
                        piece = decoder.feed(data)
                        if piece is not None and (
                            piece.text or piece.token_ids or piece.n_tokens or piece.finish_reason
                        ):
                            return True
            except (aiohttp.ClientError, MalformedStream):
                return False
            except Exception:  # a plugin's decoder bug says nothing about the engine
                return True
            return False  # the stream ended without a token
        return False

    async def declare_dead(
        self, engine: Engine, source: str, reason: str, first_sign_at: float
    ) -> None:
        if engine.id in self.dead:
            return
        self.dead.add(engine.id)
        self.suspects.pop(engine.id, None)
        now = time.time()
        self.metrics.detection_seconds.labels(source).observe(max(0.0, now - first_sign_at))
        self.log.warning(
            "engine declared dead",
            engine=engine.id,
            slot=engine.slot,
            state=engine.state.value,
            source=source,
            reason=reason,
            detection_ms=round((now - first_sign_at) * 1000, 3),
        )
        await self.on_dead(engine, source, reason, now)

    async def process_exited(self, engine: Engine, code: int, at: float) -> None:
        if engine.state in (EngineState.STOPPED, EngineState.DRAINING):
            return  # we are stopping it
        if code == -1:
            how = "exited (adopted from an earlier supervisor: status unknown)"
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        await self.declare_dead(engine, "exit", f"process {how}", at)

    async def probe_loop(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> None:
        """Probe ``engine`` while it lives; judge it only in states where health is known."""
        try:
            await self._probe_loop(engine, backend, ep)
        finally:
            self._probe_now.pop(engine.id, None)

    def forget(self, engine_id: str) -> None:
        """The engine is gone for good (its processes too): drop what is known of it."""
        self.dead.discard(engine_id)
        self.suspects.pop(engine_id, None)

    async def _probe_loop(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> None:
        failures = 0
        first_failure_at = 0.0
        last_reason = ""
        busy_said = -1e9  # when a busy engine's timed-out probe was last logged
        while engine.id not in self.dead and engine.state not in (
            EngineState.STOPPED,
            EngineState.FAILED,
        ):
            wake = self._probe_now[engine.id] = anyio.Event()
            with anyio.move_on_after(self.cfg.probe_interval):
                await wake.wait()  # a suspect is probed at once
            expected = _EXPECTED.get(engine.state)
            if engine.answers_as_ready and engine.state is EngineState.SLEEPING:
                expected = {Readiness.READY}  # a standby is loaded and ready, just not routed to
            elif engine.suspended_by:
                # Checkpointed by the driver: what its HTTP server says (if it answers at all)
                # tells nothing; its process exit still does.
                expected = None
            if expected is None:
                failures = 0
                continue
            started, began = time.time(), time.monotonic()
            state_before = engine.state
            answer = await self._probe(engine, backend, ep)
            if engine.state is not state_before:
                continue  # it changed state while we probed (woken, stopped): judge anew
            if answer in expected:
                failures = 0
                continue
            if answer.startswith(_TIMED_OUT) and self.answered_at(engine.id) >= began:
                # Too slow to answer the probe, but its answers kept reaching clients
                # meanwhile: busy (a flood of streams), not dead. Stopped, wedged or hung,
                # it would have sent nothing.
                if failures or began - busy_said > 60:  # (said once a minute at most)
                    busy_said = began
                    self.log.info(
                        "probe timed out while the engine answers requests: busy, not counted",
                        engine=engine.id,
                        slot=engine.slot,
                        answer=answer,
                        failures_forgotten=failures,
                    )
                failures = 0
                continue
            if failures == 0:
                first_failure_at = started
            failures += 1
            last_reason = answer
            stalls = self._suspicion(engine.id)
            if stalls:
                await self.declare_dead(
                    engine,
                    "stream",
                    f"a stream stalled on it and a probe confirmed it ({answer})",
                    first_failure_at,
                )
            elif failures >= self.cfg.failure_threshold:
                await self.declare_dead(
                    engine,
                    "probe",
                    f"{failures} consecutive failed probes (last: {last_reason}; expected "
                    f"{'/'.join(sorted(expected))})",
                    first_failure_at,
                )

    async def _probe(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> str:
        t0 = time.monotonic()
        try:
            return await self._probe_once(engine, backend, ep)
        finally:
            self.metrics.probe_seconds.labels(engine.slot).observe(time.monotonic() - t0)

    async def _probe_once(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> str:
        with anyio.move_on_after(self.cfg.probe_timeout):
            try:
                return (await backend.health(ep)).value
            except TimeoutError:  # (aiohttp's own timeouts): answered as the deadline's below
                pass
            except (EngineCallError, aiohttp.ClientError) as e:  # (a plugin's own session's)
                return f"error {type(e).__name__}"
            except Exception as e:  # a plugin bug must not take the daemon down
                self.metrics.plugin_errors.labels(backend.name, "health").inc()
                self.log.error(
                    "backend health hook raised",
                    engine=engine.id,
                    backend=backend.name,
                    error=repr(e),
                )
                return f"plugin error {type(e).__name__}"
        return f"{_TIMED_OUT} after {self.cfg.probe_timeout}s"
