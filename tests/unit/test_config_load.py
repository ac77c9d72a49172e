"""The config loader: every problem located as ``PATH:LINE:COL: key.path: message``.

Each file under ``tests/configs/`` holds one failure mode (or several, for
``many_problems.yaml``); the expected locations were counted by hand from the
files, 1-based like an editor shows them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import (
    UNLIMITED,
    AccessLogConfig,
    BucketSpec,
    ClientsConfig,
    GatewayConfig,
    Mode,
    StorageConfig,
    UpstreamConfig,
    load_config,
    parse_config,
    restart_keys,
)
from gateway.config.convert import method_token, positive_int, status_range
from gateway.config.durations import parse_duration
from gateway.config.model import (
    DEFAULT_BUCKET,
    QueueSpec,
    RouteSpec,
    ServerConfig,
    Setting,
    setting,
    settings,
    yaml_keys,
)
from gateway.config.validate import (
    bucket_problems,
    config_problems,
    limit_list_problems,
    route_problems,
)
from gateway.errors import ConfigError, ConfigProblem

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "configs"


def _problems(name: str) -> list[str]:
    path = str(CONFIGS / name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = [str(p) for p in info.value.problems]
    # The exception's text is exactly what `gateway check` prints: one per line.
    assert str(info.value) == "\n".join(lines)
    prefix = path + ":"
    assert all(line.startswith(prefix) for line in lines)
    return [line[len(prefix) :] for line in lines]


def _text_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    return [str(p) for p in info.value.problems]


# -- one failure mode per file --


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            "unknown_top_key.yaml",
            [
                "3:1: limts: unknown key; did you mean 'limits'? expected one of: listen, "
                "admin, workers, "
                "drain_timeout, max_body_size, mode, tls, upstream, upstreams, clients, "
                "limits, routes, storage, access_log, server"
            ],
            id="unknown-top-level-key",
        ),
        pytest.param(
            "admin_port_clash.yaml",
            [
                "2:8: admin: port 8080 is the proxy listener's too; "
                "the admin listener needs its own"
            ],
            id="admin-port-clash",
        ),
        pytest.param(
            "unknown_nested_key.yaml",
            [
                "6:5: limits.default.refil_tokens: unknown key; did you mean "
                "'refill_tokens'? expected one of: refill_period, refill_tokens, "
                "max_tokens, name, per"
            ],
            id="unknown-nested-key",
        ),
        pytest.param(
            "bad_duration.yaml",
            [
                "3:17: upstream.read_timeout: expected a duration like '250ms', '1s', "
                "'5m' or '1h', got '30 seconds'"
            ],
            id="bad-duration",
        ),
        pytest.param(
            "non_positive.yaml",
            [
                "3:20: upstream.max_connections: must be positive, got 0",
                "6:20: limits.default.refill_period: must be a positive duration, got '0s'",
                "7:20: limits.default.refill_tokens: must be positive, got -1",
                "8:17: limits.default.max_tokens: must be positive, got 0",
            ],
            id="non-positive-numbers",
        ),
        pytest.param(
            "max_below_refill.yaml",
            [
                "7:17: limits.default.max_tokens: max_tokens (5) must be at least "
                "refill_tokens (10)"
            ],
            id="max-below-refill",
        ),
        pytest.param(
            "default_below_refill.yaml",
            [
                # max_tokens is not in the file: the message says it is the default
                # (placed at the mapping that lacks it).
                "5:5: limits.default.max_tokens: max_tokens (default 20) is below "
                "refill_tokens 50; write max_tokens here too (at least 50)"
            ],
            id="default-max-tokens-below-refill",
        ),
        pytest.param(
            "limit_scalar.yaml",
            [
                "4:12: limits.default: expected a mapping of refill_period, refill_tokens, "
                "max_tokens, name, per, such as {refill_period: 1s, refill_tokens: 10, "
                "max_tokens: 20} (10 tokens every 1s, up to 20), or a list of such "
                "mappings; got '10/s'",
                "7:13: routes[0].limit[0]: expected a mapping of refill_period, "
                "refill_tokens, max_tokens, name, per, such as {refill_period: 1s, "
                "refill_tokens: 10, max_tokens: 20} (10 tokens every 1s, up to 20); "
                "got '100/m'",
            ],
            id="limit-as-a-scalar",
        ),
        pytest.param(
            "refill_period_too_short.yaml",
            [
                "5:20: limits.default.refill_period: must be at least 10ms (the refill "
                "clock's resolution), got 0.005s"
            ],
            id="refill-period-under-10ms",
        ),
        pytest.param(
            "bad_upstream_url.yaml",
            [
                "2:8: upstream.url: expected an http:// or https:// URL with a host, "
                "got 'ftp://files.example.com'"
            ],
            id="bad-upstream-url",
        ),
        pytest.param(
            "bad_cidr.yaml",
            ["6:7: clients.trusted_proxies: not an IP network: '10.0.0.0/33'"],
            id="bad-cidr",
        ),
        pytest.param(
            "missing_upstream_url.yaml",
            [
                "3:3: upstream.url: is required (the backend being fronted), or servers: "
                "[URL, ...] for several"
            ],
            id="missing-upstream-url",
        ),
        pytest.param(
            "missing_upstream.yaml",
            [
                "1:1: upstream.url: is required (the backend being fronted), or servers: "
                "[URL, ...] for several"
            ],
            id="missing-upstream-section",
        ),
        pytest.param(
            "invalid_yaml.yaml",
            ["4:1: <yaml>: invalid YAML: expected ',' or '}', but got '<stream end>'"],
            id="invalid-yaml",
        ),
        pytest.param(
            "workers_memory.yaml",
            [
                "3:10: workers: 4 workers with storage.backend: memory would give every "
                "client 4x its limit (each process has its own buckets); set "
                "storage.backend: redis to share buckets, or workers: 1"
            ],
            id="workers-with-memory-backend",
        ),
        pytest.param(
            "bad_mode.yaml",
            [
                "3:7: mode: expected one of enforce, shadow, got 'monitor'",
                "6:11: routes[0].mode: expected one of enforce, shadow, got 'dry-run'",
            ],
            id="bad-mode",
        ),
        pytest.param(
            "bad_route_limit.yaml",
            [
                "5:12: routes[0].limit: expected 'unlimited', a mapping of "
                "refill_period, refill_tokens, max_tokens, name, per, such as "
                "{refill_period: 1s, refill_tokens: 10, max_tokens: 20} (10 tokens every "
                "1s, up to 20), or a list of such mappings; got 5",
                "7:47: routes[1].limit.refill_tokens: must be positive, got 0",
            ],
            id="bad-route-limit",
        ),
        pytest.param(
            "duplicate_override.yaml",
            ["9:15: limits.overrides[2].client: 'key-a' is listed twice"],
            id="duplicate-override-client",
        ),
        pytest.param(
            "limit_list_empty.yaml",
            ["5:12: routes[0].limit: an empty list of limits; give at least one"],
            id="empty-list-of-limits",
        ),
        pytest.param(
            "limit_names_repeated.yaml",
            [
                # Unnamed, the first limit of limits.default is "default".
                "6:72: limits.default[1].name: 'default' is also the name of "
                "limits.default[0]; each limit of a list needs a name of its own",
                "12:32: routes[0].limit[2].name: 'burst' is also the name of "
                "routes[0].limit[0]; each limit of a list needs a name of its own",
            ],
            id="limit-names-repeated-in-a-list",
        ),
        pytest.param(
            "bad_per.yaml",
            [
                "4:18: limits.default.per: expected client, ip, route or header:NAME, "
                "got 'user'",
                "7:18: routes[0].limit.per: ['ip', 'ip'] names a part twice",
                "9:18: routes[1].limit.per: not a valid header name: 'X Tenant'",
            ],
            id="bad-per",
        ),
        pytest.param(
            "override_limit_twice.yaml",
            [
                "7:14: limits.overrides[0].limit: give the limit either inline (next to "
                "client) or under limit, not both; inline here: max_tokens",
                "9:14: limits.overrides[1].limit: expected a mapping of refill_period, "
                "refill_tokens, max_tokens, name, per, such as {refill_period: 1s, "
                "refill_tokens: 10, max_tokens: 20} (10 tokens every 1s, up to 20), or a "
                "list of such mappings (clients.allow exempts a client from every limit); "
                "got 'unlimited'",
            ],
            id="override-limit-inline-and-listed",
        ),
        pytest.param(
            "bad_methods.yaml",
            [
                "5:14: routes[0].methods: an empty list matches no request; leave "
                "methods out to match every method",
                "7:20: routes[1].methods: expected an HTTP method such as GET or POST, "
                "got 'PO ST'",
                "9:14: routes[2].methods: expected a list; for one item, write [GET]",
            ],
            id="bad-methods",
        ),
        pytest.param(
            "cost_over_max_tokens.yaml",
            [
                # Inherited limits count: a client with the override could never pass.
                "9:11: routes[0].cost: 15 is more than max_tokens (10) of the limit "
                "'override' (limits.overrides[0], client 'key-small'): such a request "
                "could never be admitted",
                "11:11: routes[1].cost: must be positive, got 0",
                "16:11: routes[2].cost: 40 is more than max_tokens (30) of the limit "
                "'per-minute' (routes[2].limit): such a request could never be admitted",
            ],
            id="cost-over-max-tokens",
        ),
        pytest.param(
            "queue_longer_than_drain.yaml",
            [
                "6:23: routes[0].queue.max_wait: 10s is longer than drain_timeout (5s): "
                "a drain must answer every queued request within drain_timeout",
                "8:39: routes[1].queue.max_queued: must be positive, got 0",
                "8:42: routes[1].queue.max_len: unknown key; expected one of: "
                "max_wait, max_queued",
            ],
            id="bad-queue",
        ),
        pytest.param(
            "unlimited_route_keys.yaml",
            [
                "6:11: routes[0].cost: an unlimited route takes no tokens; remove cost "
                "or give the route a limit",
                "7:12: routes[0].queue: an unlimited route takes no tokens, so nothing "
                "waits; remove queue or give the route a limit",
                "8:21: routes[0].count_statuses: an unlimited route takes no tokens, so "
                "none are given back; remove count_statuses or give the route a limit",
            ],
            id="token-keys-on-an-unlimited-route",
        ),
        pytest.param(
            "bad_count_statuses.yaml",
            [
                f"5:{column}: routes[0].count_statuses: expected a status code from 100 "
                f"to 599 such as 401, or a range such as '4xx', got {value}"
                for column, value in [(29, "600"), (34, "'4x1'"), (41, "'failed'")]
            ]
            + [
                "7:21: routes[1].count_statuses: an empty list would give every token "
                "back; leave count_statuses out to count every answer"
            ],
            id="bad-count-statuses",
        ),
        pytest.param(
            "unreachable_routes.yaml",
            [
                "6:18: routes[1].path_prefix: unreachable: routes[0] (path_prefix '/', "
                "methods POST) matches every request it would",
                "9:18: routes[3].path_prefix: unreachable: routes[2] (path_prefix "
                "'/login') matches every request it would",
                # A plain string prefix, as matching is: /login takes /login-help too.
                "10:18: routes[4].path_prefix: unreachable: routes[2] (path_prefix "
                "'/login') matches every request it would",
            ],
            id="unreachable-routes",
        ),
        pytest.param(
            "bad_client_lists.yaml",
            [
                "4:16: clients.ipv4_prefix: expected a prefix length from 1 to 32, got 0",
                "5:16: clients.ipv6_prefix: expected a prefix length from 1 to 128, got 129",
                "6:25: clients.allow: expected a CIDR such as '10.0.0.0/8' or "
                "'key:VALUE', got 'partner-1'",
                "7:10: clients.deny: 'key:' needs a value, as in 'key:partner-1'",
            ],
            id="bad-client-lists-and-prefixes",
        ),
    ],
)
def test_each_failure_mode_is_located(name: str, expected: list[str]) -> None:
    assert _problems(name) == expected


def test_a_file_with_several_problems_reports_all_of_them_in_line_order() -> None:
    assert _problems("many_problems.yaml") == [
        "2:9: listen: port must be 0-65535, got '99999'",
        "3:7: mode: expected one of enforce, shadow, got 'monitor'",
        "5:8: upstream.url: expected an http:// or https:// URL with a host, "
        "got 'localhost:8000'",
        "6:17: upstream.read_timeout: expected a duration like '250ms', '1s', '5m' or "
        "'1h', got 'soon'",
        "8:16: clients.identify_by: expected one of ip, header, got 'cookie'",
        "9:21: clients.trusted_proxies: not an IP network: 'not-a-cidr'",
        "14:17: limits.default.max_tokens: max_tokens (5) must be at least refill_tokens (10)",
        "16:18: routes[0].path_prefix: must start with '/', got 'login'",
        "19:12: storage.backend: expected one of memory, redis, got 'memcached'",
    ]


def test_problems_are_sorted_by_line_then_column() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(CONFIGS / "many_problems.yaml"))
    positions = [(p.line, p.column) for p in info.value.problems]
    assert positions == sorted(positions)
    assert len(positions) == 9


# -- more failure modes, inline --


def test_key_given_twice_is_a_problem() -> None:
    text = 'upstream: {url: "http://x"}\nmode: enforce\nmode: shadow\n'
    assert _text_problems(text) == ["f.yaml:3:1: mode: key given twice"]


def test_empty_file_needs_upstream_url() -> None:
    assert _text_problems("") == ["f.yaml:1:1: upstream.url: is required; the file is empty"]


def test_document_that_is_not_a_mapping() -> None:
    assert _text_problems("- a\n- b\n") == ["f.yaml:1:1: <document>: expected a mapping"]


def test_bad_indentation_is_located() -> None:
    text = "upstream:\n  url: http://x\n bad: 1\n"
    assert _text_problems(text) == [
        "f.yaml:3:2: <yaml>: invalid YAML: expected <block end>, but found "
        "'<block mapping start>'"
    ]


def test_trusted_proxies_must_be_a_list() -> None:
    text = "upstream: {url: 'http://x'}\nclients:\n  trusted_proxies: 10.0.0.0/8\n"
    assert _text_problems(text) == [
        "f.yaml:3:20: clients.trusted_proxies: expected a list; for one item, write "
        "[10.0.0.0/8]"
    ]


def test_override_without_client_is_a_problem() -> None:
    text = "upstream: {url: 'http://x'}\nlimits:\n  overrides:\n    - max_tokens: 5\n"
    assert _text_problems(text) == ["f.yaml:4:7: limits.overrides[0].client: is required"]


def test_unknown_key_in_override_and_route() -> None:
    text = (
        "upstream: {url: 'http://x'}\n"
        "limits:\n"
        "  overrides:\n"
        "    - client: a\n"
        "      max_token: 5\n"
        "routes:\n"
        "  - path_prefix: /a\n"
        "    limits: unlimited\n"
    )
    assert _text_problems(text) == [
        "f.yaml:5:7: limits.overrides[0].max_token: unknown key; did you mean "
        "'max_tokens'? expected one of: client, refill_period, refill_tokens, max_tokens, "
        "name, per, limit",
        "f.yaml:8:5: routes[0].limits: unknown key; did you mean 'limit'? expected one "
        "of: path_prefix, limit, mode, methods, cost, queue, count_statuses, upstream",
    ]


def test_unknown_key_in_upstream_section() -> None:
    text = "upstream:\n  url: http://x\n  read_timout: 5s\n"
    assert _text_problems(text) == [
        "f.yaml:3:3: upstream.read_timout: unknown key; did you mean 'read_timeout'? "
        "expected one of: url, servers, balance, max_fails, fail_timeout, health_check, "
        "connect_timeout, read_timeout, max_connections, pool_timeout, max_header_size, "
        "preserve_host"
    ]


@pytest.mark.parametrize(
    "url",
    ["http://", "localhost:8000", "http://host:99999", "http://host/?a=1", "", "http://h#x"],
)
def test_bad_upstream_urls(url: str) -> None:
    problems = _text_problems(f"upstream:\n  url: {url!r}\n")
    assert len(problems) == 1
    assert problems[0].startswith("f.yaml:2:8: upstream.url: ")


def test_negative_max_body_size() -> None:
    text = "upstream: {url: 'http://x'}\nmax_body_size: -1\n"
    assert _text_problems(text) == ["f.yaml:2:16: max_body_size: must not be negative, got -1"]


def test_workers_auto_with_memory_backend_on_a_multicore_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.config.convert.os.cpu_count", lambda: 8)
    text = "upstream: {url: 'http://x'}\nworkers: auto\n"
    problems = _text_problems(text)
    assert len(problems) == 1
    assert problems[0].startswith(
        "f.yaml:2:10: workers: 8 workers with storage.backend: memory (the default) "
        "would give every client 8x its limit"
    )


def test_workers_auto_on_one_core_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.config.convert.os.cpu_count", lambda: 1)
    config = parse_config("upstream: {url: 'http://x'}\nworkers: auto\n")
    assert config.workers == 1


def test_invalid_refill_tokens_does_not_trigger_a_bogus_max_tokens_problem() -> None:
    """The file says refill_tokens: 0 (reported) and max_tokens: 5. Comparing 5 with
    the *default* refill_tokens (10), a number the file never wrote, reports a
    second problem that does not exist."""
    text = (
        "upstream: {url: 'http://x'}\n"
        "limits:\n"
        "  default:\n"
        "    refill_tokens: 0\n"
        "    max_tokens: 5\n"
    )
    assert _text_problems(text) == [
        "f.yaml:4:20: limits.default.refill_tokens: must be positive, got 0"
    ]


# -- messages that help: a close key, a limit's shape, defaults named --


@pytest.mark.parametrize(
    ("key", "section", "suggested"),
    [
        ("max_token", "limits.default", "max_tokens"),
        ("refil_period", "limits.default", "refill_period"),
        ("Refill_Tokens", "limits.default", "refill_tokens"),
        ("lisen", "", "listen"),
        ("identifyby", "clients", "identify_by"),
        ("pathprefix", "routes[0]", "path_prefix"),
    ],
)
def test_an_unknown_key_close_to_a_known_one_is_suggested(
    key: str, section: str, suggested: str
) -> None:
    parents = {
        "limits.default": "limits:\n  default:\n    {key}: 5\n",
        "": "{key}: 5\n",
        "clients": "clients:\n  {key}: ip\n",
        "routes[0]": "routes:\n  - path_prefix: /a\n    {key}: /b\n",
    }
    [problem] = _text_problems(_UP + parents[section].format(key=key))
    full = f"{section}.{key}" if section else key
    assert f" {full}: unknown key; did you mean {suggested!r}? expected one of: " in problem


def test_an_unknown_key_far_from_every_known_one_gets_the_list_only() -> None:
    [problem] = _text_problems(_UP + "limits:\n  default:\n    burst: 5\n")
    assert problem == (
        "f.yaml:4:5: limits.default.burst: unknown key; expected one of: refill_period, "
        "refill_tokens, max_tokens, name, per"
    )


def test_a_limit_key_directly_under_limits_says_where_it_goes() -> None:
    text = _UP + "limits:\n  refill_period: 1s\n  max_tokens: 5\n"
    assert _text_problems(text) == [
        "f.yaml:3:3: limits.refill_period: unknown key; a limit's keys go under "
        "limits.default (limits: {default: {refill_period: ...}}); expected one of: "
        "default, overrides",
        "f.yaml:4:3: limits.max_tokens: unknown key; a limit's keys go under "
        "limits.default (limits: {default: {max_tokens: ...}}); expected one of: "
        "default, overrides",
    ]


@pytest.mark.parametrize(
    ("where", "got"),
    [
        ("limits:\n  default: 10/s\n", "'10/s'"),
        ("limits:\n  default: 10\n", "10"),
        ("limits:\n  default:\n", "nothing"),
        ("routes:\n  - {path_prefix: /a, limit: 5/m}\n", "'5/m'"),
        ("limits:\n  overrides:\n    - {client: k, limit: 100/s}\n", "'100/s'"),
    ],
)
def test_a_limit_given_as_a_scalar_names_the_keys_and_shows_an_example(
    where: str, got: str
) -> None:
    [problem] = _text_problems(_UP + where)
    assert "expected " in problem
    assert "a mapping of refill_period, refill_tokens, max_tokens, name, per, " in problem
    assert "such as {refill_period: 1s, refill_tokens: 10, max_tokens: 20} " in problem
    assert "or a list of such mappings" in problem
    assert problem.endswith(f"; got {got}")


def test_the_limit_example_is_itself_a_valid_limit() -> None:
    # The example every limit message shows must load, as the default bucket.
    example = "{refill_period: 1s, refill_tokens: 10, max_tokens: 20}"
    config = parse_config(_UP + f"limits:\n  default: {example}\n")
    assert config.limits.default == (DEFAULT_BUCKET,)


def test_a_section_given_as_a_scalar_names_its_keys() -> None:
    assert _text_problems("upstream: http://x\n") == [
        "f.yaml:1:11: upstream: expected a mapping of url, servers, balance, max_fails, "
        "fail_timeout, health_check, connect_timeout, read_timeout, max_connections, "
        "pool_timeout, max_header_size, preserve_host; got 'http://x'"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "limits: {default: {refill_tokens: 50}}\n",
            "f.yaml:2:19: limits.default.max_tokens: max_tokens (default 20) is below "
            "refill_tokens 50; write max_tokens here too (at least 50)",
            id="max-tokens-default",
        ),
        pytest.param(
            "routes:\n  - {path_prefix: /a, limit: {max_tokens: 5}}\n",
            "f.yaml:3:43: routes[0].limit.max_tokens: max_tokens 5 is below refill_tokens "
            "(default 10); write refill_tokens here too (at most 5)",
            id="refill-tokens-default",
        ),
        pytest.param(
            "limits: {default: {refill_tokens: 2, max_tokens: 4}}\n"
            "routes:\n  - {path_prefix: /a, limit: {refill_tokens: 8}}\n",
            "f.yaml:4:30: routes[0].limit.max_tokens: max_tokens (4, from limits.default) "
            "is below refill_tokens 8; write max_tokens here too (at least 8)",
            id="max-tokens-from-limits-default",
        ),
        pytest.param(
            "limits: {default: [{refill_tokens: 2, max_tokens: 4}]}\n"
            "routes:\n  - {path_prefix: /a, limit: [{max_tokens: 30}, {max_tokens: 1}]}\n",
            "f.yaml:4:62: routes[0].limit[1].max_tokens: max_tokens 1 is below "
            "refill_tokens (2, from limits.default); write refill_tokens here too (at most 1)",
            id="refill-tokens-from-a-listed-limits-default",
        ),
        pytest.param(
            "limits: {default: {refill_tokens: 5, max_tokens: 3}}\n",
            "f.yaml:2:50: limits.default.max_tokens: max_tokens (3) must be at least "
            "refill_tokens (5)",
            id="both-written",
        ),
        pytest.param(
            "routes:\n  - {path_prefix: /a, cost: 30}\n",
            "f.yaml:3:29: routes[0].cost: 30 is more than max_tokens (default 20) of the "
            "limit 'default' (limits.default): such a request could never be admitted",
            id="cost-over-the-default-max-tokens",
        ),
        pytest.param(
            "drain_timeout: 500ms\nroutes:\n  - {path_prefix: /a, queue: {max_queued: 5}}\n",
            "f.yaml:4:30: routes[0].queue.max_wait: 1s (the default) is longer than "
            "drain_timeout (500ms): a drain must answer every queued request within "
            "drain_timeout",
            id="queue-max-wait-default",
        ),
        pytest.param(
            "routes:\n  - {path_prefix: /a, queue: {max_wait: 40s}}\n",
            "f.yaml:3:41: routes[0].queue.max_wait: 40s is longer than drain_timeout "
            "(default 30s): a drain must answer every queued request within drain_timeout",
            id="drain-timeout-default",
        ),
        pytest.param(
            "admin: '127.0.0.1:8080'\n",
            "f.yaml:2:8: admin: port 8080 is the proxy listener's too (listen's default, "
            "0.0.0.0:8080); the admin listener needs its own",
            id="listen-default",
        ),
    ],
)
def test_a_rule_against_a_value_the_file_never_wrote_says_so(text: str, expected: str) -> None:
    assert _text_problems(_UP + text) == [expected]


def test_a_typo_for_max_tokens_is_reported_without_comparing_its_default() -> None:
    """max_token: 100 is a typo: max_tokens keeps its default, 20. Comparing
    that 20 with refill_tokens 50, here and in a route that inherits it,
    reports problems the fixed file would not have."""
    text = _UP + (
        "limits:\n"
        "  default:\n"
        "    refill_tokens: 50\n"
        "    max_token: 100\n"
        "  overrides:\n"
        "    - {client: k, refill_tokens: 60, max_tokns: 60}\n"
        "routes:\n"
        "  - {path_prefix: /login, limit: {refill_period: 1m, refill_tokens: 30}}\n"
        "  - {path_prefix: /big, limit: {refill_tokens: 1}, cost: 30}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:5:5: limits.default.max_token: unknown key; did you mean 'max_tokens'? "
        "expected one of: refill_period, refill_tokens, max_tokens, name, per",
        "f.yaml:7:38: limits.overrides[0].max_tokns: unknown key; did you mean "
        "'max_tokens'? expected one of: client, refill_period, refill_tokens, max_tokens, "
        "name, per, limit",
    ]


def test_nan_refill_period_is_rejected() -> None:
    text = "upstream: {url: 'http://x'}\nlimits:\n  default:\n    refill_period: .nan\n"
    problems = _text_problems(text)
    assert len(problems) == 1
    assert problems[0].startswith("f.yaml:4:20: limits.default.refill_period: ")


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:1:1: <file>: cannot read: No such file or directory"
    ]


def test_problem_format() -> None:
    problem = ConfigProblem("a.yaml", 3, 7, "limits.default.max_tokens", "bad")
    assert str(problem) == "a.yaml:3:7: limits.default.max_tokens: bad"


# -- valid files --


def test_repo_example_config_parses() -> None:
    path = str(REPO / "config" / "gateway.yaml")
    config = load_config(path)
    assert config.source == path
    assert config.upstream.url == "http://127.0.0.1:8000"
    assert config.limits.default == (
        BucketSpec(1.0, 10, 20, "default"),
        BucketSpec(3600.0, 1000, 1000, "hourly"),
    )
    premium, listed = config.limits.overrides
    assert premium.client == "key-premium-1"
    assert premium.buckets == (BucketSpec(1.0, 100, 200, "override"),)
    assert listed.buckets == (
        BucketSpec(1.0, 100, 200, "override"),
        BucketSpec(3600.0, 50_000, 50_000, "override-hourly"),
    )
    static, login, healthz, beta, api = config.routes
    assert (static.path_prefix, static.upstream) == ("/static", "static")
    assert static.limit is UNLIMITED
    assert config.upstreams["static"].url == "http://127.0.0.1:8001"
    assert login.path_prefix == "/login"
    assert login.methods == {"POST"}
    assert login.limit == (BucketSpec(60.0, 5, 5, "/login", per=("ip",)),)
    # Only failed logins cost a token.
    assert login.count_statuses == {401, 403}
    assert healthz.limit is UNLIMITED
    assert (beta.path_prefix, beta.limit, beta.mode) == ("/beta", None, Mode.SHADOW)
    assert (api.methods, api.cost) == ({"GET", "HEAD"}, 1)
    assert isinstance(api.limit, tuple)
    assert [(b.name, b.per) for b in api.limit] == [
        ("/api", ("client",)),
        ("/api-2", ("route",)),
        ("/api-3", ("ip", "header:X-Tenant")),
    ]
    assert api.queue == QueueSpec(0.5, 1000)
    assert config.clients.idle_timeout_seconds == 600.0
    assert config.clients.allow == (ipaddress.ip_network("10.0.0.0/8"), "key:partner-1")
    assert config.clients.deny == ()


def test_minimal_config_gets_every_documented_default() -> None:
    config = load_config(str(CONFIGS / "valid_minimal.yaml"))
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert (config.admin_host, config.admin_port) == ("127.0.0.1", 9090)
    assert config.workers == 1
    assert config.drain_timeout_seconds == 30.0
    assert config.max_body_size == 0
    assert config.mode is Mode.ENFORCE
    up = config.upstream
    assert up.url == "http://127.0.0.1:8000"
    assert (up.connect_timeout_seconds, up.read_timeout_seconds) == (2.0, 30.0)
    assert up.max_connections == 256
    cl = config.clients
    assert (cl.identify_by, cl.header, cl.trusted_proxies) == ("ip", "X-API-Key", ())
    assert (cl.max_tracked, cl.idle_timeout_seconds, cl.max_concurrent) == (100_000, 600.0, 0)
    assert (cl.ipv4_prefix, cl.ipv6_prefix, cl.allow, cl.deny) == (32, 64, (), ())
    assert config.limits.default == (BucketSpec(1.0, 10, 20, "default", per=("client",)),)
    assert config.limits.overrides == ()
    assert config.routes == ()
    st = config.storage
    assert (st.backend, st.redis_url) == ("memory", "redis://127.0.0.1:6379/0")
    assert (st.on_error, st.timeout_seconds) == ("allow", 0.05)
    assert (config.access_log.path, config.access_log.queue_size) == ("-", 10_000)
    assert config.access_log.enabled


def test_full_config_values() -> None:
    config = load_config(str(CONFIGS / "valid_full.yaml"))
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8081)
    assert (config.admin_host, config.admin_port) == ("::1", 9091)
    assert config.workers == 2
    assert config.drain_timeout_seconds == 0.25
    assert config.max_body_size == 1_048_576
    assert config.mode is Mode.SHADOW
    assert config.upstream.url == "https://backend.internal:8443"
    assert config.upstream.read_timeout_seconds == 300.0
    assert config.clients.identify_by == "header"
    assert config.clients.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert config.clients.idle_timeout_seconds == 3600.0
    assert config.clients.max_concurrent == 4
    assert (config.clients.ipv4_prefix, config.clients.ipv6_prefix) == (24, 56)
    assert config.clients.allow == (ipaddress.ip_network("192.0.2.0/24"), "key:partner-1")
    assert config.clients.deny == (ipaddress.ip_network("2001:db8::/32"), "key:banned")
    assert config.limits.default == (
        BucketSpec(1.0, 10, 20, "default"),
        BucketSpec(3600.0, 1000, 1000, "default-2", per=("ip",)),
        # A later item's missing keys come from the built-in default too.
        BucketSpec(1.0, 10, 500, "shared", per=("route",)),
    )
    premium, partial, listed = config.limits.overrides
    assert premium.buckets == (
        BucketSpec(1.0, 100, 200, "premium", per=("client", "header:X-Tenant")),
    )
    # An override's missing keys come from limits.default's first limit.
    assert (partial.client, partial.buckets) == (
        "key-partial",
        (BucketSpec(1.0, 10, 50, "override"),),
    )
    assert listed.buckets == (
        BucketSpec(1.0, 10, 40, "override"),
        BucketSpec(60.0, 60, 60, "override-2"),
    )
    login, healthz, beta, api = config.routes
    assert login.limit == (BucketSpec(60.0, 5, 5, "/login", per=("ip",)),)
    assert login.methods == frozenset({"POST"})  # upper-cased
    assert login.count_statuses == frozenset({401, 403, *range(500, 600)})
    assert (login.cost, login.queue) == (1, None)
    assert healthz.limit is UNLIMITED
    assert (healthz.methods, healthz.count_statuses) == (None, None)
    assert (beta.limit, beta.mode) == (None, Mode.ENFORCE)
    assert (api.methods, api.cost) == (frozenset({"GET", "HEAD"}), 2)
    assert api.limit == (
        BucketSpec(1.0, 10, 20, "/api"),
        BucketSpec(1.0, 500, 500, "backend", per=("route",)),
        BucketSpec(1.0, 10, 30, "/api-3"),
    )
    assert api.queue == QueueSpec(max_wait_seconds=0.2, max_queued=50)
    assert config.storage.backend == "redis"
    assert config.storage.on_error == "local"
    assert config.storage.timeout_seconds == pytest.approx(0.02)
    assert not config.access_log.enabled


def test_route_limit_inherits_missing_keys_from_default() -> None:
    text = (
        "upstream: {url: 'http://x'}\n"
        "limits: {default: {refill_period: 2s, refill_tokens: 3, max_tokens: 9}}\n"
        "routes:\n"
        "  - path_prefix: /a\n"
        "    limit: {max_tokens: 4}\n"
    )
    [route] = parse_config(text).routes
    assert route.limit == (BucketSpec(2.0, 3, 4, "/a"),)


def test_plain_number_durations_are_seconds() -> None:
    text = (
        "upstream: {url: 'http://x', read_timeout: 7}\n"
        "drain_timeout: 0.5\n"
        "limits: {default: {refill_period: 2}}\n"
    )
    config = parse_config(text)
    assert config.upstream.read_timeout_seconds == 7.0
    assert config.drain_timeout_seconds == 0.5
    assert config.limits.default[0].refill_period_seconds == 2.0


def test_refill_period_of_exactly_10ms_is_allowed() -> None:
    text = "upstream: {url: 'http://x'}\nlimits: {default: {refill_period: 10ms}}\n"
    assert parse_config(text).limits.default[0].refill_period_seconds == pytest.approx(0.01)


def test_null_routes_and_overrides_are_empty() -> None:
    text = "upstream: {url: 'http://x'}\nroutes:\nlimits:\n  overrides:\n"
    config = parse_config(text)
    assert config.routes == ()
    assert config.limits.overrides == ()


# -- durations --


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("10ms", 0.01),
        ("0s", 0.0),
        (" 2s ", 2.0),
        (3, 3.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "ms",
        "5 minutes",
        "1d",
        "1sec",
        "-1s",
        "1e3s",
        "s1",
        "1.s",
        "1 h 5m",
        -1,
        -0.5,
        True,
        None,
        [1],
        {"s": 1},
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_duration_rejects_nan() -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(math.nan)


# -- the schema is declared once, on the model --


@dataclass(frozen=True, slots=True)
class _ProbeServer(ServerConfig):
    """ServerConfig with one more key, declared the way every key is."""

    max_uri_size: int = setting(4096, parse=positive_int, restart=True)


@pytest.fixture
def probe_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the ``server:`` section as _ProbeServer: the loader is not touched."""
    [server] = [f for f in dataclasses.fields(GatewayConfig) if f.name == "server"]
    monkeypatch.setattr(server, "metadata", Setting(section=_ProbeServer).metadata())


