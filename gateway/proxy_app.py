"""⓪ The proxy listener's two shells over the request core (core.py).

    plain path     front.py parsed the head itself; ``PlainCall`` answers it
                   at once where it can (a memory-store decision and its 429,
                   a request sent on an idle pooled upstream connection and
                   answered from that connection's callback), else in a task
                   (a connect, a redis decision, a body still streaming)
    aiohttp path   aiohttp's server parsed it (bodies, HEAD, upgrades);
                   ``ProxyHandlers.handle`` awaits each step

Both ask the core what to do (identify, route, slot, decide, verdict), write
through a ``relay.Downstream`` with the one relay, and close through the
core (slot, metrics, access record): each rule lives in one place.

One handler, no middleware chain: each middleware costs a coroutine frame per
request and here they would only pass state to each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Final

from aiohttp import HttpVersion11, web

from gateway.connection import AiohttpDownstream, sent_response
from gateway.core import Call, Deny, Forward, Ours, Refuse, RequestCore, RequestHead
from gateway.errors import ClientBodyError, UpstreamClosedError
from gateway.front import PENDING, FrontConnection, PlainOutcome
from gateway.relay import Downstream, relay_stream, relay_whole
from gateway.responses import Answer
from gateway.upstream import Upstream, UpstreamServer
from gateway.upstream_pool import UpstreamConnection
from gateway.websocket import is_websocket_upgrade, proxy_websocket

__all__ = ["PlainCall", "ProxyHandlers"]

# Answers to a request body we refused: the rest of it is not worth reading.
_CLOSE_AFTER_STATUSES: Final = frozenset({400, 408, 413, 501})


def _write_answer(core: RequestCore, call: Call, down: Downstream, answer: Answer) -> bool:
    """Write one of our answers; True when the connection may carry the
    next request."""
    keep_alive = answer.status not in _CLOSE_AFTER_STATUSES
    data = core.own_answer(call, answer, keep_alive=keep_alive)
    try:
        down.write(data)
    except ConnectionError:
        call.client_gone = True
        call.bytes_out = 0
        return False
    call.response_started = True
    return keep_alive


def _write_denial(call: Call, down: Downstream, deny: Deny) -> None:
    try:
        down.write(deny)
    except ConnectionError:
        call.client_gone = True
        call.bytes_out = 0
        return
    call.response_started = True


class AiohttpHead(RequestHead):
    """A request aiohttp's server parsed, as the core reads it; its scheme
    is read only when the request is forwarded."""

    __slots__ = ("_request",)

    def __init__(self, request: web.BaseRequest) -> None:
        # RequestHead's fields set here, not through its __init__: one call
        # less on every request of this path.
        self.method = request.method
        self.target = request.raw_path
        self.headers = request.headers
        self.peer = request.remote or "-"
        self.http10 = request.version < HttpVersion11
        self.keep_alive = request.keep_alive
        self.content_length = request.content_length
        self._request = request

    @property
    def scheme(self) -> str:
        return self._request.scheme


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class ProxyHandlers:
    """The proxy listener's handlers, one per path, over one core.
    ``upstreams``: by name (``Route.upstream``)."""

    def __init__(self, core: RequestCore, upstreams: Mapping[str, Upstream]) -> None:
        self.core = core
        self.upstreams = upstreams

    # -- the plain path --

    def serve_plain(self, conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        """A plain request (front.py): True/False when answered at once (may
        the connection stay open?), PENDING when the answer will come from
        the upstream's callback, else the coroutine that finishes it."""
        core = self.core
        snapshot, route, identity, request_id = core.identify(head)
        plain = PlainCall(head, snapshot, route, identity, request_id)
        plain.begin(self, conn)
        conn.track(plain)
        refusal = core.enter(plain)
        if refusal is not None:
            return plain.answer(refusal)
        verdict = core.decide_now(plain)
        if verdict is None:  # the store is remote: await its answer
            return plain.decide_and_act()
        if isinstance(verdict, Forward):
            return plain.forward(verdict)
        if isinstance(verdict, bytes):  # Deny: the 429
            _write_denial(plain, conn, verdict)
            return plain.end(True)
        return plain.answer(verdict.answer)

    # -- the aiohttp path --

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request front.py handed to aiohttp: bodies, HEAD, upgrades."""
        core = self.core
        call = core.open(AiohttpHead(request))
        keep_alive = False
        try:
            refusal = core.enter(call)
            if refusal is not None:
                keep_alive = _write_answer(core, call, AiohttpDownstream(request), refusal)
            else:
                verdict = core.decide_now(call)
                if verdict is None:
                    verdict = core.settle(call, await core.decision(call))
                if isinstance(verdict, Forward):
                    if verdict.delay_seconds:
                        await asyncio.sleep(verdict.delay_seconds)  # its reserved tokens
                        core.waited(call, client_left=_gone(request))
                    if call.client_gone:
                        pass  # it left while it waited: nothing to answer
                    elif is_websocket_upgrade(request.headers):
                        upgraded = await self._upgrade(
                            request, call, verdict, AiohttpDownstream(request)
                        )
                        if upgraded is not None:
                            return upgraded
                    else:
                        keep_alive = await self._forward(
                            request, call, verdict, AiohttpDownstream(request)
                        )
                elif isinstance(verdict, bytes):  # Deny: the 429, inlined (the flood's path)
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        call.client_gone = True
                        call.bytes_out = 0
                    else:
                        transport.write(verdict)
                        keep_alive = True
                else:
                    keep_alive = _write_answer(
                        core, call, AiohttpDownstream(request), verdict.answer
                    )
            if call.status in _CLOSE_AFTER_STATUSES and not keep_alive:
                # Don't linger reading the rest of a body we refused: the
                # answer is written, the connection is done.
                transport = request.transport
                if transport is not None:
                    transport.close()
        except asyncio.CancelledError:  # cut by a drain past drain_timeout
            call.client_gone = True
            raise
        except Exception:
            if call.response_started:  # aiohttp must not add its 500 behind ours
                request.writer.output_size += 1
            raise
        finally:
            core.close(call)
        # The relay's True means "framed so the connection could go on"; the
        # request's own Connection (or HTTP/1.0 default) has the last word.
        keep_alive = keep_alive and call.head.keep_alive and not call.client_gone
        return sent_response(call.status, call.bytes_out, keep_alive)

    async def _forward(
        self, request: web.BaseRequest, call: Call, forward: Forward, down: AiohttpDownstream
    ) -> bool:
        """Relay the upstream's answer, or answer ourselves: 100 Continue
        first when asked, 413/408/400 for a body at fault, 502/504 for an
        upstream that failed before answering."""
        core = self.core
        if not call.head.http10 and request.headers.get("Expect", "").lower() == "100-continue":
            # RFC 9110 15.2.1: the client waits for this before its body.
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError:  # it left already: nothing to forward
                call.client_gone = True
                return False
        try:
            keep_alive = await self.upstreams[call.route.upstream].forward(
                request, forward, down, call, call.snapshot.config.max_body_size
            )
        except ClientBodyError as exc:
            return _write_answer(
                core, call, down, core.refusal(exc.status, exc.reason, str(exc))
            )
        if call.error is not None and not call.response_started:
            return _write_answer(core, call, down, core.failed(call))
        return keep_alive

    async def _upgrade(
        self, request: web.BaseRequest, call: Call, forward: Forward, down: AiohttpDownstream
    ) -> web.StreamResponse | None:
        """A WebSocket upgrade: the response aiohttp must finish, or None
        when we answered (the upstream refused or failed: 502/504)."""
        upstream = self.upstreams[call.route.upstream]
        response = await proxy_websocket(request, upstream, forward, call, down)
        if response is None and not call.response_started:
            _write_answer(self.core, call, down, self.core.failed(call))
        return response


class PlainCall(Call):
    """One plain request: the core's ``Call`` with what the plain path's
    steps share, whether they run at once, in a callback or in a task
    (one object per request, not two). Also what a drain that ran out of
    time cancels (``front.InFlight``). ``RequestCore.open`` builds it as
    any Call; ``begin`` then adds the plain path's part."""

    __slots__ = ("conn", "core", "forwarding", "ours", "request_head", "sent", "server",
                 "shell", "timer", "upstream", "upstream_conn")  # fmt: skip

    def begin(self, shell: ProxyHandlers, conn: FrontConnection) -> None:
        """The plain path's part, set right after ``RequestCore.open``."""
        self.shell = shell
        self.core = shell.core
        self.conn = conn
        self.ours: Ours | None = None
        self.request_head = b""
        self.sent = 0.0
        # The upstream connection this request holds outside forward_plain.
        self.upstream_conn: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None  # a delayed request's wait

    def answer_now(self, verdict: Deny | Refuse) -> bool:
        """The 429 or one of our answers; the request is done."""
        if isinstance(verdict, bytes):  # Deny
            _write_denial(self, self.conn, verdict)
            return self.end(True)
        return self.answer(verdict.answer)

    async def decide_and_act(self) -> bool:
        """The decision needs I/O (redis): await it, then act in this task."""
        call = self
        core = self.core
        try:
            verdict = core.settle(call, await core.decision(call))
            if isinstance(verdict, Forward) and verdict.delay_seconds:
                await asyncio.sleep(verdict.delay_seconds)  # its reserved tokens
                core.waited(call, client_left=self.conn.is_closing())
                if call.client_gone:
                    return self.end(False)
        except BaseException:
            self.end(False)
            raise
        if isinstance(verdict, Forward):
            self._prepare(verdict)
            return await self.forward_in_task()
        return self.answer_now(verdict)

    def _prepare(self, forward: Forward) -> None:
        """Choose the server, and the request head for it."""
        head = self.head
        self.ours = forward.ours
        self.forwarding = forward
        upstream = self.shell.upstreams[self.route.upstream]
        self.upstream = upstream
        server: UpstreamServer = upstream.lone_server or upstream.choose()
        self.server = server
        self.request_head = server.pool.request_head(
            head.method, forward.target, forward.headers
        )
        self.sent = time.perf_counter()

    def forward(self, forward: Forward) -> PlainOutcome:
        """Send upstream: at once on an idle pooled connection (PENDING; the
        answer comes to ``on_head``), else in a task; a delayed request
        first waits for its reserved tokens, on a timer (PENDING)."""
        self._prepare(forward)
        if forward.delay_seconds:
            self.timer = asyncio.get_running_loop().call_later(
                forward.delay_seconds, self._waited
            )
            return PENDING
        server = self.server
        self.upstream_addr = server.address
        self.upstream_conn = server.pool.try_send(self.request_head, self.on_head)
        if self.upstream_conn is not None:
            return PENDING
        return self.forward_in_task()

    def _waited(self) -> None:
        """A delayed request's tokens are there: send it, unless its client
        left (its reservation goes back)."""
        self.timer = None
        conn = self.conn
        call = self
        self.core.waited(call, client_left=conn.is_closing())
        if call.client_gone:
            conn.finish(self.end(False))
            return
        server = self.server
        self.upstream_addr = server.address
        self.upstream_conn = server.pool.try_send(self.request_head, self.on_head)
        if self.upstream_conn is None:
            conn.continue_with(self.forward_in_task())

    def _release(self) -> None:
        upstream_conn, self.upstream_conn = self.upstream_conn, None
        if upstream_conn is not None:
            self.server.pool.release(upstream_conn)

    def cancel(self) -> None:
        """Cut by a drain that ran out of time (front.InFlight): give the
        upstream connection back unread, free the slot, log it as 499."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        upstream_conn = self.upstream_conn
        if upstream_conn is not None:
            upstream_conn.cancel_send()
            upstream_conn.close()
            self._release()
        self.client_gone = True
        self.end(False)

    def on_head(self, upstream_conn: UpstreamConnection) -> None:
        """The upstream's answer arrived (or the exchange failed)."""
        conn = self.conn
        call = self
        error = upstream_conn.error
        if isinstance(error, UpstreamClosedError):
            # The server had closed this kept-alive connection before our
            # request reached it (not its failure): once more, on another of
            # its connections (the pool retries once more on a fresh one,
            # then another server). A timeout is not sent again.
            self._release()
            conn.continue_with(self.forward_in_task())
            return
        call.upstream_seconds = time.perf_counter() - self.sent
        server = self.server
        if error is not None:
            self.upstream.failed(server, error)
            self._release()
            call.error = error
            conn.finish(self.answer(self.core.failed(call)))
            return
        if server.down:
            self.upstream.answered(server)
        if upstream_conn.complete:
            assert self.ours is not None
            reusable = relay_whole(upstream_conn, conn, self.ours, call.head, call)
            self._release()
            conn.finish(self.end(reusable))
        else:
            conn.continue_with(self.stream(upstream_conn))

    async def stream(self, upstream_conn: UpstreamConnection) -> bool:
        """Relay a body still arriving, in a task."""
        assert self.ours is not None
        reusable = False
        try:
            reusable = await relay_stream(
                upstream_conn.status, upstream_conn.raw_reason, upstream_conn.raw_headers,
                upstream_conn.next_chunk, self.conn, self.ours, self.head, self,
            )  # fmt: skip
        finally:
            self._release()
            reusable = self.end(reusable)
        return reusable

    async def forward_in_task(self) -> bool:
        """Connect (or wait for a pooled connection) and relay, in a task."""
        assert self.ours is not None
        call = self
        try:
            reusable = await self.upstream.forward_plain(
                self.server, self.request_head, self.forwarding, self.conn, call.head, call
            )
        except BaseException:
            self.end(False)
            raise
        if call.error is not None and not call.response_started:
            return self.answer(self.core.failed(call))
        return self.end(reusable)

    def answer(self, answer: Answer) -> bool:
        """Write one of our answers; the request is done."""
        return self.end(_write_answer(self.core, self, self.conn, answer))

    def end(self, reusable: bool) -> bool:
        """Close the request in the core (slot, metrics, log). True when the
        client connection may carry the next request."""
        call = self
        if call.closed:
            return False
        self.core.close(call)
        return reusable and not call.client_gone
