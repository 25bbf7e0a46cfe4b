"""Bearer-token checks for the admin API and the frontend. Secrets are never logged."""

from __future__ import annotations

import hmac

from aiohttp import web


def bearer_ok(request: web.Request, secret: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <secret>`` (constant-time)."""
    got = request.headers.get("Authorization", "")
    return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip(), secret)
