"""⓪ The proxy listener's one handler, in the order a request meets it:

    identify ① -> route ② -> decide ③ -> (429 ⑤ | forward ④) -> metrics + log ⑥

Twice: ``serve_plain`` for the plain requests front.py parsed itself (written
straight to the connection), ``handle`` for the requests aiohttp parsed.

One handler, no middleware chain: each middleware costs a coroutine frame per
request (8-19 % for three no-ops, research notes section 2) and here they
would only pass state to each other.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Final
from urllib.parse import urlsplit

from aiohttp import HttpVersion11, web
from multidict import MultiMapping
from yarl import URL

from gateway.access_log import AccessLog
from gateway.clients import ClientIdentifier
from gateway.config.model import GatewayConfig
from gateway.errors import UpstreamResetError
from gateway.front import PENDING, FrontConnection, PlainOutcome, PlainRequest
from gateway.headers import (
    OUR_RESPONSE_FIELDS,
    OUR_UNLIMITED_RESPONSE_FIELDS,
    forwarded_for,
    rate_limit_fields,
    rate_limit_headers,
    upstream_request_headers,
)
from gateway.limiting.limiter import DENIED, Decision, Limiter
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.store import BucketStore
from gateway.metrics import Metrics
from gateway.raw_response import whole_response, write_prepared
from gateway.responses import Answer, error_answer, rate_limited, to_aiohttp, upstream_failed
from gateway.routes import Route
from gateway.upstream import ClientBodyError, Relay, Upstream, relay_whole, stream_plain
from gateway.upstream_pool import Exchange
from gateway.websocket import is_websocket_upgrade, proxy_websocket

__all__ = ["Gateway", "Snapshot"]

# nginx's $status for "client closed the connection before we answered".
CLIENT_CLOSED_STATUS: Final = 499
_CONCURRENCY_DENIED: Final = Decision(DENIED, None, 0, 1.0, 1.0)
# Answers to a request body we refused: the rest of it is not worth reading.
_CLOSE_AFTER_STATUSES: Final = frozenset({400, 408, 413})


def request_target(request: web.BaseRequest) -> str | None:
    """The path and query to send upstream, byte-for-byte. An absolute-form
    target (``GET http://host/x``, RFC 9112 section 3.2.2) is accepted but only
    its path and query are used: the gateway proxies to its configured
    upstream and nowhere else. CONNECT and ``*`` have no meaning here (None)."""
    target = request.raw_path
    if target.startswith("/"):
        return target
    if request.method == "CONNECT" or "://" not in target:
        return None
    parts = urlsplit(target)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


class Snapshot:
    """Everything derived from one config. Immutable once built; a reload
    builds a new one and swaps the reference, so a request that started
    under the old config finishes under it."""

    __slots__ = ("config", "identifier", "limiter")

    def __init__(self, config: GatewayConfig, clock: RefillClock, store: BucketStore) -> None:
        self.config = config
        self.limiter = Limiter(config, clock, store)
        self.identifier = ClientIdentifier(config.clients)


class Gateway:
    """The proxy's shared state: the current snapshot and the parts every
    request uses. Built by server.py."""

    def __init__(
        self,
        snapshot: Snapshot,
        upstream: Upstream,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        self.snapshot = snapshot
        self.upstream = upstream
        self.metrics = metrics
        self.access_log = access_log
        self.inflight = 0
        self._inflight_by_client: dict[str, int] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        # Request ids: a random per-process prefix and a counter. Unique across
        # processes and restarts without a getrandom() syscall per request
        # (os.urandom showed up in the denied path's profile).
        self._request_id_prefix = os.urandom(8).hex()
        self._request_ids = itertools.count()

    def _new_request_id(self) -> str:
        return f"{self._request_id_prefix}{next(self._request_ids):016x}"

    def _enter(self, client: str, max_concurrent: int) -> bool:
        """Count the request in flight; False when ``client`` is at its cap."""
        if max_concurrent:
            current = self._inflight_by_client.get(client, 0)
            if current >= max_concurrent:
                return False
            self._inflight_by_client[client] = current + 1
        self.inflight += 1
        self.idle.clear()
        return True

    def _leave(self, client: str, max_concurrent: int) -> None:
        if max_concurrent:
            remaining = self._inflight_by_client.pop(client, 1) - 1
            if remaining > 0:
                self._inflight_by_client[client] = remaining
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    def _identify(
        self, snapshot: Snapshot, peer: str, headers: MultiMapping[str]
    ) -> tuple[str, str]:
        """The client id and the request id."""
        identifier = snapshot.identifier
        api_header = identifier.header
        client = identifier.identify(
            peer,
            forwarded_for(headers),
            headers.get(api_header) if api_header else None,
        )
        return client, headers.get("X-Request-ID") or self._new_request_id()

    def serve_plain(self, conn: FrontConnection, request: PlainRequest) -> PlainOutcome:
        """A plain request (front.py): the same steps as ``handle``, written
        straight to the connection. What can be done at once is, without a
        task: a memory-store decision, its 429, and sending the request on an
        idle pooled upstream connection (the answer then comes back through a
        callback, ``_PlainCall.on_head``). Otherwise the coroutine that
        finishes the request is returned."""
        snapshot = self.snapshot
        limiter = snapshot.limiter
        route = limiter.routes.match(_decoded_path(request.target))
        call = _PlainCall(self, conn, request, snapshot, route)
        conn.track(call)
        client = call.client
        if not self._enter(client, call.max_concurrent):
            self.metrics.route(route.label).decisions[DENIED].inc()
            call.decision = _CONCURRENCY_DENIED
            return call.answer(self._concurrency_answer(call.max_concurrent))
        call.holds_slot = True
        decision = limiter.decide_now(route, client)
        if decision is None:  # the store is remote: await its answer
            return call.decide_and_forward()
        call.decision = decision
        self.metrics.route(route.label).decisions[decision.outcome].inc()
        if decision.outcome is DENIED:
            return call.deny()
        return call.forward()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request front.py handed to aiohttp: bodies, HEAD, upgrades."""
        started = time.perf_counter()
        snapshot = self.snapshot
        config = snapshot.config
        headers = request.headers
        limiter = snapshot.limiter
        route = limiter.routes.match(request.path)
        route_metrics = self.metrics.route(route.label)
        peer = request.remote or "-"
        client, request_id = self._identify(snapshot, peer, headers)
        relay = Relay()
        response: web.StreamResponse | None = None
        max_concurrent = config.clients.max_concurrent
        # The in-flight slot is taken before the limiter is asked, so a burst
        # cannot slip past the cap while a (redis) decision is pending; a
        # request refused for concurrency costs no token.
        if not self._enter(client, max_concurrent):
            decision = _CONCURRENCY_DENIED
            route_metrics.decisions[DENIED].inc()
            response = to_aiohttp(self._concurrency_answer(max_concurrent))
        else:
            try:
                decision = await limiter.decide(route, client)
                route_metrics.decisions[decision.outcome].inc()
                if decision.outcome is DENIED:
                    data, sent = rate_limited(
                        decision, request_id, keep_alive=request.keep_alive,
                        http10=request.version < HttpVersion11,
                        head_only=request.method == "HEAD",
                    )  # fmt: skip
                    try:
                        relay.response = write_prepared(
                            request, data, 429, "Too Many Requests", sent
                        )
                        relay.status = 429
                        relay.bytes_out = sent
                    except ConnectionError:
                        relay.client_gone = True
                else:
                    response = await self._forward(
                        request, snapshot, peer, request_id, decision, relay
                    )
            finally:
                self._leave(client, max_concurrent)

        if response is not None:
            if decision.limit is not None and decision.outcome is not DENIED:
                # Our own answer (502, 413, ...) still cost the client a token.
                for name, value in rate_limit_headers(decision):
                    response.headers[name] = value
            response.headers["X-Request-ID"] = request_id
            relay.status = response.status
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                relay.client_gone = True
            if response.status in _CLOSE_AFTER_STATUSES and request.transport is not None:
                # Don't linger reading the rest of a body we refused: the
                # answer is written, the connection is done.
                request.transport.close()
            body = response.body if isinstance(response, web.Response) else None
            relay.bytes_out = len(body) if isinstance(body, bytes) else 0
        elif relay.response is not None:
            response = relay.response
        else:  # the client left before anything was sent
            relay.client_gone = True
            response = web.Response(status=CLIENT_CLOSED_STATUS)
        self._record(relay, decision, started, request_id, client, route, request)
        return response

    def _record(
        self,
        relay: Relay,
        decision: Decision,
        started: float,
        request_id: str,
        client: str,
        route: Route,
        request: web.BaseRequest | PlainRequest,
    ) -> None:
        """Metrics and the access-log record of one answered request."""
        route_metrics = self.metrics.route(route.label)
        target = request.target if isinstance(request, PlainRequest) else request.raw_path
        if relay.error is not None:
            route_metrics.upstream_errors[relay.error.kind].inc()
        if relay.upstream_seconds is not None:
            route_metrics.upstream_duration.observe(relay.upstream_seconds)
        status = CLIENT_CLOSED_STATUS if relay.client_gone else relay.status
        route_metrics.response(status).inc()
        duration = time.perf_counter() - started
        route_metrics.duration.observe(duration)
        self.access_log.put((
            time.time(), request_id, client, request.method, target,
            route_metrics.label, decision.outcome, status,
            decision.tokens_left if decision.limit is not None else None,
            relay.upstream_seconds * 1000 if relay.upstream_seconds is not None else None,
            duration * 1000, relay.bytes_in, relay.bytes_out,
        ))  # fmt: skip

    def _concurrency_answer(self, max_concurrent: int) -> Answer:
        answer = self._reject(
            429, "concurrency", f"at most {max_concurrent} requests in flight per client"
        )
        answer.headers.append(("Retry-After", "1"))
        return answer

    def _reject(self, status: int, reason: str, detail: str) -> Answer:
        self.metrics.count_rejected(reason)
        return error_answer(status, reason, detail)

    async def _forward(
        self,
        request: web.BaseRequest,
        snapshot: Snapshot,
        peer: str,
        request_id: str,
        decision: Decision,
        relay: Relay,
    ) -> web.StreamResponse | None:
        """None once the upstream's response has been streamed to the client."""
        config = snapshot.config
        max_body = config.max_body_size
        if max_body and (request.content_length or 0) > max_body:
            return to_aiohttp(
                self._reject(
                    413, "body_too_large", f"request bodies are limited to {max_body} bytes"
                )
            )
        target = request_target(request)
        if target is None:
            return to_aiohttp(
                self._reject(
                    405 if request.method == "CONNECT" else 400,
                    "bad_target",
                    "only origin-form and absolute-form targets are proxied",
                )
            )
        upstream_headers = upstream_request_headers(
            request.headers,
            peer=peer,
            scheme=request.scheme,
            request_id=request_id,
            peer_is_trusted=snapshot.identifier.is_trusted_peer(peer),
            preserve_host=config.upstream.preserve_host,
        )
        extra = rate_limit_headers(decision)
        extra.append(("X-Request-ID", request_id))
        if (
            request.version >= HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # RFC 9110 15.2.1: the client waits for this before its body.
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError:  # it left already: nothing to forward
                relay.client_gone = True
                return None
        try:
            if is_websocket_upgrade(request.headers):
                await proxy_websocket(
                    request, self.upstream, target, upstream_headers, extra, relay
                )
            else:
                await self.upstream.forward(
                    request, target, upstream_headers, extra, max_body, relay
                )
        except ClientBodyError as exc:
            return to_aiohttp(self._reject(exc.status, exc.reason, str(exc)))
        if relay.error is not None and relay.status == 0:
            return to_aiohttp(upstream_failed(relay.error))
        return None


class _PlainCall:
    """One plain request on its way through ``Gateway.serve_plain``: what its
    steps share, whether they run at once, in a callback or in a task."""

    __slots__ = ("client", "conn", "decision", "ended", "exchange", "extra", "gateway", "head",
                 "holds_slot", "max_concurrent", "relay", "replaced", "request", "request_id",
                 "route", "sent", "snapshot", "started")  # fmt: skip

    def __init__(
        self,
        gateway: Gateway,
        conn: FrontConnection,
        request: PlainRequest,
        snapshot: Snapshot,
        route: Route,
    ) -> None:
        self.started = time.perf_counter()
        self.gateway = gateway
        self.conn = conn
        self.request = request
        self.snapshot = snapshot
        self.route = route
        self.client, self.request_id = gateway._identify(
            snapshot, request.peer, request.headers
        )
        self.max_concurrent = snapshot.config.clients.max_concurrent
        self.holds_slot = False
        self.decision: Decision | None = None
        self.relay = Relay()
        self.extra = b""  # our response fields, as header lines
        self.head = b""
        self.replaced = OUR_RESPONSE_FIELDS
        self.sent = 0.0
        # The upstream connection this call holds outside forward_plain.
        self.exchange: Exchange | None = None
        self.ended = False

    def forward(self) -> PlainOutcome:
        """Send upstream: at once on an idle pooled connection (PENDING; the
        answer comes to ``on_head``), else in a task."""
        self.prepare()
        self.exchange = self.gateway.upstream.send_plain(self.head, self.on_head)
        if self.exchange is not None:
            return PENDING
        return self.forward_in_task()

    def _release(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            self.gateway.upstream.release(exchange)

    def cancel(self) -> None:
        """Cut by a drain that ran out of time (front.InFlight): give the
        upstream connection back unread, free the slot, log it as 499."""
        exchange = self.exchange
        if exchange is not None:
            exchange.cancel_send()
            exchange.close()
            self._release()
        self.relay.client_gone = True
        self.end(False)

    def prepare(self) -> None:
        """The request head for the upstream, and our response headers."""
        decision = self.decision
        assert decision is not None
        request = self.request
        snapshot = self.snapshot
        peer = request.peer
        upstream = self.gateway.upstream
        self.head = upstream.lean_head(
            request.method,
            request.target,
            upstream_request_headers(
                request.headers,
                peer=peer,
                scheme="http",
                request_id=self.request_id,
                peer_is_trusted=snapshot.identifier.is_trusted_peer(peer),
                preserve_host=snapshot.config.upstream.preserve_host,
            ),
        )
        self.extra = (
            rate_limit_fields(decision)
            + b"X-Request-ID: "
            + self.request_id.encode("utf-8", "surrogateescape")
            + b"\r\n"
        )
        self.replaced = (
            OUR_RESPONSE_FIELDS if decision.limit is not None else OUR_UNLIMITED_RESPONSE_FIELDS
        )
        self.sent = time.perf_counter()

    def on_head(self, exchange: Exchange) -> None:
        """The upstream's answer arrived (or the exchange failed)."""
        conn = self.conn
        relay = self.relay
        error = exchange.error
        if isinstance(error, UpstreamResetError) and not exchange.got_bytes:
            # The upstream had closed this kept-alive connection before our
            # request reached it: once more, on another (the pool retries
            # once more on a fresh one). A timeout is not retried.
            self._release()
            conn.continue_with(self.forward_in_task())
            return
        relay.upstream_seconds = time.perf_counter() - self.sent
        if error is not None:
            self._release()
            relay.error = error
            conn.finish(self.answer(self.failed()))
        elif exchange.complete:
            reusable = relay_whole(
                conn, self.request, exchange, self.extra, relay, self.replaced
            )
            self._release()
            conn.finish(self.end(reusable))
        else:
            conn.continue_with(self.stream(exchange))

    async def stream(self, exchange: Exchange) -> bool:
        reusable = False
        try:
            reusable = await stream_plain(
                self.conn, self.request, exchange, self.extra, self.relay, self.replaced
            )
        finally:
            self._release()
            reusable = self.end(reusable)
        return reusable

    async def forward_in_task(self) -> bool:
        reusable = False
        relay = self.relay
        try:
            reusable = await self.gateway.upstream.forward_plain(
                self.conn, self.request, self.head, self.extra, self.replaced, relay
            )
        except BaseException:
            self.end(False)
            raise
        if relay.error is not None and relay.status == 0:
            return self.answer(self.failed())
        return self.end(reusable)

    async def decide_and_forward(self) -> bool:
        try:
            decision = await self.snapshot.limiter.decide(self.route, self.client)
        except BaseException:
            self.end(False)
            raise
        self.decision = decision
        self.gateway.metrics.route(self.route.label).decisions[decision.outcome].inc()
        if decision.outcome is DENIED:
            return self.deny()
        self.prepare()
        return await self.forward_in_task()

    def failed(self) -> Answer:
        """502/504 for an upstream that failed before answering; it still
        cost the client a token."""
        assert self.relay.error is not None
        assert self.decision is not None
        answer = upstream_failed(self.relay.error)
        answer.headers += rate_limit_headers(self.decision)
        return answer

    def deny(self) -> bool:
        """Write the 429; the request is done."""
        assert self.decision is not None
        request = self.request
        relay = self.relay
        data, sent = rate_limited(
            self.decision, self.request_id,
            keep_alive=request.keep_alive, http10=request.http10, head_only=False,
        )  # fmt: skip
        relay.status = 429
        try:
            self.conn.write(data)
            relay.bytes_out = sent
        except ConnectionError:
            relay.client_gone = True
        return self.end(True)

    def answer(self, answer: Answer) -> bool:
        """Write one of our own answers; the request is done."""
        request = self.request
        relay = self.relay
        answer.headers.append(("X-Request-ID", self.request_id))
        relay.status = answer.status
        try:
            self.conn.write(
                whole_response(
                    answer.status, answer.reason, answer.headers, answer.body,
                    keep_alive=request.keep_alive, http10=request.http10, head_only=False,
                )
            )  # fmt: skip
            relay.bytes_out = len(answer.body)
        except ConnectionError:
            relay.client_gone = True
        return self.end(True)

    def end(self, reusable: bool) -> bool:
        """Free the client's in-flight slot, count and log the request.
        True when the client connection may carry the next request."""
        if self.ended:
            return False
        self.ended = True
        gateway = self.gateway
        if self.holds_slot:
            self.holds_slot = False
            gateway._leave(self.client, self.max_concurrent)
        if self.decision is not None:
            gateway._record(
                self.relay, self.decision, self.started, self.request_id, self.client,
                self.route, self.request,
            )  # fmt: skip
        return reusable and not self.relay.client_gone


def _decoded_path(target: str) -> str:
    """The path of an origin-form target, percent-decoded as aiohttp's
    ``request.path`` is (routes match on it)."""
    path = target.partition("?")[0]
    if "%" not in path:
        return path
    return URL(path, encoded=True).path
