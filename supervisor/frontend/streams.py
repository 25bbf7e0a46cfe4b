"""Relay one client request through engines, migrating it when its upstream breaks.

The client always sees one stream in the shape it asked for (``text_completion`` or
``chat.completion.chunk``), with the id, ``created`` and model of its first piece, exactly
one finish reason and one ``[DONE]``. Upstream, requests are streamed (so that a
non-streaming request can migrate too), except short non-streaming ones, asked for whole
and started again from scratch elsewhere. When the upstream breaks — EOF before the
finish, a reset, a 5xx, garbage, the engine declared dead, no token for
``stall_timeout`` — the backend plugin builds the continuation from what was already sent
and another engine (or the slot's freshly woken shadow) takes it, up to
``migration_limit`` times.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import anyio
import orjson

from supervisor import log as logging
from supervisor.backends import (
    Backend,
    BackendError,
    EngineEndpoint,
    EngineReportedError,
    MalformedStream,
    StreamDecoder,
)
from supervisor.config import FrontendConfig, HealthConfig
from supervisor.events import SseSplitter
from supervisor.frontend.outcome import ENGINE_FAULTS, Outcome
from supervisor.frontend.routing import EngineWait, Lease, Rejected, Router, Target
from supervisor.frontend.stops import NO_STOPS, StopStrings
from supervisor.frontend.wire import EngineConnection, EngineConnectionError, EngineProtocolError
from supervisor.jsonbody import has_any_key
from supervisor.metric_labels import MigrationMode, MigrationResult, PluginHook, migration_mode
from supervisor.metrics import Metrics
from supervisor.openai_shapes import OpenAIStreamDecoder
from supervisor.requests import ClientRequest, Piece, Progress, TextlessTokens, UpstreamRequest
from supervisor.sessions import Sessions

# Engine-side ids end in a random tag per process and a counter, in hex: ``-1a2b3c1f``.
# (Rendered by a C-level format per id: mypyc turns an f-string with a format spec into
# three method calls.)
_ENGINE_SUFFIXES: Final = map(("-" + secrets.token_hex(3) + "{:x}").format, itertools.count(1))
_TOOL_FIELDS: Final = ("tools", "functions", "tool_choice")
# A chat answer without a limit asked whole (for its prompt_logprobs, which vLLM gives only
# in whole answers) may take as long as a stream of this many tokens would.
_WHOLE_UNLIMITED_TOKENS: Final = 32768
# A whole answer larger than this is garbage (a short answer with its prompt's token ids,
# even for the longest contexts, is a few MiB).
_WHOLE_LIMIT: Final = 64 * 1024 * 1024


class UpstreamBroken(Exception):
    """The engine's stream ended badly (``outcome`` says how); the request may migrate."""

    def __init__(self, outcome: Outcome, reason: str, *, may_return: bool = False) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.may_return = may_return  # (MOVED) and that engine may take it again later

    @property
    def engine_fault(self) -> str:
        """What it shows of the engine, for health: "garbage", "stall", or "" (nothing)."""
        return ENGINE_FAULTS.get(self.outcome, "")

    @property
    def planned(self) -> bool:
        """Moved off a healthy engine on purpose: not a failure (nor held against the
        migration limit)."""
        return self.outcome is Outcome.MOVED


class UpstreamClientError(Exception):
    """The engine refused the request itself (4xx): the client's mistake, passed on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MigrationFailed(Exception):
    pass


class ClientGone(Exception):
    """The client hung up or stopped reading: the request ends here and is aborted
    upstream. Never a reason to migrate, never the engine's fault."""


