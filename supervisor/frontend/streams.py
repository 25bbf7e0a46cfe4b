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
import secrets
import time
from collections.abc import Awaitable, Callable
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
from supervisor.frontend.extras import Extras
from supervisor.frontend.outcome import (
    ClientGone,
    MigrationFailed,
    Outcome,
    UpstreamBroken,
    UpstreamClientError,
    engine_status_error,
)
from supervisor.frontend.pump import PumpedRelay, pump
from supervisor.frontend.routing import EngineWait, Lease, Rejected, Router, Target
from supervisor.frontend.shape import ClientShape
from supervisor.frontend.stops import NO_STOPS, StopStrings
from supervisor.frontend.wire import EngineConnectionError, EngineProtocolError
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


Emit = Callable[[bytes], Awaitable[None]]


class RequestRelay(PumpedRelay):
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
        # Writes to the client: ``emit`` waits for it; ``emit_now`` writes only if it can
        # at once, and says whether it did.
        super().__init__(cfg, router, emit_now)
        self.req, self.rid, self.shape = req, rid, shape
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
        self.sessions = sessions
        self.stall_timeout = health.stall_timeout
        self.first_token_timeout = health.first_token_timeout
        self.metrics, self.emit = metrics, emit
        self.progress = Progress()
        self.model = str(req.body.get("model"))
        # The answer so far.
        self.emitted = 0  # characters of the answer sent to the client
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
        # The attempt under way.
        self.outcome = Outcome.RUNNING  # how it ended, set where that is seen
        self.outcome_detail = ""  # what the watchdog saw (STALLED, DEADLINE)
        self.current: tuple[Lease, UpstreamRequest] | None = None
        self.whole = False  # its answer comes whole
        self.sent_before_attempt = 0
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
                    self.progress.context_length = await self.router.context_length(
                        lease.target, self.sessions.control
                    )
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
                error = engine_status_error(conn.status, conn.reason, await conn.read_all(2000))
                if isinstance(error, UpstreamClientError):
                    self.outcome = Outcome.ENGINE_REFUSED
                raise error
            if up.whole:
                body = await conn.read_whole(_WHOLE_LIMIT)
                self.router.answered_at[lease.target.engine_id] = time.monotonic()
                self._take_whole(lease.target.backend, decoder, body)
            else:
                await pump(self, conn, lease.target, decoder)
        except EngineReportedError as refused:  # this request failed there; the engine may be fine
            raise UpstreamBroken(Outcome.ENGINE_REPORTED_ERROR, str(refused)) from refused
        except (MalformedStream, EngineProtocolError) as broken:  # garbage: the engine is broken
            raise UpstreamBroken(Outcome.BAD_ENGINE_OUTPUT, str(broken)) from broken
        except EngineConnectionError as e:
            raise UpstreamBroken(Outcome.CONNECT_FAILED, f"connection failed: {e}") from e
        finally:
            pool.release(conn)  # kept if its answer was read whole, else closed (an abort)

    def _take_whole(self, backend: Backend, decoder: StreamDecoder, body: bytes) -> None:
        """Take a whole answer (one body, decoded as one event) into the request."""
        self.take_events(backend, decoder, [body], [])  # (nothing is rendered: not streamed)
        if self.finish is None:
            raise MalformedStream(f"the engine's answer has no finish reason: {body[:80]!r}")
        if self.extras is not None and isinstance(decoder, OpenAIStreamDecoder):
            # (Only a whole answer has them, and it is asked only before anything was sent:
            # they are the client's prompt's, never a continuation's.)
            self.extras.prompt_logprobs = decoder.prompt_logprobs

    def take_events(
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

    async def send(self, data: bytes) -> None:
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
