"""Admin REST API (aiohttp, 127.0.0.1 by default): status, metrics, manual actions.

- ``GET /status``: node, slots, engines, recent failovers with reasons and step timings
- ``GET /metrics``: Prometheus text
- ``POST /failover`` ``{"engine": ID}``: declare an engine dead now (as if it had failed)
- ``POST /switchover`` ``{"slot": NAME, "to": SHADOW_ID?}``: planned move to a shadow
- ``POST /drain`` ``{"engine": ID}``: stop an engine gracefully (an active one is switched over)
- ``POST /gpu/clear`` ``{"gpu": ID}``: a GPU marked broken by a fatal XID was reset or replaced

Every ``POST`` needs ``Content-Type: application/json`` and may not come from a foreign
``Origin``: a web page open in a browser on this host can send neither (without a CORS
preflight this API never answers), so it cannot fail engines over behind the user's back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from supervisor.auth import bearer_ok
from supervisor.failover import FailoverError, SlotController
from supervisor.jsonbody import BadJson
from supervisor.jsonbody import parse as parse_json
from supervisor.model import Engine

if TYPE_CHECKING:
    from supervisor.daemon import Supervisor


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class AdminApi:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/failover", self.failover)
        app.router.add_post("/switchover", self.switchover)
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
                return _error(415, "POST bodies must be sent as 'Content-Type: application/json'")
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
        return web.json_response(self.sup.status())

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.sup.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _engine(self, request: web.Request) -> tuple[SlotController, Engine, dict[str, Any]]:
        """The slot controller and engine named by the body's ``engine``, or 404."""
        body = await self._body(request, "engine")
        found = self.sup.engine(body["engine"])
        if found is None:
            raise web.HTTPNotFound(reason=f"no engine {body['engine']!r}")
        return found[0], found[1], body

    async def failover(self, request: web.Request) -> web.Response:
        _, engine, body = await self._engine(request)
        reason = str(body.get("reason") or "manual failover")
        await self.sup.judge.declare_dead(engine, "admin", reason, time.time())
        return web.json_response({"ok": True, "engine": engine.id})

    async def switchover(self, request: web.Request) -> web.Response:
        body = await self._body(request, "slot")
        ctl = self.sup.controllers.get(body["slot"])
        if ctl is None:
            raise web.HTTPNotFound(reason=f"no slot {body['slot']!r}")
        to = body.get("to")
        if to is not None and not isinstance(to, str):
            raise web.HTTPBadRequest(reason="'to' must be a shadow engine id")
        record = await ctl.switchover(to)
        # Only a promotion is a switchover that happened; anything else says why, non-2xx.
        return web.json_response(
            record.as_dict(), status=200 if record.result == "promoted" else 503
        )

    async def gpu_clear(self, request: web.Request) -> web.Response:
        body = await self._body(request, "gpu")
        if not self.sup.gpu.clear(body["gpu"]):
            raise web.HTTPNotFound(reason=f"GPU {body['gpu']!r} is not marked broken")
        launched = sum(c.restore_shadows() for c in self.sup.controllers.values())
        return web.json_response({"ok": True, "gpu": body["gpu"], "launching": launched})

    async def drain(self, request: web.Request) -> web.Response:
        ctl, engine, _ = await self._engine(request)
        await ctl.drain(engine.id)
        return web.json_response({"ok": True, "engine": engine.id})
