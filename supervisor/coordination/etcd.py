"""A small asyncio etcd v3 client over etcd's own JSON gateway (``/v3/...``), on aiohttp.

Why not a gRPC client: ``etcd3`` (python-etcd3) is synchronous and its generated protobuf
code no longer imports with protobuf >= 4; ``aetcd`` works but brings grpcio, and its calls
cannot be bounded by our cancel scopes. etcd serves the same v3 API as JSON on its client
port, so this client is plain HTTP with a deadline on every call (docs/coordination.md has
the measurements behind the choice).

Only what the supervisor needs: range / put / delete / txn, leases with keep-alive, a watch
stream that the caller resumes from a revision, and status. Keys and values are ``bytes``;
the gateway wants them base64-encoded. Several endpoints may be given: a call that cannot
reach one, or that hits an election ("leader changed"), moves on to the next until its
deadline.
"""

from __future__ import annotations

import base64
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import anyio
import orjson


class EtcdError(RuntimeError):
    """etcd answered with an error that retrying will not fix (e.g. a compacted revision)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered usefully before the call's deadline."""


class WatchOverflow(EtcdError):
    """One watch message grew past :data:`MAX_WATCH_MESSAGE`: resuming the watch would get
    the same backlog again, so the caller must re-read the keys and watch from there."""


class LeaseExpired(EtcdError):
    """The lease is gone: it expired or was revoked."""


class WatchCompacted(EtcdError):
    """The watch asked for a revision etcd has compacted away; the caller must re-read."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps from {compact_revision})")
        self.compact_revision = compact_revision


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> KeyValue:
        return cls(
            _unb64(d.get("key")),
            _unb64(d.get("value")),
            int(d.get("create_revision", 0)),
            int(d.get("mod_revision", 0)),
            int(d.get("version", 0)),
            int(d.get("lease", 0)),
        )


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction, e.g. ``Compare(key, "MOD", "EQUAL", 42)``."""

    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]
    value: int | bytes
    range_end: bytes | None = None  # given: the condition holds for every key in [key, end)

    def as_json(self) -> dict[str, Any]:
        field = {
            "VERSION": "version",
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VALUE": "value",
            "LEASE": "lease",
        }[self.target]
        v: Any = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        out = {"key": _b64(self.key), "target": self.target, "result": self.result, field: v}
        if self.range_end is not None:
            out["range_end"] = _b64(self.range_end)
        return out


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def delete_op(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]


# Errors that mean "this member cannot answer right now; another one (or a moment) will".
_TRANSIENT = (
    "leader changed",
    "no leader",
    "timed out",
    "too many requests",
    "not capable",
    "server is stopped",
    "unhealthy cluster",
)


