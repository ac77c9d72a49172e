"""The proxy listener's front (gateway/front.py), over raw loopback sockets.

Every connection starts on llhttp: plain GET/OPTIONS requests are served
there, and the first request that is anything else hands the connection,
with every byte not yet served, to aiohttp's RequestHandler for the rest of
its life. These tests pin what a client sees across that boundary: answers
in order on kept-alive and pipelined connections, aiohttp's answers to
malformed heads, the keep-alive and header deadlines, streamed bodies,
header bytes passed unchanged, and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RunningGateway, StartGateway
from tests.helpers import (
    GUARD_SECONDS,
    RawResponse,
    base_url,
    build_request,
    limits,
    raw_connection,
    raw_exchange,
    raw_exchange_to_close,
    read_response,
)
from tests.upstream_app import HITS

STREAM_PARTS = 5
STREAM_PATH = f"/stream?n={STREAM_PARTS}&delay=0.05"
STREAM_BODY = b"".join(f"part {i}\n".encode() for i in range(STREAM_PARTS))


# --------------------------------------------------------------------------- helpers


def rejected(gw: RunningGateway, reason: str) -> float:
    return gw.metric("gateway_rejected_requests_total", {"reason": reason})


def assert_echo(response: RawResponse, method: str, raw_path: str) -> dict[str, object]:
    """``response`` is the upstream's /echo answer to ``method raw_path``."""
    assert response.status == 200, (response.status, response.body[:300])
    assert response.complete
    echoed: dict[str, object] = response.json()
    assert (echoed["method"], echoed["raw_path"]) == (method, raw_path), echoed
    return echoed


