"""Bearer-token checks for the admin API and the frontend. Secrets are never logged."""

from __future__ import annotations

import hmac

from aiohttp import web


def _raw(text: str) -> bytes:
    # Header values may carry any byte (aiohttp keeps undecodable ones as surrogates);
    # compare_digest on str refuses non-ASCII, so both sides are compared as bytes.
    return text.encode("utf-8", "surrogateescape")


def bearer_ok(request: web.Request, secret: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <secret>`` (constant-time; a
    malformed or non-ASCII header is simply not the secret)."""
    return bearer_matches(request.headers.get("Authorization", ""), secret)


def bearer_matches(got: str, secret: str) -> bool:
    """Whether an ``Authorization`` field's value is ``Bearer <secret>``."""
    if not got.startswith("Bearer "):
        return False
    try:
        return hmac.compare_digest(_raw(got[7:].strip()), _raw(secret))
    except (UnicodeError, TypeError):
        return False
