"""Value converters: one YAML value in, one model value out.

Each raises ``ValueError`` with the message a user reads; the loader locates it.
They know nothing of the model, so the model's fields can name them.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.config.durations import parse_duration

__all__ = [
    "as_text",
    "boolean",
    "choice",
    "enum_choice",
    "header_name",
    "network",
    "non_negative_int",
    "parse_hostport",
    "path_prefix",
    "positive_duration",
    "positive_int",
    "redis_address",
    "string",
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
