"""The frozen configuration model and its schema. Every default lives here, once.

A request reads one ``GatewayConfig`` snapshot; reload swaps the whole object,
never a field of it.

Each field read from YAML says how, in its metadata (``setting``, ``section``,
``by_hand``): its key, its converter, whether a change needs a restart. The
loader walks these fields, so adding a key is one line here.
"""

# setting(), section() and by_hand() return dataclasses.field(...): safe as
# defaults, but ruff cannot see through the wrapper.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from mypy_extensions import mypyc_attr

from gateway.config.convert import (
    as_text,
    boolean,
    choice,
    client_entry,
    enum_choice,
    header_name,
    health_check_path,
    limit_name,
    method_set,
    method_token,
    network,
    non_negative_int,
    parse_hostport,
    path_prefix,
    per_parts,
    positive_duration,
    positive_int,
    prefix_length,
    redis_address,
    server_list,
    status_range,
    status_set,
    string,
    upstream_name,
    upstream_url,
    worker_count,
)

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_PER",
    "DEFAULT_UPSTREAM",
    "MIN_REFILL_PERIOD_SECONDS",
    "UNLIMITED",
    "AccessLogConfig",
    "Balance",
    "BucketSpec",
    "ClientEntry",
    "ClientsConfig",
    "GatewayConfig",
    "HealthCheckConfig",
    "LimitsConfig",
    "Mode",
    "Override",
    "QueueSpec",
    "RouteSpec",
    "ServerConfig",
    "Setting",
    "StorageConfig",
    "TlsConfig",
    "Underscores",
    "Unlimited",
    "UpstreamConfig",
    "by_hand",
    "optional_section",
    "restart_keys",
    "section",
    "setting",
    "settings",
    "yaml_keys",
]

# The refill clock's resolution: below this, timer jitter would be the limit.
MIN_REFILL_PERIOD_SECONDS: Final = 0.010


# -- the schema: how a field is read from YAML --

_SETTING: Final = "gateway.config"


@dataclass(frozen=True, slots=True)
class Setting:
    """A field's YAML key and how its value is read; kept in the field's metadata."""

    key: str | None = None  # None: the field's own name
    parse: Callable[[Any], Any] | None = None  # a converter from gateway.config.convert
    section: type | None = None  # a nested section, read by the same walk
    optional: bool = False  # a section the file lacks is None, not all defaults
    restart: bool = False  # read once at start: a reload warns it changed (restart_keys)
    each: bool = False  # a YAML list: ``parse`` reads each item, the field is a tuple
    # With ``each``: makes the field's value of the converted items instead of
    # tuple (raises ValueError for a list it refuses, e.g. an empty one).
    gather: Callable[[list[Any]], Any] | None = None
    part: int | None = None  # ``parse`` returns a tuple; the field is this item of it
    required: str = ""  # no default: the problem reported when the key is absent
    stand_in: Any = None  # the value held while that problem is reported

    def metadata(self) -> Mapping[str, Setting]:
        return {_SETTING: self}


def setting(
    default: Any,
    *,
    key: str | None = None,
    parse: Callable[[Any], Any],
    restart: bool = False,
    each: bool = False,
    gather: Callable[[list[Any]], Any] | None = None,
    part: int | None = None,
) -> Any:
    """A field read from the YAML key ``key`` (default: its name) by ``parse``."""
    spec = Setting(key, parse, restart=restart, each=each, gather=gather, part=part)
    return field(default=default, metadata=spec.metadata())


def section(cls: type, *, restart: bool = False) -> Any:
    """A nested mapping whose own fields are settings; absent: all defaults."""
    return field(default_factory=cls, metadata=Setting(section=cls, restart=restart).metadata())


def optional_section(cls: type) -> Any:
    """A nested mapping read like ``section``; absent: None (the feature is off)."""
    return field(default=None, metadata=Setting(section=cls, optional=True).metadata())


def by_hand(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    restart: bool = False,
) -> Any:
    """A key the loader reads with code of its own (lists, unions): the walk
    only allows it."""
    metadata = Setting(restart=restart).metadata()
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def settings(cls: type) -> list[tuple[str, str, Setting]]:
    """``(attribute, YAML key, Setting)`` for each field of ``cls`` read from YAML,
    in declaration order."""
    found = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_SETTING)
        if isinstance(spec, Setting):
            found.append((f.name, spec.key or f.name, spec))
    return found


