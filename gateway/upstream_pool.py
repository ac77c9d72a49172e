"""④ A pooled HTTP/1.1 client for the common request: GET/OPTIONS, no body.

Profiling the proxy (README, "Speed") put 60 % of a proxied request's time in
aiohttp's ClientSession: request objects, header merging, timers, and a
StreamWriter per request. This client does only what a reverse proxy needs:
it writes the request head in one ``transport.write``, parses the answer with
llhttp (``httptools``), and hands the body over in chunks with back-pressure
(the upstream socket stops being read while the client is slower). Requests
with a body, HEAD (llhttp cannot be told a response to HEAD has no body) and
upgrades still go through aiohttp's client in ``upstream.py``.

Connections are kept alive in a LIFO pool bounded by ``max_connections``;
one idle past ``IDLE_SECONDS`` is closed rather than reused (the upstream may
be about to close it: the keep-alive race of aiohttp#9138). A request that
fails on a *reused* connection before any response byte is retried once on a
new one; the methods served here are idempotent. One pool per server: the
choice among servers, and sending a request on to another, is upstream.py's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from gateway.errors import (
    UpstreamBusyError,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from gateway.raw_response import unrelayable_head

__all__ = ["PLAIN_METHODS", "UpstreamConnection", "UpstreamPool"]

PLAIN_METHODS: Final = frozenset({"GET", "OPTIONS"})
IDLE_SECONDS: Final = 4.0
# Body bytes buffered from the upstream before its socket is paused.
HIGH_WATER_BYTES: Final = 256 * 1024


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, and the response being read on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's client parser, so both paths take the same
        # heads; what leniency lets through, unrelayable_head refuses.
        self._parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        # Bytes received while the head was incomplete: bounds a head that
        # never ends before llhttp has called back a field.
        self._head_received = 0
        self.closed = False
        self.idle_since = 0.0
        self.used = False
        # per response; header bytes as received (the plain path copies them
        # to the client without decoding)
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.raw_reason = b""
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self._interim = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._headers_done: asyncio.Future[None] | None = None
        self._on_head: Callable[[UpstreamConnection], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The read timeout: one timer, re-armed lazily when it fires early,
        # instead of a call_at and a cancel per response.
        self._reading = False
        self._last_data = 0.0
        self._read_timer: asyncio.TimerHandle | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]

    @property
    def reason(self) -> str:
        return self.raw_reason.decode("latin-1")

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamInvalidError(f"invalid HTTP from upstream: {exc}"))
        if not self.status and self.error is None:
            self._head_received += len(data)
            max_size = self._pool.max_header_size
            if self._head_received > max_size:
                self._fail(
                    UpstreamInvalidError(f"upstream sent a response head over {max_size} bytes")
                )
        if self._on_head is not None and self.status:
            self._head_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status and not self.complete and exc is None and self._close_delimited:
            # No Content-Length, not chunked: the body ends where the
            # connection does (RFC 9112 6.3, item 8).
            self.complete = True
            self._reading = False
            self._wake()
            return
        if not self.complete:
            reason = f": {exc}" if exc else ""
            error = UpstreamResetError if self.got_bytes else UpstreamClosedError
            self._fail(error(f"upstream closed the connection{reason}"))

    # -- httptools callbacks --

    def on_status(self, status: bytes) -> None:
        # llhttp hands the phrase over in pieces, as it arrives.
        self.raw_reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (103 Early Hints, a stray 100): not the
            # response; skip it, as aiohttp's client does.
            self._interim = True
            self.raw_headers = []
            self.raw_reason = b""
            return
        problem = unrelayable_head(self.raw_headers, self._pool.max_header_size)
        if problem is not None:
            self._fail(UpstreamInvalidError(problem))
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._paused and self.transport:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._reading = False
        self._wake()

    # -- used by the relay --

    def _head_arrived(self) -> None:
        """Tell a ``send`` caller: the head is here, or the exchange failed."""
        on_head = self._on_head
        self._on_head = None
        if on_head is not None:
            on_head(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        self._reading = False
        if self.transport is not None:
            self.transport.abort()
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)
        self._wake()
        self._head_arrived()

    def _check_read_timeout(self) -> None:
        self._read_timer = None
        if not self._reading:
            return
        timeout = self._pool.read_timeout
        if self._paused:
            # We stopped reading (the client is slower): not the upstream's
            # silence. The clock restarts when reading does.
            self._last_data = self._loop.time()
        deadline = self._last_data + timeout
        if self._loop.time() >= deadline:
            self._fail(UpstreamTimeoutError(f"no response from upstream within {timeout:g}s"))
        else:
            self._read_timer = self._loop.call_at(deadline, self._check_read_timeout)

    def _stop_read_timer(self) -> None:
        self._reading = False

    def _begin(self, head: bytes) -> None:
        assert self.transport is not None
        self.used = True
        self.raw_headers = []
        self.raw_reason = b""
        self.status = 0
        self.complete = False
        self.got_bytes = False
        self.error = None
        self._head_received = 0
        self._reading = True
        self._last_data = self._loop.time()
        if self._read_timer is None:
            self._read_timer = self._loop.call_at(
                self._last_data + self._pool.read_timeout, self._check_read_timeout
            )
        self.transport.write(head)

    def start(self, head: bytes) -> asyncio.Future[None]:
        """Send a request head; the future resolves when the response head
        arrived (or ``error`` is set)."""
        self._headers_done = self._loop.create_future()
        self._begin(head)
        return self._headers_done

    def send(self, head: bytes, on_head: Callable[[UpstreamConnection], None]) -> None:
        """Send a request head; ``on_head(self)`` is called once, when the
        response head arrived (with as much of the body as came with it) or
        ``error`` is set. No future, no task: the plain path's callback."""
        self._on_head = on_head
        self._begin(head)

    def cancel_send(self) -> None:
        """The ``send`` caller no longer wants ``on_head``."""
        self._on_head = None

    def take_buffered(self) -> bytes:
        """Every body byte received so far (resuming a paused socket)."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_data = self._loop.time()
            self.transport.resume_reading()
        return data

    async def next_chunk(self) -> bytes:
        """The next body bytes; b"" at the end. Raises the upstream's error."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_buffered()

    def close(self) -> None:
        self.closed = True
        self._reading = False
        if self.transport is not None:
            self.transport.close()

    @property
    def _close_delimited(self) -> bool:
        for name, value in self.raw_headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return self.status not in (204, 304)

    @property
    def reusable(self) -> bool:
        """The response was read to its end and handed on whole: body bytes
        left behind (a client that left mid-relay) would be the next
        request's, and a socket paused for them would never be read again."""
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and self.error is None
            and not self._chunks
        )


