"""The admin listener's views for people: /admin/clients (top denied
clients), /admin/clients/{id}, /admin/stats and the dashboard's files, over
real sockets against an in-process gateway (memory and a real redis-server).
With ``workers: 2`` they are tested in tests/functional/test_workers.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest

from tests.conftest import RedisServer, RunningGateway, StartGateway
from tests.helpers import admin_client, bucket, fetch, limits, sequential

API_KEY = {"identify_by": "header"}


def routes() -> list[dict[str, Any]]:
    return [
        {"path_prefix": "/api", "limit": bucket(2)},
        {"path_prefix": "/login", "methods": ["POST"], "limit": bucket(1)},
        {"path_prefix": "/beta", "limit": bucket(1), "mode": "shadow"},
        {"path_prefix": "/health", "limit": "unlimited"},
    ]


async def get_json(http: aiohttp.ClientSession, url: str, status: int = 200) -> dict[str, Any]:
    async with http.get(url) as response:
        assert response.status == status, await response.text()
        assert response.content_type == "application/json"
        body: dict[str, Any] = await response.json()
        return body


async def send(
    http: aiohttp.ClientSession, gw: RunningGateway, key: str, path: str, count: int
) -> list[int]:
    method = "POST" if path.startswith("/login") else "GET"
    statuses = []
    for _ in range(count):
        async with http.request(method, gw.url + path, headers={"X-API-Key": key}) as response:
            await response.read()
            statuses.append(response.status)
    return statuses


async def test_admin_clients_names_the_top_denied_overall_and_per_route(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(100), clients=API_KEY, routes=routes())
    assert await send(http, gw, "key-a", "/api", 8) == [200] * 2 + [429] * 6
    assert await send(http, gw, "key-b", "/api", 5) == [200] * 2 + [429] * 3
    assert await send(http, gw, "key-b", "/login", 2) == [200, 429]
    # Shadow mode lets the request through, but it is a would-be denial.
    assert await send(http, gw, "key-c", "/beta", 3) == [200] * 3
    assert await send(http, gw, "key-d", "/other", 3) == [200] * 3  # never denied

    body = await get_json(http, gw.admin_url + "/admin/clients")
    assert body["denied_total"] == 6 + 3 + 1 + 2
    assert (body["window_seconds"], body["counters"], body["workers"]) == (300, 64, 1)
    assert body["allowed_counted"] is False
    assert [(c["client"], c["denied"], c["error"]) for c in body["clients"]] == [
        ("key-a", 6, 0),
        ("key-b", 4, 0),
        ("key-c", 2, 0),
    ]
    by_client = {c["client"]: c for c in body["clients"]}
    assert by_client["key-b"]["routes"] == {"/api": 3, "/login": 1}
    assert by_client["key-a"]["allowed"] is None
    # Current tokens, on the routes the client was denied on only.
    tokens = {
        c: {(b["route"], b["policy"]): (b["tokens"], b["max_tokens"]) for b in entry["buckets"]}
        for c, entry in by_client.items()
    }
    assert tokens == {
        "key-a": {("/api", "/api"): (0, 2)},
        "key-b": {("/api", "/api"): (0, 2), ("/login POST", "/login"): (0, 1)},
        "key-c": {("/beta", "/beta"): (0, 1)},
    }
    per_route = {r["route"]: r for r in body["routes"]}
    assert list(per_route) == ["/api", "/beta", "/login"]  # most denied first
    assert per_route["/api"]["denied_total"] == 9
    assert [(c["client"], c["denied"]) for c in per_route["/api"]["clients"]] == [
        ("key-a", 6),
        ("key-b", 3),
    ]
    assert [(c["client"], c["denied"]) for c in per_route["/login"]["clients"]] == [
        ("key-b", 1)
    ]

    # The same answer with a trailing slash; ?top= bounds both lists.
    assert await get_json(http, gw.admin_url + "/admin/clients/") == body
    top_one = await get_json(http, gw.admin_url + "/admin/clients?top=1")
    assert [c["client"] for c in top_one["clients"]] == ["key-a"]
    assert all(len(r["clients"]) == 1 for r in top_one["routes"])
    for bad in ("0", "65", "x", "-1"):
        answer = await get_json(http, gw.admin_url + f"/admin/clients?top={bad}", 400)
        assert answer == {"error": "bad_request", "detail": "top must be 1 to 64"}


async def test_admin_client_says_tracked_and_how_often_it_was_denied(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(3), clients=API_KEY, routes=routes())
    assert await send(http, gw, "key-a", "/x", 5) == [200] * 3 + [429] * 2
    status, body = await admin_client(http, gw.admin_url, "key-a")
    assert status == 200
    assert (body["tracked"], body["denied"]) == (True, {"count": 2, "error": 0})
    held = {(b["route"], b["tokens"], b["held"]) for b in body["buckets"]}
    assert ("default", 0, True) in held
    assert ("/api", 2, False) in held  # not held: what a first request would find

    assert await send(http, gw, "key-e", "/x", 1) == [200]
    status, body = await admin_client(http, gw.admin_url, "key-e")
    assert (status, body["tracked"], body["denied"]) == (200, True, None)

    status, body = await admin_client(http, gw.admin_url, "key-typo")
    assert status == 404
    assert body == {
        "client": "key-typo",
        "id": "key-typo",
        "tracked": False,
        "denied": None,
        "buckets": [],
    }


async def test_an_ipv6_client_is_its_network_also_in_the_views(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(1),
        clients={"trusted_proxies": ["127.0.0.1/32"], "ipv6_prefix": 64},
    )
    forwarded = {"X-Forwarded-For": "2001:db8:1:2::7"}
    assert await sequential(http, gw.url + "/x", 3, headers=forwarded) == [200, 429, 429]
    body = await get_json(http, gw.admin_url + "/admin/clients")
    assert [(c["client"], c["denied"]) for c in body["clients"]] == [("2001:db8:1:2::/64", 2)]
    assert [b["tokens"] for b in body["clients"][0]["buckets"]] == [0]
    # Typed as an address or as the network, "/" and all.
    for typed in ("2001:db8:1:2::99", "2001:db8:1:2::/64"):
        status, client = await admin_client(http, gw.admin_url, typed)
        assert (status, client["id"], client["denied"]) == (
            200,
            "2001:db8:1:2::/64",
            {"count": 2, "error": 0},
        )


async def test_admin_stats_counts_each_route_s_decisions_in_matching_order(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(100),
        clients={**API_KEY, "deny": ["key:bad"], "allow": ["key:vip"]},
        routes=routes(),
    )
    empty = await get_json(http, gw.admin_url + "/admin/stats")
    assert [r["route"] for r in empty["routes"]] == [
        "/api",
        "/login",
        "/beta",
        "/health",
        "default",
    ]
    assert empty["totals"]["decisions"] == dict.fromkeys(
        ("allowed", "denied", "shadow_denied", "unlimited", "exempt", "blocked", "delayed"), 0
    )
    await send(http, gw, "key-a", "/api", 4)  # 2 allowed, 2 denied
    await send(http, gw, "key-a", "/beta", 3)  # 1 allowed, 2 shadow_denied
    await send(http, gw, "key-a", "/health", 2)  # unlimited
    await send(http, gw, "vip", "/api", 2)  # exempt
    await send(http, gw, "bad", "/x", 1)  # blocked
    await send(http, gw, "key-a", "/x", 5)  # allowed on the default route

    stats = await get_json(http, gw.admin_url + "/admin/stats")
    decisions = {
        r["route"]: {d: n for d, n in r["decisions"].items() if n} for r in stats["routes"]
    }
    assert decisions == {
        "/api": {"allowed": 2, "denied": 2, "exempt": 2},
        "/login": {},
        "/beta": {"allowed": 1, "shadow_denied": 2},
        "/health": {"unlimited": 2},
        "default": {"allowed": 5, "blocked": 1},
    }
    assert stats["totals"]["decisions"]["allowed"] == 8
    assert stats["totals"]["upstream_errors"] == {
        "connect": 0,
        "timeout": 0,
        "reset": 0,
        "invalid": 0,
        "busy": 0,
    }
    assert stats["workers"] == 1
    assert stats["inflight"] == 0
    assert stats["clients_tracked"] == 3  # key-a on /api, /beta and default
    assert stats["time"] > empty["time"]


async def test_views_with_redis_and_when_redis_is_gone(
    start_gateway: StartGateway, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    gw = await start_gateway(
        limits=limits(2),
        clients=API_KEY,
        storage={
            "backend": "redis",
            "redis_url": redis_server.url,
            "on_error": "allow",
            "timeout": "200ms",
        },
    )
    assert await send(http, gw, "key-a", "/x", 4) == [200, 200, 429, 429]
    body = await get_json(http, gw.admin_url + "/admin/clients")
    (entry,) = body["clients"]
    assert (entry["client"], entry["denied"]) == ("key-a", 2)
    assert [(b["route"], b["tokens"], b["held"]) for b in entry["buckets"]] == [
        ("default", 0, True)
    ]
    assert (await admin_client(http, gw.admin_url, "key-nobody"))[0] == 404

    redis_server.stop()
    status, client = await admin_client(http, gw.admin_url, "key-a")
    assert status == 503
    assert client["error"] == "storage"
    assert client["detail"].startswith("redis: ")
    # The top list stays (it is in this process); its tokens cannot be read.
    body = await get_json(http, gw.admin_url + "/admin/clients")
    assert body["clients"][0]["buckets"] is None
    assert body["storage_error"].startswith("redis: ")


async def test_the_dashboard_is_served_whole_from_the_package(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    status, headers, page = await fetch(http, gw.admin_url + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
    # data:, is an empty icon: no favicon.ico request.
    assert sorted(assets) == [b"/dashboard/app.css", b"/dashboard/app.js", b"data:,"]
    for asset, kind in (
        (b"/dashboard/app.js", "text/javascript"),
        (b"/dashboard/app.css", "text/css"),
    ):
        status, headers, body = await fetch(http, gw.admin_url + asset.decode())
        assert status == 200
        assert headers["Content-Type"] == f"{kind}; charset=utf-8"
        # Nothing fetched from elsewhere: no CDN, no font service.
        urls = re.findall(rb"https?://[^\s\"')]+", body)
        assert set(urls) <= {b"http://www.w3.org/2000/svg"}, urls
        # Every JSON view the page polls exists on this listener.
        for view in re.findall(rb'getJSON\("(/[a-z/]+)"', body):
            status, _headers, answer = await fetch(http, gw.admin_url + view.decode())
            assert status in (200, 503), view
            json.loads(answer)


@pytest.mark.parametrize(
    "path", ["/admin", "/dashboard/", "/dashboard/missing.js", "/index.html"]
)
async def test_other_admin_paths_stay_404(
    start_gateway: StartGateway, http: aiohttp.ClientSession, path: str
) -> None:
    gw = await start_gateway()
    status, _headers, _body = await fetch(http, gw.admin_url + path)
    assert status == 404
