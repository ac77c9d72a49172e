"""④ Forward: one pooled ClientSession per process; bodies streamed both ways.

Session settings each close a known proxy bug (research notes, section 1):
``auto_decompress=False`` and no auto ``Accept-Encoding`` (bytes pass through
as the upstream sent them), a ``DummyCookieJar`` (one client's cookies must
never be replayed to another), and no overall timeout (long downloads and
streams are legitimate) but a connect timeout and a per-read idle timeout.
Bodies are relayed with ``iter_any()``, never ``iter_chunks()`` (which spins
forever on the second empty body in a process, aiohttp#7616).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway.config.model import ServerConfig, UpstreamConfig
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from gateway.front import FrontConnection, PlainRequest
from gateway.headers import downstream_response_headers
from gateway.raw_response import NO_BODY_STATUSES, field_lines, response_head, write_prepared
from gateway.upstream_pool import LEAN_METHODS, Exchange, UpstreamPool

__all__ = [
    "BodyTimeoutError",
    "BodyTooLargeError",
    "ClientBodyError",
    "MalformedBodyError",
    "Relay",
    "Upstream",
]

log = logging.getLogger("gateway.upstream")

# Methods safe to send twice when a pooled keep-alive connection turns out to
# have been closed by the upstream before it read our request (aiohttp#9138).
_RETRYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class ClientBodyError(Exception):
    """The client's request body was at fault; answered with ``status``."""

    status = 400
    reason = "bad_request"


class MalformedBodyError(ClientBodyError):
    """llhttp rejected the body after forwarding had started (a bad chunk)."""


class BodyTooLargeError(ClientBodyError):
    status = 413
    reason = "body_too_large"

    def __init__(self, max_body_size: int) -> None:
        super().__init__(f"request bodies are limited to {max_body_size} bytes")


class BodyTimeoutError(ClientBodyError):
    status = 408
    reason = "body_timeout"

    def __init__(self, body_timeout_seconds: float) -> None:
        super().__init__(f"no request body data for {body_timeout_seconds:g}s")


class Relay:
    """What one forwarded request produced, for metrics and the access log."""

    __slots__ = ("bytes_in", "bytes_out", "client_error", "client_gone", "error", "response",
                 "status", "upstream_seconds")  # fmt: skip

    def __init__(self) -> None:
        # The response streamed to the client, once its headers are sent.
        self.response: web.StreamResponse | None = None
        self.status = 0
        self.upstream_seconds: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: UpstreamError | None = None
        self.client_error: ClientBodyError | None = None
        self.client_gone = False


