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
  rate from then on (from the first request that meets the new limit,
  admitted or not): a reload never hands out a burst nobody earned.
- The admin view (``snapshot``) shows the tokens a request would find.
- Several limits (contract, "Policy vocabulary"): a request passes every
  limit of its route, taking ``cost`` tokens from each, all or none: a
  denied request takes nothing from any limit. ``reporting`` is the limit
  that denied (the one that waits longest), else the one with the fewest
  left; ``retry_after`` is when every limit would admit. With ``max_wait``
  a request whose tokens come within it reserves them (the buckets go below
  zero) and is admitted with that delay; ``give_back`` returns tokens,
  capped at ``max_tokens``.

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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
import redis

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
KEY = ("default", "client-a")
# A bucket of its own that Bench.give_back takes from as a barrier.
BARRIER: BucketKey = ("barrier", "barrier", "barrier", "barrier")
STORES = ["memory", "redis"]


def bucket_key(key: tuple[str, str], limit: Limit) -> BucketKey:
    """The store's key of (route, client)'s bucket under ``limit``."""
    route, client = key
    return (route, limit.name, client, client)


class Bench:
    """One store on a stepped clock, with the calls a test needs. ``key`` is
    (route, client): each limit's bucket of that client on that route."""

    def __init__(
        self,
        name: str,
        clock: ManualRefillClock,
        store: BucketStore,
        held: Callable[[], int],
    ) -> None:
        self.name = name
        self.clock = clock
        self.store = store
        # Buckets the store holds: the memory table's size, Redis's keys.
        self.held = held

    def limit(
        self, period: float, refill_tokens: int, max_tokens: int, name: str = "default"
    ) -> Limit:
        """A Limit built from a freshly parsed spec, as a reload builds one."""
        return Limit(BucketSpec(period, refill_tokens, max_tokens, name), self.clock)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def take(self, limit: Limit, key: tuple[str, str] = KEY) -> TakeResult:
        return await self.store.take([bucket_key(key, limit)], [limit])

    async def take_all(
        self,
        limits: Sequence[Limit],
        key: tuple[str, str] = KEY,
        cost: int = 1,
        max_wait: float = 0.0,
    ) -> TakeResult:
        """One request that must pass every one of ``limits``."""
        keys = [bucket_key(key, limit) for limit in limits]
        return await self.store.take(keys, limits, cost, max_wait)

    async def give_back(
        self, limits: Sequence[Limit], cost: int, key: tuple[str, str] = KEY
    ) -> None:
        """``give_back``, then a barrier: the Redis store sends it with the
        next batch (fire and forget), and a batch's requests run in order, so
        once a later take on a bucket of its own is answered it has been done."""
        self.store.give_back([bucket_key(key, limit) for limit in limits], limits, cost)
        await self.store.take([BARRIER], [self.limit(3600.0, 1, 1, "barrier")])

    async def drain(self, limit: Limit, key: tuple[str, str] = KEY) -> int:
        """Take until denied; how many were admitted."""
        admitted = 0
        while (await self.take(limit, key)).admitted:
            admitted += 1
            assert admitted <= 1000, "a bucket never ran dry"
        return admitted

    async def tokens(self, limit: Limit, key: tuple[str, str] = KEY) -> int:
        snapshot = await self.store.snapshot(bucket_key(key, limit), limit)
        assert snapshot is not None
        return snapshot.tokens

    async def next_refill(self, limit: Limit, key: tuple[str, str] = KEY) -> float:
        snapshot = await self.store.snapshot(bucket_key(key, limit), limit)
        assert snapshot is not None
        return snapshot.next_refill_seconds


@asynccontextmanager
async def open_bench(name: str, request: pytest.FixtureRequest) -> AsyncIterator[Bench]:
    clock = ManualRefillClock()
    memory = MemoryStore(clock, max_tracked=1000, idle_timeout_seconds=3600.0)
    if name == "memory":
        yield Bench(name, clock, memory, lambda: memory.tracked)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    rds: redis.Redis = request.getfixturevalue("rds")
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
        yield Bench(name, clock, store, lambda: int(rds.dbsize()))
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
    assert (first.admitted, first.tokens_left[0]) == (True, 4)
    assert await bench.drain(limit) == 4
    denied = await bench.take(limit)
    assert (denied.admitted, denied.tokens_left[0]) == (False, 0)


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
    assert (await bench.take(limit)).tokens_left[0] == 5
    bench.advance(10.0)
    assert await bench.tokens(limit) == 6  # 5 + 4, capped
    bench.advance(1000.0)
    assert await bench.tokens(limit) == 6
    assert await bench.drain(limit) == 6


