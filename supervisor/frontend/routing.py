"""Routing and admission: pick an engine for a request, or say 503 quickly.

Only ready active engines of the requested model are candidates (the daemon's
:class:`EngineDirectory` says which). Among them the least loaded by our own in-flight
count wins. Each engine takes at most ``max_inflight_per_engine`` requests at once; beyond
that requests wait in a bounded queue for at most ``queue_timeout`` seconds. A full queue,
a timeout, or a drain means 503 with Retry-After, never a hang.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
import anyio
import orjson

from supervisor.backends import Backend
from supervisor.config import FrontendConfig
from supervisor.metric_labels import RejectReason
from supervisor.metrics import Metrics


@dataclass(frozen=True)
class Target:
    """An engine the frontend may send requests to."""

    engine_id: str
    url: str
    backend: Backend
    node: str = ""  # the cluster node it runs on ("" without a cluster)


# What KeptTargets reads of the control plane's records (supervisor.model's Slot and
# Engine), as protocols: the compiled relay does not import those plain records, so that
# an edit to them leaves its build current.
class ServingSlot(Protocol):
    @property
    def active(self) -> str | None: ...


class ServingEngine(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...  # an EngineState (a StrEnum)


_ACTIVE: Final = "active"  # EngineState.ACTIVE's value


def engine_ids(targets: list[Target]) -> str:
    """The engines' ids, in order, as one comma-separated field."""
    return ",".join([t.engine_id for t in targets])


class KeptTargets:
    """A model's candidates as a directory last worked them out, with the (slot, engine)
    pairs they came from: handed out again while the config is the same one and each of
    those engines is still its slot's active engine (checked on every use, so one that
    stopped is never handed out, even before the directory hears of it)."""

    def __init__(
        self,
        cfg: object,
        serving: Sequence[tuple[ServingSlot, ServingEngine]],
        targets: list[Target],
    ) -> None:
        self.cfg, self.serving, self.targets = cfg, serving, targets

    def still_valid(self, cfg: object) -> bool:
        # Compiled with the relay: it runs for every request.
        if cfg is not self.cfg:
            return False
        for slot, engine in self.serving:
            if slot.active != engine.id or engine.state != _ACTIVE:
                return False
        return True


class EngineDirectory(Protocol):
    """What the frontend needs to know about engines (implemented by the daemon)."""

    def models(self) -> list[str]: ...

    def has_model(self, model: str) -> bool:
        """Whether ``model`` is one of :meth:`models` (asked for every request)."""
        ...

    def candidates(self, model: str) -> list[Target]:
        """Ready active engines serving ``model``."""
        ...

    async def changed(self) -> None:
        """Returns the next time the set of ready engines changes."""
        ...

    def report_failure(self, engine_id: str, kind: str, reason: str, request_id: str) -> None:
        """A stream showed the engine broken (``kind``: "stall" makes it suspect, "garbage"
        broken): let health decide, in the background."""
        ...


class Rejected(Exception):
    """No engine can take the request now: answer 503 with Retry-After."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


DEADLINE_GRAIN = 0.25  # seconds: how late Deadlines may end a wait


class Deadlines:
    """The deadlines of waits on engines, kept in buckets of ``DEADLINE_GRAIN`` seconds with
    one timer per bucket: a wait costs a set insertion instead of a timer of its own (a
    uvloop timer costs microseconds to make and to cancel, and every whole answer waits
    under a deadline). A deadline ends its wait late by at most the grain, never early.
    One per router: its timers belong to the router's event loop."""

    def __init__(self) -> None:
        self._buckets: dict[float, set[EngineWait]] = {}

    def __len__(self) -> int:
        """How many waits are under a deadline now."""
        return sum(len(b) for b in self._buckets.values())

    def add(self, loop: asyncio.AbstractEventLoop, wait: EngineWait, when: float) -> None:
        """End ``wait`` at loop time ``when`` (or up to the grain later), unless it ends
        otherwise first (:meth:`EngineWait.close` leaves its bucket)."""
        at = math.ceil(when / DEADLINE_GRAIN) * DEADLINE_GRAIN
        bucket = self._buckets.get(at)
        if bucket is None:
            bucket = self._buckets[at] = set()
            loop.call_at(at, self._due, at)
        bucket.add(wait)
        wait.bucket = bucket

    def _due(self, at: float) -> None:
        for wait in self._buckets.pop(at, set()):
            wait.end_now()


