"""Hostile request heads on both request paths, over raw sockets (issue 13,
items 1 and 2): an invalid Host is refused with 400 before any decision, and
header names with underscores are dropped (default), refused, or forwarded
as ``server.underscores_in_headers`` says, never read as the API key."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import RequestPath, RunningGateway, StartGateway
from tests.helpers import RawResponse, bucket, build_request
from tests.upstream_app import HITS

SMUGGLED_UNDERSCORES = [
    ("X_API_Key", "victim"),
    ("Transfer_Encoding", "chunked"),
    ("Content_Length", "5"),
]


def rejected(gw: RunningGateway, reason: str) -> float:
    return gw.metric("gateway_rejected_requests_total", {"reason": reason})


def decisions(gw: RunningGateway) -> float:
    return sum(
        gw.metric("gateway_requests_total", {"route": "default", "decision": decision})
        for decision in ("allowed", "denied", "unlimited", "exempt", "blocked", "delayed")
    )


def assert_bad_request(response: RawResponse) -> None:
    assert response.status == 400, (response.status, response.body[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "bad_request"
    assert b"Traceback" not in response.body


def upstream_saw(response: RawResponse) -> CIMultiDict[str]:
    assert response.status == 200, (response.status, response.body[:300])
    return CIMultiDict((name, value) for name, value in response.json()["headers"])


# --------------------------------------------------------------------------- 1. Host


@pytest.mark.parametrize(
    "host",
    [
        "a b",
        "evil.example/x",
        "",
        "user@evil.example",
        "evil.example:80/x",
        "[::1",
        "::1",
        "a\\b",
        "evil.example:8o",
        "é.example",
    ],
)
async def test_invalid_host_is_refused_before_any_decision(
    start_gateway: StartGateway, request_path: RequestPath, upstream: TestServer, host: str
) -> None:
    gw = await start_gateway(limits={"default": bucket(1)})
    data = build_request("GET", "/h", host=host)
    response, after = await request_path.raw_exchange_to_close(gw, data)
    assert_bad_request(response)
    assert after == b"", "the connection is closed after the 400"
    assert upstream.app[HITS] == []
    assert rejected(gw, "bad_host") == 1
    assert decisions(gw) == 0
    # No token was taken: the one token of the bucket is still there.
    good = await request_path.raw_exchange(gw, build_request("GET", "/ok"))
    assert good.status == 200
    assert upstream.app[HITS] == ["/ok"]


@pytest.mark.parametrize(
    "host",
    ["example.com", "example.com:8080", "127.0.0.1:80", "[::1]:8080", "[::1]", "a_b.example",
     "xn--bcher-kva.example", "host:"],
)  # fmt: skip
async def test_valid_host_is_forwarded(
    start_gateway: StartGateway, request_path: RequestPath, host: str
) -> None:
    gw = await start_gateway()
    response = await request_path.raw_exchange(gw, build_request("GET", "/h", host=host))
    assert upstream_saw(response)["X-Forwarded-Host"] == host
    assert rejected(gw, "bad_host") == 0


# --------------------------------------------------------------------------- 2. underscores


async def test_underscore_fields_are_dropped_by_default_and_counted(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    data = build_request("GET", "/u", [*SMUGGLED_UNDERSCORES, ("X-Kept", "yes")])
    seen = upstream_saw(await request_path.raw_exchange(gw, data))
    assert [name for name in seen if "_" in name] == []
    assert seen["X-Kept"] == "yes"
    assert "Transfer-Encoding" not in seen
    assert rejected(gw, "underscore_header") == 1  # one count per request
    clean = await request_path.raw_exchange(gw, build_request("GET", "/c", [("X-A", "1")]))
    assert clean.status == 200
    assert rejected(gw, "underscore_header") == 1


async def test_underscore_fields_refused_under_reject(
    start_gateway: StartGateway, request_path: RequestPath, upstream: TestServer
) -> None:
    gw = await start_gateway(
        limits={"default": bucket(1)}, server={"underscores_in_headers": "reject"}
    )
    data = build_request("GET", "/u", [("X_Custom", "1")])
    response, after = await request_path.raw_exchange_to_close(gw, data)
    assert_bad_request(response)
    assert after == b""
    assert upstream.app[HITS] == []
    assert rejected(gw, "underscore_header") == 1
    assert decisions(gw) == 0
    good = await request_path.raw_exchange(gw, build_request("GET", "/ok"))
    assert good.status == 200  # the bucket's one token was not taken


async def test_underscore_fields_forwarded_under_allow(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway(server={"underscores_in_headers": "allow"})
    data = build_request("GET", "/u", [("X_Custom", "1")])
    seen = upstream_saw(await request_path.raw_exchange(gw, data))
    assert seen.getall("X_Custom") == ["1"]
    assert rejected(gw, "underscore_header") == 0


@pytest.mark.parametrize("mode", ["drop", "allow"])
async def test_underscore_field_is_not_the_api_key(
    start_gateway: StartGateway, request_path: RequestPath, mode: str
) -> None:
    gw = await start_gateway(
        limits={"default": bucket(1)},
        clients={"identify_by": "header"},
        server={"underscores_in_headers": mode},
    )
    victim = build_request("GET", "/v", [("X-API-Key", "victim")])
    assert (await request_path.raw_exchange(gw, victim)).status == 200
    assert (await request_path.raw_exchange(gw, victim)).status == 429
    # The same value under an underscore name is another client (not the
    # victim's spent bucket): the limiter never read it as X-API-Key.
    posing = build_request("GET", "/p", [("X_API_Key", "victim")])
    assert (await request_path.raw_exchange(gw, posing)).status == 200


@pytest.mark.parametrize("served_first", [False, True], ids=["first", "after_a_request"])
async def test_a_request_line_without_a_version_is_answered_400_at_once(
    start_gateway: StartGateway, served_first: bool
) -> None:
    """HTTP/0.9's ``GET /`` has no head to wait for: 400 at once, as nginx
    answers, not silence until header_timeout (here 30 s; the answer must
    come within 5 s), on a fresh connection and after a served request."""
    import asyncio

    from tests.helpers import raw_connection, read_response

    gw = await start_gateway(server={"header_timeout": "30s", "keepalive_timeout": "30s"})
    async with asyncio.timeout(5), raw_connection(gw) as (reader, writer):
        if served_first:
            writer.write(build_request("GET", "/echo"))
            assert (await read_response(reader)).status == 200
        writer.write(b"GET /\r\n")
        response = await read_response(reader)
        assert await reader.read() == b""  # and the connection is closed
    assert response.status == 400
    assert response.json()["error"] == "bad_request"
    assert rejected(gw, "bad_request") == 1
