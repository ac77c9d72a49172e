"""The plain path's upstream pool (GET/OPTIONS without a body) against upstreams that
answer in the less common, legal shapes: byte-level servers, not aiohttp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import StartGateway

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_close_delimited_body_is_relayed_whole(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: Callable[[Handler], Awaitable[str]],
) -> None:
    """No Content-Length, not chunked: the body ends when the upstream closes."""
    body = b"".join(b"line %d\n" % i for i in range(5000))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        )
        for start in range(0, len(body), 4096):
            writer.write(body[start : start + 4096])
            await writer.drain()
        writer.close()

    gw = await start_gateway(upstream_url=await raw_upstream(handler))
    for _ in range(2):  # and the next request gets a fresh connection
        async with http.get(gw.url + "/x") as response:
            assert response.status == 200
            assert await response.read() == body
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "reset"}) == 0
    )


async def test_interim_103_is_skipped_for_the_final_response(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")
        await writer.drain()
        writer.close()

    gw = await start_gateway(upstream_url=await raw_upstream(handler))
    async with http.get(gw.url + "/x") as response:
        assert response.status == 201
        assert response.headers["X-Final"] == "yes"
        assert "Link" not in response.headers
        assert await response.read() == b"final"


async def test_keep_alive_connection_closed_by_upstream_is_retried_once(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: Callable[[Handler], Awaitable[str]],
) -> None:
    """The upstream answers keep-alive, then drops the idle connection: the
    next request on the pooled connection fails before any byte and is sent
    again on a new one (the keep-alive race), invisible to the client."""
    served: list[int] = []
    first_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        served.append(len(served))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if len(served) == 1:
            writer.close()  # idle close right after the answer
            await writer.wait_closed()
            first_closed.set()
            return
        writer.close()

    gw = await start_gateway(upstream_url=await raw_upstream(handler))
    async with http.get(gw.url + "/a") as response:
        assert response.status == 200
    await first_closed.wait()
    async with http.get(gw.url + "/b") as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    assert served == [0, 1]


async def test_invalid_http_from_upstream_is_502(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    gw = await start_gateway(upstream_url=await raw_upstream(handler))
    async with http.get(gw.url + "/x") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_invalid"
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "invalid"}) == 1
    )
