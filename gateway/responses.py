"""⑤ The answers the gateway makes itself. Short JSON, never a traceback.

Each is an ``Answer`` (status, headers, body) that the core serialises with
``raw_response.whole_response`` (core.RequestCore.own_answer) for either
path. The 429 is the exception: bytes from one template.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Final

from gateway.errors import UpstreamError
from gateway.headers import decimal, rate_limit_fields
from gateway.limiting.limiter import Decision
from gateway.raw_response import connection_field, date_header

__all__ = ["JSON_CONTENT_TYPE", "Answer", "error_answer", "rate_limited", "upstream_failed"]

JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"


# Reason phrases looked up once: HTTPStatus(code) is an enum call per answer.
_PHRASES: Final = {status.value: status.phrase for status in HTTPStatus}


class Answer:
    """One of our answers: status, reason phrase, fields and a short body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.reason = _PHRASES[status]
        self.headers = headers
        self.body = body


# The 429's head and body around what changes per answer.
_DENIED_STATUS: Final = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Retry-After: "
)
_DENIED_BODY: Final = b'{"error": "rate_limited", "retry_after": '


def rate_limited(
    decision: Decision, request_id: str, *, keep_alive: bool, http10: bool, head_only: bool
) -> tuple[bytes, int]:
    """The whole 429, ready to write, and its body length as sent.
    Retry-After: whole seconds until the next refill, at least 1. Joined
    from fixed pieces rather than a header list serialised line by line:
    the denied path is the one a flood hits."""
    retry_after = decimal(max(1, math.ceil(decision.retry_after_seconds)))
    body = _DENIED_BODY + retry_after + b"}"
    head = b"".join((
        _DENIED_STATUS, retry_after, b"\r\n",
        rate_limit_fields(decision),
        b"X-Request-ID: ", request_id.encode("utf-8", "surrogateescape"),
        b"\r\nDate: ", date_header(),
        b"\r\nContent-Length: ", decimal(len(body)), b"\r\n",
        connection_field(keep_alive, http10),
        b"\r\n",
    ))  # fmt: skip
    if head_only:
        return head, 0
    return head + body, len(body)


_UPSTREAM_MESSAGES = {
    "connect": "upstream_unreachable",
    "timeout": "upstream_timeout",
    "reset": "upstream_reset",
    "invalid": "upstream_invalid",
    "busy": "upstream_busy",
}


def upstream_failed(error: UpstreamError) -> Answer:
    """502 (refused, reset) or 504 (silent past read_timeout)."""
    return error_answer(error.status, _UPSTREAM_MESSAGES[error.kind], str(error) or error.kind)


def error_answer(status: int, error: str, detail: str) -> Answer:
    """A JSON body naming the error and a detail."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    return Answer(status, [("Content-Type", JSON_CONTENT_TYPE)], body)