def assert_bad_request(response: RawResponse) -> None:
    """The gateway's JSON 400 (connection.py), not aiohttp's text or a traceback."""
    assert response.status == 400, (response.status, response.body[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "bad_request"
    assert b"Traceback" not in response.body


async def assert_still_serving(gw: RunningGateway, path: str = "/still-serving") -> None:
    assert_echo(await raw_exchange(gw, build_request("GET", path)), "GET", path)


def post(target: str, body: bytes) -> bytes:
    return build_request("POST", target, [("Content-Length", str(len(body)))], body)


def assert_echoed_body(echoed: dict[str, object], body: bytes) -> None:
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """What the peer sends until it closes (a reset counts as a close)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


# --------------------------------------------------------------------------- 1. hand-off


async def test_keep_alive_connection_serves_get_post_get_in_order(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    body = b"a body handed to aiohttp mid-connection " * 50
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/echo?step=1"))
        assert_echo(await read_response(reader), "GET", "/echo?step=1")

        writer.write(post("/echo?step=2", body))
        echoed = assert_echo(await read_response(reader), "POST", "/echo?step=2")
        assert_echoed_body(echoed, body)

        writer.write(build_request("GET", "/echo?step=3"))
        third = await read_response(reader)
        assert_echo(third, "GET", "/echo?step=3")
        assert third.headers.get("Connection", "keep-alive").lower() != "close"

    assert upstream.app[HITS] == ["/echo?step=1", "/echo?step=2", "/echo?step=3"]
    await gw.server.stop()
    records = gw.access_records()
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("GET", "/echo?step=1", 200),
        ("POST", "/echo?step=2", 200),
        ("GET", "/echo?step=3", 200),
    ]
    assert records[1]["bytes_in"] == len(body)


# --------------------------------------------------------------------------- 2. pipelining


async def test_pipelined_plain_gets_are_answered_complete_and_in_order(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    # A slower answer and an empty one among them: order and framing still hold.
    paths = ["/echo?i=0", "/slow?delay=0.05&i=1", "/echo?i=2", "/status/204?i=3", "/echo?i=4"]
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(b"".join(build_request("GET", path) for path in paths))
        responses = [await read_response(reader) for _ in paths]
        assert_echo(responses[0], "GET", "/echo?i=0")
        assert (responses[1].status, responses[1].body) == (200, b"slow")
        assert_echo(responses[2], "GET", "/echo?i=2")
        assert (responses[3].status, responses[3].body) == (204, b"")
        assert_echo(responses[4], "GET", "/echo?i=4")
        # Nothing extra was written, and the connection still serves.
        writer.write(build_request("GET", "/echo?i=5"))
        assert_echo(await read_response(reader), "GET", "/echo?i=5")
    assert upstream.app[HITS] == [*paths, "/echo?i=5"]


async def test_pipelined_get_then_post_then_get_are_answered_in_order(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    body = b"pipelined body\r\n\r\nGET /not-a-request HTTP/1.1\r\n\r\n"
    data = (
        build_request("GET", "/echo?first")
        + post("/echo?second", body)
        + build_request("GET", "/echo?third")
    )
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(data)
        assert_echo(await read_response(reader), "GET", "/echo?first")
        echoed = assert_echo(await read_response(reader), "POST", "/echo?second")
        assert_echoed_body(echoed, body)
        assert_echo(await read_response(reader), "GET", "/echo?third")
    assert upstream.app[HITS] == ["/echo?first", "/echo?second", "/echo?third"]


async def test_pipelined_burst_beyond_the_read_ahead_buffer_is_answered_in_order(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    """Far more pipelined bytes than front.py reads ahead (64 KiB) while a
    (slow) request is served, ending with a POST: reading pauses and
    resumes, and the hand-off gets the rest."""
    gw = await start_gateway(limits=limits(1000))
    pad = [("X-Pad", "p" * 4000)]
    paths = ["/slow?delay=0.1", *(f"/echo?n={i}" for i in range(100))]
    body = b"after the burst"
    data = b"".join(build_request("GET", path, pad) for path in paths)
    data += post("/echo?post", body) + build_request("GET", "/echo?last")
    assert len(data) > 6 * 64 * 1024

    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):

        async def send() -> None:
            writer.write(data)
            await writer.drain()

        sending = asyncio.create_task(send())
        slow = await read_response(reader)
        assert (slow.status, slow.body) == (200, b"slow")
        for path in paths[1:]:
            assert_echo(await read_response(reader), "GET", path)
        assert_echoed_body(assert_echo(await read_response(reader), "POST", "/echo?post"), body)
        assert_echo(await read_response(reader), "GET", "/echo?last")
        await sending
    assert upstream.app[HITS] == [*paths, "/echo?post", "/echo?last"]


# --------------------------------------------------------------------------- 3. line endings


async def first_and_next(port: int, data: bytes) -> tuple[RawResponse, RawResponse | None]:
    """Send ``data``, read one response, then ask for ``/next`` on the same
    connection: the first response and the second (None when the server
    closed the connection instead)."""
    async with asyncio.timeout(GUARD_SECONDS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            first = await read_response(reader)
            try:
                writer.write(build_request("GET", "/next"))
                second: RawResponse | None = await read_response(reader)
            except ConnectionError:
                second = None
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return first, second


@contextlib.asynccontextmanager
async def plain_aiohttp() -> AsyncIterator[int]:
    """A bare aiohttp server with its defaults (the reference for what
    aiohttp's parser does with a head); yields its port."""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.json_response({"method": request.method, "raw_path": request.raw_path})

    runner = web.ServerRunner(web.Server(handler), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


LINE_ENDING_CASES = {
    # aiohttp (llhttp, strict) refuses bare LF: 400 and the connection closed,
    # also when a well-formed request follows in the same bytes.
    "bare_lf": (b"GET /echo HTTP/1.1\nHost: x\n\n", 400),
    "bare_lf_then_crlf_request": (
        b"GET /echo HTTP/1.1\nHost: x\n\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    # ... but skips empty lines before the request line (RFC 9112 2.2) and
    # serves the request on a kept-alive connection.
    "empty_line_first": (b"\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "two_empty_lines_first": (b"\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "bare_lf_empty_line_first": (b"\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    # A bare CR ends no line either: 400 at once, not a wait for a CRLF CRLF
    # that never comes.
    "bare_cr": (b"GET /echo HTTP/1.1\rHost: x\r\r", 400),
    # Not line endings, but the same rule (aiohttp's answer on either path):
    # HTTP/1.1 needs exactly one Host.
    "no_host_http11": (b"GET /echo HTTP/1.1\r\n\r\n", 400),
    "two_hosts": (b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(LINE_ENDING_CASES))
async def test_line_endings_are_handled_as_aiohttp_handles_them(
    start_gateway: StartGateway, upstream: TestServer, case: str
) -> None:
    data, expected_status = LINE_ENDING_CASES[case]
    async with plain_aiohttp() as port:
        reference, reference_next = await first_and_next(port, data)
    # What aiohttp does with these bytes, on its own (pinned: if aiohttp
    # changes, this says so before the gateway comparison does).
    assert reference.status == expected_status, reference
    assert (reference_next is None) == (expected_status == 400)

    gw = await start_gateway()
    response, after = await first_and_next(gw.server.proxy_port, data)
    if expected_status == 400:
        assert_bad_request(response)
        assert after is None, "the connection must be closed after the 400"
        assert upstream.app[HITS] == []
        assert rejected(gw, "bad_request") == 1
    else:
        assert_echo(response, "GET", "/echo")
        assert after is not None, "the connection must stay open, as aiohttp keeps it"
        assert_echo(after, "GET", "/next")
        assert upstream.app[HITS] == ["/echo", "/next"]
    await assert_still_serving(gw)


# --------------------------------------------------------------------------- 4. keep-alive


async def test_idle_connection_is_closed_after_keepalive_timeout_renewed_per_request(
    start_gateway: StartGateway,
) -> None:
    keepalive = 0.4
    gw = await start_gateway(server={"keepalive_timeout": "400ms"})
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/echo?first"))
        assert_echo(await read_response(reader), "GET", "/echo?first")
        # Idle for most of the timeout: the connection is still usable, and
        # the next answer starts a new idle period.
        await asyncio.sleep(keepalive * 0.6)
        writer.write(build_request("GET", "/echo?second"))
        assert_echo(await read_response(reader), "GET", "/echo?second")
        answered = time.monotonic()
        assert await read_to_eof(reader) == b"", "expected a silent close"
        idle = time.monotonic() - answered
    # Cut on the first request's deadline, it would have been ~0.16 s.
    assert idle >= keepalive * 0.75, f"closed {idle:.2f}s after the last answer"
    assert rejected(gw, "header_timeout") == 0


async def test_request_in_flight_is_not_cut_by_keepalive_timeout(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway(server={"keepalive_timeout": "300ms"})
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/echo?first"))
        assert_echo(await read_response(reader), "GET", "/echo?first")
        # The idle deadline armed by that answer passes during this request.
        writer.write(build_request("GET", "/slow?delay=0.7"))
        slow = await read_response(reader)
        assert (slow.status, slow.body, slow.complete) == (200, b"slow", True)
        answered = time.monotonic()
        # ... and the idle timeout applies again once it is answered.
        assert await read_to_eof(reader) == b""
        idle = time.monotonic() - answered
    assert idle >= 0.2, f"closed {idle:.2f}s after the answer, keepalive_timeout is 300ms"
    assert upstream.app[HITS] == ["/echo?first", "/slow?delay=0.7"]


# --------------------------------------------------------------------------- 5. header deadline


async def test_partial_first_head_is_cut_at_header_timeout_and_counted(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway(server={"header_timeout": "300ms"})
    started = time.monotonic()
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(b"GET /partial HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never: ends")
        assert await read_to_eof(reader) == b"", "expected a silent close"
    lived = time.monotonic() - started
    assert 0.28 <= lived < 3.0, f"the connection lived {lived:.2f}s, header_timeout is 300ms"
    assert rejected(gw, "header_timeout") == 1
    assert upstream.app[HITS] == []
    await assert_still_serving(gw)
    assert rejected(gw, "header_timeout") == 1


async def test_connection_whose_head_was_complete_in_time_is_not_cut(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    header_timeout = 0.3
    gw = await start_gateway(server={"header_timeout": "300ms"})

    async def answered_past_the_deadline() -> None:
        """A request whose answer comes after the header deadline."""
        async with raw_connection(gw) as (reader, writer):
            writer.write(build_request("GET", "/slow?delay=0.6"))
            slow = await read_response(reader)
            assert (slow.status, slow.body) == (200, b"slow")
            writer.write(build_request("GET", "/echo?after-slow"))
            assert_echo(await read_response(reader), "GET", "/echo?after-slow")

    async def idle_past_the_deadline() -> None:
        """A request answered at once, then idle past the header deadline
        (but within the keep-alive timeout)."""
        async with raw_connection(gw) as (reader, writer):
            writer.write(build_request("GET", "/echo?quick"))
            assert_echo(await read_response(reader), "GET", "/echo?quick")
            await asyncio.sleep(header_timeout + 0.2)
            writer.write(build_request("GET", "/echo?after-idle"))
            assert_echo(await read_response(reader), "GET", "/echo?after-idle")

    async with asyncio.timeout(GUARD_SECONDS), asyncio.TaskGroup() as group:
        group.create_task(answered_past_the_deadline())
        group.create_task(idle_past_the_deadline())
    assert rejected(gw, "header_timeout") == 0
    assert sorted(upstream.app[HITS]) == sorted(
        ["/slow?delay=0.6", "/echo?after-slow", "/echo?quick", "/echo?after-idle"]
    )


# --------------------------------------------------------------------------- 6. streaming


async def test_stream_to_http11_client_is_chunked_and_keeps_the_connection(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", STREAM_PATH))
        response = await read_response(reader)
        assert response.status == 200
        assert response.headers["Transfer-Encoding"].lower() == "chunked"
        assert "Content-Length" not in response.headers
        assert response.complete, "the chunked body did not end with its last chunk"
        assert response.body == STREAM_BODY
        # The framing ended exactly where it said: the next answer parses.
        writer.write(build_request("GET", "/echo?after-stream"))
        assert_echo(await read_response(reader), "GET", "/echo?after-stream")
    await gw.server.stop()
    (record,) = [r for r in gw.access_records() if r["path"] == STREAM_PATH]
    assert (record["status"], record["bytes_out"]) == (200, len(STREAM_BODY))


@pytest.mark.parametrize("keep_alive", [False, True], ids=["default", "keep_alive_asked"])
async def test_stream_to_http10_client_is_delimited_by_close(
    start_gateway: StartGateway, keep_alive: bool
) -> None:
    gw = await start_gateway()
    head = f"GET {STREAM_PATH} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
    if keep_alive:  # cannot be honoured: only the close can end this body
        head += "Connection: keep-alive\r\n"
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write((head + "\r\n").encode())
        response = await read_response(reader)  # reads the body up to EOF
        assert response.status == 200
        assert "Transfer-Encoding" not in response.headers
        assert "Content-Length" not in response.headers
        assert response.headers["Connection"].lower() == "close"
        assert response.body == STREAM_BODY, "chunk framing or bytes changed"
        assert await reader.read() == b""


# --------------------------------------------------------------------------- 7. header bytes


@dataclass
class CapturingUpstream:
    """A raw TCP upstream: records each request head byte-for-byte and
    answers with ``answer`` and Connection: close."""

    answer: bytes
    heads: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.answer)
            await writer.drain()
        finally:
            writer.close()
            self.done.set()


UTF8_VALUE = b"caf\xc3\xa9 \xe2\x82\xac"  # "café €" in UTF-8
NOT_UTF8_VALUE = b"caf\xe9 \xff"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param(b"X-Name", UTF8_VALUE, id="utf8"),
        pytest.param(b"X-Name", NOT_UTF8_VALUE, id="not_utf8"),
        # Forwarded upstream and echoed back to the client.
        pytest.param(b"X-Request-ID", UTF8_VALUE, id="utf8_request_id"),
    ],
)
async def test_header_bytes_reach_the_upstream_and_come_back_unchanged(
    start_gateway: StartGateway, name: bytes, value: bytes
) -> None:
    reply_value = b"r\xc3\xa9ponse \xe2\x82\xac"
    capture = CapturingUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
        b"X-Reply: " + reply_value + b"\r\n\r\nok"
    )
    server = await asyncio.start_server(capture.handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(upstream_url=f"http://127.0.0.1:{port}")
        request = b"GET /bytes HTTP/1.1\r\nHost: 127.0.0.1\r\n" + name + b": " + value
        async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
            writer.write(request + b"\r\n\r\n")
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise AssertionError(
                    f"the gateway closed the connection without an answer: {exc.partial!r}"
                ) from None
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"\r\nContent-Length: 2\r\n" in head
            assert await reader.readexactly(2) == b"ok"
            await capture.done.wait()
    finally:
        server.close()
        await server.wait_closed()

    (upstream_head,) = capture.heads
    assert upstream_head.startswith(b"GET /bytes HTTP/1.1\r\n")
    assert b"\r\n" + name + b": " + value + b"\r\n" in upstream_head, upstream_head
    # The upstream's own header bytes come back unchanged too.
    assert b"\r\nX-Reply: " + reply_value + b"\r\n" in head, head
    if name == b"X-Request-ID":
        assert b"\r\nX-Request-ID: " + value + b"\r\n" in head, head


# --------------------------------------------------------------------------- 8. llhttp rejects


DUPLICATE_LENGTHS = (
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
)


async def test_head_llhttp_rejects_on_a_fresh_connection_is_400_json(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    response, rest = await raw_exchange_to_close(gw, DUPLICATE_LENGTHS)
    assert_bad_request(response)
    assert "Duplicate Content-Length" in response.json()["detail"]
    assert rest == b"", "the connection must be closed after the 400"
    assert rejected(gw, "bad_request") == 1
    assert upstream.app[HITS] == []
    await assert_still_serving(gw)
    assert upstream.app[HITS] == ["/still-serving"]


async def test_head_llhttp_rejects_after_a_plain_request_is_400_json(
    start_gateway: StartGateway, upstream: TestServer
) -> None:
    gw = await start_gateway()
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/echo?before") + DUPLICATE_LENGTHS)
        assert_echo(await read_response(reader), "GET", "/echo?before")
        assert_bad_request(await read_response(reader))
        assert await read_to_eof(reader) == b""
    assert rejected(gw, "bad_request") == 1
    assert upstream.app[HITS] == ["/echo?before"]
    await assert_still_serving(gw)


# --------------------------------------------------------------------------- 9. drain


@dataclass
class HeldUpstream:
    """An aiohttp upstream whose /hold answers only when the test says so."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def hold(request: web.Request) -> web.Response:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="held")

        async def quick(request: web.Request) -> web.Response:
            return web.Response(text="quick")

        app = web.Application()
        app.router.add_get("/hold", hold)
        app.router.add_get("/quick", quick)
        return app


async def test_drain_finishes_the_plain_request_in_flight_and_closes_idle_connections(
    start_gateway: StartGateway,
) -> None:
    held = HeldUpstream()
    backend = TestServer(held.app(), host="127.0.0.1")
    await backend.start_server()
    try:
        gw = await start_gateway(upstream_url=base_url(backend), drain_timeout="5s")
        async with (
            asyncio.timeout(GUARD_SECONDS),
            raw_connection(gw) as (idle_reader, idle_writer),
            raw_connection(gw) as (busy_reader, busy_writer),
        ):
            idle_writer.write(build_request("GET", "/quick"))
            quick = await read_response(idle_reader)
            assert (quick.status, quick.body) == (200, b"quick")

            busy_writer.write(build_request("GET", "/hold"))
            await held.arrived.wait()  # in flight at the gateway and upstream
            answer = asyncio.create_task(read_response(busy_reader))

            stopping = asyncio.create_task(gw.server.stop())
            # The idle keep-alive connection is closed while the drain waits.
            assert await read_to_eof(idle_reader) == b""
            assert not answer.done(), "the request in flight was answered before release"
            assert not stopping.done(), "stop() did not wait for the request in flight"

            held.release.set()
            response = await answer
            assert (response.status, response.body, response.complete) == (200, b"held", True)
            assert await read_to_eof(busy_reader) == b""
            await stopping
    finally:
        held.release.set()
        await backend.close()

    records = gw.access_records()
    assert sorted((r["path"], r["status"]) for r in records) == [
        ("/hold", 200),
        ("/quick", 200),
    ]
