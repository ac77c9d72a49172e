"""Token buckets: the pure arithmetic, and the MemoryStore on a ManualRefillClock.

The clock never moves unless a test calls ``clock.advance``; no test sleeps.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.model import BucketSpec
from gateway.limiting.bucket import Bucket, is_full, refill, take
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.policy import Limit
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.limiting.store import BucketKey, TakeResult

SPEC = BucketSpec(refill_period_seconds=1.0, refill_tokens=10, max_tokens=20)
# Refills so rarely that a drained bucket stays drained for the whole test.
SLOW = BucketSpec(refill_period_seconds=3600.0, refill_tokens=1, max_tokens=5, name="slow")


def _store(
    max_tracked: int = 1000, idle_timeout: float = 3600.0
) -> tuple[ManualRefillClock, MemoryStore, list[str]]:
    clock = ManualRefillClock()
    reasons: list[str] = []
    store = MemoryStore(clock, max_tracked, idle_timeout, on_evict=reasons.append)
    return clock, store, reasons


def _key(key: tuple[str, str], limit: Limit) -> BucketKey:
    """The store's bucket key of (route, client) under ``limit`` (per client)."""
    route, client = key
    return (route, limit.name, client, client)


def _take(store: MemoryStore, key: tuple[str, str], limit: Limit) -> TakeResult:
    """One request of ``key``'s client on ``key``'s route, under ``limit`` alone."""
    return store.take_now([_key(key, limit)], [limit])


def _drain(store: MemoryStore, key: tuple[str, str], limit: Limit) -> int:
    """Take until denied; return how many were admitted."""
    admitted = 0
    while _take(store, key, limit).admitted:
        admitted += 1
        assert admitted <= 10_000, "a bucket never ran dry"
    return admitted


async def _tokens(store: MemoryStore, key: tuple[str, str], limit: Limit) -> int:
    snapshot = await store.snapshot(_key(key, limit), limit)
    assert snapshot is not None
    return snapshot.tokens


# -- pure arithmetic --


def test_refill_adds_owed_ticks_and_caps_at_max() -> None:
    bucket = Bucket(tokens=3, tick=5, seen=0, spec=SPEC)
    refill(bucket, 6, refill_tokens=10, max_tokens=20)
    assert (bucket.tokens, bucket.tick) == (13, 6)
    refill(bucket, 8, refill_tokens=10, max_tokens=20)
    assert (bucket.tokens, bucket.tick) == (20, 8)


def test_refill_with_no_ticks_owed_changes_nothing() -> None:
    bucket = Bucket(tokens=3, tick=5, seen=0, spec=SPEC)
    refill(bucket, 5, 10, 20)
    assert (bucket.tokens, bucket.tick) == (3, 5)
    refill(bucket, 4, 10, 20)  # a tick from the past never takes tokens away
    assert (bucket.tokens, bucket.tick) == (3, 5)


def test_take_admits_while_tokens_last() -> None:
    bucket = Bucket(tokens=2, tick=0, seen=0, spec=SPEC)
    assert take(bucket, 0, 10, 20)
    assert take(bucket, 0, 10, 20)
    assert not take(bucket, 0, 10, 20)
    assert not take(bucket, 0, 10, 20)
    assert bucket.tokens == 0
    assert take(bucket, 1, 10, 20)  # refilled first, then taken
    assert bucket.tokens == 9


def test_is_full_counts_owed_ticks() -> None:
    bucket = Bucket(tokens=0, tick=0, seen=0, spec=SPEC)
    assert not is_full(bucket, 0, 10, 20)
    assert not is_full(bucket, 1, 10, 20)
    assert is_full(bucket, 2, 10, 20)
    assert is_full(Bucket(20, 0, 0, SPEC), 0, 10, 20)
    assert not is_full(Bucket(19, 0, 0, SPEC), 0, 10, 20)


@given(
    refill_tokens=st.integers(1, 20),
    extra=st.integers(0, 30),
    steps=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 25)), max_size=30),
)
def test_pure_bucket_matches_the_model(
    refill_tokens: int, extra: int, steps: list[tuple[int, int]]
) -> None:
    max_tokens = refill_tokens + extra
    bucket = Bucket(max_tokens, 0, 0, SPEC)
    model, tick, admitted = max_tokens, 0, 0
    for ticks, requests in steps:
        tick += ticks
        model = min(max_tokens, model + ticks * refill_tokens)
        for _ in range(requests):
            ok = take(bucket, tick, refill_tokens, max_tokens)
            assert ok == (model > 0)
            if ok:
                model -= 1
                admitted += 1
            assert 0 <= bucket.tokens <= max_tokens
            assert bucket.tokens == model
    assert admitted <= max_tokens + refill_tokens * tick


