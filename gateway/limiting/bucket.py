"""Pure token-bucket arithmetic. No I/O, no clock reads: time arrives as ticks.

A *tick* is one ``refill_period`` of the refill clock. A bucket remembers its
tokens and the tick it was last brought up to date; tokens owed since then are
added lazily when the bucket is next touched, so refilling costs nothing for a
client that sends nothing (its bucket is just not looked at).
"""

from __future__ import annotations

__all__ = ["Bucket", "is_full", "refill", "seconds_until", "take"]


class Bucket:
    """One client's bucket on one route. Slotted: there may be 100,000."""

    __slots__ = ("seen", "spec", "tick", "tokens")

    def __init__(self, tokens: int, tick: int, seen: int, spec: object) -> None:
        self.tokens = tokens
        self.tick = tick
        # Coarse clock second of the last request: orders idle eviction.
        self.seen = seen
        # The BucketSpec the tokens were counted under: a reload that changes
        # the limit is noticed on the next request (memory_store.take).
        self.spec = spec


def refill(bucket: Bucket, tick: int, refill_tokens: int, max_tokens: int) -> None:
    """Add the tokens owed for the ticks since ``bucket.tick``, capped."""
    owed = tick - bucket.tick
    if owed > 0:
        tokens = bucket.tokens + owed * refill_tokens
        bucket.tokens = tokens if tokens < max_tokens else max_tokens
        bucket.tick = tick


def take(bucket: Bucket, tick: int, refill_tokens: int, max_tokens: int) -> bool:
    """Refill, then take one token if there is one. True when admitted."""
    refill(bucket, tick, refill_tokens, max_tokens)
    if bucket.tokens > 0:
        bucket.tokens -= 1
        return True
    return False


def is_full(bucket: Bucket, tick: int, refill_tokens: int, max_tokens: int) -> bool:
    """A full bucket is indistinguishable from a missing one: forgetting it loses
    nothing."""
    return bucket.tokens + (tick - bucket.tick) * refill_tokens >= max_tokens


def seconds_until(
    tokens: int, cost: int, refill_tokens: int, period_seconds: float, to_next_seconds: float
) -> float:
    """Seconds until a bucket holding ``tokens`` holds ``cost`` (0 when it
    does already), ``to_next_seconds`` being the time to its next refill."""
    missing = cost - tokens
    if missing <= 0:
        return 0.0
    ticks = -(-missing // refill_tokens)
    return to_next_seconds + (ticks - 1) * period_seconds
