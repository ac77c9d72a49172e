"""⑤ The answers the gateway makes itself. Short JSON, never a traceback."""

from __future__ import annotations

import json
import math

from aiohttp import web

from gateway.errors import UpstreamError
from gateway.headers import rate_limit_headers
from gateway.limiting.limiter import Decision

__all__ = ["error_response", "rate_limited", "upstream_failed"]


def rate_limited(decision: Decision) -> web.Response:
    """429 with Retry-After: whole seconds until the next refill, at least 1."""
    retry_after = max(1, math.ceil(decision.retry_after_seconds))
    body = json.dumps({"error": "rate_limited", "retry_after": retry_after})
    response = web.Response(status=429, text=body, content_type="application/json")
    headers = response.headers
    headers["Retry-After"] = str(retry_after)
    for name, value in rate_limit_headers(decision):
        headers[name] = value
    return response


_UPSTREAM_MESSAGES = {
    "connect": "upstream_unreachable",
    "timeout": "upstream_timeout",
    "reset": "upstream_reset",
}


def upstream_failed(error: UpstreamError) -> web.Response:
    """502 (refused, reset) or 504 (silent past read_timeout)."""
    body = {"error": _UPSTREAM_MESSAGES[error.kind], "detail": str(error) or error.kind}
    return web.Response(
        status=error.status, text=json.dumps(body), content_type="application/json"
    )


def error_response(status: int, error: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": error, "detail": detail}),
        content_type="application/json",
    )
