"""The OpenAI-compatible HTTP entry point (served by :mod:`supervisor.frontend.server`).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream or not),
``GET /v1/models``, ``GET /health``. Every request gets an id (``X-Request-Id`` if the
client sent one), returned in the ``X-Request-Id`` header and used engine-side, so one id
lines up in the client's, the supervisor's and the engine's logs. Bad input gets a 4xx in
OpenAI's error shape; nothing a client sends can crash the frontend.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from logging import INFO
from typing import Any, Final

import anyio
import orjson

from supervisor import log as logging
from supervisor.auth import bearer_matches
from supervisor.config import Config
from supervisor.frontend.forward import (
    OTHER_V1,
    EngineGone,
    Forwarding,
    StreamBroken,
    form_model,
    label_for,
)
from supervisor.frontend.outcome import ClientGone, MigrationFailed, UpstreamClientError
from supervisor.frontend.routing import EngineDirectory, Rejected, Router, Target
from supervisor.frontend.server import REASONS, FrontendServer, Reply, Request
from supervisor.frontend.shape import ClientShape
from supervisor.frontend.streams import RequestRelay
from supervisor.jsonbody import BadJson, has_any_key
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
_RID_OK: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids need to be unique, not secret (nothing is authorised by one): a generator
# seeded from the system's randomness, not a getrandom() call per request.
_RID_BITS: Final = random.Random(os.urandom(32)).getrandbits
# (A bound format, called from C: mypyc makes an f-string with a format spec into three
# method calls.)
_HEX128: Final = "{:032x}".format
# Fields the relay reads and renders itself (checked and handled only where one is there).
_FEATURE_FIELDS: Final = (
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
    "prompt_logprobs",
    "stream_options",
)
# The most choices one request may ask for (n): each is a stream of its own to the engines.
MAX_CHOICES: Final = 128


class BadRequest(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_body(
    status: int,
    message: str,
    *,
    etype: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """An error in OpenAI's shape."""
    etype = etype or {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        431: "invalid_request_error",
        503: "service_unavailable",
    }.get(status, "server_error")
    err = {"message": message, "type": etype, "param": param, "code": code}
    return orjson.dumps({"error": err})


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
                await self._forward(request, reply, label)
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
            raise self._no_such_model(model)
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
        features = has_any_key(body, _FEATURE_FIELDS)  # (mostly none of them is there)
        if features:
            _check_sampling(body, kind)
        return body, features

    def _no_such_model(self, model: str) -> BadRequest:
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

    def _engine_fields(self, engines: list[Target]) -> list[tuple[str, str]]:
        """The headers that name the engines a request went to, in order."""
        fields = [("X-Failover-Engine", ",".join([t.engine_id for t in engines]))]
        if any(t.node for t in engines):
            fields.append(("X-Failover-Node", ",".join([t.node for t in engines])))
        return fields

    async def _serve(self, request: Request, reply: Reply, kind: RequestKind) -> None:
        if self.router.draining:
            self.metrics.rejections.labels(RejectReason.DRAINING).inc()
            return self._unavailable(reply, "the supervisor is shutting down")
        body, features = self._body(request, kind)
        rid = request.headers.get("x-request-id", "")
        if not rid or not _RID_OK.match(rid):
            rid = _HEX128(_RID_BITS(128))  # 128 bits as uuid4, without a system call
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
                head += self._engine_fields(relay.engines())
            if kind != "chat":
                reply.start(200, head)
            elif relay.extras is None:
                reply.start(200, head, shape.role_chunk())
            else:  # (usage in every chunk, an echo)
                reply.start(200, head, _chat_opening([relay]))

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

        relay = RequestRelay(
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
        self.active += 1  # (until _leave)
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
            self._leave()
            if self.fcfg.access_log and self.logs_info:
                first = relay.served_by
                # (One engine's id as it is, for most requests: no list, no join.)
                engine = (
                    _engine_ids(relay.engines())
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
                headers += self._engine_fields(relay.engines())
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
                self._unavailable(reply, str(error))
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
                head += self._engine_fields(_engines_of(relays))
            reply.start(200, head, _chat_opening(relays) if kind == "chat" else b"")

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
            relays.append(
                RequestRelay(
                    _choice(req, i),
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
            )
        self.active += 1  # (until _leave)
        t0 = time.monotonic()
        outcome = "cancelled"  # (unless the relays end otherwise)
        try:
            try:
                await _run_all(relays)
                outcome = "ok"
            except BaseException as error:
                outcome = await self._failed(reply, kind, rid, relays, error)
                return None
        finally:
            self._leave()
            if self.fcfg.access_log and self.logs_info:
                engines = _engines_of(relays)
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
                    engine=_engine_ids(engines),
                    **nodes,
                )
        usage = _usage_of(relays)
        if not stream:
            failover = _failover_of(relays)
            headers = [("X-Request-Id", rid)]
            if self.fcfg.engine_header:
                headers += self._engine_fields(_engines_of(relays))
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

    # -- every other route -------------------------------------------------------------
    async def _forward(self, request: Request, reply: Reply, label: str) -> None:
        """A route passed to an engine as it is (see :mod:`supervisor.frontend.forward`)."""
        method = request.method
        allowed = ("GET", "POST", "DELETE") if label == OTHER_V1 else ("POST",)
        if method not in allowed:
            message = f"{method[:20]} is not allowed on {request.path[:200]}"
            return reply.send(
                405, error_body(405, message), headers=[("Allow", ", ".join(allowed))]
            )
        if self.api_key is not None and not bearer_matches(
            request.headers.get("authorization", ""), self.api_key
        ):
            return reply.send(
                401, error_body(401, "Incorrect API key provided.", code="invalid_api_key")
            )
        if self.router.draining:
            self.metrics.rejections.labels(RejectReason.DRAINING).inc()
            return self._unavailable(reply, "the supervisor is shutting down")
        content_type = request.headers.get("content-type") or "application/json"
        model = self._forwarded_model(request.body, content_type)
        if model is None:
            model = self._any_model()
            if model is None:
                return self._unavailable(reply, "no engine is serving any model right now")
        rid = request.headers.get("x-request-id", "")
        if not rid or not _RID_OK.match(rid):
            rid = _HEX128(_RID_BITS(128))
        target = request.path + ("?" + request.query if request.query else "")
        fw = Forwarding(
            self.router,
            self.sessions.relay,
            path=target,
            method=method,
            body=request.body if request.body or method == "POST" else None,
            content_type=content_type,
            headers={"X-Request-Id": rid},
            first_byte_timeout=self.cfg.health.first_token_timeout,
            # (Events are not tokens: a Responses stream's first ones come before its
            # prefill. A dead engine ends the wait at once through its lease.)
            stall_timeout=self.cfg.health.first_token_timeout,
            client_write_timeout=self.fcfg.client_write_timeout,
        )

        def head() -> list[tuple[str, str]]:
            fields = [("X-Request-Id", rid)]
            if self.fcfg.engine_header:
                fields += self._engine_fields(fw.engines)
            return fields

        self.active += 1
        t0 = time.monotonic()
        outcome = "ok"
        try:
            lease = await self.router.acquire(model)
            try:
                await fw.once(lease, reply, head)
            except EngineGone as gone:
                # Nothing reached the client: asked once more, of another engine (a shadow
                # being woken included, for as long as a migration would wait for one).
                failed = lease.target.engine_id
                self.log.warning(
                    "engine failed before answering; asking another",
                    request_id=rid,
                    route=label,
                    engine=failed,
                    reason=str(gone),
                )
                self.router.release(lease)
                lease = await self.router.acquire(
                    model, exclude=frozenset((failed,)), wait=self.fcfg.migration_wait
                )
                await fw.once(lease, reply, head)
            finally:
                self.router.release(lease)  # (a second release of a lease is harmless)
        except Rejected as rejected:
            outcome = f"rejected:{rejected.reason}"
            self.metrics.rejections.labels(rejected.reason).inc()
            if not reply.started:
                self._unavailable(reply, str(rejected))
        except EngineGone as gone:
            outcome = "engine_failed"
            if not reply.started:
                message = f"the request could not be completed: {gone}"
                reply.send(502, error_body(502, message), headers=head())
        except StreamBroken as broken:
            outcome = f"stream_broken: {broken}"
        except ConnectionError as gone_client:  # the client went away (its write failed)
            outcome = f"client_gone: {gone_client}"
            self.metrics.cancellations.labels(label).inc()
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            self.metrics.cancellations.labels(label).inc()
            raise
        except Exception as bug:  # a bug: contained, logged with its traceback, 500
            outcome = f"error: {type(bug).__name__}"
            self.log.error("request failed inside the supervisor", request_id=rid, exc_info=bug)
            if not reply.started:
                reply.send(500, error_body(500, "internal error in the supervisor; see its log"))
        finally:
            self._leave()
            if self.fcfg.access_log and self.logs_info:
                fields: dict[str, Any] = {"engine": _engine_ids(fw.engines)}
                if fw.engines and fw.engines[0].node:  # a cluster: the nodes too
                    fields["node"] = ",".join([t.node for t in fw.engines])
                self.log.info(
                    "request",
                    request_id=rid,
                    model=model,
                    route=label,
                    stream=fw.streamed,
                    outcome=outcome,
                    ms=round((time.monotonic() - t0) * 1000, 1),
                    **fields,
                )
        return None

    def _forwarded_model(self, body: bytes, content_type: str) -> str | None:
        """The model a forwarded body names (None: any engine will do); 400 for a JSON body
        that is not an object or names a model that is not a string, 404 for a model no
        engine serves. (Whether it streams is the engine's answer's to say.)"""
        model: Any = None
        ctype = content_type.lower()
        if body and ctype.startswith("multipart/form-data"):
            model = form_model(body)
        elif body:
            # JSON whatever it is labelled (curl -d says form-urlencoded); a body that is not
            # JSON and not labelled so is the engine's to judge, on any engine.
            try:
                obj = parse_json(body, max_depth=self.fcfg.max_json_depth)
            except BadJson as e:
                if "json" in ctype:
                    raise BadRequest(str(e)) from e
                obj = {}
            if not isinstance(obj, dict):
                raise BadRequest("request body must be a JSON object")
            model = obj.get("model")
        if model is None:
            return None
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' must be a non-empty string", param="model")
        if not self.directory.has_model(model):
            raise self._no_such_model(model)
        return model

    def _any_model(self) -> str | None:
        """For a request that names no model: the model whose least-loaded engine is the
        least loaded of all (the first model when none has an engine now: it waits)."""
        models = self.directory.models()
        best: str | None = None
        best_load = 0
        for m in models:
            for t in self.directory.candidates(m):
                load = self.router.inflight.get(t.engine_id, 0)
                if best is None or load < best_load:
                    best, best_load = m, load
        return best if best is not None else (models[0] if models else None)

    def _unavailable(self, reply: Reply, message: str) -> None:
        body = error_body(503, message, code="unavailable")
        reply.send(503, body, headers=[("Retry-After", str(self.fcfg.retry_after))])

    async def _stream_error(self, reply: Reply, status: int, message: str) -> None:
        err = {"error": {"message": message, "type": "server_error", "param": None, "code": status}}
        with contextlib.suppress(ConnectionError):
            # As vLLM ends a stream that failed: the error event, then [DONE].
            await reply.write(b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")

    def _leave(self) -> None:
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


def _engine_ids(engines: list[Target]) -> str:
    return ",".join([t.engine_id for t in engines])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sampling(body: dict[str, Any], kind: RequestKind) -> None:
    """The fields the relay reads itself must have the types it reads them as (their
    ranges are the engine's to judge)."""
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_CHOICES):
        raise BadRequest(f"'n' must be an integer from 1 to {MAX_CHOICES}", param="n")
    logprobs = body.get("logprobs")
    if kind == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest("'logprobs' must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None and not _is_int(top):
            raise BadRequest("'top_logprobs' must be an integer", param="top_logprobs")
    elif logprobs is not None and not _is_int(logprobs):
        raise BadRequest("'logprobs' must be an integer", param="logprobs")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None and not _is_int(prompt_logprobs):
        raise BadRequest("'prompt_logprobs' must be an integer", param="prompt_logprobs")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise BadRequest("'echo' must be true or false", param="echo")
    if (
        echo
        and kind == "completion"
        and not isinstance(body["prompt"], str)
        and not body.get("return_token_ids")
    ):
        # vLLM echoes a token prompt as its text: the frontend has no tokenizer.
        raise BadRequest(
            "'echo' of a prompt given as token ids is not supported through the "
            "failover frontend (it has no tokenizer to render the prompt's text); "
            "send the prompt as text, or ask for return_token_ids",
            param="echo",
            code="unsupported_parameter",
        )


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


def _choice(req: ClientRequest, index: int) -> ClientRequest:
    """Choice ``index`` of a request with ``n`` > 1, as a request of one choice. A seed
    becomes seed + index, as vLLM seeds the choices of one request (its child requests):
    each choice then equals what the engine would have sampled for it."""
    body = dict(req.body)
    body.pop("n", None)
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and index:
        body["seed"] = seed + index
    return ClientRequest(req.kind, body)


async def _run_all(relays: list[RequestRelay]) -> None:
    """Run every choice's relay; the first to fail ends the others, and its error is the
    request's."""
    try:
        async with anyio.create_task_group() as tg:
            for r in relays:
                tg.start_soon(r.run)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    cancelled = anyio.get_cancelled_exc_class()
    found: BaseException | None = None
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            e = _first_error(e)
        if not isinstance(e, cancelled):
            return e
        found = found or e
    assert found is not None
    return found


def _usage_of(relays: list[RequestRelay]) -> dict[str, int]:
    """Usage of a request with several choices: its prompt once, every choice's tokens."""
    prompt = next((r.prompt_tokens for r in relays if r.prompt_tokens is not None), 0)
    completion = sum([r.progress.completion_tokens for r in relays])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _failover_of(relays: list[RequestRelay]) -> dict[str, Any] | None:
    """The failover report of a request with several choices: every choice's moves."""
    reports = [r.failover_report() for r in relays]
    moved = [rep for rep in reports if rep]
    if not moved:
        return None
    inexact: list[str] = []
    for rep in moved:
        inexact += [f for f in rep["inexact"] if f not in inexact]
    out: dict[str, Any] = {"migrations": sum([rep["migrations"] for rep in moved])}
    out["inexact"] = inexact
    return out


def _engines_of(relays: list[RequestRelay]) -> list[Target]:
    """The engines a request of several choices went to, each once, in order."""
    out: list[Target] = []
    for r in relays:
        out += [t for t in r.engines() if t not in out]
    return out


def _chat_opening(relays: list[RequestRelay]) -> bytes:
    """A chat stream's first chunks: each choice's role, then each choice's echo, with usage
    where the client asked for it in every chunk (vLLM's order)."""
    prompt = next((r.prompt_tokens for r in relays if r.prompt_tokens is not None), 0)
    extras = relays[0].extras
    usage = None
    if extras is not None and extras.continuous:
        usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    out = [r.shape.role_chunk(usage) for r in relays]
    if extras is not None and extras.echo:
        out += [r.shape.echo_chunk(extras.echo, usage) for r in relays]
    return b"".join(out)
