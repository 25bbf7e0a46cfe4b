"""The router's bookkeeping of waiting requests survives every order of events: moving
streams (several with equal exclusions) and a new request wait for one model while places
free, engines appear and vanish, and waits end by success, timeout, cancellation and drain.
Each wait leaves nothing behind, raises nothing but what :meth:`Router.acquire` documents,
and no new request takes a place a moving stream may use while that stream waits.

What broke a list of ``(model, exclude)`` tuples removed by equality: B begins waiting
while A and D, with equal exclusions, re-wait after a wake that helps none; B is woken
first by the next free place, takes it, removes A's equal entry instead of its own, and
adds the engine to its set (its stream breaks there later), so its left-over entry no
longer equals anyone's: the last of A and D to end found nothing to remove (ValueError).

The directory is a fake of the router's own interface (:class:`EngineDirectory`); the
router and its waits are the real ones."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup

from plugins.vllm import VllmBackend
from supervisor.config import FrontendConfig
from supervisor.frontend.routing import Lease, Rejected, Router, Target
from supervisor.metrics import Metrics

pytestmark = pytest.mark.anyio

BACKEND = VllmBackend()
TIMEOUT = 0.001  # C's wait: it ends by its deadline


class Directory:
    """Engines of one model that come and go, with the change signal the router waits on."""

    def __init__(self, *engines: str) -> None:
        self.targets = {e: Target(e, f"http://127.0.0.1:1/{e}", BACKEND) for e in engines}
        self._changed = anyio.Event()

    def models(self) -> list[str]:
        return ["m"]

    def has_model(self, model: str) -> bool:
        return model == "m"

    def candidates(self, model: str) -> list[Target]:
        return list(self.targets.values()) if model == "m" else []

    async def changed(self) -> None:
        await self._changed.wait()

    def report_failure(self, engine_id: str, kind: str, reason: str, request_id: str) -> None:
        pass

    def add(self, engine: str) -> None:
        self.targets[engine] = Target(engine, f"http://127.0.0.1:1/{engine}", BACKEND)
        self.notify()

    def remove(self, engine: str) -> None:
        del self.targets[engine]
        self.notify()

    def notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


class Request:
    """One request waiting for a place. A moving one keeps its own set of engines it may
    not use and adds to it once placed, as the relay does when a stream breaks: the set
    changes while the others still wait."""

    def __init__(self, name: str, failed: set[str] | None, wait: float) -> None:
        self.name, self.failed, self.wait = name, failed, wait
        self.scope = anyio.CancelScope()
        self.waiting = False
        self.lease: Lease | None = None
        self.outcome = "not started"

    @property
    def moving(self) -> bool:
        return self.failed is not None


class Scenario:
    """Two engines, each full (one place, taken); requests wait for the model."""

    def __init__(self) -> None:
        self.directory = Directory("e1", "e2")
        cfg = FrontendConfig(max_inflight_per_engine=1, queue_timeout=30.0)
        self.router = Router(cfg, self.directory, Metrics())
        self.held: dict[str, Lease] = {}
        self.requests = {
            r.name: r
            for r in (
                Request("A", {"e1"}, 30.0),
                Request("D", {"e1"}, 30.0),  # cancelled by its client
                Request("N", None, 30.0),  # a new request
                Request("B", {"e1"}, 30.0),  # equal to A's and D's exclusions; comes later
                Request("C", {"e2"}, TIMEOUT),  # comes later, and gives up at once
            )
        }
        self.problems: list[str] = []

    async def fill(self) -> None:
        for e in ("e1", "e2"):
            self.held[e] = await self.router.acquire("m", exclude={"e1", "e2"} - {e})

    async def serve(self, r: Request) -> None:
        with r.scope:
            r.waiting = True
            try:
                if r.failed is None:
                    lease = await self.router.acquire("m")
                else:
                    lease = await self.router.acquire("m", exclude=r.failed, wait=r.wait)
            except Rejected as e:
                r.outcome = f"rejected: {e.reason}"
                return
            except Exception as e:  # anything else is a bug of the router
                r.outcome = f"error: {e!r}"
                self.problems.append(f"{r.name} raised {e!r}")
                return
            finally:
                r.waiting = False
            eid = lease.target.engine_id
            r.lease, r.outcome = lease, f"placed on {eid}"
            if r.failed is None:
                # A new request took this place: no moving stream that may use it waits.
                for other in self.requests.values():
                    if other.moving and other.waiting and eid not in (other.failed or ()):
                        self.problems.append(f"N took {eid} before moving {other.name}")
            else:
                if eid in r.failed:
                    self.problems.append(f"{r.name} placed on excluded {eid}")
                r.failed.add(eid)  # its stream breaks there later
        if r.scope.cancelled_caught:
            r.outcome = "cancelled"

    def step(self, name: str, tg: TaskGroup) -> None:
        if name == "B arrives":
            tg.start_soon(self.serve, self.requests["B"])
        elif name == "C times out":
            tg.start_soon(self.serve, self.requests["C"])
        elif name == "free e2":
            self.router.release(self.held.pop("e2"))
        elif name == "e3 appears":
            self.directory.add("e3")
        elif name == "e1 vanishes":  # wakes every wait, and helps none
            self.directory.remove("e1")
        elif name == "D cancelled":
            self.requests["D"].scope.cancel()


async def settle() -> None:
    """Let every woken task run until it waits again (everything here is in the event loop,
    no I/O): no task can go on and no callback is due (anyio delivers a cancellation by
    one). What anyio's ``wait_all_tasks_blocked`` does, without its 0.1 s sleeps."""
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for _ in range(1000):
        await anyio.lowlevel.checkpoint()
        ready = loop._ready  # type: ignore[attr-defined]
        if not ready and all(t is me or _blocked(t) for t in asyncio.all_tasks()):
            return
    raise AssertionError("tasks still run after 1000 turns of the event loop")


