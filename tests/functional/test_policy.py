"""The policy vocabulary over real sockets (CONTRACT.md, "Policy vocabulary";
README, "Limits you can express" and "Response headers"): several limits per
route, ``per`` (ip, header:NAME, route, composites), ``cost``, ``methods``,
allow and deny lists and their reload, IPv6 /64 clients, the queue,
``count_statuses`` and the admin view of every limit.

Requests that are GETs run on both request paths (``request_path``). What
depends on the store runs on both: the in-process buckets and a real
``redis-server`` (``store``), with two gateway instances on one Redis for the
shared cases.

The clock. Every gateway here has a ManualRefillClock. The memory store counts
periods on it; so does the Redis store, through ``RedisStore``'s ``now_ms``
test seam (as in test_bucket_semantics.py): the script is handed that clock's
time, from ``REDIS_EPOCH_MS`` (a whole hour, so both stores' periods line
up), in place of the server's ``TIME``. Two instances on one Redis follow one
clock. Everything else is the production path: the Lua script, batches,
hashes, a real server. What stays real is key expiry (Redis's own clock), so
each test writes keys that live far longer than it runs. A queued request
waits on the event loop for the delay its store computed on that clock; the
limits keep those delays at a fraction of a second.

Nothing sleeps: tests await responses, the gateway's idle event, or (for a
request that must be seen queued before the next step) a bounded poll of an
in-process counter.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from gateway.limiting.redis_store import RedisStore
from gateway.limiting.refill_clock import ManualRefillClock
from tests.conftest import RequestPath, RunningGateway, StartGateway, gateway_yaml
from tests.helpers import (
    GUARD_SECONDS,
    admin_client,
    bucket,
    build_request,
    fetch,
    limits,
    poll,
    wait_idle,
)
from tests.upstream_app import HITS

# 2023-11-14 22:00:00 UTC: a whole hour, so a period dividing an hour counts
# its ticks on Redis from the same instant as the memory store's clock (0).
REDIS_EPOCH_MS = 472_222 * 3_600_000
RATE_LIMIT_FIELDS = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
)
TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
FORBIDDEN = {"error": "forbidden"}

Response = tuple[int, CIMultiDictProxy[str], bytes]


# --------------------------------------------------------------------------- stores


@dataclass
class Store:
    """One bucket store the gateways of a test use."""

    name: str
    redis_url: str | None = None

    def config(self) -> dict[str, Any]:
        if self.redis_url is None:
            return {}
        storage = {"backend": "redis", "redis_url": self.redis_url, "on_error": "deny",
                   "timeout": "2s"}  # fmt: skip
        return {"storage": storage}


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Store:
    """The in-process buckets, or a real redis-server shared by the test's gateways."""
    if request.param == "redis":
        return Store("redis", request.getfixturevalue("redis_server").url)
    return Store("memory")


@pytest.fixture
def redis_store(request: pytest.FixtureRequest) -> Store:
    """A real redis-server (for the cases two instances share)."""
    return Store("redis", request.getfixturevalue("redis_server").url)


def manual(gw: RunningGateway) -> ManualRefillClock:
    assert isinstance(gw.clock, ManualRefillClock)
    return gw.clock


async def start_on(
    start_gateway: StartGateway,
    store: Store,
    *,
    clock_of: RunningGateway | None = None,
    **config: Any,
) -> RunningGateway:
    """A gateway on ``store``; on Redis its script counts periods on the
    manual clock of ``clock_of`` (default: its own)."""
    gw = await start_gateway(**config, **store.config())
    if store.redis_url is not None:
        clock = manual(clock_of or gw)
        redis_store = gw.server.store
        assert isinstance(redis_store, RedisStore)
        redis_store._now_ms = lambda: REDIS_EPOCH_MS + round(clock.now() * 1000)
    return gw


# --------------------------------------------------------------------------- helpers


def decisions(gw: RunningGateway, route: str, decision: str) -> float:
    return gw.metric("gateway_requests_total", {"route": route, "decision": decision})


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Response:
    async with asyncio.timeout(GUARD_SECONDS):
        return await fetch(session, url, **kwargs)


async def statuses(
    session: aiohttp.ClientSession, url: str, count: int, **kwargs: Any
) -> list[int]:
    """``count`` GETs one after the other."""
    return [(await get(session, url, **kwargs))[0] for _ in range(count)]


