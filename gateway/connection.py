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
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final, cast

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.config.model import ServerConfig
from gateway.core import RequestHead
from gateway.errors import ChunkExtensionError, MalformedBodyError
from gateway.front import FrontConnection, PlainHandler

__all__ = [
    "AiohttpDownstream",
    "CappedSite",
    "GuardedServer",
    "bound_port",
    "connection_cap",
    "listen_socket",
    "sent_response",
]

log = logging.getLogger("gateway.connection")

# Framing bytes (chunk-size lines with their extensions, CRLFs, trailers) a
# chunked body may send without a body byte: Node's cap on chunk extensions.
MAX_CHUNK_EXTENSION_BYTES: Final = 16 * 1024


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler with a deadline on the first request's head and
    short JSON answers to malformed requests."""

    # Set by GuardedServer on each handler it makes: when (loop time) the
    # first request's head must be complete.
    header_deadline_at: float = 0.0
    send_timeout: float = 60.0  # server.send_timeout, set by GuardedServer
    on_rejected: Callable[[str], None] = staticmethod(lambda reason: None)
    _header_deadline: asyncio.TimerHandle | None = None
    # The chunked body being received, and its framing bytes since its last
    # body byte.
    _chunked_body: StreamReader | None = None
    _framing_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_deadline = self._loop.call_at(
            self.header_deadline_at, self._header_timeout_passed
        )

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        body = self._chunked_body
        before = body.total_bytes if body is not None else 0
        super().data_received(data)
        if self._header_deadline is not None and self._request_count > 0:
            self._header_deadline.cancel()
            self._header_deadline = None
        if len(self._messages) > queued:
            message, payload = self._messages[-1]
            self._fail_body_on_parse_error(message)
            # A new head in this data: its bytes are not a body's framing.
            chunked = getattr(message, "chunked", False) and not payload.is_eof()
            self._chunked_body = payload if chunked else None
            self._framing_bytes = 0
        elif body is not None:
            self._bound_chunk_framing(body, len(data), body.total_bytes - before)

    def _bound_chunk_framing(self, body: StreamReader, received: int, body_bytes: int) -> None:
        if body.is_eof():
            self._chunked_body = None
            return
        if self._reading_paused:
            # The body's reader is full: llhttp keeps the unparsed rest (body
            # bytes too) to itself until it is read, so this data cannot be
            # told apart. Nothing to bound then: more body is waiting.
            self._framing_bytes = 0
            return
        # Bytes that were not body: chunk-size lines, extensions, CRLFs.
        if body_bytes:
            self._framing_bytes = received - body_bytes
        else:
            self._framing_bytes += received
        if self._framing_bytes > MAX_CHUNK_EXTENSION_BYTES:
            self._chunked_body = None
            body.set_exception(
                ChunkExtensionError(
                    f"chunk extensions are limited to {MAX_CHUNK_EXTENSION_BYTES} bytes"
                )
            )
            if self.transport is not None:
                self.transport.pause_reading()  # nothing more of it is wanted

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
        manager = self._manager
        super().connection_lost(exc)
        if isinstance(manager, GuardedServer):
            manager.connection_closed()

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
        # Client connections open now (accepted by CappedSite, until closed
        # on either side of a hand-over), and who waits for one to close.
        self.open_connections = 0
        self._room: asyncio.Future[None] | None = None

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        """A client socket closed (told by a FrontConnection, or by the
        handler it was handed to: each connection ends in one of them)."""
        self.open_connections -= 1
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def wait_for_room(self, cap: int) -> None:
        """Until fewer than ``cap`` connections are open."""
        while self.open_connections >= cap:
            self._room = self._loop.create_future()
            try:
                await self._room
            finally:
                self._room = None

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
        handler.send_timeout = self._limits.send_timeout_seconds
        handler.on_rejected = self._on_rejected
        return handler

    def forget(self, conn: asyncio.BaseProtocol) -> None:
        """``conn`` no longer needs a drain to wait for it."""
        self._connections.pop(conn, None)  # type: ignore[call-overload]


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
        """Wait while the client reads slower than we write; cut it when it
        takes nothing for ``server.send_timeout``."""
        request = self._request
        protocol = request.protocol
        if not protocol.writing_paused:
            return
        # Every handler of the proxy listener is one GuardedServer made.
        assert isinstance(protocol, GuardedRequestHandler)
        timeout = protocol.send_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.writer.drain()
        except TimeoutError:
            protocol.on_rejected("send_timeout")
            self.abort()
            raise ConnectionResetError(f"the client took no bytes for {timeout:g}s") from None

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
    if isinstance(site, CappedSite):
        return int(site.sock.getsockname()[1])
    sockets: list[socket.socket] = getattr(site._server, "sockets", [])
    return int(sockets[0].getsockname()[1]) if sockets else 0


def listen_socket(host: str, port: int) -> socket.socket:
    """The proxy listener's socket (SO_REUSEADDR, a backlog of 1024:
    connections past ``server.max_connections`` wait there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


