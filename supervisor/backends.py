"""The backend plugin contract and the entry-point registry.

A backend knows one engine's dialect (launch flags, routes, stream shapes) and nothing of
failover policy. Plugins are classes registered under the entry-point group
``failover_supervisor.backends``; the first-party ones in ``plugins/`` register the same way a
third party does. :mod:`supervisor.testing.conformance` checks a plugin against the simulator.

Engine dialect facts live in a plugin's :class:`Dialect`, and the simulator reads them from
there instead of restating them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Protocol
from urllib.parse import urlencode

import aiohttp
import orjson

# (Re-exported: part of the plugin contract, defined where the compiled relay reaches them.)
from supervisor.backend_errors import EngineAnswerGarbled as EngineAnswerGarbled
from supervisor.backend_errors import EngineCallError as EngineCallError
from supervisor.backend_errors import EngineUnreachable as EngineUnreachable
from supervisor.events import loads_event as loads_event
from supervisor.model import EngineLoad, EngineSpec, LaunchCommand, Readiness
from supervisor.requests import ClientRequest, Piece, Progress, UpstreamRequest
from supervisor.stream_errors import BackendError as BackendError
from supervisor.stream_errors import EngineReportedError as EngineReportedError
from supervisor.stream_errors import MalformedStream as MalformedStream

ENTRY_POINT_GROUP = "failover_supervisor.backends"


class EngineOutOfMemory(BackendError):
    """The engine could not get GPU memory (wake or load). Retryable for a bounded time."""


@dataclass(frozen=True)
class MetricNames:
    running: str
    waiting: str
    kv_usage: str | None = None
    extra: tuple[str, ...] = ()


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (``Dialect.reference_markdown`` shows it)."""
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class Dialect:
    """Facts about one engine's HTTP API, shared by its plugin and the simulator.

    Every field is documented in place; ``failover-supervisor dialect-doc`` prints them
    (docs/dialect.md, kept in step by a test)."""

    name: str = _doc("the backend's name (its entry-point name, by convention)")
    program: tuple[str, ...] = _doc(
        'the engine\'s program, found on the supervisor\'s PATH, e.g. `("vllm", "serve")`'
    )
    default_port: int = _doc("the engine's own default port (informational)")
    model_flag: str | None = _doc("the flag before the model; None: the model is positional")
    health_path: str = _doc(
        "the readiness route: 200 ready, 5xx unhealthy, 404 or no answer still loading",
        default="/health",
    )
    deep_health_path: str | None = _doc(
        "a route that runs a one-token generation (SGLang's `/health_generate`)", default=None
    )
    sleep_flag: str | None = _doc(
        "the launch flag that enables the sleep routes; None: no sleep mode (shadows then "
        "need a suspend strategy)",
        default=None,
    )
    sleep_env: Mapping[str, str] = _doc(
        "environment a sleeping-capable engine needs (vLLM: `VLLM_SERVER_DEV_MODE=1`)",
        default_factory=dict,
    )
    sleep_path: str | None = _doc("the route that puts the engine to sleep", default=None)
    wake_path: str | None = _doc("the route that wakes it", default=None)
    is_sleeping_path: str | None = _doc("a route that says whether it sleeps", default=None)
    abort_path: str | None = _doc(
        "a route that aborts one request by id; None: closing the connection aborts",
        default=None,
    )
    metrics: MetricNames | None = field(
        default=None,
        metadata={"doc": "the engine's Prometheus gauge names for running, waiting, KV usage"},
    )
    metrics_format: str = _doc(
        "`prometheus` (text format) or `json` (trtllm-serve's iteration stats)",
        default="prometheus",
    )
    abort_log: str = _doc(
        "the line the engine logs for an aborted request (`{rid}`: its id); tests look for it",
        default="Aborted request {rid}.",
    )
    served_name_flag: str = _doc(
        "the flag for the served model name", default="--served-model-name"
    )
    host_flag: str = _doc("the flag for the listen address", default="--host")
    port_flag: str = _doc("the flag for the port", default="--port")
    max_seqs_flag: str | None = _doc(
        "the flag that bounds concurrent sequences (`--max-num-seqs`)", default=None
    )
    request_id_field: str | None = _doc(
        "the body field that sets the engine-side request id (`request_id`, `rid`); None: "
        "the engine makes its own",
        default=None,
    )
    openai_token_ids: bool = _doc(
        "the OpenAI routes return token ids when asked (`return_token_ids`)", default=False
    )
    openai_error_shape: str = _doc(
        '`wrapped` (`{"error": {...}}`) or `flat` (`{"object": "error", ...}`)', default="flat"
    )
    family: str = _doc(
        "the dialect this one varies (a Dynamo worker around vLLM): requests, streams and "
        "flags are the family's; only launch and control routes differ",
        default="",
    )
    start_asleep_flag: tuple[str, ...] = _doc(
        "launch flags that start an engine asleep (`--gms-mode shadow`)", default=()
    )
    launch_flags: tuple[str, ...] = _doc(
        "flags every engine of the dialect is launched with (SGLang: incremental output)",
        default=(),
    )
    other_routes: tuple[str, ...] = _doc(
        "routes besides completions and chat that the engine serves to clients (the "
        "frontend forwards any route; the simulator mounts these)",
        default=(),
    )
    request_fields: Mapping[str, frozenset[str]] = _doc(
        "per route, the only body fields the engine takes (it answers 400 to others, as "
        "trtllm-serve does); empty: unknown fields are ignored",
        default_factory=dict,
    )

    @property
    def base(self) -> str:
        """The dialect whose request/stream shapes this one speaks."""
        return self.family or self.name

    @staticmethod
    def reference_markdown() -> str:
        """docs/dialect.md: every field with its type, default and meaning, from the code."""
        rows = []
        for f in fields(Dialect):
            if f.default is not MISSING:
                default = f"`{f.default!r}`"
            elif f.default_factory is not MISSING:
                default = f"`{f.default_factory()!r}`"
            else:
                default = "required"
            kind = str(f.type).replace("|", "\\|")
            rows.append(f"| `{f.name}` | `{kind}` | {default} | {f.metadata.get('doc', '')} |")
        return (
            "# Dialect reference\n\n"
            "A backend's `dialect` (`supervisor.backends.Dialect`): the facts about its engine\n"
            "that the plugin and the simulator share. Generated from the code by\n"
            "`failover-supervisor dialect-doc`; a test keeps this page in step.\n\n"
            "| field | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
        )


