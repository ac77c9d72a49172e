"""Limits as the limiter applies them: a BucketSpec bound to the clock's
ticker, a route's list of them with its bucket keys, and the response
fields, precomputed once per config (not per request)."""

from __future__ import annotations

import math
from typing import Protocol

from multidict import MultiMapping

from gateway.config.model import BucketSpec
from gateway.limiting.refill_clock import RefillClock, Ticker

__all__ = ["BucketKey", "Client", "Identity", "Limit", "RouteLimits", "subject"]

# (route label, limit name, subject, tag): one bucket. The name is "" for a
# route's first limit (its key is the one a route's one limit always had).
# The subject is whose it is: a client id, an ip network, a header's value,
# a composite of those, or the route itself (one bucket shared by every
# client). The tag groups the buckets one request takes from: on a Redis
# Cluster they must share a slot (RouteLimits.shared_tag).
BucketKey = tuple[str, str, str, str]

# The subject of a ``per: route`` bucket: one for every client of the route.
_WHOLE_ROUTE = "*"


class Identity(Protocol):
    """Who sent a request, as limits key on it: ``client`` as
    ``clients.identify_by`` says, ``ip`` the client's masked network, and the
    request's fields (``per: header:NAME``). A request (core.Call) is one."""

    @property
    def client(self) -> str: ...

    @property
    def ip(self) -> str: ...

    @property
    def headers(self) -> MultiMapping[str]: ...


class Client:
    """An ``Identity`` outside a request (the admin view of a client)."""

    __slots__ = ("client", "headers", "ip")

    def __init__(self, client: str, ip: str, headers: MultiMapping[str]) -> None:
        self.client = client
        self.ip = ip
        self.headers = headers


class Limit:
    """One configured bucket spec on the refill clock."""

    __slots__ = ("by_client", "name", "per", "policy_item", "spec", "ticker")

    def __init__(self, spec: BucketSpec, clock: RefillClock) -> None:
        self.spec = spec
        self.name = spec.name
        self.per = spec.per
        self.by_client = spec.per == ("client",)  # the common case, keyed without subject()
        self.ticker: Ticker = clock.ticker(spec.refill_period_seconds)
        # IETF httpapi ratelimit-headers: q = quota units, w = the seconds a
        # bucket takes from empty to full, so a client pacing itself at q/w
        # is never denied.
        window = spec.refill_period_seconds * math.ceil(spec.max_tokens / spec.refill_tokens)
        self.policy_item = f"{_sf_string(spec.name)};q={spec.max_tokens};w={math.ceil(window)}"


def subject(per: tuple[str, ...], identity: Identity) -> str:
    """Whose bucket: the parts ``per`` names, joined. A missing header counts
    as the client's ip, in a namespace of its own."""
    parts = []
    for part in per:
        if part == "client":
            parts.append(identity.client)
        elif part == "ip":
            parts.append("ip:" + identity.ip)
        elif part == "route":
            parts.append(_WHOLE_ROUTE)
        else:  # header:NAME
            name = part[7:]
            value = identity.headers.get(name)
            if value is None:
                parts.append(f"{part}@ip:{identity.ip}")
            else:  # escaped: a value must not pass for another composite
                parts.append(f"{part}={value.replace('%', '%25').replace('|', '%7C')}")
    return parts[0] if len(parts) == 1 else "|".join(parts)


class RouteLimits:
    """The limits one request on a route must pass, in order, and the
    response fields they make: ``RateLimit-Policy`` lists every limit;
    ``RateLimit`` and ``X-RateLimit-*`` describe one (``fields_parts[i]``:
    limit i, the text around remaining, reset, remaining, reset, which a
    response puts between them)."""

    __slots__ = ("fields_parts", "limits", "route", "shared_tag")

    def __init__(self, route: str, specs: tuple[BucketSpec, ...], clock: RefillClock) -> None:
        self.route = route
        self.limits = tuple(Limit(spec, clock) for spec in specs)
        pers = {limit.per for limit in self.limits}
        # One request's buckets share a Redis Cluster slot (a script's keys
        # must): tagged by their common subject when every limit keys on the
        # same thing, else by the route (its buckets then sit in one slot).
        self.shared_tag = route if len(pers) > 1 or ("route",) in pers else None
        policy = ", ".join(limit.policy_item for limit in self.limits)
        self.fields_parts = tuple(
            _parts(
                f"RateLimit-Policy: {policy}\r\nRateLimit: {_sf_string(limit.name)};r=",
                ";t=",
                f"\r\nX-RateLimit-Limit: {limit.spec.max_tokens}\r\nX-RateLimit-Remaining: ",
                "\r\nX-RateLimit-Reset: ",
                "\r\n",
            )
            for limit in self.limits
        )

    def keys(self, identity: Identity) -> list[BucketKey]:
        """The bucket of each limit for ``identity``. The first limit's key
        names no limit (so a route's one limit keeps the key it always had);
        the others carry their names, unique within the list."""
        route = self.route
        if len(self.limits) == 1:
            limit = self.limits[0]
            who = identity.client if limit.by_client else subject(limit.per, identity)
            return [(route, "", who, self.shared_tag or who)]
        keys = []
        for i, limit in enumerate(self.limits):
            who = subject(limit.per, identity)
            keys.append((route, limit.name if i else "", who, self.shared_tag or who))
        return keys


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, quotes and backslashes escaped."""
    cleaned = "".join(c if " " <= c <= "~" else "_" for c in value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parts(*texts: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The fields' text around their four numbers, as bytes."""
    p0, p1, p2, p3, p4 = (text.encode("ascii") for text in texts)
    return p0, p1, p2, p3, p4
