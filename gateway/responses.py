"""⑤ The answers the gateway makes itself. Short JSON, never a traceback.

Each is an ``Answer`` (status, headers, body) that either listener writes:
the plain path serialises it with ``raw_response.whole_response``, the aiohttp
path turns it into a ``web.Response`` (``to_aiohttp``).
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Final

from aiohttp import web

from gateway.errors import UpstreamError
from gateway.headers import rate_limit_headers
from gateway.limiting.limiter import Decision

__all__ = ["Answer", "error_answer", "rate_limited", "to_aiohttp", "upstream_failed"]

_JSON: Final = "application/json; charset=utf-8"


# Reason phrases looked up once: HTTPStatus(code) is an enum call per answer.
_PHRASES: Final = {status.value: status.phrase for status in HTTPStatus}


class Answer:
    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.reason = _PHRASES[status]
        self.headers = headers
        self.body = body


def rate_limited(decision: Decision) -> Answer:
    """429 with Retry-After: whole seconds until the next refill, at least 1."""
    retry_after = max(1, math.ceil(decision.retry_after_seconds))
    body = b'{"error": "rate_limited", "retry_after": %d}' % retry_after
    headers = [
        ("Content-Type", _JSON),
        ("Retry-After", str(retry_after)),
        *rate_limit_headers(decision),
    ]
    return Answer(429, headers, body)


_UPSTREAM_MESSAGES = {
    "connect": "upstream_unreachable",
    "timeout": "upstream_timeout",
    "reset": "upstream_reset",
}


def upstream_failed(error: UpstreamError) -> Answer:
    """502 (refused, reset) or 504 (silent past read_timeout)."""
    return error_answer(error.status, _UPSTREAM_MESSAGES[error.kind], str(error) or error.kind)


def error_answer(status: int, error: str, detail: str) -> Answer:
    body = json.dumps({"error": error, "detail": detail}).encode()
    return Answer(status, [("Content-Type", _JSON)], body)


def to_aiohttp(answer: Answer) -> web.Response:
    response = web.Response(status=answer.status, body=answer.body)
    for name, value in answer.headers:
        response.headers.add(name, value)
    return response