class LeanClient(Protocol):
    """What carries an endpoint's lean calls (the relay's
    :class:`supervisor.frontend.engine_pool.EnginePool`): one whole exchange within a
    deadline, failing with :class:`EngineCallError` s (or ``TimeoutError``)."""

    async def fetch(
        self, url: str, method: str, target: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes]: ...


class EngineEndpoint:
    """An engine's base URL plus an HTTP session; every call has a deadline.

    With ``pool`` (the daemon's health probes), ``GET`` and ``POST`` calls go through the
    relay's lean client instead of the session: a probe through aiohttp cost about 0.6 ms
    of the daemon's CPU, which every engine pays twice per probe interval. Plugins see no
    difference: the same answers, and the same errors either way: :class:`EngineUnreachable`
    for a connection that fails, :class:`EngineAnswerGarbled` for an answer that is not HTTP,
    ``TimeoutError`` past the deadline; redirects are not followed (engines send none)."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        timeout: float = 5.0,
        *,
        pool: LeanClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.pool = pool

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        """One request; returns (status, body). A call that gets no answer raises an
        :class:`EngineCallError`."""
        timeout = timeout_s if timeout_s is not None else self.timeout
        if self.pool is not None and method in ("GET", "POST"):
            target = f"{path}?{urlencode(params)}" if params else path
            body = None if json_body is None else orjson.dumps(json_body)
            return await self.pool.fetch(self.url, method, target, body, timeout)
        t = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self.session.request(
                method, self.url + path, json=json_body, params=params, timeout=t
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise  # (aiohttp's own timeouts too: the deadline, as the lean call's)
        except aiohttp.ClientConnectionError as e:
            raise EngineUnreachable(f"{method} {path}: {e}") from e
        except aiohttp.ClientError as e:
            raise EngineAnswerGarbled(f"{method} {path}: {e}") from e

    async def call_ok(self, method: str, path: str, **kw: Any) -> bytes:
        status, body = await self.call(method, path, **kw)
        return self.check(status, body, f"{method} {path}")

    @staticmethod
    def check(status: int, body: bytes, what: str) -> bytes:
        """``body`` of a successful answer, else :class:`BackendError` (or
        :class:`EngineOutOfMemory`) naming ``what`` and what the engine said."""
        if status >= 400:
            text = body[:300].decode("utf-8", "replace")
            if status >= 500 and "out of memory" in text.lower():
                raise EngineOutOfMemory(f"{what} -> {status}: {text}")
            raise BackendError(f"{what} -> {status}: {text}")
        return body


class StreamDecoder(ABC):
    """Turns one upstream stream's SSE ``data:`` payloads into :class:`Piece` s.

    Stateful per stream (e.g. SGLang's cumulative text becomes deltas here, once).
    """

    @abstractmethod
    def feed(self, data: bytes) -> Piece | None:
        """Decode one event's payload (without ``data: ``); None for events that carry nothing.

        Raises :class:`MalformedStream` for anything that is not this engine's format.
        """


class Backend(ABC):
    """One engine dialect. Subclass it, set :attr:`dialect`, and register the class under the
    entry-point group ``failover_supervisor.backends``.

    Hooks that talk to the engine are ``async`` and receive an :class:`EngineEndpoint`; they
    raise :class:`BackendError` (or a subclass) with a message a human can act on.
    """

    dialect: ClassVar[Dialect]
    #: Whether :meth:`continuation` resumes from token ids (exact) or from text.
    continuation_mode: ClassVar[str] = "text"
    #: Whether a stream whose prompt is token ids can be resumed after tokens were sent.
    resumes_token_prompts: ClassVar[bool] = True
    #: Whether a chat answer can be resumed after tokens were sent (it cannot where the
    #: engine's chat route has no way to continue a partial assistant message).
    resumes_chat: ClassVar[bool] = True
    #: Whether the engine serves chat (``/v1/chat/completions``) at all.
    serves_chat: ClassVar[bool] = True
    #: Whether it takes prompts given as token ids.
    serves_token_prompts: ClassVar[bool] = True
    #: The sleep levels :meth:`sleep` takes (where the engine has a sleep mode).
    sleep_levels: ClassVar[tuple[int, ...]] = (1, 2)

    @property
    def name(self) -> str:
        return self.dialect.name

    # -- launching ---------------------------------------------------------------------
    def command(self, spec: EngineSpec) -> LaunchCommand:
        """The engine's command line for ``spec``: real flags, shadow flags included.

        The default covers engines whose flags follow the dialect's names; override for more.
        """
        d = self.dialect
        args: list[str] = []
        if d.model_flag:
            args += [d.model_flag, spec.model]
        else:
            args.append(spec.model)
        args += [d.host_flag, spec.host, d.port_flag, str(spec.port)]
        if spec.served_model_name:
            args += [d.served_name_flag, spec.served_model_name]
        env = dict(spec.env)
        engine_sleeps = spec.options.get("suspend", "engine") == "engine"
        if (spec.role == "shadow" and engine_sleeps) or spec.options.get("sleep_mode"):
            if d.sleep_flag is None:
                raise BackendError(
                    f"{d.name} has no sleep mode; give its shadows a suspend strategy instead"
                )
            args.append(d.sleep_flag)
            env.update(d.sleep_env)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
        args += [f for f in d.launch_flags if f not in spec.extra_args]
        args += list(spec.extra_args)
        return LaunchCommand(program=d.program, args=tuple(args), env=env)

    # -- health ------------------------------------------------------------------------
    async def health(self, ep: EngineEndpoint) -> Readiness:
        """Liveness and readiness in one answer: loading, sleeping, ready, unhealthy, down."""
        try:
            status, _ = await ep.call("GET", self.dialect.health_path)
        except (EngineUnreachable, TimeoutError):
            return Readiness.DOWN
        if status >= 500:
            # Some engines answer 503 while loading; a plugin that can tell overrides this.
            return Readiness.UNHEALTHY
        if status != 200:
            return Readiness.LOADING
        if self.dialect.is_sleeping_path and await self._sleeping_or_none(ep):
            return Readiness.SLEEPING
        return Readiness.READY

    async def _sleeping_or_none(self, ep: EngineEndpoint) -> bool:
        try:
            return await self.is_sleeping(ep)
        except EngineCallError:
            raise  # no answer at all: the probe's to judge
        except BackendError:
            return False  # the route exists only with sleep mode enabled

    # -- sleep and wake ----------------------------------------------------------------
    @abstractmethod
    async def sleep(self, ep: EngineEndpoint, level: int = 1) -> None:
        """Release GPU memory while staying loaded (level 1: KV only; 2: weights too)."""

    @abstractmethod
    async def wake(self, ep: EngineEndpoint, tags: tuple[str, ...] = ()) -> None:
        """Take GPU memory back (optionally in stages by tag). OOM raises EngineOutOfMemory."""

    @abstractmethod
    async def is_sleeping(self, ep: EngineEndpoint) -> bool:
        """Whether the engine has released its GPU memory."""

    # -- requests ----------------------------------------------------------------------
    @abstractmethod
    async def abort(self, ep: EngineEndpoint, request_id: str) -> bool:
        """Cancel one request explicitly. Returns False where the engine has no abort route
        (closing the connection is then the abort)."""

    @abstractmethod
    def first_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest:
        """The first piece of ``req``: streamed, carrying ``request_id`` engine-side, asking
        for token ids where the engine can return them."""

    @abstractmethod
    def continuation(
        self, req: ClientRequest, progress: Progress, request_id: str
    ) -> UpstreamRequest:
        """The request that resumes ``req`` on another engine after ``progress`` was sent:
        prompt + emitted as token ids where possible, text otherwise; budget reduced."""

    @abstractmethod
    def decoder(self, upstream: UpstreamRequest) -> StreamDecoder:
        """A decoder for the stream that ``upstream`` produces. For a ``whole`` request,
        the engine's answer body is fed to it once, as one event."""

    def whole_request(self, req: ClientRequest, request_id: str) -> UpstreamRequest | None:
        """``req`` (not streamed by its client, with a small token budget) asked for whole:
        one answer body, which :meth:`decoder` reads as one event. If the engine fails,
        the request starts again on another engine. None (the default): this backend
        streams every request, and a non-streaming one migrates with its progress."""
        return None

    async def load(self, ep: EngineEndpoint) -> EngineLoad:
        """Running/waiting requests and KV usage from the engine's own metrics."""
        m = self.dialect.metrics
        if m is None:
            return EngineLoad()
        text = (await ep.call_ok("GET", "/metrics")).decode("utf-8", "replace")
        values = parse_prometheus_gauges(text, {m.running, m.waiting, m.kv_usage or ""})
        return EngineLoad(
            running=int(values.get(m.running, 0)),
            waiting=int(values.get(m.waiting, 0)),
            kv_usage=values.get(m.kv_usage or "", 0.0),
        )


def parse_prometheus_gauges(text: str, names: set[str]) -> dict[str, float]:
    """Sum of each named series in Prometheus text format (labels ignored)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0 or line[:name_end] not in names:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[line[:name_end]] = out.get(line[:name_end], 0.0) + value
    return out


class BackendNotFound(LookupError):
    pass


def _backend_class(ep: EntryPoint) -> type[Backend]:
    """The class an entry point names; BackendNotFound, saying why, if it names none (a
    typo, an import error in the plugin, something that is not a Backend)."""
    try:
        cls = ep.load()
    except Exception as e:  # whatever the plugin's import raises: reported, not raised
        raise BackendNotFound(
            f"backend {ep.name!r} ({ep.value}) could not be loaded: {type(e).__name__}: {e}"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendNotFound(
            f"backend {ep.name!r} ({ep.value}) is not a subclass of supervisor.backends.Backend"
        )
    return cls


def available_backends() -> dict[str, type[Backend] | BackendNotFound]:
    """Every backend registered under the entry-point group, by name: its class, or why it
    could not be loaded (one broken plugin does not hide the others)."""
    found: dict[str, type[Backend] | BackendNotFound] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = _backend_class(ep)
        except BackendNotFound as e:
            found[ep.name] = e
    return found


def load_backend(name: str) -> Backend:
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise BackendNotFound(
            f"no backend named {name!r} (registered: {known}); a third-party backend must be "
            f"installed and declare an entry point in group {ENTRY_POINT_GROUP!r}"
        )
    cls = _backend_class(eps[name])
    try:
        return cls()
    except Exception as e:
        raise BackendNotFound(
            f"backend {name!r} could not be created: {type(e).__name__}: {e}"
        ) from e