def _blocked(task: asyncio.Task[Any]) -> bool:
    waiter = task._fut_waiter  # type: ignore[attr-defined]  # (as anyio reads it)
    return waiter is not None and not waiter.done()


STEPS = ("B arrives", "free e2", "e3 appears", "e1 vanishes", "D cancelled", "C times out")
ORDERS = list(itertools.permutations(STEPS))


async def run_order(order: tuple[str, ...]) -> Scenario:
    """The steps in this order, each once the previous one's wakes are over, except B's
    arrival: it comes while they still run (a wait that begins while others re-wait)."""
    s = Scenario()
    await s.fill()
    async with anyio.create_task_group() as tg:
        for name in "ADN":
            tg.start_soon(s.serve, s.requests[name])
            await settle()
        for name in order:
            if name != "B arrives":
                await settle()
            s.step(name, tg)
            if name == "C times out":
                c = s.requests["C"]
                while c.outcome == "not started":  # its wait ends by its deadline
                    await anyio.sleep(TIMEOUT)
        await settle()
        # Whatever still waits ends with the drain.
        s.router.draining = True
        s.directory.notify()
    return s


def check(order: tuple[str, ...], s: Scenario) -> list[str]:
    """What went wrong in one order (nothing: an empty list)."""
    outcomes = {r.name: r.outcome for r in s.requests.values()}
    wrong = list(s.problems)
    if s.router.moving or s.router.migrations_waiting:
        wrong.append(f"moving streams left: {s.router.moving}")
    if s.router.waiting:
        wrong.append(f"waiting left at {s.router.waiting}")
    for r in s.requests.values():
        if not r.outcome.startswith(("placed on ", "rejected: ", "cancelled")):
            wrong.append(f"{r.name} ended {r.outcome}")
    # Each place went to one request at most, within the engine's limit.
    placed = [r.lease.target.engine_id for r in s.requests.values() if r.lease is not None]
    if len(placed) != len(set(placed)):
        wrong.append(f"a place given twice: {placed}")
    if outcomes["C"] not in ("rejected: saturated", "rejected: no_engine"):
        wrong.append("C's wait did not end by its deadline")  # every place C may use is taken
    return [f"{'|'.join(order)}: {w} {outcomes}" for w in wrong]


CHUNK = 120


@pytest.mark.parametrize("first", range(0, len(ORDERS), CHUNK))
async def test_waits_end_cleanly_in_every_order(first: int) -> None:
    wrong = []
    for order in ORDERS[first : first + CHUNK]:
        with anyio.fail_after(10):
            wrong += check(order, await run_order(order))
    assert not wrong, f"{len(wrong)} problem(s):\n" + "\n".join(wrong[:10])
