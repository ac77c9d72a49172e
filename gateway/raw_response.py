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

__all__ = ["write_whole_response"]

_NO_BODY_STATUSES: Final = frozenset({204, 304})


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
    """Write status line, ``headers`` (Content-Length and Date added when
    missing, Connection as the request needs) and ``body`` in one write.
    ``headers`` must not carry framing headers (Content-Length,
    Transfer-Encoding, Connection)."""
    keep_alive = request.keep_alive
    lines = [f"HTTP/1.1 {status} {reason}"]
    has_date = False
    for name, value in headers:
        if not has_date and name.lower() == "date":
            has_date = True
        lines.append(f"{name}: {value}")
    if not has_date:
        lines.append(f"Date: {_DateHeader.now()}")
    no_body = status in _NO_BODY_STATUSES or 100 <= status < 200
    if not no_body:
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    elif request.version < HttpVersion11:
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if no_body or request.method == "HEAD":
        body = b""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    transport.write(head + body if body else head)
    return _SentResponse(status, reason, len(body), keep_alive)