# -- the manual clock --


@pytest.mark.parametrize("period", [0.01, 0.05, 0.1, 0.2, 0.3, 0.25, 1.0])
def test_manual_clock_counts_one_tick_per_period_advanced(period: float) -> None:
    """Advancing by one period n times is n periods, even when the float sum of the
    periods lands a hair under n * period (the clock's epsilon exists for this)."""
    clock = ManualRefillClock()
    ticker = clock.ticker(period)
    counts = []
    for _ in range(50):
        clock.advance(period)
        counts.append(ticker.count)
    assert counts == list(range(1, 51))


def test_manual_clock_partial_periods_and_time_to_next() -> None:
    clock = ManualRefillClock()
    second = clock.ticker(1.0)
    quarter = clock.ticker(0.25)
    clock.advance(0.6)
    assert (second.count, quarter.count) == (0, 2)
    assert math.isclose(clock.seconds_to_next(second), 0.4)
    assert math.isclose(clock.seconds_to_next(quarter), 0.15)
    clock.advance(0.4)
    assert (second.count, quarter.count) == (1, 4)
    assert clock.seconds == 1
    # A ticker created later counts from the same epoch.
    assert clock.ticker(0.5).count == 2


# -- MemoryStore: one client --


def test_new_bucket_starts_full_and_each_request_takes_one() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    result = _take(store, ("default", "a"), limit)
    assert result.admitted
    assert result.tokens_left[0] == 19
    assert _drain(store, ("default", "a"), limit) == 19
    denied = _take(store, ("default", "a"), limit)
    assert not denied.admitted
    assert denied.tokens_left[0] == 0


def test_refill_every_period_capped_at_max() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    key = ("default", "a")
    assert _drain(store, key, limit) == 20
    clock.advance(0.999)
    assert not _take(store, key, limit).admitted
    clock.advance(0.001)
    assert _drain(store, key, limit) == 10
    clock.advance(5.0)  # five refills owed, capped at max_tokens
    assert _drain(store, key, limit) == 20


async def test_retry_after_is_time_to_next_refill_and_reset_zero_only_when_full() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    clock.advance(0.25)
    result = _take(store, ("default", "a"), limit)
    assert math.isclose(result.retry_after_seconds, 0.75)
    assert math.isclose(result.to_next_seconds[0], 0.75)
    snapshot = await store.snapshot(_key(("default", "a"), limit), limit)
    assert snapshot is not None
    assert (snapshot.tokens, snapshot.max_tokens) == (19, 20)
    assert snapshot.next_refill_seconds == 0.75


def test_each_route_and_client_has_its_own_bucket() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    assert _drain(store, ("default", "a"), limit) == 20
    assert _drain(store, ("/login", "a"), limit) == 20
    assert _drain(store, ("default", "b"), limit) == 20
    assert store.tracked == 3


async def test_snapshot_of_unknown_client_is_full_and_credits_owed_refills() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    assert await _tokens(store, ("default", "new"), limit) == 20
    assert store.tracked == 0  # looking does not create a bucket
    _drain(store, ("default", "a"), limit)
    assert await _tokens(store, ("default", "a"), limit) == 0
    clock.advance(1.0)
    assert await _tokens(store, ("default", "a"), limit) == 10


async def test_async_take_is_take_now() -> None:
    clock, store, _ = _store()
    limit = Limit(SPEC, clock)
    result = await store.take([_key(("default", "a"), limit)], [limit])
    assert (result.admitted, result.tokens_left[0]) == (True, 19)


# -- properties: exactness under continuous demand, bounds under any interleaving --

# Binary fractions: sums of these are exact, so the properties test the buckets, not
# float rounding (test_manual_clock_counts_one_tick_per_period_advanced does that).
PERIODS = st.sampled_from([0.125, 0.25, 0.5, 1.0, 60.0])


@settings(deadline=None)
@given(
    period=PERIODS,
    refill_tokens=st.integers(1, 15),
    extra=st.integers(0, 20),
    ticks=st.integers(0, 25),
)
def test_continuous_demand_admits_max_plus_refill_per_tick(
    period: float, refill_tokens: int, extra: int, ticks: int
) -> None:
    spec = BucketSpec(period, refill_tokens, refill_tokens + extra)
    clock, store, _ = _store()
    limit = Limit(spec, clock)
    key = ("default", "a")
    admitted = _drain(store, key, limit)
    for _ in range(ticks):
        clock.advance(period)
        admitted += _drain(store, key, limit)
    assert limit.ticker.count == ticks
    assert admitted == spec.max_tokens + spec.refill_tokens * ticks


