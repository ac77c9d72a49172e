"""⑤ Small responses written in one piece, bypassing aiohttp's response objects.

Profiling the denied path put most of its time in aiohttp's StreamResponse
machinery (header multidict, Date, serialisation, writer) for a 50-byte
answer. For complete small responses, the 429s and the lean upstream path's
whole answers, the head and body are serialised here and handed to the
transport in one write. The returned response object tells aiohttp's
request loop that the answer is sent and whether the connection stays open.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import Final

from aiohttp import HttpVersion11, web

__all__ = ["NO_BODY_STATUSES", "response_head", "whole_response", "write_whole_response"]

NO_BODY_STATUSES: Final = frozenset({204, 304})


class _DateHeader:
    """The Date value, formatted once per second."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = formatdate(second, usegmt=True)
        return cls.value


class _SentResponse(web.StreamResponse):
    """A response already on the wire: aiohttp's prepare/write_eof are no-ops
    (``_eof_sent``), and ``keep_alive`` decides whether the connection is
    reused."""

    def __init__(self, status: int, reason: str, body_length: int, keep_alive: bool) -> None:
        super().__init__(status=status, reason=reason)
        self._eof_sent = True
        self._keep_alive = keep_alive
        self._body_length = body_length


def write_whole_response(
    request: web.BaseRequest,
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> web.StreamResponse:
    """Write ``whole_response`` for an aiohttp request, and tell aiohttp's
    request loop it is sent."""
    keep_alive = request.keep_alive
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    head_only = request.method == "HEAD"
    transport.write(
        whole_response(
            status, reason, headers, body,
            keep_alive=keep_alive, http10=request.version < HttpVersion11, head_only=head_only,
        )
    )  # fmt: skip
    sent = 0 if head_only or status in NO_BODY_STATUSES else len(body)
    return _SentResponse(status, reason, sent, keep_alive)


def whole_response(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
) -> bytes:
    """Status line, ``headers`` and ``body`` as the bytes to write, with
    Content-Length (none for 1xx/204/304)."""
    no_body = status in NO_BODY_STATUSES or 100 <= status < 200
    head = response_head(
        status, reason, headers,
        content_length=None if no_body else len(body), chunked=False,
        keep_alive=keep_alive, http10=http10,
    )  # fmt: skip
    if no_body or head_only or not body:
        return head
    return head + body


def response_head(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    *,
    content_length: int | None,
    chunked: bool,
    keep_alive: bool,
    http10: bool,
) -> bytes:
    """A response head: ``headers`` (which must carry no framing headers:
    Content-Length, Transfer-Encoding, Connection), Date when missing, the
    framing asked for, and Connection as the request needs."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    has_date = False
    for name, value in headers:
        if not has_date and name.lower() == "date":
            has_date = True
        lines.append(f"{name}: {value}")
    if not has_date:
        lines.append(f"Date: {_DateHeader.now()}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
