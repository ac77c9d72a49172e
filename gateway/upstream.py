"""④ Forward: one pooled ClientSession per process; bodies streamed both ways.

Session settings each close a known proxy bug:
``auto_decompress=False`` and no auto ``Accept-Encoding`` (bytes pass through
as the upstream sent them), a ``DummyCookieJar`` (one client's cookies must
never be replayed to another), and no overall timeout (long downloads and
streams are legitimate) but a connect timeout and a per-read idle timeout.
Bodies are relayed with ``readany()``, never ``iter_chunks()`` (which spins
forever on the second empty body in a process, aiohttp#7616).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.config.model import ServerConfig, UpstreamConfig
from gateway.core import Call, Forward, Ours, RequestHead
from gateway.errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    ClientBodyError,
    UpstreamBusyError,
    UpstreamConnectError,
    UpstreamInvalidError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from gateway.raw_response import unrelayable_head
from gateway.relay import Downstream, forward_plain, relay_stream
from gateway.upstream_pool import PLAIN_METHODS, UpstreamConnection, UpstreamPool

__all__ = ["RefusedUpgrade", "Upstream"]

log = logging.getLogger("gateway.upstream")

# Methods safe to send twice when a pooled keep-alive connection turns out to
# have been closed by the upstream before it read our request (aiohttp#9138).
_RETRYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


# A refused upgrade's body is relayed up to this size (an error page);
# past it, the client gets our 502.
MAX_REFUSAL_BYTES: Final = 64 * 1024


@dataclass(slots=True)
class RefusedUpgrade:
    """The upstream's answer to an upgrade it refused (not 101), kept for
    the client: aiohttp's ws_connect raises and discards it."""

    status: int = 0
    reason: bytes = b""
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    complete: bool = False


# Set by the caller of ``ws_connect`` for the trace hook to fill: the hook
# runs in the caller's task, so a context variable reaches it.
REFUSED_UPGRADE: Final[contextvars.ContextVar[RefusedUpgrade | None]] = contextvars.ContextVar(
    "refused_upgrade", default=None
)


