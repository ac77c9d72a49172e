"""Hostile and broken clients, over raw loopback sockets: slowloris, stalled and
oversized bodies, oversized or malformed heads, request smuggling shapes,
absolute-form and CONNECT targets, spoofed X-Forwarded-For, identity
rotation, clients and upstreams that vanish mid-response, concurrency caps.

Raw sockets (``asyncio.open_connection``) are used wherever a client library
would refuse to send the malformed bytes or would normalise them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RunningGateway, StartGateway
from tests.helpers import (
    GUARD_SECONDS,
    RawResponse,
    arrivals,
    bucket,
    build_request,
    poll,
    raw_connection,
    raw_exchange,
    raw_exchange_to_close,
    read_head,
    read_response,
    wait_idle,
)
from tests.upstream_app import HITS

HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# --------------------------------------------------------------------------- helpers


async def assert_still_serving(gw: RunningGateway, path: str = "/still-serving") -> None:
    response = await raw_exchange(gw, build_request("GET", path))
    assert response.status == 200
    assert response.json()["raw_path"] == path


def assert_json_error(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error, body
    assert b"Traceback" not in response.body
    assert len(response.body) < 1000


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]


def rejected(gw: RunningGateway, reason: str) -> float:
    return gw.metric("gateway_rejected_requests_total", {"reason": reason})


# --------------------------------------------------------------------------- slow clients


async def test_slowloris_connections_are_cut_and_do_not_delay_others(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(server={"header_timeout": "500ms"})
    count = 200
    opened = asyncio.Event()
    connected = 0

    async def trickle() -> tuple[bytes, float]:
        """Send header bytes forever (never the blank line); what the gateway
        sent back and how long the connection lived."""
        nonlocal connected
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
        received = b""
        try:
            writer.write(b"GET /slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: ")
            connected += 1
            if connected == count:
                opened.set()
            while True:
                try:
                    async with asyncio.timeout(0.1):
                        chunk = await reader.read(4096)
                except TimeoutError:
                    writer.write(b"a")  # one more header byte
                    continue
                if not chunk:
                    break  # EOF: the gateway closed the connection
                received += chunk
        except ConnectionResetError:
            pass  # closed by the gateway while a byte was on its way
        finally:
            writer.close()
        return received, time.monotonic() - started

    async with asyncio.timeout(GUARD_SECONDS):
        tricklers = [asyncio.create_task(trickle()) for _ in range(count)]
        await opened.wait()
        started = time.monotonic()
        async with http.get(gw.url + "/normal") as response:
            body = await response.json()
        elapsed = time.monotonic() - started
        assert response.status == 200
        assert body["raw_path"] == "/normal"
        assert elapsed < 1.0, f"a normal request took {elapsed:.2f}s beside slowloris"
        # (A trickler may end before this on a loaded machine: opening 200
        # connections can take longer than the timeout. Each must have
        # lived its 500ms, checked below.)
        results = await asyncio.gather(*tricklers)

    assert all(received == b"" for received, _lived in results), "expected a silent close"
    lived = sorted(lived for _received, lived in results)
    assert lived[0] >= 0.45, f"a connection was cut after {lived[0]:.2f}s, before 500ms"
    assert lived[-1] < 3.0, f"a connection lived {lived[-1]:.2f}s with a 500ms header timeout"
    assert rejected(gw, "header_timeout") == count
    assert upstream.app[HITS] == ["/normal"]
    assert gw.metric("gateway_requests_total", {"route": "default", "decision": "allowed"}) == 1


async def test_stalled_request_body_gets_408_and_the_connection_closed(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"body_timeout": "300ms"})
    head = build_request("POST", "/upload", [("Content-Length", "100")])
    started = time.monotonic()
    response, rest = await raw_exchange_to_close(gw, head + b"abc")
    elapsed = time.monotonic() - started
    assert_json_error(response, 408, "body_timeout")
    assert rest == b"", "the connection must be closed after a 408"
    assert 0.3 <= elapsed < 2.0, elapsed
    assert rejected(gw, "body_timeout") == 1
    await assert_still_serving(gw)


# --------------------------------------------------------------------------- malformed heads


@pytest.mark.parametrize(
    ("case", "request_data"),
    [
        ("request_line", build_request("GET", "/" + "a" * 2000)),
        ("header_value", build_request("GET", "/x", [("X-Big", "b" * 2000)])),
        ("header_name", build_request("GET", "/x", [("X-" + "n" * 2000, "v")])),
    ],
)
async def test_oversized_head_is_431_json_without_traceback(
    start_gateway: StartGateway,
    upstream: TestServer,
    caplog: pytest.LogCaptureFixture,
    case: str,
    request_data: bytes,
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(server={"max_line_size": 1024, "max_field_size": 1024})
    response, rest = await raw_exchange_to_close(gw, request_data)
    assert_json_error(response, 431, "headers_too_large")
    assert rest == b"", f"{case}: the connection must be closed"
    assert rejected(gw, "headers_too_large") == 1
    assert upstream.app[HITS] == []
    assert tracebacks(caplog) == []
    await assert_still_serving(gw)


async def test_too_many_headers_is_431(
    start_gateway: StartGateway, upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(server={"max_headers": 20})
    headers = [(f"X-H{i}", "v") for i in range(40)]
    response, rest = await raw_exchange_to_close(gw, build_request("GET", "/many", headers))
    assert_json_error(response, 431, "headers_too_large")
    assert rest == b""
    assert upstream.app[HITS] == []
    assert tracebacks(caplog) == []
    # Within the bound is fine.
    ok = await raw_exchange(gw, build_request("GET", "/few", headers[:10]))
    assert ok.status == 200


# --------------------------------------------------------------------------- body size


async def test_declared_body_over_max_body_size_is_413_at_once(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway(max_body_size=1000)
    head = build_request("POST", "/too-big", [("Content-Length", "5000")])
    started = time.monotonic()
    response, rest = await raw_exchange_to_close(gw, head)  # the body is never sent
    elapsed = time.monotonic() - started
    assert_json_error(response, 413, "body_too_large")
    assert rest == b"", "the connection must be closed after a 413"
    assert elapsed < 1.0, f"413 took {elapsed:.2f}s: the gateway waited for the body"
    assert upstream.app[HITS] == []
    assert rejected(gw, "body_too_large") == 1
    # At the limit is fine.
    ok = await raw_exchange(
        gw, build_request("POST", "/fits", [("Content-Length", "1000")], b"z" * 1000)
    )
    assert ok.status == 200
    assert ok.json()["body_length"] == 1000


async def test_chunked_body_over_max_body_size_is_413(start_gateway: StartGateway) -> None:
    gw = await start_gateway(max_body_size=1000)
    chunks = b"".join(b"1f4\r\n" + b"c" * 500 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    head = build_request("POST", "/chunked-big", [("Transfer-Encoding", "chunked")])
    response, rest = await raw_exchange_to_close(gw, head + chunks)
    assert_json_error(response, 413, "body_too_large")
    assert rest == b""
    await assert_still_serving(gw)


# --------------------------------------------------------------------------- smuggling


def _with_length(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    return [(n, str(len(body)) if v == "{len}" else v) for n, v in headers]


SMUGGLING_CASES = {
    # CL.TE desync: CL covers the hidden request; a TE-honouring hop would end
    # the body at the 0-chunk and read GET /smuggled as the next request.
    "cl_te_desync": (
        [("Content-Length", "{len}"), ("Transfer-Encoding", "chunked")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "te_cl": (
        [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "two_content_lengths": (
        [("Content-Length", "5"), ("Content-Length", "{len}")],
        b"hello" + HIDDEN,
    ),
    "te_chunked_identity": (
        [("Transfer-Encoding", "chunked, identity")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "te_chunked_identity_with_cl": (
        [("Transfer-Encoding", "chunked, identity"), ("Content-Length", "{len}")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    # Obfuscated TE: a hop that ignores it frames by CL, one that "repairs" it
    # frames by chunks.
    "te_space_before_colon": (
        [("Transfer-Encoding ", "chunked")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "te_space_before_colon_with_cl": (
        [("Content-Length", "{len}"), ("Transfer-Encoding ", "chunked")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "te_xchunked": (
        [("Transfer-Encoding", "xchunked")],
        b"0\r\n\r\n" + HIDDEN,
    ),
    "te_xchunked_with_cl": (
        [("Content-Length", "{len}"), ("Transfer-Encoding", "xchunked")],
        b"0\r\n\r\n" + HIDDEN,
    ),
}


@pytest.mark.parametrize("case", sorted(SMUGGLING_CASES))
async def test_smuggling_shapes_never_reach_the_upstream_as_two_requests(
    start_gateway: StartGateway, upstream: TestServer, case: str
) -> None:
    gw = await start_gateway()
    headers, body = SMUGGLING_CASES[case]
    attack = build_request("POST", f"/attack-{case}", _with_length(headers, body), body)

    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(attack)
        await writer.drain()
        first = await read_response(reader)
        if first.status == 400:
            assert_json_error(first, 400, "bad_request")
            assert await reader.read() == b"", "a rejected request must close the connection"
            assert upstream.app[HITS] == []
        else:
            # Handled as one request: the whole body went to the upstream as one.
            assert first.status == 200, first
            echoed = first.json()
            assert echoed["raw_path"] == f"/attack-{case}"
            # The next response on this connection must answer the next request.
            writer.write(build_request("GET", "/sentinel"))
            await writer.drain()
            second = await read_response(reader)
            assert second.status == 200
            assert second.json()["raw_path"] == "/sentinel"

    # Push another request through the (pooled) upstream connection(s): the
    # hidden request would have arrived before it.
    await assert_still_serving(gw, "/after-attack")
    await wait_idle(gw)
    assert "/smuggled" not in upstream.app[HITS]
    assert upstream.app[HITS].count(f"/attack-{case}") <= 1


# --------------------------------------------------------------------------- targets


async def test_absolute_form_target_goes_to_the_configured_upstream_only(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    data = build_request("GET", "http://evil.example/x?y=1", host="evil.example")
    response = await raw_exchange(gw, data)
    assert response.status == 200
    assert response.json()["raw_path"] == "/x?y=1"
    assert upstream.app[HITS] == ["/x?y=1"]
    await gw.server.stop()
    records = gw.access_records()
    assert [r["status"] for r in records] == [200]


async def test_connect_is_405_and_nothing_is_proxied(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    data = build_request("CONNECT", "evil.example:443", host="evil.example:443")
    response = await raw_exchange(gw, data)
    assert_json_error(response, 405, "bad_target")
    assert upstream.app[HITS] == []
    await assert_still_serving(gw)
    assert upstream.app[HITS] == ["/still-serving"]


# --------------------------------------------------------------------------- identities


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits={"default": bucket(3)})
    statuses = []
    for i in range(4):
        xff = f"203.0.113.{i + 1}"
        async with http.get(f"{gw.url}/xff/{i}", headers={"X-Forwarded-For": xff}) as response:
            await response.read()
            statuses.append(response.status)
    assert statuses == [200, 200, 200, 429], "XFF from an untrusted peer changed the bucket"
    async with http.get(gw.admin_url + "/admin/clients/127.0.0.1") as response:
        body = await response.json()
    assert {b["route"]: b["tokens"] for b in body["buckets"]} == {"default": 0}
    await gw.server.stop()
    assert {r["client"] for r in gw.access_records()} == {"127.0.0.1"}


async def test_rotating_identities_stay_within_max_tracked(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits={"default": bucket(5)},
        clients={"identify_by": "header", "max_tracked": 50},
    )
    semaphore = asyncio.Semaphore(20)

    async def one(i: int) -> int:
        async with semaphore, http.get(f"{gw.url}/rot", headers={"X-API-Key": f"k{i}"}) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(500)))
    assert set(statuses) == {200}
    assert gw.metric("gateway_clients_tracked") == 50
    idle = gw.metric("gateway_clients_evicted_total", {"reason": "idle"})
    pressure = gw.metric("gateway_clients_evicted_total", {"reason": "pressure"})
    # Every bucket was spent from (not full), so every eviction is "pressure".
    assert (idle, pressure) == (0, 450)


# --------------------------------------------------------------------------- vanishing peers


def upstream_connections_held(gw: RunningGateway) -> int:
    """Upstream connections the gateway holds for requests (none once idle):
    aiohttp's connector and, where bodiless GETs go through it, the plain pool."""
    upstream = gw.server.upstream
    connector = upstream.session.connector
    assert connector is not None
    held = len(connector._acquired)
    for server in upstream.servers:
        held += server.pool.in_use
    return held


