"""③ Decide: admit, delay or deny one request over every limit it must pass.

Resolution order for a request's limits: the route's own ``limit`` (one or a
list); else the client's entry in ``limits.overrides``; else
``limits.default``. Routes with ``limit: unlimited`` have none. Each limit
keys its bucket on what its ``per`` names (the client, its ip network, a
header, the route itself, or a composite of those); a request is admitted
only when every limit holds ``cost`` tokens, and then all are taken together
(the store makes it atomic). Mode (enforce | shadow) only changes what the
caller does with a denial: shadow decides and counts exactly like enforce
(tokens are taken) but lets the request through, without queueing it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.model import BucketSpec, GatewayConfig
from gateway.limiting.policy import Client, Identity, RouteLimits
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.routes import Route, RouteTable
from gateway.limiting.store import BucketKey, BucketSnapshot, BucketStore, TakeResult

__all__ = [
    "ALLOWED",
    "BLOCKED",
    "DELAYED",
    "DENIED",
    "EXEMPT",
    "SHADOW_DENIED",
    "UNLIMITED",
    "Decision",
    "Identity",
    "Limiter",
]

ALLOWED: Final = "allowed"
DENIED: Final = "denied"
SHADOW_DENIED: Final = "shadow_denied"
UNLIMITED: Final = "unlimited"
EXEMPT: Final = "exempt"
BLOCKED: Final = "blocked"
DELAYED: Final = "delayed"


class Decision:
    """``limits`` is None for requests no limit applies to (unlimited routes,
    exempt and blocked clients); ``result`` then means nothing. ``keys``:
    the buckets taken from (``cost`` each), for giving tokens back."""

    __slots__ = ("cost", "keys", "limits", "outcome", "result", "retry_after_seconds",
                 "tokens_left")  # fmt: skip

    def __init__(
        self,
        outcome: str,
        limits: RouteLimits | None,
        result: TakeResult,
        keys: Sequence[BucketKey] = (),
        cost: int = 1,
    ) -> None:
        self.outcome = outcome
        self.limits = limits
        self.result = result
        self.keys = keys
        self.cost = cost
        # What the single-limit headers and the access log report.
        tokens = result.tokens_left[result.reporting]
        self.tokens_left = tokens if tokens > 0 else 0
        self.retry_after_seconds = result.retry_after_seconds

    @property
    def delay_seconds(self) -> float:
        return self.result.delay_seconds


_NO_FIELDS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())
_NO_RESULT: Final = TakeResult(True, [0], [0.0], 0.0, 0)
UNLIMITED_DECISION: Final = Decision(UNLIMITED, None, _NO_RESULT)
EXEMPT_DECISION: Final = Decision(EXEMPT, None, _NO_RESULT)
BLOCKED_DECISION: Final = Decision(BLOCKED, None, _NO_RESULT)


class Limiter:
    """Built per config snapshot; the store (and so every bucket) outlives it."""

    def __init__(self, config: GatewayConfig, clock: RefillClock, store: BucketStore) -> None:
        self.store = store
        self.routes = RouteTable(config, clock)
        self._clock = clock
        self._default = config.limits.default
        self._overrides: dict[str, tuple[BucketSpec, ...]] = {
            o.client: o.buckets for o in config.limits.overrides
        }
        # A route's limits when it has none of its own: limits.default's,
        # built once per route; a client's override's, per (route, client).
        self._defaults = {
            route.key: RouteLimits(route.key, self._default, clock)
            for route in (self.routes.default, *self.routes.routes)
        }
        self._inherited: dict[tuple[str, str], RouteLimits] = {}

    def limits_for(self, route: Route, client: str) -> RouteLimits | None:
        limits = route.limits
        if limits is not None:
            return limits
        if route.unlimited:
            return None
        if self._overrides:
            specs = self._overrides.get(client)
            if specs is not None:
                cached = self._inherited.get((route.key, client))
                if cached is None:
                    cached = RouteLimits(route.key, specs, self._clock)
                    self._inherited[(route.key, client)] = cached
                return cached
        return self._defaults[route.key]

    async def decide(
        self, route: Route, identity: Identity, max_wait_seconds: float = 0.0
    ) -> Decision:
        """``max_wait_seconds``: how long a request may wait for tokens it
        reserves (the route's queue, when it has room)."""
        limits = self.limits_for(route, identity.client)
        if limits is None:
            return UNLIMITED_DECISION
        keys = limits.keys(identity)
        result = await self.store.take(keys, limits.limits, route.cost, max_wait_seconds)
        return self._decision(route, limits, keys, result)

    def decide_now(
        self, route: Route, identity: Identity, max_wait_seconds: float = 0.0
    ) -> Decision | None:
        """``decide`` without waiting; None when the store needs I/O (redis)."""
        limits = self.limits_for(route, identity.client)
        if limits is None:
            return UNLIMITED_DECISION
        keys = limits.keys(identity)
        result = self.store.take_now(keys, limits.limits, route.cost, max_wait_seconds)
        if result is None:
            return None
        # _decision, inlined: this runs on every request of the memory store.
        if result.admitted:
            outcome = DELAYED if result.delay_seconds > 0 else ALLOWED
        else:
            outcome = SHADOW_DENIED if route.shadow else DENIED
        return Decision(outcome, limits, result, keys, route.cost)

    def _decision(
        self, route: Route, limits: RouteLimits, keys: list[BucketKey], result: TakeResult
    ) -> Decision:
        if result.admitted:
            outcome = DELAYED if result.delay_seconds > 0 else ALLOWED
        else:
            outcome = SHADOW_DENIED if route.shadow else DENIED
        return Decision(outcome, limits, result, keys, route.cost)

    def give_back(self, decision: Decision) -> None:
        """Return an admitted request's tokens (count_statuses, a queued
        client that left)."""
        if decision.limits is not None and decision.keys:
            self.store.give_back(decision.keys, decision.limits.limits, decision.cost)

    async def client_buckets(
        self, client: str, ip: str, routes: Collection[str] | None = None
    ) -> list[BucketSnapshot]:
        """Every limited route's buckets of ``client`` whose network is ``ip``
        ("" when unknown: limits keyed on the ip or a header are left out),
        as a request would find them (full when the store holds none: see
        ``BucketSnapshot.held``). ``routes``: only the routes of these labels.
        Raises StorageError when the store cannot be read."""
        identity = Client(client, ip, _NO_FIELDS)
        snapshots = []
        for route in (self.routes.default, *self.routes.routes):
            if routes is not None and route.label not in routes:
                continue
            limits = self.limits_for(route, client)
            if limits is None:
                continue
            for key, limit in zip(limits.keys(identity), limits.limits, strict=True):
                if not ip and any(part != "client" and part != "route" for part in limit.per):
                    continue
                snapshots.append(await self.store.snapshot(key, limit))
        return snapshots
