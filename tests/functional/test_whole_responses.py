"""Responses the gateway writes in one piece (raw_response.py): 429s and
complete answers of the plain upstream pool. Framing and keep-alive must be
what aiohttp's own responses would have given."""

from __future__ import annotations

import asyncio

from tests.conftest import RequestPath, StartGateway
from tests.helpers import (
    GUARD_SECONDS,
    build_request,
    free_port,
    limits,
    raw_connection,
    read_response,
)


async def test_denied_head_has_length_but_no_body_and_keeps_the_connection(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(limits=limits(1))
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/first"))
        assert (await read_response(reader)).status == 200
        writer.write(build_request("HEAD", "/denied"))
        head = await read_response(reader, head=True)
        assert head.status == 429
        assert int(head.headers["Content-Length"]) > 0
        assert head.body == b""
        assert "Date" in head.headers
        # The same connection still frames the next answer correctly.
        writer.write(build_request("GET", "/denied-again"))
        again = await read_response(reader)
        assert again.status == 429
        assert again.json()["error"] == "rate_limited"
        assert len(again.body) == int(again.headers["Content-Length"])


async def test_http10_keep_alive_is_honoured_and_default_close_is_said(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    request_10 = b"GET /echo HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
    async with (
        asyncio.timeout(GUARD_SECONDS),
        request_path.raw_connection(gw) as (reader, writer),
    ):
        for _ in range(2):  # kept alive: the second request gets an answer too
            writer.write(request_10)
            response = await read_response(reader)
            assert response.status == 200
            assert response.headers["Connection"].lower() == "keep-alive"
    async with (
        asyncio.timeout(GUARD_SECONDS),
        request_path.raw_connection(gw) as (reader, writer),
    ):
        writer.write(b"GET /echo HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        response = await read_response(reader)
        assert response.status == 200
        assert response.headers["Connection"].lower() == "close"
        assert await reader.read() == b""  # and the gateway closes it


async def test_upstream_204_has_no_length_and_no_body(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    async with (
        asyncio.timeout(GUARD_SECONDS),
        request_path.raw_connection(gw) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(build_request("GET", "/status/204"))
            response = await read_response(reader)
            assert response.status == 204
            assert "Content-Length" not in response.headers
            assert "Transfer-Encoding" not in response.headers
            assert response.body == b""


async def test_connection_close_is_honoured_for_every_kind_of_answer(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    """An HTTP/1.1 ``Connection: close`` ends the connection after a relayed
    answer, a 429 and our own 502 alike, on both paths."""
    gw = await start_gateway(limits=limits(1))
    bad = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    request_path.watch(bad)
    close = [("Connection", "close")]
    for gateway, target, status in (
        (gw, "/first", 200),
        (gw, "/denied", 429),
        (bad, "/x", 502),
    ):
        async with (
            asyncio.timeout(GUARD_SECONDS),
            request_path.raw_connection(gateway) as (reader, writer),
        ):
            writer.write(build_request("GET", target, close))
            response = await read_response(reader)
            assert response.status == status
            assert response.headers["Connection"].lower() == "close"
            assert await reader.read() == b""  # and the gateway closes it
