"""YAML -> ``GatewayConfig``, or ``ConfigError`` listing every problem.

The file is composed into YAML nodes (which keep line and column), walked once,
and every problem is collected as ``PATH:LINE:COL: key.path: message`` before
one error is raised: an operator fixes a file in one pass, not one
``gateway check`` per typo.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.config.durations import parse_duration
from gateway.config.model import (
    MIN_REFILL_PERIOD_SECONDS,
    UNLIMITED,
    AccessLogConfig,
    BucketSpec,
    ClientsConfig,
    GatewayConfig,
    IPNetwork,
    LimitsConfig,
    Mode,
    Override,
    RouteSpec,
    ServerConfig,
    StorageConfig,
    Unlimited,
    UpstreamConfig,
)
from gateway.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_config", "parse_hostport"]

T = TypeVar("T")

_BUCKET_KEYS = ("refill_period", "refill_tokens", "max_tokens")


class _Missing:
    """Marks a value that could not be read; its problem is already recorded."""


_MISSING = _Missing()


class _Reader:
    """Walks composed YAML nodes, converting values and recording problems."""

    def __init__(self, path: str, loader: yaml.SafeLoader) -> None:
        self.path = path
        self._loader = loader
        self.problems: list[ConfigProblem] = []

    def problem(self, node: yaml.Node | None, key: str, message: str) -> None:
        line, column = (1, 1)
        if node is not None:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self.problems.append(ConfigProblem(self.path, line, column, key, message))

    def mapping(
        self, node: yaml.Node, key: str, allowed: tuple[str, ...]
    ) -> dict[str, yaml.Node] | None:
        """The mapping's value nodes by key; unknown and repeated keys are
        problems (a typo must not silently disable a limit)."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key or "<document>", "expected a mapping")
            return None
        values: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or name not in allowed:
                hint = f"; expected one of: {', '.join(allowed)}"
                self.problem(key_node, full, f"unknown key{hint}")
            elif name in values:
                self.problem(key_node, full, "key given twice")
            else:
                values[name] = value_node
        return values

    def value(self, node: yaml.Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def convert(self, node: yaml.Node, key: str, convert: Callable[[Any], T]) -> T | _Missing:
        try:
            return convert(self.value(node))
        except (ValueError, TypeError) as exc:
            self.problem(node, key, str(exc))
            return _MISSING

    def field(
        self,
        values: dict[str, yaml.Node],
        parent: str,
        name: str,
        convert: Callable[[Any], T],
        default: T,
    ) -> T:
        node = values.get(name)
        if node is None:
            return default
        result = self.convert(node, f"{parent}.{name}" if parent else name, convert)
        return default if isinstance(result, _Missing) else result


# -- value converters: each raises ValueError with the message a user reads --


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _mode(value: Any) -> Mode:
    return Mode(_choice("enforce", "shadow")(value))


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_hostport(value: Any) -> tuple[str, int]:
    """``"0.0.0.0:8080"``, ``"[::1]:8080"``, ``":8080"`` -> (host, port)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    host = host or "0.0.0.0"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected an IP address or localhost, got {host!r}") from None
    return host, int(port_text)


def _workers(value: Any) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return _positive_int(value)


def _upstream_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {text!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {text!r}")
    return text.rstrip("/")


def _redis_url(value: Any) -> str:
    text = _string(value)
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {text!r}")
    return text


def _network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR such as '10.0.0.0/8', got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {value!r}") from None


def _header_name(value: Any) -> str:
    text = _string(value)
    if not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError(f"not a valid header name: {text!r}")
    return text


def _path_prefix(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


# -- sections --


def _bucket(
    r: _Reader, node: yaml.Node, key: str, base: BucketSpec, name: str
) -> BucketSpec | _Missing:
    values = r.mapping(node, key, _BUCKET_KEYS)
    if values is None:
        return _MISSING
    return _bucket_fields(r, values, node, key, base, name)


def _bucket_fields(
    r: _Reader,
    values: dict[str, yaml.Node],
    node: yaml.Node,
    key: str,
    base: BucketSpec,
    name: str,
) -> BucketSpec | _Missing:
    problems_before = len(r.problems)
    period = r.field(
        values, key, "refill_period", _positive_duration, base.refill_period_seconds
    )
    if period < MIN_REFILL_PERIOD_SECONDS:
        r.problem(
            values.get("refill_period", node),
            f"{key}.refill_period",
            f"must be at least 10ms (the refill clock's resolution), got {period}s",
        )
    refill = r.field(values, key, "refill_tokens", _positive_int, base.refill_tokens)
    maximum = r.field(values, key, "max_tokens", _positive_int, base.max_tokens)
    # Compare only values the file really holds: a field that failed to parse
    # stands in with its default, which the user never wrote.
    if len(r.problems) == problems_before and maximum < refill:
        r.problem(
            values.get("max_tokens", node),
            f"{key}.max_tokens",
            f"max_tokens ({maximum}) must be at least refill_tokens ({refill})",
        )
    if len(r.problems) > problems_before:
        return _MISSING
    return BucketSpec(period, refill, maximum, name)


def _sequence(r: _Reader, node: yaml.Node, key: str) -> list[yaml.Node]:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, key, "expected a list")
        return []
    return list(node.value)


def _upstream(r: _Reader, node: yaml.Node | None, root: yaml.Node) -> UpstreamConfig:
    if node is None:
        r.problem(root, "upstream.url", "is required (the backend being fronted)")
        return UpstreamConfig(url="http://127.0.0.1:8000")
    values = (
        r.mapping(
            node,
            "upstream",
            (
                "url",
                "connect_timeout",
                "read_timeout",
                "max_connections",
                "preserve_host",
            ),
        )
        or {}
    )
    if "url" not in values:
        r.problem(node, "upstream.url", "is required (the backend being fronted)")
    d = UpstreamConfig(url="http://127.0.0.1:8000")
    return UpstreamConfig(
        url=r.field(values, "upstream", "url", _upstream_url, d.url),
        connect_timeout_seconds=r.field(
            values,
            "upstream",
            "connect_timeout",
            _positive_duration,
            d.connect_timeout_seconds,
        ),
        read_timeout_seconds=r.field(
            values,
            "upstream",
            "read_timeout",
            _positive_duration,
            d.read_timeout_seconds,
        ),
        max_connections=r.field(
            values, "upstream", "max_connections", _positive_int, d.max_connections
        ),
        preserve_host=r.field(values, "upstream", "preserve_host", _boolean, d.preserve_host),
    )


def _clients(r: _Reader, node: yaml.Node | None) -> ClientsConfig:
    d = ClientsConfig()
    if node is None:
        return d
    values = (
        r.mapping(
            node,
            "clients",
            (
                "identify_by",
                "header",
                "trusted_proxies",
                "max_tracked",
                "idle_timeout",
                "max_concurrent",
            ),
        )
        or {}
    )
    networks: list[IPNetwork] = []
    if "trusted_proxies" in values:
        for item in _sequence(r, values["trusted_proxies"], "clients.trusted_proxies"):
            net = r.convert(item, "clients.trusted_proxies", _network)
            if not isinstance(net, _Missing):
                networks.append(net)
    return ClientsConfig(
        identify_by=r.field(
            values, "clients", "identify_by", _choice("ip", "header"), d.identify_by
        ),
        header=r.field(values, "clients", "header", _header_name, d.header),
        trusted_proxies=tuple(networks),
        max_tracked=r.field(values, "clients", "max_tracked", _positive_int, d.max_tracked),
        idle_timeout_seconds=r.field(
            values,
            "clients",
            "idle_timeout",
            _positive_duration,
            d.idle_timeout_seconds,
        ),
        max_concurrent=r.field(
            values, "clients", "max_concurrent", _non_negative_int, d.max_concurrent
        ),
    )


def _limits(r: _Reader, node: yaml.Node | None) -> LimitsConfig:
    if node is None:
        return LimitsConfig()
    values = r.mapping(node, "limits", ("default", "overrides")) or {}
    default = LimitsConfig().default
    if "default" in values:
        parsed = _bucket(r, values["default"], "limits.default", default, "default")
        if isinstance(parsed, BucketSpec):
            default = parsed
    overrides: list[Override] = []
    seen: set[str] = set()
    if "overrides" in values:
        for i, item in enumerate(_sequence(r, values["overrides"], "limits.overrides")):
            key = f"limits.overrides[{i}]"
            fields = r.mapping(item, key, ("client", *_BUCKET_KEYS))
            if fields is None:
                continue
            client_node = fields.pop("client", None)
            if client_node is None:
                r.problem(item, f"{key}.client", "is required")
                continue
            client = r.convert(client_node, f"{key}.client", lambda v: _string(str(v)))
            bucket = _bucket_fields(r, fields, item, key, default, "override")
            if isinstance(client, _Missing) or isinstance(bucket, _Missing):
                continue
            if client in seen:
                r.problem(client_node, f"{key}.client", f"{client!r} is listed twice")
                continue
            seen.add(client)
            overrides.append(Override(client, bucket))
    return LimitsConfig(default=default, overrides=tuple(overrides))


def _routes(r: _Reader, node: yaml.Node | None, default: BucketSpec) -> tuple[RouteSpec, ...]:
    if node is None:
        return ()
    routes: list[RouteSpec] = []
    for i, item in enumerate(_sequence(r, node, "routes")):
        key = f"routes[{i}]"
        values = r.mapping(item, key, ("path_prefix", "limit", "mode"))
        if values is None:
            continue
        if "path_prefix" not in values:
            r.problem(item, f"{key}.path_prefix", "is required")
            continue
        prefix = r.convert(values["path_prefix"], f"{key}.path_prefix", _path_prefix)
        if isinstance(prefix, _Missing):
            prefix = "/"  # keep checking the route's other keys
        limit: BucketSpec | Unlimited | None = None
        limit_node = values.get("limit")
        if limit_node is not None:
            if isinstance(limit_node, yaml.ScalarNode):
                if r.value(limit_node) == "unlimited":
                    limit = UNLIMITED
                else:
                    r.problem(
                        limit_node,
                        f"{key}.limit",
                        "expected 'unlimited' or a mapping of "
                        "refill_period, refill_tokens, max_tokens",
                    )
            else:
                parsed = _bucket(r, limit_node, f"{key}.limit", default, prefix)
                if isinstance(parsed, BucketSpec):
                    limit = parsed
        mode = r.field(values, key, "mode", _mode, None)
        routes.append(RouteSpec(prefix, limit, mode))
    return tuple(routes)


def _storage(r: _Reader, node: yaml.Node | None) -> StorageConfig:
    d = StorageConfig()
    if node is None:
        return d
    values = (
        r.mapping(node, "storage", ("backend", "redis_url", "on_error", "timeout", "cluster"))
        or {}
    )
    return StorageConfig(
        backend=r.field(values, "storage", "backend", _choice("memory", "redis"), d.backend),
        redis_url=r.field(values, "storage", "redis_url", _redis_url, d.redis_url),
        on_error=r.field(
            values, "storage", "on_error", _choice("allow", "deny", "local"), d.on_error
        ),
        timeout_seconds=r.field(
            values, "storage", "timeout", _positive_duration, d.timeout_seconds
        ),
        cluster=r.field(values, "storage", "cluster", _boolean, d.cluster),
    )


def _access_log(r: _Reader, node: yaml.Node | None) -> AccessLogConfig:
    d = AccessLogConfig()
    if node is None:
        return d
    values = r.mapping(node, "access_log", ("path", "queue_size")) or {}
    return AccessLogConfig(
        path=r.field(values, "access_log", "path", lambda v: _string(str(v)), d.path),
        queue_size=r.field(values, "access_log", "queue_size", _positive_int, d.queue_size),
    )


def _server(r: _Reader, node: yaml.Node | None) -> ServerConfig:
    d = ServerConfig()
    if node is None:
        return d
    values = (
        r.mapping(
            node,
            "server",
            (
                "max_line_size",
                "max_field_size",
                "max_headers",
                "header_timeout",
                "body_timeout",
                "keepalive_timeout",
            ),
        )
        or {}
    )
    return ServerConfig(
        max_line_size=r.field(
            values, "server", "max_line_size", _positive_int, d.max_line_size
        ),
        max_field_size=r.field(
            values, "server", "max_field_size", _positive_int, d.max_field_size
        ),
        max_headers=r.field(values, "server", "max_headers", _positive_int, d.max_headers),
        header_timeout_seconds=r.field(
            values,
            "server",
            "header_timeout",
            _positive_duration,
            d.header_timeout_seconds,
        ),
        body_timeout_seconds=r.field(
            values, "server", "body_timeout", _positive_duration, d.body_timeout_seconds
        ),
        keepalive_timeout_seconds=r.field(
            values,
            "server",
            "keepalive_timeout",
            _positive_duration,
            d.keepalive_timeout_seconds,
        ),
    )


_TOP_KEYS = (
    "listen",
    "admin",
    "workers",
    "drain_timeout",
    "max_body_size",
    "mode",
    "upstream",
    "clients",
    "limits",
    "routes",
    "storage",
    "access_log",
    "server",
)


def parse_config(text: str, path: str = "<memory>") -> GatewayConfig:
    """Parse YAML text into a ``GatewayConfig``; raise ``ConfigError`` listing
    every problem, each located at ``path:line:column``."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            message = exc.problem or str(exc)
            raise ConfigError(
                [ConfigProblem(path, line, column, "<yaml>", f"invalid YAML: {message}")]
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                [ConfigProblem(path, 1, 1, "<yaml>", f"invalid YAML: {exc}")]
            ) from None
        if root is None:
            raise ConfigError(
                [ConfigProblem(path, 1, 1, "upstream.url", "is required; the file is empty")]
            )
        r = _Reader(path, loader)
        values = r.mapping(root, "", _TOP_KEYS)
        if values is None:
            raise ConfigError(r.problems)
        config = _build(r, root, values)
    finally:
        loader.dispose()
    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: (p.line, p.column)))
    return replace(config, source=path)


