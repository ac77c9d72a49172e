"""Rate limiting over real sockets: buckets, refill, routes, clients, 429s,
metrics, access log and the admin listener, as CONTRACT.md states them."""

from __future__ import annotations

import asyncio
import json
import math
import time

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.limiting.refill_clock import ManualRefillClock
from tests.conftest import RunningGateway, StartGateway, gather_statuses
from tests.helpers import (
    admin_buckets,
    bucket,
    fetch,
    limits,
    metric_samples,
    metrics_text,
    poll,
    sequential,
)
from tests.upstream_app import HITS

ACCESS_LOG_FIELDS = {
    "ts",
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "decision",
    "status",
    "tokens_left",
    "upstream_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
}


def manual(gw: RunningGateway) -> ManualRefillClock:
    assert isinstance(gw.clock, ManualRefillClock)
    return gw.clock


def requests_metric(gw: RunningGateway, route: str, decision: str) -> float:
    return gw.metric("gateway_requests_total", {"route": route, "decision": decision})


def responses_metric(gw: RunningGateway, route: str, code: int) -> float:
    return gw.metric("gateway_responses_total", {"route": route, "code": str(code)})


# -- the bucket: starts full, refills every period, capped --


async def test_bucket_starts_full_then_denies(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(7))
    assert await sequential(http, gw.url + "/full", 10) == [200] * 7 + [429] * 3


async def test_one_refill_period_adds_exactly_refill_tokens(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(10, refill_tokens=3, refill_period="1s"))
    clock = manual(gw)
    assert await sequential(http, gw.url + "/r", 11) == [200] * 10 + [429]

    clock.advance(0.5)  # half a period: nothing owed yet
    assert await sequential(http, gw.url + "/r", 1) == [429]

    clock.advance(0.5)  # one whole period since the start
    assert await sequential(http, gw.url + "/r", 4) == [200] * 3 + [429]

    clock.advance(2)  # two more periods: 6 tokens
    assert await sequential(http, gw.url + "/r", 7) == [200] * 6 + [429]


async def test_refill_is_capped_at_max_tokens(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(5, refill_tokens=2, refill_period="1s"))
    clock = manual(gw)
    assert await sequential(http, gw.url + "/cap", 6) == [200] * 5 + [429]
    clock.advance(1000)  # 1000 periods would be 2000 tokens without the cap
    assert await sequential(http, gw.url + "/cap", 7) == [200] * 5 + [429] * 2


