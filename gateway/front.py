"""⓪ Accept: each client connection starts here, on llhttp.

aiohttp's server costs about 25 µs of Python per request (a request object,
a header multidict proxy, a response object, a writer) before our handler
runs; a bare uvloop + httptools proxy moves 2.5x the requests on the same
machine (docs/performance.md). So the common request is parsed here and
served without those objects: a *plain* request is GET or OPTIONS with an
origin-form target, no body, no upgrade and no Expect, inside the header
limits. That is what a rate-limited API sees most, and what a flood is made
of.

The first request that is anything else (a body, HEAD, a WebSocket upgrade,
an absolute-form target, bytes llhttp rejects, a head past the limits) hands
the connection to aiohttp's RequestHandler for the rest of its life, with
every byte not yet served: its parser, limits, 400/431 answers, body
streaming and 100-continue apply unchanged. A connection is handed over only
between requests, so responses keep their order.

The connection also keeps the guards aiohttp would: the first request's head
must be complete within ``server.header_timeout`` (slowloris), an idle
keep-alive connection is closed after ``server.keepalive_timeout``,
pipelined bytes are buffered up to a bound while a request is served, and a
drain closes idle connections and waits for busy ones.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, cast

import httptools
from multidict import CIMultiDict

from gateway.config.model import ServerConfig
from gateway.core import RequestHead
from gateway.upstream_pool import PLAIN_METHODS

__all__ = ["PENDING", "Acceptor", "FrontConnection", "InFlight", "PlainHandler", "PlainOutcome"]

log = logging.getLogger("gateway.connection")

# Plain requests go upstream through the plain pool: the methods it sends.
_PLAIN_METHODS: Final = frozenset(method.encode() for method in PLAIN_METHODS)
_LONE_CR: Final = re.compile(rb"\r[^\n]")
# Bytes read ahead (pipelined requests) while a request is served, before
# the socket stops being read.
PIPELINE_BUFFER_BYTES: Final = 64 * 1024
_BARE_LINE_BODY: Final = (
    b'{"error": "bad_request", "detail": "a request line needs an HTTP version"}'
)
_BARE_LINE_ANSWER: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (len(_BARE_LINE_BODY), _BARE_LINE_BODY)
)


class Acceptor(Protocol):
    """The server a connection belongs to (connection.GuardedServer)."""

    def connection_made(self, conn: Any, transport: asyncio.Transport) -> None:
        """Count ``conn`` among the connections a drain closes and waits for."""
        ...

    def forget(self, conn: Any) -> None:
        """``conn`` no longer needs a drain to wait for it."""
        ...

    def connection_closed(self) -> None:
        """A client socket closed: one fewer open connection."""
        ...

    def make_handler(self, header_deadline_at: float) -> asyncio.Protocol:
        """aiohttp's handler, to hand the connection to."""
        ...


class InFlight(Protocol):
    """A plain request being answered, as the handler tracks it."""

    def cancel(self) -> None:
        """Stop it: release what it holds and record it; idempotent."""
        ...


class _Pending:
    """The handler will call ``FrontConnection.finish`` itself."""


PENDING: Final = _Pending()
# Serving one plain request: True/False when it was answered at once (may the
# connection stay open?), the coroutine that answers it, or PENDING.
PlainOutcome = bool | Coroutine[Any, Any, bool] | _Pending
PlainHandler = Callable[["FrontConnection", RequestHead], PlainOutcome]


