"""⑤ The answers the gateway makes itself. Short JSON, never a traceback."""

from __future__ import annotations

import json
import math

from aiohttp import web

from gateway.errors import UpstreamError
from gateway.headers import rate_limit_headers
from gateway.limiting.limiter import Decision
from gateway.raw_response import write_whole_response

__all__ = ["error_response", "rate_limited", "upstream_failed"]


def rate_limited(
    request: web.BaseRequest, decision: Decision, request_id: str
) -> web.StreamResponse:
    """429 with Retry-After: whole seconds until the next refill, at least 1.
    Written in one piece: the denied path is the one a flood hits."""
    retry_after = max(1, math.ceil(decision.retry_after_seconds))
    body = b'{"error": "rate_limited", "retry_after": %d}' % retry_after
    headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Retry-After", str(retry_after)),
        *rate_limit_headers(decision),
        ("X-Request-ID", request_id),
    ]
    return write_whole_response(request, 429, "Too Many Requests", headers, body)


_UPSTREAM_MESSAGES = {
    "connect": "upstream_unreachable",
    "timeout": "upstream_timeout",
    "reset": "upstream_reset",
}


def upstream_failed(error: UpstreamError) -> web.Response:
    """502 (refused, reset) or 504 (silent past read_timeout)."""
    return error_response(
        error.status, _UPSTREAM_MESSAGES[error.kind], str(error) or error.kind
    )


def error_response(status: int, error: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": error, "detail": detail}),
        content_type="application/json",
    )
