"""Faithful proxying, over real sockets: methods, targets, bodies both ways,
statuses, headers, streams, WebSockets, upstream failures, streaming memory.

Everything runs on 127.0.0.1: the gateway (``start_gateway``), the shared
backend (``upstream``, tests/upstream_app.py) and, where a test needs an
endpoint the shared backend lacks, a small extra backend defined here.
Byte-exact checks use raw sockets so no client library normalises anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import hashlib
import io
import json
import os
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import AIOHTTP, PLAIN, RequestPath, StartGateway
from tests.helpers import (
    GUARD_SECONDS,
    base_url,
    build_request,
    free_port,
    limits,
    raw_connection,
    raw_exchange,
    read_head,
    read_response,
    wait_idle,
)
from tests.upstream_app import HITS

MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def upstream_saw(echo: Any) -> CIMultiDict[str]:
    """The request headers as the shared backend's echo endpoint received them."""
    return CIMultiDict((name, value) for name, value in echo["headers"])


# --------------------------------------------------------------------------- extra backend


@dataclass
class ExtraUpstream:
    """Endpoints the shared backend lacks, with the state the tests inspect."""

    records: list[tuple[str, str, str]] = field(default_factory=list)
    steps: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    first_chunk: asyncio.Future[bytes] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    ws_close_code: asyncio.Future[int | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    url: str = ""

    def build(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            body = await request.read()
            digest = hashlib.sha256(body).hexdigest()
            self.records.append((request.method, request.raw_path, digest))
            return web.json_response({"method": request.method, "body_sha256": digest})

        async def lockstep(request: web.Request) -> web.StreamResponse:
            """Writes a part, then waits for the test to ack it before the next."""
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(int(request.query.get("n", "3"))):
                await response.write(f"part {i}\n".encode())
                await self.steps.get()
            await response.write_eof()
            return response

        async def first_chunk(request: web.Request) -> web.Response:
            first = await request.content.readany()
            self.first_chunk.set_result(first)
            rest = await request.read()
            return web.json_response({"received": len(first) + len(rest)})

        async def raw_body(request: web.Request) -> web.Response:
            body = await request.read()
            return web.json_response(
                {
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "content_encoding": request.headers.get("Content-Encoding"),
                }
            )

        async def redirect(request: web.Request) -> web.Response:
            return web.Response(
                status=302, text="moved", headers={"Location": "http://127.0.0.1:9/elsewhere"}
            )

        async def multi_connection(request: web.Request) -> web.Response:
            response = web.Response(text="multi")
            response.headers.add("Connection", "X-A")
            response.headers.add("Connection", "x-b")
            response.headers.add("X-A", "1")
            response.headers.add("X-B", "2")
            response.headers.add("Trailer", "X-T")
            response.headers.add("X-C", "3")
            return response

        async def ws_record(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await ws.send_str(message.data)
            self.ws_close_code.set_result(ws.close_code)
            return ws

        app = web.Application()
        app.router.add_route("*", "/record/{tail:.*}", record)
        app.router.add_get("/lockstep", lockstep)
        app.router.add_post("/first-chunk", first_chunk)
        app.router.add_post("/raw-body", raw_body)
        app.router.add_get("/redirect", redirect)
        app.router.add_get("/multi-connection", multi_connection)
        app.router.add_get("/ws-record", ws_record)
        return app


@pytest.fixture
async def extra() -> AsyncIterator[ExtraUpstream]:
    state = ExtraUpstream()
    # auto_decompress=False: /raw-body must see the bytes the gateway sent.
    server = TestServer(state.build(), host="127.0.0.1")
    await server.start_server(auto_decompress=False)
    state.url = base_url(server)
    yield state
    await server.close()


# --------------------------------------------------------------------------- methods & targets


@pytest.mark.parametrize(
    ("method", "body", "request_path"),
    [
        # GET and OPTIONS are plain requests: on both paths. The others hand
        # the connection to aiohttp themselves.
        ("GET", None, PLAIN),
        ("GET", None, AIOHTTP),
        ("POST", b"post-body", AIOHTTP),
        ("PUT", b"put-body", AIOHTTP),
        ("PATCH", b"patch-body", AIOHTTP),
        ("DELETE", None, AIOHTTP),
        ("OPTIONS", None, PLAIN),
        ("OPTIONS", None, AIOHTTP),
        ("HEAD", None, AIOHTTP),
        ("PROPFIND", b"<propfind/>", AIOHTTP),
    ],
    indirect=["request_path"],
)
async def test_every_method_reaches_the_upstream(
    start_gateway: StartGateway,
    extra: ExtraUpstream,
    request_path: RequestPath,
    method: str,
    body: bytes | None,
) -> None:
    gw = await start_gateway(upstream_url=extra.url)
    http = await request_path.client(gw)
    async with http.request(method, f"{gw.url}/record/{method.lower()}", data=body) as response:
        payload = await response.read()
        assert response.status == 200
    digest = hashlib.sha256(body or b"").hexdigest()
    assert extra.records == [(method, f"/record/{method.lower()}", digest)]
    if method == "HEAD":
        assert payload == b""
        assert int(response.headers["Content-Length"]) > 0
    else:
        assert json.loads(payload) == {"method": method, "body_sha256": digest}


@pytest.mark.parametrize(
    "target",
    [
        "/a/./b/../c%2Fd?x=%20y&x=2",
        "/%7Euser/%41%42/~x?q=a+b&q=%2B&q=%2b",
        "//double//slash/?empty=&=v&flag&flag",
        "/semi;param=1/x?a=1;b=2&c=%3D%26",
        "/UPPER/%E2%82%AC/%e2%82%ac?%E2%82%AC=%e2%82%ac",
    ],
)
async def test_target_forwarded_byte_for_byte(
    start_gateway: StartGateway, request_path: RequestPath, upstream: TestServer, target: str
) -> None:
    gw = await start_gateway()
    response = await request_path.raw_exchange(gw, build_request("GET", target))
    assert response.status == 200
    assert response.json()["raw_path"] == target
    assert upstream.app[HITS] == [target]


async def test_encoded_yarl_url_reaches_upstream_unchanged(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    target = "/a/./b/../c%2Fd?x=%20y&x=2"
    async with http.get(URL(gw.url + target, encoded=True)) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["raw_path"] == target


async def test_duplicate_request_headers_forwarded(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    request = build_request(
        "GET", "/dup", [("X-Dup", "one"), ("X-Dup", "two"), ("Accept", "text/a, text/b")]
    )
    echo = (await request_path.raw_exchange(gw, request)).json()
    seen = upstream_saw(echo)
    assert seen.getall("X-Dup") == ["one", "two"]
    assert seen.getall("Accept") == ["text/a, text/b"]


# --------------------------------------------------------------------------- bodies


async def test_upload_of_a_few_mib_with_content_length(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    body = os.urandom(4 * MiB + 17)
    async with http.post(gw.url + "/upload", data=io.BytesIO(body)) as response:
        assert response.status == 200
        assert await response.json() == {
            "received": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    # A known length stays known: the upstream gets Content-Length, not chunks.
    # (The echo endpoint reads with aiohttp's default 1 MiB client_max_size.)
    small = body[: 900 * 1024]
    async with http.put(gw.url + "/echo", data=io.BytesIO(small)) as response:
        echo = await response.json()
    assert echo["body_length"] == len(small)
    assert echo["body_sha256"] == hashlib.sha256(small).hexdigest()
    seen = upstream_saw(echo)
    assert seen.getall("Content-Length") == [str(len(small))]
    assert "Transfer-Encoding" not in seen


async def test_chunked_request_body_is_streamed_as_chunks(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    pieces = [os.urandom(100_000 + i) for i in range(20)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with http.post(gw.url + "/upload", data=chunks()) as response:
        assert response.status == 200
        assert await response.json() == {
            "received": sum(map(len, pieces)),
            "sha256": hashlib.sha256(b"".join(pieces)).hexdigest(),
        }

    # Raw chunked framing, with a chunk extension: the echo sees the decoded
    # body, still chunked (a streaming proxy cannot know the length).
    request = (
        b"POST /echo-chunked HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    echo = (await raw_exchange(gw, request)).json()
    assert echo["body_length"] == 11
    assert echo["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    seen = upstream_saw(echo)
    assert "Content-Length" not in seen
    assert seen.get("Transfer-Encoding", "").lower() == "chunked"


async def test_request_body_reaches_upstream_before_the_client_finishes(
    start_gateway: StartGateway, extra: ExtraUpstream, http: aiohttp.ClientSession
) -> None:
    """The upstream reads the first chunk while the client is still holding
    back the rest: the gateway does not buffer request bodies."""
    gw = await start_gateway(upstream_url=extra.url)

    async def body() -> AsyncIterator[bytes]:
        yield b"first-chunk"
        async with asyncio.timeout(GUARD_SECONDS):
            first = await asyncio.shield(extra.first_chunk)
        assert first.startswith(b"first")
        yield b"-the-rest"

    async with http.post(gw.url + "/first-chunk", data=body()) as response:
        assert response.status == 200
        assert await response.json() == {"received": len(b"first-chunk-the-rest")}


async def test_compressed_request_body_passes_untouched(
    start_gateway: StartGateway, extra: ExtraUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(upstream_url=extra.url)
    body = gzip.compress(b"compressed request " * 100)
    async with http.post(
        gw.url + "/raw-body", data=body, headers={"Content-Encoding": "gzip"}
    ) as response:
        assert response.status == 200
        assert await response.json() == {
            "sha256": hashlib.sha256(body).hexdigest(),
            "content_encoding": "gzip",
        }


async def test_large_download_arrives_whole(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    size = 32 * MiB + 12345
    expected = hashlib.sha256()
    block = b"x" * 65536
    for offset in range(0, size, len(block)):
        expected.update(block[: size - offset])
    digest = hashlib.sha256()
    received = 0
    async with http.get(f"{gw.url}/download?size={size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for piece in response.content.iter_any():
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("code", [201, 202, 400, 404, 418, 500, 503])
async def test_upstream_status_and_body_pass_through(
    start_gateway: StartGateway, request_path: RequestPath, code: int
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(f"{gw.url}/status/{code}") as response:
        assert response.status == code
        assert await response.read() == f"status {code}".encode()


async def test_redirect_is_relayed_not_followed(
    start_gateway: StartGateway, extra: ExtraUpstream, request_path: RequestPath
) -> None:
    gw = await start_gateway(upstream_url=extra.url)
    http = await request_path.client(gw)
    async with http.get(gw.url + "/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "http://127.0.0.1:9/elsewhere"
        assert await response.read() == b"moved"


@pytest.mark.parametrize("code", [204, 304])
async def test_empty_statuses_have_no_body_and_keep_the_connection_usable(
    start_gateway: StartGateway, request_path: RequestPath, code: int
) -> None:
    """Twice on one keep-alive connection (and a third request after): a
    stray body byte or a hang on the second empty body (aiohttp#7616) shows."""
    gw = await start_gateway()
    async with (
        asyncio.timeout(GUARD_SECONDS),
        request_path.raw_connection(gw) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(build_request("GET", f"/status/{code}"))
            response = await read_response(reader)
            assert response.status == code
            assert response.headers["ETag"] == '"v1"'
            assert "Transfer-Encoding" not in response.headers
            if code == 204:
                assert "Content-Length" not in response.headers
        writer.write(build_request("GET", "/after-empty"))
        after = await read_response(reader)
    assert after.status == 200
    assert after.json()["raw_path"] == "/after-empty"


async def test_head_keeps_content_length_and_sends_no_body(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway()
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(build_request("HEAD", "/status/200"))
        head = await read_response(reader, head=True)
        # Any body byte after a HEAD response would corrupt this next response.
        writer.write(build_request("GET", "/after-head"))
        after = await read_response(reader)
    assert head.status == 200
    assert head.headers.getall("Content-Length") == [str(len(b"status 200"))]
    assert "Transfer-Encoding" not in head.headers
    assert after.status == 200
    assert after.json()["raw_path"] == "/after-head"


async def test_http10_client_gets_an_unchunked_stream(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    request = b"GET /stream?n=3&delay=0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    response = await request_path.raw_exchange(gw, request)
    assert response.status == 200
    assert "chunked" not in response.headers.get("Transfer-Encoding", "")
    assert response.body == b"part 0\npart 1\npart 2\n"


async def test_expect_100_continue_is_answered(start_gateway: StartGateway) -> None:
    """curl sends ``Expect: 100-continue`` before large uploads and waits for
    an interim 100 (or a final answer) before sending the body (RFC 9110
    10.1.1: a proxy must answer 417 or forward, and forward 1xx, 15.2)."""
    gw = await start_gateway()
    body = b"12345"
    head = build_request(
        "POST", "/upload", [("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    )
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(head)
        try:
            async with asyncio.timeout(3):
                _, status, _, _ = await read_head(reader)
        except TimeoutError:
            pytest.fail("no 100 Continue (nor 417) within 3 s of an Expect: 100-continue")
        if status == 417:
            return
        assert status == 100
        writer.write(body)
        response = await read_response(reader)
    assert response.status == 200
    assert response.json()["received"] == len(body)


# --------------------------------------------------------------------------- headers


async def test_duplicate_set_cookie_kept(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/cookies") as response:
        assert response.status == 200
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_hop_by_hop_response_headers_dropped(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/hop") as response:
        assert response.status == 200
        assert await response.read() == b"hop"
        headers = response.headers
    assert headers["X-Kept"] == "yes"
    for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in headers, name
    assert "x-private" not in headers.get("Connection", "").lower()


async def test_headers_named_in_several_connection_fields_dropped_from_response(
    start_gateway: StartGateway, request_path: RequestPath, extra: ExtraUpstream
) -> None:
    gw = await start_gateway(upstream_url=extra.url)
    response = await request_path.raw_exchange(gw, build_request("GET", "/multi-connection"))
    assert response.status == 200
    assert response.headers["X-C"] == "3"
    for name in ("X-A", "X-B", "Trailer"):
        assert name not in response.headers, name
    connection = ",".join(response.headers.getall("Connection", [])).lower()
    assert "x-a" not in connection
    assert "x-b" not in connection


async def test_hop_by_hop_request_headers_dropped(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    request = build_request(
        "GET",
        "/hop-request",
        [
            ("Connection", "keep-alive, X-Foo"),
            ("Connection", "x-other"),
            ("X-Foo", "1"),
            ("X-Other", "2"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("X-Bar", "kept"),
            ("Authorization", "Bearer end-to-end"),
        ],
    )
    echo = (await request_path.raw_exchange(gw, request)).json()
    seen = upstream_saw(echo)
    assert seen["X-Bar"] == "kept"
    assert seen["Authorization"] == "Bearer end-to-end"
    dropped = (
        "X-Foo", "X-Other", "Keep-Alive", "TE", "Trailer", "Upgrade",
        "Proxy-Connection", "Proxy-Authorization",
    )  # fmt: skip
    for name in dropped:
        assert name not in seen, name
    connection = ",".join(seen.getall("Connection", [])).lower()
    assert "x-foo" not in connection
    assert "x-other" not in connection


async def test_forwarding_headers_set(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    request = build_request("GET", "/fwd", host="api.example.test")
    response = await request_path.raw_exchange(gw, request)
    seen = upstream_saw(response.json())
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["api.example.test"]
    (via,) = seen.getall("Via")
    assert via.startswith("1.1 ")
    assert len(via.split()) == 2

    # The peer is appended after whatever the client claimed; a prior Via is kept.
    http = await request_path.client(gw)
    async with http.get(
        gw.url + "/fwd", headers={"X-Forwarded-For": "203.0.113.9", "Via": "1.0 fred"}
    ) as resp:
        seen = upstream_saw(await resp.json())
    forwarded_for = [hop.strip() for hop in ",".join(seen.getall("X-Forwarded-For")).split(",")]
    assert forwarded_for[-1] == "127.0.0.1"
    (via,) = seen.getall("Via")
    assert via.startswith("1.0 fred, 1.1 ")


async def test_request_id_kept_when_sent(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/rid", headers={"X-Request-ID": "req-abc-123"}) as response:
        seen = upstream_saw(await response.json())
    assert seen.getall("X-Request-ID") == ["req-abc-123"]
    assert response.headers.getall("X-Request-ID") == ["req-abc-123"]


async def test_request_id_generated_and_echoed(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    ids = []
    for _ in range(2):
        async with http.get(gw.url + "/rid") as response:
            seen = upstream_saw(await response.json())
        (sent_upstream,) = seen.getall("X-Request-ID")
        assert sent_upstream
        assert response.headers.getall("X-Request-ID") == [sent_upstream]
        ids.append(sent_upstream)
    assert ids[0] != ids[1]


async def test_request_id_on_streamed_and_error_responses(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/stream?n=2&delay=0", headers={"X-Request-ID": "s-1"}) as r:
        await r.read()
        assert r.headers.getall("X-Request-ID") == ["s-1"]
    refused = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    request_path.watch(refused)
    async with http.get(refused.url + "/x", headers={"X-Request-ID": "e-1"}) as r:
        await r.read()
        assert r.status == 502
        assert r.headers.getall("X-Request-ID") == ["e-1"]


async def test_no_cookie_jar_between_clients(
    start_gateway: StartGateway, upstream: TestServer, request_path: RequestPath
) -> None:
    """Upstream named by host name: aiohttp's default jar ignores cookies from
    IP hosts, which would hide a shared jar on 127.0.0.1."""
    port = upstream.make_url("").port
    gw = await start_gateway(upstream_url=f"http://localhost:{port}")
    client_a = await request_path.client(gw)  # no cookie jar either
    async with client_a.get(gw.url + "/cookies") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    client_b = await request_path.client(gw)
    async with client_b.get(gw.url + "/whoami") as response:
        seen = upstream_saw(await response.json())
    assert "Cookie" not in seen


async def test_gzip_passes_through_undecoded(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(body))
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == b"hello gzip" * 10


async def test_no_accept_encoding_or_user_agent_added(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    echo = (await request_path.raw_exchange(gw, build_request("GET", "/bare"))).json()
    seen = upstream_saw(echo)
    for name in ("Accept-Encoding", "User-Agent", "Accept"):
        assert name not in seen, name

    # And what the client did send is forwarded as sent.
    request = build_request(
        "GET", "/bare", [("Accept-Encoding", "identity"), ("User-Agent", "curl/8.0")]
    )
    seen = upstream_saw((await request_path.raw_exchange(gw, request)).json())
    assert seen.getall("Accept-Encoding") == ["identity"]
    assert seen.getall("User-Agent") == ["curl/8.0"]


async def test_rate_limit_headers_on_allowed_responses(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway(limits=limits(5, refill_period="10s"))
    http = await request_path.client(gw)
    expected_remaining = 4
    for path in ("/echo", "/stream?n=2&delay=0", "/status/204", "/download?size=10"):
        async with http.get(gw.url + path) as response:
            await response.read()
            assert response.status in (200, 204)
            headers = response.headers
        # w: seconds from empty to full, 10s * ceil(5 / 1)
        assert headers.getall("RateLimit-Policy") == ['"default";q=5;w=50'], path
        assert headers.getall("RateLimit") == [f'"default";r={expected_remaining};t=10'], path
        assert headers.getall("X-RateLimit-Limit") == ["5"], path
        assert headers.getall("X-RateLimit-Remaining") == [str(expected_remaining)], path
        assert headers.getall("X-RateLimit-Reset") == ["10"], path
        expected_remaining -= 1


async def test_upstream_failure_responses_carry_rate_limit_headers(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    """The 502 answers an admitted request that took a token: the client
    still needs its quota to pace itself ("every proxied response")."""
    gw = await start_gateway(
        upstream_url=f"http://127.0.0.1:{free_port()}",
        limits=limits(5, refill_period="10s"),
    )
    http = await request_path.client(gw)
    async with http.get(gw.url + "/x") as response:
        await response.read()
    assert response.status == 502
    assert response.headers.getall("RateLimit-Policy") == ['"default";q=5;w=50']  # 10s * 5
    assert response.headers.getall("RateLimit") == ['"default";r=4;t=10']
    assert response.headers.getall("X-RateLimit-Remaining") == ["4"]


# --------------------------------------------------------------------------- streams


async def test_chunked_stream_arrives_incrementally(
    start_gateway: StartGateway, extra: ExtraUpstream, request_path: RequestPath
) -> None:
    """The upstream writes part i+1 only after the client has read part i
    through the gateway; any buffering deadlocks (and times out)."""
    gw = await start_gateway(upstream_url=extra.url)
    http = await request_path.client(gw)
    async with asyncio.timeout(GUARD_SECONDS), http.get(gw.url + "/lockstep?n=4") as response:
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        for i in range(4):
            line = await response.content.readline()
            assert line == f"part {i}\n".encode()
            extra.steps.put_nowait(None)
        assert await response.read() == b""


async def test_slow_stream_complete(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    http = await request_path.client(gw)
    async with http.get(gw.url + "/stream?n=5&delay=0.01") as response:
        assert response.status == 200
        assert await response.read() == b"".join(f"part {i}\n".encode() for i in range(5))


# --------------------------------------------------------------------------- websocket


async def test_websocket_proxied_both_ways(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    async with (
        asyncio.timeout(GUARD_SECONDS),
        http.ws_connect(gw.url + "/ws", protocols=("chat",)) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str() == "echo:hello"
        await ws.send_bytes(b"\x00\x01binary\xff")
        assert await ws.receive_bytes() == b"\xffyranib\x01\x00"
        await ws.send_str("close")
        message = await ws.receive()
        assert message.type is WSMsgType.CLOSE
        assert message.data == 4001
    assert ws.close_code == 4001


async def test_websocket_close_reason_forwarded(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    async with (
        asyncio.timeout(GUARD_SECONDS),
        http.ws_connect(gw.url + "/ws", protocols=("chat",)) as ws,
    ):
        await ws.send_str("close")
        message = await ws.receive()
    assert message.type is WSMsgType.CLOSE
    assert (message.data, message.extra) == (4001, "bye")


async def test_websocket_client_close_code_and_ping_reach_upstream(
    start_gateway: StartGateway, extra: ExtraUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(upstream_url=extra.url)
    async with asyncio.timeout(GUARD_SECONDS):
        ws = await http.ws_connect(gw.url + "/ws-record", autoping=False)
        await ws.ping(b"p1")
        pong = await ws.receive()
        assert pong.type is WSMsgType.PONG
        assert pong.data == b"p1"
        await ws.send_str("x" * 100_000)
        assert await ws.receive_str() == "x" * 100_000
        await ws.close(code=4002, message=b"done")
        assert await extra.ws_close_code == 4002


async def test_websocket_to_refused_upstream_is_502(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(gw.url + "/ws")
    assert caught.value.status == 502


# --------------------------------------------------------------------------- failures


def assert_short_json_error(body: bytes) -> None:
    assert len(body) < 1024
    assert b"Traceback" not in body
    payload = json.loads(body)
    assert isinstance(payload, dict)
    assert isinstance(payload.get("error"), str)
    assert payload["error"]


async def test_upstream_refused_is_502_json(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")
    http = await request_path.client(gw)
    async with http.get(gw.url + "/anything") as response:
        body = await response.read()
        assert response.status == 502
        assert response.content_type == "application/json"
    assert_short_json_error(body)
    labels = {"route": "default", "kind": "connect"}
    assert gw.metric("gateway_upstream_errors_total", labels) == 1
    # Still serving: a second request gets the same answer.
    async with http.get(gw.url + "/anything") as response:
        assert response.status == 502


async def test_upstream_answering_invalid_http_is_502_json(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    """A backend that answers with something that is not HTTP: the client
    gets a 502 with a JSON body, not a dropped connection or a traceback."""

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(upstream_url=f"http://127.0.0.1:{port}")
        http = await request_path.client(gw)
        async with http.get(gw.url + "/anything") as response:
            body = await response.read()
            assert response.status == 502
            assert response.content_type == "application/json"
        assert_short_json_error(body)


async def test_upstream_silent_past_read_timeout_is_504_json(
    start_gateway: StartGateway, upstream: TestServer, request_path: RequestPath
) -> None:
    gw = await start_gateway(upstream={"read_timeout": "200ms"})
    http = await request_path.client(gw)
    started = time.perf_counter()
    async with http.get(gw.url + "/slow?delay=2") as response:
        body = await response.read()
        assert response.status == 504
        assert response.content_type == "application/json"
    elapsed = time.perf_counter() - started
    assert elapsed < 1.5, f"504 after {elapsed:.2f}s: not at read_timeout"
    assert_short_json_error(body)
    assert upstream.app[HITS] == ["/slow?delay=2"]  # not retried
    labels = {"route": "default", "kind": "timeout"}
    assert gw.metric("gateway_upstream_errors_total", labels) == 1


async def test_upstream_reset_mid_response_truncates_and_gateway_keeps_serving(
    start_gateway: StartGateway,
    request_path: RequestPath,
) -> None:
    gw = await start_gateway()
    response, rest = await request_path.raw_exchange_to_close(
        gw, build_request("GET", "/reset")
    )
    assert rest == b""  # and the connection is closed
    assert response.status == 200
    assert not response.complete, "a cut upstream response must not look complete"
    assert len(response.body) < 1_000_000
    await wait_idle(gw)

    after = await request_path.raw_exchange(gw, build_request("GET", "/after-reset"))
    assert after.status == 200
    assert after.json()["raw_path"] == "/after-reset"
    labels = {"route": "default", "kind": "reset"}
    assert gw.metric("gateway_upstream_errors_total", labels) == 1


async def test_client_disconnect_mid_download_leaves_gateway_serving(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    async with (
        asyncio.timeout(GUARD_SECONDS),
        request_path.raw_connection(gw) as (reader, writer),
    ):
        writer.write(build_request("GET", f"/download?size={64 * MiB}"))
        _, status, _, headers = await read_head(reader)
        assert status == 200
        assert headers["Content-Length"] == str(64 * MiB)
        await reader.readexactly(256 * 1024)
        writer.transport.abort()  # RST mid-body
        await wait_idle(gw)
    assert gw.metric("gateway_inflight_requests") == 0

    after = await request_path.raw_exchange(gw, build_request("GET", "/after-abort"))
    assert after.status == 200
    assert after.json()["raw_path"] == "/after-abort"
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "reset"}) == 0
    )


# --------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(field_name)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


async def test_streaming_memory_stays_bounded(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """256 MiB up and 256 MiB down through the gateway; the gateway, the
    upstream and this client share the process, so buffering anywhere shows
    as peak RSS growth."""
    gw = await start_gateway()
    size = 256 * MiB
    block = bytes(range(256)) * 256  # 64 KiB, reused: the test holds no body
    gc.collect()
    peak_resettable = _reset_peak_rss()
    baseline = (
        _status_kib("VmRSS")
        if peak_resettable
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )

    sent_digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            sent_digest.update(block)
            yield block

    async with http.post(gw.url + "/upload", data=upload()) as response:
        assert response.status == 200
        result = await response.json()
    assert result == {"received": size, "sha256": sent_digest.hexdigest()}

    received = 0
    async with http.get(f"{gw.url}/download?size={size}") as response:
        assert response.status == 200
        async for piece in response.content.iter_any():
            received += len(piece)
    assert received == size

    peak = (
        _status_kib("VmHWM")
        if peak_resettable
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 64, f"peak RSS grew {growth_mib:.0f} MiB while streaming 2 x 256 MiB"