@dataclass(init=False)
class ClientShape:
    """Renders pieces in the shape the client asked for."""

    kind: str
    rid: str
    model: str
    created: int
    with_ids: bool = False
    # The choice this shape renders (n > 1: one shape per choice), kept as an object: a
    # native int would be boxed again for every chunk.
    index: Any = 0
    # Every chunk of a stream starts alike: that part is rendered once, on first use.
    _head: bytes | None = field(default=None, repr=False, compare=False)

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one is built per request.)
    def __init__(
        self,
        kind: str,
        rid: str,
        model: str,
        created: int,
        with_ids: bool = False,
        index: int = 0,
    ) -> None:
        self.kind = kind
        self.rid = rid
        self.model = model
        self.created = created
        self.with_ids = with_ids
        self.index = index
        self._head = None

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(
        self,
        choice: dict[str, Any],
        failover: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        if failover or usage:
            obj: dict[str, Any] = {
                "id": self.rid,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
            if usage:  # (continuous_usage_stats: the counts so far, in every chunk)
                obj["usage"] = usage
            if failover:
                obj["failover"] = failover
            return b"data: " + orjson.dumps(obj) + b"\n\n"
        if self._head is None:
            head = orjson.dumps(
                {
                    "id": self.rid,
                    "object": self.object,
                    "created": self.created,
                    "model": self.model,
                }
            )
            self._head = b"data: " + head[:-1] + b',"choices":['
        return self._head + orjson.dumps(choice) + b"]}\n\n"

    def role_chunk(self, usage: dict[str, int] | None = None) -> bytes:
        return self._chunk(
            {
                "index": self.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            },
            None,
            usage,
        )

    def echo_chunk(self, text: str, usage: dict[str, int] | None = None) -> bytes:
        """A chat answer's echo of the last message, after the role, as vLLM sends it."""
        choice = {"index": self.index, "delta": {"content": text}, "logprobs": None}
        choice["finish_reason"] = None
        return self._chunk(choice, None, usage)

    def piece_chunk(
        self,
        text: str,
        piece: Piece,
        finish: str | None,
        stop: str | None = None,
        failover: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if piece.delta:
                delta.update(piece.delta)
            choice: dict[str, Any] = {
                "index": self.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": self.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        if stop is not None:
            choice["stop_reason"] = stop
        if self.with_ids and piece.token_ids is not None:
            choice["token_ids"] = piece.token_ids
        return self._chunk(choice, failover, usage)

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        obj = {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def full(
        self,
        progress: Progress,
        finish: str | None,
        usage: dict[str, int],
        failover: dict[str, Any] | None = None,
        extras: Extras | None = None,
    ) -> dict[str, Any]:
        logprobs = None if extras is None else extras.whole
        echo = "" if extras is None else extras.echo
        choice: dict[str, Any] = {
            "index": self.index,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        if self.kind == "chat":
            choice["message"] = {
                "role": "assistant",
                "content": echo + progress.text,
                **progress.message_extras(),
            }
            obj = "chat.completion"
        else:
            choice["text"] = echo + progress.text
            obj = "text_completion"
            if extras is not None and extras.prompt_logprobs is not None:
                choice["prompt_logprobs"] = extras.prompt_logprobs  # (vLLM: in the choice)
        if self.with_ids and progress.token_ids is not None:
            choice["token_ids"] = progress.token_ids
        out = {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }
        if extras is not None and extras.prompt_logprobs is not None and self.kind == "chat":
            out["prompt_logprobs"] = extras.prompt_logprobs  # (vLLM: beside the choices)
        if failover:
            out["failover"] = failover
        return out


class Extras:
    """What a request asked for beyond text and usage at the end — logprobs, usage in
    every chunk, an echo, prompt_logprobs — rendered for the client here, so that requests
    without them pass one check per token and nothing more.

    Logprobs come in the engine's shape of each attempt's route: a chat answer's first
    engine sends chat entries (``content``), a continuation on /v1/completions sends
    columns (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), which are
    turned into chat entries as vLLM's chat route builds them (the first ``top`` of the
    alternatives, ``bytes`` from the token's UTF-8). A completion's ``text_offset`` counts
    from where the answer stood when the attempt began, as an unbroken run's does."""

    __slots__ = (
        "chat",
        "continuous",
        "echo",
        "echo_sent",
        "logprobs",
        "offset",
        "prompt_logprobs",
        "shift",
        "top",
        "whole",
    )

    def __init__(self, req: ClientRequest) -> None:
        self.chat = req.kind == "chat"
        self.top = req.logprobs  # None: no logprobs asked
        self.logprobs = self.top is not None
        so = req.body.get("stream_options")
        self.continuous = (
            bool(req.stream) and isinstance(so, dict) and bool(so.get("continuous_usage_stats"))
        )
        self.echo = req.echo_text
        # A completion's echo goes before its first text; a chat answer's is a chunk of
        # its own, after the role (sent with it).
        self.echo_sent = self.chat or not self.echo
        self.offset = 0  # completions: the text_offset of the next entry
        self.shift = 0  # added to this attempt's offsets (they start at 0 in each)
        self.whole: dict[str, Any] | None = None  # all of them, for a whole answer
        self.prompt_logprobs: list[Any] | None = None

    @staticmethod
    def wanted(req: ClientRequest) -> bool:
        """Whether ``req`` asks for any of them (its ``features`` said it may)."""
        body = req.body
        so = body.get("stream_options")
        return (
            req.logprobs is not None
            or bool(req.echo_text)
            or body.get("prompt_logprobs") is not None
            or (isinstance(so, dict) and bool(so.get("continuous_usage_stats")))
        )

    def new_attempt(self) -> None:
        self.shift = self.offset

    def render(self, raws: list[dict[str, Any]]) -> dict[str, Any]:
        """The client's logprobs object for one chunk's entries."""
        if self.chat:
            content: list[Any] = []
            for raw in raws:
                entries = raw.get("content")
                if isinstance(entries, list):
                    content += entries
                else:
                    content += self._as_chat(raw)
            return {"content": content}
        out: dict[str, list[Any]] = {
            "text_offset": [],
            "token_logprobs": [],
            "tokens": [],
            "top_logprobs": [],
        }
        shift = self.shift
        for raw in raws:
            try:
                out["text_offset"] += [o + shift for o in raw["text_offset"]]
                out["token_logprobs"] += raw["token_logprobs"]
                out["tokens"] += raw["tokens"]
                out["top_logprobs"] += raw["top_logprobs"]
            except (KeyError, TypeError) as e:
                raise MalformedStream(f"logprobs not in the completions shape: {raw!r:.80}") from e
        if out["tokens"]:
            self.offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def _as_chat(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Completions columns as chat entries."""
        out: list[dict[str, Any]] = []
        try:
            columns = zip(raw["tokens"], raw["token_logprobs"], raw["top_logprobs"], strict=True)
            for token, logprob, alternatives in columns:
                entry: dict[str, Any] = {"token": token}
                if logprob is not None:
                    entry["logprob"] = logprob
                entry["bytes"] = list(token.encode("utf-8", "replace"))
                if isinstance(alternatives, dict):
                    picked = list(alternatives.items())
                    if self.top is not None and self.top >= 0:
                        picked = picked[: self.top]
                    entry["top_logprobs"] = [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                        for t, v in picked
                    ]
                out.append(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MalformedStream(f"logprobs not in the completions shape: {raw!r:.80}") from e
        return out

    def keep(self, rendered: dict[str, Any]) -> None:
        """Add one piece's logprobs to those of a whole answer."""
        if self.whole is None:
            self.whole = rendered
            return
        for key, values in rendered.items():
            self.whole[key] += values


Emit = Callable[[bytes], Awaitable[None]]


# The weight of one read's gap in a stream's running average (about the last eight count).
_GAP_WEIGHT: Final = 0.125


class _Pump:
    """What a relayed stream's read callback leaves for its task."""

    __slots__ = ("_loop", "_waiter", "complete", "error", "gap", "held", "last_read", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self.complete = False  # the answer is whole (the rest is read only to reuse the link)
        self.error: Exception | None = None
        self.pending: list[bytes] = []  # for the client, in order, not yet written
        # When the engine's last read came, or reading last resumed (monotonic), and the
        # running average of the gaps since (seconds): a stream's rate, not one burst's.
        # It starts at the coalescing window, so a few fast reads must bring it down.
        self.last_read = time.monotonic()
        self.gap = window
        # Reading paused until this timer ends the coalescing window (None: not held).
        self.held: asyncio.TimerHandle | None = None
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter


class RequestRelay:
    """One client request's journey through one or more engines."""

    def __init__(
        self,
        req: ClientRequest,
        rid: str,
        shape: ClientShape,
        router: Router,
        sessions: Sessions,
        cfg: FrontendConfig,
        health: HealthConfig,
        metrics: Metrics,
        emit: Emit | None,
        emit_now: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.req, self.rid, self.shape = req, rid, shape
        # Writes to the client: ``emit`` waits for it; ``emit_now`` writes only if it can
        # at once, and says whether it did.
        self.emit_now = emit_now
        self.budget = req.token_budget  # asked once: it is read at every token
        self.engine_req = req.for_engines()
        # Engine-side ids are unique even when clients reuse an X-Request-Id: an engine
        # rejects a duplicate (SGLang) or an abort would hit both. A random tag per
        # process and a counter: unique across restarts, and no random bytes per request.
        self.engine_rid = rid + next(_ENGINE_SUFFIXES)
        stops = req.stop_strings
        self.stops = (
            StopStrings(stops, include_in_output=bool(req.body.get("include_stop_str_in_output")))
            if stops
            else NO_STOPS
        )
        # Asked of the engine whole (see FrontendConfig.whole_upstream_max_tokens): short,
        # not streamed to its client, and nothing the relay must watch token by token (stop
        # strings it matches itself; tool calls, whose stream handling is the proven one).
        self.whole_ok = (
            not req.stream
            and self.budget is not None
            and self.budget <= cfg.whole_upstream_max_tokens
            and not self.stops.stops
            and not has_any_key(req.body, _TOOL_FIELDS)
        )
        # Logprobs, usage in every chunk, an echo, prompt_logprobs: None for most requests.
        self.extras = Extras(req) if req.features and Extras.wanted(req) else None
        if (
            self.extras is not None
            and not req.stream
            and req.body.get("prompt_logprobs") is not None
        ):
            # vLLM gives prompt_logprobs only in a whole answer: such a request is asked
            # whole, and on a failure asked again from the start (nothing was sent yet).
            self.whole_ok = True
        self.textless = TextlessTokens()
        self.router, self.sessions, self.cfg = router, sessions, cfg
        self.stall_timeout = health.stall_timeout
        self.first_token_timeout = health.first_token_timeout
        self.metrics, self.emit = metrics, emit
        self.progress = Progress()
        self.model = str(req.body.get("model"))
        # The answer so far.
        self.emitted = 0  # characters of the answer sent to the client
        self.stop_reason: str | None = None  # the stop string that ended the answer
        self.finish: str | None = None
        self.finished_at = 0.0
        self.prompt_tokens: int | None = None
        # Its attempts: how many began after the first, and where each went.
        self.attempt = 0
        self.moves = 0  # planned moves among the attempts (not held against the limit)
        self.served_by: Target | None = None  # the first engine the request went to
        self.moved_to: tuple[Target, ...] = ()  # the engines each later attempt went to
        self.inexact: tuple[str, ...] = ()  # what a continuation could not honour
        self.seam_pending = False  # the next chunk is the first after a migration
        self.held_windows = 0  # coalescing windows its reads waited for
        # The attempt under way.
        self.outcome = Outcome.RUNNING  # how it ended, set where that is seen
        self.outcome_detail = ""  # what the watchdog saw (STALLED, DEADLINE)
        self.current: tuple[Lease, UpstreamRequest] | None = None
        self.whole = False  # its answer comes whole
        self.sent_before_attempt = 0
        self.last_event = 0.0
        self.writing_since: float | None = None  # blocked on the client, not the engine
        self._timer: asyncio.TimerHandle | None = None  # the stall watchdog's next check
        self._log: Any = None

    @property
    def log(self) -> Any:
        """This request's logger, bound on first use (most requests never log here)."""
        if self._log is None:
            self._log = logging.get(request_id=self.rid)
        return self._log

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        failed: set[str] = set()
        while True:
            if self._budget_left() == 0:  # every token was sent; only the finish was lost
                self.finish = "length"  # no engine is needed to say so
                self.outcome = Outcome.FINISHED
                return
            wait = None if self.attempt == 0 else self.cfg.migration_wait
            try:
                lease = await self.router.acquire(self.model, exclude=failed, wait=wait)
            except Rejected:
                if self.attempt:
                    self.metrics.migrations.labels(MigrationResult.FAILED, self._mode(None)).inc()
                raise
            except Exception as bug:
                if not self.attempt:
                    raise
                # A bug in routing a moving stream: the client, whose answer has begun, gets
                # a clean migration failure (an error event), the log the traceback.
                self.metrics.migrations.labels(MigrationResult.FAILED, self._mode(None)).inc()
                self.log.error("routing a moving stream failed", exc_info=bug)
                raise MigrationFailed(
                    "the supervisor could not route the moving stream (an internal error)"
                ) from bug
            backend = lease.target.backend
            if self.attempt == 0:
                self.served_by = lease.target
            else:
                self.moved_to += (lease.target,)
            # The lease is released on every way out of this block, whatever is raised.
            try:
                if self.attempt:
                    self.progress.context_length = await self._context_length(lease.target)
                try:
                    up = self._upstream_request(backend)
                except MigrationFailed:
                    self.metrics.migrations.labels(MigrationResult.FAILED, MigrationMode.NONE).inc()
                    raise
                try:
                    self.current = (lease, up)
                    self.whole = up.whole
                    self.sent_before_attempt = self.progress.completion_tokens
                    self.textless.clear()  # the next engine generates those tokens again
                    if self.extras is not None:
                        self.extras.new_attempt()
                    if self.attempt:
                        self.seam_pending = True
                        self.inexact += tuple(f for f in up.inexact if f not in self.inexact)
                    await self._piece(lease, up)
                    if self.attempt:
                        self.metrics.migrations.labels(
                            MigrationResult.RESUMED, self._mode(backend)
                        ).inc()
                    return
                except UpstreamBroken as e:
                    self.outcome = e.outcome
                    if not e.may_return:
                        failed.add(lease.target.engine_id)
                    if e.engine_fault:
                        self.router.directory.report_failure(
                            lease.target.engine_id, e.engine_fault, str(e), self.rid
                        )
                    self.attempt += 1
                    self.moves += e.planned
                    if self.attempt - self.moves > self.cfg.migration_limit:
                        self.metrics.migrations.labels(
                            MigrationResult.FAILED, self._mode(backend)
                        ).inc()
                        raise MigrationFailed(
                            f"stream broke {self.attempt} times (migration_limit "
                            f"{self.cfg.migration_limit}); last: {e}"
                        ) from e
                    say = self.log.info if e.planned else self.log.warning
                    say(
                        "stream moved by plan; recreating it on another engine"
                        if e.planned
                        else "stream disconnected; recreating stream on another engine",
                        engine=lease.target.engine_id,
                        reason=str(e),
                        tokens_sent=self.progress.completion_tokens,
                        attempt=self.attempt,
                    )
                finally:
                    self.current = None
            finally:
                self.router.release(lease)

    async def _context_length(self, target: Target) -> int | None:
        """The engine's context length (``max_model_len`` in its ``/v1/models``), asked once
        per engine and remembered; None where it does not say."""
        known = self.router.context_lengths
        if target.engine_id not in known:
            found: int | None = None
            with anyio.move_on_after(2.0):
                try:
                    async with self.sessions.control.get(target.url + "/v1/models") as r:
                        if r.status == 200:
                            data = (orjson.loads(await r.read()) or {}).get("data") or [{}]
                            value = data[0].get("max_model_len")
                            found = value if isinstance(value, int) else None
                except (aiohttp.ClientError, ValueError, AttributeError, TypeError):
                    pass
            known[target.engine_id] = found
        return known[target.engine_id]

    def _upstream_request(self, backend: Backend) -> UpstreamRequest:
        """The request for this attempt, from the plugin. Anything a plugin raises here is
        contained: a BackendError says the request cannot be (re)issued; anything else is
        a plugin bug, counted and logged with its traceback."""
        # Asked whole only while nothing was generated (a failed whole attempt keeps none).
        whole = self.whole_ok and self.progress.completion_tokens == 0
        try:
            if whole:
                rid = self.engine_rid if self.attempt == 0 else f"{self.engine_rid}-m{self.attempt}"
                up = backend.whole_request(self.engine_req, rid)
                if up is not None:
                    return up
            if self.attempt == 0:
                return backend.first_request(self.engine_req, self.engine_rid)
            if self.progress.structured:
                raise BackendError(
                    "the answer so far holds tool calls or reasoning, which a continuation "
                    "cannot carry (the next engine's parsers would start mid-answer)"
                )
            return backend.continuation(
                self.engine_req, self.progress, f"{self.engine_rid}-m{self.attempt}"
            )
        except BackendError as e:
            raise MigrationFailed(str(e)) from e
        except Exception as bug:
            if whole:
                hook = PluginHook.WHOLE_REQUEST
            elif self.attempt == 0:
                hook = PluginHook.FIRST_REQUEST
            else:
                hook = PluginHook.CONTINUATION
            self.outcome = Outcome.PLUGIN_FAILED
            self.metrics.plugin_errors.labels(backend.name, hook).inc()
            self.log.error(f"backend {hook} hook raised", error=repr(bug), exc_info=bug)
            raise MigrationFailed(
                f"the {backend.name} backend failed to build the request"
            ) from bug

    def _mode(self, backend: object) -> MigrationMode:
        if self.progress.completion_tokens == 0 or self.whole:
            return MigrationMode.REROUTE
        return migration_mode(str(getattr(backend, "continuation_mode", "unknown")))

    def _budget_left(self) -> int | None:
        mt = self.budget
        return None if mt is None else mt - self.progress.completion_tokens

    def _plugin_bug(self, backend: Backend, hook: PluginHook, e: Exception) -> MigrationFailed:
        """A plugin hook raised something other than a BackendError: counted, logged with
        its traceback, and the request ends with the error (resuming it would run the same
        plugin again; the engine is not blamed)."""
        self.outcome = Outcome.PLUGIN_FAILED
        self.metrics.plugin_errors.labels(backend.name, hook).inc()
        self.log.error(f"backend {hook} hook raised", error=repr(e), exc_info=e)
        return MigrationFailed(f"the {backend.name} backend's {hook} failed: {e!r}")

    async def _piece(self, lease: Lease, up: UpstreamRequest) -> None:
        try:
            decoder = lease.target.backend.decoder(up)
        except Exception as e:
            raise self._plugin_bug(lease.target.backend, PluginHook.DECODER, e) from e
        if self.extras is not None and isinstance(decoder, OpenAIStreamDecoder):
            decoder.keep_logprobs = True
        self.last_event = time.monotonic()
        self.outcome = Outcome.RUNNING
        self.outcome_detail = ""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        limit = 0.0
        if up.whole:
            # No token shows progress, so one deadline: as long as a stream of the same
            # length could have taken (one stall_timeout per token after the first).
            tokens = _WHOLE_UNLIMITED_TOKENS if self.budget is None else self.budget
            limit = self.first_token_timeout + tokens * self.stall_timeout
            waiting = EngineWait(task)  # or ended by the lease
            self.router.deadlines.add(loop, waiting, loop.time() + limit)
        else:
            # One watchdog per stream, not a deadline per event: the hot path stays lean.
            # A timer, not a task: a request costs no task (and no task group) beyond its own.
            step = max(min(self.stall_timeout, self.first_token_timeout) / 4, 0.01)
            self._timer = loop.call_later(step, self._stall_check, lease, loop, step)
            waiting = EngineWait(task)  # ended by the lease
        lease.wait_in(waiting)
        try:
            await self._read(lease, up, decoder)
        except asyncio.CancelledError:
            if not waiting.ended_it():
                raise
            if up.whole and not lease.cancelled:  # the deadline passed, not a cancel
                self.outcome = Outcome.DEADLINE
                self.outcome_detail = f"no answer for {limit:g}s (stalled)"
        finally:
            waiting.close()
            lease.wait_in(None)
            if self._timer is not None:
                self._timer.cancel()
        outcome = self._settled(lease)
        if outcome is Outcome.FINISHED:
            return
        if outcome is Outcome.CLIENT_TOO_SLOW:
            raise ClientGone(
                f"the client read nothing for {self.cfg.client_write_timeout:g}s (too slow)"
            )
        if outcome is Outcome.MOVED:
            raise UpstreamBroken(
                outcome, "moved off the engine by plan", may_return=lease.may_return
            )
        if outcome is Outcome.ENGINE_DIED:
            raise UpstreamBroken(outcome, "engine declared dead")
        if outcome is Outcome.ENDED_EARLY:
            raise UpstreamBroken(outcome, "stream ended without a finish reason")
        raise UpstreamBroken(outcome, self.outcome_detail)  # STALLED, DEADLINE

    def _settled(self, lease: Lease) -> Outcome:
        """The attempt's outcome once its read returned or was cancelled: what the relay
        saw itself, unless the router's reason for cancelling the lease outranks it (a
        planned move is never the engine's fault, whatever the watchdog saw meanwhile)."""
        outcome = self.outcome
        if outcome is Outcome.FINISHED or outcome is Outcome.CLIENT_TOO_SLOW:
            return outcome
        if lease.moved:
            outcome = Outcome.MOVED
        elif outcome is Outcome.RUNNING:
            outcome = Outcome.ENGINE_DIED if lease.engine_failed else Outcome.ENDED_EARLY
        self.outcome = outcome
        return outcome

    async def _read(self, lease: Lease, up: UpstreamRequest, decoder: StreamDecoder) -> None:
        pool = self.sessions.relay
        try:
            conn = await pool.request(lease.target.url, up.path, up.headers, orjson.dumps(up.body))
        except EngineConnectionError as e:
            raise UpstreamBroken(Outcome.CONNECT_FAILED, f"connection failed: {e}") from e
        except EngineProtocolError as garbage:
            raise UpstreamBroken(Outcome.BAD_ENGINE_OUTPUT, f"not HTTP: {garbage}") from garbage
        try:
            if conn.status != 200:
                self._bad_status(conn.status, conn.reason, await conn.read_all(2000))
            if up.whole:
                body = await conn.read_whole(_WHOLE_LIMIT)
                self.router.answered_at[lease.target.engine_id] = time.monotonic()
                self._take_whole(lease.target.backend, decoder, body)
            else:
                await self._pump(conn, lease.target, decoder)
        except EngineReportedError as refused:  # this request failed there; the engine may be fine
            raise UpstreamBroken(Outcome.ENGINE_REPORTED_ERROR, str(refused)) from refused
        except (MalformedStream, EngineProtocolError) as broken:  # garbage: the engine is broken
            raise UpstreamBroken(Outcome.BAD_ENGINE_OUTPUT, str(broken)) from broken
        except EngineConnectionError as e:
            raise UpstreamBroken(Outcome.CONNECT_FAILED, f"connection failed: {e}") from e
        finally:
            pool.release(conn)  # kept if its answer was read whole, else closed (an abort)

    async def _pump(self, conn: EngineConnection, target: Target, decoder: StreamDecoder) -> None:
        """Relay the answer as it arrives. Each read is decoded in the connection's
        callback and written to the client there and then; this task only steps in to
        write what cannot go at once (the first write, a client that is not keeping up:
        the engine's connection is paused meanwhile) and to end the stream."""
        loop = asyncio.get_running_loop()
        # A stream whose reads come less than half a window apart on average (a rate, so
        # a slow stream's catch-up burst never counts) is read once per window.
        window = self.cfg.coalesce_window
        close_gap = window / 2
        st = _Pump(loop, window)
        sse = SseSplitter(self.cfg.max_event_bytes)
        backend, engine_id, answered_at = target.backend, target.engine_id, self.router.answered_at

        def release() -> None:  # the coalescing window is over: read what came meanwhile
            st.held = None
            st.last_read = time.monotonic()  # (the wait was ours, not a gap of the stream)
            # (Not while the client is behind or the stream is ending: this task resumes.)
            if not st.pending and st.error is None and self.writing_since is None:
                conn.resume()

        def on_body(chunk: bytes) -> None:
            now = time.monotonic()
            st.gap += (now - st.last_read - st.gap) * _GAP_WEIGHT
            st.last_read = now
            if st.complete or st.error is not None:
                return  # read to the end, so the connection is kept for reuse
            events = sse.feed(chunk)
            if events or not sse.pending:
                # Progress is an event, not bytes of one: an engine that sends an endless
                # line, however fast, is stalled to the watchdog (and to health).
                self.last_event = answered_at[engine_id] = now
            out: list[bytes] = []
            try:
                st.complete = self._take(backend, decoder, events, out)
            except Exception as e:  # raised in this task, once what was taken is written
                st.error = e
            if out:  # what was taken into the answer reaches the client, come what may
                data = out[0] if len(out) == 1 else b"".join(out)
                # Straight to the client if it can take it now (not while this task is
                # blocked writing to it), else queued for this task, which waits for it.
                write_now = self.emit_now
                if (
                    st.pending
                    or write_now is None
                    or self.writing_since is not None
                    or not write_now(data)
                ):
                    st.pending.append(data)
            if st.error is None and sse.error is not None:
                st.error = sse.error
            st.complete = st.complete or sse.done
            if st.pending or st.error is not None or self.stop_reason is not None:
                conn.pause()
                st.wake()
            elif st.gap < close_gap and st.held is None and not st.complete:
                # Tokens are coming faster than anyone reads them: let the next ones
                # gather in the socket for a window, then take them in one read and write.
                conn.pause()
                st.held = loop.call_later(window, release)
                self.held_windows += 1

        conn.on_end = st.wake
        conn.set_sink(on_body)
        try:
            while True:
                if st.pending:
                    data = b"".join(st.pending)
                    st.pending.clear()
                    await self._send(data)
                    if st.held is None:
                        conn.resume()
                    continue
                if st.error is not None:
                    raise st.error
                if self.stop_reason is not None:
                    return  # the engine generates on past the stop: leaving aborts it
                if conn.error is not None:
                    raise conn.error
                if conn.done:
                    if not st.complete:
                        raise MalformedStream("stream ended without [DONE]")
                    return
                await st.wait()
        finally:
            if st.held is not None:  # no timer may touch the connection once it is let go
                st.held.cancel()
                st.held = None

    def _take_whole(self, backend: Backend, decoder: StreamDecoder, body: bytes) -> None:
        """Take a whole answer (one body, decoded as one event) into the request."""
        self._take(backend, decoder, [body], [])  # (nothing is rendered: not streamed)
        if self.finish is None:
            raise MalformedStream(f"the engine's answer has no finish reason: {body[:80]!r}")
        if self.extras is not None and isinstance(decoder, OpenAIStreamDecoder):
            # (Only a whole answer has them, and it is asked only before anything was sent:
            # they are the client's prompt's, never a continuation's.)
            self.extras.prompt_logprobs = decoder.prompt_logprobs

    def _take(
        self, backend: Backend, decoder: StreamDecoder, events: list[bytes], out: list[bytes]
    ) -> bool:
        """Decode one read's events into the answer, appending what the client is to get
        to ``out``. True once nothing more is needed from this stream."""
        for data in events:
            # (Asked of finished_at, not of finish: narrowing finish here would outlive the
            # _on_piece call below that sets it, and compiled code checks narrowed types.)
            if self.finished_at:
                # The answer is complete; only the prompt's size may still come, in the
                # engine's usage chunk (engines that return no prompt ids say it only
                # there). The watchdog gives this a second at most.
                if self._usage_from(decoder, data):
                    return True
                continue
            try:  # (inline, not a call: this runs for every event)
                piece = decoder.feed(data)
            except BackendError:
                raise
            except Exception as e:
                raise self._plugin_bug(backend, PluginHook.DECODER, e) from e
            if piece is None:
                continue
            rendered = self._on_piece(piece)
            if rendered is not None:
                out.append(rendered)
            if self.finished_at and (
                self.prompt_tokens is not None or self.stop_reason is not None
            ):
                # Nothing else after the finish is needed; after a stop string (the
                # engine's generation goes on), leaving also aborts it.
                return True
        return False

    def _usage_from(self, decoder: StreamDecoder, data: bytes) -> bool:
        """Whether ``data`` (an event after the finish) gave the prompt's size."""
        try:
            piece = decoder.feed(data)
        except Exception:  # best effort (a plugin bug included): the answer is complete anyway
            return True
        if piece is not None and piece.prompt_tokens is not None:
            self.prompt_tokens = piece.prompt_tokens - self.sent_before_attempt
            return True
        return False

    def _stall_check(self, lease: Lease, loop: asyncio.AbstractEventLoop, step: float) -> None:
        """The watchdog, every ``step``: only silence *of the engine* counts. Time spent
        blocked writing to a slow client is the client's (bounded by
        ``client_write_timeout``), and before this attempt's first token the longer
        ``first_token_timeout`` applies (prefill, queueing)."""
        now = time.monotonic()
        if self.outcome is Outcome.FINISHED:
            if now - self.finished_at > 1.0:  # waited long enough for the usage chunk
                lease.cancel()
                return
        elif self.writing_since is not None:
            if now - self.writing_since > self.cfg.client_write_timeout:
                self.outcome = Outcome.CLIENT_TOO_SLOW
                lease.cancel()
                return
        else:
            first = self.progress.completion_tokens == self.sent_before_attempt
            limit = self.first_token_timeout if first else self.stall_timeout
            if now - self.last_event > limit:
                self.outcome = Outcome.STALLED
                what = "first token" if first else "token"
                self.outcome_detail = f"no {what} for {limit:g}s (stalled)"
                lease.cancel()
                return
        self._timer = loop.call_later(step, self._stall_check, lease, loop, step)

    def _bad_status(self, status: int, reason: str, body: bytes) -> None:
        try:
            obj = json.loads(body)
            err = obj.get("error", obj) if isinstance(obj, dict) else {}
            message = err.get("message") if isinstance(err, dict) else None
        except ValueError:
            message = None
        message = message or body.decode("utf-8", "replace") or reason or "error"
        if 400 <= status < 500 and status not in (404, 408, 429):
            self.outcome = Outcome.ENGINE_REFUSED
            raise UpstreamClientError(status, str(message))
        raise UpstreamBroken(
            Outcome.ENGINE_ERROR, f"engine answered {status}: {str(message)[:200]}"
        )

    def _on_piece(self, piece: Piece) -> bytes | None:
        """Take one decoded piece into the answer; what the client is to get of it (None
        when nothing, or when the client does not stream)."""
        if self.prompt_tokens is None and piece.prompt_tokens is not None:
            # A continuation's prompt includes what was emitted before it.
            self.prompt_tokens = piece.prompt_tokens - self.sent_before_attempt
        if piece.prompt_token_ids is not None and self.progress.prompt_token_ids is None:
            self.progress.prompt_token_ids = piece.prompt_token_ids  # needed even if held
        admitted = self.textless.admit(piece)  # e.g. the first bytes of a character: held
        if admitted is None:
            return None
        piece = admitted
        self.progress.add(piece)
        if self.prompt_tokens is None and self.progress.prompt_token_ids is not None:
            self.prompt_tokens = len(self.progress.prompt_token_ids)
        finish = piece.finish_reason
        if finish is None and self._budget_left() == 0:
            finish = "length"
        if self.stops.stops:
            match = self.stops.scan(self.progress.text, final=finish is not None)
            if match.stop is not None:
                finish, self.stop_reason = "stop", match.stop
                self.progress.text = self.progress.text[: match.end]
            text = self.progress.text[self.emitted : match.end]
            self.emitted = max(self.emitted, match.end)
        else:  # everything is sent as it comes: the client gets this piece's text
            text = piece.text
            self.emitted += len(text)
        if finish is not None:
            self.finish = finish
            self.finished_at = time.monotonic()
            self.outcome = Outcome.FINISHED
        extras = self.extras
        if extras is not None:  # (a method of its own: this path stays as it was)
            return self._extras_chunk(extras, text, piece, finish)
        if self.emit is None or not (text or finish or piece.token_ids or piece.delta):
            return None
        failover = None
        if self.seam_pending:
            self.seam_pending = False
            failover = self.failover_report()
        return self.shape.piece_chunk(text, piece, finish, self.stop_reason, failover)

    def _extras_chunk(
        self, extras: Extras, text: str, piece: Piece, finish: str | None
    ) -> bytes | None:
        """:meth:`_on_piece`'s end for a request with logprobs, usage in every chunk or an
        echo."""
        logprobs = usage = None
        if piece.logprobs is not None and extras.logprobs:
            logprobs = extras.render(piece.logprobs)
            if self.emit is None:
                extras.keep(logprobs)
        if extras.continuous:
            usage = self.usage()
        if not extras.echo_sent:
            extras.echo_sent = True
            text = extras.echo + text
        if self.emit is None or not (text or finish or piece.token_ids or piece.delta):
            return None
        failover = None
        if self.seam_pending:
            self.seam_pending = False
            failover = self.failover_report()
        return self.shape.piece_chunk(
            text, piece, finish, self.stop_reason, failover, logprobs, usage
        )

    async def _send(self, data: bytes) -> None:
        """Write to the client; time blocked here is the client's, not the engine's."""
        assert self.emit is not None
        self.writing_since = time.monotonic()
        try:
            await self.emit(data)
        except ConnectionError as e:  # aiohttp's ClientConnectionResetError included
            self.outcome = Outcome.CLIENT_GONE
            raise ClientGone(f"the client hung up: {e}") from e
        finally:
            self.writing_since = None
            self.last_event = time.monotonic()

    def failover_report(self) -> dict[str, Any] | None:
        """What the client is told of migrations (``failover`` in the response, documented
        in docs/frontend.md): how many, and what could not be honoured across them."""
        if not self.attempt:
            return None
        report: dict[str, Any] = {"migrations": self.attempt, "inexact": list(self.inexact)}
        if self.cfg.engine_header:  # every engine so far: the head named only the first
            report["engines"] = [t.engine_id for t in self.engines()]
        return report

    def engines(self) -> list[Target]:
        """The engines the request was sent to, in order."""
        first = [] if self.served_by is None else [self.served_by]
        return first + list(self.moved_to)

    def usage(self) -> dict[str, int]:
        p = self.prompt_tokens or 0
        c = self.progress.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def abort_upstream(self) -> None:
        """The client went away: cancel the engine-side request explicitly where possible
        (closing the connection, which happens as the relay unwinds, is the rest)."""
        if self.current is None:
            return
        lease, up = self.current
        ep = EngineEndpoint(lease.target.url, self.sessions.control, timeout=1.0)
        with anyio.move_on_after(1.0):
            backend = lease.target.backend
            try:
                await backend.abort(ep, up.request_id)
            except (BackendError, aiohttp.ClientError, TimeoutError) as e:
                self.log.warning("explicit abort failed", error=str(e))
            except Exception as bug:  # a plugin bug: counted and logged, the unwinding goes on
                self.metrics.plugin_errors.labels(backend.name, PluginHook.ABORT).inc()
                self.log.error("backend abort hook raised", error=repr(bug), exc_info=bug)
