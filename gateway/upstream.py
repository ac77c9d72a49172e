"""④ Forward: the servers of one upstream, a plain pool each, one ClientSession.

A request goes to the server the balancer chooses (balancer.py: round robin
or least connections, passive and active health). A connect failure, or a
connection closed before any response byte, is sent once more to another
server (nginx's ``proxy_next_upstream error``): a connect failure for every
method (nothing was sent; with a body, only while none of it was read), a
close only for GET, HEAD and OPTIONS without a body. A read timeout is not
sent again (the server may be working on it; the client already waited
``read_timeout``), and neither is an answer, whatever its status. Connect
failures, closes and read timeouts before a response head count toward the
server's ``max_fails``; invalid heads, a full pool and failures after the
head do not.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.balancer import Balancer, ServerState
from gateway.config.model import ServerConfig, UpstreamConfig
from gateway.config.validate import server_address
from gateway.core import Call, Forward, Outcome, RequestHead
from gateway.errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    ClientBodyError,
    UpstreamBusyError,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from gateway.health_check import HealthCheck
from gateway.raw_response import unrelayable_head
from gateway.relay import Downstream, relay_pooled, relay_stream
from gateway.upstream_pool import PLAIN_METHODS, UpstreamPool

__all__ = ["REFUSED_UPGRADE", "RefusedUpgrade", "Upstream", "UpstreamServer"]

log = logging.getLogger("gateway.upstream")

# Methods safe to send twice when a connection closed before any response
# byte (RFC 9110 section 9.2.2).
_RETRYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# The failures that are the server's: they count toward max_fails.
_SERVER_FAILURES: Final = (UpstreamConnectError, UpstreamResetError, UpstreamTimeoutError)


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
    content = response.content
    body = b""
    try:
        # To its end or one byte past the bound, in as many pieces as it comes.
        while len(body) <= MAX_REFUSAL_BYTES:
            piece = await content.read(MAX_REFUSAL_BYTES + 1 - len(body))
            if not piece:  # the end
                refused.body, refused.complete = body, True
                return
            body += piece
    except (aiohttp.ClientError, TimeoutError):
        pass  # incomplete: our 502


class UpstreamServer(ServerState):
    """One server: its URL and its plain pool (``pool``: set by
    ``Upstream.start``; a plain attribute, read several times a request)."""

    __slots__ = ("base", "pool")

    pool: UpstreamPool

    def __init__(self, url: str) -> None:
        super().__init__(url, server_address(url))
        self.base = url  # what a target is appended to (a path prefix kept)

    @property
    def active(self) -> int:
        return self.pool.in_use

    def url_for(self, target: str) -> URL:
        """The server's URL for a request target, byte-for-byte (no yarl
        normalisation of ``..`` or percent-escapes)."""
        return URL(self.base + target, encoded=True)


def _tried(outcome: Outcome, server: UpstreamServer) -> None:
    """Add ``server`` to the servers the request went to ($upstream_addr)."""
    addr = outcome.upstream_addr
    outcome.upstream_addr = server.address if addr is None else f"{addr}, {server.address}"


class Upstream:
    """One upstream (``upstream`` or one of ``upstreams``): its servers and
    their plain pools (upstream_pool.py) for bodiless GET/OPTIONS, aiohttp's
    ClientSession for bodies, HEAD and upgrades. ``now``: the clock passive
    health reads (monotonic seconds)."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        server: ServerConfig,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self._body_timeout = server.body_timeout_seconds
        self._session: aiohttp.ClientSession | None = None
        self._upgrades: aiohttp.ClientSession | None = None
        self.servers = [UpstreamServer(url) for url in config.server_urls]
        self.balancer: Balancer[UpstreamServer] = Balancer(
            self.servers,
            config.balance,
            max_fails=config.max_fails,
            fail_timeout_seconds=config.fail_timeout_seconds,
            now=now,
            on_change=self._log_change,
        )
        # The request path calls this once per request: bound once, and
        # skipped for a lone server (the choice is made).
        self.choose = self.balancer.choose
        self.lone_server = self.servers[0] if len(self.servers) == 1 else None
        self.health_check: HealthCheck | None = None
        if config.health_check.enabled:
            self.health_check = HealthCheck(
                name, config.health_check, self.servers, self._probed
            )

    async def start(self) -> None:
        config = self.config
        for server in self.servers:
            server.pool = UpstreamPool(
                server.url,
                max_connections=config.max_connections,
                connect_timeout=config.connect_timeout_seconds,
                read_timeout=config.read_timeout_seconds,
                pool_timeout=config.pool_timeout_seconds,
                max_header_size=config.max_header_size,
            )
        connector = aiohttp.TCPConnector(
            # Each server's pool slots bound its connections on both paths.
            limit=config.max_connections * len(self.servers),
            limit_per_host=0,
            # Below common backend idle timeouts (nginx 75 s, Node 5 s is the
            # outlier): the proxy side should be the one closing idle sockets.
            keepalive_timeout=4.0,
            ttl_dns_cache=10,
        )
        # aiohttp's own per-line and per-count limits set no tighter than the
        # whole head's, so unrelayable_head is the one bound on both paths.
        max_head = config.max_header_size
        settings: dict[str, Any] = {
            "auto_decompress": False,
            "skip_auto_headers": ("User-Agent", "Accept", "Accept-Encoding"),
            "cookie_jar": aiohttp.DummyCookieJar(),
            "timeout": aiohttp.ClientTimeout(
                total=None,
                connect=config.connect_timeout_seconds,
                sock_connect=config.connect_timeout_seconds,
                sock_read=config.read_timeout_seconds,
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
        if self.health_check is not None:
            self.health_check.start()

    async def close(self) -> None:
        if self.health_check is not None:
            await self.health_check.stop()
        for server in self.servers:
            pool = getattr(server, "pool", None)  # unset when start() failed first
            if pool is not None:
                pool.close()
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

    # -- health --

    def failed(self, server: UpstreamServer, error: UpstreamError) -> None:
        """``error`` ended an exchange with ``server`` before a response head:
        counted toward its max_fails when it is the server's failure."""
        if isinstance(error, _SERVER_FAILURES):
            self.balancer.failed(server)

    def answered(self, server: UpstreamServer) -> None:
        """A response head came from ``server`` (the request path checks
        ``server.down`` first, so this runs only for a server that was out)."""
        self.balancer.answered(server)

    def next_server(
        self, server: UpstreamServer, error: UpstreamError, *, idempotent: bool
    ) -> UpstreamServer | None:
        """Where a request that failed on ``server`` before any response byte
        goes once more: another server, for a connect failure, or a close of
        an ``idempotent`` request; None when it is not sent again (a lone
        server is not tried twice)."""
        if len(self.servers) == 1:
            return None
        if isinstance(error, UpstreamConnectError) or (
            idempotent and isinstance(error, UpstreamClosedError)
        ):
            return self.balancer.choose(exclude=server)
        return None

    def all_down(self) -> bool:
        """Every server is marked down (requests are still sent: balancer.py)."""
        return self.balancer.all_out()

    def servers_down(self) -> list[str]:
        """The addresses of the servers marked down now."""
        return [server.address for server in self.balancer.out_of_rotation()]

    def _probed(self, server: ServerState, ok: bool, detail: str) -> None:
        assert isinstance(server, UpstreamServer)
        self.balancer.probed(server, ok, detail)

    def _log_change(self, server: UpstreamServer, up: bool, why: str) -> None:
        if up:
            log.warning("upstream %s: server %s is back in rotation: %s",
                        self.name, server.address, why)  # fmt: skip
        else:
            log.warning("upstream %s: server %s marked down: %s",
                        self.name, server.address, why)  # fmt: skip

    # -- the plain pool --

    async def forward_plain(
        self,
        server: UpstreamServer,
        request_head: bytes,
        forward: Forward,
        down: Downstream,
        head: RequestHead,
        call: Call,
    ) -> bool:
        """A plain request (front.py's) through ``server``'s pool, when no
        idle connection took it at once (or the one that did had been
        closed by the server): see ``_forward_pooled``."""
        return await self._forward_pooled(server, request_head, forward, down, head, call)

    async def _forward_pooled(
        self,
        server: UpstreamServer,
        request_head: bytes,
        forward: Forward,
        down: Downstream,
        head: RequestHead,
        call: Call,
    ) -> bool:
        """A bodiless GET/OPTIONS through ``server``'s pool, sent once more
        to another server after a connect failure or a close, answered to
        ``down``. ``call.error`` set with nothing sent: the caller answers
        502/503/504. True when the client connection may carry the next
        request."""
        started = time.perf_counter()
        if call.upstream_addr is None:
            call.upstream_addr = server.address
        retried = False
        while True:
            try:
                upstream_conn = await server.pool.open(request_head)
                break
            except UpstreamError as exc:
                self.failed(server, exc)
                retry = None if retried else self.next_server(server, exc, idempotent=True)
                if retry is None:
                    call.error = exc
                    return True
            server, retried = retry, True
            _tried(call, server)
            request_head = server.pool.request_head(
                head.method, forward.target, forward.headers
            )
        if server.down:
            self.answered(server)
        call.upstream_seconds = time.perf_counter() - started
        return await relay_pooled(server.pool, upstream_conn, down, forward.ours, head, call)

    # -- aiohttp's client --

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
        sent and the caller answers 502/503/504; once started, a failure
        cuts the client's connection. Raises ClientBodyError (413/408/400)
        when the client's body was at fault before the upstream answered.
        """
        head = call.head
        method = head.method
        has_body = request.body_exists
        server = self.choose()
        if not has_body and method in PLAIN_METHODS:
            request_head = server.pool.request_head(method, forward.target, forward.headers)
            return await self._forward_pooled(server, request_head, forward, down, head, call)
        started = time.perf_counter()
        idempotent = method in _RETRYABLE_METHODS and not has_body
        body = _RequestBody(request, call, max_body_size, self._body_timeout)
        retried = False
        _tried(call, server)
        while True:
            # The plain pool's slots bound this path's connections too: one
            # max_connections, one pool_timeout per server.
            pool = server.pool
            try:
                await pool.acquire_slot()
            except UpstreamBusyError as exc:
                call.error = exc
                return True
            try:
                response = await self._send(server, request, forward, call, body)
                if response is not None:
                    if server.down:
                        self.answered(server)
                    call.upstream_seconds = time.perf_counter() - started
                    return await self._relay(response, down, forward, call)
            finally:
                pool.release_slot()
            error = call.error
            if error is None:  # the client left
                return False
            self.failed(server, error)
            retry = None
            if not retried and not body.started:
                retry = self.next_server(server, error, idempotent=idempotent)
            if retry is None:
                return True
            call.error = None
            server, retried = retry, True
            _tried(call, server)

    async def _send(
        self,
        server: UpstreamServer,
        request: web.BaseRequest,
        forward: Forward,
        call: Call,
        body: _RequestBody,
    ) -> aiohttp.ClientResponse | None:
        """The response head, or None with ``call.error`` set (None with no
        error: the client left). Raises the client's body error."""
        method = call.head.method
        try:
            async with asyncio.timeout(None) as abort:
                body.abort = abort
                return await self.session.request(
                    method,
                    server.url_for(forward.target),
                    headers=forward.headers,
                    data=body if request.body_exists else None,
                    allow_redirects=False,
                    compress=None,
                )
        except aiohttp.ServerDisconnectedError as exc:
            # aiohttp sent an idempotent request once more already
            # (RFC 9112 section 9.3.1.1): a stale kept-alive connection
            # is not the server's failure.
            if call.client_gone:
                return None
            if body.error is not None:
                raise body.error from None
            call.error = UpstreamClosedError(f"upstream closed the connection: {exc}")
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            call.error = UpstreamConnectError(f"cannot connect to upstream: {exc}")
        except (aiohttp.SocketTimeoutError, TimeoutError):
            if call.client_gone:
                return None
            if body.error is not None:
                raise body.error from None
            call.error = UpstreamTimeoutError(
                f"no response from upstream within {self.config.read_timeout_seconds:g}s"
            )
        except aiohttp.ClientResponseError as exc:  # llhttp refused the head
            if call.client_gone:
                return None
            if body.error is not None:
                raise body.error from None
            call.error = UpstreamInvalidError(f"invalid HTTP from upstream: {exc.message}")
        except aiohttp.ClientError as exc:  # OSError
            if call.client_gone:
                return None
            if body.error is not None:
                raise body.error from None
            call.error = UpstreamResetError(f"upstream connection failed: {exc}")
        return None

    async def _relay(
        self,
        upstream_response: aiohttp.ClientResponse,
        down: Downstream,
        forward: Forward,
        call: Call,
    ) -> bool:
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
                call.head,
                call,
            )


class _RequestBody:
    """A client's request body streamed upstream. A client fault (too large,
    stalled past ``body_timeout``) is kept in ``error`` and fires ``abort``:
    aiohttp would otherwise keep waiting for the upstream's answer to a body
    that will never be complete."""

    __slots__ = ("abort", "body_timeout", "call", "error", "max_body_size", "request",
                 "started")  # fmt: skip

    def __init__(
        self, request: web.BaseRequest, call: Call, max_body_size: int, body_timeout: float
    ) -> None:
        self.request = request
        self.call = call
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.error: ClientBodyError | None = None
        self.abort: asyncio.Timeout | None = None
        # A byte of the body was asked for: it cannot go to another server.
        self.started = False

    def _stop_waiting(self) -> None:
        if not self.call.response_started and self.abort is not None:
            self.abort.reschedule(asyncio.get_running_loop().time())

    def _fail(self, error: ClientBodyError) -> ClientBodyError:
        self.error = error
        self._stop_waiting()
        return error

    def __aiter__(self) -> _RequestBody:
        # An iterator class rather than an async generator: mypyc compiles
        # no async generators (docs/compiled.md).
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        content = self.request.content
        call = self.call
        try:
            # Bytes already buffered need no timer: on Python 3.11 each
            # asyncio.timeout costs three getpid() system calls (the
            # running-loop check) besides its timer handle.
            chunk = content.read_nowait()
            if not chunk and not content.at_eof():
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
            raise StopAsyncIteration
        call.bytes_in += len(chunk)
        if self.max_body_size and call.bytes_in > self.max_body_size:
            raise self._fail(BodyTooLargeError(self.max_body_size))
        return chunk


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