async def test_retry_after_and_reset_are_the_time_to_the_next_refill(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 2)
    bench.advance(15.25)
    results = [await bench.take(limit) for _ in range(3)]
    assert [(r.admitted, r.tokens_left[0]) for r in results] == [
        (True, 1),
        (True, 0),
        (False, 0),
    ]
    for result in results:
        assert result.retry_after_seconds == pytest.approx(44.75, abs=1e-3)
        assert result.to_next_seconds[0] == pytest.approx(44.75, abs=1e-3)
    assert await bench.next_refill(limit) == pytest.approx(44.75, abs=1e-3)
    bench.advance(44.75)  # exactly at the boundary: one refill, a whole period to the next
    result = await bench.take(limit)
    assert (result.admitted, result.tokens_left[0]) == (True, 0)
    assert result.retry_after_seconds == pytest.approx(60.0, abs=1e-3)
    assert result.to_next_seconds[0] == pytest.approx(60.0, abs=1e-3)


async def test_concurrent_takes_never_give_a_token_twice(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 5)
    results = await asyncio.gather(*(bench.take(limit) for _ in range(12)))
    admitted = [r.tokens_left[0] for r in results if r.admitted]
    assert sorted(admitted) == [0, 1, 2, 3, 4]
    assert sum(not r.admitted for r in results) == 7


# --------------------------------------------------------------------------- reload


async def test_reload_with_an_equal_limit_keeps_tokens_and_what_is_owed(bench: Bench) -> None:
    old = bench.limit(10.0, 10, 20)
    for _ in range(5):
        await bench.take(old)
    equal = bench.limit(10.0, 10, 20)  # a reload parses a new, equal spec
    assert equal.spec is not old.spec
    assert (await bench.take(equal)).tokens_left[0] == 14
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
    assert (result.admitted, result.tokens_left[0]) == (True, 3)
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
    assert (result.admitted, result.tokens_left[0]) == (True, 19)


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
    assert (result.admitted, result.tokens_left[0]) == (True, 2)
    bench.advance(0.5)  # one period under the new limit
    assert (await bench.take(faster)).tokens_left[0] == 11


async def test_a_reload_applies_from_the_first_request_under_it_even_a_denied_one(
    bench: Bench,
) -> None:
    """The first request under a changed limit settles the old one and
    starts the new one, whether it is admitted or not (the Redis store used to
    write a bucket only when admitting: a denied request left the old limit
    in the hash, to be settled under it for as long as requests were denied)."""
    old = bench.limit(60.0, 1, 3)
    assert await bench.drain(old) == 3
    new = bench.limit(60.0, 5, 10)
    assert not (await bench.take(new)).admitted  # nothing owed yet: denied
    bench.advance(120.0)  # two periods under the new limit: 0 + 2 * 5
    assert await bench.tokens(new) == 10
    assert await bench.drain(new) == 10


# --------------------------------------------------------------------------- several limits


async def test_a_request_passes_every_limit_and_a_denied_one_takes_from_none(
    bench: Bench,
) -> None:
    wide, narrow = bench.limit(60.0, 1, 5, "wide"), bench.limit(60.0, 1, 3, "narrow")
    for left in ([4, 2], [3, 1], [2, 0]):
        result = await bench.take_all([wide, narrow])
        assert (result.admitted, result.tokens_left) == (True, left)
        assert result.reporting == 1  # the fewest left
    for _ in range(4):
        result = await bench.take_all([wide, narrow])
        assert (result.admitted, result.tokens_left, result.reporting) == (False, [2, 0], 1)
    # The denying limit listed first: the same answer, reported by its index.
    result = await bench.take_all([narrow, wide])
    assert (result.admitted, result.tokens_left, result.reporting) == (False, [0, 2], 0)
    # Five denied requests took nothing from the limit that had tokens.
    assert await bench.tokens(wide) == 2
    assert await bench.tokens(narrow) == 0
    assert await bench.drain(wide) == 2


async def test_the_fewest_left_is_reported_whatever_the_order(bench: Bench) -> None:
    a, b, c = (bench.limit(60.0, 1, m, n) for m, n in ((9, "a"), (4, "b"), (6, "c")))
    for order, expected in (([a, b, c], 1), ([b, c, a], 0), ([c, a, b], 2)):
        result = await bench.take_all(order)
        assert result.admitted
        assert result.reporting == expected
        assert result.tokens_left[result.reporting] == min(result.tokens_left)
    assert [await bench.tokens(x) for x in (a, b, c)] == [6, 1, 3]


