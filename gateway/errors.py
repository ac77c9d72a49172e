"""The gateway's error tree.

GatewayError
├── ConfigError          a config file (or reload) is invalid; carries every problem
├── StorageError         a bucket backend (redis) failed; wrapped at the store seam
└── UpstreamError        the fronted backend failed; mapped to 502/504 by responses.py
    ├── UpstreamConnectError   refused / unreachable            -> 502, kind="connect"
    ├── UpstreamTimeoutError   silent past read_timeout         -> 504, kind="timeout"
    └── UpstreamResetError     closed mid-response              -> 502, kind="reset"
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "GatewayError",
    "StorageError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamResetError",
    "UpstreamTimeoutError",
]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file, located as an editor would want it."""

    path: str
    line: int
    column: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.key}: {self.message}"


class ConfigError(GatewayError):
    """A config is invalid. ``problems`` lists all of them, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StorageError(GatewayError):
    """The shared bucket store failed (timeout, refused, breaker open)."""


class UpstreamError(GatewayError):
    """The fronted backend failed. ``kind`` is the metric label."""

    kind = "connect"
    status = 502


class UpstreamConnectError(UpstreamError):
    kind = "connect"
    status = 502


class UpstreamTimeoutError(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamResetError(UpstreamError):
    kind = "reset"
    status = 502
