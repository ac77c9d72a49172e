"""Several limits per request on the MemoryStore (a ManualRefillClock, no
sleeps): hypothesis against a model, the shared ``per: route`` bucket, and
the bucket subjects ``per`` makes (``policy.subject``).

The model: a limit alone is a bucket; a request is admitted when every one
of its limits holds ``cost`` tokens (or, with ``max_wait``, when each will
within it), and only then does it take from any of them. So a denied request
never costs any limit a token, and what the limits together admit is never
more than what the strictest alone would.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.model import BucketSpec
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.policy import Client, Limit, RouteLimits, subject
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.limiting.store import BucketKey

# Binary fractions: sums of these are exact, so the model's clock (Fractions)
# and the store's (floats) agree on every boundary.
PERIODS = st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0])
NO_FIELDS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _store(max_tracked: int = 10_000) -> tuple[ManualRefillClock, MemoryStore]:
    clock = ManualRefillClock()
    return clock, MemoryStore(clock, max_tracked, idle_timeout_seconds=3600.0)


def _fields(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


SPECS = st.lists(
    st.tuples(PERIODS, st.integers(1, 4), st.integers(0, 4)),  # period, refill, extra
    min_size=1,
    max_size=4,
)
STEPS = st.lists(
    st.one_of(
        # requests: how many, client, cost, max_wait in quarter seconds (0: no queue)
        st.tuples(
            st.integers(1, 6),
            st.integers(0, 1),
            st.integers(1, 4),
            st.sampled_from([0, 0, 1, 3, 8]),
        ),
        # time: quarter seconds
        st.tuples(st.just(0), st.integers(0, 9), st.just(0), st.just(0)),
    ),
    max_size=60,
)


class Model:
    """Each limit alone, per client, on an exact clock."""

    def __init__(self, specs: list[BucketSpec]) -> None:
        self.specs = specs
        self.now = Fraction(0)
        self.tokens: dict[int, list[int]] = {}
        self.ticks = [0] * len(specs)

    def advance(self, seconds: Fraction) -> None:
        self.now += seconds
        for i, spec in enumerate(self.specs):
            ticks = math.floor(self.now / Fraction(spec.refill_period_seconds))
            owed = ticks - self.ticks[i]
            self.ticks[i] = ticks
            for tokens in self.tokens.values():
                tokens[i] = min(spec.max_tokens, tokens[i] + owed * spec.refill_tokens)

    def to_next(self, i: int) -> Fraction:
        period = Fraction(self.specs[i].refill_period_seconds)
        return (self.ticks[i] + 1) * period - self.now

    def wait(self, i: int, tokens: int, cost: int) -> Fraction:
        """Until limit i, alone, holds ``cost`` tokens."""
        missing = cost - tokens
        if missing <= 0:
            return Fraction(0)
        spec = self.specs[i]
        refills = -(-missing // spec.refill_tokens)
        return self.to_next(i) + (refills - 1) * Fraction(spec.refill_period_seconds)

    def take(self, client: int, cost: int, max_wait: Fraction) -> tuple[bool, Fraction]:
        tokens = self.tokens.setdefault(client, [spec.max_tokens for spec in self.specs])
        wait = max(self.wait(i, t, cost) for i, t in enumerate(tokens))
        if wait > max_wait:
            return False, wait
        for i in range(len(tokens)):
            tokens[i] -= cost
        return True, wait


@settings(deadline=None, max_examples=300)
@given(raw_specs=SPECS, steps=STEPS)
def test_a_request_is_admitted_iff_every_limit_alone_holds_its_cost(
    raw_specs: list[tuple[float, int, int]], steps: list[tuple[int, int, int, int]]
) -> None:
    """Over any sequence of requests (any cost, with or without a queue) and
    time steps, and any set of limits, each answer is the model's: admitted
    exactly when every limit alone has the tokens (or will within max_wait),
    and then every limit, and only then any, gives them. So no limit ever
    loses a token to a denied request."""
    specs = [
        BucketSpec(period, refill, refill + extra, f"limit-{i}")
        for i, (period, refill, extra) in enumerate(raw_specs)
    ]
    clock, store = _store()
    limits = [Limit(spec, clock) for spec in specs]
    model = Model(specs)
    admitted = [0, 0]
    for requests, client, cost, quarters in steps:
        if not requests:  # a time step of ``client`` quarters
            clock.advance(client * 0.25)
            model.advance(Fraction(client, 4))
            continue
        max_wait = Fraction(quarters, 4)
        keys: list[BucketKey] = [("/r", s.name, f"c{client}", f"c{client}") for s in specs]
        for _ in range(requests):
            result = store.take_now(keys, limits, cost, float(max_wait))
            expected, wait = model.take(client, cost, max_wait)
            assert result.admitted == expected
            assert result.tokens_left == model.tokens[client]
            to_next = [float(model.to_next(i)) for i in range(len(specs))]
            assert result.to_next_seconds == to_next
            left = result.tokens_left
            if expected:
                admitted[client] += 1
                assert result.delay_seconds == pytest.approx(float(wait))
                assert result.delay_seconds <= float(max_wait)  # never waits past max_wait
                assert left[result.reporting] == min(left)  # the fewest left
            else:
                assert result.delay_seconds == 0
                assert result.retry_after_seconds == pytest.approx(float(wait))  # all admit
                denier = result.reporting  # the limit that denied: it waits longest
                assert model.wait(denier, left[denier], cost) == wait
    for client in (0, 1):
        # Never more than the strictest limit alone allows (cost tokens each).
        if admitted[client]:
            bound = min(
                spec.max_tokens + spec.refill_tokens * ticks
                for spec, ticks in zip(specs, model.ticks, strict=True)
            )
            reserved = -min(0, *model.tokens[client])
            assert 0 < admitted[client] <= bound + reserved


@settings(deadline=None)
@given(raw_specs=SPECS, ticks=st.lists(st.integers(0, 9), max_size=25))
def test_continuous_demand_admits_at_most_what_the_strictest_limit_alone_would(
    raw_specs: list[tuple[float, int, int]], ticks: list[int]
) -> None:
    """Requests sent as fast as they are admitted: at every instant, what the
    limits together admitted so far is at most what the strictest of them
    alone would have (max_tokens + refill_tokens per period passed), and
    exactly that with one limit. (Not always exactly that with several: see
    the next test.)"""
    specs = [
        BucketSpec(period, refill, refill + extra, f"limit-{i}")
        for i, (period, refill, extra) in enumerate(raw_specs)
    ]
    clock, store = _store()
    limits = [Limit(spec, clock) for spec in specs]
    keys: list[BucketKey] = [("/r", spec.name, "c", "c") for spec in specs]
    admitted = 0
    for quarters in [0, *ticks]:
        for _ in range(max(1, quarters)):  # demand at every boundary passed
            clock.advance(0.25 if quarters else 0.0)
            while store.take_now(keys, limits).admitted:
                admitted += 1
        alone = [
            spec.max_tokens + spec.refill_tokens * limit.ticker.count
            for spec, limit in zip(specs, limits, strict=True)
        ]
        assert admitted <= min(alone)
        if len(specs) == 1:
            assert admitted == alone[0]


def test_the_strictest_limit_alone_is_a_bound_not_always_reached() -> None:
    """3 per 0.25 s (max 3) and 4 per 0.5 s (max 4), under continuous demand
    for 0.5 s: alone they would admit 9 and 8; together 7, because a refill of
    the first came while the second had nothing to pair it with, and the
    first was capped at its max. What matters holds: no token was taken by a
    denied request (the model test above), and 7 <= 8."""
    clock, store = _store()
    limits = [
        Limit(BucketSpec(0.25, 3, 3, "fast"), clock),
        Limit(BucketSpec(0.5, 4, 4, "slow"), clock),
    ]
    keys: list[BucketKey] = [("/r", "fast", "c", "c"), ("/r", "slow", "c", "c")]
    admitted = []
    for step in (0.0, 0.25, 0.25):
        clock.advance(step)
        count = 0
        while store.take_now(keys, limits).admitted:
            count += 1
        admitted.append(count)
    assert admitted == [3, 1, 3]  # fast: 3, 3 (2 + 3, capped), 3; slow: 4, -, 1 + 4


# --------------------------------------------------------------------------- per: route


def _identities(count: int) -> list[Client]:
    return [
        Client(f"key-{i}", f"10.0.{i // 256}.{i % 256}", _fields(("X-Tenant", f"t{i % 3}")))
        for i in range(count)
    ]


@settings(deadline=None)
@given(
    period=PERIODS,
    refill=st.integers(1, 10),
    extra=st.integers(0, 10),
    clients=st.integers(2, 50),
    rounds=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10**6)), max_size=20),
)
def test_a_per_route_limit_admits_max_plus_refills_across_many_clients(
    period: float,
    refill: int,
    extra: int,
    clients: int,
    rounds: list[tuple[int, int]],
) -> None:
    """One bucket for every client of the route: with demand from clients
    taking turns, the route admits exactly max_tokens + refill_tokens per
    period, however many clients there are."""
    clock, store = _store()
    spec = BucketSpec(period, refill, refill + extra, "shared", per=("route",))
    route = RouteLimits("/api", (spec,), clock)
    identities = _identities(clients)
    assert len({tuple(route.keys(identity)[0]) for identity in identities}) == 1
    admitted = 0
    for quarters, start in [(0, 0), *rounds]:
        turn = start
        for _ in range(max(1, quarters)):  # demand at every boundary passed
            clock.advance(0.25 if quarters else 0.0)
            while store.take_now(route.keys(identities[turn % clients]), route.limits).admitted:
                admitted += 1
                turn += 1
            # whoever asks next is denied too: it is one bucket
            late = store.take_now(route.keys(identities[(turn + 1) % clients]), route.limits)
            assert not late.admitted
        assert admitted == spec.max_tokens + refill * route.limits[0].ticker.count
    assert store.tracked == 1


def test_a_client_denied_by_its_own_limit_takes_nothing_from_the_shared_one() -> None:
    clock, store = _store()
    route = RouteLimits(
        "/api",
        (
            BucketSpec(3600.0, 1, 2, "/api"),  # per client
            BucketSpec(3600.0, 1, 10, "shared", per=("route",)),
        ),
        clock,
    )
    identities = _identities(3)
    results = [
        store.take_now(route.keys(who), route.limits) for who in identities for _ in "12345"
    ]
    assert [r.admitted for r in results] == ([True] * 2 + [False] * 3) * 3
    assert [r.tokens_left for r in results if r.admitted] == [
        [1, 9], [0, 8], [1, 7], [0, 6], [1, 5], [0, 4]
    ]  # fmt: skip
    denied = results[2]
    assert (denied.tokens_left, denied.reporting) == ([0, 8], 0)  # the client's own limit
    # 4 left for anyone else on the route
    newcomer = Client("key-new", "10.9.9.9", NO_FIELDS)
    assert store.take_now(route.keys(newcomer), route.limits).tokens_left == [1, 3]


# --------------------------------------------------------------------------- subjects


def test_each_per_names_its_subject() -> None:
    who = Client("key-1", "2001:db8:1:2::/64", _fields(("X-Tenant", "acme")))
    assert subject(("client",), who) == "key-1"
    assert subject(("ip",), who) == "ip:2001:db8:1:2::/64"
    assert subject(("route",), who) == "*"
    assert subject(("header:X-Tenant",), who) == "header:X-Tenant=acme"
    assert (
        subject(("ip", "header:X-Tenant"), who) == "ip:2001:db8:1:2::/64|header:X-Tenant=acme"
    )
    assert subject(("client", "ip"), who) == "key-1|ip:2001:db8:1:2::/64"


def test_header_names_match_any_case() -> None:
    who = Client("c", "10.0.0.1", _fields(("x-tenant", "acme")))
    assert subject(("header:X-Tenant",), who) == "header:X-Tenant=acme"


def test_a_missing_header_counts_as_the_ip_in_its_own_namespace() -> None:
    without = Client("key-1", "192.0.2.7", NO_FIELDS)
    assert subject(("header:X-Tenant",), without) == "header:X-Tenant@ip:192.0.2.7"
    # Nobody can send a header value that lands in the same bucket.
    for value in ("192.0.2.7", "ip:192.0.2.7", "@ip:192.0.2.7", "X-Tenant@ip:192.0.2.7"):
        forged = Client("key-2", "198.51.100.1", _fields(("X-Tenant", value)))
        assert subject(("header:X-Tenant",), forged) != subject(("header:X-Tenant",), without)
    # Two requests without it from one network share one bucket; not from another.
    same = Client("key-3", "192.0.2.7", NO_FIELDS)
    other = Client("key-1", "192.0.2.8", NO_FIELDS)
    assert subject(("header:X-Tenant",), same) == subject(("header:X-Tenant",), without)
    assert subject(("header:X-Tenant",), other) != subject(("header:X-Tenant",), without)


def test_a_value_cannot_pass_for_another_composite() -> None:
    """'|' joins the parts: a header value holding one is escaped (and so is
    '%', the escape), so no value forges a second part."""
    per = ("header:X-Tenant", "ip")
    honest = Client("c", "10.0.0.2", _fields(("X-Tenant", "a")))
    forged = Client("c", "10.0.0.1", _fields(("X-Tenant", "a|ip:10.0.0.2")))
    assert subject(per, honest) == "header:X-Tenant=a|ip:10.0.0.2"
    assert subject(per, forged) == "header:X-Tenant=a%7Cip:10.0.0.2|ip:10.0.0.1"
    percent = Client("c", "10.0.0.2", _fields(("X-Tenant", "a%7Cip:10.0.0.2")))
    assert subject(per, percent) == "header:X-Tenant=a%257Cip:10.0.0.2|ip:10.0.0.2"


PARTS = st.sampled_from(["client", "ip", "route", "header:X-Tenant", "header:X-Plan"])
IPS = st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::/64"])
# Values built from the pieces a forged composite would need.
PIECES = st.sampled_from(
    ["a", "b", "|", "%", "%7C", "%25", "=", "@", "ip:", "10.0.0.1", "10.0.0.2", "*",
     "header:X-Plan=", "header:X-Plan@ip:", "header:X-Tenant="]
)  # fmt: skip
TEXT = st.lists(PIECES, max_size=5).map("".join)
IDENTITY = st.tuples(TEXT, IPS, st.one_of(st.none(), TEXT), st.one_of(st.none(), TEXT))


def _client(raw: tuple[str, str, str | None, str | None]) -> Client:
    client, ip, tenant, plan = raw
    pairs = [(n, v) for n, v in (("X-Tenant", tenant), ("X-Plan", plan)) if v is not None]
    return Client(client, ip, _fields(*pairs))


def _meaning(per: tuple[str, ...], raw: tuple[str, str, str | None, str | None]) -> tuple:
    """What a subject stands for: the attributes its parts name."""
    client, ip, tenant, plan = raw
    out: list[tuple[str, ...]] = []
    for part in per:
        if part == "client":
            out.append(("client", client))
        elif part == "ip":
            out.append(("ip", ip))
        elif part == "route":
            out.append(("route",))
        else:
            value = tenant if part == "header:X-Tenant" else plan
            out.append(("missing", ip) if value is None else ("value", value))
    return tuple(out)


@settings(deadline=None, max_examples=1000)
@given(per=st.lists(PARTS, min_size=1, max_size=3, unique=True), a=IDENTITY, b=IDENTITY)
def test_two_identities_share_a_subject_iff_the_named_parts_agree(
    per: list[str],
    a: tuple[str, str, str | None, str | None],
    b: tuple[str, str, str | None, str | None],
) -> None:
    parts = tuple(per)
    same = subject(parts, _client(a)) == subject(parts, _client(b))
    assert same == (_meaning(parts, a) == _meaning(parts, b))


# Values and ids a forger would try: an escaped '|' sent as is, a '|' with a
# second part behind it, the missing-header form, the route's '*'.
FORGERIES = [
    None, "a", "a|", "a%7C", "a%257C", "a|header:X-Plan=b", "b", "b|header:X-Plan=c", "c",
    "@ip:10.0.0.1", "header:X-Tenant@ip:10.0.0.1", "a|ip:10.0.0.2", "*", "a|*",
]  # fmt: skip
FORGED_CLIENTS = ["a", "a|ip:10.0.0.1", "ip:10.0.0.1", "*", "a|header:X-Tenant=b", "a%7C"]


def test_no_forged_value_shares_a_subject_with_another_identity() -> None:
    """Every per (one to three parts, any order) over every combination of
    the forgeries above: two identities get one subject only when the parts
    it names agree (hypothesis draws independent identities, which seldom
    line up this way)."""
    identities = list(
        itertools.product(FORGED_CLIENTS, ["10.0.0.1", "10.0.0.2"], FORGERIES, FORGERIES)
    )
    names = ["client", "ip", "route", "header:X-Tenant", "header:X-Plan"]
    for size in (1, 2, 3):
        for per in itertools.permutations(names, size):
            meanings: dict[str, tuple] = {}
            for raw in identities:
                meaning = _meaning(per, raw)
                assert meanings.setdefault(subject(per, _client(raw)), meaning) == meaning, per


def test_route_keys_use_each_limits_subject_and_one_tag() -> None:
    clock = ManualRefillClock()
    route = RouteLimits(
        "/api",
        (
            BucketSpec(1.0, 10, 20, "/api"),
            BucketSpec(1.0, 500, 500, "/api-2", per=("route",)),
            BucketSpec(60.0, 100, 100, "/api-3", per=("ip", "header:X-Tenant")),
        ),
        clock,
    )
    who = Client("key-1", "10.0.0.1", _fields(("X-Tenant", "acme")))
    assert route.keys(who) == [
        ("/api", "", "key-1", "/api"),  # the first limit's key names no limit
        ("/api", "/api-2", "*", "/api"),
        ("/api", "/api-3", "ip:10.0.0.1|header:X-Tenant=acme", "/api"),
    ]
    # Every limit keyed on the client: tagged by the client.
    alone = RouteLimits(
        "/b", (BucketSpec(1.0, 1, 1, "/b"), BucketSpec(60.0, 5, 5, "/b-2")), clock
    )
    assert [key[3] for key in alone.keys(who)] == ["key-1", "key-1"]


# --------------------------------------------------------------------------- the table's bound


def test_a_request_near_the_bound_does_not_evict_its_own_buckets() -> None:
    """Making room for a request's second bucket must not forget its first
    (fresh, so full, so the first to go): the take from it would be lost and
    that limit would never hold. (It did, up to max_tracked of about 32.)"""
    clock, store = _store(max_tracked=3)
    slow = Limit(BucketSpec(3600.0, 1, 5, "slow"), clock)
    # Two other clients' drained buckets fill two of the three places.
    for other in ("x", "y"):
        store.take_now([("/r", "slow", other, other)], [slow])
    tight = Limit(BucketSpec(3600.0, 1, 2, "tight"), clock)
    roomy = Limit(BucketSpec(3600.0, 1, 100, "roomy"), clock)
    keys: list[BucketKey] = [("/r", "tight", "c", "c"), ("/r", "roomy", "c", "c")]
    results = [store.take_now(keys, [tight, roomy]).admitted for _ in range(5)]
    assert results == [True, True, False, False, False]
    assert store.tracked == 3


@settings(deadline=None)
@given(
    max_tracked=st.integers(1, 8),
    requests=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), max_size=60),
)
def test_the_bound_holds_and_no_request_loses_its_own_take(
    max_tracked: int, requests: list[tuple[int, int]]
) -> None:
    """Requests over one to three slow limits from a few clients against a
    tiny table: it holds max_tracked buckets at most (after a request over
    more limits than that, as many as that request has), and every answer is
    the model's, where a forgotten bucket comes back full."""
    clock, store = _store(max_tracked=max_tracked)
    specs = [BucketSpec(3600.0, 1, m, f"l{m}") for m in (2, 3, 4)]
    limits = [Limit(spec, clock) for spec in specs]
    most = 0
    for client, n in requests:
        most = max(most, n)
        keys: list[BucketKey] = [("/r", s.name, f"c{client}", f"c{client}") for s in specs[:n]]
        before = [store._buckets.get(key) for key in keys]
        tokens = [
            s.max_tokens if b is None else b.tokens for s, b in zip(specs, before, strict=False)
        ]
        result = store.take_now(keys, limits[:n])
        assert result.admitted == (min(tokens) >= 1)
        assert result.tokens_left == [t - result.admitted for t in tokens]
        assert all(key in store._buckets for key in keys)  # its own, all kept
        assert store.tracked <= max(max_tracked, most)
