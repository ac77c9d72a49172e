"""② Choose the limit: the first ``path_prefix`` that matches wins.

Matching uses the normalised, percent-decoded path (dot segments resolved,
repeated slashes merged) so ``/%6Cogin`` or ``//login`` cannot slip past a
``/login`` limit that the upstream would apply to the same resource. The raw
path is still what gets forwarded.
"""

from __future__ import annotations

import posixpath
from typing import Final

from gateway.config.model import DEFAULT_UPSTREAM, GatewayConfig, Mode, RouteSpec, Unlimited
from gateway.limiting.policy import RouteLimits
from gateway.limiting.refill_clock import RefillClock

__all__ = ["DEFAULT_ROUTE_LABEL", "Route", "RouteTable", "normalise_path"]

DEFAULT_ROUTE_LABEL: Final = "default"


class Route:
    """One ``routes[]`` entry as requests meet it. ``limits``: the route's own
    (None: the client's override, else limits.default); ``unlimited`` routes
    have none at all. ``methods``: the methods it matches (None: every one).
    ``count_statuses``: the statuses that cost tokens (None: every one).
    ``upstream``: the name of the upstream it forwards to, and
    ``preserve_host`` that upstream's."""

    __slots__ = ("cost", "count_statuses", "key", "label", "limits", "max_queued",
                 "max_wait_seconds", "methods", "prefix", "preserve_host", "shadow",
                 "unlimited", "upstream")  # fmt: skip

    def __init__(
        self,
        label: str,
        prefix: str,
        limits: RouteLimits | None,
        unlimited: bool,
        shadow: bool,
        *,
        methods: frozenset[str] | None = None,
        cost: int = 1,
        max_wait_seconds: float = 0.0,
        max_queued: int = 0,
        count_statuses: frozenset[int] | None = None,
        upstream: str = DEFAULT_UPSTREAM,
        preserve_host: bool = True,
    ) -> None:
        self.label = label
        self.prefix = prefix
        self.limits = limits
        self.unlimited = unlimited
        self.shadow = shadow
        self.methods = methods
        self.cost = cost
        self.max_wait_seconds = max_wait_seconds
        self.max_queued = max_queued
        self.count_statuses = count_statuses
        self.upstream = upstream
        self.preserve_host = preserve_host
        # What its buckets are keyed by: the label, and the methods when it
        # has some (routes sharing a prefix keep buckets of their own).
        self.key = route_key(label, methods)


def normalise_path(path: str) -> str:
    """Resolve dot segments and merge slashes; keeps a trailing slash."""
    if "/." not in path and "//" not in path:
        return path
    normal = posixpath.normpath(path)
    if normal.startswith("//"):  # normpath keeps a leading "//" (POSIX)
        normal = "/" + normal.lstrip("/")
    if path.endswith("/") and not normal.endswith("/"):
        normal += "/"
    return normal


class RouteTable:
    """② The configured routes in order, and the default route."""

    def __init__(self, config: GatewayConfig, clock: RefillClock) -> None:
        global_shadow = config.mode is Mode.SHADOW
        self.routes: tuple[Route, ...] = tuple(
            _route(spec, clock, global_shadow, config) for spec in config.routes
        )
        self.default = Route(
            DEFAULT_ROUTE_LABEL, "/", None, False, global_shadow,
            preserve_host=config.upstream.preserve_host,
        )  # fmt: skip
        self.labels: tuple[str, ...] = (
            DEFAULT_ROUTE_LABEL,
            *(r.label for r in self.routes),
        )

    def match(self, path: str, method: str = "GET") -> Route:
        """``path`` is the decoded request path (no query)."""
        if not self.routes:
            return self.default
        path = normalise_path(path)
        for route in self.routes:
            if path.startswith(route.prefix) and (
                route.methods is None or method in route.methods
            ):
                return route
        return self.default


def _route(
    spec: RouteSpec, clock: RefillClock, global_shadow: bool, config: GatewayConfig
) -> Route:
    limit = spec.limit
    queue = spec.queue
    upstream = spec.upstream or DEFAULT_UPSTREAM
    return Route(
        label=spec.path_prefix,
        prefix=spec.path_prefix,
        limits=RouteLimits(route_key(spec.path_prefix, spec.methods), limit, clock)
        if isinstance(limit, tuple)
        else None,
        unlimited=isinstance(limit, Unlimited),
        shadow=global_shadow if spec.mode is None else spec.mode is Mode.SHADOW,
        methods=spec.methods,
        cost=spec.cost,
        max_wait_seconds=queue.max_wait_seconds if queue is not None else 0.0,
        max_queued=queue.max_queued if queue is not None else 0,
        count_statuses=spec.count_statuses,
        upstream=upstream,
        preserve_host=config.upstream_named(upstream).preserve_host,
    )


def route_key(label: str, methods: frozenset[str] | None) -> str:
    """``Route.key``: the label, and the methods when a route has some."""
    return label if methods is None else f"{label} {','.join(sorted(methods))}"
