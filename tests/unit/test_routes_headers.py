"""Route matching, path normalisation, and the pure header logic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import parse_config
from gateway.config.model import BucketSpec
from gateway.headers import (
    VIA,
    decimal,
    rate_limit_fields,
    rate_limit_headers,
    upstream_request_headers,
)
from gateway.limiting.limiter import ALLOWED, DENIED, UNLIMITED, Decision
from gateway.limiting.policy import RouteLimits
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.limiting.routes import DEFAULT_ROUTE_LABEL, RouteTable, normalise_path
from gateway.limiting.store import TakeResult
from gateway.raw_response import response_head
from gateway.responses import rate_limited

ROUTES_YAML = """
upstream: {url: "http://127.0.0.1:8000"}
mode: MODE
routes:
  - path_prefix: /login
    limit: {refill_period: 1m, refill_tokens: 5, max_tokens: 5}
  - path_prefix: /api/v1/admin
    limit: {refill_period: 1s, refill_tokens: 1, max_tokens: 1}
  - path_prefix: /api
    mode: enforce
  - path_prefix: /healthz
    limit: unlimited
  - path_prefix: /beta
    mode: shadow
"""


def _table(mode: str = "enforce") -> RouteTable:
    config = parse_config(ROUTES_YAML.replace("MODE", mode))
    return RouteTable(config, ManualRefillClock())


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


# -- route table --


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/login", "/login"),
        ("/login/reset", "/login"),
        ("/api/v1/admin/users", "/api/v1/admin"),  # listed before /api: it wins
        ("/api/v1/users", "/api"),
        ("/healthz", "/healthz"),
        ("/beta/x", "/beta"),
        ("/", DEFAULT_ROUTE_LABEL),
        ("/other", DEFAULT_ROUTE_LABEL),
        ("/Login", DEFAULT_ROUTE_LABEL),
    ],
)
def test_first_matching_prefix_wins(path: str, label: str) -> None:
    assert _table().match(path).label == label


def test_first_match_wins_even_when_a_later_prefix_is_longer() -> None:
    # /api takes GET only: a config where /api/login is reachable (for the
    # other methods), as one where /api takes every method is refused.
    yaml_text = (
        "upstream: {url: 'http://x'}\n"
        "routes:\n"
        "  - path_prefix: /api\n"
        "    methods: [GET]\n"
        "    limit: unlimited\n"
        "  - path_prefix: /api/login\n"
        "    limit: {refill_tokens: 1, max_tokens: 3}\n"
    )
    table = RouteTable(parse_config(yaml_text), ManualRefillClock())
    assert table.match("/api/login", "GET").label == "/api"
    assert table.match("/api/login", "POST").label == "/api/login"


def test_route_limits_and_default_route() -> None:
    table = _table()
    login = table.match("/login")
    assert login.limits is not None
    assert [limit.spec for limit in login.limits.limits] == [BucketSpec(60.0, 5, 5, "/login")]
    assert not login.unlimited
    healthz = table.match("/healthz")
    assert (healthz.unlimited, healthz.limits) == (True, None)
    api = table.match("/api/x")
    assert (api.unlimited, api.limits) == (False, None)  # override, else limits.default
    default = table.match("/elsewhere")
    assert default is table.default
    assert (default.label, default.limits, default.unlimited) == ("default", None, False)
    assert table.labels == ("default", "/login", "/api/v1/admin", "/api", "/healthz", "/beta")


def test_no_routes_always_default() -> None:
    table = RouteTable(parse_config("upstream: {url: 'http://x'}\n"), ManualRefillClock())
    assert table.match("/login").label == DEFAULT_ROUTE_LABEL
    assert table.labels == ("default",)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("//login", "/login"),
        ("/./login", "/login"),
        ("/x/../login", "/login"),
        ("/../login", "/login"),
        ("/api//v1//admin/x", "/api/v1/admin"),
        ("/login/../other", DEFAULT_ROUTE_LABEL),
    ],
)
def test_matching_uses_the_normalised_path(path: str, label: str) -> None:
    assert _table().match(path).label == label


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/login", "/login"),
        ("/login/", "/login/"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/../../b", "/b"),
        ("//a//b", "/a/b"),
        ("///a", "/a"),
        ("/a//b/", "/a/b/"),
        ("/a/./", "/a/"),
        ("/a/..", "/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/", "/"),
    ],
)
def test_normalise_path(path: str, normal: str) -> None:
    assert normalise_path(path) == normal


def test_shadow_mode_global_and_per_route() -> None:
    enforcing = _table("enforce")
    assert not enforcing.default.shadow
    assert not enforcing.match("/login").shadow
    assert enforcing.match("/beta").shadow  # the route's own mode wins
    shadow = _table("shadow")
    assert shadow.default.shadow
    assert shadow.match("/login").shadow  # no mode of its own: the global one
    assert not shadow.match("/api/x").shadow  # mode: enforce beats global shadow
    assert shadow.match("/beta").shadow


# -- headers sent upstream --


def _upstream(
    incoming: CIMultiDictProxy[str],
    *,
    trusted: bool = False,
    preserve_host: bool = True,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        incoming,
        peer="203.0.113.7",
        scheme="http",
        request_id="req-1",
        peer_is_trusted=trusted,
        preserve_host=preserve_host,
    )


def test_hop_by_hop_headers_are_dropped() -> None:
    incoming = _headers(
        ("Host", "example.com"),
        ("Connection", "keep-alive, X-Secret"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Authenticate", "Basic"),
        ("X-Secret", "connection-scoped"),
        ("Accept", "text/html"),
        ("Authorization", "Bearer t"),
    )
    out = _upstream(incoming)
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Trailer",
        "Proxy-Authorization",
        "Proxy-Authenticate",
        "X-Secret",
    ):
        assert name not in out, name
    assert out["Host"] == "example.com"
    assert out["Accept"] == "text/html"
    assert out["Authorization"] == "Bearer t"


def test_header_named_in_a_second_connection_line_is_dropped() -> None:
    incoming = _headers(("Connection", "close"), ("Connection", "X-A"), ("X-A", "1"))
    assert "X-A" not in _upstream(incoming)


def test_end_to_end_headers_keep_duplicates_and_order() -> None:
    incoming = _headers(("Accept", "a"), ("X-Multi", "1"), ("X-Multi", "2"))
    out = _upstream(incoming)
    assert out.getall("X-Multi") == ["1", "2"]


def test_forwarded_for_from_an_untrusted_peer_is_replaced() -> None:
    incoming = _headers(
        ("Host", "example.com"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    )
    out = _upstream(incoming)
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["example.com"]


def test_forwarded_for_from_a_trusted_peer_is_appended() -> None:
    incoming = _headers(
        ("Host", "internal:8080"),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
    )
    out = _upstream(incoming, trusted=True)
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["public.example"]


def test_trusted_peer_without_forwarded_headers() -> None:
    out = _upstream(_headers(("Host", "example.com")), trusted=True)
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["example.com"]


def test_several_forwarded_for_lines_from_a_trusted_peer_are_all_kept() -> None:
    """RFC 9110 section 5.3: field lines of one name are one comma-separated list.
    Keeping only the first line would drop the hops a trusted proxy appended."""
    incoming = _headers(
        ("X-Forwarded-For", "192.0.2.1"),
        ("X-Forwarded-For", "198.51.100.1"),
    )
    out = _upstream(incoming, trusted=True)
    assert out.getall("X-Forwarded-For") == ["192.0.2.1, 198.51.100.1, 203.0.113.7"]


def test_via_is_appended() -> None:
    assert _upstream(_headers()).getall("Via") == [VIA]
    out = _upstream(_headers(("Via", "1.0 edge")))
    assert out.getall("Via") == [f"1.0 edge, {VIA}"]
    assert VIA == "1.1 ratelimit-gateway"


def test_request_id_is_set_once() -> None:
    out = _upstream(_headers(("X-Request-ID", "client-sent")))
    assert out.getall("X-Request-ID") == ["req-1"]
    assert _upstream(_headers()).getall("X-Request-ID") == ["req-1"]


def test_host_dropped_when_not_preserved() -> None:
    out = _upstream(_headers(("Host", "example.com")), preserve_host=False)
    assert "Host" not in out
    assert out["X-Forwarded-Host"] == "example.com"


# -- headers sent downstream --


def downstream_response_headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    """The fields ``response_head`` (the one response-field filter of both
    paths) relays of an upstream head, less the framing and Date it adds."""
    raw = [(name.encode(), value.encode()) for name, value in pairs]
    head = response_head(
        200, b"OK", raw, b"", replaced=frozenset(), content_length=None,
        chunked=False, keep_alive=True, http10=False,
    )  # fmt: skip
    out: CIMultiDict[str] = CIMultiDict()
    for line in head.decode().split("\r\n")[1:]:
        if line:
            name, _, value = line.partition(": ")
            out.add(name, value)
    out.popall("Date", None)
    return out


def test_downstream_drops_content_length_and_hop_by_hop() -> None:
    out = downstream_response_headers(
        ("Content-Length", "12"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Internal"),
        ("Keep-Alive", "timeout=5"),
        ("X-Internal", "1"),
        ("Content-Type", "text/plain"),
    )
    assert list(out.items()) == [("Content-Type", "text/plain")]


def test_downstream_keeps_duplicate_set_cookie_in_order() -> None:
    out = downstream_response_headers(
        ("Set-Cookie", "a=1; Path=/"),
        ("Content-Type", "text/html"),
        ("Set-Cookie", "b=2; HttpOnly"),
        ("Set-Cookie", "c=3, d=4"),
        ("Cache-Control", "no-store"),
        ("Cache-Control", "private"),
    )
    assert out.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly", "c=3, d=4"]
    assert out.getall("Cache-Control") == ["no-store", "private"]
    assert out["Content-Type"] == "text/html"


# -- rate-limit headers --


def _decision(
    spec: BucketSpec, tokens_left: int, reset: float, outcome: str = ALLOWED
) -> Decision:
    """One limit's decision: ``reset`` is the time to its next refill, and a
    denied request's retry-after."""
    limits = RouteLimits("default", (spec,), ManualRefillClock())
    result = TakeResult(outcome != DENIED, [tokens_left], [reset], reset, 0)
    return Decision(outcome, limits, result)


