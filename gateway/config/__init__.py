"""Configuration: the frozen model, the YAML loader, the duration parser."""

from gateway.config.load import load_config, parse_config
from gateway.config.model import (
    UNLIMITED,
    AccessLogConfig,
    BucketSpec,
    ClientsConfig,
    GatewayConfig,
    LimitsConfig,
    Mode,
    RouteSpec,
    StorageConfig,
    UpstreamConfig,
)

__all__ = [
    "UNLIMITED",
    "AccessLogConfig",
    "BucketSpec",
    "ClientsConfig",
    "GatewayConfig",
    "LimitsConfig",
    "Mode",
    "RouteSpec",
    "StorageConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]
