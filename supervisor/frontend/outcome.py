"""How one attempt of a relayed request ended: set by the relay where it happens.

An attempt is one engine's stream (or whole answer) for a request. Its outcome is set by
the code that sees the event (the decoder's finish, the watchdog, the lease's cancel, a
failed read or write), and the relay acts on it in one place: return the answer, pass the
failure on, or move the request to another engine. The exceptions that carry an attempt's
end out of its read are here too.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Final


class Outcome(Enum):
    """How an attempt ended (RUNNING while it has not)."""

    RUNNING = "running"
    FINISHED = "finished"  # the answer is whole: a finish reason, a stop string, the budget
    CLIENT_GONE = "client_gone"  # a write to the client failed: it hung up
    CLIENT_TOO_SLOW = "client_too_slow"  # the client read nothing for client_write_timeout
    MOVED = "moved"  # a planned move took the request off a healthy engine
    ENGINE_DIED = "engine_died"  # the engine was declared dead under the stream
    STALLED = "stalled"  # no token (or first token) for the stall timeout
    DEADLINE = "deadline"  # a whole answer took longer than a stream of it could have
    CONNECT_FAILED = "connect_failed"  # the connection failed, or ended before the answer
    BAD_ENGINE_OUTPUT = "bad_engine_output"  # not HTTP, or not the engine's stream format
    ENGINE_ERROR = "engine_error"  # a 5xx (or 404, 408, 429): the request may go elsewhere
    ENGINE_REFUSED = "engine_refused"  # a 4xx: the client's mistake, passed on to it
    ENGINE_REPORTED_ERROR = "engine_reported_error"  # the engine failed this one request
    ENDED_EARLY = "ended_early"  # the stream ended cleanly but without a finish reason
    PLUGIN_FAILED = "plugin_failed"  # a backend hook raised: the request ends with an error


# The outcomes that show the engine itself broken, as health's judge names them (see
# EngineDirectory.report_failure): "stall" makes it suspect, "garbage" broken.
ENGINE_FAULTS: Final = {
    Outcome.STALLED: "stall",
    Outcome.DEADLINE: "stall",
    Outcome.BAD_ENGINE_OUTPUT: "garbage",
}


class UpstreamBroken(Exception):
    """The engine's stream ended badly (``outcome`` says how); the request may migrate."""

    def __init__(self, outcome: Outcome, reason: str, *, may_return: bool = False) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.may_return = may_return  # (MOVED) and that engine may take it again later

    @property
    def engine_fault(self) -> str:
        """What it shows of the engine, for health: "garbage", "stall", or "" (nothing)."""
        return ENGINE_FAULTS.get(self.outcome, "")

    @property
    def planned(self) -> bool:
        """Moved off a healthy engine on purpose: not a failure (nor held against the
        migration limit)."""
        return self.outcome is Outcome.MOVED


class UpstreamClientError(Exception):
    """The engine refused the request itself (4xx): the client's mistake, passed on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MigrationFailed(Exception):
    pass


class ClientGone(Exception):
    """The client hung up or stopped reading: the request ends here and is aborted
    upstream. Never a reason to migrate, never the engine's fault."""


def engine_status_error(
    status: int, reason: str, body: bytes
) -> UpstreamClientError | UpstreamBroken:
    """What an engine's answer with a status other than 200 means: the client's mistake
    (a 4xx but 404, 408 and 429), passed on to it, or a failure the request may move on
    from (ENGINE_ERROR), with the engine's message."""
    try:
        obj = json.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else {}
        message = err.get("message") if isinstance(err, dict) else None
    except ValueError:
        message = None
    message = message or body.decode("utf-8", "replace") or reason or "error"
    if 400 <= status < 500 and status not in (404, 408, 429):
        return UpstreamClientError(status, str(message))
    return UpstreamBroken(Outcome.ENGINE_ERROR, f"engine answered {status}: {str(message)[:200]}")
