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
from gateway.config.convert import positive_int
from gateway.config.durations import parse_duration
from gateway.config.model import ServerConfig, Setting, setting, settings, yaml_keys
from gateway.config.validate import bucket_problems, config_problems
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
                "3:1: limts: unknown key; expected one of: listen, admin, workers, "
                "drain_timeout, max_body_size, mode, upstream, clients, limits, routes, "
                "storage, access_log, server"
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
                "6:5: limits.default.refil_tokens: unknown key; expected one of: "
                "refill_period, refill_tokens, max_tokens"
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
            ["3:3: upstream.url: is required (the backend being fronted)"],
            id="missing-upstream-url",
        ),
        pytest.param(
            "missing_upstream.yaml",
            ["1:1: upstream.url: is required (the backend being fronted)"],
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
                "5:12: routes[0].limit: expected 'unlimited' or a mapping of "
                "refill_period, refill_tokens, max_tokens",
                "7:47: routes[1].limit.refill_tokens: must be positive, got 0",
            ],
            id="bad-route-limit",
        ),
        pytest.param(
            "duplicate_override.yaml",
            ["9:15: limits.overrides[2].client: 'key-a' is listed twice"],
            id="duplicate-override-client",
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
    assert _text_problems(text) == ["f.yaml:3:20: clients.trusted_proxies: expected a list"]


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
        "f.yaml:5:7: limits.overrides[0].max_token: unknown key; expected one of: "
        "client, refill_period, refill_tokens, max_tokens",
        "f.yaml:8:5: routes[0].limits: unknown key; expected one of: path_prefix, limit, mode",
    ]


def test_unknown_key_in_upstream_section() -> None:
    text = "upstream:\n  url: http://x\n  read_timout: 5s\n"
    assert _text_problems(text) == [
        "f.yaml:3:3: upstream.read_timout: unknown key; expected one of: url, "
        "connect_timeout, read_timeout, max_connections, preserve_host"
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
        "f.yaml:2:10: workers: 8 workers with storage.backend: memory would give every "
        "client 8x its limit"
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
    assert config.limits.default == BucketSpec(1.0, 10, 20, "default")
    [premium] = config.limits.overrides
    assert premium.client == "key-premium-1"
    assert (premium.bucket.refill_period_seconds, premium.bucket.refill_tokens) == (1.0, 100)
    assert premium.bucket.max_tokens == 200
    login, healthz, beta = config.routes
    assert login.path_prefix == "/login"
    assert login.limit == BucketSpec(60.0, 5, 5, "/login")
    assert healthz.limit is UNLIMITED
    assert (beta.path_prefix, beta.limit, beta.mode) == ("/beta", None, Mode.SHADOW)
    assert config.clients.idle_timeout_seconds == 600.0


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
    assert config.limits.default == BucketSpec(1.0, 10, 20, "default")
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
    premium, partial = config.limits.overrides
    assert premium.bucket == BucketSpec(1.0, 100, 200, "override")
    # An override's missing keys come from limits.default.
    assert (partial.client, partial.bucket.max_tokens) == ("key-partial", 50)
    assert (partial.bucket.refill_period_seconds, partial.bucket.refill_tokens) == (1.0, 10)
    login, healthz, beta = config.routes
    assert login.limit == BucketSpec(60.0, 5, 5, "/login")
    assert healthz.limit is UNLIMITED
    assert (beta.limit, beta.mode) == (None, Mode.ENFORCE)
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
    assert route.limit == BucketSpec(2.0, 3, 4, "/a")


def test_plain_number_durations_are_seconds() -> None:
    text = (
        "upstream: {url: 'http://x', read_timeout: 7}\n"
        "drain_timeout: 0.5\n"
        "limits: {default: {refill_period: 2}}\n"
    )
    config = parse_config(text)
    assert config.upstream.read_timeout_seconds == 7.0
    assert config.drain_timeout_seconds == 0.5
    assert config.limits.default.refill_period_seconds == 2.0


def test_refill_period_of_exactly_10ms_is_allowed() -> None:
    text = "upstream: {url: 'http://x'}\nlimits: {default: {refill_period: 10ms}}\n"
    assert parse_config(text).limits.default.refill_period_seconds == pytest.approx(0.01)


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
        "f.yaml:4:3: server.max_uri: unknown key; expected one of: max_line_size, "
        "max_field_size, max_headers, header_timeout, body_timeout, keepalive_timeout, "
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
        "listen", "admin", "workers", "drain_timeout", "max_body_size", "mode",
        "upstream", "clients", "limits", "routes", "storage", "access_log", "server",
    )  # fmt: skip
    assert yaml_keys(BucketSpec) == ("refill_period", "refill_tokens", "max_tokens")


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
        "f.yaml:2:1: admin: port 9090 is the proxy listener's too; "
        "the admin listener needs its own"
    ]
    # max_tokens is not written in the route's limit: at the limit's mapping.
    text = (
        "upstream: {url: 'http://x'}\n"
        "routes:\n"
        "  - {path_prefix: /a, limit: {refill_tokens: 30}}\n"
    )
    assert _text_problems(text) == [
        "f.yaml:3:30: routes[0].limit.max_tokens: max_tokens (20) must be at least "
        "refill_tokens (30)"
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
