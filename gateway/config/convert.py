"""Value converters: one YAML value in, one model value out.

Each raises ``ValueError`` with the message a user reads; the loader locates it.
They know nothing of the model, so the model's fields can name them.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from gateway.config.durations import parse_duration

__all__ = [
    "as_text",
    "boolean",
    "choice",
    "client_entry",
    "enum_choice",
    "header_name",
    "health_check_path",
    "limit_name",
    "method_set",
    "method_token",
    "network",
    "non_negative_int",
    "parse_hostport",
    "path_prefix",
    "per_parts",
    "positive_duration",
    "positive_int",
    "prefix_length",
    "redis_address",
    "server_list",
    "status_range",
    "status_set",
    "string",
    "upstream_name",
    "upstream_url",
    "worker_count",
]

E = TypeVar("E", bound=enum.Enum)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def as_text(value: Any) -> str:
    """Any scalar as non-empty text (``client: 42`` is the client ``"42"``)."""
    return string(str(value))


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def enum_choice(cls: type[E]) -> Callable[[Any], E]:
    """One of the enum's values, in its declaration order in the message."""
    names = choice(*(member.value for member in cls))

    def convert(value: Any) -> E:
        return cls(names(value))

    return convert


def boolean(value: Any) -> bool:
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


def worker_count(value: Any) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return positive_int(value)


def upstream_url(value: Any) -> str:
    url = string(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    return url.rstrip("/")


def server_list(urls: list[str]) -> tuple[str, ...]:
    """``upstream.servers``: at least one URL."""
    if not urls:
        raise ValueError(
            "an empty list of servers; give at least one (or url for a single server)"
        )
    return tuple(urls)


_UPSTREAM_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def upstream_name(value: Any) -> str:
    """The name of an upstream in ``upstreams`` (a metric label value):
    letters, digits, ``_``, ``.`` and ``-``."""
    if not isinstance(value, str) or not _UPSTREAM_NAME.fullmatch(value):
        raise ValueError(
            "expected a name of letters, digits, '_', '.' and '-' such as 'static', "
            f"got {value!r}"
        )
    return value


def health_check_path(value: Any) -> str:
    """``health_check.path``: an origin-form target, or "" (no probes)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected a path starting with '/' (or '' for none), got {value!r}")
    if any(c <= " " or c == "\x7f" for c in value):
        raise ValueError(f"spaces and control characters cannot be sent, got {value!r}")
    return value


def redis_address(value: Any) -> str:
    url = string(value)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return url


def network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR such as '10.0.0.0/8', got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {value!r}") from None


def header_name(value: Any) -> str:
    name = string(value)
    if not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"not a valid header name: {name!r}")
    return name


def path_prefix(value: Any) -> str:
    prefix = string(value)
    if not prefix.startswith("/"):
        raise ValueError(f"must start with '/', got {prefix!r}")
    return prefix


def prefix_length(bits: int) -> Callable[[Any], int]:
    """A prefix length from 1 to ``bits``."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bits:
            raise ValueError(f"expected a prefix length from 1 to {bits}, got {value!r}")
        return value

    return convert


def client_entry(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """An allow/deny entry: a CIDR, or ``key:VALUE`` (an API key)."""
    if isinstance(value, str) and value.startswith("key:"):
        if len(value) == 4:
            raise ValueError("'key:' needs a value, as in 'key:partner-1'")
        return value
    try:
        return network(value)
    except ValueError:
        raise ValueError(
            f"expected a CIDR such as '10.0.0.0/8' or 'key:VALUE', got {value!r}"
        ) from None


_PER_PARTS: Final = ("client", "ip", "route")


def per_parts(value: Any) -> tuple[str, ...]:
    """``per``: client, ip, route, header:NAME, or a list of these."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected client, ip, route, header:NAME or a list of them")
    parts = []
    for item in items:
        if isinstance(item, str) and item.startswith("header:"):
            parts.append("header:" + header_name(item[7:]))
        elif item in _PER_PARTS:
            parts.append(str(item))
        else:
            raise ValueError(f"expected client, ip, route or header:NAME, got {item!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"{value!r} names a part twice")
    return tuple(parts)


def limit_name(value: Any) -> str:
    """A limit's name, as ``RateLimit-Policy`` quotes it: printable ASCII
    without ``"`` or ``\\``."""
    name = as_text(value)
    if not all(" " <= c <= "~" and c not in '"\\' for c in name):
        raise ValueError(
            f"expected printable ASCII without quotes or backslashes, got {name!r}"
        )
    return name


# RFC 9110 5.6.2: a method is a token.
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def method_token(value: Any) -> str:
    """One of ``methods``: an HTTP method token, upper-cased (``get`` is ``GET``)."""
    if value == "*":
        raise ValueError("'*' is not a method; leave methods out to match every method")
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN_CHARS:
        raise ValueError(f"expected an HTTP method such as GET or POST, got {value!r}")
    return value.upper()


def method_set(methods: list[str]) -> frozenset[str]:
    if not methods:
        raise ValueError(
            "an empty list matches no request; leave methods out to match every method"
        )
    return frozenset(methods)


_STATUS_RANGE: Final = re.compile(r"[1-5](?:[0-9][0-9x]|xx)", re.IGNORECASE)


def status_range(value: Any) -> range:
    """One of ``count_statuses``: a code (``401`` or ``"401"``) or a range of
    codes written with ``x`` for its last digits (``"4xx"``, ``"40x"``)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str) and _STATUS_RANGE.fullmatch(text):
        low = int(text.lower().replace("x", "0"))
        high = int(text.lower().replace("x", "9"))
        if low >= 100:
            return range(low, high + 1)
    raise ValueError(
        f"expected a status code from 100 to 599 such as 401, or a range such as '4xx', "
        f"got {value!r}"
    )


def status_set(ranges: list[range]) -> frozenset[int]:
    if not ranges:
        raise ValueError(
            "an empty list would give every token back; "
            "leave count_statuses out to count every answer"
        )
    return frozenset(code for codes in ranges for code in codes)
