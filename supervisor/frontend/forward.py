"""Every route but completions and chat, forwarded to an engine as it is.

Embeddings, tokenizing, scoring, pooling, the Responses API, audio, and any other
``/v1/*`` route: the client's body goes to an engine of the model it names (any engine
without a model) under the same admission as completions, and the engine's answer comes
back with its own status, content type and body. Nothing is parsed beyond the model
(and, for the Responses API, the events' sequence numbers), so these routes cannot be
resumed mid-answer the way completions are: a whole answer whose engine failed before
answering is asked again of another engine, once; a stream that breaks ends with an error
event in its route's shape. Not compiled: these routes are not the relay's hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import anyio
import orjson

from supervisor.auth import bearer_matches
from supervisor.config import Config, FrontendConfig
from supervisor.frontend.engine_pool import EnginePool
from supervisor.frontend.heads import Request
from supervisor.frontend.routing import (
    EngineDirectory,
    EngineWait,
    Lease,
    Rejected,
    Router,
    Target,
    engine_ids,
)
from supervisor.frontend.server import Reply
from supervisor.frontend.validate import BadRequest, error_body, request_id
from supervisor.frontend.wire import EngineConnection, EngineConnectionError, EngineProtocolError
from supervisor.jsonbody import BadJson
from supervisor.jsonbody import parse as parse_json
from supervisor.metric_labels import RejectReason
from supervisor.metrics import Metrics
from supervisor.sessions import Sessions


class ForwardingFrontend(Protocol):
    """What a forwarded route reads of the frontend (:class:`supervisor.frontend.app.
    Frontend` is one): the forwarded routes share its admission, auth, limits and metrics."""

    active: int  # requests in flight (a forwarded one counts while it runs)

    @property
    def api_key(self) -> str | None: ...

    @property
    def logs_info(self) -> bool: ...

    @property
    def cfg(self) -> Config: ...

    @property
    def fcfg(self) -> FrontendConfig: ...

    @property
    def directory(self) -> EngineDirectory: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def router(self) -> Router: ...

    @property
    def sessions(self) -> Sessions: ...

    @property
    def log(self) -> Any: ...

    def no_such_model(self, model: str) -> BadRequest:
        """The 404 (or, while starting, 503) for a model no engine serves."""
        ...

    def engine_fields(self, engines: list[Target]) -> list[tuple[str, str]]:
        """The headers that name the engines a request went to."""
        ...

    def unavailable(self, reply: Reply, message: str) -> None:
        """Answer 503 with the frontend's Retry-After."""
        ...

    def leave(self) -> None:
        """A request in flight is over (the drain waits for the last one)."""
        ...


# Client path -> the label of its metrics (a fixed table: never the client's own path).
ROUTES: Final[dict[str, str]] = {
    path: path
    for path in (
        "/v1/embeddings",
        "/tokenize",
        "/detokenize",
        "/v1/score",
        "/score",
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/pooling",
        "/classify",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    )
}
OTHER_V1: Final = "/v1/*"  # the label of any other /v1/ route (forwarded too)
# What an answer may bring (a batch of embeddings is the largest expected).
ANSWER_LIMIT: Final = 64 * 1024 * 1024
# A stream's unsent bytes past which the engine's connection waits for the client.
_CLIENT_BEHIND: Final = 256 * 1024
_SEQUENCE: Final = re.compile(rb'"sequence_number":\s*(\d+)')
_FORM_MODEL: Final = re.compile(
    rb'Content-Disposition:[^\r\n]*\bname="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,512})\r\n',
    re.IGNORECASE,
)


def label_for(path: str) -> str | None:
    """The metrics label of a forwarded route; None if ``path`` is not forwarded."""
    known = ROUTES.get(path)
    if known is not None:
        return known
    return OTHER_V1 if path.startswith("/v1/") else None


def form_model(body: bytes) -> str | None:
    """The ``model`` field of a multipart form (an audio upload), if it has one."""
    m = _FORM_MODEL.search(body)
    return m.group(1).decode("utf-8", "replace").strip() if m else None


