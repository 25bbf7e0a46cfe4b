"""What the slot controllers ask of coordination, and the embedded one-node answer.

A :class:`Coordinator` fences promotions (every promotion gets the slot's next epoch from it)
and says whether another node already serves a slot. :class:`LocalCoordinator` is the
default without ``[cluster]``: this node is the whole cluster, so every claim succeeds and
no slot is served elsewhere.
"""

from __future__ import annotations

from typing import Protocol


class ClaimRefused(Exception):
    """The claim cannot be decided now (etcd is unreachable and the policy forbids
    promoting without it): the slot waits, degraded, and is retried once etcd is back."""


class Coordinator(Protocol):
    """The interface :class:`supervisor.failover.SlotController` uses."""

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


class LocalCoordinator:
    """One node, no servers: claims always succeed."""

    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        return epoch + 1

    def served_elsewhere(self, slot: str) -> str | None:
        return None

    async def hand_over(self, slot: str, reason: str) -> None:
        return None