def yaml_keys(cls: type) -> tuple[str, ...]:
    """The keys a mapping read as ``cls`` may hold, in declaration order."""
    return tuple(dict.fromkeys(key for _, key, _ in settings(cls)))


def restart_keys(cls: type | None = None) -> tuple[str, ...]:
    """The fields of ``GatewayConfig`` (or ``cls``) declared ``restart=True``:
    read once at start, so a reload that changes one says it needs a restart."""
    return tuple(name for name, _, spec in settings(cls or GatewayConfig) if spec.restart)


class Mode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


class Underscores(enum.Enum):
    """``server.underscores_in_headers``: what a header name with ``_`` gets."""

    DROP = "drop"
    REJECT = "reject"
    ALLOW = "allow"


DEFAULT_PER: Final = ("client",)


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A token bucket: starts full at ``max_tokens``; gains ``refill_tokens``
    every ``refill_period_seconds``, capped at ``max_tokens``."""

    # No defaults: a bucket's missing keys come from the bucket it refines.
    refill_period_seconds: float = field(
        metadata=Setting("refill_period", positive_duration).metadata()
    )
    refill_tokens: int = field(metadata=Setting(parse=positive_int).metadata())
    max_tokens: int = field(metadata=Setting(parse=positive_int).metadata())
    # Unique within its list of limits (the limits one request passes). Not
    # inherited: the loader gives an unnamed limit its place's name ("default",
    # "override", the route's path_prefix; NAME-2, NAME-3 ... for later items).
    name: str = setting("default", parse=limit_name)
    # Whose bucket: "client" (as clients.identify_by says), "ip", "route",
    # "header:NAME", or several of these (a composite key). Not inherited.
    per: tuple[str, ...] = setting(DEFAULT_PER, parse=per_parts)


class Unlimited(enum.Enum):
    """A route with ``limit: unlimited``: no bucket, never denied."""

    UNLIMITED = "unlimited"


UNLIMITED: Final = Unlimited.UNLIMITED

DEFAULT_BUCKET: Final = BucketSpec(
    refill_period_seconds=1.0, refill_tokens=10, max_tokens=20, name="default"
)


class Balance(enum.Enum):
    """``balance``: how an upstream's servers share its requests."""

    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"


# The name of ``upstream`` (the one routes use unless they name another), in
# metrics, logs and ``routes[].upstream``.
DEFAULT_UPSTREAM: Final = "default"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active probes of every server of an upstream: ``GET path`` each
    ``interval``; a server that does not answer 2xx/3xx within ``timeout``
    leaves the rotation until a probe passes. Off while ``path`` is empty."""

    path: str = setting("", parse=health_check_path)
    interval_seconds: float = setting(5.0, key="interval", parse=positive_duration)
    timeout_seconds: float = setting(2.0, key="timeout", parse=positive_duration)

    @property
    def enabled(self) -> bool:
        return bool(self.path)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream: ``url`` for one server or ``servers`` for several (the
    file gives exactly one of them: validate.upstream_problems)."""

    url: str = setting("", parse=upstream_url)
    servers: tuple[str, ...] = setting((), parse=upstream_url, each=True, gather=server_list)
    balance: Balance = setting(Balance.ROUND_ROBIN, parse=enum_choice(Balance))
    # Passive health (nginx's max_fails/fail_timeout): max_fails failures
    # within fail_timeout take a server out for fail_timeout (0: never).
    max_fails: int = setting(3, parse=non_negative_int)
    fail_timeout_seconds: float = setting(10.0, key="fail_timeout", parse=positive_duration)
    health_check: HealthCheckConfig = section(HealthCheckConfig)
    connect_timeout_seconds: float = setting(
        2.0, key="connect_timeout", parse=positive_duration
    )
    read_timeout_seconds: float = setting(30.0, key="read_timeout", parse=positive_duration)
    # Per server: each has a pool of its own.
    max_connections: int = setting(256, parse=positive_int)
    # All max_connections busy: how long a request waits for one before 503
    # (HAProxy's ``timeout queue``).
    pool_timeout_seconds: float = setting(5.0, key="pool_timeout", parse=positive_duration)
    # The upstream's response head (status line and fields), in bytes: past
    # it, 502. Between HAProxy's 16 KiB buffer and Envoy's 60 KiB.
    max_header_size: int = setting(32 * 1024, parse=positive_int)
    # nginx's default is Host: $proxy_host; we forward the client's Host as
    # Envoy and Traefik do, which is what most backends behind a gateway expect.
    preserve_host: bool = setting(True, parse=boolean)

    @property
    def server_urls(self) -> tuple[str, ...]:
        """Every server's URL: ``servers``, or ``url`` alone."""
        return self.servers or ((self.url,) if self.url else ())

    def describe(self) -> str:
        """``http://127.0.0.1:8000``, or ``http://a:8000, http://b:8000
        (round_robin)`` for several servers."""
        urls = self.server_urls
        if len(urls) == 1:
            return urls[0]
        return f"{', '.join(urls)} ({self.balance.value})"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# An allow/deny entry: a network, or "key:VALUE" (the API-key field's value).
