"""⓪ Accept, for the connections front.py hands over: aiohttp's server.

The one module that touches aiohttp's private parts (``_connections``,
``_messages``, ``_ErrInfo``, ``_current_request``, a sent response's
``_eof_sent``, a site's ``_server``): an aiohttp upgrade breaks this file
and no other.

Connections start in ``front.FrontConnection``; those that send anything but
a plain request are handed to a ``GuardedRequestHandler`` made here.

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
import socket
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.config.model import ServerConfig
from gateway.core import RequestHead
from gateway.errors import MalformedBodyError
from gateway.front import FrontConnection, PlainHandler

__all__ = ["AiohttpDownstream", "GuardedServer", "ProxySite", "bound_port", "sent_response"]

log = logging.getLogger("gateway.connection")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler with a deadline on the first request's head and
    short JSON answers to malformed requests."""

    # Set by GuardedServer on each handler it makes: when (loop time) the
    # first request's head must be complete.
    header_deadline_at: float = 0.0
    on_rejected: Callable[[str], None] = staticmethod(lambda reason: None)
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_deadline = self._loop.call_at(
            self.header_deadline_at, self._header_timeout_passed
        )

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if self._header_deadline is not None and self._request_count > 0:
            self._header_deadline.cancel()
            self._header_deadline = None
        if len(self._messages) > queued:
            self._fail_body_on_parse_error(self._messages[-1][0])

    def _fail_body_on_parse_error(self, message: object) -> None:
        """llhttp rejecting a body mid-stream (a bad chunk) makes aiohttp
        queue a 400 for after the current handler, but the handler's body
        stream is never told: it would wait for ``body_timeout``. Tell it."""
        request = self._current_request
        if not isinstance(message, _ErrInfo) or request is None:
            return
        content = request.content
        if not content.is_eof():
            content.set_exception(MalformedBodyError(message.message))

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
    """``web.Server`` whose connections start as a ``FrontConnection`` (plain
    requests) and become a ``GuardedRequestHandler`` (everything else). Both
    are in ``_connections``, so aiohttp's drain (``pre_shutdown``,
    ``shutdown``) closes and waits for either."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        handle_plain: PlainHandler,
        limits: ServerConfig,
        on_rejected: Callable[[str], None],
        request_head: type[RequestHead] = RequestHead,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._handle_plain = handle_plain
        self._limits = limits
        self._on_rejected = on_rejected
        self._request_head = request_head

    def __call__(self) -> RequestHandler:
        # aiohttp's sites take the server as the protocol factory.
        front = FrontConnection(
            self, self._handle_plain, self._limits, self._on_rejected, self._request_head
        )
        return cast(RequestHandler, front)

    def make_handler(self, header_deadline_at: float) -> GuardedRequestHandler:
        """The handler a connection is handed to; its first head is due by
        ``header_deadline_at`` (loop time)."""
        handler = GuardedRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_deadline_at = header_deadline_at
        handler.on_rejected = self._on_rejected
        return handler

    def forget(self, conn: asyncio.BaseProtocol) -> None:
        """``conn`` no longer needs a drain to wait for it."""
        self._connections.pop(conn, None)  # type: ignore[call-overload]


class ProxySite(web.BaseSite):
    """aiohttp's TCPSite or SockSite in one (``address``: a host and port,
    or a socket bound already, as a worker inherits it), with TLS handshakes
    bounded by ``handshake_timeout`` (nginx bounds them by
    client_header_timeout; asyncio's default is 60 s)."""

    __slots__ = ("_address", "_handshake_timeout")

    def __init__(
        self,
        runner: web.BaseRunner,
        address: tuple[str, int] | socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        backlog: int,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._address = address
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        address = self._address
        host, port = (
            address.getsockname()[:2] if isinstance(address, socket.socket) else address
        )
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._handshake_timeout}
        address = self._address
        if isinstance(address, socket.socket):
            self._server = await loop.create_server(
                server, sock=address, backlog=self._backlog, **tls
            )
        else:
            host, port = address
            self._server = await loop.create_server(
                server, host, port, backlog=self._backlog, **tls
            )


class _SentResponse(web.StreamResponse):
    """A response already on the wire: aiohttp's prepare/write_eof are no-ops
    (``_eof_sent``), and ``keep_alive`` decides whether the connection is
    reused."""

    def __init__(self, status: int, body_length: int, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._eof_sent = True
        self._keep_alive = keep_alive
        self._body_length = body_length


class AiohttpDownstream:
    """A ``relay.Downstream`` over a connection aiohttp's server holds: the
    relay writes response bytes to its transport, as front.py's connections
    take them (``sent_response`` then tells aiohttp's request loop)."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request

    def write(self, data: bytes) -> None:
        """Raises ConnectionResetError once the client is gone."""
        request = self._request
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        await self._request.writer.drain()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


def sent_response(status: int, body_length: int, keep_alive: bool) -> web.StreamResponse:
    """What a handler returns to aiohttp's request loop for an answer it
    already wrote to the transport."""
    return _SentResponse(status, body_length, keep_alive)


def bound_port(site: web.BaseSite) -> int:
    """The port a site listens on (0 in the config: chosen by the kernel)."""
    sockets: list[socket.socket] = getattr(site._server, "sockets", [])
    return int(sockets[0].getsockname()[1]) if sockets else 0
