"""Dynamo workers with GPU Memory Service (GMS): ``vllm-gms`` and ``sglang-gms``.

A Dynamo worker wraps vLLM or SGLang; with GMS its weights live in a per-GPU memory service,
so a shadow on the same GPUs maps them without a second load and sleeps with almost nothing
of its own. Its control routes are under ``/engine/``:

- vLLM-based worker: ``POST /engine/sleep`` with ``{"level": n}``; ``POST /engine/wake_up``
  with ``{"tags": [...]}`` (the seed and ENGINES.md name it ``/engine/wake``; Dynamo's own GMS
  test harness uses ``/engine/wake_up``). The standalone GMS recipe serves them as
  ``/engine/control/sleep`` and ``/engine/control/wake_up``. Each call tries the known routes
  in turn on 404 and remembers, per engine, the one that answered.
  Started with ``--gms-mode shadow`` it skips the KV cache and goes to sleep after loading.
- SGLang-based worker: ``POST /engine/release_memory_occupation`` and
  ``/engine/resume_memory_occupation``, each with ``{"tags": [...]}``.

Neither worker has a route that says it is asleep, so the plugin remembers what it released
(as the SGLang plugin does). A real worker serves those routes on its system port
(``DYN_SYSTEM_PORT``), which the plugin sets to the engine's port, and answers inference
through Dynamo's own frontend; the simulator serves both on one port. Everything else
(requests, streams, continuation, abort) is the wrapped engine's, from its plugin.
"""

from __future__ import annotations

from dataclasses import replace

from plugins.sglang import DIALECT as SGLANG
from plugins.sglang import MEMORY_TAGS, SglangBackend
from plugins.vllm import DIALECT as VLLM
from plugins.vllm import WAKE_TAGS, VllmBackend
from supervisor.backends import BackendError, EngineEndpoint
from supervisor.model import EngineSpec, LaunchCommand, Readiness

VLLM_GMS = replace(
    VLLM,
    name="vllm-gms",
    family="vllm",
    program=("python3", "-m", "dynamo.vllm"),
    model_flag="--model",
    sleep_env={},
    sleep_path="/engine/sleep",
    wake_path="/engine/wake_up",
    is_sleeping_path=None,
    start_asleep_flag=("--gms-mode", "shadow"),
)
LEGACY_WAKE_PATH = "/engine/wake"  # the route's name in the seed and ENGINES.md
# The worker's routes, then the standalone recipe's, then the older name.
SLEEP_ROUTES = ("/engine/sleep", "/engine/control/sleep")
WAKE_ROUTES = ("/engine/wake_up", "/engine/control/wake_up", LEGACY_WAKE_PATH)

SGLANG_GMS = replace(
    SGLANG,
    name="sglang-gms",
    family="sglang",
    program=("python3", "-m", "dynamo.sglang"),
    sleep_path="/engine/release_memory_occupation",
    wake_path="/engine/resume_memory_occupation",
)

GMS_LOAD_FORMAT = ("--load-format", "gms")


class _Released:
    """What each engine has released, by URL: these workers cannot be asked."""

    def __init__(self) -> None:
        self.released: dict[str, tuple[str, ...]] = {}

    def readiness(self, ep: EngineEndpoint, state: Readiness) -> Readiness:
        if state is Readiness.READY and ep.url in self.released:
            return Readiness.SLEEPING
        return state


def _gms_command(cmd: LaunchCommand, spec: EngineSpec) -> LaunchCommand:
    # The worker's control routes listen on its system port: make that the engine's port.
    env = {**cmd.env, "DYN_SYSTEM_PORT": str(spec.port)}
    return replace(cmd, args=(*cmd.args, *GMS_LOAD_FORMAT), env=env)


class VllmGmsBackend(VllmBackend):
    """A Dynamo vLLM worker with GPU Memory Service (``/engine/sleep``, ``/engine/wake_up``)."""

    dialect = VLLM_GMS

    def __init__(self) -> None:
        self._memo = _Released()
        self._routes: dict[tuple[str, str], str] = {}  # (url, what) -> the route that answered

    async def _control(
        self, ep: EngineEndpoint, what: str, routes: tuple[str, ...], body: dict[str, object]
    ) -> None:
        """POST ``body`` to the first of ``routes`` the worker serves (404: try the next)."""
        known = self._routes.get((ep.url, what))
        for route in (known,) if known else routes:
            status, answer = await ep.call("POST", route, json_body=body, timeout_s=120)
            if status != 404:
                ep.check(status, answer, f"POST {route}")
                self._routes[(ep.url, what)] = route
                return
        raise BackendError(f"the worker serves none of the {what} routes {', '.join(routes)}")

    def command(self, spec: EngineSpec) -> LaunchCommand:
        return _gms_command(super().command(spec), spec)

    async def health(self, ep: EngineEndpoint) -> Readiness:
        return self._memo.readiness(ep, await super().health(ep))

    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        return ep.url in self._memo.released

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level not in (1, 2):
            raise BackendError(f"sleep level must be 1 or 2, not {level}")
        await self._control(ep, "sleep", SLEEP_ROUTES, {"level": level})
        self._memo.released[ep.url] = WAKE_TAGS if level == 2 else ("kv_cache",)

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        for tag in tags:
            if tag not in WAKE_TAGS:
                raise BackendError(f"wake tag must be one of {WAKE_TAGS}, not {tag!r}")
        await self._control(ep, "wake", WAKE_ROUTES, {"tags": list(tags or WAKE_TAGS)})
        if not tags or set(tags) >= set(self._memo.released.get(ep.url, ())):
            self._memo.released.pop(ep.url, None)


class SglangGmsBackend(SglangBackend):
    """A Dynamo SGLang worker with GPU Memory Service (``/engine/release_memory_occupation``,
    ``/engine/resume_memory_occupation``)."""

    dialect = SGLANG_GMS

    def command(self, spec: EngineSpec) -> LaunchCommand:
        return _gms_command(super().command(spec), spec)

    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        if level not in (1, 2):
            raise BackendError(f"sleep level must be 1 (KV cache) or 2 (all), not {level}")
        tags = ("kv_cache",) if level == 1 else MEMORY_TAGS
        await ep.call_ok(
            "POST", SGLANG_GMS.sleep_path or "", json_body={"tags": list(tags)}, timeout_s=120
        )
        self._released[ep.url] = tags

    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        released = self._released.get(ep.url, MEMORY_TAGS)
        todo = [t for t in (tags or released) if t in released]
        await ep.call_ok(
            "POST", SGLANG_GMS.wake_path or "", json_body={"tags": todo}, timeout_s=120
        )
        left = tuple(t for t in released if t not in todo)
        if left:
            self._released[ep.url] = left
        else:
            self._released.pop(ep.url, None)