async def test_client_disconnect_mid_response_leaks_nothing(
    start_gateway: StartGateway, upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway()
    size = 50_000_000
    async with asyncio.timeout(GUARD_SECONDS):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
        writer.write(build_request("GET", f"/download?size={size}"))
        _, status, _, headers = await read_head(reader)
        assert status == 200
        assert headers["Content-Length"] == str(size)
        await reader.readexactly(64 * 1024)
        writer.close()  # with unread data pending: the kernel sends RST
        await wait_idle(gw)

    assert upstream_connections_held(gw) == 0, "an upstream connection is still held"
    assert gw.metric("gateway_inflight_requests") == 0
    # Seen from the upstream: the half-read download connection is closed,
    # not kept (or pooled) with 50 MB still in flight.
    assert upstream.runner is not None
    upstream_server = upstream.runner.server
    assert isinstance(upstream_server, web.Server)
    await poll(  # bounded: the upstream notices the close
        lambda: not upstream_server.connections,
        "the gateway kept the upstream download connection open",
        attempts=100,
        interval=0.02,
    )
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "reset"}) == 0
    )
    await assert_still_serving(gw)
    assert tracebacks(caplog) == []
    await gw.server.stop()
    (record,) = [r for r in gw.access_records() if r["path"].startswith("/download")]
    assert record["status"] == 499
    assert 64 * 1024 <= record["bytes_out"] < size


