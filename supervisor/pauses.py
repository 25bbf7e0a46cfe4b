"""Maintenance mode: the node's pause and its slots' pauses, their expiry, and how they
survive a restart and reach the cluster.

A paused slot (or every slot of a paused node) fails nothing over and relaunches nothing
until resumed or its ``until`` passes; the slot's table reads the pause as a guard
(:mod:`supervisor.slot.table`). The cluster's leader reads this node's pauses from etcd,
where :meth:`Pauses.record` is published, and moves none of its slots meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from supervisor.model import Pause
from supervisor.slot.controller import SlotController


class Pauses:
    """The node's pause (``node``) and the pause and resume of each slot."""

    def __init__(
        self,
        controllers: Mapping[str, SlotController],
        log: Any,
        on_change: Callable[[], None],
    ) -> None:
        self.controllers = controllers
        self.log = log
        self.on_change = on_change  # the cluster's record and the routing follow
        self.node: Pause | None = None  # the whole node's maintenance mode

    def in_force(self) -> Pause | None:
        """The node's pause, unless it has run out."""
        p = self.node
        return p if p is not None and not p.expired(time.time()) else None

    def pause(self, slot: str | None, reason: str, until: float | None) -> Pause:
        """Pause a slot, or (``slot`` None) the whole node: no automatic failover or
        relaunch until resumed or ``until``."""
        p = Pause(reason, time.time(), until)
        if slot is None:
            self.node = p
            self.log.info("node paused", reason=reason, until=until)
            for c in self.controllers.values():
                c.pause_changed()
        else:
            self.controllers[slot].set_pause(p)
        self.on_change()
        return p

    def resume(self, slot: str | None) -> bool:
        """End a pause; whether there was one."""
        if slot is None:
            was, self.node = self.node, None
            if was is not None:
                self.log.info("node resumed", reason=was.reason)
                for c in self.controllers.values():
                    c.pause_changed()
        else:
            ctl = self.controllers[slot]
            was = ctl.pause
            if was is not None:
                ctl.set_pause(None)
        self.on_change()
        return was is not None

    def record(self) -> dict[str, Any] | None:
        """This node's pauses as the cluster sees them (None: nothing paused)."""
        slots = {n: c.pause.as_dict() for n, c in self.controllers.items() if c.pause}
        if self.node is None and not slots:
            return None
        return {"node": self.node.as_dict() if self.node else None, "slots": slots}

    async def expiry_loop(self) -> None:
        """A pause with an end runs out by itself (a forgotten one must not hold failover
        off for good)."""
        while True:
            await anyio.sleep(0.25)
            now = time.time()
            if self.node is not None and self.node.expired(now):
                self.log.info("node pause expired; resuming", reason=self.node.reason)
                self.resume(None)
            for name, c in self.controllers.items():
                if c.pause is not None and c.pause.expired(now):
                    c.log.info("pause expired; resuming", reason=c.pause.reason)
                    self.resume(name)

    def restore(self, saved: dict[str, Any]) -> None:
        """Pauses survive a restart of the daemon (maintenance often includes one)."""
        now = time.time()

        def read(raw: Any) -> Pause | None:
            try:
                until = None if raw.get("until") is None else float(raw["until"])
                p = Pause(str(raw["reason"]), float(raw["since"]), until)
            except (TypeError, KeyError, ValueError, AttributeError):
                if raw is not None:
                    self.log.warning("unreadable pause in the state file; ignored", saved=raw)
                return None
            return None if p.expired(now) else p

        self.node = read(saved.get("pause"))
        if self.node is not None:
            self.log.info("node paused since before the restart", reason=self.node.reason)
        for name, ctl in self.controllers.items():
            ctl.set_pause(
                read((saved.get("slots", {}).get(name) or {}).get("pause")), restored=True
            )
