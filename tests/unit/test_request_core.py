"""The request core (gateway/core.py) without sockets: a stepped refill clock,
the memory store, metrics on a fresh registry, and RequestHeads built by
hand, as h11's tests drive its state machine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from gateway.access_log import FIELDS, AccessLog
from gateway.config import parse_config
from gateway.core import (
    CLIENT_CLOSED_STATUS,
    Call,
    Deny,
    Forward,
    Idle,
    Refuse,
    RequestCore,
    RequestHead,
    Snapshot,
)
from gateway.errors import UpstreamConnectError, UpstreamTimeoutError
from gateway.headers import OUR_RESPONSE_FIELDS, OUR_UNLIMITED_RESPONSE_FIELDS
from gateway.limiting.limiter import ALLOWED, DENIED, UNLIMITED
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.metrics import Metrics
from gateway.responses import error_answer

PEER = "203.0.113.7"

CONFIG_YAML = """
upstream: {url: "http://127.0.0.1:8000"}
max_body_size: 100
clients:
  identify_by: IDENTIFY_BY
  header: X-API-Key
  max_concurrent: 2
limits:
  default: {refill_period: 1s, refill_tokens: 1, max_tokens: 2}
routes:
  - path_prefix: /login
    limit: {refill_period: 1m, refill_tokens: 1, max_tokens: 1}
  - path_prefix: /healthz
    limit: unlimited