class EngineGone(Exception):
    """The engine failed before its answer began: nothing reached the client."""


class StreamBroken(Exception):
    """The engine's answer broke after the client's had begun."""


class Forwarding:
    """One forwarded request, on one engine or two: the engines it went to, in order."""

    def __init__(
        self,
        router: Router,
        pool: EnginePool,
        *,
        path: str,
        method: str,
        body: bytes | None,
        content_type: str,
        headers: dict[str, str],
        first_byte_timeout: float,
        stall_timeout: float,
        client_write_timeout: float,
    ) -> None:
        self.router, self.pool = router, pool
        self.path, self.method, self.body = path, method, body
        self.content_type, self.headers = content_type, headers
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        self.client_write_timeout = client_write_timeout
        self.engines: list[Target] = []
        self.streamed = False  # the answer was a stream of events
        self.broken = ""  # why a stream ended early (it then ended with an error event)
        self.waiting: EngineWait | None = None  # ended when health declares the engine dead

    @contextlib.contextmanager
    def _engine_gone(self, what: str) -> Iterator[None]:
        """An engine that fails before its answer is whole, as :class:`EngineGone`: no
        ``what`` within the first-byte timeout, a broken connection or garbage, or the wait
        ended by its lease (a cancellation from outside goes on as it is)."""
        try:
            yield
        except TimeoutError as e:
            raise EngineGone(f"{what} within {self.first_byte_timeout:g}s") from e
        except (EngineConnectionError, EngineProtocolError) as e:
            raise EngineGone(str(e)) from e
        except asyncio.CancelledError as e:
            if not self._engine_ended():
                raise
            raise EngineGone("the engine was declared dead or taken out of service") from e

    def _engine_ended(self) -> bool:
        """Asked once per ``CancelledError``: whether the lease ended the wait (the engine
        was declared dead, or moved off), not a cancellation from outside."""
        return self.waiting is not None and self.waiting.ended_it()

    async def once(
        self, lease: Lease, reply: Reply, head: Callable[[], list[tuple[str, str]]]
    ) -> None:
        """Ask ``lease``'s engine and answer the client from it. :class:`EngineGone` when it
        failed before its answer began (nothing was sent: the caller may ask another)."""
        target = lease.target
        self.engines.append(target)
        task = asyncio.current_task()
        assert task is not None
        self.waiting = EngineWait(task)
        lease.wait_in(self.waiting)
        try:
            await self._once(target, reply, head)
        finally:
            self.waiting.close()
            lease.wait_in(None)

    async def _once(
        self, target: Target, reply: Reply, head: Callable[[], list[tuple[str, str]]]
    ) -> None:
        with self._engine_gone("no answer"):
            async with asyncio.timeout(self.first_byte_timeout):
                conn = await self.pool.request(
                    target.url, self.path, self.headers, self.body, self.method, self.content_type
                )
        try:
            if conn.status == 200 and conn.content_type.startswith("text/event-stream"):
                self.streamed = True
                await self._stream(conn, reply, head(), target)
                return
            with self._engine_gone("no whole answer"):
                async with asyncio.timeout(self.first_byte_timeout):
                    body = await conn.read_whole(ANSWER_LIMIT)
            self.router.answered_at[target.engine_id] = time.monotonic()
            reply.send(
                conn.status,
                body,
                content_type=conn.content_type or "application/json",
                headers=head(),
            )
        finally:
            self.pool.release(conn)  # kept if read whole, else closed (the engine aborts)

    async def _stream(
        self, conn: EngineConnection, reply: Reply, head: list[tuple[str, str]], target: Target
    ) -> None:
        """Pass the engine's events on as they come, whole events only; if the engine's
        stream breaks, end the client's with an error event in the route's shape."""
        loop = asyncio.get_running_loop()
        parts: list[bytes] = []
        waiting: list[asyncio.Future[None]] = []
        queued = 0

        def wake() -> None:
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)
            waiting.clear()

        def sink(data: bytes) -> None:
            nonlocal queued
            parts.append(data)
            queued += len(data)
            if queued > _CLIENT_BEHIND:
                conn.pause()  # the client is behind: the engine waits, not our memory
            wake()

        conn.on_end = wake
        conn.set_sink(sink)
        reply.start(
            200, [("Content-Type", conn.content_type), ("Cache-Control", "no-cache"), *head]
        )
        held = b""  # the start of an event whose end has not come yet
        last_seq = -1
        while True:
            if not parts and conn.error is None and not conn.done:
                fut: asyncio.Future[None] = loop.create_future()
                waiting.append(fut)
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        await fut
                except TimeoutError:
                    self.broken = f"no event for {self.stall_timeout:g}s (stalled)"
                    break
                except asyncio.CancelledError:
                    if not self._engine_ended():
                        raise
                    self.broken = "the engine was declared dead or taken out of service"
                    break
            if parts:
                data = held + b"".join(parts)
                parts.clear()
                queued = 0
                end = data.rfind(b"\n\n")
                whole, held = (data[: end + 2], data[end + 2 :]) if end >= 0 else (b"", data)
                if len(held) > ANSWER_LIMIT:
                    self.broken = "an event over the size limit"
                    break
                if whole:
                    self.router.answered_at[target.engine_id] = time.monotonic()
                    seqs = _SEQUENCE.findall(whole)
                    if seqs:
                        last_seq = int(seqs[-1])
                    try:
                        async with asyncio.timeout(self.client_write_timeout):
                            await reply.write(whole)
                    except TimeoutError as e:
                        raise ConnectionResetError("the client read nothing (too slow)") from e
                conn.resume()
                continue
            if conn.error is not None:
                self.broken = f"the engine's stream broke: {conn.error}"
                break
            if conn.done:
                if held.strip():  # the engine's last event, without its blank line
                    await reply.write(held + b"\n\n")
                return
        # What was held of a broken event is dropped: the client never sees half of one.
        await reply.write(error_event(self.path, self.broken, last_seq))
        raise StreamBroken(self.broken)


