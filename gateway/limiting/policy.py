"""A BucketSpec bound to the clock's ticker, with its header values precomputed
once per config (not per request)."""

from __future__ import annotations

import math

from gateway.config.model import BucketSpec
from gateway.limiting.refill_clock import RefillClock, Ticker

__all__ = ["Limit"]


class Limit:
    """One configured bucket spec, with its header templates built once."""

    __slots__ = ("fields_template", "limit_header", "policy_header", "quoted_name", "spec",
                 "ticker")  # fmt: skip

    def __init__(self, spec: BucketSpec, clock: RefillClock) -> None:
        self.spec = spec
        self.ticker: Ticker = clock.ticker(spec.refill_period_seconds)
        self.quoted_name = _sf_string(spec.name)
        # IETF httpapi ratelimit-headers: q = quota units, w = window seconds.
        window = max(1, math.ceil(spec.refill_period_seconds))
        self.policy_header = f"{self.quoted_name};q={spec.max_tokens};w={window}"
        self.limit_header = str(spec.max_tokens)
        # The response fields as one bytes %-template, filled per response
        # with (remaining, reset, remaining, reset): headers.rate_limit_fields.
        self.fields_template = (
            f"RateLimit-Policy: {_escaped(self.policy_header)}\r\n"
            f"RateLimit: {_escaped(self.quoted_name)};r=%d;t=%d\r\n"
            f"X-RateLimit-Limit: {self.limit_header}\r\n"
            "X-RateLimit-Remaining: %d\r\n"
            "X-RateLimit-Reset: %d\r\n"
        ).encode("ascii")


def _escaped(text: str) -> str:
    return text.replace("%", "%%")  # a literal in a %-template


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, quotes and backslashes escaped."""
    cleaned = "".join(c if " " <= c <= "~" else "_" for c in value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'