class UpstreamPool:
    """Kept-alive connections to one upstream server, at most
    ``max_connections`` held at once."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float = 5.0,
        max_header_size: int = 32 * 1024,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = parts.scheme == "https"
        self.path_prefix = parts.path.rstrip("/")
        self._host_line = f"Host: {parts.netloc}\r\n"
        self.read_timeout = read_timeout
        self.max_header_size = max_header_size
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        # Connection slots: a counter and a FIFO of waiters rather than an
        # asyncio.Semaphore, so ``try_send`` can take one without awaiting.
        self._max_connections = max_connections
        self._free_slots = max_connections
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self.loop = asyncio.get_running_loop()
        self.closed = False

    @property
    def in_use(self) -> int:
        """Connections held for requests now."""
        return self._max_connections - self._free_slots

    async def acquire_slot(self) -> None:
        """Hold one of the ``max_connections`` slots (FIFO); UpstreamBusyError
        when none frees up within ``pool_timeout``. Give it back with
        ``release_slot``."""
        if self._free_slots > 0 and not self._slot_waiters:
            self._free_slots -= 1
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._pool_timeout):
                await waiter
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release_slot()  # handed a slot just as we gave up
            else:
                self._slot_waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise UpstreamBusyError(
                    f"all {self._max_connections} upstream connections stayed busy"
                    f" for {self._pool_timeout:g}s"
                ) from None
            raise

    def release_slot(self) -> None:
        """Give back a slot taken by ``acquire_slot`` (or handed over with a
        connection)."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._free_slots += 1

    def try_send(
        self, head: bytes, on_head: Callable[[UpstreamConnection], None]
    ) -> UpstreamConnection | None:
        """Send ``head`` at once on an idle kept-alive connection (see
        ``UpstreamConnection.send``); None when no slot is free or none is idle, and
        the caller goes through ``open``. The caller holds a slot until
        ``release``."""
        if self._free_slots == 0 or self._slot_waiters:
            return None
        conn = self._reuse()
        if conn is None:
            return None
        self._free_slots -= 1
        conn.send(head, on_head)
        return conn

    def request_head(self, method: str, target: str, headers: CIMultiDict[str]) -> bytes:
        """The request head to send: the upstream's own host when the
        client's Host is not forwarded."""
        # The pieces in one list and one join: compiled, appending is a few
        # instructions, while an f-string per line builds a string each.
        parts = [method, " ", self.path_prefix, target, " HTTP/1.1\r\n"]
        for name, value in headers.items():
            parts.append(name)
            parts.append(": ")
            parts.append(value)
            parts.append("\r\n")
        if "Host" not in headers:
            parts.append(self._host_line)
        parts.append("\r\n")
        # Values were decoded as aiohttp does (UTF-8, surrogateescape): the
        # upstream gets the client's bytes back unchanged.
        return "".join(parts).encode("utf-8", "surrogateescape")

    async def _connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl or None
                )
        except TimeoutError:
            raise UpstreamConnectError(
                f"cannot connect to upstream within {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to upstream: {exc}") from None
        return conn

    def _reuse(self) -> UpstreamConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def open(self, head: bytes) -> UpstreamConnection:
        """Send ``head`` and wait for the response head. The caller holds a
        slot until ``release``. Raises UpstreamError when no response head
        arrived."""
        await self.acquire_slot()
        conn: UpstreamConnection | None = None
        try:
            conn = self._reuse()
            if conn is not None:
                await conn.start(head)
                if conn.error is None:
                    return conn
                if not isinstance(conn.error, UpstreamClosedError):
                    raise conn.error
                # Closed by the upstream while idle: retry once, fresh.
            conn = await self._connect()
            await conn.start(head)
            if conn.error is not None:
                raise conn.error
            return conn
        except BaseException:
            if conn is not None:
                conn.close()
            self.release_slot()
            raise

    def release(self, conn: UpstreamConnection) -> None:
        """Give the connection back (kept alive when the response was read to
        its end) and free the slot."""
        conn._stop_read_timer()
        if conn.reusable and not self.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self.release_slot()

    def close(self) -> None:
        """Close the idle connections; one given back later is closed then."""
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