def error_event(path: str, message: str, last_seq: int) -> bytes:
    """The event that ends a stream its engine broke: the Responses API's ``error`` event
    (numbered after the last one sent) on ``/v1/responses``, else vLLM's in-band error and
    ``[DONE]``, as the completions routes end a failed stream."""
    text = f"the engine failed mid-answer ({message}); this route cannot be resumed"
    if path == "/v1/responses":
        event = {
            "type": "error",
            "code": "engine_failed",
            "message": text,
            "param": None,
            "sequence_number": last_seq + 1,
        }
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
    err = {"error": {"message": text, "type": "server_error", "param": None, "code": 502}}
    return b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n"


# -- the route ---------------------------------------------------------------------------
async def forward_route(
    front: ForwardingFrontend, request: Request, reply: Reply, label: str
) -> None:
    """A route passed to an engine as it is (see :mod:`supervisor.frontend.forward`)."""
    method = request.method
    allowed = ("GET", "POST", "DELETE") if label == OTHER_V1 else ("POST",)
    if method not in allowed:
        message = f"{method[:20]} is not allowed on {request.path[:200]}"
        return reply.send(405, error_body(405, message), headers=[("Allow", ", ".join(allowed))])
    if front.api_key is not None and not bearer_matches(
        request.headers.get("authorization", ""), front.api_key
    ):
        return reply.send(
            401, error_body(401, "Incorrect API key provided.", code="invalid_api_key")
        )
    if front.router.draining:
        front.metrics.rejections.labels(RejectReason.DRAINING).inc()
        return front.unavailable(reply, "the supervisor is shutting down")
    content_type = request.headers.get("content-type") or "application/json"
    model = forwarded_model(front, request.body, content_type)
    if model is None:
        model = any_model(front)
        if model is None:
            return front.unavailable(reply, "no engine is serving any model right now")
    rid = request_id(request.headers.get("x-request-id", ""))
    target = request.path + ("?" + request.query if request.query else "")
    fw = Forwarding(
        front.router,
        front.sessions.relay,
        path=target,
        method=method,
        body=request.body if request.body or method == "POST" else None,
        content_type=content_type,
        headers={"X-Request-Id": rid},
        first_byte_timeout=front.cfg.health.first_token_timeout,
        # (Events are not tokens: a Responses stream's first ones come before its
        # prefill. A dead engine ends the wait at once through its lease.)
        stall_timeout=front.cfg.health.first_token_timeout,
        client_write_timeout=front.fcfg.client_write_timeout,
    )

    def head() -> list[tuple[str, str]]:
        fields = [("X-Request-Id", rid)]
        if front.fcfg.engine_header:
            fields += front.engine_fields(fw.engines)
        return fields

    front.active += 1
    t0 = time.monotonic()
    outcome = "ok"
    try:
        lease = await front.router.acquire(model)
        try:
            await fw.once(lease, reply, head)
        except EngineGone as gone:
            # Nothing reached the client: asked once more, of another engine (a shadow
            # being woken included, for as long as a migration would wait for one).
            failed = lease.target.engine_id
            front.log.warning(
                "engine failed before answering; asking another",
                request_id=rid,
                route=label,
                engine=failed,
                reason=str(gone),
            )
            front.router.release(lease)
            lease = await front.router.acquire(
                model, exclude=frozenset((failed,)), wait=front.fcfg.migration_wait
            )
            await fw.once(lease, reply, head)
        finally:
            front.router.release(lease)  # (a second release of a lease is harmless)
    except Rejected as rejected:
        outcome = f"rejected:{rejected.reason}"
        front.metrics.rejections.labels(rejected.reason).inc()
        if not reply.started:
            front.unavailable(reply, str(rejected))
    except EngineGone as gone:
        outcome = "engine_failed"
        if not reply.started:
            message = f"the request could not be completed: {gone}"
            reply.send(502, error_body(502, message), headers=head())
    except StreamBroken as broken:
        outcome = f"stream_broken: {broken}"
    except ConnectionError as gone_client:  # the client went away (its write failed)
        outcome = f"client_gone: {gone_client}"
        front.metrics.cancellations.labels(label).inc()
    except anyio.get_cancelled_exc_class():
        outcome = "cancelled"
        front.metrics.cancellations.labels(label).inc()
        raise
    except Exception as bug:  # a bug: contained, logged with its traceback, 500
        outcome = f"error: {type(bug).__name__}"
        front.log.error("request failed inside the supervisor", request_id=rid, exc_info=bug)
        if not reply.started:
            reply.send(500, error_body(500, "internal error in the supervisor; see its log"))
    finally:
        front.leave()
        if front.fcfg.access_log and front.logs_info:
            fields: dict[str, Any] = {"engine": engine_ids(fw.engines)}
            if fw.engines and fw.engines[0].node:  # a cluster: the nodes too
                fields["node"] = ",".join([t.node for t in fw.engines])
            front.log.info(
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


def forwarded_model(front: ForwardingFrontend, body: bytes, content_type: str) -> str | None:
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
            obj = parse_json(body, max_depth=front.fcfg.max_json_depth)
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
    if not front.directory.has_model(model):
        raise front.no_such_model(model)
    return model


def any_model(front: ForwardingFrontend) -> str | None:
    """For a request that names no model: the model whose least-loaded engine is the
    least loaded of all (the first model when none has an engine now: it waits)."""
    models = front.directory.models()
    best: str | None = None
    best_load = 0
    for m in models:
        for t in front.directory.candidates(m):
            load = front.router.inflight.get(t.engine_id, 0)
            if best is None or load < best_load:
                best, best_load = m, load
    return best if best is not None else (models[0] if models else None)
