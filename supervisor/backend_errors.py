"""The errors of an engine call made through :class:`supervisor.backends.EngineEndpoint`.

Part of the plugin contract: a plugin (and the daemon, around its hooks) sees these
whichever HTTP client carried the call, the relay's lean one or an aiohttp session. They
are :class:`BackendError` s: an engine call that failed.
"""

from __future__ import annotations

from supervisor.stream_errors import BackendError


class EngineCallError(BackendError):
    """An engine call got no answer that could be read: the engine is down or broken."""


class EngineUnreachable(EngineCallError):
    """No connection to the engine, or the connection ended before the answer did."""


class EngineAnswerGarbled(EngineCallError):
    """The engine's answer is not HTTP that a client can read."""
