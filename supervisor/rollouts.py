"""A node's rolling upgrade: the slots a reload marked, rolled to their new spec one at a
time, in the background, each by its own steps (:mod:`supervisor.slot.rollout`).

A slot that does not roll out stops the run: the slots after it keep their old spec (said
in the log). Shutdown cancels every run in progress and waits for it, bounded, so that a
launch it began is watched to its end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

from supervisor.model import RolloutProgress
from supervisor.slot.controller import SlotController
from supervisor.slot.placement import FailoverError


class Rollouts:
    """Runs rollouts across the node's slots; knows each run's scope for the shutdown."""

    def __init__(self, controllers: Mapping[str, SlotController], log: Any) -> None:
        self.controllers = controllers
        self.log = log
        self.running: set[anyio.CancelScope] = set()  # rollouts end with the daemon

    def start(self, slots: list[str], tg: Any, stopping: anyio.Event) -> list[RolloutProgress]:
        """Roll ``slots`` (none: every slot a reload marked) to their new spec, one at a
        time, in ``tg``. The first is checked now (FailoverError says why not)."""
        names = slots or [n for n, c in self.controllers.items() if c.pending]
        if not names:
            raise FailoverError(
                "nothing to roll out: every slot runs its config's spec (edit the file, "
                "then reload)"
            )
        for n in names:
            if n not in self.controllers:
                raise FailoverError(f"no slot {n!r}")
            if self.controllers[n].pending is None:
                raise FailoverError(
                    f"slot {n} already runs its config's spec; change it and reload first"
                )
        if stopping.is_set():
            raise FailoverError("the supervisor is shutting down")
        first = self.controllers[names[0]]
        progress = first.rollouts.begin()
        # Known to the shutdown from now, not once the task runs: a stop that comes in
        # between cancels it before it launches anything.
        scope = anyio.CancelScope()
        self.running.add(scope)
        tg.start_soon(self._run, names, progress, scope)
        return [progress]

    async def wait(self, names: list[str]) -> list[RolloutProgress]:
        """Once every slot of ``names`` is done rolling: their records."""
        while any(c.rolling_out for n, c in self.controllers.items() if n in names):
            await anyio.sleep(0.1)
        return [c.rollout for n, c in self.controllers.items() if n in names and c.rollout]

    async def cancel_all(self, grace: float) -> None:
        """Cancel every run, then wait (up to ``grace`` seconds) for each to end: one may
        be half-way through launching an engine (the spawn is shielded)."""
        for scope in self.running:
            scope.cancel()
        with anyio.move_on_after(grace):
            while self.running:
                await anyio.sleep(0.05)

    async def _run(
        self, names: list[str], first: RolloutProgress, scope: anyio.CancelScope
    ) -> None:
        with scope:
            try:
                await self._each(names, first)
            finally:
                self.running.discard(scope)

    async def _each(self, names: list[str], first: RolloutProgress) -> None:
        for i, name in enumerate(names):
            ctl = self.controllers[name]
            progress = first
            if i:
                if ctl.pending is None:
                    continue
                try:
                    progress = ctl.rollouts.begin()
                except FailoverError as e:
                    self.log.error("rollout stops: a slot cannot roll", slot=name, error=str(e))
                    return
            await ctl.rollouts.run()
            if progress.result != "done":
                rest = names[i + 1 :]
                if rest:
                    self.log.warning(
                        "rollout stops: the slot did not roll out; later slots untouched",
                        slot=name,
                        result=progress.result,
                        untouched=rest,
                    )
                return
