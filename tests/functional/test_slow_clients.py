"""Clients that stop reading, and a full upstream pool (issue 13, item 5).

A download its client never reads holds an upstream connection; without a
bound, a few such clients take every pooled connection and everyone else
waits. ``server.send_timeout`` cuts a client that takes no bytes for that
long (nginx's ``send_timeout``), and ``upstream.pool_timeout`` bounds the
wait for a pooled connection with a 503 (HAProxy's ``timeout queue``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from tests.conftest import HAND_OVER, RequestPath, RunningGateway, StartGateway
from tests.helpers import (
    RawResponse,
    build_request,
    poll,
    raw_connection,
    raw_exchange,
    read_head,
    read_response,
)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

DOWNLOAD_BYTES = 200_000_000
DOWNLOAD = f"/download?size={DOWNLOAD_BYTES}"
GUARD_SECONDS = 10


def rejected(gw: RunningGateway, reason: str) -> float:
    return gw.metric("gateway_rejected_requests_total", {"reason": reason})


async def starve_and_serve(
    gw: RunningGateway,
    open_connection: Callable[[], AbstractAsyncContextManager[Connection]],
    request: bytes,
) -> RawResponse:
    """Two downloads never read, then another client's GET."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            _, writer = await stack.enter_async_context(open_connection())
            writer.write(request)  # and never read
        async with asyncio.timeout(GUARD_SECONDS), open_connection() as (reader, writer):
            writer.write(build_request("GET", "/other"))
            response = await read_response(reader)
        await poll(lambda: rejected(gw, "send_timeout") == 2, "two downloads cut", seconds=10)
    return response


async def assert_downloads_logged_as_cut(gw: RunningGateway) -> None:
    assert gw.metric("gateway_inflight_requests") == 0
    await gw.server.stop()
    records = [json.loads(line) for line in gw.access_log_path.read_text().splitlines()]
    cut = [r for r in records if r["path"] == DOWNLOAD]
    assert [r["status"] for r in cut] == [499, 499], cut
    assert all(0 < r["bytes_out"] < DOWNLOAD_BYTES for r in cut), cut


async def test_clients_that_stop_reading_cannot_starve_others(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    """Two plain downloads never read take both pooled connections; the
    send timeout frees them, and a third client is served."""
    gw = await start_gateway(
        upstream={"max_connections": 2, "pool_timeout": "30s"},
        server={"send_timeout": "300ms"},
    )
    response = await starve_and_serve(
        gw, lambda: request_path.raw_connection(gw), build_request("GET", DOWNLOAD)
    )
    assert response.status == 200
    await assert_downloads_logged_as_cut(gw)


@pytest.mark.parametrize("lead", [b"", HAND_OVER], ids=["fresh", "handed_over"])
async def test_clients_that_stop_reading_a_post_answer_cannot_starve_others(
    start_gateway: StartGateway, lead: bytes
) -> None:
    """The same through aiohttp's client upstream (a request with a body)."""
    gw = await start_gateway(
        upstream={"max_connections": 2, "pool_timeout": "30s"},
        server={"send_timeout": "300ms"},
    )
    post = build_request("POST", DOWNLOAD, [("Content-Length", "2")], b"hi")
    response = await starve_and_serve(gw, lambda: raw_connection(gw), lead + post)
    assert response.status == 200
    await assert_downloads_logged_as_cut(gw)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_no_pooled_connection_within_pool_timeout_is_503(
    start_gateway: StartGateway, method: str
) -> None:
    gw = await start_gateway(upstream={"max_connections": 1, "pool_timeout": "200ms"})
    async with raw_connection(gw) as (_, writer):
        writer.write(build_request("GET", "/slow?delay=30"))  # holds the one connection
        await writer.drain()
        await poll(lambda: gw.metric("gateway_inflight_requests") == 1, "in flight", seconds=10)
        headers = [("Content-Length", "2")] if method == "POST" else []
        body = b"hi" if method == "POST" else b""
        async with asyncio.timeout(GUARD_SECONDS):
            response = await raw_exchange(gw, build_request(method, "/x", headers, body))
    assert response.status == 503, (response.status, response.body[:200])
    assert response.json()["error"] == "upstream_busy"
    labels = {"route": "default", "kind": "busy"}
    assert gw.metric("gateway_upstream_errors_total", labels) == 1


async def test_a_client_that_reads_slowly_but_steadily_is_not_cut(
    start_gateway: StartGateway,
) -> None:
    """The timeout is for a client taking nothing, not for a slow one."""
    gw = await start_gateway(server={"send_timeout": "500ms"})
    size = 3_000_000
    async with raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", f"/download?size={size}"))
        _, status, _, _ = await read_head(reader)
        assert status == 200
        received = 0
        async with asyncio.timeout(60):
            while received < size:
                chunk = await reader.read(65536)
                assert chunk, f"cut after {received} bytes"
                received += len(chunk)
                await asyncio.sleep(0.005)  # the slow reader itself
    assert rejected(gw, "send_timeout") == 0


async def test_clients_leaving_downloads_leave_nothing_in_flight(
    start_gateway: StartGateway,
) -> None:
    """Downloads of many sizes whose clients never read, cut by the send
    timeout. Some end with the whole rest of the body buffered at the
    gateway (past what the client's socket took): such an upstream
    connection must be closed, not pooled with those bytes in it. Pooled,
    the next request on it got the old body, or was never read again and
    stayed in flight forever (bench/chaos.py found it)."""
    gw = await start_gateway(server={"send_timeout": "300ms"}, upstream={"max_connections": 64})

    async def never_read(size: int) -> None:
        async with raw_connection(gw) as (_, writer):
            writer.write(build_request("GET", f"/download?size={size}"))
            await asyncio.sleep(1)  # past the send timeout: the client's own pace
            writer.transport.abort()

    await asyncio.gather(*(never_read(150_000 * i) for i in range(1, 60)))
    in_flight = "gateway_inflight_requests"
    await poll(lambda: gw.metric(in_flight) == 0, "requests stuck in flight", seconds=10)
    for _ in range(30):  # pooled connections serve their own answers (30: within the limit)
        response = await raw_exchange(gw, build_request("GET", "/after"))
        assert response.status == 200
        assert response.json()["raw_path"] == "/after"