def _build(r: _Reader, root: yaml.Node, values: dict[str, yaml.Node]) -> GatewayConfig:
    d = GatewayConfig(upstream=UpstreamConfig(url="http://127.0.0.1:8000"))
    listen = r.field(values, "", "listen", parse_hostport, (d.listen_host, d.listen_port))
    admin = r.field(values, "", "admin", parse_hostport, (d.admin_host, d.admin_port))
    if listen[1] != 0 and listen[1] == admin[1] and _same_host(listen[0], admin[0]):
        r.problem(
            values.get("admin", root),
            "admin",
            f"port {admin[1]} is the proxy listener's too; the admin listener needs its own",
        )
    limits = _limits(r, values.get("limits"))
    storage = _storage(r, values.get("storage"))
    workers = r.field(values, "", "workers", _workers, d.workers)
    if workers > 1 and storage.backend == "memory":
        r.problem(
            values["workers"],
            "workers",
            f"{workers} workers with storage.backend: memory would give every client "
            f"{workers}x its limit (each process has its own buckets); "
            "set storage.backend: redis to share buckets, or workers: 1",
        )
    return GatewayConfig(
        upstream=_upstream(r, values.get("upstream"), root),
        listen_host=listen[0],
        listen_port=listen[1],
        admin_host=admin[0],
        admin_port=admin[1],
        workers=workers,
        drain_timeout_seconds=r.field(
            values, "", "drain_timeout", _positive_duration, d.drain_timeout_seconds
        ),
        max_body_size=r.field(values, "", "max_body_size", _non_negative_int, d.max_body_size),
        mode=r.field(values, "", "mode", _mode, d.mode),
        clients=_clients(r, values.get("clients")),
        limits=limits,
        routes=_routes(r, values.get("routes"), limits.default),
        storage=storage,
        access_log=_access_log(r, values.get("access_log")),
        server=_server(r, values.get("server")),
    )


def _same_host(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard


def load_config(path: str) -> GatewayConfig:
    """Read and parse the file at ``path``; an unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            [ConfigProblem(path, 1, 1, "<file>", f"cannot read: {reason}")]
        ) from None
    return parse_config(text, path)