@pytest.mark.usefixtures("probe_server")
def test_a_key_added_to_the_model_is_read_without_touching_the_loader() -> None:
    config = parse_config("upstream: {url: 'http://x'}\nserver:\n  max_uri_size: 100\n")
    assert isinstance(config.server, _ProbeServer)
    assert config.server.max_uri_size == 100
    assert config.server.max_headers == 100  # the section's other keys as before
    absent = parse_config("upstream: {url: 'http://x'}\n").server
    assert isinstance(absent, _ProbeServer)
    assert absent.max_uri_size == 4096
    text = "upstream: {url: 'http://x'}\nserver:\n  max_uri_size: 0\n  max_uri: 5\n"
    assert _text_problems(text) == [
        "f.yaml:3:17: server.max_uri_size: must be positive, got 0",
        "f.yaml:4:3: server.max_uri: unknown key; did you mean 'max_uri_size'? "
        "expected one of: max_line_size, "
        "max_field_size, max_headers, header_timeout, body_timeout, keepalive_timeout, "
        "send_timeout, max_connections, underscores_in_headers, "
        "max_uri_size",
    ]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("upstream", UpstreamConfig),
        ("clients", ClientsConfig),
        ("storage", StorageConfig),
        ("access_log", AccessLogConfig),
        ("server", ServerConfig),
    ],
)
def test_unknown_key_lists_are_the_model_fields_keys(name: str, cls: type) -> None:
    text = f"{name}:\n  url: http://x\n  bogus: 1\n"
    if name != "upstream":
        text = f"upstream: {{url: 'http://x'}}\n{name}:\n  bogus: 1\n"
    keys = ", ".join(yaml_keys(cls))
    assert _text_problems(text) == [
        f"f.yaml:3:3: {name}.bogus: unknown key; expected one of: {keys}"
    ]