def test_continuous_demand_with_a_decimal_period_loses_no_refill() -> None:
    """Contract: admitted == max_tokens + refill_tokens * floor(T / refill_period)."""
    clock, store, _ = _store()
    limit = Limit(BucketSpec(0.1, 5, 5), clock)
    key = ("default", "a")
    admitted = _drain(store, key, limit)
    for _ in range(20):
        clock.advance(0.1)
        admitted += _drain(store, key, limit)
    assert admitted == 5 + 5 * 20


Step = tuple[str, int]
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(0, 30)),
        # advance by a whole number of quarter periods (so whole and partial periods)
        st.tuples(st.just("advance"), st.integers(0, 12)),
    ),
    max_size=40,
)


@settings(deadline=None)
@given(
    period=PERIODS,
    refill_tokens=st.integers(1, 15),
    extra=st.integers(0, 20),
    steps=STEPS,
)
def test_any_interleaving_stays_within_bounds(
    period: float, refill_tokens: int, extra: int, steps: list[Step]
) -> None:
    spec = BucketSpec(period, refill_tokens, refill_tokens + extra)
    clock, store, _ = _store()
    limit = Limit(spec, clock)
    key = ("default", "a")
    model = spec.max_tokens
    quarters = Fraction(0)
    ticks = 0
    admitted = 0
    for action, n in steps:
        if action == "advance":
            clock.advance(n * period / 4)
            quarters += n
            new_ticks = math.floor(quarters / 4)
            assert limit.ticker.count == new_ticks
            model = min(spec.max_tokens, model + (new_ticks - ticks) * refill_tokens)
            ticks = new_ticks
            continue
        for _ in range(n):
            result = _take(store, key, limit)
            assert result.admitted == (model > 0)
            if result.admitted:
                model -= 1
                admitted += 1
            assert result.tokens_left[0] == model
            assert 0 <= result.tokens_left[0] <= spec.max_tokens
        assert admitted <= spec.max_tokens + spec.refill_tokens * ticks


# -- the max_tracked bound --


def test_table_never_exceeds_max_tracked() -> None:
    clock, store, reasons = _store(max_tracked=10)
    fast, slow = Limit(SPEC, clock), Limit(SLOW, clock)
    for i in range(200):
        _take(store, ("default", f"c{i}"), slow if i % 3 else fast)
        assert store.tracked <= 10
        if i % 7 == 0:
            clock.advance(1.0)
    assert store.tracked == 10
    assert len(reasons) == 190
    assert set(reasons) <= {"idle", "pressure"}


async def test_full_bucket_is_evicted_first_with_reason_idle() -> None:
    clock, store, reasons = _store(max_tracked=3)
    fast, slow = Limit(SPEC, clock), Limit(SLOW, clock)
    _take(store, ("default", "a"), slow)  # oldest, drained by one, stays short
    _take(store, ("default", "b"), fast)
    _take(store, ("default", "c"), slow)
    clock.advance(1.0)  # b is full again; a and c are not
    _take(store, ("default", "d"), slow)
    assert reasons == ["idle"]
    assert store.tracked == 3
    # a and c kept their (short) buckets; b's was forgotten, which loses nothing.
    assert await _tokens(store, ("default", "a"), slow) == 4
    assert await _tokens(store, ("default", "c"), slow) == 4
    assert await _tokens(store, ("default", "b"), fast) == 20


async def test_least_recently_seen_is_evicted_under_pressure() -> None:
    clock, store, reasons = _store(max_tracked=3)
    slow = Limit(SLOW, clock)
    for client in ("a", "b", "c"):
        _drain(store, ("default", client), slow)
    _take(store, ("default", "a"), slow)  # a is now the most recently seen
    _take(store, ("default", "d"), slow)
    assert reasons == ["pressure"]
    assert store.tracked == 3
    # b, the least recently seen, was forgotten: its next request finds a full bucket.
    assert await _tokens(store, ("default", "b"), slow) == 5
    assert await _tokens(store, ("default", "a"), slow) == 0
    assert await _tokens(store, ("default", "c"), slow) == 0
    assert await _tokens(store, ("default", "d"), slow) == 4


def test_existing_clients_do_not_evict() -> None:
    clock, store, reasons = _store(max_tracked=2)
    slow = Limit(SLOW, clock)
    for _ in range(3):
        for client in ("a", "b"):
            _take(store, ("default", client), slow)
    assert reasons == []
    assert store.tracked == 2


# -- the idle sweep --