async def test_several_limits_stay_exact_under_concurrent_requests(bench: Bench) -> None:
    wide, narrow = bench.limit(60.0, 1, 5, "wide"), bench.limit(60.0, 1, 3, "narrow")
    results = await asyncio.gather(*(bench.take_all([wide, narrow]) for _ in range(12)))
    admitted = sorted(r.tokens_left for r in results if r.admitted)
    assert admitted == [[2, 0], [3, 1], [4, 2]]
    assert sum(not r.admitted for r in results) == 9
    assert [await bench.tokens(wide), await bench.tokens(narrow)] == [2, 0]


async def test_cost_takes_that_many_tokens_from_every_limit(bench: Bench) -> None:
    a, b = bench.limit(60.0, 2, 10, "a"), bench.limit(60.0, 1, 7, "b")
    result = await bench.take_all([a, b], cost=3)
    assert (result.admitted, result.tokens_left, result.reporting) == (True, [7, 4], 1)
    result = await bench.take_all([a, b], cost=3)
    assert (result.admitted, result.tokens_left) == (True, [4, 1])
    denied = await bench.take_all([a, b], cost=3)
    assert (denied.admitted, denied.tokens_left, denied.reporting) == (False, [4, 1], 1)
    # b holds 1 of the 3: two refills of 1, the first 60 s away.
    assert denied.retry_after_seconds == pytest.approx(120.0, abs=1e-3)
    bench.advance(60.0)  # a: 6, b: 2
    denied = await bench.take_all([a, b], cost=3)
    assert (denied.admitted, denied.tokens_left) == (False, [6, 2])
    assert denied.retry_after_seconds == pytest.approx(60.0, abs=1e-3)
    bench.advance(60.0)  # a: 8, b: 3
    result = await bench.take_all([a, b], cost=3)
    assert (result.admitted, result.tokens_left) == (True, [5, 0])


async def test_retry_after_is_when_every_limit_would_admit(bench: Bench) -> None:
    fast, slow = bench.limit(10.0, 1, 1, "fast"), bench.limit(60.0, 1, 1, "slow")
    assert (await bench.take_all([fast, slow])).admitted
    bench.advance(5.0)
    for order, slow_at in (([fast, slow], 1), ([slow, fast], 0)):
        denied = await bench.take_all(order)
        assert not denied.admitted
        # fast refills in 5 s, slow in 55 s: a retry after 5 s would be denied
        assert denied.retry_after_seconds == pytest.approx(55.0, abs=1e-3)
        assert denied.reporting == slow_at
    bench.advance(5.0)  # fast is back, slow is not
    denied = await bench.take_all([fast, slow])
    assert (denied.admitted, denied.tokens_left, denied.reporting) == (False, [1, 0], 1)
    assert denied.retry_after_seconds == pytest.approx(50.0, abs=1e-3)
    assert await bench.tokens(fast) == 1
    bench.advance(50.0)
    result = await bench.take_all([fast, slow])
    assert (result.admitted, result.tokens_left) == (True, [0, 0])


async def test_retry_after_counts_every_refill_a_cost_needs(bench: Bench) -> None:
    a, b = bench.limit(10.0, 1, 3, "a"), bench.limit(20.0, 3, 3, "b")
    assert (await bench.take_all([a, b], cost=3)).tokens_left == [0, 0]
    denied = await bench.take_all([a, b], cost=3)
    # a: three refills of 1 (10, 20, 30 s); b: one of 3 (20 s)
    assert (denied.admitted, denied.reporting) == (False, 0)
    assert denied.retry_after_seconds == pytest.approx(30.0, abs=1e-3)
    bench.advance(20.0)  # a: 2, b: 3
    denied = await bench.take_all([a, b], cost=3)
    assert (denied.admitted, denied.tokens_left, denied.reporting) == (False, [2, 3], 0)
    assert denied.retry_after_seconds == pytest.approx(10.0, abs=1e-3)
    bench.advance(10.0)
    assert (await bench.take_all([a, b], cost=3)).tokens_left == [0, 0]


# --------------------------------------------------------------------------- queue reservations