class FrontConnection(asyncio.Protocol):
    """One client connection while it sends plain requests; also the
    ``relay.Downstream`` their answers are written to."""

    def __init__(
        self,
        server: Acceptor,
        handle: PlainHandler,
        limits: ServerConfig,
        on_rejected: Callable[[str], None],
        request_head: type[RequestHead] = RequestHead,
    ) -> None:
        self._server = server
        self._handle = handle
        self._limits = limits
        self._on_rejected = on_rejected
        self._request_head = request_head  # core.TlsRequestHead on a TLS listener
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self._parser = httptools.HttpRequestParser(self)
        self._buffer: bytes | bytearray = b""
        self._scanned = 0  # bytes of an incomplete head already searched
        self._line_checked = False  # its request line looked at (_bare_request_line)
        self._busy = False
        self._lost = False
        self._closing = False
        self._requests = 0
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._request: RequestHead  # the one being served while _busy
        self._in_flight: InFlight | None = None
        self._served: asyncio.Future[None] | None = None
        # One timer: the first head's deadline, then the keep-alive idle
        # deadline; re-armed lazily instead of per request.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Bounds a head must keep to be served here (aiohttp checks the exact ones).
        self._max_url = limits.max_line_size - len(b"OPTIONS  HTTP/1.1")
        self._max_field = limits.max_field_size
        self._max_head = limits.max_line_size + limits.max_field_size * 4
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._complete = False
        self._unsuitable = False
        self._keep_alive = False
        self._http10 = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
        self._server.connection_made(self, self.transport)
        self._arm(self._loop.time() + self._limits.header_timeout_seconds)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer:
            self._buffer = data
        else:
            # A head in pieces, or requests read ahead: grow in place rather
            # than copy the whole buffer per read (a trickled head).
            if isinstance(buffer, bytes):
                self._buffer = buffer = bytearray(buffer)
            buffer += data
        if self._busy or self._write_paused:
            self._update_reading()
        else:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._busy:
            # A request still being answered keeps us in the server's
            # connections, so a drain waits for it (``finish`` pops us).
            self._server.forget(self)
        self._server.connection_closed()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()
        self._update_reading()
        if not self._busy:
            self._next()

    def _update_reading(self) -> None:
        """Stop reading while the client does not read our answers, or while
        more than PIPELINE_BUFFER_BYTES wait behind the request served."""
        pause = self._write_paused or (self._busy and len(self._buffer) > PIPELINE_BUFFER_BYTES)
        transport = self.transport
        if pause == self._read_paused or transport is None or transport.is_closing():
            return
        self._read_paused = pause
        if pause:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- httptools callbacks (one head at a time) --

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_url:
            self._unsuitable = True

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(name) + len(value) > self._max_field or len(headers) >= self._limits.max_headers:
            self._unsuitable = True
        # As aiohttp decodes them: the same client id and log line on either path.
        headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets its flags once the message is complete.
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        self._http10 = parser.get_http_version() == "1.0"

    def on_message_complete(self) -> None:
        self._complete = True

    # -- reading requests --

    def _next(self) -> None:
        """Serve the buffered requests until one needs to wait."""
        while self._buffer and not self._busy and not self._closing and not self._write_paused:
            request = self._parse()
            if request is None:
                return
            try:
                outcome = self._handle(self, request)
            except Exception:  # a bug of ours: this connection ends, the process serves on
                log.exception("error serving %s %s", request.method, request.target)
                self._cancel_in_flight()
                self.abort()
                return
            if outcome is True or outcome is False:
                self._in_flight = None
                self._answered(outcome and request.keep_alive)
                continue
            self._busy = True
            self._request = request
            if outcome is not PENDING:
                self.continue_with(cast(Coroutine[Any, Any, bool], outcome))

    def _parse(self) -> RequestHead | None:
        """The next plain request, or None: its head is incomplete, or it is
        not plain and the connection was handed to aiohttp."""
        buffer = self._buffer
        scan_from = self._scanned
        end = buffer.find(b"\r\n\r\n", scan_from)
        if end < 0:
            # Only the bytes not looked at before (less 3 for a terminator
            # split between reads): a trickled head costs O(n), not O(n^2).
            if (
                len(buffer) > self._max_head
                or buffer.find(b"\n\n", scan_from) >= 0
                or buffer.find(b"\n\r\n", scan_from)
                >= 0  # bare-LF line endings: aiohttp's rules
                or _LONE_CR.search(buffer, scan_from) is not None  # bare CR: aiohttp's 400
                or buffer.startswith(b"\r\n")
            ):
                self._hand_off()
            elif self._bare_request_line(buffer, scan_from):
                self._refuse_bare_request_line()
            else:
                self._scanned = max(0, len(buffer) - 3)
            return None
        self._scanned = 0
        self._line_checked = False
        if buffer.startswith(b"\r\n"):  # empty lines before the request line
            self._hand_off()
            return None
        head_length = end + 4
        self._url = b""
        self._headers = []
        self._complete = False
        self._unsuitable = False
        parser = self._parser
        try:
            parser.feed_data(buffer if head_length == len(buffer) else buffer[:head_length])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_off()
            return None
        method = parser.get_method()
        if (
            not self._complete
            or self._unsuitable
            or method not in _PLAIN_METHODS
            or not self._url.startswith(b"/")
            or self._url.find(b"#") >= 0  # a fragment: aiohttp's path drops it from routing
        ):
            self._hand_off()
            return None
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        hosts = len(headers.getall("Host", ()))
        if "Expect" in headers or hosts > 1 or (hosts == 0 and not self._http10):
            # 100-continue, and a repeated or (HTTP/1.1) missing Host, which
            # aiohttp answers with 400: its rules, on its path.
            self._hand_off()
            return None
        if head_length == len(buffer):
            self._buffer = b""
        elif isinstance(buffer, bytearray):
            del buffer[:head_length]  # O(1): bytearray moves its start
        else:
            self._buffer = bytearray(buffer)
            del self._buffer[:head_length]
        self._requests += 1
        return self._request_head(
            method.decode(),
            self._url.decode("utf-8", "surrogateescape"),
            headers,
            self.peer,
            self._http10,
            self._keep_alive,
        )

    def _bare_request_line(self, buffer: bytes | bytearray, scan_from: int) -> bool:
        """A complete request line without an HTTP version (HTTP/0.9's
        ``GET /``): no head follows it, and llhttp waits for one. Looked at
        once per head, when its first CRLF arrives."""
        if self._line_checked:
            return False
        line_end = buffer.find(b"\r\n", scan_from)
        if line_end < 0:
            return False
        self._line_checked = True
        return b" HTTP/" not in buffer[:line_end]

    def _refuse_bare_request_line(self) -> None:
        """400 at once, as nginx answers HTTP/0.9, rather than silence until
        header_timeout; counted as a bad request."""
        self._on_rejected("bad_request")
        self._closing = True
        self._buffer = b""
        transport = self.transport
        assert transport is not None
        transport.write(_BARE_LINE_ANSWER)
        transport.close()

    def track(self, in_flight: InFlight) -> None:
        """What a drain that runs out of time cancels (``InFlight.cancel``)."""
        self._in_flight = in_flight

    def continue_with(self, answering: Coroutine[Any, Any, bool]) -> None:
        """Finish the request being served in a task running ``answering``."""
        self._task = task = self._loop.create_task(self._serve(answering))
        # A task cancelled before its first step never runs ``answering``
        # (InFlight.cancel did its clean-up): close it, unawaited, quietly.
        task.add_done_callback(lambda _: answering.close())

    async def _serve(self, answering: Coroutine[Any, Any, bool]) -> None:
        reusable = False
        try:
            reusable = await answering
        except asyncio.CancelledError:
            self._task = None
            self.finish(False)
            raise
        except Exception:
            request = self._request
            log.exception("error serving %s %s", request.method, request.target)
            self._cancel_in_flight()
        self._task = None
        self.finish(reusable)

    def _cancel_in_flight(self) -> None:
        """Let the request being served release what it holds (idempotent)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()

    def finish(self, reusable: bool) -> None:
        """The request being served is answered; ``reusable``: the
        connection may carry the next one."""
        self._busy = False
        self._in_flight = None
        if self._lost:
            self._server.forget(self)
        served = self._served
        if served is not None and not served.done():
            served.set_result(None)
        self._answered(reusable and self._request.keep_alive)
        self._update_reading()  # read ahead again, unless the client is not reading
        self._next()

    def _answered(self, keep_alive: bool) -> None:
        """A response is written: close, or wait for the next request."""
        transport = self.transport
        assert transport is not None
        if not keep_alive or self._closing or transport.is_closing():
            self._closing = True
            transport.close()
        else:
            self._arm(self._loop.time() + self._limits.keepalive_timeout_seconds)

    def _hand_off(self) -> None:
        """Give the connection, and every byte not served, to aiohttp."""
        transport = self.transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.forget(self)
        # The head being read gets what is left of the first head's deadline,
        # or a fresh one after served requests.
        if self._requests:
            header_deadline = self._loop.time() + self._limits.header_timeout_seconds
        else:
            header_deadline = self._deadline
        handler = self._server.make_handler(header_deadline)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._write_paused:
            handler.pause_writing()
        data, self._buffer = self._buffer, b""
        if data:
            handler.data_received(bytes(data))

    # -- timers --

    def _arm(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._busy or self._closing:
            return  # re-armed when the request is answered
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._deadline_passed)
            return
        if self._requests == 0:
            self._on_rejected("header_timeout")
        self._closing = True
        assert self.transport is not None
        self.transport.close()

    # -- writing responses (used by the handler) --

    def write(self, data: bytes) -> None:
        """Raises ConnectionResetError once the client is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the client reads slower than we write; cut it when it
        takes nothing for ``server.send_timeout``."""
        while self._write_paused:
            if self.transport is None or self.transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            waiter = self._drain_waiter = self._loop.create_future()
            # A timer only while paused: a client that keeps up costs none.
            timer = self._loop.call_later(
                self._limits.send_timeout_seconds, self._send_timed_out, waiter
            )
            try:
                await waiter
            finally:
                timer.cancel()
                self._drain_waiter = None

    def _send_timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._on_rejected("send_timeout")
        waiter.set_exception(
            ConnectionResetError(
                f"the client took no bytes for {self._limits.send_timeout_seconds:g}s"
            )
        )
        self.abort()

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_closing(self) -> bool:
        """The client's connection is closed or closing (it left)."""
        transport = self.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        """Cut the connection: the response cannot be completed."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- drain (called by aiohttp's web.Server, like its own handlers) --

    def close(self) -> None:
        """Stop after the request being served; close now when idle."""
        self._closing = True
        if not self._busy and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp calls it so)
        """Wait up to ``timeout`` for the request being served, then cut it."""
        self._closing = True
        if self._busy:
            self._served = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._served
            except TimeoutError:
                # Out of time: the request's own clean-up (its upstream
                # connection, the client's in-flight slot, its log record)
                # runs now, whether it waits in a callback or in a task that
                # may not even have started.
                self._cancel_in_flight()
                if self._task is not None:
                    self._task.cancel()
        if self.transport is not None:
            if self._busy:
                self.transport.abort()
            else:
                self.transport.close()