async def test_client_leaving_mid_body_is_499_not_an_upstream_error(
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
    upstream: TestServer,
) -> None:
    """A client that leaves while its body is being streamed upstream is the
    client's doing: logged 499, not counted as the upstream resetting."""
    caplog.set_level(logging.WARNING)
    gw = await start_gateway()
    forwards = arrivals(upstream)
    async with asyncio.timeout(GUARD_SECONDS):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
        writer.write(
            build_request("POST", "/echo", [("Content-Length", "100000")], b"x" * 1000)
        )
        await forwards.wait_for(1)  # the body is on its way upstream
        writer.transport.abort()
        await wait_idle(gw)
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "reset"}) == 0
    )
    assert gw.metric("gateway_responses_total", {"route": "default", "code": "502"}) == 0
    assert tracebacks(caplog) == []
    await assert_still_serving(gw)
    await gw.server.stop()
    (record,) = [r for r in gw.access_records() if r["method"] == "POST"]
    assert record["status"] == 499


async def test_bad_chunk_after_forwarding_started_is_400_at_once(
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
    upstream: TestServer,
) -> None:
    """llhttp rejecting a chunk once the body is already streaming upstream:
    one 400 at once and the connection closed, not a wait for body_timeout
    (aiohttp alone does not tell the body stream)."""
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(server={"body_timeout": "30s"})
    forwards = arrivals(upstream)
    async with asyncio.timeout(GUARD_SECONDS):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await forwards.wait_for(1)  # the body is streaming upstream
        writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
        started = time.monotonic()
        response = await read_response(reader)
        rest = await reader.read()  # then EOF: one answer, connection closed
        writer.close()
    assert time.monotonic() - started < 5, "answered only at body_timeout"
    assert response.status == 400
    assert json.loads(response.body)["error"] == "bad_request"
    assert rest == b""
    assert rejected(gw, "bad_request") == 1
    assert tracebacks(caplog) == []
    await assert_still_serving(gw)


