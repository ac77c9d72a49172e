"""Pure header logic: what crosses the gateway, what it adds.

Hop-by-hop fields (RFC 9110 section 7.6.1, plus the RFC 2616 list that Go's
ReverseProxy also strips) and every field named in ``Connection`` describe one
connection, not the message, so they are never forwarded either way.
"""

from __future__ import annotations

import math
import re
from typing import Final

from multidict import CIMultiDict, MultiMapping

from gateway.limiting.limiter import Decision

__all__ = [
    "HOP_BY_HOP",
    "OUR_RESPONSE_FIELDS",
    "OUR_UNLIMITED_RESPONSE_FIELDS",
    "VIA",
    "decimal",
    "field_pairs",
    "forwarded_for",
    "rate_limit_fields",
    "rate_limit_headers",
    "upstream_request_headers",
    "valid_host",
]


# Decimal digits of the small numbers responses carry (statuses, lengths,
# seconds, tokens), made once: compiled, b"%d" % n is a generic call into
# bytes formatting, several times a tuple lookup and a concatenation.
_DECIMALS: Final = tuple(b"%d" % n for n in range(4096))


def decimal(number: int) -> bytes:
    """``number`` in ASCII decimal digits."""
    if 0 <= number < 4096:
        return _DECIMALS[number]
    return b"%d" % number


HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
VIA: Final = "1.1 ratelimit-gateway"
# Request fields we set ourselves; the client's copies are replaced. Expect
# is answered by the gateway (100 Continue) and not passed on: the upstream's
# interim 100 would be swallowed by the client library anyway.
_SET_BY_GATEWAY: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "via",
     "expect"}
)  # fmt: skip


# RFC 9112 section 3.2 / RFC 3986 section 3.2.2: Host = uri-host [ ":" port ],
# uri-host = reg-name (IPv4address is one) / IP-literal. Not empty: nginx and
# Envoy refuse an empty Host, and this gateway has no other authority to use.
_HOST: Final = re.compile(
    r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+"  # reg-name, IPv4address
    r"|\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\])"  # IP-literal
    r"(?::[0-9]*)?"  # port
)


def valid_host(value: str) -> bool:
    """Whether ``value`` is a Host field value this gateway accepts:
    ``reg-name / IPv4 / [IPv6]`` with an optional ``:port`` (a space, a
    ``/``, a ``@`` or an empty value is not)."""
    return _HOST.fullmatch(value) is not None


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(","))


def forwarded_for(headers: MultiMapping[str]) -> str | None:
    """Every X-Forwarded-For line as one list (RFC 9110 5.3): a client must
    not hide a trusted proxy's hop behind a first line of its own."""
    lines = headers.getall("X-Forwarded-For", ())
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else ", ".join(lines)


def upstream_request_headers(
    incoming: MultiMapping[str],
    *,
    peer: str,
    scheme: str,
    request_id: str,
    peer_is_trusted: bool,
    preserve_host: bool,
    drop_underscores: bool = False,
) -> CIMultiDict[str]:
    """The headers sent upstream.

    X-Forwarded-For/-Proto/-Host from a trusted proxy are extended or kept;
    from anyone else they are replaced, so the backend never sees a client's
    forged chain as if we had vouched for it. ``drop_underscores``: fields
    whose names hold ``_`` are not sent (nginx's ``underscores_in_headers
    off``): an upstream that reads ``_`` as ``-`` (CGI, WSGI) would otherwise
    see an ``X_API_Key`` or a ``Transfer_Encoding`` the gateway never read as one.
    """
    named = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _SET_BY_GATEWAY or lower in named:
            continue
        if drop_underscores and "_" in lower:
            continue
        if lower == "host" and not preserve_host:
            continue
        out.add(name, value)
    prior_for = forwarded_for(incoming) if peer_is_trusted else None
    out["X-Forwarded-For"] = f"{prior_for}, {peer}" if prior_for else peer
    proto = incoming.get("X-Forwarded-Proto") if peer_is_trusted else None
    out["X-Forwarded-Proto"] = proto or scheme
    host = incoming.get("X-Forwarded-Host") if peer_is_trusted else None
    host = host or incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    prior_via = incoming.get("Via")
    out["Via"] = f"{prior_via}, {VIA}" if prior_via else VIA
    out["X-Request-ID"] = request_id
    return out


# The lower-case names of the fields we add to a relayed response: the
# rate-limit fields (when the route is limited) and X-Request-ID.
OUR_RESPONSE_FIELDS: Final = frozenset(
    {b"ratelimit-policy", b"ratelimit", b"x-ratelimit-limit", b"x-ratelimit-remaining",
     b"x-ratelimit-reset", b"x-request-id"}
)  # fmt: skip
OUR_UNLIMITED_RESPONSE_FIELDS: Final = frozenset({b"x-request-id"})


def rate_limit_fields(decision: Decision) -> bytes:
    """RateLimit-Policy (every limit) / RateLimit (IETF httpapi draft) and
    X-RateLimit-* (the limit that denied, else the one with the fewest
    requests left), as header lines ready to write (each ends in CRLF); b""
    when no limit applies."""
    limits = decision.limits
    if limits is None:
        return b""
    result = decision.result
    at = result.reporting
    tokens = result.tokens_left[at]
    remaining = tokens if tokens > 0 else 0
    limit = limits.limits[at]
    reset = 0 if tokens >= limit.spec.max_tokens else math.ceil(result.to_next_seconds[at])
    r, t = decimal(remaining), decimal(reset)
    p0, p1, p2, p3, p4 = limits.fields_parts[at]
    return b"".join((p0, r, p1, t, p2, r, p3, t, p4))


def field_pairs(lines: bytes) -> list[tuple[str, str]]:
    """Header lines (as ``rate_limit_fields`` makes them) as (name, value)
    pairs; values decoded as aiohttp decodes them."""
    pairs = []
    for line in lines.splitlines():
        name, _, value = line.decode("utf-8", "surrogateescape").partition(": ")
        pairs.append((name, value))
    return pairs


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """The rate-limit fields as (name, value) pairs."""
    return field_pairs(rate_limit_fields(decision))