def test_top_level_keys_follow_the_model_field_order() -> None:
    assert yaml_keys(GatewayConfig) == (
        "listen", "admin", "workers", "drain_timeout", "max_body_size", "mode", "tls",
        "upstream", "upstreams", "clients", "limits", "routes", "storage", "access_log",
        "server",
    )  # fmt: skip
    assert yaml_keys(BucketSpec) == (
        "refill_period",
        "refill_tokens",
        "max_tokens",
        "name",
        "per",
    )


def test_restart_keys_are_derived_from_the_model() -> None:
    # The set the server kept by hand before it was derived.
    assert set(restart_keys()) == {
        "listen_host", "listen_port", "admin_host", "admin_port", "workers",
        "storage", "access_log", "server", "drain_timeout_seconds",
    }  # fmt: skip
    declared = [name for name, _, spec in settings(GatewayConfig) if spec.restart]
    assert list(restart_keys()) == declared

    @dataclass(frozen=True)
    class Probe:
        fixed: int = setting(1, parse=positive_int, restart=True)
        live: int = setting(2, parse=positive_int)

    assert restart_keys(Probe) == ("fixed",)


def test_server_compares_the_derived_restart_keys() -> None:
    from gateway import server

    assert restart_keys() == server._RESTART_KEYS


# -- the rules between keys, on the built model --


