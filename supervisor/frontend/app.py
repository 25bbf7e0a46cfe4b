"""The OpenAI-compatible HTTP entry point (served by :mod:`supervisor.frontend.server`).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream or not),
``GET /v1/models``, ``GET /health``. Every request gets an id (``X-Request-Id`` if the
client sent one), returned in the ``X-Request-Id`` header and used engine-side, so one id
lines up in the client's, the supervisor's and the engine's logs. Bad input gets a 4xx in
OpenAI's error shape; nothing a client sends can crash the frontend.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from logging import INFO
from typing import Any, Final

import anyio
import orjson

from supervisor import log as logging
from supervisor.auth import bearer_matches
from supervisor.config import Config
from supervisor.frontend.choices import (
    chat_opening,
    choice_request,
    engines_of,
    failover_of,
    run_all,
    usage_of,
)
from supervisor.frontend.forward import forward_route, label_for
from supervisor.frontend.heads import REASONS, Request
from supervisor.frontend.outcome import ClientGone, MigrationFailed, UpstreamClientError
from supervisor.frontend.routing import EngineDirectory, Rejected, Router, Target, engine_ids
from supervisor.frontend.server import FrontendServer, Reply
from supervisor.frontend.shape import ClientShape
from supervisor.frontend.streams import Emit, RequestRelay
from supervisor.frontend.validate import BadRequest, check_fields, error_body, request_id
from supervisor.jsonbody import BadJson
from supervisor.jsonbody import parse as parse_json
from supervisor.metric_labels import CancelRoute, RejectReason
from supervisor.metrics import Metrics
from supervisor.netguard import ConnectionGuard
from supervisor.requests import ClientRequest, RequestKind
from supervisor.sessions import Sessions

# What may wait in a client's socket buffer before the relay stops writing at once and
# waits for the client to read (the engine's connection paused meanwhile).
_CLIENT_BUFFER: Final = 64 * 1024
# The statuses answered, as the label's text (no str() per request).
_STATUS_TEXT: Final = {status: str(status) for status in REASONS}
_ROUTES: Final[dict[str, tuple[str, ...]]] = {
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/models": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
}


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
        self._idle: anyio.Event | None = None  # made by drain(), set when the last one leaves
        self.ready = False
        self.log = logging.get(component="frontend")
        # Asked once: the log level is set before the frontend is made (and not reloaded).
        self.logs_info = self.log.is_enabled_for(INFO)
        self._request_counts = metrics.requests.counts

    def server(self, guard: ConnectionGuard) -> FrontendServer:
        """The HTTP server that hands this frontend its requests."""
        return FrontendServer(
            self.handle,
            guard,
            max_body=self.fcfg.max_body_bytes,
            header_timeout=self.fcfg.header_timeout,
            keepalive_timeout=self.fcfg.keepalive_timeout,
            error_body=error_body,
            count_refused=lambda status: self._count("unmatched", status),
            client_buffer=_CLIENT_BUFFER,
            body_timeout=self.fcfg.body_timeout,
            max_buffered=self.fcfg.max_buffered_bytes,
        )

    def _count(self, route: str, status: int) -> None:
        # Labels come from the route table, never from the client's path: the set of
        # series must not grow with what clients send.
        counts = self._request_counts
        key = (route, _STATUS_TEXT.get(status) or str(status))
        counts[key] = counts.get(key, 0) + 1

    async def handle(self, request: Request, reply: Reply) -> None:
        """Route one request, answer errors in OpenAI's shape, and count it."""
        path, method = request.path, request.method
        allowed = _ROUTES.get(path)
        route = path if allowed is not None else "unmatched"
        try:
            if allowed is None:
                label = label_for(path)
                if label is None:
                    raise BadRequest(f"no route {method} {path[:200]}", status=404)
                route = label
                await forward_route(self, request, reply, label)
            elif method not in allowed:
                raise BadRequest(f"{method[:20]} is not allowed on {path}", status=405)
            elif (
                self.api_key is not None
                and path.startswith("/v1/")
                and not bearer_matches(request.headers.get("authorization", ""), self.api_key)
            ):
                reply.send(
                    401, error_body(401, "Incorrect API key provided.", code="invalid_api_key")
                )
            elif path == "/v1/completions":
                await self._serve(request, reply, "completion")
            elif path == "/v1/chat/completions":
                await self._serve(request, reply, "chat")
            elif path == "/v1/models":
                self.models(reply)
            else:
                self.health(reply)
        except BadRequest as e:
            headers = [("Retry-After", str(self.fcfg.retry_after))] if e.status == 503 else []
            if e.status == 405:
                headers.append(("Allow", ", ".join(allowed or ())))
            reply.send(
                e.status, error_body(e.status, str(e), param=e.param, code=e.code), headers=headers
            )
        self._count(route, reply.status or 499)

    # -- plain routes ------------------------------------------------------------------
    def health(self, reply: Reply) -> None:
        if self.router.draining:
            reply.send(503, b'{"status": "draining"}')
        elif not self.ready:
            reply.send(503, b'{"status": "starting"}')
        else:
            reply.send(200, b'{"status": "ok"}')

    def models(self, reply: Reply) -> None:
        now = int(time.time())
        models = [
            {"id": m, "object": "model", "created": now, "owned_by": "failover-supervisor"}
            for m in self.directory.models()
        ]
        reply.send(200, orjson.dumps({"object": "list", "data": models}))

    # -- requests ----------------------------------------------------------------------
    def _body(self, request: Request, kind: RequestKind) -> tuple[dict[str, Any], bool]:
        """The request's body, checked, and whether it uses a field the relay renders
        itself (logprobs, several choices, an echo, usage in every chunk): asked once."""
        try:
            body = parse_json(request.body, max_depth=self.fcfg.max_json_depth)
        except BadJson as e:
            raise BadRequest(str(e)) from e
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' (a string) is required", param="model")
        if not self.directory.has_model(model):
            raise self.no_such_model(model)
        features = check_fields(body, kind)
        return body, features

    def no_such_model(self, model: str) -> BadRequest:
        if not self.ready:  # another node's model may not be known yet
            return BadRequest(
                "the supervisor is starting; retry shortly", status=503, code="unavailable"
            )
        return BadRequest(
            f"The model `{model}` does not exist.",
            param="model",
            status=404,
            code="model_not_found",
        )

    def engine_fields(self, engines: list[Target]) -> list[tuple[str, str]]:
        """The headers that name the engines a request went to, in order."""
        fields = [("X-Failover-Engine", ",".join([t.engine_id for t in engines]))]
        if any(t.node for t in engines):
            fields.append(("X-Failover-Node", ",".join([t.node for t in engines])))
        return fields

    def _relay(
        self,
        req: ClientRequest,
        rid: str,
        shape: ClientShape,
        emit: Emit | None,
        emit_now: Callable[[bytes], bool] | None,
    ) -> RequestRelay:
        """The relay of one request (or of one choice of it), on this frontend's engines."""
        return RequestRelay(
            req,
            rid,
            shape,
            self.router,
            self.sessions,
            self.fcfg,
            self.cfg.health,
            self.metrics,
            emit,
            emit_now,
        )

    async def _serve(self, request: Request, reply: Reply, kind: RequestKind) -> None:
        if self.router.draining:
            self.metrics.rejections.labels(RejectReason.DRAINING).inc()
            return self.unavailable(reply, "the supervisor is shutting down")
        body, features = self._body(request, kind)
        rid = request_id(request.headers.get("x-request-id", ""))
        if features and body.get("n") not in (None, 1):
            return await self._serve_choices(request, reply, kind, body, rid)
        req = ClientRequest(kind, body, features)
        shape = ClientShape(
            kind,
            ("chatcmpl-" if kind == "chat" else "cmpl-") + rid,
            body["model"],
            int(time.time()),
            with_ids=bool(body.get("return_token_ids")),
        )

        def begin() -> None:
            head = [
                ("Content-Type", "text/event-stream"),
                ("Cache-Control", "no-cache"),
                ("X-Request-Id", rid),
            ]
            if self.fcfg.engine_header:  # (the engines so far: migrations come later)
                head += self.engine_fields(relay.engines())
            if kind != "chat":
                reply.start(200, head)
            elif relay.extras is None:
                reply.start(200, head, shape.role_chunk())
            else:  # (usage in every chunk, an echo)
                reply.start(200, head, chat_opening([relay]))

        emit: Callable[[bytes], Awaitable[None]] | None = None
        emit_now: Callable[[bytes], bool] | None = None
        stream = req.stream
        if stream:  # (the writers are made only where they are used)

            async def emit(data: bytes) -> None:
                if not reply.started:
                    begin()
                await reply.write(data)  # a failed write is the relay's ClientGone

            def emit_now(data: bytes) -> bool:
                # Straight to the socket while the client keeps up; else False, and the
                # relay waits on emit (which waits for the client). Once the stream has
                # begun, the relay writes through the connection's own method.
                if not reply.started:
                    begin()
                relay.emit_now = reply.write_now
                return reply.write_now(data)

        relay = self._relay(req, rid, shape, emit, emit_now)
        self.active += 1  # (until leave)
        t0 = time.monotonic()
        outcome = "cancelled"  # (unless the relay ends otherwise)
        try:
            try:
                await relay.run()
                outcome = "ok"
            except BaseException as error:
                outcome = await self._failed(reply, kind, rid, [relay], error)
                return None
        finally:
            self.leave()
            if self.fcfg.access_log and self.logs_info:
                first = relay.served_by
                # (One engine's id as it is, for most requests: no list, no join.)
                engine = (
                    engine_ids(relay.engines())
                    if relay.moved_to or first is None
                    else first.engine_id
                )
                ms = round((time.monotonic() - t0) * 1000, 1)
                # In a cluster, the nodes too.
                nodes = (
                    {"node": ",".join([t.node for t in relay.engines()])}
                    if first is not None and first.node
                    else {}
                )
                self.log.info(
                    "request",
                    request_id=rid,
                    model=body["model"],
                    kind=kind,
                    stream=stream,
                    outcome=outcome,
                    migrations=relay.attempt,
                    tokens=relay.progress.completion_tokens,
                    ms=ms,
                    engine=engine,
                    **nodes,
                )
        if not stream:
            failover = relay.failover_report()
            headers = [("X-Request-Id", rid)]
            if self.fcfg.engine_header:
                headers += self.engine_fields(relay.engines())
            if failover:
                headers.append(("X-Failover-Migrations", str(failover["migrations"])))
                if failover["inexact"]:
                    headers.append(("X-Failover-Inexact", ",".join(failover["inexact"])))
            answer = shape.full(relay.progress, relay.finish, relay.usage(), failover, relay.extras)
            return reply.send(200, orjson.dumps(answer), headers=headers)
        so = body.get("stream_options") or {}
        with contextlib.suppress(ConnectionError):  # the client left after the last token
            if not reply.started:  # nothing streamed at all (e.g. zero tokens): still a stream
                begin()
            if so.get("include_usage"):
                await reply.write(shape.usage_chunk(relay.usage()))
            await reply.write(b"data: [DONE]\n\n")
        return None

    async def _failed(
        self,
        reply: Reply,
        kind: RequestKind,
        rid: str,
        relays: list[RequestRelay],
        error: BaseException,
    ) -> str:
        """A request's relays (one, or one per choice) failed with ``error``: answer the
        client as the failure deserves, and say the outcome for the access log. A
        cancellation (or a reset) is raised again, after the relays' upstream requests are
        aborted. (Only failures pay for this call: an answer that went well never makes it.)"""
        if isinstance(error, (anyio.get_cancelled_exc_class(), ConnectionResetError)):
            self.metrics.cancellations.labels(CancelRoute(kind)).inc()
            with anyio.CancelScope(shield=True):
                for r in relays:
                    await r.abort_upstream()
            raise error
        if not isinstance(error, Exception):
            raise error  # (SystemExit, KeyboardInterrupt: not the request's to handle)
        if isinstance(error, Rejected):
            self.metrics.rejections.labels(error.reason).inc()
            if not reply.started:
                self.unavailable(reply, str(error))
            else:
                await self._stream_error(reply, 503, str(error))
            return f"rejected:{error.reason}"
        if isinstance(error, UpstreamClientError):
            if not reply.started:
                reply.send(error.status, error_body(error.status, str(error)))
            else:
                await self._stream_error(reply, error.status, str(error))
            return f"engine_refused:{error.status}"
        if isinstance(error, MigrationFailed):
            if not reply.started:
                message = f"the request could not be completed: {error}"
                reply.send(502, error_body(502, message))
            else:
                await self._stream_error(reply, 502, str(error))
            return "migration_failed"
        if isinstance(error, ClientGone):
            self.metrics.cancellations.labels(CancelRoute(kind)).inc()
            with anyio.CancelScope(shield=True):
                for r in relays:
                    await r.abort_upstream()
            return f"client_gone: {error}"  # nobody to answer
        # A bug: contained, logged with its traceback, 500 to the client.
        self.log.error("request failed inside the supervisor", request_id=rid, exc_info=error)
        if not reply.started:
            reply.send(500, error_body(500, "internal error in the supervisor; see its log"))
        else:
            await self._stream_error(reply, 500, "internal error in the supervisor")
        return f"error: {type(error).__name__}"

    async def _serve_choices(
        self, request: Request, reply: Reply, kind: RequestKind, body: dict[str, Any], rid: str
    ) -> None:
        """A request for ``n`` > 1 choices: each choice is a request of its own upstream
        (choice i seeded seed + i, as vLLM seeds its child requests), relayed, and moved
        on a failure, on its own; the client gets one answer with every choice."""
        req = ClientRequest(kind, body, True)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        created, with_ids = int(time.time()), bool(body.get("return_token_ids"))
        stream = req.stream
        relays: list[RequestRelay] = []

        def begin() -> None:
            head = [
                ("Content-Type", "text/event-stream"),
                ("Cache-Control", "no-cache"),
                ("X-Request-Id", rid),
            ]
            if self.fcfg.engine_header:
                head += self.engine_fields(engines_of(relays))
            reply.start(200, head, chat_opening(relays) if kind == "chat" else b"")

        emit: Callable[[bytes], Awaitable[None]] | None = None
        emit_now: Callable[[bytes], bool] | None = None
        if stream:

            async def emit(data: bytes) -> None:
                if not reply.started:
                    begin()
                await reply.write(data)  # a failed write is the relay's ClientGone

            def emit_now(data: bytes) -> bool:
                if not reply.started:
                    begin()
                for r in relays:
                    r.emit_now = reply.write_now
                return reply.write_now(data)

        for i in range(body["n"]):
            shape = ClientShape(kind, prefix + rid, body["model"], created, with_ids, i)
            relays.append(self._relay(choice_request(req, i), rid, shape, emit, emit_now))
        self.active += 1  # (until leave)
        t0 = time.monotonic()
        outcome = "cancelled"  # (unless the relays end otherwise)
        try:
            try:
                await run_all(relays)
                outcome = "ok"
            except BaseException as error:
                outcome = await self._failed(reply, kind, rid, relays, error)
                return None
        finally:
            self.leave()
            if self.fcfg.access_log and self.logs_info:
                engines = engines_of(relays)
                nodes = {}
                if any(t.node for t in engines):  # a cluster: the nodes too
                    nodes["node"] = ",".join([t.node for t in engines])
                self.log.info(
                    "request",
                    request_id=rid,
                    model=body["model"],
                    kind=kind,
                    stream=stream,
                    outcome=outcome,
                    choices=len(relays),
                    migrations=sum([r.attempt for r in relays]),
                    tokens=sum([r.progress.completion_tokens for r in relays]),
                    ms=round((time.monotonic() - t0) * 1000, 1),
                    engine=engine_ids(engines),
                    **nodes,
                )
        usage = usage_of(relays)
        if not stream:
            failover = failover_of(relays)
            headers = [("X-Request-Id", rid)]
            if self.fcfg.engine_header:
                headers += self.engine_fields(engines_of(relays))
            if failover:
                headers.append(("X-Failover-Migrations", str(failover["migrations"])))
                if failover["inexact"]:
                    headers.append(("X-Failover-Inexact", ",".join(failover["inexact"])))
            answer: dict[str, Any] = {}
            for r in relays:
                one = r.shape.full(r.progress, r.finish, usage, failover, r.extras)
                if answer:
                    answer["choices"] += one["choices"]
                else:
                    answer = one
            return reply.send(200, orjson.dumps(answer), headers=headers)
        so = body.get("stream_options") or {}
        with contextlib.suppress(ConnectionError):  # the client left after the last token
            if not reply.started:  # nothing streamed at all: still a stream
                begin()
            if so.get("include_usage"):
                await reply.write(relays[0].shape.usage_chunk(usage))
            await reply.write(b"data: [DONE]\n\n")
        return None

    def unavailable(self, reply: Reply, message: str) -> None:
        body = error_body(503, message, code="unavailable")
        reply.send(503, body, headers=[("Retry-After", str(self.fcfg.retry_after))])

    async def _stream_error(self, reply: Reply, status: int, message: str) -> None:
        err = {"error": {"message": message, "type": "server_error", "param": None, "code": status}}
        with contextlib.suppress(ConnectionError):
            # As vLLM ends a stream that failed: the error event, then [DONE].
            await reply.write(b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests; let in-flight ones finish within the drain timeout."""
        self.router.draining = True
        self.log.info("draining", inflight=self.active, timeout=self.fcfg.drain_timeout)
        with anyio.move_on_after(self.fcfg.drain_timeout):
            if self.active:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self.active:
            self.log.warning("drain timeout: requests still in flight", inflight=self.active)
