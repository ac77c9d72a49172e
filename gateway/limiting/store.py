"""The seam between the limiter and a bucket backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.limiting.policy import Limit

__all__ = ["BucketKey", "BucketSnapshot", "BucketStore", "TakeResult"]

# (route label, client id): each pair has its own bucket.
BucketKey = tuple[str, str]


class TakeResult:
    """What a store answers for one request. ``retry_after_seconds`` is the time
    to the next refill; ``reset_seconds`` the same, or 0 when the bucket is full
    (there is nothing to wait for)."""

    __slots__ = ("admitted", "reset_seconds", "retry_after_seconds", "tokens_left")

    def __init__(
        self,
        admitted: bool,
        tokens_left: int,
        retry_after_seconds: float,
        reset_seconds: float,
    ) -> None:
        self.admitted = admitted
        self.tokens_left = tokens_left
        self.retry_after_seconds = retry_after_seconds
        self.reset_seconds = reset_seconds


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """A bucket as ``/admin/clients/{id}`` shows it."""

    route: str
    policy: str
    tokens: int
    max_tokens: int
    refill_tokens: int
    refill_period_seconds: float
    next_refill_seconds: float


class BucketStore(Protocol):
    """What the limiter needs from a backend. Shadow mode takes tokens too, so
    its would-deny count is what enforce mode would deny."""

    async def take(self, key: BucketKey, limit: Limit) -> TakeResult: ...

    def take_now(self, key: BucketKey, limit: Limit) -> TakeResult | None:
        """``take`` without waiting: None when the answer needs I/O (then
        nothing was taken and the caller awaits ``take``)."""
        ...

    async def snapshot(self, key: BucketKey, limit: Limit) -> BucketSnapshot | None: ...

    @property
    def tracked(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    async def close(self) -> None: ...
