"""④ WebSocket upgrades, proxied both ways.

The rate limit applies to the upgrade request (one token), not to messages.
Both sides run with autoping/autoclose off so pings, pongs and the close code
pass through as the peers sent them.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

from gateway.core import Call, Forward
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidError,
    UpstreamTimeoutError,
)
from gateway.raw_response import unrelayable_head
from gateway.relay import Downstream, relay_stream
from gateway.upstream import REFUSED_UPGRADE, RefusedUpgrade, Upstream

__all__ = ["is_websocket_upgrade", "proxy_websocket"]

# ws_connect makes its own handshake; the client's would conflict with it.
_HANDSHAKE_HEADERS: Final = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    """A WebSocket handshake (RFC 6455 section 4.1)?"""
    upgrade = headers.get("Upgrade")
    if upgrade is None or upgrade.lower() != "websocket":
        return False
    return "upgrade" in headers.get("Connection", "").lower()


async def _pump(
    source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
) -> None:
    # receive() rather than `async for`: the iterator stops *at* a CLOSE
    # frame, so its code and reason would never be forwarded.
    while True:
        message = await source.receive()
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type is WSMsgType.PONG:
            await sink.pong(message.data)
        elif message.type is WSMsgType.CLOSE:
            extra = message.extra
            reason = extra.encode() if isinstance(extra, str) else b""
            await sink.close(code=message.data or 1000, message=reason)
            return
        else:  # CLOSING, CLOSED, ERROR
            break
    if not sink.closed:
        await sink.close(code=source.close_code or 1000)


async def proxy_websocket(
    request: web.BaseRequest, upstream: Upstream, forward: Forward, call: Call, down: Downstream
) -> web.StreamResponse | None:
    """Connect upstream first, then accept the client. An upstream that
    answers the upgrade with anything but 101 has its answer relayed to the
    client as it is (``call.response_started``, None returned); one that
    cannot be reached or answers nothing usable sets ``call.error`` (502/504
    from the caller). Returns the response aiohttp's request loop finishes."""
    headers = forward.headers
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    protocols = tuple(
        p.strip()
        for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        if p.strip()
    )
    server = upstream.choose()
    call.upstream_addr = server.address
    retried = False
    refused = RefusedUpgrade()
    REFUSED_UPGRADE.set(refused)  # (this task's context: the handler's own)
    while True:
        try:
            upstream_ws = await upstream.upgrades.ws_connect(
                server.url_for(forward.target),
                headers=headers,
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
            )
            break
        except aiohttp.WSServerHandshakeError as exc:
            REFUSED_UPGRADE.set(None)
            if server.down:
                upstream.answered(server)  # it answered, if not with 101
            if refused.status and refused.complete:
                await _relay_refusal(
                    refused, down, forward, call, upstream.config.max_header_size
                )
            else:
                call.error = UpstreamError(f"upstream refused the upgrade: {exc.status}")
            return None
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            error: UpstreamError = UpstreamConnectError(f"cannot connect to upstream: {exc}")
        except (aiohttp.SocketTimeoutError, TimeoutError):
            error = UpstreamTimeoutError("no upgrade response from upstream")
        except aiohttp.ClientError as exc:
            error = UpstreamError(f"upstream upgrade failed: {exc}")
        upstream.failed(server, error)
        # Nothing was sent after a connect failure: another server may take it.
        retry = None if retried else upstream.next_server(server, error, idempotent=False)
        if retry is None:
            REFUSED_UPGRADE.set(None)
            call.error = error
            return None
        server, retried = retry, True
        call.upstream_addr = f"{call.upstream_addr}, {server.address}"
    REFUSED_UPGRADE.set(None)
    if server.down:
        upstream.answered(server)
    async with upstream_ws:
        response = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoclose=False,
            autoping=False,
            max_msg_size=0,
        )
        for name, value in forward.ours.pairs():
            response.headers[name] = value
        await response.prepare(request)
        call.status = 101
        call.response_started = True
        to_upstream = asyncio.create_task(_pump(response, upstream_ws))
        to_client = asyncio.create_task(_pump(upstream_ws, response))
        try:
            await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        if not response.closed:
            await response.close()
    return response


async def _relay_refusal(
    refused: RefusedUpgrade, down: Downstream, forward: Forward, call: Call, max_head: int
) -> None:
    """The upstream's answer to an upgrade it refused (a 401, a 426...),
    relayed as any answer is, with its body (up to MAX_REFUSAL_BYTES)."""
    problem = unrelayable_head(refused.raw_headers, max_head)
    if problem is not None:
        call.error = UpstreamInvalidError(problem)
        return
    body = [refused.body, b""]

    async def next_chunk() -> bytes:
        return body.pop(0)

    framed = [
        (name, value)
        for name, value in refused.raw_headers
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    framed.append((b"Content-Length", b"%d" % len(refused.body)))
    await relay_stream(
        refused.status, refused.reason, framed, next_chunk, down, forward.ours, call.head, call
    )
