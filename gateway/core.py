"""The request core: every rule a request meets, written once, with no I/O.

Both request paths are thin shells over this module (proxy_app.py): front.py's
plain requests, answered from callbacks, and the requests aiohttp's server
parsed. As h11 is a state machine its callers feed, the core takes what a
shell parsed (a ``RequestHead``) and says what to do; the shell does the I/O
and hands the result back for the close:

    open(head) -> Call              ① identify, request id; ② route
    enter(call) -> Answer | None    ``check`` (a bad Host, header names with
                                    "_": 400), then the client's in-flight
                                    slot (max_concurrent)
    decide_now(call) -> Verdict     ③ decided and counted once; None when the
    settle(call, decision)             store needs I/O: the shell awaits
                                       ``decision(call)`` and calls ``settle``
        Deny       the 429, as bytes ready to write
        Refuse     one of our answers (403 for a denied client, 413, 400, 405)
        Forward    the target, the upstream request fields, our response
                   fields, and the wait of a request its queue delayed
    waited(call)                    a delayed request's wait is over (or its client left)
    own_answer(call, answer)        ⑤ our answers carry our fields, as bytes
    failed(call)                    an upstream that failed before answering: 502/504
    close(call)                     free the slot; ⑥ metrics and the access record

Nothing here awaits, opens a socket or imports aiohttp: the core is tested
without sockets (tests/unit/test_request_core.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any, Final, TypeVar, overload
from urllib.parse import urlsplit

from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway.access_log import AccessLog
from gateway.clients import EXEMPT, ClientIdentifier
from gateway.config.model import GatewayConfig, Underscores
from gateway.errors import UpstreamError
from gateway.headers import (
    OUR_RESPONSE_FIELDS,
    OUR_UNLIMITED_RESPONSE_FIELDS,
    field_pairs,
    forwarded_for,
    rate_limit_fields,
    rate_limit_headers,
    upstream_request_headers,
    valid_host,
)
from gateway.limiting.limiter import (
    ALLOWED,
    BLOCKED,
    BLOCKED_DECISION,
    DELAYED,
    DENIED,
    EXEMPT_DECISION,
    SHADOW_DENIED,
    Decision,
    Limiter,
)
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.routes import Route
from gateway.limiting.store import BucketStore
from gateway.metrics import Metrics
from gateway.raw_response import whole_response
from gateway.responses import JSON_CONTENT_TYPE as _JSON
from gateway.responses import Answer, error_answer, rate_limited, upstream_failed
from gateway.top_clients import TopClients

__all__ = [
    "CLIENT_CLOSED_STATUS",
    "Call",
    "Deny",
    "Forward",
    "Idle",
    "Ours",
    "Outcome",
    "Refuse",
    "RequestCore",
    "RequestHead",
    "Snapshot",
    "TlsRequestHead",
    "Verdict",
    "decoded_path",
    "origin_form",
]

# Three hex digits for each of 0..4095: the tail of a generated request id.
_HEX3: Final = tuple(f"{n:03x}" for n in range(4096))
# nginx's $status for "client closed the connection before we answered".
CLIENT_CLOSED_STATUS: Final = 499
_CONCURRENCY_DENIED: Final = Decision(DENIED, None, EXEMPT_DECISION.result)
_FORBIDDEN_BODY: Final = b'{"error": "forbidden"}'


class RequestHead:
    """What a shell parsed of one request: the core's only input.

    ``target`` is the request target as received; ``headers`` decoded as
    aiohttp decodes them (UTF-8 with surrogateescape), on both paths, so a
    client is identified and logged alike whichever path served it.
    ``content_length`` is None without a body or with a chunked one (the
    plain path serves only requests without one). ``scheme`` is what the
    listener serves, a property so that a TLS listener's heads say "https"
    at no cost per request, and aiohttp's heads read it only when a
    request is forwarded."""

    __slots__ = ("content_length", "headers", "http10", "keep_alive", "method", "peer",
                 "target")  # fmt: skip

    def __init__(
        self,
        method: str,
        target: str,
        headers: MultiMapping[str],
        peer: str,
        http10: bool,
        keep_alive: bool,
    ) -> None:
        # Positional parameters: built on every request, and CPython matches
        # positional arguments faster than keywords.
        self.method = method
        self.target = target
        self.headers = headers
        self.peer = peer
        self.http10 = http10
        self.keep_alive = keep_alive
        self.content_length: int | None = None

    @property
    def scheme(self) -> str:
        return "http"


class TlsRequestHead(RequestHead):
    """A plain request that came over TLS: ``X-Forwarded-Proto: https``."""

    __slots__ = ()

    @property
    def scheme(self) -> str:
        return "https"


def origin_form(method: str, target: str) -> str | None:
    """The path and query to send upstream, byte for byte. An absolute-form
    target (``GET http://host/x``, RFC 9112 section 3.2.2) is accepted but
    only its path and query are used: the gateway proxies to its configured
    upstream and nowhere else. CONNECT and ``*`` have no meaning here (None)."""
    if target.startswith("/"):
        return target
    if method == "CONNECT" or "://" not in target:
        return None
    parts = urlsplit(target)
    if parts.scheme.lower() not in ("http", "https"):
        return None
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


def decoded_path(target: str) -> str:
    """The path of a target without query and fragment, percent-decoded as
    aiohttp's ``request.path`` is: routes match on it."""
    path = target.partition("?")[0]
    if "#" in path:
        path = path.partition("#")[0]
    if "%" not in path:
        return path
    return URL(path, encoded=True).path


class Snapshot:
    """Everything derived from one config. Immutable once built; a reload
    builds a new one and swaps the reference, so a request that started
    under the old config finishes under it."""

    __slots__ = ("config", "identifier", "limiter")

    def __init__(self, config: GatewayConfig, clock: RefillClock, store: BucketStore) -> None:
        self.config = config
        self.limiter = Limiter(config, clock, store)
        self.identifier = ClientIdentifier(config.clients)


class Ours:
    """The fields we add to a relayed response: the rate-limit fields (on a
    limited route) and X-Request-ID, as header lines ready to write, and the
    lower-case names an upstream's own copies are dropped by."""

    __slots__ = ("fields", "replaced")

    def __init__(self, fields: bytes, replaced: frozenset[bytes]) -> None:
        self.fields = fields
        self.replaced = replaced

    def pairs(self) -> list[tuple[str, str]]:
        """The same fields as (name, value) pairs (a WebSocket handshake)."""
        return field_pairs(self.fields)


class Outcome:
    """What answering one request produced, written by the shells and the
    relay: the status sent, bytes each way, the upstream's time and failure."""

    __slots__ = ("bytes_in", "bytes_out", "client_gone", "error", "response_started",
                 "status", "upstream_addr", "upstream_seconds")  # fmt: skip

    def __init__(self) -> None:
        self.status = 0
        # True once the response head went to the client: a failure after
        # that cannot be answered, only cut.
        self.response_started = False
        self.upstream_seconds: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: UpstreamError | None = None
        self.client_gone = False
        # The servers tried, as nginx's $upstream_addr: "host:port", or
        # "a:80, b:80" when a failure sent the request on to another.
        self.upstream_addr: str | None = None


class Call(Outcome):
    """One request on either path, from ``open`` to ``close``; also the
    ``policy.Identity`` its limits key on (client, ip, headers)."""

    __slots__ = ("client", "closed", "decision", "head", "holds_slot", "ip", "listed", "queued",
                 "refunded", "request_id", "route", "snapshot", "started")  # fmt: skip

    def __init__(
        self,
        head: RequestHead,
        snapshot: Snapshot,
        route: Route,
        identity: tuple[str, str, str | None],
        request_id: str,
    ) -> None:
        # Outcome's fields set here, not through super().__init__(): one
        # call less on every request.
        self.status = 0
        self.response_started = False
        self.upstream_seconds: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: UpstreamError | None = None
        self.client_gone = False
        self.upstream_addr: str | None = None
        self.started = time.perf_counter()
        self.head = head
        self.snapshot = snapshot
        self.route = route
        self.client, self.ip, self.listed = identity
        self.request_id = request_id
        self.holds_slot = False
        self.queued = False  # waiting for reserved tokens
        self.refunded = False  # its tokens went back: never twice
        self.decision: Decision | None = None
        self.closed = False

    @property
    def headers(self) -> MultiMapping[str]:
        return self.head.headers


# Answer 429: the whole response, ready to write (the core set the call's
# status and bytes_out). Plain bytes, not an object around them: the denied
# path is the one a flood hits.
Deny = bytes


class Refuse:
    """Answer with one of ours instead of forwarding."""

    __slots__ = ("answer",)

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class Forward:
    """Send upstream: ``target`` (origin-form), ``headers`` for the upstream,
    ``ours`` for the response; after ``delay_seconds`` when the request
    reserved tokens that are not there yet (a route's ``queue``): the shell
    waits, then calls ``RequestCore.waited``."""

    __slots__ = ("delay_seconds", "headers", "ours", "target")

    def __init__(
        self, target: str, headers: CIMultiDict[str], ours: Ours, delay_seconds: float = 0.0
    ) -> None:
        self.target = target
        self.headers = headers
        self.ours = ours
        self.delay_seconds = delay_seconds


Verdict = Deny | Refuse | Forward
C = TypeVar("C", bound=Call)


class Idle:
    """Set while no request is in flight; ``await wait()`` until it is.
    asyncio.Event's, but its set() and clear() are Python-level calls on
    every request, and these compile to a flag."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class RequestCore:
    """The proxy's shared state (the current snapshot, requests in flight,
    request ids) and the rules every request meets. Built by server.py."""

    def __init__(self, snapshot: Snapshot, metrics: Metrics, access_log: AccessLog) -> None:
        self.snapshot = snapshot
        self.metrics = metrics
        self.access_log = access_log
        self.inflight = 0
        self._inflight_by_client: dict[str, int] = {}
        self.idle = Idle()
        # Delayed requests waiting now, per route (bounded by queue.max_queued).
        self._queued: dict[str, int] = {}
        # Request ids: a random per-process prefix and a counter in 16 hex
        # digits. Unique across processes and restarts without a getrandom()
        # syscall per request (os.urandom showed up in the denied path's
        # profile). The counter's last three digits come from a table and the
        # rest is formatted once per 4096 requests: compiled, format() is a
        # generic call per request.
        self._request_id_prefix = os.urandom(8).hex()
        self._next_request_id = 0
        self._request_id_high = -1
        self._request_id_head = ""
        # The last Host value found valid: nearly every request repeats it,
        # so the plain path compares one string instead of running the regex.
        self._valid_host: str | None = None
        # Who is denied most (shadow would-be denials too), for /admin/clients:
        # fixed memory however many clients are denied.
        self.top_denied = TopClients()

    @overload
    def open(self, head: RequestHead) -> Call: ...

    @overload
    def open(self, head: RequestHead, cls: type[C]) -> C: ...

    def open(self, head: RequestHead, cls: type[Call] = Call) -> Call:
        """① Who is the client, and the request id; ② which route. ``cls``: a
        shell's own kind of Call, holding what its steps share."""
        snapshot, route, identity, request_id = self.identify(head)
        return cls(head, snapshot, route, identity, request_id)

    def identify(
        self, head: RequestHead
    ) -> tuple[Snapshot, Route, tuple[str, str, str | None], str]:
        """What ``open`` gives a Call, for a shell that makes its own kind
        directly (compiled, ``PlainCall(...)`` is a direct call, where
        calling ``cls`` goes through the type's generic call and parses its
        arguments)."""
        snapshot = self.snapshot
        target = head.target
        if target[:1] != "/":  # absolute-form, or nothing we forward
            target = origin_form(head.method, target) or target
        route = snapshot.limiter.routes.match(decoded_path(target), head.method)
        headers = head.headers
        identifier = snapshot.identifier
        api_header = identifier.header
        identity = identifier.identify(
            head.peer,
            # Read only where a trusted proxy may have sent it.
            forwarded_for(headers) if identifier.trusts_proxies else None,
            headers.get(api_header) if api_header else None,
        )
        request_id = headers.get("X-Request-ID") or self._new_request_id()
        return snapshot, route, identity, request_id

    def _new_request_id(self) -> str:
        seq = self._next_request_id
        self._next_request_id = seq + 1
        high = seq >> 12
        if high != self._request_id_high:
            self._request_id_high = high
            # format(), not an f-string's spec: compiled, that is a str.format() call
            self._request_id_head = self._request_id_prefix + format(high, "013x")
        return self._request_id_head + _HEX3[seq & 0xFFF]

    def check(self, call: Call) -> Answer | None:
        """The 400 for a head no decision is made for: a Host that is not
        ``reg-name / IPv4 / [IPv6]`` with an optional port (RFC 9112 section
        3.2; counted ``bad_host``), or, under ``server.underscores_in_headers:
        reject``, a header name with ``_``; 501 for a transfer coding other
        than chunked (counted ``transfer_coding``). Under ``drop`` (the default) such
        a request goes on, its request counted once as ``underscore_header``;
        ``settle`` leaves those fields out of what is sent upstream. A
        missing or repeated Host is the parsers' 400 already."""
        headers = call.head.headers
        host = headers.get("Host")
        if host is not None and host != self._valid_host:
            if not valid_host(host):
                self.metrics.count_rejected("bad_host")
                return error_answer(400, "bad_request", "invalid Host header")
            self._valid_host = host
        if "Transfer-Encoding" in headers:
            for value in headers.getall("Transfer-Encoding"):
                if any(c.strip(" \t").lower() != "chunked" for c in value.split(",")):
                    # A coding may be removed only by decoding it (RFC 9112
                    # section 6.1); we decode none but chunked.
                    self.metrics.count_rejected("transfer_coding")
                    return error_answer(
                        501, "not_implemented", "transfer codings other than chunked"
                    )
        underscores = call.snapshot.config.server.underscores_in_headers
        # One join in C rather than a Python loop over the names: this runs
        # on every request.
        if underscores is not Underscores.ALLOW and "_" in "".join(headers):
            self.metrics.count_rejected("underscore_header")
            if underscores is Underscores.REJECT:
                return error_answer(
                    400, "bad_request", "header names with underscores are refused"
                )
        return None

    def enter(self, call: Call) -> Answer | None:
        """``check`` the head, then take the client's in-flight slot; the 429
        to send when it is at ``clients.max_concurrent``. Both come before the
        limiter is asked, so a refused request costs no token, and a burst
        cannot slip past the cap while a (redis) decision is pending."""
        refused = self.check(call)
        if refused is not None:
            return refused
        max_concurrent = call.snapshot.config.clients.max_concurrent
        if max_concurrent and call.listed is None:  # allow/deny lists: no limit applies
            client = call.client
            current = self._inflight_by_client.get(client, 0)
            if current >= max_concurrent:
                call.decision = _CONCURRENCY_DENIED
                self.metrics.route(call.route.label).decisions[DENIED].inc()
                self.top_denied.note(client, call.route.label, time.monotonic())
                self.metrics.count_rejected("concurrency")
                answer = error_answer(
                    429,
                    "concurrency",
                    f"at most {max_concurrent} requests in flight per client",
                )
                answer.headers.append(("Retry-After", "1"))
                return answer
            self._inflight_by_client[client] = current + 1
        call.holds_slot = True
        self.inflight += 1
        self.idle.clear()
        return None

    def decide_now(self, call: Call) -> Verdict | None:
        """③ Decide at once; None when the store needs I/O (redis): then the
        shell awaits ``decision(call)`` and calls ``settle``."""
        listed = call.listed
        if listed is not None:
            return self.settle(call, EXEMPT_DECISION if listed == EXEMPT else BLOCKED_DECISION)
        decision = call.snapshot.limiter.decide_now(
            call.route, call, self._max_wait(call.route) if call.route.max_wait_seconds else 0.0
        )
        if decision is None:
            return None
        return self.settle(call, decision)

    def decision(self, call: Call) -> Coroutine[Any, Any, Decision]:
        """The decision ``decide_now`` could not make at once, for the shell
        to await (the core itself never awaits)."""
        return call.snapshot.limiter.decide(call.route, call, self._max_wait(call.route))

    def _max_wait(self, route: Route) -> float:
        """The route's queue, while it has room in this process."""
        if (
            route.max_wait_seconds
            and not route.shadow
            and self._queued.get(route.key, 0) < route.max_queued
        ):
            return route.max_wait_seconds
        return 0.0

    def settle(self, call: Call, decision: Decision) -> Verdict:
        """What to do now that ``decision`` is made (counted here, once)."""
        call.decision = decision
        self.metrics.route(call.route.label).decisions[decision.outcome].inc()
        head = call.head
        outcome = decision.outcome
        if outcome is DENIED or outcome is SHADOW_DENIED:
            self.top_denied.note(call.client, call.route.label, time.monotonic())
        if outcome is DENIED:
            data, body_length = rate_limited(
                decision, call.request_id, keep_alive=head.keep_alive, http10=head.http10,
                head_only=head.method == "HEAD",
            )  # fmt: skip
            call.status = 429
            call.bytes_out = body_length
            return data
        if outcome is BLOCKED:
            return Refuse(Answer(403, [("Content-Type", _JSON)], _FORBIDDEN_BODY))
        config = call.snapshot.config
        max_body = config.max_body_size
        if max_body and (head.content_length or 0) > max_body:
            return self._refuse(
                413, "body_too_large", f"request bodies are limited to {max_body} bytes"
            )
        target = origin_form(head.method, head.target)
        if target is None:
            return self._refuse(
                405 if head.method == "CONNECT" else 400,
                "bad_target",
                "only origin-form and absolute-form targets are proxied",
            )
        peer = head.peer
        upstream_headers = upstream_request_headers(
            head.headers,
            peer=peer,
            scheme=head.scheme,
            request_id=call.request_id,
            peer_is_trusted=call.snapshot.identifier.is_trusted_peer(peer),
            preserve_host=call.route.preserve_host,
            drop_underscores=config.server.underscores_in_headers is Underscores.DROP,
        )
        fields = (
            rate_limit_fields(decision)
            + b"X-Request-ID: "
            + call.request_id.encode("utf-8", "surrogateescape")
            + b"\r\n"
        )
        replaced = (
            OUR_RESPONSE_FIELDS
            if decision.limits is not None
            else OUR_UNLIMITED_RESPONSE_FIELDS
        )
        if outcome is DELAYED:
            call.queued = True
            key = call.route.key
            self._queued[key] = self._queued.get(key, 0) + 1
            return Forward(
                target, upstream_headers, Ours(fields, replaced), decision.delay_seconds
            )
        return Forward(target, upstream_headers, Ours(fields, replaced))

    def waited(self, call: Call, *, client_left: bool = False) -> None:
        """A delayed request's wait is over: it goes on to be forwarded, or,
        when its client left meanwhile, gives its reserved tokens back."""
        if not call.queued:
            return
        call.queued = False
        self._queued[call.route.key] -= 1
        decision = call.decision
        assert decision is not None
        if client_left:
            call.client_gone = True
            call.refunded = True
            call.snapshot.limiter.give_back(decision)
            return
        waited = time.perf_counter() - call.started
        self.metrics.route(call.route.label).queue_wait.observe(waited)

    def _refuse(self, status: int, reason: str, detail: str) -> Refuse:
        return Refuse(self.refusal(status, reason, detail))

    def refusal(self, status: int, reason: str, detail: str) -> Answer:
        """One of our answers to a client at fault (counted by ``reason``)."""
        self.metrics.count_rejected(reason)
        return error_answer(status, reason, detail)

    def failed(self, call: Call) -> Answer:
        """502/504 for an upstream that failed before answering."""
        assert call.error is not None
        return upstream_failed(call.error)

    def own_answer(self, call: Call, answer: Answer, *, keep_alive: bool = True) -> bytes:
        """⑤ One of our answers as the bytes to write: an admitted request's
        answer still carries the rate-limit fields (it cost a token), every
        one carries X-Request-ID. Sets ``call.status``."""
        decision = call.decision
        fields = answer.headers
        if (
            decision is not None
            and decision.limits is not None
            and decision.outcome is not DENIED
        ):
            fields = fields + rate_limit_headers(decision)
        fields = [*fields, ("X-Request-ID", call.request_id)]
        head = call.head
        call.status = answer.status
        call.bytes_out = 0 if head.method == "HEAD" else len(answer.body)
        return whole_response(
            answer.status, answer.reason, fields, answer.body,
            keep_alive=keep_alive and head.keep_alive, http10=head.http10,
            head_only=head.method == "HEAD",
        )  # fmt: skip

    def close(self, call: Call) -> None:
        """Free the client's in-flight slot; ⑥ count and log the request.
        Idempotent: a drain that cut a request may close it first."""
        if call.closed:
            return
        call.closed = True
        if call.holds_slot:
            call.holds_slot = False
            max_concurrent = call.snapshot.config.clients.max_concurrent
            if max_concurrent:
                remaining = self._inflight_by_client.pop(call.client, 1) - 1
                if remaining > 0:
                    self._inflight_by_client[call.client] = remaining
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
        if call.queued:  # cut while it waited: its reservation goes back
            self.waited(call, client_left=True)
        decision = call.decision
        if decision is None:  # cut before it was decided: nothing to count
            return
        route = call.route
        route_metrics = self.metrics.route(route.label)
        status = CLIENT_CLOSED_STATUS if call.client_gone else call.status
        charged = route.count_statuses
        if (
            charged is not None
            and status not in charged
            and (decision.outcome is ALLOWED or decision.outcome is DELAYED)
            and not call.refunded
        ):
            # Tokens are taken at admission, so concurrent requests cannot
            # overshoot; an answer the route does not charge gives them back.
            call.snapshot.limiter.give_back(decision)
            route_metrics.refunded.inc()
        if call.error is not None:
            route_metrics.upstream_errors[call.error.kind].inc()
        upstream_seconds = call.upstream_seconds
        if upstream_seconds is not None:
            route_metrics.upstream_duration.observe(upstream_seconds)
        route_metrics.response(status).inc()
        duration = time.perf_counter() - call.started
        route_metrics.duration.observe(duration)
        head = call.head
        self.access_log.put((
            time.time(), call.request_id, call.client, head.method, head.target,
            route_metrics.label, decision.outcome, status,
            decision.tokens_left if decision.limits is not None else None,
            upstream_seconds * 1000 if upstream_seconds is not None else None,
            duration * 1000, call.bytes_in, call.bytes_out, call.upstream_addr,
        ))  # fmt: skip
