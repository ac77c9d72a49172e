"""The gateway's error tree.

GatewayError
├── ConfigError          a config file (or reload) is invalid; carries every problem
├── StorageError         a bucket backend (redis) failed; wrapped at the store seam
├── ClientBodyError      the client's request body was at fault; answered with ``status``
│   ├── MalformedBodyError     llhttp rejected the body mid-stream  -> 400
│   ├── ChunkExtensionError    chunk extensions past 16 KiB         -> 400
│   ├── BodyTooLargeError      past max_body_size                   -> 413
│   └── BodyTimeoutError       no body bytes for body_timeout       -> 408
└── UpstreamError        the fronted backend failed; mapped to 502/504 by responses.py
    ├── UpstreamConnectError   refused / unreachable            -> 502, kind="connect"
    ├── UpstreamTimeoutError   silent past read_timeout         -> 504, kind="timeout"
    ├── UpstreamResetError     closed mid-response              -> 502, kind="reset"
    │   └── UpstreamClosedError    closed before any response byte: an idempotent
    │                              request may be sent again (another server)
    ├── UpstreamInvalidError   a head we must not relay         -> 502, kind="invalid"
    └── UpstreamBusyError      no pooled connection in time     -> 503, kind="busy"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "BodyTimeoutError",
    "BodyTooLargeError",
    "ChunkExtensionError",
    "ClientBodyError",
    "ConfigError",
    "ConfigProblem",
    "GatewayError",
    "MalformedBodyError",
    "StorageError",
    "UpstreamBusyError",
    "UpstreamClosedError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamInvalidError",
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


class ClientBodyError(GatewayError):
    """The client's request body was at fault; answered with ``status``,
    counted in gateway_rejected_requests_total by ``reason``."""

    status: ClassVar[int] = 400
    reason: ClassVar[str] = "bad_request"


class MalformedBodyError(ClientBodyError):
    """llhttp rejected the body after forwarding had started (a bad chunk)."""


class ChunkExtensionError(ClientBodyError):
    """A chunked body sent more than ``MAX_CHUNK_EXTENSION_BYTES`` of
    framing (chunk extensions) without body bytes: llhttp skips extensions
    without a bound, so a client could keep a connection reading forever."""

    reason: ClassVar[str] = "chunk_extension"


class BodyTooLargeError(ClientBodyError):
    """The body passed ``max_body_size`` while it streamed."""

    status: ClassVar[int] = 413
    reason: ClassVar[str] = "body_too_large"

    def __init__(self, max_body_size: int) -> None:
        super().__init__(f"request bodies are limited to {max_body_size} bytes")


class BodyTimeoutError(ClientBodyError):
    """No body bytes for ``server.body_timeout``."""

    status: ClassVar[int] = 408
    reason: ClassVar[str] = "body_timeout"

    def __init__(self, body_timeout_seconds: float) -> None:
        super().__init__(f"no request body data for {body_timeout_seconds:g}s")


class UpstreamError(GatewayError):
    """The fronted backend failed. ``kind`` is the metric label."""

    kind: ClassVar[str] = "connect"
    status: ClassVar[int] = 502


class UpstreamConnectError(UpstreamError):
    """Refused or unreachable."""

    kind: ClassVar[str] = "connect"
    status: ClassVar[int] = 502


class UpstreamTimeoutError(UpstreamError):
    """Silent past ``read_timeout``."""

    kind: ClassVar[str] = "timeout"
    status: ClassVar[int] = 504


class UpstreamResetError(UpstreamError):
    """Closed or broke mid-exchange."""

    kind: ClassVar[str] = "reset"
    status: ClassVar[int] = 502


class UpstreamClosedError(UpstreamResetError):
    """Closed (or reset) before any byte of a response: the request may not
    have been read at all, so an idempotent one can be sent again."""


class UpstreamInvalidError(UpstreamError):
    """The upstream's response head cannot be relayed as it is: past
    ``upstream.max_header_size``, a field that is not HTTP, or a transfer
    coding we would have to drop without decoding (RFC 9112 section 6.1)."""

    kind: ClassVar[str] = "invalid"
    status: ClassVar[int] = 502


class UpstreamBusyError(UpstreamError):
    """Every pooled connection stayed busy for ``upstream.pool_timeout``
    (HAProxy's ``timeout queue``)."""

    kind: ClassVar[str] = "busy"
    status: ClassVar[int] = 503
