"""Hostile framing on both request paths, over raw sockets (issue 13, items
3 and 4): transfer codings the gateway does not decode are refused (501 for
a request, 502 for an answer) instead of losing their label; an upstream
response head has one size bound, and one parser leniency, whichever of
the gateway's upstream clients reads it (the plain pool for a bodiless GET,
aiohttp's client for a POST)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import HAND_OVER, RequestPath, RunningGateway, StartGateway
from tests.helpers import (
    build_request,
    raw_connection,
    raw_exchange,
    read_request_head,
    read_response,
)
from tests.upstream_app import HITS

# How the upstream is reached: the plain pool (a bodiless GET) or aiohttp's
# client (a request with a body).
UPSTREAM_CLIENTS = ["GET", "POST"]

Respond = Callable[[bytes], bytes]


class ScriptedUpstream:
    """A byte-level upstream: reads each request (head and Content-Length
    body) and writes what ``respond(head)`` returns."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_request_head(reader)
                self.requests.append(head)
                writer.write(self.respond(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Respond], Awaitable[ScriptedUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(respond: Respond) -> ScriptedUpstream:
        upstream = ScriptedUpstream(respond)
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        servers.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        return upstream

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def request_with(method: str) -> bytes:
    if method == "POST":
        return build_request("POST", "/x", [("Content-Length", "2")], b"hi")
    return build_request(method, "/x")


def upstream_errors(gw: RunningGateway, kind: str) -> float:
    return gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": kind})


def answer(head_fields: bytes, body: bytes = b"ok") -> Respond:
    def respond(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + head_fields + b"\r\n" + body

    return respond


def padded_fields(size: int) -> bytes:
    """Content-Length 2 and 100-byte fields making a head of about ``size`` bytes."""
    fields = [b"Content-Length: 2\r\n"]
    index = 0
    while sum(map(len, fields)) < size:
        fields.append(b"X-Pad-%05d: %s\r\n" % (index, b"v" * 86))
        index += 1
    return b"".join(fields)


# --------------------------------------------------------------------------- 3. codings


# A request with a body is served by aiohttp's server from its first byte
# (front.py hands it over) or after a request served plain: both leads.
LEADS = [pytest.param(b"", id="fresh"), pytest.param(HAND_OVER, id="handed_over")]


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize(
    ("coding", "status", "error"),
    [
        # chunked last: the framing is known, the other coding cannot be
        # removed without decoding it (RFC 9112 section 6.1): 501.
        ("gzip, chunked", 501, "not_implemented"),
        ("deflate,chunked", 501, "not_implemented"),
        # chunked not last, or absent: the body's length is unknown (RFC
        # 9112 section 6.3): 400 and close.
        ("identity", 400, "bad_request"),
        ("chunked, gzip", 400, "bad_request"),
        ("x-custom", 400, "bad_request"),
    ],
)
async def test_request_with_a_transfer_coding_other_than_chunked_is_refused(
    start_gateway: StartGateway, upstream: TestServer, lead: bytes, coding: str, status: int,
    error: str,
) -> None:  # fmt: skip
    gw = await start_gateway()
    chunks = b"2\r\nok\r\n0\r\n\r\n"
    data = build_request("POST", "/te", [("Transfer-Encoding", coding)], chunks)
    async with raw_connection(gw) as (reader, writer):
        writer.write(lead + data)
        response = await asyncio.wait_for(read_response(reader), 10)
        rest = await asyncio.wait_for(reader.read(), 10)
    assert response.status == status, (response.status, response.body[:200])
    assert response.json()["error"] == error
    assert rest == b"", "the connection is closed: its body was not read"
    assert upstream.app[HITS] == []
    if status == 501:
        assert gw.metric("gateway_rejected_requests_total", {"reason": "transfer_coding"}) == 1


async def test_request_with_chunked_alone_is_still_forwarded(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()

    data = build_request(
        "POST", "/echo", [("Transfer-Encoding", "chunked")], b"2\r\nok\r\n0\r\n\r\n"
    )
    response = await raw_exchange(gw, data)
    assert response.status == 200, response.body[:200]


@pytest.mark.parametrize("method", UPSTREAM_CLIENTS)
@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip\r\nConnection: close\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: br\r\n",
    ],
    ids=["gzip", "gzip_chunked", "two_lines"],
)
async def test_answer_with_a_transfer_coding_other_than_chunked_is_502(
    start_gateway: StartGateway, scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    method: str, framing: bytes,
) -> None:  # fmt: skip
    body = b"2\r\nok\r\n0\r\n\r\n" if b"chunked" in framing else b"\x1f\x8b gzip bytes"
    backend = await scripted(answer(framing, body))
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")

    response = await raw_exchange(gw, request_with(method))
    assert response.status == 502, (response.status, response.headers, response.body[:200])
    assert response.json()["error"] == "upstream_invalid"
    assert "transfer coding" in response.json()["detail"]
    assert upstream_errors(gw, "invalid") == 1
    assert upstream_errors(gw, "reset") == 0


# --------------------------------------------------------------------------- 4. heads


@pytest.mark.parametrize("method", UPSTREAM_CLIENTS)
@pytest.mark.parametrize(
    ("size", "status"),
    [(20_000, 200), (40_000, 502), (1_100_000, 502)],
    ids=["20k", "40k", "1m"],
)
async def test_one_bound_on_the_upstream_head_on_both_upstream_clients(
    start_gateway: StartGateway, scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    method: str, size: int, status: int,
) -> None:  # fmt: skip
    backend = await scripted(answer(padded_fields(size)))
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")

    response = await raw_exchange(gw, request_with(method))
    assert response.status == status, (response.status, response.body[:200])
    if status == 502:
        if size < 100_000:  # (past 8192 fields, aiohttp's count says so first)
            assert "over 32768 bytes" in response.json()["detail"]
        assert upstream_errors(gw, "invalid") == 1
    else:
        assert response.body == b"ok"
        assert "X-Pad-00000" in response.headers


@pytest.mark.parametrize("method", UPSTREAM_CLIENTS)
async def test_the_head_bound_is_a_setting(
    start_gateway: StartGateway, scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    method: str,
) -> None:  # fmt: skip
    backend = await scripted(answer(padded_fields(3000)))
    gw = await start_gateway(
        upstream_url=f"http://127.0.0.1:{backend.port}", upstream={"max_header_size": 2048}
    )

    response = await raw_exchange(gw, request_with(method))
    assert response.status == 502
    assert "over 2048 bytes" in response.json()["detail"]


async def test_a_head_that_never_ends_is_cut_at_the_bound(
    start_gateway: StartGateway,
) -> None:
    """Many small lines arriving without an end: the plain pool stops at the
    bound, not when the upstream stops sending."""
    sent = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        hung_up = asyncio.ensure_future(reader.read(1))
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for index in range(200_000):
                if hung_up.done():
                    break
                writer.write(b"X-%d: v\r\n" % index)
                await writer.drain()
                await asyncio.sleep(0)  # the gateway runs in this loop: let it read
            else:
                return  # sent it all: the gateway did not stop reading
            sent.set()
        except ConnectionError:
            sent.set()
        finally:
            hung_up.cancel()
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(upstream_url=f"http://127.0.0.1:{port}")

        response = await raw_exchange(gw, build_request("GET", "/x"))
        assert response.status == 502, response.body
        await asyncio.wait_for(sent.wait(), 10)  # the gateway hung up on it
    finally:
        server.close()
        await server.wait_closed()


FOLDED = b"Content-Length: 2\r\nX-Folded: one\r\n two\r\n"
LONE_LF = b"Content-Length: 2\nX-Lone: lf\n"


@pytest.mark.parametrize("method", UPSTREAM_CLIENTS)
@pytest.mark.parametrize(
    ("fields", "name", "value"),
    [(FOLDED, "X-Folded", "one two"), (LONE_LF, "X-Lone", "lf")],
    ids=["obs_fold", "lone_lf"],
)
async def test_obs_fold_and_lone_lf_are_read_alike_by_both_upstream_clients(
    start_gateway: StartGateway, scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    method: str, fields: bytes, name: str, value: str,
) -> None:  # fmt: skip
    """RFC 9112: a proxy may replace obs-fold with SP (section 5.2) and may
    take a lone LF as a line's end (section 2.2); aiohttp's client does
    both, so the plain pool does too. The client gets CRLF and no fold."""
    head = b"HTTP/1.1 200 OK\n" if b"\n" in fields and b"\r" not in fields else None
    respond = answer(fields) if head is None else (lambda _: head + fields + b"\nok")
    backend = await scripted(respond)
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")

    async with raw_connection(gw) as (reader, writer):
        writer.write(request_with(method))
        response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 200, (response.status, response.body[:200])
    assert response.headers[name] == value
    assert response.body == b"ok"


@pytest.mark.parametrize("method", UPSTREAM_CLIENTS)
@pytest.mark.parametrize(
    "field",
    [b"X-Ctl: a\x01b\r\n", b"X-Nul: a\x00b\r\n", b"Bad Name: v\r\n", b"Content-Length : 2\r\n"],
    ids=["control", "nul", "space_in_name", "space_before_colon"],
)
async def test_fields_that_are_not_http_are_502_on_both_upstream_clients(
    start_gateway: StartGateway, scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    method: str, field: bytes,
) -> None:  # fmt: skip
    fields = field if b"Content-Length" in field else b"Content-Length: 2\r\n" + field
    backend = await scripted(answer(fields))
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")

    response = await raw_exchange(gw, request_with(method))
    assert response.status == 502, (response.status, response.headers, response.body[:200])
    assert upstream_errors(gw, "invalid") == 1


async def test_plain_get_on_the_aiohttp_path_has_the_same_head_bound(
    start_gateway: StartGateway,
    scripted: Callable[[Respond], Awaitable[ScriptedUpstream]],
    request_path: RequestPath,
) -> None:
    backend = await scripted(answer(padded_fields(40_000)))
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")
    response = await request_path.raw_exchange(gw, build_request("GET", "/x"))
    assert response.status == 502


# --------------------------------------------------------------------------- 7. upgrades


def refusing_upgrades() -> web.Application:
    async def refuse(request: web.Request) -> web.Response:
        size = int(request.query.get("size", "0"))
        if size:
            return web.Response(status=403, body=b"x" * size)
        return web.json_response(
            {"error": "login first"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="ws"', "X-Upstream": "yes"},
        )

    app = web.Application()
    app.router.add_get("/ws", refuse)
    return app


async def test_a_refused_websocket_upgrade_is_relayed_not_502(
    start_gateway: StartGateway,
) -> None:
    backend = TestServer(refusing_upgrades(), host="127.0.0.1")
    await backend.start_server()
    try:
        gw = await start_gateway(upstream_url=f"http://127.0.0.1:{backend.port}")
        handshake = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]
        response = await raw_exchange(gw, build_request("GET", "/ws", handshake))
        assert response.status == 401, (response.status, response.body[:200])
        assert response.json() == {"error": "login first"}
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="ws"'
        assert response.headers["X-Upstream"] == "yes"
        assert "RateLimit-Policy" in response.headers
        too_big = await raw_exchange(gw, build_request("GET", "/ws?size=100000", handshake))
        assert too_big.status == 502
        # Under the bound but read in several pieces: relayed whole.
        big = await raw_exchange(gw, build_request("GET", "/ws?size=60000", handshake))
        assert (big.status, big.body) == (403, b"x" * 60000)
        labels = {"route": "default", "code": "401"}
        assert gw.metric("gateway_responses_total", labels) == 1
    finally:
        await backend.close()


@pytest.mark.parametrize("lead", LEADS)
async def test_a_chunk_extension_that_never_ends_is_refused_400(
    start_gateway: StartGateway, upstream: TestServer, lead: bytes
) -> None:
    """llhttp skips chunk extensions without a bound: a client could send
    one forever. Past 16 KiB without a body byte (Node's cap): 400."""
    gw = await start_gateway()
    head = build_request("POST", "/upload", [("Transfer-Encoding", "chunked")])
    async with raw_connection(gw) as (reader, writer):
        writer.write(lead + head + b"5;")
        answered = asyncio.ensure_future(read_response(reader))
        sent = 0
        with contextlib.suppress(ConnectionError):
            while not answered.done() and sent < 4_000_000:
                writer.write(b"a" * 1000)
                await writer.drain()
                sent += 1000
                await asyncio.sleep(0)  # the gateway runs in this loop: let it read
        response = await asyncio.wait_for(answered, 10)
    assert sent < 200_000, f"{sent} bytes of extension were read"
    assert response.status == 400, (response.status, response.body[:200])
    assert response.json()["error"] == "chunk_extension"
    assert gw.metric("gateway_rejected_requests_total", {"reason": "chunk_extension"}) == 1


async def test_small_chunk_extensions_on_many_chunks_pass(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    chunks = b"".join(b"1;name=%s\r\nx\r\n" % (b"v" * 1000) for _ in range(50)) + b"0\r\n\r\n"
    head = build_request("POST", "/upload", [("Transfer-Encoding", "chunked")])
    response = await raw_exchange(gw, head + chunks)
    assert response.status == 200, (response.status, response.body[:200])
    assert response.json()["received"] == 50
