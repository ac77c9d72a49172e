"""Shared buckets in Redis (``storage.backend: redis``), against a real
``redis-server``: exactness across gateway instances, the same answers as the
in-process buckets, refill on the Redis server's clock, key expiry, outages
per ``storage.on_error``, a Redis that never answers, and the admin view.

Everything listens on 127.0.0.1. Waits on the Redis clock (refill, expiry)
and on a restarted Redis (the breaker) are bounded polls or sleeps derived
from what the gateway or Redis reported; nothing else sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis
from multidict import CIMultiDict, CIMultiDictProxy
from redis.crc import key_slot

from gateway.config.model import BucketSpec, StorageConfig
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.policy import Client, Limit, RouteLimits
from gateway.limiting.redis_store import BREAKER_OPEN_SECONDS, RedisStore, redis_key
from gateway.limiting.refill_clock import ManualRefillClock
from tests.conftest import RedisServer, RunningGateway, StartGateway
from tests.helpers import (
    POLL_INTERVAL,
    admin_buckets,
    admin_client,
    bucket,
    clear_of_hour_boundary,
    fetch,
    limits,
    readyz,
    redis_now_ms,
    scrape_sum,
)

# Where Redis is healthy, a generous storage.timeout: a slow CI box must not
# turn into on_error decisions that would spoil an exact count.
HEALTHY_TIMEOUT_SECONDS = 1.0
OUTAGE_TIMEOUT_SECONDS = 0.1
SILENT_TIMEOUT_SECONDS = 0.05
# A request answered through a failing Redis may take one storage.timeout,
# plus the proxying itself.
OUTAGE_LATENCY_BOUND = OUTAGE_TIMEOUT_SECONDS + 0.2
SILENT_REDIS_LATENCY_BOUND = 0.3
DEFAULT_KEY = "rl:{127.0.0.1}:default"


# --------------------------------------------------------------------------- helpers


def redis_storage(
    url: str, on_error: str = "deny", timeout: float = HEALTHY_TIMEOUT_SECONDS
) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis_url": url,
        "on_error": on_error,
        "timeout": f"{round(timeout * 1000)}ms",
    }


def bucket_keys(client: redis.Redis) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in client.keys("rl:*"))


async def timed_fetch(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, float]:
    started = time.perf_counter()
    status, _headers, _body = await fetch(http, url, **kwargs)
    return status, time.perf_counter() - started


async def storage_errors(http: aiohttp.ClientSession, gw: RunningGateway) -> float:
    """gateway_storage_errors_total of the redis backend, as /metrics shows it."""
    return await scrape_sum(http, gw.admin_url, "gateway_storage_errors_total", backend="redis")


async def wait_until_redis_decides(
    http: aiohttp.ClientSession, gw: RunningGateway, rds: redis.Redis, path: str = "/"
) -> int:
    """Poll with requests until one is decided by Redis again (the breaker is
    closed and the call succeeded): fallbacks never write a key, a Redis
    decision on a fresh (flushed) bucket always does. Returns the attempts."""
    deadline = time.monotonic() + BREAKER_OPEN_SECONDS + 5.0
    attempts = 0
    while time.monotonic() < deadline:
        rds.flushall()
        attempts += 1
        await fetch(http, gw.url + path)
        if rds.exists(DEFAULT_KEY):
            return attempts
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError(f"{gw.url}: Redis never decided again after it came back")


async def alternate(
    http: aiohttp.ClientSession, gateways: list[RunningGateway], count: int
) -> list[int]:
    statuses = []
    for i in range(count):
        status, _headers, _body = await fetch(http, f"{gateways[i % len(gateways)].url}/a/{i}")
        statuses.append(status)
    return statuses


# --------------------------------------------------------------------------- sharing


async def test_two_instances_share_one_bucket_exactly(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url)
    gw_a = await start_gateway(limits=limits(50), storage=storage)
    gw_b = await start_gateway(limits=limits(50), storage=storage)
    await clear_of_hour_boundary(rds)

    statuses = await alternate(http, [gw_a, gw_b], 200)
    assert statuses.count(200) == 50, statuses
    assert statuses.count(429) == 150
    assert statuses[:50] == [200] * 50  # the shared bucket drains, then denies
    # Each instance admitted its alternate half of the 50.
    assert statuses[0:50:2].count(200) == 25
    assert statuses[1:50:2].count(200) == 25
    assert int(rds.hget(DEFAULT_KEY, "t") or -1) == 0


async def test_two_instances_share_exactly_under_concurrent_demand(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url)
    gw_a = await start_gateway(limits=limits(50), storage=storage)
    gw_b = await start_gateway(limits=limits(50), storage=storage)
    await clear_of_hour_boundary(rds)

    async def one(i: int) -> tuple[int, str | None]:
        gw = (gw_a, gw_b)[i % 2]
        status, headers, _body = await fetch(http, f"{gw.url}/c/{i}")
        return status, headers.get("X-RateLimit-Remaining")

    results = await asyncio.gather(*(one(i) for i in range(300)))
    statuses = [status for status, _remaining in results]
    assert statuses.count(200) == 50, statuses
    assert statuses.count(429) == 250
    # Every admitted request saw a distinct token count: no token given twice.
    remaining = sorted(int(r) for s, r in results if s == 200 and r is not None)
    assert remaining == list(range(50))
    assert int(rds.hget(DEFAULT_KEY, "t") or -1) == 0
    # Both instances decided against Redis (none fell back).
    assert gw_a.metric("gateway_storage_errors_total", {"backend": "redis"}) == 0
    assert gw_b.metric("gateway_storage_errors_total", {"backend": "redis"}) == 0


# --------------------------------------------------------------------------- semantics


EQUIVALENCE_CONFIG: dict[str, Any] = {
    "limits": {
        "default": bucket(7),
        "overrides": [{"client": "key-gold", **bucket(4)}],
    },
    "routes": [
        {"path_prefix": "/login", "limit": bucket(3)},
        {"path_prefix": "/healthz", "limit": "unlimited"},
    ],
    "clients": {"identify_by": "header", "header": "X-API-Key"},
}
# (path, API key or None): the default bucket, a route's own bucket, an
# override, an override on a route with its own limit, an unlimited route.
EQUIVALENCE_STEPS: list[tuple[str, str | None]] = [
    ("/a", None),
    ("/login", None),
    ("/b", "key-gold"),
    ("/login/x", "key-gold"),
    ("/c", "key-plain"),
    ("/healthz", None),
]
EQUIVALENCE_REQUESTS = 36


def expected_sequence() -> list[tuple[int, str | None]]:
    """The contract's answer for the sequence: every (route, client) its own
    bucket; /login's limit wins over the override; no refill within 1h."""
    tokens: dict[tuple[str, str], int] = {}
    out: list[tuple[int, str | None]] = []
    for i in range(EQUIVALENCE_REQUESTS):
        path, key = EQUIVALENCE_STEPS[i % len(EQUIVALENCE_STEPS)]
        if path.startswith("/healthz"):
            out.append((200, None))
            continue
        client = key if key is not None else "ip:127.0.0.1"
        route = "/login" if path.startswith("/login") else "default"
        if route == "/login":
            maximum = 3
        elif client == "key-gold":
            maximum = 4
        else:
            maximum = 7
        left = tokens.get((route, client), maximum)
        if left > 0:
            tokens[(route, client)] = left - 1
            out.append((200, str(left - 1)))
        else:
            out.append((429, "0"))
    return out


