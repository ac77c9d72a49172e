"""The monitoring assets in deploy/: the Prometheus config, the recording and alerting
rules and their unit tests, the Grafana dashboard. Checked with promtool, against the
metric names of CONTRACT.md, against the gateway's real /metrics, and by a real
Prometheus scraping a real gateway.

promtool and prometheus come from Debian's `prometheus` package (scripts/setup --test);
when they are missing these tests fail, they are not skipped.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import RunningGateway, StartGateway
from tests.helpers import assert_succeeded, free_port, limits, run, sequential, tool

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RECORDING_RULES = REPO / "deploy" / "prometheus" / "rules" / "gateway-recording.yml"
ALERT_RULES = REPO / "deploy" / "prometheus" / "rules" / "gateway-alerts.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "tests" / "gateway-rules-test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ratelimit-gateway.json"
METRICS_PY = REPO / "gateway" / "metrics.py"

# CONTRACT.md, "Metrics (names and labels fixed)": what dashboards and rules may use.
CONTRACT_METRICS: dict[str, str] = {
    "gateway_requests_total": "counter",
    "gateway_responses_total": "counter",
    "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_duration_seconds": "histogram",
    "gateway_upstream_errors_total": "counter",
    "gateway_clients_tracked": "gauge",
    "gateway_clients_evicted_total": "counter",
    "gateway_access_log_queue_depth": "gauge",
    "gateway_access_log_dropped_total": "counter",
    "gateway_storage_errors_total": "counter",
    "gateway_config_reloads_total": "counter",
    "gateway_inflight_requests": "gauge",
    "gateway_workers_restarted_total": "counter",
    "gateway_upstream_server_up": "gauge",
}
CONTRACT_DENIAL_RATIO = (
    'sum(rate(gateway_requests_total{decision="denied"}[5m]))'
    " / sum(rate(gateway_requests_total[5m]))"
)
PROMETHEUS_TYPES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram",
                    # metrics.py's plain families, exposed as these types by its collector
                    "PlainCounter": "counter", "PlainHistogram": "histogram"}  # fmt: skip
RAW_NAME = re.compile(r"gateway_[a-z_]+")
RECORDED_NAME = re.compile(r"gateway:[a-z_:0-9]+")
# Grafana's variables, replaced by something PromQL parses.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${DS_PROMETHEUS}": "prometheus",
    "$instance": ".*",
    "$route": ".*",
    "$job": ".*",
}
POLL_SECONDS = 30.0
TWO_TOKEN_LIMITS = limits(2)


# -- helpers --------------------------------------------------------------------------


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run([tool("promtool"), *args], timeout=30, cwd=REPO)


def declared_metrics() -> dict[str, str]:
    """Name -> type of every Counter/Gauge/Histogram (or plain family) constructed in
    gateway/metrics.py."""
    declared: dict[str, str] = {}
    for node in ast.walk(ast.parse(METRICS_PY.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = PROMETHEUS_TYPES.get(node.func.id)
        if kind is None or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            declared[first.value] = kind
    return declared


def exposed_names(metrics: dict[str, str]) -> set[str]:
    """The sample names a scrape shows for ``metrics`` (prometheus_client's naming)."""
    names: set[str] = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.add(name)
    return names


def usable_names() -> set[str]:
    """Contract metrics the gateway really declares: all a dashboard or rule may use."""
    declared = declared_metrics()
    return exposed_names({n: k for n, k in CONTRACT_METRICS.items() if declared.get(n) == k})


def load_rules(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules(RECORDING_RULES)}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, annotations, templating queries."""
    exprs = [
        target["expr"]
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if a.get("expr")]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def substitute_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def panel_expressions(dashboard: dict[str, Any]) -> list[str]:
    """The expressions Prometheus evaluates (templating's label_values() is Grafana's)."""
    exprs = [
        substitute_variables(target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    annotations = dashboard["annotations"]["list"]
    exprs += [substitute_variables(a["expr"]) for a in annotations if a.get("expr")]
    return exprs


# -- the contract's metric names --------------------------------------------------------


def test_metrics_py_declares_every_contract_metric_with_its_type() -> None:
    declared = declared_metrics()
    wrong = {
        name: (kind, declared.get(name))
        for name, kind in CONTRACT_METRICS.items()
        if declared.get(name) != kind
    }
    assert not wrong, f"contract metric -> (contract type, gateway/metrics.py type): {wrong}"


# -- promtool ---------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO)))
    assert_succeeded(result)
    assert "2 rule files found" in result.stdout


@pytest.mark.parametrize("rules", [RECORDING_RULES, ALERT_RULES], ids=["recording", "alerts"])
def test_promtool_check_rules(rules: Path) -> None:
    assert_succeeded(run_promtool("check", "rules", str(rules.relative_to(REPO))))


def test_promtool_rule_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST.relative_to(REPO)))
    assert_succeeded(result)
    assert "SUCCESS" in result.stdout


def test_scrape_config_targets_the_gateway_admin_listener() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ratelimit-gateway"]
    assert job["scrape_interval"] == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9090"]
    assert sorted(config["rule_files"]) == [
        "rules/gateway-alerts.yml",
        "rules/gateway-recording.yml",
    ]


def test_recording_rules_define_the_contract_denial_ratio() -> None:
    rules = {rule["record"]: rule["expr"] for rule in load_rules(RECORDING_RULES)}
    assert rules["gateway:denial_ratio:rate5m"] == CONTRACT_DENIAL_RATIO
    assert "sum by (route)" in rules["gateway:denial_ratio_by_route:rate5m"]


def test_every_alert_has_for_severity_summary_and_description() -> None:
    alerts = {rule["alert"]: rule for rule in load_rules(ALERT_RULES)}
    assert {
        "GatewayHighDenialRatio",
        "GatewayUpstreamErrors",
        "GatewayAccessLogDropping",
        "GatewayStorageErrors",
        "GatewayConfigReloadFailed",
    } <= alerts.keys()
    for name, rule in alerts.items():
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alerts.keys() <= tested, f"alerts without a unit test: {alerts.keys() - tested}"


def test_rules_use_only_contract_metrics() -> None:
    usable = usable_names()
    recorded = recorded_names()
    for path in (RECORDING_RULES, ALERT_RULES):
        for rule in load_rules(path):
            expr = rule["expr"]
            unknown = set(RAW_NAME.findall(expr)) - usable
            assert not unknown, f"{path.name}: {rule.get('record') or rule['alert']}: {unknown}"
            undefined = set(RECORDED_NAME.findall(expr)) - recorded
            assert not undefined, f"{path.name}: not recorded: {undefined}"


# -- the Grafana dashboard ------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"]
    assert dashboard["title"]
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["name"] == "DS_PROMETHEUS"
    assert datasource["query"] == "prometheus"
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]


def test_dashboard_has_the_expected_panels() -> None:
    dashboard = load_dashboard()
    by_title = {
        panel["title"]: " ".join(t["expr"] for t in panel.get("targets", []))
        for panel in all_panels(dashboard)
    }
    expected = {
        "Denial ratio per route": 'decision="denied"',
        "Requests by decision": "sum by (decision) (rate(gateway_requests_total",
        "Request latency quantiles": "gateway_request_duration_seconds_bucket",
        "Upstream errors by kind": "sum by (kind) (rate(gateway_upstream_errors_total",
        "Tracked clients": "gateway_clients_tracked",
        "Clients evicted by reason": "sum by (reason) (rate(gateway_clients_evicted_total",
        "Access-log queue depth and drops": "gateway_access_log_dropped_total",
        "In-flight requests": "gateway_inflight_requests",
        "Config reloads": "gateway_config_reloads_total",
        "Storage errors": "gateway_storage_errors_total",
        "Workers restarted": "gateway_workers_restarted_total",
    }
    for title, fragment in expected.items():
        assert title in by_title, f"missing panel {title!r}"
        assert fragment in by_title[title], f"{title}: {by_title[title]}"
    quantiles = by_title["Request latency quantiles"]
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in quantiles
    assert "gateway_access_log_queue_depth" in by_title["Access-log queue depth and drops"]


def test_dashboard_uses_only_contract_metrics_and_recorded_series() -> None:
    usable = usable_names()
    recorded = recorded_names()
    exprs = dashboard_expressions(load_dashboard())
    assert exprs
    used_raw: set[str] = set()
    for expr in exprs:
        raw = set(RAW_NAME.findall(expr))
        used_raw |= raw
        assert not raw - usable, f"not a contract metric: {raw - usable} in {expr}"
        undefined = set(RECORDED_NAME.findall(expr)) - recorded
        assert not undefined, f"not defined in the recording rules: {undefined} in {expr}"
    # Every contract metric is on the dashboard (histograms through their buckets).
    missing = {
        name
        for name, kind in CONTRACT_METRICS.items()
        if (f"{name}_bucket" if kind == "histogram" else name) not in used_raw
    }
    assert not missing, f"contract metrics not on the dashboard: {missing}"


def test_dashboard_expressions_parse_as_promql(tmp_path: Path) -> None:
    """promtool has no `check expr`: check them as recording rules."""
    exprs = panel_expressions(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": expr}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert_succeeded(result)
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- the gateway's real /metrics ------------------------------------------------------


@pytest.fixture
async def scraper() -> AsyncIterator[aiohttp.ClientSession]:
    """A client like Prometheus: asks for compression (the admin listener gzips or
    deflates /metrics when offered) and reads the decompressed text."""
    async with aiohttp.ClientSession() as session:
        yield session


async def test_metrics_exposition_passes_promtool_check_metrics(
    start_gateway: StartGateway, http: aiohttp.ClientSession, scraper: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=TWO_TOKEN_LIMITS)
    assert await sequential(http, gw.url + "/some/path", 5) == [200, 200, 429, 429, 429]
    async with scraper.get(gw.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        exposition = await response.read()
    for name in CONTRACT_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}".encode() in exposition, name

    process = await asyncio.create_subprocess_exec(
        tool("promtool"),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(exposition), 30)
    problems = (stdout + stderr).decode().strip()
    assert process.returncode == 0, f"promtool check metrics: {process.returncode}\n{problems}"
    assert problems == "", f"promtool check metrics:\n{problems}"


async def test_metrics_are_openmetrics_when_asked(
    start_gateway: StartGateway, http: aiohttp.ClientSession, scraper: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=TWO_TOKEN_LIMITS)
    await sequential(http, gw.url + "/", 3)
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with scraper.get(gw.admin_url + "/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "application/openmetrics-text"
        body = await response.text()
    assert body.endswith("# EOF\n")
    assert "# TYPE gateway_requests counter" in body
    assert 'gateway_requests_total{decision="denied",route="default"} 1.0' in body


# -- a real Prometheus scraping a real gateway ------------------------------------------


class Prometheus:
    def __init__(self, url: str, log: Path, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.log = log
        self.session = session
        # One deadline for all the polling of a test, well inside pytest's 60 s timeout.
        self.deadline = asyncio.get_running_loop().time() + POLL_SECONDS

    async def query(self, expr: str) -> dict[str, Any]:
        async with self.session.get(
            self.url + "/api/v1/query", params={"query": expr}
        ) as response:
            body: dict[str, Any] = await response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body

    async def scalar(self, expr: str) -> float | None:
        """The value of a one-sample vector, None when empty."""
        result = (await self.query(expr))["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    async def wait_for(self, expr: str, accept: Callable[[float | None], bool]) -> float | None:
        """Bounded polling (POLL_SECONDS from start, in all): Prometheus is an external
        process with its own scrape and evaluation clocks."""
        loop = asyncio.get_running_loop()
        value = await self.scalar(expr)
        while not accept(value):
            if loop.time() > self.deadline:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
                pytest.fail(
                    f"{expr} = {value}, {POLL_SECONDS}s after start\n--- prometheus log\n{tail}"
                )
            await asyncio.sleep(0.2)
            value = await self.scalar(expr)
        return value


StartPrometheus = Callable[[RunningGateway], Awaitable[Prometheus]]


@pytest.fixture
async def start_prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """``await start_prometheus(gw)``: the real prometheus binary scraping ``gw``'s admin
    listener every second and evaluating the recording rules; killed at teardown."""
    processes: list[asyncio.subprocess.Process] = []
    session = aiohttp.ClientSession()

    async def start(gw: RunningGateway) -> Prometheus:
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(RECORDING_RULES)],
            "scrape_configs": [
                {
                    "job_name": "ratelimit-gateway",
                    "static_configs": [{"targets": [f"127.0.0.1:{gw.server.admin_port}"]}],
                }
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        processes.append(process)
        prometheus = Prometheus(f"http://127.0.0.1:{port}", log, session)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            assert process.returncode is None, f"prometheus exited:\n{log.read_text()}"
            try:
                async with session.get(prometheus.url + "/-/ready") as response:
                    if response.status == 200:
                        return prometheus
            except aiohttp.ClientConnectionError:
                pass
            if loop.time() > deadline:
                pytest.fail(f"prometheus not ready after 20s:\n{log.read_text()}")
            await asyncio.sleep(0.1)

    yield start
    await session.close()
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_real_prometheus_scrapes_the_gateway_and_records_the_denial_ratio(
    start_gateway: StartGateway,
    start_prometheus: StartPrometheus,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(limits=limits(10))
    prometheus = await start_prometheus(gw)
    await prometheus.wait_for('up{job="ratelimit-gateway"}', lambda v: v == 1)

    # One request first, so the series exist before the rest arrive and rate() sees them.
    assert await sequential(http, gw.url + "/first", 1) == [200]
    await prometheus.wait_for("sum(gateway_requests_total)", lambda v: v == 1)
    statuses = await sequential(http, gw.url + "/more", 29)
    assert statuses == [200] * 9 + [429] * 20
    assert gw.metric("gateway_requests_total", {"route": "default", "decision": "denied"}) == 20

    denied = await prometheus.wait_for(
        'sum(gateway_requests_total{decision="denied"})', lambda v: v == 20
    )
    assert denied == 20
    allowed = await prometheus.scalar('sum(gateway_requests_total{decision="allowed"})')
    assert allowed == 10
    # The recording rules on real data: the 20 denials and 9 of the allowed requests fall
    # inside the rate window (the first request is its baseline). Only roughly 20/29:
    # rate() extrapolates each series on its own, and a counter whose first sample is 0
    # (denied) is not extrapolated back past it, while allowed (first sample 1) is.
    expected = pytest.approx(20 / 29, rel=0.05)
    ratio = await prometheus.wait_for(
        "gateway:denial_ratio:rate5m", lambda v: v is not None and v == expected
    )
    assert ratio == expected
    by_route = await prometheus.wait_for(
        'gateway:denial_ratio_by_route:rate5m{route="default"}',
        lambda v: v is not None and v == expected,
    )
    assert by_route == expected

    # Every dashboard expression is accepted by this Prometheus.
    for expr in panel_expressions(load_dashboard()):
        await prometheus.query(expr)
