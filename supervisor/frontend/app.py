"""The OpenAI-compatible HTTP entry point (aiohttp).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream or not),
``GET /v1/models``, ``GET /health``. Every request gets an id (``X-Request-Id`` if the
client sent one), returned in the ``X-Request-Id`` header and used engine-side, so one id
lines up in the client's, the supervisor's and the engine's logs. Bad input gets a 4xx in
OpenAI's error shape; nothing a client sends can crash the frontend.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import orjson
from aiohttp import web

from supervisor import log as logging
from supervisor.auth import bearer_ok
from supervisor.config import Config
from supervisor.frontend.routing import EngineDirectory, Rejected, Router
from supervisor.frontend.streams import (
    ClientGone,
    ClientShape,
    MigrationFailed,
    RequestRelay,
    UpstreamClientError,
)
from supervisor.jsonbody import BadJson
from supervisor.jsonbody import parse as parse_json
from supervisor.metrics import Metrics
from supervisor.model import ClientRequest, RequestKind
from supervisor.sessions import Sessions

# What may wait in a client's socket buffer before the relay stops writing at once and
# waits for the client to read (the engine's connection paused meanwhile).
_CLIENT_BUFFER = 64 * 1024
_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Parameters whose meaning the relay cannot keep across a migration.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: bool(v),
    "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: bool(v),
    "suffix": lambda v: v is not None,
}


class BadRequest(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def openai_error(
    status: int,
    message: str,
    *,
    etype: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    etype = etype or {
        400: "invalid_request_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        503: "service_unavailable",
    }.get(status, "server_error")
    return web.json_response(
        {"error": {"message": message, "type": etype, "param": param, "code": code}},
        status=status,
        headers=headers,
    )


class Frontend:
    def __init__(
        self,
        cfg: Config,
        directory: EngineDirectory,
        metrics: Metrics,
        sessions: Sessions,
        api_key: str | None = None,
    ) -> None:
        self.api_key = api_key  # when set, /v1/* needs "Authorization: Bearer <key>"
        self.cfg, self.fcfg = cfg, cfg.frontend
        self.directory, self.metrics, self.sessions = directory, metrics, sessions
        self.router = Router(self.fcfg, directory, metrics)
        self.active = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.ready = False
        self.log = logging.get(component="frontend")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.fcfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Labels come from the route's template, never from the client's path: the set of
        # series must not grow with what clients send.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        if (
            self.api_key is not None
            and request.path.startswith("/v1/")
            and not bearer_ok(request, self.api_key)
        ):
            self.metrics.requests.labels(route, "401").inc()
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            resp: web.StreamResponse = await handler(request)
        except BadRequest as e:
            retry = {"Retry-After": str(self.fcfg.retry_after)} if e.status == 503 else None
            resp = openai_error(e.status, str(e), param=e.param, code=e.code, headers=retry)
        except web.HTTPNotFound:
            resp = openai_error(404, f"no route {request.method} {request.path[:200]}")
        except web.HTTPMethodNotAllowed:
            resp = openai_error(405, f"{request.method} is not allowed on {request.path[:200]}")
        self.metrics.requests.labels(route, str(resp.status)).inc()
        return resp

    # -- plain routes ------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.router.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": now, "owned_by": "failover-supervisor"}
                    for m in self.directory.models()
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    # -- requests ----------------------------------------------------------------------
    async def _body(self, request: web.Request, kind: RequestKind) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise BadRequest(
                f"request body over {self.fcfg.max_body_bytes} bytes", status=413
            ) from e
        try:
            body = parse_json(raw, max_depth=self.fcfg.max_json_depth)
        except BadJson as e:
            raise BadRequest(str(e)) from e
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' (a string) is required", param="model")
        if model not in self.directory.models():
            if not self.ready:  # another node's model may not be known yet
                raise BadRequest(
                    "the supervisor is starting; retry shortly", status=503, code="unavailable"
                )
            raise BadRequest(
                f"The model `{model}` does not exist.",
                param="model",
                status=404,
                code="model_not_found",
            )
        if kind == "chat":
            _check_messages(body.get("messages"))
        else:
            _check_prompt(body.get("prompt"))
            if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], (str, list)):
                body["prompt"] = body["prompt"][0]  # a batch of one is that one prompt
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise BadRequest(f"'{key}' must be a positive integer", param=key)
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("'stream' must be true or false", param="stream")
        stop = body.get("stop")
        if stop is not None and not (
            isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(x, str) for x in stop))
        ):
            raise BadRequest("'stop' must be a string or a list of strings", param="stop")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        for key, bad in UNSUPPORTED.items():
            if bad(body.get(key)):
                raise BadRequest(
                    f"'{key}' is not supported through the failover frontend",
                    param=key,
                    code="unsupported_parameter",
                )
        return body

    async def _serve(self, request: web.Request, kind: RequestKind) -> web.StreamResponse:
        if self.router.draining:
            self.metrics.rejections.labels("draining").inc()
            return self._unavailable("the supervisor is shutting down")
        body = await self._body(request, kind)
        rid = request.headers.get("X-Request-Id", "")
        if not _RID_OK.match(rid):
            rid = uuid.uuid4().hex
        req = ClientRequest(kind, body)
        shape = ClientShape(
            kind,
            ("chatcmpl-" if kind == "chat" else "cmpl-") + rid,
            body["model"],
            int(time.time()),
            with_ids=bool(body.get("return_token_ids")),
        )
        resp: web.StreamResponse | None = None
        direct = False  # the response is under way, chunked: later writes may skip aiohttp
        transport = request.transport

        async def emit(data: bytes) -> None:
            nonlocal resp, direct
            if resp is None:
                resp = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "X-Request-Id": rid,
                    }
                )
                await resp.prepare(request)
                if kind == "chat":
                    await resp.write(shape.role_chunk())
            await resp.write(data)  # a failed write is the relay's ClientGone
            direct = resp.headers.get("Transfer-Encoding") == "chunked"

        def emit_now(data: bytes) -> bool:
            # Straight to the socket, framed as aiohttp frames a chunk, while the client
            # keeps up; else False, and the relay waits on emit (which waits for the client).
            if (
                not direct
                or transport is None
                or transport.is_closing()
                or transport.get_write_buffer_size() > _CLIENT_BUFFER
            ):
                return False
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return True

        relay = RequestRelay(
            req,
            rid,
            shape,
            self.router,
            self.sessions,
            self.fcfg,
            self.cfg.health,
            self.metrics,
            emit if req.stream else None,
            emit_now if req.stream else None,
        )
        self._enter()
        t0 = time.monotonic()
        outcome = "ok"
        try:
            await relay.run()
        except Rejected as e:
            outcome = f"rejected:{e.reason}"
            self.metrics.rejections.labels(e.reason).inc()
            if resp is None:
                return self._unavailable(str(e))
            await self._stream_error(resp, 503, str(e))
            return resp
        except UpstreamClientError as e:
            outcome = f"engine_refused:{e.status}"
            if resp is None:
                return openai_error(e.status, str(e))
            await self._stream_error(resp, e.status, str(e))
            return resp
        except MigrationFailed as e:
            outcome = "migration_failed"
            if resp is None:
                return openai_error(502, f"the request could not be completed: {e}")
            await self._stream_error(resp, 502, str(e))
            return resp
        except ClientGone as e:
            outcome = f"client_gone: {e}"
            self.metrics.cancellations.labels(kind).inc()
            with anyio.CancelScope(shield=True):
                await relay.abort_upstream()
            if resp is None:  # not streaming: nobody to answer, but aiohttp wants a response
                return openai_error(499, str(e))
            return resp
        except (anyio.get_cancelled_exc_class(), ConnectionResetError):
            outcome = "cancelled"
            self.metrics.cancellations.labels(kind).inc()
            with anyio.CancelScope(shield=True):
                await relay.abort_upstream()
            raise
        except Exception as e:  # a bug: contained, logged with its traceback, 500 to the client
            outcome = f"error: {type(e).__name__}"
            self.log.error("request failed inside the supervisor", request_id=rid, exc_info=e)
            if resp is None:
                return openai_error(500, "internal error in the supervisor; see its log")
            await self._stream_error(resp, 500, "internal error in the supervisor")
            return resp
        finally:
            self._leave()
            self.log.info(
                "request",
                request_id=rid,
                model=body["model"],
                kind=kind,
                stream=req.stream,
                outcome=outcome,
                migrations=relay.attempt,
                tokens=relay.progress.completion_tokens,
                ms=round((time.monotonic() - t0) * 1000, 1),
            )
        if not req.stream:
            failover = relay.failover_report()
            headers = {"X-Request-Id": rid}
            if failover:
                headers["X-Failover-Migrations"] = str(failover["migrations"])
                if failover["inexact"]:
                    headers["X-Failover-Inexact"] = ",".join(failover["inexact"])
            return web.Response(
                body=orjson.dumps(
                    shape.full(relay.progress, relay.finish, relay.usage(), failover)
                ),
                content_type="application/json",
                headers=headers,
            )
        so = body.get("stream_options") or {}
        with contextlib.suppress(ConnectionError):  # the client left after the last token
            if resp is None:  # nothing streamed at all (e.g. zero tokens): still a stream
                await emit(b"")
            assert resp is not None
            if so.get("include_usage"):
                await resp.write(shape.usage_chunk(relay.usage()))
            await resp.write(b"data: [DONE]\n\n")
        return resp if resp is not None else web.Response(status=499)

    def _unavailable(self, message: str) -> web.Response:
        return openai_error(
            503, message, code="unavailable", headers={"Retry-After": str(self.fcfg.retry_after)}
        )

    async def _stream_error(self, resp: web.StreamResponse, status: int, message: str) -> None:
        err = {"error": {"message": message, "type": "server_error", "param": None, "code": status}}
        with contextlib.suppress(ConnectionError):
            # As vLLM ends a stream that failed: the error event, then [DONE].
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")

    def _enter(self) -> None:
        self.active += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests; let in-flight ones finish within the drain timeout."""
        self.router.draining = True
        self.log.info("draining", inflight=self.active, timeout=self.fcfg.drain_timeout)
        with anyio.move_on_after(self.fcfg.drain_timeout):
            await self._idle.wait()
        if self.active:
            self.log.warning("drain timeout: requests still in flight", inflight=self.active)


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return
        if len(prompt) == 1 and (
            isinstance(prompt[0], str)
            or (
                isinstance(prompt[0], list)
                and prompt[0]
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt[0])
            )
        ):
            return
        raise BadRequest(
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            param="prompt",
        )
    raise BadRequest("'prompt' (a string or a list of token ids) is required", param="prompt")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(
                f"messages[{i}] must be an object with a 'role' string", param=f"messages[{i}]"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(
                f"messages[{i}].content must be a string or a list of parts",
                param=f"messages[{i}].content",
            )
