"""A simulated engine's own routes: vLLM's sleep routes, the Dynamo GMS worker's control
routes, SGLang's native API, health and metrics, and the simulator's ``/sim/*`` control
(part of no engine's API)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from supervisor.testing.simchunks import GenerateShape
from supervisor.testing.simengine import RequestAborted, SamplingRequest, SimulatedOOM
from supervisor.testing.simrequest import ApiBase, ApiError


class NativeRoutes(ApiBase):
    """The routes each engine has of its own, beside the OpenAI ones."""

    # -- vLLM dev routes
    async def vllm_sleep(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return self.error(400, f"level must be 1 or 2, not {level!r}")
        # What becomes of requests in flight: "abort" (vLLM's default) ends them with
        # finish_reason "abort"; "wait" lets them finish first; "keep" pauses them until the
        # wake, when they go on.
        mode = request.query.get("mode", "abort")
        if mode not in ("abort", "wait", "keep"):
            return self.error(400, f"mode must be abort, wait or keep, not {mode!r}")
        if mode == "abort":
            for r in list(self.engine.active.values()):
                r.abort_event.set()
        if mode == "keep":
            self.engine.unpaused.clear()
        else:
            await self.engine.idle.wait()
        if not self.engine.sleeping:
            tags = ("kv_cache",) if level == "1" else ("weights", "kv_cache")
            await self.engine.release(tags)
        return web.Response(status=200)

    async def vllm_wake(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        tags = request.query.getall("tags", [])
        bad = [t for t in tags if t not in ("weights", "kv_cache")]
        if bad:
            return self.error(400, f"unknown tags {bad}; use weights or kv_cache")
        todo = [t for t in (tags or ["weights", "kv_cache"]) if t in self.engine.released]
        try:
            await self.engine.resume(todo)
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        self.engine.wakes_by_route += 1
        return web.Response(status=200)

    # -- Dynamo GMS worker (vLLM-based)
    async def gms_sleep(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        body = await self.read_json(request) if request.can_read_body else {}
        level = body.get("level", 1)
        if level not in (1, 2):
            return self.error(400, f"level must be 1 or 2, not {level!r}")
        if not self.engine.sleeping:
            await self.engine.release(("kv_cache",) if level == 1 else ("weights", "kv_cache"))
        return web.json_response({"status": "ok", "message": f"sleeping (level {level})"})

    async def gms_wake(self, request: web.Request) -> web.Response:
        if not self.opts.sleep_enabled:
            return self.error(400, "Sleep mode is not enabled. Start with --enable-sleep-mode.")
        body = await self.read_json(request) if request.can_read_body else {}
        tags = body.get("tags") or ["weights", "kv_cache"]
        if not isinstance(tags, list) or any(t not in ("weights", "kv_cache") for t in tags):
            return self.error(400, "tags must be a list of 'weights' and 'kv_cache'")
        try:
            await self.engine.resume([t for t in tags if t in self.engine.released])
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        self.engine.wakes_by_route += 1
        return web.json_response({"status": "ok", "message": "awake"})

    async def vllm_is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.engine.sleeping})

    # -- health and metrics
    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health(self, request: web.Request) -> web.Response:
        if self.opts.faults.gpu_lost:
            await asyncio.Event().wait()  # the health check's CUDA call never returns
        if self.opts.faults.slow_health:
            await asyncio.sleep(self.opts.faults.slow_health)
        if self.engine.core_dead.is_set():
            return web.Response(status=503)
        if self.opts.faults.fail_health or not self.engine.loaded.is_set():
            return web.Response(status=503)
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.opts.faults.fail_health or not self.engine.loaded.is_set():
            return web.Response(status=503)
        if self.engine.sleeping:
            return web.Response(status=503, text="memory released")
        sreq = SamplingRequest(f"HEALTH_CHECK_{self.engine.new_request_id()}", [1], 1, 0.0)
        async for _ in self.engine.generate(sreq):  # hangs, like the real one, when wedged
            pass
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.facts.metrics_format == "json":
            return web.json_response(
                [
                    {
                        "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
                        "iter": self.engine.counters["generation_tokens"],
                        "numActiveRequests": self.engine.running,
                        "numQueuedRequests": self.engine.waiting,
                        "gpuMemUsage": 0
                        if self.engine.sleeping
                        else int((self.opts.weights_gib + self.opts.kv_gib) * 1024**3),
                    }
                ]
            )
        if not self.opts.metrics_enabled:
            raise web.HTTPNotFound()
        m = self.facts.metrics
        assert m is not None
        e = self.engine
        lbl = f'model_name="{self.opts.name}"'
        prefix = m.running.split(":")[0]
        c = e.counters
        lines = [
            f"# TYPE {m.running} gauge",
            f"{m.running}{{{lbl}}} {float(e.running)}",
            f"# TYPE {m.waiting} gauge",
            f"{m.waiting}{{{lbl}}} {float(e.waiting)}",
        ]
        if m.kv_usage:
            lines += [f"# TYPE {m.kv_usage} gauge", f"{m.kv_usage}{{{lbl}}} {e.kv_usage()}"]
        lines += [
            f"# TYPE {prefix}:prompt_tokens_total counter",
            f"{prefix}:prompt_tokens_total{{{lbl}}} {float(c['prompt_tokens'])}",
            f"# TYPE {prefix}:generation_tokens_total counter",
            f"{prefix}:generation_tokens_total{{{lbl}}} {float(c['generation_tokens'])}",
        ]
        if prefix == "vllm":
            lines.append("# TYPE vllm:request_success_total counter")
            for reason in ("stop", "length", "abort"):
                lines.append(
                    f'vllm:request_success_total{{finished_reason="{reason}",{lbl}}} '
                    f"{float(c['finished_' + reason])}"
                )
        else:
            lines += [
                f"# TYPE {prefix}:num_aborted_requests_total counter",
                f"{prefix}:num_aborted_requests_total{{{lbl}}} {float(c['finished_abort'])}",
            ]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "simulated"})

    # -- SGLang native routes
    async def sglang_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request, detail=True)
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise ApiError(
                400, "Either text or input_ids should be provided, not both.", native=True
            )
        if text is not None and not isinstance(text, str):
            raise ApiError(422, "text: Input should be a valid string", detail=True)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise ApiError(422, "sampling_params: Input should be a valid dictionary", detail=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "stream: Input should be a valid boolean", detail=True)
        self.check_serving()
        ids = self.prompt_ids(text if text is not None else input_ids)
        params = {
            "max_tokens": sp.get("max_new_tokens", 128),
            **{k: sp[k] for k in ("temperature", "stop", "ignore_eos") if k in sp},
        }
        if "sampling_seed" in sp:
            params["seed"] = sp["sampling_seed"]
        sreq = self.sampling(params, ids, default_max=128)
        sreq.prompt_is_ids = input_ids is not None
        rid = body.get("rid") or self.engine.new_request_id()
        if not isinstance(rid, str):
            raise ApiError(422, "rid: Input should be a valid string", detail=True)
        if any(r.request_id == rid for r in self.engine.active.values()):
            raise ApiError(400, f"Duplicate request ID detected: {rid}", native=True)
        sreq.request_id = rid
        shape = GenerateShape(rid, len(ids), incremental=self.opts.incremental_stream)
        if not stream:
            async for tok in self.engine.generate(sreq):
                shape.add(tok)
            return web.json_response(shape.event(final=True))
        resp = await self._sse_start(request)
        try:
            async with contextlib.aclosing(self.engine.generate(sreq)) as gen:
                async for tok in gen:
                    if self.engine.malformed_due():
                        await resp.write(b'data: {"text": "garb\n\n')
                        return resp
                    if self.engine.endless_due():
                        await self._endless_event(resp, b'data: {"text": "')
                        return resp
                    shape.add(tok)
                    if len(shape.new_ids) >= self.opts.stream_interval or tok.finish_reason:
                        await self._send(resp, shape.event())
        except RequestAborted:
            shape.fin = {"type": "abort", "message": f"Abort request {rid}"}
            with contextlib.suppress(ConnectionResetError):
                await self._send(resp, shape.event())
        except ConnectionResetError:
            return resp
        with contextlib.suppress(ConnectionResetError):
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def sglang_abort(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, detail=True)
        if body.get("abort_all"):
            targets = list(self.engine.active.values())
        else:
            rid = body.get("rid")
            if not isinstance(rid, str):
                raise ApiError(422, "rid: Input should be a valid string", detail=True)
            targets = [r for r in self.engine.active.values() if r.request_id == rid]
        for r in targets:
            r.abort_event.set()
        return web.Response(status=200)

    async def sglang_release(self, request: web.Request) -> web.Response:
        tags = await self._sglang_tags(request)
        # Releasing what is already released is a no-op (unconfirmed against SGLang).
        todo = [t for t in tags if t not in self.engine.released]
        if todo:
            await self.engine.release(todo)
        return web.json_response({"success": True, "message": "released"})

    async def sglang_resume(self, request: web.Request) -> web.Response:
        tags = await self._sglang_tags(request)
        missing = [t for t in tags if t not in self.engine.released]
        if missing:
            return self.error(400, f"cannot resume tags {missing}: they were not released")
        try:
            await self.engine.resume(tags)
        except SimulatedOOM as e:
            self.engine.log.error(str(e))
            return self.error(500, str(e))
        return web.json_response({"success": True, "message": "resumed"})

    async def _sglang_tags(self, request: web.Request) -> list[str]:
        if not self.opts.sleep_enabled:
            raise ApiError(400, "memory saver is not enabled; start with --enable-memory-saver")
        body = await self.read_json(request) if request.can_read_body else {}
        tags = body.get("tags") or ["weights", "kv_cache"]
        if not isinstance(tags, list) or any(t not in ("weights", "kv_cache") for t in tags):
            raise ApiError(400, "tags must be a list of 'weights' and 'kv_cache'")
        return list(dict.fromkeys(tags))

    async def sglang_server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.opts.model,
                "served_model_name": self.opts.name,
                "max_running_requests": self.opts.max_num_seqs,
                "context_length": self.opts.max_model_len,
                "enable_memory_saver": self.opts.sleep_enabled,
                "incremental_streaming_output": self.opts.incremental_stream,
                "version": "simulated",
            }
        )

    async def sglang_model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.opts.model, "is_generation": True})

    # -- simulator control (not part of any engine's API)
    async def sim_prefill(self, request: web.Request) -> web.Response:
        """A decode engine's remote prefill (the KV transfer is simulated by the reply)."""
        body = await self.read_json(request)
        rid, n = body.get("request_id"), body.get("prompt_tokens")
        if not isinstance(rid, str) or not isinstance(n, int) or n < 0:
            return self.error(400, "request_id (string) and prompt_tokens (int >= 0) required")
        await self.engine.prefill(rid, n)
        return web.json_response({"request_id": rid, "prefilled_tokens": n})

    async def sim_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.state())

    async def sim_faults(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        try:
            self.engine.set_faults(body)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        return web.json_response(self.engine.state()["faults"])