async def _keep_refused_upgrade(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    refused = REFUSED_UPGRADE.get()
    response = params.response
    if refused is None or response.status == 101:
        return
    refused.status = response.status
    refused.reason = (response.reason or "").encode("latin-1")
    refused.raw_headers = response.raw_headers
    try:
        body = await response.content.read(MAX_REFUSAL_BYTES + 1)
        if len(body) <= MAX_REFUSAL_BYTES and (not body or response.content.at_eof()):
            refused.body, refused.complete = body, True
        elif len(body) <= MAX_REFUSAL_BYTES:  # more may come: read to the bound
            rest = await response.content.read(MAX_REFUSAL_BYTES + 1 - len(body))
            if response.content.at_eof() and len(body) + len(rest) <= MAX_REFUSAL_BYTES:
                refused.body, refused.complete = body + rest, True
    except (aiohttp.ClientError, TimeoutError):
        pass  # incomplete: our 502


class Upstream:
    """The fronted backend: the plain pool (upstream_pool.py) for bodiless
    GET/OPTIONS, aiohttp's ClientSession for bodies, HEAD and upgrades."""

    def __init__(self, config: UpstreamConfig, server: ServerConfig) -> None:
        self.config = config
        self._base = config.url
        self._body_timeout = server.body_timeout_seconds
        self._session: aiohttp.ClientSession | None = None
        self._upgrades: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None

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
            pool_timeout=self.config.pool_timeout_seconds,
            max_header_size=self.config.max_header_size,
        )
        # aiohttp's own per-line and per-count limits set no tighter than the
        # whole head's, so unrelayable_head is the one bound on both paths.
        max_head = self.config.max_header_size
        settings: dict[str, Any] = {
            "auto_decompress": False,
            "skip_auto_headers": ("User-Agent", "Accept", "Accept-Encoding"),
            "cookie_jar": aiohttp.DummyCookieJar(),
            "timeout": aiohttp.ClientTimeout(
                total=None,
                connect=self.config.connect_timeout_seconds,
                sock_connect=self.config.connect_timeout_seconds,
                sock_read=self.config.read_timeout_seconds,
            ),
            # Our headers are already filtered; don't let aiohttp re-check them.
            "requote_redirect_url": False,
            "max_line_size": max_head,
            "max_field_size": max_head,
            "max_headers": max_head // 4,
        }
        self._session = aiohttp.ClientSession(connector=connector, **settings)
        # WebSocket upgrades: the same connections, and a hook that keeps a
        # refused upgrade's answer (only this session pays for tracing).
        keep_refusal = aiohttp.TraceConfig()
        keep_refusal.on_request_end.append(_keep_refused_upgrade)
        self._upgrades = aiohttp.ClientSession(
            connector=connector, connector_owner=False, trace_configs=[keep_refusal], **settings
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._upgrades is not None:
            await self._upgrades.close()
            self._upgrades = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    @property
    def upgrades(self) -> aiohttp.ClientSession:
        """The session for WebSocket upgrades (see ``REFUSED_UPGRADE``)."""
        assert self._upgrades is not None, "Upstream.start() was not awaited"
        return self._upgrades

    def url_for(self, target: str) -> URL:
        """The upstream URL for a request target, byte-for-byte (no yarl
        normalisation of ``..`` or percent-escapes)."""
        return URL(self._base + target, encoded=True)

    @property
    def pool(self) -> UpstreamPool:
        assert self._pool is not None, "Upstream.start() was not awaited"
        return self._pool

    def send_plain(
        self, head: bytes, on_head: Callable[[UpstreamConnection], None]
    ) -> UpstreamConnection | None:
        """Send at once on an idle pooled connection (``UpstreamPool.try_send``);
        None when there is none: then ``relay.forward_plain``."""
        return self.pool.try_send(head, on_head)

    async def forward_plain(
        self, request_head: bytes, down: Downstream, ours: Ours, head: RequestHead, call: Call
    ) -> bool:
        """A plain request through the pool, when no idle connection took it
        at once (``relay.forward_plain``)."""
        return await forward_plain(self.pool, request_head, down, ours, head, call)

    def release(self, conn: UpstreamConnection) -> None:
        """Give a pooled connection back (closed when the pool is gone)."""
        if self._pool is None:  # closed while the connection was out
            conn.close()
        else:
            self._pool.release(conn)

    async def forward(
        self,
        request: web.BaseRequest,
        forward: Forward,
        down: Downstream,
        call: Call,
        max_body_size: int,
    ) -> bool:
        """Send a request aiohttp's server parsed upstream and relay the
        answer to ``down``. True when the client connection may carry the
        next request.

        ``call.error`` set with ``call.response_started`` false: nothing was
        sent and the caller answers 502/504; once started, a failure cuts the
        client's connection. Raises ClientBodyError (413/408/400) when the
        client's body was at fault before the upstream answered.
        """
        head = call.head
        method = head.method
        has_body = request.body_exists
        if not has_body and method in PLAIN_METHODS and self._pool is not None:
            request_head = self._pool.request_head(method, forward.target, forward.headers)
            return await forward_plain(self._pool, request_head, down, forward.ours, head, call)
        started = time.perf_counter()
        # The plain pool's slots bound this path's connections too: one
        # max_connections, one pool_timeout.
        pool = self.pool
        try:
            await pool.acquire_slot()
        except UpstreamBusyError as exc:
            call.error = exc
            return True
        try:
            return await self._forward_session(
                request, forward, down, call, max_body_size, started
            )
        finally:
            pool.release_slot()

    async def _forward_session(
        self,
        request: web.BaseRequest,
        forward: Forward,
        down: Downstream,
        call: Call,
        max_body_size: int,
        started: float,
    ) -> bool:
        head = call.head
        method = head.method
        has_body = request.body_exists
        attempts = 2 if method in _RETRYABLE_METHODS and not has_body else 1
        body = _RequestBody(request, call, max_body_size, self._body_timeout)
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(None) as abort:
                    body.abort = abort
                    upstream_response = await self.session.request(
                        method,
                        self.url_for(forward.target),
                        headers=forward.headers,
                        data=body.stream() if has_body else None,
                        allow_redirects=False,
                        compress=None,
                    )
                break
            except aiohttp.ServerDisconnectedError as exc:
                if call.client_gone:
                    return False
                if attempt + 1 < attempts:
                    continue
                call.error = UpstreamResetError(f"upstream closed the connection: {exc}")
                return True
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
                call.error = UpstreamConnectError(f"cannot connect to upstream: {exc}")
                return True
            except (aiohttp.SocketTimeoutError, TimeoutError):
                if call.client_gone:
                    return False
                if body.error is not None:
                    raise body.error from None
                call.error = UpstreamTimeoutError(
                    f"no response from upstream within {self.config.read_timeout_seconds:g}s"
                )
                return True
            except aiohttp.ClientResponseError as exc:  # llhttp refused the head
                if call.client_gone:
                    return False
                if body.error is not None:
                    raise body.error from None
                call.error = UpstreamInvalidError(f"invalid HTTP from upstream: {exc.message}")
                return True
            except aiohttp.ClientError as exc:  # OSError
                if call.client_gone:
                    return False
                if body.error is not None:
                    raise body.error from None
                call.error = UpstreamResetError(f"upstream connection failed: {exc}")
                return True
        call.upstream_seconds = time.perf_counter() - started
        async with upstream_response:
            raw_headers = upstream_response.raw_headers
            problem = unrelayable_head(raw_headers, self.config.max_header_size)
            if problem is not None:
                call.error = UpstreamInvalidError(problem)
                upstream_response.close()  # not reusable: its body is not read
                return True
            return await relay_stream(
                upstream_response.status,
                (upstream_response.reason or "").encode("latin-1"),
                raw_headers,
                _body_reader(upstream_response),
                down,
                forward.ours,
                head,
                call,
            )


class _RequestBody:
    """A client's request body streamed upstream. A client fault (too large,
    stalled past ``body_timeout``) is kept in ``error`` and fires ``abort``:
    aiohttp would otherwise keep waiting for the upstream's answer to a body
    that will never be complete."""

    __slots__ = ("abort", "body_timeout", "call", "error", "max_body_size", "request")

    def __init__(
        self, request: web.BaseRequest, call: Call, max_body_size: int, body_timeout: float
    ) -> None:
        self.request = request
        self.call = call
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.error: ClientBodyError | None = None
        self.abort: asyncio.Timeout | None = None

    def _stop_waiting(self) -> None:
        if not self.call.response_started and self.abort is not None:
            self.abort.reschedule(asyncio.get_running_loop().time())

    def _fail(self, error: ClientBodyError) -> ClientBodyError:
        self.error = error
        self._stop_waiting()
        return error

    async def stream(self) -> AsyncIterator[bytes]:
        content = self.request.content
        call = self.call
        while True:
            try:
                async with asyncio.timeout(self.body_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                raise self._fail(BodyTimeoutError(self.body_timeout)) from None
            except ClientBodyError as exc:  # set on the stream by connection.py
                raise self._fail(exc) from None
            except Exception:
                # The client's connection broke mid-body: nobody to answer,
                # and not the upstream's failure to count.
                call.client_gone = True
                self._stop_waiting()
                raise
            if not chunk:
                return
            call.bytes_in += len(chunk)
            if self.max_body_size and call.bytes_in > self.max_body_size:
                raise self._fail(BodyTooLargeError(self.max_body_size))
            yield chunk


def _body_reader(upstream: aiohttp.ClientResponse) -> Callable[[], Awaitable[bytes]]:
    """The body in the chunks it arrives in (``readany``, never
    ``iter_chunks``: see the module docstring), upstream failures as
    UpstreamError."""
    content = upstream.content

    async def next_chunk() -> bytes:
        try:
            return await content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"upstream went silent mid-response: {exc}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise UpstreamResetError(f"upstream failed mid-response: {exc}") from None

    return next_chunk