def test_rate_limit_headers_format() -> None:
    decision = _decision(BucketSpec(1.0, 10, 20), tokens_left=7, reset=0.4)
    assert rate_limit_headers(decision) == [
        # w: 2 s from empty to full (10 per second up to 20), so pacing at q/w
        # = 10/s is never denied; q=20;w=1 would tell clients 20/s.
        ("RateLimit-Policy", '"default";q=20;w=2'),
        ("RateLimit", '"default";r=7;t=1'),
        ("X-RateLimit-Limit", "20"),
        ("X-RateLimit-Remaining", "7"),
        ("X-RateLimit-Reset", "1"),
    ]


def test_rate_limit_headers_when_denied_and_for_a_route_policy() -> None:
    decision = _decision(BucketSpec(60.0, 5, 5, "/login"), 0, 42.2, DENIED)
    assert dict(rate_limit_headers(decision)) == {
        "RateLimit-Policy": '"/login";q=5;w=60',
        "RateLimit": '"/login";r=0;t=43',
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "43",
    }


@pytest.mark.parametrize(
    ("spec", "window"),
    [
        (BucketSpec(0.25, 1, 4), 1),  # 4 refills of 0.25 s
        (BucketSpec(0.25, 4, 4), 1),  # 0.25 s: whole seconds, at least 1
        (BucketSpec(1.5, 1, 1), 2),  # 1.5 s, rounded up
        (BucketSpec(1.0, 2, 5), 3),  # ceil(5 / 2) refills
    ],
)
def test_rate_limit_window_is_the_time_from_empty_to_full(
    spec: BucketSpec, window: int
) -> None:
    """w = refill_period * ceil(max_tokens / refill_tokens) in whole seconds,
    at least one: a client pacing itself at q/w is never denied."""
    decision = _decision(spec, 0, 0.1)
    headers = dict(rate_limit_headers(decision))
    assert headers["RateLimit-Policy"] == f'"default";q={spec.max_tokens};w={window}'
    assert headers["RateLimit"] == '"default";r=0;t=1'


