"""Health: the one place that decides an engine is dead, and says why.

Signs come from the process exit watcher (instant), HTTP probes (interval, timeout,
consecutive-failure threshold; a SIGSTOPped or wedged engine shows up as probe timeouts)
and stream-stall reports from the frontend. :meth:`HealthJudge.declare_dead` is idempotent:
the first sign wins and is logged with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import anyio

from supervisor import log as logging
from supervisor.backends import Backend, EngineEndpoint
from supervisor.config import HealthConfig
from supervisor.metrics import Metrics
from supervisor.model import Engine, EngineState, Readiness

DeadCallback = Callable[[Engine, str, str, float], Awaitable[None]]

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
        self.log = logging.get(component="health")  # engine and slot bound per event

    async def declare_dead(
        self, engine: Engine, source: str, reason: str, first_sign_at: float
    ) -> None:
        if engine.id in self.dead:
            return
        self.dead.add(engine.id)
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
        failures = 0
        first_failure_at = 0.0
        last_reason = ""
        while engine.id not in self.dead and engine.state not in (
            EngineState.STOPPED,
            EngineState.FAILED,
        ):
            await anyio.sleep(self.cfg.probe_interval)
            expected = _EXPECTED.get(engine.state)
            if engine.suspended_by:
                # Checkpointed by the driver: what its HTTP server says (if it answers at all)
                # tells nothing; its process exit still does.
                expected = None
            if expected is None:
                failures = 0
                continue
            started = time.time()
            state_before = engine.state
            answer = await self._probe(engine, backend, ep)
            if engine.state is not state_before:
                continue  # it changed state while we probed (woken, stopped): judge anew
            if answer in expected:
                failures = 0
                continue
            if failures == 0:
                first_failure_at = started
            failures += 1
            last_reason = answer
            if failures >= self.cfg.failure_threshold:
                await self.declare_dead(
                    engine,
                    "probe",
                    f"{failures} consecutive failed probes (last: {last_reason}; expected "
                    f"{'/'.join(sorted(expected))})",
                    first_failure_at,
                )

    async def _probe(self, engine: Engine, backend: Backend, ep: EngineEndpoint) -> str:
        with anyio.move_on_after(self.cfg.probe_timeout):
            try:
                return (await backend.health(ep)).value
            except (aiohttp.ClientError, TimeoutError) as e:
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
        return f"timeout after {self.cfg.probe_timeout}s"
