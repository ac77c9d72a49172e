"""② Choose the limit: the first ``path_prefix`` that matches wins.

Matching uses the normalised, percent-decoded path (dot segments resolved,
repeated slashes merged) so ``/%6Cogin`` or ``//login`` cannot slip past a
``/login`` limit that the upstream would apply to the same resource. The raw
path is still what gets forwarded.
"""

from __future__ import annotations

import posixpath
from typing import Final

from gateway.config.model import BucketSpec, GatewayConfig, Mode, Unlimited
from gateway.limiting.policy import Limit
from gateway.limiting.refill_clock import RefillClock

__all__ = ["DEFAULT_ROUTE_LABEL", "Route", "RouteTable", "normalise_path"]

DEFAULT_ROUTE_LABEL: Final = "default"


class Route:
    """``limit`` is the route's own bucket, or None: the client's override, else
    limits.default. ``unlimited`` routes have no bucket at all."""

    __slots__ = ("label", "limit", "prefix", "shadow", "unlimited")

    def __init__(
        self,
        label: str,
        prefix: str,
        limit: Limit | None,
        unlimited: bool,
        shadow: bool,
    ) -> None:
        self.label = label
        self.prefix = prefix
        self.limit = limit
        self.unlimited = unlimited
        self.shadow = shadow


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
            Route(
                label=spec.path_prefix,
                prefix=spec.path_prefix,
                limit=Limit(spec.limit, clock) if isinstance(spec.limit, BucketSpec) else None,
                unlimited=isinstance(spec.limit, Unlimited),
                shadow=global_shadow if spec.mode is None else spec.mode is Mode.SHADOW,
            )
            for spec in config.routes
        )
        self.default = Route(DEFAULT_ROUTE_LABEL, "/", None, False, global_shadow)
        self.labels: tuple[str, ...] = (
            DEFAULT_ROUTE_LABEL,
            *(r.label for r in self.routes),
        )

    def match(self, path: str) -> Route:
        """``path`` is the decoded request path (no query)."""
        if not self.routes:
            return self.default
        path = normalise_path(path)
        for route in self.routes:
            if path.startswith(route.prefix):
                return route
        return self.default
