"""Stop strings, matched by the supervisor over the whole answer.

Engines match stop strings themselves, but while they wait to see whether one completes they
hold text back (vLLM: up to the longest stop string less one character), streaming the
token ids without it. An engine that dies takes that text with it, and a stop string that
straddles a migration is seen by neither engine. So the relay sends no stop strings upstream
and matches them here, over everything received, holding back just as much as an engine
would; a match ends the answer (``finish_reason`` "stop") and the upstream request with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatch:
    """Where the client's text may go up to now, and whether a stop string ended it."""

    end: int  # characters of the answer the client may be sent so far
    stop: str | None = None  # the stop string that ended the answer, if one did


class StopStrings:
    """The client's ``stop`` strings over one answer (no strings: every call passes all)."""

    def __init__(self, stops: tuple[str, ...], *, include_in_output: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._searched = 0  # the answer's length at the last call

    def scan(self, text: str, *, final: bool) -> StopMatch:
        """``text`` is the whole answer so far (it only grows between calls)."""
        if not self.stops:
            return StopMatch(len(text))
        start = max(self._searched - self.hold, 0)
        self._searched = len(text)
        best: tuple[int, str] | None = None
        for s in self.stops:
            at = text.find(s, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            return StopMatch(at + len(s) if self.include else at, s)
        if final:
            return StopMatch(len(text))
        # A stop string may yet complete in what comes next: keep back what could begin one.
        return StopMatch(max(len(text) - self.hold, 0))


# Most requests have no stop strings, and then a StopStrings keeps no state: one serves all.
NO_STOPS = StopStrings(())