def test_full_idle_bucket_is_forgotten_after_idle_timeout() -> None:
    clock, store, reasons = _store(idle_timeout=10.0)
    limit = Limit(SPEC, clock)
    _take(store, ("default", "a"), limit)
    clock.advance(9.0)
    assert store.tracked == 1
    assert reasons == []
    clock.advance(2.0)
    assert store.tracked == 0
    assert reasons == ["idle"]


def test_drained_bucket_is_kept_past_idle_timeout_until_full() -> None:
    clock, store, reasons = _store(idle_timeout=10.0)
    limit = Limit(BucketSpec(60.0, 5, 5), clock)
    _drain(store, ("default", "a"), limit)
    clock.advance(30.0)
    assert store.tracked == 1  # forgetting it would hand out tokens early
    assert reasons == []
    clock.advance(31.0)  # refilled at 60 s: full, and idle since 0 s
    assert store.tracked == 0
    assert reasons == ["idle"]


def test_idle_sweep_respects_each_clients_last_request() -> None:
    clock, store, reasons = _store(idle_timeout=10.0)
    limit = Limit(SPEC, clock)
    _take(store, ("default", "a"), limit)
    clock.advance(5.0)
    _take(store, ("default", "b"), limit)
    clock.advance(3.0)
    _take(store, ("default", "a"), limit)  # a seen at 8 s, b at 5 s
    clock.advance(8.0)  # 16 s: b idle 11 s, a idle 8 s
    assert store.tracked == 1
    assert reasons == ["idle"]
    _take(store, ("default", "b"), limit)  # b was the one forgotten: a new bucket
    assert store.tracked == 2
    clock.advance(3.0)  # 19 s: a idle 11 s, b idle 3 s
    assert store.tracked == 1
    assert reasons == ["idle", "idle"]


def test_idle_sweep_runs_once_per_clock_second_without_requests() -> None:
    clock, store, reasons = _store(idle_timeout=2.0)
    limit = Limit(SPEC, clock)
    for i in range(5):
        _take(store, ("default", f"c{i}"), limit)
    for _ in range(3):
        clock.advance(1.0)
    assert store.tracked == 0
    assert reasons == ["idle"] * 5


# -- a reload that changes the spec --


def test_reload_lowering_max_clamps_tokens() -> None:
    clock, store, _ = _store()
    key = ("default", "a")
    old = Limit(SPEC, clock)
    for _ in range(5):
        _take(store, key, old)  # 15 left
    new = Limit(BucketSpec(1.0, 2, 4), clock)
    result = _take(store, key, new)
    assert result.admitted
    assert result.tokens_left[0] == 3  # clamped to 4, then one taken
    clock.advance(1.0)
    assert _drain(store, key, new) == 4  # +2, capped at the new max


def test_reload_raising_max_does_not_hand_out_tokens() -> None:
    clock, store, _ = _store()
    key = ("default", "a")
    old = Limit(SPEC, clock)
    _drain(store, key, old)
    new = Limit(BucketSpec(1.0, 10, 100), clock)
    assert not _take(store, key, new).admitted
    clock.advance(1.0)
    assert _drain(store, key, new) == 10


def test_reload_with_equal_values_keeps_tokens_and_owed_refills() -> None:
    clock, store, _ = _store()
    key = ("default", "a")
    old = Limit(SPEC, clock)
    _drain(store, key, old)
    clock.advance(1.0)
    # A reload parses a new, equal BucketSpec object.
    new = Limit(BucketSpec(1.0, 10, 20), clock)
    assert new.spec is not old.spec
    assert _drain(store, key, new) == 10


def test_reload_with_new_period_does_not_refill_early() -> None:
    clock, store, _ = _store()
    key = ("default", "a")
    old = Limit(SPEC, clock)
    _drain(store, key, old)
    clock.advance(0.6)
    new = Limit(BucketSpec(0.5, 10, 20), clock)  # its ticker already counts 1
    assert not _take(store, key, new).admitted
    clock.advance(0.4)
    assert _drain(store, key, new) == 10


def test_reload_with_new_period_keeps_refills_already_owed() -> None:
    """A client drained at 0 s and idle for 5 s is owed a full bucket under the old
    limit (1 s period) and would have a full one under the new (2 s period). A
    reload must not turn that into a 429."""
    clock, store, _ = _store()
    key = ("default", "a")
    old = Limit(SPEC, clock)
    _drain(store, key, old)
    clock.advance(5.0)
    new = Limit(BucketSpec(2.0, 10, 20), clock)
    result = _take(store, key, new)
    assert result.admitted
    assert result.tokens_left[0] == 19
