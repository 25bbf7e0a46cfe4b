"""What the slot controllers ask of coordination, and the embedded one-node answer.

A :class:`Coordinator` fences promotions (every promotion gets the slot's next epoch from it)
and says whether another node already serves a slot. :class:`LocalCoordinator` is the
default without ``[cluster]``: this node is the whole cluster, so every claim succeeds and
no slot is served elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from supervisor.model import Engine


class ClaimRefused(Exception):
    """The claim cannot be decided now (etcd is unreachable and the policy forbids
    promoting without it): the slot waits, degraded, and is retried once etcd is back."""


class Coordinator(Protocol):
    """The interface :class:`supervisor.slot.controller.SlotController` uses."""

    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        """Make ``unit`` (an engine id, or a group id) the slot's active one at the epoch
        after ``epoch``; returns that epoch, or None when fenced (the slot has moved on).
        :class:`ClaimRefused` when it cannot be decided now."""
        ...

    def served_elsewhere(self, slot: str) -> str | None:
        """The unit another node serves ``slot`` with, if one does."""
        ...

    async def hand_over(self, slot: str, reason: str) -> None:
        """This node has no shadow left for ``slot``: let another node's shadow take it."""
        ...


class SlotHandle(Protocol):
    """What coordination reads of one slot of this node, and the only ways it acts on it.

    Coordination never assigns a slot's fields: it reads these and sends the slot one of
    the three orders below (or tells it etcd is back); the slot decides and logs why."""

    @property
    def model(self) -> str:
        """The model name the slot serves (its engines' records carry it)."""
        ...

    @property
    def epoch(self) -> int:
        """The epoch at which this node last promoted or confirmed the slot's active."""
        ...

    @property
    def engines(self) -> Mapping[str, Engine]:
        """The slot's engines on this node, by id (stopped ones included)."""
        ...

    @property
    def group_rank(self) -> int:
        """This node's rank in the slot's group (0 without a group)."""
        ...

    @property
    def group_size(self) -> int:
        """Nodes in the slot's group (1: no group)."""
        ...

    @property
    def serves_requests(self) -> bool:
        """Whether the frontend routes to this node's engine of the slot."""
        ...

    def active_engine(self) -> Engine | None:
        """The engine serving the slot on this node, if one does."""
        ...

    def confirm_epoch(self, epoch: int) -> None:
        """The cluster recorded the slot's active (ours) at ``epoch``: adopt it."""
        ...

    async def step_down(self, epoch: int, by: str) -> None:
        """The cluster serves the slot with ``by`` at ``epoch``: stop ours."""
        ...

    async def promote_assigned(self, engine_id: str, epoch: int, reason: str) -> None:
        """The leader chose our shadow ``engine_id`` for the slot at ``epoch``: wake it."""
        ...

    def etcd_back(self) -> None:
        """etcd answers again: retry a promotion refused while it did not."""
        ...


class LocalCoordinator:
    """One node, no servers: claims always succeed."""

    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        return epoch + 1

    def served_elsewhere(self, slot: str) -> str | None:
        return None

    async def hand_over(self, slot: str, reason: str) -> None:
        return None
