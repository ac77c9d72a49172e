"""The rules between keys, checked on built model objects.

Converters (``gateway.config.convert``) judge one value; these judge values
together. Each rule returns ``(key path, message)``: the loader places the
problem at the node of that key path, or of the nearest enclosing key when the
file does not hold it, so it still reads ``PATH:LINE:COL: key.path: message``.

A rule that compares against a value the file never wrote (a default, or a
size a limit inherits) says so: "max_tokens (default 20) is below
refill_tokens 50" points at the key to add, where "max_tokens (20) must be at
least refill_tokens (50)" would send the user looking for a 20 that is not in
the file. ``Written`` tells the rules what the file holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.config.model import (
    DEFAULT_UPSTREAM,
    MIN_REFILL_PERIOD_SECONDS,
    BucketSpec,
    GatewayConfig,
    RouteSpec,
    Unlimited,
    UpstreamConfig,
)

__all__ = [
    "DEFAULT",
    "Problem",
    "Written",
    "bucket_problems",
    "config_problems",
    "limit_list_problems",
    "route_problems",
    "server_address",
    "upstream_problems",
]

Problem = tuple[str, str]  # (key path, message)

# Where a value the file does not hold comes from: the built-in default.
DEFAULT = "default"


def _nothing_inherited(_bucket: BucketSpec) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Written:
    """What the file holds. ``keys``: the key paths it writes (None: every
    key, as for a model built in code). ``inherited``: for a bucket, the sizes
    it does not write (by YAML key), each with where its value comes from:
    ``DEFAULT``, or the key path of the limit it refines."""

    keys: Container[str] | None = None
    inherited: Callable[[BucketSpec], Mapping[str, str]] = field(default=_nothing_inherited)

    def holds(self, key: str) -> bool:
        return self.keys is None or key in self.keys


EVERYTHING: Written = Written()


def _said(name: str, value: object, origin: str | None) -> str:
    """``max_tokens 5``, ``max_tokens (default 20)``,
    ``max_tokens (20, from limits.default)``."""
    return f"{name} {_value(value, origin)}"


def _value(value: object, origin: str | None) -> str:
    if origin is None:
        return str(value)
    if origin == DEFAULT:
        return f"(default {value})"
    return f"({value}, from {origin})"


def bucket_problems(
    bucket: BucketSpec,
    key: str,
    *,
    read_cleanly: bool,
    inherited: Mapping[str, str] | None = None,
) -> list[Problem]:
    """One bucket's rules. The loader checks each bucket as soon as it is built,
    before routes and overrides inherit its keys: a bad ``limits.default`` is
    reported once, not again at every route that inherits from it.

    ``read_cleanly``: every key of this bucket converted. The sizes are compared
    only then: a key that failed stands in with a default the user never wrote.
    ``inherited``: the sizes this bucket does not write and where they come
    from (see ``Written``); the message names them as such.
    """
    period = bucket.refill_period_seconds
    if period < MIN_REFILL_PERIOD_SECONDS:
        return [
            (
                f"{key}.refill_period",
                f"must be at least 10ms (the refill clock's resolution), got {period}s",
            )
        ]
    if read_cleanly and bucket.max_tokens < bucket.refill_tokens:
        return [(f"{key}.max_tokens", _sizes_message(bucket, inherited or {}))]
    return []


def _sizes_message(bucket: BucketSpec, inherited: Mapping[str, str]) -> str:
    most, refill = bucket.max_tokens, bucket.refill_tokens
    if "max_tokens" in inherited:
        said = _said("refill_tokens", refill, inherited.get("refill_tokens"))
        return (
            f"{_said('max_tokens', most, inherited['max_tokens'])} is below {said}; "
            f"write max_tokens here too (at least {refill})"
        )
    if "refill_tokens" in inherited:
        return (
            f"max_tokens {most} is below "
            f"{_said('refill_tokens', refill, inherited['refill_tokens'])}; "
            f"write refill_tokens here too (at most {most})"
        )
    return f"max_tokens ({most}) must be at least refill_tokens ({refill})"


def limit_list_problems(buckets: Sequence[BucketSpec | None], key: str) -> list[Problem]:
    """A list of limits (``key[i]``; None: an item that did not read): each
    needs a name of its own, as RateLimit-Policy lists them side by side."""
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for i, bucket in enumerate(buckets):
        if bucket is None:
            continue
        if bucket.name in first:
            problems.append(
                (
                    f"{key}[{i}].name",
                    f"{bucket.name!r} is also the name of {key}[{first[bucket.name]}]; "
                    "each limit of a list needs a name of its own",
                )
            )
        else:
            first[bucket.name] = i
    return problems


def config_problems(
    config: GatewayConfig, *, unread: Collection[str] = (), written: Written = EVERYTHING
) -> list[Problem]:
    """The rules across sections, on the whole built config.

    ``unread``: the key paths of problems already found while reading. A rule
    skips a part under one of them: that part holds a stand-in the file never
    said (a route with a bad ``path_prefix`` reads as ``/``), and judging it
    would report problems that do not exist. ``written``: what the file holds,
    so a rule can say when it compared against a default."""
    problems = route_problems(config, unread=unread, written=written)
    problems += upstream_problems(config.upstream, "upstream", unread=unread)
    for name, upstream in config.upstreams.items():
        problems += upstream_problems(upstream, f"upstreams.{name}", unread=unread)
    listen, admin = config.listen_port, config.admin_port
    if listen != 0 and listen == admin and _same_host(config.listen_host, config.admin_host):
        if not written.holds("admin"):
            message = (
                f"port {admin} (the default admin address, {config.admin_host}:{admin}) "
                "is the proxy listener's too; write admin with a port of its own"
            )
        elif not written.holds("listen"):
            message = (
                f"port {admin} is the proxy listener's too (listen's default, "
                f"{config.listen_host}:{listen}); the admin listener needs its own"
            )
        else:
            message = (
                f"port {admin} is the proxy listener's too; the admin listener needs its own"
            )
        problems.append(("admin", message))
    workers = config.workers
    if workers > 1 and config.storage.backend == "memory":
        backend = "storage.backend: memory"
        if not written.holds("storage.backend"):
            backend += " (the default)"
        problems.append(
            (
                "workers",
                f"{workers} workers with {backend} would give every client "
                f"{workers}x its limit (each process has its own buckets); "
                "set storage.backend: redis to share buckets, or workers: 1",
            )
        )
    return problems


# -- upstreams --


def server_address(url: str) -> str:
    """``host:port`` of a server URL, as nginx's ``$upstream_addr`` writes
    it (``[::1]:8000`` for IPv6): its name in metrics and the access log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def upstream_problems(
    upstream: UpstreamConfig, key: str, *, unread: Collection[str] = ()
) -> list[Problem]:
    """Exactly one of ``url`` and ``servers``; no server twice (one address,
    one pool, one line in gateway_upstream_server_up)."""
    if key in unread or not (_clean(unread, f"{key}.url") and _clean(unread, f"{key}.servers")):
        return []  # a value that did not read stands in: nothing to compare
    if upstream.url and upstream.servers:
        return [
            (
                f"{key}.servers",
                "url and servers are both given; write url for one server, "
                "or list every server under servers",
            )
        ]
    if not upstream.url and not upstream.servers:
        return [
            (
                f"{key}.url",
                "is required (the backend being fronted), or servers: [URL, ...] for several",
            )
        ]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, url in enumerate(upstream.servers):
        address = server_address(url)
        if address in seen:
            problems.append(
                (
                    f"{key}.servers",
                    f"servers[{i}] ({url}) is the server servers[{seen[address]}] "
                    f"already names ({address}); list each server once",
                )
            )
        else:
            seen[address] = i
    return problems


