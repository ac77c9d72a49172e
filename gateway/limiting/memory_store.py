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

from collections.abc import Callable
from itertools import islice
from typing import Final

from gateway.config.model import BucketSpec
from gateway.limiting.bucket import Bucket, is_full, refill, take
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

    async def take(self, key: BucketKey, limit: Limit) -> TakeResult:
        return self.take_now(key, limit)

    def take_now(self, key: BucketKey, limit: Limit) -> TakeResult:
        spec = limit.spec
        tick = limit.ticker.count
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            if len(buckets) >= self.max_tracked:
                self._make_room()
            bucket = Bucket(spec.max_tokens, tick, self._clock.seconds, spec)
        else:
            if bucket.spec is not spec:
                self._respec(bucket, spec, tick)
            bucket.seen = self._clock.seconds
        buckets[key] = bucket
        admitted = take(bucket, tick, spec.refill_tokens, spec.max_tokens)
        return self._result(admitted, bucket.tokens, limit)

    def _result(self, admitted: bool, tokens: int, limit: Limit) -> TakeResult:
        to_next = self._clock.seconds_to_next(limit.ticker)
        reset = 0.0 if tokens >= limit.spec.max_tokens else to_next
        return TakeResult(admitted, tokens, to_next, reset)

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

    def _make_room(self) -> None:
        buckets = self._buckets
        for key in islice(buckets, EVICTION_SCAN):
            if self._is_full(buckets[key]):
                del buckets[key]
                self._on_evict("idle")
                return
        del buckets[next(iter(buckets))]
        self._on_evict("pressure")

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

    async def snapshot(self, key: BucketKey, limit: Limit) -> BucketSnapshot | None:
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
            policy=spec.name,
            tokens=tokens,
            max_tokens=spec.max_tokens,
            refill_tokens=spec.refill_tokens,
            refill_period_seconds=spec.refill_period_seconds,
            next_refill_seconds=round(self._clock.seconds_to_next(limit.ticker), 3),
        )