class Upstream:
    def __init__(self, config: UpstreamConfig, server: ServerConfig) -> None:
        self.config = config
        self._base = config.url
        self._body_timeout = server.body_timeout_seconds
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        parts = urlsplit(config.url)
        self._default_host = parts.netloc

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            # Below common backend idle timeouts (nginx 75 s, Node 5 s is the
            # outlier): the proxy side should be the one closing idle sockets.
            keepalive_timeout=4.0,
            ttl_dns_cache=10,
        )
        self._pool = UpstreamPool(
            self.config.url,
            max_connections=self.config.max_connections,
            connect_timeout=self.config.connect_timeout_seconds,
            read_timeout=self.config.read_timeout_seconds,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.config.connect_timeout_seconds,
                sock_connect=self.config.connect_timeout_seconds,
                sock_read=self.config.read_timeout_seconds,
            ),
            # Our headers are already filtered; don't let aiohttp re-check them.
            requote_redirect_url=False,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def url_for(self, target: str) -> URL:
        """The upstream URL for a request target, byte-for-byte (no yarl
        normalisation of ``..`` or percent-escapes)."""
        return URL(self._base + target, encoded=True)

    def _body(
        self,
        request: web.BaseRequest,
        relay: Relay,
        max_body_size: int,
        abort: asyncio.Timeout,
    ) -> AsyncIterator[bytes]:
        """The request body, streamed. A client fault (too large, stalled past
        ``body_timeout``) is recorded in ``relay.client_error`` and fires
        ``abort``: aiohttp would otherwise keep waiting for the upstream's
        answer to a body that will never be complete."""
        content = request.content
        body_timeout = self._body_timeout
        loop = asyncio.get_running_loop()

        def fail(error: ClientBodyError) -> ClientBodyError:
            relay.client_error = error
            if relay.status == 0:  # still waiting for the upstream's answer
                abort.reschedule(loop.time())
            return error

        async def stream() -> AsyncIterator[bytes]:
            while True:
                try:
                    async with asyncio.timeout(body_timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise fail(BodyTimeoutError(body_timeout)) from None
                except ClientBodyError as exc:  # set on the stream by connection.py
                    raise fail(exc) from None
                except Exception:
                    # The client's connection broke mid-body: nobody to
                    # answer, and not the upstream's failure to count.
                    relay.client_gone = True
                    if relay.status == 0:
                        abort.reschedule(loop.time())
                    raise
                if not chunk:
                    return
                relay.bytes_in += len(chunk)
                if max_body_size and relay.bytes_in > max_body_size:
                    raise fail(BodyTooLargeError(max_body_size))
                yield chunk

        return stream()

    async def forward(
        self,
        request: web.BaseRequest,
        target: str,
        headers: CIMultiDict[str],
        extra_response_headers: list[tuple[str, str]],
        max_body_size: int,
        relay: Relay,
    ) -> None:
        """Send the request upstream and stream the answer back into ``relay``.

        When ``relay.error`` is set and ``relay.status`` is 0 nothing was sent
        and the caller answers 502/504; with a status, the failure came
        mid-response and the client connection has been cut. Raises
        ClientBodyError (413/408) when the client's body was at fault before
        the upstream answered.
        """
        method = request.method
        has_body = request.body_exists
        if not has_body and method in LEAN_METHODS and self._pool is not None:
            await self._forward_lean(request, target, headers, extra_response_headers, relay)
            return
        started = time.perf_counter()
        attempts = 2 if method in _RETRYABLE_METHODS and not has_body else 1
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(None) as abort:
                    data = (
                        self._body(request, relay, max_body_size, abort) if has_body else None
                    )
                    upstream_response = await self.session.request(
                        method,
                        self.url_for(target),
                        headers=headers,
                        data=data,
                        allow_redirects=False,
                        compress=None,
                    )
                break
            except aiohttp.ServerDisconnectedError as exc:
                if relay.client_gone:
                    return
                if attempt + 1 < attempts:
                    continue
                relay.error = UpstreamResetError(f"upstream closed the connection: {exc}")
                return
            except (
                aiohttp.ConnectionTimeoutError,
                aiohttp.ClientConnectorError,
            ) as exc:
                relay.error = UpstreamConnectError(f"cannot connect to upstream: {exc}")
                return
            except (aiohttp.SocketTimeoutError, TimeoutError):
                if relay.client_gone:
                    return
                if relay.client_error is not None:
                    raise relay.client_error from None
                relay.error = UpstreamTimeoutError(
                    f"no response from upstream within {self.config.read_timeout_seconds:g}s"
                )
                return
            except aiohttp.ClientError as exc:  # OSError, bad status line, bad headers
                if relay.client_gone:
                    return
                if relay.client_error is not None:
                    raise relay.client_error from None
                relay.error = UpstreamResetError(f"upstream connection failed: {exc}")
                return
        relay.upstream_seconds = time.perf_counter() - started
        async with upstream_response:
            await self._stream(
                request, upstream_response.status, upstream_response.reason,
                upstream_response.headers, _aiohttp_body(upstream_response),
                extra_response_headers, relay,
            )  # fmt: skip

    async def _forward_lean(
        self,
        request: web.BaseRequest,
        target: str,
        headers: CIMultiDict[str],
        extra_headers: list[tuple[str, str]],
        relay: Relay,
    ) -> None:
        """GET/OPTIONS without a body, through the lean pool."""
        pool = self._pool
        assert pool is not None
        started = time.perf_counter()
        try:
            exchange = await pool.open(self.lean_head(request.method, target, headers))
        except UpstreamError as exc:
            relay.error = exc
            return
        relay.upstream_seconds = time.perf_counter() - started
        try:
            if exchange.complete:
                # The whole answer is here: one write for head and body.
                relay.status = exchange.status
                data, sent = whole_relayed(
                    exchange, field_lines(extra_headers),
                    frozenset(name.lower().encode() for name, _ in extra_headers),
                    keep_alive=request.keep_alive, http10=request.version < HttpVersion11,
                )  # fmt: skip
                try:
                    relay.response = write_prepared(
                        request, data, exchange.status, exchange.reason, sent
                    )
                    relay.bytes_out = sent
                except ConnectionError:
                    relay.client_gone = True
                return
            await self._stream(
                request, exchange.status, exchange.reason, CIMultiDict(exchange.headers),
                _lean_body(exchange), extra_headers, relay,
            )  # fmt: skip
        finally:
            pool.release(exchange)

    def lean_head(self, method: str, target: str, headers: CIMultiDict[str]) -> bytes:
        """The request head sent through the lean pool (the upstream's host
        when the client's Host is not forwarded)."""
        pool = self._pool
        assert pool is not None, "Upstream.start() was not awaited"
        if "Host" not in headers:
            headers["Host"] = self._default_host
        return pool.request_head(method, target, headers.items())

    def send_plain(self, head: bytes, on_head: Callable[[Exchange], None]) -> Exchange | None:
        """Send at once on an idle pooled connection (``UpstreamPool.try_send``);
        None when there is none: then ``forward_plain``."""
        assert self._pool is not None, "Upstream.start() was not awaited"
        return self._pool.try_send(head, on_head)

    def release(self, exchange: Exchange) -> None:
        if self._pool is None:  # closed while the exchange was out
            exchange.close()
        else:
            self._pool.release(exchange)

    async def forward_plain(
        self,
        conn: FrontConnection,
        request: PlainRequest,
        head: bytes,
        ours: bytes,
        replaced: frozenset[bytes],
        relay: Relay,
    ) -> bool:
        """A plain request (front.py) through the lean pool, answered straight
        to ``conn``. The same outcomes in ``relay`` as ``forward``; True when
        the client connection may be reused."""
        pool = self._pool
        assert pool is not None, "Upstream.start() was not awaited"
        started = time.perf_counter()
        try:
            exchange = await pool.open(head)
        except UpstreamError as exc:
            relay.error = exc
            return True
        relay.upstream_seconds = time.perf_counter() - started
        try:
            if exchange.complete:
                return relay_whole(conn, request, exchange, ours, relay, replaced)
            return await stream_plain(conn, request, exchange, ours, relay, replaced)
        finally:
            pool.release(exchange)

    async def _stream(
        self,
        request: web.BaseRequest,
        status: int,
        reason: str | None,
        upstream_headers: MultiMapping[str],
        body: AsyncGenerator[bytes, None],
        extra_headers: list[tuple[str, str]],
        relay: Relay,
    ) -> None:
        """Relay an upstream response whose body is still arriving."""
        headers = downstream_response_headers(upstream_headers, extra_headers)
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        length = upstream_headers.get("Content-Length")
        if length is not None and "Transfer-Encoding" not in upstream_headers:
            response.content_length = int(length)
        relay.status = status
        relay.response = response
        try:
            await response.prepare(request)
            async for chunk in body:
                await response.write(chunk)
                relay.bytes_out += len(chunk)
            await response.write_eof()
        except ConnectionError:
            # The client left mid-response (aiohttp raises
            # ClientConnectionResetError, a ConnectionResetError). The caller
            # releases the upstream connection unread: closed, not reused.
            relay.client_gone = True
        except UpstreamError as exc:
            # Headers are gone already: the only honest signal left is to cut
            # the client's connection so it sees a truncated response.
            relay.error = exc
            if request.transport is not None:
                request.transport.close()
        finally:
            await body.aclose()


def whole_relayed(
    exchange: Exchange,
    ours: bytes,
    replaced: frozenset[bytes],
    *,
    keep_alive: bool,
    http10: bool,
) -> tuple[bytes, int]:
    """A complete upstream answer, head and body, as one piece to write, and
    the body length in it (none for 204/304)."""
    status = exchange.status
    body = exchange.take_buffered()
    no_body = status in NO_BODY_STATUSES
    head = response_head(
        status, exchange.raw_reason, exchange.raw_headers, ours,
        replaced=replaced, content_length=None if no_body else len(body),
        chunked=False, keep_alive=keep_alive, http10=http10,
    )  # fmt: skip
    if no_body:
        return head, 0
    return head + body, len(body)


def relay_whole(
    conn: FrontConnection,
    request: PlainRequest,
    exchange: Exchange,
    ours: bytes,
    relay: Relay,
    replaced: frozenset[bytes],
) -> bool:
    """Write a complete upstream answer, head and body, in one write. True
    when the connection may be reused."""
    relay.status = exchange.status
    data, sent = whole_relayed(
        exchange, ours, replaced, keep_alive=request.keep_alive, http10=request.http10
    )
    try:
        conn.write(data)
    except ConnectionError:
        relay.client_gone = True
        return False
    relay.bytes_out = sent
    return True


async def stream_plain(
    conn: FrontConnection,
    request: PlainRequest,
    exchange: Exchange,
    ours: bytes,
    relay: Relay,
    replaced: frozenset[bytes],
) -> bool:
    """Relay a body still arriving: with the upstream's Content-Length, else
    chunked, else (an HTTP/1.0 client) delimited by closing the connection.
    True when the connection may be reused."""
    relay.status = exchange.status
    content_length = None
    framed = False
    for name, value in exchange.raw_headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            framed, content_length = True, None
        elif lower == b"content-length" and not framed:
            content_length = int(value)
    chunked = content_length is None and not request.http10
    keep_alive = request.keep_alive and (content_length is not None or chunked)
    try:
        conn.write(
            response_head(
                exchange.status, exchange.raw_reason, exchange.raw_headers, ours,
                replaced=replaced, content_length=content_length, chunked=chunked,
                keep_alive=keep_alive, http10=request.http10,
            )
        )  # fmt: skip
        while chunk := await exchange.next_chunk():
            if chunked:
                conn.write(b"%x\r\n" % len(chunk))
                conn.write(chunk)
                conn.write(b"\r\n")
            else:
                conn.write(chunk)
            relay.bytes_out += len(chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except ConnectionError:
        relay.client_gone = True
        return False
    except UpstreamError as exc:
        # The head is gone already: cut the connection so the client sees a
        # truncated response.
        relay.error = exc
        conn.abort()
        return False
    return keep_alive


async def _lean_body(exchange: Exchange) -> AsyncGenerator[bytes, None]:
    while chunk := await exchange.next_chunk():
        yield chunk


async def _aiohttp_body(upstream: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    """The body in the chunks it arrives in (``iter_any``: see the module
    docstring), upstream failures as UpstreamError."""
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"upstream went silent mid-response: {exc}") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
        raise UpstreamResetError(f"upstream failed mid-response: {exc}") from None