HOURLY = BucketSpec(3600.0, 1000, 1000, "hourly")


def _several(
    tokens_left: list[int], to_next: list[float], reporting: int, admitted: bool = True
) -> Decision:
    """A decision over limits.default's 10/s burst 20 and 1000/h."""
    limits = RouteLimits("default", (BucketSpec(1.0, 10, 20), HOURLY), ManualRefillClock())
    retry_after = max(to_next)
    result = TakeResult(admitted, tokens_left, to_next, retry_after, reporting)
    return Decision(ALLOWED if admitted else DENIED, limits, result)


def test_several_limits_are_all_in_the_policy_and_one_is_reported() -> None:
    headers = dict(rate_limit_headers(_several([15, 3], [0.5, 1200.2], reporting=1)))
    assert headers == {
        "RateLimit-Policy": '"default";q=20;w=2, "hourly";q=1000;w=3600',
        "RateLimit": '"hourly";r=3;t=1201',
        "X-RateLimit-Limit": "1000",
        "X-RateLimit-Remaining": "3",
        "X-RateLimit-Reset": "1201",
    }
    headers = dict(rate_limit_headers(_several([2, 900], [0.5, 1200.2], reporting=0)))
    assert headers["RateLimit-Policy"] == '"default";q=20;w=2, "hourly";q=1000;w=3600'
    assert headers["RateLimit"] == '"default";r=2;t=1'
    assert headers["X-RateLimit-Limit"] == "20"
    assert headers["X-RateLimit-Remaining"] == "2"


