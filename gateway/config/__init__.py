"""Configuration: the frozen model and its schema (model), the YAML loader (load),
the value converters (convert, durations), the rules between keys (validate)."""

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
    restart_keys,
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
    "restart_keys",
]
