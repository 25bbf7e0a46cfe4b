"""What the admin API needs from the daemon, and nothing more.

The admin API (``supervisor.admin``) drives a node through this protocol alone, so it never
imports the daemon nor reaches into its slot controllers: ``supervisor.daemon.Supervisor``
implements it, and a test can hand the API anything else that does.
"""

from __future__ import annotations

from typing import Any, Protocol

from supervisor.model import FailoverRecord, Pause, RolloutProgress


class Described(Protocol):
    """A record the API answers with as JSON (a scheduled switchover, for one)."""

    def as_dict(self) -> dict[str, Any]: ...


class AdminTarget(Protocol):
    """One node as the admin API sees it.

    Names given to the actions (slots, engines) were checked with ``has_slot`` and
    ``has_engine`` first; an action the node refuses raises ``FailoverError``.
    """

    # The bearer token a POST must carry (None: none needed); read again on reload.
    admin_token: str | None

    @property
    def node_name(self) -> str:
        """The node's name, as ``/status`` gives it."""
        ...

    def has_slot(self, slot: str) -> bool: ...

    def has_engine(self, engine_id: str) -> bool: ...

    def status(self, full_cluster: bool = False) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of the node's metrics."""
        ...

    async def fail_engine(self, engine_id: str, reason: str) -> None:
        """Declare an engine dead now, as if it had failed."""
        ...

    async def switchover(self, slot: str, to: str | None) -> FailoverRecord:
        """A planned move to a shadow (``to``, or the best one), streams and all."""
        ...

    def schedule_switchover(self, slot: str, at: float, to: str | None) -> Described: ...

    def cancel_switchover(self, slot: str) -> Described | None:
        """The scheduled switchover cancelled (None: there was none)."""
        ...

    def pause(self, slot: str | None, reason: str, until: float | None) -> Pause:
        """Maintenance mode for a slot or (``slot`` None) the whole node."""
        ...

    def resume(self, slot: str | None) -> bool:
        """End a pause; whether there was one."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Read the config file again: what changed, or (``ok`` false) its problems."""
        ...

    async def rollout(self, slots: list[str], wait: bool) -> list[RolloutProgress]:
        """Roll ``slots`` (none: all a reload marked) one at a time: the first's record as
        it starts, or (``wait``) every one's once all are done."""
        ...

    def clear_gpu(self, gpu: str) -> int | None:
        """A broken GPU was reset or replaced: how many shadows launch again (None: it
        was not marked broken)."""
        ...

    async def drain(self, engine_id: str, limit: float | None) -> None:
        """Stop an engine gracefully, its streams finishing within ``limit`` seconds."""
        ...