async def test_upstream_reset_mid_response_cuts_the_client_and_is_counted(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gw = await start_gateway()
    response, rest = await raw_exchange_to_close(gw, build_request("GET", "/reset"))
    assert rest == b"", "the client connection must be closed"
    assert response.status == 200
    assert response.headers["Content-Length"] == "1000000"
    assert not response.complete
    assert len(response.body) < 1_000_000
    await wait_idle(gw)
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "reset"}) == 1
    )
    await assert_still_serving(gw, "/after-reset")
    assert tracebacks(caplog) == []


# --------------------------------------------------------------------------- concurrency cap


async def test_third_concurrent_request_of_one_client_is_429_at_once(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
) -> None:
    gw = await start_gateway(limits={"default": bucket(100)}, clients={"max_concurrent": 2})
    forwards = arrivals(upstream)

    async def get(session: aiohttp.ClientSession, path: str) -> tuple[int, bytes, float]:
        started = time.monotonic()
        async with session.get(gw.url + path) as response:
            body = await response.read()
            return response.status, body, time.monotonic() - started

    slow = [asyncio.create_task(get(http, "/slow?delay=1")) for _ in range(2)]
    await forwards.wait_for(2)

    status, body, elapsed = await get(http, "/slow?delay=1")
    assert status == 429
    assert json.loads(body)["error"] == "concurrency"
    assert elapsed < 0.5, f"the third request waited {elapsed:.2f}s instead of 429 at once"

    # Another client (another loopback address) is not affected.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        status, body, _elapsed = await get(other, "/other-client")
    assert status == 200
    assert json.loads(body)["raw_path"] == "/other-client"

    results = await asyncio.gather(*slow)
    assert [(s, b) for s, b, _e in results] == [(200, b"slow")] * 2
    assert upstream.app[HITS].count("/slow?delay=1") == 2
    assert gw.metric("gateway_rejected_requests_total", {"reason": "concurrency"}) == 1