def test_cross_key_rules_work_on_the_built_model() -> None:
    upstream = UpstreamConfig(url="http://x")
    clash = GatewayConfig(upstream=upstream, listen_port=9090, workers=2)
    assert [key for key, _ in config_problems(clash)] == ["admin", "workers"]
    assert config_problems(GatewayConfig(upstream=upstream)) == []
    short = BucketSpec(0.005, 10, 5)
    assert [key for key, _ in bucket_problems(short, "b", read_cleanly=True)] == [
        "b.refill_period"
    ]
    small = BucketSpec(1.0, 10, 5)
    assert [key for key, _ in bucket_problems(small, "b", read_cleanly=True)] == [
        "b.max_tokens"
    ]
    assert bucket_problems(small, "b", read_cleanly=False) == []


def test_a_rule_on_a_key_the_file_lacks_is_placed_at_the_enclosing_mapping() -> None:
    # admin is not written: the clash with its default port is placed at the
    # document (its first key, line 2, after the comment).
    text = "# gateway\nlisten: ':9090'\nupstream: {url: 'http://x'}\n"
    assert _text_problems(text) == [
        "f.yaml:2:1: admin: port 9090 (the default admin address, 127.0.0.1:9090) is the "
        "proxy listener's too; write admin with a port of its own"
    ]
    # max_tokens is not written in the route's limit: at the limit's mapping.
    text = (
        "upstream: {url: 'http://x'}\n"
        "routes:\n"
        "  - {path_prefix: /a, limit: {refill_tokens: 30}}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:3:30: routes[0].limit.max_tokens: max_tokens (default 20) is below "
        "refill_tokens 30; write max_tokens here too (at least 30)"
    ]