ClientEntry = IPNetwork | str


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    identify_by: str = setting("ip", parse=choice("ip", "header"))
    header: str = setting("X-API-Key", parse=header_name)
    trusted_proxies: tuple[IPNetwork, ...] = setting((), parse=network, each=True)
    max_tracked: int = setting(100_000, parse=positive_int)
    idle_timeout_seconds: float = setting(600.0, key="idle_timeout", parse=positive_duration)
    max_concurrent: int = setting(0, parse=non_negative_int)
    # Addresses in one prefix are one client (a subscriber's usual IPv6
    # allocation is a /64: rotating within it must not mint buckets).
    ipv4_prefix: int = setting(32, parse=prefix_length(32))
    ipv6_prefix: int = setting(64, parse=prefix_length(128))
    allow: tuple[ClientEntry, ...] = setting((), parse=client_entry, each=True)
    deny: tuple[ClientEntry, ...] = setting((), parse=client_entry, each=True)


@dataclass(frozen=True, slots=True)
class Override:
    """A client's own limits (e.g. a paid API key), on every route without
    limits of its own."""

    client: str
    buckets: tuple[BucketSpec, ...]


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    default: tuple[BucketSpec, ...] = by_hand((DEFAULT_BUCKET,))
    overrides: tuple[Override, ...] = by_hand(())


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """Wait for tokens instead of an immediate 429 (nginx ``limit_req burst``
    with delay): a request whose tokens will be there within ``max_wait``
    reserves them and waits; at most ``max_queued`` wait per process."""

    max_wait_seconds: float = setting(1.0, key="max_wait", parse=positive_duration)
    max_queued: int = setting(1000, parse=positive_int)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """``limit`` is the route's own limits (all must admit), UNLIMITED, or
    None (client's override if any, else limits.default). ``methods``: the
    methods it matches (None: every one). ``count_statuses``: the statuses
    whose answers cost tokens (None: every one)."""

    path_prefix: str = field(
        metadata=Setting(parse=path_prefix, required="is required", stand_in="/").metadata()
    )
    # A mapping, a list of mappings or "unlimited"; inherits from
    # limits.default: read by the loader.
    limit: tuple[BucketSpec, ...] | Unlimited | None = by_hand(None)
    mode: Mode | None = setting(None, parse=enum_choice(Mode))
    methods: frozenset[str] | None = setting(
        None, parse=method_token, each=True, gather=method_set
    )
    cost: int = setting(1, parse=positive_int)
    queue: QueueSpec | None = optional_section(QueueSpec)
    count_statuses: frozenset[int] | None = setting(
        None, parse=status_range, each=True, gather=status_set
    )
    # A name from ``upstreams`` (None: ``upstream``, also named "default").
    upstream: str | None = setting(None, parse=upstream_name)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = setting("memory", parse=choice("memory", "redis"))
    redis_url: str = setting("redis://127.0.0.1:6379/0", parse=redis_address)
    on_error: str = setting("allow", parse=choice("allow", "deny", "local"))
    timeout_seconds: float = setting(0.050, key="timeout", parse=positive_duration)
    # Not in the contract (an addition): redis_url names a node of a Redis
    # Cluster; batches are then split by hash slot.
    cluster: bool = setting(False, parse=boolean)


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = setting("-", parse=as_text)
    queue_size: int = setting(10_000, parse=positive_int)

    @property
    def enabled(self) -> bool:
        return self.path != "off"