class EngineWait:
    """The relay's wait on one engine: ended at a deadline (a whole answer's stall limit)
    or at once through the lease (the engine declared dead, the request moved, its stream
    stalled). The waiting task gets ``CancelledError``; :meth:`ended_it` tells this ending
    from any other cancellation. What ``asyncio.Timeout`` does here, without its states:
    it is interpreted Python on 3.11, and every request waits once."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancelling = task.cancelling()  # cancellations already asked of the task
        self.ended = False
        self.bucket: set[EngineWait] | None = None  # its deadline's, if it has one (Deadlines)

    def end_now(self) -> None:
        if not self.ended:
            self.ended = True
            self.task.cancel()

    def close(self) -> None:
        """The wait is over (however it ended): the deadline no longer applies."""
        if self.bucket is not None:
            self.bucket.discard(self)
            self.bucket = None

    def ended_it(self) -> bool:
        """Asked once, on ``CancelledError``: whether this wait's ending raised it (and
        not also a cancellation from outside, which must go on)."""
        return self.ended and self.task.uncancel() <= self.cancelling


@dataclass(eq=False, init=False)  # compared and hashed by identity: one request's
class Lease:
    """One request's hold on an engine; cancelled if the engine is declared dead (or the
    request is moved off it, or its stream stalls): the flags say why."""

    target: Target
    engine_failed: bool = False
    moved: bool = False  # a planned move took the request off a healthy engine
    may_return: bool = False  # ... that may serve it again (it only stopped for a while)
    cancelled: bool = False
    # The relay's wait on this engine, while it waits.
    waiting: EngineWait | None = field(default=None, repr=False)

    # (A written __init__: one that dataclass generates is interpreted even when the class
    # is compiled, and one is built per request.)
    def __init__(self, target: Target) -> None:
        self.target = target
        self.engine_failed = self.moved = self.may_return = self.cancelled = False
        self.waiting = None

    def cancel(self) -> None:
        """End the relay's wait on this engine now (or as soon as it starts waiting)."""
        self.cancelled = True
        self._end_wait()

    def wait_in(self, waiting: EngineWait | None) -> None:
        """The relay waits on this engine inside ``waiting`` (None: no longer); a lease
        cancelled before the wait began ends it at once."""
        self.waiting = waiting
        if self.cancelled:
            self._end_wait()

    def _end_wait(self) -> None:
        if self.waiting is not None:
            self.waiting.end_now()


class MoveWait:
    """A moving stream's wait for a place (see :attr:`Router.moving`): one object per wait,
    compared and hashed by identity, so that ending one wait can never take away another's
    entry (two streams may wait for the same model with equal exclusions). The engines it
    may not use are copied when the wait begins: the relay keeps adding to its own set."""

    def __init__(self, model: str, exclude: frozenset[str]) -> None:
        self.model, self.exclude = model, exclude


