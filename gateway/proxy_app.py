"""⓪ The proxy listener's one handler, in the order a request meets it:

    identify ① -> route ② -> decide ③ -> (429 ⑤ | forward ④) -> metrics + log ⑥

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

from gateway.access_log import AccessLog
from gateway.clients import ClientIdentifier
from gateway.config.model import GatewayConfig
from gateway.headers import forwarded_for, rate_limit_headers, upstream_request_headers
from gateway.limiting.limiter import DENIED, Decision, Limiter
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.store import BucketStore
from gateway.metrics import Metrics
from gateway.responses import error_response, rate_limited, upstream_failed
from gateway.upstream import ClientBodyError, Relay, Upstream
from gateway.websocket import is_websocket_upgrade, proxy_websocket

__all__ = ["Gateway", "Snapshot"]

# nginx's $status for "client closed the connection before we answered".
CLIENT_CLOSED_STATUS: Final = 499
_CONCURRENCY_DENIED: Final = Decision(DENIED, None, 0, 1.0, 1.0)
# Answers to a request body we refused: the rest of it is not worth reading.
_CLOSE_AFTER_STATUSES: Final = frozenset({408, 413})


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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        snapshot = self.snapshot
        config = snapshot.config
        headers = request.headers
        limiter = snapshot.limiter
        route = limiter.routes.match(request.path)
        route_metrics = self.metrics.route(route.label)
        peer = request.remote or "-"
        identifier = snapshot.identifier
        api_header = identifier.header
        client = identifier.identify(
            peer,
            forwarded_for(headers),
            headers.get(api_header) if api_header else None,
        )
        request_id = headers.get("X-Request-ID") or self._new_request_id()
        relay = Relay()
        response: web.StreamResponse | None = None
        max_concurrent = config.clients.max_concurrent
        # The in-flight slot is taken before the limiter is asked, so a burst
        # cannot slip past the cap while a (redis) decision is pending; a
        # request refused for concurrency costs no token.
        if not self._enter(client, max_concurrent):
            decision = _CONCURRENCY_DENIED
            route_metrics.decisions[DENIED].inc()
            response = self._reject(
                429, "concurrency", f"at most {max_concurrent} requests in flight per client"
            )
            response.headers["Retry-After"] = "1"
        else:
            try:
                decision = await limiter.decide(route, client)
                route_metrics.decisions[decision.outcome].inc()
                if decision.outcome is DENIED:
                    try:
                        relay.response = rate_limited(request, decision, request_id)
                        relay.status = 429
                        relay.bytes_out = relay.response.body_length
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
        if relay.error is not None:
            route_metrics.upstream_errors[relay.error.kind].inc()
        if relay.upstream_seconds is not None:
            route_metrics.upstream_duration.observe(relay.upstream_seconds)
        status = CLIENT_CLOSED_STATUS if relay.client_gone else relay.status
        route_metrics.response(status).inc()
        duration = time.perf_counter() - started
        route_metrics.duration.observe(duration)
        self.access_log.put((
            time.time(), request_id, client, request.method, request.raw_path,
            route.label, decision.outcome, status,
            decision.tokens_left if decision.limit is not None else None,
            relay.upstream_seconds * 1000 if relay.upstream_seconds is not None else None,
            duration * 1000, relay.bytes_in, relay.bytes_out,
        ))  # fmt: skip
        return response

    def _reject(self, status: int, reason: str, detail: str) -> web.Response:
        self.metrics.count_rejected(reason)
        return error_response(status, reason, detail)

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
            return self._reject(
                413, "body_too_large", f"request bodies are limited to {max_body} bytes"
            )
        target = request_target(request)
        if target is None:
            return self._reject(
                405 if request.method == "CONNECT" else 400,
                "bad_target",
                "only origin-form and absolute-form targets are proxied",
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
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
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
            return self._reject(exc.status, exc.reason, str(exc))
        if relay.error is not None and relay.status == 0:
            return upstream_failed(relay.error)
        return None
