"""Admin REST API (aiohttp, 127.0.0.1 by default): status, metrics, manual actions.

- ``GET /status``: node, slots, engines, recent failovers with reasons and step timings
- ``GET /metrics``: Prometheus text
- ``POST /failover`` ``{"engine": ID}``: declare an engine dead now (as if it had failed)
- ``POST /switchover`` ``{"slot": NAME, "to": SHADOW_ID?, "at": TIME?, "after": SECONDS?}``:
  planned move to a shadow, its streams with it; with ``at`` (Unix time or ISO 8601, not
  past) or ``after``, scheduled (202), shown in ``/status``; ``POST /switchover/cancel``
  ``{"slot"}``
- ``POST /pause`` ``{"slot"?, "reason"?, "for"?: SECONDS, "until"?: TIME}``: maintenance mode
  for a slot or (no slot) the node: no automatic failover or relaunch; ``POST /resume``
- ``POST /reload``: read the config file again (as SIGHUP does) and say what changed
- ``POST /rollout`` ``{"slots"?: [NAME...], "wait"?: bool}``: roll slots to the spec a
  reload marked, one at a time (202; with ``wait``, answers when done)
- ``POST /drain`` ``{"engine": ID, "limit"?: SECONDS}``: stop an engine gracefully (an active
  one is switched over; its streams finish within the limit, the rest move)
- ``POST /gpu/clear`` ``{"gpu": ID}``: a GPU marked broken by a fatal XID was reset or replaced

Every ``POST`` needs ``Content-Type: application/json`` and may not come from a foreign
``Origin``: a web page open in a browser on this host can send neither (without a CORS
preflight this API never answers), so it cannot fail engines over behind the user's back.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from supervisor.admintarget import AdminTarget
from supervisor.auth import bearer_ok
from supervisor.jsonbody import BadJson
from supervisor.jsonbody import parse as parse_json
from supervisor.operate import span
from supervisor.slot.placement import FailoverError

_WITHIN = 1e9  # seconds (about 31 years): how far from now a time given to the API may be
# How far in the past a time may be and still mean "now" (a client's clock and latency; Unix
# seconds from `date +%s` are up to a second old).
_PAST_SLACK = 5.0


def _when(body: dict[str, Any], relative: str = "after", absolute: str = "at") -> float | None:
    """A wall time from ``body[absolute]`` (Unix seconds or ISO 8601) or ``body[relative]``
    (seconds from now); None when neither is given. Either must lie within ``_WITHIN`` of
    now: a time further off is a mistake, and one past the platform's ``time_t`` cannot
    even be logged. An absolute time already past (by more than ``_PAST_SLACK``) is refused."""
    if body.get(relative) is not None and body.get(absolute) is not None:
        raise web.HTTPBadRequest(reason=f"give '{relative}' or '{absolute}', not both")
    rel, at = body.get(relative), body.get(absolute)
    if rel is not None:
        if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not 0 <= rel < _WITHIN:
            raise web.HTTPBadRequest(reason=f"'{relative}' must be seconds (a number >= 0)")
        return time.time() + float(rel)
    if at is None:
        return None
    when: float | None = None
    if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at):
        when = float(at)
    elif isinstance(at, str) and len(at) < 64:
        try:
            parsed = datetime.fromisoformat(at)
            if parsed.tzinfo is None:
                parsed = parsed.astimezone()  # local time, as an operator writes it
            when = parsed.timestamp()
        except (ValueError, OverflowError, OSError):
            pass
    if when is None:
        raise web.HTTPBadRequest(
            reason=f"'{absolute}' must be Unix seconds or an ISO 8601 time like "
            "2026-12-05T03:00:00Z"
        )
    now = time.time()
    if abs(when - now) >= _WITHIN:
        raise web.HTTPBadRequest(reason=f"'{absolute}' is more than 31 years from now")
    if when < now - _PAST_SLACK:
        # A past time is a typo or a stale script, not "now": acting at once would be a
        # surprise, and saying "scheduled" for a past time, a lie.
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        raise web.HTTPBadRequest(
            reason=f"'{absolute}' ({stamp}) is {span(now - when)} in the past: give a later "
            f"time, or leave '{absolute}' out"
        )
    return when


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class AdminApi:
    """The admin routes over one node (any ``AdminTarget``)."""

    def __init__(self, sup: AdminTarget) -> None:
        self.sup = sup

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/failover", self.failover)
        app.router.add_post("/switchover", self.switchover)
        app.router.add_post("/switchover/cancel", self.switchover_cancel)
        app.router.add_post("/pause", self.pause)
        app.router.add_post("/resume", self.resume)
        app.router.add_post("/reload", self.reload)
        app.router.add_post("/rollout", self.rollout)
        app.router.add_post("/drain", self.drain)
        app.router.add_post("/gpu/clear", self.gpu_clear)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = self.sup.admin_token
        if request.method != "GET":
            if token is not None and not bearer_ok(request, token):
                return _error(401, "this call needs 'Authorization: Bearer <admin token>'")
            origin = request.headers.get("Origin")
            if origin is not None and origin not in (
                f"http://{request.host}",
                f"https://{request.host}",
            ):
                return _error(403, f"cross-origin calls are refused (Origin: {origin[:100]})")
            if request.content_type != "application/json":
                return _error(
                    415,
                    "POST bodies must be sent as 'Content-Type: application/json' "
                    "(curl: -H 'Content-Type: application/json')",
                )
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except web.HTTPException as e:
            return _error(e.status, e.reason or "error")
        except FailoverError as e:
            return _error(409, str(e))

    async def _body(self, request: web.Request, *keys: str) -> dict[str, Any]:
        try:
            body = parse_json(await request.read() or b"{}", max_depth=16)
        except BadJson as e:
            raise web.HTTPBadRequest(reason=str(e)) from e
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="body must be a JSON object")
        for k in keys:
            if not isinstance(body.get(k), str):
                raise web.HTTPBadRequest(reason=f"{k!r} (a string) is required")
        return body

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.sup.status(request.query.get("cluster") == "full"))

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.sup.metrics_text()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _engine(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        """The engine id named by the body's ``engine`` (404 if no slot has it), and the body."""
        body = await self._body(request, "engine")
        if not self.sup.has_engine(body["engine"]):
            raise web.HTTPNotFound(reason=f"no engine {body['engine']!r}")
        return body["engine"], body

    async def failover(self, request: web.Request) -> web.Response:
        engine, body = await self._engine(request)
        await self.sup.fail_engine(engine, str(body.get("reason") or "manual failover"))
        return web.json_response({"ok": True, "engine": engine})

    def _slot(self, body: dict[str, Any], required: bool = True) -> str | None:
        """The slot named by the body's ``slot`` (404 if there is none such)."""
        name = body.get("slot")
        if name is None and not required:
            return None
        if not isinstance(name, str):
            raise web.HTTPBadRequest(reason="'slot' (a slot name) is required")
        if not self.sup.has_slot(name):
            raise web.HTTPNotFound(reason=f"no slot {name!r}")
        return name

    async def switchover(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        slot = self._slot(body)
        assert slot is not None
        to = body.get("to")
        if to is not None and not isinstance(to, str):
            raise web.HTTPBadRequest(reason="'to' must be a shadow engine id")
        at = _when(body)
        if at is not None:
            plan = self.sup.schedule_switchover(slot, at, to)
            return web.json_response({"scheduled": plan.as_dict()}, status=202)
        record = await self.sup.switchover(slot, to)
        # Only a promotion is a switchover that happened; anything else says why, non-2xx.
        return web.json_response(
            record.as_dict(), status=200 if record.result == "promoted" else 503
        )

    async def switchover_cancel(self, request: web.Request) -> web.Response:
        slot = self._slot(await self._body(request))
        assert slot is not None
        plan = self.sup.cancel_switchover(slot)
        if plan is None:
            raise web.HTTPNotFound(reason=f"slot {slot} has no scheduled switchover")
        return web.json_response({"cancelled": plan.as_dict()})

    async def pause(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        slot = self._slot(body, required=False)
        reason = body.get("reason", "maintenance")
        if not isinstance(reason, str) or len(reason) > 500:
            raise web.HTTPBadRequest(reason="'reason' must be a string (500 characters at most)")
        until = _when(body, relative="for", absolute="until")
        p = self.sup.pause(slot, reason, until)
        return web.json_response({"paused": p.as_dict(), "slot": slot, "node": self.sup.node_name})

    async def resume(self, request: web.Request) -> web.Response:
        slot = self._slot(await self._body(request), required=False)
        if not self.sup.resume(slot):
            what = f"slot {slot}" if slot else f"node {self.sup.node_name}"
            raise web.HTTPConflict(reason=f"{what} is not paused")
        return web.json_response({"resumed": slot or self.sup.node_name})

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.sup.reload()
        if not result["ok"]:
            return web.json_response(
                {
                    "error": {
                        "message": "the config file is invalid; nothing changed",
                        "problems": result["problems"],
                        "code": 400,
                    }
                },
                status=400,
            )
        return web.json_response(result)

    async def rollout(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        slots = body.get("slots", [])
        if isinstance(body.get("slot"), str):
            slots = [body["slot"]]
        if not isinstance(slots, list) or not all(isinstance(x, str) for x in slots):
            raise web.HTTPBadRequest(reason="'slots' must be a list of slot names")
        wait = bool(body.get("wait"))
        rollouts = await self.sup.rollout(slots, wait)
        if not wait:
            return web.json_response({"rollouts": [p.as_dict() for p in rollouts]}, status=202)
        ok = all(p.result == "done" for p in rollouts)
        return web.json_response(
            {"rollouts": [p.as_dict() for p in rollouts]}, status=200 if ok else 409
        )

    async def gpu_clear(self, request: web.Request) -> web.Response:
        body = await self._body(request, "gpu")
        launched = self.sup.clear_gpu(body["gpu"])
        if launched is None:
            raise web.HTTPNotFound(reason=f"GPU {body['gpu']!r} is not marked broken")
        return web.json_response({"ok": True, "gpu": body["gpu"], "launching": launched})

    async def drain(self, request: web.Request) -> web.Response:
        engine, body = await self._engine(request)
        limit = body.get("limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < 1e6
        ):
            raise web.HTTPBadRequest(reason="'limit' must be seconds (a number >= 0)")
        await self.sup.drain(engine, limit)
        return web.json_response({"ok": True, "engine": engine})
