"""The frozen configuration model. Every default lives here, once.

A request reads one ``GatewayConfig`` snapshot; reload swaps the whole object,
never a field of it.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "DEFAULT_BUCKET",
    "MIN_REFILL_PERIOD_SECONDS",
    "UNLIMITED",
    "AccessLogConfig",
    "BucketSpec",
    "ClientsConfig",
    "GatewayConfig",
    "LimitsConfig",
    "Mode",
    "Override",
    "RouteSpec",
    "ServerConfig",
    "StorageConfig",
    "Unlimited",
    "UpstreamConfig",
]

# The refill clock's resolution: below this, timer jitter would be the limit.
MIN_REFILL_PERIOD_SECONDS: Final = 0.010


class Mode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A token bucket: starts full at ``max_tokens``; gains ``refill_tokens``
    every ``refill_period_seconds``, capped at ``max_tokens``."""

    refill_period_seconds: float
    refill_tokens: int
    max_tokens: int
    name: str = "default"


class Unlimited(enum.Enum):
    """A route with ``limit: unlimited``: no bucket, never denied."""

    UNLIMITED = "unlimited"


UNLIMITED: Final = Unlimited.UNLIMITED

DEFAULT_BUCKET: Final = BucketSpec(
    refill_period_seconds=1.0, refill_tokens=10, max_tokens=20, name="default"
)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    connect_timeout_seconds: float = 2.0
    read_timeout_seconds: float = 30.0
    max_connections: int = 256
    # nginx's default is Host: $proxy_host; we forward the client's Host as
    # Envoy and Traefik do, which is what most backends behind a gateway expect.
    preserve_host: bool = True


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    identify_by: str = "ip"
    header: str = "X-API-Key"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_tracked: int = 100_000
    idle_timeout_seconds: float = 600.0
    max_concurrent: int = 0


@dataclass(frozen=True, slots=True)
class Override:
    client: str
    bucket: BucketSpec


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    default: BucketSpec = DEFAULT_BUCKET
    overrides: tuple[Override, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """``limit`` is a BucketSpec of its own, UNLIMITED, or None (client's
    override if any, else limits.default)."""

    path_prefix: str
    limit: BucketSpec | Unlimited | None = None
    mode: Mode | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_error: str = "allow"
    timeout_seconds: float = 0.050
    # Not in the contract (an addition): redis_url names a node of a Redis
    # Cluster; batches are then split by hash slot.
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"
    queue_size: int = 10_000

    @property
    def enabled(self) -> bool:
        return self.path != "off"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Bounds on what a client may send (not in the contract's example, so
    kept under ``server:``). Defaults follow nginx: 8 KiB lines, 60 s header
    read (``client_header_timeout``), 60 s between body reads."""

    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 100
    header_timeout_seconds: float = 60.0
    body_timeout_seconds: float = 60.0
    keepalive_timeout_seconds: float = 75.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    upstream: UpstreamConfig
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    workers: int = 1
    drain_timeout_seconds: float = 30.0
    max_body_size: int = 0
    mode: Mode = Mode.ENFORCE
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    routes: tuple[RouteSpec, ...] = ()
    storage: StorageConfig = field(default_factory=StorageConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    source: str = "<memory>"