class EtcdClient:
    """etcd v3 over the JSON gateway. Every call has a deadline (``timeout``, seconds)."""

    def __init__(
        self, endpoints: Sequence[str], session: aiohttp.ClientSession, timeout: float = 2.0
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.session = session
        self.timeout = timeout
        self._current = random.randrange(len(self.endpoints))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    async def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST ``body`` to ``/v3/<path>``; moves to another endpoint on connection errors
        and elections until the deadline, then raises :class:`EtcdUnavailable`."""
        deadline = time.monotonic() + (timeout or self.timeout)
        data = orjson.dumps(body)
        last = "no attempt"
        tries = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EtcdUnavailable(
                    f"etcd {path}: no answer within {timeout or self.timeout}s ({last})"
                )
            url = f"{self.endpoint}/v3/{path}"
            # One try may take a share of the time, so a dead member leaves time for the next.
            per_try = left if len(self.endpoints) == 1 else max(left / 2, min(left, 0.2))
            try:
                with anyio.fail_after(per_try):
                    async with self.session.post(url, data=data) as r:
                        raw = await r.read()
                if r.status == 200:
                    return orjson.loads(raw)
                err = _error_text(raw)
                if r.status >= 500 or any(t in err for t in _TRANSIENT):
                    last = f"{url}: {r.status} {err}"
                elif "lease not found" in err or "requested lease not found" in err:
                    raise LeaseExpired(err)
                elif "compacted" in err:
                    raise EtcdError(err)
                else:
                    raise EtcdError(f"etcd {path}: {r.status} {err}")
            except TimeoutError:
                last = f"{url}: no answer in {per_try:.2f}s"
            except (aiohttp.ClientError, OSError, ValueError) as e:
                last = f"{url}: {e or type(e).__name__}"
            self._rotate()
            tries += 1
            if tries % len(self.endpoints) == 0:  # every member tried: back off a little
                await anyio.sleep(min(0.05 * tries, 0.25, max(0.0, deadline - time.monotonic())))

    # -- kv --------------------------------------------------------------------------------
    async def get(self, key: bytes) -> KeyValue | None:
        res = await self.call("kv/range", {"key": _b64(key)})
        kvs = res.get("kvs") or []
        return KeyValue.parse(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision the answer is from."""
        res = await self.call(
            "kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        return [KeyValue.parse(d) for d in res.get("kvs") or []], int(res["header"]["revision"])

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        res = await self.call("kv/put", put_op(key, value, lease)["request_put"])
        return int(res["header"]["revision"])

    async def delete(self, key: bytes) -> None:
        await self.call("kv/deleterange", {"key": _b64(key)})

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
        timeout: float | None = None,
    ) -> TxnResult:
        res = await self.call(
            "kv/txn",
            {
                "compare": [c.as_json() for c in compare],
                "success": list(success),
                "failure": list(failure),
            },
            timeout,
        )
        return TxnResult(
            bool(res.get("succeeded", False)),
            int(res["header"]["revision"]),
            res.get("responses") or [],
        )

    # -- leases ------------------------------------------------------------------------------
    async def grant(self, ttl: float) -> int:
        res = await self.call("lease/grant", {"TTL": max(1, round(ttl))})
        if res.get("error"):
            raise EtcdError(f"lease grant: {res['error']}")
        return int(res["ID"])

    async def keepalive(self, lease: int, timeout: float | None = None) -> int:
        """Refresh ``lease`` once; returns its TTL. :class:`LeaseExpired` when it is gone."""
        res = await self.call("lease/keepalive", {"ID": str(lease)}, timeout)
        ttl = int((res.get("result") or {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseExpired(f"lease {lease:x} expired")
        return ttl

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseExpired):
            await self.call("lease/revoke", {"ID": str(lease)})

    # -- watch -----------------------------------------------------------------------------
    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Events under ``prefix`` from ``start_revision`` on, as ``(revision, events)``.

        Ends with :class:`EtcdUnavailable` when the stream breaks (resume from the last
        revision + 1), or :class:`WatchCompacted` or :class:`WatchOverflow` (re-read).
        """
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        url = f"{self.endpoint}/v3/watch"
        try:
            with anyio.fail_after(self.timeout):
                resp = await self.session.post(
                    url,
                    data=orjson.dumps(body),
                    timeout=aiohttp.ClientTimeout(total=None),
                    # A member that loses its raft leader ends the watch instead of
                    # keeping it open and silent.
                    headers={"Grpc-Metadata-Hasleader": "true"},
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self._rotate()
            raise EtcdUnavailable(f"watch {url}: {e or type(e).__name__}") from e
        try:
            if resp.status != 200:
                self._rotate()
                raise EtcdUnavailable(f"watch {url}: HTTP {resp.status}")
            async for line in _lines(resp, url, self._rotate):
                try:
                    msg = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise EtcdUnavailable(f"watch {url}: not JSON: {line[:100]!r}") from e
                if not isinstance(msg, dict):
                    raise EtcdUnavailable(f"watch {url}: unexpected message {line[:100]!r}")
                if "error" in msg:
                    raise EtcdUnavailable(f"watch {url}: {_error_text(line)}")
                res = msg.get("result") or {}
                if int(res.get("compact_revision", 0) or 0):
                    raise WatchCompacted(int(res["compact_revision"]))
                if res.get("canceled"):
                    raise EtcdUnavailable(f"watch {url} canceled: {res.get('cancel_reason')}")
                rev = int((res.get("header") or {}).get("revision", 0))
                events = [
                    WatchEvent(
                        "delete" if ev.get("type") == "DELETE" else "put",
                        KeyValue.parse(ev.get("kv") or {}),
                    )
                    for ev in res.get("events") or []
                ]
                yield rev, events
        finally:
            resp.release()
            resp.close()

    # -- cluster ---------------------------------------------------------------------------
    async def status(self, endpoint: str | None = None, timeout: float | None = None) -> Any:
        """One member's status (``leader``, ``header.member_id``, ``raftTerm``)."""
        url = f"{(endpoint or self.endpoint).rstrip('/')}/v3/maintenance/status"
        with anyio.fail_after(timeout or self.timeout):
            async with self.session.post(url, data=b"{}") as r:
                return orjson.loads(await r.read())


# One watch message holds every event of a revision range: a backlog of thousands of puts
# is megabytes on one line (aiohttp's readline stops at 512 KiB). Past this, the watch is
# dropped and the cluster's keys read afresh instead.
MAX_WATCH_MESSAGE = 64 * 1024 * 1024


async def _lines(
    resp: aiohttp.ClientResponse, url: str, on_end: Callable[[], None]
) -> AsyncIterator[bytes]:
    """The watch stream's non-empty lines, however long (up to MAX_WATCH_MESSAGE)."""
    buf = bytearray()
    while True:
        try:
            chunk = await resp.content.readany()
        except (aiohttp.ClientError, OSError) as e:
            raise EtcdUnavailable(f"watch {url} broke: {e or type(e).__name__}") from e
        if not chunk:
            on_end()
            raise EtcdUnavailable(f"watch {url}: stream ended")
        buf += chunk
        while (end := buf.find(b"\n")) >= 0:
            if end > MAX_WATCH_MESSAGE:
                break
            line = bytes(buf[:end]).strip()
            del buf[: end + 1]
            if line:
                yield line
        if len(buf) > MAX_WATCH_MESSAGE:  # a whole message, or the start of one, too long
            raise WatchOverflow(f"watch {url}: a message over {MAX_WATCH_MESSAGE} bytes")


def _error_text(raw: bytes) -> str:
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace")
    if isinstance(d, dict):
        return str(d.get("error") or d.get("message") or d)
    return str(d)
