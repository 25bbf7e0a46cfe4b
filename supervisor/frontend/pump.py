"""Relaying one engine's streamed answer to the client as it arrives.

Each read is decoded in the engine connection's callback and written to the client there
and then; the relay's task only steps in to write what cannot go at once and to end the
stream. Reads that come faster than anyone reads them are coalesced: the connection is
paused for a window and the next ones are taken in one read and one write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from supervisor.backends import Backend, MalformedStream, StreamDecoder
from supervisor.config import FrontendConfig
from supervisor.events import SseSplitter
from supervisor.frontend.routing import Router, Target
from supervisor.frontend.wire import EngineConnection

# The weight of one read's gap in a stream's running average (about the last eight count).
_GAP_WEIGHT: Final = 0.125


class PumpedRelay:
    """What the pump reads and writes of the request it relays; the relay
    (:class:`supervisor.frontend.streams.RequestRelay`) is its subclass. A base class, not
    a Protocol: compiled, these fields are read as the object's own slots at every read of
    an engine's stream, where a Protocol would look each one up by name."""

    def __init__(
        self,
        cfg: FrontendConfig,
        router: Router,
        emit_now: Callable[[bytes], bool] | None,
    ) -> None:
        self.cfg = cfg
        self.router = router
        # Writes to the client only if it can take them at once, saying whether it did.
        self.emit_now = emit_now
        self.stop_reason: str | None = None  # the stop string that ended the answer
        self.held_windows = 0  # coalescing windows its reads waited for
        self.last_event = 0.0  # when the engine's last whole event came (monotonic)
        self.writing_since: float | None = None  # blocked on the client, not the engine

    def take_events(
        self, backend: Backend, decoder: StreamDecoder, events: list[bytes], out: list[bytes]
    ) -> bool:
        """Decode one read's events into the answer, appending what the client is to get
        to ``out``. True once nothing more is needed from this stream."""
        raise NotImplementedError  # the relay's

    async def send(self, data: bytes) -> None:
        """Write to the client, waiting for it to take the bytes."""
        raise NotImplementedError  # the relay's


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


async def pump(
    relay: PumpedRelay, conn: EngineConnection, target: Target, decoder: StreamDecoder
) -> None:
    """Relay the answer as it arrives. Each read is decoded in the connection's
    callback and written to the client there and then; this task only steps in to
    write what cannot go at once (the first write, a client that is not keeping up:
    the engine's connection is paused meanwhile) and to end the stream."""
    loop = asyncio.get_running_loop()
    # A stream whose reads come less than half a window apart on average (a rate, so
    # a slow stream's catch-up burst never counts) is read once per window.
    window = relay.cfg.coalesce_window
    close_gap = window / 2
    st = _Pump(loop, window)
    sse = SseSplitter(relay.cfg.max_event_bytes)
    backend, engine_id, answered_at = target.backend, target.engine_id, relay.router.answered_at

    def release() -> None:  # the coalescing window is over: read what came meanwhile
        st.held = None
        st.last_read = time.monotonic()  # (the wait was ours, not a gap of the stream)
        # (Not while the client is behind or the stream is ending: this task resumes.)
        if not st.pending and st.error is None and relay.writing_since is None:
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
            relay.last_event = answered_at[engine_id] = now
        out: list[bytes] = []
        try:
            st.complete = relay.take_events(backend, decoder, events, out)
        except Exception as e:  # raised in this task, once what was taken is written
            st.error = e
        if out:  # what was taken into the answer reaches the client, come what may
            data = out[0] if len(out) == 1 else b"".join(out)
            # Straight to the client if it can take it now (not while this task is
            # blocked writing to it), else queued for this task, which waits for it.
            write_now = relay.emit_now
            if (
                st.pending
                or write_now is None
                or relay.writing_since is not None
                or not write_now(data)
            ):
                st.pending.append(data)
        if st.error is None and sse.error is not None:
            st.error = sse.error
        st.complete = st.complete or sse.done
        if st.pending or st.error is not None or relay.stop_reason is not None:
            conn.pause()
            st.wake()
        elif st.gap < close_gap and st.held is None and not st.complete:
            # Tokens are coming faster than anyone reads them: let the next ones
            # gather in the socket for a window, then take them in one read and write.
            conn.pause()
            st.held = loop.call_later(window, release)
            relay.held_windows += 1

    conn.on_end = st.wake
    conn.set_sink(on_body)
    try:
        while True:
            if st.pending:
                data = b"".join(st.pending)
                st.pending.clear()
                await relay.send(data)
                if st.held is None:
                    conn.resume()
                continue
            if st.error is not None:
                raise st.error
            if relay.stop_reason is not None:
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