async def test_a_reservation_within_max_wait_is_admitted_with_its_delay(bench: Bench) -> None:
    limit = bench.limit(10.0, 2, 2)
    assert await bench.drain(limit) == 2
    bench.advance(4.0)  # the next refill (2 tokens) in 6 s
    for left in (-1, -2):
        result = await bench.take_all([limit], max_wait=15.0)
        assert (result.admitted, result.tokens_left) == (True, [left])
        assert result.delay_seconds == pytest.approx(6.0, abs=1e-3)
    assert await bench.tokens(limit) == -2  # reserved: the bucket is below zero
    # The next needs 3 tokens: two refills, 16 s away, past max_wait.
    denied = await bench.take_all([limit], max_wait=15.0)
    assert (denied.admitted, denied.tokens_left) == (False, [-2])
    assert denied.retry_after_seconds == pytest.approx(16.0, abs=1e-3)
    assert denied.delay_seconds == 0
    result = await bench.take_all([limit], max_wait=16.0)  # exactly max_wait: admitted
    assert (result.admitted, result.tokens_left) == (True, [-3])
    assert result.delay_seconds == pytest.approx(16.0, abs=1e-3)
    # The refills pay the reservations back before anyone else gets a token.
    bench.advance(6.0)
    denied = await bench.take(limit)
    assert (denied.admitted, denied.tokens_left) == (False, [-1])
    assert denied.retry_after_seconds == pytest.approx(10.0, abs=1e-3)
    bench.advance(10.0)
    result = await bench.take(limit)
    assert (result.admitted, result.tokens_left, result.delay_seconds) == (True, [0], 0)


async def test_without_max_wait_nothing_is_reserved(bench: Bench) -> None:
    limit = bench.limit(10.0, 1, 1)
    assert await bench.drain(limit) == 1
    for _ in range(3):
        denied = await bench.take_all([limit])
        assert (denied.admitted, denied.tokens_left, denied.delay_seconds) == (False, [0], 0)
    assert await bench.tokens(limit) == 0


async def test_a_reservation_over_several_limits_waits_for_the_last(bench: Bench) -> None:
    roomy, tight = bench.limit(60.0, 1, 5, "roomy"), bench.limit(10.0, 1, 1, "tight")
    assert (await bench.take_all([roomy, tight])).tokens_left == [4, 0]
    bench.advance(5.0)
    result = await bench.take_all([roomy, tight], max_wait=5.0)
    assert (result.admitted, result.tokens_left, result.reporting) == (True, [3, -1], 1)
    assert result.delay_seconds == pytest.approx(5.0, abs=1e-3)
    # tight now needs 2 refills (15 s): past max_wait, and nothing is taken.
    denied = await bench.take_all([roomy, tight], max_wait=5.0)
    assert (denied.admitted, denied.tokens_left, denied.reporting) == (False, [3, -1], 1)
    assert denied.retry_after_seconds == pytest.approx(15.0, abs=1e-3)
    assert [await bench.tokens(roomy), await bench.tokens(tight)] == [3, -1]


# --------------------------------------------------------------------------- giving back


async def test_give_back_returns_tokens_capped_at_max(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 5)
    for _ in range(3):
        await bench.take(limit)
    await bench.give_back([limit], 2)
    assert await bench.tokens(limit) == 4
    await bench.give_back([limit], 5)
    assert await bench.tokens(limit) == 5  # capped
    assert await bench.drain(limit) == 5


async def test_give_back_to_every_limit_of_a_request(bench: Bench) -> None:
    a, b = bench.limit(60.0, 1, 5, "a"), bench.limit(60.0, 1, 3, "b")
    assert (await bench.take_all([a, b], cost=2)).tokens_left == [3, 1]
    await bench.give_back([a, b], 1)
    assert [await bench.tokens(a), await bench.tokens(b)] == [4, 2]
    await bench.give_back([a, b], 5)
    assert [await bench.tokens(a), await bench.tokens(b)] == [5, 3]


async def test_a_reservation_given_back_frees_its_tokens(bench: Bench) -> None:
    limit = bench.limit(10.0, 1, 1)
    assert await bench.drain(limit) == 1
    assert (await bench.take_all([limit], max_wait=10.0)).tokens_left == [-1]
    await bench.give_back([limit], 1)  # the client left while queued
    assert await bench.tokens(limit) == 0
    bench.advance(10.0)
    assert await bench.drain(limit) == 1  # the refill is not spent on the leaver


