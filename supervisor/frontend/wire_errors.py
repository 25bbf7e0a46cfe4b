"""What the relay's engine client (:mod:`supervisor.frontend.wire`) raises.

Kept apart from the client: ``EngineConnectionError`` subclasses the built-in
``ConnectionError``, which a class compiled by mypyc cannot (see :mod:`supervisor.native`),
and the client is compiled where a build is present.
"""

from __future__ import annotations


class EngineProtocolError(Exception):
    """The engine's answer is not HTTP/1.1 as a client can read it."""


class EngineConnectionError(ConnectionError):
    """The connection failed, or ended before the answer did."""
