"""The simulated engines' HTTP APIs (aiohttp), one route table per dialect.

Shapes follow ``shared/ENGINES.md``: vLLM's OpenAI server and sleep routes, SGLang's native
``/generate`` and memory-saver routes plus its OpenAI routes, ``trtllm-serve``'s OpenAI routes.
Bad input gets the engine's own kind of 4xx (FastAPI-style ``{"detail": ...}`` for unknown
routes and for SGLang's native routes' validation errors; each engine's OpenAI error shape
otherwise), never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from supervisor.testing.simengine import (
    EngineCoreDead,
    EngineSleeping,
    RequestAborted,
    SimEngine,
    SimulatedOOM,
)
from supervisor.testing.simnative import NativeRoutes
from supervisor.testing.simopenai import OpenAIRoutes
from supervisor.testing.simoptions import SimLog, SimOptions, dialect_facts
from supervisor.testing.simrequest import MAX_BODY, ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api(OpenAIRoutes, NativeRoutes):
    """Every route a simulated engine may serve; :func:`build_app` mounts the dialect's."""


def build_app(api: Api) -> web.Application:
    facts = api.facts
    d = facts.base

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api.draining:
            return api.error(503, "server is shutting down")
        try:
            return await handler(request)
        except ApiError as e:
            if e.detail:
                return web.json_response(
                    {"detail": [{"type": "value_error", "loc": ["body"], "msg": e.message}]},
                    status=422 if e.status == 400 else e.status,
                )
            if e.native:
                return web.json_response({"error": {"message": e.message}}, status=e.status)
            return api.error(e.status, e.message, e.param)
        except EngineSleeping as e:
            return api.error(503, str(e))
        except EngineCoreDead as e:
            return api.error(500, str(e))
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        except (ConnectionResetError, RequestAborted):
            raise web.HTTPBadRequest() from None  # the client is gone; nothing to answer

    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    r = app.router
    r.add_get(facts.health_path, api.health)
    r.add_get("/v1/models", api.models)
    r.add_post("/v1/completions", api.completions)
    r.add_post("/v1/chat/completions", api.chat)
    r.add_get("/metrics", api.metrics)
    r.add_get("/sim/state", api.sim_state)
    r.add_post("/sim/faults", api.sim_faults)
    if api.opts.disagg == "prefill":
        r.add_post("/sim/prefill", api.sim_prefill)
    if d == "vllm":
        served = {
            "/tokenize": api.tokenize,
            "/detokenize": api.detokenize,
            "/v1/embeddings": api.embeddings,
            "/v1/responses": api.responses,
        }
        for path in facts.other_routes:  # the dialect's own list (plugins/vllm.py)
            if path in served:
                r.add_post(path, served[path])
        r.add_get("/version", api.version)
        if facts.family and api.opts.gms_control_routes:  # the standalone GMS recipe
            r.add_post("/engine/control/sleep", api.gms_sleep)
            r.add_post("/engine/control/wake_up", api.gms_wake)
        elif facts.family:  # a Dynamo worker: control routes under /engine/, JSON bodies
            r.add_post(facts.sleep_path or "/engine/sleep", api.gms_sleep)
            r.add_post(facts.wake_path or "/engine/wake_up", api.gms_wake)
            r.add_post("/engine/wake", api.gms_wake)  # the route's older name
        for env, val in facts.sleep_env.items():
            # vLLM mounts its sleep and cache routes only in development mode.
            if os.environ.get(env) == val:
                r.add_post(facts.sleep_path or "/sleep", api.vllm_sleep)
                r.add_post(facts.wake_path or "/wake_up", api.vllm_wake)
                r.add_get(facts.is_sleeping_path or "/is_sleeping", api.vllm_is_sleeping)
                r.add_post("/reset_prefix_cache", api.ok)
    elif d == "sglang":
        r.add_get(facts.deep_health_path or "/health_generate", api.health_generate)
        r.add_post("/generate", api.sglang_generate)
        r.add_post(facts.abort_path or "/abort_request", api.sglang_abort)
        r.add_post(facts.sleep_path or "/release_memory_occupation", api.sglang_release)
        r.add_post(facts.wake_path or "/resume_memory_occupation", api.sglang_resume)
        r.add_get("/get_server_info", api.sglang_server_info)
        r.add_get("/server_info", api.sglang_server_info)
        r.add_get("/get_model_info", api.sglang_model_info)
        r.add_post("/flush_cache", api.ok)
    else:
        r.add_get("/version", api.version)
    return app


async def serve(opts: SimOptions) -> int:
    """Run one simulated engine until SIGTERM/SIGINT; returns the exit status."""
    log = SimLog(opts.dialect)
    engine = SimEngine(opts, log)
    api = Api(engine)
    runner = web.AppRunner(
        build_app(api), handler_cancellation=True, shutdown_timeout=1.0, access_log=None
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    site = web.TCPSite(runner, opts.host, opts.port, reuse_address=True)
    # SGLang answers /health (503) while it loads; vLLM and trtllm-serve listen once loaded.
    early = dialect_facts(opts.dialect).base == "sglang"
    try:
        if early:
            await site.start()
            log.info(f"listening on http://{opts.host}:{opts.port} (loading)")
        load = asyncio.ensure_future(engine.load())
        done, _ = await asyncio.wait(
            [load, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if load not in done:
            load.cancel()
            return 0
        load.result()
        if not early:
            await site.start()
        log.info(f"Uvicorn running on http://{opts.host}:{opts.port}")
        await stop.wait()
        log.info("shutting down: no new requests; draining in-flight ones")
        api.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.idle.wait(), opts.drain_timeout)
        return 0
    except SimulatedOOM as e:
        log.error(f"{e} (while loading)")
        return 1
    except OSError as e:
        log.error(f"cannot listen on {opts.host}:{opts.port}: {e}")
        return 1
    finally:
        await runner.cleanup()
        await engine.shutdown()