def test_a_bad_default_bucket_is_reported_once_not_at_each_route_inheriting_it() -> None:
    text = (
        "upstream: {url: 'http://x'}\n"
        "limits: {default: {refill_period: 5ms}}\n"
        "routes:\n"
        "  - {path_prefix: /a, limit: {max_tokens: 40}}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:2:35: limits.default.refill_period: must be at least 10ms (the refill "
        "clock's resolution), got 0.005s"
    ]


# -- several limits, names, per --

_UP = "upstream: {url: 'http://x'}\n"


def test_unnamed_limits_of_a_list_are_name_then_name_2_name_3() -> None:
    text = _UP + (
        "limits:\n"
        "  default: [{max_tokens: 20}, {max_tokens: 30}, {max_tokens: 40, name: big}, {}]\n"
        "  overrides:\n"
        "    - {client: a, limit: [{max_tokens: 50}, {max_tokens: 60}]}\n"
        "    - {client: b, max_tokens: 70}\n"
        "    - {client: c, limit: {max_tokens: 80, name: gold}}\n"
        "routes:\n"
        "  - path_prefix: /api\n"
        "    limit: [{max_tokens: 20}, {max_tokens: 30}, {max_tokens: 40}]\n"
        "  - path_prefix: /one\n"
        "    limit: [{max_tokens: 20}]\n"
    )
    config = parse_config(text)
    # By position: a named item does not shift the names of the others.
    assert [b.name for b in config.limits.default] == [
        "default",
        "default-2",
        "big",
        "default-4",
    ]
    a, b, c = config.limits.overrides
    assert [x.name for x in a.buckets] == ["override", "override-2"]
    assert [x.name for x in b.buckets] == ["override"]
    assert [x.name for x in c.buckets] == ["gold"]
    api, one = config.routes
    assert isinstance(api.limit, tuple)
    assert [x.name for x in api.limit] == ["/api", "/api-2", "/api-3"]
    assert one.limit == (BucketSpec(1.0, 10, 20, "/one"),)