async def test_concurrent_demand_from_one_client_is_exact(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(limits=limits(50))
    statuses = await gather_statuses(http, gw.url + "/burst", 200)
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    assert len(upstream.app[HITS]) == 50
    assert requests_metric(gw, "default", "allowed") == 50
    assert requests_metric(gw, "default", "denied") == 150

    manual(gw).advance(3600)  # one period: one token
    statuses = await gather_statuses(http, gw.url + "/burst", 100)
    assert statuses.count(200) == 1
    assert len(upstream.app[HITS]) == 51


# -- clients --


async def test_clients_by_header_have_separate_buckets(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(3), clients={"identify_by": "header", "header": "X-API-Key"}
    )
    url = gw.url + "/k"
    assert await sequential(http, url, 4, headers={"X-API-Key": "alice"}) == [200] * 3 + [429]
    assert await sequential(http, url, 4, headers={"X-API-Key": "bob"}) == [200] * 3 + [429]
    # No header: falls back to the peer address, a bucket of its own.
    assert await sequential(http, url, 4) == [200] * 3 + [429]
    assert await sequential(http, url, 1, headers={"X-API-Key": "alice"}) == [429]


async def test_trusted_proxy_clients_by_forwarded_for_have_separate_buckets(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(2), clients={"trusted_proxies": ["127.0.0.1/32"]})
    url = gw.url + "/xff"
    first = {"X-Forwarded-For": "203.0.113.1"}
    second = {"X-Forwarded-For": "203.0.113.2"}
    assert await sequential(http, url, 3, headers=first) == [200, 200, 429]
    assert await sequential(http, url, 3, headers=second) == [200, 200, 429]
    assert await sequential(http, url, 1, headers=first) == [429]


async def test_untrusted_peer_cannot_spoof_forwarded_for(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    # The peer (127.0.0.1) is not in trusted_proxies: its X-Forwarded-For is ignored.
    gw = await start_gateway(limits=limits(3), clients={"trusted_proxies": ["10.0.0.0/8"]})
    url = gw.url + "/spoof"
    assert await sequential(http, url, 3) == [200] * 3
    for i in range(5):
        status, _headers, _body = await fetch(
            http, url, headers={"X-Forwarded-For": f"198.51.100.{i}"}
        )
        assert status == 429, f"forged X-Forwarded-For #{i} got a fresh bucket"
    await gw.server.stop()
    assert {r["client"] for r in gw.access_records()} == {"127.0.0.1"}


async def test_untrusted_peer_without_trusted_proxies_cannot_spoof(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(2))
    url = gw.url + "/spoof"
    assert await sequential(http, url, 2) == [200, 200]
    status, _headers, _body = await fetch(http, url, headers={"X-Forwarded-For": "192.0.2.9"})
    assert status == 429


async def test_trusted_proxy_rightmost_untrusted_hop_is_the_client(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(2), clients={"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]}
    )
    url = gw.url + "/hops"
    # 198.51.100.7 is forged by the client; 203.0.113.5 is what our trusted
    # proxy 10.1.2.3 saw connecting; 10.1.2.3 is trusted and skipped.
    chain = "198.51.100.7, 203.0.113.5, 10.1.2.3"
    assert await sequential(http, url, 3, headers={"X-Forwarded-For": chain}) == [
        200,
        200,
        429,
    ]
    # A different forged left part does not escape the bucket of 203.0.113.5.
    other_forgery = "192.0.2.1, 203.0.113.5, 10.1.2.3"
    assert await sequential(http, url, 1, headers={"X-Forwarded-For": other_forgery}) == [429]
    # Whereas a different real client behind the proxy has its own bucket.
    assert await sequential(
        http, url, 1, headers={"X-Forwarded-For": "203.0.113.6, 10.1.2.3"}
    ) == [200]

    buckets = await admin_buckets(http, gw.admin_url, "203.0.113.5")
    assert buckets["default"]["tokens"] == 0

    await gw.server.stop()
    clients = [r["client"] for r in gw.access_records()]
    assert clients == ["203.0.113.5"] * 4 + ["203.0.113.6"]


# -- the 429 response --


async def test_denied_response_body_headers_and_no_upstream_contact(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(limits=limits(2, refill_tokens=1, refill_period="30s"))
    clock = manual(gw)
    url = gw.url + "/denied"

    status, headers, _ = await fetch(http, url)
    assert status == 200
    assert headers["RateLimit-Policy"] == '"default";q=2;w=60'  # 30s * ceil(2 / 1)
    assert headers["RateLimit"] == '"default";r=1;t=30'
    assert headers["X-RateLimit-Limit"] == "2"
    assert headers["X-RateLimit-Remaining"] == "1"
    assert headers["X-RateLimit-Reset"] == "30"
    status, headers, _ = await fetch(http, url)
    assert status == 200
    assert headers["X-RateLimit-Remaining"] == "0"
    hits_before = len(upstream.app[HITS])
    assert hits_before == 2

    status, headers, body = await fetch(http, url)
    assert status == 429
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": "rate_limited", "retry_after": 30}
    assert headers["Retry-After"] == "30"
    assert headers["RateLimit-Policy"] == '"default";q=2;w=60'  # 30s * ceil(2 / 1)
    assert headers["RateLimit"] == '"default";r=0;t=30'
    assert headers["X-RateLimit-Limit"] == "2"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset"] == "30"

    clock.advance(10)  # 20 s to the next refill
    status, headers, body = await fetch(http, url)
    assert status == 429
    assert headers["Retry-After"] == "20"
    assert json.loads(body)["retry_after"] == 20

    clock.advance(19.9)  # 0.1 s to the next refill: still at least 1
    status, headers, body = await fetch(http, url)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["retry_after"] == 1

    assert len(upstream.app[HITS]) == hits_before, "a denied request reached the upstream"


async def test_retry_after_is_a_whole_number_of_seconds_at_least_one(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(1, refill_period="250ms"))
    await sequential(http, gw.url + "/x", 1)
    status, headers, body = await fetch(http, gw.url + "/x")
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert json.loads(body) == {"error": "rate_limited", "retry_after": 1}


# -- shadow mode --


async def test_global_shadow_mode_never_denies_but_counts(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(limits=limits(3), mode="shadow")
    assert await sequential(http, gw.url + "/s", 10) == [200] * 10
    assert len(upstream.app[HITS]) == 10
    assert requests_metric(gw, "default", "allowed") == 3
    assert requests_metric(gw, "default", "shadow_denied") == 7
    assert requests_metric(gw, "default", "denied") == 0
    assert responses_metric(gw, "default", 200) == 10
    assert responses_metric(gw, "default", 429) == 0


async def test_per_route_shadow_mode(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(3), routes=[{"path_prefix": "/beta", "mode": "shadow"}]
    )
    assert await sequential(http, gw.url + "/beta/feature", 6) == [200] * 6
    assert await sequential(http, gw.url + "/stable", 4) == [200] * 3 + [429]
    assert requests_metric(gw, "/beta", "allowed") == 3
    assert requests_metric(gw, "/beta", "shadow_denied") == 3
    assert requests_metric(gw, "/beta", "denied") == 0
    assert requests_metric(gw, "default", "allowed") == 3
    assert requests_metric(gw, "default", "denied") == 1
    assert requests_metric(gw, "default", "shadow_denied") == 0


async def test_route_enforce_overrides_global_shadow(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(2),
        mode="shadow",
        routes=[{"path_prefix": "/strict", "mode": "enforce"}],
    )
    assert await sequential(http, gw.url + "/strict", 3) == [200, 200, 429]
    assert await sequential(http, gw.url + "/loose", 3) == [200, 200, 200]
    assert requests_metric(gw, "/strict", "denied") == 1
    assert requests_metric(gw, "default", "shadow_denied") == 1


# -- overrides --


async def test_premium_key_override_gets_its_own_bigger_bucket(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits={
            "default": bucket(3),
            "overrides": [{"client": "key-premium-1", **bucket(10)}],
        },
        clients={"identify_by": "header"},
    )
    url = gw.url + "/api"
    premium = {"X-API-Key": "key-premium-1"}
    status, headers, _ = await fetch(http, url, headers=premium)
    assert status == 200
    assert headers["X-RateLimit-Limit"] == "10"
    assert headers["X-RateLimit-Remaining"] == "9"
    assert await sequential(http, url, 10, headers=premium) == [200] * 9 + [429]
    regular = {"X-API-Key": "key-basic-1"}
    assert await sequential(http, url, 4, headers=regular) == [200] * 3 + [429]


async def test_override_applies_only_on_routes_without_their_own_limit(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits={
            "default": bucket(3),
            "overrides": [{"client": "key-premium-1", **bucket(8)}],
        },
        clients={"identify_by": "header"},
        routes=[
            {"path_prefix": "/login", "limit": bucket(2, refill_period="1m")},
            {"path_prefix": "/v2", "mode": "enforce"},
        ],
    )
    premium = {"X-API-Key": "key-premium-1"}
    # /login has its own limit: the override does not apply.
    assert await sequential(http, gw.url + "/login", 3, headers=premium) == [200, 200, 429]
    # /v2 has no limit of its own: the override applies, in /v2's own bucket.
    assert await sequential(http, gw.url + "/v2/items", 9, headers=premium) == [200] * 8 + [429]
    # The default route: the override applies again, a third bucket.
    assert await sequential(http, gw.url + "/other", 9, headers=premium) == [200] * 8 + [429]
    regular = {"X-API-Key": "someone"}
    assert await sequential(http, gw.url + "/v2/items", 4, headers=regular) == [200] * 3 + [429]


# -- routes --


async def test_first_matching_route_wins_with_own_bucket_per_route(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(5),
        routes=[
            # /api/admin is reachable only by methods /api does not take
            # (gateway check refuses a route no request can reach).
            {"path_prefix": "/api", "methods": ["GET", "HEAD"], "limit": bucket(4)},
            {"path_prefix": "/api/admin", "limit": bucket(1)},  # shadowed by /api for GET
            {"path_prefix": "/login", "limit": bucket(2)},
        ],
    )
    assert await sequential(http, gw.url + "/api/users", 2) == [200, 200]
    # /api/admin/... matches /api first: the same bucket, 2 tokens left.
    assert await sequential(http, gw.url + "/api/admin/panel", 3) == [200, 200, 429]
    assert await sequential(http, gw.url + "/api/users", 1) == [429]
    # Other routes keep their own full buckets.
    assert await sequential(http, gw.url + "/login", 3) == [200, 200, 429]
    assert await sequential(http, gw.url + "/home", 6) == [200] * 5 + [429]

    assert requests_metric(gw, "/api", "allowed") == 4
    assert requests_metric(gw, "/api", "denied") == 2
    assert requests_metric(gw, "/api/admin", "allowed") == 0
    assert requests_metric(gw, "/login", "allowed") == 2
    assert requests_metric(gw, "/login", "denied") == 1
    assert requests_metric(gw, "default", "allowed") == 5
    assert requests_metric(gw, "default", "denied") == 1


async def test_unlimited_route_is_never_denied(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(
        limits=limits(2), routes=[{"path_prefix": "/public", "limit": "unlimited"}]
    )
    statuses = await gather_statuses(http, gw.url + "/public/page", 60)
    assert statuses == [200] * 60
    assert len(upstream.app[HITS]) == 60
    assert requests_metric(gw, "/public", "unlimited") == 60
    assert requests_metric(gw, "/public", "allowed") == 0
    assert requests_metric(gw, "/public", "denied") == 0
    # The default bucket was not touched by the unlimited route.
    assert await sequential(http, gw.url + "/private", 3) == [200, 200, 429]


# -- the bound on tracked clients --


async def test_max_tracked_bounds_the_table_and_counts_evictions(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(5, refill_tokens=1, refill_period="1s"),
        clients={"identify_by": "header", "max_tracked": 5},
    )
    url = gw.url + "/t"
    for i in range(20):
        status, _h, _b = await fetch(http, url, headers={"X-API-Key": f"key-{i}"})
        assert status == 200
        assert gw.metric("gateway_clients_tracked") <= 5
    assert gw.metric("gateway_clients_tracked") == 5
    # Every bucket held had a token taken: no full one to forget, so each of the
    # 15 insertions past the bound dropped the least recently seen one.
    assert gw.metric("gateway_clients_evicted_total", {"reason": "pressure"}) == 15
    assert gw.metric("gateway_clients_evicted_total", {"reason": "idle"}) == 0

    # The most recently seen client kept its drained bucket (4 tokens left).
    recent = {"X-API-Key": "key-19"}
    assert await sequential(http, url, 5, headers=recent) == [200] * 4 + [429]

    # One period later every held bucket but key-19's is full again: the next
    # new clients displace full buckets, which is lossless ("idle").
    manual(gw).advance(1)
    for i in range(20, 24):
        status, _h, _b = await fetch(http, url, headers={"X-API-Key": f"key-{i}"})
        assert status == 200
    assert gw.metric("gateway_clients_tracked") == 5
    assert gw.metric("gateway_clients_evicted_total", {"reason": "idle"}) == 4
    assert gw.metric("gateway_clients_evicted_total", {"reason": "pressure"}) == 15


# -- metrics --


async def test_metrics_add_up_exactly(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(10))
    statuses = await sequential(http, gw.url + "/m", 30)
    assert statuses == [200] * 10 + [429] * 20
    assert requests_metric(gw, "default", "allowed") == 10
    assert requests_metric(gw, "default", "denied") == 20
    assert requests_metric(gw, "default", "shadow_denied") == 0
    assert requests_metric(gw, "default", "unlimited") == 0
    assert responses_metric(gw, "default", 200) == 10
    assert responses_metric(gw, "default", 429) == 20
    assert gw.metric("gateway_request_duration_seconds_count", {"route": "default"}) == 30

    # The same numbers over the admin listener, in the Prometheus text format.
    samples = metric_samples(await metrics_text(http, gw.admin_url))
    key = ("gateway_requests_total", (("decision", "denied"), ("route", "default")))
    assert samples[key] == 20
    key = ("gateway_requests_total", (("decision", "allowed"), ("route", "default")))
    assert samples[key] == 10
    key = ("gateway_responses_total", (("code", "429"), ("route", "default")))
    assert samples[key] == 20
    for name in (
        "gateway_clients_tracked",
        "gateway_inflight_requests",
        "gateway_access_log_queue_depth",
        "gateway_access_log_dropped_total",
    ):
        assert (name, ()) in samples, f"{name} missing from /metrics"
    assert not any("client" in dict(labels) for _name, labels in samples), (
        "a metric is labelled by client"
    )


# -- access log --


async def test_access_log_has_every_record_with_contract_fields(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(3))
    sent_ids = [f"req-{i}" for i in range(5)]
    for request_id in sent_ids:
        async with http.get(gw.url + "/logged", headers={"X-Request-ID": request_id}) as r:
            await r.read()
            assert r.headers["X-Request-ID"] == request_id
    await gw.server.stop()

    records = gw.access_records()
    assert len(records) == 5
    for record in records:
        assert set(record) >= ACCESS_LOG_FIELDS
        assert record["client"] == "127.0.0.1"
        assert record["method"] == "GET"
        assert record["path"] == "/logged"
        assert record["route"] == "default"
        assert isinstance(record["ts"], str | int | float)
        assert isinstance(record["duration_ms"], int | float)
        assert record["duration_ms"] >= 0
        assert record["bytes_in"] == 0
    assert [r["request_id"] for r in records] == sent_ids
    assert [r["status"] for r in records] == [200, 200, 200, 429, 429]
    assert [r["decision"] for r in records] == ["allowed"] * 3 + ["denied"] * 2
    assert [r["tokens_left"] for r in records] == [2, 1, 0, 0, 0]
    for record in records[:3]:
        assert isinstance(record["upstream_ms"], int | float)
        assert record["bytes_out"] > 0
    for record in records[3:]:
        assert record["upstream_ms"] is None  # the upstream was not contacted


# -- admin listener --


async def test_admin_client_shows_tokens(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits=limits(10, refill_tokens=2, refill_period="1m"),
        clients={"identify_by": "header"},
        routes=[{"path_prefix": "/login", "limit": bucket(5, refill_period="1m")}],
    )
    headers = {"X-API-Key": "acct-42"}
    await sequential(http, gw.url + "/x", 3, headers=headers)
    await sequential(http, gw.url + "/login", 1, headers=headers)
    manual(gw).advance(15)

    by_route = await admin_buckets(http, gw.admin_url, "acct-42")
    assert by_route["default"]["tokens"] == 7
    assert by_route["default"]["max_tokens"] == 10
    assert math.isclose(by_route["default"]["next_refill_seconds"], 45, abs_tol=0.01)
    assert by_route["/login"]["tokens"] == 4
    assert by_route["/login"]["max_tokens"] == 5

    assert all(b["held"] for b in by_route.values())

    # An id the gateway holds no bucket for (a typo, a client not seen) says
    # so with a 404, rather than looking like a client with full buckets.
    async with http.get(gw.admin_url + "/admin/clients/nobody") as response:
        assert response.status == 404
        assert await response.json() == {
            "client": "nobody", "id": "nobody", "tracked": False, "denied": None, "buckets": []
        }  # fmt: skip
    # A client held on one route only: the other route's bucket shows what a
    # request would find there, full, and not held.
    await sequential(http, gw.url + "/x", 1, headers={"X-API-Key": "acct-7"})
    partly = await admin_buckets(http, gw.admin_url, "acct-7")
    assert {r: (b["tokens"], b["held"]) for r, b in partly.items()} == {
        "default": (9, True), "/login": (5, False)
    }  # fmt: skip


async def test_admin_health_and_readiness(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    for path in ("/healthz", "/readyz"):
        async with http.get(gw.admin_url + path) as response:
            assert response.status == 200, path
            await response.read()
    # The admin port never counts against rate limits.
    async with http.get(gw.admin_url + "/healthz") as response:
        assert "RateLimit" not in response.headers
    assert requests_metric(gw, "default", "allowed") == 0


# -- the real clock --


async def test_real_clock_refills_in_the_background(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    period = 0.1
    gw = await start_gateway(
        manual_clock=False, limits=limits(3, refill_tokens=1, refill_period="100ms")
    )
    assert not isinstance(gw.clock, ManualRefillClock)
    url = gw.url + "/real"
    started = time.monotonic()
    admitted = 0
    # Drain the bucket (refills may land meanwhile; count every admission).
    while True:
        status, _headers, _body = await fetch(http, url)
        if status == 429:
            break
        assert status == 200
        admitted += 1
        assert admitted < 100, "the bucket never ran dry"
    assert admitted >= 3

    # Sleep until the clock's next boundary, then allow for a late wake-up.
    ticker = gw.clock.ticker(period)
    await asyncio.sleep(gw.clock.seconds_to_next(ticker) + period / 2)
    for _attempt in range(20):
        status, _headers, _body = await fetch(http, url)
        if status == 200:
            admitted += 1
            break
        await asyncio.sleep(period)
    else:
        raise AssertionError("no refill within 2 s of a 100 ms refill period")
    elapsed = time.monotonic() - started
    # Never more than the contract's count (+ one refill of slack at the edges).
    assert admitted <= 3 + math.floor(elapsed / period) + 1


# -- per-client concurrency cap --


async def test_max_concurrent_denies_the_third_request_at_once(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    gw = await start_gateway(
        limits=limits(100), clients={"identify_by": "header", "max_concurrent": 2}
    )
    key = {"X-API-Key": "busy"}
    slow_url = gw.url + "/slow?delay=1.5"
    slow = [asyncio.create_task(fetch(http, slow_url, headers=key)) for _ in range(2)]
    await poll(  # both are in flight once the upstream saw them
        lambda: len(upstream.app[HITS]) == 2,
        "the two slow requests never reached the upstream",
        attempts=200,
        interval=0.01,
    )

    started = time.monotonic()
    status, headers, _body = await fetch(http, gw.url + "/slow?delay=1.5", headers=key)
    assert status == 429
    assert time.monotonic() - started < 0.5, "the third request waited instead of 429"
    assert int(headers["Retry-After"]) >= 1
    # Another client is not affected by this client's cap.
    status, _headers, _body = await fetch(http, gw.url + "/fast", headers={"X-API-Key": "idle"})
    assert status == 200

    results = await asyncio.gather(*slow)
    assert [status for status, _h, _b in results] == [200, 200]
    assert upstream.app[HITS].count("/slow?delay=1.5") == 2
    # The cap is released when the slow requests finish.
    status, _headers, _body = await fetch(http, gw.url + "/again", headers=key)
    assert status == 200


async def test_inflight_gauge_counts_requests_being_handled(
    start_gateway: StartGateway, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()

    async def slow() -> int:
        async with http.get(gw.url + "/slow?delay=0.5") as response:
            await response.read()
            return response.status

    in_flight = [asyncio.create_task(slow()) for _ in range(3)]
    # The upstream records each /slow request as it starts: once it has all
    # three, all three are in flight in the gateway.
    await poll(lambda: upstream.app[HITS].count("/slow?delay=0.5") == 3, "3 slow hits",
               seconds=5)  # fmt: skip
    assert gw.metric("gateway_inflight_requests") == 3
    assert await asyncio.gather(*in_flight) == [200, 200, 200]
    assert gw.metric("gateway_inflight_requests") == 0
