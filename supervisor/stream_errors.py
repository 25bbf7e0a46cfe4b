"""The errors of reading an engine's answer, raised by plugins' decoders and the relay.

Part of the plugin contract (:mod:`supervisor.backends` exports them); kept in a module of
their own so that :mod:`supervisor.events`, compiled with the relay, can raise them
without importing the whole contract.
"""

from __future__ import annotations


class BackendError(RuntimeError):
    """An engine call failed; the message says which call and what the engine answered."""


class MalformedStream(BackendError):
    """The engine sent something that is not its stream format: a failure of that engine."""


class EngineReportedError(BackendError):
    """The engine ended one stream with an error of its own (an error event, an abort): that
    request failed there, which says nothing about the engine's health."""
