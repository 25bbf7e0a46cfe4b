"""The values of the metric labels that the relay and the frontend emit, as enums.

A label's value comes from one of these, never from an error's text: the set of series
stays the one that :class:`supervisor.metrics.Metrics` creates at 0 from the start. (The
metrics' names and help stay in :mod:`supervisor.metrics`.)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class MigrationResult(StrEnum):
    """How a request's move to another engine ended (``migrations_total``'s ``result``)."""

    RESUMED = "resumed"
    FAILED = "failed"


class MigrationMode(StrEnum):
    """How a move went on (``migrations_total``'s ``mode``): a backend's continuation mode
    (:attr:`supervisor.backends.Backend.continuation_mode`), or asked again from the start
    (nothing generated yet, or a whole answer), or no request could be built."""

    TOKEN_IDS = "token_ids"
    TEXT = "text"
    TOKEN_IDS_OR_TEXT = "token_ids_or_text"
    REROUTE = "reroute"
    NONE = "none"
    UNKNOWN = "unknown"  # a plugin that declares a mode of its own


# The modes a backend declares; the rest are the relay's own.
CONTINUATION_MODES: Final = (
    MigrationMode.TOKEN_IDS,
    MigrationMode.TEXT,
    MigrationMode.TOKEN_IDS_OR_TEXT,
)
# The label sets created at 0 (UNKNOWN appears only if a plugin needs it).
COUNTED_MODES: Final = (*CONTINUATION_MODES, MigrationMode.REROUTE, MigrationMode.NONE)


def migration_mode(declared: str) -> MigrationMode:
    """The label for a backend's declared continuation mode."""
    for mode in CONTINUATION_MODES:
        if mode.value == declared:
            return mode
    return MigrationMode.UNKNOWN


class PluginHook(StrEnum):
    """A backend hook that raised (``plugin_errors_total``'s ``hook``)."""

    HEALTH = "health"
    SLEEP = "sleep"
    WAKE = "wake"
    FIRST_REQUEST = "first_request"
    CONTINUATION = "continuation"
    ABORT = "abort"
    DECODER = "decoder"
    WHOLE_REQUEST = "whole_request"


# The hooks whose series every slot has at 0 from the start.
SLOT_HOOKS: Final = (
    PluginHook.HEALTH,
    PluginHook.SLEEP,
    PluginHook.WAKE,
    PluginHook.FIRST_REQUEST,
    PluginHook.CONTINUATION,
    PluginHook.ABORT,
    PluginHook.DECODER,
)


class RejectReason(StrEnum):
    """Why a request was refused with 503 (``frontend_rejections_total``'s ``reason``)."""

    DRAINING = "draining"
    QUEUE_FULL = "queue_full"
    SATURATED = "saturated"
    NO_ENGINE = "no_engine"


class CancelRoute(StrEnum):
    """The kind of request whose client went away (``cancellations_total``'s ``route``).
    Forwarded routes are counted under their own route label."""

    COMPLETION = "completion"
    CHAT = "chat"
