"""One token-bucket semantics, checked on every store (limits' ``@all_storage``
habit): each test runs on the in-process ``MemoryStore`` and on the
``RedisStore`` against a real ``redis-server``.

The semantics (README, "How limiting works"):

- Each (route, client) pair has a bucket. It starts full at ``max_tokens``;
  every whole ``refill_period`` it gains ``refill_tokens``, capped at
  ``max_tokens``; a request takes one token or is denied.
- Periods are counted on one clock, so all buckets with the same period
  refill at the same instants (fixed-rate, like nginx's zones): a bucket is
  owed the whole periods that ended since it was last touched, not time since
  its last request. ``retry_after`` is the time to the next such instant, and
  so is ``reset`` (0 only for a full bucket).
- A reload keeps every bucket. A bucket whose limit did not change keeps its
  tokens and what it is owed; one whose limit changed is settled under the
  old limit, then capped at the new ``max_tokens``, and refilled at the new
  rate from then on: a reload never hands out a burst nobody earned.
- The admin view (``snapshot``) shows the tokens a request would find.

The clock. The memory store counts periods from its ``RefillClock``'s start,
the Redis store from the Unix epoch on the Redis server's clock (``TIME``,
read inside the script, one clock for every gateway). Redis's clock cannot be
stepped, and waiting on real time would make every boundary a race. So, as
everywhere else in the suite, only the clock is fake: both stores follow one
``ManualRefillClock``, and ``RedisStore(now_ms=...)``, a test seam the gateway
never uses, hands the script that clock's time (as ARGV[1]) in place of
``TIME``. Everything else is the production code path: the same Lua file,
EVALSHA batches, hashes, expiry, a real server. The Redis side of the clock
starts at ``REDIS_EPOCH_MS``, a whole hour (so the two stores' periods line
up) of epoch size (so the script does its arithmetic on real-sized numbers).

What the seam leaves real is expiry: keys expire on Redis's own clock, which
does not stop while the fake one does. A key that vanishes early reads as a
full bucket, so every test writes keys that live for seconds at least
(``to_next`` and the periods are seconds or more); the tests run in
milliseconds. Expiry itself is tested on real time in ``test_redis_store.py``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.config.model import BucketSpec, StorageConfig
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.policy import Limit
from gateway.limiting.redis_store import RedisStore
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.limiting.store import BucketKey, BucketStore, TakeResult
from tests.conftest import RedisServer

# 2023-11-14 22:00:00 UTC: a whole hour, so every period dividing an hour
# counts its ticks from the same instant as the memory store's clock.
REDIS_EPOCH_MS = 472_222 * 3_600_000
KEY: BucketKey = ("default", "client-a")
STORES = ["memory", "redis"]


class Bench:
    """One store on a stepped clock, with the calls a test needs."""

    def __init__(self, name: str, clock: ManualRefillClock, store: BucketStore) -> None:
        self.name = name
        self.clock = clock
        self.store = store

    def limit(self, period: float, refill_tokens: int, max_tokens: int) -> Limit:
        """A Limit built from a freshly parsed spec, as a reload builds one."""
        return Limit(BucketSpec(period, refill_tokens, max_tokens), self.clock)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def take(self, limit: Limit, key: BucketKey = KEY) -> TakeResult:
        return await self.store.take(key, limit)

    async def drain(self, limit: Limit, key: BucketKey = KEY) -> int:
        """Take until denied; how many were admitted."""
        admitted = 0
        while (await self.take(limit, key)).admitted:
            admitted += 1
            assert admitted <= 1000, "a bucket never ran dry"
        return admitted

    async def tokens(self, limit: Limit, key: BucketKey = KEY) -> int:
        snapshot = await self.store.snapshot(key, limit)
        assert snapshot is not None
        return snapshot.tokens

    async def next_refill(self, limit: Limit, key: BucketKey = KEY) -> float:
        snapshot = await self.store.snapshot(key, limit)
        assert snapshot is not None
        return snapshot.next_refill_seconds


@asynccontextmanager
async def open_bench(name: str, request: pytest.FixtureRequest) -> AsyncIterator[Bench]:
    clock = ManualRefillClock()
    memory = MemoryStore(clock, max_tracked=1000, idle_timeout_seconds=3600.0)
    if name == "memory":
        yield Bench(name, clock, memory)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    errors: list[None] = []
    store = RedisStore(
        # on_error deny: a failed call answers "denied, 0 left", which no
        # assertion below would take for a real answer.
        StorageConfig(
            backend="redis", redis_url=server.url, on_error="deny", timeout_seconds=2.0
        ),
        memory,
        count_error=lambda: errors.append(None),
        now_ms=lambda: REDIS_EPOCH_MS + round(clock.now() * 1000),
    )
    try:
        yield Bench(name, clock, store)
    finally:
        await store.close()
    assert errors == [], "a Redis call failed: the answers came from on_error"


@pytest.fixture(params=STORES)
async def bench(request: pytest.FixtureRequest) -> AsyncIterator[Bench]:
    async with open_bench(request.param, request) as one:
        yield one


# --------------------------------------------------------------------------- buckets


async def test_a_new_bucket_starts_full(bench: Bench) -> None:
    limit = bench.limit(10.0, 1, 5)
    assert await bench.tokens(limit) == 5
    first = await bench.take(limit)
    assert (first.admitted, first.tokens_left) == (True, 4)
    assert await bench.drain(limit) == 4
    denied = await bench.take(limit)
    assert (denied.admitted, denied.tokens_left) == (False, 0)


async def test_each_route_and_client_has_its_own_bucket(bench: Bench) -> None:
    limit = bench.limit(10.0, 1, 3)
    assert await bench.drain(limit, ("default", "a")) == 3
    assert await bench.drain(limit, ("default", "b")) == 3
    assert await bench.drain(limit, ("/login", "a")) == 3
    assert await bench.tokens(limit, ("/login", "c")) == 3


async def test_a_whole_period_adds_refill_tokens(bench: Bench) -> None:
    limit = bench.limit(10.0, 2, 5)
    assert await bench.drain(limit) == 5
    bench.advance(9.75)
    assert not (await bench.take(limit)).admitted
    assert await bench.tokens(limit) == 0
    bench.advance(0.25)
    assert await bench.tokens(limit) == 2
    assert await bench.drain(limit) == 2
    bench.advance(20.0)  # two periods: two refills
    assert await bench.drain(limit) == 4


async def test_refills_come_at_whole_periods_of_the_clock(bench: Bench) -> None:
    """Fixed-rate instants: drained 7 s into a 10 s period, the bucket is owed
    its first refill 3 s later, not 10."""
    limit = bench.limit(10.0, 1, 3)
    bench.advance(7.0)
    assert await bench.drain(limit) == 3
    bench.advance(2.5)
    assert await bench.tokens(limit) == 0
    bench.advance(0.5)
    assert await bench.drain(limit) == 1


async def test_refills_are_capped_at_max_tokens(bench: Bench) -> None:
    limit = bench.limit(10.0, 4, 6)
    assert (await bench.take(limit)).tokens_left == 5
    bench.advance(10.0)
    assert await bench.tokens(limit) == 6  # 5 + 4, capped
    bench.advance(1000.0)
    assert await bench.tokens(limit) == 6
    assert await bench.drain(limit) == 6


async def test_retry_after_and_reset_are_the_time_to_the_next_refill(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 2)
    bench.advance(15.25)
    results = [await bench.take(limit) for _ in range(3)]
    assert [(r.admitted, r.tokens_left) for r in results] == [(True, 1), (True, 0), (False, 0)]
    for result in results:
        assert result.retry_after_seconds == pytest.approx(44.75, abs=1e-3)
        assert result.reset_seconds == pytest.approx(44.75, abs=1e-3)
    assert await bench.next_refill(limit) == pytest.approx(44.75, abs=1e-3)
    bench.advance(44.75)  # exactly at the boundary: one refill, a whole period to the next
    result = await bench.take(limit)
    assert (result.admitted, result.tokens_left) == (True, 0)
    assert result.retry_after_seconds == pytest.approx(60.0, abs=1e-3)
    assert result.reset_seconds == pytest.approx(60.0, abs=1e-3)


async def test_concurrent_takes_never_give_a_token_twice(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 5)
    results = await asyncio.gather(*(bench.take(limit) for _ in range(12)))
    admitted = [r.tokens_left for r in results if r.admitted]
    assert sorted(admitted) == [0, 1, 2, 3, 4]
    assert sum(not r.admitted for r in results) == 7


# --------------------------------------------------------------------------- reload


async def test_reload_with_an_equal_limit_keeps_tokens_and_what_is_owed(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    for _ in range(5):
        await bench.take(old)
    equal = bench.limit(10.0, 10, 20)  # a reload parses a new, equal spec
    assert equal.spec is not old.spec
    assert (await bench.take(equal)).tokens_left == 14
    assert await bench.drain(equal) == 14
    bench.advance(10.0)
    again = bench.limit(10.0, 10, 20)
    assert await bench.tokens(again) == 10
    assert await bench.drain(again) == 10


async def test_reload_lowering_the_limit_caps_the_tokens(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    for _ in range(5):
        await bench.take(old)  # 15 left
    lower = bench.limit(10.0, 2, 4)
    assert await bench.tokens(lower) == 4
    result = await bench.take(lower)
    assert (result.admitted, result.tokens_left) == (True, 3)
    bench.advance(10.0)
    assert await bench.drain(lower) == 4  # 3 + 2, capped at the new max


async def test_reload_lowering_the_limit_settles_what_the_old_one_owed(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    assert await bench.drain(old) == 20
    bench.advance(15.0)  # owed one refill of 10 under the old limit
    lower = bench.limit(10.0, 2, 4)
    assert await bench.tokens(lower) == 4  # 10, capped at 4
    assert await bench.drain(lower) == 4


async def test_reload_raising_the_limit_hands_out_no_unearned_tokens(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    assert await bench.drain(old) == 20
    higher = bench.limit(10.0, 10, 100)
    assert await bench.tokens(higher) == 0
    assert not (await bench.take(higher)).admitted
    bench.advance(10.0)
    assert await bench.drain(higher) == 10


async def test_reload_with_a_new_period_does_not_refill_early(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    assert await bench.drain(old) == 20
    bench.advance(6.0)  # the old limit owes nothing yet
    shorter = bench.limit(5.0, 10, 20)  # whose clock has already counted 1 period
    assert not (await bench.take(shorter)).admitted
    bench.advance(3.0)
    assert await bench.tokens(shorter) == 0
    bench.advance(1.0)  # the new period's next boundary
    assert await bench.drain(shorter) == 10


async def test_reload_with_a_new_period_keeps_refills_already_owed(bench: Bench) -> None:
    """Drained at 0 s and idle for 50 s: owed a full bucket under the old limit
    (10 s period), and a full one under the new (20 s). No 429 from a reload."""
    old = bench.limit(10.0, 10, 20)
    assert await bench.drain(old) == 20
    bench.advance(50.0)
    longer = bench.limit(20.0, 10, 20)
    result = await bench.take(longer)
    assert (result.admitted, result.tokens_left) == (True, 19)


async def test_reload_settles_under_the_old_limit(bench: Bench) -> None:
    """The divergence this suite was written for: 1/s, max 30, drained, left
    for 3.5 s, then reloaded to 10/s. The old limit owes 3 tokens; the new
    rate applies from the reload on (the Redis store used to credit the pause
    at the new rate: 30, capped, so 29 after the take)."""
    old = bench.limit(1.0, 1, 30)
    assert await bench.drain(old) == 30
    bench.advance(3.5)
    faster = bench.limit(1.0, 10, 30)
    assert await bench.tokens(faster) == 3
    result = await bench.take(faster)
    assert (result.admitted, result.tokens_left) == (True, 2)
    bench.advance(0.5)  # one period under the new limit
    assert (await bench.take(faster)).tokens_left == 11


# ------------------------------------------------------------------- both stores at once


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_both_stores_answer_a_random_history_alike(
    request: pytest.FixtureRequest, seed: int
) -> None:
    """Takes, reads, time steps and reloads (each reload a new spec object for
    one route, sometimes an equal one) drawn at random, sent to both stores:
    every answer must be the same. Steps are whole multiples of 5 s and the
    periods at least 60 s, so no Redis key lives less than 5 s of real time."""
    specs = [(60.0, 1, 3), (60.0, 5, 10), (120.0, 2, 4), (300.0, 10, 30), (60.0, 10, 10)]
    routes = ["default", "/login"]
    clients = ["a", "b", "c"]
    rng = random.Random(seed)
    async with open_bench("memory", request) as memory, open_bench("redis", request) as shared:
        benches = (memory, shared)
        current = {route: specs[0] for route in routes}
        limits = {route: [b.limit(*specs[0]) for b in benches] for route in routes}
        for step in range(400):
            action = rng.random()
            route = rng.choice(routes)
            key = (route, rng.choice(clients))
            if action < 0.6:
                taken = [
                    await b.take(limit, key)
                    for b, limit in zip(benches, limits[route], strict=True)
                ]
                got = [
                    (t.admitted, t.tokens_left, t.retry_after_seconds, t.reset_seconds)
                    for t in taken
                ]
                assert got[0][:2] == got[1][:2], (step, current[route], got)
                assert got[0][2:] == pytest.approx(got[1][2:], abs=1e-3), (step, got)
            elif action < 0.75:
                seen = [
                    await b.tokens(limit, key)
                    for b, limit in zip(benches, limits[route], strict=True)
                ]
                assert seen[0] == seen[1], (step, current[route], seen)
            elif action < 0.92:
                step_seconds = 5.0 * rng.randint(1, 30)
                for b in benches:
                    b.advance(step_seconds)
            else:
                current[route] = rng.choice(specs)
                limits[route] = [b.limit(*current[route]) for b in benches]
