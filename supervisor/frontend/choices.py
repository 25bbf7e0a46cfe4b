"""A request for several choices (``n`` > 1): one relay per choice, each its own request
upstream, joined into one answer for the client."""

from __future__ import annotations

from typing import Any

import anyio

from supervisor.frontend.routing import Target
from supervisor.frontend.streams import RequestRelay
from supervisor.requests import ClientRequest


def choice_request(req: ClientRequest, index: int) -> ClientRequest:
    """Choice ``index`` of a request with ``n`` > 1, as a request of one choice. A seed
    becomes seed + index, as vLLM seeds the choices of one request (its child requests):
    each choice then equals what the engine would have sampled for it."""
    body = dict(req.body)
    body.pop("n", None)
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and index:
        body["seed"] = seed + index
    return ClientRequest(req.kind, body)


async def run_all(relays: list[RequestRelay]) -> None:
    """Run every choice's relay; the first to fail ends the others, and its error is the
    request's."""
    try:
        async with anyio.create_task_group() as tg:
            for r in relays:
                tg.start_soon(r.run)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    cancelled = anyio.get_cancelled_exc_class()
    found: BaseException | None = None
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            e = first_error(e)
        if not isinstance(e, cancelled):
            return e
        found = found or e
    assert found is not None
    return found


def usage_of(relays: list[RequestRelay]) -> dict[str, int]:
    """Usage of a request with several choices: its prompt once, every choice's tokens."""
    prompt = next((r.prompt_tokens for r in relays if r.prompt_tokens is not None), 0)
    completion = sum([r.progress.completion_tokens for r in relays])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def failover_of(relays: list[RequestRelay]) -> dict[str, Any] | None:
    """The failover report of a request with several choices: every choice's moves."""
    reports = [r.failover_report() for r in relays]
    moved = [rep for rep in reports if rep]
    if not moved:
        return None
    inexact: list[str] = []
    for rep in moved:
        inexact += [f for f in rep["inexact"] if f not in inexact]
    out: dict[str, Any] = {"migrations": sum([rep["migrations"] for rep in moved])}
    out["inexact"] = inexact
    return out


def engines_of(relays: list[RequestRelay]) -> list[Target]:
    """The engines a request of several choices went to, each once, in order."""
    out: list[Target] = []
    for r in relays:
        out += [t for t in r.engines() if t not in out]
    return out


def chat_opening(relays: list[RequestRelay]) -> bytes:
    """A chat stream's first chunks: each choice's role, then each choice's echo, with usage
    where the client asked for it in every chunk (vLLM's order)."""
    prompt = next((r.prompt_tokens for r in relays if r.prompt_tokens is not None), 0)
    extras = relays[0].extras
    usage = None
    if extras is not None and extras.continuous:
        usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    out = [r.shape.role_chunk(usage) for r in relays]
    if extras is not None and extras.echo:
        out += [r.shape.echo_chunk(extras.echo, usage) for r in relays]
    return b"".join(out)
