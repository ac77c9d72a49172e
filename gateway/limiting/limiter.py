"""③ Decide: admit or deny one request of one client on one route.

Resolution order for a request's bucket: the route's own ``limit``; else the
client's entry in ``limits.overrides``; else ``limits.default``. Routes with
``limit: unlimited`` have no bucket. Mode (enforce | shadow) only changes what
the caller does with a denial: shadow decides and counts exactly like enforce
(tokens are taken) but lets the request through.
"""

from __future__ import annotations

from typing import Final

from gateway.config.model import GatewayConfig
from gateway.limiting.policy import Limit
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.routes import Route, RouteTable
from gateway.limiting.store import BucketSnapshot, BucketStore, TakeResult

__all__ = ["ALLOWED", "DENIED", "SHADOW_DENIED", "UNLIMITED", "Decision", "Limiter"]

ALLOWED: Final = "allowed"
DENIED: Final = "denied"
SHADOW_DENIED: Final = "shadow_denied"
UNLIMITED: Final = "unlimited"


class Decision:
    """``limit`` is None for unlimited routes; the other fields then mean nothing."""

    __slots__ = (
        "limit",
        "outcome",
        "reset_seconds",
        "retry_after_seconds",
        "tokens_left",
    )

    def __init__(
        self,
        outcome: str,
        limit: Limit | None,
        tokens_left: int,
        retry_after_seconds: float,
        reset_seconds: float,
    ) -> None:
        self.outcome = outcome
        self.limit = limit
        self.tokens_left = tokens_left
        self.retry_after_seconds = retry_after_seconds
        self.reset_seconds = reset_seconds


_UNLIMITED_DECISION: Final = Decision(UNLIMITED, None, 0, 0.0, 0.0)


class Limiter:
    """Built per config snapshot; the store (and so every bucket) outlives it."""

    def __init__(self, config: GatewayConfig, clock: RefillClock, store: BucketStore) -> None:
        self.store = store
        self.routes = RouteTable(config, clock)
        self.default = Limit(config.limits.default, clock)
        self.overrides: dict[str, Limit] = {
            o.client: Limit(o.bucket, clock) for o in config.limits.overrides
        }

    def limit_for(self, route: Route, client: str) -> Limit | None:
        if route.unlimited:
            return None
        if route.limit is not None:
            return route.limit
        return self.overrides.get(client, self.default)

    async def decide(self, route: Route, client: str) -> Decision:
        limit = self.limit_for(route, client)
        if limit is None:
            return _UNLIMITED_DECISION
        result = await self.store.take((route.label, client), limit)
        return self._decision(route, limit, result)

    def decide_now(self, route: Route, client: str) -> Decision | None:
        """``decide`` without waiting; None when the store needs I/O (redis)."""
        limit = self.limit_for(route, client)
        if limit is None:
            return _UNLIMITED_DECISION
        result = self.store.take_now((route.label, client), limit)
        if result is None:
            return None
        return self._decision(route, limit, result)

    def _decision(self, route: Route, limit: Limit, result: TakeResult) -> Decision:
        outcome = ALLOWED if result.admitted else SHADOW_DENIED if route.shadow else DENIED
        return Decision(
            outcome,
            limit,
            result.tokens_left,
            result.retry_after_seconds,
            result.reset_seconds,
        )

    async def client_buckets(self, client: str) -> list[BucketSnapshot]:
        """Every limited route's bucket of ``client`` (full when never seen)."""
        snapshots = []
        for route in (self.routes.default, *self.routes.routes):
            limit = self.limit_for(route, client)
            if limit is None:
                continue
            snapshot = await self.store.snapshot((route.label, client), limit)
            if snapshot is not None:
                snapshots.append(snapshot)
        return snapshots