async def timed(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[Response, float]:
    started = time.perf_counter()
    response = await get(session, url, **kwargs)
    return response, time.perf_counter() - started


async def admin_view(
    http: aiohttp.ClientSession, gw: RunningGateway, client: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """/admin/clients/{client}: (route, limit name) -> bucket."""
    async with http.get(f"{gw.admin_url}/admin/clients/{client}") as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["client"] == client
    view = {(b["route"], b["policy"]): b for b in body["buckets"]}
    assert len(view) == len(body["buckets"]), body
    return view


def not_tracked(client: str) -> dict[str, Any]:
    """/admin/clients/{client}'s body for a client the gateway holds no bucket for."""
    return {"client": client, "id": client, "tracked": False, "denied": None, "buckets": []}


async def tokens_of(
    http: aiohttp.ClientSession, gw: RunningGateway, client: str, route: str, name: str
) -> int:
    tokens: int = (await admin_view(http, gw, client))[(route, name)]["tokens"]
    return tokens


def rate_limit_fields(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {name: headers[name] for name in RATE_LIMIT_FIELDS if name in headers}


def xff(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def until(condition: Callable[[], bool], what: str) -> None:
    """A bounded wait for an in-process condition (checked every 5 ms)."""
    await poll(condition, what, seconds=GUARD_SECONDS, interval=0.005)


# --------------------------------------------------------------------------- several limits


async def test_every_limit_must_admit_and_a_denied_request_takes_nothing(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
    upstream: TestServer,
) -> None:
    burst = {**bucket(2, 1, "10s"), "name": "burst"}  # w = 10 s * ceil(2 / 1)
    hourly = {**bucket(5, 5, "1h"), "name": "hourly"}  # w = 1 h * ceil(5 / 5)
    gw = await start_on(
        start_gateway, store, routes=[{"path_prefix": "/m", "limit": [burst, hourly]}]
    )
    clock = manual(gw)
    client = await request_path.client(gw)
    url = gw.url + "/m"
    policy = '"burst";q=2;w=20, "hourly";q=5;w=3600'

    status, headers, _ = await get(client, url)
    assert status == 200
    assert rate_limit_fields(headers) == {
        "RateLimit-Policy": policy,
        "RateLimit": '"burst";r=1;t=10',  # burst 1 left, hourly 4: burst has fewer
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "1",
        "X-RateLimit-Reset": "10",
    }
    status, headers, _ = await get(client, url)
    assert (status, headers["RateLimit"]) == (200, '"burst";r=0;t=10')

    # burst is empty: denied, reported by burst, twice; hourly keeps its 3.
    for _ in range(2):
        status, headers, body = await get(client, url)
        assert status == 429
        assert json.loads(body) == {"error": "rate_limited", "retry_after": 10}
        assert rate_limit_fields(headers) == {
            "RateLimit-Policy": policy,
            "RateLimit": '"burst";r=0;t=10',
            "X-RateLimit-Limit": "2",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": "10",
            "Retry-After": "10",
        }
    view = await admin_view(http, gw, "127.0.0.1")
    assert view[("/m", "burst")]["tokens"] == 0
    assert view[("/m", "hourly")]["tokens"] == 3

    clock.advance(10)  # burst +1
    status, headers, _ = await get(client, url)
    assert (status, headers["RateLimit"]) == (200, '"burst";r=0;t=10')  # hourly 2 left

    clock.advance(20)  # burst full again (2); t = 30 s
    status, headers, _ = await get(client, url)
    assert status == 200  # burst 1, hourly 1: a tie (which one is reported is not asked)
    clock.advance(20)  # burst full again; t = 50 s
    status, headers, _ = await get(client, url)
    assert status == 200
    assert rate_limit_fields(headers) == {
        "RateLimit-Policy": policy,
        "RateLimit": '"hourly";r=0;t=3550',  # burst 1 left, hourly 0
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "3550",
    }

    # Now hourly denies (burst would admit): reported by hourly, burst keeps its token.
    status, headers, body = await get(client, url)
    assert status == 429
    assert headers["RateLimit"] == '"hourly";r=0;t=3550'
    assert headers["X-RateLimit-Limit"] == "5"
    assert headers["Retry-After"] == "3550"
    assert json.loads(body)["retry_after"] == 3550
    view = await admin_view(http, gw, "127.0.0.1")
    assert view[("/m", "burst")]["tokens"] == 1
    assert view[("/m", "hourly")]["tokens"] == 0

    assert decisions(gw, "/m", "allowed") == 5
    assert decisions(gw, "/m", "denied") == 3
    assert len(upstream.app[HITS]) == 5


async def test_retry_after_is_when_every_limit_would_admit(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    # Unnamed: the route's path_prefix, then "/r-2".
    gw = await start_on(
        start_gateway,
        store,
        routes=[{"path_prefix": "/r", "limit": [bucket(1, 1, "10s"), bucket(2, 1, "1h")]}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/r"

    status, headers, _ = await get(client, url)
    assert status == 200
    assert headers["RateLimit-Policy"] == '"/r";q=1;w=10, "/r-2";q=2;w=7200'

    # Only the 10 s limit denies: 10 s until both admit.
    status, headers, body = await get(client, url)
    assert status == 429
    assert (headers["Retry-After"], headers["RateLimit"]) == ("10", '"/r";r=0;t=10')
    assert json.loads(body)["retry_after"] == 10

    manual(gw).advance(10)
    status, _headers, _ = await get(client, url)
    assert status == 200  # both limits are empty now

    # Both deny: the 10 s limit would admit in 10 s, the hourly one in 3590 s.
    status, headers, body = await get(client, url)
    assert status == 429
    assert headers["Retry-After"] == "3590"
    assert json.loads(body)["retry_after"] == 3590
    assert headers["RateLimit"] == '"/r-2";r=0;t=3590'
    assert headers["X-RateLimit-Limit"] == "2"


async def test_fewest_left_limit_is_reported_and_a_shared_denial_spares_the_client_limit(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    mine = {**bucket(5), "name": "mine"}
    everyone = {**bucket(6), "name": "all", "per": "route"}
    gw = await start_on(
        start_gateway,
        store,
        clients={"identify_by": "header"},
        routes=[{"path_prefix": "/f", "limit": [mine, everyone]}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/f"
    x, y = {"X-API-Key": "x"}, {"X-API-Key": "y"}

    async def reported(headers: dict[str, str]) -> tuple[int, str, str]:
        status, response_headers, _ = await get(client, url, headers=headers)
        return status, response_headers["RateLimit"], response_headers["X-RateLimit-Limit"]

    assert await reported(x) == (200, '"mine";r=4;t=3600', "5")  # all: 5
    assert await reported(x) == (200, '"mine";r=3;t=3600', "5")  # all: 4
    assert await reported(y) == (200, '"all";r=3;t=3600', "6")  # y's mine: 4
    assert await reported(y) == (200, '"all";r=2;t=3600', "6")
    assert await reported(x) == (200, '"all";r=1;t=3600', "6")  # x's mine: 2
    assert await reported(x) == (200, '"all";r=0;t=3600', "6")  # x's mine: 1
    assert await reported(x) == (429, '"all";r=0;t=3600', "6")
    assert await reported(y) == (429, '"all";r=0;t=3600', "6")
    assert await tokens_of(http, gw, "x", "/f", "mine") == 1
    assert await tokens_of(http, gw, "y", "/f", "mine") == 3
    assert await tokens_of(http, gw, "x", "/f", "all") == 0


# --------------------------------------------------------------------------- per


async def test_per_ip_is_one_bucket_whatever_key_the_client_sends(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    gw = await start_on(
        start_gateway,
        store,
        clients={"identify_by": "header"},
        routes=[{"path_prefix": "/p", "limit": {**bucket(2), "per": "ip"}}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/p"
    results = [
        (await get(client, url, headers={"X-API-Key": f"rotated-{i}"}))[0] for i in range(3)
    ]
    assert results == [200, 200, 429]
    assert await statuses(client, url, 1) == [429]  # no key: the same address
    assert await statuses(client, gw.url + "/elsewhere", 1, headers={"X-API-Key": "k"}) == [200]


async def test_per_header_and_a_missing_header_counts_as_the_ip_in_its_own_namespace(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    gw = await start_on(
        start_gateway,
        store,
        routes=[{"path_prefix": "/t", "limit": {**bucket(2), "per": "header:X-Tenant"}}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/t"

    def tenant(value: str) -> dict[str, str]:
        return {"X-Tenant": value}

    assert await statuses(client, url, 3, headers=tenant("a")) == [200, 200, 429]
    assert await statuses(client, url, 3, headers=tenant("b")) == [200, 200, 429]
    assert await statuses(client, url, 3) == [200, 200, 429]  # no header: the ip's bucket
    # Values that look like the ip, or its namespace, are buckets of their own.
    for value in ("127.0.0.1", "ip:127.0.0.1", "@ip:127.0.0.1", "a|b"):
        assert await statuses(client, url, 1, headers=tenant(value)) == [200], value
    assert await statuses(client, url, 1, headers=tenant("a")) == [429]


async def test_per_route_is_one_bucket_for_every_client(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    shared = {**bucket(5, 2, "10s"), "per": "route"}
    gw = await start_on(
        start_gateway,
        store,
        clients=TRUST_LOOPBACK,
        limits=limits(3),
        routes=[{"path_prefix": "/s", "limit": shared}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/s"

    async def burst(count: int) -> list[Response]:
        return list(
            await asyncio.gather(
                *(get(client, url, headers=xff(f"198.51.100.{i % 12}")) for i in range(count))
            )
        )

    first = await burst(36)
    assert [s for s, _h, _b in first].count(200) == 5
    # Every admitted request saw a distinct count: one bucket, no token given twice.
    assert sorted(int(h["X-RateLimit-Remaining"]) for s, h, _ in first if s == 200) == [
        0,
        1,
        2,
        3,
        4,
    ]
    manual(gw).advance(10)  # one refill: 2 tokens, for all of them together
    second = await burst(36)
    assert [s for s, _h, _b in second].count(200) == 2
    assert decisions(gw, "/s", "allowed") == 7
    assert decisions(gw, "/s", "denied") == 65
    # The route's bucket is everyone's; per-client limits elsewhere are not touched.
    assert await tokens_of(http, gw, "198.51.100.1", "/s", "/s") == 0
    assert await tokens_of(http, gw, "203.0.113.9", "/s", "/s") == 0
    assert await statuses(client, gw.url + "/other", 4, headers=xff("198.51.100.1")) == [
        200,
        200,
        200,
        429,
    ]


async def test_composite_key_is_ip_and_header_together(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    composite = {**bucket(2), "per": ["ip", "header:X-Tenant"]}
    gw = await start_on(
        start_gateway,
        store,
        clients=TRUST_LOOPBACK,
        routes=[{"path_prefix": "/c", "limit": composite}],
    )
    client = await request_path.client(gw)
    url = gw.url + "/c"

    def sender(ip: str, tenant: str | None) -> dict[str, str]:
        return xff(ip) if tenant is None else {**xff(ip), "X-Tenant": tenant}

    assert await statuses(client, url, 3, headers=sender("192.0.2.1", "t1")) == [200, 200, 429]
    assert await statuses(client, url, 3, headers=sender("192.0.2.2", "t1")) == [200, 200, 429]
    assert await statuses(client, url, 3, headers=sender("192.0.2.1", "t2")) == [200, 200, 429]
    assert await statuses(client, url, 3, headers=sender("192.0.2.1", None)) == [200, 200, 429]
    assert await statuses(client, url, 1, headers=sender("192.0.2.3", None)) == [200]


async def test_per_route_is_exact_across_two_instances_on_one_redis(
    start_gateway: StartGateway, redis_store: Store, request_path: RequestPath
) -> None:
    config: dict[str, Any] = {
        "clients": {"identify_by": "header"},
        "routes": [{"path_prefix": "/s", "limit": {**bucket(10, 3, "10s"), "per": "route"}}],
    }
    gw_a = await start_on(start_gateway, redis_store, **config)
    gw_b = await start_on(start_gateway, redis_store, clock_of=gw_a, **config)
    clients = [await request_path.client(gw_a), await request_path.client(gw_b)]
    gateways = [gw_a, gw_b]

    async def burst(count: int) -> list[Response]:
        return list(
            await asyncio.gather(
                *(
                    get(clients[i % 2], gateways[i % 2].url + "/s",
                        headers={"X-API-Key": f"key-{i % 13}"})
                    for i in range(count)
                )
            )
        )  # fmt: skip

    # One after the other, alternating: each instance sees the other's takes.
    alternating = [
        (await get(clients[i % 2], gateways[i % 2].url + "/s", headers={"X-API-Key": f"k{i}"}))
        for i in range(4)
    ]
    assert [(s, h["X-RateLimit-Remaining"]) for s, h, _b in alternating] == [
        (200, "9"),
        (200, "8"),
        (200, "7"),
        (200, "6"),
    ]
    first = await burst(60)
    assert [s for s, _h, _b in first].count(200) == 6
    remaining = sorted(int(h["X-RateLimit-Remaining"]) for s, h, _b in first if s == 200)
    assert remaining == list(range(6))
    manual(gw_a).advance(10)  # the clock both follow: one refill of 3
    second = await burst(40)
    assert [s for s, _h, _b in second].count(200) == 3
    allowed = sum(decisions(gw, "/s", "allowed") for gw in gateways)
    denied = sum(decisions(gw, "/s", "denied") for gw in gateways)
    assert (allowed, denied) == (13, 91)


# --------------------------------------------------------------------------- cost, methods


async def test_cost_takes_that_many_tokens_from_each_limit(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_on(
        start_gateway,
        store,
        routes=[
            {
                "path_prefix": "/export",
                "cost": 3,
                "limit": [bucket(10, 2, "10s"), {**bucket(100), "name": "big"}],
            }
        ],
    )
    client = await request_path.client(gw)
    url = gw.url + "/export"
    remaining = []
    for _ in range(3):
        status, headers, _ = await get(client, url)
        assert status == 200
        remaining.append(headers["X-RateLimit-Remaining"])
    assert remaining == ["7", "4", "1"]
    status, _headers, _ = await get(client, url)
    assert status == 429  # 1 token left, 3 needed
    view = await admin_view(http, gw, "127.0.0.1")
    assert view[("/export", "/export")]["tokens"] == 1
    assert view[("/export", "big")]["tokens"] == 91  # 3 x 3 from the other limit too

    manual(gw).advance(10)  # +2: 3 tokens, one more request
    assert await statuses(client, url, 2) == [200, 429]
    assert decisions(gw, "/export", "allowed") == 4


async def send(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, str]:
    """A request with a body (but GET): its status and X-RateLimit-Limit."""
    async with asyncio.timeout(GUARD_SECONDS):
        data = None if method == "GET" else b"x"
        async with http.request(method, url, data=data) as response:
            await response.read()
            return response.status, response.headers.get("X-RateLimit-Limit", "")


async def test_methods_other_methods_fall_through_to_the_next_route(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(5),
        routes=[
            {"path_prefix": "/api", "methods": ["GET", "head"], "limit": bucket(1)},
            {"path_prefix": "/api", "limit": "unlimited"},  # every other method
        ],
    )
    url = gw.url + "/api/items"
    assert [await send(http, "GET", url) for _ in range(2)] == [(200, "1"), (429, "1")]
    # POST is not /api's first route's: the next one, unlimited.
    assert [await send(http, "POST", url) for _ in range(3)] == [(200, "")] * 3
    assert decisions(gw, "/api", "allowed") == 1
    assert decisions(gw, "/api", "denied") == 1
    assert decisions(gw, "/api", "unlimited") == 3

    gw_b = await start_gateway(
        limits=limits(3),
        routes=[{"path_prefix": "/api", "methods": ["GET"], "limit": bucket(1)}],
    )
    url = gw_b.url + "/api/items"
    assert [await send(http, "GET", url) for _ in range(2)] == [(200, "1"), (429, "1")]
    # No other route takes POST: the default route and limits.default.
    assert [await send(http, "POST", url) for _ in range(4)] == [(200, "3")] * 3 + [(429, "3")]
    assert decisions(gw_b, "default", "allowed") == 3
    assert decisions(gw_b, "default", "denied") == 1


async def test_routes_with_one_prefix_and_different_methods_have_their_own_buckets(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        routes=[
            {"path_prefix": "/api", "methods": ["GET"], "limit": bucket(1)},
            {"path_prefix": "/api", "methods": ["POST"], "limit": bucket(2)},
        ],
    )
    url = gw.url + "/api/items"
    assert [await send(http, "POST", url) for _ in range(3)] == [(200, "2")] * 2 + [(429, "2")]
    # The GET route's own bucket is untouched by the POST route's requests.
    assert [await send(http, "GET", url) for _ in range(2)] == [(200, "1"), (429, "1")]


# --------------------------------------------------------------------------- allow, deny


@pytest.mark.parametrize(
    ("deny", "headers"),
    [
        (["127.0.0.0/8"], {}),
        (["10.0.0.0/8", "key:leaked-1"], {"X-API-Key": "leaked-1"}),
    ],
    ids=["cidr", "key"],
)
async def test_a_denied_client_gets_403_without_an_upstream_call(
    start_gateway: StartGateway,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
    upstream: TestServer,
    deny: list[str],
    headers: dict[str, str],
) -> None:
    gw = await start_gateway(limits=limits(2), clients={"deny": deny})
    client = await request_path.client(gw)
    for _ in range(3):
        status, response_headers, body = await get(client, gw.url + "/x", headers=headers)
        assert status == 403
        assert json.loads(body) == FORBIDDEN
        assert body == b'{"error": "forbidden"}'
        assert response_headers["Content-Type"].startswith("application/json")
        assert rate_limit_fields(response_headers) == {}
    assert upstream.app[HITS] == []
    # No token was taken: not even a bucket was made.
    assert await admin_client(http, gw.admin_url, "127.0.0.1") == (
        404,
        not_tracked("127.0.0.1"),
    )
    if headers:  # the same address without the denied key is an ordinary client
        assert await statuses(client, gw.url + "/x", 3) == [200, 200, 429]
    assert decisions(gw, "default", "blocked") == 3
    assert gw.metric("gateway_responses_total", {"route": "default", "code": "403"}) == 3
    await gw.server.stop()
    blocked = [r for r in gw.access_records() if r["decision"] == "blocked"]
    assert [(r["status"], r["path"], r["upstream_ms"]) for r in blocked] == [
        (403, "/x", None)
    ] * 3


@pytest.mark.parametrize(
    ("allow", "headers"),
    [(["127.0.0.0/8"], {}), (["key:internal-batch"], {"X-API-Key": "internal-batch"})],
    ids=["cidr", "key"],
)
async def test_an_allowed_client_is_exempt_from_every_limit(
    start_gateway: StartGateway,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
    upstream: TestServer,
    allow: list[str],
    headers: dict[str, str],
) -> None:
    gw = await start_gateway(
        limits=limits(1),
        clients={"allow": allow},
        routes=[{"path_prefix": "/login", "limit": [bucket(1), {**bucket(1), "per": "route"}]}],
    )
    client = await request_path.client(gw)
    for path in ("/x", "/login"):
        for _ in range(4):
            status, response_headers, _ = await get(client, gw.url + path, headers=headers)
            assert status == 200
            assert rate_limit_fields(response_headers) == {}
    assert len(upstream.app[HITS]) == 8
    assert decisions(gw, "default", "exempt") == 4
    assert decisions(gw, "/login", "exempt") == 4
    # No bucket was taken from: none was even made.
    assert await admin_client(http, gw.admin_url, "127.0.0.1") == (
        404,
        not_tracked("127.0.0.1"),
    )
    if headers:  # without the key: an ordinary client
        assert await statuses(client, gw.url + "/x", 2) == [200, 429]
    await gw.server.stop()
    exempt = [r for r in gw.access_records() if r["decision"] == "exempt"]
    assert len(exempt) == 8
    assert {r["status"] for r in exempt} == {200}


async def test_deny_wins_over_allow(
    start_gateway: StartGateway, request_path: RequestPath, upstream: TestServer
) -> None:
    gw = await start_gateway(
        limits=limits(1),
        clients={"allow": ["127.0.0.0/8", "key:vip"], "deny": ["key:leaked", "10.0.0.0/8"]},
    )
    client = await request_path.client(gw)

    async def answer(key: str | None) -> tuple[int, bool]:
        headers = {} if key is None else {"X-API-Key": key}
        status, response_headers, _ = await get(client, gw.url + "/w", headers=headers)
        return status, "RateLimit" in response_headers

    assert await answer("leaked") == (403, False)  # in both lists: denied
    assert await answer("vip") == (200, False)
    assert await answer(None) == (200, False)
    assert await answer(None) == (200, False)  # exempt: max_tokens 1 does not apply
    assert len(upstream.app[HITS]) == 3

    gw_b = await start_gateway(
        limits=limits(1), clients={"allow": ["key:vip"], "deny": ["127.0.0.0/8"]}
    )
    client_b = await request_path.client(gw_b)
    status, _headers, body = await get(client_b, gw_b.url + "/w", headers={"X-API-Key": "vip"})
    assert (status, json.loads(body)) == (403, FORBIDDEN)
    assert len(upstream.app[HITS]) == 3


async def test_a_reload_changes_lists_and_limits_under_load_without_a_failed_request(
    start_gateway: StartGateway, request_path: RequestPath, upstream: TestServer
) -> None:
    # A: loopback exempt, key "bad" denied. B: key "bad" exempt, nothing
    # denied, and a changed default limit (big enough never to deny).
    configs: dict[str, dict[str, Any]] = {
        "A": {
            "limits": limits(1_000_000),
            "clients": {"allow": ["127.0.0.0/8"], "deny": ["key:bad"]},
        },
        "B": {"limits": limits(999_999), "clients": {"allow": ["key:bad"], "deny": []}},
    }
    gw = await start_gateway(**configs["A"])
    client = await request_path.client(gw)

    def write(config: dict[str, Any]) -> None:
        assert gw.config_path is not None
        upstream_url = gw.server.config.upstream.url
        gw.config_path.write_text(gateway_yaml(upstream_url, gw.access_log_path, **config))

    # What each kind of request gets: (status, X-RateLimit-Limit) under A and B.
    expected = {
        "bad": {"A": (403, ""), "B": (200, "")},
        "none": {"A": (200, ""), "B": (200, "999999")},
    }
    seen: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []
    progress = asyncio.Condition()
    stop = asyncio.Event()

    async def answer(kind: str, n: int) -> tuple[int, str]:
        headers = {"X-API-Key": "bad"} if kind == "bad" else {}
        status, response_headers, _ = await get(
            client, f"{gw.url}/load/{kind}/{n}", headers=headers
        )
        return status, response_headers.get("X-RateLimit-Limit", "")

    async def worker(kind: str) -> None:
        n = 0
        while not stop.is_set():
            try:
                status, limit = await answer(kind, n)
                seen.append((kind, status, limit))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(exc)
            n += 1
            async with progress:
                progress.notify_all()

    workers = [asyncio.create_task(worker(("bad", "none")[n % 2])) for n in range(8)]
    reloads = 8
    try:
        async with asyncio.timeout(30):
            for i in range(reloads):
                async with progress:
                    await progress.wait_for(
                        lambda i=i: len(seen) + len(errors) >= 100 * (i + 1)
                    )
                name = "B" if i % 2 == 0 else "A"
                write(configs[name])
                assert gw.server.reload() is True
                # A request made after the reload meets the new lists and limits.
                assert await answer("bad", -1) == expected["bad"][name]
                assert await answer("none", -1) == expected["none"][name]
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert errors == []
    assert len(seen) >= 100 * reloads
    # Each answer is one config's; both were in force for both kinds.
    assert set(seen) == {
        (kind, status, limit)
        for kind, by_config in expected.items()
        for status, limit in by_config.values()
    }
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == reloads
    # A denied request never reached the upstream; every other one did.
    forwarded_bad = [p for p in upstream.app[HITS] if p.startswith("/load/bad/")]
    forwarded_bad = [p for p in forwarded_bad if not p.endswith("/-1")]
    assert len(forwarded_bad) == seen.count(("bad", 200, ""))


# --------------------------------------------------------------------------- address prefixes


async def test_ipv6_addresses_of_one_64_are_one_client(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_on(start_gateway, store, limits=limits(3), clients=TRUST_LOOPBACK)
    client = await request_path.client(gw)
    url = gw.url + "/v6"
    rotating = ["2001:db8:1:2::1", "2001:db8:1:2::abcd", "2001:db8:1:2:ffff:ffff:ffff:ffff"]
    for address in rotating:
        status, headers, _ = await get(client, url, headers=xff(address))
        assert status == 200, address
    assert [headers["X-RateLimit-Remaining"]] == ["0"]
    assert await statuses(client, url, 1, headers=xff("2001:db8:1:2::9")) == [429]
    assert await statuses(client, url, 1, headers=xff("2001:db8:1:3::1")) == [200]

    network = await admin_view(http, gw, "2001:db8:1:2::/64")
    assert network[("default", "default")]["tokens"] == 0
    typed = await admin_view(http, gw, "2001:db8:1:2::77")  # an address typed in: masked
    assert typed[("default", "default")]["tokens"] == 0
    other = await admin_view(http, gw, "2001:db8:1:3::/64")
    assert other[("default", "default")]["tokens"] == 2

    await gw.server.stop()
    clients = [r["client"] for r in gw.access_records()]
    assert clients == ["2001:db8:1:2::/64"] * 4 + ["2001:db8:1:3::/64"]


async def test_ipv4_prefix_groups_a_network(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_on(
        start_gateway, store, limits=limits(2), clients={**TRUST_LOOPBACK, "ipv4_prefix": 24}
    )
    client = await request_path.client(gw)
    url = gw.url + "/v4"
    assert await statuses(client, url, 1, headers=xff("203.0.113.1")) == [200]
    assert await statuses(client, url, 1, headers=xff("203.0.113.200")) == [200]
    assert await statuses(client, url, 1, headers=xff("203.0.113.77")) == [429]
    assert await statuses(client, url, 1, headers=xff("203.0.114.1")) == [200]
    view = await admin_view(http, gw, "203.0.113.0/24")
    assert view[("default", "default")]["tokens"] == 0


# --------------------------------------------------------------------------- queue


def queue_route(
    max_tokens: int, period: str = "200ms", max_wait: str = "900ms", max_queued: int = 100
) -> dict[str, Any]:
    return {
        "path_prefix": "/q",
        "limit": bucket(max_tokens, 1, period),
        "queue": {"max_wait": max_wait, "max_queued": max_queued},
    }


async def test_queue_delays_a_request_beyond_the_burst_until_its_token(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    upstream: TestServer,
) -> None:
    gw = await start_on(start_gateway, store, routes=[queue_route(3)])
    client = await request_path.client(gw)
    url = gw.url + "/q"
    assert await statuses(client, url, 3) == [200] * 3
    # The bucket is empty; its next token comes in 200 ms (< max_wait 900 ms).
    (status, headers, _), elapsed = await timed(client, url)
    assert status == 200
    assert elapsed >= 0.19, f"answered after {elapsed:.3f}s, before its token"
    assert elapsed < 0.2 + 1.0
    assert headers["RateLimit-Policy"] == '"/q";q=3;w=1'  # 0.6 s, whole seconds
    assert headers["X-RateLimit-Remaining"] == "0"
    assert len(upstream.app[HITS]) == 4
    assert decisions(gw, "/q", "allowed") == 3
    assert decisions(gw, "/q", "delayed") == 1
    assert decisions(gw, "/q", "denied") == 0
    assert gw.metric("gateway_queue_wait_seconds_count", {"route": "/q"}) == 1
    assert gw.metric("gateway_queue_wait_seconds_sum", {"route": "/q"}) >= 0.19
    await gw.server.stop()
    records = gw.access_records()
    assert [(r["decision"], r["status"]) for r in records] == [("allowed", 200)] * 3 + [
        ("delayed", 200)
    ]


async def test_queue_a_wait_longer_than_max_wait_is_denied_at_once(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    gw = await start_on(start_gateway, store, routes=[queue_route(1, period="10s")])
    client = await request_path.client(gw)
    url = gw.url + "/q"
    assert await statuses(client, url, 1) == [200]
    (status, headers, _), elapsed = await timed(client, url)  # 10 s away: past max_wait
    assert status == 429
    assert elapsed < 0.8, f"a request past max_wait waited {elapsed:.3f}s for its 429"
    assert headers["Retry-After"] == "10"
    assert decisions(gw, "/q", "delayed") == 0
    assert gw.metric("gateway_queue_wait_seconds_count", {"route": "/q"}) == 0
    # It reserved nothing: the next refill's token is there at once.
    manual(gw).advance(10)
    (status, _headers, _), _elapsed = await timed(client, url)
    assert status == 200
    assert decisions(gw, "/q", "allowed") == 2
    assert decisions(gw, "/q", "delayed") == 0


async def test_queue_full_denies_at_once(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    route = queue_route(3, period="400ms", max_wait="1500ms", max_queued=2)
    gw = await start_on(start_gateway, store, routes=[route])
    client = await request_path.client(gw)
    url = gw.url + "/q"
    assert await statuses(client, url, 3) == [200] * 3
    queued = [asyncio.create_task(get(client, url)) for _ in range(2)]  # 400 ms and 800 ms
    await until(lambda: decisions(gw, "/q", "delayed") == 2, "two requests never queued")

    (status, headers, _), elapsed = await timed(client, url)  # 1.2 s: in max_wait, no room
    assert status == 429
    assert elapsed < 0.35, f"a request past max_queued waited {elapsed:.3f}s"
    assert int(headers["Retry-After"]) >= 1
    assert not any(task.done() for task in queued), "the queued requests were answered early"
    assert [status for status, _h, _b in await asyncio.gather(*queued)] == [200, 200]
    assert decisions(gw, "/q", "denied") == 1
    assert decisions(gw, "/q", "delayed") == 2
    assert gw.metric("gateway_queue_wait_seconds_count", {"route": "/q"}) == 2


async def queue_and_leave(gw: RunningGateway, request_path: RequestPath, path: str) -> None:
    """A request that queues on ``path``, then its client leaves before its turn."""
    delayed_before = decisions(gw, "/q", "delayed")
    async with request_path.raw_connection(gw) as (_reader, writer):
        writer.write(build_request("GET", path))
        await writer.drain()
        await until(
            lambda: decisions(gw, "/q", "delayed") == delayed_before + 1,
            "the request never queued",
        )
    await wait_idle(gw)  # its turn came (or its leaving was seen): it is closed


async def test_a_client_that_leaves_while_queued_gives_its_tokens_back(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    upstream: TestServer,
) -> None:
    gw = await start_on(start_gateway, store, routes=[queue_route(3)])
    client = await request_path.client(gw)
    url = gw.url + "/q"
    assert await statuses(client, url, 3) == [200] * 3
    await queue_and_leave(gw, request_path, "/q/left")
    assert "/q/left" not in upstream.app[HITS]

    # One refill: with the reservation given back, its token is there at once
    # (kept, the bucket would be at 0 and this request would queue).
    manual(gw).advance(0.2)
    (status, headers, _), _elapsed = await timed(client, url)
    assert status == 200
    assert headers["X-RateLimit-Remaining"] == "0"
    assert decisions(gw, "/q", "allowed") == 4
    assert decisions(gw, "/q", "delayed") == 1
    await gw.server.stop()
    left = [r for r in gw.access_records() if r["path"] == "/q/left"]
    assert [(r["decision"], r["status"]) for r in left] == [("delayed", 499)]


async def test_a_client_that_leaves_while_queued_on_a_count_statuses_route_is_refunded_once(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    route = {**queue_route(3), "path_prefix": "/status", "count_statuses": ["401"]}
    gw = await start_on(start_gateway, store, routes=[route])
    client = await request_path.client(gw)
    url = gw.url + "/status/401"
    assert await statuses(client, url, 3) == [401] * 3  # charged: the bucket is empty
    delayed = decisions(gw, "/status", "delayed")
    async with request_path.raw_connection(gw) as (_reader, writer):
        writer.write(build_request("GET", "/status/401?left"))
        await writer.drain()
        await until(lambda: decisions(gw, "/status", "delayed") == delayed + 1, "not queued")
    await wait_idle(gw)
    assert await tokens_of(http, gw, "127.0.0.1", "/status", "/status") == 0
    # Its reservation back, the bucket is at 0 again: the next request queues.
    # (Given back twice, a token nobody earned would admit it at once.)
    (status, _headers, _), _elapsed = await timed(client, url)
    assert status == 401
    assert decisions(gw, "/status", "delayed") == delayed + 2
    assert decisions(gw, "/status", "allowed") == 3


async def test_a_drain_answers_the_queued_requests_within_drain_timeout(
    start_gateway: StartGateway, store: Store, request_path: RequestPath
) -> None:
    gw = await start_on(start_gateway, store, drain_timeout="2s", routes=[queue_route(1)])
    client = await request_path.client(gw)
    url = gw.url + "/q"
    assert await statuses(client, url, 1) == [200]
    queued = [asyncio.create_task(get(client, f"{url}/{i}")) for i in range(2)]  # 0.2, 0.4 s
    await until(lambda: decisions(gw, "/q", "delayed") == 2, "two requests never queued")

    started = time.perf_counter()
    await asyncio.wait_for(gw.server.stop(), GUARD_SECONDS)
    assert time.perf_counter() - started < 2.0 + 0.5
    answered = [status for status, _h, _b in await asyncio.gather(*queued)]
    assert set(answered) <= {200, 503}, answered  # forwarded, or told to come back
    records = [r for r in gw.access_records() if r["path"] in ("/q/0", "/q/1")]
    assert sorted(r["status"] for r in records) == sorted(answered)


async def test_queue_is_exact_across_two_instances_on_one_redis(
    start_gateway: StartGateway, redis_store: Store, request_path: RequestPath
) -> None:
    routes = [queue_route(2)]  # 1 token / 200 ms; waits up to 900 ms
    gw_a = await start_on(start_gateway, redis_store, routes=routes)
    gw_b = await start_on(start_gateway, redis_store, clock_of=gw_a, routes=routes)
    gateways = [gw_a, gw_b]
    clients = [await request_path.client(gw_a), await request_path.client(gw_b)]

    def decided() -> float:
        return sum(
            decisions(gw, "/q", d) for gw in gateways for d in ("allowed", "delayed", "denied")
        )

    def launch(count: int, tag: str) -> list[asyncio.Task[tuple[Response, float]]]:
        return [
            asyncio.create_task(timed(clients[i % 2], f"{gateways[i % 2].url}/q/{tag}/{i}"))
            for i in range(count)
        ]

    # t = 0: 2 tokens, and 4 more within 900 ms (at 200, 400, 600, 800 ms).
    first = launch(20, "a")
    await until(lambda: decided() == 20, "the first burst was never decided")
    manual(gw_a).advance(1.0)  # 5 refills: the bucket is back at 1
    # t = 1 s: 1 token, and 4 more within 900 ms.
    second = launch(20, "b")
    await until(lambda: decided() == 40, "the second burst was never decided")
    results = await asyncio.gather(*first, *second)
    first_statuses = [response[0] for response, _ in results[:20]]
    second_statuses = [response[0] for response, _ in results[20:]]
    assert first_statuses.count(200) == 6, first_statuses
    assert second_statuses.count(200) == 5, second_statuses
    # Over the window: max_tokens + the refills due by its end (t = 1.9 s).
    allowed = sum(decisions(gw, "/q", "allowed") for gw in gateways)
    delayed = sum(decisions(gw, "/q", "delayed") for gw in gateways)
    denied = sum(decisions(gw, "/q", "denied") for gw in gateways)
    assert (allowed, delayed, denied) == (3, 8, 29)
    # No delayed request waited longer than max_wait (the last one: 800 ms).
    assert max(elapsed for (status, _h, _b), elapsed in results if status == 200) < 0.8 + 1.0
    assert min(elapsed for (status, _h, _b), elapsed in results if status == 429) < 0.8


# --------------------------------------------------------------------------- count_statuses


async def test_count_statuses_charges_only_the_listed_answers(
    start_gateway: StartGateway, store: Store, request_path: RequestPath, upstream: TestServer
) -> None:
    gw = await start_on(
        start_gateway,
        store,
        routes=[
            {"path_prefix": "/status", "limit": bucket(3), "count_statuses": ["401", "5xx"]}
        ],
    )
    client = await request_path.client(gw)

    def status_url(code: int) -> str:
        return f"{gw.url}/status/{code}"

    assert await statuses(client, status_url(200), 6) == [200] * 6  # free
    assert await statuses(client, status_url(404), 2) == [404] * 2  # not listed: free
    refunded = gw.metric("gateway_tokens_refunded_total", {"route": "/status"})
    assert refunded == 8
    remaining = []
    for code in (503, 401, 401):  # listed (the range and the code): each costs
        status, headers, _ = await get(client, status_url(code))
        assert status == code
        remaining.append(headers["X-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    assert await statuses(client, status_url(401), 1) == [429]
    assert await statuses(client, status_url(200), 1) == [429]
    assert gw.metric("gateway_tokens_refunded_total", {"route": "/status"}) == 8
    assert len(upstream.app[HITS]) == 11
    assert decisions(gw, "/status", "allowed") == 11
    assert decisions(gw, "/status", "denied") == 2


# --------------------------------------------------------------------------- admin


async def test_admin_client_shows_every_limit_of_its_keys(
    start_gateway: StartGateway,
    store: Store,
    request_path: RequestPath,
    http: aiohttp.ClientSession,
) -> None:
    route_limits = [
        {**bucket(10), "name": "client"},
        {**bucket(11), "name": "ip", "per": "ip"},
        {**bucket(12), "name": "everyone", "per": "route"},
        {**bucket(13), "name": "tenant", "per": "header:X-Tenant"},
        {**bucket(14, 2, "10s"), "name": "both", "per": ["ip", "header:X-Tenant"]},
    ]
    gw = await start_on(
        start_gateway,
        store,
        limits=limits(7),
        routes=[{"path_prefix": "/m", "limit": route_limits}],
    )
    client = await request_path.client(gw)
    assert await statuses(client, gw.url + "/m", 2) == [200, 200]
    assert await statuses(client, gw.url + "/d", 1) == [200]

    view = await admin_view(http, gw, "127.0.0.1")
    assert {key: b["tokens"] for key, b in view.items()} == {
        ("default", "default"): 6,
        ("/m", "client"): 8,
        ("/m", "ip"): 9,
        ("/m", "everyone"): 10,
        ("/m", "tenant"): 11,
        ("/m", "both"): 12,
    }
    both = view[("/m", "both")]
    assert (both["max_tokens"], both["refill_tokens"], both["refill_period_seconds"]) == (
        14,
        2,
        10.0,
    )
    assert both["next_refill_seconds"] == 10.0
    # Another client shares the route's bucket, and nothing else.
    other = await admin_view(http, gw, "192.0.2.1")
    assert {key: b["tokens"] for key, b in other.items()} == {
        ("default", "default"): 7,
        ("/m", "client"): 10,
        ("/m", "ip"): 11,
        ("/m", "everyone"): 10,
        ("/m", "tenant"): 13,
        ("/m", "both"): 14,
    }
