"""⓪ Accept: connection-level guards in front of the proxy handler.

aiohttp's RequestHandler already closes a keep-alive connection whose next
request's headers are not complete within ``keepalive_timeout`` (its timer is
not reset by partial data). What it lacks is the same bound on a *new*
connection's first request, the slowloris shape: a client that opens a
connection and trickles header bytes forever. ``GuardedRequestHandler`` adds
that deadline (``server.header_timeout``, like nginx's client_header_timeout),
and answers malformed requests with a short JSON body and one log line
instead of aiohttp's traceback per bad client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

__all__ = ["GuardedServer"]

log = logging.getLogger("gateway.connection")


class GuardedRequestHandler(RequestHandler):
    # Set by GuardedServer on each handler it makes.
    header_timeout_seconds: float = 60.0
    on_rejected: Callable[[str], None] = staticmethod(lambda reason: None)
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_deadline = self._loop.call_later(
            self.header_timeout_seconds, self._header_timeout_passed
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_deadline is not None and self._request_count > 0:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _header_timeout_passed(self) -> None:
        self._header_deadline = None
        if self._request_count == 0:
            self.on_rejected("header_timeout")
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            # A bug of ours, not a bad client: keep aiohttp's traceback log.
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        reason = "bad_request"
        if isinstance(exc, LineTooLong) or (message and "Too many headers" in message):
            status, reason = 431, "headers_too_large"
        self.on_rejected(reason)
        log.debug("rejected request from %s: %s", request.remote, message or exc)
        detail = str(getattr(exc, "message", None) or message or HTTPStatus(status).phrase)
        response = web.Response(
            status=status,
            text=json.dumps({"error": reason, "detail": detail[:200]}),
            content_type="application/json",
        )
        response.force_close()
        return response


class GuardedServer(web.Server):
    """``web.Server`` whose connections get a ``GuardedRequestHandler``."""

    def __init__(
        self,
        *args: Any,
        header_timeout_seconds: float,
        on_rejected: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_seconds = header_timeout_seconds
        self._on_rejected = on_rejected

    def __call__(self) -> RequestHandler:
        handler = GuardedRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_seconds = self._header_timeout_seconds
        handler.on_rejected = self._on_rejected
        return handler