"""


@dataclass
class Rig:
    core: RequestCore
    clock: ManualRefillClock
    registry: CollectorRegistry
    access_log: AccessLog

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def decisions(self, route: str = "default") -> dict[str, float]:
        return {
            outcome: self.sample("gateway_requests_total", route=route, decision=outcome)
            for outcome in (ALLOWED, DENIED, UNLIMITED, "shadow_denied")
        }

    def responses(self, code: int, route: str = "default") -> float:
        return self.sample("gateway_responses_total", route=route, code=str(code))


def _rig(identify_by: str = "ip", log_path: str = "off") -> Rig:
    config = parse_config(CONFIG_YAML.replace("IDENTIFY_BY", identify_by))
    clock = ManualRefillClock()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    store = MemoryStore(clock, config.clients.max_tracked, config.clients.idle_timeout_seconds)
    access_log = AccessLog(log_path, 100, metrics.access_log_dropped)
    core = RequestCore(Snapshot(config, clock, store), metrics, access_log)
    return Rig(core, clock, registry, access_log)


@pytest.fixture
def rig() -> Rig:
    return _rig()


def _head(
    target: str = "/",
    *headers: tuple[str, str],
    method: str = "GET",
    peer: str = PEER,
    keep_alive: bool = True,
    http10: bool = False,
    content_length: int | None = None,
) -> RequestHead:
    fields = CIMultiDictProxy(CIMultiDict([("Host", "gw.example"), *headers]))
    head = RequestHead(method, target, fields, peer, http10, keep_alive)
    head.content_length = content_length  # a body, as aiohttp's heads may have
    return head


def _admitted(rig: Rig, head: RequestHead) -> tuple[Call, Forward]:
    call = rig.core.open(head)
    assert rig.core.enter(call) is None
    verdict = rig.core.decide_now(call)
    assert isinstance(verdict, Forward)
    return call, verdict


def _parse(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, header fields and body of one serialised response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    fields = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    return int(status), fields, body


def _field(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in fields if key.lower() == name.lower()]


# -- open: who, which route, the request id --


def test_open_identifies_the_client_by_peer_ip(rig: Rig) -> None:
    call = rig.core.open(_head("/", ("X-API-Key", "key-1")))
    assert call.client == PEER


def test_open_identifies_the_client_by_api_key_header() -> None:
    rig = _rig(identify_by="header")
    assert rig.core.open(_head("/", ("x-api-key", "key-1"))).client == "key-1"
    # without the header: the peer, in its own namespace
    assert rig.core.open(_head("/")).client == f"ip:{PEER}"


def test_forwarded_for_from_an_untrusted_peer_does_not_change_the_client(rig: Rig) -> None:
    call = rig.core.open(_head("/", ("X-Forwarded-For", "198.51.100.1")))
    assert call.client == PEER


@pytest.mark.parametrize(
    ("target", "label"),
    [
        ("/login", "/login"),
        ("/%6Cogin", "/login"),
        ("/%6cogin/reset?next=/x", "/login"),
        ("/login?x=%2F", "/login"),
        ("http://gw.example/%6Cogin?a=1", "/login"),
        ("/healthz", "/healthz"),
        ("/other/login", "default"),
        ("/%2Flogin", "/login"),  # decoded to //login, then normalised
        ("/api/../%6Cogin", "/login"),
    ],
)
def test_open_routes_on_the_percent_decoded_path(rig: Rig, target: str, label: str) -> None:
    call = rig.core.open(_head(target))
    assert call.route.label == label


def test_request_id_is_kept_when_sent(rig: Rig) -> None:
    call = rig.core.open(_head("/", ("X-Request-ID", "abc-123")))
    assert call.request_id == "abc-123"


def test_request_id_is_generated_and_unique_otherwise(rig: Rig) -> None:
    ids = {rig.core.open(_head("/")).request_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(request_id) >= 16 for request_id in ids)


def test_generated_request_ids_count_in_16_hex_digits_across_the_table(rig: Rig) -> None:
    """A random per-process prefix, then a counter in 16 hex digits, also
    where the table of its last three digits starts over."""
    first = rig.core.open(_head("/")).request_id
    prefix, counter = first[:-16], first[-16:]
    assert len(prefix) == 16
    assert int(counter, 16) == 0
    rig.core._next_request_id = 4094  # just before the 4096th: the table wraps
    ids = [rig.core.open(_head("/")).request_id for _ in range(4)]
    assert ids == [prefix + format(n, "016x") for n in range(4094, 4098)]
    rig.core._next_request_id = 2**40 + 4095
    assert rig.core.open(_head("/")).request_id == prefix + format(2**40 + 4095, "016x")


def test_an_empty_request_id_is_replaced(rig: Rig) -> None:
    call = rig.core.open(_head("/", ("X-Request-ID", "")))
    assert call.request_id != ""


# -- enter: the client's in-flight slot --


def test_enter_refuses_past_max_concurrent_and_close_frees_the_slot(rig: Rig) -> None:
    core = rig.core
    first, second = core.open(_head("/a")), core.open(_head("/b"))
    assert core.enter(first) is None
    assert core.enter(second) is None
    assert core.inflight == 2
    assert not core.idle.is_set()

    third = core.open(_head("/c"))
    answer = core.enter(third)
    assert answer is not None
    assert answer.status == 429
    assert ("Retry-After", "1") in answer.headers
    assert json.loads(answer.body)["error"] == "concurrency"
    assert not third.holds_slot
    assert core.inflight == 2
    assert rig.decisions()[DENIED] == 1
    assert rig.sample("gateway_rejected_requests_total", reason="concurrency") == 1

    # the shell writes the answer and closes: counted once, no slot given back
    status, fields, _ = _parse(core.own_answer(third, answer))
    assert status == 429
    assert _field(fields, "Retry-After") == ["1"]
    core.close(third)
    assert rig.decisions() == {ALLOWED: 0, DENIED: 1, UNLIMITED: 0, "shadow_denied": 0}
    assert rig.responses(429) == 1
    assert core.inflight == 2

    core.close(first)
    assert core.inflight == 1
    assert not core.idle.is_set()
    fourth = core.open(_head("/d"))
    assert core.enter(fourth) is None  # the freed slot is taken again
    core.close(second)
    core.close(fourth)
    assert core.inflight == 0
    assert core.idle.is_set()


def test_the_concurrency_cap_is_per_client(rig: Rig) -> None:
    core = rig.core
    for _ in range(2):
        assert core.enter(core.open(_head("/", peer="192.0.2.1"))) is None
    assert core.enter(core.open(_head("/", peer="192.0.2.2"))) is None
    assert core.enter(core.open(_head("/", peer="192.0.2.1"))) is not None


def test_a_refusal_for_concurrency_costs_no_token(rig: Rig) -> None:
    core = rig.core
    held = [core.open(_head("/login")) for _ in range(2)]
    for call in held:
        assert core.enter(call) is None
    refused = core.open(_head("/login"))
    assert core.enter(refused) is not None
    core.close(refused)
    for call in held:
        core.close(call)
    # /login holds one token: still there for the next request
    _call, forward = _admitted(rig, _head("/login"))
    assert b"X-RateLimit-Remaining: 0\r\n" in forward.ours.fields


# -- decide_now / settle: the verdict --


def test_an_allowed_request_is_forwarded_with_our_fields(rig: Rig) -> None:
    call, forward = _admitted(rig, _head("/login?x=1", ("X-Request-ID", "rid-1")))
    assert call.decision is not None
    assert call.decision.outcome == ALLOWED
    assert forward.target == "/login?x=1"
    assert forward.headers["X-Forwarded-For"] == PEER
    assert forward.headers["X-Request-ID"] == "rid-1"
    assert forward.headers["X-Forwarded-Proto"] == "http"
    assert forward.headers["Host"] == "gw.example"  # preserve_host defaults on
    fields = forward.ours.fields
    assert b"\r\nRateLimit: " in b"\r\n" + fields
    assert b"RateLimit-Policy: " in fields
    assert b"X-RateLimit-Limit: 1\r\n" in fields
    assert b"X-RateLimit-Remaining: 0\r\n" in fields
    assert fields.endswith(b"X-Request-ID: rid-1\r\n")
    assert forward.ours.replaced == OUR_RESPONSE_FIELDS
    assert ("X-Request-ID", "rid-1") in forward.ours.pairs()


def test_forwarded_headers_drop_what_the_client_forged(rig: Rig) -> None:
    _call, forward = _admitted(
        rig,
        _head(
            "/",
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Request-ID", "rid-2"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "s"),
        ),
    )
    assert forward.headers.getall("X-Forwarded-For") == [PEER]
    assert forward.headers.getall("X-Request-ID") == ["rid-2"]
    assert "X-Secret" not in forward.headers
    assert "Connection" not in forward.headers


def test_an_unlimited_route_forwards_with_only_the_request_id(rig: Rig) -> None:
    call, forward = _admitted(rig, _head("/healthz", ("X-Request-ID", "rid-3")))
    assert call.decision is not None
    assert call.decision.outcome == UNLIMITED
    assert forward.ours.fields == b"X-Request-ID: rid-3\r\n"
    assert forward.ours.replaced == OUR_UNLIMITED_RESPONSE_FIELDS
    assert rig.decisions("/healthz")[UNLIMITED] == 1


def test_an_absolute_form_target_is_forwarded_as_its_path_and_query(rig: Rig) -> None:
    _call, forward = _admitted(rig, _head("http://elsewhere.example/a/b?q=1"))
    assert forward.target == "/a/b?q=1"
    _call, forward = _admitted(rig, _head("https://elsewhere.example"))
    assert forward.target == "/"


def test_a_denied_request_gets_a_429_with_retry_after(rig: Rig) -> None:
    core = rig.core
    _admitted(rig, _head("/login"))
    call = core.open(_head("/login", ("X-Request-ID", "rid-4")))
    assert core.enter(call) is None
    verdict = core.decide_now(call)
    assert isinstance(verdict, Deny)
    assert call.decision is not None
    assert call.decision.outcome == DENIED
    status, fields, body = _parse(verdict)
    assert status == 429
    retry_after = int(_field(fields, "Retry-After")[0])
    assert 1 <= retry_after <= 60  # the /login bucket refills once a minute
    assert _field(fields, "X-Request-ID") == ["rid-4"]
    assert _field(fields, "X-RateLimit-Remaining") == ["0"]
    assert int(_field(fields, "Content-Length")[0]) == len(body) == call.bytes_out
    assert json.loads(body) == {"error": "rate_limited", "retry_after": retry_after}
    assert _field(fields, "Connection") == []


def test_a_denied_head_request_gets_no_body(rig: Rig) -> None:
    _admitted(rig, _head("/login"))
    call = rig.core.open(_head("/login", method="HEAD"))
    assert rig.core.enter(call) is None
    verdict = rig.core.decide_now(call)
    assert isinstance(verdict, Deny)
    status, fields, body = _parse(verdict)
    assert status == 429
    assert body == b""
    assert call.bytes_out == 0
    assert int(_field(fields, "Content-Length")[0]) > 0  # the length a GET would get


def test_a_denied_http10_request_is_closed(rig: Rig) -> None:
    _admitted(rig, _head("/login"))
    call = rig.core.open(_head("/login", http10=True, keep_alive=False))
    assert rig.core.enter(call) is None
    verdict = rig.core.decide_now(call)
    assert isinstance(verdict, Deny)
    assert _field(_parse(verdict)[1], "Connection") == ["close"]


def test_the_bucket_refills_on_the_clock(rig: Rig) -> None:
    core = rig.core
    first, _forward = _admitted(rig, _head("/login"))
    core.close(first)
    denied = core.open(_head("/login"))
    assert core.enter(denied) is None
    assert isinstance(core.decide_now(denied), Deny)
    core.close(denied)
    rig.clock.advance(59.0)
    early = core.open(_head("/login"))
    assert core.enter(early) is None
    assert isinstance(core.decide_now(early), Deny)
    core.close(early)
    rig.clock.advance(1.0)
    _admitted(rig, _head("/login"))


def test_each_request_is_counted_exactly_once(rig: Rig) -> None:
    core = rig.core
    outcomes = []
    for _ in range(5):
        call = core.open(_head("/"))
        assert core.enter(call) is None
        outcomes.append(type(core.decide_now(call)))
        core.close(call)
        core.close(call)
    assert outcomes == [Forward, Forward, Deny, Deny, Deny]
    counted = rig.decisions()
    assert counted[ALLOWED] == 2
    assert counted[DENIED] == 3
    assert sum(counted.values()) == 5


def test_settle_counts_a_decision_made_elsewhere_once(rig: Rig) -> None:
    core = rig.core
    call = core.open(_head("/"))
    assert core.enter(call) is None
    limiter = call.snapshot.limiter
    decision = limiter.decide_now(call.route, call)
    assert decision is not None
    assert rig.decisions()[ALLOWED] == 0  # the limiter alone counts nothing
    assert isinstance(core.settle(call, decision), Forward)
    assert call.decision is decision
    assert rig.decisions()[ALLOWED] == 1
    core.close(call)
    assert rig.decisions()[ALLOWED] == 1


def test_a_body_past_max_body_size_is_refused_with_413(rig: Rig) -> None:
    core = rig.core
    call = core.open(_head("/upload", method="POST", content_length=101))
    assert core.enter(call) is None
    verdict = core.decide_now(call)
    assert isinstance(verdict, Refuse)
    assert verdict.answer.status == 413
    assert json.loads(verdict.answer.body)["error"] == "body_too_large"
    assert rig.sample("gateway_rejected_requests_total", reason="body_too_large") == 1
    assert rig.decisions()[ALLOWED] == 1  # decided (and counted) before the refusal


def test_a_body_at_max_body_size_is_forwarded(rig: Rig) -> None:
    _call, forward = _admitted(rig, _head("/upload", method="POST", content_length=100))
    assert forward.target == "/upload"


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("CONNECT", "example.com:443", 405),
        ("CONNECT", "http://example.com/", 405),
        ("OPTIONS", "*", 400),
        ("GET", "ftp://example.com/x", 400),
    ],
)
def test_targets_we_do_not_proxy_are_refused(
    rig: Rig, method: str, target: str, status: int
) -> None:
    call = rig.core.open(_head(target, method=method))
    assert rig.core.enter(call) is None
    verdict = rig.core.decide_now(call)
    assert isinstance(verdict, Refuse)
    assert verdict.answer.status == status
    assert json.loads(verdict.answer.body)["error"] == "bad_target"
    assert rig.sample("gateway_rejected_requests_total", reason="bad_target") == 1


# -- own_answer: our answers carry our fields --


def test_an_admitted_requests_502_carries_the_rate_limit_fields(rig: Rig) -> None:
    core = rig.core
    call, _forward = _admitted(rig, _head("/login", ("X-Request-ID", "rid-5")))
    call.error = UpstreamConnectError("refused")
    answer = core.failed(call)
    assert answer.status == 502
    status, fields, body = _parse(core.own_answer(call, answer))
    assert status == 502
    assert call.status == 502
    assert _field(fields, "X-RateLimit-Remaining") == ["0"]
    assert len(_field(fields, "RateLimit")) == 1
    assert len(_field(fields, "RateLimit-Policy")) == 1
    assert _field(fields, "X-Request-ID") == ["rid-5"]
    assert json.loads(body)["error"] == "upstream_unreachable"
    assert int(_field(fields, "Content-Length")[0]) == len(body) == call.bytes_out


def test_a_timeout_is_answered_with_504(rig: Rig) -> None:
    call, _forward = _admitted(rig, _head("/"))
    call.error = UpstreamTimeoutError("slow")
    status, _fields, body = _parse(rig.core.own_answer(call, rig.core.failed(call)))
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"


def test_a_denied_requests_answer_has_no_rate_limit_fields(rig: Rig) -> None:
    core = rig.core
    _admitted(rig, _head("/login"))
    call = core.open(_head("/login", ("X-Request-ID", "rid-6")))
    assert core.enter(call) is None
    assert isinstance(core.decide_now(call), Deny)
    assert call.decision is not None
    assert call.decision.limits is not None
    answer = error_answer(400, "bad_request", "x")
    _status, fields, _body = _parse(core.own_answer(call, answer))
    assert not [name for name, _ in fields if "ratelimit" in name.lower()]
    assert _field(fields, "X-Request-ID") == ["rid-6"]


def test_a_concurrency_refusal_has_no_rate_limit_fields(rig: Rig) -> None:
    core = rig.core
    for _ in range(2):
        assert core.enter(core.open(_head("/login"))) is None
    call = core.open(_head("/login", ("X-Request-ID", "rid-7")))
    answer = core.enter(call)
    assert answer is not None
    _status, fields, _body = _parse(core.own_answer(call, answer))
    assert not [name for name, _ in fields if "ratelimit" in name.lower()]
    assert _field(fields, "X-Request-ID") == ["rid-7"]


def test_an_undecided_requests_answer_still_carries_the_request_id(rig: Rig) -> None:
    call = rig.core.open(_head("/"))
    answer = rig.core.refusal(400, "bad_request", "bad")
    _status, fields, _body = _parse(rig.core.own_answer(call, answer))
    assert len(_field(fields, "X-Request-ID")) == 1
    assert _field(fields, "X-Request-ID") == [call.request_id]
    assert rig.sample("gateway_rejected_requests_total", reason="bad_request") == 1


def test_an_unlimited_routes_answer_has_no_rate_limit_fields(rig: Rig) -> None:
    call, _forward = _admitted(rig, _head("/healthz"))
    call.error = UpstreamConnectError("refused")
    _status, fields, _body = _parse(rig.core.own_answer(call, rig.core.failed(call)))
    assert not [name for name, _ in fields if "ratelimit" in name.lower()]
    assert _field(fields, "X-Request-ID") == [call.request_id]


def test_our_answer_to_head_has_no_body(rig: Rig) -> None:
    call, _forward = _admitted(rig, _head("/", method="HEAD"))
    call.error = UpstreamConnectError("refused")
    answer = rig.core.failed(call)
    status, fields, body = _parse(rig.core.own_answer(call, answer))
    assert status == 502
    assert body == b""
    assert call.bytes_out == 0
    assert int(_field(fields, "Content-Length")[0]) == len(answer.body)


def test_own_answer_leaves_the_answer_as_it_was(rig: Rig) -> None:
    call, _forward = _admitted(rig, _head("/login"))
    answer = error_answer(400, "bad_request", "x")
    before = list(answer.headers)
    first = rig.core.own_answer(call, answer)
    second = rig.core.own_answer(call, answer)
    assert answer.headers == before
    assert _parse(first)[1] == _parse(second)[1]
    assert len(_field(_parse(second)[1], "X-Request-ID")) == 1


@pytest.mark.parametrize(
    ("keep_alive", "http10", "head_keep_alive", "connection"),
    [
        (True, False, True, []),
        (False, False, True, ["close"]),
        (True, False, False, ["close"]),
        (True, True, True, ["keep-alive"]),
    ],
)
def test_own_answer_says_whether_the_connection_stays(
    rig: Rig, keep_alive: bool, http10: bool, head_keep_alive: bool, connection: list[str]
) -> None:
    call = rig.core.open(_head("/", http10=http10, keep_alive=head_keep_alive))
    answer = error_answer(400, "bad_request", "x")
    _status, fields, _body = _parse(rig.core.own_answer(call, answer, keep_alive=keep_alive))
    assert _field(fields, "Connection") == connection


# -- close: the slot, metrics, the access record --


def test_close_counts_the_response_status(rig: Rig) -> None:
    core = rig.core
    call, _forward = _admitted(rig, _head("/login"))
    call.error = UpstreamConnectError("refused")
    call.upstream_seconds = 0.25
    core.own_answer(call, core.failed(call))
    core.close(call)
    assert rig.responses(502, "/login") == 1
    assert rig.sample("gateway_upstream_errors_total", route="/login", kind="connect") == 1
    assert rig.sample("gateway_upstream_duration_seconds_count", route="/login") == 1
    assert rig.sample("gateway_upstream_duration_seconds_sum", route="/login") == 0.25
    assert rig.sample("gateway_request_duration_seconds_count", route="/login") == 1


def test_close_counts_499_when_the_client_left(rig: Rig) -> None:
    call, _forward = _admitted(rig, _head("/"))
    call.status = 200
    call.client_gone = True
    rig.core.close(call)
    assert rig.responses(CLIENT_CLOSED_STATUS) == 1
    assert rig.responses(200) == 0


def test_close_is_idempotent(rig: Rig) -> None:
    core = rig.core
    call, _forward = _admitted(rig, _head("/"))
    other, _ = _admitted(rig, _head("/x"))
    call.status = 200
    assert core.inflight == 2
    core.close(call)
    core.close(call)
    assert call.closed
    assert core.inflight == 1
    assert rig.responses(200) == 1
    assert rig.sample("gateway_request_duration_seconds_count", route="default") == 1
    # the second close did not give back another's slot: the cap still holds
    assert core.enter(core.open(_head("/y"))) is None
    assert core.enter(core.open(_head("/z"))) is not None
    core.close(other)


def test_a_request_cut_before_its_decision_frees_its_slot_uncounted(rig: Rig) -> None:
    core = rig.core
    call = core.open(_head("/"))
    assert core.enter(call) is None
    core.close(call)
    assert core.inflight == 0
    assert core.idle.is_set()
    assert sum(rig.decisions().values()) == 0
    assert rig.sample("gateway_request_duration_seconds_count", route="default") == 0


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[tuple[Rig, Path]]:
    path = tmp_path / "access.log"
    rig = _rig(log_path=str(path))
    rig.access_log.start()
    try:
        yield rig, path
    finally:
        rig.access_log.stop(5.0)


def _records(rig: Rig, path: Path) -> list[dict[str, object]]:
    assert rig.access_log.stop(5.0)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_close_writes_one_access_record(logged: tuple[Rig, Path]) -> None:
    rig, path = logged
    core = rig.core
    call, _forward = _admitted(rig, _head("/%6Cogin?a=1", ("X-Request-ID", "rid-8")))
    call.status = 200
    call.bytes_out = 12
    call.upstream_seconds = 0.002
    core.close(call)
    core.close(call)
    denied = core.open(_head("/login"))
    assert core.enter(denied) is None
    assert isinstance(core.decide_now(denied), Deny)
    denied.status = 429
    denied.client_gone = True
    core.close(denied)
    records = _records(rig, path)
    assert len(records) == 2
    first, second = records
    assert tuple(first) == FIELDS
    assert first["request_id"] == "rid-8"
    assert first["client"] == PEER
    assert first["method"] == "GET"
    assert first["path"] == "/%6Cogin?a=1"  # the target as received
    assert first["route"] == "/login"
    assert first["decision"] == ALLOWED
    assert first["status"] == 200
    assert first["tokens_left"] == 0
    assert first["upstream_ms"] == pytest.approx(2.0)
    assert first["bytes_out"] == 12
    assert second["decision"] == DENIED
    assert second["status"] == CLIENT_CLOSED_STATUS
    assert second["upstream_ms"] is None


def test_an_unlimited_request_is_logged_without_tokens(logged: tuple[Rig, Path]) -> None:
    rig, path = logged
    call, _forward = _admitted(rig, _head("/healthz"))
    call.status = 204
    rig.core.close(call)
    (record,) = _records(rig, path)
    assert record["decision"] == UNLIMITED
    assert record["tokens_left"] is None
    assert record["status"] == 204


def test_a_request_cut_before_its_decision_is_not_logged(logged: tuple[Rig, Path]) -> None:
    rig, path = logged
    call = rig.core.open(_head("/"))
    rig.core.enter(call)
    rig.core.close(call)
    assert _records(rig, path) == []


async def test_idle_wakes_every_waiter_when_set_and_not_before() -> None:
    idle = Idle()
    await asyncio.wait_for(idle.wait(), 1)  # set at first: no wait
    idle.clear()
    waiters = [asyncio.ensure_future(idle.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    idle.clear()  # clearing again changes nothing
    idle.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert idle.is_set()


async def test_a_cancelled_idle_waiter_is_forgotten() -> None:
    idle = Idle()
    idle.clear()
    waiter = asyncio.ensure_future(idle.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    idle.set()  # nothing left to wake
    assert idle.is_set()