def connection_cap(configured: int) -> int:
    """Raise the soft descriptor limit to the hard one, as nginx's
    ``worker_rlimit_nofile`` would, and return the connection cap:
    ``configured``, or half the limit when 0 (each client connection may
    hold an upstream one too). Warns when the limit cannot honour it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    elif hard == resource.RLIM_INFINITY and soft != hard:
        soft = max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if not configured:
        return max(1, soft // 2)
    if configured > soft // 2:
        log.warning(
            "server.max_connections %d cannot be honoured: the open-file limit is %d, and"
            " each client connection may need an upstream one too (keep it below %d)",
            configured, soft, soft // 2,
        )  # fmt: skip
    return configured


# Accept errors that mean "out of a resource now", not a broken listener:
# wait and accept again, as asyncio's own accept loop does.
_ACCEPT_RETRY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
)
_ACCEPT_RETRY_SECONDS: Final = 0.1
_CAP_LOG_EVERY_SECONDS: Final = 60.0


def _accept_loop_ended(task: asyncio.Task[None]) -> None:
    # Cancelled at stop; any other end means the listener stopped accepting.
    if not task.cancelled() and task.exception() is not None:
        log.error("the proxy listener stopped accepting", exc_info=task.exception())


class CappedSite(web.BaseSite):
    """The proxy listener: an accept loop that stops accepting while
    ``max_connections`` client connections are open (new clients wait in
    the listen backlog, as with Envoy's connection limit) instead of
    accepting more than it can serve. ``on_capped`` is called each time the
    cap stops it. With ``ssl_context``, each connection's TLS handshake runs
    in a task of its own, bounded by ``handshake_timeout`` (nginx bounds it
    by client_header_timeout; asyncio's default is 60 s), so a slow
    handshake never holds up the next accept."""

    __slots__ = ("_accepting", "_cap", "_handshake_timeout", "_handshakes", "_on_capped",
                 "_owns", "_warned_at", "sock")  # fmt: skip

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        max_connections: int,
        owns_socket: bool,
        on_capped: Callable[[], None] = lambda: None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._handshake_timeout = handshake_timeout
        self._handshakes: set[asyncio.Task[None]] = set()
        self.sock = sock
        self._cap = max_connections
        self._owns = owns_socket
        self._on_capped = on_capped
        self._accepting: asyncio.Task[None] | None = None
        self._warned_at = -_CAP_LOG_EVERY_SECONDS

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, GuardedServer)
        self.sock.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept(server))
        self._accepting.add_done_callback(_accept_loop_ended)

    async def _accept(self, server: GuardedServer) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock
        cap = self._cap
        while True:
            if server.open_connections >= cap:
                self._on_capped()
                now = time.monotonic()
                if now - self._warned_at >= _CAP_LOG_EVERY_SECONDS:
                    self._warned_at = now
                    log.warning(
                        "server.max_connections (%d) reached: new connections wait in the"
                        " listen backlog until one closes",
                        cap,
                    )
                await server.wait_for_room(cap)
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("accept failed: %s; retrying", os.strerror(exc.errno or 0))
                await asyncio.sleep(_ACCEPT_RETRY_SECONDS)  # until a descriptor frees up
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.connection_opened()
            if self._ssl_context is None:
                await self._connect(server, conn)
            else:
                handshake = loop.create_task(self._connect(server, conn))
                self._handshakes.add(handshake)
                handshake.add_done_callback(self._handshakes.discard)

    async def _connect(self, server: GuardedServer, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._ssl_context is None:
                await loop.connect_accepted_socket(server, conn)
            else:
                await loop.connect_accepted_socket(
                    server, conn, ssl=self._ssl_context,
                    ssl_handshake_timeout=self._handshake_timeout,
                )  # fmt: skip
        except (OSError, TimeoutError):
            # Gone before it was set up, or its handshake failed (counted by
            # gateway/tls.py): no protocol will say it closed.
            server.connection_closed()
            conn.close()

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for handshake in list(self._handshakes):
            handshake.cancel()
        if self._owns:
            self.sock.close()
        await super().stop()