def test_a_reservation_below_zero_reports_none_remaining() -> None:
    headers = dict(rate_limit_headers(_several([-2, 990], [0.5, 1200.2], reporting=0)))
    assert headers["RateLimit"] == '"default";r=0;t=1'
    assert headers["X-RateLimit-Remaining"] == "0"


def test_a_denial_by_one_of_several_limits() -> None:
    decision = _several([12, 0], [0.3, 55.2], reporting=1, admitted=False)
    headers = dict(rate_limit_headers(decision))
    assert headers["RateLimit"] == '"hourly";r=0;t=56'
    assert headers["X-RateLimit-Limit"] == "1000"
    data, _sent = rate_limited(decision, "r", keep_alive=True, http10=False, head_only=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b'{"error": "rate_limited", "retry_after": 56}'
    assert b"Retry-After: 56" in head.split(b"\r\n")


def test_rate_limit_reset_zero_when_full() -> None:
    headers = dict(rate_limit_headers(_decision(BucketSpec(1.0, 10, 20), 20, 0.0)))
    assert headers["RateLimit"] == '"default";r=20;t=0'
    assert headers["X-RateLimit-Reset"] == "0"


def test_policy_name_is_a_quoted_sf_string() -> None:
    decision = _decision(BucketSpec(1.0, 1, 1, 'we"ird\\name'), 0, 1.0)
    headers = dict(rate_limit_headers(decision))
    assert headers["RateLimit-Policy"] == '"we\\"ird\\\\name";q=1;w=1'


def test_unlimited_decision_has_no_rate_limit_headers() -> None:
    result = TakeResult(True, [0], [0.0], 0.0, 0)
    assert rate_limit_headers(Decision(UNLIMITED, None, result)) == []


def test_percent_in_a_route_name_is_written_as_is() -> None:
    # The fields were once filled from a bytes %-template built per config.
    decision = _decision(BucketSpec(1.0, 1, 3, "/a%d%s%%"), 2, 1.0)
    headers = dict(rate_limit_headers(decision))
    assert headers["RateLimit-Policy"] == '"/a%d%s%%";q=3;w=3'
    assert headers["RateLimit"] == '"/a%d%s%%";r=2;t=1'
    assert rate_limit_fields(decision) == (
        b'RateLimit-Policy: "/a%d%s%%";q=3;w=3\r\nRateLimit: "/a%d%s%%";r=2;t=1\r\n'
        b"X-RateLimit-Limit: 3\r\nX-RateLimit-Remaining: 2\r\nX-RateLimit-Reset: 1\r\n"
    )


def test_rate_limited_answer_framing() -> None:
    decision = _decision(BucketSpec(10.0, 1, 1), 0, 9.2, DENIED)
    data, sent = rate_limited(
        decision, "caf\udcc3\udca9", keep_alive=True, http10=False, head_only=False
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b'{"error": "rate_limited", "retry_after": 10}'
    assert sent == len(body)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 429 Too Many Requests"
    assert b"Retry-After: 10" in lines
    assert b"X-Request-ID: caf\xc3\xa9" in lines  # the client's bytes, back unchanged
    assert b"Content-Length: %d" % len(body) in lines
    assert not any(line.startswith(b"Connection:") for line in lines)
    head_only, sent = rate_limited(
        decision, "r", keep_alive=False, http10=False, head_only=True
    )
    assert head_only.endswith(b"Connection: close\r\n\r\n")
    assert sent == 0
    keep_alive_10, _ = rate_limited(
        decision, "r", keep_alive=True, http10=True, head_only=False
    )
    assert b"\r\nConnection: keep-alive\r\n" in keep_alive_10


def test_response_head_adds_date_when_the_upstreams_is_named_in_connection() -> None:
    upstream = [(b"Date", b"Mon, 01 Jan 2001 00:00:00 GMT"), (b"Connection", b"Date")]
    head = response_head(
        200, b"OK", upstream, b"X-Request-ID: r\r\n",
        replaced=frozenset({b"x-request-id"}), content_length=0, chunked=False,
        keep_alive=True, http10=False,
    )  # fmt: skip
    lines = head.split(b"\r\n")
    dates = [line for line in lines if line.lower().startswith(b"date:")]
    assert len(dates) == 1
    assert b"2001" not in dates[0]  # the upstream's was hop-by-hop: ours instead
    assert head.endswith(b"\r\n\r\n")
    assert b"\r\n\r\n" not in head[:-4]


@given(st.integers(min_value=0, max_value=10**12) | st.integers(min_value=4090, max_value=4100))
def test_decimal_is_the_numbers_ascii_digits(number: int) -> None:
    """The table of small numbers and the fallback past it agree with str()."""
    assert decimal(number) == str(number).encode("ascii")