def test_a_list_of_one_limit_is_the_single_limit() -> None:
    single = parse_config(_UP + "limits: {default: {max_tokens: 30}}\n")
    listed = parse_config(_UP + "limits: {default: [{max_tokens: 30}]}\n")
    assert single.limits == listed.limits


def test_every_item_of_a_list_refines_the_first_default_limit() -> None:
    text = _UP + (
        "limits:\n"
        "  default:\n"
        "    - {refill_period: 2s, refill_tokens: 3, max_tokens: 9, per: route, name: base}\n"
        "    - {refill_period: 1h, refill_tokens: 100, max_tokens: 100}\n"
        "  overrides:\n"
        "    - {client: k, max_tokens: 12}\n"
        "routes:\n"
        "  - path_prefix: /a\n"
        "    limit: [{max_tokens: 4}, {refill_tokens: 5, max_tokens: 5}]\n"
    )
    config = parse_config(text)
    # name and per are not inherited: the item's place names it; per is client.
    [override] = config.limits.overrides
    assert override.buckets == (BucketSpec(2.0, 3, 12, "override"),)
    [route] = config.routes
    assert route.limit == (BucketSpec(2.0, 3, 4, "/a"), BucketSpec(2.0, 5, 5, "/a-2"))


def test_per_is_read_for_each_limit() -> None:
    text = _UP + (
        "routes:\n"
        "  - path_prefix: /a\n"
        "    limit:\n"
        "      - {per: client}\n"
        "      - {per: ip}\n"
        "      - {per: route}\n"
        "      - {per: 'header:X-Tenant'}\n"
        "      - {per: [ip, 'header:X-Tenant']}\n"
    )
    [route] = parse_config(text).routes
    assert isinstance(route.limit, tuple)
    assert [b.per for b in route.limit] == [
        ("client",), ("ip",), ("route",), ("header:X-Tenant",), ("ip", "header:X-Tenant"),
    ]  # fmt: skip