async def run_sequence(
    http: aiohttp.ClientSession, gw: RunningGateway
) -> list[tuple[int, str | None]]:
    out = []
    for i in range(EQUIVALENCE_REQUESTS):
        path, key = EQUIVALENCE_STEPS[i % len(EQUIVALENCE_STEPS)]
        headers = {"X-API-Key": key} if key is not None else {}
        status, response_headers, _body = await fetch(http, gw.url + path, headers=headers)
        out.append((status, response_headers.get("X-RateLimit-Remaining")))
    return out


async def test_redis_backend_answers_like_the_memory_backend(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    memory = await start_gateway(**EQUIVALENCE_CONFIG)
    shared = await start_gateway(**EQUIVALENCE_CONFIG, storage=redis_storage(redis_server.url))
    await clear_of_hour_boundary(rds)

    from_memory = await run_sequence(http, memory)
    from_redis = await run_sequence(http, shared)

    assert from_redis == from_memory
    assert from_memory == expected_sequence()
    statuses = [status for status, _remaining in from_redis]
    assert 200 in statuses
    assert 429 in statuses
    # One key per limited (route, client) pair, hash-tagged by client.
    assert bucket_keys(rds) == [
        "rl:{ip:127.0.0.1}:/login",
        "rl:{ip:127.0.0.1}:default",
        "rl:{key-gold}:/login",
        "rl:{key-gold}:default",
        "rl:{key-plain}:default",
    ]


# --------------------------------------------------------------------------- the redis clock


async def test_refill_follows_the_redis_clock(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    period_ms = 200
    gw = await start_gateway(
        limits=limits(3, refill_tokens=2, refill_period=f"{period_ms}ms"),
        storage=redis_storage(redis_server.url),
    )
    # A scheduling hiccup may push the check past the following boundary
    # (then 3 would be due, not 2); such an attempt proves nothing, so it is
    # repeated. The admitted count is never retried into agreement.
    for _attempt in range(5):
        rds.flushall()
        for _ in range(20):
            status, headers, body = await fetch(http, gw.url + "/r")
            if status == 429:
                break
        else:
            raise AssertionError("the bucket never drained")
        assert headers["Retry-After"] == "1"  # whole seconds, at least 1
        assert headers["X-RateLimit-Reset"] == "1"  # ceil of < 200 ms
        assert headers["X-RateLimit-Remaining"] == "0"
        assert headers["X-RateLimit-Limit"] == "3"
        assert json.loads(body) == {"error": "rate_limited", "retry_after": 1}

        drained_tick = redis_now_ms(rds) // period_ms
        bucket_now = (await admin_buckets(http, gw.admin_url, "127.0.0.1"))["default"]
        if bucket_now["tokens"] != 0:
            continue  # a boundary passed since the 429
        to_next = bucket_now["next_refill_seconds"]
        assert 0 < to_next <= period_ms / 1000
        await asyncio.sleep(to_next + 0.02)  # the Redis clock's next boundary

        before = redis_now_ms(rds)
        after_refill = [await fetch(http, gw.url + "/r") for _ in range(3)]
        after = redis_now_ms(rds)
        if not before // period_ms == after // period_ms == drained_tick + 1:
            continue
        assert [(s, h["X-RateLimit-Remaining"]) for s, h, _b in after_refill] == [
            (200, "1"),
            (200, "0"),
            (429, "0"),
        ]
        return
    raise AssertionError("no attempt ran within one refill period of the Redis clock")


async def test_keys_expire_when_the_bucket_would_be_full(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    period_ms, refill_tokens, max_tokens = 300, 1, 3
    gw = await start_gateway(
        limits=limits(max_tokens, refill_tokens, refill_period=f"{period_ms}ms"),
        routes=[{"path_prefix": "/healthz", "limit": "unlimited"}],
        storage=redis_storage(redis_server.url),
    )
    statuses = [(await fetch(http, gw.url + "/k"))[0] for _ in range(max_tokens + 1)]
    assert statuses.count(200) >= max_tokens  # one refill may land meanwhile
    assert bucket_keys(rds) == [DEFAULT_KEY]

    pipe = rds.pipeline(transaction=True)  # one consistent look, on one clock
    pipe.time()
    pipe.hmget(DEFAULT_KEY, ["t", "k", "p", "r", "m"])
    pipe.pttl(DEFAULT_KEY)
    (seconds, micros), (t, k, p, r, m), pttl = pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    tokens, tick = int(t), int(k)
    # The limit the tokens were counted under: a reload settles under it.
    assert (int(p), int(r), int(m)) == (period_ms, refill_tokens, max_tokens)
    assert tokens < max_tokens
    full_at_ms = (tick + math.ceil((max_tokens - tokens) / refill_tokens)) * period_ms
    until_full_ms = full_at_ms - now_ms
    assert pttl > 0, "a drained bucket's key must expire"
    assert pttl <= until_full_ms + 2, (pttl, until_full_ms)
    assert pttl >= until_full_ms - 100, (pttl, until_full_ms)  # not forgotten early

    # Bounded poll on the Redis clock: the key goes when the bucket is full.
    deadline = time.monotonic() + until_full_ms / 1000 + 3.0
    while True:
        pipe = rds.pipeline(transaction=True)
        pipe.time()
        pipe.exists(DEFAULT_KEY)
        (seconds, micros), exists = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if not exists:
            break
        assert time.monotonic() < deadline, "the key of a full bucket was never removed"
        await asyncio.sleep(0.02)
    assert now_ms >= full_at_ms - 2, "the key vanished before the bucket was full"

    # A missing key is a full bucket: nothing was lost by removing it, and
    # the admin view says the store holds nothing for the client.
    status, body = await admin_client(http, gw.admin_url, "127.0.0.1")
    assert (status, body["tracked"]) == (404, False)
    status, headers, _body = await fetch(http, gw.url + "/k")
    assert (status, headers["X-RateLimit-Remaining"]) == (200, str(max_tokens - 1))
    # Reading a full bucket, or an unlimited route, leaves no key behind.
    rds.flushall()
    status, body = await admin_client(http, gw.admin_url, "10.9.9.9")
    assert (status, body["tracked"]) == (404, False)
    status, _headers, _body = await fetch(http, gw.url + "/healthz")
    assert status == 200
    assert bucket_keys(rds) == []


async def test_a_hash_without_the_limit_is_read_as_counted_under_the_current_one(
    redis_server: RedisServer, rds: redis.Redis
) -> None:
    """Gateways before the hash kept the whole limit wrote t, k and p only, and a
    rolling upgrade shares keys with them: such a bucket is settled under the
    limit of the request, as their script did, and then stored with it."""
    clock = ManualRefillClock()
    store = RedisStore(
        StorageConfig("redis", redis_server.url, "deny", HEALTHY_TIMEOUT_SECONDS),
        MemoryStore(clock, max_tracked=100, idle_timeout_seconds=3600.0),
        now_ms=lambda: round(clock.now() * 1000),  # test seam: a stepped clock
    )
    key = ("default", "", "127.0.0.1", "127.0.0.1")  # a route's first limit
    limit = Limit(BucketSpec(60.0, 10, 30), clock)
    rds.hset(DEFAULT_KEY, mapping={"t": 2, "k": 0, "p": 60_000})
    clock.advance(120.0)  # two periods owed
    try:
        snapshot = await store.snapshot(key, limit)
        assert snapshot is not None
        assert snapshot.tokens == 22
        result = await store.take([key], [limit])
        assert (result.admitted, result.tokens_left) == (True, [21])
    finally:
        await store.close()
    stored = rds.hmget(DEFAULT_KEY, ["t", "k", "p", "r", "m"])
    assert stored == [b"21", b"2", b"60000", b"10", b"30"]


# --------------------------------------------------------------------------- outages


async def outage_requests(
    http: aiohttp.ClientSession, gw: RunningGateway, count: int
) -> list[int]:
    """``count`` sequential requests; each must be answered within the bound."""
    statuses = []
    for i in range(count):
        status, latency = await timed_fetch(http, f"{gw.url}/o/{i}")
        assert latency < OUTAGE_LATENCY_BOUND, (i, status, latency)
        statuses.append(status)
    return statuses


async def assert_shared_again(
    http: aiohttp.ClientSession,
    gateways: list[RunningGateway],
    rds: redis.Redis,
    max_tokens: int,
) -> None:
    for gw in gateways:
        await wait_until_redis_decides(http, gw, rds)
    rds.flushall()
    statuses = await alternate(http, gateways, 2 * max_tokens + 6)
    assert statuses == [200] * max_tokens + [429] * (max_tokens + 6)


async def test_redis_outage_on_error_deny(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url, "deny", OUTAGE_TIMEOUT_SECONDS)
    gw_a = await start_gateway(limits=limits(5), storage=storage)
    gw_b = await start_gateway(limits=limits(5), storage=storage)
    await clear_of_hour_boundary(rds, needed_seconds=20)
    assert (await fetch(http, gw_a.url + "/"))[0] == 200
    assert (await readyz(http, gw_a.admin_url))[0] == 200

    redis_server.stop()
    statuses = await outage_requests(http, gw_a, 12)
    assert statuses == [429] * 12
    status, headers, body = await fetch(http, gw_a.url + "/o")
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert b"rate_limited" in body
    errors = await storage_errors(http, gw_a)
    assert errors > 0
    status, body = await readyz(http, gw_a.admin_url)
    assert status == 503
    assert body["checks"]["storage_reachable"] is False

    redis_server.start()
    await assert_shared_again(http, [gw_a, gw_b], rds, 5)
    status, body = await readyz(http, gw_a.admin_url)
    assert status == 200, body


async def test_redis_outage_on_error_allow(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url, "allow", OUTAGE_TIMEOUT_SECONDS)
    gw_a = await start_gateway(limits=limits(5), storage=storage)
    gw_b = await start_gateway(limits=limits(5), storage=storage)
    await clear_of_hour_boundary(rds, needed_seconds=20)
    assert await alternate(http, [gw_a, gw_b], 8) == [200] * 5 + [429] * 3

    redis_server.stop()
    # The shared bucket was empty; with Redis gone, everything is let through.
    statuses = await outage_requests(http, gw_a, 12)
    assert statuses == [200] * 12
    assert await storage_errors(http, gw_a) > 0
    status, body = await readyz(http, gw_a.admin_url)
    assert status == 200, body

    redis_server.start()
    await assert_shared_again(http, [gw_a, gw_b], rds, 5)


async def test_redis_outage_on_error_local(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url, "local", OUTAGE_TIMEOUT_SECONDS)
    gw_a = await start_gateway(limits=limits(5), storage=storage)
    gw_b = await start_gateway(limits=limits(5), storage=storage)
    await clear_of_hour_boundary(rds, needed_seconds=20)
    assert await alternate(http, [gw_a, gw_b], 8) == [200] * 5 + [429] * 3

    redis_server.stop()
    # In-process buckets: each instance enforces max_tokens on its own.
    assert await outage_requests(http, gw_a, 9) == [200] * 5 + [429] * 4
    assert await outage_requests(http, gw_b, 7) == [200] * 5 + [429] * 2
    assert await storage_errors(http, gw_a) > 0
    status, body = await readyz(http, gw_a.admin_url)
    assert status == 200, body

    redis_server.start()
    await assert_shared_again(http, [gw_a, gw_b], rds, 5)


# --------------------------------------------------------------------------- a silent redis


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """A TCP server that accepts and reads but never answers: a hung Redis."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    server.close()
    for writer in writers:
        writer.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("on_error", "expected"),
    [
        ("deny", [429] * 8),
        ("allow", [200] * 8),
        ("local", [200] * 3 + [429] * 5),
    ],
)
async def test_silent_redis_never_hangs_a_request(
    start_gateway: StartGateway,
    silent_redis: str,
    http: aiohttp.ClientSession,
    on_error: str,
    expected: list[int],
) -> None:
    gw = await start_gateway(
        limits=limits(3), storage=redis_storage(silent_redis, on_error, SILENT_TIMEOUT_SECONDS)
    )
    statuses = []
    for i in range(len(expected)):
        status, latency = await timed_fetch(http, f"{gw.url}/s/{i}")
        assert latency < SILENT_REDIS_LATENCY_BOUND, (i, status, latency)
        statuses.append(status)
    assert statuses == expected

    # Concurrent demand is answered as promptly (one batch, one timeout).
    started = time.perf_counter()
    results = await asyncio.gather(*(timed_fetch(http, f"{gw.url}/p/{i}") for i in range(20)))
    assert time.perf_counter() - started < SILENT_REDIS_LATENCY_BOUND * 2
    concurrent = {status for status, _latency in results}
    assert concurrent == {200 if on_error == "allow" else 429}
    assert max(latency for _status, latency in results) < SILENT_REDIS_LATENCY_BOUND * 2
    assert gw.metric("gateway_storage_errors_total", {"backend": "redis"}) > 0
    status, _body = await readyz(http, gw.admin_url)
    assert status == (503 if on_error == "deny" else 200)


# --------------------------------------------------------------------------- admin


async def test_admin_shows_the_shared_tokens(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    storage = redis_storage(redis_server.url)
    config: dict[str, Any] = {
        "limits": limits(10),
        "routes": [{"path_prefix": "/login", "limit": bucket(4)}],
        "storage": storage,
    }
    gw_a = await start_gateway(**config)
    gw_b = await start_gateway(**config)
    await clear_of_hour_boundary(rds)

    status, before = await admin_client(http, gw_a.admin_url, "127.0.0.1")
    assert (status, before["tracked"]) == (404, False)

    for i in range(4):
        assert (await fetch(http, f"{gw_b.url}/x/{i}"))[0] == 200
    assert (await fetch(http, f"{gw_b.url}/login"))[0] == 200

    seen_by_a = await admin_buckets(http, gw_a.admin_url, "127.0.0.1")
    assert seen_by_a["default"]["tokens"] == 6
    assert seen_by_a["default"]["max_tokens"] == 10
    assert seen_by_a["default"]["refill_tokens"] == 1
    assert 0 < seen_by_a["default"]["next_refill_seconds"] <= 3600
    assert seen_by_a["/login"]["tokens"] == 3

    assert (await fetch(http, f"{gw_a.url}/y"))[0] == 200
    seen_by_b = await admin_buckets(http, gw_b.admin_url, "127.0.0.1")
    assert seen_by_b["default"]["tokens"] == 5
    assert seen_by_b["/login"]["tokens"] == 3


async def test_flushed_script_is_reloaded_without_an_error(
    start_gateway: StartGateway,
    redis_server: RedisServer,
    rds: redis.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """EVALSHA answers NOSCRIPT after SCRIPT FLUSH (or a Redis restart or
    failover): the script is loaded again and the decision still counts."""
    gw = await start_gateway(limits=limits(10), storage=redis_storage(redis_server.url))
    await clear_of_hour_boundary(rds)
    assert await alternate(http, [gw], 3) == [200] * 3
    rds.script_flush()
    assert await alternate(http, [gw], 9) == [200] * 7 + [429] * 2
    assert gw.metric("gateway_storage_errors_total", {"backend": "redis"}) == 0


# --------------------------------------------------------------------------- keys


def test_bucket_keys_keep_the_old_form_for_a_routes_one_client_limit() -> None:
    """A route's one limit keyed on the client keeps ``rl:{client}:route``
    (a rolling upgrade shares buckets with older gateways); other limits
    add their name, other subjects add themselves; a request's keys share
    one hash tag, so one script call may take them on a Redis Cluster."""
    assert redis_key(("default", "", "10.0.0.1", "10.0.0.1")) == "rl:{10.0.0.1}:default"
    assert redis_key(("/login", "", "key-1", "key-1")) == "rl:{key-1}:/login"
    assert redis_key(("default", "hourly", "key-1", "key-1")) == "rl:{key-1}:default#hourly"
    limits = RouteLimits(
        "/api",
        (
            BucketSpec(1.0, 10, 20, "/api"),
            BucketSpec(1.0, 500, 500, "/api-2", per=("route",)),
            BucketSpec(60.0, 100, 100, "hourly", per=("ip", "header:X-Tenant")),
        ),
        ManualRefillClock(),
    )
    who = Client("key-1", "10.0.0.1", CIMultiDictProxy(CIMultiDict([("X-Tenant", "acme")])))
    keys = [redis_key(key) for key in limits.keys(who)]
    assert keys == [
        "rl:{/api}:/api@key-1",
        "rl:{/api}:/api#/api-2@*",
        "rl:{/api}:/api#hourly@ip:10.0.0.1|header:X-Tenant=acme",
    ]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    # Braces in a client id cannot end the hash tag early.
    assert redis_key(("default", "", "a}b{c", "a}b{c")) == "rl:{a)b(c}:default"


def test_every_limit_of_a_request_has_a_redis_key_of_its_own() -> None:
    clock = ManualRefillClock()
    for names in (("/b", "override"), ("/b", "default"), ("default", "override")):
        limits = RouteLimits("/b", tuple(BucketSpec(60.0, 1, 5, name) for name in names), clock)
        who = Client("10.0.0.1", "10.0.0.1", CIMultiDictProxy(CIMultiDict()))
        keys = [redis_key(key) for key in limits.keys(who)]
        assert len(set(keys)) == len(keys), (names, keys)
