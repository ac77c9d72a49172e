"""The seam between the limiter and a bucket backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.limiting.policy import BucketKey, Limit

__all__ = ["BucketKey", "BucketSnapshot", "BucketStore", "TakeResult"]


class TakeResult:
    """What a store answers for one request over all of its limits.

    ``admitted``: every limit held ``cost`` tokens and gave them, or (with a
    queue) reserved them: then ``delay_seconds`` is how long until the last
    of them is there. ``tokens_left[i]`` and ``to_next_seconds[i]`` are limit
    i's tokens after the take and the time to its next refill.
    ``retry_after_seconds``: a denied request's time until every limit would
    admit it. ``reporting``: the limit the single-limit headers describe,
    the one that denied, else the one with the fewest tokens left."""

    __slots__ = ("admitted", "delay_seconds", "reporting", "retry_after_seconds",
                 "to_next_seconds", "tokens_left")  # fmt: skip

    def __init__(
        self,
        admitted: bool,
        tokens_left: list[int],
        to_next_seconds: list[float],
        retry_after_seconds: float,
        reporting: int,
        delay_seconds: float = 0.0,
    ) -> None:
        self.admitted = admitted
        self.tokens_left = tokens_left
        self.to_next_seconds = to_next_seconds
        self.retry_after_seconds = retry_after_seconds
        self.reporting = reporting
        self.delay_seconds = delay_seconds


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """A bucket as ``/admin/clients/{id}`` shows it. ``held``: the store
    holds this bucket; when False it shows what a first request would find
    (a full bucket)."""

    route: str
    policy: str
    tokens: int
    max_tokens: int
    refill_tokens: int
    refill_period_seconds: float
    next_refill_seconds: float
    key: str = ""
    held: bool = True


class BucketStore(Protocol):
    """What the limiter needs from a backend. A request names the buckets
    of every limit it must pass (``keys[i]`` under ``limits[i]``) and the
    ``cost`` it takes from each: all admit and give their tokens together,
    or none gives any (atomic). With ``max_wait_seconds`` a request that
    finds too few tokens, but whose tokens will be there within it, reserves
    them (the buckets go below zero) and is admitted with a delay. Shadow
    mode takes tokens too, so its would-deny count is what enforce mode
    would deny."""

    async def take(
        self,
        keys: Sequence[BucketKey],
        limits: Sequence[Limit],
        cost: int = 1,
        max_wait_seconds: float = 0.0,
    ) -> TakeResult: ...

    def take_now(
        self,
        keys: Sequence[BucketKey],
        limits: Sequence[Limit],
        cost: int = 1,
        max_wait_seconds: float = 0.0,
    ) -> TakeResult | None:
        """``take`` without waiting: None when the answer needs I/O (then
        nothing was taken and the caller awaits ``take``)."""
        ...

    def give_back(self, keys: Sequence[BucketKey], limits: Sequence[Limit], cost: int) -> None:
        """Return ``cost`` tokens to each bucket (capped at its max): a
        reservation its client left, or an answer ``count_statuses`` does
        not charge. Fire and forget: a failure loses the refund, nothing else."""
        ...

    async def snapshot(self, key: BucketKey, limit: Limit) -> BucketSnapshot:
        """``key``'s bucket as a request would find it now, nothing taken.
        Raises StorageError when the backend cannot be read."""
        ...

    @property
    def tracked(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    async def close(self) -> None: ...