# A section may be extended by subclassing (tests/unit/test_config_load.py
# declares one more key that way), also when this module is compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Bounds on what a client may send (not in the contract's example, so
    kept under ``server:``). Defaults follow nginx: 8 KiB lines, 60 s header
    read (``client_header_timeout``), 60 s between body reads."""

    max_line_size: int = setting(8190, parse=positive_int)
    max_field_size: int = setting(8190, parse=positive_int)
    max_headers: int = setting(100, parse=positive_int)
    header_timeout_seconds: float = setting(60.0, key="header_timeout", parse=positive_duration)
    body_timeout_seconds: float = setting(60.0, key="body_timeout", parse=positive_duration)
    keepalive_timeout_seconds: float = setting(
        75.0, key="keepalive_timeout", parse=positive_duration
    )
    # A client that takes no bytes of a response for this long is cut
    # (nginx's ``send_timeout``), freeing the upstream connection it held.
    send_timeout_seconds: float = setting(60.0, key="send_timeout", parse=positive_duration)
    # Open client connections, at most (0: half the descriptor limit, as
    # Envoy's edge guide advises); at the cap, new ones wait in the backlog.
    max_connections: int = setting(0, parse=non_negative_int)
    # Header names holding "_": dropped from what is sent upstream (nginx's
    # default), refused with 400, or forwarded as they are.
    underscores_in_headers: Underscores = setting(
        Underscores.DROP, parse=enum_choice(Underscores)
    )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on the proxy listener: a PEM certificate chain (the server's
    certificate first, then the intermediates it is served with) and its
    private key. The loader makes a relative path relative to the config
    file's directory (as nginx's ``ssl_certificate`` is to its conf
    directory) and loads the pair (gateway.config.tls); SIGHUP reads both
    files again."""

    cert: str = field(
        metadata=Setting(
            parse=string, required="is required (a PEM certificate chain)", stand_in=""
        ).metadata()
    )
    key: str = field(
        metadata=Setting(
            parse=string,
            required="is required (the certificate's PEM private key)",
            stand_in="",
        ).metadata()
    )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole file. Its fields' order is the order ``gateway check`` lists the
    top-level keys in."""

    listen_host: str = setting(
        "0.0.0.0", key="listen", parse=parse_hostport, part=0, restart=True
    )
    listen_port: int = setting(8080, key="listen", parse=parse_hostport, part=1, restart=True)
    admin_host: str = setting(
        "127.0.0.1", key="admin", parse=parse_hostport, part=0, restart=True
    )
    admin_port: int = setting(9090, key="admin", parse=parse_hostport, part=1, restart=True)
    workers: int = setting(1, parse=worker_count, restart=True)
    drain_timeout_seconds: float = setting(
        30.0, key="drain_timeout", parse=positive_duration, restart=True
    )
    max_body_size: int = setting(0, parse=non_negative_int)
    mode: Mode = setting(Mode.ENFORCE, parse=enum_choice(Mode))
    # None: plain HTTP. Its files are read again on reload; turning TLS on or
    # off needs a restart (server.py says so).
    tls: TlsConfig | None = optional_section(TlsConfig)
    # Read once at start as well, but not restart=True: server.apply reports an
    # upstream change on a line of its own.
    upstream: UpstreamConfig = field(
        kw_only=True, metadata=Setting(section=UpstreamConfig).metadata()
    )
    # Named further upstreams (routes pick one by name), each read like
    # ``upstream``; read once at start like it. By name, in file order.
    upstreams: Mapping[str, UpstreamConfig] = by_hand(factory=dict)
    clients: ClientsConfig = section(ClientsConfig)
    limits: LimitsConfig = by_hand(factory=LimitsConfig)
    routes: tuple[RouteSpec, ...] = by_hand(())
    storage: StorageConfig = section(StorageConfig, restart=True)
    access_log: AccessLogConfig = section(AccessLogConfig, restart=True)
    server: ServerConfig = section(ServerConfig, restart=True)
    source: str = "<memory>"  # the file's path, set by the loader

    def upstream_named(self, name: str | None) -> UpstreamConfig:
        """``upstream`` for None or "default", else ``upstreams[name]``
        (KeyError for a name the file does not define)."""
        if name is None or name == DEFAULT_UPSTREAM:
            return self.upstream
        return self.upstreams[name]

    def all_upstreams(self) -> dict[str, UpstreamConfig]:
        """Every upstream by name, ``default`` first."""
        return {DEFAULT_UPSTREAM: self.upstream, **self.upstreams}