class Router:
    def __init__(self, cfg: FrontendConfig, directory: EngineDirectory, metrics: Metrics) -> None:
        self.cfg, self.directory, self.metrics = cfg, directory, metrics
        self.inflight: dict[str, int] = {}
        self.context_lengths: dict[str, int | None] = {}  # per engine, asked once
        # Moving streams waiting for a place: they go first on every engine they could use,
        # and only there.
        self.moving: set[MoveWait] = set()
        self.leases: dict[str, set[Lease]] = {}  # per engine, the requests it serves
        # Per engine, when its answers last brought the relay anything (monotonic): an
        # engine that streams to clients is alive, however slow its health route.
        self.answered_at: dict[str, float] = {}
        self.waiting = 0
        self.draining = False
        self._freed = anyio.Event()
        self._gauges: dict[str, Any] = {}
        self.deadlines = Deadlines()  # of the relay's waits on engines

    @property
    def migrations_waiting(self) -> int:
        return len(self.moving)

    def _kept_for_moving(self, model: str, engine_id: str) -> bool:
        return any(w.model == model and engine_id not in w.exclude for w in self.moving)

    def _pick(self, model: str, exclude: AbstractSet[str], migrating: bool) -> Target | None:
        best: Target | None = None
        best_load = self.cfg.max_inflight_per_engine
        for t in self.directory.candidates(model):
            if t.engine_id in exclude:
                continue
            if not migrating and self.moving and self._kept_for_moving(model, t.engine_id):
                continue  # a moving stream may take this place: new requests wait
            load = self.inflight.get(t.engine_id, 0)
            if load < best_load:
                best, best_load = t, load
        return best

    async def acquire(
        self,
        model: str,
        *,
        exclude: AbstractSet[str] = frozenset(),
        wait: float | None = None,
    ) -> Lease:
        """Take a slot on the least-loaded engine of ``model``; wait (bounded) if none.

        ``wait`` given means a stream that is already under way moves (a migration): it is
        never turned away by a full queue, and new requests do not take a freed place from
        it while it waits.
        """
        if self.draining:
            raise Rejected(RejectReason.DRAINING, "the supervisor is shutting down")
        migrating = wait is not None
        target = self._pick(model, exclude, migrating)
        if target is None:
            if not migrating and self.waiting >= self.cfg.max_queue:
                raise Rejected(
                    RejectReason.QUEUE_FULL,
                    f"all engines for {model!r} are busy and the "
                    f"queue is full ({self.cfg.max_queue})",
                )
            target = await self._wait_for(
                model, exclude, self.cfg.queue_timeout if wait is None else wait, migrating
            )
        eid = target.engine_id
        self.inflight[eid] = self.inflight.get(eid, 0) + 1
        if eid not in self._gauges:
            self._gauge(eid)
        lease = Lease(target)
        held = self.leases.get(eid)
        if held is None:
            held = self.leases[eid] = set()
        held.add(lease)
        return lease

    async def _wait_for(
        self, model: str, exclude: AbstractSet[str], timeout: float, migrating: bool = False
    ) -> Target:
        self.waiting += 1
        me: MoveWait | None = None
        if migrating:  # (only a moving stream pays for its entry)
            exclude = frozenset(exclude)
            me = MoveWait(model, exclude)
            self.moving.add(me)
        self.metrics.queued.set(self.waiting)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with anyio.move_on_after(left):
                    async with anyio.create_task_group() as tg:
                        # Wake on either: an engine frees a place, or the engine set changes.
                        tg.start_soon(self._first_of, tg.cancel_scope, self._freed.wait)
                        tg.start_soon(self._first_of, tg.cancel_scope, self.directory.changed)
                if self.draining:
                    raise Rejected(RejectReason.DRAINING, "the supervisor is shutting down")
                target = self._pick(model, exclude, migrating)
                if target is not None:
                    return target
        finally:
            self.waiting -= 1
            if me is not None:
                self.moving.discard(me)
            self.metrics.queued.set(self.waiting)
        if self.directory.candidates(model):
            raise Rejected(
                RejectReason.SATURATED, f"all engines for {model!r} stayed busy for {timeout:g}s"
            )
        raise Rejected(
            RejectReason.NO_ENGINE,
            f"no engine is serving {model!r} right now (failing over or degraded)",
        )

    @staticmethod
    async def _first_of(scope: anyio.CancelScope, waiter: Callable[[], Awaitable[object]]) -> None:
        await waiter()
        scope.cancel()

    async def context_length(self, target: Target, session: aiohttp.ClientSession) -> int | None:
        """The engine's context length (``max_model_len`` in its ``/v1/models``), asked once
        per engine and remembered; None where it does not say."""
        known = self.context_lengths
        if target.engine_id not in known:
            found: int | None = None
            with anyio.move_on_after(2.0):
                try:
                    async with session.get(target.url + "/v1/models") as r:
                        if r.status == 200:
                            data = (orjson.loads(await r.read()) or {}).get("data") or [{}]
                            value = data[0].get("max_model_len")
                            found = value if isinstance(value, int) else None
                except (aiohttp.ClientError, ValueError, AttributeError, TypeError):
                    pass
            known[target.engine_id] = found
        return known[target.engine_id]

    def release(self, lease: Lease) -> None:
        eid = lease.target.engine_id
        self.leases.get(eid, set()).discard(lease)
        self.inflight[eid] = max(0, self.inflight.get(eid, 0) - 1)
        if self.waiting:  # wake the waiters (an event nobody awaits need not be replaced)
            freed, self._freed = self._freed, anyio.Event()
            freed.set()

    def forget_gone(self, live: AbstractSet[str]) -> None:
        """Drop what is kept per engine for engines no longer in ``live`` (retired by a
        failover or a rollout; engine ids are never reused), once none of their requests
        is still held: over a long life, these were never pruned."""
        known = (
            (self.inflight.keys() | self.answered_at.keys() | self.context_lengths.keys())
            | self._gauges.keys()
            | self.leases.keys()
        )
        for eid in known - live:
            if self.leases.get(eid):
                continue  # requests still on it: pruned at a later change
            self.inflight.pop(eid, None)
            self.answered_at.pop(eid, None)
            self.context_lengths.pop(eid, None)
            self._gauges.pop(eid, None)
            self.leases.pop(eid, None)

    def _gauge(self, engine_id: str) -> None:
        # The per-engine in-flight gauge reads the count when scraped: setting it on every
        # acquire and release took a lock twice per request for a value read once a scrape.
        child = self._gauges[engine_id] = self.metrics.inflight.labels(engine_id)
        child.set_function(lambda: self.inflight.get(engine_id, 0))

    def engine_failed(self, engine_id: str) -> None:
        """Cancel every stream on a dead engine so each migrates at once."""
        for lease in list(self.leases.get(engine_id, ())):
            lease.engine_failed = True
            lease.cancel()

    def move_off(self, engine_id: str, *, may_return: bool = False) -> int:
        """A planned move (switchover, rollout, a drain past its limit): every stream on
        the engine leaves it now and resumes, token-exact, wherever the slot is served.
        The engine is not blamed and the move does not count against
        ``migration_limit``; with ``may_return`` (its node only stopped serving for a
        while) the streams may resume on it again. Returns how many streams were moved."""
        leases = list(self.leases.get(engine_id, ()))
        for lease in leases:
            lease.moved, lease.may_return = True, may_return
            lease.cancel()
        return len(leases)