def _same_host(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::")
    return a == b or a in wildcard or b in wildcard


# -- routes --


def route_problems(
    config: GatewayConfig, *, unread: Collection[str] = (), written: Written = EVERYTHING
) -> list[Problem]:
    """Each route's keys against its limits and drain_timeout; routes that no
    request can reach."""
    problems: list[Problem] = []
    clean = [_clean(unread, f"routes[{i}]") for i in range(len(config.routes))]
    for i, route in enumerate(config.routes):
        if not clean[i]:
            continue
        key = f"routes[{i}]"
        if isinstance(route.limit, Unlimited):
            problems.extend(_unlimited_problems(route, key))
            continue
        limits_clean = _clean(unread, "limits")
        if route.cost > 1 and (isinstance(route.limit, tuple) or limits_clean):
            problems.extend(_cost_problems(config, route, key, written, limits_clean))
        queue = route.queue
        if (
            queue is not None
            and queue.max_wait_seconds > config.drain_timeout_seconds
            and _clean(unread, "drain_timeout")
        ):
            wait = _duration(queue.max_wait_seconds)
            if not written.holds(f"{key}.queue.max_wait"):
                wait += " (the default)"
            drain = _duration(config.drain_timeout_seconds)
            if not written.holds("drain_timeout"):
                drain = f"default {drain}"
            problems.append(
                (
                    f"{key}.queue.max_wait",
                    f"{wait} is longer than drain_timeout ({drain}): a drain must answer "
                    "every queued request within drain_timeout",
                )
            )
    problems.extend(_unreachable(config.routes, clean))
    problems.extend(_unknown_upstreams(config, clean, unread))
    return problems


def _unknown_upstreams(
    config: GatewayConfig, clean: Sequence[bool], unread: Collection[str]
) -> list[Problem]:
    """A route's ``upstream`` names ``upstream`` ("default") or one of
    ``upstreams``; a name whose upstream had a problem was left out of
    ``upstreams`` and is not reported twice."""
    problems: list[Problem] = []
    names = [DEFAULT_UPSTREAM, *config.upstreams]
    for i, route in enumerate(config.routes):
        name = route.upstream
        if not clean[i] or name is None or name in names:
            continue
        if not _clean(unread, f"upstreams.{name}"):
            continue
        defined = (
            f"upstreams defines {', '.join(repr(n) for n in config.upstreams)}"
            if config.upstreams
            else "no upstreams are defined"
        )
        problems.append(
            (
                f"routes[{i}].upstream",
                f"no upstream named {name!r}: {defined} ('default' is `upstream`)",
            )
        )
    return problems


def _unlimited_problems(route: RouteSpec, key: str) -> list[Problem]:
    """Keys that do nothing on ``limit: unlimited`` (it takes no tokens): said
    so rather than ignored, as they suggest a limit the user expects."""
    problems: list[Problem] = []
    why = "an unlimited route takes no tokens"
    if route.cost != 1:
        problems.append((f"{key}.cost", f"{why}; remove cost or give the route a limit"))
    if route.queue is not None:
        problems.append(
            (f"{key}.queue", f"{why}, so nothing waits; remove queue or give the route a limit")
        )
    if route.count_statuses is not None:
        problems.append(
            (
                f"{key}.count_statuses",
                f"{why}, so none are given back; remove count_statuses or give the "
                "route a limit",
            )
        )
    return problems


def _cost_problems(
    config: GatewayConfig, route: RouteSpec, key: str, written: Written, limits_clean: bool
) -> list[Problem]:
    """A cost above a limit's max_tokens: a bucket never holds that many tokens,
    so such a request would be denied for ever. The limits are the route's
    own, or else limits.default and every override (a client with an
    override passes its override's limits on this route)."""
    passed: list[tuple[BucketSpec, str]]
    if isinstance(route.limit, tuple):
        passed = [(bucket, f"{key}.limit") for bucket in route.limit]
    else:
        passed = [(bucket, "limits.default") for bucket in config.limits.default]
        passed += [
            (bucket, f"limits.overrides[{i}], client {override.client!r}")
            for i, override in enumerate(config.limits.overrides)
            for bucket in override.buckets
        ]
    bucket, where = min(passed, key=lambda pair: pair[0].max_tokens)
    if route.cost <= bucket.max_tokens:
        return []
    origin = written.inherited(bucket).get("max_tokens")
    if origin is not None and not limits_clean:
        return []  # inherited from a limits section with problems: maybe a stand-in
    most = f"({bucket.max_tokens})" if origin is None else _value(bucket.max_tokens, origin)
    return [
        (
            f"{key}.cost",
            f"{route.cost} is more than max_tokens {most} of the limit "
            f"{bucket.name!r} ({where}): such a request could never be admitted",
        )
    ]


def _unreachable(routes: Sequence[RouteSpec], clean: Sequence[bool]) -> list[Problem]:
    """Routes no request reaches: the first match wins, so a route is dead when
    earlier routes whose ``path_prefix`` starts its own (a string prefix, as
    matching is) together match all of its methods."""
    problems: list[Problem] = []
    for j, route in enumerate(routes):
        if not clean[j]:
            continue
        earlier = [
            i
            for i in range(j)
            if clean[i] and route.path_prefix.startswith(routes[i].path_prefix)
        ]
        covering = _covering(routes, earlier, route.methods)
        if covering:
            names = " and ".join(_describe(routes, i) for i in covering)
            verb = "matches" if len(covering) == 1 else "match"
            problems.append(
                (
                    f"routes[{j}].path_prefix",
                    f"unreachable: {names} {verb} every request it would",
                )
            )
    return problems


def _covering(
    routes: Sequence[RouteSpec], earlier: list[int], methods: frozenset[str] | None
) -> list[int]:
    """The earlier routes that take all of ``methods`` (None: every method), or
    [] when some method gets through."""
    for i in earlier:
        if routes[i].methods is None:
            return [i]
    if methods is None:
        return []  # only a route without methods takes every method
    taken: set[str] = set()
    covering = []
    for i in earlier:
        more = (routes[i].methods or frozenset()) & (methods - taken)
        if more:
            covering.append(i)
            taken |= more
    return covering if taken == methods else []


def _describe(routes: Sequence[RouteSpec], i: int) -> str:
    route = routes[i]
    methods = "" if route.methods is None else f", methods {', '.join(sorted(route.methods))}"
    return f"routes[{i}] (path_prefix {route.path_prefix!r}{methods})"


def _clean(unread: Collection[str], key: str) -> bool:
    """No problem was found at ``key`` or under it."""
    return not any(found == key or found.startswith((f"{key}.", f"{key}[")) for found in unread)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