async def test_give_back_to_a_full_or_missing_bucket_changes_nothing(bench: Bench) -> None:
    limit = bench.limit(60.0, 1, 5)
    await bench.give_back([limit], 1)  # the barrier's bucket, so it is held from here on
    held = bench.held()
    await bench.give_back([limit], 3, ("default", "never-seen"))
    assert bench.held() == held  # no bucket made for it
    assert await bench.tokens(limit, ("default", "never-seen")) == 5
    assert (await bench.take(limit)).tokens_left == [4]
    bench.advance(60.0)  # full again
    await bench.give_back([limit], 2)
    assert await bench.tokens(limit) == 5
    assert await bench.drain(limit) == 5


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
                    (t.admitted, t.tokens_left[0], t.retry_after_seconds, t.to_next_seconds[0])
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


MULTI_SPECS = [(60.0, 1, 3), (60.0, 5, 10), (120.0, 2, 4), (300.0, 10, 30), (180.0, 3, 6)]
MULTI_ROUTES = {"default": 1, "/api": 2, "/search": 3}  # route: how many limits


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_both_stores_answer_a_random_multi_limit_history_alike(
    request: pytest.FixtureRequest, seed: int
) -> None:
    """Requests over one to three limits, with a cost of 1 to 3 and a
    max_wait (or none), give-backs, reads, time steps and reloads of one
    limit of a route, drawn at random and sent to both stores: every answer
    must be the same, and no request is delayed past its max_wait. Steps are
    multiples of 5 s and periods at least 60 s, as above. Reloads keep each
    limit's max_tokens: raising it is where the stores part, by design, for
    a bucket full under the old limit (Redis deletes a full bucket, so it
    comes back at the new max; the memory store keeps it at the old max
    until it forgets it); the single-limit history and the reload tests
    above raise and lower it."""
    rng = random.Random(seed)
    clients = ["a", "b"]
    delayed = denied = 0
    async with open_bench("memory", request) as memory, open_bench("redis", request) as shared:
        benches = (memory, shared)
        current = {
            route: [rng.choice(MULTI_SPECS) for _ in range(n)]
            for route, n in MULTI_ROUTES.items()
        }

        def build(route: str) -> list[list[Limit]]:
            return [
                [b.limit(*spec, name=f"l{i}") for i, spec in enumerate(current[route])]
                for b in benches
            ]

        limits = {route: build(route) for route in MULTI_ROUTES}
        for step in range(500):
            action = rng.random()
            route = rng.choice(list(MULTI_ROUTES))
            key = (route, rng.choice(clients))
            pair = list(zip(benches, limits[route], strict=True))
            where = (step, current[route])
            if action < 0.55:
                cost = rng.choice([1, 1, 1, 2, 3])
                max_wait = rng.choice([0.0, 0.0, 30.0, 90.0])
                taken = [await b.take_all(ls, key, cost, max_wait) for b, ls in pair]
                one, other = taken
                got = [(t.admitted, t.tokens_left, t.reporting) for t in taken]
                assert got[0] == got[1], (where, cost, max_wait, got)
                assert one.to_next_seconds == pytest.approx(other.to_next_seconds, abs=1e-3)
                assert one.delay_seconds == pytest.approx(other.delay_seconds, abs=1e-3), where
                if not one.admitted:
                    assert one.retry_after_seconds == pytest.approx(
                        other.retry_after_seconds, abs=1e-3
                    ), where
                for t in taken:
                    if t.admitted:
                        assert 0 <= t.delay_seconds <= max_wait, where
                        if t.delay_seconds == 0:
                            assert min(t.tokens_left) >= 0, where
                    else:
                        assert t.delay_seconds == 0, where
                        assert t.retry_after_seconds > max_wait, where
                delayed += one.delay_seconds > 0
                denied += not one.admitted
            elif action < 0.65:
                cost = rng.randint(1, 3)
                for b, ls in pair:
                    await b.give_back(ls, cost, key)
            elif action < 0.75:
                seen = [[await b.tokens(limit, key) for limit in ls] for b, ls in pair]
                assert seen[0] == seen[1], (where, seen)
            elif action < 0.92:
                step_seconds = 5.0 * rng.randint(1, 30)
                for b in benches:
                    b.advance(step_seconds)
            else:  # a new period and refill for one limit, its max_tokens kept
                at = rng.randrange(len(current[route]))
                top = current[route][at][2]
                period = rng.choice([60.0, 120.0, 180.0, 300.0])
                current[route][at] = (period, rng.randint(1, top), top)
                limits[route] = build(route)
    assert delayed > 0  # the history did reserve
    assert denied > 0
