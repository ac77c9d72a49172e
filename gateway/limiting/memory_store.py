"""In-process buckets: a bounded table ordered by last use.

The table is a plain dict kept in least-recently-seen order (a touched bucket
is popped and re-inserted at the end). It never holds more than
``max_tracked`` buckets. When a new client needs room, a full bucket near the
old end is forgotten first (a full bucket equals a missing one: nothing is
lost, ``reason="idle"``); only when none of the oldest ``EVICTION_SCAN`` is full
is the least recently seen one dropped (``reason="pressure"``: that client's
drained bucket is forgotten, the one way a client gains tokens early).
Once a second the refill clock lets the table forget full buckets untouched
for ``idle_timeout``; the sweep stops at the first recently-seen bucket, so its
cost follows the clients leaving, not the clients held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import islice
from typing import Final

from gateway.config.model import BucketSpec
from gateway.limiting.bucket import Bucket, is_full, refill, seconds_until
from gateway.limiting.policy import Limit
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.store import BucketKey, BucketSnapshot, TakeResult

__all__ = ["EVICTION_SCAN", "MemoryStore"]

# How many of the least recently seen buckets are checked for a full one
# before a drained one is evicted: bounds the work of one insertion.
EVICTION_SCAN: Final = 32
# Most buckets one idle sweep looks at: bounds the stall of one clock tick.
IDLE_SWEEP_BATCH: Final = 10_000


class MemoryStore:
    """Buckets in this process: bounded by ``max_tracked`` (full buckets are
    forgotten first, then the least recently seen), idle full ones dropped
    after ``idle_timeout``; refilled from the one refill clock."""

    def __init__(
        self,
        clock: RefillClock,
        max_tracked: int,
        idle_timeout_seconds: float,
        on_evict: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._clock = clock
        self._buckets: dict[BucketKey, Bucket] = {}
        self.max_tracked = max_tracked
        self.idle_timeout_seconds = idle_timeout_seconds
        self._on_evict = on_evict
        clock.on_second(self._sweep_idle)

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def take(
        self,
        keys: Sequence[BucketKey],
        limits: Sequence[Limit],
        cost: int = 1,
        max_wait_seconds: float = 0.0,
    ) -> TakeResult:
        return self.take_now(keys, limits, cost, max_wait_seconds)

    def take_now(
        self,
        keys: Sequence[BucketKey],
        limits: Sequence[Limit],
        cost: int = 1,
        max_wait_seconds: float = 0.0,
    ) -> TakeResult:
        clock = self._clock
        if len(keys) == 1:  # the common case, without the loops' lists
            limit = limits[0]
            spec = limit.spec
            bucket = self._bucket(keys[0], limit)
            to_next = clock.seconds_to_next(limit.ticker)
            tokens = bucket.tokens
            if tokens >= cost:
                bucket.tokens = tokens - cost
                return TakeResult(True, [tokens - cost], [to_next], to_next, 0)
            # seconds_until, inlined for the one-limit request
            ticks = -(-(cost - tokens) // spec.refill_tokens)
            wait = to_next + (ticks - 1) * spec.refill_period_seconds
            if wait <= max_wait_seconds:
                bucket.tokens = tokens - cost
                return TakeResult(True, [tokens - cost], [to_next], wait, 0, wait)
            return TakeResult(False, [tokens], [to_next], wait, 0)
        # keys: making room for one of them must not evict another
        buckets = [
            self._bucket(key, limit, keys) for key, limit in zip(keys, limits, strict=True)
        ]
        to_next_all = [clock.seconds_to_next(limit.ticker) for limit in limits]
        waits = [
            seconds_until(
                bucket.tokens, cost, limit.spec.refill_tokens,
                limit.spec.refill_period_seconds, to_next,
            )
            for bucket, limit, to_next in zip(buckets, limits, to_next_all, strict=True)
        ]  # fmt: skip
        wait = max(waits)
        if wait <= max_wait_seconds:
            for bucket in buckets:
                bucket.tokens -= cost
            left = [bucket.tokens for bucket in buckets]
            reporting = left.index(min(left))
            return TakeResult(True, left, to_next_all, wait, reporting, wait)
        left = [bucket.tokens for bucket in buckets]
        return TakeResult(False, left, to_next_all, wait, waits.index(wait))

    def _bucket(self, key: BucketKey, limit: Limit, keep: Sequence[BucketKey] = ()) -> Bucket:
        """``key``'s bucket brought up to date, as the most recently seen.
        ``keep``: the request's other buckets, which room is not made from."""
        spec = limit.spec
        tick = limit.ticker.count
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            if len(buckets) >= self.max_tracked:
                self._make_room(keep)
            bucket = Bucket(spec.max_tokens, tick, self._clock.seconds, spec)
        else:
            if bucket.spec is not spec:
                self._respec(bucket, spec, tick)
            bucket.seen = self._clock.seconds
            refill(bucket, tick, spec.refill_tokens, spec.max_tokens)
        buckets[key] = bucket
        return bucket

    def give_back(self, keys: Sequence[BucketKey], limits: Sequence[Limit], cost: int) -> None:
        for key, limit in zip(keys, limits, strict=True):
            bucket = self._buckets.get(key)
            if bucket is None:  # forgotten full: nothing to give back to
                continue
            spec = limit.spec
            if bucket.spec is not spec:
                self._respec(bucket, spec, limit.ticker.count)
            refill(bucket, limit.ticker.count, spec.refill_tokens, spec.max_tokens)
            bucket.tokens = min(spec.max_tokens, bucket.tokens + cost)

    def _respec(self, bucket: Bucket, spec: BucketSpec, tick: int) -> None:
        """A reload gave this (route, client) a new spec object. Equal values:
        keep the tokens. Changed values: the new limit applies from now on,
        without handing out tokens the old one had not refilled."""
        old = bucket.spec
        if isinstance(old, BucketSpec):  # settle what the old limit owed
            old_tick = self._clock.ticker(old.refill_period_seconds).count
            refill(bucket, old_tick, old.refill_tokens, old.max_tokens)
        bucket.tick = tick
        bucket.tokens = min(bucket.tokens, spec.max_tokens)
        bucket.spec = spec

    def _make_room(self, keep: Sequence[BucketKey] = ()) -> None:
        """Forget one bucket, never one of ``keep`` (the request's own, fetched
        before it takes from them: one forgotten would lose that take). Only
        when ``max_tracked`` is below a route's number of limits is there none
        to forget; the table then holds as many as that request has."""
        buckets = self._buckets
        for key in islice(buckets, EVICTION_SCAN):
            if key not in keep and self._is_full(buckets[key]):
                del buckets[key]
                self._on_evict("idle")
                return
        for key in buckets:
            if key not in keep:
                del buckets[key]
                self._on_evict("pressure")
                return

    def _is_full(self, bucket: Bucket) -> bool:
        spec = bucket.spec
        assert isinstance(spec, BucketSpec)
        tick = self._clock.ticker(spec.refill_period_seconds).count
        return is_full(bucket, tick, spec.refill_tokens, spec.max_tokens)

    def _sweep_idle(self, seconds: int) -> None:
        cutoff = seconds - self.idle_timeout_seconds
        buckets = self._buckets
        idle: list[BucketKey] = []
        for key in islice(buckets, IDLE_SWEEP_BATCH):
            bucket = buckets[key]
            if bucket.seen > cutoff:
                break  # everything after this was seen more recently
            if self._is_full(bucket):
                idle.append(key)
        for key in idle:
            del buckets[key]
            self._on_evict("idle")

    async def snapshot(self, key: BucketKey, limit: Limit) -> BucketSnapshot:
        bucket = self._buckets.get(key)
        spec = limit.spec
        if bucket is None:
            tokens = spec.max_tokens
        else:  # what take_now would find, settled on a copy
            settled = Bucket(bucket.tokens, bucket.tick, bucket.seen, bucket.spec)
            if settled.spec is not spec:
                self._respec(settled, spec, limit.ticker.count)
            refill(settled, limit.ticker.count, spec.refill_tokens, spec.max_tokens)
            tokens = settled.tokens
        return BucketSnapshot(
            route=key[0],
            policy=limit.name,
            key=key[2],
            tokens=tokens,
            max_tokens=spec.max_tokens,
            refill_tokens=spec.refill_tokens,
            refill_period_seconds=spec.refill_period_seconds,
            next_refill_seconds=round(self._clock.seconds_to_next(limit.ticker), 3),
            held=bucket is not None,
        )