def test_a_limit_list_item_that_is_not_a_mapping() -> None:
    text = _UP + "routes:\n  - path_prefix: /a\n    limit: [unlimited]\n"
    assert _text_problems(text) == [
        "f.yaml:4:13: routes[0].limit[0]: expected a mapping of refill_period, "
        "refill_tokens, max_tokens, name, per, such as {refill_period: 1s, refill_tokens: "
        "10, max_tokens: 20} (10 tokens every 1s, up to 20); got 'unlimited'"
    ]


def test_a_limit_name_must_be_printable_ascii_without_quotes() -> None:
    text = _UP + "limits: {default: {name: 'a\"b'}}\n"
    assert _text_problems(text) == [
        "f.yaml:2:26: limits.default.name: expected printable ASCII without quotes or "
        "backslashes, got 'a\"b'"
    ]


def test_a_default_name_repeated_by_a_later_item_is_placed_at_that_item() -> None:
    # Item 1 is unnamed, so it is "/x-2": the name item 0 chose.
    text = _UP + "routes:\n  - {path_prefix: /x, limit: [{name: /x-2}, {max_tokens: 30}]}\n"
    assert _text_problems(text) == [
        "f.yaml:3:45: routes[0].limit[1].name: '/x-2' is also the name of "
        "routes[0].limit[0]; each limit of a list needs a name of its own"
    ]


def test_a_later_default_item_with_a_problem_leaves_the_first_to_refine() -> None:
    """limits.default[1] has a typo; routes still refine limits.default[0] as
    written (refill_tokens 1), not the built-in default (10), which would add
    a problem at the route that the file does not have."""
    text = _UP + (
        "limits:\n"
        "  default:\n"
        "    - {refill_tokens: 1, max_tokens: 2}\n"
        "    - {max_token: 5}\n"
        "routes:\n"
        "  - {path_prefix: /a, limit: {max_tokens: 5}}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:5:8: limits.default[1].max_token: unknown key; did you mean "
        "'max_tokens'? expected one of: refill_period, refill_tokens, max_tokens, name, per"
    ]


# -- routes: methods, cost, queue, count_statuses --


def test_route_keys_and_their_defaults() -> None:
    text = _UP + (
        "routes:\n"
        "  - path_prefix: /a\n"
        "    methods: [get, Post, GET]\n"
        "    cost: 3\n"
        "    queue: {max_wait: 250ms}\n"
        "    count_statuses: [401, '403', '5xx', '42x', '4XX']\n"
        "  - path_prefix: /b\n"
    )
    a, b = parse_config(text).routes
    assert a.methods == frozenset({"GET", "POST"})
    assert a.cost == 3
    assert a.queue == QueueSpec(max_wait_seconds=0.25, max_queued=1000)
    assert a.count_statuses == frozenset(range(400, 600))
    assert b == RouteSpec("/b")
    assert (b.methods, b.cost, b.queue, b.count_statuses) == (None, 1, None, None)


