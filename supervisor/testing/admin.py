"""A client of one node's admin API, for tests (on the model of aiohttp's ``test_utils``).

Its typed methods answer with the API's JSON and raise :class:`AdminError` (status and body
in the message) on any answer but a 2xx: a test that expects a refusal uses :meth:`post`,
which returns the status and body as they came.

    async with AdminClient(sup.admin_url) as admin:
        await admin.switchover("s")
        st = await admin.wait(lambda st: st["slots"][0]["epoch"] == 2, what="promotion")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
import anyio

Status = dict[str, Any]


class AdminError(Exception):
    """The admin API answered a call with a status other than 2xx."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path}: {status} {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class AdminClient:
    """The admin API of the node at ``base_url`` (``http://host:port``).

    ``session`` is shared where given (and left open); else the client opens its own and
    :meth:`close` (or ``async with``) closes it. ``token`` is sent as the bearer token a
    node with ``admin.token_file`` asks for; ``logs`` gives the node's logs, whose tail a
    :meth:`wait` that times out shows.
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession | None = None,
        *,
        token: str | None = None,
        logs: Callable[[], str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.logs = logs
        self._session, self._own = session, session is None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- raw calls -----------------------------------------------------------------------
    async def get(self, path: str) -> tuple[int, str]:
        """``GET path``: the status and the body's text, whatever the status."""
        async with self.session.get(self.base_url + path, headers=self.headers) as r:
            return r.status, await r.text()

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        """``POST path`` with a JSON body: the status and the answer's JSON, whatever the
        status (an answer that is not JSON comes as text)."""
        url, body = self.base_url + path, {} if body is None else body
        async with self.session.post(url, json=body, headers=self.headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def _ok(self, path: str, body: Any = None) -> Any:
        status, answer = await self.post(path, body)
        if not 200 <= status < 300:
            raise AdminError("POST", path, status, answer)
        return answer

    # -- reads ---------------------------------------------------------------------------
    async def status(self, full_cluster: bool = False) -> Status:
        """``GET /status`` (with ``full_cluster``, every node's view: ``?cluster=full``)."""
        path = "/status?cluster=full" if full_cluster else "/status"
        status, text = await self.get(path)
        if status != 200:
            raise AdminError("GET", path, status, text)
        return json.loads(text)  # type: ignore[no-any-return]

    async def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        status, text = await self.get("/metrics")
        if status != 200:
            raise AdminError("GET", "/metrics", status, text)
        return text

    async def wait(
        self,
        pred: Callable[[Status], bool],
        timeout: float = 15,
        what: str = "condition",
        *,
        while_down: bool = False,
        interval: float = 0.02,
    ) -> Status:
        """The first ``/status`` that ``pred`` accepts, polled every ``interval`` seconds;
        AssertionError (with the last status and the logs' tail) after ``timeout``. With
        ``while_down``, a node that does not answer is waited for, not an error."""
        deadline = time.monotonic() + timeout
        st: Status = {}
        while time.monotonic() < deadline:
            try:
                st = await self.status()
            except (aiohttp.ClientError, OSError):
                if not while_down:
                    raise
            else:
                if pred(st):
                    return st
            await anyio.sleep(interval)
        tail = f"\nlogs:\n{self.logs()[-6000:]}" if self.logs is not None else ""
        raise AssertionError(
            f"timed out waiting for {what}; status:\n{json.dumps(st, indent=1)[-4000:]}{tail}"
        )

    # -- actions -------------------------------------------------------------------------
    async def failover(self, engine: str, reason: str | None = None) -> Any:
        """Declare ``engine`` dead now, as if it had failed."""
        return await self._ok("/failover", _given(engine=engine, reason=reason))

    async def switchover(
        self,
        slot: str,
        to: str | None = None,
        *,
        at: float | str | None = None,
        after: float | None = None,
    ) -> Any:
        """A planned move to a shadow: the failover record, or (``at``, ``after``) the
        scheduled plan."""
        return await self._ok("/switchover", _given(slot=slot, to=to, at=at, after=after))

    async def cancel_switchover(self, slot: str) -> Any:
        return await self._ok("/switchover/cancel", {"slot": slot})

    async def pause(
        self,
        slot: str | None = None,
        reason: str | None = None,
        *,
        for_s: float | None = None,
        until: float | str | None = None,
    ) -> Any:
        """Maintenance mode for ``slot`` or (None) the whole node."""
        body = _given(slot=slot, reason=reason, until=until)
        if for_s is not None:
            body["for"] = for_s
        return await self._ok("/pause", body)

    async def resume(self, slot: str | None = None) -> Any:
        return await self._ok("/resume", _given(slot=slot))

    async def reload(self) -> Any:
        return await self._ok("/reload")

    async def rollout(self, slots: list[str] | None = None, *, wait: bool = False) -> Any:
        return await self._ok("/rollout", _given(slots=slots, wait=wait or None))

    async def drain(self, engine: str, limit: float | None = None) -> Any:
        return await self._ok("/drain", _given(engine=engine, limit=limit))

    async def clear_gpu(self, gpu: str) -> Any:
        return await self._ok("/gpu/clear", {"gpu": gpu})


def _given(**fields: Any) -> dict[str, Any]:
    """The body's fields that were given (None: left out, as the API's defaults apply)."""
    return {k: v for k, v in fields.items() if v is not None}