def test_count_statuses_ranges() -> None:
    text = _UP + "routes:\n  - {path_prefix: /a, count_statuses: ['40x', 429, '1xx']}\n"
    [route] = parse_config(text).routes
    assert route.count_statuses == frozenset([*range(400, 410), 429, *range(100, 200)])


@pytest.mark.parametrize("value", ["0xx", "6xx", "4x1", "x01", "99", "600", "4xxx", True, 4.0])
def test_count_statuses_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a status code"):
        status_range(value)


@pytest.mark.parametrize("value", ["*", "", "GE T", "GET/1", 5, None, ["GET"]])
def test_methods_reject(value: object) -> None:
    with pytest.raises(ValueError, match="method"):
        method_token(value)


def test_extension_methods_are_tokens() -> None:
    assert method_token("m-search") == "M-SEARCH"
    assert method_token("PROPFIND") == "PROPFIND"


def test_a_null_methods_list_is_an_empty_one() -> None:
    text = _UP + "routes:\n  - path_prefix: /a\n    methods:\n"
    assert _text_problems(text) == [
        "f.yaml:4:13: routes[0].methods: an empty list matches no request; leave methods "
        "out to match every method"
    ]


def test_cost_equal_to_the_smallest_max_tokens_is_allowed() -> None:
    text = _UP + (
        "limits: {default: {max_tokens: 20}, overrides: [{client: k, max_tokens: 10}]}\n"
        "routes:\n"
        "  - {path_prefix: /a, cost: 10}\n"
        "  - {path_prefix: /b, cost: 11}\n"
        "  - {path_prefix: /c, cost: 11, limit: {max_tokens: 11}}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:5:29: routes[1].cost: 11 is more than max_tokens (10) of the limit "
        "'override' (limits.overrides[0], client 'k'): such a request could never be "
        "admitted"
    ]


def test_queue_max_wait_equal_to_drain_timeout_is_allowed() -> None:
    text = _UP + "drain_timeout: 2s\nroutes:\n  - {path_prefix: /a, queue: {max_wait: 2s}}\n"
    [route] = parse_config(text).routes
    assert route.queue == QueueSpec(2.0, 1000)


def test_queue_must_be_a_mapping() -> None:
    text = _UP + "routes:\n  - {path_prefix: /a, queue: 1s}\n"
    assert _text_problems(text) == [
        "f.yaml:3:30: routes[0].queue: expected a mapping of max_wait, max_queued; got '1s'"
    ]


# -- unreachable routes --


@pytest.mark.parametrize(
    ("routes", "unreachable"),
    [
        pytest.param([("/", None), ("/api", None)], {1: [0]}, id="slash-first"),
        pytest.param([("/api", None), ("/", None)], {}, id="slash-last"),
        pytest.param([("/api", None), ("/api", None)], {1: [0]}, id="duplicate"),
        pytest.param([("/a", None), ("/ab", None)], {1: [0]}, id="string-prefix"),
        pytest.param([("/ab", None), ("/a", None)], {}, id="longer-first"),
        pytest.param([("/a", {"GET"}), ("/a", {"POST"})], {}, id="other-method"),
        pytest.param([("/a", {"GET"}), ("/a", None)], {}, id="rest-of-methods"),
        pytest.param([("/a", {"GET"}), ("/a/b", {"GET"})], {1: [0]}, id="same-method"),
        pytest.param([("/a", None), ("/a", {"GET"})], {1: [0]}, id="all-methods-first"),
        pytest.param(
            [("/a", {"GET"}), ("/", {"POST"}), ("/a/b", {"GET", "POST"})],
            {2: [0, 1]},
            id="methods-covered-together",
        ),
        pytest.param(
            [("/a", {"GET"}), ("/x", {"POST"}), ("/a/b", {"GET", "POST"})],
            {},
            id="methods-partly-covered",
        ),
    ],
)
def test_unreachable_routes(
    routes: list[tuple[str, set[str] | None]], unreachable: dict[int, list[int]]
) -> None:
    specs = tuple(
        RouteSpec(prefix, methods=None if methods is None else frozenset(methods))
        for prefix, methods in routes
    )
    config = GatewayConfig(upstream=UpstreamConfig(url="http://x"), routes=specs)
    found = {key: message for key, message in route_problems(config)}
    assert set(found) == {f"routes[{j}].path_prefix" for j in unreachable}
    for j, earlier in unreachable.items():
        message = found[f"routes[{j}].path_prefix"]
        assert message.startswith("unreachable: ")
        assert [f"routes[{i}] " in message for i in range(j)] == [
            i in earlier for i in range(j)
        ]


def test_a_route_with_a_bad_path_prefix_does_not_make_later_routes_unreachable() -> None:
    # routes[0] stands in as "/" while its problem is reported; judging that
    # stand-in would call every later route unreachable.
    text = _UP + "routes:\n  - path_prefix: api\n  - path_prefix: /login\n  - {}\n"
    assert _text_problems(text) == [
        "f.yaml:3:18: routes[0].path_prefix: must start with '/', got 'api'",
        "f.yaml:5:5: routes[2].path_prefix: is required",
    ]


def test_a_bad_default_limit_does_not_judge_route_costs() -> None:
    text = (
        _UP
        + "limits: {default: {max_tokens: 5, refill_tokens: 0}}\n"
        + ("routes:\n  - {path_prefix: /a, cost: 8}\n")
    )
    assert _text_problems(text) == [
        "f.yaml:2:50: limits.default.refill_tokens: must be positive, got 0"
    ]


def test_route_rules_on_the_built_model() -> None:
    upstream = UpstreamConfig(url="http://x")
    route = RouteSpec("/a", cost=30, queue=QueueSpec(60.0, 10))
    config = GatewayConfig(upstream=upstream, routes=(route,))
    assert [key for key, _ in route_problems(config)] == [
        "routes[0].cost",
        "routes[0].queue.max_wait",
    ]
    # Skipped where reading found problems: those values are stand-ins.
    assert route_problems(config, unread=["routes[0].mode"]) == []
    assert [key for key, _ in route_problems(config, unread=["limits.default"])] == [
        "routes[0].queue.max_wait"
    ]
    assert [key for key, _ in route_problems(config, unread=["drain_timeout"])] == [
        "routes[0].cost"
    ]
    assert [key for key, _ in config_problems(config, unread=["routes[0]"])] == []
    named = [BucketSpec(1.0, 1, 1, "a"), None, BucketSpec(1.0, 1, 1, "a")]
    assert limit_list_problems(named, "k") == [
        (
            "k[2].name",
            "'a' is also the name of k[0]; each limit of a list needs a name of its own",
        )
    ]
